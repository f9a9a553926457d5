//! Attention shared by the families: the step plan (positions, key mask, additive bias, sliding
//! window), scaled-dot-product attention ([`attention`]: eager with an f32 softmax, or libtorch's fused
//! kernels for multi-token CUDA calls in half precision) and Llama-style grouped-query attention
//! ([`GqaAttention`]: Qwen2-MoE, Mixtral, OLMoE, Qwen3-MoE).

use tch::{Device, Kind, Tensor};

use super::decoder::{residual_unfused, SelfAttention, Step};
use super::qk_norm::{self, QkNorm, QkNormScope};
use super::{Linear, RmsNorm};
use crate::cache::KvCache;
use crate::ctx::ForwardCtx;
use crate::error::{Error, Result, TorchContext};
use crate::kernels::{project, Project};
use crate::loader::VarBuilder;

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
    /// `(b, s)` bool: which keys are real. `s = past + t` for a growing cache (or none), the capacity
    /// for a preallocated one (whose unwritten slots are false).
    pub key_valid: Tensor,
    /// `(b, 1, t, s)` f32 additive bias: 0 where query may attend, -inf elsewhere.
    pub bias: Tensor,
    /// `(b)` i64: the next position of each sequence after this call.
    pub next_pos: Tensor,
    /// `(t, 1)` i64: the cache slot of each new token (`past + i`).
    pub q_slot: Tensor,
    /// `(1, s)` i64: the cache slot of each key.
    pub k_slot: Tensor,
    /// The bias is exactly causal over `t` keys (no cache before this call, no padding), so fused
    /// attention kernels may apply causality themselves instead of reading `bias`.
    pub plain_causal: bool,
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
        if mask.is_none() {
            if let Some(plan) = Self::one_token(b, t, cache)? {
                return Ok(plan);
            }
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
        let has_padding = has_padding || cache.is_some_and(|c| c.has_padding());
        // Where the new tokens go and what they may see: `start` (b) next positions, `key_valid` (b, s),
        // `q_abs` (t, 1) slots of the queries, `k_abs` (1, s) slots of the keys.
        let (past, start, key_valid, q_abs, k_abs) = match (cache, cache.and_then(|c| c.write_slots())) {
            // Preallocated: all from device state with fixed shapes (keys span the capacity), so the same
            // operations are valid in every step of a captured graph.
            (Some(c), Some(slots)) => {
                let (kv, np) = c.seq_state().ok_or_else(|| Error::Input("cache has no sequence state".into()))?;
                let k_abs = Tensor::f_arange(kv.size()[1], (Kind::Int64, device))?.f_unsqueeze(0)?;
                (c.len() as i64, np.shallow_clone(), kv.f_index_copy(1, slots, &mask)?, slots.f_unsqueeze(1)?, k_abs)
            }
            (Some(c), None) if !c.is_empty() => {
                let (kv, np) = c.seq_state().ok_or_else(|| Error::Input("cache has no sequence state".into()))?;
                if kv.size()[0] != b {
                    return Err(Error::Input(format!("cache batch {} != ids batch {b}", kv.size()[0])));
                }
                let past = c.len() as i64;
                let q_abs = Tensor::f_arange_start(past, past + t, (Kind::Int64, device))?.f_unsqueeze(1)?;
                let k_abs = Tensor::f_arange(past + t, (Kind::Int64, device))?.f_unsqueeze(0)?;
                (past, np.shallow_clone(), Tensor::f_cat(&[kv, &mask], 1)?, q_abs, k_abs)
            }
            _ => {
                let q_abs = Tensor::f_arange(t, (Kind::Int64, device))?.f_unsqueeze(1)?;
                let k_abs = Tensor::f_arange(t, (Kind::Int64, device))?.f_unsqueeze(0)?;
                (0, Tensor::f_zeros([b], (Kind::Int64, device))?, mask.shallow_clone(), q_abs, k_abs)
            }
        };
        let counts = mask.f_cumsum(1, Kind::Int64)?; // (b, t)
        let positions = counts.f_add(&start.f_unsqueeze(1)?)?.f_sub_scalar(1)?.f_clamp_min(0)?;
        let next_pos = start.f_add(&mask.f_sum_dim_intlist(1, false, Kind::Int64)?)?;
        let causal = k_abs.f_le_tensor(&q_abs)?; // (t, s)
        let is_self = k_abs.f_eq_tensor(&q_abs)?;
        let allowed = causal
            .f_unsqueeze(0)?
            .f_logical_and(&key_valid.f_unsqueeze(1)?)?
            .f_logical_or(&is_self.f_unsqueeze(0)?)?; // (b, t, s)
        let bias = additive_bias(&allowed)?;
        let plain_causal = past == 0 && !has_padding && key_valid.size()[1] == t;
        Ok(Self { b, t, past, positions, mask, has_padding, key_valid, bias, next_pos, q_slot: q_abs, k_slot: k_abs, plain_causal })
    }

    /// A decode step's plan in one kernel (`kernels::decode_plan`), for a call without a padding mask:
    /// one token per sequence and a preallocated cache on CUDA; `None` otherwise (or when the kernel is
    /// unavailable). Called before the general plan builds anything, so a step runs no kernel twice.
    fn one_token(b: i64, t: i64, cache: Option<&KvCache>) -> Result<Option<Self>> {
        let Some(c) = cache.filter(|_| t == 1) else { return Ok(None) };
        let (Some(slots), Some((kv, np))) = (c.write_slots(), c.seq_state()) else { return Ok(None) };
        if kv.size()[0] != b {
            return Ok(None);
        }
        let Some(p) = crate::kernels::decode_plan(kv, np, slots)? else { return Ok(None) };
        let has_padding = c.has_padding();
        let plain_causal = c.is_empty() && !has_padding && kv.size()[1] == t;
        Ok(Some(Self {
            b,
            t,
            past: c.len() as i64,
            positions: p.positions,
            mask: p.mask,
            has_padding,
            key_valid: p.key_valid,
            bias: p.bias,
            next_pos: p.next_pos,
            q_slot: slots.f_unsqueeze(1)?,
            k_slot: p.k_slot,
            plain_causal,
        }))
    }

    /// [`StepPlan::bias`] restricted to a sliding window of `window` keys: query slot `i` may also
    /// attend to key slot `j` only if `i - j < window` (transformers' `sliding_window_overlay`, which
    /// counts cache slots, padding included).
    pub fn sliding_bias(&self, window: i64) -> Result<Tensor> {
        if window < 1 {
            return Err(Error::Config { key: "sliding_window".into(), msg: format!("{window} is not a positive window") });
        }
        let device = self.bias.device();
        let inside = self.q_slot.f_sub(&self.k_slot)?.f_lt(window)?.f_unsqueeze(0)?.f_unsqueeze(0)?; // (1, 1, t, s)
        let neg = Tensor::f_full([1], f64::NEG_INFINITY, (Kind::Float, device))?;
        self.bias.f_where_self(&inside, &neg).ctx("sliding window")
    }
}

/// `(b, t, s)` bool allowed -> `(b, 1, t, s)` f32: 0 where allowed, -inf elsewhere.
fn additive_bias(allowed: &Tensor) -> Result<Tensor> {
    let device = allowed.device();
    let zero = Tensor::f_zeros([1], (Kind::Float, device))?;
    let neg = Tensor::f_full([1], f64::NEG_INFINITY, (Kind::Float, device))?;
    Ok(zero.f_where_self(allowed, &neg)?.f_unsqueeze(1)?)
}

/// Which keys each query may see: the additive bias, and whether it is plain causal attention over as
/// many keys as queries (see [`StepPlan::plain_causal`]; then fused kernels need no mask tensor).
#[derive(Debug, Clone, Copy)]
pub struct AttnMask<'a> {
    /// `(b, 1, t, s)` f32: 0 where a query may attend, -inf elsewhere.
    pub bias: &'a Tensor,
    /// `bias` is exactly the causal mask.
    pub causal: bool,
}

/// `softmax(q k^T * scale + bias) v` for `q` `(b, h, t, d)`, `k` `(b, h or 1, s, d)`, `v` `(b, h or 1, s,
/// dv)`; returns `(b, h, t, dv)` in `q`'s dtype.
///
/// Multi-token calls on CUDA in bf16/f16 (prefill) go to libtorch's `scaled_dot_product_attention`, which
/// picks a fused kernel (flash or memory-efficient attention: no `(t, s)` score matrix in memory, softmax
/// in f32 inside the kernel); plain causal masks are passed as `is_causal`, others as a mask in `q`'s
/// dtype. Everything else (CPU, f32, one-token decode steps, which the CUDA graph captures) takes
/// [`eager_attention`], transformers' eager path.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: AttnMask<'_>, scale: f64) -> Result<Tensor> {
    let fused = q.device().is_cuda() && matches!(q.kind(), Kind::BFloat16 | Kind::Half) && q.size()[2] > 1;
    if !fused {
        return eager_attention(q, k, v, mask.bias, scale);
    }
    let heads = q.size()[1];
    let expand = |x: &Tensor| -> Result<Tensor> {
        let s = x.size();
        Ok(if s[1] == heads { x.shallow_clone() } else { x.f_expand([s[0], heads, s[2], s[3]], false)? })
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let out = if mask.causal {
        Tensor::f_scaled_dot_product_attention(q, &k, &v, None::<&Tensor>, 0.0, true, scale, false)
    } else {
        let m = mask.bias.f_to_kind(q.kind())?;
        Tensor::f_scaled_dot_product_attention(q, &k, &v, Some(&m), 0.0, false, scale, false)
    };
    out.ctx("attention (sdpa)")
}

/// Eager attention: `softmax(q k^T * scale + bias) v` with the softmax in f32, as transformers' eager
/// path. `q` `(b, h, t, d)`, `k` `(b, h or 1, s, d)`, `v` `(b, h or 1, s, dv)`, bias `(b, 1, t, s)`.
/// Returns `(b, h, t, dv)` in `q`'s dtype.
pub fn eager_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.f_matmul(&k.f_transpose(-2, -1)?)?; // (b, h, t, s)
    // bias + scores * scale in one kernel, in f32 (type promotion); the scale is a host scalar.
    let scale = Tensor::from(scale as f32);
    let scores = bias.f_addcmul(&scores, &scale)?;
    let p = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
    p.f_matmul(v).ctx("attention")
}

/// The sizes of a [`GqaAttention`].
#[derive(Debug, Clone, Copy)]
pub struct GqaShape {
    /// `hidden_size`.
    pub hidden: i64,
    /// `num_attention_heads`.
    pub heads: i64,
    /// `num_key_value_heads` (divides `heads`).
    pub kv_heads: i64,
    /// Per-head dimension (`head_dim`, or `hidden / heads`).
    pub head_dim: i64,
    /// Whether q/k/v carry biases (Qwen2-MoE's `qkv_bias`); `o_proj` never does.
    pub qkv_bias: bool,
}

/// Llama-style attention with grouped key/value heads (Qwen2-MoE, Mixtral; multi-head when
/// `kv_heads == heads`): `q_proj`, `k_proj`, `v_proj`, rotary on q and k, eager softmax attention with
/// scale `head_dim^-0.5`, `o_proj`. The cache holds the roped keys and the values, `(b, s, kv_heads,
/// head_dim)` each; key/value heads are repeated to the query heads only inside the attention, as
/// transformers' `repeat_kv`.
#[derive(Debug)]
pub struct GqaAttention {
    /// `(heads * head_dim, h)`.
    pub q_proj: Linear,
    /// `(kv_heads * head_dim, h)`.
    pub k_proj: Linear,
    /// `(kv_heads * head_dim, h)`.
    pub v_proj: Linear,
    /// `(h, heads * head_dim)`.
    pub o_proj: Linear,
    /// Sizes.
    pub shape: GqaShape,
    /// Whether this layer attends within the model's sliding window.
    pub sliding: bool,
    /// Query/key RMSNorm after the projections (OLMoE, Qwen3-MoE), if the family has one.
    pub qk_norm: Option<QkNorm>,
    /// Clamp q, k and v to `[-clip_qkv, clip_qkv]` after the norm (OLMoE's `clip_qkv`), if set.
    pub clip_qkv: Option<f64>,
}

impl GqaShape {
    /// The sizes config.json gives: `num_key_value_heads` null means `heads` (multi-head), `head_dim` null
    /// means `hidden / heads` (see [`check_head_split`]).
    pub fn from_config(hidden: usize, heads: usize, kv_heads: Option<usize>, head_dim: Option<usize>, qkv_bias: bool) -> Self {
        let head_dim = head_dim.unwrap_or(hidden / heads.max(1));
        let kv_heads = kv_heads.unwrap_or(heads);
        Self { hidden: hidden as i64, heads: heads as i64, kv_heads: kv_heads as i64, head_dim: head_dim as i64, qkv_bias }
    }

    /// KV-cache values per token per layer: a key and a value of `head_dim` per key/value head.
    pub fn kv_values_per_token(&self) -> usize {
        (2 * self.kv_heads * self.head_dim) as usize
    }

    /// Reject head counts and sizes the attention cannot run, naming the config key.
    pub fn validate(&self) -> Result<()> {
        let (n, kv) = (self.heads, self.kv_heads);
        if kv <= 0 || n % kv != 0 {
            return Err(Error::config("num_key_value_heads", format!("{kv} does not divide num_attention_heads {n}")));
        }
        if self.head_dim <= 0 || self.head_dim % 2 == 1 {
            return Err(Error::config("head_dim", format!("{} is not a positive even size (rotary pairs)", self.head_dim)));
        }
        Ok(())
    }
}

/// `hidden_size` must split evenly into `num_attention_heads` heads when config.json gives no explicit
/// `head_dim` (the derived `hidden_size / num_attention_heads` would otherwise round down silently).
pub fn check_head_split(head_dim: Option<usize>, hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 {
        return Err(Error::config("num_attention_heads", "must be at least 1"));
    }
    if head_dim.is_none() && hidden % heads != 0 {
        return Err(Error::config(
            "hidden_size",
            format!("{hidden} is not divisible by num_attention_heads {heads} (and config.json sets no head_dim)"),
        ));
    }
    Ok(())
}

impl GqaAttention {
    /// Load the four projections from `vb` (at `...self_attn`).
    pub fn load(vb: &VarBuilder<'_>, shape: GqaShape, sliding: bool) -> Result<Self> {
        shape.validate()?;
        let GqaShape { hidden, heads, kv_heads, head_dim, qkv_bias } = shape;
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), hidden, heads * head_dim, qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), hidden, kv_heads * head_dim, qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), hidden, kv_heads * head_dim, qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), heads * head_dim, hidden, false)?,
            shape,
            sliding,
            qk_norm: None,
            clip_qkv: None,
        })
    }

    /// With the checkpoint's `q_norm` / `k_norm` (from `vb`, at `...self_attn`) over `scope`, and q/k/v
    /// clamped to `clip_qkv` when set; see [`super::qk_norm`].
    pub fn with_qk_norm(mut self, vb: &VarBuilder<'_>, scope: QkNormScope, eps: f64, clip_qkv: Option<f64>) -> Result<Self> {
        let GqaShape { heads, kv_heads, head_dim, .. } = self.shape;
        self.qk_norm = Some(QkNorm::load(vb, scope, heads, kv_heads, head_dim, eps)?);
        self.clip_qkv = clip_qkv;
        Ok(self)
    }

    /// q `(b, t, heads, d)`, k and v `(b, t, kv_heads, d)` for `x` `(b, t, h)`: the projections, then the
    /// optional QK-norm (before or after the split into heads) and clipping.
    fn project(&self, x: &Tensor, b: i64, t: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = (self.q_proj.forward(x)?, self.k_proj.forward(x)?, self.v_proj.forward(x)?);
        self.split_heads(q, k, v, b, t)
    }

    /// [`Self::project`] of `norm(x)` with the norm and the three projections in one kernel
    /// (`kernels::project`), before the QK-norm and clipping ([`Self::normalize_heads`]); `None` when
    /// that kernel does not apply.
    fn project_fused(&self, x: &Tensor, norm: &RmsNorm, b: i64, t: i64) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        let qkv = [self.q_proj.projection(), self.k_proj.projection(), self.v_proj.projection()];
        let Some(mut outs) = project(&Project { x, norm: Some((&norm.weight, norm.eps)), projections: &qkv, residual: None })? else {
            return Ok(None);
        };
        let v = outs.pop().expect("three projections");
        let k = outs.pop().expect("three projections");
        let q = outs.pop().expect("three projections");
        self.heads(q, k, v, b, t).map(Some)
    }

    /// The projections' outputs `(b, t, heads * d)`, `(b, t, kv_heads * d)` x 2 as heads, with the
    /// optional QK-norm (before or after the split) and clipping.
    fn split_heads(&self, q: Tensor, k: Tensor, v: Tensor, b: i64, t: i64) -> Result<(Tensor, Tensor, Tensor)> {
        self.normalize_heads(self.heads(q, k, v, b, t)?)
    }

    /// The projections' outputs as heads: q `(b, t, heads, d)`, k and v `(b, t, kv_heads, d)`.
    fn heads(&self, q: Tensor, k: Tensor, v: Tensor, b: i64, t: i64) -> Result<(Tensor, Tensor, Tensor)> {
        let GqaShape { heads, kv_heads, head_dim, .. } = self.shape;
        Ok((q.f_reshape([b, t, heads, head_dim])?, k.f_reshape([b, t, kv_heads, head_dim])?, v.f_reshape([b, t, kv_heads, head_dim])?))
    }

    /// The optional QK-norm and clipping of heads-shaped q, k, v: the norm over the whole projection
    /// (OLMoE), the clipping, then the norm per head (Qwen3-MoE), as the families order them.
    fn normalize_heads(&self, (mut q, mut k, v): (Tensor, Tensor, Tensor)) -> Result<(Tensor, Tensor, Tensor)> {
        let GqaShape { heads, kv_heads, head_dim, .. } = self.shape;
        if let Some(n) = self.qk_norm.as_ref().filter(|n| n.scope == QkNormScope::Projection) {
            let (b, t) = (q.size()[0], q.size()[1]);
            let (qf, kf) = n.apply(QkNormScope::Projection, q.f_reshape([b, t, heads * head_dim])?, k.f_reshape([b, t, kv_heads * head_dim])?)?;
            (q, k) = (qf.f_reshape([b, t, heads, head_dim])?, kf.f_reshape([b, t, kv_heads, head_dim])?);
        }
        let [q, k, v] = qk_norm::clip(self.clip_qkv, [q, k, v])?;
        match &self.qk_norm {
            Some(n) => {
                let (q, k) = n.apply(QkNormScope::Head, q, k)?;
                Ok((q, k, v))
            }
            None => Ok((q, k, v)),
        }
    }

    /// Rotary, the cache and attention for q `(b, t, heads, d)`, k and v `(b, t, kv_heads, d)`: `(b, t,
    /// heads * d)`, before `o_proj`.
    fn attend(&self, layer: usize, (q, k, v): (Tensor, Tensor, Tensor), step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        if let Some(out) = self.attend_one_token(layer, (&q, &k, &v), None, step, ctx)? {
            return Ok(out);
        }
        let GqaShape { heads, head_dim, .. } = self.shape;
        let (b, t) = (step.plan.b, step.plan.t);
        let q = step.rotary.apply(&q.f_transpose(1, 2)?, &step.cos, &step.sin)?; // (b, nh, t, d)
        let k = step.rotary.apply(&k.f_transpose(1, 2)?, &step.cos, &step.sin)?.f_transpose(1, 2)?; // (b, t, kvh, d)
        let (k, v) = match ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        }; // (b, s, kvh, d)
        let out = attention(&q, &self.repeat_kv(&k)?, &self.repeat_kv(&v)?, step.mask(self.sliding), self.scale())?; // (b, nh, t, d)
        Ok(out.f_transpose(1, 2)?.f_reshape([b, t, heads * head_dim])?)
    }

    /// The softmax scale, `head_dim^-0.5`.
    fn scale(&self) -> f64 {
        (self.shape.head_dim as f64).powf(-0.5)
    }

    /// [`Self::attend`] of heads before their QK-norm and clipping ([`Self::project_fused`]'s): for one
    /// token, the attention kernels apply the QK-norm themselves (when there is no clipping); otherwise
    /// the norm runs first.
    fn attend_unnormalized(&self, layer: usize, qkv: (Tensor, Tensor, Tensor), step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        if self.clip_qkv.is_none() {
            if let Some(out) = self.attend_one_token(layer, (&qkv.0, &qkv.1, &qkv.2), self.qk_norm.as_ref(), step, ctx)? {
                return Ok(out);
            }
        }
        self.attend(layer, self.normalize_heads(qkv)?, step, ctx)
    }

    /// [`Self::attend`] for one new token per sequence into a preallocated cache on CUDA bf16 (and
    /// `ctx.fuse_decode`): the rotary embedding, the cache write and the attention in two kernels
    /// (`kernels::gqa_decode`) instead of about ten libtorch ones, with `qk` (a QK-norm still to apply to
    /// q and k) applied by the kernels too; `None` where they do not apply (nothing written then).
    fn attend_one_token(
        &self,
        layer: usize,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        qk: Option<&QkNorm>,
        step: &Step<'_>,
        ctx: &mut ForwardCtx<'_>,
    ) -> Result<Option<Tensor>> {
        let head_dim = self.shape.head_dim;
        if !ctx.fuse_decode || step.plan.t != 1 || step.rotary.dim as i64 != head_dim || !q.device().is_cuda() {
            return Ok(None);
        }
        // One epsilon for both norms (the families take both from rms_norm_eps).
        if qk.is_some_and(|n| n.q_norm.eps != n.k_norm.eps) {
            return Ok(None);
        }
        let qk_norm = qk.map(|n| crate::kernels::GqaQkNorm {
            q: &n.q_norm.weight,
            k: &n.k_norm.weight,
            eps: n.q_norm.eps,
            per_head: n.scope == QkNormScope::Head,
        });
        let Some(cache) = ctx.cache.as_deref_mut() else { return Ok(None) };
        let Some((k_cache, v_cache, slot)) = cache.buffers(layer, k, v)? else { return Ok(None) };
        let call = crate::kernels::GqaDecode {
            q,
            k,
            v,
            cos: &step.cos,
            sin: &step.sin,
            interleaved: step.rotary.style == super::rotary::RopeStyle::Interleaved,
            k_cache: &k_cache,
            v_cache: &v_cache,
            slot: &slot,
            bias: step.bias(self.sliding),
            scale: self.scale(),
            qk_norm,
        };
        crate::kernels::gqa_decode(&call)
    }

    /// `(b, s, kv_heads, d)` -> `(b, heads, s, d)`: each key/value head serves `heads / kv_heads`
    /// consecutive query heads.
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let GqaShape { heads, kv_heads, head_dim, .. } = self.shape;
        let (b, s) = (x.size()[0], x.size()[1]);
        let x = x.f_transpose(1, 2)?; // (b, kvh, s, d)
        if heads == kv_heads {
            return Ok(x);
        }
        let x = x.f_unsqueeze(2)?.f_expand([b, kv_heads, heads / kv_heads, s, head_dim], false)?; // (b, kvh, rep, s, d)
        Ok(x.f_reshape([b, heads, s, head_dim])?)
    }
}

impl SelfAttention for GqaAttention {
    fn forward(&self, layer: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("attn", layer).entered();
        let qkv = self.project(x, step.plan.b, step.plan.t)?; // (b, t, nh | kvh, d)
        let out = self.attend(layer, qkv, step, ctx)?;
        self.o_proj.forward(&out).ctx(format!("layers.{layer}.self_attn"))
    }

    /// At decode sizes on CUDA bf16 (and `ctx.fuse_decode`): the input norm inside the q, k and v
    /// projections' kernel, the residual add inside `o_proj`'s (`kernels::project`); otherwise
    /// `x + forward(norm(x))`.
    fn forward_residual(&self, layer: usize, x: &Tensor, norm: &RmsNorm, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let fused = if ctx.fuse_decode { self.project_fused(x, norm, step.plan.b, step.plan.t)? } else { None };
        let Some(qkv) = fused else { return residual_unfused(self, layer, x, norm, step, ctx) };
        let _span = tracing::trace_span!("attn", layer).entered();
        let out = self.attend_unnormalized(layer, qkv, step, ctx)?;
        self.o_proj.forward_add(&out, x).ctx(format!("layers.{layer}.self_attn"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::gpu;

    /// On a GPU: the fused (sdpa) path equals eager attention within bf16 rounding, for a plain causal
    /// prefill, a padded one (mask path), MLA's unequal q/v head sizes and a single shared key head.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_attention_matches_eager_on_the_gpu() {
        let dev = gpu(3);
        let (b, t) = (2i64, 37i64);
        let ids = Tensor::zeros([b, t], (Kind::Int64, dev));
        let pad = Tensor::ones([b, t], (Kind::Int64, dev));
        let _ = pad.get(1).narrow(0, 0, 5).fill_(0); // left padding in row 1
        for (mask, heads_kv, d, dv) in [(None, 4i64, 64i64, 64i64), (Some(&pad), 4, 64, 64), (None, 4, 192, 128), (Some(&pad), 1, 576, 512)] {
            let plan = StepPlan::new(&ids, mask, None, dev).expect("plan");
            assert_eq!(plan.plain_causal, mask.is_none());
            let bf = |s: &[i64]| (Tensor::randn(s, (Kind::Float, dev)) * 0.5).to_kind(Kind::BFloat16);
            let (q, k, v) = (bf(&[b, 4, t, d]), bf(&[b, heads_kv, t, d]), bf(&[b, heads_kv, t, dv]));
            let m = AttnMask { bias: &plan.bias, causal: plan.plain_causal };
            let got = attention(&q, &k, &v, m, 0.1).expect("sdpa").to_kind(Kind::Float);
            let want = eager_attention(&q, &k, &v, &plan.bias, 0.1).expect("eager").to_kind(Kind::Float);
            // Padding queries' outputs are unused; compare real tokens only.
            let real = plan.mask.unsqueeze(1).unsqueeze(-1);
            let err = (&got - &want).abs().masked_fill(&real.logical_not(), 0.0).max().double_value(&[]);
            eprintln!("kv heads {heads_kv}, d {d}/{dv}, padded {}: max |sdpa - eager| = {err:.3e}", mask.is_some());
            assert!(err < 2e-2, "{err}");
        }
    }
}
