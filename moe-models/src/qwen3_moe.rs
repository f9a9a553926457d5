//! Qwen3-MoE (`model_type: qwen3_moe`), e.g. Qwen3-30B-A3B.
//!
//! Mirrors transformers 5.17.0 `models/qwen3_moe/modeling_qwen3_moe.py` (eager attention), built from the
//! shared layers: [`GqaAttention`] without biases, with per-head QK-norm ([`QkNormScope::Head`]: `q_norm`
//! and `k_norm` of width `head_dim`, applied to each head after the split, before RoPE); an explicit
//! `head_dim` (128 in the released checkpoints, so `heads * head_dim` need not equal `hidden_size`);
//! half-split (NeoX `rotate_half`) RoPE over the whole head, scale `head_dim^-0.5`; when
//! `use_sliding_window` and `sliding_window` are set, *every* layer attends within the window (transformers'
//! `create_sliding_window_causal_mask`; `max_window_layers` is not read by transformers 5). Layer `i` is MoE
//! iff `i` is not in `mlp_only_layers`, `num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`; other
//! layers run a dense SwiGLU of width `intermediate_size`. No shared expert.
//!
//! Routing: f32 softmax over `num_experts`; the policy picks ids (stock: top-`num_experts_per_tok`);
//! mixing weight = chosen probability, divided by the chosen sum iff `norm_topk_prob` (native; true in
//! Qwen3-30B-A3B, so there reducing k also rescales the survivors to sum 1).
//!
//! Weight names (`model.layers.{i}.` prefix inside a layer):
//! | checkpoint | field |
//! |---|---|
//! | `model.embed_tokens.weight` `(v, h)` | `Decoder::embed_tokens` |
//! | `input_layernorm.weight`, `post_attention_layernorm.weight` | `DecoderLayer::{input_layernorm, post_attention_layernorm}` |
//! | `self_attn.{q,k,v,o}_proj.weight` | `GqaAttention::{q,k,v,o}_proj` |
//! | `self_attn.{q,k}_norm.weight` `(head_dim)` | `GqaAttention::qk_norm` |
//! | `mlp.{gate,up,down}_proj.weight` (dense layers) | `Ffn::Dense` |
//! | `mlp.gate.weight` `(e, h)` | `MoeBlock::gate` (f32) |
//! | `mlp.experts.{j}.{gate,up,down}_proj.weight` (or fused `mlp.experts.{gate_up,down}_proj`) | `Experts::{gate_up_proj, down_proj}` |
//! | `model.norm.weight`, `lm_head.weight` | `Decoder::{norm, lm_head}` |

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::attention::{check_head_split, GqaAttention, GqaShape};
use crate::layers::decoder::{family_info, CommonConfig, Decoder, Ffn, Loaded, StackSpec};
use crate::layers::mlp::Mlp;
use crate::layers::moe::{check_top_k, is_sparse_layer, MixingTable, MoeBlock, SWIGLU_NAMES};
use crate::layers::qk_norm::QkNormScope;
use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
use crate::loader::VarBuilder;

/// config.json of a Qwen3-MoE checkpoint, key by key in the hub file's sorted order, with transformers
/// 5.17.0's `Qwen3MoeConfig` defaults (the [`Default`] impl). Keys that do not change inference
/// (`initializer_range`, `use_cache`, `attention_dropout`, `output_router_logits`, `router_aux_loss_coef`,
/// and the hub's `max_window_layers`, which transformers 5 does not read) are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Biases on q/k/v *and* o (rejected: no released Qwen3-MoE has them).
    pub attention_bias: bool,
    /// Every `decoder_sparse_step`-th layer is MoE (see [`Config::is_moe_layer`]).
    pub decoder_sparse_step: usize,
    /// Per-head width; not in transformers' class, but read by `getattr(config, "head_dim", ...)`. The
    /// released checkpoints set it (128 with hidden 2048 and 32 heads); null means hidden / heads.
    pub head_dim: Option<usize>,
    /// Residual width.
    pub hidden_size: usize,
    /// Width of the dense layers (`mlp_only_layers`, or off the `decoder_sparse_step`).
    pub intermediate_size: usize,
    /// Longest context the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Layers that are dense whatever the step; null means none.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Each routed expert's width.
    pub moe_intermediate_size: usize,
    /// Whether the chosen experts' weights are renormalised to sum 1 (true in Qwen3-30B-A3B).
    pub norm_topk_prob: bool,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Routed experts per MoE layer (`num_local_experts` is transformers' alias); 0 makes every layer dense.
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    /// Experts per token (top-k).
    pub num_experts_per_tok: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Key/value heads (divides `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon of every norm, QK-norms included.
    pub rms_norm_eps: f64,
    /// Attention window of every layer, when `use_sliding_window`.
    pub sliding_window: Option<usize>,
    /// Whether `sliding_window` applies.
    pub use_sliding_window: bool,
    /// Vocabulary size (embedding and LM-head rows).
    pub vocab_size: usize,
    /// `model_type`, `hidden_act`, `tie_word_embeddings`, the rope keys (`rope_theta`, default 10000),
    /// `quantization_config`, special tokens.
    #[serde(flatten)]
    pub common: CommonConfig,
}

impl Config {
    /// Check what we implement; every rejection names the key.
    pub fn validate(&self) -> Result<()> {
        self.common.validate("qwen3_moe")?;
        if self.num_experts > 0 {
            check_top_k("num_experts_per_tok", self.num_experts_per_tok, self.num_experts)?;
        }
        if self.decoder_sparse_step == 0 {
            return Err(Error::config("decoder_sparse_step", "must be at least 1"));
        }
        if self.attention_bias {
            return Err(Error::config("attention_bias", "q/k/v/o biases are not implemented (no released Qwen3-MoE has them)"));
        }
        if self.use_sliding_window && self.sliding_window == Some(0) {
            return Err(Error::config("sliding_window", "0 would mask every key; use null for no window"));
        }
        check_head_split(self.head_dim, self.hidden_size, self.num_attention_heads)?;
        self.attention().validate()?;
        self.rope().map(drop)
    }

    /// Mixing weights per renormalisation option: native renormalises iff `norm_topk_prob` (true in
    /// Qwen3-30B-A3B); `never` keeps the raw probabilities.
    pub fn mixing(&self) -> MixingTable {
        MixingTable::new(self.norm_topk_prob, 1.0)
    }

    /// The resolved rope settings (base 10000 when config.json names none).
    pub fn rope(&self) -> Result<RopeSpec> {
        self.common.rope(10000.0, self.max_position_embeddings)
    }

    /// Whether layer `i` is MoE (transformers' rule, shared with Qwen2-MoE).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        is_sparse_layer(i, self.mlp_only_layers.as_deref().unwrap_or_default(), self.num_experts, self.decoder_sparse_step)
    }

    /// The attention window of every layer: `sliding_window` iff `use_sliding_window` (transformers'
    /// `__post_init__` drops it otherwise).
    pub fn window(&self) -> Option<usize> {
        self.sliding_window.filter(|&w| self.use_sliding_window && w > 0)
    }

    /// The attention's sizes: no biases; `head_dim`, else `hidden_size / num_attention_heads`.
    pub fn attention(&self) -> GqaShape {
        GqaShape::from_config(self.hidden_size, self.num_attention_heads, Some(self.num_key_value_heads), self.head_dim, false)
    }
}

impl Default for Config {
    /// `Qwen3MoeConfig()` (hidden 2048, 24 layers, 128 experts top-8, no explicit head_dim).
    fn default() -> Self {
        Self {
            attention_bias: false,
            decoder_sparse_step: 1,
            head_dim: None,
            hidden_size: 2048,
            intermediate_size: 6144,
            max_position_embeddings: 32768,
            mlp_only_layers: None,
            moe_intermediate_size: 768,
            norm_topk_prob: false,
            num_attention_heads: 32,
            num_experts: 128,
            num_experts_per_tok: 8,
            num_hidden_layers: 24,
            num_key_value_heads: 4,
            rms_norm_eps: 1e-6,
            sliding_window: Some(4096),
            use_sliding_window: false,
            vocab_size: 151936,
            common: CommonConfig::default(),
        }
    }
}

/// A loaded Qwen3-MoE model.
pub type Model = Loaded<Config, GqaAttention>;

impl Model {
    /// Build from a parsed config and a var-builder at the checkpoint root; every checkpoint tensor
    /// must be consumed.
    pub fn load(config: Config, root: &VarBuilder<'_>) -> Result<Self> {
        config.validate()?;
        let (c, shape) = (&config, config.attention());
        let info = family_info(&c.common, "qwen3_moe", c.num_experts_per_tok, 0, shape.kv_values_per_token(), c.max_position_embeddings);
        let rotary = Rotary::new(&c.rope()?, shape.head_dim as usize, RopeStyle::HalfSplit, root.device())?;
        let (h, window) = (shape.hidden, c.window());
        let stack = StackSpec::new(c.vocab_size, c.hidden_size, c.rms_norm_eps, &c.common).sliding(window);
        let decoder = Decoder::load(root, stack, c.num_hidden_layers, rotary, info, |i, lv| {
            let (av, mv) = (lv.pp("self_attn"), lv.pp("mlp"));
            let attn = GqaAttention::load(&av, shape, window.is_some())?.with_qk_norm(&av, QkNormScope::Head, c.rms_norm_eps, None)?;
            let mlp = if c.is_moe_layer(i) {
                Ffn::Moe(MoeBlock::load(&mv, c.num_experts as i64, h, c.moe_intermediate_size as i64, SWIGLU_NAMES, c.mixing())?)
            } else {
                Ffn::Dense(Mlp::load(&mv, h, c.intermediate_size as i64)?)
            };
            Ok((attn, mlp))
        })?;
        Ok(Self { config, decoder })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::moe::Mixing;

    /// Qwen3-30B-A3B's hub config.json (the shapes of the H200 speed run).
    fn a3b() -> Config {
        let c: Config = serde_json::from_str(include_str!("../configs/qwen3_moe_30b_a3b.json")).expect("A3B config");
        assert_eq!(c.common.model_type.as_deref(), Some("qwen3_moe"));
        c
    }

    #[test]
    fn a3b_config_validates_with_48_moe_layers_of_128_experts_top_8_renormalised() {
        let c = a3b();
        c.validate().expect("valid");
        assert!((0..48).all(|i| c.is_moe_layer(i)));
        let a = c.attention();
        assert_eq!((c.num_experts, c.num_experts_per_tok, a.head_dim, a.kv_heads), (128, 8, 128, 4));
        assert_eq!((a.heads * a.head_dim, a.hidden), (4096, 2048), "explicit head_dim: q is wider than the hidden state");
        assert_eq!(a.kv_values_per_token(), 1024);
        assert_eq!(c.window(), None);
        assert_eq!(c.mixing().native, Mixing { renormalize: true, scale: 1.0 });
        assert_eq!(c.rope().expect("rope").theta, 1e6);
    }

    #[test]
    fn dense_layers_follow_mlp_only_layers_and_decoder_sparse_step() {
        // (decoder_sparse_step, mlp_only_layers, MoE layers among the first 6)
        for (step, dense, moe) in [(1, vec![], vec![0, 1, 2, 3, 4, 5]), (2, vec![3], vec![1, 5]), (3, vec![0, 2], vec![5])] {
            let c = Config { decoder_sparse_step: step, mlp_only_layers: Some(dense), ..a3b() };
            assert_eq!((0..6).filter(|&i| c.is_moe_layer(i)).collect::<Vec<_>>(), moe, "step {step}");
        }
        let c = Config { num_experts: 0, ..a3b() };
        assert!(!(0..6).any(|i| c.is_moe_layer(i)), "no experts: every layer dense");
    }

    #[test]
    fn bad_values_are_rejected_naming_their_key() {
        let mut c = a3b();
        c.decoder_sparse_step = 0;
        assert!(c.validate().expect_err("step 0").to_string().contains("decoder_sparse_step"));
        let mut c = a3b();
        c.attention_bias = true;
        assert!(c.validate().expect_err("bias").to_string().contains("attention_bias"));
        let mut c = a3b();
        c.head_dim = Some(127);
        assert!(c.validate().expect_err("odd head_dim").to_string().contains("head_dim"));
        let mut c = a3b();
        c.head_dim = None;
        c.hidden_size = 2050;
        assert!(c.validate().expect_err("no even split").to_string().contains("hidden_size"));
        let mut c = a3b();
        (c.use_sliding_window, c.sliding_window) = (true, Some(0));
        assert!(c.validate().expect_err("window 0").to_string().contains("sliding_window"));
    }

    #[test]
    fn sliding_window_needs_use_sliding_window() {
        let mut c = a3b();
        c.sliding_window = Some(8);
        assert_eq!(c.window(), None);
        c.use_sliding_window = true;
        assert_eq!(c.window(), Some(8));
    }
}
