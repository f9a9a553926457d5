//! Threshold routing on the device: `p >= tau` compared in f32, as on the host ([`crate::threshold`]).

use tch::{Kind, Tensor};

use super::{select_by_count, DeviceBatch, DevicePolicy, DeviceResult};
use crate::threshold::Threshold;

impl DevicePolicy for Threshold {
    fn name(&self) -> String {
        alloc_core::routing::RoutingPolicy::name(self)
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.max_k
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let (_, e) = batch.shape()?;
        self.check(layer, e as usize)?;
        select_by_count(batch, self.max_k, "threshold", |vals| {
            // A 0-dim f32 tensor made on the device, so the comparison is f32 against f32.
            let tau = Tensor::f_full([] as [i64; 0], f64::from(self.tau), (Kind::Float, vals.device()))?;
            let n = vals.f_ge_tensor(&tau)?.f_sum_dim_intlist(1, false, Kind::Int64)?;
            n.f_clamp(self.min_k as i64, self.max_k as i64)
        })
    }
}
