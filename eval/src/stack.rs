//! A forward pass in pieces, so profiling can start from a cached hidden state.
//!
//! Profiling layer l at k changes nothing before layer l's MoE block: every earlier layer, and layer l's
//! attention, run at the native K and see the same inputs as in the full model. [`Stack`] gives the
//! pieces of `moe_models::layers::decoder::Decoder::forward_hidden` (`begin`, a layer's `attention_half`
//! and `feed_forward_half`, `finish`; forward_hidden is made of exactly these) behind one object for any
//! family, so the profiler can run the full model once, keep the residual stream at each MoE block's
//! input, and run only layers l..L for each k, with the same bits as whole passes (`profiling`'s tests).
//!
//! Only uncached, unpadded passes over equal-length sequences (what profiling runs) are supported.

use moe_models::layers::decoder::{Decoder, SelfAttention, Step};
use moe_models::{ForwardCtx, Model};
use tch::Tensor;

/// The decoder loop of one model, one piece at a time.
pub trait Stack {
    /// Decoder layers.
    fn num_layers(&self) -> usize;
    /// The embedded ids `(b, t, h)` and the plan every layer of the pass shares, for `(b, t)` ids.
    fn begin(&self, ids: &Tensor) -> moe_models::Result<(Tensor, Step<'_>)>;
    /// `x + self_attn(input_layernorm(x))` of layer `i`.
    fn attention(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor>;
    /// `x + mlp(post_attention_layernorm(x))` of layer `i` (the MoE block calls `ctx.policy`).
    fn feed_forward(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor>;
    /// The final norm: what `Model::forward_hidden` returns.
    fn finish(&self, x: &Tensor) -> moe_models::Result<Tensor>;
}

impl<A: SelfAttention> Stack for Decoder<A> {
    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn begin(&self, ids: &Tensor) -> moe_models::Result<(Tensor, Step<'_>)> {
        Decoder::begin(self, ids, None, None)
    }

    fn attention(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor> {
        self.attention_half(i, x, step, ctx)
    }

    fn feed_forward(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor> {
        self.feed_forward_half(i, x, step, ctx)
    }

    fn finish(&self, x: &Tensor) -> moe_models::Result<Tensor> {
        Decoder::finish(self, x)
    }
}

/// The model's decoder loop, for the families this module knows; `None` for another (the caller then
/// runs whole forward passes).
pub fn stack_of(model: &Model) -> Option<&dyn Stack> {
    // A family added to moe-models later falls to the last arm until it gets one here.
    #[allow(unreachable_patterns)]
    match model {
        Model::DeepseekV2(m) => Some(&m.decoder),
        Model::Qwen2Moe(m) => Some(&m.decoder),
        Model::Mixtral(m) => Some(&m.decoder),
        Model::Olmoe(m) => Some(&m.decoder),
        Model::Qwen3Moe(m) => Some(&m.decoder),
        _ => None,
    }
}

/// The rest of a pass from layer `from`'s feed-forward half, given the residual stream `x` after that
/// layer's attention half: the final hidden states `(b, t, h)`, as `Model::forward_hidden` returns them.
pub fn run_from_feed_forward(stack: &dyn Stack, from: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor> {
    let mut x = stack.feed_forward(from, x, step, ctx)?;
    for i in from + 1..stack.num_layers() {
        x = stack.attention(i, &x, step, ctx)?;
        x = stack.feed_forward(i, &x, step, ctx)?;
    }
    stack.finish(&x)
}
