//! OLMoE (`model_type: olmoe`), e.g. OLMoE-1B-7B-0924.
//!
//! Mirrors transformers 5.17.0 `models/olmoe/modeling_olmoe.py` (eager attention), built from the shared
//! layers: [`GqaAttention`] without biases, with QK-norm over the whole projection
//! ([`QkNormScope::Projection`]: `q_norm` of width `hidden_size`, `k_norm` of width
//! `num_key_value_heads * head_dim`, applied *before* the split into heads), then q, k and v clamped to
//! `[-clip_qkv, clip_qkv]` when `clip_qkv` is set; half-split (NeoX `rotate_half`) RoPE over the whole head,
//! scale `head_dim^-0.5`, plain causal mask. Every layer is MoE; no shared experts.
//!
//! Routing: f32 softmax over `num_experts`; the policy picks ids (stock: top-`num_experts_per_tok`);
//! mixing weight = chosen probability, divided by the chosen sum iff `norm_topk_prob` (native; false in
//! the released checkpoints, so reducing k there keeps the raw probabilities).
//!
//! Weight names (`model.layers.{i}.` prefix inside a layer):
//! | checkpoint | field |
//! |---|---|
//! | `model.embed_tokens.weight` `(v, h)` | `Decoder::embed_tokens` |
//! | `input_layernorm.weight`, `post_attention_layernorm.weight` | `DecoderLayer::{input_layernorm, post_attention_layernorm}` |
//! | `self_attn.{q,k,v,o}_proj.weight` | `GqaAttention::{q,k,v,o}_proj` |
//! | `self_attn.q_norm.weight` `(h)`, `self_attn.k_norm.weight` `(kv_heads * head_dim)` | `GqaAttention::qk_norm` |
//! | `mlp.gate.weight` `(e, h)` | `MoeBlock::gate` (f32) |
//! | `mlp.experts.{j}.{gate,up,down}_proj.weight` (or fused `mlp.experts.{gate_up,down}_proj`) | `Experts::{gate_up_proj, down_proj}` |
//! | `model.norm.weight`, `lm_head.weight` | `Decoder::{norm, lm_head}` |

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::attention::{check_head_split, GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, CommonConfig, Decoder, Ffn, Loaded, StackSpec};
use crate::layers::moe::{check_top_k, MixingTable, MoeBlock, SWIGLU_NAMES};
use crate::layers::qk_norm::QkNormScope;
use crate::layers::rotary::{RopeStyle, Rotary};
use crate::loader::VarBuilder;

/// `OlmoeConfig.eos_token_id`, used when config.json names none.
pub const DEFAULT_EOS_TOKEN_ID: i64 = 50279;

/// config.json of an OLMoE checkpoint, key by key in the hub file's sorted order, with transformers
/// 5.17.0's `OlmoeConfig` defaults (the [`Default`] impl). Keys that do not change inference
/// (`initializer_range`, `use_cache`, `pad_token_id`, which only zeroes an embedding row at initialisation,
/// `attention_dropout`, `output_router_logits`, `router_aux_loss_coef`) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `model_type`, `hidden_act`, `tie_word_embeddings`, the rope keys (`rope_theta`, default 10000),
    /// `quantization_config`, special tokens (`eos_token_id` [`DEFAULT_EOS_TOKEN_ID`] when absent).
    #[serde(flatten)]
    pub common: CommonConfig,
    /// Biases on q/k/v *and* o (rejected: no released OLMoE has them).
    pub attention_bias: bool,
    /// Bound for q, k and v after the QK-norm; null for none.
    pub clip_qkv: Option<f64>,
    /// Not in transformers' class, but read by `getattr(config, "head_dim", ...)`; OLMoE's `q_norm` is
    /// `hidden_size` wide, so only `hidden_size / num_attention_heads` is consistent.
    pub head_dim: Option<usize>,
    /// Residual width.
    pub hidden_size: usize,
    /// The routed experts' width (OLMoE has no dense layers).
    pub intermediate_size: usize,
    /// Longest context the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Whether the chosen experts' weights are renormalised to sum 1 (false in the released checkpoints).
    pub norm_topk_prob: bool,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Routed experts per layer (`num_local_experts` is transformers' alias).
    #[serde(alias = "num_local_experts")] pub num_experts: usize,
    /// Experts per token (top-k).
    pub num_experts_per_tok: usize,
    /// Decoder layers, all MoE.
    pub num_hidden_layers: usize,
    /// Key/value heads; null means `num_attention_heads` (transformers' `__post_init__`).
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon of every norm, QK-norms included.
    pub rms_norm_eps: f64,
    /// Vocabulary size (embedding and LM-head rows).
    pub vocab_size: usize,
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("olmoe")?;
        check_head_split(None, self.hidden_size, self.num_attention_heads)?;
        if let Some(d) = self.head_dim.filter(|&d| d * self.num_attention_heads != self.hidden_size) {
            let (n, h) = (self.num_attention_heads, self.hidden_size);
            return Err(Error::config("head_dim", format!("{d} x num_attention_heads {n} != hidden_size {h} (OLMoE's q_norm is hidden_size wide)")));
        }
        if self.attention_bias {
            return Err(Error::config("attention_bias", "q/k/v/o biases are not implemented (no released OLMoE has them)"));
        }
        if let Some(c) = self.clip_qkv.filter(|c| c.is_nan() || *c <= 0.0) {
            return Err(Error::config("clip_qkv", format!("{c} is not a positive bound (null for none)")));
        }
        self.attention().validate()?;
        if self.num_experts == 0 {
            return Err(Error::config("num_experts", "must be positive (every OLMoE layer is MoE)"));
        }
        check_top_k("num_experts_per_tok", self.num_experts_per_tok, self.num_experts)?;
        self.common.rope(10000.0, self.max_position_embeddings).map(drop)
    }

    /// Mixing weights per renormalisation option: native renormalises iff `norm_topk_prob`; `never`
    /// keeps the raw probabilities (scale 1).
    pub fn mixing(&self) -> MixingTable {
        MixingTable::new(self.norm_topk_prob, 1.0)
    }

    /// The attention's sizes: no biases, `head_dim` always `hidden_size / num_attention_heads` (the
    /// width OLMoE's `q_norm` assumes), `num_key_value_heads` null meaning multi-head.
    pub fn attention(&self) -> GqaShape {
        GqaShape::from_config(self.hidden_size, self.num_attention_heads, self.num_key_value_heads, None, false)
    }
}

impl Default for Config {
    /// `OlmoeConfig()` (hidden 2048, 16 layers, 64 experts top-8; the released 1B-7B sets
    /// `intermediate_size` 1024).
    fn default() -> Self {
        Self {
            common: CommonConfig::default(),
            attention_bias: false,
            clip_qkv: None,
            head_dim: None,
            hidden_size: 2048,
            intermediate_size: 2048,
            max_position_embeddings: 4096,
            norm_topk_prob: false,
            num_attention_heads: 16,
            num_experts: 64,
            num_experts_per_tok: 8,
            num_hidden_layers: 16,
            num_key_value_heads: None,
            rms_norm_eps: 1e-5,
            vocab_size: 50304,
        }
    }
}

/// A loaded OLMoE model.
pub type Model = Loaded<Config, GqaAttention>;

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let shape = c.attention();
        let mut info = family_info(&c.common, "olmoe", c.num_experts_per_tok, 0, shape.kv_values_per_token(), c.max_position_embeddings);
        if c.common.eos_token_id.is_none() {
            info.eos_token_ids = vec![DEFAULT_EOS_TOKEN_ID];
        }
        let rope = c.common.rope(10000.0, c.max_position_embeddings)?;
        let rotary = Rotary::new(&rope, shape.head_dim as usize, RopeStyle::HalfSplit, root.device())?;
        // Every layer: QK-normed attention, then the routed experts (no dense layers, no shared experts).
        let experts = |vb: &VarBuilder<'_>| MoeBlock::load(vb, c.num_experts as i64, shape.hidden, c.intermediate_size as i64, SWIGLU_NAMES, c.mixing());
        let stack = StackSpec::new(c.vocab_size, c.hidden_size, c.rms_norm_eps, &c.common);
        let decoder = Decoder::load(root, stack, c.num_hidden_layers, rotary, info, |_, lv| {
            let av = lv.pp("self_attn");
            let attn = GqaAttention::load(&av, shape, false)?.with_qk_norm(&av, QkNormScope::Projection, c.rms_norm_eps, c.clip_qkv)?;
            Ok((attn, Ffn::Moe(experts(&lv.pp("mlp"))?)))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    /// OLMoE-1B-7B-0924's hub config.json, parsed (the shapes of the H200 speed run).
    fn hub() -> Config {
        serde_json::from_str(include_str!("../configs/olmoe_1b_7b.json")).expect("OLMoE config")
    }

    #[test]
    fn olmoe_1b_7b_config_validates_with_16_layers_of_64_experts_top_8_raw() {
        let (c, a) = (hub(), hub().attention());
        assert!(c.validate().is_ok() && c.common.model_type.as_deref() == Some("olmoe"));
        assert_eq!((c.num_hidden_layers, c.num_experts, c.num_experts_per_tok, a.kv_heads, a.head_dim), (16, 64, 8, 16, 128));
        assert_eq!((c.intermediate_size, c.clip_qkv, c.common.rope_theta), (1024, None, Some(10000.0)));
        assert_eq!(c.mixing().native, Mixing { renormalize: false, scale: 1.0 });
    }

    #[test]
    fn inconsistent_head_dim_bias_and_clip_are_rejected_naming_the_key() {
        let mut c = hub();
        c.head_dim = Some(64);
        assert!(c.validate().expect_err("head_dim").to_string().contains("head_dim"));
        c.head_dim = Some(128);
        c.validate().expect("consistent head_dim");
        let mut c = hub();
        c.attention_bias = true;
        assert!(c.validate().expect_err("bias").to_string().contains("attention_bias"));
        let mut c = hub();
        c.clip_qkv = Some(0.0);
        assert!(c.validate().expect_err("clip 0").to_string().contains("clip_qkv"));
        let mut c = hub();
        c.num_experts_per_tok = 65;
        assert!(c.validate().expect_err("k > e").to_string().contains("num_experts_per_tok"));
    }

    #[test]
    fn num_local_experts_is_an_alias_and_null_kv_heads_mean_multi_head() {
        let c: Config = serde_json::from_str(r#"{"num_local_experts": 8, "num_key_value_heads": null}"#).expect("parse");
        assert_eq!((c.num_experts, c.attention().kv_heads), (8, 16));
    }
}
