// The greedy next token of a decode step in one kernel, compiled at run time by NVRTC: libtorch's argmax
// over a 102400-word bf16 row is a single-block reduction that took 29 us on an H200 (a decode step is
// ~3 ms); here 1024 threads read the row 16 bytes at a time.

// grid (rows), block 1024: out[row] = the first index of the largest value of logits[row] (V bf16,
// contiguous rows, V % 8 == 0), NaN counting as the largest (torch.argmax's rule).
extern "C" __global__ void __launch_bounds__(1024)
argmax_bf16(const bf16* __restrict__ logits, i64* __restrict__ out, int V) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const bf16* lr = logits + (i64)blockIdx.x * V;
  float best = NEG_INF;
  int bi = 0x7fffffff;
  // better(v, i) over (best, bi): NaN first, then larger, then lower index.
  auto take = [&](float v, int i) {
    const bool vn = v != v, bn = best != best;
    const bool better = (vn && !bn) || (!vn && !bn && (v > best || (v == best && i < bi))) || (vn && bn && i < bi);
    if (better) {
      best = v;
      bi = i;
    }
  };
#pragma unroll 4
  for (int c = threadIdx.x * 8; c < V; c += 1024 * 8) {
    const uint4 w = *reinterpret_cast<const uint4*>(lr + c);
    take(lo(w.x), c), take(hi(w.x), c + 1), take(lo(w.y), c + 2), take(hi(w.y), c + 3);
    take(lo(w.z), c + 4), take(hi(w.z), c + 5), take(lo(w.w), c + 6), take(hi(w.w), c + 7);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float v = __shfl_xor_sync(0xffffffffu, best, o);
    const int i = __shfl_xor_sync(0xffffffffu, bi, o);
    take(v, i);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) sv[warp] = best, si[warp] = bi;
  __syncthreads();
  if (warp == 0) {
    best = NEG_INF, bi = 0x7fffffff;
    if (lane < (blockDim.x >> 5)) best = sv[lane], bi = si[lane];
    for (int o = 16; o > 0; o >>= 1) {
      const float v = __shfl_xor_sync(0xffffffffu, best, o);
      const int i = __shfl_xor_sync(0xffffffffu, bi, o);
      take(v, i);
    }
    if (lane == 0) out[blockIdx.x] = bi;
  }
}
