#!/usr/bin/env python3
"""transformers' reference NLL of a checkpoint on a fixed slice of models/heldout.txt, on CPU in float32.

The slice, which the Rust models must reproduce:
  1. tokens = models/tokenizer.json applied to the whole of models/heldout.txt (UTF-8, read as is),
     no special tokens added;
  2. keep the first 8192 tokens and cut them into 8 windows of 1024 consecutive tokens;
  3. run each window as its own sequence (positions 0..1023, no cache, no BOS), and take the mean
     next-token cross-entropy over the 8 x 1023 predictions (natural log).
Weights are the checkpoint's bf16 values cast to float32; everything is computed in float32.

  ~/.cache/alloc-moe/venv-torch-2.11.0/bin/python scripts/hf_heldout_nll.py models/deepseek-v2-tiny [--top-k K]

--top-k overrides the number of routed experts per token (the family's own mixing rule is kept:
DeepSeek-V2 and Qwen2-MoE weight by raw probabilities, Mixtral renormalises over the chosen experts).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parent.parent
N_TOKENS = 8192
WINDOW = 1024


def heldout_ids(tokenizer_path: Path = REPO / "models" / "tokenizer.json",
                text_path: Path = REPO / "models" / "heldout.txt") -> list[int]:
    tok = Tokenizer.from_file(str(tokenizer_path))
    ids = tok.encode(text_path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


def load(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def routers(model):
    """The router (gate) module of every MoE layer, in layer order."""
    return [m for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "top_k")]


def set_top_k(model, k: int | None):
    for r in routers(model):
        if not hasattr(r, "_native_top_k"):
            r._native_top_k = r.top_k
        r.top_k = r._native_top_k if k is None else k


@torch.no_grad()
def windows_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL over a (n, T) batch of independent windows, computed one window at a time."""
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return total / count


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--top-k", type=int)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = heldout_ids()
    model = load(args.model_dir)
    set_top_k(model, args.top_k)
    windows = torch.tensor(ids, dtype=torch.long).view(N_TOKENS // WINDOW, WINDOW)
    nll = windows_nll(model, windows)
    print(json.dumps({
        "model": str(args.model_dir), "top_k": args.top_k or routers(model)[0].top_k,
        "tokens": N_TOKENS, "windows": N_TOKENS // WINDOW, "window": WINDOW,
        "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(), "first_ids": ids[:12],
        "nll": nll, "ppl": math.exp(nll),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
