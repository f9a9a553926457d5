//! The LExI-style data-free sensitivity profile: no calibration text, only each MoE layer on its own.
//!
//! For each MoE layer l: draw `tokens` standard Gaussian vectors `x ~ N(0, I_h)` (seeded: seed + l, drawn
//! on the CPU so every device sees the same inputs), pass them through the layer's own post-attention
//! RMSNorm, and feed the result to the layer's MoE block alone. The RMSNorm output is
//! `x / rms(x) * weight` whatever the scale of `x`, so the block sees inputs at exactly the per-channel
//! scale of the real model's inputs (that is the "input scale" matched here; the direction is random).
//! The sensitivity at k is the relative output deviation `||Y_k - Y_K||_F / ||Y_K||_F` over all tokens,
//! where `Y_k` is the block's output with top-k routing (shared experts included: they are part of what
//! the next layer sees, and identical in both). Profile metric `output_deviation`; k = K gives 0.
//!
//! The profile is a cheap proxy (one block forward per layer and k, no LM head): it ignores how errors
//! propagate through later layers, which is what the text-calibrated profile measures.

use alloc_core::{Calibration, LayerProfile, SensitivityProfile, SCHEMA_VERSION};
use alloc_token::TopK;
use anyhow::{Context, Result};
use moe_models::layers::decoder::{Decoder, Ffn};
use moe_models::layers::moe::{MoeBlock, TokenInfo};
use moe_models::layers::RmsNorm;
use moe_models::{ForwardCtx, Model, Renormalize};
use tch::{Device, Kind, Tensor};

use crate::methods::ModelShape;

/// The profile's `metric` field.
pub const METRIC: &str = "output_deviation";

/// Inputs of a LExI-style profile.
#[derive(Debug, Clone)]
pub struct LexiJob {
    /// Model name recorded in the profile.
    pub model: String,
    /// Gaussian vectors per layer.
    pub tokens: usize,
    /// Seed of the Gaussian inputs (layer l uses seed + l).
    pub seed: u64,
    /// k values to profile (K is always included with delta 0).
    pub k_values: Vec<u32>,
    /// Mixing rule for reduced k.
    pub renormalize: Renormalize,
}

/// The post-attention norm and MoE block of decoder layer `layer`, if it is an MoE layer.
fn block_of<A>(d: &Decoder<A>, layer: usize) -> Option<(&RmsNorm, &MoeBlock)> {
    let l = d.layers.get(layer)?;
    match &l.mlp {
        Ffn::Moe(m) => Some((&l.post_attention_layernorm, m)),
        Ffn::Dense(_) => None,
    }
}

/// The norm and MoE block of `layer` for the families this profile knows.
fn moe_block(model: &Model, layer: usize) -> Option<(&RmsNorm, &MoeBlock)> {
    // A family added to moe-models later falls to the last arm (an error naming it) until it gets an arm.
    #[allow(unreachable_patterns)]
    match model {
        Model::DeepseekV2(m) => block_of(&m.decoder, layer),
        Model::Qwen2Moe(m) => block_of(&m.decoder, layer),
        Model::Mixtral(m) => block_of(&m.decoder, layer),
        Model::Olmoe(m) => block_of(&m.decoder, layer),
        Model::Qwen3Moe(m) => block_of(&m.decoder, layer),
        _ => None,
    }
}

/// Relative deviation `||a - b||_F / ||b||_F` in f64.
fn relative_deviation(a: &Tensor, b: &Tensor) -> Result<f64> {
    let num = a.f_to_kind(Kind::Double)?.f_sub(&b.f_to_kind(Kind::Double)?)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let den = b.f_to_kind(Kind::Double)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    if !(num.is_finite() && den.is_finite()) || den <= 0.0 {
        anyhow::bail!("output norms are not usable (squared deviation {num}, squared full output {den})");
    }
    Ok((num / den).sqrt())
}

/// Measure the data-free profile; `tick` is called after every block forward.
pub fn measure_lexi_profile(model: &Model, shape: &ModelShape, job: &LexiJob, mut tick: impl FnMut()) -> Result<SensitivityProfile> {
    let _guard = tch::no_grad_guard();
    let info = model.info();
    let native = shape.native_k as u32;
    let mut ks: Vec<u32> = job.k_values.iter().copied().filter(|&k| k < native).collect();
    ks.sort_unstable();
    ks.dedup();
    let n = job.tokens.max(1) as i64;
    let h = info.hidden_size as i64;
    let tokens = TokenInfo { mask: None, seq_ids: Tensor::f_zeros([n], (Kind::Int64, info.device))? };
    let mut layers = Vec::new();
    for &layer in &shape.moe_layers {
        let (norm, block) = moe_block(model, layer)
            .with_context(|| format!("layer {layer}: the LExI profile cannot reach the MoE block of a {} model", info.model_type))?;
        tch::manual_seed(job.seed.wrapping_add(layer as u64) as i64);
        let x = Tensor::f_randn([n, h], (Kind::Float, Device::Cpu))?.f_to_device(info.device)?.f_to_kind(info.kind)?;
        let xn = norm.forward(&x)?; // (n, h)
        let run = |k: usize| -> Result<Tensor> {
            let policy = TopK::new(k);
            let mut ctx = ForwardCtx::new(&policy).with_renormalize(job.renormalize);
            block.forward(layer, &xn, &tokens, &mut ctx).with_context(|| format!("layer {layer} at k = {k}"))
        };
        let full = run(shape.native_k)?;
        tick();
        let mut k_list = Vec::new();
        let mut delta = Vec::new();
        for &k in &ks {
            let d = relative_deviation(&run(k as usize)?, &full).with_context(|| format!("LExI profile, layer {layer} at k = {k}"))?;
            k_list.push(k);
            delta.push(d);
            tick();
        }
        k_list.push(native);
        delta.push(0.0);
        layers.push(LayerProfile { layer, k: k_list, delta });
    }
    let profile = SensitivityProfile {
        schema_version: SCHEMA_VERSION,
        model: job.model.clone(),
        metric: METRIC.into(),
        full_k: native,
        layers,
        calibration: Some(Calibration {
            source: format!("data-free: N(0, I) inputs (seed {} + layer) through each layer's post-attention RMSNorm", job.seed),
            tokens: n as u64,
            seq_len: 0,
            sha256: None,
            reference_nll: None,
        }),
    };
    profile.validate()?;
    Ok(profile)
}

/// Forward passes [`measure_lexi_profile`] ticks for: per layer, the full block and one per k < K.
pub fn passes(shape: &ModelShape, k_values: &[u32]) -> usize {
    let below: std::collections::BTreeSet<u32> = k_values.iter().copied().filter(|&k| (k as usize) < shape.native_k).collect();
    shape.moe_layers.len() * (1 + below.len())
}
