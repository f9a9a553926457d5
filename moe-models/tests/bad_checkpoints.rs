//! Broken checkpoints and unsupported configs fail with errors that name the tensor or the config key.

use std::path::{Path, PathBuf};

use moe_models::Error;
use tch::{Device, Kind, Tensor};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek_v2/v2_group_limited")
}

/// A copy of the fixture whose tensors and config went through `edit_tensors` / `edit_config`.
fn variant(
    edit_tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
    edit_config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tensors = Tensor::read_safetensors(fixture().join("model.safetensors")).expect("read");
    edit_tensors(&mut tensors);
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, dir.path().join("model.safetensors")).expect("write");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).expect("config")).expect("json");
    edit_config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write config");
    dir
}

fn load(dir: &Path) -> moe_models::Result<moe_models::Model> {
    moe_models::load(dir, Device::Cpu, Kind::Float)
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let d = variant(|_| {}, edit);
    let e = load(d.path()).expect_err("config must be rejected");
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn missing_expert_tensor_is_named() {
    let name = "model.layers.3.mlp.experts.7.up_proj.weight";
    let d = variant(|t| t.retain(|(n, _)| n != name), |_| {});
    let e = load(d.path()).expect_err("missing");
    assert!(matches!(e, Error::MissingTensor { .. }) && e.to_string().contains(name), "{e}");
}

#[test]
fn extra_tensor_is_named_as_unused() {
    let name = "model.layers.0.mlp.bogus.weight";
    let d = variant(|t| t.push((name.into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))), |_| {});
    let e = load(d.path()).expect_err("extra");
    assert!(matches!(&e, Error::UnusedTensors { names } if names == &vec![name.to_string()]), "{e}");
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let d = variant(
        |t| {
            for (n, x) in t.iter_mut() {
                if n == name {
                    *x = x.narrow(0, 0, 8).contiguous();
                }
            }
        },
        |_| {},
    );
    let e = load(d.path()).expect_err("shape");
    let s = e.to_string();
    assert!(matches!(e, Error::ShapeMismatch { .. }) && s.contains(name) && s.contains("[8, 16]"), "{s}");
}

#[test]
fn sigmoid_scoring_func_is_rejected_naming_the_key() {
    assert!(config_error(|c| c["scoring_func"] = "sigmoid".into()).contains("scoring_func"));
}

#[test]
fn unknown_topk_method_is_rejected_naming_the_key() {
    assert!(config_error(|c| c["topk_method"] = "noaux_tc".into()).contains("topk_method"));
}

#[test]
fn group_limit_that_cannot_hold_k_experts_is_rejected() {
    // 1 group of 4 experts cannot hold 5 experts per token; more groups than exist is nonsense.
    let s = config_error(|c| {
        c["topk_group"] = 1.into();
        c["num_experts_per_tok"] = 5.into();
    });
    assert!(s.contains("topk_group"), "{s}");
    assert!(config_error(|c| c["topk_group"] = 5.into()).contains("topk_group"));
}

#[test]
fn unimplemented_rope_scaling_type_is_rejected_naming_the_key() {
    let s = config_error(|c| c["rope_scaling"] = serde_json::json!({"type": "dynamic", "factor": 2.0}));
    assert!(s.contains("rope_scaling.type"), "{s}");
}

#[test]
fn other_unsupported_values_name_their_keys() {
    assert!(config_error(|c| c["hidden_act"] = "gelu".into()).contains("hidden_act"));
    assert!(config_error(|c| c["num_key_value_heads"] = 2.into()).contains("num_key_value_heads"));
    assert!(config_error(|c| c["attention_bias"] = true.into()).contains("attention_bias"));
    assert!(config_error(|c| c["quantization_config"] = serde_json::json!({"quant_method": "fp8"}))
        .contains("quantization_config"));
}

#[test]
fn unknown_model_type_is_rejected() {
    let d = variant(|_| {}, |c| c["model_type"] = "llama".into());
    let e = load(d.path()).expect_err("llama");
    assert!(matches!(e, Error::UnsupportedModel(ref t) if t == "llama"), "{e}");
}

#[test]
fn missing_weights_file_names_the_path() {
    let d = variant(|_| {}, |_| {});
    std::fs::remove_file(d.path().join("model.safetensors")).expect("rm");
    let e = load(d.path()).expect_err("no file");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn stacked_expert_layout_loads_like_the_hub_layout() {
    // transformers 5's fused layout: experts.gate_up_proj (e, 2i, h), experts.down_proj (e, h, i).
    let d = variant(
        |t| {
            let mut out: Vec<(String, Tensor)> = Vec::new();
            for layer in 2..4 {
                let p = format!("model.layers.{layer}.mlp.experts");
                let get = |n: String| t.iter().find(|(k, _)| *k == n).map(|(_, x)| x.shallow_clone()).expect("expert");
                let gu: Vec<Tensor> = (0..16)
                    .map(|j| Tensor::cat(&[get(format!("{p}.{j}.gate_proj.weight")), get(format!("{p}.{j}.up_proj.weight"))], 0))
                    .collect();
                let dn: Vec<Tensor> = (0..16).map(|j| get(format!("{p}.{j}.down_proj.weight"))).collect();
                out.push((format!("{p}.gate_up_proj"), Tensor::stack(&gu, 0)));
                out.push((format!("{p}.down_proj"), Tensor::stack(&dn, 0)));
            }
            t.retain(|(n, _)| !n.contains(".mlp.experts."));
            t.extend(out);
        },
        |_| {},
    );
    let a = load(d.path()).expect("stacked layout");
    let b = load(&fixture()).expect("hub layout");
    let policy = alloc_token::device::DeviceTopK { k: 4 };
    let ids = Tensor::from_slice2(&[[5i64, 9, 14, 3]]);
    let la = a.lm_head(&a.forward_hidden(&ids, &mut moe_models::ForwardCtx::new(&policy)).expect("a")).expect("a");
    let lb = b.lm_head(&b.forward_hidden(&ids, &mut moe_models::ForwardCtx::new(&policy)).expect("b")).expect("b");
    assert!(la.allclose(&lb, 0.0, 0.0, false));
}

#[test]
fn bf16_checkpoint_loads_as_f32_and_bf16() {
    let d = variant(|t| t.iter_mut().for_each(|(_, x)| *x = x.to_kind(Kind::BFloat16)), |_| {});
    let m = load(d.path()).expect("bf16 -> f32");
    assert_eq!(m.info().kind, Kind::Float);
    let m = moe_models::load(d.path(), Device::Cpu, Kind::BFloat16).expect("bf16");
    let policy = alloc_token::device::DeviceTopK { k: 4 };
    let h = m.forward_hidden(&Tensor::from_slice2(&[[5i64, 9]]), &mut moe_models::ForwardCtx::new(&policy)).expect("fwd");
    assert_eq!(h.kind(), Kind::BFloat16);
}
