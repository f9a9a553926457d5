//! Qwen1.5-MoE / Qwen2-MoE (`model_type: qwen2_moe`).
//!
//! Mirrors transformers 5.17.0 `models/qwen2_moe/modeling_qwen2_moe.py` (eager attention), built from the
//! shared layers: [`GqaAttention`] with q/k/v biases (`qkv_bias`), half-split (NeoX `rotate_half`) RoPE
//! over the whole head, scale `head_dim^-0.5`, and the sliding window on the layers `layer_types` marks
//! `sliding_attention` (transformers' default: even layers below `max_window_layers`, only when
//! `use_sliding_window`). Layer `i` is MoE iff `i` is not in `mlp_only_layers`, `num_experts > 0` and
//! `(i + 1) % decoder_sparse_step == 0`; other layers run a dense SwiGLU of width `intermediate_size`.
//!
//! Routing: f32 softmax over `num_experts`; the policy picks ids (stock: top-`num_experts_per_tok`);
//! mixing weight = chosen probability, divided by the chosen sum iff `norm_topk_prob` (native).
//! Always added: the shared expert (SwiGLU of width `shared_expert_intermediate_size`) times
//! `sigmoid(shared_expert_gate(x))`, a per-token scalar.
//!
//! Weight names (`model.layers.{i}.` prefix inside a layer):
//! | checkpoint | field |
//! |---|---|
//! | `model.embed_tokens.weight` `(v, h)` | `Decoder::embed_tokens` |
//! | `input_layernorm.weight`, `post_attention_layernorm.weight` | `DecoderLayer::{input_layernorm, post_attention_layernorm}` |
//! | `self_attn.{q,k,v}_proj.{weight,bias}`, `self_attn.o_proj.weight` | `GqaAttention::{q,k,v,o}_proj` |
//! | `mlp.{gate,up,down}_proj.weight` (dense layers) | `Ffn::Dense` |
//! | `mlp.gate.weight` `(e, h)` | `MoeBlock::gate` (f32) |
//! | `mlp.experts.{j}.{gate,up,down}_proj.weight` | stacked into `Experts::{gate_up_proj, down_proj}` |
//! | `mlp.shared_expert.{gate,up,down}_proj.weight` | `MoeBlock::shared_experts` |
//! | `mlp.shared_expert_gate.weight` `(1, h)` | `MoeBlock::shared_expert_gate` |
//! | `model.norm.weight`, `lm_head.weight` | `Decoder::{norm, lm_head}` |

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::attention::{GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, CommonConfig, Decoder, Ffn, Loaded, StackSpec};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{check_top_k, is_sparse_layer, MixingTable, MoeBlock, SWIGLU_NAMES};
use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
use crate::layers::Linear;
use crate::loader::VarBuilder;

/// config.json of a Qwen2-MoE checkpoint, key by key (transformers' `Qwen2MoeConfig` order), with
/// transformers 5.17.0's defaults (the [`Default`] impl). Keys that do not change inference
/// (`initializer_range`, `router_aux_loss_coef`, `output_router_logits`, `attention_dropout`,
/// `use_cache`) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
#[allow(missing_docs)] // fields are config.json's keys; transformers documents them
pub struct Config {
    /// `model_type`, `hidden_act`, `tie_word_embeddings`, the rope keys, `quantization_config`, special tokens.
    #[serde(flatten)]
    pub common: CommonConfig,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Not in transformers' class, but honoured when config.json sets it (`getattr(config, "head_dim")`).
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub use_sliding_window: bool,
    pub sliding_window: Option<usize>,
    pub max_window_layers: usize,
    pub decoder_sparse_step: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    pub num_experts_per_tok: usize,
    pub num_experts: usize,
    pub norm_topk_prob: bool,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub qkv_bias: bool,
    pub layer_types: Option<Vec<String>>,
}

impl Default for Config {
    /// `Qwen2MoeConfig()` (the Qwen1.5-MoE-A2.7B shapes, 32k positions).
    fn default() -> Self {
        Self {
            common: CommonConfig::default(),
            vocab_size: 151936,
            hidden_size: 2048,
            intermediate_size: 5632,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_key_value_heads: 16,
            head_dim: None,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            use_sliding_window: false,
            sliding_window: Some(4096),
            max_window_layers: 28,
            decoder_sparse_step: 1,
            moe_intermediate_size: 1408,
            shared_expert_intermediate_size: 5632,
            num_experts_per_tok: 4,
            num_experts: 60,
            norm_topk_prob: false,
            mlp_only_layers: None,
            qkv_bias: true,
            layer_types: None,
        }
    }
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("qwen2_moe")?;
        if self.num_experts > 0 {
            check_top_k("num_experts_per_tok", self.num_experts_per_tok, self.num_experts)?;
        }
        if self.decoder_sparse_step == 0 {
            return Err(Error::config("decoder_sparse_step", "must be at least 1"));
        }
        crate::layers::attention::check_head_split(self.head_dim, self.hidden_size, self.num_attention_heads)?;
        self.attention().validate()?;
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return Err(Error::config("layer_types", format!("{} entries for {} layers", types.len(), self.num_hidden_layers)));
            }
            if let Some(t) = types.iter().find(|t| *t != "full_attention" && *t != "sliding_attention") {
                return Err(Error::config("layer_types", format!("`{t}` is not implemented (full_attention, sliding_attention)")));
            }
        }
        if (0..self.num_hidden_layers).any(|i| self.is_sliding_layer(i)) && self.window().is_none() {
            return Err(Error::config("use_sliding_window", "layers marked sliding_attention need use_sliding_window and a positive sliding_window"));
        }
        self.rope()?;
        Ok(())
    }

    /// The resolved rope settings (base 10000 when config.json names none).
    pub fn rope(&self) -> Result<RopeSpec> {
        self.common.rope(10000.0, self.max_position_embeddings)
    }

    /// The attention's sizes: q/k/v biases iff `qkv_bias`.
    pub fn attention(&self) -> GqaShape {
        GqaShape {
            hidden: self.hidden_size as i64,
            heads: self.num_attention_heads as i64,
            kv_heads: self.num_key_value_heads as i64,
            head_dim: self.head_dim() as i64,
            qkv_bias: self.qkv_bias,
        }
    }

    /// `head_dim`, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` is MoE (transformers' rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        is_sparse_layer(i, self.mlp_only_layers.as_deref().unwrap_or_default(), self.num_experts, self.decoder_sparse_step)
    }

    /// Whether layer `i` attends within the sliding window: `layer_types` when given, else
    /// transformers' default (`use_sliding_window`, even `i`, `i < max_window_layers`).
    pub fn is_sliding_layer(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => self.use_sliding_window && i % 2 == 0 && i < self.max_window_layers,
        }
    }

    /// The attention window: `sliding_window` when `use_sliding_window` (transformers sets it to 0,
    /// meaning none, otherwise).
    pub fn window(&self) -> Option<usize> {
        self.sliding_window.filter(|&w| self.use_sliding_window && w > 0)
    }

    /// Mixing weights per renormalisation option: native renormalises iff `norm_topk_prob`.
    pub fn mixing(&self) -> MixingTable {
        MixingTable::new(self.norm_topk_prob, 1.0)
    }
}

/// A loaded Qwen2-MoE model.
pub type Model = Loaded<Config, GqaAttention>;

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (h, hd) = (c.hidden_size as i64, c.head_dim());
        let spec = StackSpec::new(c.vocab_size, c.hidden_size, c.rms_norm_eps, &c.common).sliding(c.window());
        let rotary = Rotary::new(&c.rope()?, hd, RopeStyle::HalfSplit, root.device())?;
        let (k, n_shared) = (c.num_experts_per_tok, usize::from(c.num_experts > 0));
        let info = family_info(&c.common, "qwen2_moe", k, n_shared, 2 * c.num_key_value_heads * hd, c.max_position_embeddings);
        let (e, mi, si) = (c.num_experts as i64, c.moe_intermediate_size as i64, c.shared_expert_intermediate_size as i64);
        let decoder = Decoder::load(root, spec, c.num_hidden_layers, rotary, info, |i, lv| {
            let mv = lv.pp("mlp");
            let mlp = if c.is_moe_layer(i) {
                let mut moe = MoeBlock::load(&mv, e, h, mi, SWIGLU_NAMES, c.mixing())?;
                moe.shared_experts = Some(Mlp::load(&mv.pp("shared_expert"), h, si)?);
                moe.shared_expert_gate = Some(Linear::load(&mv.pp("shared_expert_gate"), h, 1, false)?);
                Ffn::Moe(moe)
            } else {
                Ffn::Dense(Mlp::load(&mv, h, c.intermediate_size as i64)?)
            };
            Ok((GqaAttention::load(&lv.pp("self_attn"), c.attention(), c.is_sliding_layer(i))?, mlp))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    /// Qwen1.5-MoE-A2.7B's hub config.json, the shapes of the H200 speed run.
    const A2_7B: &str = include_str!("../configs/qwen1.5_moe_a2.7b.json");

    fn a2_7b() -> Config {
        let c: Config = serde_json::from_str(A2_7B).expect("A2.7B config");
        assert_eq!(c.common.model_type.as_deref(), Some("qwen2_moe"));
        c
    }

    #[test]
    fn a2_7b_config_validates_with_24_moe_layers_of_60_experts_top_4() {
        let c = a2_7b();
        c.validate().expect("valid");
        assert!((0..24).all(|i| c.is_moe_layer(i) && !c.is_sliding_layer(i)));
        assert_eq!((c.num_experts, c.num_experts_per_tok, c.head_dim()), (60, 4, 128));
        assert_eq!(c.mixing().native, Mixing { renormalize: false, scale: 1.0 });
    }

    #[test]
    fn mlp_only_layers_and_decoder_sparse_step_pick_the_dense_layers() {
        let mut c = a2_7b();
        c.decoder_sparse_step = 2;
        c.mlp_only_layers = Some(vec![3]);
        let moe: Vec<usize> = (0..8).filter(|&i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, vec![1, 5, 7]);
    }

    #[test]
    fn default_layer_types_slide_even_layers_below_max_window_layers() {
        let mut c = a2_7b();
        c.use_sliding_window = true;
        c.max_window_layers = 4;
        let sliding: Vec<usize> = (0..8).filter(|&i| c.is_sliding_layer(i)).collect();
        assert_eq!(sliding, vec![0, 2]);
        assert_eq!(c.window(), Some(32768), "the hub config's sliding_window");
        c.use_sliding_window = false;
        assert_eq!(c.window(), None);
    }

    #[test]
    fn sliding_layer_types_without_use_sliding_window_are_rejected_naming_the_key() {
        let mut c = a2_7b();
        c.layer_types = Some((0..24).map(|i| if i == 0 { "sliding_attention" } else { "full_attention" }.into()).collect());
        let e = c.validate().expect_err("no window");
        assert!(e.to_string().contains("use_sliding_window"), "{e}");
        c.layer_types = Some(vec!["chunked_attention".into(); 24]);
        assert!(c.validate().expect_err("unknown").to_string().contains("layer_types"));
    }

    #[test]
    fn norm_topk_prob_makes_native_mixing_renormalise() {
        let mut c = a2_7b();
        c.norm_topk_prob = true;
        assert_eq!(c.mixing().native, Mixing { renormalize: true, scale: 1.0 });
        assert_eq!(c.mixing().never, Mixing { renormalize: false, scale: 1.0 });
    }
}
