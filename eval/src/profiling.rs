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
    /// How the passes run (the default does less work for the same numbers).
    pub passes: Passes,
}

/// Measure the profile. `partial` holds layers finished by an earlier, interrupted run (kept as is);
/// `save` is called with the profile so far after every layer; `tick` after every forward pass.
pub fn measure_profile(
    job: &ProfileJob<'_>,
    partial: Option<SensitivityProfile>,
    save: impl FnMut(&SensitivityProfile) -> Result<()>,
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
    let profile = SensitivityProfile {
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
    let mut run = Run { job, ks, reference: Reference { nll: reference, hidden }, partial, profile, save, tick };
    match crate::stack::stack_of(job.scorer.model).filter(|_| job.passes == Passes::FromCachedLayerInput) {
        Some(stack) => run.layers_from_cache(stack)?,
        None => run.layers_by_full_passes()?,
    }
    run.profile.validate()?;
    Ok(run.profile)
}

/// How profiling runs its passes (the results are the same; [`Passes::FromCachedLayerInput`] does
/// less work).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Passes {
    /// Run the full model once per calibration batch, keep the residual stream after each MoE layer's
    /// attention, and run only that layer's feed-forward and the layers after it for each k (falls back
    /// to whole passes for a family `crate::stack` does not reach).
    #[default]
    FromCachedLayerInput,
    /// A whole forward pass per (layer, k) (what the cached passes must reproduce; kept for the tests).
    Full,
}

/// What the deltas are measured against.
struct Reference {
    /// The full model's mean NLL.
    nll: f64,
    /// KL only: the full model's final hidden states per calibration batch.
    hidden: Vec<Tensor>,
}

/// The policy that runs `layer` at `k` and every other MoE layer at the native K.
fn one_layer_at(shape: &ModelShape, layer: usize, k: u32) -> Result<PerLayerTopK> {
    let native = shape.native_k as u32;
    let alloc_k: Vec<u32> = shape.moe_layers.iter().map(|&l| if l == layer { k } else { native }).collect();
    Ok(PerLayerTopK::new(LayerAllocation::new(shape.moe_layers.clone(), alloc_k)?))
}

/// A profiling run in progress, shared by both ways of running the passes: the job, the k values below
/// the native K, the reference, the layers an interrupted run finished, and where results go (the
/// profile so far, saved after each layer; a tick per forward pass).
struct Run<'j, 'a, S, T> {
    job: &'j ProfileJob<'a>,
    ks: Vec<u32>,
    reference: Reference,
    partial: Option<SensitivityProfile>,
    profile: SensitivityProfile,
    save: S,
    tick: T,
}

impl<S: FnMut(&SensitivityProfile) -> Result<()>, T: FnMut()> Run<'_, '_, S, T> {
    /// Layer `layer` as an interrupted run's profile has it, if it does.
    fn resumed(&self, layer: usize) -> Option<&LayerProfile> {
        self.partial.as_ref().and_then(|p| p.layers.iter().find(|l| l.layer == layer))
    }

    /// Keep layer `layer` from the interrupted run (its passes count as done); false if it has none.
    fn keep_resumed(&mut self, layer: usize) -> bool {
        let Some(done) = self.resumed(layer).cloned() else { return false };
        self.profile.layers.push(done);
        self.ks.iter().for_each(|_| (self.tick)());
        true
    }

    /// Push layer `layer`'s measured deltas (k = K appended with delta 0) and save the profile so far.
    fn finish_layer(&mut self, layer: usize, mut delta: Vec<f64>) -> Result<()> {
        let mut k_list = self.ks.clone();
        k_list.push(self.profile.full_k);
        delta.push(0.0);
        self.profile.layers.push(LayerProfile { layer, k: k_list, delta });
        (self.save)(&self.profile)
    }

    /// One whole forward pass per (layer, k).
    fn layers_by_full_passes(&mut self) -> Result<()> {
        let job = self.job;
        for &layer in &job.shape.moe_layers {
            if self.keep_resumed(layer) {
                continue;
            }
            let mut delta = Vec::new();
            for k in self.ks.clone() {
                let policy = one_layer_at(job.shape, layer, k)?;
                let what = || format!("profiling layer {layer} at k = {k}");
                let d = match job.metric {
                    ProfileMetric::Nll => job.scorer.text_nll(&policy, job.calib, None).with_context(what)?.mean() - self.reference.nll,
                    ProfileMetric::Kl => job.scorer.kl_to_reference(&policy, job.calib, &self.reference.hidden).with_context(what)?,
                };
                delta.push(d);
                (self.tick)();
            }
            self.finish_layer(layer, delta)?;
        }
        Ok(())
    }

    /// The full model once per calibration batch, layer by layer; at each MoE layer l, the residual
    /// stream after l's attention is the input every (l, k) pass shares, so each k runs only l's
    /// feed-forward and the layers after it. Same deltas as [`Run::layers_by_full_passes`], bit for bit.
    fn layers_from_cache(&mut self, stack: &dyn crate::stack::Stack) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let job = self.job;
        let scorer = job.scorer;
        let batches = scorer.batches(job.calib)?;
        if job.metric == ProfileMetric::Kl && batches.len() != self.reference.hidden.len() {
            anyhow::bail!("{} reference batches for {} calibration batches", self.reference.hidden.len(), batches.len());
        }
        // The full model as the profiled passes run it elsewhere: every MoE layer at the native K.
        let full = PerLayerTopK::new(LayerAllocation::new(job.shape.moe_layers.clone(), vec![job.shape.native_k as u32; job.shape.moe_layers.len()])?);
        fn ctx_of<'p>(p: &'p dyn DevicePolicy, scorer: &Scorer<'_>) -> ForwardCtx<'p> {
            ForwardCtx::new(p).with_renormalize(scorer.renormalize)
        }
        // Per batch: the residual stream and the plan every layer of the pass shares.
        let mut states = Vec::with_capacity(batches.len());
        for ids in &batches {
            states.push(stack.begin(ids).context("embedding the calibration batch")?);
        }
        let last = job.shape.moe_layers.iter().copied().filter(|&l| self.resumed(l).is_none()).max();
        for i in 0..stack.num_layers() {
            // Past the last layer to measure, the rest of the stack is not needed.
            let Some(last) = last.filter(|&l| i <= l) else { break };
            for (x, step) in &mut states {
                *x = stack.attention(i, x, step, &mut ctx_of(&full, scorer)).with_context(|| format!("layer {i} attention"))?;
            }
            // A layer the interrupted run finished is kept; any other MoE layer is measured.
            if !self.keep_resumed(i) && job.shape.moe_layers.contains(&i) {
                let mut delta = Vec::new();
                for k in self.ks.clone() {
                    let policy = one_layer_at(job.shape, i, k)?;
                    let what = || format!("profiling layer {i} at k = {k}");
                    let d = match job.metric {
                        ProfileMetric::Nll => {
                            let (mut nll, mut tokens) = (0.0f64, 0u64);
                            for ((x, step), ids) in states.iter().zip(&batches) {
                                let hidden = crate::stack::run_from_feed_forward(stack, i, x, step, &mut ctx_of(&policy, scorer)).with_context(what)?;
                                let s = scorer.hidden_nll(&hidden, ids).with_context(what)?;
                                if !s.is_finite() {
                                    anyhow::bail!("{}: the loss is {s} (not finite) under policy {}", what(), policy.name());
                                }
                                nll += s;
                                tokens += (ids.size()[0] * (ids.size()[1] - 1)) as u64;
                            }
                            nll / tokens.max(1) as f64 - self.reference.nll
                        }
                        ProfileMetric::Kl => {
                            let (mut kl, mut positions) = (0.0f64, 0u64);
                            for ((x, step), href) in states.iter().zip(&self.reference.hidden) {
                                let hidden = crate::stack::run_from_feed_forward(stack, i, x, step, &mut ctx_of(&policy, scorer)).with_context(what)?;
                                positions += scorer.add_kl(&hidden, href, &mut kl).with_context(what)?;
                            }
                            if !kl.is_finite() {
                                anyhow::bail!("{}: the KL divergence is {kl} (not finite) under policy {}", what(), policy.name());
                            }
                            kl / positions.max(1) as f64
                        }
                    };
                    delta.push(d);
                    (self.tick)();
                }
                self.finish_layer(i, delta)?;
            }
            if i < last {
                for (x, step) in &mut states {
                    *x = stack.feed_forward(i, x, step, &mut ctx_of(&full, scorer)).with_context(|| format!("layer {i} feed-forward"))?;
                }
            }
        }
        // Resumed layers after the last measured one (the loop stopped before them).
        for &layer in job.shape.moe_layers.iter().filter(|&&l| last.is_none_or(|last| l > last)) {
            self.keep_resumed(layer);
        }
        Ok(())
    }
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
