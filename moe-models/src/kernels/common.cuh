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

// Two f32 values rounded to bf16 (nearest even) and packed, lo in the low half: one instruction (sm_80).
// A NaN becomes the canonical bf16 NaN (0x7fff), not to_bf16's 0x7fc0.
__device__ __forceinline__ unsigned pack_bf16x2(float lo_v, float hi_v) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi_v), "f"(lo_v));
  return r;
}

// Pairwise bf16 products, each correctly rounded to bf16 (as a bf16 x bf16 product in libtorch): sm_90.
__device__ __forceinline__ unsigned mul_bf16x2(unsigned a, unsigned b) {
  unsigned r;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
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

// Stage one token's row into shared memory s (H bf16, 16-byte aligned), normalised when norm_w is given:
// s = rmsnorm(x) * norm_w with transformers' rounding (bf16 after the normalisation, bf16 after the
// weight), else s = x. Every thread issues all of its 16-byte loads before using any, so the row costs
// one memory latency (a strided loop of 2-byte loads cost one latency per iteration: ~9 us for a
// 2048-wide row in a 128-thread block on an H200). Requires H % 8 == 0 and H <= CH * 8 *
// blockDim.x (CH 16-byte chunks per thread, held in registers: keep it as small as the caller's widest
// row allows, as registers spilled to local memory cost more than the chunks save). All threads must
// call it; s is complete after it returns. red: >= 33 floats of shared memory.
template <int CH>
__device__ __forceinline__ void stage_row(const bf16* __restrict__ x, const bf16* __restrict__ norm_w, float eps,
                                          int H, bf16* s, float* red) {
  uint4 xv[CH], nv[CH];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * 8;
    if (c < H) {
      xv[k] = *reinterpret_cast<const uint4*>(x + c);
      if (norm_w != 0) nv[k] = *reinterpret_cast<const uint4*>(norm_w + c);
    }
  }
  if (norm_w != 0) {
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if ((k * blockDim.x + threadIdx.x) * 8 < H) {
        const unsigned* w = reinterpret_cast<const unsigned*>(&xv[k]);
#pragma unroll
        for (int q = 0; q < 4; ++q) ss += lo(w[q]) * lo(w[q]) + hi(w[q]) * hi(w[q]);
      }
    }
    const float r = rsqrtf(block_reduce(ss, false, red) / H + eps);
#pragma unroll
    for (int k = 0; k < CH; ++k) {
      if ((k * blockDim.x + threadIdx.x) * 8 < H) {
        unsigned* w = reinterpret_cast<unsigned*>(&xv[k]);
        const unsigned* n = reinterpret_cast<const unsigned*>(&nv[k]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const unsigned a = to_bf16(lo(n[q]) * bf(to_bf16(lo(w[q]) * r)));
          const unsigned b = to_bf16(hi(n[q]) * bf(to_bf16(hi(w[q]) * r)));
          w[q] = a | (b << 16);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = (k * blockDim.x + threadIdx.x) * 8;
    if (c < H) *reinterpret_cast<uint4*>(s + c) = xv[k];
  }
  __syncthreads();
}

// A warp's view of one row of H bf16 (H <= 256 * CH): lane l holds columns k * 256 + 8 l .. + 8 in v[k]
// (zeros past H). Every load is issued before any is used.
template <int CH>
__device__ __forceinline__ void warp_load_row(uint4* v, const bf16* __restrict__ p, int H, int lane) {
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const int c = k * 256 + lane * 8;
    v[k] = c < H ? *reinterpret_cast<const uint4*>(p + c) : make_uint4(0, 0, 0, 0);
  }
}

// 1 / rms of a row held as warp_load_row leaves it (H values over the warp): rsqrt(mean(x^2) + eps).
template <int CH>
__device__ __forceinline__ float warp_inv_rms(const uint4* x, float eps, int H) {
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < CH; ++k) {
    const unsigned* w = reinterpret_cast<const unsigned*>(&x[k]);
#pragma unroll
    for (int q = 0; q < 4; ++q) ss += lo(w[q]) * lo(w[q]) + hi(w[q]) * hi(w[q]);
  }
  return rsqrtf(warp_sum(ss) / H + eps);
}

// One 16-byte chunk normalised in place: x = bf16(n * bf16(x * r)), transformers' rounding, with the
// hardware's bf16 conversions and products (a software rounding per element made every warp of a
// projection spend ~5 us of an H200's issue slots on V2-Lite's 2048-wide rows).
__device__ __forceinline__ void norm_chunk(uint4& x, const uint4& n, float r) {
  unsigned* w = reinterpret_cast<unsigned*>(&x);
  const unsigned* nw = reinterpret_cast<const unsigned*>(&n);
#pragma unroll
  for (int q = 0; q < 4; ++q) w[q] = mul_bf16x2(nw[q], pack_bf16x2(lo(w[q]) * r, hi(w[q]) * r));
}

// RMSNorm of a row held as warp_load_row leaves it, in place, by one warp with no shared memory. nv: the
// norm weight, loaded as warp_load_row loads rows (a caller may load it early: it is a weight).
template <int CH>
__device__ __forceinline__ void warp_norm_loaded(uint4* x, const uint4* nv, float eps, int H) {
  const float r = warp_inv_rms<CH>(x, eps, H);
#pragma unroll
  for (int k = 0; k < CH; ++k) norm_chunk(x[k], nv[k], r);
}

// warp_norm_loaded with the norm weight read from norm_w (H bf16) here.
template <int CH>
__device__ __forceinline__ void warp_norm_row(uint4* x, const bf16* __restrict__ norm_w, float eps, int H, int lane) {
  uint4 nv[CH];
  warp_load_row<CH>(nv, norm_w, H, lane);
  warp_norm_loaded<CH>(x, nv, eps, H);
}

// Programmatic dependent launch (kernels launched with cuda_graph's `Function::launch_dependent`, sm_90):
// pdl_wait blocks until the previous kernel has finished and its writes are visible; pdl_release then lets
// the stream's next kernel start launching its blocks (to read its weights while this one works). Before
// pdl_wait a kernel may only read immutable inputs (weights) and prefetch; every read of activations and
// every write comes after it. Releasing only after the wait keeps one kernel ahead: released at the
// start, every later kernel's blocks launched at once and waited on the SMs, with their weight
// prefetches competing for the bandwidth (2.48 -> 2.63 ms per V2-Lite token on an H200). Without a
// programmatic launch both are no-ops.
__device__ __forceinline__ void pdl_release() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Ask for the 128-byte line at p to be brought into L2, holding no register.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// A warp's prefetch of `bytes` bytes from p (one line per lane per step).
__device__ __forceinline__ void warp_prefetch(const void* p, i64 bytes, int lane) {
  for (i64 off = (i64)lane * 128; off < bytes; off += 32 * 128) prefetch_l2(static_cast<const char*>(p) + off);
}

// The max of n scores (-inf for masked ones) and, in *l, the sum of exp(score - max): one warp, every
// lane gets both (a softmax partial without a block-wide reduction, for a few dozen scores).
__device__ __forceinline__ float warp_softmax_stats(const float* sc, int n, int lane, float* l) {
  float m = NEG_INF;
  for (int j = lane; j < n; j += 32) m = fmaxf(m, sc[j]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float e = 0.f;
  for (int j = lane; j < n; j += 32) e += (sc[j] == NEG_INF || m == NEG_INF) ? 0.f : expf(sc[j] - m);
  *l = warp_sum(e);
  return m;
}

// One rotary pair j of a row of P values (element stride `stride` in, 1 out): (x0, x1) at (2j, 2j + 1) when
// interleaved (DeepSeek), (j, j + P / 2) otherwise, becomes (x0 cos - x1 sin, x0 sin + x1 cos) in f32,
// rounded to bf16 once.
__device__ __forceinline__ void rope_pair(const bf16* __restrict__ in, i64 stride, bf16* __restrict__ out, int j,
                                          int P, int interleaved, float c, float s) {
  const int i0 = interleaved ? 2 * j : j, i1 = interleaved ? 2 * j + 1 : j + P / 2;
  const float x0 = bf(in[i0 * stride]), x1 = bf(in[i1 * stride]);
  out[i0] = to_bf16(x0 * c - x1 * s);
  out[i1] = to_bf16(x0 * s + x1 * c);
}
