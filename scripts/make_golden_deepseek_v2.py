#!/usr/bin/env python3
"""Build tiny random DeepSeek-V2 checkpoints and transformers' reference outputs for moe-models' golden tests.

Run with the project's venv (transformers pinned in scripts/requirements.txt):

    $HOME/.cache/alloc-moe/venv-torch-2.11.0/bin/python3 scripts/make_golden_deepseek_v2.py

For each case it writes moe-models/tests/fixtures/deepseek_v2/<case>/:
  config.json         hub-style config (legacy `rope_scaling` + `rope_theta`, as DeepSeek-V2-Lite ships)
  model.safetensors   hub-style weight names: per-expert `mlp.experts.{j}.{gate,up,down}_proj.weight`
  golden.safetensors  input_ids (b, t) i64, attention_mask (b, t) i64, logits (b, t, v) f32,
                      router_ids.layer{i} (b*t, k) i64 per MoE layer (each row sorted by decreasing router
                      weight, ties to the lower id; -1 for padding tokens), softmax_scale (1,) f64,
                      rope_attention_factor (1,) f64
  (lite_yarn only) tokenizer.json, a character-level tokenizer for the CLI's generate command.

The weights are saved in the hub's layout and read back with `from_pretrained`, so the reference also proves
transformers maps those names onto its fused experts. Seeds are fixed; a seed is rejected (and the next tried)
unless every valid token's router top-k is separated from the next expert by a clear margin, so that the Rust
port must pick exactly the same ids.

Reference corrections (transformers 5.17.0 vs DeepSeek's own modeling_deepseek.py, which trained the models):
  * mscale^2: transformers 5.17.0 HAS the YaRN softmax factor (`yarn_apply_mscale`: scaling *= mscale(factor,
    mscale_all_dim)^2). The script asserts this on every YaRN case; no correction needed.
  * norm_topk_prob: transformers 5.17.0's DeepseekV2TopkRouter ignores it (always `weights * routed_scaling_factor`).
    DeepSeek-V2's rule is `if top_k > 1 and norm_topk_prob: w /= (sum + 1e-20) else: w *= routed_scaling_factor`.
    For cases with norm_topk_prob true the router is patched to that rule. Released V2 checkpoints all have
    norm_topk_prob false, where both agree.
  * moe_layer_freq: transformers ignores it; all cases use 1, where both agree.
"""

import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as mdv2

PINNED = "5.17.0"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe-models", "tests", "fixtures", "deepseek_v2")

BASE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 16,
    "v_head_dim": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "scoring_func": "softmax",
    "moe_layer_freq": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

CASES = {
    # DeepSeek-V2-Lite's structure: no q LoRA, greedy, raw probabilities, YaRN with mscale == mscale_all_dim
    # (cos/sin factor 1, softmax factor mscale^2), layer 0 dense. A YaRN ramp with interior dimensions
    # (correction range 1..5 of 8 frequencies). Batch 2, right padding.
    "lite_yarn": dict(
        cfg=dict(num_hidden_layers=3, q_lora_rank=None, max_position_embeddings=40000, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                 topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                 first_k_dense_replace=1,
                 rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 1000, "beta_fast": 32,
                               "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
        batch=[24, 17], padding="right", tokenizer=True),
    # Full DeepSeek-V2's structure: q LoRA, group-limited greedy, routed_scaling_factor != 1, two dense layers,
    # plain rope. One sequence.
    "v2_group_limited": dict(
        cfg=dict(num_hidden_layers=4, q_lora_rank=24, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                 topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=False,
                 routed_scaling_factor=2.5, first_k_dense_replace=2, rope_scaling=None),
        batch=[20], padding=None),
    # norm_topk_prob true (renormalised, so DeepSeek-V2 does not apply routed_scaling_factor), YaRN with a cos/sin
    # factor != 1 and positions well past original_max_position_embeddings (16), q LoRA, batch 3, left padding.
    "norm_topk_yarn_long": dict(
        cfg=dict(num_hidden_layers=3, q_lora_rank=12, max_position_embeddings=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                 topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=3.0,
                 first_k_dense_replace=1,
                 rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}),
        batch=[40, 33, 29], padding="left"),
}


def ds_router_forward(self, hidden_states):
    """DeepSeek-V2's own router rule (modeling_deepseek.py), including norm_topk_prob."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    scores = router_logits.softmax(dim=-1, dtype=torch.float32)
    if self.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, self.num_group, self.num_experts // self.num_group).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, self.num_experts // self.num_group).reshape(
            -1, self.num_experts)
        scores = scores.masked_fill(~score_mask.bool(), 0.0)
    topk_weights, topk_indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
    if self.top_k > 1 and self.norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, topk_indices


def randomize(model, gen):
    """Weights large enough that routing is decisive and every block matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 / math.sqrt(p.shape[-1]))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def hub_state_dict(model, cfg):
    """transformers' fused experts back to the hub's per-expert names."""
    out = {}
    inter = cfg["moe_intermediate_size"]
    for name, t in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for j in range(t.shape[0]):
                out[f"{base}{j}.gate_proj.weight"] = t[j, :inter].contiguous()
                out[f"{base}{j}.up_proj.weight"] = t[j, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for j in range(t.shape[0]):
                out[f"{base}{j}.down_proj.weight"] = t[j].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def make_inputs(lengths, padding, vocab, gen):
    b, t = len(lengths), max(lengths)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        toks = torch.randint(3, vocab, (n,), generator=gen)
        if padding == "left":
            ids[i, t - n:] = toks
            mask[i, t - n:] = 1
        else:
            ids[i, :n] = toks
            mask[i, :n] = 1
    return ids, mask


def char_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models
    chars = [chr(c) for c in range(32, 32 + vocab_size - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(chars):
        vocab[ch] = i + 3
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, ignore_merges=True))
    tok.decoder = decoders.Fuse()
    tok.save(path)


def reference_forward(model, spec, vocab_size, gen, hooks):
    """transformers' f32 logits for the case's padded batch (positions counted over real tokens, as the Rust
    models do); removes the router hooks afterwards. Returns (ids, mask, logits)."""
    ids, mask = make_inputs(spec["batch"], spec.get("padding"), vocab_size, gen)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()
    for h in hooks:
        h.remove()
    assert torch.isfinite(logits[mask.bool()]).all()
    return ids, mask, logits


def save_golden(out_dir, golden, tokenizer, vocab_size):
    """Write golden.safetensors (and a character tokenizer if asked); return the case's file sizes."""
    save_file(golden, os.path.join(out_dir, "golden.safetensors"))
    if tokenizer:
        char_tokenizer(os.path.join(out_dir, "tokenizer.json"), vocab_size)
    return {f: os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir)}


def build(case, spec, seed):
    cfg = dict(BASE)
    cfg.update(spec["cfg"])
    if cfg["rope_scaling"] is None:
        del cfg["rope_scaling"]
    out_dir = os.path.join(ROOT, case)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    gen = torch.Generator().manual_seed(seed)
    config = DeepseekV2Config.from_pretrained(out_dir)
    config._attn_implementation = "eager"
    model = DeepseekV2ForCausalLM(config).eval()
    randomize(model, gen)
    save_file(hub_state_dict(model, cfg), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    # Read the hub-layout file back through transformers' own loader.
    model, info = DeepseekV2ForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    model.eval()
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), (case, info)

    for layer in model.model.layers:
        if isinstance(layer.mlp, mdv2.DeepseekV2Moe):
            layer.mlp.gate.norm_topk_prob = config.norm_topk_prob  # read by ds_router_forward only
    attn = model.model.layers[0].self_attn
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    expected_scale = qk ** -0.5
    rs = cfg.get("rope_scaling")
    if rs is not None and rs.get("mscale_all_dim"):
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        expected_scale *= m * m
    assert abs(attn.scaling - expected_scale) < 1e-12, (case, attn.scaling, expected_scale, "mscale^2 factor")
    attention_factor = float(model.model.rotary_emb.attention_scaling)

    routes = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, mdv2.DeepseekV2Moe):
            def hook(mod, args, out, i=i):
                logits, weights, ids = out
                routes[i] = (logits.detach().clone(), weights.detach().clone(), ids.detach().clone())
            hooks.append(layer.mlp.gate.register_forward_hook(hook))

    ids, mask, logits = reference_forward(model, spec, cfg["vocab_size"], gen, hooks)

    valid = mask.reshape(-1).bool()
    k = cfg["num_experts_per_tok"]
    golden = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "logits": logits.contiguous(),
        "softmax_scale": torch.tensor([attn.scaling], dtype=torch.float64),
        "rope_attention_factor": torch.tensor([attention_factor], dtype=torch.float64),
    }
    for i, (rl, w, top) in sorted(routes.items()):
        probs = rl.softmax(-1)
        if cfg["topk_method"] == "group_limited_greedy":
            g, tg = cfg["n_group"], cfg["topk_group"]
            gs = probs.view(-1, g, probs.shape[-1] // g).max(-1).values
            gs_sorted = gs.sort(-1, descending=True).values
            if (gs_sorted[valid, tg - 1] - gs_sorted[valid, tg]).min() < 1e-4:
                return False
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(tg, -1).indices, 1.0)
            probs = probs * keep.repeat_interleave(probs.shape[-1] // g, dim=1)
        ps = probs.sort(-1, descending=True).values
        gaps = ps[valid, : k] - ps[valid, 1: k + 1]
        if gaps.min() < 1e-4:
            return False
        # Order each row by decreasing weight, ties to the lower id.
        order = torch.argsort(-w.double() * 1e6 + top.double() * 1e-9, dim=-1)  # weights are well separated
        top_sorted = torch.gather(top, 1, order)
        assert torch.equal(top_sorted, probs.topk(k, -1).indices), "router ids are the top-k of the masked probs"
        top_sorted[~valid] = -1
        golden[f"router_ids.layer{i}"] = top_sorted.contiguous()
    sizes = save_golden(out_dir, golden, spec.get("tokenizer"), cfg["vocab_size"])
    print(f"{case}: seed {seed}, scale {attn.scaling:.6f}, cos/sin factor {attention_factor:.6f}, files {sizes}")
    return True


def check_pinned():
    """Refuse to write references with another transformers than the pinned one; one thread, as the tests."""
    if transformers.__version__ != PINNED:
        sys.exit(f"transformers {transformers.__version__} != pinned {PINNED}")
    torch.set_num_threads(1)


def main():
    check_pinned()
    original_forward = mdv2.DeepseekV2TopkRouter.forward
    for n, (case, spec) in enumerate(CASES.items()):
        # Patch the router only where transformers departs from DeepSeek (norm_topk_prob true).
        mdv2.DeepseekV2TopkRouter.forward = ds_router_forward if spec["cfg"]["norm_topk_prob"] else original_forward
        for seed in range(1000 * n, 1000 * n + 200):
            if build(case, spec, seed):
                break
        else:
            sys.exit(f"{case}: no seed with decisive routing")
    mdv2.DeepseekV2TopkRouter.forward = original_forward


if __name__ == "__main__":
    main()
