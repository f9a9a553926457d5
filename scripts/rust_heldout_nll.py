#!/usr/bin/env python3
"""The Rust model's NLL on the cross-check slice of scripts/hf_heldout_nll.py, through `eval logits`.

Runs `eval logits` (f32, CPU, native top-k unless --k) once per 1024-token window of the first 8192 tokens of
models/heldout.txt and averages the next-token cross-entropy exactly as hf_heldout_nll.py does, so the two
numbers are directly comparable.

  ~/.cache/alloc-moe/venv-torch-2.11.0/bin/python scripts/rust_heldout_nll.py models/deepseek-v2-tiny \
      [--eval target/release/eval] [--k K]
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_heldout_nll as ref  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--eval", default="target/release/eval", help="the eval binary")
    ap.add_argument("--k", type=int)
    args = ap.parse_args()
    ids = ref.heldout_ids()
    total, count = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, ref.N_TOKENS, ref.WINDOW):
            w = ids[i:i + ref.WINDOW]
            out = Path(tmp) / f"w{i}.safetensors"
            cmd = [args.eval, "logits", "--model", str(args.model_dir), "--dtype", "f32", "--device", "cpu",
                   "--tokens", " ".join(map(str, w)), "--out", str(out)]
            if args.k:
                cmd += ["--k", str(args.k)]
            subprocess.run(cmd, check=True, capture_output=True)
            logits = load_file(str(out))["logits"].float()
            total += F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum").item()
            count += len(w) - 1
    nll = total / count
    print(json.dumps({"model": str(args.model_dir), "k": args.k, "tokens": ref.N_TOKENS, "nll": nll,
                      "ppl": math.exp(nll)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
