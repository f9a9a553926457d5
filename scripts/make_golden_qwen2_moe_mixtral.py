#!/usr/bin/env python3
"""Build tiny random Qwen2-MoE and Mixtral checkpoints and transformers' reference outputs for moe-models'
golden tests (moe-models/tests/golden_qwen2_moe_mixtral.rs).

Run with the project's venv (transformers pinned in scripts/requirements.txt):

    $HOME/.cache/alloc-moe/venv-torch-2.11.0/bin/python3 scripts/make_golden_qwen2_moe_mixtral.py

For each case it writes moe-models/tests/fixtures/<family>/<case>/:
  config.json         hub-style config (written here, read by transformers' from_pretrained)
  model.safetensors   hub-style weight names: per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight`
                      (Qwen2-MoE) or `block_sparse_moe.experts.{j}.{w1,w3,w2}.weight` (Mixtral)
  golden.safetensors  input_ids (b, t) i64, attention_mask (b, t) i64, logits (b, t, v) f32,
                      router_ids.layer{i} (b*t, k) i64 per MoE layer (each row by decreasing router
                      probability; -1 for padding tokens)
  (some cases) tokenizer.json, a character-level tokenizer for the CLI's generate command.

Cases (each family's special cases; every case has batch > 1 with padding):
  qwen2_moe/shared_dense_raw     norm_topk_prob false, mlp_only_layers [1] (a dense layer between MoE
                                 layers), shared expert with its sigmoid gate, q/k/v biases, right padding
  qwen2_moe/sparse_step_norm_window
                                 norm_topk_prob true, decoder_sparse_step 2 (MoE layers 1 and 3), GQA (2 kv
                                 heads), use_sliding_window with a window of 5 on transformers' default
                                 layer_types (layers 0 and 2 slide), left padding
  mixtral/gqa_window             GQA (2 kv heads for 4 query heads), sliding_window 6 shorter than the
                                 sequences, top-2 renormalised, left padding
  mixtral/mqa_head_dim_top3      one kv head, head_dim 12 != hidden/heads, top-3 of 6 renormalised, no
                                 sliding window, no rope_theta in config.json (Mixtral's default 1e6),
                                 right padding

The weights are saved in the hub's layout and read back with `from_pretrained`, so the reference also proves
transformers maps those names onto its fused experts. Seeds are fixed; a seed is rejected (and the next tried)
unless every valid token's router top-k is separated from the next expert by a clear margin, so that the Rust
port must pick exactly the same ids. No reference corrections are needed for these families.
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import MixtralForCausalLM, Qwen2MoeForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden_deepseek_v2 import check_pinned, hub_state_dict, randomize, reference_forward, save_golden  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe-models", "tests", "fixtures")

COMMON = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

QWEN2_MOE = dict(COMMON, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", intermediate_size=48,
                 moe_intermediate_size=16, shared_expert_intermediate_size=24, rms_norm_eps=1e-6, rope_theta=10000.0,
                 qkv_bias=True, router_aux_loss_coef=0.001)
MIXTRAL = dict(COMMON, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=16,
               rms_norm_eps=1e-5, router_jitter_noise=0.0, router_aux_loss_coef=0.02)

CASES = {
    ("qwen2_moe", "shared_dense_raw"): dict(
        base=QWEN2_MOE,
        cfg=dict(num_hidden_layers=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=3,
                 norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], use_sliding_window=False,
                 sliding_window=None),
        batch=[24, 17], padding="right", tokenizer=True),
    ("qwen2_moe", "sparse_step_norm_window"): dict(
        base=QWEN2_MOE,
        cfg=dict(num_hidden_layers=4, num_key_value_heads=2, num_experts=12, num_experts_per_tok=4,
                 norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[], use_sliding_window=True,
                 sliding_window=5, max_window_layers=3),
        batch=[30, 22, 19], padding="left"),
    ("mixtral", "gqa_window"): dict(
        base=MIXTRAL,
        cfg=dict(num_hidden_layers=3, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                 sliding_window=6, rope_theta=10000.0),
        batch=[28, 20], padding="left", tokenizer=True),
    ("mixtral", "mqa_head_dim_top3"): dict(
        base=MIXTRAL,
        cfg=dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=12, num_local_experts=6,
                 num_experts_per_tok=3, sliding_window=None),
        batch=[18, 25], padding="right"),
}


def mixtral_hub_names(state, cfg):
    """transformers 5's Mixtral module names (`mlp`, fused experts) back to the hub's (`block_sparse_moe`, w1/w3/w2)."""
    per_expert = hub_state_dict_from(state, dict(cfg, moe_intermediate_size=cfg["intermediate_size"]))
    rename = {".gate_proj.weight": ".w1.weight", ".up_proj.weight": ".w3.weight", ".down_proj.weight": ".w2.weight"}
    out = {}
    for name, t in per_expert.items():
        name = name.replace(".mlp.", ".block_sparse_moe.")
        if ".experts." in name:
            for old, new in rename.items():
                if name.endswith(old):
                    name = name[: -len(old)] + new
        out[name] = t
    return out


def hub_state_dict_from(state, cfg):
    class _Model:  # hub_state_dict reads model.state_dict() only
        def state_dict(self):
            return state
    return hub_state_dict(_Model(), cfg)


# The transformers class of each family; scripts/make_golden_olmoe_qwen3_moe.py adds its families here and
# reuses `build`.
CLASSES = {"qwen2_moe": Qwen2MoeForCausalLM, "mixtral": MixtralForCausalLM}


def build(family, case, spec, seed):
    cfg = dict(spec["base"])
    cfg.update(spec["cfg"])
    out_dir = os.path.join(FIXTURES, family, case)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    cls = CLASSES[family]
    gen = torch.Generator().manual_seed(seed)
    config = cls.config_class.from_pretrained(out_dir)
    config._attn_implementation = "eager"
    model = cls(config).eval()
    randomize(model, gen)
    if family == "mixtral":
        hub = mixtral_hub_names(model.state_dict(), cfg)
    else:  # OLMoE's experts are `intermediate_size` wide
        hub = hub_state_dict(model, dict(cfg, moe_intermediate_size=cfg.get("moe_intermediate_size", cfg["intermediate_size"])))
    save_file(hub, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    model, info = cls.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), (case, info)
    if family == "qwen2_moe" and cfg["use_sliding_window"]:
        assert "sliding_attention" in model.config.layer_types, model.config.layer_types

    routes = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            def hook(mod, args, out, i=i):
                routes[i] = (out[0].detach().clone(), out[2].detach().clone())
            hooks.append(gate.register_forward_hook(hook))

    ids, mask, logits = reference_forward(model, spec, cfg["vocab_size"], gen, hooks)

    valid = mask.reshape(-1).bool()
    k = cfg["num_experts_per_tok"]
    golden = {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous(), "logits": logits.contiguous()}
    for i, (rl, top) in sorted(routes.items()):
        probs = rl.float().softmax(-1)
        ps = probs.sort(-1, descending=True).values
        if (ps[valid, :k] - ps[valid, 1: k + 1]).min() < 1e-4:
            return False
        assert torch.equal(top, probs.topk(k, -1).indices), "router ids are the top-k of the probabilities, in order"
        golden[f"router_ids.layer{i}"] = torch.where(valid[:, None], top, -1).contiguous()
    sizes = save_golden(out_dir, golden, spec.get("tokenizer"), cfg["vocab_size"])
    print(f"{family}/{case}: seed {seed}, MoE layers {sorted(routes)}, files {sizes}")
    return True


def build_cases(cases):
    """Build every (family, case) of `cases`, each from the first of its 200 seeds with decisive routing."""
    check_pinned()
    for n, ((family, case), spec) in enumerate(cases.items()):
        for seed in range(1000 * n, 1000 * n + 200):
            if build(family, case, spec, seed):
                break
        else:
            sys.exit(f"{family}/{case}: no seed with decisive routing")


if __name__ == "__main__":
    build_cases(CASES)
