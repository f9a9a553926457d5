//! DeepSeek-V2 and DeepSeek-V2-Lite (`model_type: deepseek_v2`).
//!
//! Mirrors transformers 5.17.0 `models/deepseek_v2/modeling_deepseek_v2.py` (eager attention), with two
//! rules taken from DeepSeek's own `modeling_deepseek.py` where transformers departs from it:
//! `moe_layer_freq` (transformers makes every layer from `first_k_dense_replace` on MoE) and
//! `norm_topk_prob` (transformers ignores it). Both agree for every released V2 checkpoint
//! (`moe_layer_freq` 1, `norm_topk_prob` false).
//!
//! Routing: f32 softmax over all routed experts; `group_limited_greedy` zeroes all experts outside each
//! token's `topk_group` best groups (group score = best expert) before the policy sees the probabilities;
//! the policy picks ids (stock: top-`num_experts_per_tok`); mixing weight = chosen probability, divided by
//! the chosen sum iff `norm_topk_prob` (native), else times `routed_scaling_factor`; shared experts
//! (one SwiGLU of width `n_shared_experts * moe_intermediate_size`) are added unweighted.
//!
//! Attention is MLA: `q = q_proj(x)` or `q_b_proj(q_a_layernorm(q_a_proj(x)))`, per head
//! `[q_nope | q_pe]`; `kv_a_proj_with_mqa(x) = [c_kv | k_pe]`, `k_pe` one head shared by all; keys and
//! values are `kv_b_proj(kv_a_layernorm(c_kv))` per head `[k_nope | v]`. RoPE rotates only the
//! `qk_rope_head_dim` slice, pairing dimensions `(2i, 2i + 1)`. With YaRN, cos/sin carry
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` and the softmax scale is
//! `qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2` (transformers 5.17.0 has this factor:
//! `yarn_apply_mscale`). The cache holds the latent (normalised `c_kv`, roped `k_pe`); attending to
//! cached tokens absorbs `kv_b_proj` into the query and output ([`MlaPath`]).
//!
//! Weight names (`model.layers.{i}.` prefix inside a layer):
//! | checkpoint | field |
//! |---|---|
//! | `model.embed_tokens.weight` `(v, h)` | `Decoder::embed_tokens` (shared stack, `layers::decoder`) |
//! | `input_layernorm.weight`, `post_attention_layernorm.weight` | `DecoderLayer::{input_layernorm, post_attention_layernorm}` |
//! | `self_attn.q_proj.weight` (q_lora_rank null) | `Attention::q_proj` |
//! | `self_attn.{q_a_proj, q_a_layernorm, q_b_proj}.weight` (q_lora_rank set) | `Attention::{q_a_proj, q_a_layernorm, q_b_proj}` |
//! | `self_attn.{kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight` | `Attention::*` |
//! | `mlp.{gate,up,down}_proj.weight` (dense layers) | `Ffn::Dense` |
//! | `mlp.gate.weight` `(e, h)` | `MoeBlock::gate` (f32) |
//! | `mlp.experts.{j}.{gate,up,down}_proj.weight` | stacked into `Experts::{gate_up_proj, down_proj}` |
//! | `mlp.shared_experts.{gate,up,down}_proj.weight` | `MoeBlock::shared_experts` |
//! | `model.norm.weight`, `lm_head.weight` | `Decoder::{norm, lm_head}` |

use serde::Deserialize;
use tch::Tensor;

use crate::ctx::{ForwardCtx, MlaPath};
use crate::error::{Error, Result, TorchContext};
use crate::layers::attention::{attention, AttnMask};
use crate::layers::decoder::{family_info, residual_unfused, CommonConfig, Decoder, Ffn, Loaded, SelfAttention, StackSpec, Step};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{check_top_k, MixingTable, MoeBlock, TopkMethod, SWIGLU_NAMES};
use crate::layers::rotary::{yarn_mscale, RopeSpec, RopeStyle, Rotary};
use crate::kernels::{project, MlaDecode, MlaPrep, Project};
use crate::layers::{Linear, RmsNorm};
use crate::loader::VarBuilder;

fn d_vocab() -> usize { 102400 }
fn d_hidden() -> usize { 4096 }
fn d_inter() -> usize { 11008 }
fn d_layers() -> usize { 32 }
fn d_heads() -> usize { 32 }
fn d_maxpos() -> usize { 2048 }
fn d_eps() -> f64 { 1e-6 }
fn d_kv_lora() -> usize { 512 }
fn d_q_lora() -> Option<usize> { Some(1536) }
fn d_routed() -> Option<usize> { Some(64) }
fn d_shared() -> Option<usize> { Some(2) }
fn d_nope() -> usize { 128 }
fn d_rope() -> usize { 64 }
fn d_v() -> usize { 128 }
fn d_one_f() -> f64 { 1.0 }
fn d_one() -> usize { 1 }
fn d_greedy() -> String { "greedy".into() }
fn d_softmax() -> String { "softmax".into() }
fn d_moe_inter() -> usize { 1407 }

/// config.json of a DeepSeek-V2 checkpoint, key by key, with transformers 5.17.0's defaults
/// (`moe_layer_freq`, `scoring_func`, `ep_size` from DeepSeek's own config class). Keys that do not
/// change inference (`aux_loss_alpha`, `seq_aux`, `pretraining_tp`, `initializer_range`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)] // fields are config.json's keys; transformers documents them
pub struct Config {
    /// `model_type`, `hidden_act`, `tie_word_embeddings`, the rope keys, `quantization_config`, special tokens.
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_interleave: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub first_k_dense_replace: usize,
    #[serde(default = "d_one")]
    pub moe_layer_freq: usize,
    #[serde(default = "d_kv_lora")]
    pub kv_lora_rank: usize,
    #[serde(default = "d_q_lora")]
    pub q_lora_rank: Option<usize>,
    #[serde(default)]
    pub n_group: Option<usize>,
    #[serde(default)]
    pub topk_group: Option<usize>,
    #[serde(default = "d_routed")]
    pub n_routed_experts: Option<usize>,
    #[serde(default = "d_shared")]
    pub n_shared_experts: Option<usize>,
    #[serde(default = "d_nope")]
    pub qk_nope_head_dim: usize,
    #[serde(default = "d_rope")]
    pub qk_rope_head_dim: usize,
    #[serde(default = "d_v")]
    pub v_head_dim: usize,
    #[serde(default = "d_one_f")]
    pub routed_scaling_factor: f64,
    #[serde(default = "d_greedy")]
    pub topk_method: String,
    #[serde(default = "d_softmax")]
    pub scoring_func: String,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default = "d_moe_inter")]
    pub moe_intermediate_size: usize,
    #[serde(default)]
    pub ep_size: Option<usize>,
}

fn bad(key: &str, msg: impl Into<String>) -> Error {
    Error::Config { key: key.into(), msg: msg.into() }
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("deepseek_v2")?;
        if self.scoring_func != "softmax" {
            return Err(bad("scoring_func", format!("`{}` is not implemented (softmax only)", self.scoring_func)));
        }
        let e = self.n_routed_experts.filter(|&e| e > 0).ok_or_else(|| bad("n_routed_experts", "must be a positive number"))?;
        let k = self.num_experts_per_tok.ok_or_else(|| bad("num_experts_per_tok", "missing"))?;
        check_top_k("num_experts_per_tok", k, e)?;
        match self.topk_method.as_str() {
            "greedy" => {}
            "group_limited_greedy" => {
                let g = self.n_group.filter(|&g| g > 0).ok_or_else(|| bad("n_group", "group_limited_greedy needs n_group"))?;
                let tg = self.topk_group.ok_or_else(|| bad("topk_group", "group_limited_greedy needs topk_group"))?;
                if e % g != 0 {
                    return Err(bad("n_group", format!("{e} experts do not split into {g} groups")));
                }
                if tg == 0 || tg > g || tg * (e / g) < k {
                    return Err(bad("topk_group", format!("{tg} groups of {} experts cannot hold {k} experts", e / g)));
                }
            }
            other => {
                return Err(bad("topk_method", format!("`{other}` is not implemented (greedy, group_limited_greedy)")))
            }
        }
        if let Some(kv) = self.num_key_value_heads {
            if kv != self.num_attention_heads {
                return Err(bad("num_key_value_heads", "MLA has one latent per token; must equal num_attention_heads"));
            }
        }
        if self.attention_bias {
            return Err(bad("attention_bias", "biases in attention projections are not implemented"));
        }
        if self.mlp_bias {
            return Err(bad("mlp_bias", "biases in MLPs are not implemented"));
        }
        if self.ep_size.is_some_and(|s| s != 1) {
            return Err(bad("ep_size", "expert parallelism is not supported"));
        }
        if self.rope_interleave == Some(false) {
            return Err(bad("rope_interleave", "DeepSeek-V2 rotates interleaved pairs; false is not implemented"));
        }
        if self.moe_layer_freq == 0 {
            return Err(bad("moe_layer_freq", "must be at least 1"));
        }
        if self.q_lora_rank == Some(0) {
            return Err(bad("q_lora_rank", "must be null or positive"));
        }
        if self.qk_rope_head_dim & 1 == 1 {
            return Err(bad("qk_rope_head_dim", "must be even"));
        }
        self.rope()?;
        Ok(())
    }

    /// The resolved rope settings.
    pub fn rope(&self) -> Result<RopeSpec> {
        self.common.rope(10000.0, self.max_position_embeddings)
    }

    /// Whether layer `i` is MoE (DeepSeek's rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_routed_experts.unwrap_or(0) > 0 && i >= self.first_k_dense_replace && i.checked_rem(self.moe_layer_freq) == Some(0)
    }

    /// `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention softmax scale: `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)^2` under
    /// YaRN when `mscale_all_dim` is set and non-zero.
    pub fn softmax_scale(&self) -> Result<f64> {
        let mut s = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = self.rope()?.yarn {
            if let Some(m) = y.mscale_all_dim.filter(|m| *m != 0.0) {
                let ms = yarn_mscale(y.factor, m);
                s *= ms * ms;
            }
        }
        Ok(s)
    }

    /// Mixing weights per renormalisation option. DeepSeek-V2 scales by `routed_scaling_factor` only
    /// when it does not renormalise (`modeling_deepseek.py`: `if top_k > 1 and norm_topk_prob: w /= sum
    /// else: w *= routed_scaling_factor`).
    pub fn mixing(&self) -> MixingTable {
        let k = self.num_experts_per_tok.unwrap_or(1);
        MixingTable::new(self.norm_topk_prob && k > 1, self.routed_scaling_factor)
    }
}

/// Multi-head latent attention.
#[derive(Debug)]
pub struct Attention {
    /// `(heads * qk_head_dim, h)` when `q_lora_rank` is null.
    pub q_proj: Option<Linear>,
    /// `(q_lora_rank, h)` when set.
    pub q_a_proj: Option<Linear>,
    /// `(q_lora_rank)`.
    pub q_a_layernorm: Option<RmsNorm>,
    /// `(heads * qk_head_dim, q_lora_rank)`.
    pub q_b_proj: Option<Linear>,
    /// `(kv_lora_rank + rope, h)`.
    pub kv_a_proj_with_mqa: Linear,
    /// `(kv_lora_rank)`.
    pub kv_a_layernorm: RmsNorm,
    /// `(heads * (nope + v), kv_lora_rank)`.
    pub kv_b_proj: Linear,
    /// `(h, heads * v)`.
    pub o_proj: Linear,
    /// Absorbed key part of `kv_b_proj`: `(heads, nope, kv_lora_rank)`.
    w_uk: Tensor,
    /// Absorbed value part of `kv_b_proj`, transposed: `(heads, kv_lora_rank, v)`.
    w_uv_t: Tensor,
    heads: i64,
    nope: i64,
    rope: i64,
    v: i64,
    rank: i64,
    scale: f64,
}

impl Attention {
    fn load(vb: &VarBuilder<'_>, c: &Config) -> Result<Self> {
        let (h, n) = (c.hidden_size as i64, c.num_attention_heads as i64);
        let (nope, rope, v, rank) =
            (c.qk_nope_head_dim as i64, c.qk_rope_head_dim as i64, c.v_head_dim as i64, c.kv_lora_rank as i64);
        let qd = n * (nope + rope);
        let (q_proj, q_a_proj, q_a_layernorm, q_b_proj) = match c.q_lora_rank {
            None => (Some(Linear::load(&vb.pp("q_proj"), h, qd, false)?), None, None, None),
            Some(r) => {
                let r = r as i64;
                (
                    None,
                    Some(Linear::load(&vb.pp("q_a_proj"), h, r, false)?),
                    Some(RmsNorm::load(&vb.pp("q_a_layernorm"), r, c.rms_norm_eps)?),
                    Some(Linear::load(&vb.pp("q_b_proj"), r, qd, false)?),
                )
            }
        };
        let kv_b_proj = Linear::load(&vb.pp("kv_b_proj"), rank, n * (nope + v), false)?;
        let w = kv_b_proj.weight.f_reshape([n, nope + v, rank])?;
        let w_uk = w.f_narrow(1, 0, nope)?.f_contiguous()?;
        let w_uv_t = w.f_narrow(1, nope, v)?.f_transpose(1, 2)?.f_contiguous()?;
        Ok(Self {
            q_proj,
            q_a_proj,
            q_a_layernorm,
            q_b_proj,
            kv_a_proj_with_mqa: Linear::load(&vb.pp("kv_a_proj_with_mqa"), h, rank + rope, false)?,
            kv_a_layernorm: RmsNorm::load(&vb.pp("kv_a_layernorm"), rank, c.rms_norm_eps)?,
            kv_b_proj,
            o_proj: Linear::load(&vb.pp("o_proj"), n * v, h, false)?,
            w_uk,
            w_uv_t,
            heads: n,
            nope,
            rope,
            v,
            rank,
            scale: c.softmax_scale()?,
        })
    }

    /// `(q, [c_kv | k_pe])` for the normalised input `x` `(b, t, h)`, with libtorch ops.
    fn project_inputs(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let q = match (&self.q_proj, &self.q_a_proj, &self.q_a_layernorm, &self.q_b_proj) {
            (Some(q_proj), ..) => q_proj.forward(x)?,
            (None, Some(a), Some(norm), Some(bp)) => bp.forward(&norm.forward(&a.forward(x)?)?)?,
            // INVARIANT: `load` fills either q_proj or all three q_lora projections.
            _ => return Err(Error::Input("attention has no query projection".into())),
        };
        Ok((q, self.kv_a_proj_with_mqa.forward(x)?))
    }

    /// [`Self::project_inputs`] of `input_layernorm(x)` in one or two run-time compiled kernels (the
    /// norm folded in; `kernels::project`), or `None` where they do not apply.
    fn project_inputs_fused(&self, x: &Tensor, norm: &RmsNorm) -> Result<Option<(Tensor, Tensor)>> {
        let kv_a = self.kv_a_proj_with_mqa.projection();
        let first = match (&self.q_proj, &self.q_a_proj) {
            (Some(q), _) | (None, Some(q)) => q.projection(),
            (None, None) => return Ok(None),
        };
        let Some(mut outs) = project(&Project { x, norm: Some((&norm.weight, norm.eps)), projections: &[first, kv_a], residual: None })? else {
            return Ok(None);
        };
        let ckv = outs.pop().expect("two projections");
        let q = outs.pop().expect("two projections");
        let q = match (&self.q_a_layernorm, &self.q_b_proj) {
            (Some(qn), Some(qb)) if self.q_proj.is_none() => {
                let p = Project { x: &q, norm: Some((&qn.weight, qn.eps)), projections: &[qb.projection()], residual: None };
                match project(&p)? {
                    Some(mut o) => o.pop().expect("one projection"),
                    None => qb.forward(&qn.forward(&q)?)?,
                }
            }
            _ => q,
        };
        Ok(Some((q, ckv)))
    }

    /// The absorbed decode step entirely in the MLA kernels (`kernels::mla_decode` with [`MlaPrep`]):
    /// they rope q_pe and k_pe, normalise the latent and write it into the preallocated cache's slot,
    /// then attend: `(b, t, nh, v)`, or `None` (nothing written) without a preallocated cache or where
    /// the kernels do not apply. `q` is `(b, nh, t, nope + rope)`, unroped.
    fn attend_fused(&self, layer: usize, q: &Tensor, ckv: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Option<Tensor>> {
        let Some(cache) = ctx.cache.as_deref_mut() else { return Ok(None) };
        if !ckv.is_contiguous() {
            return Ok(None);
        }
        let (c_new, k_new) = (ckv.f_narrow(-1, 0, self.rank)?, ckv.f_narrow(-1, self.rank, self.rope)?);
        let Some((c_all, kpe_all, slots)) = cache.buffers(layer, &c_new, &k_new)? else { return Ok(None) };
        let prep = MlaPrep {
            kv: ckv,
            kv_norm: (&self.kv_a_layernorm.weight, self.kv_a_layernorm.eps),
            cos: &step.cos,
            sin: &step.sin,
            interleaved: step.rotary.style == RopeStyle::Interleaved,
            slots: &slots,
        };
        let call = MlaDecode {
            q_nope: &q.f_narrow(-1, 0, self.nope)?,
            q_pe: &q.f_narrow(-1, self.nope, self.rope)?,
            w_uk: &self.w_uk,
            ckv: &c_all,
            kpe: &kpe_all,
            bias: &step.plan.bias,
            w_uv_t: &self.w_uv_t,
            scale: self.scale,
            prep: Some(prep),
        };
        crate::kernels::mla_decode(&call)
    }

    /// Attention of layer `layer` from its projected inputs `q` `(b, t, nh * (nope + rope))` and
    /// `ckv` `(b, t, rank + rope)`, appending to `ctx.cache`: `(b, t, nh * v)`, before `o_proj`.
    fn attend(&self, layer: usize, q: Tensor, ckv: Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("attn", layer).entered();
        let (plan, rotary, cos, sin) = (&step.plan, step.rotary, &step.cos, &step.sin);
        let (b, t) = (plan.b, plan.t);
        let absorbed = match ctx.mla {
            MlaPath::Auto => plan.past > 0,
            MlaPath::Expanded => false,
            MlaPath::Absorbed => true,
        };
        let q = q.f_reshape([b, t, self.heads, self.nope + self.rope])?.f_transpose(1, 2)?; // (b, nh, t, dq)
        let q_nope = q.f_narrow(-1, 0, self.nope)?; // (b, nh, t, nope)
        if absorbed && ctx.fuse_decode {
            if let Some(out) = self.attend_fused(layer, &q, &ckv, step, ctx)? {
                return Ok(out.f_reshape([b, t, self.heads * self.v])?);
            }
        }
        let q_pe = rotary.apply(&q.f_narrow(-1, self.nope, self.rope)?, cos, sin)?; // (b, nh, t, rope)
        let c_kv = self.kv_a_layernorm.forward(&ckv.f_narrow(-1, 0, self.rank)?)?; // (b, t, rank)
        let k_pe = ckv.f_narrow(-1, self.rank, self.rope)?.f_unsqueeze(1)?; // (b, 1, t, rope)
        let k_pe = rotary.apply(&k_pe, cos, sin)?.f_squeeze_dim(1)?; // (b, t, rope)
        let (c_all, kpe_all) = match ctx.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &c_kv, &k_pe)?,
            None => (c_kv, k_pe),
        }; // (b, s, rank), (b, s, rope)
        let s = c_all.size()[1];
        let mask = AttnMask { bias: &plan.bias, causal: plan.plain_causal };
        let out = if absorbed {
            let fused = crate::kernels::mla_decode(&crate::kernels::MlaDecode {
                q_nope: &q_nope,
                q_pe: &q_pe,
                w_uk: &self.w_uk,
                ckv: &c_all,
                kpe: &kpe_all,
                bias: &plan.bias,
                w_uv_t: &self.w_uv_t,
                scale: self.scale,
                prep: None,
            })?; // (b, t, nh, v): decode steps on CUDA, run-time compiled kernels
            match fused {
                Some(o) => o,
                None => {
                    let q_lat = q_nope.f_matmul(&self.w_uk)?; // (b, nh, t, rank)
                    let qf = Tensor::f_cat(&[q_lat, q_pe], -1)?; // (b, nh, t, rank + rope)
                    let kf = Tensor::f_cat(&[&c_all, &kpe_all], -1)?.f_unsqueeze(1)?; // (b, 1, s, rank + rope)
                    let vf = c_all.f_unsqueeze(1)?; // (b, 1, s, rank)
                    let o_lat = attention(&qf, &kf, &vf, mask, self.scale)?; // (b, nh, t, rank)
                    o_lat.f_matmul(&self.w_uv_t)?.f_transpose(1, 2)? // (b, t, nh, v)
                }
            }
        } else {
            let kv = self.kv_b_proj.forward(&c_all)?; // (b, s, nh * (nope + v))
            let kv = kv.f_reshape([b, s, self.heads, self.nope + self.v])?; // (b, s, nh, nope + v)
            let v = kv.f_narrow(-1, self.nope, self.v)?.f_transpose(1, 2)?; // (b, nh, s, v)
            let k_nope = kv.f_narrow(-1, 0, self.nope)?.f_transpose(1, 2)?; // (b, nh, s, nope)
            let k_rot = kpe_all.f_unsqueeze(1)?.f_expand([b, self.heads, s, self.rope], false)?;
            let k = Tensor::f_cat(&[k_nope, k_rot], -1)?; // (b, nh, s, dq)
            // The query's own rope columns take the rotated values, so q is complete without a
            // concatenation (on the H200 that saved ~4 ms of an 8 x 1024 prefill; writing the keys into a
            // buffer the same way gained nothing over their concatenation).
            q.f_narrow(-1, self.nope, self.rope)?.f_copy_(&q_pe)?;
            attention(&q, &k, &v, mask, self.scale)?.f_transpose(1, 2)? // (b, t, nh, v)
        };
        Ok(out.f_reshape([b, t, self.heads * self.v])?) // (b, t, nh * v)
    }
}

impl SelfAttention for Attention {
    fn forward(&self, layer: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let (q, ckv) = self.project_inputs(x)?;
        let out = self.attend(layer, q, ckv, step, ctx)?;
        self.o_proj.forward(&out).ctx(format!("layers.{layer}.self_attn"))
    }

    /// At decode sizes on CUDA bf16 (and `ctx.fuse_decode`): the input norm inside the query and latent
    /// projections' kernel, the residual add inside `o_proj`'s (`kernels::project`); otherwise
    /// `x + forward(norm(x))`.
    fn forward_residual(&self, layer: usize, x: &Tensor, norm: &RmsNorm, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let fused = if ctx.fuse_decode { self.project_inputs_fused(x, norm)? } else { None };
        let Some((q, ckv)) = fused else { return residual_unfused(self, layer, x, norm, step, ctx) };
        let out = self.attend(layer, q, ckv, step, ctx)?;
        self.o_proj.forward_add(&out, x).ctx(format!("layers.{layer}.self_attn"))
    }
}

/// A loaded DeepSeek-V2 model.
pub type Model = Loaded<Config, Attention>;

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let h = c.hidden_size as i64;
        let e = c.n_routed_experts.unwrap_or(0) as i64;
        let topk_method = match c.topk_method.as_str() {
            "group_limited_greedy" => TopkMethod::GroupLimited {
                n_group: c.n_group.unwrap_or(1) as i64,
                topk_group: c.topk_group.unwrap_or(1) as i64,
            },
            _ => TopkMethod::Greedy,
        };
        let spec = StackSpec::new(c.vocab_size, c.hidden_size, c.rms_norm_eps, &c.common);
        let rotary = Rotary::new(&c.rope()?, c.qk_rope_head_dim, RopeStyle::Interleaved, root.device())?;
        let (k, shared) = (c.num_experts_per_tok.unwrap_or(0), c.n_shared_experts.unwrap_or(0));
        let kv_values = c.kv_lora_rank + c.qk_rope_head_dim;
        let info = family_info(&c.common, "deepseek_v2", k, shared, kv_values, c.max_position_embeddings);
        let decoder = Decoder::load(root, spec, c.num_hidden_layers, rotary, info, |i, lv| {
            let mv = lv.pp("mlp");
            let mlp = if c.is_moe_layer(i) {
                let mi = c.moe_intermediate_size as i64;
                let mut moe = MoeBlock::load(&mv, e, h, mi, SWIGLU_NAMES, c.mixing())?;
                moe.topk_method = topk_method;
                if let Some(ns) = c.n_shared_experts.filter(|&ns| ns > 0) {
                    moe.shared_experts = Some(Mlp::load(&mv.pp("shared_experts"), h, mi * ns as i64)?);
                }
                Ffn::Moe(moe)
            } else {
                Ffn::Dense(Mlp::load(&mv, h, c.intermediate_size as i64)?)
            };
            Ok((Attention::load(&lv.pp("self_attn"), c)?, mlp))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    fn lite() -> Config {
        serde_json::from_str(include_str!("../configs/deepseek_v2_lite.json")).expect("lite config")
    }

    #[test]
    fn lite_config_validates_with_26_moe_layers_and_budget_156() {
        let c = lite();
        c.validate().expect("valid");
        let moe: Vec<usize> = (0..c.num_hidden_layers).filter(|&i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, (1..27).collect::<Vec<_>>());
        assert_eq!(moe.len() * c.num_experts_per_tok.unwrap_or(0), 156);
        assert_eq!(c.kv_lora_rank + c.qk_rope_head_dim, 576);
    }

    #[test]
    fn lite_softmax_scale_is_mscale_squared_over_sqrt_192() {
        let s = lite().softmax_scale().expect("scale");
        let m = 0.1 * 0.707 * 40f64.ln() + 1.0;
        assert!((s - m * m / 192f64.sqrt()).abs() < 1e-12);
        assert!((s - 0.114721).abs() < 1e-5, "{s}");
    }

    #[test]
    fn moe_layer_freq_follows_deepseek_rule() {
        let mut c = lite();
        c.moe_layer_freq = 2;
        c.first_k_dense_replace = 1;
        let moe: Vec<usize> = (0..6).filter(|&i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, vec![2, 4]);
    }

    #[test]
    fn native_mixing_renormalises_without_scaling_only_when_norm_topk_prob() {
        let mut c = lite();
        c.routed_scaling_factor = 16.0;
        assert_eq!(c.mixing().native, Mixing { renormalize: false, scale: 16.0 });
        c.norm_topk_prob = true;
        assert_eq!(c.mixing().native, Mixing { renormalize: true, scale: 1.0 });
        c.num_experts_per_tok = Some(1);
        assert_eq!(c.mixing().native, Mixing { renormalize: false, scale: 16.0 });
    }
}
