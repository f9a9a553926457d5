//! Realized-activation accounting: what a run actually used, per MoE layer.
//!
//! Mean activations per token is what the budget constrains; unique experts touched per batch is what
//! drives decode cost when several sequences are decoded together (each touched expert's weights are
//! read once per step).

use serde::{Deserialize, Serialize};

/// Statistics of one MoE layer over a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerActivationStats {
    /// The model's layer index.
    pub layer: usize,
    /// Valid (non-padding) tokens routed through the layer.
    pub tokens: u64,
    /// Routed (token, expert) pairs.
    pub activations: u64,
    /// `histogram[j]` = number of tokens that got exactly j experts.
    pub histogram: Vec<u64>,
    /// Sum over batches of the number of distinct experts the batch touched.
    pub unique_experts_sum: u64,
    /// Number of batches recorded (for the mean of unique experts).
    pub batches: u64,
}

impl LayerActivationStats {
    /// A fresh record for `layer`.
    pub fn new(layer: usize) -> Self {
        Self { layer, ..Self::default() }
    }

    /// Add one batch: `counts[t]` experts for each valid token, `unique` distinct experts touched.
    pub fn record_batch(&mut self, counts: &[u32], unique: u64) {
        for &c in counts {
            let c = c as usize;
            if self.histogram.len() <= c {
                self.histogram.resize(c + 1, 0);
            }
            self.histogram[c] += 1;
            self.activations += c as u64;
        }
        self.tokens += counts.len() as u64;
        self.unique_experts_sum += unique;
        self.batches += 1;
    }

    /// Mean routed experts per token (0 when no token was recorded).
    pub fn mean_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.activations as f64 / self.tokens as f64
        }
    }

    /// Mean distinct experts touched per batch.
    pub fn mean_unique_experts(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.unique_experts_sum as f64 / self.batches as f64
        }
    }

    /// Merge another record of the same layer into this one.
    pub fn merge(&mut self, other: &Self) {
        if self.histogram.len() < other.histogram.len() {
            self.histogram.resize(other.histogram.len(), 0);
        }
        for (a, b) in self.histogram.iter_mut().zip(&other.histogram) {
            *a += b;
        }
        self.tokens += other.tokens;
        self.activations += other.activations;
        self.unique_experts_sum += other.unique_experts_sum;
        self.batches += other.batches;
    }
}

/// Per-layer statistics of a whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RealizedActivations {
    /// One record per MoE layer, in model order.
    pub layers: Vec<LayerActivationStats>,
}

impl RealizedActivations {
    /// Empty statistics for the given MoE layers.
    pub fn for_layers(layers: &[usize]) -> Self {
        Self { layers: layers.iter().map(|&l| LayerActivationStats::new(l)).collect() }
    }

    /// Mean routed activations per token summed over layers: the realized budget.
    pub fn per_token_total(&self) -> f64 {
        self.layers.iter().map(LayerActivationStats::mean_per_token).sum()
    }

    /// Mutable record of model layer `layer`, if present.
    pub fn layer_mut(&mut self, layer: usize) -> Option<&mut LayerActivationStats> {
        self.layers.iter_mut().find(|s| s.layer == layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_sums_and_means() {
        let mut r = RealizedActivations::for_layers(&[1, 2]);
        r.layer_mut(1).unwrap().record_batch(&[1, 2, 3], 5);
        r.layer_mut(2).unwrap().record_batch(&[6, 6], 8);
        assert_eq!(r.layers[0].histogram, vec![0, 1, 1, 1]);
        assert!((r.per_token_total() - 8.0).abs() < 1e-12);
        assert!((r.layers[1].mean_unique_experts() - 8.0).abs() < 1e-12);
    }
}
