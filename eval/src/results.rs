//! Results: append-only JSONL, one record per (model, method, budget, task) point, plus a derived CSV.
//!
//! Every write goes to a temporary file in the same directory, is synced, then renamed over the target,
//! so a run killed at any instant leaves either the old file or the new one, never a torn line. A re-run
//! reads the file and skips points already recorded, so an interrupted sweep resumes where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::provenance::Provenance;

/// Version of the result-record schema.
pub const RESULTS_SCHEMA_VERSION: u32 = 1;

/// What identifies a sweep point; a results file holds at most one finished record per key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PointKey {
    /// Model name (checkpoint directory name).
    pub model: String,
    /// Method name (e.g. `uniform`, `alloc-l+t`).
    pub method: String,
    /// Budget as a fraction label, e.g. `0.50` (two decimals; stable for resuming).
    pub budget: String,
    /// Task name (e.g. `heldout`, `hellaswag`).
    pub task: String,
}

impl std::fmt::Display for PointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {} / budget {} / {}", self.model, self.method, self.budget, self.task)
    }
}

/// Whether a point finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Metrics are valid.
    Ok,
    /// The point failed (out of memory, NaN loss, ...); the sweep went on.
    Failed {
        /// The error chain.
        error: String,
    },
}

/// One sweep point's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// [`RESULTS_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The run that produced it (the results directory name).
    pub run_id: String,
    /// Which point.
    #[serde(flatten)]
    pub key: PointKey,
    /// Finished or failed.
    #[serde(flatten)]
    pub status: Status,
    /// The budget as a total of activations per token.
    pub budget_total: u32,
    /// The model's full budget.
    pub full_budget: u32,
    /// Scalar metrics, named with units (`nll`, `ppl`, `bpb`, `acc`, `acc_norm`,
    /// `prefill_tokens_per_s`, `realized_activations_per_token`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// k per MoE layer (or mean K_l for token-level methods), if the method has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Vec<f64>>,
    /// Realized mean activations per token, per MoE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_per_layer: Option<Vec<f64>>,
    /// Mean distinct experts touched per batch, per MoE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_experts_per_layer: Option<Vec<f64>>,
    /// The profile's predicted loss for the allocation (the additivity check), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_delta: Option<f64>,
    /// The method whose point (same model and task) was evaluated for this one, when the two route
    /// identically (the same policy kind with the same per-layer allocation, see
    /// `methods::routing_key`): the metrics, realized activations and speeds are copied from it, since
    /// evaluating the same routing again gives the same numbers. `None`: evaluated itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_with: Option<String>,
    /// Code and machine provenance.
    pub provenance: Provenance,
    /// The resolved sweep specification.
    pub spec: serde_json::Value,
}

/// An append-only JSONL results file.
#[derive(Debug)]
pub struct ResultsFile {
    path: PathBuf,
    records: Vec<Record>,
}

impl ResultsFile {
    /// Open (or start) a results file; existing records are read and checked.
    pub fn open(path: &Path) -> Result<Self> {
        let records = if path.exists() {
            let text = fs::read_to_string(path).with_context(|| format!("cannot read results file {}", path.display()))?;
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    let r: Record = serde_json::from_str(l)
                        .with_context(|| format!("{} line {}: not a result record", path.display(), i + 1))?;
                    if r.schema_version != RESULTS_SCHEMA_VERSION {
                        bail!(
                            "{} line {}: schema_version {} (this build reads {RESULTS_SCHEMA_VERSION})",
                            path.display(),
                            i + 1,
                            r.schema_version
                        );
                    }
                    Ok(r)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self { path: path.to_path_buf(), records })
    }

    /// All records, in the order written.
    #[cfg(test)]
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// How many records the file holds.
    pub fn count(&self) -> usize {
        self.records.len()
    }

    /// The latest record of `key`, if any (a later record supersedes an earlier one).
    pub fn latest_of(&self, key: &PointKey) -> Option<&Record> {
        self.records.iter().rev().find(|r| &r.key == key)
    }

    /// The latest record of each key (later records supersede earlier ones, e.g. a retried failure).
    pub fn latest(&self) -> Vec<&Record> {
        let mut seen = BTreeMap::new();
        for (i, r) in self.records.iter().enumerate() {
            seen.insert(r.key.clone(), i);
        }
        let mut idx: Vec<usize> = seen.into_values().collect();
        idx.sort_unstable();
        idx.into_iter().map(|i| &self.records[i]).collect()
    }

    /// Append one record atomically (the whole file is rewritten to a temporary name and renamed).
    pub fn append(&mut self, record: Record) -> Result<()> {
        self.records.push(record);
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&serde_json::to_string(r).context("cannot serialise a result record")?);
            text.push('\n');
        }
        if let Err(e) = write_atomic(&self.path, text.as_bytes()) {
            self.records.pop();
            return Err(e);
        }
        Ok(())
    }

    /// Write the derived CSV (latest record per key): key columns, status, budget, then every metric.
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        write_atomic(path, records_to_csv(&self.latest()).as_bytes())
    }
}

/// Render records as CSV: fixed columns, then the sorted union of metric names.
pub fn records_to_csv(records: &[&Record]) -> String {
    let metric_names: BTreeSet<&str> = records.iter().flat_map(|r| r.metrics.keys().map(String::as_str)).collect();
    let mut out = String::from("model,method,budget,budget_total,full_budget,task,status");
    for m in &metric_names {
        out.push(',');
        out.push_str(m);
    }
    out.push('\n');
    for r in records {
        let status = match &r.status {
            Status::Ok => "ok",
            Status::Failed { .. } => "failed",
        };
        out.push_str(&format!(
            "{},{},{},{},{},{},{}",
            csv_field(&r.key.model),
            csv_field(&r.key.method),
            r.key.budget,
            r.budget_total,
            r.full_budget,
            csv_field(&r.key.task),
            status
        ));
        for m in &metric_names {
            out.push(',');
            if let Some(v) = r.metrics.get(*m) {
                out.push_str(&format!("{v}"));
            }
        }
        out.push('\n');
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp.{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Remove temporary files `write_atomic` left in `dir` or its subdirectories (a sweep writes into
/// `figures/` too) when a process was killed between creating and renaming them (`.<name>.tmp.<pid>`),
/// unless that process is still running (Linux: `/proc/<pid>`). Symbolic links are not followed.
/// Returns the removed paths.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    remove_stale_in(dir, &mut removed)?;
    Ok(removed)
}

fn remove_stale_in(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else { return Ok(()) };
    let proc_fs = Path::new("/proc/self").exists();
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_stale_in(&e.path(), removed)?;
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp.")).map(|(_, pid)| pid) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        let alive = pid == std::process::id() || (proc_fs && Path::new("/proc").join(pid.to_string()).exists());
        if !alive {
            fs::remove_file(e.path()).with_context(|| format!("cannot remove stale temporary {}", e.path().display()))?;
            removed.push(e.path());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(method: &str, status: Status) -> Record {
        Record {
            schema_version: RESULTS_SCHEMA_VERSION,
            run_id: "r".into(),
            key: PointKey { model: "m".into(), method: method.into(), budget: "0.50".into(), task: "heldout".into() },
            status,
            budget_total: 78,
            full_budget: 156,
            metrics: BTreeMap::from([("nll".to_string(), 3.5)]),
            allocation: Some(vec![3.0; 26]),
            realized_per_layer: None,
            unique_experts_per_layer: None,
            predicted_delta: Some(0.1),
            shared_with: None,
            provenance: Provenance::collect(),
            spec: serde_json::json!({}),
        }
    }

    #[test]
    fn append_then_reopen_resumes_and_supersedes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        let mut f = ResultsFile::open(&path).unwrap();
        f.append(rec("uniform", Status::Ok)).unwrap();
        f.append(rec("dp", Status::Failed { error: "oom".into() })).unwrap();
        let mut g = ResultsFile::open(&path).unwrap();
        assert_eq!(g.records().len(), 2);
        let key = |m: &str| PointKey { model: "m".into(), method: m.into(), budget: "0.50".into(), task: "heldout".into() };
        assert_eq!(g.latest_of(&key("uniform")).unwrap().status, Status::Ok);
        assert!(matches!(g.latest_of(&key("dp")).unwrap().status, Status::Failed { .. }));
        assert!(g.latest_of(&key("other")).is_none());
        g.append(rec("dp", Status::Ok)).unwrap();
        assert_eq!(g.latest_of(&key("dp")).unwrap().status, Status::Ok);
        assert_eq!(g.latest().len(), 2);
        assert!(g.latest().iter().all(|r| r.status == Status::Ok));
        let csv = records_to_csv(&g.latest());
        assert!(csv.starts_with("model,method,budget,budget_total,full_budget,task,status,nll\n"), "{csv}");
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(".results.jsonl.tmp.4294967295");
        let live = dir.path().join(format!(".results.jsonl.tmp.{}", std::process::id()));
        let other = dir.path().join("results.jsonl");
        for p in [&dead, &live, &other] {
            fs::write(p, "x").unwrap();
        }
        let figures = dir.path().join("figures");
        fs::create_dir(&figures).unwrap();
        let nested = figures.join(".a.svg.tmp.4294967295");
        fs::write(&nested, "x").unwrap();
        let mut removed = remove_stale_temporaries(dir.path()).unwrap();
        removed.sort();
        let mut want = vec![dead.clone(), nested.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert!(!dead.exists() && !nested.exists() && live.exists() && other.exists());
    }

    #[test]
    fn a_corrupt_line_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.jsonl");
        fs::write(&path, "{\"schema_version\": 1}\n").unwrap();
        let e = format!("{:#}", ResultsFile::open(&path).unwrap_err());
        assert!(e.contains("line 1"), "{e}");
    }
}
