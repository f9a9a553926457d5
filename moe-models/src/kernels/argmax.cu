// The greedy next token of a decode step in two small kernels, compiled at run time by NVRTC: libtorch's
// argmax over a 102400-word bf16 row is a single-block reduction that took 29 us on an H200 (a decode
// step is ~3 ms), and one 1024-thread block still took 16 us (one SM's share of the bandwidth). Here
// ARGMAX_PARTS blocks per row each reduce a slice to (value, index), and one warp per row merges them.
//
// Order: NaN counts as the largest (torch.argmax's rule); ties go to the lower index.

#define ARGMAX_PARTS 64
#define ARGMAX_THREADS 256

// Whether (v, i) comes before (best, bi) in argmax order.
__device__ __forceinline__ bool argmax_before(float v, int i, float best, int bi) {
  const bool vn = v != v, bn = best != best;
  if (vn != bn) return vn;
  if (!vn && v != best) return v > best;
  return i < bi;
}

__device__ __forceinline__ void argmax_warp(float& best, int& bi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int i = __shfl_xor_sync(0xffffffffu, bi, o);
    if (argmax_before(v, i, best, bi)) best = v, bi = i;
  }
}

// grid (ARGMAX_PARTS, rows), block ARGMAX_THREADS: part p of row r covers 16-byte chunks p, p + PARTS, ...
// of the row (V bf16, V % 8 == 0) and writes its (value, index) to pv, pi (rows, PARTS); an empty part
// writes (-inf, INT_MAX), which never wins.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_part(const bf16* __restrict__ logits, float* __restrict__ pv, int* __restrict__ pi, int V) {
  __shared__ float sv[ARGMAX_THREADS / 32];
  __shared__ int si[ARGMAX_THREADS / 32];
  const bf16* lr = logits + (i64)blockIdx.y * V;
  pdl_wait();
  pdl_release();
  float best = NEG_INF;
  int bi = 0x7fffffff;
  const int chunks = V / 8;
#pragma unroll 4
  for (int k = blockIdx.x + ARGMAX_PARTS * threadIdx.x; k < chunks; k += ARGMAX_PARTS * ARGMAX_THREADS) {
    const uint4 w = *reinterpret_cast<const uint4*>(lr + k * 8);
    const unsigned* u = reinterpret_cast<const unsigned*>(&w);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = k * 8 + 2 * q;
      if (argmax_before(lo(u[q]), i, best, bi)) best = lo(u[q]), bi = i;
      if (argmax_before(hi(u[q]), i + 1, best, bi)) best = hi(u[q]), bi = i + 1;
    }
  }
  argmax_warp(best, bi);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = best, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    best = lane < ARGMAX_THREADS / 32 ? sv[lane] : NEG_INF;
    bi = lane < ARGMAX_THREADS / 32 ? si[lane] : 0x7fffffff;
    argmax_warp(best, bi);
    if (lane == 0) {
      pv[(i64)blockIdx.y * ARGMAX_PARTS + blockIdx.x] = best;
      pi[(i64)blockIdx.y * ARGMAX_PARTS + blockIdx.x] = bi;
    }
  }
}

// grid (rows), block 32: out[r] = the index of the best of row r's ARGMAX_PARTS partial results.
extern "C" __global__ void argmax_final(const float* __restrict__ pv, const int* __restrict__ pi,
                                        i64* __restrict__ out) {
  const int lane = threadIdx.x;
  const i64 base = (i64)blockIdx.x * ARGMAX_PARTS;
  pdl_wait();
  pdl_release();
  float best = pv[base + lane];
  int bi = pi[base + lane];
#pragma unroll
  for (int k = 32; k < ARGMAX_PARTS; k += 32)
    if (argmax_before(pv[base + k + lane], pi[base + k + lane], best, bi)) best = pv[base + k + lane], bi = pi[base + k + lane];
  argmax_warp(best, bi);
  if (lane == 0) out[blockIdx.x] = bi;
}
