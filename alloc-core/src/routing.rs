//! The routing-policy interface: which experts each token gets in one MoE layer.
//!
//! The model computes router probabilities (f32, softmax over all experts) and owns the *mixing rule*
//! (renormalise or not, scaling factor, shared experts). A policy decides only *which* experts: for each
//! token a list of expert ids in decreasing probability, padded with [`NO_EXPERT`]. Every method is a
//! policy: stock top-k, per-layer k from Alloc-L, Alloc-T, top-p, threshold, skip, random.
//!
//! Ties go to the lower expert index; NaN probabilities are an error. This host-slice interface is the
//! specification; `alloc-token`'s tensor implementation must select exactly the same experts.

use crate::error::{Error, Result};

/// Padding marker in a selection: "no expert in this slot".
pub const NO_EXPERT: i64 = -1;

/// One layer's router output for a batch of tokens, on the host.
#[derive(Debug, Clone, Copy)]
pub struct RouterBatch<'a> {
    /// Row-major `[tokens, experts]` probabilities.
    pub probs: &'a [f32],
    /// Number of tokens (rows).
    pub tokens: usize,
    /// Number of experts (columns).
    pub experts: usize,
    /// `mask[t]` is false for padding tokens, which get no experts. `None`: all tokens valid.
    pub mask: Option<&'a [bool]>,
    /// `seq_ids[t]`: the sequence token t belongs to, for policies that can isolate sequences.
    /// `None`: one sequence.
    pub seq_ids: Option<&'a [u32]>,
}

impl<'a> RouterBatch<'a> {
    /// A batch with every token valid and in one sequence.
    pub fn new(probs: &'a [f32], tokens: usize, experts: usize) -> Result<Self> {
        let b = Self { probs, tokens, experts, mask: None, seq_ids: None };
        b.check()?;
        Ok(b)
    }

    /// The same batch with a padding mask (`mask[t]` false: token t is padding), checked.
    pub fn with_mask(self, mask: &'a [bool]) -> Result<Self> {
        let b = Self { mask: Some(mask), ..self };
        b.check()?;
        Ok(b)
    }

    /// The same batch with sequence ids (`seq_ids[t]`: the sequence of token t), checked.
    pub fn with_seq_ids(self, seq_ids: &'a [u32]) -> Result<Self> {
        let b = Self { seq_ids: Some(seq_ids), ..self };
        b.check()?;
        Ok(b)
    }

    /// Check shapes and values: `probs.len() == tokens * experts`, matching mask and sequence ids,
    /// every probability finite and non-negative.
    pub fn check(&self) -> Result<()> {
        if self.experts == 0 {
            return Err(Error::InvalidRouting("zero experts".into()));
        }
        if self.probs.len() != self.tokens * self.experts {
            return Err(Error::InvalidRouting(format!(
                "{} probabilities for {} tokens x {} experts",
                self.probs.len(),
                self.tokens,
                self.experts
            )));
        }
        if let Some(m) = self.mask {
            if m.len() != self.tokens {
                return Err(Error::InvalidRouting(format!(
                    "mask has {} entries for {} tokens",
                    m.len(),
                    self.tokens
                )));
            }
        }
        if let Some(s) = self.seq_ids {
            if s.len() != self.tokens {
                return Err(Error::InvalidRouting(format!(
                    "seq_ids has {} entries for {} tokens",
                    s.len(),
                    self.tokens
                )));
            }
        }
        if let Some(i) = self.probs.iter().position(|p| !p.is_finite() || *p < 0.0) {
            return Err(Error::InvalidRouting(format!(
                "probability of token {} expert {} is {} (must be finite and >= 0)",
                i / self.experts,
                i % self.experts,
                self.probs[i]
            )));
        }
        Ok(())
    }

    /// Row `t` of the probabilities.
    pub fn row(&self, t: usize) -> &'a [f32] {
        &self.probs[t * self.experts..(t + 1) * self.experts]
    }

    /// Whether token `t` is a real token (not padding).
    pub fn is_valid(&self, t: usize) -> bool {
        self.mask.is_none_or(|m| m[t])
    }

    /// Number of valid tokens.
    pub fn valid_tokens(&self) -> usize {
        self.mask.map_or(self.tokens, |m| m.iter().filter(|&&v| v).count())
    }
}

/// A policy's choice for one layer and batch: `[tokens, width]` expert ids, each row in decreasing
/// probability (ties: lower id first), padded at the end with [`NO_EXPERT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Row-major `[tokens, width]` ids.
    pub ids: Vec<i64>,
    /// Number of tokens.
    pub tokens: usize,
    /// Slots per token (the policy's cap).
    pub width: usize,
}

impl Selection {
    /// The chosen ids of token `t`, without padding.
    pub fn token(&self, t: usize) -> &[i64] {
        let row = &self.ids[t * self.width..(t + 1) * self.width];
        let n = row.iter().position(|&e| e == NO_EXPERT).unwrap_or(self.width);
        &row[..n]
    }

    /// Experts per token.
    pub fn counts(&self) -> Vec<u32> {
        (0..self.tokens).map(|t| self.token(t).len() as u32).collect()
    }

    /// Total (token, expert) pairs.
    pub fn total(&self) -> u64 {
        self.ids.iter().filter(|&&e| e != NO_EXPERT).count() as u64
    }

    /// Number of distinct experts touched by the batch.
    pub fn unique_experts(&self) -> u64 {
        let mut ids: Vec<i64> = self.ids.iter().copied().filter(|&e| e != NO_EXPERT).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len() as u64
    }
}

/// A routing method: chooses experts for one MoE layer given its router probabilities.
///
/// `layer` is the model's layer index, so per-layer policies (Alloc-L) can look up their k.
pub trait RoutingPolicy: Send + Sync {
    /// A short name recorded in results (e.g. `topk`, `alloc-t`).
    fn name(&self) -> String;
    /// The largest number of experts any token can get in `layer` (the selection's width).
    fn max_k(&self, layer: usize) -> usize;
    /// Choose experts for every token of the batch.
    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection>;
}

/// Indices of `row` sorted by decreasing probability, ties to the lower index: the order every policy
/// uses, so "a prefix of the token's sorted experts" is well defined.
pub fn sorted_experts(row: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    // Stable sort on descending value keeps lower indices first among equal values. `+ 0.0` turns -0.0
    // into +0.0, so the two zeros tie (as in libtorch's sort) instead of `total_cmp` ordering them.
    idx.sort_by(|&a, &b| (row[b] + 0.0).total_cmp(&(row[a] + 0.0)));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_experts_breaks_ties_to_lower_index() {
        assert_eq!(sorted_experts(&[0.2, 0.4, 0.2, 0.4]), vec![1, 3, 0, 2]);
    }

    #[test]
    fn sorted_experts_treats_negative_zero_as_zero() {
        assert_eq!(sorted_experts(&[0.0, -0.0, 0.5, 0.0]), vec![2, 0, 1, 3]);
    }

    #[test]
    fn batch_check_names_the_bad_probability() {
        let p = [0.5, f32::NAN, 0.3, 0.7];
        let e = RouterBatch::new(&p, 2, 2).unwrap_err().to_string();
        assert!(e.contains("token 0 expert 1"), "{e}");
        assert!(RouterBatch::new(&p[..3], 2, 2).is_err());
    }

    #[test]
    fn selection_accounting() {
        let s = Selection { ids: vec![3, 1, NO_EXPERT, 3, NO_EXPERT, NO_EXPERT], tokens: 2, width: 3 };
        assert_eq!(s.counts(), vec![2, 1]);
        assert_eq!(s.total(), 3);
        assert_eq!(s.unique_experts(), 2);
        assert_eq!(s.token(0), &[3, 1]);
    }
}
