// Kernels of the grouped MoE path for many tokens (prefill), compiled at run time by NVRTC.
//
// moe_combine, the last step: the expert outputs y, one row per chosen (token, slot) pair in expert-sorted order, are weighted and summed
// back per token in one pass (the libtorch sequence: mask, weight multiply, zero a (T * W, H) f32
// buffer, scatter into it, sum over slots, cast; ~6 kernels and ~5x the memory traffic):
//   out[t, c] = sum_s w[t, s] * y[row[t, s], c]   over slots with ids[t, s] >= 0 and row[t, s] >= 0,
// in slot order, in f32, rounded to bf16 once (deterministic). Rows outside 0..M are skipped.
//
// grid (ceil(H / (8 * blockDim)), T), block 256. y (M, H) bf16, ids (T, W) i64, row (T, W) i64 (-1 = no
// row), w (T, W) f32, out (T, H) bf16. Requirements (checked by the caller): contiguous, H % 8 == 0.

__device__ __forceinline__ unsigned pack2(float a, float b) {
  return (unsigned)to_bf16(a) | ((unsigned)to_bf16(b) << 16);
}

extern "C" __global__ void moe_combine(const bf16* __restrict__ y, const i64* __restrict__ ids,
                                       const i64* __restrict__ row, const float* __restrict__ w,
                                       bf16* __restrict__ out, int H, int W, i64 M) {
  const int t = blockIdx.y;
  const int c = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (c >= H) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < W; ++s) {
    const i64 p = (i64)t * W + s;
    const i64 r = row[p];
    if (ids[p] < 0 || r < 0 || r >= M) continue;
    fma8(acc, w[p], *reinterpret_cast<const uint4*>(y + r * H + c));
  }
  uint4 o;
  o.x = pack2(acc[0], acc[1]);
  o.y = pack2(acc[2], acc[3]);
  o.z = pack2(acc[4], acc[5]);
  o.w = pack2(acc[6], acc[7]);
  *reinterpret_cast<uint4*>(out + (i64)t * H + c) = o;
}

// SwiGLU in one pass: out[r, j] = silu(g[r, j]) * u[r, j] in f32, rounded to bf16 once (libtorch: silu and
// mul, two kernels over strided halves). g and u (rows, cols) bf16 with row strides gs, us (elements) and
// unit column stride; out (rows, cols) bf16 contiguous. grid ceil(rows * cols / 8 / 256), block 256.
// Requirements (checked by the caller): cols, gs and us multiples of 8, 16-byte aligned bases.
extern "C" __global__ void swiglu(const bf16* __restrict__ g, const bf16* __restrict__ u, bf16* __restrict__ out,
                                  i64 rows, int cols, i64 gs, i64 us) {
  const i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i >= rows * cols) return;
  const i64 r = i / cols;
  const int c = (int)(i - r * cols);
  const uint4 gv = *reinterpret_cast<const uint4*>(g + r * gs + c);
  const uint4 uv = *reinterpret_cast<const uint4*>(u + r * us + c);
  const unsigned gw[4] = {gv.x, gv.y, gv.z, gv.w};
  const unsigned uw[4] = {uv.x, uv.y, uv.z, uv.w};
  unsigned o[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float g0 = lo(gw[q]), g1 = hi(gw[q]);
    const float a = g0 / (1.f + expf(-g0)) * lo(uw[q]);
    const float b = g1 / (1.f + expf(-g1)) * hi(uw[q]);
    o[q] = pack2(a, b);
  }
  *reinterpret_cast<uint4*>(out + i) = make_uint4(o[0], o[1], o[2], o[3]);
}
