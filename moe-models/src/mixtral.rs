//! Mixtral (`model_type: mixtral`).
//!
//! Mirrors transformers 5.17.0 `models/mixtral/modeling_mixtral.py` (eager attention), built from the
//! shared layers: [`GqaAttention`] without biases (`num_key_value_heads` key/value heads shared by groups
//! of query heads), half-split (NeoX `rotate_half`) RoPE over the whole head (`head_dim`, else
//! `hidden_size / num_attention_heads`), scale `head_dim^-0.5`; when `sliding_window` is set, every layer
//! attends only to the last `sliding_window` cache slots (query slot `i` sees key slot `j` iff
//! `i - j < sliding_window`, transformers' `sliding_window_overlay`). Every layer is MoE.
//!
//! Routing: f32 softmax over `num_local_experts`; the policy picks ids (stock: top-`num_experts_per_tok`);
//! mixing weight = chosen probability divided by the chosen sum (native, always). So with k reduced to 1
//! the surviving expert gets weight 1.0 and the output scale changes too; `Renormalize::Never` keeps the
//! raw probabilities instead. No shared experts.
//!
//! Weight names (`model.layers.{i}.` prefix inside a layer):
//! | checkpoint | field |
//! |---|---|
//! | `model.embed_tokens.weight` `(v, h)` | `Decoder::embed_tokens` |
//! | `input_layernorm.weight`, `post_attention_layernorm.weight` | `DecoderLayer::{input_layernorm, post_attention_layernorm}` |
//! | `self_attn.{q,k,v,o}_proj.weight` | `GqaAttention::{q,k,v,o}_proj` |
//! | `block_sparse_moe.gate.weight` `(e, h)` | `MoeBlock::gate` (f32), in `DecoderLayer::mlp` |
//! | `block_sparse_moe.experts.{j}.{w1,w3,w2}.weight` (gate, up, down) | stacked into `Experts::{gate_up_proj, down_proj}` |
//! | `model.norm.weight`, `lm_head.weight` | `Decoder::{norm, lm_head}` |

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::layers::attention::{GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, with_tokens, Decoder, Ffn, StackSpec};
use crate::layers::moe::{ExpertNames, MixingTable, MoeBlock};
use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
use crate::loader::VarBuilder;

/// Mixtral's expert projection names: `w1` gate, `w3` up, `w2` down.
pub const EXPERT_NAMES: ExpertNames = ExpertNames { gate: "w1", up: "w3", down: "w2" };

/// transformers' `MixtralConfig.default_theta`, used when config.json names no rope base.
pub const DEFAULT_ROPE_THETA: f64 = 1e6;

fn d_vocab() -> usize { 32000 }
fn d_hidden() -> usize { 4096 }
fn d_inter() -> usize { 14336 }
fn d_layers() -> usize { 32 }
fn d_heads() -> usize { 32 }
fn d_kv_heads() -> Option<usize> { Some(8) }
fn d_act() -> String { "silu".into() }
fn d_maxpos() -> usize { 4096 * 32 }
fn d_eps() -> f64 { 1e-5 }
fn d_k() -> usize { 2 }
fn d_experts() -> usize { 8 }
fn d_bos() -> Option<i64> { Some(1) }
fn d_eos() -> Option<Value> { Some(Value::from(2)) }

/// config.json of a Mixtral checkpoint, key by key, with transformers 5.17.0's defaults. Keys that do not
/// change inference (`router_jitter_noise`, which acts only in training, `router_aux_loss_coef`,
/// `initializer_range`, `attention_dropout`, `use_cache`) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)] // fields are config.json's keys; transformers documents them
pub struct Config {
    #[serde(default)]
    pub model_type: Option<String>,
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
    /// null means `num_attention_heads` (transformers' `__post_init__`).
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default = "d_k")]
    pub num_experts_per_tok: usize,
    #[serde(default = "d_experts")]
    pub num_local_experts: usize,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub quantization_config: Option<Value>,
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<i64>,
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<Value>,
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "mixtral") {
            return Err(Error::config("model_type", format!("`{t}` is not mixtral")));
        }
        if self.hidden_act != "silu" {
            return Err(Error::config("hidden_act", format!("`{}` is not implemented (silu only)", self.hidden_act)));
        }
        let (e, k) = (self.num_local_experts, self.num_experts_per_tok);
        if e == 0 {
            return Err(Error::config("num_local_experts", "must be positive"));
        }
        if k == 0 || k > e {
            return Err(Error::config("num_experts_per_tok", format!("{k} is outside 1..={e}")));
        }
        let (n, kv) = (self.num_attention_heads, self.kv_heads());
        if kv == 0 || n % kv != 0 {
            return Err(Error::config("num_key_value_heads", format!("{kv} does not divide num_attention_heads {n}")));
        }
        if self.head_dim() % 2 == 1 {
            return Err(Error::config("head_dim", "must be even (rotary pairs)"));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::config("sliding_window", "0 would mask every key; use null for no window"));
        }
        if self.quantization_config.is_some() {
            return Err(Error::config("quantization_config", "quantized checkpoints are not supported"));
        }
        self.rope()?;
        Ok(())
    }

    /// The resolved rope settings (base [`DEFAULT_ROPE_THETA`] when none is given).
    pub fn rope(&self) -> Result<RopeSpec> {
        let theta = self.rope_theta.or(Some(DEFAULT_ROPE_THETA));
        RopeSpec::from_config(theta, self.rope_scaling.as_ref(), self.rope_parameters.as_ref(), self.max_position_embeddings)
    }

    /// `num_key_value_heads`, or `num_attention_heads` when null.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// `head_dim`, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Mixing weights per renormalisation option: native renormalises over the chosen experts.
    pub fn mixing(&self) -> MixingTable {
        MixingTable::new(true, 1.0)
    }
}

/// A loaded Mixtral model.
#[derive(Debug)]
pub struct Model {
    /// The parsed config.
    pub config: Config,
    /// Embedding, layers, final norm, LM head.
    pub decoder: Decoder<GqaAttention>,
}

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, hd, kv) = (c.hidden_size as i64, c.head_dim(), c.kv_heads());
        let shape =
            GqaShape { hidden: h, heads: c.num_attention_heads as i64, kv_heads: kv as i64, head_dim: hd as i64, qkv_bias: false };
        let spec = StackSpec {
            vocab_size: c.vocab_size as i64,
            hidden_size: h,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            sliding_window: c.sliding_window.map(|w| w as i64),
        };
        let rotary = Rotary::new(&c.rope()?, hd, RopeStyle::HalfSplit, root.device())?;
        let info = family_info("mixtral", c.num_experts_per_tok, 0, 2 * kv * hd);
        let info = with_tokens(info, c.max_position_embeddings, c.bos_token_id, c.eos_token_id.as_ref());
        let (e, i) = (c.num_local_experts as i64, c.intermediate_size as i64);
        let decoder = Decoder::load(root, spec, c.num_hidden_layers, rotary, info, |_, lv| {
            let moe = MoeBlock::load(&lv.pp("block_sparse_moe"), e, h, i, EXPERT_NAMES, c.mixing())?;
            Ok((GqaAttention::load(&lv.pp("self_attn"), shape, true)?, Ffn::Moe(moe)))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    fn x8x7b() -> Config {
        serde_json::from_str(include_str!("../configs/mixtral_8x7b.json")).expect("8x7B config")
    }

    #[test]
    fn mixtral_8x7b_config_validates_with_gqa_4_to_1_and_no_window() {
        let c = x8x7b();
        c.validate().expect("valid");
        assert_eq!((c.num_attention_heads / c.kv_heads(), c.head_dim(), c.sliding_window), (4, 128, None));
        assert_eq!(c.rope().expect("rope").theta, 1e6);
    }

    #[test]
    fn native_and_always_renormalise_never_keeps_raw_probabilities() {
        let m = x8x7b().mixing();
        assert_eq!(m.native, Mixing { renormalize: true, scale: 1.0 });
        assert_eq!(m.always, m.native);
        assert_eq!(m.never, Mixing { renormalize: false, scale: 1.0 });
    }

    #[test]
    fn null_kv_heads_mean_multi_head_and_bad_values_name_their_key() {
        let mut c = x8x7b();
        c.num_key_value_heads = None;
        assert_eq!(c.kv_heads(), 32);
        c.num_key_value_heads = Some(5);
        assert!(c.validate().expect_err("5 !| 32").to_string().contains("num_key_value_heads"));
        let mut c = x8x7b();
        c.sliding_window = Some(0);
        assert!(c.validate().expect_err("window 0").to_string().contains("sliding_window"));
        let mut c = x8x7b();
        c.num_experts_per_tok = 9;
        assert!(c.validate().expect_err("k > e").to_string().contains("num_experts_per_tok"));
    }

    #[test]
    fn missing_rope_keys_fall_back_to_mixtral_default_theta() {
        let mut c = x8x7b();
        c.rope_theta = None;
        assert_eq!(c.rope().expect("rope").theta, DEFAULT_ROPE_THETA);
    }
}
