// DeepSeek-V2 multi-head latent attention for decode steps, with absorbed projections, compiled at run
// time by NVRTC. It replaces the ~10 libtorch kernels of the absorbed path (q_nope x W_uk, two
// concatenations, scores, bias, softmax, cast, probabilities x latents, x W_uv, transpose copy) with four
// small kernels that spread every step over many SMs (one block per head was latency-bound: 24 us a
// layer on an H200, with 16 of 132 SMs busy):
//   mla_q        q_lat[bt, h] = q_nope[bt, h] . W_uk[h]                                  (R)  f32
//   mla_part     for each split of the cache slots: m = max_j s_j, l = sum_j exp(s_j - m),
//                o = sum_j exp(s_j - m) c_j, with s_j = scale * (q_lat . c_j + q_pe . k_pe_j) + bias_j
//   mla_combine  o_lat = sum_splits exp(m - M) o / sum_splits exp(m - M) l                 (R)  f32
//   mla_out      out[bt, h] = o_lat . W_uv^T[h]                                            (V)  bf16
// (flash-decoding: the splits' partial softmaxes merge exactly, up to f32 rounding). Slots whose bias
// is -inf (unwritten cache capacity, padding, the future) are skipped: neither scored nor read.
//
// Shapes (BT = batch x query tokens, t = bt % T, b = bt / T): q_nope (B, NH, T, N) bf16 with strides
// (qs_b, qs_h, qs_t), unit last stride; q_pe (B, NH, T, P) bf16 contiguous; w_uk (NH, N, R) bf16; ckv
// (B, S, R), kpe (B, S, P) bf16 with strides (c_b, c_s), (k_b, k_s), unit last stride; bias (B, 1, T, S)
// f32 contiguous; w_uv (NH, R, V) bf16; out (B, T, NH, V) bf16. Scratch: qlat (BT, NH, R), part_o (BT,
// NH, SP, R), part_ml (BT, NH, SP, 2), olat (BT, NH, R), all f32. Requirements (checked by the caller):
// R % 256 == 0, P % 8 == 0, P <= 256, N % 8 == 0, N <= 256, V % 8 == 0, 16-byte aligned rows.

#define MLA_THREADS 256

// grid (NH, R / 256, BT), block 256: the block's 8 warps split W_uk[h]'s N rows; each lane holds 8 of the
// block's 256 columns; the warps' partial sums meet in shared memory.
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_q(const bf16* __restrict__ q_nope, i64 qs_b, i64 qs_h, i64 qs_t, const bf16* __restrict__ w_uk,
      float* __restrict__ qlat, int NH, int T, int N, int R) {
  __shared__ float qn[256];
  __shared__ float part[8][256];
  const int h = blockIdx.x, chunk = blockIdx.y, bt = blockIdx.z, b = bt / T, t = bt % T;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bf16* qnp = q_nope + b * qs_b + h * qs_h + t * qs_t;
  for (int n = tid; n < N; n += MLA_THREADS) qn[n] = bf(qnp[n]);
  __syncthreads();
  const int n0 = warp * N / 8, n1 = (warp + 1) * N / 8;
  const bf16* base = w_uk + (i64)h * N * R + chunk * 256 + lane * 8;
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
  for (int n = n0; n < n1; ++n) fma8(a, qn[n], *reinterpret_cast<const uint4*>(base + (i64)n * R));
#pragma unroll
  for (int j = 0; j < 8; ++j) part[warp][lane * 8 + j] = a[j];
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < 8; ++w) s += part[w][tid];
  qlat[((i64)bt * NH + h) * R + chunk * 256 + tid] = s;
}

// grid (NH, SP, BT), block 256, dynamic shared memory (R + P + 2048 + per + 64) floats, per = slots per
// split = ceil(S / SP): the split's scores (a warp per slot), its max, exp-sum and exp-weighted latent
// sum (R / 8 threads cover a slot's row, 8 columns each; 256 / (R / 8) slot groups).
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_part(const float* __restrict__ qlat, const bf16* __restrict__ q_pe, const bf16* __restrict__ ckv, i64 c_b,
         i64 c_s, const bf16* __restrict__ kpe, i64 k_b, i64 k_s, const float* __restrict__ bias,
         float* __restrict__ part_o, float* __restrict__ part_ml, int NH, int T, int S, int P, int R, int SP,
         float scale) {
  extern __shared__ float sm[];
  const int per = (S + SP - 1) / SP;
  float* qf = sm;                  // R + P
  float* acc = qf + R + P;         // 2048 = (256 / (R / 8)) * R: slot groups' partial latent sums
  float* sc = acc + 2048;          // per
  float* red = sc + per;           // 64
  const int h = blockIdx.x, sp = blockIdx.y, bt = blockIdx.z, b = bt / T, t = bt % T;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = sp * per, j1 = min(S, j0 + per);
  const float* ql = qlat + ((i64)bt * NH + h) * R;
  for (int r = tid; r < R; r += MLA_THREADS) qf[r] = ql[r];
  const bf16* qp = q_pe + (((i64)b * NH + h) * T + t) * P;
  for (int p = tid; p < P; p += MLA_THREADS) qf[R + p] = bf(qp[p]);
  __syncthreads();
  const float* bs = bias + (i64)bt * S;
  const bf16* cb = ckv + b * c_b;
  const bf16* kb = kpe + b * k_b;
  for (int j = j0 + warp; j < j1; j += 8) {
    const float bj = bs[j];
    float d = 0.f;
    if (bj != NEG_INF) {  // the same for the whole warp
      const bf16* cr = cb + j * c_s;
      const bf16* kr = kb + j * k_s;
      for (int c = lane * 8; c < R; c += 256)
        d += dot8f(*reinterpret_cast<const uint4*>(cr + c), *reinterpret_cast<const float4*>(qf + c),
                   *reinterpret_cast<const float4*>(qf + c + 4));
      for (int c = lane * 8; c < P; c += 256)
        d += dot8f(*reinterpret_cast<const uint4*>(kr + c), *reinterpret_cast<const float4*>(qf + R + c),
                   *reinterpret_cast<const float4*>(qf + R + c + 4));
      d = warp_sum(d);
    }
    if (lane == 0) sc[j - j0] = bj == NEG_INF ? NEG_INF : d * scale + bj;
  }
  __syncthreads();
  float m = NEG_INF;
  for (int j = tid; j < j1 - j0; j += MLA_THREADS) m = fmaxf(m, sc[j]);
  m = block_reduce(m, true, red);
  float l = 0.f;
  for (int j = tid; j < j1 - j0; j += MLA_THREADS) {
    const float e = (sc[j] == NEG_INF || m == NEG_INF) ? 0.f : expf(sc[j] - m);
    sc[j] = e;
    l += e;
  }
  l = block_reduce(l, false, red);  // its barriers also publish sc
  const int RG = R / 8, KG = MLA_THREADS / RG;
  const int rg = tid % RG, kg = tid / RG;
  if (kg < KG) {
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const bf16* base = cb + rg * 8;
#pragma unroll 4
    for (int j = j0 + kg; j < j1; j += KG) {
      const float p = sc[j - j0];
      if (p != 0.f) fma8(a, p, *reinterpret_cast<const uint4*>(base + j * c_s));
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[kg * R + rg * 8 + q] = a[q];
  }
  __syncthreads();
  float* po = part_o + (((i64)bt * NH + h) * SP + sp) * R;
  for (int r = tid; r < R; r += MLA_THREADS) {
    float s = 0.f;
    for (int q = 0; q < KG; ++q) s += acc[q * R + r];
    po[r] = s;
  }
  if (tid == 0) {
    float* ml = part_ml + (((i64)bt * NH + h) * SP + sp) * 2;
    ml[0] = m;
    ml[1] = l;
  }
}

// grid (NH, BT), block 256: merge the splits' partial softmaxes into o_lat (R).
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, float* __restrict__ olat,
            int NH, int SP, int R) {
  const int h = blockIdx.x, bt = blockIdx.y;
  const float* ml = part_ml + ((i64)bt * NH + h) * SP * 2;
  float M = NEG_INF;
  for (int s = 0; s < SP; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f;
  for (int s = 0; s < SP; ++s) L += ml[2 * s] == NEG_INF ? 0.f : expf(ml[2 * s] - M) * ml[2 * s + 1];
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const float* po = part_o + ((i64)bt * NH + h) * SP * R;
  for (int r = threadIdx.x; r < R; r += MLA_THREADS) {
    float o = 0.f;
    for (int s = 0; s < SP; ++s)
      if (ml[2 * s] != NEG_INF) o += expf(ml[2 * s] - M) * po[(i64)s * R + r];
    olat[((i64)bt * NH + h) * R + r] = o * inv;
  }
}

// grid (NH, V / 8, BT), block 256: 8 output columns of one head; the threads split the R latent rows,
// then warp sums and the 8 warps' results meet in shared memory.
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_out(const float* __restrict__ olat, const bf16* __restrict__ w_uv, bf16* __restrict__ out, int NH, int T,
        int R, int V) {
  __shared__ float part[8][8];
  const int h = blockIdx.x, v0 = blockIdx.y * 8, bt = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float* ol = olat + ((i64)bt * NH + h) * R;
  const bf16* base = w_uv + (i64)h * R * V + v0;
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
  for (int r = tid; r < R; r += MLA_THREADS) fma8(a, ol[r], *reinterpret_cast<const uint4*>(base + (i64)r * V));
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    const float s = warp_sum(a[q]);
    if (lane == 0) part[warp][q] = s;
  }
  __syncthreads();
  if (tid < 8) {
    float s = 0.f;
    for (int w = 0; w < 8; ++w) s += part[w][tid];
    out[((i64)bt * NH + h) * V + v0 + tid] = to_bf16(s);
  }
}
