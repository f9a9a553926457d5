//! The family-independent model handle: loading by `model_type`, shape facts, forward, LM head,
//! greedy generation.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::ctx::ForwardCtx;
use crate::error::{Error, Result, TorchContext};
use crate::{deepseek_v2, mixtral, olmoe, qwen2_moe, qwen3_moe};
use crate::loader::{read_json, Checkpoint, VarBuilder};

/// Shape facts a caller needs (budgets, sweeps, results).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// config.json's `model_type` (`deepseek_v2`, `qwen2_moe`, `mixtral`, `olmoe`, `qwen3_moe`).
    pub model_type: String,
    /// Decoder layers.
    pub num_layers: usize,
    /// Indices of the MoE layers, increasing (the layer index the policy receives).
    pub moe_layers: Vec<usize>,
    /// Routed experts per MoE layer.
    pub n_routed_experts: usize,
    /// Always-on shared experts per MoE layer (outside the budget).
    pub n_shared_experts: usize,
    /// Experts per token the model was trained with.
    pub native_k: usize,
    /// Vocabulary size (logit width).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// config.json's `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence id, if the config names one.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<i64>,
    /// KV-cache values per token per layer (DeepSeek-V2-Lite: 576, the latent; grouped-query attention:
    /// `2 * num_key_value_heads * head_dim`).
    pub kv_values_per_token_per_layer: usize,
    /// Compute dtype.
    pub kind: Kind,
    /// Device.
    pub device: Device,
    /// Bytes of every weight the model holds, as loaded (the compute dtype; routers in f32).
    pub weight_bytes: u64,
}

impl ModelInfo {
    /// Routed activations per token at native k: `native_k * moe_layers.len()` (V2-Lite: 156).
    pub fn full_budget(&self) -> usize {
        self.native_k * self.moe_layers.len()
    }
}

/// A loaded model of any supported family.
#[derive(Debug)]
pub enum Model {
    /// DeepSeek-V2 / V2-Lite.
    DeepseekV2(Box<deepseek_v2::Model>),
    /// Qwen1.5-MoE / Qwen2-MoE.
    Qwen2Moe(Box<qwen2_moe::Model>),
    /// Mixtral.
    Mixtral(Box<mixtral::Model>),
    /// OLMoE.
    Olmoe(Box<olmoe::Model>),
    /// Qwen3-MoE.
    Qwen3Moe(Box<qwen3_moe::Model>),
}

/// The part of config.json that picks the family.
#[derive(serde::Deserialize)]
struct ModelType {
    model_type: Option<String>,
}

/// The config.json keys of every family that count or size something (layers, heads, experts, widths).
const SIZE_KEYS: &[&str] = &[
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts", "num_local_experts", "num_experts_per_tok",
    "n_group", "topk_group", "first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step",
];

/// The largest value a size key of config.json (`SIZE_KEYS`) may have (2^24; real checkpoints stay far below). Larger values
/// are corrupt, and would overflow the `i64` shape arithmetic (a product of two sizes stays below 2^48)
/// or reserve memory on the config's word before any checkpoint tensor can contradict it.
pub const MAX_CONFIG_SIZE: u64 = 1 << 24;

/// Reject a size key above [`MAX_CONFIG_SIZE`], naming it (found by `fuzz/config_json`).
fn check_sizes(config: &serde_json::Value) -> Result<()> {
    for key in SIZE_KEYS {
        if let Some(v) = config.get(key).and_then(serde_json::Value::as_u64).filter(|&v| v > MAX_CONFIG_SIZE) {
            return Err(Error::Config { key: (*key).into(), msg: format!("{v} is implausibly large (the limit is {MAX_CONFIG_SIZE})") });
        }
    }
    Ok(())
}

/// Parse `config_path` as the family `model_type` names and build the model from `root`.
fn build(config_path: &Path, root: &VarBuilder<'_>) -> Result<Model> {
    check_sizes(&read_json(config_path)?)?;
    let ty: ModelType = read_json(config_path)?;
    let ty = ty.model_type.ok_or_else(|| Error::Config { key: "model_type".into(), msg: "missing".into() })?;
    Ok(match ty.as_str() {
        "deepseek_v2" => Model::DeepseekV2(Box::new(deepseek_v2::Model::load(read_json(config_path)?, root)?)),
        "qwen2_moe" => Model::Qwen2Moe(Box::new(qwen2_moe::Model::load(read_json(config_path)?, root)?)),
        "mixtral" => Model::Mixtral(Box::new(mixtral::Model::load(read_json(config_path)?, root)?)),
        "olmoe" => Model::Olmoe(Box::new(olmoe::Model::load(read_json(config_path)?, root)?)),
        "qwen3_moe" => Model::Qwen3Moe(Box::new(qwen3_moe::Model::load(read_json(config_path)?, root)?)),
        other => return Err(Error::UnsupportedModel(other.to_string())),
    })
}

/// Load the checkpoint in `dir` (config.json plus safetensors) onto `device` in `kind`, dispatching once
/// on `model_type`.
pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Model> {
    let _span = tracing::info_span!("load", dir = %dir.display()).entered();
    let ckpt = Checkpoint::open(dir)?;
    build(&dir.join("config.json"), &VarBuilder::new(&ckpt, kind, device))
}

/// Build a model with random weights from a config.json alone (norms one, other weights
/// `N(0, std^2)`, seeded): real shapes for speed measurements without a checkpoint, e.g. DeepSeek-V2-Lite,
/// Qwen1.5-MoE-A2.7B, Mixtral-8x7B, OLMoE-1B-7B or Qwen3-30B-A3B (`moe-models/configs/`) in bf16 on a GPU.
pub fn load_random(config_path: &Path, device: Device, kind: Kind, std: f64, seed: i64) -> Result<Model> {
    tch::manual_seed(seed);
    build(config_path, &VarBuilder::random(std, kind, device))
}

impl Model {
    /// Shape facts.
    pub fn info(&self) -> &ModelInfo {
        match self {
            Model::DeepseekV2(m) => &m.decoder.info,
            Model::Qwen2Moe(m) => &m.decoder.info,
            Model::Mixtral(m) => &m.decoder.info,
            Model::Olmoe(m) => &m.decoder.info,
            Model::Qwen3Moe(m) => &m.decoder.info,
        }
    }

    /// Final-norm hidden states `(b, t, h)` in the model dtype for `(b, t)` i64 ids. Uses and updates
    /// `ctx.cache` when present (the ids are then the tokens after the cached ones), calls
    /// `ctx.policy` in every MoE layer, records into `ctx.trace`.
    pub fn forward_hidden(&self, ids: &Tensor, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        match self {
            Model::DeepseekV2(m) => m.decoder.forward_hidden(ids, ctx),
            Model::Qwen2Moe(m) => m.decoder.forward_hidden(ids, ctx),
            Model::Mixtral(m) => m.decoder.forward_hidden(ids, ctx),
            Model::Olmoe(m) => m.decoder.forward_hidden(ids, ctx),
            Model::Qwen3Moe(m) => m.decoder.forward_hidden(ids, ctx),
        }
    }

    /// The weight bytes a batch-1 decode step reads at a given number of routed activations per token
    /// ([`crate::DecodeWeights`]): every weight the model holds but the token embedding table (unless
    /// the LM head shares it) and the routed experts, plus one routed expert per activation.
    pub fn decode_weights(&self) -> crate::DecodeWeights {
        let (embed, head) = match self {
            Model::DeepseekV2(m) => (&m.decoder.embed_tokens, &m.decoder.lm_head),
            Model::Qwen2Moe(m) => (&m.decoder.embed_tokens, &m.decoder.lm_head),
            Model::Mixtral(m) => (&m.decoder.embed_tokens, &m.decoder.lm_head),
            Model::Olmoe(m) => (&m.decoder.embed_tokens, &m.decoder.lm_head),
            Model::Qwen3Moe(m) => (&m.decoder.embed_tokens, &m.decoder.lm_head),
        };
        let bytes = crate::loader::tensor_bytes;
        let embed_bytes = if embed.data_ptr() == head.data_ptr() { 0 } else { bytes(embed) };
        let blocks = self.moe_blocks();
        let (mut routed, mut per_expert) = (0u64, 0u64);
        for (_, b) in &blocks {
            let all = bytes(&b.experts.gate_up_proj) + bytes(&b.experts.down_proj);
            routed += all;
            per_expert += all / b.experts.num_experts.max(1) as u64;
        }
        let fixed = self.info().weight_bytes.saturating_sub(embed_bytes + routed);
        crate::DecodeWeights { fixed, per_activation: per_expert / blocks.len().max(1) as u64 }
    }

    /// The MoE blocks with their model layer indices, in layer order (to measure or inspect one layer).
    pub fn moe_blocks(&self) -> Vec<(usize, &crate::layers::moe::MoeBlock)> {
        match self {
            Model::DeepseekV2(m) => m.decoder.moe_blocks(),
            Model::Qwen2Moe(m) => m.decoder.moe_blocks(),
            Model::Mixtral(m) => m.decoder.moe_blocks(),
            Model::Olmoe(m) => m.decoder.moe_blocks(),
            Model::Qwen3Moe(m) => m.decoder.moe_blocks(),
        }
    }

    /// Logits `(.., v)` in the model dtype for hidden states `(.., h)`. Keep the rows few (see
    /// [`crate::nll::token_nll`]): a long sequence's full-vocabulary logits are large.
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        match self {
            Model::DeepseekV2(m) => m.decoder.lm_head(hidden),
            Model::Qwen2Moe(m) => m.decoder.lm_head(hidden),
            Model::Mixtral(m) => m.decoder.lm_head(hidden),
            Model::Olmoe(m) => m.decoder.lm_head(hidden),
            Model::Qwen3Moe(m) => m.decoder.lm_head(hidden),
        }
    }

    /// Greedy decoding of one prompt with the KV cache: returns the new token ids (stops after
    /// `max_new_tokens` or at an end-of-sequence id). `ctx.cache` and `ctx.mask` are ignored; a fresh
    /// cache is used. On CUDA without a routing trace, the decode steps replay a CUDA graph
    /// ([`crate::GraphDecoder`]); otherwise every step runs eagerly (and is traced).
    pub fn generate_greedy(&self, prompt: &[i64], max_new_tokens: usize, ctx: &mut ForwardCtx<'_>) -> Result<Vec<i64>> {
        let info = self.info();
        if max_new_tokens == 0 {
            return Ok(Vec::new());
        }
        if info.device.is_cuda() && ctx.trace.is_none() {
            let ids = Tensor::f_from_slice(prompt)?.f_unsqueeze(0)?.f_to_device(info.device)?;
            let mut dec = crate::GraphDecoder::new(self, &ids, prompt.len() + max_new_tokens, &mut ctx.settings())?;
            let mut out = Vec::with_capacity(max_new_tokens);
            loop {
                let id = dec.tokens().f_int64_value(&[0, 0]).ctx("decode: next token")?;
                out.push(id);
                if out.len() == max_new_tokens || info.eos_token_ids.contains(&id) {
                    return Ok(out);
                }
                dec.step()?;
            }
        }
        let mut cache = KvCache::new();
        let settings = ctx.settings();
        let mut ctx = ForwardCtx { trace: ctx.trace.as_deref_mut(), ..settings.with_cache(&mut cache) };
        let mut out = Vec::with_capacity(max_new_tokens);
        let mut ids = Tensor::f_from_slice(prompt)?.f_unsqueeze(0)?.f_to_device(info.device)?;
        for _ in 0..max_new_tokens {
            let h = self.forward_hidden(&ids, &mut ctx)?; // (1, t, h)
            let last = h.f_narrow(1, h.size()[1] - 1, 1)?;
            let next = self.lm_head(&last)?.f_to_kind(Kind::Float)?.f_argmax(-1, false)?; // (1, 1)
            let id = next.f_int64_value(&[0, 0]).ctx("argmax")?;
            out.push(id);
            if info.eos_token_ids.contains(&id) {
                break;
            }
            ids = next;
        }
        Ok(out)
    }
}
