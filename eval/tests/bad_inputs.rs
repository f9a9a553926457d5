//! Bad inputs to the `eval` CLI: each gives one clear error naming the file, key, tensor or value, a
//! non-zero exit, no panic, and no partial output (the output path does not exist afterwards, or is
//! unchanged). Inputs are built in a temporary directory from the tiny committed fixtures.
//!
//! Cases here (input -> expected error fragments):
//!
//! | # | command | bad input | expected fragments |
//! |---|---|---|---|
//! | 1 | logits | config.json not JSON | `config.json`, `line 1` |
//! | 2 | logits | config.json truncated half-way | `config.json`, `EOF` |
//! | 3 | logits | config.json absent | `config.json` |
//! | 4 | logits | config.json without `model_type` | `model_type`, `missing` |
//! | 5 | logits | `hidden_size` is a string | `hidden_size`, `invalid type` |
//! | 6 | logits | `num_experts_per_tok` is negative | `num_experts_per_tok` |
//! | 7 | logits | `rope_scaling.factor` is a string | `factor` |
//! | 8 | logits | `hidden_size` 30 not divisible by 4 heads (Mixtral) | `hidden_size`, `num_attention_heads` |
//! | 9 | logits | `num_experts_per_tok` 9 above 8 experts | `num_experts_per_tok`, `1..=8` |
//! | 10 | logits | `num_hidden_layers` above the layers the file holds | `missing tensor`, `model.layers.3` |
//! | 11 | logits | `vocab_size` disagrees with the embedding | `model.embed_tokens.weight`, `[96, 32]` |
//! | 12 | logits | an i32 tensor | tensor name, `I32` |
//! | 13 | logits | model.safetensors truncated half-way | `model.safetensors`, `outside the file` |
//! | 14 | logits | model.safetensors header overwritten with garbage | `model.safetensors` |
//! | 15 | logits | header length field larger than the file | `model.safetensors` |
//! | 16 | logits | model.safetensors empty | `model.safetensors` |
//! | 17 | logits | shard index not JSON | `model.safetensors.index.json` |
//! | 18 | logits | shard index truncated | `model.safetensors.index.json`, `EOF` |
//! | 19 | logits | shard index naming a missing shard | `model-00002-of-00002.safetensors` |
//! | 20 | logits | shard index mapping a tensor to a shard without it | tensor name, `does not hold it` |
//! | 21 | logits | shard index without `weight_map` | `weight_map` |
//! | 22 | logits | `--tokens` id 96 with vocab_size 96 | `id 96`, `outside the vocabulary` |
//! | 23 | logits | `--tokens "1 two"` | `` `two` is not an integer `` |
//! | 24 | sweep | tokenizer.json whose ids exceed vocab_size | `tokenizer.json`, `vocab_size 96`, `token id` |
//! | 25 | sweep | tokenizer.json not JSON | `tokenizer.json` |
//! | 26 | sweep | binary held-out text | `looks binary` |
//! | 27 | sweep | held-out text not UTF-8 | `not valid UTF-8` |
//! | 28 | sweep | held-out text too short for one sequence | `too few for one sequence` |
//! | 29 | sweep | held-out text missing | `cannot read text file`, path |
//! | 30 | sweep | `text:PATH` task naming a missing file | `cannot read text file`, path |
//! | 31 | sweep | `--out` under a regular file (not writable) | `cannot create results directory` |
//! | 32 | sweep | `--spec` with an unknown field | `unknown field`, `methodz` |
//! | 33 | sweep | `--spec` not TOML | spec path |
//! | 34 | sweep | results.jsonl with a torn line (file unchanged) | `results.jsonl line 1` |
//! | 35 | sweep | cached profile lacking a MoE layer (no results written) | `does not match the model's MoE layers` |
//! | 36 | sweep | `--renormalize sometimes` | `sometimes` |
//! | 37 | solve | profile with a NaN delta | profile path, `line` |
//! | 38 | solve | profile with an infinite delta (1e999) | profile path |
//! | 39 | solve | profile with a duplicate layer | `layer 1 appears more than once` |
//! | 40 | solve | profile with no layers | `no layers` |
//! | 41 | solve | profile layer without `delta` | `delta` |
//! | 42 | solve | profile with more k values than deltas | `2 k values but 1 deltas` |
//! | 43 | solve | profile k not increasing | `strictly increasing` |
//! | 44 | solve | profile with schema_version 2 | `schema_version 2` |
//! | 45 | solve | budget below the smallest allocation | `infeasible`, `adds up to 2` |
//! | 46 | solve | budget `abc` | `abc` |
//! | 47 | solve | unknown `--method` | `sideways` |
//! | 48 | solve | profile file missing | `cannot read profile`, path |
//!
//! Elsewhere (not repeated here): moe-models/tests/bad_checkpoints.rs (missing, extra and mis-shaped
//! tensors, unsupported config values naming their keys, unknown model_type, missing weights file),
//! eval/tests/route_cli.rs (NaN, negative, unnormalised and ragged-width routing input, bad mask, empty
//! batch, unknown field, bad policy options), eval/tests/sweep_cli.rs (unknown method, unknown task,
//! budget outside (0, 1], unknown device, empty text).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tch::{Kind, Tensor};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../moe-models/tests/fixtures").join(rel)
}

/// A copy of a fixture checkpoint (config, weights, tokenizer) in `dir/name`.
fn copy_checkpoint(fixture_rel: &str, dir: &Path, name: &str) -> PathBuf {
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let src = fixture(fixture_rel).join(f);
        if src.exists() {
            std::fs::copy(&src, dst.join(f)).unwrap();
        }
    }
    dst
}

fn lite(dir: &Path, name: &str) -> PathBuf {
    copy_checkpoint("deepseek_v2/lite_yarn", dir, name)
}

fn edit_config(ckpt: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = ckpt.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(ckpt: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let p = ckpt.join("model.safetensors");
    let mut t = Tensor::read_safetensors(&p).unwrap();
    edit(&mut t);
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
    Tensor::write_safetensors(&refs, &p).unwrap();
}

fn eval(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eval"));
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().expect("run eval")
}

/// A failure: non-zero exit, no panic, every needle in stderr.
fn assert_clear_error(case: &str, o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{case}: succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{case}: panicked: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{case}: {err}");
    for n in needles {
        assert!(err.contains(n), "{case}: stderr lacks {n:?}: {err}");
    }
}

/// Snapshot of every file under `dir` (relative path, bytes), or `None` if `dir` does not exist.
fn snapshot(dir: &Path) -> Option<Vec<(PathBuf, Vec<u8>)>> {
    if !dir.exists() {
        return None;
    }
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    Some(out)
}

/// `eval logits` on `ckpt`; expects a clear error and no output file (nor its temporary).
fn logits_fails(case: &str, ckpt: &Path, tokens: &str, needles: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("logits.safetensors");
    let o = eval(&["logits", "--tokens", tokens], &[("--model", ckpt), ("--out", &out)]);
    assert_clear_error(case, &o, needles);
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{case}: left partial output {left:?}");
}

fn text_file(dir: &Path) -> PathBuf {
    // The fixture's tokenizer maps printable ASCII characters one to one.
    let text: String = (0..600).map(|i| char::from(b'a' + ((i * 7 + i / 13) % 26) as u8)).collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).unwrap();
    p
}

/// A small, fast sweep: the full model only, no profile, no speed.
const SMALL: [&str; 11] =
    ["sweep", "--methods", "full", "--budgets", "1.0", "--seq-len", "32", "--calib-tokens", "64", "--eval-tokens", "64"];

/// `eval sweep` with `SMALL` settings plus `extra`; expects a clear error and `out` as it was before.
fn sweep_fails(case: &str, ckpt: &Path, heldout: &Path, out: &Path, extra: &[&str], needles: &[&str]) {
    let before = snapshot(out);
    let mut args: Vec<&str> = SMALL.to_vec();
    args.push("--no-speed");
    args.extend_from_slice(extra);
    let o = eval(&args, &[("--model", ckpt), ("--heldout", heldout), ("--out", out)]);
    assert_clear_error(case, &o, needles);
    assert_eq!(snapshot(out), before, "{case}: the output directory changed");
}

#[test]
fn malformed_config_json_is_named_with_the_position() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "bad_json");
    std::fs::write(c.join("config.json"), "{\"model_type\": \"deepseek_v2\", \"hidden_size\": }").unwrap();
    logits_fails("1 malformed config", &c, "1 2", &["config.json", "line 1"]);

    let c = lite(d.path(), "truncated");
    let text = std::fs::read(c.join("config.json")).unwrap();
    std::fs::write(c.join("config.json"), &text[..text.len() / 2]).unwrap();
    logits_fails("2 truncated config", &c, "1 2", &["config.json", "EOF"]);

    let c = lite(d.path(), "absent");
    std::fs::remove_file(c.join("config.json")).unwrap();
    logits_fails("3 absent config", &c, "1 2", &["config.json"]);

    let c = lite(d.path(), "no_type");
    edit_config(&c, |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    logits_fails("4 no model_type", &c, "1 2", &["model_type", "missing"]);
}

#[test]
fn config_value_of_the_wrong_type_names_the_key() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "string_hidden");
    edit_config(&c, |v| v["hidden_size"] = "32".into());
    logits_fails("5 hidden_size string", &c, "1 2", &["hidden_size", "invalid type"]);

    let c = lite(d.path(), "negative_k");
    edit_config(&c, |v| v["num_experts_per_tok"] = (-3).into());
    logits_fails("6 negative k", &c, "1 2", &["num_experts_per_tok"]);

    let c = lite(d.path(), "string_factor");
    edit_config(&c, |v| v["rope_scaling"]["factor"] = "forty".into());
    logits_fails("7 rope factor string", &c, "1 2", &["factor"]);
}

#[test]
fn inconsistent_dimensions_name_the_keys() {
    let d = tempfile::tempdir().unwrap();
    let c = copy_checkpoint("mixtral/gqa_window", d.path(), "heads");
    edit_config(&c, |v| v["hidden_size"] = 30.into());
    logits_fails("8 hidden not divisible by heads", &c, "1 2", &["hidden_size", "num_attention_heads"]);

    let c = lite(d.path(), "k_above_e");
    edit_config(&c, |v| v["num_experts_per_tok"] = 9.into());
    logits_fails("9 k above experts", &c, "1 2", &["num_experts_per_tok", "1..=8"]);

    let c = lite(d.path(), "layers");
    edit_config(&c, |v| v["num_hidden_layers"] = 4.into());
    logits_fails("10 more layers than tensors", &c, "1 2", &["missing tensor", "model.layers.3"]);

    let c = lite(d.path(), "vocab");
    edit_config(&c, |v| v["vocab_size"] = 100.into());
    logits_fails("11 vocab_size vs embedding", &c, "1 2", &["model.embed_tokens.weight", "[96, 32]"]);
}

#[test]
fn wrong_dtype_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "dtype");
    let name = "model.layers.1.mlp.gate.weight";
    edit_tensors(&c, |t| {
        for (n, x) in t.iter_mut() {
            if n == name {
                *x = x.to_kind(Kind::Int);
            }
        }
    });
    logits_fails("12 i32 tensor", &c, "1 2", &[name, "I32"]);
}

#[test]
fn broken_safetensors_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "truncated");
    let st = c.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    logits_fails("13 truncated safetensors", &c, "1 2", &["model.safetensors", "outside the file"]);

    let c = lite(d.path(), "garbage_header");
    let st = c.join("model.safetensors");
    let mut b = bytes.clone();
    b[8..64].fill(0xff);
    std::fs::write(&st, &b).unwrap();
    logits_fails("14 garbage header", &c, "1 2", &["model.safetensors"]);

    let c = lite(d.path(), "huge_header");
    let st = c.join("model.safetensors");
    let mut b = bytes.clone();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&st, &b).unwrap();
    logits_fails("15 header length past the end", &c, "1 2", &["model.safetensors"]);

    let c = lite(d.path(), "empty");
    std::fs::write(c.join("model.safetensors"), b"").unwrap();
    logits_fails("16 empty safetensors", &c, "1 2", &["model.safetensors"]);
}

/// Split the lite fixture into two shards and an index; `edit` changes the index JSON text.
fn sharded(dir: &Path, name: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let c = lite(dir, name);
    let st = c.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&st).unwrap();
    std::fs::remove_file(&st).unwrap();
    let (a, b): (Vec<_>, Vec<_>) = tensors.iter().partition(|(n, _)| n.starts_with("model.layers.0") || n.starts_with("model.embed"));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
        let refs: Vec<(&str, &Tensor)> = part.iter().map(|(n, x)| (n.as_str(), x)).collect();
        Tensor::write_safetensors(&refs, c.join(file)).unwrap();
        for (n, _) in part.iter() {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map}).to_string();
    std::fs::write(c.join("model.safetensors.index.json"), edit(index)).unwrap();
    c
}

#[test]
fn broken_shard_index_is_named() {
    let d = tempfile::tempdir().unwrap();
    // The well-formed sharded copy loads (so the cases below fail for their own reason).
    let ok = sharded(d.path(), "ok", |s| s);
    let out = d.path().join("ok.safetensors");
    let o = eval(&["logits", "--tokens", "1 2"], &[("--model", &ok), ("--out", &out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let c = sharded(d.path(), "not_json", |_| "weight_map = nope".into());
    logits_fails("17 index not JSON", &c, "1 2", &["model.safetensors.index.json"]);

    let c = sharded(d.path(), "truncated", |s| s[..s.len() / 2].to_string());
    logits_fails("18 index truncated", &c, "1 2", &["model.safetensors.index.json", "EOF"]);

    let c = sharded(d.path(), "missing_shard", |s| s);
    std::fs::remove_file(c.join("model-00002-of-00002.safetensors")).unwrap();
    logits_fails("19 missing shard", &c, "1 2", &["model-00002-of-00002.safetensors"]);

    let name = "model.embed_tokens.weight";
    let c = sharded(d.path(), "wrong_shard", |s| {
        s.replace(&format!("\"{name}\":\"model-00001-of-00002.safetensors\""), &format!("\"{name}\":\"model-00002-of-00002.safetensors\""))
    });
    logits_fails("20 tensor in the wrong shard", &c, "1 2", &[name, "does not hold it"]);

    let c = sharded(d.path(), "no_weight_map", |s| s.replace("weight_map", "weights"));
    logits_fails("21 index without weight_map", &c, "1 2", &["weight_map"]);
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "m");
    logits_fails("22 id = vocab_size", &c, "1 96", &["id 96", "outside the vocabulary"]);
    logits_fails("23 id not a number", &c, "1 two", &["`two` is not an integer"]);
}

#[test]
fn tokenizer_that_does_not_match_the_vocabulary_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    // Shift every tokenizer id by 64: the fixture's vocab_size is 96, so letters map past it.
    let c = lite(d.path(), "shifted");
    let p = c.join("tokenizer.json");
    let mut tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    for (_, id) in tok["model"]["vocab"].as_object_mut().unwrap().iter_mut() {
        *id = (id.as_u64().unwrap() + 64).into();
    }
    std::fs::write(&p, tok.to_string()).unwrap();
    let out = d.path().join("res_shifted");
    sweep_fails("24 tokenizer ids past vocab_size", &c, &text, &out, &[], &["tokenizer.json", "vocab_size 96", "token id"]);

    let c = lite(d.path(), "tok_garbage");
    std::fs::write(c.join("tokenizer.json"), "{\"model\": 3").unwrap();
    let out = d.path().join("res_garbage");
    sweep_fails("25 tokenizer not JSON", &c, &text, &out, &[], &["tokenizer.json"]);
}

#[test]
fn unusable_text_files_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "m");
    let out = d.path().join("res");
    let bin = d.path().join("bin.txt");
    std::fs::write(&bin, [b'a', b'b', 0, 1, 2, 0xff, b'c']).unwrap();
    sweep_fails("26 binary text", &c, &bin, &out, &[], &["looks binary", "bin.txt"]);

    let latin1 = d.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    sweep_fails("27 not UTF-8", &c, &latin1, &out, &[], &["not valid UTF-8", "latin1.txt"]);

    let short = d.path().join("short.txt");
    std::fs::write(&short, "abc").unwrap();
    sweep_fails("28 too short", &c, &short, &out, &[], &["too few for one sequence"]);

    let missing = d.path().join("missing.txt");
    sweep_fails("29 missing text", &c, &missing, &out, &[], &["cannot read text file", "missing.txt"]);

    let text = text_file(d.path());
    let task = format!("heldout,text:{}", d.path().join("nowhere.txt").display());
    sweep_fails("30 text task missing", &c, &text, &out, &["--tasks", &task], &["cannot read text file", "nowhere.txt"]);
}

#[test]
fn output_directory_that_cannot_be_created_is_named() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "m");
    let text = text_file(d.path());
    // Tests may run as root, which ignores permission bits: a path under a regular file is unwritable.
    let blocker = d.path().join("a_file");
    std::fs::write(&blocker, "not a directory").unwrap();
    let out = blocker.join("sub");
    sweep_fails("31 unwritable --out", &c, &text, &out, &[], &["cannot create results directory", "a_file/sub"]);
    assert_eq!(std::fs::read_to_string(&blocker).unwrap(), "not a directory");
}

#[test]
fn bad_sweep_spec_and_settings_are_named() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "m");
    let text = text_file(d.path());
    let out = d.path().join("res");
    let spec = d.path().join("spec.toml");
    std::fs::write(&spec, "methodz = [\"full\"]\n").unwrap();
    let spec_s = spec.to_str().unwrap();
    sweep_fails("32 spec unknown field", &c, &text, &out, &["--spec", spec_s], &["unknown field", "methodz", "spec.toml"]);
    std::fs::write(&spec, "methods = [\"full\"\n").unwrap();
    sweep_fails("33 spec not TOML", &c, &text, &out, &["--spec", spec_s], &["spec.toml"]);
    sweep_fails("36 unknown renormalize", &c, &text, &out, &["--renormalize", "sometimes"], &["sometimes"]);
}

#[test]
fn corrupt_results_or_stale_profile_in_the_output_directory_are_left_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let c = lite(d.path(), "m");
    let text = text_file(d.path());
    let out = d.path().join("res");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.jsonl"), "{\"schema_version\": 1, \"run_id\": \"x\"\n").unwrap();
    sweep_fails("34 torn results line", &c, &text, &out, &[], &["results.jsonl line 1"]);

    let out = d.path().join("res2");
    std::fs::create_dir_all(&out).unwrap();
    let profile = serde_json::json!({"schema_version": 1, "model": "m", "metric": "delta_nll", "full_k": 3,
        "layers": [{"layer": 1, "k": [1, 2, 3], "delta": [0.3, 0.1, 0.0]}]});
    std::fs::write(out.join("profile-m.json"), profile.to_string()).unwrap();
    let args = ["--methods", "full,alloc-l", "--budgets", "1.0,0.67"];
    sweep_fails("35 stale profile", &c, &text, &out, &args, &["profile-m.json", "does not match the model's MoE layers"]);
}

fn solve_fails(case: &str, profile_text: Option<&str>, args: &[&str], needles: &[&str]) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("profile.json");
    if let Some(t) = profile_text {
        std::fs::write(&p, t).unwrap();
    }
    let mut a = vec!["solve", "--json"];
    a.extend_from_slice(args);
    let o = eval(&a, &[("--profile", &p)]);
    assert_clear_error(case, &o, needles);
    assert!(o.stdout.is_empty(), "{case}: printed {}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn bad_profiles_and_budgets_are_rejected_by_solve() {
    let layer = |l: u32, k: &str, delta: &str| format!(r#"{{"layer": {l}, "k": {k}, "delta": {delta}}}"#);
    let profile = |layers: &[String]| {
        format!(r#"{{"schema_version": 1, "model": "m", "metric": "delta_nll", "full_k": 2, "layers": [{}]}}"#, layers.join(","))
    };
    let good = profile(&[layer(1, "[1, 2]", "[0.5, 0.0]"), layer(2, "[1, 2]", "[0.2, 0.0]")]);
    let budget = ["--budget", "3"];
    // The good profile solves (the cases below fail for their own reason).
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("good.json");
    std::fs::write(&p, &good).unwrap();
    assert!(eval(&["solve", "--budget", "3"], &[("--profile", &p)]).status.success());

    solve_fails("37 NaN delta", Some(&profile(&[layer(1, "[1, 2]", "[NaN, 0.0]")])), &budget, &["profile.json", "line"]);
    solve_fails("38 infinite delta", Some(&profile(&[layer(1, "[1, 2]", "[1e999, 0.0]")])), &budget, &["profile.json"]);
    let dup = profile(&[layer(1, "[1, 2]", "[0.5, 0.0]"), layer(1, "[1, 2]", "[0.2, 0.0]")]);
    solve_fails("39 duplicate layer", Some(&dup), &budget, &["layer 1 appears more than once"]);
    solve_fails("40 no layers", Some(&profile(&[])), &budget, &["no layers"]);
    let no_delta = profile(&[r#"{"layer": 1, "k": [1, 2]}"#.to_string()]);
    solve_fails("41 layer without delta", Some(&no_delta), &budget, &["delta"]);
    solve_fails("42 k/delta lengths", Some(&profile(&[layer(1, "[1, 2]", "[0.5]")])), &budget, &["2 k values but 1 deltas"]);
    solve_fails("43 k not increasing", Some(&profile(&[layer(1, "[2, 1]", "[0.5, 0.0]")])), &budget, &["strictly increasing"]);
    solve_fails("44 schema version", Some(&good.replace("\"schema_version\": 1", "\"schema_version\": 2")), &budget, &["schema_version 2"]);
    solve_fails("45 infeasible budget", Some(&good), &["--budget", "1"], &["infeasible", "adds up to 2"]);
    solve_fails("46 budget not a number", Some(&good), &["--budget", "abc"], &["abc"]);
    solve_fails("47 unknown method", Some(&good), &["--budget", "3", "--method", "sideways"], &["sideways"]);
    solve_fails("48 missing profile", None, &budget, &["cannot read profile", "profile.json"]);
}
