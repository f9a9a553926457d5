//! Query/key normalisation right after the attention projections, and OLMoE's q/k/v clipping: the
//! optional extras of [`super::attention::GqaAttention`] that OLMoE and Qwen3-MoE switch on.
//!
//! The two families normalise over different widths, with the same checkpoint names
//! (`self_attn.q_norm.weight`, `self_attn.k_norm.weight`):
//! * OLMoE (`modeling_olmoe.py`): one RMSNorm over the whole projection, `q_norm` of width
//!   `heads * head_dim` and `k_norm` of width `kv_heads * head_dim`, *before* splitting into heads, then
//!   q, k and v clamped to `[-clip_qkv, clip_qkv]` when `clip_qkv` is set.
//! * Qwen3-MoE (`modeling_qwen3_moe.py`): an RMSNorm of width `head_dim` applied to every head separately,
//!   after the split.
//!
//! Both run before the rotary embedding, so the cache holds normalised, roped keys.

use tch::Tensor;

use super::RmsNorm;
use crate::error::{Result, TorchContext};
use crate::loader::VarBuilder;

/// Which width a [`QkNorm`] normalises over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNormScope {
    /// The whole projection (`heads * head_dim` for q, `kv_heads * head_dim` for k), before the split
    /// into heads (OLMoE).
    Projection,
    /// Each head's `head_dim` separately (Qwen3-MoE).
    Head,
}

/// RMSNorm of the queries and keys: the checkpoint's `self_attn.q_norm` and `self_attn.k_norm`.
#[derive(Debug)]
pub struct QkNorm {
    /// `(heads * head_dim)` or `(head_dim)`, as `scope` says.
    pub q_norm: RmsNorm,
    /// `(kv_heads * head_dim)` or `(head_dim)`, as `scope` says.
    pub k_norm: RmsNorm,
    /// The normalised width.
    pub scope: QkNormScope,
}

impl QkNorm {
    /// Load `q_norm` and `k_norm` from `vb` (at `...self_attn`) for `heads` query and `kv_heads` key heads
    /// of `head_dim`, normalising over `scope` with `eps` (the config's `rms_norm_eps`).
    pub fn load(vb: &VarBuilder<'_>, scope: QkNormScope, heads: i64, kv_heads: i64, head_dim: i64, eps: f64) -> Result<Self> {
        let (q_dim, k_dim) = match scope {
            QkNormScope::Projection => (heads * head_dim, kv_heads * head_dim),
            QkNormScope::Head => (head_dim, head_dim),
        };
        Ok(Self { q_norm: RmsNorm::load(&vb.pp("q_norm"), q_dim, eps)?, k_norm: RmsNorm::load(&vb.pp("k_norm"), k_dim, eps)?, scope })
    }

    /// Normalise `q` and `k` if this norm acts at `scope`: `Projection` on `(b, t, heads * d)` before the
    /// split, `Head` on `(b, t, heads, d)` after it; otherwise return them unchanged.
    pub fn apply(&self, scope: QkNormScope, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        if scope != self.scope {
            return Ok((q, k));
        }
        Ok((self.q_norm.forward(&q).ctx("self_attn.q_norm")?, self.k_norm.forward(&k).ctx("self_attn.k_norm")?))
    }
}

/// Clamp each of `xs` to `[-clip, clip]` (OLMoE's `clip_qkv`); `None` returns them unchanged.
pub fn clip(clip: Option<f64>, xs: [Tensor; 3]) -> Result<[Tensor; 3]> {
    let Some(c) = clip else { return Ok(xs) };
    let [q, k, v] = xs;
    Ok([q.f_clamp(-c, c)?, k.f_clamp(-c, c)?, v.f_clamp(-c, c).ctx("clip_qkv")?])
}
