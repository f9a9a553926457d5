//! The KV cache for incremental decoding.
//!
//! Each layer holds a pair of tensors whose dimension 1 is time; the family decides what they are.
//! DeepSeek-V2 stores the *latent*: the normalised `c_kv` `(b, s, kv_lora_rank)` and the roped, head-shared
//! `k_pe` `(b, s, qk_rope_head_dim)` (576 values per token per layer for V2-Lite). Besides the layers,
//! the cache keeps per-sequence state: which cached slots are real tokens (padding is cached too, and
//! masked) and each sequence's next rotary position, so a padded batch decodes correctly.
//!
//! Appending concatenates along time. A forward that fails part-way leaves the cache inconsistent:
//! [`KvCache::reset`] it.

use tch::Tensor;

use crate::error::{Error, Result, TorchContext};

/// Incremental decoding state of one batch of sequences.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `(b, s)` bool: real (true) or padding slots.
    key_valid: Option<Tensor>,
    /// `(b)` i64: next rotary position per sequence.
    next_pos: Option<Tensor>,
    len: usize,
    padded: bool,
}

impl KvCache {
    /// An empty cache (sized on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Cached time steps per sequence (padding slots included).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drop everything.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Whether any cached step came with a padding mask.
    pub fn has_padding(&self) -> bool {
        self.padded
    }

    /// Bytes held by the layer tensors.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|(a, b)| a.numel() * a.kind().elt_size_in_bytes() + b.numel() * b.kind().elt_size_in_bytes())
            .sum()
    }

    /// The cached pair of `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.as_ref())
    }

    /// `(key_valid (b, s), next_pos (b))` of the cached steps.
    pub(crate) fn seq_state(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.key_valid.as_ref()?, self.next_pos.as_ref()?))
    }

    /// Append `(b, t, ..)` tensors to `layer` and return the full `(b, past + t, ..)` pair.
    pub(crate) fn append(&mut self, layer: usize, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let full = match self.layers[layer].take() {
            None => {
                if self.len != 0 {
                    return Err(Error::Input(format!("cache layer {layer} is empty but {} steps are cached", self.len)));
                }
                (a.shallow_clone(), b.shallow_clone())
            }
            Some((pa, pb)) => (
                Tensor::f_cat(&[&pa, a], 1).ctx(format!("cache layer {layer}"))?,
                Tensor::f_cat(&[&pb, b], 1).ctx(format!("cache layer {layer}"))?,
            ),
        };
        self.layers[layer] = Some((full.0.shallow_clone(), full.1.shallow_clone()));
        Ok(full)
    }

    /// Commit a finished step: `t` new steps, the full key mask and the next positions.
    pub(crate) fn commit(&mut self, t: usize, key_valid: Tensor, next_pos: Tensor, padded: bool) {
        self.len += t;
        self.key_valid = Some(key_valid);
        self.next_pos = Some(next_pos);
        self.padded |= padded;
    }
}
