//! Exact dynamic programming for the multiple-choice knapsack, and the budget -> loss frontier.
//!
//! `best[l][s]` is the least summed loss of layers `0..l` using exactly `s` activations. One pass over
//! layers costs O(L * S * K) with S = min(budget, max total); the frontier for every budget `b <= S` is
//! then a prefix minimum over `s`, so a sweep over budgets costs one solve.
//!
//! Ties are broken deterministically: within a layer the smaller k wins (options are visited in
//! increasing k and only a strictly smaller loss replaces the incumbent); across totals the smaller total
//! wins. Losses may be negative or non-monotone in k: nothing here assumes otherwise.

use crate::error::{Error, Result};
use crate::problem::{Method, Problem, Solution};

/// Sentinel for "no choice reaches this total".
const UNREACHED: u16 = u16::MAX;

/// The most table cells (layers x budget columns) [`solve_dp`] builds: 2^27 (256 MiB of choices).
/// Real profiles need thousands (DeepSeek-V2-Lite: 26 x 157).
pub const MAX_DP_CELLS: u64 = 1 << 27;
/// The most inner steps (cells x options per layer) [`solve_dp`] takes: 2^31, seconds of work.
/// Together with [`MAX_DP_CELLS`] it keeps a user's profile from hanging or exhausting memory, and keeps
/// option indices below [`UNREACHED`] (65536 options that fit would already take 2^32 steps).
pub const MAX_DP_STEPS: u64 = 1 << 31;

/// The solved DP table: answers "best allocation with at most `b` activations" for every `b` up to the
/// table's size in O(L) each.
#[derive(Debug, Clone)]
pub struct Frontier {
    problem: Problem,
    /// Columns of the table: totals `0..=max_s`.
    max_s: usize,
    /// `choice[l * (max_s + 1) + s]`: option index of layer l on the best path to exact total s after
    /// layers `0..=l`, or [`UNREACHED`].
    choice: Vec<u16>,
    /// Least loss per exact total after all layers (`f64::INFINITY` when unreachable).
    exact: Vec<f64>,
    /// `prefix_best[b]`: the exact total `s <= b` with the least loss (smaller s on ties), if any.
    prefix_best: Vec<Option<usize>>,
}

impl Frontier {
    /// Error unless the table for `max_budget` is within [`MAX_DP_CELLS`] and [`MAX_DP_STEPS`]
    /// ([`solve_dp`] checks this; call it before [`Frontier::new`] on a problem from user input).
    pub fn check_size(problem: &Problem, max_budget: u32) -> Result<()> {
        let width = u64::from(max_budget.min(problem.max_total())) + 1;
        let cells = problem.layers.len() as u64 * width;
        let steps = problem.layers.iter().map(|l| l.k.len() as u64 * width).fold(0u64, u64::saturating_add);
        if cells > MAX_DP_CELLS || steps > MAX_DP_STEPS {
            return Err(Error::DpTooLarge { cells, steps, max_cells: MAX_DP_CELLS, max_steps: MAX_DP_STEPS });
        }
        Ok(())
    }

    /// Solve the DP for every budget up to `max_budget` (clamped to the problem's largest total).
    pub fn new(problem: &Problem, max_budget: u32) -> Self {
        let max_s = max_budget.min(problem.max_total()) as usize;
        let width = max_s + 1;
        let n = problem.layers.len();
        let mut choice = vec![UNREACHED; n * width];
        let mut prev = vec![f64::INFINITY; width];
        let mut cur = vec![f64::INFINITY; width];
        prev[0] = 0.0;
        for (l, layer) in problem.layers.iter().enumerate() {
            cur.fill(f64::INFINITY);
            let row = &mut choice[l * width..(l + 1) * width];
            for (i, (&k, &d)) in layer.k.iter().zip(&layer.delta).enumerate() {
                let k = k as usize;
                if k > max_s {
                    break; // k is increasing: the rest do not fit either
                }
                // cur[s] = min(cur[s], prev[s - k] + d) for s in k..=max_s
                for s in k..width {
                    let base = prev[s - k];
                    if base.is_finite() {
                        let v = base + d;
                        if v < cur[s] {
                            cur[s] = v;
                            // INVARIANT: option counts are tiny (profiled k values), far below u16::MAX.
                            row[s] = i as u16;
                        }
                    }
                }
            }
            std::mem::swap(&mut prev, &mut cur);
        }
        let exact = prev;
        let mut prefix_best = Vec::with_capacity(width);
        let mut best: Option<usize> = None;
        for (s, &v) in exact.iter().enumerate() {
            if v.is_finite() && best.is_none_or(|b| v < exact[b]) {
                best = Some(s);
            }
            prefix_best.push(best);
        }
        Self { problem: problem.clone(), max_s, choice, exact, prefix_best }
    }

    /// The largest budget this frontier answers exactly (larger budgets are answered as this one).
    pub fn max_budget(&self) -> u32 {
        self.max_s as u32
    }

    /// The best allocation using at most `budget` activations.
    pub fn solve(&self, budget: u32) -> Result<Solution> {
        self.problem.check_feasible(budget)?;
        let b = (budget as usize).min(self.max_s);
        // INVARIANT: budget >= min_total, and min_total is reachable (every layer at its smallest k),
        // and min_total <= max_s because max_s >= min(budget, max_total) >= min_total.
        let s = self.prefix_best[b].unwrap_or(0);
        let choice = self.reconstruct(s);
        Ok(self.problem.solution(&choice, budget, Method::Dp))
    }

    /// The least predicted loss at every budget `0..=max_budget()` (`None` where infeasible).
    /// Non-increasing in the budget.
    pub fn losses(&self) -> Vec<Option<f64>> {
        self.prefix_best.iter().map(|b| b.map(|s| self.exact[s])).collect()
    }

    fn reconstruct(&self, mut s: usize) -> Vec<usize> {
        let width = self.max_s + 1;
        let n = self.problem.layers.len();
        let mut choice = vec![0usize; n];
        for l in (0..n).rev() {
            let i = self.choice[l * width + s] as usize;
            choice[l] = i;
            s -= self.problem.layers[l].k[i] as usize;
        }
        choice
    }
}

/// Alloc-L's exact solver: the allocation with the least summed loss using at most `budget`
/// activations. A budget above the problem's largest total constrains nothing (every layer may take its
/// largest allowed k); a budget below the smallest total is [`crate::Error::InfeasibleBudget`].
pub fn solve_dp(problem: &Problem, budget: u32) -> Result<Solution> {
    problem.check_feasible(budget)?;
    Frontier::check_size(problem, budget)?;
    Frontier::new(problem, budget).solve(budget)
}
