//! The KV cache for incremental decoding.
//!
//! Each layer holds a pair of tensors whose dimension 1 is time; the family decides what they are.
//! DeepSeek-V2 stores the *latent*: the normalised `c_kv` `(b, s, kv_lora_rank)` and the roped, head-shared
//! `k_pe` `(b, s, qk_rope_head_dim)` (576 values per token per layer for V2-Lite). Besides the layers,
//! the cache keeps per-sequence state: which cached slots are real tokens (padding is cached too, and
//! masked) and each sequence's next rotary position, so a padded batch decodes correctly.
//!
//! Two layouts:
//! - **growing** ([`KvCache::new`]): appending concatenates along time, so each step's tensors are as long
//!   as the history; simple, and what the CPU paths use;
//! - **preallocated** ([`KvCache::with_capacity`]): every layer's pair, the key mask and the write slot
//!   live in fixed device buffers of `capacity` slots, written in place (`index_copy_` at a slot held on the
//!   device) and attended over in full with the unwritten slots masked. Shapes and addresses never change
//!   from step to step and nothing is read back to the host, so a decode step can be captured in a CUDA
//!   graph and replayed (see [`crate::GraphDecoder`]).
//!
//! A forward that fails part-way leaves the cache inconsistent: [`KvCache::reset`] it.

use tch::{Device, Kind, Tensor};

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
    /// Preallocated layout: slots per sequence.
    capacity: Option<i64>,
    /// Preallocated layout: `(1)` i64 on the device, the next slot to write (equals `len` between calls).
    slot: Option<Tensor>,
    /// Preallocated layout: `(t)` i64 on the device, the slots the current call writes.
    write_slots: Option<Tensor>,
}

/// A saved position of a preallocated cache ([`KvCache::mark`]): restoring it forgets everything
/// written since (the slots are masked again and later overwritten).
#[derive(Debug)]
pub struct CacheMark {
    len: usize,
    padded: bool,
    key_valid: Tensor,
    next_pos: Tensor,
    slot: Tensor,
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

    /// A preallocated cache of `capacity` slots per sequence (prompt, padding and generated tokens
    /// together); buffers are allocated on first use, at the batch size and dtype of that call.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { capacity: Some(capacity as i64), ..Self::default() }
    }

    /// Slots per sequence of a preallocated cache; `None` for a growing one.
    pub fn capacity(&self) -> Option<usize> {
        self.capacity.map(|c| c as usize)
    }

    /// Drop everything (a preallocated cache stays preallocated, with the same capacity).
    pub fn reset(&mut self) {
        *self = Self { capacity: self.capacity, ..Self::default() };
    }

    /// Save the position of a preallocated cache (device copies of its small state; no host sync).
    pub fn mark(&self) -> Result<CacheMark> {
        match (&self.key_valid, &self.next_pos, &self.slot) {
            (Some(kv), Some(np), Some(slot)) => Ok(CacheMark {
                len: self.len,
                padded: self.padded,
                key_valid: kv.f_detach_copy()?,
                next_pos: np.f_detach_copy()?,
                slot: slot.f_detach_copy()?,
            }),
            _ => Err(Error::Input("only a preallocated cache that has been written can be marked".into())),
        }
    }

    /// Go back to `mark`, in place (the buffers keep their addresses, so a captured graph stays valid).
    pub fn restore(&mut self, mark: &CacheMark) -> Result<()> {
        match (&mut self.key_valid, &mut self.next_pos, &mut self.slot) {
            (Some(kv), Some(np), Some(slot)) => {
                kv.f_copy_(&mark.key_valid)?;
                np.f_copy_(&mark.next_pos)?;
                slot.f_copy_(&mark.slot)?;
                self.len = mark.len;
                self.padded = mark.padded;
                Ok(())
            }
            _ => Err(Error::Input("the cache was reset since it was marked".into())),
        }
    }

    /// Preallocated layout: prepare a call of `t` new tokens for `b` sequences (allocate the state on
    /// first use, check the batch and the room left, compute the write slots on the device).
    pub(crate) fn begin_step(&mut self, b: i64, t: i64, device: Device) -> Result<()> {
        let Some(cap) = self.capacity else { return Ok(()) };
        if self.len as i64 + t > cap {
            return Err(Error::Input(format!(
                "the preallocated cache holds {cap} slots per sequence; {} are used and {t} more were asked for",
                self.len
            )));
        }
        if self.slot.is_none() {
            self.slot = Some(Tensor::f_zeros([1], (Kind::Int64, device))?);
            self.key_valid = Some(Tensor::f_zeros([b, cap], (Kind::Bool, device))?);
            self.next_pos = Some(Tensor::f_zeros([b], (Kind::Int64, device))?);
        }
        let batch = self.key_valid.as_ref().map_or(b, |kv| kv.size()[0]);
        if batch != b {
            return Err(Error::Input(format!("cache batch {batch} != ids batch {b}")));
        }
        let slot = self.slot.as_ref().ok_or_else(|| Error::Input("cache slot missing".into()))?;
        self.write_slots = Some(Tensor::f_arange(t, (Kind::Int64, device))?.f_add(slot)?);
        Ok(())
    }

    /// Preallocated layout: `(t)` i64 slots the current call writes.
    pub(crate) fn write_slots(&self) -> Option<&Tensor> {
        self.write_slots.as_ref()
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

    /// Preallocated layout: the whole `(b, capacity, ..)` buffers of `layer` (zeros on first use, shaped
    /// like `a` and `b` along every other dimension) and the `(t)` slots the current call writes, for a
    /// kernel that writes the step's entries itself. `None` for a growing cache.
    pub(crate) fn buffers(&mut self, layer: usize, a: &Tensor, b: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(cap) = self.capacity else { return Ok(None) };
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let slots = self.write_slots.as_ref().ok_or_else(|| Error::Input("cache step not begun".into()))?.shallow_clone();
        let ctx = || format!("cache layer {layer}");
        if self.layers[layer].is_none() {
            let buffer = |x: &Tensor| -> Result<Tensor> {
                let mut size = x.size();
                size[1] = cap;
                Tensor::f_zeros(&size, (x.kind(), x.device())).ctx(ctx())
            };
            self.layers[layer] = Some((buffer(a)?, buffer(b)?));
        }
        let (pa, pb) = self.layers[layer].as_ref().ok_or_else(|| Error::Input(ctx()))?;
        Ok(Some((pa.shallow_clone(), pb.shallow_clone(), slots)))
    }

    /// Append `(b, t, ..)` tensors to `layer` and return the full pair: `(b, past + t, ..)` when
    /// growing, the whole `(b, capacity, ..)` buffers when preallocated.
    pub(crate) fn append(&mut self, layer: usize, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        if let Some((mut pa, mut pb, slots)) = self.buffers(layer, a, b)? {
            let _ = pa.f_index_copy_(1, &slots, a).ctx(format!("cache layer {layer}"))?;
            let _ = pb.f_index_copy_(1, &slots, b).ctx(format!("cache layer {layer}"))?;
            return Ok((pa, pb));
        }
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

    /// Commit a finished step: `t` new steps, the full key mask and the next positions (preallocated:
    /// copied into the state buffers in place, and the write slot advanced on the device).
    pub(crate) fn commit(&mut self, t: usize, key_valid: Tensor, next_pos: Tensor, padded: bool) -> Result<()> {
        self.len += t;
        self.padded |= padded;
        if let (Some(kv), Some(np), Some(slot)) = (&mut self.key_valid, &mut self.next_pos, &mut self.slot) {
            kv.f_copy_(&key_valid)?;
            np.f_copy_(&next_pos)?;
            let _ = slot.f_add_scalar_(t as i64)?;
            self.write_slots = None;
            return Ok(());
        }
        self.key_valid = Some(key_valid);
        self.next_pos = Some(next_pos);
        Ok(())
    }

    /// Count `t` steps done by a replayed graph (the device state advanced inside the graph; only the
    /// host's count is behind).
    pub(crate) fn advance_host(&mut self, t: usize) {
        self.len += t;
    }
}
