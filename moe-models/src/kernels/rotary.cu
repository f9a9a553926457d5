// Rotary embedding for bf16 on CUDA in one kernel (the libtorch sequence is five: copy, cast, complex
// multiply, cast back, copy), compiled at run time by NVRTC.
//
// x (B, Hh, T, D) bf16 with any strides, cos/sin (B, T, D/2) f32 contiguous; out (B, Hh, T, D) bf16
// contiguous. Pair j of a row is (x[2j], x[2j+1]) when interleaved (DeepSeek), (x[j], x[j + D/2])
// otherwise; it becomes (x0 cos - x1 sin, x0 sin + x1 cos), in f32, rounded to bf16 once.

// Shared helpers (bf16 words) are in common.cuh, prepended at compile time.

extern "C" __global__ void rotary_bf16(const bf16* __restrict__ x, const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, bf16* __restrict__ out, int Hh, int T,
                                       int D, int interleaved, int pairs, i64 s0, i64 s1, i64 s2, i64 s3) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int half = D / 2;
  const int j = p % half;
  int rest = p / half;
  const int t = rest % T;
  rest /= T;
  const int h = rest % Hh;
  const int b = rest / Hh;
  const bf16* xr = x + b * s0 + h * s1 + t * s2;
  const i64 cs = ((i64)b * T + t) * half + j;
  rope_pair(xr, s3, out + (((i64)b * Hh + h) * T + t) * D, j, D, interleaved, cos_t[cs], sin_t[cs]);
}
