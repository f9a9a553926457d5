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

use crate::error::{Error, Result};
use crate::layers::attention::{GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, CommonConfig, Decoder, Ffn, Loaded, StackSpec};
use crate::layers::moe::{check_top_k, ExpertNames, MixingTable, MoeBlock};
use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
use crate::loader::VarBuilder;

/// Mixtral's expert projection names: `w1` gate, `w3` up, `w2` down.
pub const EXPERT_NAMES: ExpertNames = ExpertNames { gate: "w1", up: "w3", down: "w2" };

/// transformers' `MixtralConfig.default_theta`, used when config.json names no rope base.
pub const DEFAULT_ROPE_THETA: f64 = 1e6;

/// config.json of a Mixtral checkpoint, key by key in the hub file's sorted order, with transformers
/// 5.17.0's `MixtralConfig` defaults (the [`Default`] impl). Keys that do not change inference
/// (`router_jitter_noise`, which acts only in training, `router_aux_loss_coef`, `initializer_range`,
/// `attention_dropout`, `use_cache`) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // fields are config.json's keys; transformers documents them
pub struct Config {
    pub head_dim: Option<usize>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub num_attention_heads: usize,
    pub num_experts_per_tok: usize,
    pub num_hidden_layers: usize,
    /// null means `num_attention_heads` (transformers' `__post_init__`).
    pub num_key_value_heads: Option<usize>,
    pub num_local_experts: usize,
    pub rms_norm_eps: f64,
    pub sliding_window: Option<usize>,
    pub vocab_size: usize,
    /// `model_type`, `hidden_act`, `tie_word_embeddings`, the rope keys, `quantization_config`, special
    /// tokens (`bos_token_id` 1 and `eos_token_id` 2 when absent).
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Default for Config {
    /// `MixtralConfig()` (the Mixtral-8x7B shapes).
    fn default() -> Self {
        Self {
            head_dim: None,
            hidden_size: 4096,
            intermediate_size: 14336,
            max_position_embeddings: 4096 * 32,
            num_attention_heads: 32,
            num_experts_per_tok: 2,
            num_hidden_layers: 32,
            num_key_value_heads: Some(8),
            num_local_experts: 8,
            rms_norm_eps: 1e-5,
            sliding_window: None,
            vocab_size: 32000,
            common: CommonConfig::default(),
        }
    }
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("mixtral")?;
        if self.num_local_experts == 0 {
            return Err(Error::config("num_local_experts", "must be positive"));
        }
        check_top_k("num_experts_per_tok", self.num_experts_per_tok, self.num_local_experts)?;
        crate::layers::attention::check_head_split(self.head_dim, self.hidden_size, self.num_attention_heads)?;
        self.attention().validate()?;
        if self.sliding_window == Some(0) {
            return Err(Error::config("sliding_window", "0 would mask every key; use null for no window"));
        }
        self.rope()?;
        Ok(())
    }

    /// The resolved rope settings (base [`DEFAULT_ROPE_THETA`] when none is given).
    pub fn rope(&self) -> Result<RopeSpec> {
        self.common.rope(DEFAULT_ROPE_THETA, self.max_position_embeddings)
    }

    /// The attention's sizes (no biases).
    pub fn attention(&self) -> GqaShape {
        GqaShape {
            hidden: self.hidden_size as i64,
            heads: self.num_attention_heads as i64,
            kv_heads: self.kv_heads() as i64,
            head_dim: self.head_dim() as i64,
            qkv_bias: false,
        }
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
pub type Model = Loaded<Config, GqaAttention>;

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let rotary = Rotary::new(&config.rope()?, config.head_dim(), RopeStyle::HalfSplit, root.device())?;
        let c = &config;
        let (h, hd) = (c.hidden_size as i64, c.head_dim());
        let spec = StackSpec::new(c.vocab_size, c.hidden_size, c.rms_norm_eps, &c.common).sliding(c.sliding_window);
        let kv_values = 2 * c.kv_heads() * hd;
        let mut info = family_info(&c.common, "mixtral", c.num_experts_per_tok, 0, kv_values, c.max_position_embeddings);
        // MixtralConfig's own defaults where config.json names no special tokens.
        info.bos_token_id = info.bos_token_id.or(Some(1));
        if c.common.eos_token_id.is_none() {
            info.eos_token_ids = vec![2];
        }
        let (e, i) = (c.num_local_experts as i64, c.intermediate_size as i64);
        let decoder = Decoder::load(root, spec, c.num_hidden_layers, rotary, info, |_, lv| {
            let moe = MoeBlock::load(&lv.pp("block_sparse_moe"), e, h, i, EXPERT_NAMES, c.mixing())?;
            Ok((GqaAttention::load(&lv.pp("self_attn"), c.attention(), true)?, Ffn::Moe(moe)))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(m.native.renormalize && m.native.scale == 1.0);
        assert_eq!(m.always, m.native);
        assert!(!m.never.renormalize && m.never.scale == 1.0);
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
        c.common.rope_theta = None;
        assert_eq!(c.rope().expect("rope").theta, DEFAULT_ROPE_THETA);
    }

    /// Mixtral-8x7B's hub config.json (the shapes of the H200 speed run).
    fn x8x7b() -> Config {
        let c: Config = serde_json::from_str(include_str!("../configs/mixtral_8x7b.json")).expect("8x7B config");
        assert_eq!((c.common.bos_token_id, c.common.eos_token_ids()), (Some(1), vec![2]));
        c
    }
}
