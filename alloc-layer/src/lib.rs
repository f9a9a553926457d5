//! Alloc-L: choose a top-k for every MoE layer so the summed sensitivity loss is minimal under a global
//! activation budget.
//!
//! The problem is a multiple-choice knapsack:
//! `min sum_l S_l(K_l)  s.t.  sum_l K_l <= B,  K_l in allowed_l` where `allowed_l` is the set of profiled
//! k values of layer l within the user's bounds. [`dp`] solves it exactly in O(L * B * K) and yields the
//! whole budget -> loss frontier in one pass; [`ilp`] solves the same integer program with good_lp's
//! pure-Rust solver as an independent referee; [`baselines`] has uniform, greedy and random allocators;
//! [`fractional`] gives Alloc-L+T a per-layer average budget on a `1/steps` grid.
//!
//! The allocators never see a model: they take a [`Problem`] built from a
//! [`alloc_core::SensitivityProfile`].

pub mod baselines;
pub mod dp;
pub mod error;
/// Fuzzing entry points (the crate's tests and the `fuzzing` feature; see `docs/fuzzing.md`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod fractional;
pub mod ilp;
pub mod problem;

pub use dp::{solve_dp, Frontier};
pub use error::{Error, Result};
pub use fractional::{solve_fractional, FractionalSolution, LayerMass};
pub use ilp::solve_ilp;
pub use problem::{KBounds, Method, Problem, Solution};
