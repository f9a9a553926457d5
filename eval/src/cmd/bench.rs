//! `eval bench` (alias `speed`): prefill and decode speed of a checkpoint, or of random weights at a
//! config's real shapes, at several budgets in one process, side by side.
//!
//! For each budget (a uniform top-k, or a per-layer Alloc-L allocation file): prefill =
//! `batch x len` random tokens, forward plus the LM head on the last position; decode = `decode_batch`
//! sequences with a `context`-token prompt, then `decode_tokens` greedy steps, the next token kept on the
//! device. On CUDA the decode step is captured once in a CUDA graph and replayed per token
//! ([`moe_models::GraphDecoder`]); `--graph off` decodes eagerly with a growing cache. Warm-up first;
//! CUDA is synchronised before every clock read; medians of `repeats`. Prints a table (speed-ups against
//! the first budget) and writes JSON with provenance when `--out` is given. For decode the table also
//! has the weight bytes a step reads at each budget ([`moe_models::DecodeWeights`]: every weight but the
//! embedding table and the unchosen experts, each chosen expert once; with several sequences the
//! distinct experts are counted from the routing of a few traced eager steps), the bandwidth the measured
//! step time implies, and the bound on the speed-up those bytes set (their ratio to the first budget's):
//! a measured speed-up short of the bound is time that does not shrink with the budget.

use std::path::PathBuf;
use std::time::Instant;

use alloc_core::LayerAllocation;
use alloc_token::device::{DevicePolicy, DeviceTopK};
use alloc_token::{AllocT, PerLayerTopK};
use anyhow::{bail, Context, Result};
use moe_models::tch::{self, Kind, Tensor};
use moe_models::{ForwardCtx, GraphDecoder, KvCache, Model};

use super::logits::RunFlags;
use crate::device::{median, sync};

/// Arguments of `eval bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model, device, dtype and mixing rule (--policy/--k are replaced by --ks/--allocation here).
    #[command(flatten)]
    pub run: RunFlags,
    /// Treat --model as a config.json and build random weights at its shapes
    /// (e.g. --model moe-models/configs/deepseek_v2_lite.json --random).
    #[arg(long)]
    pub random: bool,
    /// Uniform top-k budgets to compare, comma-separated (default: the native k and half of it).
    #[arg(long, value_delimiter = ',')]
    pub ks: Vec<usize>,
    /// Also measure a per-layer allocation (LayerAllocation JSON, e.g. from `eval solve --out`).
    #[arg(long)]
    pub allocation: Option<PathBuf>,
    /// Prefill batch size.
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    /// Prefill tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub len: i64,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub decode_batch: i64,
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
    /// Routed-expert evaluation: auto (fused kernels for a few tokens, grouped GEMMs otherwise, on CUDA
    /// bf16), grouped, fused, per-expert.
    #[arg(long, default_value = "auto")]
    pub dispatch: moe_models::Dispatch,
    /// Also measure Alloc-T at each uniform budget (`K_l` = k in every layer, floor 1, cap the native k):
    /// the same activations as top-k, redistributed across the batch's tokens.
    #[arg(long)]
    pub alloc_t: bool,
    /// What to measure, comma-separated: prefill, decode, routing (the policy's cost inside one MoE
    /// layer on `batch x len` tokens, and whether that layer captures into a CUDA graph, i.e. has no
    /// host synchronisation); `both` = prefill,decode.
    #[arg(long, default_value = "both")]
    pub phases: String,
    /// Write the rows and provenance here (JSON, atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One budget's measurements.
#[derive(Debug, serde::Serialize)]
struct Row {
    budget: String,
    /// Routed activations per token summed over MoE layers.
    activations_per_token: usize,
    prefill_ms: Option<f64>,
    prefill_tokens_per_s: Option<f64>,
    /// Milliseconds a decode step takes (one token for each of the `decode_batch` sequences).
    decode_ms_per_step: Option<f64>,
    /// `decode_ms_per_step / decode_batch`: the same at batch 1.
    decode_ms_per_token: Option<f64>,
    /// Tokens per second over all the sequences.
    decode_tokens_per_s: Option<f64>,
    /// Distinct chosen experts of a decode step, summed over the MoE layers (several sequences: the mean
    /// over a few traced steps; one sequence: the activations per token).
    decode_distinct_experts: Option<f64>,
    /// Weight bytes a decode step reads at this budget: every weight but the embedding table and the
    /// experts no sequence chose, each chosen expert once.
    decode_weight_bytes: Option<u64>,
    /// Those bytes over the measured step time, TB/s.
    decode_weight_tb_per_s: Option<f64>,
    /// The first budget's bytes over this one's: the most its decode speed-up could be.
    decode_weight_bound: Option<f64>,
}

fn prefill(model: &Model, ctx: &mut ForwardCtx<'_>, ids: &Tensor) -> Result<()> {
    let h = model.forward_hidden(ids, ctx)?;
    let _ = model.lm_head(&h.f_narrow(1, h.size()[1] - 1, 1)?)?;
    Ok(())
}

fn time_prefill(model: &Model, ctx: &mut ForwardCtx<'_>, ids: &Tensor, repeats: usize) -> Result<f64> {
    let device = model.info().device;
    prefill(model, ctx, ids)?;
    sync(device);
    let mut times = Vec::new();
    for _ in 0..repeats {
        let s = Instant::now();
        prefill(model, ctx, ids)?;
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Median ms per step of `steps`-step runs through a captured decode graph (one decoder, one capture;
/// the preallocated cache holds the prompt and every step).
pub(crate) fn decode_graph(model: &Model, ctx: &mut ForwardCtx<'_>, prompt: &Tensor, steps: usize, repeats: usize) -> Result<f64> {
    let device = model.info().device;
    let capacity = prompt.size()[1] as usize + steps * (repeats + 1) + 1;
    let mut dec = GraphDecoder::new(model, prompt, capacity, ctx)?;
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

/// Eager greedy decode of `steps` tokens after `prompt` with a growing cache.
fn decode(model: &Model, ctx: &ForwardCtx<'_>, prompt: &Tensor, steps: usize) -> Result<()> {
    let mut cache = KvCache::new();
    let mut ctx = ctx.settings().with_cache(&mut cache);
    let mut ids = prompt.shallow_clone();
    for _ in 0..steps {
        let h = model.forward_hidden(&ids, &mut ctx)?;
        let last = h.f_narrow(1, h.size()[1] - 1, 1)?;
        ids = model.lm_head(&last)?.f_argmax(-1, false)?; // (b, 1), stays on the device
    }
    Ok(())
}

/// Median ms per step of eager decoding: the prompt is prefilled untimed, then `steps` steps are timed on
/// their own (subtracting a separately timed prefill instead gave noise, even negative times, when the
/// prompt's prefill dwarfs the steps: a long context on the CPU).
fn decode_eager(model: &Model, ctx: &ForwardCtx<'_>, prompt: &Tensor, steps: usize, repeats: usize) -> Result<f64> {
    let device = model.info().device;
    decode(model, ctx, prompt, 3)?;
    sync(device);
    let mut times = Vec::new();
    for _ in 0..repeats {
        let mut cache = KvCache::new();
        let mut step_ctx = ctx.settings().with_cache(&mut cache);
        let h = model.forward_hidden(prompt, &mut step_ctx)?;
        let mut ids = model.lm_head(&h.f_narrow(1, h.size()[1] - 1, 1)?)?.f_argmax(-1, false)?;
        sync(device);
        let s = Instant::now();
        for _ in 0..steps {
            let h = model.forward_hidden(&ids, &mut step_ctx)?;
            ids = model.lm_head(&h)?.f_argmax(-1, false)?; // (b, 1), stays on the device
        }
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3 / steps as f64);
    }
    Ok(median(times))
}

/// Eager decode steps whose routing [`distinct_activations`] counts.
const DISTINCT_STEPS: usize = 4;

/// The distinct (layer, expert) pairs a decode step of `prompt`'s sequences chooses, summed over the MoE
/// layers: the mean over [`DISTINCT_STEPS`] eager steps after the prompt, their routing recorded (a
/// traced step routes through the policy's own selection). Each is an expert whose rows a step reads
/// once for all the sequences that chose it (what the several-token kernels do); at one sequence it is
/// the activations per token.
fn distinct_activations(model: &Model, ctx: &ForwardCtx<'_>, prompt: &Tensor) -> Result<f64> {
    let mut cache = KvCache::new();
    let mut trace = moe_models::RoutingTrace::new();
    let h = model.forward_hidden(prompt, &mut ctx.settings().with_cache(&mut cache))?;
    let mut ids = model.lm_head(&h.f_narrow(1, h.size()[1] - 1, 1)?)?.f_argmax(-1, false)?;
    let mut total = 0usize;
    for _ in 0..DISTINCT_STEPS {
        trace.layers.clear();
        let h = model.forward_hidden(&ids, &mut ctx.settings().with_cache(&mut cache).with_trace(&mut trace))?;
        ids = model.lm_head(&h)?.f_argmax(-1, false)?;
        for route in &trace.layers {
            let chosen = Vec::<i64>::try_from(route.ids.f_reshape([-1])?.f_to_device(tch::Device::Cpu)?)?;
            total += chosen.iter().filter(|&&e| e >= 0).collect::<std::collections::BTreeSet<_>>().len();
        }
    }
    Ok(total as f64 / DISTINCT_STEPS as f64)
}

/// One budget to measure: its label, its policy and its routed activations per token.
type Budget = (String, Box<dyn DevicePolicy>, usize);

/// The budgets to compare.
fn budgets(args: &Args, model: &Model) -> Result<Vec<Budget>> {
    let info = model.info();
    let layers = info.moe_layers.len();
    let mut ks = args.ks.clone();
    if ks.is_empty() {
        ks = vec![info.native_k, (info.native_k / 2).max(1)];
        ks.dedup();
    }
    let mut out: Vec<Budget> = Vec::new();
    for k in ks {
        if k == 0 || k > info.n_routed_experts {
            bail!("--ks: k = {k} is outside 1..={} (the layer's expert count)", info.n_routed_experts);
        }
        out.push((format!("top-{k}"), Box::new(DeviceTopK { k }), k * layers));
        if args.alloc_t {
            out.push((format!("alloc-t (K_l = {k})"), Box::new(AllocT::new(k as f64, info.native_k)), k * layers));
        }
    }
    if let Some(path) = &args.allocation {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let allocation: LayerAllocation =
            serde_json::from_str(&text).with_context(|| format!("{}: not a LayerAllocation JSON", path.display()))?;
        allocation
            .validate(&info.moe_layers, info.n_routed_experts as u32)
            .with_context(|| format!("{}: does not fit this model", path.display()))?;
        let total = allocation.total() as usize;
        out.push((format!("alloc-l ({total})"), Box::new(PerLayerTopK::new(allocation)), total));
    }
    Ok(out)
}

/// Run `eval bench`.
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
    let info = model.info().clone();
    let vocab = info.vocab_size as i64;
    let repeats = args.repeats.max(1);
    let (mut do_prefill, mut do_decode, mut do_routing) = (false, false, false);
    for p in args.phases.split(',').map(str::trim) {
        match p {
            "both" => (do_prefill, do_decode) = (true, true),
            "prefill" => do_prefill = true,
            "decode" => do_decode = true,
            "routing" => do_routing = true,
            p => bail!("--phases `{p}`: a comma-separated list of prefill, decode, routing (or both)"),
        }
    }
    let graph = match args.graph.as_str() {
        "auto" => device.is_cuda() && cuda_graph::compiled(),
        "on" => true,
        "off" => false,
        g => bail!("--graph `{g}`: auto, on or off"),
    };
    if args.batch < 1 || args.len < 1 || args.decode_batch < 1 || args.context < 1 || args.decode_tokens == 0 {
        bail!("--batch, --len, --decode-batch, --context and --decode-tokens must be at least 1");
    }
    let ids = Tensor::f_randint(vocab, [args.batch, args.len], (Kind::Int64, device))?;
    let prompt = Tensor::f_randint(vocab, [args.decode_batch, args.context], (Kind::Int64, device))?;
    let budgets = budgets(&args, &model)?;
    let weights = model.decode_weights();
    let mut first_distinct: Option<usize> = None;
    let mut rows = Vec::new();
    for (label, policy, activations) in &budgets {
        let (label, activations) = (label.clone(), *activations);
        if !(do_prefill || do_decode) {
            break;
        }
        let mut ctx = ForwardCtx::new(policy.as_ref()).with_renormalize(args.run.renormalize).with_dispatch(args.dispatch);
        let prefill_ms = if do_prefill { Some(time_prefill(&model, &mut ctx, &ids, repeats)?) } else { None };
        let decode_ms = match (do_decode, graph) {
            (false, _) => None,
            (true, true) => Some(decode_graph(&model, &mut ctx, &prompt, args.decode_tokens, repeats)?),
            (true, false) => Some(decode_eager(&model, &ctx, &prompt, args.decode_tokens, repeats)?),
        };
        eprintln!("bench: {label}: prefill {prefill_ms:?} ms, decode {decode_ms:?} ms/step");
        // Distinct experts a step reads: the activations at one sequence, counted from the routing at
        // several (where sequences share experts).
        let distinct = match (do_decode, args.decode_batch) {
            (false, _) => None,
            (true, 1) => Some(activations as f64),
            (true, _) => Some(distinct_activations(&model, &ctx, &prompt)?),
        };
        let distinct_at = distinct.map(|d| d.round() as usize);
        first_distinct = first_distinct.or(distinct_at);
        let bytes = distinct_at.map(|d| weights.at(d));
        rows.push(Row {
            budget: label,
            activations_per_token: activations,
            prefill_ms,
            prefill_tokens_per_s: prefill_ms.map(|ms| (args.batch * args.len) as f64 / (ms / 1e3)),
            decode_ms_per_step: decode_ms,
            decode_ms_per_token: decode_ms.map(|ms| ms / args.decode_batch as f64),
            decode_tokens_per_s: decode_ms.map(|ms| args.decode_batch as f64 * 1e3 / ms),
            decode_distinct_experts: distinct,
            decode_weight_bytes: bytes,
            decode_weight_tb_per_s: decode_ms.zip(bytes).map(|(ms, b)| b as f64 / (ms * 1e9)),
            decode_weight_bound: first_distinct.zip(distinct_at).map(|(f, d)| weights.bound(f, d)),
        });
    }
    if do_prefill || do_decode {
        print_table(&info.model_type, &rows);
    }
    let routing = if do_routing {
        let list: Vec<(String, &dyn DevicePolicy)> = budgets.iter().map(|(l, p, _)| (l.clone(), p.as_ref())).collect();
        let tokens = args.batch * args.len;
        let r = super::routing_cost::measure(&model, &list, tokens, repeats, args.run.renormalize)?;
        super::routing_cost::print_table(&format!("{}, first MoE layer, {tokens} tokens", info.model_type), &r);
        Some(r)
    } else {
        None
    };
    if let Some(out) = &args.out {
        let record = serde_json::json!({
            "schema_version": 1,
            "provenance": crate::provenance::Provenance::collect(),
            "model": args.run.model, "model_type": info.model_type,
            "weights": if args.random { "random" } else { "checkpoint" },
            "device": args.run.device, "dtype": args.run.dtype, "renormalize": args.run.renormalize,
            "prefill": {"batch": args.batch, "len": args.len},
            "decode": {"batch": args.decode_batch, "context": args.context, "tokens": args.decode_tokens, "cuda_graph": graph},
            "dispatch": format!("{:?}", args.dispatch),
            "repeats": repeats,
            "rows": rows,
            "routing": routing,
        });
        let mut text = serde_json::to_string_pretty(&record)?;
        text.push('\n');
        crate::results::write_atomic(out, text.as_bytes())?;
        eprintln!("bench: wrote {}", out.display());
    }
    Ok(())
}

fn print_table(model_type: &str, rows: &[Row]) {
    let base = rows.first();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    let num = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
    println!("{model_type}");
    println!(
        "| {:<18} | {:>6} | {:>10} | {:>9} | {:>14} | {:>10} | {:>9} | {:>7} | {:>6} | {:>6} |",
        "budget", "act/tok", "prefill ms", "speed-up", "decode ms/step", "decode t/s", "speed-up", "GB/step", "TB/s", "bound"
    );
    println!("|{:-<20}|{:->8}|{:->12}|{:->11}|{:->16}|{:->12}|{:->11}|{:->9}|{:->8}|{:->8}|", "", "", "", "", "", "", "", "", "", "");
    for r in rows {
        println!(
            "| {:<18} | {:>6} | {:>10} | {:>9} | {:>14} | {:>10} | {:>9} | {:>7} | {:>6} | {:>6} |",
            r.budget,
            r.activations_per_token,
            num(r.prefill_ms, 1),
            ratio(base.and_then(|b| b.prefill_ms), r.prefill_ms),
            num(r.decode_ms_per_step, 3),
            num(r.decode_tokens_per_s, 1),
            ratio(base.and_then(|b| b.decode_ms_per_step), r.decode_ms_per_step),
            num(r.decode_weight_bytes.map(|b| b as f64 / 1e9), 3),
            num(r.decode_weight_tb_per_s, 2),
            r.decode_weight_bound.map_or("-".into(), |b| format!("{b:.2}x")),
        );
    }
}
