//! On a GPU: alloc-token's kernels (`device::kernels`) select exactly the ids of the libtorch device path
//! run on the CPU: the row top-k, Alloc-T for small batches (one block) and for large ones. Run on a CUDA machine:
//! `cargo test -p alloc-token --features tch --test alloc_t_kernel_gpu -- --ignored`.

#![cfg(feature = "tch")]
#![allow(clippy::unwrap_used)]

use alloc_token::device::kernels::{alloc_t_large, alloc_t_small, sorted_prefix};
use alloc_token::device::{DeviceBatch, DevicePolicy};
use alloc_token::{AllocT, Scope, Score};
use tch::{Device, Kind, Tensor};

/// On a GPU: the kernel selects exactly the ids of the libtorch path (run on the CPU), over random
/// batches with many ties (probabilities on a coarse grid), padding, both scores, floors 0 and 1,
/// fractional budgets and sizes up to 8192 tokens.
#[test]
#[ignore = "needs a CUDA device"]
fn kernel_equals_the_libtorch_path() {
    let dev = Device::Cuda(0);
    tch::manual_seed(21);
    let mut cases = 0;
    for &(t, e) in &[(1i64, 8i64), (7, 8), (300, 16), (1000, 64), (2730, 64), (8192, 64)] {
        for &(floor, cap) in &[(1usize, 2usize), (1, 6), (0, 4), (2, 8)] {
            if cap as i64 > e {
                continue;
            }
            for &(frac, relative, masked) in &[(0.5, false, false), (0.37, true, true), (0.0, false, true), (1.0, true, false)] {
                let k = floor as f64 + frac * (cap - floor) as f64;
                let p = AllocT::new(k, cap).with_floor(floor).with_score(if relative { Score::RelativeToTop1 } else { Score::Probability }).with_scope(Scope::Batch);
                // A coarse grid makes ties common, across and within tokens.
                let raw = (Tensor::rand([t, e], (Kind::Float, Device::Cpu)) * 8.0).floor() + 1.0;
                let probs = &raw / raw.sum_dim_intlist(1, true, Kind::Float);
                let mask = masked.then(|| Tensor::rand([t], (Kind::Float, Device::Cpu)).gt(0.2));
                let cpu = DevicePolicy::select(&p, 0, &DeviceBatch { probs: &probs, mask: mask.as_ref(), seq_ids: None }).expect("cpu");
                let (gp, gm) = (probs.to_device(dev), mask.as_ref().map(|m| m.to_device(dev)));
                let (vals, idx) = gp.sort_stable(true, 1, true);
                let (pv, pi) = sorted_prefix(&gp, cap as i64).expect("prefix").expect("prefix applies");
                assert!(pv.equal(&vals.narrow(1, 0, cap as i64)) && pi.equal(&idx.narrow(1, 0, cap as i64)), "row top-k != sort");
                let what = format!("t {t} e {e} floor {floor} cap {cap} k {k} rel {relative} mask {masked}");
                if t * ((cap - floor) as i64) <= 16384 {
                    let small = alloc_t_small(&p, &vals, &idx, gm.as_ref(), k).expect("kernel").expect("small applies");
                    assert!(small.to_device(Device::Cpu).equal(&cpu), "small kernel != libtorch: {what}");
                }
                let large = alloc_t_large(&p, &pv, &pi, gm.as_ref(), k).expect("kernel").expect("large applies");
                assert!(large.to_device(Device::Cpu).equal(&cpu), "large kernels != libtorch: {what}");
                let gpu = DevicePolicy::select(&p, 0, &DeviceBatch { probs: &gp, mask: gm.as_ref(), seq_ids: None }).expect("gpu");
                assert!(gpu.to_device(Device::Cpu).equal(&cpu), "select != libtorch: {what}");
                cases += 1;
            }
        }
    }
    eprintln!("alloc_t kernel == libtorch path on {cases} cases");
    // Above its size limit the one-block kernel declines (the large-batch kernels are faster there).
    let probs = Tensor::rand([8192, 64], (Kind::Float, dev)).softmax(-1, Kind::Float);
    let (vals, idx) = probs.sort_stable(true, 1, true);
    assert!(alloc_t_small(&AllocT::new(3.0, 6), &vals, &idx, None, 3.0).expect("no error").is_none());
    // Top-k through the row kernel equals the CPU path too.
    let topk = alloc_token::TopK { k: 6 };
    let gpu = DevicePolicy::select(&topk, 0, &DeviceBatch { probs: &probs, mask: None, seq_ids: None }).expect("gpu");
    let cpu = DevicePolicy::select(&topk, 0, &DeviceBatch { probs: &probs.to_device(Device::Cpu), mask: None, seq_ids: None }).expect("cpu");
    assert!(gpu.to_device(Device::Cpu).equal(&cpu));
}
