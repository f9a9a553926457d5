//! A layer allocation: the top-k each MoE layer runs with (Alloc-L's output, a routing policy's input).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::SCHEMA_VERSION;

/// The k chosen for each MoE layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerAllocation {
    /// Format version; this build reads [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The model's layer indices (MoE layers only), in model order.
    pub layers: Vec<usize>,
    /// `k[i]` is the top-k of `layers[i]`.
    pub k: Vec<u32>,
}

impl LayerAllocation {
    /// An allocation from parallel lists of layer indices and k values.
    pub fn new(layers: Vec<usize>, k: Vec<u32>) -> Result<Self> {
        if layers.len() != k.len() {
            return Err(Error::InvalidAllocation(format!(
                "{} layers but {} k values",
                layers.len(),
                k.len()
            )));
        }
        Ok(Self { schema_version: SCHEMA_VERSION, layers, k })
    }

    /// Every layer at the same k (stock top-k).
    pub fn uniform(layers: Vec<usize>, k: u32) -> Self {
        let n = layers.len();
        Self { schema_version: SCHEMA_VERSION, layers, k: vec![k; n] }
    }

    /// Total routed activations per token.
    pub fn total(&self) -> u32 {
        self.k.iter().sum()
    }

    /// The k of model layer `layer`, if it is one of the allocation's layers.
    pub fn k_of(&self, layer: usize) -> Option<u32> {
        self.layers.iter().position(|&l| l == layer).map(|i| self.k[i])
    }

    /// Check the allocation against a model: the same MoE layers in the same order, and every k in
    /// `0..=max_k` (k = 0 means only shared experts run; `max_k` is usually the expert count).
    pub fn validate(&self, moe_layers: &[usize], max_k: u32) -> Result<()> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                what: "layer allocation",
                found: self.schema_version,
                expected: SCHEMA_VERSION,
            });
        }
        if self.layers.len() != self.k.len() {
            return Err(Error::InvalidAllocation(format!(
                "{} layers but {} k values",
                self.layers.len(),
                self.k.len()
            )));
        }
        if self.layers != moe_layers {
            return Err(Error::InvalidAllocation(format!(
                "allocation covers layers {:?} but the model's MoE layers are {:?}",
                self.layers, moe_layers
            )));
        }
        if let Some((l, k)) = self.layers.iter().zip(&self.k).find(|(_, &k)| k > max_k) {
            return Err(Error::InvalidAllocation(format!(
                "layer {l}: k = {k} exceeds the model's limit of {max_k}"
            )));
        }
        Ok(())
    }

    /// Parse and check the schema version (model limits are checked by [`Self::validate`]).
    pub fn from_json(text: &str) -> Result<Self> {
        let a: Self = serde_json::from_str(text)
            .map_err(|source| Error::Json { what: "layer allocation", source })?;
        if a.layers.len() != a.k.len() {
            return Err(Error::InvalidAllocation(format!(
                "{} layers but {} k values",
                a.layers.len(),
                a.k.len()
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_offending_layer() {
        let a = LayerAllocation::new(vec![1, 2], vec![3, 9]).unwrap();
        let e = a.validate(&[1, 2], 8).unwrap_err().to_string();
        assert!(e.contains("layer 2") && e.contains("k = 9"), "{e}");
        let e = a.validate(&[1, 2, 3], 64).unwrap_err().to_string();
        assert!(e.contains("MoE layers"), "{e}");
        assert_eq!(a.total(), 12);
        assert_eq!(a.k_of(2), Some(9));
    }

    #[test]
    fn json_round_trip() {
        let a = LayerAllocation::uniform(vec![1, 2, 3], 6);
        let b = LayerAllocation::from_json(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(a, b);
    }
}
