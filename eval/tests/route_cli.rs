//! `eval route` end to end: the JSON output of each policy on a small batch, the readable table, and a
//! clear error with a non-zero exit (never a panic) for every kind of bad input.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Token 0 peaked, token 1 flat, token 2 padding.
const BATCH: &str = r#"{"probs": [[0.7, 0.2, 0.1, 0.0], [0.3, 0.3, 0.25, 0.15], [0.5, 0.5, 0.0, 0.0]],
                       "mask": [true, true, false]}"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn route(file: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eval")).arg("route").arg("--probs").arg(file).args(args).output().unwrap()
}

/// Run with `--json`, expect success and exactly one JSON object on stdout.
fn json(file: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = route(file, &a);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim().lines().count(), 1, "{stdout}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    v
}

/// Expect a non-zero exit and an error message containing every `needle`.
fn fails(file: &Path, args: &[&str], needles: &[&str]) {
    let out = route(file, args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {stderr:?} lacks {n:?}");
    }
}

#[test]
fn alloc_t_moves_activations_from_peaked_to_flat_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "b.json", BATCH);
    let v = json(&f, &["--policy", "alloc-t", "--k", "2", "--cap", "3"]);
    assert_eq!(v["ids"], serde_json::json!([[0], [0, 1, 2], []]));
    assert_eq!(v["counts"], serde_json::json!([1, 3, 0]));
    assert_eq!(v["total"], 4);
    // K * T = 2.5 * 2 valid tokens = 5 pairs; K = 1.25 -> 2.5 -> rounds half up to 3.
    assert_eq!(json(&f, &["--policy", "alloc-t", "--k", "2.5", "--cap", "3"])["total"], 5);
    assert_eq!(json(&f, &["--policy", "alloc-t", "--k", "1.25"])["total"], 3);
}

#[test]
fn every_policy_prints_ids_in_decreasing_probability() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "b.json", BATCH);
    let cases: [(&[&str], Value); 5] = [
        (&["--policy", "topk", "--k", "2"], serde_json::json!([[0, 1], [0, 1], []])),
        (&["--policy", "topp", "--p", "0.8"], serde_json::json!([[0, 1], [0, 1, 2], []])),
        (&["--policy", "threshold", "--tau", "0.25"], serde_json::json!([[0], [0, 1, 2], []])),
        (&["--policy", "skip", "--beta", "0.5", "--k", "3"], serde_json::json!([[0], [0, 1, 2], []])),
        (&["--policy", "threshold", "--tau", "0.9", "--floor", "0"], serde_json::json!([[], [], []])),
    ];
    for (args, ids) in cases {
        assert_eq!(json(&f, args)["ids"], ids, "{args:?}");
    }
    let r = json(&f, &["--policy", "random", "--k", "2", "--seed", "3"]);
    assert_eq!(r["counts"], serde_json::json!([2, 2, 0]));
    assert_eq!(r, json(&f, &["--policy", "random", "--k", "2", "--seed", "3"]), "seeded");
}

#[test]
fn table_output_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "b.json", BATCH);
    let out = route(&f, &["--policy", "alloc-t", "--k", "2", "--cap", "3"]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("3 tokens (2 valid) x 4 experts -> 4 pairs"), "{s}");
    assert!(s.contains("    1    yes      3  0 1 2"), "{s}");
    assert!(s.contains("    2    pad      0"), "{s}");
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let topk = ["--policy", "topk", "--k", "1"];
    fails(&write(d, "nan.json", r#"{"probs": [[0.5, NaN]]}"#), &topk, &["NaN", "line 1 column"]);
    fails(&write(d, "neg.json", r#"{"probs": [[0.5, 0.5], [-0.5, 1.5]]}"#), &topk, &["token 1 expert 0 is -0.5"]);
    fails(&write(d, "sum.json", r#"{"probs": [[0.5, 0.6]]}"#), &topk, &["row 0 sums to 1.1", "--normalize"]);
    fails(&write(d, "ragged.json", r#"{"probs": [[0.5, 0.5], [1.0]]}"#), &topk, &["row 1 has 1", "row 0 has 2"]);
    fails(&write(d, "mask.json", r#"{"probs": [[1.0]], "mask": [true, false]}"#), &topk, &["mask", "2 entries for 1 rows"]);
    fails(&write(d, "empty.json", r#"{"probs": []}"#), &topk, &["empty batch"]);
    fails(&write(d, "zero.json", r#"{"probs": [[]]}"#), &topk, &["zero experts"]);
    fails(&write(d, "typo.json", r#"{"prob": [[1.0]]}"#), &topk, &["unknown field `prob`"]);
    fails(&d.join("missing.json"), &topk, &["cannot read", "missing.json"]);
    let f = write(d, "b.json", BATCH);
    fails(&f, &["--policy", "alloc-t", "--k", "3.5", "--cap", "3"], &["K = 3.5", "[1, 3]"]);
    fails(&f, &["--policy", "alloc-t", "--k", "0.5"], &["K = 0.5", "[1, 4]"]);
    fails(&f, &["--policy", "topk", "--k", "9"], &["k = 9", "4 experts"]);
    fails(&f, &["--policy", "topk", "--k", "2.5"], &["--k 2.5", "whole number"]);
    fails(&f, &["--policy", "topk"], &["needs --k"]);
    fails(&f, &["--policy", "topk", "--k", "1", "--tau", "0.1"], &["--tau does not apply"]);
    fails(&f, &["--policy", "topp", "--p", "1.5"], &["p = 1.5"]);
    fails(&f, &["--policy", "skip", "--k", "2"], &["needs --beta"]);
}

#[test]
fn normalize_rescales_rows() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "u.json", r#"{"probs": [[2.0, 6.0, 2.0]]}"#);
    let v = json(&f, &["--policy", "topp", "--p", "0.6", "--normalize"]);
    assert_eq!(v["ids"], serde_json::json!([[1]]));
}
