//! The pre-norm decoder stack every family shares: token embedding; per layer
//! `h = x + self_attn(input_layernorm(x))`, `out = h + mlp(post_attention_layernorm(h))`; final RMSNorm;
//! LM head (untied, or tied to the embedding). A family supplies its attention (a [`SelfAttention`]),
//! builds each layer's [`Ffn`] and its [`ModelInfo`]; this module owns the loop, the per-forward
//! [`Step`] (positions, masks, rotary cos/sin, token facts) and the cache commit.

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::attention::{AttnMask, StepPlan};
use super::mlp::Mlp;
use super::moe::{MoeBlock, TokenInfo};
use super::rotary::{RopeSpec, Rotary};
use super::RmsNorm;
use crate::cache::KvCache;
use crate::ctx::ForwardCtx;
use crate::error::{Error, Result, TorchContext};
use crate::loader::VarBuilder;
use crate::model::ModelInfo;

/// What every layer of one forward pass shares.
#[derive(Debug)]
pub struct Step<'a> {
    /// Positions, padding and the causal bias.
    pub plan: StepPlan,
    /// The model's rotary embedding.
    pub rotary: &'a Rotary,
    /// `(b, t, rotary_dim / 2)` f32.
    pub cos: Tensor,
    /// `(b, t, rotary_dim / 2)` f32.
    pub sin: Tensor,
    /// Padding mask and batch rows of the `b * t` tokens, for the MoE blocks.
    pub tokens: TokenInfo,
    /// `(b, 1, t, s)` causal bias restricted to the model's sliding window, when it has one.
    pub window_bias: Option<Tensor>,
}

impl Step<'_> {
    /// The attention bias of a layer: windowed iff `sliding` and the model has a window.
    pub fn bias(&self, sliding: bool) -> &Tensor {
        match (&self.window_bias, sliding) {
            (Some(w), true) => w,
            _ => &self.plan.bias,
        }
    }

    /// The attention mask of a layer: [`Step::bias`], plain causal when the plan is and no window
    /// applies to the layer.
    pub fn mask(&self, sliding: bool) -> AttnMask<'_> {
        let windowed = sliding && self.window_bias.is_some();
        AttnMask { bias: self.bias(sliding), causal: self.plan.plain_causal && !windowed }
    }
}

/// A family's self-attention block.
pub trait SelfAttention {
    /// Attend for the `(b, t, h)` normalised hidden states `x` of layer `layer`, appending to
    /// `ctx.cache` when present; returns `(b, t, h)`.
    fn forward(&self, layer: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor>;

    /// The decoder's attention half: `x + forward(norm(x))` for the residual stream `x` `(b, t, h)`. A
    /// family overrides it to fold the norm and the add into its decode kernels.
    fn forward_residual(&self, layer: usize, x: &Tensor, norm: &RmsNorm, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        residual_unfused(self, layer, x, norm, step, ctx)
    }
}

/// [`SelfAttention::forward_residual`] as separate ops, `x + attn.forward(norm(x))`: the trait's default,
/// and an override's path where its kernels do not apply.
pub fn residual_unfused<A: SelfAttention + ?Sized>(
    attn: &A,
    layer: usize,
    x: &Tensor,
    norm: &RmsNorm,
    step: &Step<'_>,
    ctx: &mut ForwardCtx<'_>,
) -> Result<Tensor> {
    let a = attn.forward(layer, &norm.forward(x)?, step, ctx)?;
    Ok(x.f_add(&a)?)
}

/// A layer's feed-forward block.
#[derive(Debug)]
pub enum Ffn {
    /// A dense SwiGLU MLP.
    Dense(Mlp),
    /// A sparse MoE block.
    Moe(MoeBlock),
}

/// One pre-norm decoder layer.
#[derive(Debug)]
pub struct DecoderLayer<A> {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// The family's attention.
    pub self_attn: A,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Dense or MoE feed-forward (the checkpoint's `mlp` or, in Mixtral, `block_sparse_moe`).
    pub mlp: Ffn,
}

/// The shape facts the stack needs from a family's config.
#[derive(Debug, Clone, Copy)]
pub struct StackSpec {
    /// `vocab_size`.
    pub vocab_size: i64,
    /// `hidden_size`.
    pub hidden_size: i64,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// Attention window of the layers that slide (`sliding_window`), `None` for none.
    pub sliding_window: Option<i64>,
}

impl StackSpec {
    /// The spec for a config's sizes and tying, without a sliding window.
    pub fn new(vocab_size: usize, hidden_size: usize, rms_norm_eps: f64, common: &CommonConfig) -> Self {
        Self {
            vocab_size: vocab_size as i64,
            hidden_size: hidden_size as i64,
            rms_norm_eps,
            tie_word_embeddings: common.tie_word_embeddings,
            sliding_window: None,
        }
    }

    /// With the sliding layers' window (`None`: no layer slides).
    pub fn sliding(mut self, window: Option<usize>) -> Self {
        self.sliding_window = window.map(|w| w as i64);
        self
    }
}

/// A loaded model of one family: its parsed config and its decoder stack (each family file names its
/// own `Model` as this type with its config and attention, and implements `load` for it).
#[derive(Debug)]
pub struct Loaded<C, A> {
    /// The parsed config.
    pub config: C,
    /// Embedding, layers, final norm, LM head.
    pub decoder: Decoder<A>,
}

/// The decoder stack of a loaded model.
#[derive(Debug)]
pub struct Decoder<A> {
    /// `model.embed_tokens.weight` `(v, h)`.
    pub embed_tokens: Tensor,
    /// `model.layers.{i}`.
    pub layers: Vec<DecoderLayer<A>>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head.weight` `(v, h)` (the embedding when tied).
    pub lm_head: Tensor,
    /// Rotary embedding shared by all layers.
    pub rotary: Rotary,
    /// Window of the sliding layers, if any.
    pub sliding_window: Option<i64>,
    /// Shape facts for callers.
    pub info: ModelInfo,
}

impl<A: SelfAttention> Decoder<A> {
    /// Load the stack from the checkpoint root: `model.embed_tokens`, then for each of `num_layers`
    /// layers the norms plus whatever `layer(i, vb at model.layers.{i})` builds (attention, feed-forward),
    /// `model.norm`, `lm_head`; then check that every checkpoint tensor was consumed. `info` is completed
    /// from the loaded layers (`num_layers`, `moe_layers`, `n_routed_experts`, vocabulary, hidden size,
    /// dtype, device).
    pub fn load(
        root: &VarBuilder<'_>,
        spec: StackSpec,
        num_layers: usize,
        rotary: Rotary,
        mut info: ModelInfo,
        mut layer: impl FnMut(usize, &VarBuilder<'_>) -> Result<(A, Ffn)>,
    ) -> Result<Self> {
        let (h, v, eps) = (spec.hidden_size, spec.vocab_size, spec.rms_norm_eps);
        let vb = root.pp("model");
        let embed_tokens = vb.pp("embed_tokens").get("weight", &[v, h])?;
        // Not `with_capacity(num_layers)`: that reserves memory on config.json's word before the
        // checkpoint can contradict it (found by fuzz/config_json).
        let mut layers = Vec::new();
        for i in 0..num_layers {
            let lv = vb.pp("layers").pp(i);
            let (self_attn, mlp) = layer(i, &lv)?;
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::load(&lv.pp("input_layernorm"), h, eps)?,
                self_attn,
                post_attention_layernorm: RmsNorm::load(&lv.pp("post_attention_layernorm"), h, eps)?,
                mlp,
            });
        }
        let norm = RmsNorm::load(&vb.pp("norm"), h, eps)?;
        let mut dropped = 0; // bytes loaded but not kept
        let lm_head = if spec.tie_word_embeddings {
            if root.contains("lm_head.weight") {
                // Tied: transformers overwrites a stored head with the embedding; so do we.
                dropped = crate::loader::tensor_bytes(&root.pp("lm_head").get("weight", &[v, h])?);
            }
            embed_tokens.shallow_clone()
        } else {
            root.pp("lm_head").get("weight", &[v, h])?
        };
        root.finish()?;
        let moe: Vec<(usize, i64)> = layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.mlp {
                Ffn::Moe(m) => Some((i, m.experts.num_experts)),
                Ffn::Dense(_) => None,
            })
            .collect();
        info.num_layers = num_layers;
        info.moe_layers = moe.iter().map(|&(i, _)| i).collect();
        info.n_routed_experts = moe.first().map_or(0, |&(_, e)| e as usize);
        info.vocab_size = v as usize;
        info.hidden_size = h as usize;
        info.kind = root.kind();
        info.device = root.device();
        info.weight_bytes = root.bytes_loaded() - dropped;
        tracing::info!(model_type = %info.model_type, layers = num_layers, experts = info.n_routed_experts, "loaded");
        Ok(Self { embed_tokens, layers, norm, lm_head, rotary, sliding_window: spec.sliding_window, info })
    }

    /// The MoE blocks with their model layer indices, in layer order.
    pub fn moe_blocks(&self) -> Vec<(usize, &MoeBlock)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Ffn::Moe(m) = &l.mlp {
                out.push((i, m));
            }
        }
        out
    }

    /// Final-norm hidden states `(b, t, h)` for `(b, t)` ids; see [`crate::Model::forward_hidden`].
    pub fn forward_hidden(&self, ids: &Tensor, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let device = self.info.device;
        if let (Some(cache), &[b, t]) = (ctx.cache.as_deref_mut(), &ids.size()[..]) {
            cache.begin_step(b, t, device)?;
        }
        let (mut x, step) = self.begin(ids, ctx.mask, ctx.cache.as_deref())?;
        for i in 0..self.layers.len() {
            x = self.attention_half(i, &x, &step, ctx)?;
            x = self.feed_forward_half(i, &x, &step, ctx)?;
        }
        if let Some(cache) = ctx.cache.as_deref_mut() {
            let p = step.plan;
            cache.commit(p.t as usize, p.key_valid, p.next_pos, p.has_padding)?;
        }
        self.finish(&x)
    }

    /// The first piece of a forward pass: the embedded ids `(b, t, h)` and the [`Step`] every layer
    /// shares (plan, rotary angles, token facts, window bias), for `(b, t)` ids with an optional padding
    /// `mask` and the cache the pass will use (`begin_step` already called). [`Self::forward_hidden`] is
    /// `begin`, then [`Self::attention_half`] and [`Self::feed_forward_half`] of every layer, then
    /// [`Self::finish`]; callers that reuse a pass's intermediate state (eval's profiler) call the pieces.
    pub fn begin(&self, ids: &Tensor, mask: Option<&Tensor>, cache: Option<&KvCache>) -> Result<(Tensor, Step<'_>)> {
        let device = self.info.device;
        let plan = StepPlan::new(ids, mask, cache, device)?;
        let ids = ids.f_to_device(device)?;
        let x = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false).ctx("embed_tokens")?; // (b, t, h)
        let (cos, sin) = self.rotary.cos_sin(&plan.positions)?; // (b, t, rotary / 2)
        let tokens = TokenInfo {
            mask: if mask.is_some() { Some(plan.mask.f_reshape([-1])?) } else { None },
            seq_ids: Tensor::f_arange(plan.b, (Kind::Int64, device))?
                .f_unsqueeze(1)?
                .f_expand([plan.b, plan.t], false)?
                .f_reshape([-1])?,
        };
        let window_bias = match self.sliding_window {
            Some(w) => Some(plan.sliding_bias(w)?),
            None => None,
        };
        Ok((x, Step { plan, rotary: &self.rotary, cos, sin, tokens, window_bias }))
    }

    /// `x + self_attn(input_layernorm(x))` of layer `i` (appends to `ctx.cache` when present).
    pub fn attention_half(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let layer = &self.layers[i];
        layer.self_attn.forward_residual(i, x, &layer.input_layernorm, step, ctx)
    }

    /// `x + mlp(post_attention_layernorm(x))` of layer `i` (a MoE block calls `ctx.policy`).
    pub fn feed_forward_half(&self, i: usize, x: &Tensor, step: &Step<'_>, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let layer = &self.layers[i];
        let norm = &layer.post_attention_layernorm;
        match &layer.mlp {
            Ffn::Dense(mlp) => Ok(x.f_add(&mlp.forward(&norm.forward(x)?).ctx(format!("layers.{i}.mlp"))?)?),
            Ffn::Moe(moe) => moe.forward_residual(i, x, norm, &step.tokens, ctx),
        }
    }

    /// The last piece of a forward pass: the final norm.
    pub fn finish(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x).ctx("norm")
    }

    /// Logits `(.., v)` in the model dtype for hidden states `(.., h)`.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let _span = tracing::trace_span!("lm_head").entered();
        // A decode step (up to PROJECT_MAX_TOKENS tokens, one per sequence) on CUDA bf16: the projection
        // kernel, which reads each vocabulary row once for all of them.
        let h = self.lm_head.size().get(1).copied().unwrap_or(-1);
        let tokens = hidden.numel() as i64 / h.max(1);
        if hidden.size().last() == Some(&h) && (1..=crate::kernels::PROJECT_MAX_TOKENS).contains(&tokens) {
            let head = [crate::kernels::Projection { weight: &self.lm_head, bias: None }];
            if let Some(mut y) = crate::kernels::project(&crate::kernels::Project { x: hidden, norm: None, projections: &head, residual: None })? {
                return Ok(y.pop().expect("one projection"));
            }
        }
        hidden.f_linear(&self.lm_head, None::<&Tensor>).ctx("lm_head")
    }
}

/// The config.json keys every family reads alike and defaults alike in transformers (silu, false, none);
/// a family's `Config` embeds it with `#[serde(flatten)]`, so it still mirrors config.json key by key.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonConfig {
    /// `model_type`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// `hidden_act` (silu only).
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// `tie_word_embeddings`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `rope_theta` (legacy top-level key).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// `rope_scaling` (legacy dict).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    /// `rope_parameters` (transformers 5).
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    /// `quantization_config` (rejected when present).
    #[serde(default)]
    pub quantization_config: Option<Value>,
    /// `bos_token_id`.
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// `eos_token_id`: a number or a list.
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

impl Default for CommonConfig {
    /// What an empty config.json gives.
    fn default() -> Self {
        Self {
            model_type: None,
            hidden_act: silu(),
            tie_word_embeddings: false,
            rope_theta: None,
            rope_scaling: None,
            rope_parameters: None,
            quantization_config: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }
}

fn silu() -> String {
    "silu".into()
}

impl CommonConfig {
    /// Reject what no family implements; `family` is the `model_type` the config must have if it names one.
    pub fn validate(&self, family: &str) -> Result<()> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != family) {
            return Err(Error::config("model_type", format!("`{t}` is not {family}")));
        }
        if self.hidden_act != "silu" {
            return Err(Error::config("hidden_act", format!("`{}` is not implemented (silu only)", self.hidden_act)));
        }
        if self.quantization_config.is_some() {
            return Err(Error::config("quantization_config", "quantized checkpoints are not supported"));
        }
        Ok(())
    }

    /// The resolved rope settings; `default_theta` when config.json names no base.
    pub fn rope(&self, default_theta: f64, max_position_embeddings: usize) -> Result<RopeSpec> {
        let theta = self.rope_theta.or(Some(default_theta));
        RopeSpec::from_config(theta, self.rope_scaling.as_ref(), self.rope_parameters.as_ref(), max_position_embeddings)
    }

    /// `eos_token_id` as a list.
    pub fn eos_token_ids(&self) -> Vec<i64> {
        match &self.eos_token_id {
            Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
            _ => Vec::new(),
        }
    }
}

/// A [`ModelInfo`] with a family's own facts and `common`'s special tokens; [`Decoder::load`] fills in
/// the shapes (layers, experts, vocabulary, hidden size, dtype, device).
pub fn family_info(
    common: &CommonConfig,
    model_type: &str,
    native_k: usize,
    n_shared_experts: usize,
    kv_values_per_token_per_layer: usize,
    max_position_embeddings: usize,
) -> ModelInfo {
    ModelInfo {
        model_type: model_type.into(),
        num_layers: 0,
        moe_layers: Vec::new(),
        n_routed_experts: 0,
        n_shared_experts,
        native_k,
        vocab_size: 0,
        hidden_size: 0,
        max_position_embeddings,
        bos_token_id: common.bos_token_id,
        eos_token_ids: common.eos_token_ids(),
        kv_values_per_token_per_layer,
        kind: Kind::Float,
        device: Device::Cpu,
        weight_bytes: 0,
    }
}
