// Fused MoE kernels for few tokens (decode steps), compiled at run time by NVRTC.
//
// The stock path (router linear, softmax, sort; sort pairs by expert, gather rows, two grouped GEMMs,
// scatter back; the shared experts' five kernels and an add) costs ~30 kernel launches per MoE layer
// and reads the chosen experts' weights at under half of the H200's bandwidth. At a few tokens the work
// is matrix-vector products, so here it is at most three kernels that read each chosen expert's rows
// straight from the stacked weights, 16 bytes per lane, one warp per output row:
//   moe_router:  xn[t] = rmsnorm(x[t]) * norm_w (optional: the decoder's post-attention norm)
//                logits[t, e] = xn[t] . W_r[e]                                            (f32)
//   moe_gate_up: act[p, r] = silu(W_gu[e_p, r] . xn[t_p]) * (W_gu[e_p, I + r] . xn[t_p])  (bf16)
//                and the same for the shared expert (its own gate/up weights, width Is)
//   moe_down:    out[t, c] = res[t, c] (optional: the decoder's residual add)
//                          + sum_s mix[t, s] * (W_d[e_(t,s), c] . act[(t,s)])
//                          + g_t * (W_sd[c] . act_s[t])                                   (bf16)
// for pairs p = (t, s). The chosen experts e_p and weights mix come from one of:
//   - a policy's ids (-1: no expert, contributes nothing) with weights given, or made in the kernel from
//     the router probabilities and the family's mixing rule;
//   - top-k in the kernel (route = 1): every gate_up warp of token t takes a softmax of the logits row
//     and picks the expert of rank s (probability descending, ties to the lower index, as a stable
//     sort) for slot s; the first block of each pair writes the id and its mixing weight for moe_down.
// g_t is 1 (DeepSeek) or sigmoid(xn[t] . w_g) (Qwen2-MoE's shared_expert_gate), made by a gate_up block.
// Accumulation is f32; the SwiGLU activations are rounded to bf16 (as transformers' bf16 MLP does),
// which halves what moe_down reads besides the weights; sums over slots run in slot order, so results
// are deterministic.
//
// Several tokens (2 to TOK_MAX sequences decoding together) take the *_tokens kernels at the end of the
// file instead, which read each chosen expert once a step for every token that chose it; the routing
// then runs once per token in its own small kernel after moe_router (moe_route: top-k; moe_route_split:
// a policy's batch split, Alloc-T).
//
// Shared helpers (bf16 words, dot products, reductions) are in common.cuh, prepended at compile time.
// Requirements (checked by the caller): contiguous tensors, H and I multiples of 8 (16-byte rows), at
// most MAX_EXPERTS experts for the in-kernel top-k.

#define MAX_EXPERTS 256

// The softmax of one token's logits row (E values) over a warp: p[q] is the probability of expert
// q * 32 + lane, -1 past E (not an expert). EPL = experts per lane (E <= 32 * EPL).
template <int EPL>
__device__ __forceinline__ void warp_probs(const float* __restrict__ logits, int E, float* p) {
  const int lane = threadIdx.x & 31;
  float m = NEG_INF;
#pragma unroll
  for (int q = 0; q < EPL; ++q) {
    const int j = q * 32 + lane;
    p[q] = j < E ? logits[j] : NEG_INF;
    m = fmaxf(m, p[q]);
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float z = 0.f;
#pragma unroll
  for (int q = 0; q < EPL; ++q) {
    p[q] = q * 32 + lane < E ? expf(p[q] - m) : 0.f;
    z += p[q];
  }
  z = warp_sum(z);
#pragma unroll
  for (int q = 0; q < EPL; ++q) p[q] = q * 32 + lane < E ? p[q] / z : -1.f;  // -1: not an expert
}

// One round of the ranking over warp_probs' p: the most probable expert not yet taken (ties to the lower
// index, as a stable descending sort), marked in `taken` (bit q: this lane's expert q * 32 + lane).
// Returns it, or -1 when none is left (NaN probabilities compare false), and its probability in *pv; the
// same on every lane.
template <int EPL>
__device__ __forceinline__ int warp_pick(const float* p, unsigned& taken, float* pv) {
  const int lane = threadIdx.x & 31;
  float bv = -1.f;
  int bj = 0x7fffffff;
#pragma unroll
  for (int q = 0; q < EPL; ++q) {
    const int j = q * 32 + lane;
    if (!((taken >> q) & 1u) && p[q] > bv) bv = p[q], bj = j;  // ascending j: ties keep the lower
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, bv, o);
    const int j = __shfl_xor_sync(0xffffffffu, bj, o);
    if (v > bv || (v == bv && j < bj)) bv = v, bj = j;
  }
  if (bj == 0x7fffffff || bv < 0.f) return -1;
  if ((bj & 31) == lane) taken |= 1u << (bj >> 5);
  *pv = bv;
  return bj;
}

// Top-k routing of one token by one warp (no shared memory, no barriers): softmax of the logits row (E
// values), the expert of rank s (probability descending, ties to the lower index, as a stable sort) and
// its mixing weight (the probability, divided by the sum over the K chosen + 1e-20 when renorm, times
// scale). Rounds of a warp-wide arg-max over the not yet chosen experts: s + 1 of them, or K to
// renormalise. Returns the expert (-1 if none: NaN logits) and writes the weight to *w. All 32 lanes
// must call it. EPL = experts per lane
// (E <= 32 * EPL): the smallest that holds E keeps the ranking short, as it delays every weight load.
template <int EPL>
__device__ int warp_route(const float* __restrict__ logits, int E, int K, int s, int renorm, float scale,
                          float* w) {
  float p[EPL];
  warp_probs<EPL>(logits, E, p);
  unsigned taken = 0;
  int chosen = -1;
  float chosen_p = 0.f, top = 0.f;
  // Rank s needs s + 1 rounds; the renormalisation needs the sum over all K.
  const int rounds = renorm ? K : s + 1;
  for (int round = 0; round < rounds; ++round) {
    float bv;
    const int bj = warp_pick<EPL>(p, taken, &bv);
    if (bj < 0) break;  // fewer than K experts left
    if (round == s) chosen = bj, chosen_p = bv;
    top += bv;
  }
  float wt = chosen >= 0 ? chosen_p : 0.f;
  if (renorm) wt /= top + 1e-20f;
  *w = wt * scale;
  return chosen;
}

#define ROUTER_STAGE 8  // staged 16-byte chunks per thread: H <= 8 * 8 * 128 = 8192 with 4 warps

// grid (ceil(E / warps), T), block (32 * warps), dynamic shared memory H bf16 (H <= ROUTER_STAGE * 8 *
// 32 * warps): logits[t, e] = xn[t] . w_r[e] in f32. x (T, H) bf16, w_r (E, H) f32, logits (T, E) f32. With norm_w (H) bf16 given, xn = rmsnorm(x) * norm_w with
// transformers' rounding (bf16 after the normalisation, bf16 after the weight), and the x == 0 blocks
// write xn to xn_out (T, H) bf16 for moe_gate_up; without it xn = x.
extern "C" __global__ void moe_router(const bf16* __restrict__ x, const bf16* __restrict__ norm_w, float eps,
                                      bf16* __restrict__ xn_out, const float* __restrict__ w_r,
                                      float* __restrict__ logits, int H, int E) {
  extern __shared__ __align__(16) bf16 xs[];  // H: the token's (normalised) row
  __shared__ float red[33];
  const int t = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (e < E) warp_prefetch(w_r + (i64)e * H, (i64)H * 4, lane);
  pdl_wait();
  pdl_release();
  stage_row<ROUTER_STAGE>(x + (i64)t * H, norm_w, eps, H, xs, red);
  if (norm_w != 0 && blockIdx.x == 0)
    for (int c = threadIdx.x * 8; c < H; c += blockDim.x * 8)
      *reinterpret_cast<uint4*>(xn_out + (i64)t * H + c) = *reinterpret_cast<const uint4*>(xs + c);
  if (e >= E) return;
  const float* wr = w_r + (i64)e * H;
  float acc = 0.f;
#pragma unroll 4
  for (int c = lane * 8; c < H; c += 256)
    acc += dot8f(*reinterpret_cast<const uint4*>(xs + c), *reinterpret_cast<const float4*>(wr + c),
                 *reinterpret_cast<const float4*>(wr + c + 4));
  acc = warp_sum(acc);
  if (lane == 0) logits[(i64)t * E + e] = acc;
}

#define ROUTER_WARP_CHUNKS 8  // moe_router_warp: rows up to 8 * 256 = 2048 wide

// moe_router for one token (T == 1, H <= 256 * ROUTER_WARP_CHUNKS), as gemv_warp does projections: a warp
// per expert holds its f32 router row in registers, loaded before the wait, and normalises the input itself
// (warp_norm_row), with no shared memory and no barrier; warp 0 of block 0 writes xn_out. On an H200 the
// staged version took ~4.7 us a V2-Lite layer. grid (ceil(E / 4)), block 128; moe_router's arguments.
extern "C" __global__ void __launch_bounds__(128)
moe_router_warp(const bf16* __restrict__ x, const bf16* __restrict__ norm_w, float eps, bf16* __restrict__ xn_out,
                const float* __restrict__ w_r, float* __restrict__ logits, int H, int E) {
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * 4 + (threadIdx.x >> 5);
  const bool writer = norm_w != 0 && blockIdx.x == 0 && threadIdx.x < 32;
  float4 wr[2 * ROUTER_WARP_CHUNKS];
  if (e < E) {
#pragma unroll
    for (int k = 0; k < ROUTER_WARP_CHUNKS; ++k) {
      const int c = k * 256 + lane * 8;
      const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
      wr[2 * k] = c < H ? *reinterpret_cast<const float4*>(w_r + (i64)e * H + c) : z;
      wr[2 * k + 1] = c < H ? *reinterpret_cast<const float4*>(w_r + (i64)e * H + c + 4) : z;
    }
  }
  pdl_wait();  // the input comes from earlier kernels
  pdl_release();
  if (e >= E && !writer) return;
  uint4 xv[ROUTER_WARP_CHUNKS];
  warp_load_row<ROUTER_WARP_CHUNKS>(xv, x, H, lane);
  if (norm_w != 0) warp_norm_row<ROUTER_WARP_CHUNKS>(xv, norm_w, eps, H, lane);
  if (writer)
#pragma unroll
    for (int k = 0; k < ROUTER_WARP_CHUNKS; ++k)
      if (k * 256 + lane * 8 < H) *reinterpret_cast<uint4*>(xn_out + k * 256 + lane * 8) = xv[k];
  if (e >= E) return;
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < ROUTER_WARP_CHUNKS; ++k) acc += dot8f(xv[k], wr[2 * k], wr[2 * k + 1]);
  acc = warp_sum(acc);
  if (lane == 0) logits[e] = acc;
}

// One warp's SwiGLU row: silu(g . x) * (u . x) over H (16-byte loads).
__device__ __forceinline__ float swiglu_row(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                            const bf16* __restrict__ xr, int H, int lane) {
  float sg = 0.f, su = 0.f;
#pragma unroll 4
  for (int c = lane * 8; c < H; c += 256) {
    const uint4 xv = *reinterpret_cast<const uint4*>(xr + c);
    sg += dot8(*reinterpret_cast<const uint4*>(g + c), xv);
    su += dot8(*reinterpret_cast<const uint4*>(u + c), xv);
  }
  sg = warp_sum(sg);
  su = warp_sum(su);
  return sg / (1.f + __expf(-sg)) * su;
}

// grid (T * W * BR + (Is > 0 ? T * BS : 0)), block (32 * warps), BR = ceil(I / warps), BS = ceil(Is /
// warps): one output row per warp, blocks [0, T * W * BR) for the routed pairs (pair p = block / BR),
// the rest for the shared expert of each token.
// Routed pairs: expert from ids (route = 0; (T, W) i64, row stride ld) or from the logits (route = 1;
// (T, E) f32, every warp ranks the token's experts itself; the first block of each pair writes ids_out
// (T, W) i64 and w_out (T, W) f32); rows of w_gu (E, 2I, H) bf16 into act (T * W, I) bf16.
// Shared rows: s_g, s_u (Is, H) bf16 into act_s (T, Is) bf16; with s_gate (H) bf16 given, the first
// shared block of token t also writes g[t] = sigmoid(x[t] . s_gate) (else moe_down uses 1).
template <int EPL>
__device__ __forceinline__ void moe_gate_up_impl(const bf16* __restrict__ x, const i64* __restrict__ ids,
                                       const float* __restrict__ logits, const bf16* __restrict__ w_gu,
                                       bf16* __restrict__ act, i64* __restrict__ ids_out,
                                       float* __restrict__ w_out, const bf16* __restrict__ s_g,
                                       const bf16* __restrict__ s_u, bf16* __restrict__ act_s,
                                       const bf16* __restrict__ s_gate, float* __restrict__ g,
                                       int H, int I, int W, int E, int ld, int Is, int T, int route,
                                       int renorm, float scale) {
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int BR = (I + warps - 1) / warps;
  const int routed = T * W * BR;
  if ((int)blockIdx.x >= routed) {  // the shared expert of token t
    const int BS = (Is + warps - 1) / warps;
    const int b = blockIdx.x - routed, t = b / BS;
    const int r = (b % BS) * warps + warp;
    if (r < Is) warp_prefetch(s_g + (i64)r * H, (i64)H * 2, lane), warp_prefetch(s_u + (i64)r * H, (i64)H * 2, lane);
    pdl_wait();
    pdl_release();
    const bf16* xr = x + (i64)t * H;
    if (s_gate != 0 && b % BS == 0 && warp == 0) {
      float d = 0.f;
      for (int c = lane * 8; c < H; c += 256)
        d += dot8(*reinterpret_cast<const uint4*>(s_gate + c), *reinterpret_cast<const uint4*>(xr + c));
      d = warp_sum(d);
      if (lane == 0) g[t] = 1.f / (1.f + expf(-d));
    }
    if (r >= Is) return;
    const float v = swiglu_row(s_g + (i64)r * H, s_u + (i64)r * H, xr, H, lane);
    if (lane == 0) act_s[(i64)t * Is + r] = to_bf16(v);
    return;
  }
  pdl_wait();  // the logits or ids, and the input, come from earlier kernels
  pdl_release();
  const int pair = blockIdx.x / BR, t = pair / W;
  const int r = (blockIdx.x % BR) * warps + warp;
  i64 e;
  if (route) {
    float w;
    e = warp_route<EPL>(logits + (i64)t * E, E, W, pair % W, renorm, scale, &w);
    if (blockIdx.x % BR == 0 && threadIdx.x == 0) {
      ids_out[pair] = e;
      w_out[pair] = w;
    }
  } else {
    e = ids[(i64)t * ld + pair % W];
  }
  if (r >= I) return;
  bf16* out = act + (i64)pair * I + r;
  if (e < 0 || e >= E) {
    if (lane == 0) *out = 0;
    return;
  }
  const bf16* gr = w_gu + (e * 2 * I + r) * (i64)H;
  const float v = swiglu_row(gr, gr + (i64)I * H, x + (i64)t * H, H, lane);
  if (lane == 0) *out = to_bf16(v);
}

// moe_gate_up_<E>: moe_gate_up for at most E experts (the in-kernel top-k's ranking width).
#define MOE_GATE_UP(NAME, EPL)                                                                              \
  extern "C" __global__ void NAME(const bf16* __restrict__ x, const i64* __restrict__ ids,                  \
                                  const float* __restrict__ logits, const bf16* __restrict__ w_gu,          \
                                  bf16* __restrict__ act, i64* __restrict__ ids_out, float* __restrict__ w_out, \
                                  const bf16* __restrict__ s_g, const bf16* __restrict__ s_u,               \
                                  bf16* __restrict__ act_s, const bf16* __restrict__ s_gate,                \
                                  float* __restrict__ g, int H, int I, int W, int E, int ld, int Is, int T,  \
                                  int route, int renorm, float scale) {                                     \
    moe_gate_up_impl<EPL>(x, ids, logits, w_gu, act, ids_out, w_out, s_g, s_u, act_s, s_gate, g, H, I, W, E,  \
                          ld, Is, T, route, renorm, scale);                                                 \
  }
MOE_GATE_UP(moe_gate_up_64, 2)
MOE_GATE_UP(moe_gate_up_128, 4)
MOE_GATE_UP(moe_gate_up_256, 8)

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

// One warp's dot of two bf16 rows over I (16-byte loads).
__device__ __forceinline__ float row_dot(const bf16* __restrict__ wr, const bf16* __restrict__ a, int I,
                                         int lane) {
  float acc = 0.f;
#pragma unroll 4
  for (int j = lane * 8; j < I; j += 256)
    acc += dot8(*reinterpret_cast<const uint4*>(wr + j), *reinterpret_cast<const uint4*>(a + j));
  return acc;
}

// One warp's dots of two bf16 rows w0, w1 with one bf16 row a over I (16-byte loads; a is re-read from
// L1 for the second pair of columns).
__device__ __forceinline__ void row_dot2(const bf16* __restrict__ w0, const bf16* __restrict__ w1,
                                         const bf16* __restrict__ a, int I, int lane, float* d0, float* d1) {
  float s0 = 0.f, s1 = 0.f;
#pragma unroll 4
  for (int j = lane * 8; j < I; j += 256) {
    const uint4 av = *reinterpret_cast<const uint4*>(a + j);
    s0 += dot8(*reinterpret_cast<const uint4*>(w0 + j), av);
    s1 += dot8(*reinterpret_cast<const uint4*>(w1 + j), av);
  }
  *d0 = s0;
  *d1 = s1;
}

// grid (H / COLS, T), block (32 * warps), warps = min(W + (Is > 0), 8): COLS outputs c of token t per
// block; warp w takes slots w, w + warps, ... (then the shared expert as one more unit), two columns at
// a time, and the warps' sums meet in shared memory in warp order (deterministic). act (T * W, I) bf16,
// ids (T, W) i64 (row stride ld), mix (see slot_weight), w_d (E, H, I) bf16, out (T, H) bf16. With Is > 0,
// adds g[t] (1 when g is null) times the shared expert's down row s_d (H, Is) bf16 applied to act_s (T,
// Is) bf16. With res (T, H) bf16 given, out = res + the sum (the decoder's residual add). Spreading a
// row's slots over warps keeps ~7x more loads in flight than one warp per row, and several columns per
// block let the grid fit about one wave of the H200's SMs when there are enough slots (the caller picks
// COLS so that the grid still has thousands of warps; measured).
template <int COLS>
__device__ __forceinline__ void moe_down_impl(const bf16* __restrict__ act, const i64* __restrict__ ids,
                                              const float* __restrict__ mix, const bf16* __restrict__ w_d,
                                              bf16* __restrict__ out, const bf16* __restrict__ act_s,
                                              const bf16* __restrict__ s_d, const float* __restrict__ g,
                                              const bf16* __restrict__ res, int H, int I, int W, int E, int ld,
                                              int Is, int gather, int renorm, float scale) {
  __shared__ float red[8][COLS];
  const int t = blockIdx.y, c0 = blockIdx.x * COLS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int units = W + (Is > 0 ? 1 : 0);
  if (Is > 0 && warp == 0) warp_prefetch(s_d + (i64)c0 * Is, (i64)COLS * Is * 2, lane);
  pdl_wait();  // ids, weights and activations come from moe_gate_up
  pdl_release();
  // The residual, loaded early.
  const float rv = res != 0 && threadIdx.x < COLS ? bf(res[(i64)t * H + c0 + threadIdx.x]) : 0.f;
  float total[COLS];
#pragma unroll
  for (int q = 0; q < COLS; ++q) total[q] = 0.f;
  for (int u = warp; u < units; u += warps) {
    const bf16* wbase;
    const bf16* a;
    int n;
    float f;
    if (u < W) {
      const i64 e = ids[(i64)t * ld + u];
      if (e < 0 || e >= E) continue;  // the same for the whole warp
      wbase = w_d + (e * H + c0) * (i64)I, a = act + ((i64)t * W + u) * I, n = I;
      f = slot_weight(mix, ids, t, u, W, E, ld, gather, renorm, scale);
    } else {
      wbase = s_d + (i64)c0 * Is, a = act_s + (i64)t * Is, n = Is;
      f = g != 0 ? g[t] : 1.f;
    }
    if constexpr (COLS == 1) {
      total[0] += f * row_dot(wbase, a, n, lane);
    } else {
#pragma unroll
      for (int q = 0; q < COLS; q += 2) {
        float d0, d1;
        row_dot2(wbase + (i64)q * n, wbase + (i64)(q + 1) * n, a, n, lane, &d0, &d1);
        total[q] += f * d0;
        total[q + 1] += f * d1;
      }
    }
  }
#pragma unroll
  for (int q = 0; q < COLS; ++q) {
    const float v = warp_sum(total[q]);
    if (lane == 0) red[warp][q] = v;
  }
  __syncthreads();
  if (threadIdx.x < COLS) {
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += red[w][threadIdx.x];
    out[(i64)t * H + c0 + threadIdx.x] = to_bf16(sum + rv);
  }
}

// moe_down_<COLS>: moe_down with COLS output columns per block.
#define MOE_DOWN(NAME, COLS)                                                                                  \
  extern "C" __global__ void NAME(const bf16* __restrict__ act, const i64* __restrict__ ids,                  \
                                  const float* __restrict__ mix, const bf16* __restrict__ w_d,                \
                                  bf16* __restrict__ out, const bf16* __restrict__ act_s,                     \
                                  const bf16* __restrict__ s_d, const float* __restrict__ g,                  \
                                  const bf16* __restrict__ res, int H, int I, int W, int E, int ld, int Is,    \
                                  int gather, int renorm, float scale) {                                      \
    moe_down_impl<COLS>(act, ids, mix, w_d, out, act_s, s_d, g, res, H, I, W, E, ld, Is, gather, renorm, scale); \
  }
MOE_DOWN(moe_down_1, 1)
MOE_DOWN(moe_down_2, 2)
MOE_DOWN(moe_down_4, 4)

// ---- Several tokens (sequences decoding together): each chosen expert read once a step ----
// With T tokens the same expert is often chosen by several of them (at 8 tokens of DeepSeek-V2-Lite's
// top-6 of 64, ~48 pairs name ~35 experts), and the kernels above read an expert's rows once per pair
// and the shared expert's once per token. The kernels below read each chosen expert's rows, and the
// shared expert's, once a step: the first pair (in pair order p = t * W + s) naming an expert owns it
// and computes every pair that names it. For 2 <= T <= TOK_MAX tokens and T * W <= 64 pairs; routing:
//   moe_route:          ids (T, W) and mixing weights (T, W) of every token's top-W (when the router's
//                       top-k is asked for: a warp per token ranks as warp_route does, all W at once)
//   moe_gate_up_tokens: act as moe_gate_up's (ids given), act_s (T, Is) and g (T)
//   moe_down_tokens:    out as moe_down's
// Sums run in a fixed order for given ids (pairs in pair order within a warp, warps in order), so the
// results are deterministic; they may differ from the one-token kernels' in the last bits.

#define TOK_MAX 8

// grid (T), block 32: the top-W experts of token t by warp_route's ranking, in rank order, into ids (T,
// W) i64 (-1 past the last expert: NaN logits), and their weights (the probability, divided by the sum
// over the chosen + 1e-20 when renorm, times scale) into w (T, W) f32. logits (T, E) f32; W <= 32.
template <int EPL>
__device__ __forceinline__ void moe_route_impl(const float* __restrict__ logits, int E, int W, int renorm, float scale,
                                               i64* __restrict__ ids, float* __restrict__ w) {
  const int t = blockIdx.x, lane = threadIdx.x & 31;
  pdl_wait();  // the logits come from moe_router
  pdl_release();
  float p[EPL];
  warp_probs<EPL>(logits + (i64)t * E, E, p);
  unsigned taken = 0;
  int mine = -1;  // lane s keeps rank s
  float mine_p = 0.f, top = 0.f;
  for (int s = 0; s < W; ++s) {
    float bv;
    const int bj = warp_pick<EPL>(p, taken, &bv);
    if (bj < 0) break;
    if (lane == s) mine = bj, mine_p = bv;
    top += bv;
  }
  if (lane < W) {
    float wt = mine >= 0 ? mine_p : 0.f;
    if (renorm) wt /= top + 1e-20f;
    ids[(i64)t * W + lane] = mine;
    w[(i64)t * W + lane] = wt * scale;
  }
}
#define MOE_ROUTE(NAME, EPL)                                                                                   \
  extern "C" __global__ void NAME(const float* __restrict__ logits, int E, int W, int renorm, float scale,     \
                                  i64* __restrict__ ids, float* __restrict__ w) {                              \
    moe_route_impl<EPL>(logits, E, W, renorm, scale, ids, w);                                                  \
  }
MOE_ROUTE(moe_route_64, 2)
MOE_ROUTE(moe_route_128, 4)
MOE_ROUTE(moe_route_256, 8)

// grid (1), block (32 * T), T <= TOK_MAX, floor <= cap <= 8: a batch's budget split across its T tokens
// by score (Alloc-T's rule, batch scope: alloc_token::device::BatchSplit). Warp t ranks token t's first
// cap experts as warp_route does; warp 0 then orders the candidates (ranks floor..cap of every token,
// index (rank - floor) * T + t) by (score desc, index asc) and the first `extra` join; every token keeps
// a prefix of its ranking. Writes ids (T, cap) i64 (-1 past a token's count) and the mixing weights (T,
// cap) f32 (the probability, divided by the sum over the token's chosen + 1e-20 when renorm, times
// scale; 0 for -1). Score: the probability, or with relative it divided by the token's top one (0 when
// that is 0), in f32 as alloc-token's device path computes it.
template <int EPL>
__device__ __forceinline__ void moe_route_split_impl(const float* __restrict__ logits, int E, int T, int floor, int cap,
                                                     int extra, int relative, int renorm, float scale,
                                                     i64* __restrict__ ids, float* __restrict__ w) {
  __shared__ float pv[TOK_MAX][8];
  __shared__ int pe[TOK_MAX][8];
  __shared__ int found[TOK_MAX], count[TOK_MAX];
  const int t = threadIdx.x >> 5, lane = threadIdx.x & 31;
  pdl_wait();  // the logits come from moe_router
  pdl_release();
  float p[EPL];
  warp_probs<EPL>(logits + (i64)t * E, E, p);
  unsigned taken = 0;
  int n = 0;
  for (int r = 0; r < cap; ++r) {
    float v;
    const int j = warp_pick<EPL>(p, taken, &v);
    if (j < 0) break;  // NaN logits: fewer experts
    if (lane == 0) pv[t][r] = v, pe[t][r] = j;
    n = r + 1;
  }
  if (lane == 0) found[t] = n, count[t] = min(floor, n);
  __syncthreads();
  if (t == 0) {
    const int C = (cap - floor) * T;
    // The score of candidate i; -inf for a rank the token does not have.
    auto score = [&](int i) -> float {
      const int r = floor + i / T, u = i % T;
      if (r >= found[u]) return NEG_INF;
      const float v = pv[u][r];
      if (!relative) return v;
      const float top = pv[u][0];
      return top > 0.f ? v / top : 0.f;
    };
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int i = lane + 32 * h;
      if (i >= C) continue;
      const float si = score(i);
      int pos = 0;
      for (int j = 0; j < C; ++j) {
        const float sj = score(j);
        pos += sj > si || (sj == si && j < i);
      }
      if (si > NEG_INF && pos < extra) atomicAdd(&count[i % T], 1);
    }
  }
  __syncthreads();
  const int c = count[t];
  if (lane < cap) {
    float denom = 0.f;
    for (int s = 0; s < c; ++s) denom += pv[t][s];
    const float v = lane < c ? pv[t][lane] : 0.f;
    ids[(i64)t * cap + lane] = lane < c ? pe[t][lane] : -1;
    w[(i64)t * cap + lane] = (renorm ? v / (denom + 1e-20f) : v) * scale;
  }
}
#define MOE_ROUTE_SPLIT(NAME, EPL)                                                                            \
  extern "C" __global__ void NAME(const float* __restrict__ logits, int E, int T, int floor, int cap, int extra, \
                                  int relative, int renorm, float scale, i64* __restrict__ ids,              \
                                  float* __restrict__ w) {                                                   \
    moe_route_split_impl<EPL>(logits, E, T, floor, cap, extra, relative, renorm, scale, ids, w);              \
  }
MOE_ROUTE_SPLIT(moe_route_split_64, 2)
MOE_ROUTE_SPLIT(moe_route_split_128, 4)
MOE_ROUTE_SPLIT(moe_route_split_256, 8)

// The expert pair p names (ids (T, W), row stride ld; pairs p = t * W + s).
__device__ __forceinline__ i64 pair_expert(const i64* __restrict__ ids, int p, int W, int ld) {
  return ids[(i64)(p / W) * ld + p % W];
}

// The pairs (bit p of P = T * W <= 64) naming expert e, over a warp (all lanes call it).
__device__ __forceinline__ unsigned long long pairs_naming(const i64* __restrict__ ids, int P, int W, int ld, i64 e,
                                                           int lane) {
  const unsigned a = __ballot_sync(0xffffffffu, lane < P && pair_expert(ids, lane, W, ld) == e);
  const unsigned b = __ballot_sync(0xffffffffu, lane + 32 < P && pair_expert(ids, lane + 32, W, ld) == e);
  return (unsigned long long)a | ((unsigned long long)b << 32);
}

// The owners among P <= 64 pairs (bit p: pair p names an expert in 0..E, E <= MAX_EXPERTS, that no
// earlier pair names), for the whole block (all threads call it; blockDim.x >= P): the lowest pair
// naming each expert, by atomicMin in shared memory.
__device__ __forceinline__ unsigned long long block_pair_owners(const i64* __restrict__ ids, int P, int W, int ld,
                                                                int E) {
  __shared__ int first[MAX_EXPERTS];
  __shared__ unsigned halves[2];
  for (int j = threadIdx.x; j < E; j += blockDim.x) first[j] = 64;
  __syncthreads();
  const int p = threadIdx.x;
  const i64 e = p < P ? pair_expert(ids, p, W, ld) : -1;
  const bool valid = e >= 0 && e < E;
  if (valid) atomicMin(&first[e], p);
  __syncthreads();
  const unsigned m = __ballot_sync(0xffffffffu, valid && first[e] == p);
  if (threadIdx.x == 0 || threadIdx.x == 32) halves[threadIdx.x >> 5] = m;
  __syncthreads();
  return (unsigned long long)halves[0] | (P > 32 ? (unsigned long long)halves[1] << 32 : 0ull);
}

// One warp's SwiGLU row r for every item j in `items` (bit j): out[j * ostride] = bf16(silu(g . x_j) * (u . x_j))
// with x_j = x + (j / div) * H (div = W: pair j's token; div = 1: token j). Up to ITEM_GROUP items share a
// pass over the row, with as many loads in flight as swiglu_row's; more items (at most a few tokens name
// the same expert) take further passes, which find the row in cache.
#define ITEM_GROUP 4
__device__ __forceinline__ void swiglu_items(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                             const bf16* __restrict__ x, int H, unsigned long long items, int div,
                                             bf16* __restrict__ out, int ostride, int lane) {
  while (items) {
    const bf16* xs[ITEM_GROUP];
    int js[ITEM_GROUP];
    int n = 0;
#pragma unroll
    for (int q = 0; q < ITEM_GROUP; ++q) {
      js[q] = 0;
      if (items) js[q] = __ffsll((long long)items) - 1, items &= items - 1, n = q + 1;
      xs[q] = x + (i64)(js[q] / div) * H;
    }
    float sg[ITEM_GROUP], su[ITEM_GROUP];
#pragma unroll
    for (int q = 0; q < ITEM_GROUP; ++q) sg[q] = 0.f, su[q] = 0.f;
#pragma unroll 4
    for (int c = lane * 8; c < H; c += 256) {
      const uint4 gv = *reinterpret_cast<const uint4*>(g + c);
      const uint4 uv = *reinterpret_cast<const uint4*>(u + c);
#pragma unroll
      for (int q = 0; q < ITEM_GROUP; ++q) {
        if (q < n) {
          const uint4 xv = *reinterpret_cast<const uint4*>(xs[q] + c);
          sg[q] += dot8(gv, xv);
          su[q] += dot8(uv, xv);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < ITEM_GROUP; ++q) {
      if (q >= n) break;
      const float a = warp_sum(sg[q]), b = warp_sum(su[q]);
      if (lane == 0) out[(i64)js[q] * ostride] = to_bf16(a / (1.f + __expf(-a)) * b);
    }
  }
}

// grid (T * W * BR + BS), block (32 * warps), BR = ceil(I / warps), BS = ceil(Is / warps): one output row
// per warp. Blocks [0, T * W * BR) belong to pairs (p = block / BR); only the owner of the pair's expert
// works: its rows r of w_gu (E, 2I, H) bf16 for every pair naming the expert, into act (T * W, I) bf16 (0
// for a pair without an expert). The rest compute the shared expert's rows s_g, s_u (Is, H) for every
// token into act_s (T, Is) and, with s_gate (H) given, g[t] = sigmoid(x[t] . s_gate) (first shared
// block). x (T, H) bf16; ids (T, W) i64, row stride ld.
extern "C" __global__ void moe_gate_up_tokens(const bf16* __restrict__ x, const i64* __restrict__ ids,
                                              const bf16* __restrict__ w_gu, bf16* __restrict__ act,
                                              const bf16* __restrict__ s_g, const bf16* __restrict__ s_u,
                                              bf16* __restrict__ act_s, const bf16* __restrict__ s_gate,
                                              float* __restrict__ g, int H, int I, int W, int E, int ld, int Is,
                                              int T) {
  const int warps = blockDim.x >> 5;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int BR = (I + warps - 1) / warps;
  const int routed = T * W * BR;
  if ((int)blockIdx.x >= routed) {  // the shared expert's rows, for every token
    const int b = blockIdx.x - routed;
    const int r = b * warps + warp;
    if (r < Is) warp_prefetch(s_g + (i64)r * H, (i64)H * 2, lane), warp_prefetch(s_u + (i64)r * H, (i64)H * 2, lane);
    pdl_wait();
    pdl_release();
    if (s_gate != 0 && b == 0)
      for (int t = warp; t < T; t += warps) {
        float d = 0.f;
        for (int c = lane * 8; c < H; c += 256)
          d += dot8(*reinterpret_cast<const uint4*>(s_gate + c), *reinterpret_cast<const uint4*>(x + (i64)t * H + c));
        d = warp_sum(d);
        if (lane == 0) g[t] = 1.f / (1.f + expf(-d));
      }
    if (r >= Is) return;
    const unsigned long long tokens = (1ull << T) - 1;
    swiglu_items(s_g + (i64)r * H, s_u + (i64)r * H, x, H, tokens, 1, act_s + r, Is, lane);
    return;
  }
  pdl_wait();  // the ids and the input come from earlier kernels
  pdl_release();
  const int pair = blockIdx.x / BR, P = T * W;
  const int r = (blockIdx.x % BR) * warps + warp;
  const i64 e = pair_expert(ids, pair, W, ld);
  if (e < 0 || e >= E) {
    if (r < I && lane == 0) act[(i64)pair * I + r] = 0;
    return;
  }
  const unsigned long long items = pairs_naming(ids, P, W, ld, e, lane);
  if ((items & (~items + 1)) != (1ull << pair) || r >= I) return;  // an earlier pair owns the expert
  const bf16* gr = w_gu + (e * 2 * I + r) * (i64)H;
  swiglu_items(gr, gr + (i64)I * H, x, H, items, W, act + r, I, lane);
}

// grid (H / COLS), block (32 * warps), warps <= 8: COLS outputs c of every token per block. The units
// are the owned experts (in pair order), then the shared expert once per token; warp w takes units w, w
// + warps, ...
// For an expert it reads its COLS down rows once and adds, for every pair naming it, the pair's weight
// (slot_weight) times the rows applied to the pair's activations to that pair's token; for the shared
// expert g[t] (1 when g is null) times s_d (H, Is) applied to act_s[t]. The warps' sums meet in shared
// memory in warp order; with res (T, H) given, out = res + the sum. Arguments as moe_down's, plus T.
template <int COLS>
__device__ __forceinline__ void moe_down_tokens_impl(const bf16* __restrict__ act, const i64* __restrict__ ids,
                                                     const float* __restrict__ mix, const bf16* __restrict__ w_d,
                                                     bf16* __restrict__ out, const bf16* __restrict__ act_s,
                                                     const bf16* __restrict__ s_d, const float* __restrict__ g,
                                                     const bf16* __restrict__ res, int H, int I, int W, int E, int ld,
                                                     int Is, int T, int gather, int renorm, float scale) {
  __shared__ float red[8][TOK_MAX][COLS];  // each warp's sums, its lane 0 adding a pair at a time
  const int c0 = blockIdx.x * COLS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane < TOK_MAX * COLS) (&red[warp][0][0])[lane] = 0.f;
  if (Is > 0 && warp == 0) warp_prefetch(s_d + (i64)c0 * Is, (i64)COLS * Is * 2, lane);
  pdl_wait();  // ids, weights and activations come from moe_gate_up_tokens
  pdl_release();
  const int P = T * W;
  const unsigned long long owners = block_pair_owners(ids, P, W, ld, E);
  const int experts = __popcll(owners);
  // The shared expert is a unit per token: one warp for all T would be the block's slowest by far.
  const int units = experts + (Is > 0 ? T : 0);
  for (int u = warp; u < units; u += warps) {
    unsigned long long items;  // pairs of a routed expert, or the token of a shared unit
    const bf16* wbase;
    int div, n;
    const bool shared = u >= experts;  // (not div == 1: with W = 1 a pair is its token)
    if (!shared) {
      unsigned long long m = owners;
      for (int i = 0; i < u; ++i) m &= m - 1;
      const int p = __ffsll((long long)m) - 1;
      const i64 e = pair_expert(ids, p, W, ld);
      items = pairs_naming(ids, P, W, ld, e, lane);
      wbase = w_d + (e * H + c0) * (i64)I, div = W, n = I;
    } else {
      items = 1ull << (u - experts);
      wbase = s_d + (i64)c0 * Is, div = 1, n = Is;
    }
    while (items) {
      const int j = __ffsll((long long)items) - 1;
      items &= items - 1;
      const int t = j / div;
      const float f = shared ? (g != 0 ? g[t] : 1.f) : slot_weight(mix, ids, t, j % W, W, E, ld, gather, renorm, scale);
      const bf16* a = shared ? act_s + (i64)t * Is : act + (i64)j * I;
      float d[COLS];
      if constexpr (COLS == 1) {
        d[0] = row_dot(wbase, a, n, lane);
      } else {
#pragma unroll
        for (int q = 0; q < COLS; q += 2) row_dot2(wbase + (i64)q * n, wbase + (i64)(q + 1) * n, a, n, lane, &d[q], &d[q + 1]);
      }
#pragma unroll
      for (int q = 0; q < COLS; ++q) {
        const float v = warp_sum(d[q]);
        if (lane == 0) red[warp][t][q] += f * v;
      }
    }
  }
  __syncthreads();
  if ((int)threadIdx.x < T * COLS) {
    const int t = threadIdx.x / COLS, q = threadIdx.x % COLS;
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum += red[w][t][q];
    const float rv = res != 0 ? bf(res[(i64)t * H + c0 + q]) : 0.f;
    out[(i64)t * H + c0 + q] = to_bf16(sum + rv);
  }
}

#define MOE_DOWN_TOKENS(NAME, COLS)                                                                           \
  extern "C" __global__ void NAME(const bf16* __restrict__ act, const i64* __restrict__ ids,                  \
                                  const float* __restrict__ mix, const bf16* __restrict__ w_d,                \
                                  bf16* __restrict__ out, const bf16* __restrict__ act_s,                     \
                                  const bf16* __restrict__ s_d, const float* __restrict__ g,                  \
                                  const bf16* __restrict__ res, int H, int I, int W, int E, int ld, int Is,    \
                                  int T, int gather, int renorm, float scale) {                               \
    moe_down_tokens_impl<COLS>(act, ids, mix, w_d, out, act_s, s_d, g, res, H, I, W, E, ld, Is, T, gather,   \
                               renorm, scale);                                                                \
  }
MOE_DOWN_TOKENS(moe_down_tokens_1, 1)
MOE_DOWN_TOKENS(moe_down_tokens_2, 2)
MOE_DOWN_TOKENS(moe_down_tokens_4, 4)
