//! Greedy decoding with the whole decode step (every layer, the LM head and the argmax) captured once in
//! a CUDA graph and replayed per token, so a token costs one launch instead of thousands.
//!
//! The prompt is prefilled eagerly into a preallocated [`KvCache`]; then one step is warmed up, the cache
//! is rewound, and the step is captured. Each replay reads the token in [`GraphDecoder::tokens`],
//! appends to the cache in place, and writes the greedy next token back into the same buffer: no host
//! synchronisation and no host work per token. The routing policy, mixing rule and dispatch are fixed at
//! capture (a per-layer Alloc-L allocation included); the policy must not synchronise with the host
//! (alloc-token's device policies do not).
//!
//! ```no_run
//! # fn main() -> moe_models::Result<()> {
//! use alloc_token::device::DeviceTopK;
//! use moe_models::{ForwardCtx, GraphDecoder};
//! use tch::{Device, Kind, Tensor};
//! let model = moe_models::load("ckpt".as_ref(), Device::Cuda(0), Kind::BFloat16)?;
//! let policy = DeviceTopK { k: 3 };
//! let prompt = Tensor::from_slice2(&[[1i64, 2, 3]]).to_device(Device::Cuda(0));
//! let mut dec = GraphDecoder::new(&model, &prompt, 64, &mut ForwardCtx::new(&policy))?;
//! let mut out = vec![dec.tokens().copy()];
//! for _ in 0..10 {
//!     dec.step()?;                     // asynchronous
//!     out.push(dec.tokens().copy());   // (b, 1) on the device
//! }
//! # Ok(()) }
//! ```

use cuda_graph::CudaGraph;
use tch::Tensor;

use crate::cache::KvCache;
use crate::ctx::ForwardCtx;
use crate::error::{Error, Result, TorchContext};
use crate::model::Model;

/// A batch of sequences decoding greedily through a captured CUDA graph.
#[derive(Debug)]
pub struct GraphDecoder<'m> {
    model: &'m Model,
    cache: KvCache,
    graph: CudaGraph,
    /// `(b, 1)` i64: the token each sequence feeds next; every replay overwrites it with the next one.
    tokens: Tensor,
}

/// One greedy step: feed `tokens`, append to `cache`, write the argmax back into `tokens`.
fn greedy_step(model: &Model, template: &ForwardCtx<'_>, cache: &mut KvCache, tokens: &mut Tensor) -> Result<()> {
    let mut ctx = template.settings().with_cache(cache);
    let h = model.forward_hidden(tokens, &mut ctx)?; // (b, 1, h)
    let next = greedy(&model.lm_head(&h)?)?; // (b, 1)
    tokens.f_copy_(&next).ctx("decode: next token")?;
    Ok(())
}

/// `logits.argmax(-1)`: one run-time compiled kernel on CUDA bf16 (libtorch's took 29 us of a ~3 ms
/// step on an H200), libtorch elsewhere.
fn greedy(logits: &Tensor) -> Result<Tensor> {
    match crate::kernels::argmax(logits)? {
        Some(ids) => Ok(ids),
        None => Ok(logits.f_argmax(-1, false)?),
    }
}

impl<'m> GraphDecoder<'m> {
    /// Prefill `prompt` `(b, t)` (with `ctx.mask` as its padding mask, if any) into a preallocated cache
    /// of `capacity` slots per sequence, take the greedy first token, and capture one decode step with
    /// `ctx`'s policy, mixing rule, dispatch and MLA path. The model must be on a CUDA device; `ctx`'s
    /// cache is ignored and a trace is refused (a replayed graph would overwrite it).
    pub fn new(model: &'m Model, prompt: &Tensor, capacity: usize, ctx: &mut ForwardCtx<'_>) -> Result<Self> {
        let device = model.info().device;
        if ctx.trace.is_some() {
            return Err(Error::Input("a routing trace cannot be recorded by a CUDA graph decode".into()));
        }
        let t = prompt.size().last().copied().unwrap_or(0) as usize;
        if t + 1 > capacity {
            return Err(Error::Input(format!("capacity {capacity} leaves no room to decode after a {t}-token prompt")));
        }
        let mut graph = CudaGraph::new(device)?;
        let mut cache = KvCache::with_capacity(capacity);
        let mut tokens = {
            let mut pre = ctx.settings().with_cache(&mut cache);
            if let Some(mask) = ctx.mask {
                pre = pre.with_mask(mask);
            }
            let h = model.forward_hidden(&prompt.f_to_device(device)?, &mut pre)?;
            let last = h.f_narrow(1, h.size()[1] - 1, 1)?;
            greedy(&model.lm_head(&last)?)? // (b, 1)
        };
        let template = ctx.settings();
        // Warm up on the graph's stream (lazy libtorch/cuBLAS set-up must not happen inside capture),
        // then rewind the cache and the token so the captured step starts from the prefilled state.
        let mark = cache.mark()?;
        let first = tokens.f_detach_copy()?;
        for _ in 0..2 {
            graph.warm_up(|| greedy_step(model, &template, &mut cache, &mut tokens))??;
        }
        cache.restore(&mark)?;
        tokens.f_copy_(&first)?;
        graph.capture(|| greedy_step(model, &template, &mut cache, &mut tokens))??;
        // Capture ran the host side of the step (the cache counted one step) but no kernel.
        cache.restore(&mark)?;
        Ok(Self { model, cache, graph, tokens })
    }

    /// Decode one token for every sequence (asynchronous: returns once the graph is launched). Fails
    /// when the cache is full.
    pub fn step(&mut self) -> Result<()> {
        if let Some(cap) = self.cache.capacity() {
            if self.cache.len() + 1 > cap {
                return Err(Error::Input(format!("the decode cache is full ({cap} slots)")));
            }
        }
        self.graph.replay()?;
        self.cache.advance_host(1);
        Ok(())
    }

    /// `(b, 1)` i64 on the device: the newest token of each sequence (the prompt's greedy continuation
    /// before the first [`GraphDecoder::step`]). Copy it to keep it: the next step overwrites it.
    pub fn tokens(&self) -> &Tensor {
        &self.tokens
    }

    /// Tokens held by the cache per sequence (prompt included).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached (never true after [`GraphDecoder::new`]).
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The model being decoded.
    pub fn model(&self) -> &Model {
        self.model
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Dispatch;
    use alloc_token::device::DeviceTopK;
    use tch::{Device, Kind};

    /// Eager greedy decode with a growing cache: `steps` tokens after the prompt's own greedy token.
    fn eager(model: &Model, prompt: &Tensor, steps: usize, dispatch: Dispatch) -> Vec<i64> {
        eager_in(model, prompt, steps, dispatch, KvCache::new())
    }

    /// [`eager`] in the given (empty) cache: a preallocated one takes the same kernels as a graph decode.
    fn eager_in(model: &Model, prompt: &Tensor, steps: usize, dispatch: Dispatch, mut cache: KvCache) -> Vec<i64> {
        let policy = DeviceTopK { k: model.info().native_k };
        let mut ctx = ForwardCtx::new(&policy).with_cache(&mut cache).with_dispatch(dispatch);
        let h = model.forward_hidden(prompt, &mut ctx).expect("prefill");
        let mut ids = model.lm_head(&h.narrow(1, h.size()[1] - 1, 1)).expect("head").argmax(-1, false);
        let mut out = vec![ids.int64_value(&[0, 0])];
        for _ in 0..steps {
            let h = model.forward_hidden(&ids, &mut ctx).expect("step");
            ids = model.lm_head(&h).expect("head").argmax(-1, false);
            out.push(ids.int64_value(&[0, 0]));
        }
        out
    }

    /// The ids of a `(b, 1)` step, sequence by sequence.
    fn row_ids(ids: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(ids.reshape([-1]).to_device(Device::Cpu)).expect("ids")
    }

    /// A committed tiny checkpoint, from the crate (a local run) or from the repository root (a test binary
    /// carried to a GPU).
    fn tiny(name: &str) -> std::path::PathBuf {
        [std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(name), std::path::Path::new("models").join(name)]
            .into_iter()
            .find(|d| d.exists())
            .unwrap_or_else(|| panic!("models/{name}"))
    }

    /// Eight greedy decode steps after `prompt` (8 tokens) with the norms, residuals and attention folded
    /// into the decode kernels (`fuse_decode`) and without (libtorch ops), both fed the same tokens, in
    /// preallocated caches: every step's logits within 10% of the largest libtorch logit (see
    /// `fused_norms_and_residuals_match_libtorch_ops_on_the_gpu` for the bound).
    fn fused_steps_match_plain(model: &Model, name: &str, prompt: &Tensor) {
        let policy = DeviceTopK { k: model.info().native_k };
        let (mut fused_cache, mut plain_cache) = (KvCache::with_capacity(32), KvCache::with_capacity(32));
        let mut fused = ForwardCtx::new(&policy).with_cache(&mut fused_cache);
        let mut plain = ForwardCtx::new(&policy).with_cache(&mut plain_cache).with_fuse_decode(false);
        let _ = model.forward_hidden(prompt, &mut fused).expect("prefill");
        let h = model.forward_hidden(prompt, &mut plain).expect("prefill");
        let mut ids = model.lm_head(&h.narrow(1, 7, 1)).expect("head").argmax(-1, false);
        let mut worst = 0f64;
        for step in 0..8 {
            let got = model.lm_head(&model.forward_hidden(&ids, &mut fused).expect("fused")).expect("head").to_kind(Kind::Float);
            let want = model.lm_head(&model.forward_hidden(&ids, &mut plain).expect("plain")).expect("head").to_kind(Kind::Float);
            let err = (&got - &want).abs().max().double_value(&[]);
            let mag = want.abs().max().double_value(&[]);
            worst = worst.max(err / mag);
            assert!(err <= 0.1 * mag, "{name} step {step}: max |fused - libtorch| = {err} of {mag}");
            ids = want.argmax(-1, false);
        }
        eprintln!("{name}: worst max |fused - libtorch| / max |libtorch| over 8 steps = {worst:.2e}");
    }

    /// On a GPU: decode steps with the norms and residual adds folded into the kernels (projections,
    /// fused MoE) give the logits of the same steps with them as libtorch ops, for the three committed
    /// tiny checkpoints in bf16 (both runs fed the same tokens). The two round differently (once instead
    /// of twice), and over six random layers a near-tie in the routing can flip an expert, so the bound
    /// is 10% of the largest logit; a wrong norm, residual or projection is off by about 100%. The
    /// kernels' own tests bound each of them at bf16 rounding.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_norms_and_residuals_match_libtorch_ops_on_the_gpu() {
        let dev = Device::Cuda(0);
        for name in ["deepseek-v2-tiny", "qwen2-moe-tiny", "mixtral-tiny"] {
            let model = crate::load(&tiny(name), dev, Kind::BFloat16).expect("load");
            let prompt = Tensor::from_slice2(&[[5i64, 17, 300, 42, 7, 99, 1000, 3]]).to_device(dev);
            fused_steps_match_plain(&model, name, &prompt);
        }
    }

    /// On a GPU: the grouped-query decode kernels (`kernels::gqa_decode`, which need 128-wide heads: the
    /// committed tiny checkpoints' are 48 wide) inside whole decode steps give the logits of the libtorch
    /// path, and the captured graph decodes the same tokens as the same steps run eagerly: models with
    /// random weights and 128-wide heads, Mixtral-shaped (two query heads per key/value head),
    /// OLMoE-shaped (multi-head, the QK-norm over the whole projection inside the kernels) and
    /// Qwen3-MoE-shaped (two query heads per key/value head, the QK-norm per head inside the kernels).
    /// Bound as in `fused_norms_and_residuals_match_libtorch_ops_on_the_gpu`.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn gqa_decode_steps_match_libtorch_and_the_graph_on_the_gpu() {
        let dev = Device::Cuda(0);
        let common = serde_json::json!({
            "hidden_size": 256, "num_hidden_layers": 2, "num_experts_per_tok": 2, "vocab_size": 512,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "eos_token_id": 0,
            "bos_token_id": 0, "tie_word_embeddings": false
        });
        let shapes = [
            ("mixtral", serde_json::json!({"intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "num_local_experts": 4})),
            ("olmoe", serde_json::json!({"intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": 4,
                "clip_qkv": null, "norm_topk_prob": false})),
            ("qwen3_moe", serde_json::json!({"intermediate_size": 256, "moe_intermediate_size": 128, "head_dim": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "num_experts": 4, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true})),
        ];
        for (family, extra) in shapes {
            let mut config = common.clone();
            config["model_type"] = family.into();
            config.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            let dir = std::env::temp_dir().join(format!("alloc-moe-gqa-{family}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
            let model = crate::load_random(&dir.join("config.json"), dev, Kind::BFloat16, 0.05, 7).expect("random model");
            let _ = std::fs::remove_dir_all(&dir);
            let policy = DeviceTopK { k: 2 };
            let prompt = Tensor::from_slice2(&[[5i64, 17, 300, 42, 7, 99, 100, 3]]).to_device(dev);
            fused_steps_match_plain(&model, &format!("{family}-shaped, 128-wide heads"), &prompt);
            // The graph against the same kernels run eagerly (a preallocated cache, so that both take them).
            let want = eager_in(&model, &prompt, 10, Dispatch::Auto, KvCache::with_capacity(32));
            let mut ctx = ForwardCtx::new(&policy);
            let mut dec = GraphDecoder::new(&model, &prompt, 32, &mut ctx).expect("capture");
            let mut got = vec![dec.tokens().int64_value(&[0, 0])];
            for _ in 0..10 {
                dec.step().expect("step");
                got.push(dec.tokens().int64_value(&[0, 0]));
            }
            assert_eq!(got, want, "{family}");
        }
    }

    /// On a GPU: four sequences decoding together (the several-token kernels: projections and the LM head
    /// reading each row once for all four, MoE kernels reading each chosen expert once) give the logits
    /// of the libtorch path (grouped GEMMs, libtorch norms and adds) fed the same tokens, within the
    /// bound of `fused_norms_and_residuals_match_libtorch_ops_on_the_gpu`; and the captured graph decodes
    /// the same tokens, sequence by sequence, as the same kernels run eagerly. The three committed tiny
    /// checkpoints in bf16.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn several_sequences_decode_match_libtorch_and_the_graph_on_the_gpu() {
        let dev = Device::Cuda(0);
        for name in ["deepseek-v2-tiny", "qwen2-moe-tiny", "mixtral-tiny"] {
            let model = crate::load(&tiny(name), dev, Kind::BFloat16).expect("load");
            let prompt = Tensor::from_slice2(&[
                [5i64, 17, 300, 42, 7, 99, 1000, 3],
                [8, 1, 2, 3, 4, 5, 6, 7],
                [900, 800, 700, 600, 500, 400, 300, 200],
                [11, 22, 33, 44, 55, 66, 77, 88],
            ])
            .to_device(dev);
            let policy = DeviceTopK { k: model.info().native_k };
            // The native top-k and top-1 (one slot a token: the several-token kernels' narrowest case).
            for k in [model.info().native_k, 1] {
                let policy = DeviceTopK { k };
                let (mut fused_cache, mut plain_cache) = (KvCache::with_capacity(32), KvCache::with_capacity(32));
                let mut fused = ForwardCtx::new(&policy).with_cache(&mut fused_cache);
                let mut plain =
                    ForwardCtx::new(&policy).with_cache(&mut plain_cache).with_fuse_decode(false).with_dispatch(Dispatch::Grouped);
                let _ = model.forward_hidden(&prompt, &mut fused).expect("prefill");
                let h = model.forward_hidden(&prompt, &mut plain).expect("prefill");
                let mut ids = model.lm_head(&h.narrow(1, 7, 1)).expect("head").argmax(-1, false);
                for step in 0..6 {
                    let got = model.lm_head(&model.forward_hidden(&ids, &mut fused).expect("fused")).expect("head").to_kind(Kind::Float);
                    let want = model.lm_head(&model.forward_hidden(&ids, &mut plain).expect("plain")).expect("head").to_kind(Kind::Float);
                    let err = (&got - &want).abs().max().double_value(&[]);
                    let mag = want.abs().max().double_value(&[]);
                    eprintln!("{name}, top-{k}, 4 sequences, step {step}: max |fused - libtorch| = {err:.3e} (of {mag:.3e})");
                    assert!(err <= 0.1 * mag, "{name} top-{k} step {step}: max |fused - libtorch| = {err} of {mag}");
                    ids = want.argmax(-1, false);
                }
            }
            let mut eager_cache = KvCache::with_capacity(32);
            // The graph against the same kernels run eagerly, 8 steps of all four sequences.
            let mut eager_ctx = ForwardCtx::new(&policy).with_cache(&mut eager_cache);
            let h = model.forward_hidden(&prompt, &mut eager_ctx).expect("prefill");
            let mut ids = model.lm_head(&h.narrow(1, 7, 1)).expect("head").argmax(-1, false);
            let mut want = vec![row_ids(&ids)];
            for _ in 0..8 {
                ids = model.lm_head(&model.forward_hidden(&ids, &mut eager_ctx).expect("step")).expect("head").argmax(-1, false);
                want.push(row_ids(&ids));
            }
            let mut ctx = ForwardCtx::new(&policy);
            let mut dec = GraphDecoder::new(&model, &prompt, 32, &mut ctx).expect("capture");
            let mut got = vec![row_ids(dec.tokens())];
            for _ in 0..8 {
                dec.step().expect("step");
                got.push(row_ids(dec.tokens()));
            }
            assert_eq!(got, want, "{name}: graph vs eager, 4 sequences");
        }
    }

    /// On a GPU: `Model::generate_greedy` (through the CUDA graph when no trace is recorded) gives the ids of
    /// an eager greedy loop, for the committed DeepSeek-V2 checkpoint in bf16; with a trace it runs
    /// eagerly and records the routing.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn generate_greedy_on_the_graph_matches_the_eager_loop() {
        let model = crate::load(&tiny("deepseek-v2-tiny"), Device::Cuda(0), Kind::BFloat16).expect("load");
        let policy = DeviceTopK { k: model.info().native_k };
        let prompt = [5i64, 17, 300, 42, 7, 99, 1000, 3];
        let got = model.generate_greedy(&prompt, 10, &mut ForwardCtx::new(&policy)).expect("graph");
        let want = eager(&model, &Tensor::from_slice2(&[prompt]).to_device(Device::Cuda(0)), 9, Dispatch::Auto);
        let eos = &model.info().eos_token_ids;
        let stop = want.iter().position(|t| eos.contains(t)).map_or(want.len(), |p| p + 1);
        assert_eq!(got, want[..stop]);
        let mut trace = crate::RoutingTrace::new();
        let traced = model.generate_greedy(&prompt, 3, &mut ForwardCtx::new(&policy).with_trace(&mut trace)).expect("eager");
        assert!(!traced.is_empty() && !trace.layers.is_empty(), "the eager loop records the routing");
    }

    /// On a GPU: the captured decode replays exactly what eager decoding computes (same dispatch), for
    /// the committed DeepSeek-V2 checkpoint in bf16.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn graph_decode_matches_eager_decode_on_the_gpu() {
        let model = crate::load(&tiny("deepseek-v2-tiny"), Device::Cuda(0), Kind::BFloat16).expect("load");
        let prompt = Tensor::from_slice2(&[[5i64, 17, 300, 42, 7, 99, 1000, 3]]).to_device(Device::Cuda(0));
        for dispatch in [Dispatch::Grouped, Dispatch::Auto] {
            let want = eager(&model, &prompt, 12, dispatch);
            let policy = DeviceTopK { k: model.info().native_k };
            let mut ctx = ForwardCtx::new(&policy).with_dispatch(dispatch);
            let mut dec = GraphDecoder::new(&model, &prompt, 32, &mut ctx).expect("capture");
            let mut got = vec![dec.tokens().int64_value(&[0, 0])];
            for _ in 0..12 {
                dec.step().expect("step");
                got.push(dec.tokens().int64_value(&[0, 0]));
            }
            assert_eq!(dec.len(), 8 + 12);
            eprintln!("{dispatch:?}: eager {want:?}\n{dispatch:?}: graph {got:?}");
            assert_eq!(got, want, "{dispatch:?}");
        }
    }
}
