// Helpers shared by the run-time compiled kernels (prepended to each .cu file before NVRTC compiles it).
//
// bf16 is handled as raw 16-bit words (no cuda_bf16.h, so NVRTC needs no include path).

typedef unsigned short bf16;
typedef long long i64;

__device__ __forceinline__ float lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

// Round to nearest even, NaN kept quiet.
__device__ __forceinline__ bf16 to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  return lo(w.x) * lo(x.x) + hi(w.x) * hi(x.x) + lo(w.y) * lo(x.y) + hi(w.y) * hi(x.y) +
         lo(w.z) * lo(x.z) + hi(w.z) * hi(x.z) + lo(w.w) * lo(x.w) + hi(w.w) * hi(x.w);
}

__device__ __forceinline__ float dot8f(uint4 w, float4 a, float4 b) {
  return lo(w.x) * a.x + hi(w.x) * a.y + lo(w.y) * a.z + hi(w.y) * a.w +
         lo(w.z) * b.x + hi(w.z) * b.y + lo(w.w) * b.z + hi(w.w) * b.w;
}

// a[0..8) += s * the 8 bf16 words of w.
__device__ __forceinline__ void fma8(float* a, float s, uint4 w) {
  a[0] += s * lo(w.x);
  a[1] += s * hi(w.x);
  a[2] += s * lo(w.y);
  a[3] += s * hi(w.y);
  a[4] += s * lo(w.z);
  a[5] += s * hi(w.z);
  a[6] += s * lo(w.w);
  a[7] += s * hi(w.w);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum or max of one value per thread (all threads must call it). red: >= 33 floats of shared
// memory.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, u) : v + u;
  }
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float r = red[0];
    for (int i = 1; i < warps; ++i) r = is_max ? fmaxf(r, red[i]) : r + red[i];
    red[32] = r;
  }
  __syncthreads();
  const float r = red[32];
  __syncthreads();
  return r;
}

// One bf16 word as f32.
__device__ __forceinline__ float bf(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

#define NEG_INF __int_as_float(0xff800000)
