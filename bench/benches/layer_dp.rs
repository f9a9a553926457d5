//! Alloc-L solver speed: the DP's full budget frontier at 26, 60 and 120 layers x 8 and 16 k values,
//! and the ILP referee at 26 layers.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use alloc_layer::{solve_ilp, Frontier, KBounds, Problem};
use bench::synthetic_profile;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn dp_frontier(c: &mut Criterion) {
    let mut g = c.benchmark_group("dp_frontier");
    for layers in [26usize, 60, 120] {
        for k in [8u32, 16] {
            let p = Problem::from_profile(&synthetic_profile(layers, k), KBounds::default()).expect("valid");
            let max = p.max_total();
            g.throughput(Throughput::Elements((layers as u64) * u64::from(max) * u64::from(k)));
            g.bench_with_input(BenchmarkId::new(format!("{layers}x{k}"), max), &p, |b, p| {
                b.iter(|| Frontier::new(p, max))
            });
        }
    }
    g.finish();
}

fn ilp(c: &mut Criterion) {
    let mut g = c.benchmark_group("ilp");
    g.sample_size(10);
    let p = Problem::from_profile(&synthetic_profile(26, 6), KBounds::default()).expect("valid");
    g.bench_function("26x6_half_budget", |b| b.iter(|| solve_ilp(&p, 78).expect("feasible")));
    g.finish();
}

criterion_group!(benches, dp_frontier, ilp);
criterion_main!(benches);
