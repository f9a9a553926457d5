//! Stock top-k: every valid token gets its k most probable experts (ties: lower expert index).

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_core::Result;

use crate::common::{check_width, prefix_selection};

/// Stock top-k routing with a fixed k for every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopK {
    /// Experts per token (0: only shared experts run).
    pub k: usize,
}

impl TopK {
    /// Top-k with the given k.
    pub fn new(k: usize) -> Self {
        Self { k }
    }
}

impl RoutingPolicy for TopK {
    fn name(&self) -> String {
        "topk".into()
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        check_width("topk", layer, "k", self.k, batch.experts)?;
        Ok(prefix_selection(batch, self.k, |_, sorted| sorted.len()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use alloc_core::routing::NO_EXPERT;

    #[test]
    fn topk_takes_the_k_largest_ties_to_lower_index() {
        let p = [0.1, 0.4, 0.1, 0.4, 0.25, 0.25, 0.25, 0.25];
        let mask = [true, false];
        let b = RouterBatch::new(&p, 2, 4).unwrap().with_mask(&mask).unwrap();
        let s = TopK::new(3).select(0, &b).unwrap();
        assert_eq!(s.ids, vec![1, 3, 0, NO_EXPERT, NO_EXPERT, NO_EXPERT]);
    }

    #[test]
    fn topk_rejects_k_above_expert_count() {
        let p = [0.5, 0.5];
        let b = RouterBatch::new(&p, 1, 2).unwrap();
        let e = TopK::new(3).select(4, &b).unwrap_err().to_string();
        assert!(e.contains("layer 4") && e.contains("k = 3"), "{e}");
    }
}
