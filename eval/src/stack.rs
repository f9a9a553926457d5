//! A forward pass in pieces, so profiling can start from a cached hidden state.
//!
//! Profiling layer l at k changes nothing before layer l's MoE block: every earlier layer, and layer l's
//! attention, run at the native K and see the same inputs as in the full model. [`Stack`] exposes the
//! decoder loop of `moe_models::layers::decoder::Decoder::forward_hidden` one piece at a time (embed and
//! plan, a layer's attention half, a layer's feed-forward half, the final norm), so the profiler can run
//! the full model once, keep the residual stream at each MoE block's input, and run only layers l..L for
//! each k. The pieces call exactly what `forward_hidden` calls, in the same order, on the same tensors,
//! so the results are the same bits (`profiling`'s tests check it against full forward passes); a change
//! to that loop in moe-models must be mirrored here, and those tests would catch a mismatch.
//!
//! Only uncached, unpadded passes over equal-length sequences (what profiling runs) are supported.

use moe_models::layers::decoder::{Decoder, Ffn, SelfAttention, Step};
use moe_models::layers::attention::StepPlan;
use moe_models::layers::moe::TokenInfo;
use moe_models::{ForwardCtx, Model};
use tch::{Kind, Tensor};

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
        let device = self.info.device;
        let plan = StepPlan::new(ids, None, None, device)?;
        let ids = ids.f_to_device(device)?;
        let x = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?; // (b, t, h)
        let (cos, sin) = self.rotary.cos_sin(&plan.positions)?; // (b, t, rotary / 2)
        let tokens = TokenInfo {
            mask: None,
            seq_ids: Tensor::f_arange(plan.b, (Kind::Int64, device))?.f_unsqueeze(1)?.f_expand([plan.b, plan.t], false)?.f_reshape([-1])?,
        };
        let window_bias = match self.sliding_window {
            Some(w) => Some(plan.sliding_bias(w)?),
            None => None,
        };
        Ok((x, Step { plan, rotary: &self.rotary, cos, sin, tokens, window_bias }))
    }

    fn attention(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor> {
        let layer = &self.layers[i];
        let a = layer.self_attn.forward(i, &layer.input_layernorm.forward(x)?, step, ctx)?;
        Ok(x.f_add(&a)?)
    }

    fn feed_forward(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> moe_models::Result<Tensor> {
        let layer = &self.layers[i];
        let hn = layer.post_attention_layernorm.forward(x)?;
        let f = match &layer.mlp {
            Ffn::Dense(mlp) => mlp.forward(&hn)?,
            Ffn::Moe(moe) => moe.forward(i, &hn, &step.tokens, ctx)?,
        };
        Ok(x.f_add(&f)?)
    }

    fn finish(&self, x: &Tensor) -> moe_models::Result<Tensor> {
        self.norm.forward(x)
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
