//! Random routing on the device: the host's counter-based hash ([`crate::random`]) evaluated with i64
//! tensor ops (every product stays below 2^63), then the k smallest keys, listed in probability order.

use tch::{Device, Kind, Tensor};

use super::{empty_selection, mask_padding, torch, DeviceBatch, DevicePolicy, DeviceResult};
use crate::random::{layer_key, RandomK, MIX_MUL};

/// [`crate::random::mix32`] on an i64 tensor of values in `0..2^32`.
fn mix32(x: &Tensor) -> Result<Tensor, tch::TchError> {
    const MASK: i64 = 0xffff_ffff;
    let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)?;
    let x = x.f_mul_scalar(MIX_MUL[0] as i64)?.f_bitwise_and(MASK)?;
    let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(15)?)?;
    let x = x.f_mul_scalar(MIX_MUL[1] as i64)?.f_bitwise_and(MASK)?;
    x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)
}

/// `[T, E]` i64 keys of every (token position, expert).
fn keys(lk: u64, t: i64, e: i64, dev: Device) -> Result<Tensor, tch::TchError> {
    let pos = Tensor::f_arange(t, (Kind::Int64, dev))?.f_bitwise_xor_tensor(&Tensor::f_full(
        [] as [i64; 0],
        lk as i64,
        (Kind::Int64, dev),
    )?)?;
    let tok = mix32(&pos)?.f_unsqueeze(1)?; // (t, 1)
    let exp = Tensor::f_arange(e, (Kind::Int64, dev))?.f_unsqueeze(0)?; // (1, e)
    mix32(&tok.f_bitwise_xor_tensor(&exp)?)
}

impl DevicePolicy for RandomK {
    fn name(&self) -> String {
        alloc_core::routing::RoutingPolicy::name(self)
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let (t, e) = batch.shape()?;
        crate::common::check_width("random", layer, "k", self.k, e as usize)?;
        let dev = batch.probs.device();
        if t == 0 {
            return empty_selection(self.k, dev);
        }
        let k = self.k as i64;
        let ids = torch("random.select", (|| {
            let (_, by_key) = keys(layer_key(self.seed, layer), t, e, dev)?.f_sort_stable(true, 1, false)?;
            let chosen = Tensor::f_zeros([t, e], (Kind::Bool, dev))?.f_scatter_value(1, &by_key.f_narrow(1, 0, k)?, 1)?;
            let (_, by_prob) = batch.probs.f_sort_stable(true, 1, true)?;
            // Compact the chosen experts to the front, keeping probability order (stable sort of 0/1 flags).
            let not_chosen = chosen.f_gather(1, &by_prob, false)?.f_logical_not()?.f_to_kind(Kind::Int64)?;
            let (_, front) = not_chosen.f_sort_stable(true, 1, false)?;
            by_prob.f_gather(1, &front.f_narrow(1, 0, k)?, false)
        })())?;
        mask_padding(ids, batch.mask)
    }
}
