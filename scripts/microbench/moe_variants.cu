// moe_decode.cu's gate/up and down kernels under tighter launch bounds (more blocks per SM, fewer
// registers), measured by moe.py: both slower on the H200 (docs/speed-notes.md, session 5).
extern "C" __global__ void __launch_bounds__(128, 12) moe_gate_up_64_lb(const bf16* __restrict__ x, const i64* __restrict__ ids,
    const float* __restrict__ logits, const bf16* __restrict__ w_gu, bf16* __restrict__ act, i64* __restrict__ ids_out, float* __restrict__ w_out,
    const bf16* __restrict__ s_g, const bf16* __restrict__ s_u, bf16* __restrict__ act_s, const bf16* __restrict__ s_gate,
    float* __restrict__ g, int H, int I, int W, int E, int ld, int Is, int T, int route, int renorm, float scale) {
  moe_gate_up_impl<2>(x, ids, logits, w_gu, act, ids_out, w_out, s_g, s_u, act_s, s_gate, g, H, I, W, E, ld, Is, T, route, renorm, scale);
}
extern "C" __global__ void __launch_bounds__(224, 6) moe_down_4_lb(const bf16* __restrict__ act, const i64* __restrict__ ids,
    const float* __restrict__ mix, const bf16* __restrict__ w_d, bf16* __restrict__ out, const bf16* __restrict__ act_s,
    const bf16* __restrict__ s_d, const float* __restrict__ g, const bf16* __restrict__ res, int H, int I, int W, int E, int ld, int Is,
    int gather, int renorm, float scale) {
  moe_down_impl<4>(act, ids, mix, w_d, out, act_s, s_d, g, res, H, I, W, E, ld, Is, gather, renorm, scale);
}
