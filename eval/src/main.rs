//! `eval`: the alloc-moe command line. One module per subcommand under `cmd/`.

use clap::{Parser, Subcommand};

mod cmd;
mod device;
mod lexi;
mod methods;
mod plot;
mod profiling;
mod provenance;
mod results;
mod scorer;
mod spec;
mod stack;
mod tasks;
mod timing;

/// Budget-aware expert activation for Mixture-of-Experts inference (Alloc-MoE).
#[derive(Parser, Debug)]
#[command(name = "eval", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Choose a top-k per MoE layer from a sensitivity profile under an activation budget (Alloc-L).
    Solve(cmd::solve::Args),
    /// Regenerate figures from a results directory (reads files only; no model needed).
    Plot(cmd::plot::Args),
    /// Choose experts for one layer's router probabilities with a token-level policy (Alloc-T, top-k, ...).
    Route(cmd::route::Args),
    /// The main job: methods x budgets x tasks, with results, figures and a summary table.
    Sweep(cmd::sweep::Args),
    /// Measure a checkpoint's per-layer sensitivity profile (Alloc-L's input) on calibration text.
    Profile(cmd::profile::Args),
    /// Write a checkpoint's logits and per-layer router ids for given token ids (safetensors).
    Logits(cmd::logits::Args),
    /// Greedy generation with the KV cache, for a human check of a checkpoint.
    Generate(cmd::generate::Args),
    /// Prefill and decode speed at several budgets, side by side (a checkpoint, or random weights at a
    /// config's shapes); CUDA-graph decode on CUDA.
    #[command(alias = "speed")]
    Bench(cmd::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Solve(args) => cmd::solve::run(args),
        Command::Plot(args) => cmd::plot::run(args),
        Command::Route(args) => cmd::route::run(args),
        Command::Sweep(args) => cmd::sweep::run(args),
        Command::Profile(args) => cmd::profile::run(args),
        Command::Logits(args) => cmd::logits::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
