//! Threshold routing: each token keeps every expert with probability at least tau, at least `min_k`
//! and at most `max_k` of them (the most probable ones; ties to the lower expert index).
//!
//! The comparison `p_j >= tau` is in f32, so host and device agree exactly.

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_core::Result;

use crate::common::{check_width, invalid, prefix_selection};

/// Probability-threshold routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// Keep experts with `p >= tau` (f32, finite, >= 0).
    pub tau: f32,
    /// Experts every valid token gets at least.
    pub min_k: usize,
    /// Experts a token gets at most; the selection width.
    pub max_k: usize,
}

impl Threshold {
    /// Threshold tau with bounds `[min_k, max_k]`.
    pub fn new(tau: f32, min_k: usize, max_k: usize) -> Self {
        Self { tau, min_k, max_k }
    }

    pub(crate) fn check(&self, layer: usize, experts: usize) -> Result<()> {
        if !(self.tau.is_finite() && self.tau >= 0.0) {
            return Err(invalid("threshold", layer, format!("tau = {} must be finite and >= 0", self.tau)));
        }
        if self.min_k > self.max_k {
            return Err(invalid(
                "threshold",
                layer,
                format!("min_k = {} exceeds max_k = {}", self.min_k, self.max_k),
            ));
        }
        check_width("threshold", layer, "max_k", self.max_k, experts)
    }
}

impl RoutingPolicy for Threshold {
    fn name(&self) -> String {
        "threshold".into()
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.max_k
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        self.check(layer, batch.experts)?;
        Ok(prefix_selection(batch, self.max_k, |_, sorted| {
            sorted.iter().filter(|&&(_, p)| p >= self.tau).count().clamp(self.min_k, self.max_k)
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn threshold_keeps_experts_above_tau_within_bounds() {
        let p = [0.5, 0.3, 0.15, 0.05];
        let b = RouterBatch::new(&p, 1, 4).unwrap();
        assert_eq!(Threshold::new(0.15, 1, 4).select(0, &b).unwrap().token(0), &[0, 1, 2]);
        assert_eq!(Threshold::new(0.9, 1, 4).select(0, &b).unwrap().token(0), &[0]);
        assert_eq!(Threshold::new(0.9, 0, 4).select(0, &b).unwrap().token(0), &[] as &[i64]);
        assert_eq!(Threshold::new(0.0, 1, 2).select(0, &b).unwrap().token(0), &[0, 1]);
        assert!(Threshold::new(f32::NAN, 1, 2).select(0, &b).is_err());
    }
}
