//! Per-layer top-k from a [`LayerAllocation`]: how Alloc-L's output applies at run time.

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_core::{LayerAllocation, Result};

use crate::common::{check_width, invalid, prefix_selection};

/// Top-k with k looked up per MoE layer in an allocation (Alloc-L's output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerLayerTopK {
    /// The k of every MoE layer.
    pub allocation: LayerAllocation,
}

impl PerLayerTopK {
    /// Route with the allocation's k in each layer.
    pub fn new(allocation: LayerAllocation) -> Self {
        Self { allocation }
    }

    /// The k of `layer`, or an error naming the allocation's layers.
    pub fn k_of(&self, layer: usize) -> Result<usize> {
        self.allocation.k_of(layer).map(|k| k as usize).ok_or_else(|| {
            invalid(
                "alloc-l",
                layer,
                format!("not in the allocation, which covers layers {:?}", self.allocation.layers),
            )
        })
    }
}

impl RoutingPolicy for PerLayerTopK {
    fn name(&self) -> String {
        "alloc-l".into()
    }

    /// The layer's k; 0 for a layer outside the allocation (its `select` is an error).
    fn max_k(&self, layer: usize) -> usize {
        self.allocation.k_of(layer).map_or(0, |k| k as usize)
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        let k = self.k_of(layer)?;
        check_width("alloc-l", layer, "k", k, batch.experts)?;
        Ok(prefix_selection(batch, k, |_, sorted| sorted.len()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn per_layer_uses_each_layers_k() {
        let p = [0.1, 0.2, 0.3, 0.4];
        let b = RouterBatch::new(&p, 1, 4).unwrap();
        let pol = PerLayerTopK::new(LayerAllocation::new(vec![1, 2], vec![1, 3]).unwrap());
        assert_eq!(pol.select(1, &b).unwrap().ids, vec![3]);
        assert_eq!(pol.select(2, &b).unwrap().ids, vec![3, 2, 1]);
        let e = pol.select(5, &b).unwrap_err().to_string();
        assert!(e.contains("layer 5") && e.contains("[1, 2]"), "{e}");
    }
}
