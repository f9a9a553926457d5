//! Top-p (nucleus) routing: each token keeps the smallest prefix of its sorted experts whose mass
//! reaches a fraction p of the row's mass, clamped to `[min_k, max_k]`.
//!
//! Masses are summed in fixed point so the sum is exact and independent of summation order, which makes
//! host and device (whose parallel scans add in another order) agree bit for bit: expert j's mass is
//! `m_j = floor((p_j / p_top1) * 2^32)` with the division in f32 (`m_j = 0` when `p_top1 = 0`), an i64.
//! Expert at rank r is kept iff the mass strictly before it, `M_r = sum_{s<r} m_s`, satisfies
//! `M_r < p * M` in f64, where `M` is the row's total mass. Dividing by `p_top1` makes the rule
//! scale-free, so unnormalised rows behave like their normalised versions.

use alloc_core::routing::{RouterBatch, RoutingPolicy, Selection};
use alloc_core::Result;

use crate::common::{check_width, invalid, prefix_selection, sorted_prefix};

/// Fixed-point scale of expert masses (`2^32`).
pub(crate) const MASS_SCALE: f32 = 4_294_967_296.0;

/// Fixed-point mass of probability `p` in a row whose largest probability is `top1`.
pub(crate) fn fixed_mass(p: f32, top1: f32) -> i64 {
    if top1 > 0.0 {
        // At most 2^32, exactly representable; `as` truncates the already-floored value.
        ((p / top1) * MASS_SCALE).floor() as i64
    } else {
        0
    }
}

/// Top-p routing with bounds on the experts per token.
#[derive(Debug, Clone, PartialEq)]
pub struct TopP {
    /// The mass fraction to reach, in (0, 1].
    pub p: f64,
    /// Experts every valid token gets at least.
    pub min_k: usize,
    /// Experts a token gets at most; the selection width.
    pub max_k: usize,
}

impl TopP {
    /// Top-p with bounds `[min_k, max_k]`.
    pub fn new(p: f64, min_k: usize, max_k: usize) -> Self {
        Self { p, min_k, max_k }
    }

    pub(crate) fn check(&self, layer: usize, experts: usize) -> Result<()> {
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(invalid("topp", layer, format!("p = {} is outside (0, 1]", self.p)));
        }
        if self.min_k > self.max_k {
            return Err(invalid("topp", layer, format!("min_k = {} exceeds max_k = {}", self.min_k, self.max_k)));
        }
        check_width("topp", layer, "max_k", self.max_k, experts)
    }
}

impl RoutingPolicy for TopP {
    fn name(&self) -> String {
        "topp".into()
    }

    fn max_k(&self, _layer: usize) -> usize {
        self.max_k
    }

    fn select(&self, layer: usize, batch: &RouterBatch<'_>) -> Result<Selection> {
        batch.check()?;
        self.check(layer, batch.experts)?;
        Ok(prefix_selection(batch, self.max_k, |t, sorted| {
            let row = batch.row(t);
            let top1 = sorted_prefix(row, 1).first().map_or(0.0, |&e| row[e]);
            let total: i64 = row.iter().map(|&p| fixed_mass(p, top1)).sum();
            let target = self.p * total as f64;
            let mut before = 0i64;
            let mut n = 0;
            for &(_, p) in sorted {
                if (before as f64) >= target {
                    break;
                }
                before += fixed_mass(p, top1);
                n += 1;
            }
            n.clamp(self.min_k, self.max_k)
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn topp_keeps_the_smallest_prefix_reaching_p() {
        let p = [0.5, 0.3, 0.15, 0.05];
        let b = RouterBatch::new(&p, 1, 4).unwrap();
        assert_eq!(TopP::new(0.7, 1, 4).select(0, &b).unwrap().token(0), &[0, 1]);
        assert_eq!(TopP::new(0.45, 1, 4).select(0, &b).unwrap().token(0), &[0]);
        assert_eq!(TopP::new(0.96, 1, 4).select(0, &b).unwrap().token(0), &[0, 1, 2, 3]);
        assert_eq!(TopP::new(0.96, 1, 2).select(0, &b).unwrap().token(0), &[0, 1]);
        assert_eq!(TopP::new(0.1, 3, 4).select(0, &b).unwrap().token(0), &[0, 1, 2]);
    }

    #[test]
    fn topp_rejects_bad_options() {
        let p = [0.5, 0.5];
        let b = RouterBatch::new(&p, 1, 2).unwrap();
        assert!(TopP::new(0.0, 1, 2).select(0, &b).unwrap_err().to_string().contains("p = 0"));
        assert!(TopP::new(0.5, 3, 2).select(0, &b).is_err());
        assert!(TopP::new(0.5, 1, 3).select(0, &b).is_err());
    }
}
