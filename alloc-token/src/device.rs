//! The device side of routing: policies on libtorch tensors, for use inside a model's forward pass.
//!
//! A [`DevicePolicy`] takes one layer's router probabilities as a `[T, E]` f32 tensor on the model's
//! device and returns `[T, W]` i64 expert ids on the same device, each row in decreasing probability
//! (ties: lower expert index first), padded at the end with [`alloc_core::routing::NO_EXPERT`] (-1).
//! Implementations must not synchronise with the host (no copies to host, no scalar reads), so they can
//! run inside a GPU forward pass and a captured CUDA graph, and must select exactly the experts that the
//! host reference selects on the same inputs.

use tch::{Kind, Tensor};

/// Errors of the device routing path.
pub type DeviceResult<T> = std::result::Result<T, DeviceError>;

/// What can go wrong on the device path.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A libtorch operation failed (shape, device, out of memory).
    #[error("libtorch error in {op}: {source}")]
    Torch {
        /// Which step.
        op: &'static str,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// The request cannot be served (bad shape or budget).
    #[error("invalid routing input: {0}")]
    Invalid(String),
}

/// Attach the op name to a libtorch error.
pub(crate) fn torch<T>(op: &'static str, r: Result<T, tch::TchError>) -> DeviceResult<T> {
    r.map_err(|source| DeviceError::Torch { op, source })
}

/// One layer's routing inputs on the device.
#[derive(Debug)]
pub struct DeviceBatch<'a> {
    /// `[T, E]` f32 router probabilities.
    pub probs: &'a Tensor,
    /// `[T]` bool, false for padding tokens (which get no experts). `None`: all valid.
    pub mask: Option<&'a Tensor>,
    /// `[T]` i64 sequence index of each token, for policies that isolate sequences. `None`: one sequence.
    pub seq_ids: Option<&'a Tensor>,
}

/// A routing method on tensors. `layer` is the model's layer index (per-layer policies look up k).
pub trait DevicePolicy: Send + Sync {
    /// A short name recorded in results (e.g. `topk`, `alloc-t`).
    fn name(&self) -> String;
    /// The selection width for `layer` (most experts any token can get there).
    fn max_k(&self, layer: usize) -> usize;
    /// Choose experts: `[T, max_k(layer)]` i64 ids, padded with -1.
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor>;
}

/// Sort each row by decreasing probability, ties to the lower expert index (a stable sort keeps the
/// original, increasing index order among equal values). Returns `[T, E]` i64 indices.
pub fn sorted_experts(probs: &Tensor) -> DeviceResult<Tensor> {
    let (_, idx) = torch("sort", probs.f_sort_stable(true, -1, true))?;
    Ok(idx)
}

/// Stock top-k on the device: every valid token gets its k most probable experts.
#[derive(Debug, Clone)]
pub struct DeviceTopK {
    /// Experts per token.
    pub k: usize,
}

impl DevicePolicy for DeviceTopK {
    fn name(&self) -> String {
        "topk".into()
    }
    fn max_k(&self, _layer: usize) -> usize {
        self.k
    }
    fn select(&self, _layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor> {
        let ids = sorted_experts(batch.probs)?;
        let ids = torch("narrow", ids.f_narrow(1, 0, self.k as i64))?;
        mask_padding(ids, batch.mask)
    }
}

/// Replace the rows of padding tokens with -1.
pub fn mask_padding(ids: Tensor, mask: Option<&Tensor>) -> DeviceResult<Tensor> {
    match mask {
        None => Ok(ids),
        Some(m) => {
            let keep = torch("unsqueeze", m.f_unsqueeze(1))?;
            let pad = Tensor::full([1], alloc_core::routing::NO_EXPERT, (Kind::Int64, ids.device()));
            torch("where", ids.f_where_self(&keep, &pad))
        }
    }
}
