// Variants of the one-token projection measured by gemv.py (H = 2048, T = 1): a bare read of the rows, and
// warp-private projections (every warp normalises the input itself, its rows' weights loaded before the
// wait) with or without the norm (NORM: 0 none, 1 transformers' rounding in software, 2 applied to the f32
// sum) and one or two rows per warp. gemv.cu's gemv_warp came out of these.

// Pure read of R rows of H bf16: one warp per row, 16 B per lane per chunk, all 8 chunks in flight.
extern "C" __global__ void __launch_bounds__(128) read_rows(const bf16* __restrict__ W, int R, int H, float* out) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * 4 + (threadIdx.x >> 5);
  if (row >= R) return;
  pdl_wait();
  pdl_release();
  const bf16* wr = W + (i64)row * H;
  uint4 wv[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) wv[k] = *reinterpret_cast<const uint4*>(wr + k * 256 + lane * 8);
  unsigned s = 0;
#pragma unroll
  for (int k = 0; k < 8; ++k) s ^= wv[k].x ^ wv[k].y ^ wv[k].z ^ wv[k].w;
  if (s == 0x12345678u) out[row] = 1.f;
}

// NORM: 0 none, 1 per-warp transformers rounding (norm_w loaded before the wait), 2 algebraic (acc = sum w*n*x, times r at the end).
template <int NORM, int RPW>
__device__ __forceinline__ void gv_impl(const bf16* __restrict__ x, int H, const bf16* __restrict__ norm_w, float eps,
                                        const bf16* __restrict__ W, bf16* __restrict__ out, int R, const bf16* __restrict__ res) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * RPW;
  uint4 wv[RPW][8];
#pragma unroll
  for (int q = 0; q < RPW; ++q)
    if (row0 + q < R)
#pragma unroll
      for (int k = 0; k < 8; ++k) wv[q][k] = *reinterpret_cast<const uint4*>(W + (i64)(row0 + q) * H + k * 256 + lane * 8);
  uint4 nv[8];
  if (NORM)
#pragma unroll
    for (int k = 0; k < 8; ++k) nv[k] = *reinterpret_cast<const uint4*>(norm_w + k * 256 + lane * 8);
  pdl_wait();
  pdl_release();
  uint4 xv[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) xv[k] = *reinterpret_cast<const uint4*>(x + k * 256 + lane * 8);
  float r = 1.f;
  if (NORM) {
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const unsigned* w = reinterpret_cast<const unsigned*>(&xv[k]);
#pragma unroll
      for (int q = 0; q < 4; ++q) ss += lo(w[q]) * lo(w[q]) + hi(w[q]) * hi(w[q]);
    }
    r = rsqrtf(warp_sum(ss) / H + eps);
  }
  if (NORM == 1) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      unsigned* w = reinterpret_cast<unsigned*>(&xv[k]);
      const unsigned* n = reinterpret_cast<const unsigned*>(&nv[k]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const unsigned a = to_bf16(lo(n[q]) * bf(to_bf16(lo(w[q]) * r)));
        const unsigned b = to_bf16(hi(n[q]) * bf(to_bf16(hi(w[q]) * r)));
        w[q] = a | (b << 16);
      }
    }
    r = 1.f;
  }
#pragma unroll
  for (int q = 0; q < RPW; ++q) {
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (NORM == 2) {
        const unsigned* w = reinterpret_cast<const unsigned*>(&wv[q][k]);
        const unsigned* xx = reinterpret_cast<const unsigned*>(&xv[k]);
        const unsigned* n = reinterpret_cast<const unsigned*>(&nv[k]);
#pragma unroll
        for (int j = 0; j < 4; ++j) acc += lo(w[j]) * lo(n[j]) * lo(xx[j]) + hi(w[j]) * hi(n[j]) * hi(xx[j]);
      } else {
        acc += dot8(wv[q][k], xv[k]);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0 && row0 + q < R) out[row0 + q] = to_bf16(acc * r + (res != 0 ? bf(res[row0 + q]) : 0.f));
  }
}
#define GV(NAME, NORM, RPW, MINB) \
  extern "C" __global__ void __launch_bounds__(128, MINB) NAME(const bf16* x, int H, const bf16* norm_w, float eps, const bf16* W, bf16* out, int R, const bf16* res) { \
    gv_impl<NORM, RPW>(x, H, norm_w, eps, W, out, R, res); }
GV(gv_n0_r1, 0, 1, 1)
GV(gv_n1_r1, 1, 1, 1)
GV(gv_n2_r1, 2, 1, 1)
GV(gv_n0_r2, 0, 2, 1)
GV(gv_n1_r2, 1, 2, 1)
GV(gv_n2_r2, 2, 2, 1)
GV(gv_n1_r1_b8, 1, 1, 8)
GV(gv_n2_r1_b8, 2, 1, 8)
