//! `eval plot`: regenerate every figure of a results directory from its files alone.
//!
//! Reads `<dir>/results.jsonl` and any `<dir>/profile-*.json` and `<dir>/lexi-*.json`, writes
//! `<dir>/figures/*.{png,svg}`.

use std::path::{Path, PathBuf};

use alloc_core::SensitivityProfile;
use anyhow::{Context, Result};

use crate::plot::{quality_vs_budget, quality_vs_speed, save_allocation_bars, save_heatmap, save_line_chart, AllocationBars};
use crate::results::{ResultsFile, Status};

/// Arguments of `eval plot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A results directory (containing results.jsonl).
    #[arg(long)]
    pub results: PathBuf,
}

/// Run `eval plot`.
pub fn run(args: Args) -> Result<()> {
    let files = plot_dir(&args.results)?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(())
}

/// Quality metrics plotted against budget: (metric, axis label).
const QUALITY: &[(&str, &str)] = &[
    ("ppl", "perplexity (lower is better)"),
    ("delta_nll", "NLL increase over the full model (nats/token)"),
    ("acc", "accuracy"),
    ("acc_norm", "accuracy (length-normalised)"),
];

/// Make every figure for one results directory; returns the files written.
pub fn plot_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let results = ResultsFile::open(&dir.join("results.jsonl"))?;
    let latest = results.latest();
    let fig = dir.join("figures");
    std::fs::create_dir_all(&fig).with_context(|| format!("cannot create {}", fig.display()))?;
    let mut written = Vec::new();
    for &(metric, label) in QUALITY {
        for (model, task, chart) in quality_vs_budget(&latest, metric, label) {
            let stem = fig.join(format!("{}_{}_{}_vs_budget", sanitize(&model), sanitize(&task), metric));
            written.extend(save_line_chart(&stem, &chart)?);
        }
    }
    for (speed, x_label) in [
        ("prefill_tokens_per_s", "prefill throughput (tokens/s)"),
        ("decode_tokens_per_s", "decode throughput (tokens/s)"),
    ] {
        for (model, task, chart) in quality_vs_speed(&latest, "ppl", speed, "perplexity (lower is better)", x_label) {
            let stem = fig.join(format!("{}_{}_ppl_vs_{}", sanitize(&model), sanitize(&task), speed));
            written.extend(save_line_chart(&stem, &chart)?);
        }
    }
    // Sensitivity heat maps from saved profiles (text-calibrated NLL or KL, and the data-free LExI one).
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| (n.starts_with("profile-") || n.starts_with("lexi-")) && n.ends_with(".json")))
        .collect();
    entries.sort();
    for p in entries {
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let profile = SensitivityProfile::from_json(&text).with_context(|| format!("profile {}", p.display()))?;
        // The NLL profile keeps the plain name; other metrics get their own file.
        let stem = match profile.metric.as_str() {
            "delta_nll" => fig.join(format!("{}_sensitivity", sanitize(&profile.model))),
            m => fig.join(format!("{}_sensitivity_{}", sanitize(&profile.model), sanitize(m))),
        };
        written.extend(save_heatmap(&stem, &profile)?);
    }
    // Per-layer allocations of Alloc-L at every budget, per model.
    let mut models: Vec<&str> = latest.iter().map(|r| r.key.model.as_str()).collect();
    models.sort_unstable();
    models.dedup();
    for model in models {
        let mut allocs: Vec<(f64, String, Vec<f64>)> = latest
            .iter()
            .filter(|r| r.key.model == model && r.key.method == "alloc-l" && r.status == Status::Ok)
            .filter_map(|r| r.allocation.clone().map(|a| (f64::from(r.budget_total), format!("budget {}", r.budget_total), a)))
            .collect();
        allocs.sort_by(|a, b| b.0.total_cmp(&a.0));
        allocs.dedup_by(|a, b| a.0 == b.0);
        let Some(layers) = latest
            .iter()
            .find(|r| r.key.model == model)
            .and_then(|r| r.spec.get("moe_layers"))
            .and_then(|v| serde_json::from_value::<Vec<usize>>(v.clone()).ok())
        else {
            continue;
        };
        if allocs.is_empty() {
            continue;
        }
        let full_k = latest
            .iter()
            .find(|r| r.key.model == model)
            .map(|r| f64::from(r.full_budget) / layers.len().max(1) as f64)
            .unwrap_or(0.0);
        let bars = AllocationBars {
            title: format!("{model}: Alloc-L per-layer top-k"),
            layers,
            allocations: allocs.into_iter().map(|(_, l, a)| (l, a)).collect(),
            full_k,
        };
        written.extend(save_allocation_bars(&fig.join(format!("{}_allocation", sanitize(model))), &bars)?);
    }
    Ok(written)
}

/// A file-name-safe version of a label.
pub fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::provenance::Provenance;
    use crate::results::{PointKey, Record, RESULTS_SCHEMA_VERSION};

    fn record(method: &str, frac: f64, ppl: f64, alloc: Option<Vec<f64>>) -> Record {
        let total = (156.0 * frac).round() as u32;
        Record {
            schema_version: RESULTS_SCHEMA_VERSION,
            run_id: "test".into(),
            key: PointKey { model: "tiny".into(), method: method.into(), budget: format!("{frac:.2}"), task: "heldout".into() },
            status: Status::Ok,
            budget_total: total,
            full_budget: 156,
            metrics: BTreeMap::from([
                ("ppl".to_string(), ppl),
                ("decode_tokens_per_s".to_string(), 1000.0 / (0.5 + frac)),
            ]),
            allocation: alloc,
            realized_per_layer: None,
            unique_experts_per_layer: None,
            predicted_delta: None,
            shared_with: None,
            provenance: Provenance::collect(),
            spec: serde_json::json!({"moe_layers": (1..=26).collect::<Vec<usize>>()}),
        }
    }

    #[test]
    fn plot_dir_writes_every_figure_as_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = ResultsFile::open(&dir.path().join("results.jsonl")).unwrap();
        f.append(record("full", 1.0, 20.0, None)).unwrap();
        for (m, worse) in [("uniform", 1.0), ("alloc-l", 0.7), ("alloc-l+t", 0.5)] {
            for frac in [0.33, 0.5, 0.67, 0.83] {
                let alloc = (m == "alloc-l").then(|| (0..26).map(|l| (frac * 6.0 + ((l % 5) as f64 - 2.0) * 0.5).round()).collect());
                f.append(record(m, frac, 20.0 + worse * 30.0 * (1.0 - frac).powi(2), alloc)).unwrap();
            }
        }
        let profile = bench_profile();
        std::fs::write(dir.path().join("profile-tiny.json"), profile.to_json()).unwrap();
        let lexi = SensitivityProfile { metric: "output_deviation".into(), ..profile.clone() };
        std::fs::write(dir.path().join("lexi-tiny.json"), lexi.to_json()).unwrap();
        let files = plot_dir(dir.path()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for want in [
            "tiny_heldout_ppl_vs_budget.png",
            "tiny_heldout_ppl_vs_budget.svg",
            "tiny_sensitivity.png",
            "tiny_sensitivity_output_deviation.png",
            "tiny_allocation.png",
            "tiny_heldout_ppl_vs_decode_tokens_per_s.svg",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        for p in &files {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.len() > 1000, "{} is only {} bytes", p.display(), bytes.len());
        }
        if let Ok(keep) = std::env::var("ALLOC_MOE_KEEP_PLOTS") {
            for p in &files {
                std::fs::copy(p, Path::new(&keep).join(p.file_name().unwrap())).unwrap();
            }
        }
    }

    fn bench_profile() -> SensitivityProfile {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/profiles/synthetic-v2-lite.json")).unwrap();
        let mut p = SensitivityProfile::from_json(&text).unwrap();
        p.model = "tiny".into();
        p
    }
}
