// DeepSeek-V2 multi-head latent attention for decode steps, with absorbed projections, in one kernel per
// (head, token), compiled at run time by NVRTC. It replaces the ~10 libtorch kernels of the absorbed
// path (q_nope x W_uk, two concatenations, scores, bias, softmax, cast, probabilities x latents,
// x W_uv, transpose copy):
//   q_lat = q_nope . W_uk[h]                       (R)   f32
//   s_j   = scale * (q_lat . c_j + q_pe . k_pe_j) + bias_j   for every cached slot j
//   o_lat = softmax(s) . c                         (R)   f32
//   out   = o_lat . W_uv^T[h]                      (V)   bf16, written as (B, T, NH, V)
// Slots whose bias is -inf (unwritten cache capacity, padding, the future) are skipped: neither their
// scores nor their latents are read.
//
// grid (NH, B * T), block 256 threads, dynamic shared memory (2R + P + 320 + S) floats.
// q_nope (B, NH, T, N) bf16 with strides (qs_b, qs_h, qs_t) and unit last stride; q_pe (B, NH, T, P) bf16
// contiguous; w_uk (NH, N, R) bf16; ckv (B, S, R) and kpe (B, S, P) bf16 with strides (c_b, c_s) and
// (k_b, k_s), unit last stride; bias (B, 1, T, S) f32 contiguous; w_uv (NH, R, V) bf16; out (B, T, NH, V)
// bf16. Requirements (checked by the caller): R and P multiples of 8, N <= 256, V <= blockDim.

extern "C" __global__ void mla_decode(const bf16* __restrict__ q_nope, i64 qs_b, i64 qs_h, i64 qs_t,
                                      const bf16* __restrict__ q_pe, const bf16* __restrict__ w_uk,
                                      const bf16* __restrict__ ckv, i64 c_b, i64 c_s,
                                      const bf16* __restrict__ kpe, i64 k_b, i64 k_s,
                                      const float* __restrict__ bias, const bf16* __restrict__ w_uv,
                                      bf16* __restrict__ out, int NH, int T, int S, int N, int P, int R, int V,
                                      float scale) {
  extern __shared__ float sm[];
  float* qf = sm;           // R + P: q_lat, then q_pe
  float* ol = qf + R + P;   // R: o_lat
  float* part = ol + R;     // 256: q_nope, then partial outputs
  float* red = part + 256;  // 64: reductions
  float* sc = red + 64;     // S: scores, then probabilities (unnormalised)
  const int h = blockIdx.x, bt = blockIdx.y, b = bt / T, t = bt % T;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, warps = nt >> 5;

  // q_lat = q_nope . W_uk[h]; q_pe as f32.
  const bf16* qn = q_nope + b * qs_b + h * qs_h + t * qs_t;
  for (int n = tid; n < N; n += nt) part[n] = bf(qn[n]);
  const bf16* qp = q_pe + (((i64)b * NH + h) * T + t) * P;
  for (int p = tid; p < P; p += nt) qf[R + p] = bf(qp[p]);
  __syncthreads();
  const bf16* wk = w_uk + (i64)h * N * R;
  for (int r2 = tid; r2 < R / 2; r2 += nt) {
    float a0 = 0.f, a1 = 0.f;
    for (int n = 0; n < N; ++n) {
      const unsigned w = *reinterpret_cast<const unsigned*>(wk + (i64)n * R + 2 * r2);
      a0 += part[n] * lo(w);
      a1 += part[n] * hi(w);
    }
    qf[2 * r2] = a0;
    qf[2 * r2 + 1] = a1;
  }
  __syncthreads();

  // Scores, one warp per slot, 16-byte loads.
  const float* bs = bias + (i64)bt * S;
  const bf16* cb = ckv + b * c_b;
  const bf16* kb = kpe + b * k_b;
  for (int j = warp; j < S; j += warps) {
    const float bj = bs[j];
    if (bj == NEG_INF) {
      if (lane == 0) sc[j] = NEG_INF;
      continue;
    }
    const bf16* cr = cb + j * c_s;
    const bf16* kr = kb + j * k_s;
    float acc = 0.f;
    for (int c = lane * 8; c < R; c += 256)
      acc += dot8f(*reinterpret_cast<const uint4*>(cr + c), *reinterpret_cast<const float4*>(qf + c),
                   *reinterpret_cast<const float4*>(qf + c + 4));
    for (int c = lane * 8; c < P; c += 256)
      acc += dot8f(*reinterpret_cast<const uint4*>(kr + c), *reinterpret_cast<const float4*>(qf + R + c),
                   *reinterpret_cast<const float4*>(qf + R + c + 4));
    acc = warp_sum(acc);
    if (lane == 0) sc[j] = acc * scale + bj;
  }
  __syncthreads();

  // Softmax over the slots (f32).
  float m = NEG_INF;
  for (int j = tid; j < S; j += nt) m = fmaxf(m, sc[j]);
  m = block_reduce(m, true, red);
  float z = 0.f;
  for (int j = tid; j < S; j += nt) {
    const float e = (sc[j] == NEG_INF || m == NEG_INF) ? 0.f : expf(sc[j] - m);
    sc[j] = e;
    z += e;
  }
  z = block_reduce(z, false, red);  // its barriers also publish sc
  const float inv = z > 0.f ? 1.f / z : 0.f;

  // o_lat = p . c, two latent columns per thread (coalesced 4-byte loads along a slot's row).
  for (int r2 = tid; r2 < R / 2; r2 += nt) {
    float a0 = 0.f, a1 = 0.f;
    for (int j = 0; j < S; ++j) {
      const float p = sc[j];
      if (p == 0.f) continue;  // the same for every thread
      const unsigned w = *reinterpret_cast<const unsigned*>(cb + j * c_s + 2 * r2);
      a0 += p * lo(w);
      a1 += p * hi(w);
    }
    ol[2 * r2] = a0 * inv;
    ol[2 * r2 + 1] = a1 * inv;
  }
  __syncthreads();

  // out = o_lat . W_uv^T[h]: `parts` threads per output column split the latent dimension.
  const int parts = nt / V;
  const bf16* wv = w_uv + (i64)h * R * V;
  if (tid < parts * V) {
    const int v = tid % V, q = tid / V;
    const int r0 = q * R / parts, r1 = (q + 1) * R / parts;
    float acc = 0.f;
    for (int r = r0; r < r1; ++r) acc += ol[r] * bf(wv[(i64)r * V + v]);
    part[tid] = acc;
  }
  __syncthreads();
  if (tid < V) {
    float acc = 0.f;
    for (int q = 0; q < parts; ++q) acc += part[q * V + tid];
    out[(((i64)b * T + t) * NH + h) * V + tid] = to_bf16(acc);
  }
}
