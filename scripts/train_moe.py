#!/usr/bin/env python3
"""Train one of the project's small MoE checkpoints with transformers' own model classes.

Families (transformers 5.17.0 classes, saved with save_pretrained as stock Hugging Face checkpoints):
  deepseek_v2  DeepseekV2ForCausalLM: MLA (q_lora_rank null), layer 0 dense, 64 routed experts top-6 + 2 shared,
               softmax router, greedy top-k, norm_topk_prob false (the DeepSeek-V2-Lite routing shape)
  qwen2_moe    Qwen2MoeForCausalLM: 60 experts top-4, sigmoid-gated shared expert, norm_topk_prob false
  mixtral      MixtralForCausalLM: 8 experts top-2 (renormalised), GQA

Load balancing: Qwen2-MoE and Mixtral use their own `output_router_logits=True` auxiliary loss
(transformers' `load_balancing_loss_func`, Switch-Transformer form) times --aux-coef. Note that this function
pools all layers' counts and probabilities per expert index, so it balances an expert index's total over the
layers, not each layer. transformers 5.17's DeepseekV2ForCausalLM has no auxiliary loss at all, so for it the
router logits are captured with forward hooks on `DeepseekV2TopkRouter` and DeepSeek-V2's own expert-level
balance loss is applied, per MoE layer and summed over layers (`deepseek_balance_loss`; --aux-form pooled
applies transformers' pooled function instead). The coefficient and form are recorded in summary.json.

Training: bf16 autocast on CUDA (f32 master weights), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices),
linear warm-up then cosine decay to 10% of the peak, gradient clipping 1.0, batches of random windows of the
<|endoftext|>-separated token stream (data/train.npy from scripts/tokenize_data.py). Seeded: model init and the
window sampler depend only on --seed. Validation loss on fixed windows of data/validation.npy every
--eval-every steps; the checkpoint with the best validation loss is kept, saved in bfloat16 and, with
--archive, packed into a .tar.gz after every improvement (so a run cut short still returns a model).

Experts on the GPU run through a grouped GEMM in bf16 whose token groups are padded to multiples of 8 rows
(`padded_grouped_mm` below; it is checked against transformers' eager experts at start-up, falling back to
eager if it fails). This only changes how training computes; the saved checkpoint is unaffected.

With --time-budget S instead of --steps N, the number of steps is fixed after 30 steps from the measured step
time so that training ends within about S seconds (the steps used are recorded; re-run with --steps N to
repeat a run exactly).

  python3 scripts/train_moe.py --family deepseek_v2 --data .carry/data --out /tmp/ds --steps 3000
  python3 scripts/train_moe.py --family mixtral --data .carry/data --out /tmp/mx --tiny --steps 5 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.integrations.moe import ExpertsInterface
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

VOCAB = 8192
EOT = 0
ALIGN = 8  # rows per expert group padded to a multiple of this (16-byte aligned bf16 groups)

# Architecture of each family; --tiny shrinks it for a CPU dry run. Chosen so that each checkpoint stays
# under 8M parameters (16 MB in bf16) with the 8192-token vocabulary and untied embeddings.
FAMILIES = {
    "deepseek_v2": dict(
        cls=DeepseekV2ForCausalLM, cfg=DeepseekV2Config, name="deepseek-v2-tiny",
        arch=dict(hidden_size=176, intermediate_size=512, moe_intermediate_size=24, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64, n_shared_experts=2,
                  num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
                  topk_method="greedy", routed_scaling_factor=1.0, n_group=None, topk_group=None,
                  q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  rms_norm_eps=1e-6, rope_theta=10000.0),
        tiny=dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=16, num_hidden_layers=2,
                  n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32),
    ),
    "qwen2_moe": dict(
        cls=Qwen2MoeForCausalLM, cfg=Qwen2MoeConfig, name="qwen2-moe-tiny",
        arch=dict(hidden_size=192, intermediate_size=768, moe_intermediate_size=16,
                  shared_expert_intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
                  decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, sliding_window=None,
                  rms_norm_eps=1e-6, rope_theta=1000000.0),
        tiny=dict(hidden_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                  num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    ),
    "mixtral": dict(
        cls=MixtralForCausalLM, cfg=MixtralConfig, name="mixtral-tiny",
        arch=dict(hidden_size=192, intermediate_size=144, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                  router_jitter_noise=0.0, rms_norm_eps=1e-5, rope_theta=1000000.0),
        tiny=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2),
    ),
}


def make_config(family: str, tiny: bool, seq_len: int, aux_coef: float):
    spec = FAMILIES[family]
    arch = dict(spec["arch"])
    if tiny:
        arch.update(spec["tiny"])
    rope_theta = arch.pop("rope_theta")
    cfg = spec["cfg"](
        vocab_size=VOCAB, max_position_embeddings=seq_len, tie_word_embeddings=False, hidden_act="silu",
        initializer_range=0.02, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=None, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **arch,
    )
    if family != "deepseek_v2":
        cfg.router_aux_loss_coef = aux_coef
        cfg.output_router_logits = False  # asked for per forward during training only
    return cfg


# ---------------------------------------------------------------------------------------------------
# Experts: padded grouped GEMM (training speed only)

def padded_grouped_mm(self, hidden_states, top_k_index, top_k_weights):
    """Same maths as transformers' experts forward: out[t] = sum_k w[t,k] * down_e(act(gate_e x) * up_e x)."""
    num_tokens, hidden = hidden_states.shape
    k = top_k_index.shape[-1]
    e = self.num_experts
    flat = top_k_index.reshape(-1)
    s = flat.numel()
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    counts = torch.bincount(flat, minlength=e)
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    starts = torch.cumsum(counts, 0) - counts
    pstarts = torch.cumsum(padded, 0) - padded
    dest = torch.arange(s, device=flat.device) - starts[e_sorted] + pstarts[e_sorted]
    cap = s + ALIGN * e  # static upper bound of sum(padded): no host sync
    offs = torch.cumsum(padded, 0).to(torch.int32)
    tail = (torch.arange(cap, device=flat.device) >= offs[-1]).unsqueeze(-1)
    dt = torch.bfloat16 if hidden_states.is_cuda else hidden_states.dtype
    x = hidden_states.new_zeros(cap, hidden, dtype=dt).index_copy(0, dest, hidden_states[order // k].to(dt))
    gate_up = F.grouped_mm(x, self.gate_up_proj.to(dt).transpose(-2, -1), offs=offs).masked_fill(tail, 0.0)
    gate, up = gate_up.chunk(2, dim=-1)
    h = self.act_fn(gate) * up
    y = F.grouped_mm(h, self.down_proj.to(dt).transpose(-2, -1), offs=offs).masked_fill(tail, 0.0)
    y = y[dest] * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros_like(y).index_copy(0, order, y)  # back to (token, k) order
    return out.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


ExpertsInterface.register("padded_grouped_mm", padded_grouped_mm)


def experts_modules(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.experts") or n.endswith("block_sparse_moe.experts")]


def choose_experts_impl(model, device, log) -> str:
    """Use padded_grouped_mm if it matches eager on this device (forward and gradients), else eager.
    The check runs on CPU too, so a dry run exercises the same code path as the GPU run."""
    impl = "padded_grouped_mm" if check_impl(experts_modules(model)[0], device, log) else "eager"
    model.set_experts_implementation(impl)
    log(f"experts implementation: {impl}")
    return impl


def check_impl(mod, device, log) -> bool:
    torch.manual_seed(1234)
    t, k = 333, mod.config.num_experts_per_tok
    e = mod.num_experts
    x = torch.randn(t, mod.hidden_dim, device=device)
    idx = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(t)])
    w = torch.rand(t, k, device=device)
    results = []
    for impl in ("eager", "padded_grouped_mm"):
        mod.config._experts_implementation = impl
        xx = x.clone().requires_grad_(True)
        for p in mod.parameters():
            p.grad = None
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                y = mod(xx, idx, w)
            y.float().pow(2).sum().backward()
        except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
            log(f"padded_grouped_mm failed its check: {type(exc).__name__}: {exc}")
            return False
        results.append((y.detach().float(), xx.grad.float(), mod.gate_up_proj.grad.float(), mod.down_proj.grad.float()))
    for p in mod.parameters():
        p.grad = None
    tol = 3e-2 if device.type == "cuda" else 1e-4
    for a, b, what in zip(results[0], results[1], ("out", "d_x", "d_gate_up", "d_down")):
        err = ((a - b).norm() / (a.norm() + 1e-12)).item()
        if not err < tol:
            log(f"padded_grouped_mm differs from eager in {what}: rel err {err:.2e}")
            return False
    log("padded_grouped_mm matches eager (out, d_x, d_weights)")
    return True


# ---------------------------------------------------------------------------------------------------
# Saving

def finalize_config(path: Path):
    """Hub checkpoints of all three families spell the RoPE base as a top-level `rope_theta`; transformers 5
    writes `rope_parameters`. Keep both (same value) so v4- and v5-style readers agree."""
    cfg = json.loads(path.read_text())
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_checkpoint(model, out_dir: Path):
    m = copy.deepcopy(model).to(device="cpu", dtype=torch.bfloat16)
    m.config.use_cache = True
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    m.save_pretrained(tmp)
    finalize_config(tmp / "config.json")
    from safetensors import safe_open

    with safe_open(str(tmp / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".experts.0." in k for k in keys), "expected per-expert tensor names"
    assert not any(k.endswith("gate_up_proj") for k in keys), "stacked experts leaked into the checkpoint"
    if out_dir.exists():
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()
    tmp.rename(out_dir)


def archive(src_dir: Path, dest: Path):
    tmp = dest.with_name("." + dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tf:
        tf.add(src_dir, arcname=dest.name.split(".")[0])
    os.replace(tmp, dest)


# ---------------------------------------------------------------------------------------------------

def deepseek_balance_loss(logits_per_layer, n_experts: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss, sum over MoE layers of sum_i f_i * P_i, where
    f_i = E / (K T) * (tokens choosing expert i) and P_i = mean router probability of expert i over the T
    tokens of the batch. 1.0 per layer when balanced."""
    total = 0.0
    for logits in logits_per_layer:
        p = logits.float().softmax(-1)  # (T, E)
        idx = p.topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(n_experts, device=p.device).scatter_add_(0, idx, torch.ones_like(idx, dtype=p.dtype))
        f = counts * n_experts / (top_k * p.shape[0])
        total = total + (f * p.mean(0)).sum()
    return total


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def main() -> int:
    ap = argparse.ArgumentParser(description="train one small MoE checkpoint")
    ap.add_argument("--family", required=True, choices=sorted(FAMILIES))
    ap.add_argument("--data", type=Path, required=True, help="folder with train.npy and validation.npy")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--archive", type=Path, help="write OUT packed as this .tar.gz after each improvement")
    ap.add_argument("--steps", type=int, help="optimizer steps (exclusive with --time-budget)")
    ap.add_argument("--time-budget", type=float, help="seconds of training; steps fixed after 30 steps")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--aux-form", choices=["auto", "per-layer", "pooled"], default="auto",
                    help="per-layer: DeepSeek-V2's balance loss for each MoE layer; pooled: transformers' function "
                    "(all layers pooled per expert index); auto: per-layer for deepseek_v2, pooled (the family's "
                    "own output_router_logits path) for the others")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--full-val-windows", type=int, default=0, help="limit the final full-split score (dry runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture for a CPU dry run")
    args = ap.parse_args()
    if args.aux_form == "auto":
        args.aux_form = "per-layer" if args.family == "deepseek_v2" else "pooled"
    if (args.steps is None) == (args.time_budget is None):
        ap.error("give exactly one of --steps and --time-budget")

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.family
    log_f = open(args.out / "log.jsonl", "w")

    def log(msg):
        print(f"[{tag} {time.time() - t_start:7.1f}s] {msg}", flush=True)

    def record(obj):
        log_f.write(json.dumps(obj) + "\n")
        log_f.flush()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    train = torch.from_numpy(np.load(args.data / "train.npy").astype(np.int64)).to(device)
    val = torch.from_numpy(np.load(args.data / "validation.npy").astype(np.int64)).to(device)
    log(f"data: train {train.numel():,} tokens, validation {val.numel():,} tokens")

    spec = FAMILIES[args.family]
    cfg = make_config(args.family, args.tiny, args.seq, args.aux_coef)
    model = spec["cls"](cfg).to(device)
    log(f"attention implementation: {model.config._attn_implementation}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{spec['name']}: {n_params:,} parameters ({2 * n_params / 1e6:.2f} MB in bf16)")
    choose_experts_impl(model, device, log)
    torch.manual_seed(args.seed)  # the check above consumed random numbers

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )

    router_logits: list[torch.Tensor] = []
    if args.family == "deepseek_v2" or args.aux_form == "per-layer":
        for name, m in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(m, "top_k"):  # the router of each MoE layer
                m.register_forward_hook(lambda mod, inp, out: router_logits.append(out[0]))
    n_experts = cfg.num_experts if args.family != "mixtral" else cfg.num_local_experts
    top_k = cfg.num_experts_per_tok

    gen = torch.Generator().manual_seed(args.seed + 1)
    span = args.seq + 1
    ar = torch.arange(span, device=device)

    def batch():
        starts = torch.randint(0, train.numel() - span, (args.batch,), generator=gen).to(device)
        w = train[starts[:, None] + ar]
        return w[:, :-1], w[:, 1:]

    val_starts = torch.linspace(0, val.numel() - span - 1, args.eval_windows).long().to(device)

    def forward_loss(x, y, with_aux: bool):
        router_logits.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if args.family == "deepseek_v2" or args.aux_form == "per-layer":
                out = model(input_ids=x, use_cache=False)
                if not with_aux:
                    aux = None
                elif args.aux_form == "per-layer":
                    aux = deepseek_balance_loss(router_logits, n_experts, top_k)
                else:
                    aux = load_balancing_loss_func(tuple(router_logits), n_experts, top_k)
            else:
                out = model(input_ids=x, use_cache=False, output_router_logits=with_aux)
                aux = out.aux_loss if with_aux else None
        ce = F.cross_entropy(out.logits.float().reshape(-1, VOCAB), y.reshape(-1))
        router_logits.clear()
        return ce, aux

    @torch.no_grad()
    def evaluate(starts) -> float:
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, starts.numel(), args.batch):
            s = starts[i:i + args.batch]
            w = val[s[:, None] + ar]
            ce, _ = forward_loss(w[:, :-1], w[:, 1:], with_aux=False)
            tot += ce.item() * s.numel()
            n += s.numel()
        model.train()
        return tot / n

    total = args.steps if args.steps is not None else args.max_steps
    best_val, best_step = float("inf"), -1
    ckpt_dir = args.out / "model"
    model.train()
    t_train = time.time()
    t_mark = None
    acc_ce = acc_aux = 0.0
    acc_n = 0
    summary = {}
    step = 0
    while step < total:
        lr = lr_at(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batch()
        ce, aux = forward_loss(x, y, with_aux=True)
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc_ce += ce.detach()
        acc_aux += aux.detach()
        acc_n += 1
        if step == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_mark = time.time()
        if step == 30 and args.time_budget is not None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_mark) / 20
            left = args.time_budget - (time.time() - t_train)
            # Evaluations cost about eval_windows / batch forward passes each, ~1/3 of a step apiece.
            est = int(left / (per_step * (1 + args.eval_windows / args.batch / 3 / args.eval_every)))
            total = max(step + 1, min(args.max_steps, step + est))
            log(f"step time {per_step * 1e3:.1f} ms -> {total} steps in the {args.time_budget:.0f} s budget")
        do_eval = step % args.eval_every == 0 or step == total
        if step % 10 == 0 or do_eval:
            tr = (acc_ce / acc_n).item()
            ax = (acc_aux / acc_n).item()
            acc_ce = acc_aux = 0.0
            acc_n = 0
            rec = {"step": step, "lr": lr, "train_loss": tr, "aux_loss": ax, "grad_norm": gnorm.item(),
                   "tokens": step * args.batch * args.seq, "elapsed_s": round(time.time() - t_train, 2)}
            if do_eval:
                rec["val_loss"] = evaluate(val_starts)
                if rec["val_loss"] < best_val:
                    best_val, best_step = rec["val_loss"], step
                    save_checkpoint(model, ckpt_dir)
                    summary = {"family": args.family, "name": spec["name"], "best_step": best_step,
                               "best_val_loss_fixed_windows": best_val}
                    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
                    if args.archive:
                        archive(args.out, args.archive)
                log(f"step {step}/{total} lr {lr:.2e} train {tr:.4f} aux {ax:.4f} val {rec['val_loss']:.4f}"
                    + (" *" if best_step == step else ""))
            elif step % 100 == 0:
                log(f"step {step}/{total} lr {lr:.2e} train {tr:.4f} aux {ax:.4f} gnorm {gnorm.item():.3f}")
            record(rec)
        if args.time_budget is not None and time.time() - t_train > 1.1 * args.time_budget:
            log("time budget overrun: stopping early")
            total = step
    train_s = time.time() - t_train

    # Final: reload the best checkpoint (bf16 weights, as shipped) and score the whole validation split.
    best = spec["cls"].from_pretrained(ckpt_dir, dtype=torch.float32).to(device)
    best.set_experts_implementation(model.config._experts_implementation)
    model = best
    full_starts = torch.arange(0, val.numel() - span, args.seq, device=device)
    if args.full_val_windows:
        full_starts = full_starts[: args.full_val_windows]
    full_val = evaluate(full_starts)
    summary.update({
        "params": n_params, "steps": step, "best_step": best_step, "batch": args.batch, "seq": args.seq,
        "tokens_seen": step * args.batch * args.seq, "tokens_seen_at_best": best_step * args.batch * args.seq,
        "train_tokens_available": int(train.numel()), "epochs_at_best": best_step * args.batch * args.seq / train.numel(),
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay, "aux_coef": args.aux_coef,
        "aux_form": "deepseek-v2 per-layer expert-level" if args.aux_form == "per-layer" else "transformers pooled",
        "seed": args.seed, "train_seconds": round(train_s, 1), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "experts_implementation_in_training": model.config._experts_implementation,
        "best_val_loss_fixed_windows": best_val,
        "val_loss_full_split_bf16_weights": full_val, "val_windows_full_split": int(full_starts.numel()),
        "torch": torch.__version__, "transformers": transformers.__version__, "tiny": args.tiny,
    })
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    log_f.close()
    if args.archive:
        archive(args.out, args.archive)
    log(f"done: best val {best_val:.4f} at step {best_step}; full validation split {full_val:.4f} "
        f"(ppl {math.exp(full_val):.1f}); {train_s:.0f} s training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
