//! Time the two expert-dispatch paths of one MoE layer on the CPU (f32): `PerExpert` (host grouping, one
//! matmul pair per non-empty expert) and `Grouped` (`_grouped_mm` over stacked weights).
//!
//! `cargo run -p moe-models --example dispatch_cpu -- [experts hidden inter k]` (defaults: a quarter-width
//! DeepSeek-V2-Lite layer, 64 experts, h 512, i 352, k 6). Prints the best of 15 runs per token count (the machine is shared; the minimum is the least noisy).

use std::time::Instant;

use moe_models::layers::moe::Experts;
use moe_models::Dispatch;
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<i64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let get = |i: usize, d: i64| args.get(i).copied().unwrap_or(d);
    let (e, h, i, k) = (get(0, 64), get(1, 512), get(2, 352), get(3, 6));
    tch::manual_seed(0);
    let _guard = tch::no_grad_guard();
    let experts = Experts {
        gate_up_proj: Tensor::randn([e, 2 * i, h], (Kind::Float, Device::Cpu)) * 0.02,
        down_proj: Tensor::randn([e, h, i], (Kind::Float, Device::Cpu)) * 0.02,
        num_experts: e,
    };
    println!("experts {e}, hidden {h}, inter {i}, k {k}, threads {}", tch::get_num_threads());
    println!("{:>7} {:>14} {:>14} {:>8}", "tokens", "per_expert_ms", "grouped_ms", "ratio");
    for n in [1i64, 4, 16, 64, 256] {
        let x = Tensor::randn([n, h], (Kind::Float, Device::Cpu));
        let probs = Tensor::rand([n, e], (Kind::Float, Device::Cpu));
        let (w, ids) = probs.topk(k, -1, true, true);
        let med = |d: Dispatch| {
            let mut t: Vec<f64> = (0..15)
                .map(|_| {
                    let s = Instant::now();
                    let _ = experts.forward(&x, &ids, &w, d, None).expect("forward");
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(|a, b| a.total_cmp(b));
            t[0]
        };
        let (a, b) = (med(Dispatch::PerExpert), med(Dispatch::Grouped));
        println!("{n:>7} {a:>14.3} {b:>14.3} {:>8.2}", a / b);
    }
}
