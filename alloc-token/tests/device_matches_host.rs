//! The device implementation (libtorch on the CPU) selects exactly the host reference's ids, on random
//! inputs with ties, signed zeros, padding masks, T = 0 and T = 1, fractional K_l * T and per-sequence
//! scope; the device counters equal the host accounting. Run: `cargo test -p alloc-token --features tch`.

#![cfg(feature = "tch")]
#![allow(clippy::unwrap_used)]

mod common;

use alloc_core::routing::RoutingPolicy;
use alloc_core::{LayerActivationStats, LayerAllocation};
use alloc_token::accounting::record_selection;
use alloc_token::device::{DeviceBatch, DeviceLayerCounters, DevicePolicy};
use alloc_token::{AllocT, PerLayerTopK, RandomK, Scope, Score, Skip, Threshold, TopK, TopP};
use common::{case, Case};
use proptest::prelude::*;
use tch::{Device, Tensor};

struct Tensors {
    probs: Tensor,
    mask: Option<Tensor>,
    seq: Option<Tensor>,
}

fn tensors(c: &Case) -> Tensors {
    Tensors {
        probs: Tensor::from_slice(&c.probs).reshape([c.tokens as i64, c.experts as i64]),
        mask: c.mask.as_ref().map(|m| Tensor::from_slice(m)),
        seq: c.seq.as_ref().map(|s| Tensor::from_slice(&s.iter().map(|&x| i64::from(x) * 7 - 3).collect::<Vec<_>>())),
    }
}

/// Host ids and device ids of one policy, both flattened; errors compared by presence.
fn both<P: RoutingPolicy + DevicePolicy>(p: &P, layer: usize, c: &Case) -> (Option<Vec<i64>>, Option<Vec<i64>>) {
    let host = RoutingPolicy::select(p, layer, &c.batch()).ok().map(|s| {
        assert_eq!(s.width, RoutingPolicy::max_k(p, layer));
        s.ids
    });
    let t = tensors(c);
    let batch = DeviceBatch { probs: &t.probs, mask: t.mask.as_ref(), seq_ids: t.seq.as_ref() };
    let dev = DevicePolicy::select(p, layer, &batch).ok().map(|ids| {
        assert_eq!(ids.size(), [c.tokens as i64, DevicePolicy::max_k(p, layer) as i64]);
        let chosen = ids.ge(0).sum(tch::Kind::Int64).int64_value(&[]) as usize;
        let bound = DevicePolicy::max_pairs(p, layer, c.tokens);
        assert!(chosen <= bound, "{} chose {chosen} pairs, above its max_pairs bound {bound}", DevicePolicy::name(p));
        // A fused top-k claim must be exactly the stock top-k (padding-free batches only).
        if let (Some(k), None) = (DevicePolicy::fixed_top_k(p, layer, c.tokens), t.mask.as_ref()) {
            let (_, idx) = t.probs.sort_stable(true, 1, true);
            let first = idx.narrow(1, 0, k as i64);
            let width = ids.size()[1];
            let rest = ids.narrow(1, k as i64, width - k as i64);
            assert!(ids.narrow(1, 0, k as i64).equal(&first), "{} claims top-{k} at {} tokens", DevicePolicy::name(p), c.tokens);
            assert!(rest.lt(0).all().int64_value(&[]) == 1, "{} claims top-{k} but chose more", DevicePolicy::name(p));
        }
        // A batch-split claim must be exactly the split rule (padding-free batches only).
        if let (Some(split), None) = (DevicePolicy::batch_split(p, layer, c.tokens), t.mask.as_ref()) {
            let got = Vec::<i64>::try_from(&ids.reshape([-1])).unwrap();
            assert_eq!(got, split_ids(c, split), "{} claims {split:?} at {} tokens", DevicePolicy::name(p), c.tokens);
        }
        Vec::<i64>::try_from(&ids.reshape([-1])).unwrap()
    });
    (host, dev)
}

/// The ids of [`alloc_token::device::BatchSplit`]'s rule as its documentation states it, written
/// directly: each token's first `floor` experts of its stable descending sort, then the `extra` best
/// candidates (ranks `floor..cap`) by (score desc, rank asc, token asc); `(T, cap)` flattened, -1 padded.
fn split_ids(c: &Case, split: alloc_token::device::BatchSplit) -> Vec<i64> {
    let (t, e) = (c.tokens, c.experts);
    let sorted: Vec<Vec<(f32, usize)>> = (0..t)
        .map(|i| {
            let mut row: Vec<(f32, usize)> = (0..e).map(|j| (c.probs[i * e + j], j)).collect();
            row.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            row
        })
        .collect();
    let mut cands: Vec<(f32, usize, usize)> = Vec::new(); // (score, rank, token)
    for rank in split.floor..split.cap {
        for (i, row) in sorted.iter().enumerate() {
            let top1 = row[0].0;
            let score = if split.relative_to_top1 { if top1 > 0.0 { row[rank].0 / top1 } else { 0.0 } } else { row[rank].0 };
            cands.push((score, rank, i));
        }
    }
    cands.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut counts = vec![split.floor; t];
    for &(_, _, i) in cands.iter().take(split.extra) {
        counts[i] += 1;
    }
    (0..t).flat_map(|i| (0..split.cap).map(move |s| (i, s))).map(|(i, s)| if s < counts[i] { sorted[i][s].1 as i64 } else { -1 }).collect()
}

fn alloc_t(c: &Case, floor: usize, cap: usize, frac: f64, rel: bool, per_seq: bool) -> AllocT {
    let k = floor as f64 + frac * (cap - floor) as f64;
    // Integers and halves often, so round-half-up and exact totals are exercised.
    let k = if frac < 0.25 { (k * 2.0).round() / 2.0 } else { k }.clamp(floor as f64, cap as f64);
    let _ = c;
    AllocT::new(k, cap)
        .with_floor(floor)
        .with_score(if rel { Score::RelativeToTop1 } else { Score::Probability })
        .with_scope(if per_seq { Scope::PerSequence } else { Scope::Batch })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn alloc_t_device_equals_host(c in case(12, 9), a in 0usize..=9, b in 0usize..=2, frac in 0.0f64..=1.0,
                                  rel in any::<bool>(), per_seq in any::<bool>()) {
        let cap = a.min(c.experts);
        let floor = b.min(cap);
        let p = alloc_t(&c, floor, cap, frac, rel, per_seq);
        let (h, d) = both(&p, 1, &c);
        prop_assert!(h.is_some(), "host failed on a feasible case");
        prop_assert_eq!(h, d, "K {} floor {} cap {}", match p.budget { alloc_token::LayerBudget::Uniform(k) => k, _ => 0.0 }, floor, cap);
    }

    #[test]
    fn alloc_t_infeasible_budget_fails_on_both(c in case(6, 6), above in any::<bool>()) {
        let k = if above { c.experts as f64 + 0.5 } else { 0.5 };
        let p = AllocT::new(k, c.experts);
        let (h, d) = both(&p, 0, &c);
        prop_assert!(h.is_none() && d.is_none());
    }

    #[test]
    fn alloc_lt_device_equals_host(c in case(10, 8), k1 in 1u32..=4, k2 in 1u32..=4) {
        let cap = c.experts.min(4);
        let alloc = LayerAllocation::new(vec![1, 2], vec![k1.min(cap as u32), k2.min(cap as u32)]).unwrap();
        let p = AllocT::from_allocation(alloc, cap);
        for layer in [1, 2] {
            let (h, d) = both(&p, layer, &c);
            prop_assert_eq!(h, d);
        }
    }

    #[test]
    fn fractional_alloc_lt_device_equals_host(c in case(10, 8), j1 in 8u32..=32, j2 in 8u32..=32) {
        // K_l on Alloc-L+T's 1/8 grid between 1 and the cap.
        let cap = c.experts.min(4);
        let k = |j: u32| (f64::from(j) / 8.0).min(cap as f64).max(1.0f64.min(cap as f64));
        let p = AllocT::per_layer(vec![1, 2], vec![k(j1), k(j2)], cap);
        for layer in [1, 2] {
            let (h, d) = both(&p, layer, &c);
            prop_assert_eq!(h, d);
        }
    }

    #[test]
    fn other_policies_device_equal_host(c in case(10, 9), a in 0usize..=9, b in 0usize..=9, x in 0.0f32..=1.0,
                                        seed in any::<u64>()) {
        let (lo, hi) = (a.min(b).min(c.experts), a.max(b).min(c.experts));
        let (h, d) = both(&TopK::new(hi), 0, &c);
        prop_assert_eq!(h, d, "topk");
        let per_layer = PerLayerTopK::new(LayerAllocation::new(vec![3, 5], vec![lo as u32, hi as u32]).unwrap());
        let (h, d) = both(&per_layer, 5, &c);
        prop_assert_eq!(h, d, "alloc-l");
        let (h, d) = both(&Threshold::new(x, lo, hi), 0, &c);
        prop_assert_eq!(h, d, "threshold");
        let (h, d) = both(&TopP::new(f64::from(x).max(1e-3), lo, hi), 0, &c);
        prop_assert_eq!(h, d, "topp");
        let (h, d) = both(&Skip::new(x, hi.max(1)), 0, &c);
        prop_assert_eq!(h, d, "skip");
        let (h, d) = both(&RandomK::new(hi, seed), 4, &c);
        prop_assert_eq!(h, d, "random");
    }

    #[test]
    fn device_counters_equal_host_accounting(cs in proptest::collection::vec(case(8, 6), 1..4), k in 0.0f64..=1.0) {
        let e = cs[0].experts;
        let cs: Vec<Case> = cs.into_iter().filter(|c| c.experts == e).collect();
        let cap = e.min(3);
        let p = AllocT::new(1.0 + k * (cap as f64 - 1.0).max(0.0), cap).with_floor(cap.min(1));
        let mut host = LayerActivationStats::new(7);
        let mut dev = DeviceLayerCounters::new(7, cap, e, Device::Cpu).unwrap();
        for c in &cs {
            let s = RoutingPolicy::select(&p, 7, &c.batch()).unwrap();
            record_selection(&mut host, &s, &c.batch()).unwrap();
            let t = tensors(c);
            let batch = DeviceBatch { probs: &t.probs, mask: t.mask.as_ref(), seq_ids: t.seq.as_ref() };
            dev.record(&DevicePolicy::select(&p, 7, &batch).unwrap(), t.mask.as_ref()).unwrap();
        }
        prop_assert_eq!(dev.finish().unwrap(), host);
    }
}

#[test]
fn wide_batch_matches_host() {
    // One larger case (T = 2048, E = 64) with heavy ties: quantised probabilities.
    let (t, e) = (2048usize, 64usize);
    let probs: Vec<f32> = (0..t * e).map(|i| ((i * 2_654_435_761usize) % 97 % 13) as f32 / 64.0).collect();
    let mask: Vec<bool> = (0..t).map(|i| i % 17 != 3).collect();
    let seq: Vec<u32> = (0..t).map(|i| (i / 300) as u32).collect();
    let c = Case { probs, tokens: t, experts: e, mask: Some(mask), seq: Some(seq) };
    for scope in [Scope::Batch, Scope::PerSequence] {
        for score in [Score::Probability, Score::RelativeToTop1] {
            let p = AllocT::new(2.7, 6).with_scope(scope).with_score(score);
            let (h, d) = both(&p, 0, &c);
            assert!(h.is_some());
            assert_eq!(h, d, "{scope:?} {score:?}");
        }
    }
}
