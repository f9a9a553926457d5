//! The integer program, solved with good_lp's pure-Rust `microlp` backend: the DP's independent referee.
//!
//! Binary `x[l][i]` = "layer l takes its i-th allowed k"; exactly one per layer;
//! `sum k[l][i] * x[l][i] <= budget`; minimise `sum delta[l][i] * x[l][i]`.

use good_lp::{constraint, microlp, variable, Expression, ProblemVariables, Solution as _, SolverModel, Variable};

use crate::error::{Error, Result};
use crate::problem::{Method, Problem, Solution};

/// Solve the allocation as an integer program. Same semantics as [`crate::solve_dp`]; the objective
/// matches the DP's up to floating-point summation order, the argmin may differ on ties.
pub fn solve_ilp(problem: &Problem, budget: u32) -> Result<Solution> {
    problem.check_feasible(budget)?;
    let mut vars = ProblemVariables::new();
    let x: Vec<Vec<Variable>> = problem
        .layers
        .iter()
        .map(|l| l.k.iter().map(|_| vars.add(variable().binary())).collect())
        .collect();
    let mut objective = Expression::from(0.0);
    let mut used = Expression::from(0.0);
    for (layer, xs) in problem.layers.iter().zip(&x) {
        for ((&k, &d), &v) in layer.k.iter().zip(&layer.delta).zip(xs) {
            objective += d * v;
            used += f64::from(k) * v;
        }
    }
    let mut model = vars.minimise(objective).using(microlp);
    for xs in &x {
        let one: Expression = xs.iter().copied().sum();
        model = model.with(constraint!(one == 1.0));
    }
    model = model.with(constraint!(used <= f64::from(budget)));
    let solved = model.solve().map_err(|e| Error::Solver(e.to_string()))?;
    let choice: Vec<usize> = x
        .iter()
        .enumerate()
        .map(|(l, xs)| {
            // The solver returns values near 0 or 1; take the largest as the chosen option.
            let vals: Vec<f64> = xs.iter().map(|&v| solved.value(v)).collect();
            let best = vals
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i)
                .ok_or_else(|| Error::Solver(format!("layer {} has no options", problem.layers[l].layer)))?;
            if vals[best] < 0.5 {
                return Err(Error::Solver(format!(
                    "layer {}: no option selected (values {vals:?})",
                    problem.layers[l].layer
                )));
            }
            Ok(best)
        })
        .collect::<Result<_>>()?;
    let sol = problem.solution(&choice, budget, Method::Ilp);
    if sol.total() > budget {
        return Err(Error::Solver(format!(
            "solution uses {} activations, above the budget {budget}",
            sol.total()
        )));
    }
    Ok(sol)
}
