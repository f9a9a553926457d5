//! The device side of routing: policies on libtorch tensors, for use inside a model's forward pass.
//!
//! A [`DevicePolicy`] takes one layer's router probabilities as a `[T, E]` f32 tensor on the model's
//! device and returns `[T, W]` i64 expert ids on the same device, each row in decreasing probability
//! (ties: lower expert index first), padded at the end with [`alloc_core::routing::NO_EXPERT`] (-1).
//! Implementations must not synchronise with the host (no copies to host, no scalar reads, no
//! data-dependent shapes), so they can run inside a GPU forward pass and a captured CUDA graph, and must
//! select exactly the experts that the host reference selects on the same inputs.
//!
//! Every host policy struct of this crate ([`crate::TopK`], [`crate::AllocT`], ...) implements
//! [`DevicePolicy`] too, in the submodule named like its host file; the options are checked on the host
//! (they depend only on the options and the tensor shapes). What the device cannot check without a
//! synchronisation is the probabilities' values: NaN or negative inputs give unspecified (but in-bounds)
//! ids instead of the host's error. [`accounting::DeviceLayerCounters`] accumulates realized activations
//! on the device for one read at the end of a run.

use tch::{Device, Kind, Tensor};

pub mod accounting;
pub mod alloc_t;
pub mod kernels;
pub mod nucleus;
pub mod random;
pub mod skip;
pub mod threshold;
pub mod topk;

pub use accounting::DeviceLayerCounters;

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
    /// The policy's options do not fit this layer (the same check and message as the host reference).
    #[error(transparent)]
    Routing(#[from] alloc_core::Error),
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

impl DeviceBatch<'_> {
    /// `(T, E)` after checking dtypes and shapes (host metadata only, no synchronisation).
    pub fn shape(&self) -> DeviceResult<(i64, i64)> {
        let size = self.probs.size();
        let (t, e) = match size.as_slice() {
            [t, e] => (*t, *e),
            _ => return Err(DeviceError::Invalid(format!("router probabilities have shape {size:?}, expected [T, E]"))),
        };
        if self.probs.kind() != Kind::Float {
            return Err(DeviceError::Invalid(format!("router probabilities are {:?}, expected f32", self.probs.kind())));
        }
        for (name, x, kind) in [("mask", self.mask, Kind::Bool), ("seq_ids", self.seq_ids, Kind::Int64)] {
            if let Some(x) = x {
                if x.size() != [t] || x.kind() != kind {
                    return Err(DeviceError::Invalid(format!(
                        "{name} is {:?} {:?}, expected [{t}] {kind:?}",
                        x.kind(),
                        x.size()
                    )));
                }
            }
        }
        Ok((t, e))
    }

    /// `[T]` bool validity of each token (all true without a mask).
    pub fn valid(&self) -> DeviceResult<Tensor> {
        match self.mask {
            Some(m) => Ok(m.shallow_clone()),
            None => {
                let t = self.probs.size().first().copied().unwrap_or(0);
                torch("ones", Tensor::f_ones([t], (Kind::Bool, self.probs.device())))
            }
        }
    }
}

/// A batch's budget split across its tokens by score (Alloc-T's rule, batch scope), as a policy describes
/// it to a model that selects inside its own kernels ([`DevicePolicy::batch_split`]): every token gets the
/// first `floor` experts of its stable descending sort; the candidates are the ranks `floor..cap` of every
/// token, ordered by (score descending, rank ascending, token ascending), and the first `extra` of them
/// join; each token then has a prefix of its sorted experts, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSplit {
    /// Experts every token gets.
    pub floor: usize,
    /// Experts a token gets at most: the selection width.
    pub cap: usize,
    /// Candidates that join: `round(K_l * tokens) - floor * tokens`.
    pub extra: usize,
    /// Rank candidates by `p / p_top1` (0 when `p_top1 = 0`, f32) instead of the probability `p`.
    pub relative_to_top1: bool,
}

/// A routing method on tensors. `layer` is the model's layer index (per-layer policies look up k).
pub trait DevicePolicy: Send + Sync {
    /// A short name recorded in results (e.g. `topk`, `alloc-t`).
    fn name(&self) -> String;
    /// The selection width for `layer` (most experts any token can get there).
    fn max_k(&self, layer: usize) -> usize;
    /// Choose experts: `[T, max_k(layer)]` i64 ids, padded with -1.
    fn select(&self, layer: usize, batch: &DeviceBatch<'_>) -> DeviceResult<Tensor>;
    /// `Some(k)` when [`Self::select`] at `layer`, for a batch of `tokens` rows without padding, is exactly
    /// the stock top-k (the first `k` experts of the stable descending sort for every token), so a model
    /// may fuse the selection into its own kernels instead of calling `select`. Default `None`.
    fn fixed_top_k(&self, _layer: usize, _tokens: usize) -> Option<usize> {
        None
    }
    /// `Some(split)` when [`Self::select`] at `layer`, for a batch of `tokens` rows without padding that
    /// share one budget, is exactly the [`BatchSplit`] rule, so a model may fuse the selection into its
    /// own kernels (a few tokens: the sequences of a decode step). Default `None`.
    fn batch_split(&self, _layer: usize, _tokens: usize) -> Option<BatchSplit> {
        None
    }
    /// An upper bound, known on the host, on the chosen (token, expert) pairs (ids `>= 0`) that
    /// [`Self::select`] returns at `layer` for a batch of `tokens` rows: a model may size its expert work
    /// to it instead of to every slot. It must hold for every batch (padding and scope included).
    /// Default: every slot, `tokens * max_k(layer)`.
    fn max_pairs(&self, layer: usize, tokens: usize) -> usize {
        tokens.saturating_mul(self.max_k(layer))
    }
}

/// Sort each row by decreasing probability, ties to the lower expert index (a stable sort keeps the
/// original, increasing index order among equal values). Returns `[T, E]` i64 indices.
pub fn sorted_experts(probs: &Tensor) -> DeviceResult<Tensor> {
    let (_, idx) = torch("sort", probs.f_sort_stable(true, -1, true))?;
    Ok(idx)
}

/// Stock top-k on the device (the same struct as the host reference [`crate::TopK`]).
pub type DeviceTopK = crate::TopK;

/// Replace the rows of padding tokens with -1.
pub fn mask_padding(ids: Tensor, mask: Option<&Tensor>) -> DeviceResult<Tensor> {
    match mask {
        None => Ok(ids),
        Some(m) => {
            let keep = torch("unsqueeze", m.f_unsqueeze(1))?;
            let pad = no_expert(ids.device())?;
            torch("where", ids.f_where_self(&keep, &pad))
        }
    }
}

/// A 0-dim i64 tensor holding [`alloc_core::routing::NO_EXPERT`], made on the device (no copy).
pub(crate) fn no_expert(device: Device) -> DeviceResult<Tensor> {
    torch("full", Tensor::f_full([] as [i64; 0], alloc_core::routing::NO_EXPERT, (Kind::Int64, device)))
}

/// `[T, W]` ids where valid token t keeps the first `counts[t]` of `sorted_ids[t]` (`[T, >= W]`) and
/// everything else is -1. `counts` is a `[T]` i64 tensor with values in `0..=W`.
pub(crate) fn prefix_ids(sorted_ids: &Tensor, width: i64, counts: &Tensor, valid: &Tensor) -> DeviceResult<Tensor> {
    let pad = no_expert(sorted_ids.device())?;
    torch("prefix_ids", (|| {
        let ids = sorted_ids.f_narrow(1, 0, width)?;
        let slot = Tensor::f_arange(width, (Kind::Int64, sorted_ids.device()))?.f_unsqueeze(0)?; // (1, w)
        let keep = slot.f_lt_tensor(&counts.f_unsqueeze(1)?)?.f_logical_and(&valid.f_unsqueeze(1)?)?; // (t, w)
        ids.f_where_self(&keep, &pad)
    })())
}

/// An empty `[0, width]` selection (a batch without tokens).
pub(crate) fn empty_selection(width: usize, device: Device) -> DeviceResult<Tensor> {
    torch("empty", Tensor::f_empty([0, width as i64], (Kind::Int64, device)))
}


/// The shared shape of the count-based policies (top-p, threshold, skip): sort each row (stable,
/// descending), let `counts` turn the sorted probabilities `(t, e)` into experts per token `(t)`, and
/// keep that prefix of each token's sorted experts, `width` slots wide. The caller checks its options.
pub(crate) fn select_by_count(
    batch: &DeviceBatch<'_>,
    width: usize,
    op: &'static str,
    counts: impl FnOnce(&Tensor) -> Result<Tensor, tch::TchError>,
) -> DeviceResult<Tensor> {
    let (t, _) = batch.shape()?;
    if t == 0 {
        return empty_selection(width, batch.probs.device());
    }
    let (vals, idx) = torch(op, batch.probs.f_sort_stable(true, 1, true))?;
    let counts = torch(op, counts(&vals))?;
    prefix_ids(&idx, width as i64, &counts, &batch.valid()?)
}

#[cfg(test)]
mod tests {
    /// The selection paths must stay capturable: no reads to the host and no data-dependent shapes. A
    /// textual guard, because a CPU test cannot observe a device synchronisation.
    #[test]
    fn device_policies_never_synchronise_with_the_host() {
        let files = [
            ("alloc_t.rs", include_str!("alloc_t.rs")),
            ("kernels.rs", include_str!("kernels.rs")),
            ("nucleus.rs", include_str!("nucleus.rs")),
            ("threshold.rs", include_str!("threshold.rs")),
            ("skip.rs", include_str!("skip.rs")),
            ("random.rs", include_str!("random.rs")),
            ("topk.rs", include_str!("topk.rs")),
        ];
        let forbidden = [
            "to_vec", "int64_value", "double_value", "try_from", "Device::Cpu", "to_device", "numel", "nonzero",
            "masked_select", "unique", "f_topk", "from_slice",
        ];
        for (name, src) in files {
            for bad in forbidden {
                assert!(!src.contains(bad), "device/{name} uses `{bad}`, which synchronises with the host");
            }
        }
    }
}
