//! `eval bench --phases routing`: what a routing policy costs inside one MoE layer on a large batch, and
//! whether the layer runs without host synchronisation.
//!
//! For each policy, on the model's first MoE block and `tokens` random hidden states: the policy's
//! `select` alone (router probabilities given), the whole block (router, selection, experts, shared
//! experts), and the block captured in a CUDA graph (on CUDA). A capture fails on any host
//! synchronisation, so `captured = true` is the proof that the layer has none; the replay times are GPU
//! times without launch overhead (the selection is captured and replayed on its own too).
//! `select_share` = select / block in GPU time: Alloc-T's target is <= 5% at 8192 tokens (issue 8).

use std::time::Instant;

use alloc_token::device::{DeviceBatch, DevicePolicy};
use anyhow::{bail, Context, Result};
use moe_models::layers::moe::TokenInfo;
use moe_models::tch::{Kind, Tensor};
use moe_models::{ForwardCtx, Model};

use crate::device::{median, sync};

/// One policy's measurements.
#[derive(Debug, serde::Serialize)]
pub struct RoutingRow {
    /// The budget label.
    pub budget: String,
    /// Tokens in the batch.
    pub tokens: i64,
    /// The policy's `select` alone, eager (ms, median; includes the host's launch time).
    pub select_ms: f64,
    /// `select` replayed from a CUDA graph (ms, median: its GPU time); `None` off CUDA.
    pub select_graph_ms: Option<f64>,
    /// The whole MoE block, eager (ms, median).
    pub block_ms: f64,
    /// The block replayed from a CUDA graph (ms, median); `None` off CUDA.
    pub block_graph_ms: Option<f64>,
    /// Whether the block could be captured (no host synchronisation); `None` off CUDA.
    pub captured: Option<bool>,
    /// The selection's share of the block: `select_graph_ms / block_graph_ms` on CUDA (GPU time: in a
    /// forward pass the host launches run ahead of the GPU), `select_ms / block_ms` elsewhere.
    pub select_share: f64,
}

fn time_ms(device: moe_models::tch::Device, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    sync(device);
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let s = Instant::now();
        f()?;
        sync(device);
        times.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Measure every `(label, policy)` on the first MoE block of `model` with `tokens` tokens.
pub fn measure(model: &Model, budgets: &[(String, &dyn DevicePolicy)], tokens: i64, repeats: usize, renormalize: moe_models::Renormalize) -> Result<Vec<RoutingRow>> {
    let info = model.info();
    let device = info.device;
    let blocks = model.moe_blocks();
    let Some(&(layer, block)) = blocks.first() else { bail!("the model has no MoE layer") };
    if tokens < 1 {
        bail!("routing cost needs at least one token");
    }
    let h = info.hidden_size as i64;
    let _guard = moe_models::tch::no_grad_guard();
    // Unit-variance hidden states: the router sees probabilities of the usual spread.
    let x = Tensor::f_randn([1, tokens, h], (Kind::Float, device))?.f_to_kind(info.kind)?;
    let xf = x.f_reshape([tokens, h])?;
    let seq_ids = Tensor::f_zeros([tokens], (Kind::Int64, device))?;
    let probs = block.router_probs(&xf).context("router probabilities")?;
    let mut rows = Vec::new();
    for (label, policy) in budgets {
        let batch = DeviceBatch { probs: &probs, mask: None, seq_ids: Some(&seq_ids) };
        let select_ms = time_ms(device, repeats, || {
            policy.select(layer, &batch).map(|_| ()).map_err(|e| anyhow::anyhow!("{label}: select: {e}"))
        })?;
        let info_tokens = TokenInfo { mask: None, seq_ids: seq_ids.shallow_clone() };
        let run = || -> Result<Tensor> {
            let mut ctx = ForwardCtx::new(*policy).with_renormalize(renormalize);
            Ok(block.forward(layer, &x, &info_tokens, &mut ctx)?)
        };
        let block_ms = time_ms(device, repeats, || run().map(|_| ()))?;
        let (captured, block_graph_ms, select_graph_ms) = if device.is_cuda() && cuda_graph::compiled() {
            let select = || policy.select(layer, &batch);
            let mut sg = cuda_graph::CudaGraph::new(device)?;
            let _ = sg.warm_up(select)?.map_err(|e| anyhow::anyhow!("{label}: select: {e}"))?;
            let select_graph_ms = match sg.capture(select) {
                Ok(_) => Some(time_ms(device, repeats, || Ok(sg.replay()?))?),
                Err(e) => {
                    eprintln!("bench: {label}: select could not be captured: {e}");
                    None
                }
            };
            let mut graph = cuda_graph::CudaGraph::new(device)?;
            let _ = graph.warm_up(run)??;
            match graph.capture(run) {
                Ok(Ok(_)) => (Some(true), Some(time_ms(device, repeats, || Ok(graph.replay()?))?), select_graph_ms),
                Ok(Err(e)) => return Err(e.context(format!("{label}: MoE block during capture"))),
                Err(e) => {
                    eprintln!("bench: {label}: the MoE block could not be captured: {e}");
                    (Some(false), None, select_graph_ms)
                }
            }
        } else {
            (None, None, None)
        };
        let select_share = match (select_graph_ms, block_graph_ms) {
            (Some(s), Some(b)) => s / b,
            _ => select_ms / block_ms,
        };
        let row = RoutingRow { budget: label.clone(), tokens, select_ms, select_graph_ms, block_ms, block_graph_ms, captured, select_share };
        eprintln!("bench: routing {label}: {row:?}");
        rows.push(row);
    }
    Ok(rows)
}

/// Print the rows as a table.
pub fn print_table(layer_note: &str, rows: &[RoutingRow]) {
    println!("routing cost ({layer_note})");
    println!(
        "| {:<22} | {:>7} | {:>10} | {:>16} | {:>9} | {:>15} | {:>8} | {:>12} |",
        "budget", "tokens", "select ms", "select graph ms", "block ms", "block graph ms", "captured", "select/block"
    );
    println!("|{:-<24}|{:->9}|{:->12}|{:->18}|{:->11}|{:->17}|{:->10}|{:->14}|", "", "", "", "", "", "", "", "");
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3}"));
    for r in rows {
        println!(
            "| {:<22} | {:>7} | {:>10.3} | {:>16} | {:>9.3} | {:>15} | {:>8} | {:>11.1}% |",
            r.budget,
            r.tokens,
            r.select_ms,
            opt(r.select_graph_ms),
            r.block_ms,
            opt(r.block_graph_ms),
            r.captured.map_or("-".into(), |c| if c { "yes".into() } else { "NO".to_string() }),
            100.0 * r.select_share
        );
    }
}
