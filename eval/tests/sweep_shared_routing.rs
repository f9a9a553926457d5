//! Points that route identically (the same per-layer top-k allocation) are evaluated once: the later
//! ones copy the first one's results and name it in `shared_with`. The copied numbers must be exactly
//! what evaluating the point on its own gives.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn sweep(out: &Path, text: &Path, methods: &str) -> Vec<Value> {
    // Mixtral-style fixture: 3 MoE layers x top-2 of 8 (full budget 6); at budget 0.5 (3 activations)
    // every per-layer method must give each layer top-1.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures/mixtral/gqa_window");
    let o = Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["sweep", "--no-speed", "--methods", methods, "--budgets", "1.0,0.5", "--model"])
        .arg(model)
        .arg("--heldout")
        .arg(text)
        .arg("--out")
        .arg(out)
        .args(["--seq-len", "32", "--calib-tokens", "256", "--eval-tokens", "512"])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn point<'a>(recs: &'a [Value], method: &str) -> &'a Value {
    recs.iter().find(|r| r["method"] == method).unwrap_or_else(|| panic!("no {method} record"))
}

/// Metrics without timings.
fn cpu_metrics(r: &Value) -> Value {
    let mut m = r["metrics"].clone();
    m.as_object_mut().unwrap().retain(|k, _| k != "eval_seconds" && !k.ends_with("_tokens_per_s"));
    m
}

#[test]
fn identically_routed_points_share_results_equal_to_their_own_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    let text: String = (0..4000).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let text_path: PathBuf = dir.path().join("text.txt");
    std::fs::write(&text_path, text).unwrap();

    let all = sweep(&dir.path().join("all"), &text_path, "full,uniform,alloc-l,random-l,alloc-t");
    let uniform = point(&all, "uniform");
    assert_eq!(uniform["allocation"], serde_json::json!([1.0, 1.0, 1.0]));
    assert!(uniform.get("shared_with").is_none(), "the first of its routing is evaluated: {uniform}");
    for m in ["alloc-l", "random-l"] {
        let r = point(&all, m);
        assert_eq!(r["allocation"], uniform["allocation"], "{m}");
        assert_eq!(r["shared_with"], "uniform", "{m}: {r}");
        assert_eq!(r["metrics"], uniform["metrics"], "{m}");
        assert_eq!(r["realized_per_layer"], uniform["realized_per_layer"], "{m}");
        assert_eq!(r["spec"]["method_params"]["k_per_layer"], serde_json::json!([1, 1, 1]), "{m}: its own parameters");
    }
    // Another policy kind is evaluated itself, even where its routing may coincide.
    assert!(point(&all, "alloc-t").get("shared_with").is_none());

    // Each shared point, evaluated alone, gives exactly the copied numbers.
    for m in ["alloc-l", "random-l"] {
        let alone = sweep(&dir.path().join(m), &text_path, &format!("full,{m}"));
        let own = point(&alone, m);
        assert!(own.get("shared_with").is_none());
        assert_eq!(cpu_metrics(own), cpu_metrics(point(&all, m)), "{m}");
        assert_eq!(own["realized_per_layer"], point(&all, m)["realized_per_layer"], "{m}");
        assert_eq!(own["unique_experts_per_layer"], point(&all, m)["unique_experts_per_layer"], "{m}");
    }

    // A re-run with one more method shares from the results file's finished points.
    let more = sweep(&dir.path().join("all"), &text_path, "full,uniform,alloc-l,random-l,alloc-t,lexi");
    let lexi = point(&more, "lexi");
    assert_eq!(lexi["allocation"], uniform["allocation"], "one expert per layer is the only allocation of budget 3");
    assert_eq!(lexi["shared_with"], "uniform", "{lexi}");
    assert_eq!(more.len(), all.len() + 1, "the finished points are kept, not re-run");
}
