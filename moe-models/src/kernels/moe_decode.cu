// Fused routed-expert kernels for few tokens (batch-1 decode), compiled at run time by NVRTC.
//
// The stock path (sort pairs by expert, gather rows, two grouped GEMMs, scatter back) costs ~19 kernel
// launches per MoE layer and reads the chosen experts' weights at under half of the H200's bandwidth. At
// a few tokens the work is matrix-vector products, so here it is two kernels that read each chosen
// expert's rows straight from the stacked weights, 16 bytes per lane, one warp per output row:
//   moe_gate_up: act[p, r] = silu(W_gu[e_p, r] . x[t_p]) * (W_gu[e_p, I + r] . x[t_p])   (f32)
//   moe_down:    out[t, c] = sum_s mix[t, s] * (W_d[e_(t,s), c] . act[(t,s)])           (bf16)
// where mix is given, or made in the kernel from the router probabilities and the family's mixing rule
// (saving the four to seven small kernels of gathering, masking, renormalising and scaling).
// for pairs p = (t, s), e_p = ids[t, s] (-1: no expert, contributes nothing). Accumulation is f32; the
// sum over a token's slots is in slot order, so results are deterministic.
//
// bf16 is handled as raw 16-bit words (no cuda_bf16.h, so NVRTC needs no include path). Requirements
// (checked by the caller): contiguous tensors, H and I multiples of 8 (16-byte rows).

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

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (ceil(I / warps), pairs), block (32 * warps). x (T, H) bf16, ids (T, W) i64 with row stride ld,
// w_gu (E, 2I, H) bf16, act (T * W, I) f32.
extern "C" __global__ void moe_gate_up(const bf16* __restrict__ x, const i64* __restrict__ ids,
                                       const bf16* __restrict__ w_gu, float* __restrict__ act, int H, int I,
                                       int W, int E, int ld) {
  const int pair = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= I) return;
  const int t = pair / W;
  const i64 e = ids[(i64)t * ld + pair % W];
  float* out = act + (i64)pair * I + r;
  if (e < 0 || e >= E) {
    if (lane == 0) *out = 0.f;
    return;
  }
  const bf16* xr = x + (i64)t * H;
  const bf16* g = w_gu + (e * 2 * I + r) * (i64)H;
  const bf16* u = g + (i64)I * H;
  float sg = 0.f, su = 0.f;
#pragma unroll 4
  for (int c = lane * 8; c < H; c += 256) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xr + c);
    sg += dot8(*reinterpret_cast<const uint4*>(g + c), xv);
    su += dot8(*reinterpret_cast<const uint4*>(u + c), xv);
  }
  sg = warp_sum(sg);
  su = warp_sum(su);
  if (lane == 0) *out = sg / (1.f + __expf(-sg)) * su;
}

// The mixing weight of slot s of token t. gather = 0: mix is (T, W), the weights themselves. gather = 1:
// mix is (T, E), the router probabilities: weight = p[e_s] (0 for no expert), divided by the sum over the
// token's chosen experts (+1e-20) when renorm, times scale (the family's mixing rule).
__device__ __forceinline__ float slot_weight(const float* mix, const i64* ids, int t, int s, int W, int E,
                                             int ld, int gather, int renorm, float scale) {
  const i64 e = ids[(i64)t * ld + s];
  if (!gather) return mix[(i64)t * W + s];
  if (e < 0 || e >= E) return 0.f;
  float w = mix[(i64)t * E + e];
  if (renorm) {
    float denom = 0.f;
    for (int j = 0; j < W; ++j) {
      const i64 ej = ids[(i64)t * ld + j];
      if (ej >= 0 && ej < E) denom += mix[(i64)t * E + ej];
    }
    w /= denom + 1e-20f;
  }
  return w * scale;
}

// grid (ceil(H / warps), T), block (32 * warps). act (T * W, I) f32, ids (T, W) i64 (row stride ld), mix
// (see slot_weight), w_d (E, H, I) bf16, out (T, H) bf16.
extern "C" __global__ void moe_down(const float* __restrict__ act, const i64* __restrict__ ids,
                                    const float* __restrict__ mix, const bf16* __restrict__ w_d,
                                    bf16* __restrict__ out, int H, int I, int W, int E, int ld, int gather,
                                    int renorm, float scale) {
  const int t = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int c = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (c >= H) return;
  float total = 0.f;
  for (int s = 0; s < W; ++s) {
    const int pair = t * W + s;
    const i64 e = ids[(i64)t * ld + s];
    if (e < 0 || e >= E) continue;  // the same for the whole warp
    const bf16* wr = w_d + (e * H + c) * (i64)I;
    const float* a = act + (i64)pair * I;
    float acc = 0.f;
#pragma unroll 4
    for (int j = lane * 8; j < I; j += 256) {
      acc += dot8f(*reinterpret_cast<const uint4*>(wr + j), *reinterpret_cast<const float4*>(a + j),
                   *reinterpret_cast<const float4*>(a + j + 4));
    }
    total += slot_weight(mix, ids, t, s, W, E, ld, gather, renorm, scale) * acc;
  }
  total = warp_sum(total);
  if (lane == 0) out[(i64)t * H + c] = to_bf16(total);
}
