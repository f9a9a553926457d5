//! Fractional Alloc-L: a per-layer average budget `K_l` on a grid of `1/steps` experts, for Alloc-L+T.
//!
//! With integer `K_l`, floor 1 and cap K, Alloc-T can only redistribute inside layers with
//! `1 < K_l < K`; on a top-2 model (Mixtral) every layer sits at 1 or 2 and Alloc-L+T is plain Alloc-L.
//! Here each layer may take any `K_l = j / steps` in `[max(floor, k_min), k_max]`, and the exact DP
//! ([`crate::solve_dp`], on the problem scaled by `steps`) picks the grid point per layer with the least
//! summed *estimated* loss under `sum_l K_l <= B`. The sum hits `B` exactly whenever more budget lowers
//! the estimate, and Alloc-T then realises `round(K_l * T)` activations per layer.
//!
//! The estimate: the profile measured the loss of top-k at integer k. A layer's loss is modelled as a
//! piecewise-linear function of the router probability mass the layer keeps, through the points
//! `(mass of top-k_i, delta_i)`; Alloc-T at average budget `K` keeps mass `spread(K)` (recorded router
//! probabilities replayed under Alloc-T's rule), and its estimated loss is that function at
//! `spread(K)`. Alloc-T keeps at least top-k's mass at an integer `K = k`, so the estimate never exceeds
//! the profile there, and it is convex between integers where Alloc-T gives the first extra experts to
//! the flattest tokens. If Alloc-T kept no more mass than a random choice of tokens (mass linear in `K`)
//! and the profile is convex, the optimum is the integer DP's (a test checks this).

use crate::error::{Error, Result};
use crate::problem::{LayerChoices, Problem};
use crate::solve_dp;

/// One layer's retained router mass (from `alloc_token::MassCurve` on recorded router probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerMass {
    /// `topk[k]`: mean mass kept by top-k, for k in `0..=cap`.
    pub topk: Vec<f64>,
    /// `spread[i]`: mean mass kept by Alloc-T at `K = (steps * floor + i) / steps`, up to `K = cap`.
    pub spread: Vec<f64>,
    /// Alloc-T's floor (experts every token keeps).
    pub floor: u32,
}

/// A fractional allocation and the loss it is estimated to cost.
#[derive(Debug, Clone, PartialEq)]
pub struct FractionalSolution {
    /// Model layer indices, in order.
    pub layers: Vec<usize>,
    /// Average experts per token of each layer (multiples of `1 / steps`).
    pub k: Vec<f64>,
    /// Summed estimated loss of the allocation.
    pub predicted_delta: f64,
    /// The budget solved for (activations per token).
    pub budget: u32,
    /// Grid steps per expert.
    pub steps: u32,
}

impl FractionalSolution {
    /// Total average activations per token (`<= budget`).
    pub fn total(&self) -> f64 {
        self.k.iter().sum()
    }
}

/// The loss at retained mass `m` on the piecewise-linear curve through `(topk[k_i], delta_i)`.
fn loss_at_mass(choices: &LayerChoices, topk: &[f64], m: f64) -> f64 {
    let pts: Vec<(f64, f64)> = choices.k.iter().zip(&choices.delta).map(|(&k, &d)| (topk[k as usize], d)).collect();
    // INVARIANT: a LayerChoices has at least one option (Problem::from_profile rejects empty layers).
    let last = pts.len() - 1;
    let i = match pts.iter().rposition(|&(x, _)| x <= m) {
        None => return pts[0].1,
        Some(i) if i == last => return pts[last].1,
        Some(i) => i,
    };
    let ((x0, y0), (x1, y1)) = (pts[i], pts[i + 1]);
    if x1 > x0 {
        y0 + (y1 - y0) * (m - x0) / (x1 - x0)
    } else {
        y1
    }
}

/// The fractional allocation with the least estimated loss using at most `budget` activations per token
/// (see the module docs). `mass[l]` belongs to `problem.layers[l]`; `steps` grid points per expert.
pub fn solve_fractional(problem: &Problem, mass: &[LayerMass], steps: u32, budget: u32) -> Result<FractionalSolution> {
    let bad = |layer: usize, reason: String| Error::Baseline { method: "fractional", reason: format!("layer {layer}: {reason}") };
    if steps == 0 {
        return Err(Error::Baseline { method: "fractional", reason: "steps per expert must be at least 1".into() });
    }
    if mass.len() != problem.layers.len() {
        return Err(Error::Baseline {
            method: "fractional",
            reason: format!("{} mass curves for {} layers", mass.len(), problem.layers.len()),
        });
    }
    let mut scaled = Vec::with_capacity(problem.layers.len());
    let mut min_total = 0u32;
    for (lc, lm) in problem.layers.iter().zip(mass) {
        let k_lo = lc.k[0].max(lm.floor);
        // INVARIANT: LayerChoices.k is non-empty and increasing.
        let k_hi = lc.k[lc.k.len() - 1];
        if k_lo > k_hi {
            return Err(bad(lc.layer, format!("Alloc-T's floor {} exceeds the largest allowed k {k_hi}", lm.floor)));
        }
        if (k_hi as usize) >= lm.topk.len() {
            return Err(bad(lc.layer, format!("k = {k_hi} but top-k mass is known up to k = {}", lm.topk.len().saturating_sub(1))));
        }
        let first = steps * lm.floor;
        let (mut k, mut delta) = (Vec::new(), Vec::new());
        for j in steps * k_lo..=steps * k_hi {
            let m = *lm.spread.get((j - first) as usize).ok_or_else(|| {
                bad(lc.layer, format!("Alloc-T mass is known up to K = {}", (first as usize + lm.spread.len()) as f64 / f64::from(steps) - 1.0 / f64::from(steps)))
            })?;
            if !m.is_finite() {
                return Err(bad(lc.layer, format!("Alloc-T mass at K = {} is {m}", f64::from(j) / f64::from(steps))));
            }
            k.push(j);
            delta.push(loss_at_mass(lc, &lm.topk, m));
        }
        min_total += k_lo;
        scaled.push(LayerChoices { layer: lc.layer, k, delta });
    }
    if budget < min_total {
        return Err(Error::InfeasibleBudget { budget, min_total });
    }
    let sol = solve_dp(&Problem { layers: scaled }, budget.saturating_mul(steps))?;
    Ok(FractionalSolution {
        layers: sol.allocation.layers.clone(),
        k: sol.allocation.k.iter().map(|&j| f64::from(j) / f64::from(steps)).collect(),
        predicted_delta: sol.predicted_delta,
        budget,
        steps,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn problem(deltas: &[[f64; 2]]) -> Problem {
        // Top-2 layers: k in {1, 2}, delta at k = 2 is 0.
        Problem {
            layers: deltas.iter().enumerate().map(|(l, d)| LayerChoices { layer: l + 1, k: vec![1, 2], delta: d.to_vec() }).collect(),
        }
    }

    /// Top-1 keeps `m1`, top-2 keeps 1; Alloc-T's mass rises from m1 to 1 like `x^(1/p)` (p = 1: linear).
    fn mass(m1: f64, p: f64, steps: u32) -> LayerMass {
        let spread = (0..=steps).map(|i| m1 + (1.0 - m1) * (f64::from(i) / f64::from(steps)).powf(1.0 / p)).collect();
        LayerMass { topk: vec![0.0, m1, 1.0], spread, floor: 1 }
    }

    #[test]
    fn top2_budget_is_spread_fractionally_and_hits_the_total() {
        let p = problem(&[[0.4, 0.0], [0.1, 0.0], [0.3, 0.0], [0.2, 0.0], [0.5, 0.0], [0.25, 0.0]]);
        let m: Vec<LayerMass> = (0..6).map(|_| mass(0.6, 3.0, 8)).collect();
        for budget in 6..=12 {
            let s = solve_fractional(&p, &m, 8, budget).unwrap();
            assert!((s.total() - f64::from(budget)).abs() < 1e-9, "budget {budget}: total {}", s.total());
            assert!(s.k.iter().all(|&k| (1.0..=2.0).contains(&k)));
            // The integer DP's allocation is on the grid, and Alloc-T's estimate there is no worse.
            let int = solve_dp(&p, budget).unwrap();
            assert!(s.predicted_delta <= int.predicted_delta + 1e-12, "budget {budget}");
        }
        // With concave retained mass some layers sit strictly between 1 and 2.
        let s = solve_fractional(&p, &m, 8, 9).unwrap();
        assert!(s.k.iter().any(|&k| k > 1.0 && k < 2.0), "{:?}", s.k);
    }

    #[test]
    fn linear_mass_and_convex_profile_give_the_integer_optimum() {
        let p = Problem {
            layers: (0..4)
                .map(|l| LayerChoices {
                    layer: l,
                    k: vec![1, 2, 3, 4],
                    delta: vec![0.9 - 0.1 * l as f64, 0.4 - 0.05 * l as f64, 0.1, 0.0],
                })
                .collect(),
        };
        // Top-k mass 0.4, 0.7, 0.9, 1.0 and Alloc-T's mass linear between them: no token advantage.
        let topk = vec![0.0, 0.4, 0.7, 0.9, 1.0];
        let steps = 4u32;
        let spread: Vec<f64> = (steps..=4 * steps)
            .map(|j| {
                let k = f64::from(j) / f64::from(steps);
                let (lo, hi) = (k.floor() as usize, (k.ceil() as usize).min(4));
                topk[lo] + (topk[hi] - topk[lo]) * (k - k.floor())
            })
            .collect();
        let m: Vec<LayerMass> = (0..4).map(|_| LayerMass { topk: topk.clone(), spread: spread.clone(), floor: 1 }).collect();
        for budget in 4..=16 {
            let s = solve_fractional(&p, &m, steps, budget).unwrap();
            let int = solve_dp(&p, budget).unwrap();
            assert!((s.predicted_delta - int.predicted_delta).abs() < 1e-9, "budget {budget}: {} vs {}", s.predicted_delta, int.predicted_delta);
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let p = problem(&[[0.4, 0.0], [0.1, 0.0]]);
        let m = vec![mass(0.6, 2.0, 4)];
        assert!(solve_fractional(&p, &m, 4, 3).unwrap_err().to_string().contains("1 mass curves for 2 layers"));
        let m = vec![mass(0.6, 2.0, 4), mass(0.6, 2.0, 2)];
        let e = solve_fractional(&p, &m, 4, 3).unwrap_err().to_string();
        assert!(e.contains("layer 2") && e.contains("Alloc-T mass is known up to K = 1.5"), "{e}");
        let m = vec![mass(0.6, 2.0, 4), mass(0.6, 2.0, 4)];
        let e = solve_fractional(&p, &m, 4, 1).unwrap_err().to_string();
        assert!(e.contains("budget 1 is infeasible"), "{e}");
    }
}
