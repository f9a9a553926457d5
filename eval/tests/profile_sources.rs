//! Profile sources and metrics (issue 7): `eval profile --metric kl`, the data-free
//! `eval profile --source lexi`, and a sweep that uses both (`--profile-metric kl`, method `lexi`) with
//! fractional Alloc-L+T on a top-2 model.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures").join(rel)
}

fn text(dir: &Path) -> PathBuf {
    // The fixtures' tokenizers map printable ASCII characters one to one.
    let text: String = (0..3000).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).unwrap();
    p
}

fn eval(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eval"));
    c.args(args).env("OMP_NUM_THREADS", "1");
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn read(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Every layer's deltas finite and >= 0, 0 at k = K.
fn check_profile(v: &Value, metric: &str, layers: &[u64]) {
    assert_eq!(v["metric"], metric, "{v}");
    let got: Vec<u64> = v["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_u64().unwrap()).collect();
    assert_eq!(got, layers);
    for l in v["layers"].as_array().unwrap() {
        let d: Vec<f64> = l["delta"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(d.iter().all(|x| x.is_finite() && *x >= 0.0), "{l}");
        assert_eq!(*d.last().unwrap(), 0.0);
        assert!(d[0] > 0.0, "k = 1 must cost something: {l}");
    }
}

#[test]
fn kl_and_lexi_profiles_are_written_with_their_metric() {
    let d = tempfile::tempdir().unwrap();
    let t = text(d.path());
    let model = fixture("deepseek_v2/lite_yarn");
    let small = ["profile", "--seq-len", "32", "--calib-tokens", "128", "--k", "1,2"];
    let kl = d.path().join("kl.json");
    let o = eval(&[&small[..], &["--metric", "kl"]].concat(), &[("--model", &model), ("--text", &t), ("--out", &kl)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = read(&kl);
    check_profile(&v, "kl", &[1, 2]);
    assert!(v["calibration"]["reference_nll"].as_f64().unwrap().is_finite());

    let lexi = |name: &str, seed: &str| {
        let p = d.path().join(name);
        let o = eval(&["profile", "--source", "lexi", "--lexi-tokens", "256", "--seed", seed], &[("--model", &model), ("--out", &p)]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(&p).unwrap()
    };
    let (a, b, c) = (lexi("a.json", "3"), lexi("b.json", "3"), lexi("c.json", "4"));
    check_profile(&serde_json::from_str(&a).unwrap(), "output_deviation", &[1, 2]);
    assert_eq!(a, b, "same seed, same profile");
    assert_ne!(a, c, "another seed draws other inputs");
    let v: Value = serde_json::from_str(&a).unwrap();
    for l in v["layers"].as_array().unwrap() {
        let d: Vec<f64> = l["delta"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(d[0] >= d[1], "top-1 deviates at least as much as top-2: {l}");
    }
    let o = eval(&["profile", "--source", "lexi", "--metric", "kl"], &[("--model", &model), ("--out", &d.path().join("x.json"))]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--metric applies to --source text"));
}

#[test]
fn a_sweep_with_kl_profile_lexi_and_fractional_alloc_lt_on_a_top2_model() {
    let d = tempfile::tempdir().unwrap();
    let t = text(d.path());
    let out = d.path().join("res");
    // Mixtral-style fixture: 3 MoE layers x top-2 of 8 (full budget 6); budget 0.67 is 4 activations.
    let model = fixture("mixtral/gqa_window");
    let args = [
        "sweep", "--no-speed", "--methods", "full,alloc-l,alloc-l+t,lexi", "--budgets", "1.0,0.67", "--profile-metric", "kl",
        "--seq-len", "32", "--calib-tokens", "256", "--eval-tokens", "512",
    ];
    let o = eval(&args, &[("--model", &model), ("--heldout", &t), ("--out", &out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_profile(&read(&out.join("profile-gqa_window.kl.json")), "kl", &[0, 1, 2]);
    check_profile(&read(&out.join("lexi-gqa_window.json")), "output_deviation", &[0, 1, 2]);
    let recs: Vec<Value> =
        std::fs::read_to_string(out.join("results.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["spec"]["profile_metric"], "kl");
        let realized = r["metrics"]["realized_activations_per_token"].as_f64().unwrap();
        assert!(realized <= r["budget_total"].as_f64().unwrap() + 1e-9, "{r}");
    }
    let lt = recs.iter().find(|r| r["method"] == "alloc-l+t").unwrap();
    let k: Vec<f64> = lt["allocation"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    // Fractional K_l in [1, 2] that use the whole budget (4 = 6 x 0.67 rounded), and Alloc-T realises them.
    assert!((k.iter().sum::<f64>() - 4.0).abs() < 1e-9, "{k:?}");
    assert!(k.iter().all(|&x| (1.0..=2.0).contains(&x)), "{k:?}");
    assert!(k.iter().any(|&x| x.fract() != 0.0), "a top-2 model's Alloc-L+T should redistribute: {k:?}");
    let realized = lt["metrics"]["realized_activations_per_token"].as_f64().unwrap();
    assert!((realized - 4.0).abs() < 1e-9, "{realized}");
}

#[test]
fn cached_layer_input_profiles_equal_whole_forward_passes_bit_for_bit() {
    // Profiling starts each (layer, k) pass from the cached residual stream at the profiled layer; it must
    // give the same bytes as one whole forward pass per (layer, k): dense first layers, MLA, sliding
    // windows, shared experts, both metrics, several calibration batches. (The OLMoE and Qwen3-MoE
    // fixtures' tokenizers do not read the test text; they run the same decoder loop.)
    let d = tempfile::tempdir().unwrap();
    let t = text(d.path());
    let small = ["profile", "--seq-len", "32", "--calib-tokens", "192", "--batch-tokens", "64", "--k", "1,2,3"];
    for model in ["deepseek_v2/lite_yarn", "mixtral/gqa_window", "qwen2_moe/shared_dense_raw"] {
        for metric in ["nll", "kl"] {
            let run = |name: &str, extra: &[&str]| {
                let p = d.path().join(name);
                let o = eval(&[&small[..], &["--metric", metric], extra].concat(), &[("--model", &fixture(model)), ("--text", &t), ("--out", &p)]);
                assert!(o.status.success(), "{model} {metric}: {}", String::from_utf8_lossy(&o.stderr));
                std::fs::read_to_string(&p).unwrap()
            };
            let cached = run("cached.json", &[]);
            let full = run("full.json", &["--full-passes"]);
            assert_eq!(cached, full, "{model} {metric}");
            let v: Value = serde_json::from_str(&cached).unwrap();
            assert_eq!(v["metric"], if metric == "nll" { "delta_nll" } else { "kl" });
        }
    }
}

#[test]
fn a_cached_profile_resumes_a_partial_one() {
    // An interrupted profile kept its finished layers in `.<out>.partial.json`; the cached passes reuse
    // them (here: a first layer with made-up deltas, which must survive) and measure the rest.
    let d = tempfile::tempdir().unwrap();
    let t = text(d.path());
    let model = fixture("deepseek_v2/lite_yarn");
    let small = ["profile", "--seq-len", "32", "--calib-tokens", "128", "--k", "1,2"];
    let whole = d.path().join("whole.json");
    let o = eval(&small, &[("--model", &model), ("--text", &t), ("--out", &whole)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut v = read(&whole);
    let first = v["layers"][0]["layer"].clone();
    v["layers"][0]["delta"][0] = serde_json::json!(123.0);
    let last_layer = v["layers"].as_array().unwrap().last().unwrap().clone();
    v["layers"] = serde_json::json!([v["layers"][0].clone()]);
    let out = d.path().join("p.json");
    std::fs::write(d.path().join("p.partial"), serde_json::to_string(&v).unwrap()).unwrap();
    let o = eval(&small, &[("--model", &model), ("--text", &t), ("--out", &out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read(&out);
    assert_eq!(got["layers"][0]["layer"], first);
    assert_eq!(got["layers"][0]["delta"][0], 123.0, "the resumed layer is kept as it was: {got}");
    assert_eq!(got["layers"].as_array().unwrap().last().unwrap(), &last_layer, "the other layers are measured as before");
}
