// Projections of a few tokens (decode steps) in one kernel, with the RMSNorm before them and the residual
// add after them folded in, compiled at run time by NVRTC.
//
// At batch 1 a projection is a matrix-vector product that cuBLAS runs at under half of the H200's
// bandwidth (6.5 us for an 8 MB matrix), and the RMSNorm before it and the residual add after it are two
// more kernels of ~4 and ~2 us. Here one kernel does
//   xn[t]    = rmsnorm(x[t]) * norm_w        (when norm_w is given; transformers' rounding: bf16 after
//                                             the normalisation, bf16 after the weight)
//   o_s[t, r] = W_s[r] . xn[t] (+ b_s[r]) (+ res[t, r] for segment 0)      rounded to bf16 once
// for up to three weight segments s that share the input (q, k, v; or q and kv_a), one warp per output
// row. One token takes the gemv_warp kernels below (each warp holds its row in registers and normalises
// the input itself); several tokens (several sequences decoding together) take gemv_norm, which stages
// the normalised inputs in shared memory once per block and reads each weight row once for all of them.
//
// Shapes: x (T, H) bf16 contiguous, norm_w (H) bf16, W_s (R_s, H) bf16 contiguous, b_s (R_s) bf16, o_s
// (T, R_s) bf16, res (T, R_0) bf16. Requirements (checked by the caller): H % 8 == 0, H <= GEMV_STAGE *
// 8 * blockDim.x, T * H bf16 fit the dynamic shared memory, T <= GEMV_MAX_T.

#define GEMV_WARPS 4
#define GEMV_MAX_T 8
#define GEMV_STAGE 4   // staged 16-byte chunks per thread and row: rows up to 4 * 8 * 256 = 8192 wide

// The projection a warp's global row index `row` falls in (segments 0, 1, 2 of r0, r1, r2 rows in order)
// and its row there (R when past the last segment's rows); the residual is added to segment 0 only.
struct Segment {
  const bf16* W;
  const bf16* B;
  bf16* O;
  int R, row;
  bool add;
};
__device__ __forceinline__ Segment segment(int row, const bf16* w0, const bf16* b0, bf16* o0, int r0, const bf16* w1,
                                           const bf16* b1, bf16* o1, int r1, const bf16* w2, const bf16* b2, bf16* o2,
                                           int r2, bool residual) {
  if (row < r0) return {w0, b0, o0, r0, row, residual};
  row -= r0;
  if (row < r1) return {w1, b1, o1, r1, row, false};
  row -= r1;
  return {w2, b2, o2, r2, row < r2 ? row : r2, false};
}

// Stage T token rows x (T, H) into shared memory s (T * H bf16, 16-byte aligned), normalised when norm_w
// is given as stage_row does (transformers' rounding), with one block reduction for all T rows: three
// barriers whatever T is (stage_row once per token took T reductions of three barriers each, which made
// the staging, repeated by every block, cost more than the weight reads at 4 and 8 tokens). The raw rows
// go to shared memory first and each thread normalises its own chunks there, so no row is held in
// registers. Requires H % 8 == 0, H <= CH * 8 * blockDim.x, T <= GEMV_MAX_T. All threads must call it;
// s is complete after it returns.
template <int CH>
__device__ __forceinline__ void stage_rows(const bf16* __restrict__ x, int T, const bf16* __restrict__ norm_w, float eps,
                                           int H, bf16* s) {
  __shared__ float red[GEMV_MAX_T][32];
  __shared__ float inv[GEMV_MAX_T];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float ss[GEMV_MAX_T];
#pragma unroll
  for (int t = 0; t < GEMV_MAX_T; ++t) {
    ss[t] = 0.f;
    if (t >= T) continue;
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * 8;
      if (c >= H) continue;
      const uint4 v = *reinterpret_cast<const uint4*>(x + (i64)t * H + c);
      *reinterpret_cast<uint4*>(s + (i64)t * H + c) = v;
      const unsigned* w = reinterpret_cast<const unsigned*>(&v);
#pragma unroll
      for (int q = 0; q < 4; ++q) ss[t] += lo(w[q]) * lo(w[q]) + hi(w[q]) * hi(w[q]);
    }
  }
  if (norm_w != 0) {
#pragma unroll
    for (int t = 0; t < GEMV_MAX_T; ++t) {
      if (t >= T) break;
      const float v = warp_sum(ss[t]);
      if (lane == 0) red[t][warp] = v;
    }
    __syncthreads();
    for (int t = warp; t < T; t += warps) {  // warp w finishes the sums of rows w, w + warps, ...
      const float v = warp_sum(lane < warps ? red[t][lane] : 0.f);
      if (lane == 0) inv[t] = rsqrtf(v / H + eps);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = (k * blockDim.x + threadIdx.x) * 8;
      if (c >= H) continue;
      const uint4 nv = *reinterpret_cast<const uint4*>(norm_w + c);
#pragma unroll
      for (int t = 0; t < GEMV_MAX_T; ++t) {
        if (t >= T) break;
        uint4* p = reinterpret_cast<uint4*>(s + (i64)t * H + c);  // this thread's own chunk
        uint4 v = *p;
        norm_chunk(v, nv, inv[t]);
        *p = v;
      }
    }
  }
  __syncthreads();
}

// c (a 16 x 8 f32 tile, this lane's four values) += a (16 x 16 bf16) b (16 x 8 bf16): one tensor-core
// mma. Fragments as the PTX ISA lays them out for m16n8k16: lane l = 4 g + q holds a's rows g and g + 8
// at k 2q, 2q + 1 (a0, a1) and 2q + 8, 2q + 9 (a2, a3), b's column g at the same k (b0, b1), and c's rows
// g, g + 8 at columns 2q, 2q + 1 (c0, c1; c2, c3). The low half of a register is the lower k.
__device__ __forceinline__ void mma_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                          unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define GEMV_TILE 16   // gemv_norm: output rows per tile (the mma's m)
#define GEMV_KSPLIT 8  // gemv_norm: warps per block, each taking an eighth of the row width of a tile
#define GEMV_KSTEPS 8  // gemv_norm: 32-wide steps of a warp's slice loaded at once (rows up to 8 * 8 * 32 = 2048 wide in one pass)

// Several tokens (T <= GEMV_MAX_T = the mma's n): tensor cores, as a GEMV of a few columns would spend
// ~25 issue slots a weight chunk per token on f32 conversions and products (the LM head of 4 tokens took
// 182 us that way, twice cuBLAS). grid (any; tiles are grid-strided), block 32 * GEMV_KSPLIT, dynamic
// shared memory T * H bf16. A block takes 16-row tiles; warp w of it the w-th eighth of the 32-wide k
// steps. A lane reads 16 bytes of rows g and g + 8 and of the staged input of token g (lane = 4 g + q, at
// column 8 q of each step) and feeds them to two mmas: the k order inside a step is permuted the same way
// for the weights and the inputs, which leaves the dot products unchanged. The warps' tiles meet in shared
// memory (in warp order: deterministic), and 16 x T threads add the bias and residual and write. Each
// warp's first tile is prefetched into L2 before the wait (launched as a programmatic dependent).
extern "C" __global__ void __launch_bounds__(32 * GEMV_KSPLIT)
gemv_norm(const bf16* __restrict__ x, int T, int H, const bf16* __restrict__ norm_w, float eps,
          const bf16* __restrict__ w0, const bf16* __restrict__ b0, bf16* __restrict__ o0, int r0,
          const bf16* __restrict__ w1, const bf16* __restrict__ b1, bf16* __restrict__ o1, int r1,
          const bf16* __restrict__ w2, const bf16* __restrict__ b2, bf16* __restrict__ o2, int r2,
          const bf16* __restrict__ res) {
  extern __shared__ __align__(16) bf16 xs[];  // T * H
  __shared__ float part[GEMV_KSPLIT][GEMV_TILE][8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int rows = r0 + r1 + r2, tiles = (rows + GEMV_TILE - 1) / GEMV_TILE;
  const int steps = (H + 31) / 32, per = (steps + GEMV_KSPLIT - 1) / GEMV_KSPLIT;
  const int s0 = warp * per, s1 = min(steps, s0 + per);  // this warp's 32-wide steps
  // The weight row of tile row `r` (nullptr past the last row).
  auto row_ptr = [&](int r) -> const bf16* {
    if (r >= rows) return nullptr;
    const Segment sg = segment(r, w0, b0, o0, r0, w1, b1, o1, r1, w2, b2, o2, r2, false);
    return sg.W + (i64)sg.row * H;
  };
  if ((int)blockIdx.x < tiles && s0 < s1)
    for (int r = 0; r < GEMV_TILE; ++r) {
      const bf16* p = row_ptr(blockIdx.x * GEMV_TILE + r);
      if (p != nullptr) warp_prefetch(p + s0 * 32, (i64)(min(H, s1 * 32) - s0 * 32) * 2, lane);
    }
  pdl_wait();  // the inputs and the residual come from earlier kernels
  pdl_release();
  stage_rows<GEMV_STAGE>(x, T, norm_w, eps, H, xs);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bf16* wa = row_ptr(tile * GEMV_TILE + g);
    const bf16* wb = row_ptr(tile * GEMV_TILE + g + 8);
    const bf16* xr = g < T ? xs + g * H : nullptr;
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = s0; s < s1; s += GEMV_KSTEPS) {
      uint4 A[GEMV_KSTEPS], B[GEMV_KSTEPS], X[GEMV_KSTEPS];
#pragma unroll
      for (int j = 0; j < GEMV_KSTEPS; ++j) {
        const int k = (s + j) * 32 + q * 8;
        const bool in = s + j < s1 && k < H;
        A[j] = in && wa != nullptr ? *reinterpret_cast<const uint4*>(wa + k) : zero;
        B[j] = in && wb != nullptr ? *reinterpret_cast<const uint4*>(wb + k) : zero;
        X[j] = in && xr != nullptr ? *reinterpret_cast<const uint4*>(xr + k) : zero;
      }
#pragma unroll
      for (int j = 0; j < GEMV_KSTEPS; ++j) {
        mma_16816(c, A[j].x, B[j].x, A[j].y, B[j].y, X[j].x, X[j].y);
        mma_16816(c, A[j].z, B[j].z, A[j].w, B[j].w, X[j].z, X[j].w);
      }
    }
    part[warp][g][2 * q] = c[0];
    part[warp][g][2 * q + 1] = c[1];
    part[warp][g + 8][2 * q] = c[2];
    part[warp][g + 8][2 * q + 1] = c[3];
    __syncthreads();
    if ((int)threadIdx.x < GEMV_TILE * 8) {
      const int r = threadIdx.x >> 3, t = threadIdx.x & 7, row = tile * GEMV_TILE + r;
      if (t < T && row < rows) {
        const Segment sg = segment(row, w0, b0, o0, r0, w1, b1, o1, r1, w2, b2, o2, r2, res != 0);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < GEMV_KSPLIT; ++w) sum += part[w][r][t];
        if (sg.B != 0) sum += bf(sg.B[sg.row]);
        if (sg.add) sum += bf(res[(i64)t * sg.R + sg.row]);
        sg.O[(i64)t * sg.R + sg.row] = to_bf16(sum);
      }
    }
    __syncthreads();
  }
}

#define GEMV_WARP_CHUNKS 8  // 16-byte chunks per lane: rows up to 8 * 256 = 2048 wide (gemv_warp*16: twice)

// One token (T == 1, H <= 32 * 8 * CH, CH = GEMV_WARP_CHUNKS or twice it): every warp holds its whole row
// in registers, loaded before the wait (as a programmatic dependent, while the previous kernel finishes),
// and normalises the input itself (lane l takes columns k * 256 + 8 l .. + 8, the same for the input and
// the row), with no shared memory and no block barrier. The norm uses the hardware's bf16 conversions and
// bf16 products, which round as transformers does (bf16 after the normalisation, bf16 after the weight).
// Measured on an H200 between 92 MB reads (a proxy for the MoE kernels around it), DeepSeek-V2-Lite's q +
// kv_a projections (15 MB) cost 15 us as gemv_norm and ~7 us as this kernel; Mixtral's 4096-wide
// projections in the CH = 16 kernels took its decode from 8.006 to 7.584 ms a token (top-2).
// NORM: normalise the input (norm_w given). The two are separate kernels because the norm costs registers
// (146 a thread against ~70 without it): the kernel without the norm (o_proj, the LM head) then fits
// more blocks beside the kernel before it, whose run its row loads overlap, while the normalising one
// (the input projections, after the MoE block's bandwidth-bound down projection) fits fewer, which
// measured faster there: more of its early loads competed with the down projection's (V2-Lite decode on
// an H200, 1.877 -> 1.906 ms a token with the input projections at 68 registers).
// CH: 16-byte chunks a lane holds (rows up to CH * 256 wide).
template <bool NORM, int CH>
__device__ __forceinline__ void gemv_warp_impl(const bf16* __restrict__ x, int H, const bf16* __restrict__ norm_w, float eps,
                                               const bf16* __restrict__ res, const Segment& sg, int lane) {
  const bf16* W = sg.W;
  const bf16* B = sg.B;
  bf16* O = sg.O;
  const int R = sg.R, row = sg.row;
  const bool add = sg.add;
  if (row >= R) {  // past the last row: release the next kernel like the other warps, then stop
    pdl_wait();
    pdl_release();
    return;
  }
  uint4 wv[CH];
  warp_load_row<CH>(wv, W + (i64)row * H, H, lane);
  const float bias = lane == 0 && B != 0 ? bf(B[row]) : 0.f;
  pdl_wait();  // the input and the residual come from earlier kernels
  pdl_release();
  const float extra = bias + (lane == 0 && add ? bf(res[row]) : 0.f);
  float acc = 0.f;
  if constexpr (NORM && CH > GEMV_WARP_CHUNKS) {
    // The wide rows' norm in two passes, so that the input and the norm weight are never all held at
    // once (255 registers and spills otherwise): the mean square over the input, then each chunk again
    // (an L1 hit) with its norm weight, normalised as warp_norm_loaded does, two chunks' loads at a time.
    float r;
    {
      uint4 xv[CH];
      warp_load_row<CH>(xv, x, H, lane);
      r = warp_inv_rms<CH>(xv, eps, H);
    }
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      const int c = k * 256 + lane * 8;
      if (k % 2 == 0) asm volatile("" ::: "memory");  // keeps the compiler from hoisting every reload
      if (c < H) {
        uint4 xk = *reinterpret_cast<const uint4*>(x + c);
        const uint4 nk = *reinterpret_cast<const uint4*>(norm_w + c);  // one 16-byte load
        norm_chunk(xk, nk, r);
        acc += dot8(wv[k], xk);
      }
    }
  } else {
    uint4 xv[CH];
    warp_load_row<CH>(xv, x, H, lane);
    if constexpr (NORM) warp_norm_row<CH>(xv, norm_w, eps, H, lane);
#pragma unroll
    for (int k = 0; k < CH; ++k) acc += dot8(wv[k], xv[k]);
  }
  acc = warp_sum(acc);
  if (lane == 0) O[row] = to_bf16(acc + extra);
}

// grid (ceil((R_0 + R_1 + R_2) / GEMV_WARPS)), block 32 * GEMV_WARPS, no dynamic shared memory; the
// arguments of gemv_norm (T must be 1). gemv_warp_norm normalises the input (norm_w given), gemv_warp
// does not (norm_w ignored); the *16 pair holds twice the chunks (H <= 4096: Mixtral).
#define GEMV_WARP(NAME, NORM, CH)                                                                             \
  extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                                            \
  NAME(const bf16* __restrict__ x, int T, int H, const bf16* __restrict__ norm_w, float eps,               \
       const bf16* __restrict__ w0, const bf16* __restrict__ b0, bf16* __restrict__ o0, int r0,            \
       const bf16* __restrict__ w1, const bf16* __restrict__ b1, bf16* __restrict__ o1, int r1,            \
       const bf16* __restrict__ w2, const bf16* __restrict__ b2, bf16* __restrict__ o2, int r2,            \
       const bf16* __restrict__ res) {                                                                      \
    const Segment sg = segment(blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5), w0, b0, o0, r0, w1, b1, o1, r1, \
                               w2, b2, o2, r2, res != 0);                                                   \
    gemv_warp_impl<NORM, CH>(x, H, norm_w, eps, res, sg, threadIdx.x & 31);                                \
  }
GEMV_WARP(gemv_warp, false, GEMV_WARP_CHUNKS)
GEMV_WARP(gemv_warp_norm, true, GEMV_WARP_CHUNKS)
GEMV_WARP(gemv_warp16, false, 2 * GEMV_WARP_CHUNKS)
GEMV_WARP(gemv_warp16_norm, true, 2 * GEMV_WARP_CHUNKS)
