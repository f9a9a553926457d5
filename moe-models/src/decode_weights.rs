//! The weight bytes a batch-1 decode step reads, as a function of the routed activations per token.
//!
//! At batch 1 a decode step is bound by memory: it reads every attention, shared-expert, router, norm and
//! LM-head weight whatever the budget, one row of the token embedding table, and of each MoE layer only
//! the routed experts it activates. So the bytes are `fixed + activations * per_activation`, and the
//! ratio of two budgets' bytes is the most a smaller budget can speed a decode step up (an engine that
//! read every byte at one bandwidth would get exactly that). `eval bench` prints it beside the measured
//! speed-up, with the bandwidth the measured step time implies (bytes / time).

/// [`crate::Model::decode_weights`]: a batch-1 decode step's weight reads (KV cache and activations not
/// included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeWeights {
    /// Bytes read whatever the budget: every weight but the routed experts and the token embedding
    /// table (whose one row is left out; when the LM head shares the table, the table is counted).
    pub fixed: u64,
    /// Bytes of one routed expert of one MoE layer (gate, up and down rows; the mean over the MoE
    /// layers, which are alike in every supported family).
    pub per_activation: u64,
}

impl DecodeWeights {
    /// Bytes a step reads at `activations` routed expert activations per token (summed over MoE layers).
    pub fn at(&self, activations: usize) -> u64 {
        self.fixed + self.per_activation * activations as u64
    }

    /// The most going from `from` to `to` activations per token can speed a step up: `at(from) / at(to)`.
    pub fn bound(&self, from: usize, to: usize) -> f64 {
        self.at(from) as f64 / self.at(to).max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_grow_with_activations_and_the_bound_is_their_ratio() {
        let w = DecodeWeights { fixed: 1000, per_activation: 100 };
        assert_eq!(w.at(0), 1000);
        assert_eq!(w.at(6), 1600);
        assert!((w.bound(6, 3) - 1600.0 / 1300.0).abs() < 1e-12);
        assert_eq!(w.bound(4, 4), 1.0);
    }
}
