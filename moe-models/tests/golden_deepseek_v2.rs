//! DeepSeek-V2 against transformers 5.17.0: tiny random checkpoints and reference outputs built by
//! `scripts/make_golden_deepseek_v2.py` (see its docstring for the cases and the reference corrections).
//! Router ids must match exactly, f32 logits within rtol 1e-4 / atol 1e-5; cached incremental decode must
//! equal the uncached forward.

mod common;

use alloc_token::device::DeviceTopK;
use common::{compare, fixture_dir, Golden, ATOL, RTOL};
use moe_models::{deepseek_v2, Dispatch, ForwardCtx, KvCache, MlaPath, Renormalize, RoutingTrace};
use tch::{Device, Kind, Tensor};

const CASES: [&str; 3] = ["lite_yarn", "v2_group_limited", "norm_topk_yarn_long"];

fn dir(case: &str) -> std::path::PathBuf {
    fixture_dir("deepseek_v2", case)
}

fn golden(case: &str) -> Golden {
    Golden::load(&dir(case))
}

fn config(case: &str) -> deepseek_v2::Config {
    serde_json::from_str(&std::fs::read_to_string(dir(case).join("config.json")).expect("config")).expect("parse")
}

fn logits(g: &Golden, ctx: &mut ForwardCtx<'_>) -> Tensor {
    g.logits(ctx)
}

#[test]
fn logits_match_transformers_within_rtol_1e4() {
    for case in CASES {
        let g = golden(case);
        let policy = g.policy();
        let mut ctx = ForwardCtx::new(&policy).with_mask(g.mask());
        let out = logits(&g, &mut ctx);
        let (err, ok) = compare(&out, g.get("logits"), g.mask(), RTOL, ATOL);
        eprintln!("{case}: max |logit error| {err:.3e}");
        assert!(ok, "{case}: logits differ from transformers (max abs err {err:.3e})");
    }
}

#[test]
fn topk_policy_reproduces_hf_router_ids_exactly() {
    for case in CASES {
        let g = golden(case);
        let policy = g.policy();
        let mut trace = RoutingTrace::new();
        let mut ctx = ForwardCtx::new(&policy).with_mask(g.mask()).with_trace(&mut trace);
        let _ = logits(&g, &mut ctx);
        let routes = trace.take();
        assert_eq!(routes.iter().map(|r| r.layer).collect::<Vec<_>>(), g.model.info().moe_layers, "{case}");
        for r in routes {
            let want = g.get(&format!("router_ids.layer{}", r.layer));
            assert_eq!(&r.ids, want, "{case}: layer {} router ids", r.layer);
            let (n, e) = (r.probs.size()[0], r.probs.size()[1]);
            assert_eq!((n, e), (g.ids().numel() as i64, g.model.info().n_routed_experts as i64));
            assert_eq!(r.probs.kind(), Kind::Float);
        }
    }
}

#[test]
fn softmax_scale_carries_the_yarn_mscale_squared_factor_like_transformers() {
    for case in CASES {
        let g = golden(case);
        let c = config(case);
        let want = g.get("softmax_scale").double_value(&[0]);
        let got = c.softmax_scale().expect("scale");
        assert!((got - want).abs() < 1e-12, "{case}: {got} vs {want}");
        let af = c.rope().expect("rope").inv_freq(c.qk_rope_head_dim).1;
        let want = g.get("rope_attention_factor").double_value(&[0]);
        assert!((af - want).abs() < 1e-12, "{case}: cos/sin factor {af} vs {want}");
    }
    // The Lite-style case really has a non-trivial factor (mscale(40, 0.707)^2 ~ 1.59).
    let c = config("lite_yarn");
    let plain = (c.qk_head_dim() as f64).powf(-0.5);
    assert!(c.softmax_scale().expect("scale") / plain > 1.5);
}

fn check_cached_decode(case: &str, mla: MlaPath) {
    common::check_cached_decode(&golden(case), case, mla);
}

#[test]
fn cached_decode_with_absorbed_latent_attention_equals_uncached_forward() {
    for case in CASES {
        check_cached_decode(case, MlaPath::Auto);
    }
}

#[test]
fn cached_decode_with_expanded_attention_equals_uncached_forward() {
    check_cached_decode("norm_topk_yarn_long", MlaPath::Expanded);
}

#[test]
fn latent_cache_stores_kv_lora_rank_plus_rope_dim_per_token_per_layer() {
    let g = golden("lite_yarn");
    let cfg = config("lite_yarn");
    let policy = g.policy();
    let mut cache = KvCache::new();
    let ids = g.ids().narrow(1, 0, 5);
    let _ = g.model.forward_hidden(&ids, &mut ForwardCtx::new(&policy).with_cache(&mut cache)).expect("prefill");
    let (c, k) = cache.layer(0).expect("layer 0 cached");
    assert_eq!(c.size(), vec![2, 5, cfg.kv_lora_rank as i64]);
    assert_eq!(k.size(), vec![2, 5, cfg.qk_rope_head_dim as i64]);
    let per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers;
    assert_eq!(cache.bytes(), 2 * 5 * per_token * 4);
    assert_eq!(g.model.info().kv_values_per_token_per_layer, cfg.kv_lora_rank + cfg.qk_rope_head_dim);
}

#[test]
fn absorbed_and_expanded_mla_agree_on_a_full_forward() {
    let g = golden("v2_group_limited");
    let policy = g.policy();
    let a = logits(&g, &mut ForwardCtx::new(&policy).with_mla(MlaPath::Absorbed));
    let b = logits(&g, &mut ForwardCtx::new(&policy).with_mla(MlaPath::Expanded));
    assert!(a.allclose(&b, 1e-4, 1e-4, false));
}

#[test]
fn grouped_mm_and_per_expert_dispatch_give_the_same_logits() {
    for case in CASES {
        let g = golden(case);
        let policy = g.policy();
        let a = logits(&g, &mut ForwardCtx::new(&policy).with_mask(g.mask()).with_dispatch(Dispatch::Grouped));
        let b = logits(&g, &mut ForwardCtx::new(&policy).with_mask(g.mask()).with_dispatch(Dispatch::PerExpert));
        let (err, ok) = compare(&a, &b, g.mask(), RTOL, ATOL);
        assert!(ok, "{case}: dispatch paths differ ({err:.3e})");
    }
}

#[test]
fn renormalize_option_switches_the_mixing_rule() {
    // norm_topk_prob true: native == always; never (raw probs x 3.0) differs.
    let g = golden("norm_topk_yarn_long");
    let policy = g.policy();
    let run = |r| logits(&g, &mut ForwardCtx::new(&policy).with_mask(g.mask()).with_renormalize(r));
    let native = run(Renormalize::Native);
    assert!(native.allclose(&run(Renormalize::Always), 0.0, 0.0, false));
    assert!(!native.allclose(&run(Renormalize::Never), 1e-3, 1e-3, false));
    // norm_topk_prob false: native == never.
    let g = golden("v2_group_limited");
    let policy = g.policy();
    let run = |r| logits(&g, &mut ForwardCtx::new(&policy).with_renormalize(r));
    assert!(run(Renormalize::Native).allclose(&run(Renormalize::Never), 0.0, 0.0, false));
}

#[test]
fn reduced_k_policy_changes_routing_width_and_logits() {
    let g = golden("lite_yarn");
    let k1 = DeviceTopK { k: 1 };
    let mut trace = RoutingTrace::new();
    let out = logits(&g, &mut ForwardCtx::new(&k1).with_mask(g.mask()).with_trace(&mut trace));
    let routes = trace.take();
    assert!(routes.iter().all(|r| r.ids.size()[1] == 1));
    let (_, same) = compare(&out, g.get("logits"), g.mask(), RTOL, ATOL);
    assert!(!same, "top-1 must change the logits");
    // The top-1 id is the first of the native top-3.
    let full = g.get(&format!("router_ids.layer{}", routes[0].layer)).narrow(1, 0, 1);
    assert_eq!(routes[0].ids, full);
}

#[test]
fn token_nll_matches_full_logits_and_masks_padding() {
    let g = golden("norm_topk_yarn_long");
    let policy = g.policy();
    let nll = moe_models::token_nll(&g.model, g.ids(), &mut ForwardCtx::new(&policy).with_mask(g.mask()), 7)
        .expect("nll");
    let lg = g.get("logits");
    let t = lg.size()[1];
    let lp = lg.narrow(1, 0, t - 1).log_softmax(-1, Kind::Float);
    let want = -lp.gather(2, &g.ids().narrow(1, 1, t - 1).unsqueeze(-1), false).squeeze_dim(-1);
    let m = g.mask();
    let pair = m.narrow(1, 0, t - 1).ne(0).logical_and(&m.narrow(1, 1, t - 1).ne(0));
    let want = want * pair.to_kind(Kind::Float);
    assert!(nll.allclose(&want, 1e-4, 1e-4, false), "{nll} vs {want}");
}

#[test]
fn random_weights_build_at_the_config_shapes_and_run() {
    let cfg = dir("v2_group_limited").join("config.json");
    let m = moe_models::load_random(&cfg, Device::Cpu, Kind::Float, 0.02, 0).expect("random model");
    assert_eq!(m.info().moe_layers, vec![2, 3]);
    let policy = DeviceTopK { k: 4 };
    let h = m.forward_hidden(&Tensor::from_slice2(&[[3i64, 4, 5]]), &mut ForwardCtx::new(&policy)).expect("fwd");
    assert_eq!(h.size(), vec![1, 3, 32]);
}

#[test]
fn fixture_tokenizer_round_trips_text() {
    let tok = moe_models::load_tokenizer(&dir("lite_yarn")).expect("tokenizer.json");
    let enc = tok.encode("Hi there", false).expect("encode");
    assert_eq!(enc.get_ids().len(), 8, "character level");
    assert!(enc.get_ids().iter().all(|&i| (i as usize) < 96));
    assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), "Hi there");
    let e = moe_models::load_tokenizer(&dir("v2_group_limited")).expect_err("no tokenizer.json there");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}
