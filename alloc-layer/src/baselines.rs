//! Baseline allocators: uniform, greedy marginal gain, and seeded random.
//!
//! They solve the same [`Problem`] as the DP, so their predicted losses are directly comparable.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::problem::{Method, Problem, Solution};

/// Spread the budget as evenly as possible: with L layers, every layer targets `budget / L`, and the
/// remainder `budget % L` goes one each to the *first* layers in model order. Each layer then takes the
/// largest allowed k not above its target (with contiguous k sets this is exactly the target). A budget
/// above the largest total gives every layer its largest allowed k.
pub fn uniform(problem: &Problem, budget: u32) -> Result<Solution> {
    problem.check_feasible(budget)?;
    let n = problem.layers.len() as u32;
    let budget_used = budget.min(problem.max_total());
    let (base, rem) = (budget_used / n, budget_used % n);
    let choice = problem
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let target = base + u32::from((l as u32) < rem);
            layer.k.iter().rposition(|&k| k <= target).ok_or_else(|| Error::Baseline {
                method: "uniform",
                reason: format!(
                    "layer {} has no allowed k at or below its even share {target} (allowed: {:?})",
                    layer.layer, layer.k
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(problem.solution(&choice, budget, Method::Uniform))
}

/// Greedy by marginal gain: start every layer at its smallest allowed k; repeatedly move the layer
/// whose step to its next allowed k reduces the loss most per added activation (ties: the earlier
/// layer), as long as the step fits the budget and reduces the loss. Not exact: the DP's foil.
pub fn greedy(problem: &Problem, budget: u32) -> Result<Solution> {
    problem.check_feasible(budget)?;
    let mut choice = vec![0usize; problem.layers.len()];
    let mut left = budget - problem.min_total();
    loop {
        let mut best: Option<(usize, f64)> = None;
        for (l, layer) in problem.layers.iter().enumerate() {
            let i = choice[l];
            if i + 1 >= layer.k.len() {
                continue;
            }
            let dk = layer.k[i + 1] - layer.k[i];
            if dk > left {
                continue;
            }
            let gain = (layer.delta[i] - layer.delta[i + 1]) / f64::from(dk);
            if gain > 0.0 && best.is_none_or(|(_, g)| gain > g) {
                best = Some((l, gain));
            }
        }
        let Some((l, _)) = best else { break };
        let layer = &problem.layers[l];
        left -= layer.k[choice[l] + 1] - layer.k[choice[l]];
        choice[l] += 1;
    }
    Ok(problem.solution(&choice, budget, Method::Greedy))
}

/// Seeded random allocation: start every layer at its smallest allowed k, then repeatedly step a
/// uniformly chosen layer (among those whose next allowed k still fits) until nothing fits. The same
/// seed always gives the same allocation (ChaCha8, independent of platform).
pub fn random(problem: &Problem, budget: u32, seed: u64) -> Result<Solution> {
    problem.check_feasible(budget)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut choice = vec![0usize; problem.layers.len()];
    let mut left = budget - problem.min_total();
    loop {
        let open: Vec<usize> = problem
            .layers
            .iter()
            .enumerate()
            .filter(|(l, layer)| {
                let i = choice[*l];
                i + 1 < layer.k.len() && layer.k[i + 1] - layer.k[i] <= left
            })
            .map(|(l, _)| l)
            .collect();
        if open.is_empty() {
            break;
        }
        let l = open[rng.gen_range(0..open.len())];
        let layer = &problem.layers[l];
        left -= layer.k[choice[l] + 1] - layer.k[choice[l]];
        choice[l] += 1;
    }
    Ok(problem.solution(&choice, budget, Method::Random))
}
