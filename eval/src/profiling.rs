//! Alloc-L's sensitivity profile measured on calibration text, and the full model's recorded routing.
//!
//! For each MoE layer l and each k, only layer l runs top-k (every other layer at the native K) and the
//! quality loss against the full model is recorded: the increase in mean NLL ([`ProfileMetric::Nll`],
//! profile metric `delta_nll`), or the mean KL divergence of the reduced model's next-token distribution
//! from the full model's ([`ProfileMetric::Kl`], metric `kl`; every position of every calibration
//! sequence, computed in row chunks against the full model's stored final hidden states, so no
//! full-vocabulary logits of a whole sequence exist at once). k = K is the full model itself (delta 0 by
//! definition; no pass is spent on it). Finished layers are saved after each layer, so an interrupted
//! profile resumes where it stopped. The data-free LExI-style profile is in [`crate::lexi`].

use alloc_core::{Calibration, LayerAllocation, LayerProfile, SensitivityProfile, SCHEMA_VERSION};
use alloc_token::device::DevicePolicy;
use alloc_token::{PerLayerTopK, TopK};
use anyhow::{Context, Result};
use moe_models::{ForwardCtx, RoutingTrace};
use tch::{Kind, Tensor};

use crate::methods::{HostRoute, ModelShape};
use crate::scorer::Scorer;

/// What a measured profile's `delta` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ProfileMetric {
    /// Increase in mean NLL over the full model (profile metric `delta_nll`).
    #[default]
    Nll,
    /// Mean KL(full || reduced) of the next-token distributions (profile metric `kl`).
    Kl,
}

impl ProfileMetric {
    /// The profile's `metric` field for this choice.
    pub fn profile_name(self) -> &'static str {
        match self {
            ProfileMetric::Nll => "delta_nll",
            ProfileMetric::Kl => "kl",
        }
    }
}

/// Inputs of a profiling run.
pub struct ProfileJob<'a> {
    /// Model name recorded in the profile.
    pub model: String,
    /// The scorer (model + settings).
    pub scorer: &'a Scorer<'a>,
    /// Model facts.
    pub shape: &'a ModelShape,
    /// Calibration sequences.
    pub calib: &'a [Vec<i64>],
    /// k values to profile (K itself is always included with delta 0).
    pub k_values: Vec<u32>,
    /// Provenance of the calibration text.
    pub calibration: Calibration,
    /// What the deltas measure.
    pub metric: ProfileMetric,
}

/// Measure the profile. `partial` holds layers finished by an earlier, interrupted run (kept as is);
/// `save` is called with the profile so far after every layer; `tick` after every forward pass.
pub fn measure_profile(
    job: &ProfileJob<'_>,
    partial: Option<SensitivityProfile>,
    mut save: impl FnMut(&SensitivityProfile) -> Result<()>,
    mut tick: impl FnMut(),
) -> Result<SensitivityProfile> {
    let native = job.shape.native_k as u32;
    let full = TopK::new(job.shape.native_k);
    // NLL: the full model's mean NLL. KL: the full model's final hidden states (its NLL comes with them).
    let (reference, hidden) = match job.metric {
        ProfileMetric::Nll => (job.scorer.text_nll(&full, job.calib, None)?.mean(), Vec::new()),
        ProfileMetric::Kl => {
            let (hidden, nll) = job.scorer.reference_hidden(&full, job.calib)?;
            (nll.mean(), hidden)
        }
    };
    tick();
    let mut calibration = job.calibration.clone();
    calibration.reference_nll = Some(reference);
    let mut profile = SensitivityProfile {
        schema_version: SCHEMA_VERSION,
        model: job.model.clone(),
        metric: job.metric.profile_name().into(),
        full_k: native,
        layers: Vec::new(),
        calibration: Some(calibration),
    };
    let mut ks: Vec<u32> = job.k_values.iter().copied().filter(|&k| k < native).collect();
    ks.sort_unstable();
    ks.dedup();
    // A partial profile of another metric is not resumed.
    let partial = partial.filter(|p| p.metric == profile.metric);
    for &layer in &job.shape.moe_layers {
        if let Some(done) = partial.as_ref().and_then(|p| p.layers.iter().find(|l| l.layer == layer)) {
            profile.layers.push(done.clone());
            for _ in &ks {
                tick();
            }
            continue;
        }
        let mut k_list = Vec::new();
        let mut delta = Vec::new();
        for &k in &ks {
            let alloc_k: Vec<u32> = job.shape.moe_layers.iter().map(|&l| if l == layer { k } else { native }).collect();
            let policy = PerLayerTopK::new(LayerAllocation::new(job.shape.moe_layers.clone(), alloc_k)?);
            let what = || format!("profiling layer {layer} at k = {k}");
            let d = match job.metric {
                ProfileMetric::Nll => job.scorer.text_nll(&policy, job.calib, None).with_context(what)?.mean() - reference,
                ProfileMetric::Kl => job.scorer.kl_to_reference(&policy, job.calib, &hidden).with_context(what)?,
            };
            k_list.push(k);
            delta.push(d);
            tick();
        }
        k_list.push(native);
        delta.push(0.0);
        profile.layers.push(LayerProfile { layer, k: k_list, delta });
        save(&profile)?;
    }
    profile.validate()?;
    Ok(profile)
}

/// Run the full model on the calibration sequences and copy every MoE layer's router probabilities to
/// the host (concatenated over batches), for offline replay of calibrated methods.
pub fn record_host_trace(scorer: &Scorer<'_>, shape: &ModelShape, calib: &[Vec<i64>]) -> Result<Vec<HostRoute>> {
    let _guard = tch::no_grad_guard();
    let policy = TopK::new(shape.native_k);
    let mut out: Vec<HostRoute> =
        shape.moe_layers.iter().map(|&layer| HostRoute { layer, probs: Vec::new(), tokens: 0 }).collect();
    let Some(len) = calib.first().map(Vec::len) else { return Ok(out) };
    let rows = (scorer.batch_tokens / len.max(1)).max(1);
    for chunk in calib.chunks(rows) {
        let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
        let ids = Tensor::f_from_slice(&flat)?.f_reshape([chunk.len() as i64, len as i64])?.f_to_device(scorer.model.info().device)?;
        let mut trace = RoutingTrace::new();
        {
            let mut ctx = ForwardCtx::new(&policy as &dyn DevicePolicy).with_trace(&mut trace).with_renormalize(scorer.renormalize);
            let _hidden = scorer.model.forward_hidden(&ids, &mut ctx)?;
        }
        for r in trace.take() {
            let Some(slot) = out.iter_mut().find(|h| h.layer == r.layer) else { continue };
            let probs = r.probs.f_to_kind(Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_contiguous()?;
            let n = probs.size()[0] as usize;
            let v: Vec<f32> = Vec::<f32>::try_from(probs.f_reshape([-1])?).context("router probabilities to host")?;
            slot.probs.extend_from_slice(&v);
            slot.tokens += n;
        }
    }
    Ok(out)
}
