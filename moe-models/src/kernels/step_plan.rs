//! The plan of one decode step with a preallocated cache in one kernel (`step_plan.cu`) instead of
//! `StepPlan`'s ~18 general libtorch kernels.

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch};
use crate::error::Result;

const PLAN_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("step_plan.cu"));
pub(super) static PLAN: Kernels = Kernels::new("step_plan.cu", PLAN_SOURCE, &["decode_plan"]);

/// What [`decode_plan`] makes: the fields of a `StepPlan` for one new token per sequence.
#[derive(Debug)]
pub struct DecodePlan {
    /// `(b, s)` bool: the cache's valid keys with the step's slot added.
    pub key_valid: Tensor,
    /// `(b, 1, 1, s)` f32: 0 where the token may attend (valid keys up to its slot, and itself), -inf elsewhere.
    pub bias: Tensor,
    /// `(b, 1)` i64: the token's rotary position (the sequence's next position, at least 0).
    pub positions: Tensor,
    /// `(b)` i64: the next position after the step.
    pub next_pos: Tensor,
    /// `(1, s)` i64: the slot of each key (`0..s`).
    pub k_slot: Tensor,
    /// `(b, 1)` bool, all true: every new token is real.
    pub mask: Tensor,
}

/// The plan of a decode step feeding one token per sequence without a padding mask into a preallocated
/// cache whose valid keys are `key_valid` `(b, s)` bool, next positions `next_pos` `(b)` i64, and write
/// slot `slots` `(1)` i64 (all on one CUDA device). `None` when the kernel does not apply (other
/// shapes, dtypes or devices, or it did not compile) and the caller plans with libtorch.
pub fn decode_plan(key_valid: &Tensor, next_pos: &Tensor, slots: &Tensor) -> Result<Option<DecodePlan>> {
    let device = key_valid.device();
    let ks = key_valid.size();
    let ok = device.is_cuda()
        && ks.len() == 2
        && (1..=65535).contains(&ks[0])
        && (1..=i32::MAX as i64).contains(&ks[1])
        && key_valid.kind() == Kind::Bool
        && key_valid.is_contiguous()
        && next_pos.kind() == Kind::Int64
        && next_pos.size() == [ks[0]]
        && next_pos.device() == device
        && slots.kind() == Kind::Int64
        && slots.size() == [1]
        && slots.device() == device;
    if !ok {
        return Ok(None);
    }
    let Ok(k) = compiled(&PLAN, device) else {
        return Ok(None);
    };
    let (b, s) = (ks[0], ks[1]);
    let next_pos = next_pos.contiguous();
    let plan = DecodePlan {
        key_valid: Tensor::f_empty([b, s], (Kind::Bool, device))?,
        bias: Tensor::f_empty([b, 1, 1, s], (Kind::Float, device))?,
        positions: Tensor::f_empty([b, 1], (Kind::Int64, device))?,
        next_pos: Tensor::f_empty([b], (Kind::Int64, device))?,
        k_slot: Tensor::f_empty([1, s], (Kind::Int64, device))?,
        mask: Tensor::f_empty([b, 1], (Kind::Bool, device))?,
    };
    let args = [
        Arg::Tensor(key_valid), Arg::Tensor(&next_pos), Arg::Tensor(slots), Arg::I32(s as i32), Arg::Tensor(&plan.key_valid),
        Arg::Tensor(&plan.bias), Arg::Tensor(&plan.positions), Arg::Tensor(&plan.next_pos), Arg::Tensor(&plan.k_slot), Arg::Tensor(&plan.mask),
    ];
    launch(k[0], [b as u32, 1, 1], [256, 1, 1], &args)?;
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::gpu;

    /// On a GPU: the kernel's plan equals StepPlan's libtorch formulation for one token (index_copy of
    /// the slot, clamped positions, causal-or-self and valid keys as a -inf bias), with invalid keys
    /// before the slot (padding), stale valid keys after it, and a negative next position.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn decode_plan_matches_the_libtorch_plan() {
        let dev = gpu(5);
        let (b, s, slot) = (3i64, 50i64, 20i64);
        let kv = Tensor::rand([b, s], (Kind::Float, dev)).gt(0.3);
        let np = Tensor::from_slice(&[7i64, 0, -2]).to_device(dev);
        let slots = Tensor::from_slice(&[slot]).to_device(dev);
        let p = decode_plan(&kv, &np, &slots).expect("plan").expect("applies");
        let mask = Tensor::ones([b, 1], (Kind::Bool, dev));
        let key_valid = kv.index_copy(1, &slots, &mask);
        let k_abs = Tensor::arange(s, (Kind::Int64, dev)).unsqueeze(0);
        let q_abs = slots.unsqueeze(1);
        let allowed = k_abs.le_tensor(&q_abs).unsqueeze(0).logical_and(&key_valid.unsqueeze(1)).logical_or(&k_abs.eq_tensor(&q_abs).unsqueeze(0));
        let bias = Tensor::zeros([1], (Kind::Float, dev)).where_self(&allowed, &Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, dev))).unsqueeze(1);
        let positions = (mask.cumsum(1, Kind::Int64) + np.unsqueeze(1) - 1).clamp_min(0);
        assert!(p.key_valid.equal(&key_valid));
        assert!(p.bias.equal(&bias));
        assert!(p.positions.equal(&positions));
        assert!(p.next_pos.equal(&(&np + 1)));
        assert!(p.k_slot.equal(&k_abs));
        assert!(p.mask.equal(&mask));
    }
}
