//! End-to-end: `eval sweep` on a tiny committed checkpoint writes every point, the CSV and the figures,
//! and a second run resumes (adds nothing, duplicates nothing).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures/deepseek_v2/lite_yarn")
}

fn sweep(out: &Path, text: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["sweep", "--model"])
        .arg(fixture())
        .arg("--heldout")
        .arg(text)
        .arg("--out")
        .arg(out)
        .args(["--seq-len", "32", "--calib-tokens", "256", "--eval-tokens", "512", "--budgets", "1.0,0.67,0.34"])
        .args(extra)
        .output()
        .expect("run eval")
}

fn write_text(dir: &Path) -> PathBuf {
    // The fixture's tokenizer maps printable ASCII characters one to one.
    let text: String = (0..4000).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).expect("write the text fixture");
    p
}

#[test]
fn sweep_writes_every_point_and_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let out = dir.path().join("res");
    let o = sweep(&out, &text, &["--no-speed"]);
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    // full at 1.0, and 9 other default methods at each of the 2 reduced budgets.
    assert_eq!(lines.lines().count(), 1 + 9 * 2, "{lines}");
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["status"], "ok", "{l}");
        assert!(v["metrics"]["ppl"].as_f64().unwrap().is_finite());
        assert!(v["provenance"]["git_sha"].is_string());
        let realized = v["metrics"]["realized_activations_per_token"].as_f64().unwrap();
        let budget = v["budget_total"].as_f64().unwrap();
        // Budgeted methods never exceed the budget; calibrated ones (tuned on the full model's routing)
        // land near it, since layers after a changed one see different inputs.
        let calibrated = ["top-p", "threshold", "skip"].contains(&v["method"].as_str().unwrap());
        let slack = if calibrated { 0.1 * budget } else { 1e-6 };
        assert!(realized <= budget + slack, "{} realized {realized} over budget {budget}", v["method"]);
    }
    assert!(out.join("results.csv").is_file());
    assert!(out.join("figures/lite_yarn_heldout_ppl_vs_budget.png").is_file());
    assert!(out.join("profile-lite_yarn.json").is_file());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("alloc-l+t beats uniform?"), "{stdout}");

    let o = sweep(&out, &text, &["--no-speed"]);
    assert!(o.status.success(), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let again = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(again, lines, "a finished sweep must not add records when re-run");
}

#[test]
fn sweep_rejects_bad_input_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = write_text(dir.path());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--methods", "full,nope"], "unknown method \"nope\""),
        (vec!["--tasks", "mmlu"], "unknown task \"mmlu\""),
        (vec!["--budgets", "1.5"], "outside (0, 1]"),
        (vec!["--device", "tpu"], "unknown device"),
    ];
    for (extra, needle) in cases {
        let o = sweep(&dir.path().join("r"), &text, &extra);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let o = sweep(&dir.path().join("r2"), &empty, &["--no-speed"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is empty"));
}
