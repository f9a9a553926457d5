//! Alloc-T: one layer's activation budget spread over the batch's tokens by routing score.
//!
//! A layer with average budget `K_l` (experts per token, possibly fractional) and `T` valid tokens gets
//! exactly `round(K_l * T)` (token, expert) pairs, where round is half-up, computed in f64 as
//! `floor(K_l * T + 0.5)` ([`pairs_for`]). Every valid token first gets its `floor` most probable experts
//! (mandatory); the remaining `R = round(K_l * T) - floor * T` pairs go to the highest-scoring
//! *candidates*, the (token, rank) pairs with `floor <= rank < cap`, ordered by
//! `(score desc, rank asc, token asc)`. Within a token scores never increase with rank and equal scores
//! go to the lower rank, so every token's set is a prefix of its sorted experts and the total score is
//! maximal. This order is a total order, so the selection is unique and the device path
//! (`device::alloc_t`) reproduces it exactly.
//!
//! Feasibility does not depend on the batch: `floor <= K_l <= cap` (and `cap <= E`) is required, and then
//! `floor * T <= round(K_l * T) <= cap * T` for every T. With `T = 1` and an integer `K_l` this is top-`K_l`.
//! Scope [`Scope::PerSequence`] applies the rule to each sequence's tokens separately (its own `T`), so one
//! request never changes another's routing.

use std::collections::BTreeMap;

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection, NO_EXPERT};
use alloc_core::{LayerAllocation, Result};
use rayon::prelude::*;

use crate::common::{check_width, invalid, sorted_prefix};

/// Where a layer's average budget `K_l` comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerBudget {
    /// The same `K_l` in every layer (may be fractional, e.g. 2.5).
    Uniform(f64),
    /// `K_l` = the layer's k in an Alloc-L allocation (Alloc-L+T).
    Allocation(LayerAllocation),
    /// `K_l` per layer, possibly fractional (Alloc-L+T on a fractional allocation: `k[i]` is the
    /// average budget of model layer `layers[i]`). Lets a top-2 model redistribute inside a layer, which
    /// an integer K_l in {1, 2} with floor 1 and cap 2 cannot.
    PerLayer {
        /// Model layer indices.
        layers: Vec<usize>,
        /// Average experts per token of each layer.
        k: Vec<f64>,
    },
}

/// What Alloc-T ranks candidate (token, expert) pairs by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Score {
    /// The router probability `p`.
    #[default]
    Probability,
    /// `p / p_top1` in f32, the probability relative to the token's most probable expert (0 when
    /// `p_top1 = 0`), which compares tokens by how peaked their distribution is.
    RelativeToTop1,
}

/// Which tokens share one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// All valid tokens of the batch share `round(K_l * T)`.
    #[default]
    Batch,
    /// Each sequence (by `seq_ids`) gets `round(K_l * T_s)` for its own `T_s` valid tokens; without
    /// `seq_ids` the batch is one sequence.
    PerSequence,
}

/// Alloc-T (and, with [`LayerBudget::Allocation`], Alloc-L+T).
#[derive(Debug, Clone, PartialEq)]
pub struct AllocT {
    /// The layer's average experts per token.
    pub budget: LayerBudget,
    /// Experts every valid token gets at least (default 1; 0 allowed).
    pub floor: usize,
    /// Experts a token gets at most (default the model's native top-k); the selection width.
    pub cap: usize,
    /// The ranking score of candidates.
    pub score: Score,
    /// Batch-wide or per-sequence budget.
    pub scope: Scope,
}

/// `round(K_l * T)` with halves up, in f64: the exact number of pairs Alloc-T selects.
pub fn pairs_for(k_avg: f64, valid_tokens: u64) -> u64 {
    // INVARIANT: callers check k_avg is finite and >= 0, so the product is finite and >= 0.
    (k_avg * valid_tokens as f64 + 0.5).floor() as u64
}

impl Score {
    /// The score of probability `p` in a row whose largest probability is `top1` (f32, as on device).
    pub fn of(self, p: f32, top1: f32) -> f32 {
        match self {
            Score::Probability => p,
            Score::RelativeToTop1 if top1 > 0.0 => p / top1,
            Score::RelativeToTop1 => 0.0,
        }
    }
}

impl AllocT {
    /// Alloc-T with average budget `k_avg` in every layer, floor 1, cap `native_k`, probability score,
    /// batch scope.
    pub fn new(k_avg: f64, native_k: usize) -> Self {
        Self { budget: LayerBudget::Uniform(k_avg), floor: 1, cap: native_k, score: Score::Probability, scope: Scope::Batch }
    }

    /// Alloc-L+T: each layer's average budget is its k in `allocation`; floor 1, cap `native_k`.
    pub fn from_allocation(allocation: LayerAllocation, native_k: usize) -> Self {
        Self { budget: LayerBudget::Allocation(allocation), ..Self::new(0.0, native_k) }
    }

    /// Alloc-L+T on a fractional allocation: layer `layers[i]` averages `k[i]` experts per token; floor 1,
    /// cap `native_k`. The lists must have the same length (checked when a layer is routed).
    pub fn per_layer(layers: Vec<usize>, k: Vec<f64>, native_k: usize) -> Self {
        Self { budget: LayerBudget::PerLayer { layers, k }, ..Self::new(0.0, native_k) }
    }

    /// The same policy with another floor.
    pub fn with_floor(self, floor: usize) -> Self {
        Self { floor, ..self }
    }

    /// The same policy with another cap.
    pub fn with_cap(self, cap: usize) -> Self {
        Self { cap, ..self }
    }

    /// The same policy with another score.
    pub fn with_score(self, score: Score) -> Self {
        Self { score, ..self }
    }

    /// The same policy with another scope.
    pub fn with_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }

    /// Check the options for `layer` with `experts` router outputs and return `K_l`:
    /// `floor <= cap <= experts` and `floor <= K_l <= cap`, `K_l` finite.
    pub fn layer_budget(&self, layer: usize, experts: usize) -> Result<f64> {
        let name = self.name();
        let k_avg = match &self.budget {
            LayerBudget::Uniform(k) => *k,
            LayerBudget::Allocation(a) => f64::from(a.k_of(layer).ok_or_else(|| {
                invalid(&name, layer, format!("not in the allocation, which covers layers {:?}", a.layers))
            })?),
            LayerBudget::PerLayer { layers, k } => {
                if layers.len() != k.len() {
                    return Err(invalid(&name, layer, format!("{} layers but {} average budgets", layers.len(), k.len())));
                }
                let i = layers.iter().position(|&l| l == layer).ok_or_else(|| {
                    invalid(&name, layer, format!("not in the allocation, which covers layers {layers:?}"))
                })?;
                k[i]
            }
        };
        if self.floor > self.cap {
            return Err(invalid(&name, layer, format!("floor = {} exceeds cap = {}", self.floor, self.cap)));
        }
        check_width(&name, layer, "cap", self.cap, experts)?;
        if !k_avg.is_finite() || k_avg < self.floor as f64 || k_avg > self.cap as f64 {
            return Err(invalid(
                &name,
                layer,
                format!(
                    "average budget K = {k_avg} experts per token is outside [floor, cap] = [{}, {}]: \
                     round(K x T) pairs cannot be spread over T tokens with {} to {} experts each",
                    self.floor, self.cap, self.floor, self.cap
                ),
            ));
        }
        Ok(k_avg)
    }

    /// Groups of token indices (ascending) that share one budget.
    fn groups(&self, batch: &RouterBatch<'_>) -> Vec<Vec<usize>> {
        match (self.scope, batch.seq_ids) {
            (Scope::PerSequence, Some(seq)) => {
                let mut by_seq: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for (t, &s) in seq.iter().enumerate() {
                    by_seq.entry(s).or_default().push(t);
                }
                by_seq.into_values().collect()
            }
            _ => vec![(0..batch.tokens).collect()],
        }
    }
}

impl RoutingPolicy for AllocT {
    fn name(&self) -> String {
        match self.budget {
            LayerBudget::Uniform(_) => "alloc-t".into(),
            LayerBudget::Allocation(_) | LayerBudget::PerLayer { .. } => "alloc-lt".into(),
        }
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.cap
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        let k_avg = self.layer_budget(layer, batch.experts)?;
        let (floor, cap) = (self.floor, self.cap);
        let sorted: Vec<Vec<usize>> = (0..batch.tokens)
            .into_par_iter()
            .map(|t| if batch.is_valid(t) { sorted_prefix(batch.row(t), cap) } else { Vec::new() })
            .collect();
        let mut counts = vec![0usize; batch.tokens];
        for group in self.groups(batch) {
            let valid: Vec<usize> = group.into_iter().filter(|&t| batch.is_valid(t)).collect();
            let pairs = pairs_for(k_avg, valid.len() as u64) as usize;
            // INVARIANT (checked by layer_budget): floor <= K_l <= cap, so floor*T <= pairs <= cap*T.
            let extra = pairs.checked_sub(floor * valid.len()).ok_or_else(|| {
                invalid(&self.name(), layer, format!("{pairs} pairs below floor x {} tokens", valid.len()))
            })?;
            // Candidates (score, rank, token), best first under (score desc, rank asc, token asc).
            let mut cand: Vec<(f32, usize, usize)> = Vec::with_capacity(valid.len() * (cap - floor));
            for &t in &valid {
                counts[t] = floor;
                let row = batch.row(t);
                let top1 = sorted[t].first().map_or(0.0, |&e| row[e]);
                for (rank, &e) in sorted[t].iter().enumerate().skip(floor) {
                    cand.push((self.score.of(row[e], top1), rank, t));
                }
            }
            if extra > cand.len() {
                return Err(invalid(&self.name(), layer, format!("{pairs} pairs exceed cap x {} tokens", valid.len())));
            }
            let better = |a: &(f32, usize, usize), b: &(f32, usize, usize)| {
                (b.0 + 0.0).total_cmp(&(a.0 + 0.0)).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
            };
            if extra > 0 && extra < cand.len() {
                cand.select_nth_unstable_by(extra - 1, better);
            }
            for &(_, _, t) in &cand[..extra] {
                counts[t] += 1;
            }
        }
        let mut ids = vec![NO_EXPERT; batch.tokens * cap];
        for (t, &n) in counts.iter().enumerate() {
            for (slot, &e) in ids[t * cap..].iter_mut().zip(&sorted[t][..n]) {
                *slot = e as i64;
            }
        }
        Ok(Selection { ids, tokens: batch.tokens, width: cap })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn pairs_round_half_up() {
        assert_eq!(pairs_for(2.5, 3), 8);
        assert_eq!(pairs_for(2.5, 1), 3);
        assert_eq!(pairs_for(1.2, 2), 2);
        assert_eq!(pairs_for(1.25, 2), 3);
        assert_eq!(pairs_for(3.0, 0), 0);
    }

    #[test]
    fn peaked_tokens_give_activations_to_flat_ones() {
        // Token 0 is peaked, token 1 flat: at K = 2 with cap 3, token 1 takes the pair token 0 gives up.
        let p = [0.9, 0.05, 0.03, 0.02, 0.3, 0.3, 0.25, 0.15];
        let b = RouterBatch::new(&p, 2, 4).unwrap();
        let s = AllocT::new(2.0, 3).select(0, &b).unwrap();
        assert_eq!(s.token(0), &[0]);
        assert_eq!(s.token(1), &[0, 1, 2]);
        assert_eq!(s.total(), 4);
    }

    #[test]
    fn relative_score_ranks_by_peakedness() {
        // Probability score: token 1's second expert (0.4) beats token 0's (0.3). Relative score:
        // 0.3/0.35 beats 0.4/0.6, so token 0 gets it.
        let p = [0.35, 0.3, 0.2, 0.15, 0.6, 0.4, 0.0, 0.0];
        let b = RouterBatch::new(&p, 2, 4).unwrap();
        let abs = AllocT::new(1.5, 4).select(0, &b).unwrap();
        assert_eq!(abs.counts(), vec![1, 2]);
        let rel = AllocT::new(1.5, 4).with_score(Score::RelativeToTop1).select(0, &b).unwrap();
        assert_eq!(rel.counts(), vec![2, 1]);
    }

    #[test]
    fn per_sequence_scope_isolates_sequences() {
        let p = [0.9, 0.1, 0.5, 0.5, 0.5, 0.5];
        let seq = [0, 1, 1];
        let b = RouterBatch::new(&p, 3, 2).unwrap().with_seq_ids(&seq).unwrap();
        // Batch scope: round(1.5 * 3) = 5 pairs, and the peaked token 0 gives its second slot to the
        // flat sequence. Per sequence: round(1.5 * 1) + round(1.5 * 2) = 2 + 3, so token 0 keeps 2.
        let batch = AllocT::new(1.5, 2).select(0, &b).unwrap();
        assert_eq!(batch.counts(), vec![1, 2, 2]);
        let iso = AllocT::new(1.5, 2).with_scope(Scope::PerSequence).select(0, &b).unwrap();
        assert_eq!(iso.counts(), vec![2, 2, 1]);
    }

    #[test]
    fn budget_outside_floor_and_cap_is_an_error() {
        let p = [0.5, 0.5];
        let b = RouterBatch::new(&p, 1, 2).unwrap();
        let e = AllocT::new(2.5, 2).select(3, &b).unwrap_err().to_string();
        assert!(e.contains("layer 3") && e.contains("K = 2.5") && e.contains("[1, 2]"), "{e}");
        let e = AllocT::new(0.5, 2).select(3, &b).unwrap_err().to_string();
        assert!(e.contains("K = 0.5"), "{e}");
        assert!(AllocT::new(0.5, 2).with_floor(0).select(3, &b).is_ok());
        let e = AllocT::new(2.0, 3).select(3, &b).unwrap_err().to_string();
        assert!(e.contains("cap = 3"), "{e}");
    }

    #[test]
    fn alloc_lt_takes_k_from_the_allocation() {
        let p = [0.4, 0.3, 0.2, 0.1];
        let b = RouterBatch::new(&p, 1, 4).unwrap();
        let pol = AllocT::from_allocation(LayerAllocation::new(vec![1, 2], vec![1, 3]).unwrap(), 4);
        assert_eq!(pol.select(2, &b).unwrap().token(0), &[0, 1, 2]);
        assert_eq!(pol.select(1, &b).unwrap().token(0), &[0]);
        assert!(pol.select(7, &b).is_err());
    }

    #[test]
    fn fractional_per_layer_budget_redistributes_inside_a_top2_layer() {
        // Top-2 model, K_l = 1.5 in layer 4 and 1 in layer 5: over two tokens layer 4 selects
        // round(1.5 x 2) = 3 pairs (the flat token gets the second expert), layer 5 exactly top-1.
        let p = [0.9, 0.1, 0.0, 0.55, 0.45, 0.0];
        let b = RouterBatch::new(&p, 2, 3).unwrap();
        let pol = AllocT::per_layer(vec![4, 5], vec![1.5, 1.0], 2);
        let s4 = pol.select(4, &b).unwrap();
        assert_eq!((s4.token(0), s4.token(1)), (&[0i64][..], &[0i64, 1][..]));
        assert_eq!(pol.select(5, &b).unwrap().total(), 2);
        let e = pol.select(6, &b).unwrap_err().to_string();
        assert!(e.contains("layer 6") && e.contains("[4, 5]"), "{e}");
        let e = AllocT::per_layer(vec![4], vec![2.5], 2).select(4, &b).unwrap_err().to_string();
        assert!(e.contains("K = 2.5"), "{e}");
        let e = AllocT::per_layer(vec![4, 5], vec![1.5], 2).select(4, &b).unwrap_err().to_string();
        assert!(e.contains("2 layers but 1"), "{e}");
    }
}
