//! One model of a sweep: load it, prepare what the methods are built from (profiles, the recorded
//! routing, Alloc-L+T's retained-mass curves), then every (task, budget, method) point in order, full
//! first (the reference of `delta_nll`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use alloc_layer::{KBounds, LayerMass, Problem};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moe_models::Renormalize;
use tch::{Device, Kind};

use super::point::{run_point, PointEnv};
use super::profiles::{lexi_profile, text_profile, Measured};
use super::task_data::TaskData;
use super::{load_tokenizer, model_name};
use crate::methods::{mass_curves, routing_key, HostRoute, Inputs, Method, ModelShape};
use crate::profiling::record_host_trace;
use crate::provenance::Provenance;
use crate::results::{PointKey, Record, ResultsFile, Status};
use crate::scorer::Scorer;
use crate::spec::{budget_label, SweepSpec};
use crate::tasks::{text, Task};

/// What every model of one sweep shares.
pub struct RunCtx<'a> {
    /// Device, dtype and mixing rule of every model (resolved from the spec once).
    pub engine: Engine,
    /// The resolved spec.
    pub spec: &'a SweepSpec,
    /// The spec as JSON (copied into every record, with the model's facts added).
    pub spec_json: &'a serde_json::Value,
    /// The results directory.
    pub out: &'a Path,
    /// Code and machine provenance.
    pub provenance: &'a Provenance,
    /// The results directory's name.
    pub run_id: &'a str,
    /// Keep failed points instead of retrying them.
    pub skip_failed: bool,
    /// Wall and CPU seconds per stage (printed at the end).
    pub timings: &'a crate::timing::Timings,
}

/// How every model of a run is loaded and mixed: the spec's `device`, `dtype` and `renormalize`, parsed.
#[derive(Debug, Clone, Copy)]
pub struct Engine {
    /// Where the models run.
    pub device: Device,
    /// Their dtype.
    pub kind: Kind,
    /// The mixing rule.
    pub renormalize: Renormalize,
}

/// How the points of a run went (printed at the end).
#[derive(Debug, Default)]
pub struct Tally {
    /// Points run and finished.
    pub ok: usize,
    /// Finished points that copied the results of an identically routed point.
    pub shared: usize,
    /// Points run that failed (recorded).
    pub failed: usize,
    /// Retried failed points that failed again with the same error (nothing new recorded).
    pub failed_again: usize,
    /// Points already finished in the results file.
    pub done_before: usize,
    /// Failed points left as they were (`--skip-failed`).
    pub skipped_failed: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} point(s) ran ({} ok, {} of them sharing an identically routed point's results; {} failed, {} of them failing again as before); {} already finished; {} failed kept (--skip-failed)",
            self.ok + self.failed,
            self.ok,
            self.shared,
            self.failed,
            self.failed_again,
            self.done_before,
            self.skipped_failed
        )
    }
}

/// A measured input or why it could not be measured.
type Prepared<T> = Option<std::result::Result<T, String>>;

/// The allocation problem of a measured profile.
fn problem_of(m: Measured) -> Result<std::result::Result<Problem, String>> {
    Ok(match m {
        Measured::Ok(p) => Ok(Problem::from_profile(&p, KBounds::default())?),
        Measured::Failed(e) => Err(e),
    })
}

/// The part of a prepared input a method needs: the value, or the error that becomes its failure.
fn needed<'a, T>(p: &'a Prepared<T>, what: &str) -> std::result::Result<Option<&'a T>, String> {
    match p {
        None => Ok(None),
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(e)) => Err(format!("{what} could not be measured: {e}")),
    }
}

/// Keep `r` in `shared` under its routing key if it finished and its routing is determined by its
/// method and allocation (the first such point of a key stays).
fn share(shared: &mut BTreeMap<String, Record>, r: &Record) {
    let method = r.key.method.parse::<Method>().ok();
    if let (Status::Ok, Some(k)) = (&r.status, method.and_then(|m| routing_key(m, r.allocation.as_deref()))) {
        shared.entry(k).or_insert_with(|| r.clone());
    }
}

/// Print a line above the progress bar, or to stderr when the bar is hidden (not a terminal), where
/// `println` on the bar would print nothing.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// Run every point of one model that the results file does not hold as finished.
pub fn run_model(
    rc: &RunCtx<'_>,
    dir: &Path,
    methods: &[Method],
    tasks: &[Task],
    results: &mut ResultsFile,
    planned: &mut Vec<PointKey>,
    tally: &mut Tally,
) -> Result<()> {
    let spec = rc.spec;
    let Engine { device, kind, renormalize } = rc.engine;
    let name = model_name(dir);
    let t0 = Instant::now();
    let tm = rc.timings;
    let model = tm.time("load model", || moe_models::load(dir, device, kind))?;
    let tokenizer = tm.time("load tokenizer", || load_tokenizer(dir))?;
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
    let calib = tm.time("tokenize", || text::tokenize_into_sequences(&tokenizer, &heldout_text, spec.seq_len, 0, spec.calib_tokens))?;
    let calib_tokens_used = calib.sequences.len() * spec.seq_len;
    let tokenizer_check = || format!("tokenizer of {}", dir.display());
    text::check_vocab(calib.sequences.iter().flatten(), info.vocab_size).with_context(tokenizer_check)?;

    // The tasks' inputs first: a task that cannot be read is bad input, found before minutes of profiling.
    let mut task_data = Vec::with_capacity(tasks.len());
    for task in tasks {
        let data = tm.time("tokenize", || TaskData::prepare(task, spec, &tokenizer, &heldout_text, calib_tokens_used))?;
        text::check_vocab(data.token_ids(), info.vocab_size).with_context(tokenizer_check)?;
        task_data.push(data);
    }

    let any = |f: fn(Method) -> bool| methods.iter().any(|&m| f(m));
    let problem: Prepared<Problem> = if any(Method::needs_profile) {
        Some(problem_of(tm.time("profile (text)", || text_profile(rc, &name, &scorer, &shape, &calib.sequences))?)?)
    } else {
        None
    };
    let lexi: Prepared<Problem> = if any(Method::needs_lexi_profile) {
        Some(problem_of(tm.time("profile (lexi)", || lexi_profile(rc, &name, &model, &shape))?)?)
    } else {
        None
    };
    let trace: Prepared<Vec<HostRoute>> = if any(Method::needs_calibration_trace) {
        Some(tm.time("record routing", || record_host_trace(&scorer, &shape, &calib.sequences)).map_err(|e| format!("{e:#}")))
    } else {
        None
    };
    let mass: Prepared<Vec<LayerMass>> = match (methods.contains(&Method::AllocLT), &problem, &trace) {
        (true, Some(Ok(p)), Some(Ok(t))) => Some(tm.time("mass curves", || mass_curves(p, t, &shape)).map_err(|e| format!("{e:#}"))),
        _ => None,
    };

    let mut record_spec = rc.spec_json.clone();
    if let Some(o) = record_spec.as_object_mut() {
        o.insert("model_dir".into(), serde_json::json!(dir.display().to_string()));
        o.insert("moe_layers".into(), serde_json::json!(shape.moe_layers));
        o.insert("native_k".into(), serde_json::json!(shape.native_k));
        o.insert("n_routed_experts".into(), serde_json::json!(shape.experts));
        o.insert("model_type".into(), serde_json::json!(info.model_type));
    }

    for (task, data) in tasks.iter().zip(&task_data) {
        // Points of this task, full first (the reference for delta_nll).
        let mut points: Vec<(Method, f64)> = vec![(Method::Full, 1.0)];
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
        // Every point of a text task starts its passes from the same residual stream at the first MoE
        // layer; it is computed once.
        let prefix = match data {
            TaskData::Text { sequences, .. } => tm.time("text prefix", || scorer.text_prefix(sequences))?,
            _ => None,
        };
        let env = PointEnv {
            rc,
            model: &model,
            tokenizer: &tokenizer,
            scorer: &scorer,
            shape: &shape,
            task,
            data,
            prefix: prefix.as_ref(),
            renormalize,
            record_spec: &record_spec,
        };
        let mut reference: Option<f64> = None;
        // Finished points of this model and task by routing key: a later point that routes identically
        // copies their results instead of evaluating the same computation again.
        let mut shared: BTreeMap<String, Record> = BTreeMap::new();
        for r in results.latest().into_iter().filter(|r| r.key.model == name && r.key.task == task.name()) {
            share(&mut shared, r);
        }
        for (method, frac) in points {
            let key = PointKey { model: name.clone(), method: method.as_str().into(), budget: budget_label(frac), task: task.name() };
            planned.push(key.clone());
            bar.set_message(format!("{} @ {}", key.method, key.budget));
            let previous = results.latest_of(&key).cloned();
            match previous.as_ref().map(|r| &r.status) {
                Some(Status::Ok) => {
                    if method == Method::Full {
                        reference = previous.as_ref().and_then(|r| r.metrics.get("nll").copied());
                    }
                    tally.done_before += 1;
                    bar.inc(1);
                    continue;
                }
                Some(Status::Failed { .. }) if rc.skip_failed => {
                    tally.skipped_failed += 1;
                    bar.inc(1);
                    continue;
                }
                _ => {}
            }
            let budget_total = (frac * f64::from(full_budget)).round() as u32;
            // What the method is built from; a missing measurement fails only the points that need it.
            let inputs = (|| -> std::result::Result<Inputs<'_>, String> {
                Ok(Inputs {
                    problem: if method.needs_profile() { needed(&problem, "the sensitivity profile")? } else { None },
                    lexi: if method.needs_lexi_profile() { needed(&lexi, "the LExI-style profile")? } else { None },
                    trace: if method.needs_calibration_trace() { needed(&trace, "the full model's routing")?.map(Vec::as_slice) } else { None },
                    mass: if method == Method::AllocLT { needed(&mass, "the retained-mass curves")?.map(Vec::as_slice) } else { None },
                    seed: spec.seed,
                })
            })();
            let record = run_point(&env, &key, method, budget_total, full_budget, inputs, reference, &shared);
            share(&mut shared, &record);
            if method == Method::Full && record.status == Status::Ok {
                reference = record.metrics.get("nll").copied();
            }
            match (&record.status, previous.as_ref().map(|r| &r.status)) {
                (Status::Failed { error }, Some(Status::Failed { error: before })) if error == before => {
                    say(&bar, format!("{key}: failed again (as recorded): {error}"));
                    tally.failed += 1;
                    tally.failed_again += 1;
                }
                (status, _) => {
                    match status {
                        Status::Ok => {
                            tally.ok += 1;
                            tally.shared += usize::from(record.shared_with.is_some());
                        }
                        Status::Failed { error } => {
                            say(&bar, format!("{key}: failed: {error}"));
                            tally.failed += 1;
                        }
                    }
                    tm.time("write results", || results.append(record))?;
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    Ok(())
}
