//! Qwen2-MoE and Mixtral against transformers 5.17.0: tiny random checkpoints and reference outputs built by
//! `scripts/make_golden_qwen2_moe_mixtral.py` (its docstring lists what each case exercises). Router ids must
//! match exactly, f32 logits within rtol 1e-4 / atol 1e-5; cached incremental decode must equal the uncached
//! forward. Also: the committed trained checkpoints `models/qwen2-moe-tiny` and `models/mixtral-tiny` load
//! and reproduce their cards' transformers NLL.

mod common;

use alloc_token::device::DeviceTopK;
use common::{check_cached_decode, compare, fixture_dir, Golden, ATOL, RTOL};
use moe_models::{ForwardCtx, KvCache, MlaPath, Model, Renormalize, RoutingTrace};
use tch::{Device, Kind, Tensor};

/// (family, case, MoE layers).
const CASES: [(&str, &str, &[usize]); 4] = [
    ("qwen2_moe", "shared_dense_raw", &[0, 2, 3]),
    ("qwen2_moe", "sparse_step_norm_window", &[1, 3]),
    ("mixtral", "gqa_window", &[0, 1, 2]),
    ("mixtral", "mqa_head_dim_top3", &[0, 1]),
];

fn golden(family: &str, case: &str) -> Golden {
    Golden::load(&fixture_dir(family, case))
}

#[test]
fn logits_match_transformers_within_rtol_1e4() {
    for (family, case, _) in CASES {
        let g = golden(family, case);
        let policy = g.policy();
        let out = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()));
        let (err, ok) = compare(&out, g.get("logits"), g.mask(), RTOL, ATOL);
        eprintln!("{family}/{case}: max |logit error| {err:.3e}");
        assert!(ok, "{family}/{case}: logits differ from transformers (max abs err {err:.3e})");
    }
}

#[test]
fn topk_policy_reproduces_hf_router_ids_exactly() {
    for (family, case, moe_layers) in CASES {
        let g = golden(family, case);
        assert_eq!(g.model.info().moe_layers, moe_layers, "{family}/{case}");
        let policy = g.policy();
        let mut trace = RoutingTrace::new();
        let _ = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()).with_trace(&mut trace));
        let routes = trace.take();
        assert_eq!(routes.iter().map(|r| r.layer).collect::<Vec<_>>(), moe_layers, "{family}/{case}");
        for r in routes {
            assert_eq!(&r.ids, g.get(&format!("router_ids.layer{}", r.layer)), "{family}/{case}: layer {} ids", r.layer);
            assert_eq!(r.probs.size(), vec![g.ids().numel() as i64, g.model.info().n_routed_experts as i64]);
        }
    }
}

#[test]
fn cached_decode_equals_uncached_forward() {
    for (family, case, _) in CASES {
        check_cached_decode(&golden(family, case), &format!("{family}/{case}"), MlaPath::Auto);
    }
}

/// Logits of `g` under renormalisation option `r` (no padding mask: all tokens count).
fn run(g: &Golden, r: Renormalize) -> Tensor {
    let policy = g.policy();
    g.logits(&mut ForwardCtx::new(&policy).with_renormalize(r))
}

#[test]
fn renormalize_native_follows_norm_topk_prob_in_qwen2_moe_and_always_in_mixtral() {
    // (family, case, native renormalises)
    for (family, case, renorm) in [
        ("qwen2_moe", "shared_dense_raw", false),
        ("qwen2_moe", "sparse_step_norm_window", true),
        ("mixtral", "gqa_window", true),
    ] {
        let g = golden(family, case);
        let native = run(&g, Renormalize::Native);
        let (same, other) = if renorm { (Renormalize::Always, Renormalize::Never) } else { (Renormalize::Never, Renormalize::Always) };
        assert!(native.allclose(&run(&g, same), 0.0, 0.0, false), "{family}/{case}: native != {same:?}");
        assert!(!native.allclose(&run(&g, other), 1e-3, 1e-3, false), "{family}/{case}: {other:?} changes nothing");
    }
}

#[test]
fn mixtral_top1_gives_the_surviving_expert_weight_one_natively() {
    // With k = 1, renormalising makes the single chosen expert's weight exactly 1: Native == Always,
    // and Never (raw probability < 1) differs.
    let g = golden("mixtral", "mqa_head_dim_top3");
    let k1 = DeviceTopK { k: 1 };
    let at = |r| g.logits(&mut ForwardCtx::new(&k1).with_renormalize(r));
    let native = at(Renormalize::Native);
    assert!(native.allclose(&at(Renormalize::Always), 0.0, 0.0, false));
    assert!(!native.allclose(&at(Renormalize::Never), 1e-3, 1e-3, false));
}

#[test]
fn sliding_window_fixtures_depend_on_the_window() {
    for (family, case) in [("mixtral", "gqa_window"), ("qwen2_moe", "sparse_step_norm_window")] {
        let mut g = golden(family, case);
        let window = match &mut g.model {
            Model::Mixtral(m) => m.decoder.sliding_window.take(),
            Model::Qwen2Moe(m) => m.decoder.sliding_window.take(),
            _ => None,
        };
        assert!(window.is_some_and(|w| w < g.ids().size()[1]), "{family}/{case}: window shorter than the sequence");
        let policy = g.policy();
        let out = g.logits(&mut ForwardCtx::new(&policy).with_mask(g.mask()));
        let (_, ok) = compare(&out, g.get("logits"), g.mask(), RTOL, ATOL);
        assert!(!ok, "{family}/{case}: without the window the logits must differ from transformers'");
    }
}

#[test]
fn gqa_cache_holds_kv_heads_not_query_heads() {
    let g = golden("mixtral", "gqa_window");
    let policy = g.policy();
    let mut cache = KvCache::new();
    let ids = g.ids().narrow(1, 0, 5);
    let _ = g.model.forward_hidden(&ids, &mut ForwardCtx::new(&policy).with_cache(&mut cache)).expect("prefill");
    let (k, v) = cache.layer(0).expect("layer 0 cached");
    assert_eq!(k.size(), vec![2, 5, 2, 8], "(b, s, kv_heads, head_dim)");
    assert_eq!(v.size(), k.size());
    assert_eq!(g.model.info().kv_values_per_token_per_layer, 2 * 2 * 8);
    let g = golden("mixtral", "mqa_head_dim_top3");
    assert_eq!(g.model.info().kv_values_per_token_per_layer, 2 * 12, "one kv head of head_dim 12");
}

#[test]
fn qwen2_moe_info_counts_the_shared_expert_outside_the_budget() {
    let g = golden("qwen2_moe", "shared_dense_raw");
    let info = g.model.info();
    assert_eq!((info.model_type.as_str(), info.n_routed_experts, info.n_shared_experts, info.native_k), ("qwen2_moe", 8, 1, 3));
    assert_eq!(info.full_budget(), 9, "3 MoE layers x top-3; the dense layer and the shared expert are outside");
}

#[test]
fn random_weights_build_at_the_config_shapes_and_run() {
    for (family, case, moe_layers) in CASES {
        let cfg = fixture_dir(family, case).join("config.json");
        let m = moe_models::load_random(&cfg, Device::Cpu, Kind::Float, 0.02, 0).expect("random model");
        assert_eq!(m.info().moe_layers, moe_layers);
        let policy = DeviceTopK { k: 2 };
        let h = m.forward_hidden(&Tensor::from_slice2(&[[3i64, 4, 5]]), &mut ForwardCtx::new(&policy)).expect("fwd");
        assert_eq!(h.size(), vec![1, 3, 32]);
    }
}
