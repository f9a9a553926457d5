//! Random routing, the ablation: each valid token gets k distinct experts chosen uniformly at random,
//! listed in decreasing probability (ties: lower expert index).
//!
//! The randomness is a counter-based hash of `(seed, layer, token position, expert)` rather than a
//! stateful generator, so the choice is reproducible, independent of batch order of evaluation, and the
//! device computes the same keys with integer tensor ops: expert e of token t has key
//! `mix(mix(layer_key(seed, layer) ^ t) ^ e)` ([`mix32`]), and the k experts with the smallest
//! `(key, expert)` are chosen. Tokens are identified by their position in the batch.

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection, NO_EXPERT};
use alloc_core::Result;

use crate::common::{check_width, expert_order};

const MASK32: u64 = 0xffff_ffff;
/// Multipliers of [`mix32`]: odd and below 2^31, so `x * m` of a 32-bit `x` fits in an i64 on device.
pub(crate) const MIX_MUL: [u64; 2] = [0x7feb_352d, 0x2c1b_3c6d];

/// A 32-bit avalanche mix (xor-shift-multiply) of a value in `0..2^32`.
pub fn mix32(x: u64) -> u64 {
    let mut x = x & MASK32;
    x ^= x >> 16;
    x = (x * MIX_MUL[0]) & MASK32;
    x ^= x >> 15;
    x = (x * MIX_MUL[1]) & MASK32;
    x ^= x >> 16;
    x
}

/// The per-layer key every token's keys derive from (computed on the host, also for the device path).
pub fn layer_key(seed: u64, layer: usize) -> u64 {
    mix32(mix32(mix32(seed & MASK32) ^ (seed >> 32)) ^ (layer as u64 & MASK32))
}

/// The random key of expert `e` for token position `t`.
pub fn expert_key(layer_key: u64, t: usize, e: usize) -> u64 {
    mix32(mix32(layer_key ^ (t as u64 & MASK32)) ^ (e as u64 & MASK32))
}

/// k experts per token, chosen at random (seeded), in decreasing probability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomK {
    /// Experts per token (use the k of the top-k it is compared with).
    pub k: usize,
    /// Seed of the hash.
    pub seed: u64,
}

impl RandomK {
    /// Random routing with k experts per token.
    pub fn new(k: usize, seed: u64) -> Self {
        Self { k, seed }
    }
}

impl RoutingPolicy for RandomK {
    fn name(&self) -> String {
        "random".into()
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        check_width("random", layer, "k", self.k, batch.experts)?;
        let lk = layer_key(self.seed, layer);
        let mut ids = vec![NO_EXPERT; batch.tokens * self.k];
        for t in (0..batch.tokens).filter(|&t| batch.is_valid(t)) {
            let mut by_key: Vec<(u64, usize)> = (0..batch.experts).map(|e| (expert_key(lk, t, e), e)).collect();
            by_key.sort_unstable();
            let row = batch.row(t);
            let mut chosen: Vec<usize> = by_key[..self.k].iter().map(|&(_, e)| e).collect();
            chosen.sort_unstable_by(|&a, &b| expert_order((row[a], a), (row[b], b)));
            for (slot, e) in ids[t * self.k..].iter_mut().zip(chosen) {
                *slot = e as i64;
            }
        }
        Ok(Selection { ids, tokens: batch.tokens, width: self.k })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn random_is_seeded_and_sorted_by_probability() {
        let p: Vec<f32> = (0..64).map(|i| i as f32 / 2016.0).collect();
        let b = RouterBatch::new(&p, 1, 64).unwrap();
        let a = RandomK::new(6, 7).select(0, &b).unwrap();
        assert_eq!(a, RandomK::new(6, 7).select(0, &b).unwrap());
        assert_ne!(a, RandomK::new(6, 8).select(0, &b).unwrap());
        assert_ne!(a, RandomK::new(6, 7).select(1, &b).unwrap());
        let ids = a.token(0);
        assert_eq!(ids.len(), 6);
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    }

    #[test]
    fn random_covers_experts_evenly() {
        // 4000 tokens x 2 of 8 experts: each expert expects 1000 hits; allow 15%.
        let p = vec![0.125f32; 4000 * 8];
        let b = RouterBatch::new(&p, 4000, 8).unwrap();
        let s = RandomK::new(2, 1).select(3, &b).unwrap();
        let mut hits = [0u32; 8];
        for &e in &s.ids {
            hits[e as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (850..1150).contains(&h)), "{hits:?}");
    }
}
