//! Mixture-of-Experts language models on libtorch (tch), loading unmodified Hugging Face checkpoints,
//! with a routing-policy hook in every MoE layer.
//!
//! # Using a model (what the eval crate calls)
//!
//! ```no_run
//! # fn main() -> moe_models::Result<()> {
//! use alloc_token::device::DeviceTopK;
//! use moe_models::{ForwardCtx, KvCache, Renormalize, RoutingTrace};
//! use tch::{Device, Kind, Tensor};
//!
//! let model = moe_models::load("ckpt/DeepSeek-V2-Lite".as_ref(), Device::Cpu, Kind::Float)?;
//! let info = model.info(); // moe_layers, n_routed_experts, native_k, vocab_size, ...
//! let policy = DeviceTopK { k: 3 };
//!
//! // Prefill a padded batch, recording routing.
//! let ids = Tensor::from_slice2(&[[1i64, 2, 3], [4, 5, 0]]);
//! let mask = Tensor::from_slice2(&[[1i64, 1, 1], [1, 1, 0]]); // right padding (left works too)
//! let mut trace = RoutingTrace::new();
//! let mut ctx = ForwardCtx::new(&policy).with_mask(&mask).with_trace(&mut trace)
//!     .with_renormalize(Renormalize::Native);
//! let hidden = model.forward_hidden(&ids, &mut ctx)?;          // (b, t, h)
//! let logits = model.lm_head(&hidden.narrow(1, 2, 1))?;        // (b, 1, v): only the rows you need
//! let nll = moe_models::token_nll(&model, &ids, &mut ForwardCtx::new(&policy).with_mask(&mask), 1024)?;
//!
//! // Incremental decode with the (latent) KV cache.
//! let mut cache = KvCache::new();
//! let mut ctx = ForwardCtx::new(&policy).with_cache(&mut cache);
//! let h = model.forward_hidden(&Tensor::from_slice2(&[[1i64, 2, 3]]), &mut ctx)?;
//! let h = model.forward_hidden(&Tensor::from_slice2(&[[7i64]]), &mut ctx)?; // attends to 4 tokens
//! # let _ = (info, logits, nll, h); Ok(()) }
//! ```
//!
//! * [`load`] reads `config.json`, dispatches once on `model_type` and maps the safetensors (single or
//!   sharded); every checkpoint tensor must be used. [`load_tokenizer`] reads `tokenizer.json`.
//! * [`ForwardCtx`] carries the [`alloc_token::device::DevicePolicy`] (which experts), the padding mask,
//!   the [`KvCache`], the [`Renormalize`] option (how chosen probabilities become mixing weights), the
//!   [`RoutingTrace`] (f32 router probabilities and chosen ids per MoE layer), the expert [`Dispatch`]
//!   and the MLA path.
//! * Hidden states and the LM head are separate; [`token_nll`] chunks the head. [`GraphDecoder`]
//!   captures whole greedy decode steps (every layer, the head, the argmax) in a CUDA graph.
//! * [`Model::decode_weights`] ([`DecodeWeights`]): the weight bytes a batch-1 decode step reads at a
//!   given number of routed activations per token, i.e. the bound a smaller budget's speed-up has.
//! * Padding: `mask` is `(b, t)`, 1 for real tokens; left or right padding both work (positions are
//!   counted over real tokens only, padding keys are masked, padding tokens get no experts).
//!
//! # Layout
//! `loader` (checkpoint, var-builder, tokenizer), `layers` (shared blocks: norms, rotary, MLP, MoE,
//! attention incl. grouped-query and sliding window, the decoder stack), `cache`, `ctx`, one file per
//! family (`deepseek_v2`, `qwen2_moe`, `mixtral`, `olmoe`, `qwen3_moe`), `model` (the dispatching handle), `nll`,
//! `decode_weights`, `graph_decode`, `kernels` (the run-time compiled CUDA kernels). Adding a
//! family: a file like `mixtral.rs` built from `layers`, a `Model` variant and a `build` arm.

pub mod cache;
pub mod ctx;
pub mod decode_weights;
pub mod deepseek_v2;
pub mod error;
pub mod graph_decode;
pub mod kernels;
/// Fuzzing entry points (the crate's tests and the `fuzzing` feature; see `docs/fuzzing.md`).
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod layers;
pub mod loader;
pub mod mixtral;
pub mod model;
pub mod nll;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;

/// The tch (libtorch) version the models are built with, for callers without their own `tch` dependency.
pub use tch;

pub use cache::KvCache;
pub use ctx::{Dispatch, ForwardCtx, LayerRoute, MlaPath, Renormalize, RoutingTrace};
pub use decode_weights::DecodeWeights;
pub use error::{Error, Result};
pub use graph_decode::GraphDecoder;
pub use loader::load_tokenizer;
pub use model::{load, load_random, Model, ModelInfo};
pub use nll::token_nll;

#[cfg(test)]
mod tests {
    /// Proves the libtorch link works from the start: a real tensor op through tch.
    #[test]
    fn libtorch_runs_a_matmul() {
        let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        let b = a.matmul(&a);
        let v: Vec<f32> = b.reshape([-1]).try_into().expect("f32 tensor");
        assert_eq!(v, vec![7.0, 10.0, 15.0, 22.0]);
    }
}
