//! Scoring text with a model under a routing policy: token NLL of long text in chunks, and
//! log-likelihoods of (context, continuation) requests, batched and padded. Realized activations are
//! accumulated on the device from the routing trace and read back once per call.

use alloc_token::device::DevicePolicy;
use anyhow::{Context, Result};
use moe_models::{ForwardCtx, Model, Renormalize, RoutingTrace};
use moe_models::layers::decoder::Step;
use tch::{Device, Kind, Tensor};

use crate::stack::Stack;

/// Per-layer realized activation counters, kept on the device until [`ActivationMeter::finish`].
#[derive(Debug)]
pub struct ActivationMeter {
    layers: Vec<usize>,
    experts: i64,
    /// Per layer: (activations, valid tokens, unique experts summed over batches, batches).
    sums: Vec<Option<(Tensor, Tensor, Tensor)>>,
    batches: u64,
}

/// What a meter measured: per MoE layer, mean experts per token and mean distinct experts per batch.
#[derive(Debug, Clone, Default)]
pub struct Realized {
    /// Mean routed experts per valid token, per MoE layer.
    pub per_layer: Vec<f64>,
    /// Mean distinct experts touched per batch, per MoE layer.
    pub unique_per_layer: Vec<f64>,
}

impl Realized {
    /// Mean routed activations per token summed over layers.
    pub fn per_token_total(&self) -> f64 {
        self.per_layer.iter().sum()
    }
}

impl ActivationMeter {
    /// A meter for the model's MoE layers.
    pub fn new(moe_layers: &[usize], experts: usize) -> Self {
        Self { layers: moe_layers.to_vec(), experts: experts as i64, sums: moe_layers.iter().map(|_| None).collect(), batches: 0 }
    }

    /// Add one forward pass's routing (drains the trace).
    pub fn add(&mut self, trace: &mut RoutingTrace) -> Result<()> {
        let routes = trace.take();
        if routes.is_empty() {
            return Ok(());
        }
        self.batches += 1;
        for r in routes {
            let Some(i) = self.layers.iter().position(|&l| l == r.layer) else { continue };
            let chosen = r.ids.f_ge(0)?; // (n, w) bool
            let valid = match &r.mask {
                Some(m) => m.f_to_kind(Kind::Int64)?,
                None => Tensor::f_ones([r.ids.size()[0]], (Kind::Int64, r.ids.device()))?,
            };
            let acts = chosen.f_sum(Kind::Int64)?;
            let toks = valid.f_sum(Kind::Int64)?;
            // Distinct experts touched: one-hot over experts (ids of -1 are clamped to 0 and masked out).
            let safe = r.ids.f_clamp_min(0)?;
            let hits = Tensor::f_zeros([self.experts], (Kind::Int64, r.ids.device()))?
                .f_index_add(0, &safe.f_reshape([-1])?, &chosen.f_to_kind(Kind::Int64)?.f_reshape([-1])?)?;
            let unique = hits.f_gt(0)?.f_sum(Kind::Int64)?;
            self.sums[i] = Some(match self.sums[i].take() {
                None => (acts, toks, unique),
                Some((a, t, u)) => (a.f_add(&acts)?, t.f_add(&toks)?, u.f_add(&unique)?),
            });
        }
        Ok(())
    }

    /// Read the counters back (one host synchronisation).
    pub fn finish(&self) -> Result<Realized> {
        let mut out = Realized::default();
        for s in &self.sums {
            match s {
                None => {
                    out.per_layer.push(0.0);
                    out.unique_per_layer.push(0.0);
                }
                Some((a, t, u)) => {
                    let (a, t, u) = (a.f_int64_value(&[])?, t.f_int64_value(&[])?, u.f_int64_value(&[])?);
                    out.per_layer.push(if t > 0 { a as f64 / t as f64 } else { 0.0 });
                    out.unique_per_layer.push(u as f64 / self.batches.max(1) as f64);
                }
            }
        }
        Ok(out)
    }
}

/// A model plus the settings every scoring call shares.
pub struct Scorer<'m> {
    /// The model.
    pub model: &'m Model,
    /// How chosen probabilities become mixing weights.
    pub renormalize: Renormalize,
    /// Most tokens per forward pass (batch rows x padded length).
    pub batch_tokens: usize,
    /// Rows per chunk of the vocabulary projection.
    pub head_chunk: usize,
}

/// The part of every forward pass over some text that no routing policy changes: per batch, the token
/// ids, the plan, and the residual stream after the attention half of the first MoE layer (everything
/// before it is dense). [`Scorer::text_nll_from`] runs the rest under a policy.
pub struct TextPrefix<'m> {
    stack: &'m dyn Stack,
    /// The first MoE layer.
    layer: usize,
    /// Per batch: `(rows, len)` ids, the residual stream `(rows, len, h)`, the pass's plan.
    batches: Vec<(Tensor, Tensor, Step<'m>)>,
}

/// Summed NLL over scored tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct NllSum {
    /// Sum of per-token negative log-likelihoods (nats).
    pub nll: f64,
    /// Number of scored tokens.
    pub tokens: u64,
}

impl NllSum {
    /// Mean NLL per token.
    pub fn mean(&self) -> f64 {
        self.nll / self.tokens.max(1) as f64
    }
}

impl<'m> Scorer<'m> {
    fn device(&self) -> Device {
        self.model.info().device
    }

    /// Mean-NLL over equal-length sequences (each scored on its tokens 1..), batched.
    pub fn text_nll(&self, policy: &dyn DevicePolicy, seqs: &[Vec<i64>], meter: Option<&mut ActivationMeter>) -> Result<NllSum> {
        let _guard = tch::no_grad_guard();
        let mut meter = meter;
        let mut total = NllSum::default();
        let Some(len) = seqs.first().map(Vec::len) else { return Ok(total) };
        let rows = (self.batch_tokens / len.max(1)).max(1);
        for chunk in seqs.chunks(rows) {
            let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
            let ids = Tensor::f_from_slice(&flat)?.f_reshape([chunk.len() as i64, len as i64])?.f_to_device(self.device())?;
            let mut trace = RoutingTrace::new();
            let nll = {
                let mut ctx = ForwardCtx::new(policy).with_renormalize(self.renormalize);
                if meter.is_some() {
                    ctx = ctx.with_trace(&mut trace);
                }
                moe_models::token_nll(self.model, &ids, &mut ctx, self.head_chunk).context("forward pass")?
            };
            if let Some(m) = meter.as_deref_mut() {
                m.add(&mut trace)?;
            }
            let s = nll.f_sum(Kind::Double)?.f_double_value(&[])?;
            if !s.is_finite() {
                anyhow::bail!("the loss is {s} (not finite) under policy {}", policy.name());
            }
            total.nll += s;
            total.tokens += (chunk.len() * (len - 1)) as u64;
        }
        Ok(total)
    }

    /// The policy-independent prefix of [`Self::text_nll`]'s passes over `seqs` (the same batches), or
    /// `None` when `crate::stack` does not reach the model's layers or it has no MoE layer.
    pub fn text_prefix(&self, seqs: &[Vec<i64>]) -> Result<Option<TextPrefix<'m>>> {
        let _guard = tch::no_grad_guard();
        let (Some(stack), Some(&layer)) = (crate::stack::stack_of(self.model), self.model.info().moe_layers.first()) else {
            return Ok(None);
        };
        // No layer before `layer` routes; the policy only has to exist.
        let policy = alloc_token::TopK::new(self.model.info().native_k);
        let mut batches = Vec::new();
        for ids in self.batches(seqs)? {
            let (mut x, step) = stack.begin(&ids).context("embedding")?;
            let mut ctx = ForwardCtx::new(&policy).with_renormalize(self.renormalize);
            for i in 0..layer {
                x = stack.attention(i, &x, &step, &mut ctx)?;
                x = stack.feed_forward(i, &x, &step, &mut ctx)?;
            }
            x = stack.attention(layer, &x, &step, &mut ctx)?;
            batches.push((ids, x, step));
        }
        Ok(Some(TextPrefix { stack, layer, batches }))
    }

    /// [`Self::text_nll`] of the sequences `prefix` was made from, running only the policy-dependent
    /// rest of each pass: the same bits, and the same realized activations in `meter`.
    pub fn text_nll_from(&self, prefix: &TextPrefix<'_>, policy: &dyn DevicePolicy, meter: Option<&mut ActivationMeter>) -> Result<NllSum> {
        let _guard = tch::no_grad_guard();
        let mut meter = meter;
        let mut total = NllSum::default();
        for (ids, x, step) in &prefix.batches {
            let mut trace = RoutingTrace::new();
            let hidden = {
                let mut ctx = ForwardCtx::new(policy).with_renormalize(self.renormalize);
                if meter.is_some() {
                    ctx = ctx.with_trace(&mut trace);
                }
                crate::stack::run_from_feed_forward(prefix.stack, prefix.layer, x, step, &mut ctx).context("forward pass")?
            };
            if let Some(m) = meter.as_deref_mut() {
                m.add(&mut trace)?;
            }
            let s = self.hidden_nll(&hidden, ids)?;
            if !s.is_finite() {
                anyhow::bail!("the loss is {s} (not finite) under policy {}", policy.name());
            }
            total.nll += s;
            total.tokens += (ids.size()[0] * (ids.size()[1] - 1)) as u64;
        }
        Ok(total)
    }

    /// The equal-length `seqs` as `(rows, len)` id tensors on the device, in the batches every scoring
    /// call uses (so two calls' batches line up).
    pub fn batches(&self, seqs: &[Vec<i64>]) -> Result<Vec<Tensor>> {
        let Some(len) = seqs.first().map(Vec::len) else { return Ok(Vec::new()) };
        let rows = (self.batch_tokens / len.max(1)).max(1);
        seqs.chunks(rows)
            .map(|chunk| {
                let flat: Vec<i64> = chunk.iter().flatten().copied().collect();
                Ok(Tensor::f_from_slice(&flat)?.f_reshape([chunk.len() as i64, len as i64])?.f_to_device(self.device())?)
            })
            .collect()
    }

    /// The final hidden states `(rows, len, h)` of every batch of `seqs` under `policy` (the reference
    /// of [`Self::kl_to_reference`]), and the summed NLL they give (tokens 1.. of each sequence).
    pub fn reference_hidden(&self, policy: &dyn DevicePolicy, seqs: &[Vec<i64>]) -> Result<(Vec<Tensor>, NllSum)> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::new();
        let mut total = NllSum::default();
        for ids in self.batches(seqs)? {
            let mut ctx = ForwardCtx::new(policy).with_renormalize(self.renormalize);
            let hidden = self.model.forward_hidden(&ids, &mut ctx).context("forward pass")?; // (b, t, h)
            let (b, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
            let src = hidden.f_narrow(1, 0, t - 1)?.f_reshape([-1, h])?; // (b (t-1), h)
            let tgt = ids.f_narrow(1, 1, t - 1)?.f_reshape([-1, 1])?;
            let chunk = self.head_chunk.max(1) as i64;
            let mut start = 0;
            while start < src.size()[0] {
                let n = chunk.min(src.size()[0] - start);
                let logits = self.model.lm_head(&src.f_narrow(0, start, n)?)?.f_to_kind(Kind::Float)?; // (n, v)
                let lse = logits.f_logsumexp([-1], false)?;
                let picked = logits.f_gather(1, &tgt.f_narrow(0, start, n)?, false)?.f_squeeze_dim(1)?;
                total.nll += lse.f_sub(&picked)?.f_sum(Kind::Double)?.f_double_value(&[])?;
                start += n;
            }
            total.tokens += (b * (t - 1)) as u64;
            out.push(hidden);
        }
        if !total.nll.is_finite() {
            anyhow::bail!("the full model's loss is {} (not finite)", total.nll);
        }
        Ok((out, total))
    }

    /// Mean over every position of `seqs` of KL(p_ref || p_policy) in nats, where p_ref comes from the
    /// stored `reference` hidden states ([`Self::reference_hidden`] on the same `seqs`). The LM head runs
    /// on `head_chunk` rows at a time for both models, so full-vocabulary logits of a long sequence never
    /// exist at once.
    pub fn kl_to_reference(&self, policy: &dyn DevicePolicy, seqs: &[Vec<i64>], reference: &[Tensor]) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let batches = self.batches(seqs)?;
        if batches.len() != reference.len() {
            anyhow::bail!("{} reference batches for {} calibration batches", reference.len(), batches.len());
        }
        let (mut kl, mut positions) = (0.0f64, 0u64);
        for (ids, href) in batches.iter().zip(reference) {
            let mut ctx = ForwardCtx::new(policy).with_renormalize(self.renormalize);
            let hidden = self.model.forward_hidden(ids, &mut ctx).context("forward pass")?;
            positions += self.add_kl(&hidden, href, &mut kl)?;
        }
        if !kl.is_finite() {
            anyhow::bail!("the KL divergence is {kl} (not finite) under policy {}", policy.name());
        }
        Ok(kl / positions.max(1) as f64)
    }

    /// Add to `kl` the summed KL(p_ref || p) over every position of final hidden states `hidden`
    /// `(b, t, h)` against the reference's `href` (same shape), `head_chunk` rows at a time; returns the
    /// number of positions.
    pub fn add_kl(&self, hidden: &Tensor, href: &Tensor, kl: &mut f64) -> Result<u64> {
        let _guard = tch::no_grad_guard();
        let h = hidden.size()[2];
        let (x, xr) = (hidden.f_reshape([-1, h])?, href.f_reshape([-1, h])?); // (b t, h)
        let rows = x.size()[0];
        let chunk = self.head_chunk.max(1) as i64;
        let mut start = 0;
        while start < rows {
            let n = chunk.min(rows - start);
            let lp = self.model.lm_head(&x.f_narrow(0, start, n)?)?.f_log_softmax(-1, Kind::Float)?; // (n, v)
            let lr = self.model.lm_head(&xr.f_narrow(0, start, n)?)?.f_log_softmax(-1, Kind::Float)?;
            let part = lr.f_exp()?.f_mul(&lr.f_sub(&lp)?)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            *kl += part;
            start += n;
        }
        Ok(rows as u64)
    }

    /// The summed NLL of tokens 1.. of each row of `(b, t)` `ids` given final hidden states `hidden`
    /// `(b, t, h)`, computed as [`Self::text_nll`] computes it (`moe_models::token_nll`'s head chunks,
    /// then one f64 sum), so the same hidden states give the same bits.
    pub fn hidden_nll(&self, hidden: &Tensor, ids: &Tensor) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let (b, t, h) = (hidden.size()[0], hidden.size()[1], hidden.size()[2]);
        let src = hidden.f_narrow(1, 0, t - 1)?.f_reshape([-1, h])?; // (b (t-1), h)
        let tgt = ids.f_to_device(hidden.device())?.f_narrow(1, 1, t - 1)?.f_reshape([-1, 1])?; // (b (t-1), 1)
        let rows = src.size()[0];
        let chunk = self.head_chunk.max(1) as i64;
        let mut parts = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = chunk.min(rows - start);
            let logits = self.model.lm_head(&src.f_narrow(0, start, len)?)?.f_to_kind(Kind::Float)?; // (len, v)
            let lse = logits.f_logsumexp([-1], false)?;
            let picked = logits.f_gather(1, &tgt.f_narrow(0, start, len)?, false)?.f_squeeze_dim(1)?;
            parts.push(lse.f_sub(&picked)?);
            start += len;
        }
        Ok(Tensor::f_cat(&parts, 0)?.f_reshape([b, t - 1])?.f_sum(Kind::Double)?.f_double_value(&[])?)
    }

    /// For each (context, continuation) pair: the summed log-probability of the continuation and
    /// whether every continuation token is the greedy (argmax) prediction. Inputs longer than the
    /// model's context are truncated from the left. Requests are sorted by length and right-padded.
    pub fn loglikelihood(
        &self,
        policy: &dyn DevicePolicy,
        requests: &[(Vec<i64>, Vec<i64>)],
        mut meter: Option<&mut ActivationMeter>,
    ) -> Result<Vec<(f64, bool)>> {
        let _guard = tch::no_grad_guard();
        let max_len = self.model.info().max_position_embeddings.max(2);
        // Build (tokens, number of continuation tokens) with left truncation.
        let items: Vec<(Vec<i64>, usize)> = requests
            .iter()
            .map(|(ctx, cont)| {
                let mut all: Vec<i64> = ctx.iter().chain(cont.iter()).copied().collect();
                let n = cont.len().min(max_len - 1).max(1);
                if all.len() > max_len {
                    all.drain(..all.len() - max_len);
                }
                (all, n)
            })
            .collect();
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(items[i].0.len()));
        let mut out = vec![(0.0, false); items.len()];
        let mut start = 0;
        while start < order.len() {
            let longest = items[order[start]].0.len();
            let rows = (self.batch_tokens / longest.max(1)).max(1);
            let batch: Vec<usize> = order[start..(start + rows).min(order.len())].to_vec();
            start += batch.len();
            let mut flat = Vec::with_capacity(batch.len() * longest);
            let mut mask = Vec::with_capacity(batch.len() * longest);
            for &i in &batch {
                let toks = &items[i].0;
                flat.extend_from_slice(toks);
                flat.extend(std::iter::repeat_n(0, longest - toks.len()));
                mask.extend(std::iter::repeat_n(1i64, toks.len()));
                mask.extend(std::iter::repeat_n(0i64, longest - toks.len()));
            }
            let shape = [batch.len() as i64, longest as i64];
            let ids = Tensor::f_from_slice(&flat)?.f_reshape(shape)?.f_to_device(self.device())?;
            let mask_t = Tensor::f_from_slice(&mask)?.f_reshape(shape)?.f_to_device(self.device())?;
            let mut trace = RoutingTrace::new();
            let hidden = {
                let mut ctx = ForwardCtx::new(policy).with_mask(&mask_t).with_renormalize(self.renormalize);
                if meter.is_some() {
                    ctx = ctx.with_trace(&mut trace);
                }
                self.model.forward_hidden(&ids, &mut ctx).context("forward pass")?
            };
            if let Some(m) = meter.as_deref_mut() {
                m.add(&mut trace)?;
            }
            // Score only the continuation rows of each request.
            for (row, &i) in batch.iter().enumerate() {
                let (toks, n) = (&items[i].0, items[i].1);
                let len = toks.len() as i64;
                let first = len - n as i64; // first continuation position
                let h = hidden.f_get(row as i64)?.f_narrow(0, first - 1, n as i64)?; // (n, h)
                let logp = self.model.lm_head(&h)?.f_to_kind(Kind::Float)?.f_log_softmax(-1, Kind::Float)?;
                let tgt = Tensor::f_from_slice(&toks[first as usize..])?.f_to_device(self.device())?.f_unsqueeze(1)?;
                let picked = logp.f_gather(1, &tgt, false)?.f_sum(Kind::Double)?.f_double_value(&[])?;
                let greedy = logp.f_argmax(-1, false)?.f_eq_tensor(&tgt.f_squeeze_dim(1)?)?.f_all()?.f_int64_value(&[])? != 0;
                if !picked.is_finite() {
                    anyhow::bail!("log-likelihood is {picked} (not finite) under policy {}", policy.name());
                }
                out[i] = (picked, greedy);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use alloc_token::{AllocT, TopK};

    #[test]
    fn text_nll_from_the_prefix_equals_whole_passes_bit_for_bit() {
        for fixture in ["deepseek_v2/lite_yarn", "mixtral/gqa_window", "qwen2_moe/shared_dense_raw"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures").join(fixture);
            let model = moe_models::load(&dir, Device::Cpu, Kind::Float).unwrap();
            let info = model.info().clone();
            // Three batches of two 32-token rows (the last one short), head chunks that split batches.
            let scorer = Scorer { model: &model, renormalize: Renormalize::Native, batch_tokens: 64, head_chunk: 48 };
            let seqs: Vec<Vec<i64>> =
                (0..5).map(|s| (0..32).map(|i| ((s * 31 + i * 7) % info.vocab_size) as i64).collect()).collect();
            let prefix = scorer.text_prefix(&seqs).unwrap().unwrap();
            let k = info.native_k;
            let policies: Vec<Box<dyn DevicePolicy>> =
                vec![Box::new(TopK::new(k)), Box::new(TopK::new(1)), Box::new(AllocT::new(1.5f64.min(k as f64), k))];
            for p in &policies {
                let mut whole = ActivationMeter::new(&info.moe_layers, info.n_routed_experts);
                let mut from = ActivationMeter::new(&info.moe_layers, info.n_routed_experts);
                let a = scorer.text_nll(p.as_ref(), &seqs, Some(&mut whole)).unwrap();
                let b = scorer.text_nll_from(&prefix, p.as_ref(), Some(&mut from)).unwrap();
                assert_eq!(a.nll.to_bits(), b.nll.to_bits(), "{fixture} {}: {} vs {}", p.name(), a.nll, b.nll);
                assert_eq!(a.tokens, b.tokens);
                let (w, f) = (whole.finish().unwrap(), from.finish().unwrap());
                assert_eq!(w.per_layer, f.per_layer, "{fixture} {}", p.name());
                assert_eq!(w.unique_per_layer, f.unique_per_layer, "{fixture} {}", p.name());
            }
        }
    }
}
