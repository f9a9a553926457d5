// DeepSeek-V2 multi-head latent attention for decode steps, with absorbed projections, compiled at run
// time by NVRTC. It replaces the ~15 libtorch kernels of the absorbed path (two rotary embeddings, the
// latent RMSNorm, two cache writes, q_nope x W_uk, two concatenations, scores, bias, softmax, cast,
// probabilities x latents, x W_uv, transpose copy) with three small kernels that spread every step over
// many SMs (one block per head was latency-bound: 24 us a layer on an H200, with 16 of 132 SMs busy):
//   mla_q     q_lat[bt, h] = q_nope[bt, h] . W_uk[h]                                   (R)  f32
//             and, with the step's raw inputs given (prep): q_pe roped into q_pe_out, and one more block
//             per token that normalises its latent (kv_a_layernorm) and ropes its k_pe straight into
//             the cache slot the step writes
//   mla_part  for each split of the cache slots: m = max_j s_j, l = sum_j exp(s_j - m),
//             o = sum_j exp(s_j - m) c_j, with s_j = scale * (q_lat . c_j + q_pe . k_pe_j) + bias_j
//   mla_out   o_lat = sum_splits exp(m - M) o / sum_splits exp(m - M) l  (the merge)    (R)
//             out[bt, h] = o_lat . W_uv^T[h]                                           (V)  bf16
// (flash-decoding: the splits' partial softmaxes merge exactly, up to f32 rounding). Slots whose bias
// is -inf (unwritten cache capacity, padding, the future) are skipped: neither scored nor read. Loops
// over global memory issue all of a thread's loads before using them: a loop that waits for each load
// in turn costs one memory latency per iteration.
//
// Shapes (BT = batch x query tokens, t = bt % T, b = bt / T): q_nope (B, NH, T, N) bf16 with strides
// (qs_b, qs_h, qs_t), unit last stride; q_pe (B, NH, T, P) bf16 contiguous (roped); w_uk (NH, N, R)
// bf16; ckv (B, S, R), kpe (B, S, P) bf16 with strides (c_b, c_s), (k_b, k_s), unit last stride; bias
// (B, 1, T, S) f32 contiguous; w_uv (NH, R, V) bf16; out (B, T, NH, V) bf16. Prep: q_pe_raw with strides
// like q_nope, cos/sin (B, T, P / 2) f32, kv_in (BT, R + P) bf16 contiguous, kv_norm (R) bf16, slots (T)
// i64. Scratch: qlat (BT, NH, R), part_o (BT, NH, SP, R), part_ml (BT, NH, SP, 2), all f32.
// Requirements (checked by the caller): R % 256 == 0, R <= MLA_MAX_R, P % 8 == 0, P <= 256, N % 8 == 0,
// N <= 256, V % 32 == 0, SP <= 32, 16-byte aligned rows.

#define MLA_THREADS 256

// Block-wide sums of NC (<= 32) per-thread partials a[0..NC): warp sums into part[warp][j], then thread j
// adds the MLA_THREADS / 32 warps' values in warp order (deterministic). All threads call it; the sum of
// column j is returned to thread j < NC.
template <int NC>
__device__ __forceinline__ float block_columns(const float* a, float (*part)[NC]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const float s = warp_sum(a[j]);
    if (lane == j) part[warp][j] = s;
  }
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x < NC)
#pragma unroll
    for (int w = 0; w < MLA_THREADS / 32; ++w) s += part[w][threadIdx.x];
  return s;
}
#define MLA_MAX_R 512
#define MLA_RK (MLA_MAX_R / 256)  // 256-wide chunks of a latent row
#define MLA_PART_ROWS 3           // cache rows a mla_part warp has in flight

// grid (NH + kv, R / 64, BT), block 256 (kv = 1 with the prep inputs, else 0). Blocks x < NH: 64 columns
// of q_lat for head x; thread (g, cg) = (tid / 8, tid % 8) takes rows g, g + 32, ... of W_uk[h] for 8
// columns, and the 32 row groups meet in shared memory; with cos given, the chunk-0 block also ropes the
// head's q_pe_raw into q_pe_out. Block x == NH (chunk 0 only): token bt's latent, normalised with
// kv_norm (transformers' rounding) into ckv[b, slots[t]], and its k_pe roped into kpe[b, slots[t]].
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_q(const bf16* __restrict__ q_nope, i64 qs_b, i64 qs_h, i64 qs_t, const bf16* __restrict__ w_uk,
      float* __restrict__ qlat, int NH, int T, int N, int R, const bf16* __restrict__ q_pe_raw,
      bf16* __restrict__ q_pe_out, const float* __restrict__ cos_t, const float* __restrict__ sin_t, int P,
      int interleaved, const bf16* __restrict__ kv_in, const bf16* __restrict__ kv_norm, float eps,
      bf16* __restrict__ ckv, i64 c_b, i64 c_s, bf16* __restrict__ kpe, i64 k_b, i64 k_s,
      const i64* __restrict__ slots) {
  __shared__ float part[32][65];
  __shared__ float red[33];
  __shared__ __align__(16) bf16 kvs[MLA_MAX_R];  // the normalised latent (kv block)
  const int h = blockIdx.x, chunk = blockIdx.y, bt = blockIdx.z, b = bt / T, t = bt % T;
  const int tid = threadIdx.x;
  const float* cs = cos_t + (i64)bt * (P / 2);
  const float* sn = sin_t + (i64)bt * (P / 2);
  if (h == NH) {  // the token's latent and k_pe, into the cache
    if (chunk != 0) return;
    pdl_wait();
    pdl_release();
    const i64 slot = slots[t];
    const bf16* in = kv_in + (i64)bt * (R + P);
    stage_row<1>(in, kv_norm, eps, R, kvs, red);  // R <= 8 * MLA_THREADS
    const int c = tid * 8;
    if (c < R) *reinterpret_cast<uint4*>(ckv + b * c_b + slot * c_s + c) = *reinterpret_cast<const uint4*>(kvs + c);
    for (int j = tid; j < P / 2; j += MLA_THREADS)
      rope_pair(in + R, 1, kpe + b * k_b + slot * k_s, j, P, interleaved, cs[j], sn[j]);
    return;
  }
  const int g = tid >> 3, cg = tid & 7;
  const bf16* base = w_uk + (i64)h * N * R + chunk * 64 + cg * 8;
  uint4 wv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)  // rows g, g + 32, ... of W_uk[h] (N <= 256), before the wait
    if (g + 32 * i < N) wv[i] = *reinterpret_cast<const uint4*>(base + (i64)(g + 32 * i) * R);
  pdl_wait();  // q (and the cos/sin of the step) come from earlier kernels
  pdl_release();
  if (cos_t != 0 && chunk == 0)
    for (int j = tid; j < P / 2; j += MLA_THREADS)
      rope_pair(q_pe_raw + b * qs_b + h * qs_h + t * qs_t, 1, q_pe_out + (((i64)b * NH + h) * T + t) * P, j, P,
                interleaved, cs[j], sn[j]);
  const bf16* qnp = q_nope + b * qs_b + h * qs_h + t * qs_t;
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float qv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (g + 32 * i < N) qv[i] = bf(qnp[g + 32 * i]);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (g + 32 * i < N) fma8(a, qv[i], wv[i]);
#pragma unroll
  for (int j = 0; j < 8; ++j) part[g][cg * 8 + j] = a[j];
  __syncthreads();
  if (tid < 64) {
    float s = 0.f;
#pragma unroll 8
    for (int q = 0; q < 32; ++q) s += part[q][tid];
    qlat[((i64)bt * NH + h) * R + chunk * 64 + tid] = s;
  }
}

// grid (NH, SP, BT), block 256, dynamic shared memory (R + P + 2048 + per) floats, per = slots per split =
// ceil(S / SP): the split's scores (a warp per slot, each warp's next MLA_PART_ROWS rows in flight at
// once), its max and exp-sum (every warp takes them itself from the scores, with no block-wide reduction),
// and its exp-weighted latent sum (R / 8 threads cover a slot's row, 8 columns each; 256 / (R / 8) slot
// groups).
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
  const int h = blockIdx.x, sp = blockIdx.y, bt = blockIdx.z, b = bt / T, t = bt % T;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = sp * per, j1 = min(S, j0 + per);
  // Ask for the split's cache rows now (only mla_q's outputs must wait; earlier kernels have finished,
  // and a prefetch of the slot mla_q is writing is only a hint): one 128-byte line per thread.
  {
    const int lines_c = R * 2 / 128, lines = lines_c + (P * 2 + 127) / 128;
    for (int i = tid; i < (j1 - j0) * lines; i += MLA_THREADS) {
      const int j = j0 + i / lines, l = i % lines;
      if (bias[(i64)bt * S + j] != NEG_INF)
        prefetch_l2(l < lines_c ? (const void*)(ckv + b * c_b + j * c_s + l * 64)
                                : (const void*)(kpe + b * k_b + j * k_s + (l - lines_c) * 64));
    }
  }
  pdl_wait();  // q_lat, the roped q_pe and the cache's new slot come from mla_q
  pdl_release();
  const float* ql = qlat + ((i64)bt * NH + h) * R;
  const bf16* qp = q_pe + (((i64)b * NH + h) * T + t) * P;
  {
    float qv[MLA_RK];
#pragma unroll
    for (int k = 0; k < MLA_RK; ++k)
      if (k * MLA_THREADS + tid < R) qv[k] = ql[k * MLA_THREADS + tid];
    const float pv = tid < P ? bf(qp[tid]) : 0.f;
#pragma unroll
    for (int k = 0; k < MLA_RK; ++k)
      if (k * MLA_THREADS + tid < R) qf[k * MLA_THREADS + tid] = qv[k];
    if (tid < P) qf[R + tid] = pv;
  }
  __syncthreads();
  const float* bs = bias + (i64)bt * S;
  const bf16* cb = ckv + b * c_b;
  const bf16* kb = kpe + b * k_b;
  // A warp's slots j0 + warp + 8 u: up to MLA_PART_ROWS rows in flight at once, then the next ones.
  for (int jb = j0 + warp; jb < j1; jb += 8 * MLA_PART_ROWS) {
    uint4 cv[MLA_PART_ROWS][MLA_RK], kv[MLA_PART_ROWS];
    float bj[MLA_PART_ROWS];
#pragma unroll
    for (int u = 0; u < MLA_PART_ROWS; ++u) {
      const int j = jb + 8 * u;
      bj[u] = j < j1 ? bs[j] : NEG_INF;
      kv[u] = make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int k = 0; k < MLA_RK; ++k) cv[u][k] = make_uint4(0, 0, 0, 0);
      if (bj[u] != NEG_INF) {  // the same for the whole warp
#pragma unroll
        for (int k = 0; k < MLA_RK; ++k)
          if (k * 256 + lane * 8 < R) cv[u][k] = *reinterpret_cast<const uint4*>(cb + j * c_s + k * 256 + lane * 8);
        if (lane * 8 < P) kv[u] = *reinterpret_cast<const uint4*>(kb + j * k_s + lane * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < MLA_PART_ROWS; ++u) {
      float d = 0.f;
#pragma unroll
      for (int k = 0; k < MLA_RK; ++k) {
        const int c = k * 256 + lane * 8;
        if (c < R)
          d += dot8f(cv[u][k], *reinterpret_cast<const float4*>(qf + c), *reinterpret_cast<const float4*>(qf + c + 4));
      }
      if (lane * 8 < P)
        d += dot8f(kv[u], *reinterpret_cast<const float4*>(qf + R + lane * 8),
                   *reinterpret_cast<const float4*>(qf + R + lane * 8 + 4));
      d = warp_sum(d);
      const int j = jb + 8 * u;
      if (lane == 0 && j < j1) sc[j - j0] = bj[u] == NEG_INF ? NEG_INF : d * scale + bj[u];
    }
  }
  __syncthreads();
  // Every warp takes the split's max and exp-sum itself (no block-wide reduction).
  float l;
  const float m = warp_softmax_stats(sc, j1 - j0, lane, &l);
  const int RG = R / 8, KG = MLA_THREADS / RG;
  const int rg = tid % RG, kg = tid / RG;
  if (kg < KG) {
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const bf16* base = cb + rg * 8;
#pragma unroll 4
    for (int j = j0 + kg; j < j1; j += KG) {
      const float sj = sc[j - j0];
      const float p = (sj == NEG_INF || m == NEG_INF) ? 0.f : expf(sj - m);
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

// grid (NH, V / 32, BT), block 256: merge head h's split partials into o_lat (R, staged in shared
// memory; the splits' weights exp(m - M) / L first), then 32 output columns: the threads split the R
// latent rows, warp sums, and the 8 warps' results meet in shared memory.
extern "C" __global__ void __launch_bounds__(MLA_THREADS)
mla_out(const float* __restrict__ part_o, const float* __restrict__ part_ml, const bf16* __restrict__ w_uv,
        bf16* __restrict__ out, int NH, int SP, int R, int V) {
  __shared__ float wt[32];
  __shared__ float ol[MLA_MAX_R];
  __shared__ float part[8][32];
  const int h = blockIdx.x, v0 = blockIdx.y * 32, bt = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const float* ml = part_ml + ((i64)bt * NH + h) * SP * 2;
  const bf16* base = w_uv + (i64)h * R * V + v0;
  uint4 wv[MLA_RK][4];
#pragma unroll
  for (int k = 0; k < MLA_RK; ++k) {  // this thread's rows of W_uv, in flight during the merge
    const int r = k * MLA_THREADS + tid;
    if (r < R)
#pragma unroll
      for (int q = 0; q < 4; ++q) wv[k][q] = *reinterpret_cast<const uint4*>(base + (i64)r * V + q * 8);
  }
  pdl_wait();  // the partials come from mla_part
  pdl_release();
  if (warp == 0) {
    const float m = lane < SP ? ml[2 * lane] : NEG_INF;
    const float l = lane < SP ? ml[2 * lane + 1] : 0.f;
    float M = m;
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float e = (m == NEG_INF) ? 0.f : expf(m - M);
    const float L = warp_sum(e * l);
    wt[lane] = L > 0.f ? e / L : 0.f;
  }
  __syncthreads();
  const float* po = part_o + ((i64)bt * NH + h) * SP * R;
#pragma unroll
  for (int k = 0; k < MLA_RK; ++k) {
    const int r = k * MLA_THREADS + tid;
    if (r < R) {
      float v[32];  // every split's value in flight at once (SP <= 32)
#pragma unroll
      for (int s = 0; s < 32; ++s) v[s] = s < SP ? po[(i64)s * R + r] : 0.f;
      float o = 0.f;
#pragma unroll
      for (int s = 0; s < 32; ++s) o += wt[s] * v[s];
      ol[r] = o;
    }
  }
  float a[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) a[j] = 0.f;
  __syncthreads();
#pragma unroll
  for (int k = 0; k < MLA_RK; ++k) {
    const int r = k * MLA_THREADS + tid;
    if (r < R)
#pragma unroll
      for (int q = 0; q < 4; ++q) fma8(a + q * 8, ol[r], wv[k][q]);
  }
  const float s = block_columns<32>(a, part);
  if (tid < 32) out[((i64)bt * NH + h) * V + v0 + tid] = to_bf16(s);
}

// ---- One query token in one kernel: a thread block cluster per head ----
//
// For one token (B = T = 1) with the step's raw inputs, mla_q, mla_part and mla_out become one kernel:
// each head gets a cluster of MLA_C blocks that exchange their pieces through distributed shared memory
// (sm_90) instead of global memory and two kernel boundaries. Block c of head h
//   1. computes q_lat columns [64 c, 64 c + 64) (R = 512) and ropes q_pe; the block that owns the step's
//      slot normalises the new latent and ropes its k_pe (the owner in head 0 writes them into the cache);
//   2. after a cluster barrier, gathers the whole q_lat from the cluster and attends over its slots j = c,
//      c + MLA_C, ... (the new slot from its own shared memory, as other clusters may not see the cache
//      write yet): the partial max, exp-sum and exp-weighted latent sum of flash-decoding;
//   3. after a second barrier, merges the cluster's partials and writes output columns [16 c, 16 c + 16)
//      (V = 128) of head h.
// The rows of W_uk and W_uv a block needs (16 KB each) are loaded into registers before the wait, with
// everything else the projections (the kernel before) do not write: the step's slot, bias and cos/sin.
// After the wait every load of q and kv_in is issued at once, one warp of the owner block normalises
// the new latent (no block barrier), and every warp takes its block's softmax max and sum itself from the
// scores: on an H200 (V2-Lite decode, 32 slots) this kernel went from 11.6 to 10.6 us inside the graph.
// (Holding each warp's first cache rows in registers across the wait as well was slower, 14.3 us: at 167
// registers a thread its blocks no longer fit beside the projections' and launched later.)
// Requirements (checked by the caller): R = 512, V = 128, N % 32 == 0, N <= 256, P % 8 == 0, P <= 256,
// ceil(S / MLA_C) floats of dynamic shared memory, 16-byte aligned rows.

#define MLA_C 8      // blocks per head (one cluster)
#define MLA_CR 512   // R
#define MLA_CV 128   // V

__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}

// A cluster barrier in two halves: every thread of every block of the cluster arrives (its shared-memory
// writes before the arrival are visible to the cluster after the wait), and may work on before it waits.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// The whole cluster barrier (a block barrier too).
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// The f32 at this block's shared address p, read from block `rank` of the cluster.
__device__ __forceinline__ float ld_cluster(const float* p, unsigned rank) {
  unsigned long long g;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(g) : "l"(p));
  unsigned d;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"((unsigned)g), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(d) : "memory");
  return v;
}

// grid (NH * MLA_C), cluster MLA_C, block 256, dynamic shared memory ceil(S / MLA_C) floats. Shapes as
// above with B = T = 1: q_nope and q_pe_raw (NH, N) / (NH, P) with head stride qs_h; cos, sin (P / 2);
// kv_in (R + P); ckv, kpe rows of stride c_s, k_s; bias (S); out (NH, V).
extern "C" __global__ void __cluster_dims__(MLA_C, 1, 1) __launch_bounds__(MLA_THREADS)
mla_cluster(const bf16* __restrict__ q_nope, i64 qs_h, const bf16* __restrict__ q_pe_raw,
            const bf16* __restrict__ w_uk, const bf16* __restrict__ w_uv, const float* __restrict__ cos_t,
            const float* __restrict__ sin_t, int interleaved, const bf16* __restrict__ kv_in,
            const bf16* __restrict__ kv_norm, float eps, bf16* __restrict__ ckv, i64 c_s, bf16* __restrict__ kpe,
            i64 k_s, const i64* __restrict__ slots, const float* __restrict__ bias, bf16* __restrict__ out,
            int N, int P, int S, float scale) {
  extern __shared__ float sc[];                 // this block's slots' scores
  __shared__ float part[32][65];                // q_lat partial sums of the 32 row groups
  __shared__ float acc[4 * MLA_CR];             // latent sums of the 4 slot groups
  __shared__ float qf[MLA_CR + 256];            // the whole q_lat, then q_pe
  __shared__ float qlat_s[64];                  // this block's q_lat columns (read by the cluster)
  __shared__ float po[MLA_CR];                  // this block's partial latent sum (read by the cluster)
  __shared__ float ml[2];                       // this block's max and exp-sum (read by the cluster)
  __shared__ float red[33];
  __shared__ float outp[8][16];
  __shared__ __align__(16) bf16 kvs[MLA_CR];    // the new slot's normalised latent (owner block)
  __shared__ __align__(16) bf16 kps[256];       // the new slot's roped k_pe (owner block)
  __shared__ __align__(16) bf16 qpe[256];       // the roped q_pe
  const unsigned c = cluster_rank();
  const int h = blockIdx.x / MLA_C;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ns = S > (int)c ? (S - (int)c + MLA_C - 1) / MLA_C : 0;  // slots j = c + MLA_C * m, m < ns
  // Before the wait: this block's rows of W_uk (rows g, g + 32, ...; 8 of its 64 columns) and of W_uv
  // (rows tid, tid + 256; its 16 columns), and a prefetch of its slots' cache rows.
  const int g = tid >> 3, cg = tid & 7;
  const bf16* kb = w_uk + (i64)h * N * MLA_CR + c * 64 + cg * 8;
  uint4 wk[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (g + 32 * i < N) wk[i] = *reinterpret_cast<const uint4*>(kb + (i64)(g + 32 * i) * MLA_CR);
  const bf16* vb = w_uv + (i64)h * MLA_CR * MLA_CV + c * 16;
  uint4 wv[2][2];
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int q = 0; q < 2; ++q) wv[k][q] = *reinterpret_cast<const uint4*>(vb + (i64)(k * 256 + tid) * MLA_CV + q * 8);
  {
    const int lines_c = MLA_CR * 2 / 128, lines = lines_c + (P * 2 + 127) / 128;
    for (int i = tid; i < ns * lines; i += MLA_THREADS) {
      const int j = c + MLA_C * (i / lines), l = i % lines;
      if (bias[j] != NEG_INF)
        prefetch_l2(l < lines_c ? (const void*)(ckv + j * c_s + l * 64) : (const void*)(kpe + j * k_s + (l - lines_c) * 64));
    }
  }
  const i64 slot = slots[0];  // written before the projections ran (as the bias, cos/sin and the norm weight)
  const bool owner = slot % MLA_C == c;
  const bool roper = tid < P / 2;
  const float cs = roper ? cos_t[tid] : 0.f, sn = roper ? sin_t[tid] : 0.f;
  const bool norm_warp = owner && warp == MLA_THREADS / 32 - 1;  // normalises the new latent
  uint4 nw[2];
  if (norm_warp) warp_load_row<2>(nw, kv_norm, MLA_CR, lane);
  pdl_wait();  // q and kv_in come from the projections
  pdl_release();
  // 1. Every load of q and kv_in at once (one memory latency); then q_lat columns, q_pe, and the new slot.
  const bf16* qn = q_nope + h * qs_h;
  float qv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) qv[i] = g + 32 * i < N ? bf(qn[g + 32 * i]) : 0.f;
  const int i0 = interleaved ? 2 * tid : tid, i1 = interleaved ? 2 * tid + 1 : tid + P / 2;  // rope pair tid
  float q0 = 0.f, q1 = 0.f, k0 = 0.f, k1 = 0.f;
  if (roper) {
    q0 = bf(q_pe_raw[h * qs_h + i0]), q1 = bf(q_pe_raw[h * qs_h + i1]);
    if (owner) k0 = bf(kv_in[MLA_CR + i0]), k1 = bf(kv_in[MLA_CR + i1]);
  }
  uint4 kvr[2];
  if (norm_warp) warp_load_row<2>(kvr, kv_in, MLA_CR, lane);
  {
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (g + 32 * i < N) fma8(a, qv[i], wk[i]);
#pragma unroll
    for (int j = 0; j < 8; ++j) part[g][cg * 8 + j] = a[j];
  }
  if (roper) {
    qpe[i0] = to_bf16(q0 * cs - q1 * sn), qpe[i1] = to_bf16(q0 * sn + q1 * cs);
    if (owner) kps[i0] = to_bf16(k0 * cs - k1 * sn), kps[i1] = to_bf16(k0 * sn + k1 * cs);
  }
  if (norm_warp) {  // one warp, no block barrier (transformers' rounding, as stage_row's)
    warp_norm_loaded<2>(kvr, nw, eps, MLA_CR);
#pragma unroll
    for (int k = 0; k < 2; ++k) *reinterpret_cast<uint4*>(kvs + k * 256 + lane * 8) = kvr[k];
  }
  __syncthreads();
  if (tid < 64) {
    float s = 0.f;
#pragma unroll 8
    for (int q = 0; q < 32; ++q) s += part[q][tid];
    qlat_s[tid] = s;
  }
  if (owner && h == 0) {  // the cache keeps the new slot for later steps
    if (tid * 8 < MLA_CR) *reinterpret_cast<uint4*>(ckv + slot * c_s + tid * 8) = *reinterpret_cast<const uint4*>(kvs + tid * 8);
    if (tid * 8 < P) *reinterpret_cast<uint4*>(kpe + slot * k_s + tid * 8) = *reinterpret_cast<const uint4*>(kps + tid * 8);
  }
  cluster_sync();
  // 2. The whole q_lat, then this block's slots.
  for (int i = tid; i < MLA_CR; i += MLA_THREADS) qf[i] = ld_cluster(&qlat_s[i & 63], i >> 6);
  if (tid < P) qf[MLA_CR + tid] = bf(qpe[tid]);
  __syncthreads();
  for (int m0 = warp * 4; m0 < ns; m0 += 32) {  // four slots a warp at a time, all rows in flight
    float bj[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) bj[u] = m0 + u < ns ? bias[c + MLA_C * (m0 + u)] : NEG_INF;
    uint4 cv[4][2], kv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = c + MLA_C * (m0 + u);
      cv[u][0] = cv[u][1] = kv[u] = make_uint4(0, 0, 0, 0);
      if (bj[u] != NEG_INF) {  // the same for the whole warp
        const bf16* cr = j == slot ? kvs : ckv + j * c_s;
        const bf16* kr = j == slot ? kps : kpe + j * k_s;
#pragma unroll
        for (int k = 0; k < 2; ++k) cv[u][k] = *reinterpret_cast<const uint4*>(cr + k * 256 + lane * 8);
        if (lane * 8 < P) kv[u] = *reinterpret_cast<const uint4*>(kr + lane * 8);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float d = 0.f;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int col = k * 256 + lane * 8;
        d += dot8f(cv[u][k], *reinterpret_cast<const float4*>(qf + col), *reinterpret_cast<const float4*>(qf + col + 4));
      }
      if (lane * 8 < P)
        d += dot8f(kv[u], *reinterpret_cast<const float4*>(qf + MLA_CR + lane * 8),
                   *reinterpret_cast<const float4*>(qf + MLA_CR + lane * 8 + 4));
      d = warp_sum(d);
      if (lane == 0 && m0 + u < ns) sc[m0 + u] = bj[u] == NEG_INF ? NEG_INF : d * scale + bj[u];
    }
  }
  __syncthreads();
  // Every warp takes the block's max and exp-sum itself (at most 96 scores: no block-wide reduction).
  float l;
  const float mx = warp_softmax_stats(sc, ns, lane, &l);
  {
    const int rg = tid & 63, kg = tid >> 6;  // 64 groups of 8 latent columns x 4 slot groups
    float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int m = kg; m < ns; m += 4) {
      const float p = (sc[m] == NEG_INF || mx == NEG_INF) ? 0.f : expf(sc[m] - mx);
      const int j = c + MLA_C * m;
      if (p != 0.f) fma8(a, p, *reinterpret_cast<const uint4*>((j == slot ? kvs : ckv + j * c_s) + rg * 8));
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) acc[kg * MLA_CR + rg * 8 + q] = a[q];
  }
  __syncthreads();
  for (int r = tid; r < MLA_CR; r += MLA_THREADS) po[r] = acc[r] + acc[MLA_CR + r] + acc[2 * MLA_CR + r] + acc[3 * MLA_CR + r];
  if (tid == 0) ml[0] = mx, ml[1] = l;
  cluster_sync();
  // 3. Merge the cluster's partials (weights exp(m - M) / L, as mla_out), then this block's columns.
  float wt[MLA_C];
  {
    float M = NEG_INF, mr[MLA_C], lr[MLA_C];
#pragma unroll
    for (int r = 0; r < MLA_C; ++r) {
      mr[r] = ld_cluster(&ml[0], r);
      lr[r] = ld_cluster(&ml[1], r);
      M = fmaxf(M, mr[r]);
    }
    float L = 0.f;
#pragma unroll
    for (int r = 0; r < MLA_C; ++r) {
      wt[r] = mr[r] == NEG_INF ? 0.f : expf(mr[r] - M);
      L += wt[r] * lr[r];
    }
#pragma unroll
    for (int r = 0; r < MLA_C; ++r) wt[r] = L > 0.f ? wt[r] / L : 0.f;
  }
  float ol[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    float o = 0.f;
#pragma unroll
    for (int r = 0; r < MLA_C; ++r) o += wt[r] * ld_cluster(&po[k * 256 + tid], r);
    ol[k] = o;
  }
  // This block has read the cluster's shared memory; it may exit once every block has (the wait at the end).
  cluster_arrive();
  float a[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) a[j] = 0.f;
#pragma unroll
  for (int k = 0; k < 2; ++k)
#pragma unroll
    for (int q = 0; q < 2; ++q) fma8(a + q * 8, ol[k], wv[k][q]);
  const float s = block_columns<16>(a, outp);
  if (tid < 16) out[(i64)h * MLA_CV + c * 16 + tid] = to_bf16(s);
  cluster_wait();
}
