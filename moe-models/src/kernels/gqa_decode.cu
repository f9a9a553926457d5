// Grouped-query attention for one new token per sequence (a decode step), compiled at run time by NVRTC:
// the step's rotary embedding, its cache write and flash-decoding over the cache in two kernels, where
// the libtorch path takes about ten (two rotaries, two cache index_copy, the repeat of the key/value heads
// to every query head as a copy of the cache, q k^T, bias and scale, softmax, cast, p v, transposes).
//   gqa_part  grid (KVH, SP, B), block 128: key/value head g of sequence b over the slots of split sp, for
//             its REP = NH / KVH query heads at once (each cache row read once for all of them). q and the
//             new key roped (rounded to bf16 once, as the rotary kernel); the split holding the step's
//             slot takes the new key and value from its inputs and writes them into the cache. Per head:
//             m = max_j s_j, l = sum_j exp(s_j - m), o = sum_j exp(s_j - m) v_j, s_j = scale q.k_j + bias_j.
//   gqa_out   grid (NH, B), block 128: merges the splits (weights exp(m - M) / L) into out (B, NH * D) bf16.
// Slots whose bias is -inf (unwritten capacity, padding, the window) are neither scored nor read.
// With qk_scope != 0, gqa_part first applies the family's QK-norm to q and the new key (an RMSNorm with
// transformers' rounding: bf16 after the normalisation, bf16 after the weight): qk_scope 1 normalises
// each head over its D values with weights qn_w, kn_w (D) (Qwen3-MoE), qk_scope 2 the whole projection,
// q over NH * D and k over KVH * D with weights of those widths (OLMoE; every block sums the squares of
// the whole q and k itself). It replaces the libtorch norms' kernels between the projections and gqa_part.
//
// Shapes: q (B, NH, D), k_new and v_new (B, KVH, D) bf16 contiguous; cos, sin (B, D / 2) f32; kc, vc (B, S,
// KVH, D) bf16 contiguous (the cache); slots (1) i64; bias (B, S) f32. Scratch: part_o (B, NH, SP, D),
// part_ml (B, NH, SP, 2) f32. Requirements (checked by the caller): D == GQA_D, REP <= GQA_MAX_REP, SP <= 32,
// dynamic shared memory (REP + 1) * per floats (per = ceil(S / SP)).

#define GQA_D 128

#define GQA_MAX_REP 8

// Eight per-lane values summed over the warp in 9 shuffles instead of 8 x 5: each halving step sends the
// half of the values the partner keeps. Returns the sum of value *r, where r depends on the lane (bits 4,
// 3, 2 of lane); lanes 4 i .. 4 i + 3 hold the same.
__device__ __forceinline__ float warp_sum8(float (&a)[8], int lane, int* r) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // xor 16: keep values 0..3 (bit 4 clear) or 4..7
    const bool up = lane & 16;
    const float send = up ? a[i] : a[i + 4], keep = up ? a[i + 4] : a[i];
    a[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // xor 8
    const bool up = lane & 8;
    const float send = up ? a[i] : a[i + 2], keep = up ? a[i + 2] : a[i];
    a[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  {  // xor 4
    const bool up = lane & 4;
    const float send = up ? a[0] : a[1], keep = up ? a[1] : a[0];
    a[0] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
  a[0] += __shfl_xor_sync(0xffffffffu, a[0], 2);
  a[0] += __shfl_xor_sync(0xffffffffu, a[0], 1);
  *r = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  return a[0];
}
#define GQA_THREADS 128

extern "C" __global__ void __launch_bounds__(GQA_THREADS)
gqa_part(const bf16* __restrict__ q, const bf16* __restrict__ k_new, const bf16* __restrict__ v_new,
         const float* __restrict__ cos_t, const float* __restrict__ sin_t, int interleaved, bf16* __restrict__ kc,
         bf16* __restrict__ vc, const i64* __restrict__ slots, const float* __restrict__ bias,
         float* __restrict__ part_o, float* __restrict__ part_ml, int NH, int KVH, int S, int SP, float scale,
         const bf16* __restrict__ qn_w, const bf16* __restrict__ kn_w, float qk_eps, int qk_scope) {
  extern __shared__ float sc[];                         // REP x per scores, then the split's per biases
  __shared__ __align__(16) float qs[GQA_MAX_REP][GQA_D];  // the roped queries of the group
  __shared__ __align__(16) bf16 kn[GQA_D], vn[GQA_D];   // the step's roped key and value
  __shared__ float mls[GQA_MAX_REP][2];
  __shared__ float qk_red[GQA_MAX_REP + 1][GQA_THREADS / 32];  // QK-norm: the warps' sums of squares
  const int g = blockIdx.x, sp = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int REP = NH / KVH, per = (S + SP - 1) / SP;
  const int j0 = sp * per, j1 = min(S, j0 + per);
  const float* bs = bias + (i64)b * S;
  // Before the wait: what the projections (the kernel before) do not write. The step plan wrote the slot,
  // the bias and cos/sin before them, and earlier steps the cache rows: the split's biases are copied
  // into shared memory and its rows asked for into L2, so that after the wait no load waits on another
  // and the rows come from L2, not HBM (the weights read since the last step have evicted them).
  const i64 slot = slots[0];
  const bool mine = slot >= j0 && slot < j1;  // this split writes the step's key and value
  const int half = GQA_D / 2;
  const float cs = tid < half ? cos_t[(i64)b * half + tid] : 0.f, sn = tid < half ? sin_t[(i64)b * half + tid] : 0.f;
  float* bsm = sc + REP * per;
  for (int j = j0 + tid; j < j1; j += GQA_THREADS) {
    const float bv = bs[j];
    bsm[j - j0] = bv;
    if (bv != NEG_INF && j != slot) {  // a row is 256 bytes: two lines each of the key and the value
      const i64 o = (((i64)b * S + j) * KVH + g) * GQA_D;
      prefetch_l2(kc + o), prefetch_l2(kc + o + 64), prefetch_l2(vc + o), prefetch_l2(vc + o + 64);
    }
  }
  __syncthreads();
  pdl_wait();  // q, k_new and v_new come from the projections
  pdl_release();
  // 1. The group's queries and (its split only) the new key, roped; the new value.
  {
    const int i0 = interleaved ? 2 * tid : tid, i1 = interleaved ? 2 * tid + 1 : tid + half;  // pair tid
    float x0[GQA_MAX_REP], x1[GQA_MAX_REP];
#pragma unroll
    for (int r = 0; r < GQA_MAX_REP; ++r) {
      const bf16* qr = q + ((i64)b * NH + g * REP + r) * GQA_D;
      x0[r] = r < REP && tid < half ? bf(qr[i0]) : 0.f;
      x1[r] = r < REP && tid < half ? bf(qr[i1]) : 0.f;
    }
    float k0 = 0.f, k1 = 0.f;
    const bf16* kr = k_new + ((i64)b * KVH + g) * GQA_D;
    if (mine && tid < half) k0 = bf(kr[i0]), k1 = bf(kr[i1]);
    const bf16 vv = mine ? v_new[((i64)b * KVH + g) * GQA_D + tid] : (bf16)0;
    if (qk_scope != 0) {  // each head's (or the whole projection's) sum of squares, then the norm
      float pq[GQA_MAX_REP + 1];
#pragma unroll
      for (int r = 0; r < GQA_MAX_REP; ++r) pq[r] = x0[r] * x0[r] + x1[r] * x1[r];
      pq[GQA_MAX_REP] = k0 * k0 + k1 * k1;
      if (qk_scope == 2) {
        const bf16* qb = q + (i64)b * NH * GQA_D;
        const bf16* kb = k_new + (i64)b * KVH * GQA_D;
        pq[0] = pq[GQA_MAX_REP] = 0.f;
        for (int i = tid * 8; i < NH * GQA_D; i += GQA_THREADS * 8) {
          const uint4 v = *reinterpret_cast<const uint4*>(qb + i);
          pq[0] += dot8(v, v);
        }
        for (int i = tid * 8; i < KVH * GQA_D; i += GQA_THREADS * 8) {
          const uint4 v = *reinterpret_cast<const uint4*>(kb + i);
          pq[GQA_MAX_REP] += dot8(v, v);
        }
      }
#pragma unroll
      for (int r = 0; r <= GQA_MAX_REP; ++r) {
        const float t = warp_sum(pq[r]);
        if (lane == 0) qk_red[r][warp] = t;
      }
      __syncthreads();
      const float wq = qk_scope == 1 ? GQA_D : NH * GQA_D, wk = qk_scope == 1 ? GQA_D : KVH * GQA_D;
      auto inv = [&](int r, float width) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < GQA_THREADS / 32; ++w) t += qk_red[r][w];
        return rsqrtf(t / width + qk_eps);
      };
      auto norm = [](float x, float iv, bf16 w) { return bf(to_bf16(bf(w) * bf(to_bf16(x * iv)))); };
      if (tid < half) {
#pragma unroll
        for (int r = 0; r < GQA_MAX_REP; ++r)
          if (r < REP) {
            const float iv = inv(qk_scope == 1 ? r : 0, wq);
            const bf16* w = qn_w + (qk_scope == 1 ? 0 : (g * REP + r) * GQA_D);
            x0[r] = norm(x0[r], iv, w[i0]), x1[r] = norm(x1[r], iv, w[i1]);
          }
        if (mine) {
          const float iv = inv(GQA_MAX_REP, wk);
          const bf16* w = kn_w + (qk_scope == 1 ? 0 : g * GQA_D);
          k0 = norm(k0, iv, w[i0]), k1 = norm(k1, iv, w[i1]);
        }
      }
    }
    if (tid < half) {
#pragma unroll
      for (int r = 0; r < GQA_MAX_REP; ++r)
        if (r < REP) {
          qs[r][i0] = bf(to_bf16(x0[r] * cs - x1[r] * sn));
          qs[r][i1] = bf(to_bf16(x0[r] * sn + x1[r] * cs));
        }
      if (mine) kn[i0] = to_bf16(k0 * cs - k1 * sn), kn[i1] = to_bf16(k0 * sn + k1 * cs);
    }
    if (mine) vn[tid] = vv;
  }
  __syncthreads();
  if (mine) {  // the cache keeps the step's key and value (other splits never read this slot)
    const i64 o = (((i64)b * S + slot) * KVH + g) * GQA_D + tid;
    kc[o] = kn[tid];
    vc[o] = vn[tid];
  }
  // 2. Scores: a warp per slot, lane l holding elements 4 l .. 4 l + 3 of the key, every query head of
  //    the group at once; two slots a warp in flight.
  for (int jb = j0 + warp * 2; jb < j1; jb += 2 * (GQA_THREADS / 32)) {
    uint2 kv[2];
    float bj[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int j = jb + u;
      bj[u] = j < j1 ? bsm[j - j0] : NEG_INF;
      kv[u] = make_uint2(0, 0);
      if (bj[u] != NEG_INF)
        kv[u] = j == slot ? *reinterpret_cast<const uint2*>(kn + lane * 4)
                          : *reinterpret_cast<const uint2*>(kc + (((i64)b * S + j) * KVH + g) * GQA_D + lane * 4);
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const float a0 = lo(kv[u].x), a1 = hi(kv[u].x), a2 = lo(kv[u].y), a3 = hi(kv[u].y);
      const int j = jb + u;
      if (REP == 1) {
        const float4 qq = *reinterpret_cast<const float4*>(&qs[0][lane * 4]);
        const float d = warp_sum(a0 * qq.x + a1 * qq.y + a2 * qq.z + a3 * qq.w);
        if (lane == 0 && j < j1) sc[j - j0] = bj[u] == NEG_INF ? NEG_INF : d * scale + bj[u];
      } else {
        float p[GQA_MAX_REP];
#pragma unroll
        for (int r = 0; r < GQA_MAX_REP; ++r) {
          const float4 qq = *reinterpret_cast<const float4*>(&qs[r][lane * 4]);
          p[r] = r < REP ? a0 * qq.x + a1 * qq.y + a2 * qq.z + a3 * qq.w : 0.f;
        }
        int r;
        const float d = warp_sum8(p, lane, &r);
        if ((lane & 3) == 0 && r < REP && j < j1) sc[r * per + (j - j0)] = bj[u] == NEG_INF ? NEG_INF : d * scale + bj[u];
      }
    }
  }
  __syncthreads();
  // 3. Each head's max and exp-sum (a warp a head), its scores turned into weights exp(s - max) in place.
  for (int r = warp; r < REP; r += GQA_THREADS / 32) {
    float* w = sc + r * per;
    float l;
    const float m = warp_softmax_stats(w, j1 - j0, lane, &l);
    for (int j = lane; j < j1 - j0; j += 32) w[j] = (w[j] == NEG_INF || m == NEG_INF) ? 0.f : expf(w[j] - m);
    if (lane == 0) mls[r][0] = m, mls[r][1] = l;
  }
  __syncthreads();
  // 4. Column tid of every head's weighted value sum; sixteen value rows in flight at a time.
  float o[GQA_MAX_REP];
#pragma unroll
  for (int r = 0; r < GQA_MAX_REP; ++r) o[r] = 0.f;
  for (int jb = j0; jb < j1; jb += 16) {
    float v[16];
#pragma unroll
    for (int u = 0; u < 16; ++u) {
      const int j = jb + u;
      v[u] = 0.f;
      if (j < j1 && bsm[j - j0] != NEG_INF) v[u] = j == slot ? bf(vn[tid]) : bf(vc[(((i64)b * S + j) * KVH + g) * GQA_D + tid]);
    }
#pragma unroll
    for (int r = 0; r < GQA_MAX_REP; ++r) {
      if (r >= REP) break;
#pragma unroll
      for (int u = 0; u < 16; ++u)
        if (jb + u < j1) o[r] += sc[r * per + (jb + u - j0)] * v[u];
    }
  }
#pragma unroll
  for (int r = 0; r < GQA_MAX_REP; ++r) {
    if (r >= REP) break;
    const int h = g * REP + r;
    part_o[(((i64)b * NH + h) * SP + sp) * GQA_D + tid] = o[r];
    if (tid == 0) {
      part_ml[(((i64)b * NH + h) * SP + sp) * 2] = mls[r][0];
      part_ml[(((i64)b * NH + h) * SP + sp) * 2 + 1] = mls[r][1];
    }
  }
}

extern "C" __global__ void __launch_bounds__(GQA_THREADS)
gqa_out(const float* __restrict__ part_o, const float* __restrict__ part_ml, bf16* __restrict__ out, int NH, int SP) {
  __shared__ float wt[32];
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  pdl_wait();  // the partials come from gqa_part
  pdl_release();
  const float* ml = part_ml + ((i64)b * NH + h) * SP * 2;
  if (tid < 32) {
    const float m = tid < SP ? ml[2 * tid] : NEG_INF;
    const float l = tid < SP ? ml[2 * tid + 1] : 0.f;
    float M = m;
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float e = m == NEG_INF ? 0.f : expf(m - M);
    const float L = warp_sum(e * l);
    wt[tid] = L > 0.f ? e / L : 0.f;
  }
  __syncthreads();
  const float* po = part_o + ((i64)b * NH + h) * SP * GQA_D + tid;
  float v[32];
#pragma unroll
  for (int s = 0; s < 32; ++s) v[s] = s < SP ? po[(i64)s * GQA_D] : 0.f;
  float o = 0.f;
#pragma unroll
  for (int s = 0; s < 32; ++s) o += wt[s] * v[s];
  out[((i64)b * NH + h) * GQA_D + tid] = to_bf16(o);
}
