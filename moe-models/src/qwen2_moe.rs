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
use serde_json::Value;

use crate::error::{Error, Result};
use crate::layers::attention::{GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, with_tokens, Decoder, Ffn, StackSpec};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{MixingTable, MoeBlock, SWIGLU_NAMES};
use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
use crate::layers::Linear;
use crate::loader::VarBuilder;

fn d_vocab() -> usize { 151936 }
fn d_hidden() -> usize { 2048 }
fn d_inter() -> usize { 5632 }
fn d_layers() -> usize { 24 }
fn d_heads() -> usize { 16 }
fn d_kv_heads() -> usize { 16 }
fn d_act() -> String { "silu".into() }
fn d_maxpos() -> usize { 32768 }
fn d_eps() -> f64 { 1e-6 }
fn d_window() -> Option<usize> { Some(4096) }
fn d_window_layers() -> usize { 28 }
fn d_one() -> usize { 1 }
fn d_moe_inter() -> usize { 1408 }
fn d_shared_inter() -> usize { 5632 }
fn d_k() -> usize { 4 }
fn d_experts() -> usize { 60 }
fn d_true() -> bool { true }

/// config.json of a Qwen2-MoE checkpoint, key by key, with transformers 5.17.0's defaults. Keys that do
/// not change inference (`initializer_range`, `router_aux_loss_coef`, `output_router_logits`,
/// `attention_dropout`, `use_cache`) are ignored.
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
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: usize,
    /// Not in transformers' class, but honoured when config.json sets it (`getattr(config, "head_dim")`).
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
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "d_window")]
    pub sliding_window: Option<usize>,
    #[serde(default = "d_window_layers")]
    pub max_window_layers: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "d_one")]
    pub decoder_sparse_step: usize,
    #[serde(default = "d_moe_inter")]
    pub moe_intermediate_size: usize,
    #[serde(default = "d_shared_inter")]
    pub shared_expert_intermediate_size: usize,
    #[serde(default = "d_k")]
    pub num_experts_per_tok: usize,
    #[serde(default = "d_experts")]
    pub num_experts: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub quantization_config: Option<Value>,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<Value>,
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self.model_type.as_deref().filter(|t| *t != "qwen2_moe") {
            return Err(Error::config("model_type", format!("`{t}` is not qwen2_moe")));
        }
        if self.hidden_act != "silu" {
            return Err(Error::config("hidden_act", format!("`{}` is not implemented (silu only)", self.hidden_act)));
        }
        let (e, k) = (self.num_experts, self.num_experts_per_tok);
        if e > 0 && (k == 0 || k > e) {
            return Err(Error::config("num_experts_per_tok", format!("{k} is outside 1..={e}")));
        }
        if self.decoder_sparse_step == 0 {
            return Err(Error::config("decoder_sparse_step", "must be at least 1"));
        }
        let (n, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if kv == 0 || n % kv != 0 {
            return Err(Error::config("num_key_value_heads", format!("{kv} does not divide num_attention_heads {n}")));
        }
        if self.head_dim() % 2 == 1 {
            return Err(Error::config("head_dim", "must be even (rotary pairs)"));
        }
        if self.quantization_config.is_some() {
            return Err(Error::config("quantization_config", "quantized checkpoints are not supported"));
        }
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

    /// The resolved rope settings.
    pub fn rope(&self) -> Result<RopeSpec> {
        RopeSpec::from_config(self.rope_theta, self.rope_scaling.as_ref(), self.rope_parameters.as_ref(), self.max_position_embeddings)
    }

    /// `head_dim`, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether layer `i` is MoE (transformers' rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        let dense = self.mlp_only_layers.as_deref().unwrap_or_default();
        !dense.contains(&i) && self.num_experts > 0 && (i + 1) % self.decoder_sparse_step.max(1) == 0
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
        let (h, hd) = (c.hidden_size as i64, c.head_dim());
        let shape = GqaShape {
            hidden: h,
            heads: c.num_attention_heads as i64,
            kv_heads: c.num_key_value_heads as i64,
            head_dim: hd as i64,
            qkv_bias: c.qkv_bias,
        };
        let spec = StackSpec {
            vocab_size: c.vocab_size as i64,
            hidden_size: h,
            rms_norm_eps: c.rms_norm_eps,
            tie_word_embeddings: c.tie_word_embeddings,
            sliding_window: c.window().map(|w| w as i64),
        };
        let rotary = Rotary::new(&c.rope()?, hd, RopeStyle::HalfSplit, root.device())?;
        let n_shared = usize::from(c.num_experts > 0);
        let info = family_info("qwen2_moe", c.num_experts_per_tok, n_shared, 2 * c.num_key_value_heads * hd);
        let info = with_tokens(info, c.max_position_embeddings, c.bos_token_id, c.eos_token_id.as_ref());
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
            Ok((GqaAttention::load(&lv.pp("self_attn"), shape, c.is_sliding_layer(i))?, mlp))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    fn a2_7b() -> Config {
        serde_json::from_str(include_str!("../configs/qwen1.5_moe_a2.7b.json")).expect("A2.7B config")
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
