#!/usr/bin/env python3
"""Build tiny random OLMoE and Qwen3-MoE checkpoints and transformers' reference outputs for moe-models'
golden tests (moe-models/tests/golden_olmoe_qwen3_moe.rs).

Run with the project's venv (transformers pinned in scripts/requirements.txt):

    $HOME/.cache/alloc-moe/venv-torch-2.11.0/bin/python3 scripts/make_golden_olmoe_qwen3_moe.py

The files per case are those of scripts/make_golden_qwen2_moe_mixtral.py (whose `build` this script reuses):
config.json, model.safetensors in the hub's layout (per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight`,
which transformers 5 fuses at load time for both families), golden.safetensors (input_ids, attention_mask,
f32 logits, router_ids.layer{i} by decreasing probability, -1 for padding), and for some cases a
character-level tokenizer.json for the CLI's generate command.

Cases (every case has batch > 1 with padding):
  olmoe/clip_gqa_raw         QK-norm over the whole projection, clip_qkv 1.5 (the script checks that it
                             clamps q, k and v in every layer), GQA (2 kv heads for 4 query heads),
                             norm_topk_prob false, left padding
  olmoe/mha_renorm           num_key_value_heads null (multi-head), norm_topk_prob true, no clip_qkv, no
                             rope_theta in config.json (default 10000), right padding
  qwen3_moe/head_dim_dense_raw
                             per-head QK-norm, explicit head_dim 6 (q is 24 wide, hidden 16), GQA,
                             mlp_only_layers [1] (a dense layer between MoE layers 0 and 2),
                             norm_topk_prob false, right padding
  qwen3_moe/sparse_step_renorm_window
                             decoder_sparse_step 2 (MoE layers 1 and 3, dense 0 and 2), norm_topk_prob true,
                             one kv head, use_sliding_window with a window of 5 on every layer, left padding

Keep the fixtures small (hidden 16, head_dim 4, vocab 64, expert width 8): all four together stay under 400 KB.
"""

import os
import sys

import torch
from transformers import OlmoeForCausalLM, Qwen3MoeForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_golden_qwen2_moe_mixtral import CLASSES, FIXTURES, build_cases  # noqa: E402

COMMON = {
    "vocab_size": 64,
    "hidden_size": 16,
    "num_attention_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

OLMOE = dict(COMMON, architectures=["OlmoeForCausalLM"], model_type="olmoe", intermediate_size=8, rms_norm_eps=1e-5,
             pad_token_id=0, router_aux_loss_coef=0.01)
QWEN3_MOE = dict(COMMON, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", intermediate_size=16,
                 moe_intermediate_size=8, rms_norm_eps=1e-6, rope_theta=1e6, router_aux_loss_coef=0.001)

def case(base, batch, padding, tokenizer=False, **cfg):
    """One fixture: the family's base config with `cfg` on top, a padded batch of `batch` lengths."""
    return dict(base=base, cfg=cfg, batch=batch, padding=padding, tokenizer=tokenizer)


CASES = {
    ("olmoe", "clip_gqa_raw"): case(
        OLMOE, [20, 13], "left", tokenizer=True, num_hidden_layers=2, num_key_value_heads=2, num_experts=10,
        num_experts_per_tok=4, norm_topk_prob=False, clip_qkv=1.5, rope_theta=10000.0),
    ("olmoe", "mha_renorm"): case(
        OLMOE, [14, 19], "right", num_hidden_layers=2, num_key_value_heads=None, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, clip_qkv=None),
    ("qwen3_moe", "head_dim_dense_raw"): case(
        QWEN3_MOE, [19, 12], "right", tokenizer=True, num_hidden_layers=3, num_key_value_heads=2, head_dim=6,
        num_experts=10, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
        use_sliding_window=False, sliding_window=None),
    ("qwen3_moe", "sparse_step_renorm_window"): case(
        QWEN3_MOE, [18, 11], "left", num_hidden_layers=4, num_key_value_heads=1, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[], use_sliding_window=True, sliding_window=5),
}


def check_clip_binds(family, case, spec):
    """clip_qkv must clamp something in q, k and v of every layer, or the case would not test it."""
    clip = spec["cfg"].get("clip_qkv")
    if clip is None:
        return
    out_dir = os.path.join(FIXTURES, family, case)
    model = OlmoeForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32).eval()
    peaks = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_norm", "k_norm", "v_proj"):
            def hook(mod, args, out, key=(i, name)):  # runs before the in-place clamp
                peaks[key] = out.abs().max().item()
            hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
    golden = os.path.join(out_dir, "golden.safetensors")
    from safetensors.torch import load_file
    g = load_file(golden)
    with torch.no_grad():
        model(input_ids=g["input_ids"], attention_mask=g["attention_mask"])
    for h in hooks:
        h.remove()
    slack = {k: v for k, v in peaks.items() if v <= clip}
    assert not slack, f"{family}/{case}: clip_qkv {clip} clamps nothing in {slack}"
    print(f"{family}/{case}: clip_qkv {clip} binds (peaks {min(peaks.values()):.2f}..{max(peaks.values()):.2f})")


def main():
    CLASSES.update(olmoe=OlmoeForCausalLM, qwen3_moe=Qwen3MoeForCausalLM)
    build_cases(CASES)
    for (family, case), spec in CASES.items():
        check_clip_binds(family, case, spec)
    total = sum(os.path.getsize(os.path.join(FIXTURES, f, c, x)) for f, c in CASES for x in os.listdir(os.path.join(FIXTURES, f, c)))
    print(f"fixtures: {total / 1024:.0f} KB in all")
    assert total < 400 * 1024, "keep the fixtures under 400 KB"


if __name__ == "__main__":
    main()
