//! Random router batches for the property tests: coarse probability levels (so ties are common), zeros
//! and -0.0, padding masks, sequence ids, T = 0 and T = 1.

#![allow(dead_code)]

use proptest::prelude::*;

/// One generated layer input.
#[derive(Debug, Clone)]
pub struct Case {
    /// Row-major `[tokens, experts]` probabilities (not necessarily normalised).
    pub probs: Vec<f32>,
    /// Tokens.
    pub tokens: usize,
    /// Experts.
    pub experts: usize,
    /// Padding mask, if any.
    pub mask: Option<Vec<bool>>,
    /// Sequence ids (small, unordered), if any.
    pub seq: Option<Vec<u32>>,
}

/// A probability: one of a few coarse levels (ties), a signed zero, or a fine random value.
fn prob() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => (0u8..6).prop_map(|l| f32::from(l) / 8.0),
        1 => Just(-0.0f32),
        3 => 0.0f32..1.0,
    ]
}

/// Cases with 0..=max_t tokens and 1..=max_e experts.
pub fn case(max_t: usize, max_e: usize) -> impl Strategy<Value = Case> {
    case_in(0, max_t, 1, max_e, None)
}

/// Cases with tokens in `min_t..=max_t`, experts in `min_e..=max_e`; `seq`: force sequence ids on or
/// off (`None`: either).
pub fn case_in(min_t: usize, max_t: usize, min_e: usize, max_e: usize, seq: Option<bool>) -> impl Strategy<Value = Case> {
    let has_seq = match seq {
        Some(b) => Just(b).boxed(),
        None => any::<bool>().boxed(),
    };
    (min_t..=max_t, min_e..=max_e, any::<bool>(), has_seq).prop_flat_map(|(t, e, has_mask, has_seq)| {
        (
            proptest::collection::vec(prob(), t * e),
            proptest::collection::vec(prop::bool::weighted(0.8), t),
            proptest::collection::vec(0u32..4, t),
        )
            .prop_map(move |(probs, mask, seq)| Case {
                probs,
                tokens: t,
                experts: e,
                mask: has_mask.then_some(mask),
                seq: has_seq.then_some(seq),
            })
    })
}

impl Case {
    /// The host batch.
    pub fn batch(&self) -> alloc_core::routing::RouterBatch<'_> {
        alloc_core::routing::RouterBatch {
            probs: &self.probs,
            tokens: self.tokens,
            experts: self.experts,
            mask: self.mask.as_deref(),
            seq_ids: self.seq.as_deref(),
        }
    }

    /// Whether token t is valid.
    pub fn valid(&self, t: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[t])
    }

    /// Row t.
    pub fn row(&self, t: usize) -> &[f32] {
        &self.probs[t * self.experts..(t + 1) * self.experts]
    }
}
