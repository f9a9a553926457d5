//! `eval solve`: a sensitivity profile and a budget in, a per-layer top-k allocation out.

use std::path::PathBuf;

use alloc_core::{Budget, SensitivityProfile};
use alloc_layer::baselines::{greedy, random, uniform};
use alloc_layer::{solve_dp, solve_ilp, KBounds, Method, Problem, Solution};
use anyhow::{bail, Context, Result};

/// Arguments of `eval solve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sensitivity profile JSON (format in the README).
    #[arg(long)]
    pub profile: PathBuf,
    /// Activation budget: an integer total (e.g. 78) or a fraction of the full budget (e.g. 0.5).
    #[arg(long)]
    pub budget: Budget,
    /// Smallest k any layer may take.
    #[arg(long)]
    pub k_min: Option<u32>,
    /// Largest k any layer may take.
    #[arg(long)]
    pub k_max: Option<u32>,
    /// Allocator: dp (exact, Alloc-L), ilp (integer program), uniform, greedy or random.
    #[arg(long, default_value = "dp")]
    pub method: Method,
    /// Seed of the random allocator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also solve with the other exact solver (DP <-> ILP) and fail on any objective mismatch.
    #[arg(long)]
    pub verify: bool,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the allocation here (`alloc_core::LayerAllocation` JSON: the file `eval bench
    /// --allocation` reads), atomically.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Run `eval solve`.
pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.profile)
        .with_context(|| format!("cannot read profile {}", args.profile.display()))?;
    let profile = SensitivityProfile::from_json(&text)
        .with_context(|| format!("profile {}", args.profile.display()))?;
    let bounds = KBounds { k_min: args.k_min, k_max: args.k_max };
    let problem = Problem::from_profile(&profile, bounds)
        .with_context(|| format!("profile {}", args.profile.display()))?;
    let budget = args.budget.resolve(profile.full_budget())?;
    let solution = solve_with(&problem, budget, args.method, args.seed)?;
    if args.verify {
        let referee = match args.method {
            Method::Ilp => Method::Dp,
            _ => Method::Ilp,
        };
        let exact = if args.method == Method::Ilp { &solution } else { &solve_with(&problem, budget, Method::Dp, 0)? };
        let other = solve_with(&problem, budget, referee, 0)?;
        let diff = (exact.predicted_delta - other.predicted_delta).abs();
        let tol = 1e-6 * (1.0 + exact.predicted_delta.abs());
        if diff > tol {
            bail!(
                "verification failed: {} objective {} but {} objective {} (difference {diff:e})",
                exact.method.as_str(),
                exact.predicted_delta,
                other.method.as_str(),
                other.predicted_delta
            );
        }
        if !args.json {
            eprintln!("verified: dp and ilp objectives agree ({:.9})", other.predicted_delta);
        }
    }
    if let Some(path) = &args.out {
        let mut text = serde_json::to_string_pretty(&solution.allocation)?;
        text.push('\n');
        crate::results::write_atomic(path, text.as_bytes())?;
        if !args.json {
            eprintln!("wrote the allocation to {}", path.display());
        }
    }
    if args.json {
        let out = serde_json::json!({
            "k_per_layer": solution.allocation.k,
            "total": solution.total(),
            "predicted_delta": solution.predicted_delta,
            "method": solution.method.as_str(),
        });
        println!("{out}");
    } else {
        println!(
            "method {}  budget {budget} (full {})  total {}  predicted delta {:.6}",
            solution.method.as_str(),
            profile.full_budget(),
            solution.total(),
            solution.predicted_delta
        );
        println!("layer  k");
        for (l, k) in solution.allocation.layers.iter().zip(&solution.allocation.k) {
            println!("{l:>5}  {k}");
        }
    }
    Ok(())
}

/// Dispatch to one allocator.
pub fn solve_with(problem: &Problem, budget: u32, method: Method, seed: u64) -> Result<Solution> {
    Ok(match method {
        Method::Dp => solve_dp(problem, budget)?,
        Method::Ilp => solve_ilp(problem, budget)?,
        Method::Uniform => uniform(problem, budget)?,
        Method::Greedy => greedy(problem, budget)?,
        Method::Random => random(problem, budget, seed)?,
    })
}
