# The most a half budget can speed up batch-1 decoding, from the weights a step must read.
#
# At batch 1 a decode step is bound by memory: it reads every attention, shared-expert, router and LM-head
# weight, plus the k chosen experts of each MoE layer. Halving k removes only the routed experts' share,
# so even an engine that read every byte at one bandwidth would get (bytes at k) / (bytes at k / 2), and
# fixed costs (kernel boundaries, latency-bound attention) only lower that. This prints, for the shapes
# in moe-models/configs (bf16 weights; the KV cache, norms and activations left out, a few MB at short
# contexts):
#
#   python3 scripts/decode_weight_bound.py [--bandwidth TB/s] [--bench DIR] [--sequences B]
#
# bytes a step at full and half k, that ratio, the step time at --bandwidth (default 4.5 TB/s: what the
# LM head's projection kernel reaches on the H200, 419 MB in 93 us), and with --bench DIR (the
# ours-<shape>.json files of scripts/h200_table.sh, ours-<shape>-decode<B>.json with --sequences) the
# measured times and ratio next to them. With --sequences B the step decodes B sequences together and
# reads each distinct chosen expert once; the expected distinct experts of a layer are taken for
# independent, uniform routing, E (1 - (1 - k / E)^B): an estimate (a trained router is not uniform;
# `eval bench` counts the real ones).
import argparse
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = [("deepseek_v2_lite", 6), ("qwen1.5_moe_a2.7b", 4), ("mixtral_8x7b", 2), ("olmoe_1b_7b", 8), ("qwen3_moe_30b_a3b", 8)]


def weights(c):
    """(per-layer attention, dense layers, dense MLP, shared expert + router, one routed expert, LM head) params."""
    h, mt = c["hidden_size"], c.get("model_type")
    if mt == "deepseek_v2":
        nh, nope, rope, v, r = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        if c.get("q_lora_rank") is not None:
            raise SystemExit("q_lora_rank is not covered (V2-Lite has none)")
        attn = h * nh * (nope + rope) + h * (r + rope) + r * nh * (nope + v) + nh * v * h
        ie, experts = c["moe_intermediate_size"], c["n_routed_experts"]
        shared = 3 * h * ie * (c.get("n_shared_experts") or 0)
        dense_layers, dense = c.get("first_k_dense_replace", 0), 3 * h * c["intermediate_size"]
    else:
        nh = c["num_attention_heads"]
        kvh, hd = c.get("num_key_value_heads", nh), c.get("head_dim") or h // nh
        attn = h * nh * hd + 2 * h * kvh * hd + nh * hd * h
        ie = c.get("moe_intermediate_size") or c["intermediate_size"]
        experts = c.get("num_local_experts") or c.get("num_experts")
        si = c.get("shared_expert_intermediate_size") or 0
        shared = 3 * h * si + (h if si else 0)  # Qwen2-MoE's shared expert and its gate
        dense_layers, dense = 0, 0
    return attn, dense_layers, dense, shared + h * experts, 3 * h * ie, c["vocab_size"] * h, experts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bandwidth", type=float, default=4.5, help="TB/s for the time column")
    ap.add_argument("--bench", help="directory with ours-<shape>.json (scripts/h200_table.sh)")
    ap.add_argument("--sequences", type=int, default=1, help="sequences decoding together")
    a = ap.parse_args()
    b = a.sequences
    print("| shape | k | GB a step (%d sequence%s) | bound | ms a step at %.1f TB/s | measured ms | measured ratio |"
          % (b, "" if b == 1 else "s", a.bandwidth))
    print("|---|---|---|---|---|---|---|")
    for name, k in SHAPES:
        c = json.load(open(os.path.join(ROOT, "moe-models", "configs", name + ".json")))
        attn, dense_layers, dense, per_moe, expert, head, experts = weights(c)
        layers = c["num_hidden_layers"]
        distinct = lambda kk: experts * (1 - (1 - kk / experts) ** b)  # kk at b = 1
        nbytes = lambda kk: 2 * (layers * attn + dense_layers * dense + (layers - dense_layers) * (per_moe + distinct(kk) * expert) + head)
        full, half = nbytes(k), nbytes(k // 2)
        ms = lambda n: n / (a.bandwidth * 1e12) * 1e3
        measured, ratio = "-", "-"
        path = os.path.join(a.bench, "ours-%s%s.json" % (name, "" if b == 1 else "-decode%d" % b)) if a.bench else None
        if path and os.path.exists(path):
            rows = {r["budget"]: r.get("decode_ms_per_step", r["decode_ms_per_token"]) for r in json.load(open(path))["rows"]}
            f, hh = rows.get("top-%d" % k), rows.get("top-%d" % (k // 2))
            if f and hh:
                measured, ratio = "%.3f / %.3f" % (f, hh), "%.2fx" % (f / hh)
        print("| %s | %d / %d | %.2f / %.2f | %.2fx | %.3f / %.3f | %s | %s |"
              % (name, k, k // 2, full / 1e9, half / 1e9, full / half, ms(full), ms(half), measured, ratio))


if __name__ == "__main__":
    main()
