//! Realized accounting on the device: counters that stay on the device during a run and are read to the
//! host once, at the end ([`DeviceLayerCounters::finish`]), so recording adds no synchronisation.

use alloc_core::LayerActivationStats;
use tch::{Device, Kind, Tensor};

use super::{torch, DeviceError, DeviceResult};

/// One MoE layer's activation counters on the device.
#[derive(Debug)]
pub struct DeviceLayerCounters {
    /// The model's layer index.
    pub layer: usize,
    experts: i64,
    /// 0-dim i64: valid tokens routed.
    tokens: Tensor,
    /// `[width + 1]` i64: `histogram[j]` = valid tokens that got exactly j experts.
    histogram: Tensor,
    /// `[E]` i64: (token, expert) pairs per expert.
    expert_load: Tensor,
    /// 0-dim i64: sum over batches of distinct experts touched.
    unique_sum: Tensor,
    /// Batches recorded (known on the host: one per `record` call).
    batches: u64,
}

impl DeviceLayerCounters {
    /// Zeroed counters for `layer`, selections up to `width` experts per token, `experts` routed experts.
    pub fn new(layer: usize, width: usize, experts: usize, device: Device) -> DeviceResult<Self> {
        let z = |n: &[i64]| torch("zeros", Tensor::f_zeros(n, (Kind::Int64, device)));
        Ok(Self {
            layer,
            experts: experts as i64,
            tokens: z(&[])?,
            histogram: z(&[width as i64 + 1])?,
            expert_load: z(&[experts as i64])?,
            unique_sum: z(&[])?,
            batches: 0,
        })
    }

    /// Add one batch: `ids` `[T, W]` (a policy's output, -1 padded, `W <= width`) and the padding mask.
    pub fn record(&mut self, ids: &Tensor, mask: Option<&Tensor>) -> DeviceResult<()> {
        let size = ids.size();
        let width = self.histogram.size()[0] - 1;
        if size.len() != 2 || size[1] > width {
            return Err(DeviceError::Invalid(format!(
                "layer {}: selection of shape {size:?} for counters of width {width}",
                self.layer
            )));
        }
        let (t, e) = (size[0], self.experts);
        torch("accounting.record", (|| {
            let chosen = ids.f_ge(0)?; // (t, w)
            let counts = chosen.f_sum_dim_intlist(1, false, Kind::Int64)?; // (t)
            let valid = match mask {
                Some(m) => m.f_to_kind(Kind::Int64)?,
                None => Tensor::f_ones([t], (Kind::Int64, ids.device()))?,
            };
            self.histogram = self.histogram.f_index_add(0, &counts, &valid)?;
            self.tokens = self.tokens.f_add(&valid.f_sum(Kind::Int64)?)?;
            // Padding slots (-1) go to an extra bin e that is dropped.
            let slot = ids.f_where_self(&chosen, &Tensor::f_full([] as [i64; 0], e, (Kind::Int64, ids.device()))?)?;
            let slot = slot.f_reshape([-1])?;
            let hits = Tensor::f_zeros([e + 1], (Kind::Int64, ids.device()))?
                .f_index_add(0, &slot, &slot.f_ones_like()?)?
                .f_narrow(0, 0, e)?;
            self.expert_load = self.expert_load.f_add(&hits)?;
            self.unique_sum = self.unique_sum.f_add(&hits.f_gt(0)?.f_sum(Kind::Int64)?)?;
            Ok(())
        })())?;
        self.batches += 1;
        Ok(())
    }

    /// Read the counters to the host (the one synchronisation) as the host statistics type.
    pub fn finish(&self) -> DeviceResult<LayerActivationStats> {
        let read = |x: &Tensor| -> DeviceResult<Vec<i64>> {
            let x = torch("accounting.to_cpu", x.f_to_device(Device::Cpu).and_then(|x| x.f_reshape([-1])))?;
            torch("accounting.read", Vec::<i64>::try_from(&x))
        };
        let u = |v: Vec<i64>| v.into_iter().map(|x| x.max(0) as u64).collect::<Vec<u64>>();
        let mut histogram = u(read(&self.histogram)?);
        while histogram.last() == Some(&0) {
            histogram.pop();
        }
        let activations = histogram.iter().enumerate().map(|(j, &n)| j as u64 * n).sum();
        Ok(LayerActivationStats {
            layer: self.layer,
            tokens: u(read(&self.tokens)?).iter().sum(),
            activations,
            histogram,
            unique_experts_sum: u(read(&self.unique_sum)?).iter().sum(),
            batches: self.batches,
        })
    }

    /// Pairs routed to each expert so far (reads to the host).
    pub fn expert_load(&self) -> DeviceResult<Vec<u64>> {
        let x = torch("accounting.to_cpu", self.expert_load.f_to_device(Device::Cpu))?;
        Ok(torch("accounting.read", Vec::<i64>::try_from(&x))?.into_iter().map(|v| v.max(0) as u64).collect())
    }
}
