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
// row. Every warp prefetches its row into L2 before the block stages the normalised inputs in shared
// memory (and, launched as a programmatic dependent, while the previous kernel finishes), so the weight
// reads overlap the norm without holding registers (holding the row in registers
// across the staging took 105 registers a thread: two waves of blocks, 12 us for DeepSeek-V2-Lite's q and
// kv_a projections on an H200).
//
// Shapes: x (T, H) bf16 contiguous, norm_w (H) bf16, W_s (R_s, H) bf16 contiguous, b_s (R_s) bf16, o_s
// (T, R_s) bf16, res (T, R_0) bf16. Requirements (checked by the caller): H % 8 == 0, H <= GEMV_STAGE *
// 8 * 32 * GEMV_WARPS, T * H bf16 fit the dynamic shared memory, T <= GEMV_MAX_T.

#define GEMV_WARPS 4
#define GEMV_MAX_T 8
#define GEMV_CHUNKS 8  // 16-byte loads in flight per lane: rows up to 8 * 256 = 2048 wide in one pass
#define GEMV_STAGE 4   // staged 16-byte chunks per thread: rows up to 4 * 8 * 128 = 4096 wide

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

// grid (ceil((R_0 + R_1 + R_2) / GEMV_WARPS)), block 32 * GEMV_WARPS, dynamic shared memory T * H bf16.
extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS, 8)
gemv_norm(const bf16* __restrict__ x, int T, int H, const bf16* __restrict__ norm_w, float eps,
          const bf16* __restrict__ w0, const bf16* __restrict__ b0, bf16* __restrict__ o0, int r0,
          const bf16* __restrict__ w1, const bf16* __restrict__ b1, bf16* __restrict__ o1, int r1,
          const bf16* __restrict__ w2, const bf16* __restrict__ b2, bf16* __restrict__ o2, int r2,
          const bf16* __restrict__ res) {
  extern __shared__ __align__(16) bf16 xs[];  // T * H
  __shared__ float red[33];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Segment sg = segment(blockIdx.x * GEMV_WARPS + warp, w0, b0, o0, r0, w1, b1, o1, r1, w2, b2, o2, r2, res != 0);
  const bf16* W = sg.W;
  const bf16* B = sg.B;
  bf16* O = sg.O;
  const int R = sg.R, row = sg.row;
  const bool add = sg.add;
  const bool active = row < R;  // idle warps still take part in the block's staging
  const bf16* wr = W + (i64)(active ? row : 0) * H;
  // Ask for the row now, into L2 (no registers held: eight 128-thread blocks fit an SM, so the whole grid
  // is in flight at once), and read it after the inputs are staged.
  if (active) warp_prefetch(wr, (i64)H * 2, lane);
  const float bias = active && lane == 0 && B != 0 ? bf(B[row]) : 0.f;
  pdl_wait();  // the inputs and the residual come from earlier kernels
  pdl_release();
  // The epilogue's residual, and the staged (normalised) inputs, while the prefetches are in flight.
  float extra[GEMV_MAX_T];
#pragma unroll
  for (int t = 0; t < GEMV_MAX_T; ++t) {
    extra[t] = 0.f;
    if (t < T && active && lane == 0) extra[t] = bias + (add ? bf(res[(i64)t * R + row]) : 0.f);
  }
  for (int t = 0; t < T; ++t) stage_row<GEMV_STAGE>(x + (i64)t * H, norm_w, eps, H, xs + t * H, red);
  if (!active) return;
  uint4 wv[GEMV_CHUNKS];
#pragma unroll
  for (int k = 0; k < GEMV_CHUNKS; ++k) {
    const int c = k * 256 + lane * 8;
    if (c < H) wv[k] = *reinterpret_cast<const uint4*>(wr + c);
  }
  float acc[GEMV_MAX_T];
#pragma unroll
  for (int t = 0; t < GEMV_MAX_T; ++t) acc[t] = 0.f;
  for (int c0 = 0; c0 < H; c0 += GEMV_CHUNKS * 256) {
    if (c0 > 0) {
#pragma unroll
      for (int k = 0; k < GEMV_CHUNKS; ++k) {
        const int c = c0 + k * 256 + lane * 8;
        if (c < H) wv[k] = *reinterpret_cast<const uint4*>(wr + c);
      }
    }
#pragma unroll
    for (int k = 0; k < GEMV_CHUNKS; ++k) {
      const int c = c0 + k * 256 + lane * 8;
      if (c < H) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_T; ++t)
          if (t < T) acc[t] += dot8(wv[k], *reinterpret_cast<const uint4*>(xs + t * H + c));
      }
    }
  }
#pragma unroll
  for (int t = 0; t < GEMV_MAX_T; ++t) {
    if (t >= T) break;
    const float s = warp_sum(acc[t]);
    if (lane == 0) O[(i64)t * R + row] = to_bf16(s + extra[t]);
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
