//! Alloc-T on the device, without host synchronisation.
//!
//! The rule is the host reference's ([`crate::alloc_t`]); the tensor formulation:
//! 1. sort each row descending (stable: ties to the lower expert index) and keep the first `cap` columns;
//! 2. every valid token gets its first `floor` experts;
//! 3. the candidates are the columns `floor..cap`, laid out rank-major (`index = rank * T + token`) so that
//!    a stable descending sort of their scores orders them by `(score desc, rank asc, token asc)`;
//!    padding tokens' candidates score -inf and sort last;
//! 4. a candidate is kept iff its position in that order is below `R = round(K_l * T_valid) - floor *
//!    T_valid`, a 0-dim device tensor compared elementwise (no `topk` with a host integer).
//!
//! Per-sequence scope: the sequence ids are made dense (`0..S`) by a sort and a cumulative sum, a second
//! stable sort groups the ordered candidates by sequence, and each candidate's position is taken
//! relative to the start of its sequence and compared with that sequence's own `R`. Every shape depends
//! only on `T`, `E` and the options, so the whole computation can be captured in a CUDA graph.

use tch::{Kind, Tensor};

use super::{empty_selection, prefix_ids, torch, BatchSplit, DeviceBatch, DevicePolicy, DeviceResult};
use crate::alloc_t::{AllocT, Scope, Score};

/// `[T]` i64 dense ids (`0..S`, in increasing order of the original ids) of `[T]` i64 sequence ids.
fn dense_ids(seq: &Tensor) -> Result<Tensor, tch::TchError> {
    let t = seq.size()[0];
    let (sorted, perm) = seq.f_sort_stable(true, 0, false)?;
    let change = sorted.f_narrow(0, 1, t - 1)?.f_ne_tensor(&sorted.f_narrow(0, 0, t - 1)?)?;
    let first = Tensor::f_zeros([1], (Kind::Int64, seq.device()))?;
    let dense_sorted = Tensor::f_cat(&[first, change.f_to_kind(Kind::Int64)?], 0)?.f_cumsum(0, Kind::Int64)?;
    seq.f_zeros_like()?.f_scatter(0, &perm, &dense_sorted)
}

/// `floor(tokens * k_avg + 0.5) - floor * tokens` in i64 for an i64 tensor of valid-token counts: the
/// extra pairs beyond the floors (the host's [`crate::pairs_for`], computed in f64 the same way).
fn extra_pairs(valid_tokens: &Tensor, k_avg: f64, floor: i64) -> Result<Tensor, tch::TchError> {
    let pairs = valid_tokens.f_to_kind(Kind::Double)?.f_mul_scalar(k_avg)?.f_add_scalar(0.5)?.f_floor()?;
    pairs.f_to_kind(Kind::Int64)?.f_sub(&valid_tokens.f_mul_scalar(floor)?)
}

impl AllocT {
    /// `[T]` i64 extra experts (beyond the floor) of each token: steps 3 and 4 of the module doc.
    fn extra_counts(&self, vals: &Tensor, valid: &Tensor, seq: Option<&Tensor>, k_avg: f64) -> Result<Tensor, tch::TchError> {
        let (t, floor, cap) = (vals.size()[0], self.floor as i64, self.cap as i64);
        let c = cap - floor;
        let dev = vals.device();
        let cand = vals.f_narrow(1, floor, c)?; // (t, c)
        let score = match self.score {
            Score::Probability => cand,
            Score::RelativeToTop1 => {
                let top1 = vals.f_narrow(1, 0, 1)?; // (t, 1)
                let zero = Tensor::f_zeros([] as [i64; 0], (Kind::Float, dev))?;
                cand.f_div(&top1)?.f_where_self(&top1.f_gt(0.0)?, &zero)?
            }
        };
        let ninf = Tensor::f_full([] as [i64; 0], f64::NEG_INFINITY, (Kind::Float, dev))?;
        let score = score.f_where_self(&valid.f_unsqueeze(1)?, &ninf)?;
        let flat = score.f_transpose(0, 1)?.f_reshape([-1])?; // (c * t), index = rank * t + token
        let (_, order) = flat.f_sort_stable(true, 0, true)?;
        let valid_i = valid.f_to_kind(Kind::Int64)?;
        let (order, limit) = match (self.scope, seq) {
            (Scope::PerSequence, Some(seq)) => {
                let dense = dense_ids(seq)?; // (t)
                let cand_seq = dense.f_repeat([c])?; // (c * t)
                let (_, by_seq) = cand_seq.f_index_select(0, &order)?.f_sort_stable(true, 0, false)?;
                let order = order.f_index_select(0, &by_seq)?;
                let zeros = Tensor::f_zeros([t], (Kind::Int64, dev))?;
                let valid_s = zeros.f_index_add(0, &dense, &valid_i)?; // (t) valid tokens per sequence
                let cands_s = zeros.f_index_add(0, &dense, &valid_i.f_ones_like()?)?.f_mul_scalar(c)?;
                let start_s = cands_s.f_cumsum(0, Kind::Int64)?.f_sub(&cands_s)?;
                let extra_s = extra_pairs(&valid_s, k_avg, floor)?;
                // A candidate is kept iff pos - start(seq) < R(seq), i.e. pos < start(seq) + R(seq).
                (order, start_s.f_add(&extra_s)?.f_index_select(0, &cand_seq)?)
            }
            _ => (order, extra_pairs(&valid_i.f_sum(Kind::Int64)?, k_avg, floor)?),
        };
        let pos = order.f_zeros_like()?.f_scatter(0, &order, &Tensor::f_arange(c * t, (Kind::Int64, dev))?)?;
        let keep = pos.f_lt_tensor(&limit)?.f_reshape([c, t])?.f_logical_and(&valid.f_unsqueeze(0)?)?;
        keep.f_sum_dim_intlist(0, false, Kind::Int64)
    }
}

impl DevicePolicy for AllocT {
    fn name(&self) -> String {
        alloc_core::routing::RoutingPolicy::name(self)
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.cap
    }

    /// One token (a batch-1 decode step): the token gets `round(K_l)` experts (its floor plus
    /// `round(K_l) - floor` extra pairs), its first ones in sorted order, in either scope: stock top-k.
    /// Several tokens in batch scope, when the budget leaves no choice: `round(K_l * T)` pairs are the
    /// floors alone (top-`floor`) or every token at its cap (top-`cap`), e.g. K_l = 1 with floor 1.
    fn fixed_top_k(&self, layer: usize, tokens: usize) -> Option<usize> {
        let k_avg = self.layer_budget(layer, self.cap).ok()?;
        if tokens == 1 {
            return Some((crate::pairs_for(k_avg, 1) as usize).clamp(self.floor, self.cap));
        }
        let pairs = crate::pairs_for(k_avg, tokens as u64) as usize;
        [self.floor, self.cap].into_iter().find(|&k| self.scope == Scope::Batch && Some(pairs) == k.checked_mul(tokens))
    }

    /// Batch scope: the rule of `extra_counts` for `tokens` valid tokens, `round(K_l * tokens) - floor *
    /// tokens` candidates joining (per-sequence scope needs the sequence ids, so it keeps `None`).
    fn batch_split(&self, layer: usize, tokens: usize) -> Option<BatchSplit> {
        let k_avg = self.layer_budget(layer, self.cap).ok()?;
        let extra = (crate::pairs_for(k_avg, tokens as u64) as usize).checked_sub(self.floor.checked_mul(tokens)?)?;
        (self.scope == Scope::Batch).then_some(BatchSplit {
            floor: self.floor,
            cap: self.cap,
            extra,
            relative_to_top1: self.score == Score::RelativeToTop1,
        })
    }

    /// Batch scope: `round(K_l * tokens)` (the pairs of `v <= tokens` valid tokens, `round(K_l * v)`,
    /// grow with `v`; `floor <= K_l <= cap` keeps the floors and caps inside it). Per-sequence scope
    /// rounds each sequence separately, so it keeps the default (every slot).
    fn max_pairs(&self, layer: usize, tokens: usize) -> usize {
        let all = tokens.saturating_mul(self.cap);
        match (self.scope, self.layer_budget(layer, self.cap)) {
            (Scope::Batch, Ok(k_avg)) => (crate::pairs_for(k_avg, tokens as u64) as usize).min(all),
            _ => all,
        }
    }

    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let (t, e) = batch.shape()?;
        let k_avg = self.layer_budget(layer, e as usize)?;
        if t == 0 {
            return empty_selection(self.cap, batch.probs.device());
        }
        let cap = self.cap as i64;
        // On CUDA: each row's first `cap` sorted experts by one kernel, then the batch-wide selection by
        // kernels (one block for small batches, kernels around one sort for large ones).
        let (vals, idx) = match super::kernels::sorted_prefix(batch.probs, cap)? {
            Some(prefix) => prefix,
            None => torch("alloc_t.sort", batch.probs.f_sort_stable(true, 1, true))?,
        };
        if self.scope == Scope::Batch || batch.seq_ids.is_none() {
            if let Some(ids) = super::kernels::alloc_t_small(self, &vals, &idx, batch.mask, k_avg)? {
                return Ok(ids);
            }
            if let Some(ids) = super::kernels::alloc_t_large(self, &vals, &idx, batch.mask, k_avg)? {
                return Ok(ids);
            }
        }
        let vals = torch("alloc_t.narrow", vals.f_narrow(1, 0, cap))?;
        let valid = batch.valid()?;
        let floors = torch("alloc_t.floor", valid.f_to_kind(Kind::Int64).and_then(|v| v.f_mul_scalar(self.floor as i64)))?;
        let counts = if self.cap > self.floor {
            let extra = torch("alloc_t.candidates", self.extra_counts(&vals, &valid, batch.seq_ids, k_avg))?;
            torch("alloc_t.counts", floors.f_add(&extra))?
        } else {
            floors
        };
        prefix_ids(&idx, cap, &counts, &valid)
    }
}
