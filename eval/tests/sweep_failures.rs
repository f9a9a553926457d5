//! Failed points (issue 9): a point that fails is a recorded failure and the sweep goes on; a re-run
//! retries it and, failing the same way again, adds nothing; a sweep whose every point failed exits
//! non-zero and says why.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tch::{Kind, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures/deepseek_v2/lite_yarn")
}

/// A copy of the lite_yarn fixture (2 MoE layers, top-3 of 8: full budget 6) in `dir/m`.
fn checkpoint(dir: &Path) -> PathBuf {
    let dst = dir.join("m");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dst.join(f)).unwrap();
    }
    dst
}

fn text(dir: &Path) -> PathBuf {
    // The fixture's tokenizer maps printable ASCII characters one to one.
    let text: String = (0..3000).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn sweep(ckpt: &Path, heldout: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["sweep", "--no-speed", "--model"])
        .arg(ckpt)
        .arg("--heldout")
        .arg(heldout)
        .arg("--out")
        .arg(out)
        .args(["--seq-len", "32", "--calib-tokens", "128", "--eval-tokens", "256"])
        .args(extra)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn find<'a>(recs: &'a [Value], method: &str, budget: &str) -> &'a Value {
    recs.iter().find(|r| r["method"] == method && r["budget"] == budget).unwrap_or_else(|| panic!("no {method} @ {budget}"))
}

#[test]
fn an_infeasible_point_is_recorded_the_sweep_goes_on_and_a_rerun_adds_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (ckpt, heldout, out) = (checkpoint(d.path()), text(d.path()), d.path().join("res"));
    // A stored profile that only knows k = 2 and 3: Alloc-L cannot go below 2 + 2 = 4 activations, so
    // the 0.50 budget (3) is infeasible for it, while uniform and Alloc-T (k = 1 allowed) run.
    std::fs::create_dir_all(&out).unwrap();
    let profile = serde_json::json!({"schema_version": 1, "model": "m", "metric": "delta_nll", "full_k": 3,
        "layers": [{"layer": 1, "k": [2, 3], "delta": [0.2, 0.0]}, {"layer": 2, "k": [2, 3], "delta": [0.1, 0.0]}]});
    std::fs::write(out.join("profile-m.json"), profile.to_string()).unwrap();
    let args = ["--methods", "full,uniform,alloc-l,alloc-t", "--budgets", "1.0,0.5"];
    let o = sweep(&ckpt, &heldout, &out, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let recs = records(&out);
    assert_eq!(recs.len(), 4);
    for (m, b) in [("full", "1.00"), ("uniform", "0.50"), ("alloc-t", "0.50")] {
        assert_eq!(find(&recs, m, b)["status"], "ok", "{m} @ {b}");
    }
    let failed = find(&recs, "alloc-l", "0.50");
    assert_eq!(failed["status"], "failed");
    let msg = failed["error"].as_str().unwrap();
    assert!(msg.contains("budget 3 is infeasible") && msg.contains("4"), "{msg}");
    assert!(err.contains("alloc-l / budget 0.50 / heldout: failed"), "{err}");
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.lines().any(|l| l.contains(",alloc-l,") && l.contains(",failed")), "{csv}");

    // A re-run retries the failed point; it fails the same way, so the file is unchanged.
    let before = std::fs::read(out.join("results.jsonl")).unwrap();
    let o = sweep(&ckpt, &heldout, &out, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("failed again (as recorded)") && err.contains("1 point(s) ran"), "{err}");
    assert_eq!(std::fs::read(out.join("results.jsonl")).unwrap(), before, "a repeated failure must not add a record");

    // --skip-failed leaves it alone.
    let o = sweep(&ckpt, &heldout, &out, &[&args[..], &["--skip-failed"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("0 point(s) ran") && err.contains("1 failed kept"), "{err}");

    // With a usable profile the retry succeeds and supersedes the failure.
    let profile = serde_json::json!({"schema_version": 1, "model": "m", "metric": "delta_nll", "full_k": 3,
        "layers": [{"layer": 1, "k": [1, 2, 3], "delta": [0.5, 0.2, 0.0]}, {"layer": 2, "k": [1, 2, 3], "delta": [0.3, 0.1, 0.0]}]});
    std::fs::write(out.join("profile-m.json"), profile.to_string()).unwrap();
    let o = sweep(&ckpt, &heldout, &out, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs = records(&out);
    assert_eq!(recs.len(), 5);
    assert_eq!(recs[4]["method"], "alloc-l");
    assert_eq!(recs[4]["status"], "ok");
}

#[test]
fn a_sweep_whose_every_point_fails_exits_non_zero_and_names_the_error() {
    let d = tempfile::tempdir().unwrap();
    let (ckpt, heldout, out) = (checkpoint(d.path()), text(d.path()), d.path().join("res"));
    // NaN in the LM head: every forward pass gives a non-finite loss.
    let p = ckpt.join("model.safetensors");
    let mut t = Tensor::read_safetensors(&p).unwrap();
    for (name, x) in t.iter_mut() {
        if name == "lm_head.weight" {
            *x = x.full_like(f64::NAN).to_kind(Kind::Float);
        }
    }
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
    Tensor::write_safetensors(&refs, &p).unwrap();
    let o = sweep(&ckpt, &heldout, &out, &["--methods", "full,uniform", "--budgets", "1.0,0.5"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("every one of the sweep's 2 points failed") && err.contains("not finite"), "{err}");
    // The failures are kept for inspection (and retried by the next run).
    let recs = records(&out);
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["status"] == "failed" && r["error"].as_str().unwrap().contains("not finite")));
}
