//! `eval bench` end to end on the CPU with a tiny committed fixture: the table and the JSON carry, per
//! budget, the decode step's weight bytes, the bandwidth its time implies and the speed-up bound of
//! those bytes.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// `eval bench --phases decode` on the committed tiny Mixtral fixture (4-token prompt, 2 steps, 1 repeat)
/// with `extra` arguments: its table and its JSON.
fn bench(extra: &[&str]) -> (String, Value) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures/mixtral/gqa_window");
    let dir = tempfile::tempdir().unwrap();
    let out_json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["bench", "--phases", "decode", "--context", "4", "--decode-tokens", "2", "--repeats", "1"])
        .args(extra)
        .arg("--model")
        .arg(&model)
        .arg("--out")
        .arg(&out_json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (stdout, serde_json::from_str(&std::fs::read_to_string(&out_json).unwrap()).unwrap())
}

#[test]
fn bench_reports_decode_weight_bytes_bandwidth_and_bound() {
    let (stdout, v) = bench(&["--ks", "2,1"]);
    assert!(stdout.contains("GB/step") && stdout.contains("TB/s") && stdout.contains("bound"), "{stdout}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let bytes: Vec<u64> = rows.iter().map(|r| r["decode_weight_bytes"].as_u64().unwrap()).collect();
    // Half the experts per token read fewer bytes; the first budget is its own reference.
    assert!(bytes[0] > bytes[1], "{bytes:?}");
    assert_eq!(rows[0]["decode_weight_bound"].as_f64().unwrap(), 1.0);
    let bound = rows[1]["decode_weight_bound"].as_f64().unwrap();
    assert!((bound - bytes[0] as f64 / bytes[1] as f64).abs() < 1e-12, "{bound}");
    for r in rows {
        let implied = r["decode_weight_bytes"].as_f64().unwrap() / (r["decode_ms_per_token"].as_f64().unwrap() * 1e9);
        assert!((r["decode_weight_tb_per_s"].as_f64().unwrap() - implied).abs() <= 1e-9 * implied.max(1.0), "{r}");
    }
}

/// Several sequences decoding together: the table's time is per step, the JSON has it per step and per
/// token (step / sequences), tokens per second count every sequence, and the weight bytes count each
/// distinct chosen expert once: at least one sequence's worth, at most every sequence's, and within
/// the experts there are.
#[test]
fn bench_reports_several_sequences_per_step_and_per_token() {
    let (stdout, v) = bench(&["--ks", "2", "--decode-batch", "3", "--alloc-t"]);
    assert!(stdout.contains("decode ms/step"), "{stdout}");
    assert_eq!(v["decode"]["batch"].as_i64(), Some(3));
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "top-2 and Alloc-T");
    for r in rows {
        let step = r["decode_ms_per_step"].as_f64().unwrap();
        assert!((r["decode_ms_per_token"].as_f64().unwrap() - step / 3.0).abs() <= 1e-12 * step, "{r}");
        assert!((r["decode_tokens_per_s"].as_f64().unwrap() - 3.0 * 1e3 / step).abs() <= 1e-9 * (3e3 / step), "{r}");
        // The fixture: 3 MoE layers of 8 experts, top-2; Alloc-T at K_l = 2 and 3 tokens is exactly top-2.
        let distinct = r["decode_distinct_experts"].as_f64().unwrap();
        assert!((2.0 * 3.0..=(3.0 * 2.0 * 3.0f64).min(8.0 * 3.0)).contains(&distinct), "{r}");
        assert!(r["decode_weight_bytes"].as_u64().unwrap() > 0 && r["decode_weight_tb_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert_eq!(rows[0]["decode_weight_bound"].as_f64(), Some(1.0));
    assert_eq!(rows[0]["decode_distinct_experts"], rows[1]["decode_distinct_experts"], "the same experts");
}

/// `eval solve --out` writes the allocation `eval bench --allocation` reads: the chain from a profile to a
/// speed measurement of its Alloc-L allocation.
#[test]
fn a_solved_allocation_feeds_bench() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.json");
    let alloc = dir.path().join("alloc.json");
    // The fixture's three MoE layers (top-2 of 8 experts); layer 1 loses least without its second expert.
    std::fs::write(
        &profile,
        r#"{"schema_version": 1, "model": "fixture", "metric": "delta_nll", "full_k": 2,
            "layers": [{"layer": 0, "k": [1, 2], "delta": [0.5, 0.0]}, {"layer": 1, "k": [1, 2], "delta": [0.1, 0.0]},
                       {"layer": 2, "k": [1, 2], "delta": [0.3, 0.0]}]}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eval"))
        .args(["solve", "--budget", "5", "--profile"])
        .arg(&profile)
        .arg("--out")
        .arg(&alloc)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a: Value = serde_json::from_str(&std::fs::read_to_string(&alloc).unwrap()).unwrap();
    assert_eq!(a["layers"], serde_json::json!([0, 1, 2]));
    assert_eq!(a["k"], serde_json::json!([2, 1, 2]), "the least sensitive layer gives up an expert");
    let (stdout, v) = bench(&["--ks", "2", "--allocation", alloc.to_str().unwrap()]);
    assert!(stdout.contains("alloc-l (5)"), "{stdout}");
    assert_eq!(v["rows"][1]["activations_per_token"].as_u64(), Some(5));
}
