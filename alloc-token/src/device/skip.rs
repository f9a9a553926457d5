//! NAEE-style skipping on the device: `beta * p_top1` in f32 (a device f32 scalar times the f32 top-1),
//! as on the host ([`crate::skip`]).

use tch::{Kind, Tensor};

use super::{select_by_count, DeviceBatch, DevicePolicy, DeviceResult};
use crate::skip::Skip;

impl DevicePolicy for Skip {
    fn name(&self) -> String {
        alloc_core::routing::RoutingPolicy::name(self)
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let (_, e) = batch.shape()?;
        self.check(layer, e as usize)?;
        select_by_count(batch, self.k, "skip", |vals| {
            let beta = Tensor::f_full([] as [i64; 0], f64::from(self.beta), (Kind::Float, vals.device()))?;
            let cut = vals.f_narrow(1, 0, 1)?.f_mul(&beta)?; // (t, 1)
            let n = vals.f_narrow(1, 0, self.k as i64)?.f_ge_tensor(&cut)?.f_sum_dim_intlist(1, false, Kind::Int64)?;
            n.f_clamp_min(1)
        })
    }
}
