//! Top-k and per-layer top-k (Alloc-L) on the device: the first k columns of the stable descending sort.

use tch::Tensor;

use super::{empty_selection, mask_padding, sorted_experts, torch, DeviceBatch, DevicePolicy, DeviceResult};
use crate::common::check_width;
use crate::{PerLayerTopK, TopK};

/// The first `k` sorted experts of every valid token.
fn first_k(policy: &str, layer: usize, k: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
    let (t, e) = batch.shape()?;
    check_width(policy, layer, "k", k, e as usize)?;
    if t == 0 {
        return empty_selection(k, batch.probs.device());
    }
    // On CUDA one kernel ranks each row's first k; elsewhere the full stable sort.
    let ids = match super::kernels::sorted_prefix(batch.probs, k as i64)? {
        Some((_, ids)) => ids,
        None => torch("narrow", sorted_experts(batch.probs)?.f_narrow(1, 0, k as i64))?,
    };
    mask_padding(ids, batch.mask)
}

impl DevicePolicy for TopK {
    fn name(&self) -> String {
        "topk".into()
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        first_k("topk", layer, self.k, batch)
    }
    fn fixed_top_k(&self, _layer: usize, _tokens: usize) -> Option<usize> {
        Some(self.k)
    }
}

impl DevicePolicy for PerLayerTopK {
    fn name(&self) -> String {
        "alloc-l".into()
    }
    fn max_k(&self, layer: usize) -> usize {
        self.allocation.k_of(layer).map_or(0, |k| k as usize)
    }
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        first_k("alloc-l", layer, self.k_of(layer)?, batch)
    }
    fn fixed_top_k(&self, layer: usize, _tokens: usize) -> Option<usize> {
        self.k_of(layer).ok()
    }
}
