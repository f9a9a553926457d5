//! Alloc-T selection speed, host reference and (feature `tch`) libtorch on the CPU, for T in
//! {1, 64, 2048, 8192} tokens x E in {8, 60, 64, 256} experts. The cap (native top-k) per E follows the
//! families that have it (Mixtral 8 -> 2, Qwen1.5-MoE 60 -> 4, DeepSeek-V2-Lite 64 -> 6, 256 -> 8 as in
//! DeepSeek-V3); the budget is K_l = k/2 + 0.25, fractional so that round(K_l * T) is exercised.
//! Throughput counts router probabilities (T * E). Run:
//! `cargo bench -p bench --features tch --bench token_alloc -- --warm-up-time 1 --measurement-time 2`.

#![allow(missing_docs)] // criterion_group! generates undocumented functions

use alloc_core::routing::{RouterBatch, RoutingPolicy};
use alloc_token::AllocT;
use bench::synthetic_router_probs;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TOKENS: [usize; 4] = [1, 64, 2048, 8192];
const EXPERTS: [(usize, usize); 4] = [(8, 2), (60, 4), (64, 6), (256, 8)];

/// Alloc-T with the bench's budget for native top-`k`: K_l = k/2 + 0.25, floor 1, cap k.
fn policy(k: usize) -> AllocT {
    AllocT::new(k as f64 / 2.0 + 0.25, k)
}

fn host(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_t_host");
    for &(e, k) in &EXPERTS {
        for &t in &TOKENS {
            let probs = synthetic_router_probs(t, e);
            let pol = policy(k);
            g.throughput(Throughput::Elements((t * e) as u64));
            g.bench_with_input(BenchmarkId::new(format!("E{e}_k{k}"), t), &probs, |b, probs| {
                let batch = RouterBatch::new(probs, t, e).expect("valid batch");
                b.iter(|| pol.select(0, &batch).expect("feasible"))
            });
        }
    }
    g.finish();
}

#[cfg(feature = "tch")]
fn device_cpu(c: &mut Criterion) {
    use alloc_token::device::{DeviceBatch, DevicePolicy};
    use tch::Tensor;
    // One intra-op thread: the host reference is single-threaded per row sort too, and on a small shared
    // machine libtorch's OpenMP workers spin against other processes, which made multi-threaded timings
    // swing by 10-60x between neighbouring sizes.
    tch::set_num_threads(1);
    let mut g = c.benchmark_group("alloc_t_tch_cpu");
    for &(e, k) in &EXPERTS {
        for &t in &TOKENS {
            let probs = Tensor::from_slice(&synthetic_router_probs(t, e)).reshape([t as i64, e as i64]);
            let pol = policy(k);
            g.throughput(Throughput::Elements((t * e) as u64));
            g.bench_with_input(BenchmarkId::new(format!("E{e}_k{k}"), t), &probs, |b, probs| {
                let batch = DeviceBatch { probs, mask: None, seq_ids: None };
                // On the CPU every op completes before it returns, so no synchronisation is needed.
                b.iter(|| DevicePolicy::select(&pol, 0, &batch).expect("feasible"))
            });
        }
    }
    g.finish();
}

#[cfg(feature = "tch")]
criterion_group!(benches, host, device_cpu);
#[cfg(not(feature = "tch"))]
criterion_group!(benches, host);
criterion_main!(benches);
