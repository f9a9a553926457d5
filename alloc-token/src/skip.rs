//! NAEE-style dynamic skipping (Lu et al., "Not All Experts are Equal", 2024): among a token's native
//! top-k experts, drop expert j when `p_j < beta * p_top1`; the top-1 is always kept.
//!
//! `beta * p_top1` is computed in f32, so host and device agree exactly.

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_core::Result;

use crate::common::{check_width, invalid, prefix_selection};

/// Dynamic expert skipping relative to the token's top-1 probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    /// Relative threshold in [0, 1] (0: plain top-k).
    pub beta: f32,
    /// The native top-k the skipping starts from; the selection width.
    pub k: usize,
}

impl Skip {
    /// Skip with threshold `beta` within the top `k`.
    pub fn new(beta: f32, k: usize) -> Self {
        Self { beta, k }
    }

    pub(crate) fn check(&self, layer: usize, experts: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.beta) {
            return Err(invalid("skip", layer, format!("beta = {} is outside [0, 1]", self.beta)));
        }
        if self.k == 0 {
            return Err(invalid("skip", layer, "k = 0: skipping keeps at least one expert"));
        }
        check_width("skip", layer, "k", self.k, experts)
    }
}

impl RoutingPolicy for Skip {
    fn name(&self) -> String {
        "skip".into()
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        self.check(layer, batch.experts)?;
        Ok(prefix_selection(batch, self.k, |_, sorted| {
            let cut = self.beta * sorted.first().map_or(0.0, |&(_, p)| p);
            sorted.iter().filter(|&&(_, p)| p >= cut).count().max(1)
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn skip_drops_experts_far_below_the_top1() {
        let p = [0.6, 0.25, 0.1, 0.05, 0.3, 0.3, 0.2, 0.2];
        let b = RouterBatch::new(&p, 2, 4).unwrap();
        let s = Skip::new(0.5, 2).select(0, &b).unwrap();
        assert_eq!(s.token(0), &[0]);
        assert_eq!(s.token(1), &[0, 1]);
        assert_eq!(Skip::new(0.0, 3).select(0, &b).unwrap().counts(), vec![3, 3]);
        assert!(Skip::new(1.5, 2).select(0, &b).is_err());
    }
}
