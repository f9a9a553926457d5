//! Attention helpers shared by the families: the step plan (positions, key mask, additive bias) and
//! eager scaled-dot-product attention with an f32 softmax.

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::error::{Error, Result, TorchContext};

/// What every layer of one forward pass needs to know about positions and masking.
#[derive(Debug)]
pub struct StepPlan {
    /// Batch size.
    pub b: i64,
    /// New tokens per sequence in this call.
    pub t: i64,
    /// Cached tokens per sequence before this call (padding slots included).
    pub past: i64,
    /// `(b, t)` i64 rotary positions of the new tokens.
    pub positions: Tensor,
    /// `(b, t)` bool: which new tokens are real.
    pub mask: Tensor,
    /// Whether any padding is present (a `mask` was given).
    pub has_padding: bool,
    /// `(b, past + t)` bool: which keys are real.
    pub key_valid: Tensor,
    /// `(b, 1, t, past + t)` f32 additive bias: 0 where query may attend, -inf elsewhere.
    pub bias: Tensor,
    /// `(b)` i64: the next position of each sequence after this call.
    pub next_pos: Tensor,
}

impl StepPlan {
    /// Plan a call with `(b, t)` ids, an optional `(b, t)` padding mask and an optional cache.
    ///
    /// Query `i` of sequence `s` may attend to key `j` iff `j <= past + i` and key `j` is real; every
    /// query also attends to itself, so a padding query never faces an all-masked row (its output is
    /// unused, but must not be NaN, which the router would reject). Real tokens are unaffected.
    pub fn new(ids: &Tensor, mask: Option<&Tensor>, cache: Option<&KvCache>, device: Device) -> Result<Self> {
        let size = ids.size();
        if size.len() != 2 {
            return Err(Error::Input(format!("token ids must be (batch, time), got {size:?}")));
        }
        let (b, t) = (size[0], size[1]);
        if t == 0 {
            return Err(Error::Input("no tokens".into()));
        }
        let (mask, has_padding) = match mask {
            Some(m) => {
                if m.size() != size {
                    return Err(Error::Input(format!("mask shape {:?} != ids shape {size:?}", m.size())));
                }
                (m.f_to_device(device)?.f_ne(0)?, true)
            }
            None => (Tensor::f_ones([b, t], (Kind::Bool, device))?, false),
        };
        let (past, start, past_valid) = match cache {
            Some(c) if !c.is_empty() => {
                let (kv, np) = c.seq_state().ok_or_else(|| Error::Input("cache has no sequence state".into()))?;
                if kv.size()[0] != b {
                    return Err(Error::Input(format!("cache batch {} != ids batch {b}", kv.size()[0])));
                }
                (c.len() as i64, np.shallow_clone(), Some(kv.shallow_clone()))
            }
            _ => (0, Tensor::f_zeros([b], (Kind::Int64, device))?, None),
        };
        let has_padding = has_padding || cache.is_some_and(|c| c.has_padding());
        let counts = mask.f_cumsum(1, Kind::Int64)?; // (b, t)
        let positions = counts.f_add(&start.f_unsqueeze(1)?)?.f_sub_scalar(1)?.f_clamp_min(0)?;
        let next_pos = start.f_add(&mask.f_sum_dim_intlist(1, false, Kind::Int64)?)?;
        let key_valid = match past_valid {
            Some(pv) => Tensor::f_cat(&[pv, mask.shallow_clone()], 1)?,
            None => mask.shallow_clone(),
        };
        let s = past + t;
        let q_abs = Tensor::f_arange_start(past, s, (Kind::Int64, device))?.f_unsqueeze(1)?; // (t, 1)
        let k_abs = Tensor::f_arange(s, (Kind::Int64, device))?.f_unsqueeze(0)?; // (1, s)
        let causal = k_abs.f_le_tensor(&q_abs)?; // (t, s)
        let is_self = k_abs.f_eq_tensor(&q_abs)?;
        let allowed = causal
            .f_unsqueeze(0)?
            .f_logical_and(&key_valid.f_unsqueeze(1)?)?
            .f_logical_or(&is_self.f_unsqueeze(0)?)?; // (b, t, s)
        let zero = Tensor::f_zeros([1], (Kind::Float, device))?;
        let neg = Tensor::f_full([1], f64::NEG_INFINITY, (Kind::Float, device))?;
        let bias = zero.f_where_self(&allowed, &neg)?.f_unsqueeze(1)?; // (b, 1, t, s)
        Ok(Self { b, t, past, positions, mask, has_padding, key_valid, bias, next_pos })
    }
}

/// Eager attention: `softmax(q k^T * scale + bias) v` with the softmax in f32, as transformers' eager
/// path. `q` `(b, h, t, d)`, `k` `(b, h or 1, s, d)`, `v` `(b, h or 1, s, dv)`, bias `(b, 1, t, s)`.
/// Returns `(b, h, t, dv)` in `q`'s dtype.
pub fn eager_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.f_matmul(&k.f_transpose(-2, -1)?)?; // (b, h, t, s)
    let scores = scores.f_to_kind(Kind::Float)?.f_mul_scalar(scale)?.f_add(bias)?;
    let p = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
    p.f_matmul(v).ctx("attention")
}
