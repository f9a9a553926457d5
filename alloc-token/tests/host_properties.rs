//! Property tests of the host reference policies: Alloc-T's totals are exact, its selection maximises
//! the total score (== an exhaustive DP), per-token floor and cap hold; every policy except random gives
//! each token a prefix of its sorted experts and padding tokens nothing.

#![allow(clippy::unwrap_used)]

mod common;

use alloc_core::routing::{sorted_experts, RoutingPolicy, Selection, NO_EXPERT};
use alloc_token::{pairs_for, AllocT, RandomK, Scope, Score, Skip, Threshold, TopK, TopP};
use common::{case, case_in, Case};
use proptest::prelude::*;

/// Token groups sharing one budget (ascending token order), as the policy's scope defines them.
fn groups(c: &Case, scope: Scope) -> Vec<Vec<usize>> {
    match (scope, &c.seq) {
        (Scope::PerSequence, Some(seq)) => {
            let mut ids: Vec<u32> = seq.clone();
            ids.sort_unstable();
            ids.dedup();
            ids.iter().map(|s| (0..c.tokens).filter(|&t| seq[t] == *s).collect()).collect()
        }
        _ => vec![(0..c.tokens).collect()],
    }
}

/// Every valid token's ids are a prefix of its sorted experts; padding tokens have none; padding slots
/// sit at the end of each row.
fn assert_prefixes(c: &Case, s: &Selection) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.tokens, c.tokens);
    for t in 0..c.tokens {
        let row = &s.ids[t * s.width..(t + 1) * s.width];
        let n = s.token(t).len();
        prop_assert!(row[n..].iter().all(|&e| e == NO_EXPERT), "padding not at the end: {:?}", row);
        if !c.valid(t) {
            prop_assert_eq!(n, 0);
        }
        let sorted: Vec<i64> = sorted_experts(c.row(t)).into_iter().map(|e| e as i64).collect();
        prop_assert_eq!(s.token(t), &sorted[..n]);
    }
    Ok(())
}

/// The best total score over all per-token counts in [floor, cap] summing to `pairs` (exhaustive DP over
/// tokens; each token's contribution is the score sum of its sorted prefix).
fn best_total(c: &Case, tokens: &[usize], floor: usize, cap: usize, pairs: usize, score: Score) -> f64 {
    let mut best = vec![f64::NEG_INFINITY; pairs + 1];
    best[0] = 0.0;
    for &t in tokens {
        let row = c.row(t);
        let sorted = sorted_experts(row);
        let top1 = row[sorted[0]];
        let mut prefix = vec![0.0f64; cap + 1];
        for r in 0..cap {
            prefix[r + 1] = prefix[r] + f64::from(score.of(row[sorted[r]], top1));
        }
        let mut next = vec![f64::NEG_INFINITY; pairs + 1];
        for (used, &b) in best.iter().enumerate().filter(|(_, b)| b.is_finite()) {
            for n in floor..=cap.min(pairs - used.min(pairs)) {
                if used + n <= pairs {
                    next[used + n] = next[used + n].max(b + prefix[n]);
                }
            }
        }
        best = next;
    }
    best[pairs]
}

fn alloc_t_case() -> impl Strategy<Value = (Case, usize, usize, f64, bool, bool)> {
    case(9, 7).prop_flat_map(|c| {
        let e = c.experts;
        (Just(c), 0..=e, any::<bool>(), any::<bool>()).prop_flat_map(|(c, cap, rel, per_seq)| {
            (Just(c), 0..=cap.min(2), Just(cap), 0.0f64..=1.0, Just(rel), Just(per_seq))
        })
    })
    .prop_map(|(c, floor, cap, frac, rel, per_seq)| {
        // K between floor and cap, often fractional, sometimes exactly an integer or a half.
        let k = floor as f64 + frac * (cap - floor) as f64;
        let k = if frac < 0.2 { k.round() } else if frac < 0.4 { (k * 2.0).round() / 2.0 } else { k };
        (c, floor, cap, k.clamp(floor as f64, cap as f64), rel, per_seq)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn alloc_t_totals_exact_prefixes_bounds_and_optimal((c, floor, cap, k, rel, per_seq) in alloc_t_case()) {
        let score = if rel { Score::RelativeToTop1 } else { Score::Probability };
        let scope = if per_seq { Scope::PerSequence } else { Scope::Batch };
        let pol = AllocT::new(k, cap).with_floor(floor).with_score(score).with_scope(scope);
        let s = pol.select(3, &c.batch()).unwrap();
        prop_assert_eq!(s.width, cap);
        assert_prefixes(&c, &s)?;
        let counts = s.counts();
        for t in (0..c.tokens).filter(|&t| c.valid(t)) {
            prop_assert!((floor..=cap).contains(&(counts[t] as usize)), "token {} got {}", t, counts[t]);
        }
        for g in groups(&c, scope) {
            let valid: Vec<usize> = g.into_iter().filter(|&t| c.valid(t)).collect();
            let pairs = pairs_for(k, valid.len() as u64) as usize;
            let got: usize = valid.iter().map(|&t| counts[t] as usize).sum();
            prop_assert_eq!(got, pairs, "group {:?} K {}", valid, k);
            let mut total = 0.0f64;
            for &t in &valid {
                let row = c.row(t);
                let top1 = row[sorted_experts(row)[0]];
                total += s.token(t).iter().map(|&e| f64::from(score.of(row[e as usize], top1))).sum::<f64>();
            }
            let best = best_total(&c, &valid, floor, cap, pairs, score);
            prop_assert!((total - best).abs() <= 1e-9 * (1.0 + best.abs()), "total {} best {}", total, best);
        }
    }

    #[test]
    fn alloc_t_budget_outside_floor_cap_is_an_error((c, floor, cap, _k, _r, _s) in alloc_t_case(), above in any::<bool>()) {
        let k = if above { cap as f64 + 0.5 } else { floor as f64 - 0.25 };
        let e = AllocT::new(k, cap).with_floor(floor).select(2, &c.batch()).unwrap_err().to_string();
        prop_assert!(e.contains("layer 2") && e.contains(&format!("K = {k}")), "{}", e);
    }

    #[test]
    fn alloc_t_at_one_token_and_integer_k_is_topk(c in case_in(1, 1, 8, 8, None), k in 0usize..=8) {
        let a = AllocT::new(k as f64, k).with_floor(0).select(0, &c.batch()).unwrap();
        let b = TopK::new(k).select(0, &c.batch()).unwrap();
        prop_assert_eq!(a, b);
    }

    #[test]
    fn per_sequence_scope_isolates_sequences(c in case_in(0, 9, 3, 6, Some(true)), k in 1.0f64..3.0) {
        // Routing a sequence alone gives the same ids as routing it inside the batch.
        let pol = AllocT::new(k, 3).with_scope(Scope::PerSequence);
        let all = pol.select(0, &c.batch()).unwrap();
        let seq = c.seq.clone().unwrap();
        for g in groups(&c, Scope::PerSequence) {
            let sub = Case {
                probs: g.iter().flat_map(|&t| c.row(t).to_vec()).collect(),
                tokens: g.len(),
                experts: c.experts,
                mask: c.mask.as_ref().map(|m| g.iter().map(|&t| m[t]).collect()),
                seq: Some(g.iter().map(|&t| seq[t]).collect()),
            };
            let alone = pol.select(0, &sub.batch()).unwrap();
            for (i, &t) in g.iter().enumerate() {
                prop_assert_eq!(alone.token(i), all.token(t));
            }
        }
    }

    #[test]
    fn threshold_topp_skip_topk_give_prefixes(c in case(8, 8), a in 0usize..8, b in 0usize..8, x in 0.0f32..1.0) {
        let (lo, hi) = (a.min(b).min(c.experts), a.max(b).min(c.experts));
        let b = c.batch();
        assert_prefixes(&c, &TopK::new(hi).select(0, &b).unwrap())?;
        let s = Threshold::new(x, lo, hi).select(0, &b).unwrap();
        assert_prefixes(&c, &s)?;
        for t in (0..c.tokens).filter(|&t| c.valid(t)) {
            let n = s.token(t).len();
            prop_assert!((lo..=hi).contains(&n));
            let row = c.row(t);
            // Within the bounds, exactly the experts at or above tau are kept.
            let above = row.iter().filter(|&&p| p >= x).count();
            prop_assert_eq!(n, above.clamp(lo, hi));
        }
        let s = TopP::new(f64::from(x).max(1e-3), lo, hi).select(0, &b).unwrap();
        assert_prefixes(&c, &s)?;
        if hi >= 1 {
            let s = Skip::new(x, hi).select(0, &b).unwrap();
            assert_prefixes(&c, &s)?;
            for t in (0..c.tokens).filter(|&t| c.valid(t)) {
                let ids = s.token(t);
                let row = c.row(t);
                let cut = x * row[ids[0] as usize];
                prop_assert!(ids.iter().all(|&e| row[e as usize] >= cut));
                prop_assert!(ids.len() == hi || row[sorted_experts(row)[ids.len()]] < cut);
            }
        }
    }

    #[test]
    fn random_gives_k_distinct_experts_in_probability_order(c in case(8, 8), k in 0usize..8, seed in any::<u64>()) {
        prop_assume!(k <= c.experts);
        let s = RandomK::new(k, seed).select(1, &c.batch()).unwrap();
        for t in 0..c.tokens {
            let ids = s.token(t);
            prop_assert_eq!(ids.len(), if c.valid(t) { k } else { 0 });
            let order = sorted_experts(c.row(t));
            let pos: Vec<usize> = ids.iter().map(|&e| order.iter().position(|&o| o as i64 == e).unwrap()).collect();
            prop_assert!(pos.windows(2).all(|w| w[0] < w[1]), "{:?}", ids);
        }
    }
}

#[test]
fn topp_total_mass_reached_with_min_and_max() {
    // Kept mass reaches p (unless capped), and dropping the last kept expert would not.
    let p = [0.4f32, 0.3, 0.2, 0.1];
    let c = Case { probs: p.to_vec(), tokens: 1, experts: 4, mask: None, seq: None };
    for (pp, want) in [(0.3, 1), (0.65, 2), (0.75, 3), (1.0, 4)] {
        let s = TopP::new(pp, 1, 4).select(0, &c.batch()).unwrap();
        assert_eq!(s.token(0).len(), want, "p = {pp}");
    }
}
