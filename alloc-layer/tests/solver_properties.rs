//! Property tests: the DP is exact (== brute force), agrees with the ILP referee, never exceeds the
//! budget, and its frontier is monotone; the baselines respect the budget too.

use alloc_core::{LayerProfile, SensitivityProfile, SCHEMA_VERSION};
use alloc_layer::baselines::{greedy, random, uniform};
use alloc_layer::{solve_dp, solve_ilp, Error, Frontier, KBounds, Problem};
use proptest::prelude::*;

/// Exhaustive search over every combination of allowed k (small L only).
fn brute_force(p: &Problem, budget: u32) -> Option<f64> {
    fn go(p: &Problem, l: usize, left: i64, acc: f64, best: &mut Option<f64>) {
        if l == p.layers.len() {
            if best.is_none_or(|b| acc < b) {
                *best = Some(acc);
            }
            return;
        }
        for (&k, &d) in p.layers[l].k.iter().zip(&p.layers[l].delta) {
            if i64::from(k) <= left {
                go(p, l + 1, left - i64::from(k), acc + d, best);
            }
        }
    }
    let mut best = None;
    go(p, 0, i64::from(budget), 0.0, &mut best);
    best
}

/// Random profiles: L layers, sparse k subsets of 0..=full_k, deltas that are coarse (so ties happen),
/// sometimes negative and non-monotone.
fn profile_strategy(max_layers: usize) -> impl Strategy<Value = SensitivityProfile> {
    (1usize..=max_layers, 1u32..=8).prop_flat_map(|(n, full_k)| {
        let layer = (
            proptest::collection::btree_set(0..=full_k, 1..=(full_k as usize + 1)),
            proptest::collection::vec(-4i32..20, (full_k + 1) as usize),
        )
            .prop_map(|(ks, ds)| {
                let k: Vec<u32> = ks.into_iter().collect();
                let delta = k.iter().map(|&k| f64::from(ds[k as usize]) * 0.25).collect();
                (k, delta)
            });
        proptest::collection::vec(layer, n).prop_map(move |layers| SensitivityProfile {
            schema_version: SCHEMA_VERSION,
            model: "random".into(),
            metric: "delta_nll".into(),
            full_k,
            layers: layers
                .into_iter()
                .enumerate()
                .map(|(i, (k, delta))| LayerProfile { layer: i + 1, k, delta })
                .collect(),
            calibration: None,
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn dp_equals_brute_force(profile in profile_strategy(5), budget in 0u32..45) {
        let p = Problem::from_profile(&profile, KBounds::default()).unwrap();
        match (solve_dp(&p, budget), brute_force(&p, budget)) {
            (Ok(sol), Some(best)) => {
                prop_assert!((sol.predicted_delta - best).abs() < 1e-9, "dp {} brute {}", sol.predicted_delta, best);
                prop_assert!(sol.total() <= budget);
            }
            (Err(Error::InfeasibleBudget { .. }), None) => {}
            (a, b) => prop_assert!(false, "dp {:?} vs brute {:?}", a, b),
        }
    }

    #[test]
    fn dp_objective_equals_ilp_objective(profile in profile_strategy(12), frac in 0.0f64..1.2,
                                         k_min in proptest::option::of(0u32..3), k_max in proptest::option::of(3u32..9)) {
        let bounds = KBounds { k_min, k_max };
        let Ok(p) = Problem::from_profile(&profile, bounds) else { return Ok(()) };
        let budget = (frac * f64::from(p.max_total())).round() as u32;
        match (solve_dp(&p, budget), solve_ilp(&p, budget)) {
            (Ok(a), Ok(b)) => {
                prop_assert!((a.predicted_delta - b.predicted_delta).abs() < 1e-6,
                    "dp {} ilp {}", a.predicted_delta, b.predicted_delta);
                prop_assert!(a.total() <= budget && b.total() <= budget);
            }
            (Err(Error::InfeasibleBudget { .. }), Err(Error::InfeasibleBudget { .. })) => {}
            (a, b) => prop_assert!(false, "dp {:?} vs ilp {:?}", a, b),
        }
    }

    #[test]
    fn frontier_is_monotone_and_matches_single_solves(profile in profile_strategy(10)) {
        let p = Problem::from_profile(&profile, KBounds::default()).unwrap();
        let f = Frontier::new(&p, p.max_total());
        let losses = f.losses();
        let mut last = f64::INFINITY;
        for (b, loss) in losses.iter().enumerate() {
            if let Some(l) = loss {
                prop_assert!(*l <= last + 1e-12, "frontier rises at budget {}", b);
                last = *l;
                let single = solve_dp(&p, b as u32).unwrap();
                prop_assert!((single.predicted_delta - l).abs() < 1e-9);
                prop_assert!(f.solve(b as u32).unwrap().total() <= b as u32);
            } else {
                prop_assert!((b as u32) < p.min_total());
            }
        }
    }

    #[test]
    fn baselines_never_exceed_budget_nor_beat_dp(profile in profile_strategy(10), frac in 0.0f64..1.1, seed in any::<u64>()) {
        let p = Problem::from_profile(&profile, KBounds::default()).unwrap();
        let budget = (frac * f64::from(p.max_total())).round() as u32;
        let Ok(best) = solve_dp(&p, budget) else { return Ok(()) };
        for s in [greedy(&p, budget), random(&p, budget, seed)].into_iter().chain([uniform(&p, budget)]).flatten() {
            prop_assert!(s.total() <= budget);
            prop_assert!(s.predicted_delta >= best.predicted_delta - 1e-9);
        }
    }
}

fn v2_lite_like(layers: usize) -> SensitivityProfile {
    SensitivityProfile {
        schema_version: SCHEMA_VERSION,
        model: "synthetic".into(),
        metric: "delta_nll".into(),
        full_k: 6,
        layers: (0..layers)
            .map(|l| {
                let s = 1.0 + (l as f64 * 0.37).sin().abs();
                LayerProfile {
                    layer: l + 1,
                    k: (1..=6).collect(),
                    delta: (1..=6).map(|k| s * (6.0 - f64::from(k)).powi(2) / 10.0).collect(),
                }
            })
            .collect(),
        calibration: None,
    }
}

#[test]
fn uniform_spreads_the_remainder_over_the_first_layers() {
    let p = Problem::from_profile(&v2_lite_like(4), KBounds::default()).unwrap();
    let s = uniform(&p, 14).unwrap();
    assert_eq!(s.allocation.k, vec![4, 4, 3, 3]);
    let s = uniform(&p, 100).unwrap();
    assert_eq!(s.allocation.k, vec![6, 6, 6, 6]);
}

#[test]
fn infeasible_budget_says_the_minimum() {
    let p = Problem::from_profile(&v2_lite_like(26), KBounds { k_min: Some(2), k_max: None }).unwrap();
    let e = solve_dp(&p, 40).unwrap_err().to_string();
    assert!(e.contains("budget 40") && e.contains("52"), "{e}");
    assert!(solve_ilp(&p, 40).is_err());
}

#[test]
fn bounds_that_exclude_every_profiled_k_name_the_layer() {
    let mut prof = v2_lite_like(3);
    prof.layers[1].k = vec![1, 2];
    prof.layers[1].delta = vec![0.5, 0.1];
    let e = Problem::from_profile(&prof, KBounds { k_min: Some(3), k_max: None }).unwrap_err().to_string();
    assert!(e.contains("layer 2"), "{e}");
    let e = Problem::from_profile(&prof, KBounds { k_min: Some(4), k_max: Some(2) }).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
}

#[test]
fn half_budget_on_26_layers_is_exact_and_deterministic() {
    let p = Problem::from_profile(&v2_lite_like(26), KBounds::default()).unwrap();
    let a = solve_dp(&p, 78).unwrap();
    let b = solve_dp(&p, 78).unwrap();
    let c = solve_ilp(&p, 78).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.total(), 78);
    assert!((a.predicted_delta - c.predicted_delta).abs() < 1e-6);
    assert!(a.predicted_delta <= uniform(&p, 78).unwrap().predicted_delta);
}
