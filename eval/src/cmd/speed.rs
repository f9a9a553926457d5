//! `eval speed`: prefill and decode throughput of a checkpoint, or of random weights at a config's real
//! shapes (for a GPU without the checkpoint), for comparison with Hugging Face transformers.
//!
//! Prefill: `batch x len` random tokens, forward plus the LM head on the last position. Decode: one
//! sequence, a `context`-token prompt, then `decode_tokens` greedy steps with the latent KV cache; the
//! next token stays on the device (no host sync per step). Warm-up first; CUDA is synchronised before
//! every clock read; medians of `repeats`.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use moe_models::tch::{self, Kind, Tensor};
use moe_models::{ForwardCtx, KvCache, Model};

use super::logits::RunFlags;
use crate::device::{median, sync};

/// Arguments of `eval speed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model, device, dtype and policy. With --random, --model is a config.json.
    #[command(flatten)]
    pub run: RunFlags,
    /// Treat --model as a config.json and build random weights at its shapes
    /// (e.g. --model moe-models/configs/deepseek_v2_lite.json --random).
    #[arg(long)]
    pub random: bool,
    /// Prefill batch size.
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    /// Prefill tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub len: i64,
    /// Decode prompt length.
    #[arg(long, default_value_t = 32)]
    pub context: i64,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Timed repeats (median reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Capture the decode step in a CUDA graph: auto (on CUDA when compiled in), on, off.
    #[arg(long, default_value = "auto")]
    pub graph: String,
}

/// Median ms per token of `steps`-token runs through a captured decode graph (one decoder, one capture;
/// the preallocated cache holds the prompt and every timed step).
fn decode_graph(model: &Model, ctx: &mut ForwardCtx<'_>, prompt: &Tensor, steps: usize, repeats: usize) -> Result<f64> {
    let device = model.info().device;
    let capacity = prompt.size()[1] as usize + steps * (repeats + 1) + 1;
    let mut dec = moe_models::GraphDecoder::new(model, prompt, capacity, ctx)?;
    for _ in 0..steps {
        dec.step()?;
    }
    sync(device);
    let mut times = Vec::new();
    for _ in 0..repeats {
        let s = Instant::now();
        for _ in 0..steps {
            dec.step()?;
        }
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
    Ok(median(times))
}

fn prefill(model: &Model, ctx: &mut ForwardCtx<'_>, ids: &Tensor) -> Result<()> {
    let h = model.forward_hidden(ids, ctx)?;
    let _ = model.lm_head(&h.f_narrow(1, h.size()[1] - 1, 1)?)?;
    Ok(())
}

fn decode(model: &Model, policy: &dyn alloc_token::device::DevicePolicy, prompt: &Tensor, steps: usize) -> Result<()> {
    let mut cache = KvCache::new();
    let mut ctx = ForwardCtx::new(policy).with_cache(&mut cache);
    let mut ids = prompt.shallow_clone();
    for _ in 0..steps {
        let h = model.forward_hidden(&ids, &mut ctx)?;
        let last = h.f_narrow(1, h.size()[1] - 1, 1)?;
        ids = model.lm_head(&last)?.f_argmax(-1, false)?; // (1, 1), stays on the device
    }
    Ok(())
}

/// Run `eval speed`.
pub fn run(args: Args) -> Result<()> {
    let device = args.run.device()?;
    let kind = args.run.kind()?;
    let model = match args.random.then_some(&args.run.model) {
        Some(cfg) => {
            if device.is_cuda() && !tch::Cuda::is_available() {
                bail!("--device {}: CUDA is not available to this binary", args.run.device);
            }
            moe_models::load_random(cfg, device, kind, 0.02, 0).with_context(|| format!("random model from {}", cfg.display()))?
        }
        None => args.run.load()?,
    };
    let policy = args.run.policy(&model)?;
    let info = model.info().clone();
    let vocab = info.vocab_size as i64;
    let repeats = args.repeats.max(1);

    let ids = Tensor::f_randint(vocab, [args.batch, args.len], (Kind::Int64, device))?;
    let mut ctx = ForwardCtx::new(&policy).with_renormalize(args.run.renormalize);
    prefill(&model, &mut ctx, &ids)?;
    sync(device);
    let mut times = Vec::new();
    for _ in 0..repeats {
        let s = Instant::now();
        prefill(&model, &mut ctx, &ids)?;
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let prefill_ms = median(times);

    let prompt = Tensor::f_randint(vocab, [1, args.context], (Kind::Int64, device))?;
    let graph = match args.graph.as_str() {
        "auto" => device.is_cuda() && cuda_graph::compiled(),
        "on" => true,
        "off" => false,
        g => bail!("--graph `{g}`: auto, on or off"),
    };
    let decode_ms = if graph {
        decode_graph(&model, &mut ctx, &prompt, args.decode_tokens, repeats)?
    } else {
        decode_eager(&model, &policy, &prompt, args.decode_tokens, repeats)?
    };
    let record = serde_json::json!({
        "model_type": info.model_type,
        "weights": if args.random { "random" } else { "checkpoint" },
        "device": args.run.device, "dtype": args.run.dtype, "policy": args.run.policy, "k": policy.k,
        "prefill": {"batch": args.batch, "len": args.len, "ms": prefill_ms,
                    "tokens_per_s": (args.batch * args.len) as f64 / (prefill_ms / 1e3)},
        "decode": {"context": args.context, "tokens": args.decode_tokens, "ms_per_token": decode_ms,
                   "tokens_per_s": 1e3 / decode_ms, "cuda_graph": graph},
        "repeats": repeats,
    });
    println!("{record}");
    Ok(())
}

/// Median ms per token of eager decoding (a growing cache, one forward per token).
fn decode_eager(
    model: &Model,
    policy: &dyn alloc_token::device::DevicePolicy,
    prompt: &Tensor,
    steps: usize,
    repeats: usize,
) -> Result<f64> {
    let device = model.info().device;
    decode(model, policy, prompt, 3)?;
    sync(device);
    let mut times = Vec::new();
    for _ in 0..repeats {
        // The prompt's prefill is timed separately and subtracted.
        let s = Instant::now();
        decode(model, policy, prompt, 1)?;
        sync(device);
        let first = s.elapsed().as_secs_f64();
        let s = Instant::now();
        decode(model, policy, prompt, steps + 1)?;
        sync(device);
        times.push((s.elapsed().as_secs_f64() - first) * 1e3 / steps as f64);
    }
    Ok(median(times))
}
