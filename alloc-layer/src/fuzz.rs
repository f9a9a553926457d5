//! Fuzzing entry points (compiled for this crate's tests and with the `fuzzing` feature): each takes
//! arbitrary bytes as one user-supplied JSON file and must return `Ok` or `Err`, never panic, abort,
//! hang or exhaust memory. `fuzz/fuzz_targets/{profile_json,allocation_json}.rs` are one-line calls of
//! these; the smoke tests below replay the committed corpora and seeded mutations through the same
//! functions (`fuzz/smoke.rs`). See `docs/fuzzing.md`.

use alloc_core::{Budget, LayerAllocation, SensitivityProfile};

use crate::baselines::{greedy, random, uniform};
use crate::error::{Error, Result};
use crate::problem::{KBounds, Problem};
use crate::{solve_dp, solve_ilp};

/// `bytes` as a sensitivity profile, through what `eval solve` does with one: parse and validate, build
/// the [`Problem`] (unbounded, and bounded to `k in 1..=full_k / 2`), resolve the budgets 0.5, 1.0 and
/// `full_budget - 1`, and solve each with the DP and the uniform, greedy and random baselines (the ILP
/// too when the problem is small, to keep the fuzzer fast). Also checks two invariants: the JSON
/// round-trips, and the DP's predicted loss is never above a baseline's.
pub fn profile_json(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::Baseline { method: "fuzz", reason: e.to_string() })?;
    let profile = SensitivityProfile::from_json(text)?;
    let again = SensitivityProfile::from_json(&profile.to_json())?;
    assert_eq!(profile, again, "a valid profile must round-trip through JSON");
    let _ = (profile.full_budget(), profile.layer_indices());
    for lp in &profile.layers {
        for &k in lp.k.iter().take(8) {
            assert!(lp.delta_at(k).is_some()); // a linear search: all k of a huge layer would be quadratic
        }
    }
    let full = profile.full_budget();
    let bounds = [KBounds::default(), KBounds { k_min: Some(1), k_max: Some(profile.full_k / 2) }];
    for bounds in bounds {
        let Ok(problem) = Problem::from_profile(&profile, bounds) else { continue };
        let small = problem.layers.iter().map(|l| l.k.len()).sum::<usize>() <= 48;
        for budget in [Budget::Fraction(0.5), Budget::Fraction(1.0), Budget::Total(full.saturating_sub(1))] {
            let Ok(b) = budget.resolve(full) else { continue };
            let Ok(dp) = solve_dp(&problem, b) else { continue };
            assert!(dp.total() <= b, "the DP exceeds the budget");
            for other in [uniform(&problem, b), greedy(&problem, b), random(&problem, b, 7)].into_iter().flatten() {
                assert!(other.total() <= b, "{:?} exceeds the budget", other.method);
                let tol = 1e-9 * (1.0 + dp.predicted_delta.abs().max(other.predicted_delta.abs()));
                assert!(
                    dp.predicted_delta <= other.predicted_delta + tol,
                    "the DP ({}) is worse than {:?} ({})",
                    dp.predicted_delta,
                    other.method,
                    other.predicted_delta
                );
            }
            if small {
                let _ = solve_ilp(&problem, b);
            }
        }
    }
    Ok(())
}

/// `bytes` as a layer allocation: parse, validate against its own layers and against the layers
/// `[1, 2, 3]` with a k limit of 64, and read it back (`total`, `k_of`, a JSON round trip).
pub fn allocation_json(bytes: &[u8]) -> Result<()> {
    let text = std::str::from_utf8(bytes).map_err(|e| Error::Baseline { method: "fuzz", reason: e.to_string() })?;
    let a = LayerAllocation::from_json(text)?;
    let _ = a.validate(&[1, 2, 3], 64);
    a.validate(&a.layers.clone(), 64)?;
    let _ = a.total();
    for &l in a.layers.iter().take(8) {
        assert!(a.k_of(l).is_some()); // a linear search: all layers of a huge allocation would be quadratic
    }
    let json = serde_json::to_string(&a).map_err(|source| alloc_core::Error::Json { what: "layer allocation", source })?;
    assert_eq!(LayerAllocation::from_json(&json)?, a, "a valid allocation must round-trip through JSON");
    Ok(())
}

#[cfg(test)]
#[path = "../../fuzz/smoke.rs"]
mod smoke;

#[cfg(test)]
mod tests {
    use super::smoke::replay;
    use super::*;

    fn problem(text: &str) -> Result<Problem> {
        Problem::from_profile(&SensitivityProfile::from_json(text)?, KBounds::default())
    }

    #[test]
    fn profiles_found_by_fuzzing_are_errors() {
        // Deltas summing to infinity made the DP index its UNREACHED sentinel.
        let inf = r#"{"schema_version": 1, "full_k": 2, "layers": [{"layer": 0, "k": [1, 2], "delta": [1e308, 1e308]},
            {"layer": 1, "k": [1, 2], "delta": [1e308, 1e308]}]}"#;
        let e = problem(inf).expect_err("infinite sum").to_string();
        assert!(e.contains("overflows"), "{e}");
        // Smallest k summing past u32::MAX overflowed; now it saturates and every budget is infeasible.
        let big = r#"{"schema_version": 1, "full_k": 4000000000, "layers": [{"layer": 0, "k": [3000000000], "delta": [0]},
            {"layer": 1, "k": [3000000000], "delta": [0]}]}"#;
        let p = problem(big).expect("valid");
        assert_eq!(p.min_total(), u32::MAX);
        assert!(matches!(solve_dp(&p, u32::MAX - 1), Err(Error::InfeasibleBudget { .. })));
        // A 2-billion-column DP table exhausted memory.
        let wide = r#"{"schema_version": 1, "full_k": 4000000000, "layers": [{"layer": 0, "k": [0, 4000000000], "delta": [1, 0]}]}"#;
        assert!(matches!(solve_dp(&problem(wide).expect("valid"), 2_000_000_000), Err(Error::DpTooLarge { .. })));
    }

    #[test]
    fn fuzz_smoke_profile_json_never_panics() {
        replay("profile_json", 3000, profile_json);
    }

    #[test]
    fn fuzz_smoke_allocation_json_never_panics() {
        replay("allocation_json", 3000, allocation_json);
    }
}
