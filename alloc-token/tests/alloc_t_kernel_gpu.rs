//! On a GPU: Alloc-T's batch-wide selection kernel (`device::alloc_t_kernel`) selects exactly the ids
//! of the libtorch device path run on the CPU. Run on a CUDA machine:
//! `cargo test -p alloc-token --features tch --test alloc_t_kernel_gpu -- --ignored`.

#![cfg(feature = "tch")]
#![allow(clippy::unwrap_used)]

use alloc_token::device::alloc_t_kernel::select_batch;
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
    for &(t, e) in &[(1i64, 8i64), (7, 8), (300, 16), (1000, 64), (2730, 64)] {
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
                let direct = select_batch(&p, &vals, &idx, gm.as_ref(), k).expect("kernel").expect("kernel applies");
                let gpu = DevicePolicy::select(&p, 0, &DeviceBatch { probs: &gp, mask: gm.as_ref(), seq_ids: None }).expect("gpu");
                assert!(direct.to_device(Device::Cpu).equal(&cpu), "kernel != libtorch: t {t} e {e} floor {floor} cap {cap} k {k} rel {relative} mask {masked}");
                assert!(gpu.to_device(Device::Cpu).equal(&cpu));
                cases += 1;
            }
        }
    }
    eprintln!("alloc_t kernel == libtorch path on {cases} cases");
    // Above the size limit the kernel declines (the libtorch path is faster there).
    let probs = Tensor::rand([8192, 64], (Kind::Float, dev)).softmax(-1, Kind::Float);
    let (vals, idx) = probs.sort_stable(true, 1, true);
    assert!(select_batch(&AllocT::new(3.0, 6), &vals, &idx, None, 3.0).expect("no error").is_none());
}
