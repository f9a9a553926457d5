// alloc-token's CUDA kernels, compiled at run time by NVRTC (kernels.rs has the safe wrappers):
//   row_topk       each row's `width` most probable experts in stable descending order (one warp a row);
//   alloc_t_batch  Alloc-T's batch-wide selection for small batches in one block (below);
//   alloc_t_scores / alloc_t_count / alloc_t_emit  the same for large batches around one libtorch sort.
//
// alloc_t_batch: Alloc-T with a batch-wide budget in one kernel on the GPU (one block), after the per-token sort: the
// rule of the host reference (alloc_t.rs) and of the libtorch device path, without the global sort of
// the candidates that the libtorch path needs.
//
// Every valid token keeps its first `floor` sorted experts; the candidates are the columns floor..cap of
// the valid tokens, scored by probability (or probability / the token's top-1, 0 when that is 0), and the
// R = floor(K * v + 0.5) - floor * v best of them are kept (v = valid tokens; the pair count in f64 as
// the libtorch path computes it), where "best" orders by (score desc, rank asc, token asc), i.e. by
// score and then by the flat index rank * T + token. Here the R-th best score tau is found by a radix
// select over the scores' order-preserving 32-bit keys (4 passes of 8 bits); candidates above tau are
// kept, and of those equal to tau the ones with the smallest flat indices, found by a block-wide scan.
// Each token's kept count becomes its prefix of sorted experts (ids, -1 elsewhere), as prefix_ids does.
//
// vals (T, E) f32 and idx (T, E) i64: the stable descending sort of each row (row strides ldv, ldi);
// valid (T) u8 or null (all valid); ids (T, cap) i64 out. One block of 1024 threads; the caller checks
// T * (cap - floor) <= 32 * MAX_WORDS and floor <= cap <= E.

typedef long long i64;

#define THREADS 1024
#define MAX_WORDS 512  // selection bitmap: up to 16384 candidates (MAX_CANDIDATES in alloc_t_kernel.rs)

__device__ __forceinline__ unsigned order_key(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) == 0u) u = 0u;  // -0 ties with +0, as in a sort
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // increasing with f
}

// Block-wide exclusive prefix sum of one unsigned per thread; *total gets the sum. sh: THREADS + 1 words.
__device__ unsigned block_exclusive_scan(unsigned v, unsigned* sh, unsigned* total) {
  const int tid = threadIdx.x;
  sh[tid] = v;
  __syncthreads();
  for (int off = 1; off < THREADS; off <<= 1) {  // Hillis-Steele inclusive scan
    const unsigned add = tid >= off ? sh[tid - off] : 0u;
    __syncthreads();
    sh[tid] += add;
    __syncthreads();
  }
  const unsigned incl = sh[tid];
  *total = sh[THREADS - 1];
  __syncthreads();
  return incl - v;
}

extern "C" __global__ void __launch_bounds__(THREADS)
alloc_t_batch(const float* __restrict__ vals, i64 ldv, const i64* __restrict__ idx, i64 ldi,
              const unsigned char* __restrict__ valid, int T, int floor_k, int cap, double k_avg, int relative,
              i64* __restrict__ ids) {
  __shared__ unsigned hist[256];
  __shared__ unsigned scan[THREADS + 1];
  __shared__ unsigned kept[MAX_WORDS];
  __shared__ long long shared_r;
  __shared__ unsigned prefix, remaining;
  const int tid = threadIdx.x;
  const int c = cap - floor_k;
  const i64 n = (i64)T * c;  // candidates, flat index q = rank * T + token

  // v and R.
  unsigned mine = 0;
  for (int t = tid; t < T; t += THREADS) mine += (valid == 0 || valid[t]) ? 1u : 0u;
  unsigned v;
  (void)block_exclusive_scan(mine, scan, &v);
  if (tid == 0) {
    const double pairs = floor(__dadd_rn(__dmul_rn((double)v, k_avg), 0.5));
    shared_r = (long long)pairs - (long long)v * floor_k;
  }
  for (int w = tid; w < MAX_WORDS; w += THREADS) kept[w] = 0u;
  __syncthreads();
  const long long R = shared_r;

  // The score key of candidate q (0 = below everything: invalid tokens never win, R <= valid candidates).
  auto key_of = [&](i64 q) -> unsigned {
    const int t = (int)(q % T), j = floor_k + (int)(q / T);
    if (valid != 0 && !valid[t]) return 0u;
    float s = vals[t * ldv + j];
    if (relative) {
      const float top = vals[t * ldv];
      s = top > 0.f ? __fdiv_rn(s, top) : 0.f;  // IEEE division, as libtorch (not fast-math)
    }
    return order_key(s);
  };

  if (R > 0 && c > 0) {
    // Radix select: the R-th largest key.
    if (tid == 0) {
      prefix = 0u;
      remaining = (unsigned)R;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += THREADS) hist[b] = 0u;
      __syncthreads();
      const unsigned hi_mask = shift == 24 ? 0u : (0xffffffffu << (shift + 8));
      const unsigned pre = prefix;
      for (i64 q = tid; q < n; q += THREADS) {
        const unsigned k = key_of(q);
        if ((k & hi_mask) == (pre & hi_mask)) atomicAdd(&hist[(k >> shift) & 0xffu], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        unsigned need = remaining;
        int b = 255;
        for (; b > 0; --b) {
          if (hist[b] >= need) break;
          need -= hist[b];
        }
        prefix = pre | ((unsigned)b << shift);
        remaining = need;  // rank of tau among the keys equal to it (1-based): ties to keep
      }
      __syncthreads();
    }
    const unsigned tau = prefix, ties = remaining;
    // Keep keys above tau; of keys equal to tau, the `ties` smallest flat indices. Each thread takes a
    // contiguous range of q, counts its ties, and a block scan gives each range its offset.
    const i64 per = (n + THREADS - 1) / THREADS;
    const i64 q0 = (i64)tid * per, q1 = min(q0 + per, n);
    unsigned my_ties = 0;
    for (i64 q = q0; q < q1; ++q) my_ties += key_of(q) == tau ? 1u : 0u;
    unsigned total;
    unsigned before = block_exclusive_scan(my_ties, scan, &total);
    for (i64 q = q0; q < q1; ++q) {
      const unsigned k = key_of(q);
      bool keep = k > tau;
      if (k == tau) {
        keep = before < ties;
        ++before;
      }
      if (keep) atomicOr(&kept[q >> 5], 1u << (q & 31));
    }
  }
  __syncthreads();

  // Each token's count, then its prefix of sorted experts.
  for (int t = tid; t < T; t += THREADS) {
    const bool ok = valid == 0 || valid[t];
    int count = 0;
    if (ok) {
      count = floor_k;
      for (int r = 0; r < c; ++r) {
        const i64 q = (i64)r * T + t;
        count += (kept[q >> 5] >> (q & 31)) & 1u;
      }
    }
    for (int j = 0; j < cap; ++j) ids[(i64)t * cap + j] = j < count ? idx[t * ldi + j] : -1;
  }
}

#define ROW_WARPS 8
#define MAX_E 1024

// grid ceil(T / ROW_WARPS), block 32 * ROW_WARPS: warp w of block b takes row t = b * ROW_WARPS + w of
// probs (T, E) f32 (row stride ldp) and writes its W largest values and their column indices in
// descending order, ties to the lower index (a stable descending sort's first W columns; NaN ranks
// above +inf, -0 ties with +0) to vals (T, W) f32 and idx (T, W) i64. E <= MAX_E, W <= E.
extern "C" __global__ void __launch_bounds__(32 * ROW_WARPS)
row_topk(const float* __restrict__ probs, i64 ldp, int T, int E, int W, float* __restrict__ vals,
         i64* __restrict__ idx) {
  __shared__ unsigned keys[ROW_WARPS][MAX_E];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * ROW_WARPS + warp;
  if (t >= T) return;  // whole warps only: no block-wide barrier below
  const float* row = probs + t * ldp;
  unsigned* k = keys[warp];
  for (int j = lane; j < E; j += 32) k[j] = order_key(row[j]);
  __syncwarp();
  for (int j = lane; j < E; j += 32) {
    const unsigned kj = k[j];
    int rank = 0;
    for (int i = 0; i < E; ++i) {
      const unsigned ki = k[i];
      rank += (ki > kj) || (ki == kj && i < j);
    }
    if (rank < W) {
      vals[(i64)t * W + rank] = row[j];
      idx[(i64)t * W + rank] = j;
    }
  }
}

// Large-batch Alloc-T, step 1. grid ceil(n / 256), block 256, n = T * c candidates (c = cap - floor):
// flat[q] for q = r * T + t is the score of token t's candidate r (column floor + r of its sorted values
// vals, row stride ldv), -inf for padding tokens. A stable descending sort of flat (libtorch) then
// orders candidates by (score desc, rank asc, token asc), exactly as the libtorch path does.
extern "C" __global__ void alloc_t_scores(const float* __restrict__ vals, i64 ldv,
                                          const unsigned char* __restrict__ valid, int T, int floor_k, int c,
                                          int relative, float* __restrict__ flat) {
  const i64 q = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= (i64)T * c) return;
  const int t = (int)(q % T), j = floor_k + (int)(q / T);
  if (valid != 0 && !valid[t]) {
    flat[q] = __int_as_float(0xff800000);  // -inf
    return;
  }
  float s = vals[t * ldv + j];
  if (relative) {
    const float top = vals[t * ldv];
    s = top > 0.f ? __fdiv_rn(s, top) : 0.f;  // IEEE division, as libtorch
  }
  flat[q] = s;
}

// Large-batch Alloc-T, step 2. grid ceil(n / 1024), block 1024: every block counts the valid tokens v
// itself, takes R = floor(v * k_avg + 0.5) - floor * v (f64, as the libtorch path), and for the sorted
// positions p < R in its range adds one to counts[token of order[p]] (int atomics: exact). counts (T) i32
// zeroed by the caller.
extern "C" __global__ void __launch_bounds__(THREADS)
alloc_t_count(const i64* __restrict__ order, const unsigned char* __restrict__ valid, int T, int c,
              int floor_k, double k_avg, int* __restrict__ counts) {
  __shared__ unsigned scan[THREADS + 1];
  unsigned mine = 0;
  for (int t = threadIdx.x; t < T; t += THREADS) mine += (valid == 0 || valid[t]) ? 1u : 0u;
  unsigned v;
  (void)block_exclusive_scan(mine, scan, &v);
  const double pairs = floor(__dadd_rn(__dmul_rn((double)v, k_avg), 0.5));
  const long long R = (long long)pairs - (long long)v * floor_k;
  const i64 p = (i64)blockIdx.x * THREADS + threadIdx.x;
  if (p >= R || p >= (i64)T * c) return;
  const int t = (int)(order[p] % T);
  if (valid == 0 || valid[t]) atomicAdd(&counts[t], 1);
}

// Large-batch Alloc-T, step 3. grid ceil(T * cap / 256), block 256: ids[t, j] = idx[t, j] (row stride
// ldi) for j < floor + counts[t] of valid tokens, -1 elsewhere (prefix_ids).
extern "C" __global__ void alloc_t_emit(const i64* __restrict__ idx, i64 ldi, const int* __restrict__ counts,
                                        const unsigned char* __restrict__ valid, int T, int cap, int floor_k,
                                        i64* __restrict__ ids) {
  const i64 q = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= (i64)T * cap) return;
  const int t = (int)(q / cap), j = (int)(q % cap);
  const bool ok = valid == 0 || valid[t];
  ids[q] = (ok && j < floor_k + counts[t]) ? idx[t * ldi + j] : -1;
}
