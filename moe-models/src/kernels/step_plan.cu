// The plan of one decode step (one new token per sequence, no padding mask, a preallocated cache of S
// slots) in one kernel, compiled at run time by NVRTC. StepPlan's general libtorch formulation (mask,
// slot arange, index_copy, cumsum, clamp, sum, causal and self comparisons, their and/or, the -inf bias)
// is ~18 kernels of ~2 us each at the head of every captured decode step; for t = 1 it reduces to
//   key_valid[b, j] = kv[b, j] | (j == slot)
//   bias[b, j]      = 0 if (j <= slot && key_valid[b, j]) || j == slot, else -inf
//   positions[b]    = max(next_pos[b], 0),  next_out[b] = next_pos[b] + 1,  mask[b] = true
//   k_slot[j]       = j
// with slot = slots[0] (the write slot of the step's token, the same for every sequence).

// grid (B), block 256. kv, key_valid (B, S) bool; next_pos, positions, next_out (B) i64; slots (1) i64;
// bias (B, S) f32; k_slot (S) i64; mask (B) bool.
extern "C" __global__ void decode_plan(const bool* __restrict__ kv, const i64* __restrict__ next_pos,
                                       const i64* __restrict__ slots, int S, bool* __restrict__ key_valid,
                                       float* __restrict__ bias, i64* __restrict__ positions,
                                       i64* __restrict__ next_out, i64* __restrict__ k_slot, bool* __restrict__ mask) {
  const int b = blockIdx.x;
  const i64 slot = slots[0];
  for (int j = threadIdx.x; j < S; j += blockDim.x) {
    const bool valid = kv[(i64)b * S + j] || j == slot;
    key_valid[(i64)b * S + j] = valid;
    bias[(i64)b * S + j] = (j <= slot && valid) || j == slot ? 0.f : NEG_INF;
    if (b == 0) k_slot[j] = j;
  }
  if (threadIdx.x == 0) {
    const i64 p = next_pos[b];
    positions[b] = p > 0 ? p : 0;
    next_out[b] = p + 1;
    mask[b] = true;
  }
}
