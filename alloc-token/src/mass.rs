//! How much router probability mass a layer keeps under top-k and under Alloc-T at a (fractional)
//! average budget: the link between a measured integer-k sensitivity profile and a fractional K_l
//! (`alloc_layer::fractional` interpolates the profile's loss over this mass).
//!
//! Mass is the mean over valid tokens of the summed probabilities of the selected experts. Alloc-T's
//! mass at `K` follows its rule exactly (floor experts per token, then the best `round(K T) - floor T`
//! candidates of rank `< cap` by probability); the tie order does not change the mass, so candidates are
//! simply sorted by probability. Batch scope only: one budget shared by every valid token.

use alloc_core::routing::RouterBatch;
use alloc_core::Result;

use crate::alloc_t::pairs_for;
use crate::common::{invalid, sorted_prefix};

/// One layer's retained-mass curves on a batch of recorded router probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct MassCurve {
    /// `topk[k]`: mean retained mass of top-k, for k in `0..=cap`.
    pub topk: Vec<f64>,
    /// `spread[j]`: mean retained mass of Alloc-T (probability score, batch scope) at average budget
    /// `K = j / steps`, for j in `steps * floor ..= steps * cap`; entry 0 is K = floor.
    pub spread: Vec<f64>,
    /// Grid steps per expert.
    pub steps: u32,
    /// Alloc-T's floor.
    pub floor: usize,
}

impl MassCurve {
    /// Measure both curves for `layer` (named in errors) on `batch`, with Alloc-T's `floor` and `cap`,
    /// at `steps` grid points per expert (`steps >= 1`, `floor <= cap <= experts`).
    pub fn measure(layer: usize, batch: &RouterBatch<'_>, floor: usize, cap: usize, steps: u32) -> Result<Self> {
        batch.check()?;
        let name = "retained mass";
        if steps == 0 {
            return Err(invalid(name, layer, "steps per expert must be at least 1"));
        }
        if floor > cap || cap > batch.experts {
            return Err(invalid(name, layer, format!("need floor <= cap <= experts, got {floor}, {cap}, {}", batch.experts)));
        }
        let valid: Vec<usize> = (0..batch.tokens).filter(|&t| batch.is_valid(t)).collect();
        let n = valid.len().max(1) as f64;
        let mut topk = vec![0.0f64; cap + 1];
        let mut floor_mass = 0.0f64;
        let mut cand: Vec<f32> = Vec::with_capacity(valid.len() * (cap - floor));
        for &t in &valid {
            let row = batch.row(t);
            let mut acc = 0.0f64;
            for (rank, &e) in sorted_prefix(row, cap).iter().enumerate() {
                acc += f64::from(row[e]);
                topk[rank + 1] += acc;
                if rank < floor {
                    floor_mass += f64::from(row[e]);
                } else {
                    cand.push(row[e]);
                }
            }
        }
        for m in &mut topk {
            *m /= n;
        }
        cand.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut prefix = Vec::with_capacity(cand.len() + 1);
        prefix.push(0.0f64);
        for &p in &cand {
            prefix.push(prefix[prefix.len() - 1] + f64::from(p));
        }
        let t = valid.len() as u64;
        let spread = (steps as usize * floor..=steps as usize * cap)
            .map(|j| {
                let k = j as f64 / f64::from(steps);
                let extra = (pairs_for(k, t) as usize).saturating_sub(floor * valid.len()).min(cand.len());
                (floor_mass + prefix[extra]) / n
            })
            .collect();
        Ok(Self { topk, spread, steps, floor })
    }

    /// Alloc-T's retained mass at grid point `K = j / steps` (`j` from `steps * floor`).
    pub fn spread_at(&self, j: usize) -> Option<f64> {
        self.spread.get(j.checked_sub(self.steps as usize * self.floor)?).copied()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::AllocT;
    use alloc_core::routing::RoutingPolicy;

    fn selected_mass(p: &[f32], tokens: usize, experts: usize, k: f64, cap: usize) -> f64 {
        let b = RouterBatch::new(p, tokens, experts).unwrap();
        let s = AllocT::new(k, cap).select(0, &b).unwrap();
        (0..tokens).map(|t| s.token(t).iter().map(|&e| f64::from(p[t * experts + e as usize])).sum::<f64>()).sum::<f64>()
            / tokens as f64
    }

    #[test]
    fn spread_mass_equals_the_mass_alloc_t_selects() {
        let p = [0.5, 0.3, 0.2, 0.0, 0.9, 0.05, 0.05, 0.0, 0.4, 0.35, 0.15, 0.1];
        let b = RouterBatch::new(&p, 3, 4).unwrap();
        let c = MassCurve::measure(2, &b, 1, 3, 4).unwrap();
        assert_eq!(c.spread.len(), 4 * 3 - 4 + 1);
        for j in 4..=12 {
            let want = selected_mass(&p, 3, 4, j as f64 / 4.0, 3);
            assert!((c.spread_at(j).unwrap() - want).abs() < 1e-9, "K = {}: {} vs {want}", j as f64 / 4.0, c.spread_at(j).unwrap());
        }
        // Top-k mass, and Alloc-T keeps at least as much as top-k at an integer budget.
        assert!((c.topk[1] - (0.5 + 0.9 + 0.4) / 3.0).abs() < 1e-7);
        assert!((c.topk[3] - c.spread_at(12).unwrap()).abs() < 1e-9);
        assert!(c.spread_at(8).unwrap() >= c.topk[2] - 1e-12);
        assert!(c.spread_at(3).is_none());
    }

    #[test]
    fn bad_options_name_the_layer() {
        let p = [0.5, 0.5];
        let b = RouterBatch::new(&p, 1, 2).unwrap();
        let e = MassCurve::measure(7, &b, 1, 3, 4).unwrap_err().to_string();
        assert!(e.contains("layer 7") && e.contains("floor <= cap <= experts"), "{e}");
        assert!(MassCurve::measure(7, &b, 1, 2, 0).is_err());
    }
}
