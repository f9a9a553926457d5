//! OLMoE and Qwen3-MoE against transformers 5.17.0: tiny random checkpoints and reference outputs built by
//! `scripts/make_golden_olmoe_qwen3_moe.py` (its docstring lists what each case exercises). Router ids must
//! match exactly, f32 logits within rtol 1e-4 / atol 1e-5; cached incremental decode must equal the uncached
//! forward. Also: each special case (QK-norm scope, clip_qkv, the sliding window) changes the logits, the
//! fused expert layout loads like the hub's, and broken configs and tensors are named.

mod common;

use std::path::Path;

use alloc_token::device::DeviceTopK;
use common::{check_cached_decode, compare, fixture_dir, Golden, ATOL, RTOL};
use moe_models::layers::attention::GqaAttention;
use moe_models::layers::decoder::Decoder;
use moe_models::{Error, ForwardCtx, KvCache, MlaPath, Model, Renormalize, RoutingTrace};
use tch::{Device, Kind, Tensor};

/// (family, case, MoE layers, native renormalisation).
const CASES: [(&str, &str, &[usize], bool); 4] = [
    ("olmoe", "clip_gqa_raw", &[0, 1], false),
    ("olmoe", "mha_renorm", &[0, 1], true),
    ("qwen3_moe", "head_dim_dense_raw", &[0, 2], false),
    ("qwen3_moe", "sparse_step_renorm_window", &[1, 3], true),
];

fn golden(family: &str, case: &str) -> Golden {
    Golden::load(&fixture_dir(family, case))
}

/// The decoder of an OLMoE or Qwen3-MoE model, for switching one of its features off.
fn decoder(model: &mut Model) -> &mut Decoder<GqaAttention> {
    match model {
        Model::Olmoe(m) => &mut m.decoder,
        Model::Qwen3Moe(m) => &mut m.decoder,
        _ => panic!("not an OLMoE or Qwen3-MoE fixture"),
    }
}

/// Whether `g`'s logits (padding masked) still match transformers'.
fn matches_reference(g: &Golden) -> bool {
    let policy = g.policy();
    let out = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()));
    compare(&out, g.get("logits"), g.mask(), RTOL, ATOL).1
}

#[test]
fn prefill_logits_and_router_ids_match_transformers() {
    // One padded prefill per case, traced: the top-k policy must pick transformers' ids in every MoE layer
    // (exactly, in order), and the logits of real tokens must agree within rtol 1e-4 / atol 1e-5.
    for (family, case, moe_layers, _) in CASES {
        let name = format!("{family}/{case}");
        let g = golden(family, case);
        let (policy, mut trace) = (g.policy(), RoutingTrace::new());
        let logits = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()).with_trace(&mut trace));
        let (err, ok) = compare(&logits, g.get("logits"), g.mask(), RTOL, ATOL);
        eprintln!("{name}: max |logit error| {err:.3e}");
        assert!(ok, "{name}: logits differ from transformers (max abs err {err:.3e})");
        let (info, routes) = (g.model.info(), trace.take());
        assert_eq!((info.moe_layers.as_slice(), routes.len()), (moe_layers, moe_layers.len()), "{name}");
        for (r, &layer) in routes.iter().zip(moe_layers) {
            let want = g.get(&format!("router_ids.layer{layer}"));
            assert!(r.layer == layer && &r.ids == want, "{name}: layer {layer} ids {} != {want}", r.ids);
            assert_eq!(r.probs.size(), [g.ids().numel() as i64, info.n_routed_experts as i64], "{name}: (tokens, experts)");
        }
    }
}

#[test]
fn cached_decode_equals_uncached_forward() {
    for (family, case, _, _) in CASES {
        check_cached_decode(&golden(family, case), &format!("{family}/{case}"), MlaPath::Auto);
    }
}

#[test]
fn renormalize_native_follows_norm_topk_prob() {
    for (family, case, _, renorm) in CASES {
        let g = golden(family, case);
        let policy = g.policy();
        let run = |r| g.logits(&mut ForwardCtx::new(&policy).with_renormalize(r));
        let native = run(Renormalize::Native);
        let (same, other) = if renorm { (Renormalize::Always, Renormalize::Never) } else { (Renormalize::Never, Renormalize::Always) };
        assert!(native.allclose(&run(same), 0.0, 0.0, false), "{family}/{case}: native != {same:?}");
        assert!(!native.allclose(&run(other), 1e-3, 1e-3, false), "{family}/{case}: {other:?} changes nothing");
    }
}

#[test]
fn qk_norm_clip_and_window_each_change_the_logits() {
    // Each switched-off feature must break the match with transformers, so the fixtures depend on it.
    for (family, case) in [("olmoe", "clip_gqa_raw"), ("qwen3_moe", "head_dim_dense_raw")] {
        let mut g = golden(family, case);
        for layer in &mut decoder(&mut g.model).layers {
            assert!(layer.self_attn.qk_norm.take().is_some(), "{family}/{case}: every layer has a QK-norm");
        }
        assert!(!matches_reference(&g), "{family}/{case}: without the QK-norm the logits must differ");
    }
    let mut g = golden("olmoe", "clip_gqa_raw");
    for layer in &mut decoder(&mut g.model).layers {
        assert_eq!(layer.self_attn.clip_qkv.take(), Some(1.5));
    }
    assert!(!matches_reference(&g), "olmoe/clip_gqa_raw: without clip_qkv the logits must differ");
    let mut g = golden("qwen3_moe", "sparse_step_renorm_window");
    let d = decoder(&mut g.model);
    assert!(d.layers.iter().all(|l| l.self_attn.sliding), "Qwen3-MoE's window applies to every layer");
    assert_eq!(d.sliding_window.take(), Some(5));
    assert!(!matches_reference(&g), "qwen3_moe/sparse_step_renorm_window: without the window the logits must differ");
}

#[test]
fn info_counts_no_shared_experts_and_the_cache_holds_kv_heads_of_head_dim() {
    // (family, case, routed experts, native k, kv values per token per layer)
    for (family, case, e, k, kv) in [
        ("olmoe", "clip_gqa_raw", 10, 4, 2 * 2 * 4),
        ("olmoe", "mha_renorm", 8, 3, 2 * 4 * 4),
        ("qwen3_moe", "head_dim_dense_raw", 10, 4, 2 * 2 * 6),
        ("qwen3_moe", "sparse_step_renorm_window", 8, 2, 2 * 4), // one kv head
    ] {
        let g = golden(family, case);
        let info = g.model.info();
        let got = (info.model_type.as_str(), info.n_routed_experts, info.n_shared_experts, info.native_k, info.kv_values_per_token_per_layer);
        assert_eq!(got, (family, e, 0, k, kv), "{family}/{case}");
    }
    let g = golden("qwen3_moe", "head_dim_dense_raw");
    let policy = g.policy();
    let mut cache = KvCache::new();
    let _ = g.model.forward_hidden(&g.ids().narrow(1, 0, 5), &mut ForwardCtx::new(&policy).with_cache(&mut cache)).expect("prefill");
    let (k, v) = cache.layer(0).expect("layer 0 cached");
    assert_eq!(k.size(), vec![2, 5, 2, 6], "(b, s, kv_heads, head_dim)");
    assert_eq!(v.size(), k.size());
}

#[test]
fn random_weights_build_at_the_config_shapes_and_run() {
    for (family, case, moe_layers, _) in CASES {
        let cfg = fixture_dir(family, case).join("config.json");
        let m = moe_models::load_random(&cfg, Device::Cpu, Kind::Float, 0.02, 0).expect("random model");
        assert_eq!(m.info().moe_layers, moe_layers);
        let policy = DeviceTopK { k: 2 };
        let h = m.forward_hidden(&Tensor::from_slice2(&[[3i64, 4, 5]]), &mut ForwardCtx::new(&policy)).expect("fwd");
        assert_eq!(h.size(), vec![1, 3, 16]);
    }
}

/// A copy of fixture `family/case` with its tensors and config edited.
fn edited(
    family: &str,
    case: &str,
    tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
    config: impl FnOnce(&mut serde_json::Value),
) -> tempfile::TempDir {
    let (src, dir) = (fixture_dir(family, case), tempfile::tempdir().expect("tempdir"));
    let mut ts = Tensor::read_safetensors(src.join("model.safetensors")).expect("read");
    tensors(&mut ts);
    Tensor::write_safetensors(&ts.iter().map(|(n, t)| (n.as_str(), t)).collect::<Vec<_>>(), dir.path().join("model.safetensors"))
        .expect("write");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("config.json")).expect("config")).expect("json");
    config(&mut cfg);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write config");
    dir
}

fn load(dir: &Path) -> moe_models::Result<Model> {
    moe_models::load(dir, Device::Cpu, Kind::Float)
}

#[test]
fn fused_expert_layout_loads_like_the_hub_layout() {
    // transformers 5 saves `mlp.experts.gate_up_proj` (e, 2i, h) and `mlp.experts.down_proj` (e, h, i).
    let fuse = |ts: &mut Vec<(String, Tensor)>| {
        for layer in [0, 2] {
            let p = format!("model.layers.{layer}.mlp.experts.");
            let get = |ts: &Vec<(String, Tensor)>, n: String| ts.iter().find(|(m, _)| *m == n).expect("expert").1.shallow_clone();
            let gate_up: Vec<Tensor> = (0..10)
                .map(|j| Tensor::cat(&[get(ts, format!("{p}{j}.gate_proj.weight")), get(ts, format!("{p}{j}.up_proj.weight"))], 0))
                .collect();
            let down: Vec<Tensor> = (0..10).map(|j| get(ts, format!("{p}{j}.down_proj.weight"))).collect();
            ts.retain(|(n, _)| !n.starts_with(&p));
            ts.push((format!("{p}gate_up_proj"), Tensor::stack(&gate_up, 0)));
            ts.push((format!("{p}down_proj"), Tensor::stack(&down, 0)));
        }
    };
    let d = edited("qwen3_moe", "head_dim_dense_raw", fuse, |_| {});
    let fused = load(d.path()).expect("fused layout");
    let g = golden("qwen3_moe", "head_dim_dense_raw");
    let policy = g.policy();
    let h = fused.forward_hidden(g.ids(), &mut ForwardCtx::new(&policy).with_mask(g.mask())).expect("forward");
    let (err, ok) = compare(&fused.lm_head(&h).expect("head"), g.get("logits"), g.mask(), RTOL, ATOL);
    assert!(ok, "fused layout: max abs err {err:.3e}");
}

fn config_error(family: &str, case: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let d = edited(family, case, |_| {}, edit);
    let e = load(d.path()).expect_err("config must be rejected");
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn bad_configs_are_rejected_naming_the_key() {
    // OLMoE's q_norm is hidden_size wide: an explicit head_dim must be hidden_size / heads.
    assert!(config_error("olmoe", "clip_gqa_raw", |c| c["head_dim"] = 8.into()).contains("head_dim"));
    assert!(config_error("olmoe", "clip_gqa_raw", |c| c["clip_qkv"] = (-1.0).into()).contains("clip_qkv"));
    assert!(config_error("olmoe", "mha_renorm", |c| c["attention_bias"] = true.into()).contains("attention_bias"));
    assert!(config_error("olmoe", "mha_renorm", |c| c["num_experts_per_tok"] = 9.into()).contains("num_experts_per_tok"));
    assert!(config_error("qwen3_moe", "head_dim_dense_raw", |c| c["head_dim"] = 5.into()).contains("head_dim"));
    assert!(config_error("qwen3_moe", "head_dim_dense_raw", |c| c["num_key_value_heads"] = 3.into()).contains("num_key_value_heads"));
    assert!(config_error("qwen3_moe", "sparse_step_renorm_window", |c| c["decoder_sparse_step"] = 0.into()).contains("decoder_sparse_step"));
    assert!(config_error("qwen3_moe", "sparse_step_renorm_window", |c| c["sliding_window"] = 0.into()).contains("sliding_window"));
}

#[test]
fn qk_norm_tensors_are_named_when_missing_or_of_the_other_scope() {
    // A Qwen3-MoE k_norm must be head_dim wide (6), not the OLMoE-style kv_heads * head_dim (12).
    let name = "model.layers.1.self_attn.k_norm.weight";
    let widen = |ts: &mut Vec<(String, Tensor)>| {
        for (n, t) in ts.iter_mut() {
            if n == name {
                *t = Tensor::cat(&[t.shallow_clone(), t.shallow_clone()], 0);
            }
        }
    };
    let e = load(edited("qwen3_moe", "head_dim_dense_raw", widen, |_| {}).path()).expect_err("shape");
    assert!(matches!(e, Error::ShapeMismatch { .. }) && e.to_string().contains(name) && e.to_string().contains("[12]"), "{e}");
    let name = "model.layers.0.self_attn.q_norm.weight";
    let e = load(edited("olmoe", "clip_gqa_raw", |ts| ts.retain(|(n, _)| n != name), |_| {}).path()).expect_err("missing");
    assert!(matches!(e, Error::MissingTensor { .. }) && e.to_string().contains(name), "{e}");
}
