//! `eval`: the alloc-moe command line. One module per subcommand under `cmd/`.

use clap::{Parser, Subcommand};

mod cmd;
mod device;
mod git_commit;
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

/// Keep freed heap memory for reuse instead of handing it back to the kernel (glibc). By default glibc
/// serves every allocation above a size threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on
/// free, and trims the heap top; a CPU forward pass allocates and frees many such tensors (a
/// `(2048, vocab)` logits chunk, `(b, heads, t, t)` attention scores), so each pass paid for zeroed fresh
/// pages in the kernel: on the default sweep about a quarter of the CPU time was system time. With a
/// 1 GiB threshold and no trimming, freed blocks are reused (the process keeps its peak heap, which it
/// reaches again on the next pass anyway).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator parameters and is called first thing in main, before any
    // other thread exists; a rejected value (return 0) leaves glibc's default, which is only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
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
