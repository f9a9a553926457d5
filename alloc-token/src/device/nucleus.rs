//! Top-p on the device: the host rule ([`crate::nucleus`]) with fixed-point masses, so the cumulative
//! sum is exact integer arithmetic whatever order the device adds in.

use tch::{Kind, Tensor};

use super::{select_by_count, DeviceBatch, DevicePolicy, DeviceResult};
use crate::nucleus::{TopP, MASS_SCALE};

impl TopP {
    /// `[T]` i64 kept experts per token.
    fn device_counts(&self, vals: &Tensor) -> Result<Tensor, tch::TchError> {
        let top1 = vals.f_narrow(1, 0, 1)?; // (t, 1)
        let zero = Tensor::f_zeros([] as [i64; 0], (Kind::Float, vals.device()))?;
        let mass = vals.f_div(&top1)?.f_mul_scalar(f64::from(MASS_SCALE))?.f_floor()?;
        let mass = mass.f_where_self(&top1.f_gt(0.0)?, &zero)?.f_to_kind(Kind::Int64)?; // (t, e)
        let total = mass.f_sum_dim_intlist(1, true, Kind::Int64)?.f_to_kind(Kind::Double)?.f_mul_scalar(self.p)?;
        let before = mass.f_cumsum(1, Kind::Int64)?.f_sub(&mass)?.f_to_kind(Kind::Double)?;
        let n = before.f_lt_tensor(&total)?.f_sum_dim_intlist(1, false, Kind::Int64)?;
        n.f_clamp(self.min_k as i64, self.max_k as i64)
    }
}

impl DevicePolicy for TopP {
    fn name(&self) -> String {
        alloc_core::routing::RoutingPolicy::name(self)
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.max_k
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let (_, e) = batch.shape()?;
        self.check(layer, e as usize)?;
        select_by_count(batch, self.max_k, "topp", |vals| self.device_counts(vals))
    }
}
