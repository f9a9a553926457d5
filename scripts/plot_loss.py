#!/usr/bin/env python3
"""Plot a training_log.jsonl (scripts/train_moe.py) as a loss-curve PNG.

Needs matplotlib, which the torch venv does not carry; scripts/model_card.py runs this with a small separate
venv: python3 -m venv ~/.cache/alloc-moe/venv-plot && ~/.cache/alloc-moe/venv-plot/bin/pip install matplotlib==3.10.7

  ~/.cache/alloc-moe/venv-plot/bin/python scripts/plot_loss.py LOG.jsonl OUT.png TITLE
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    log, out, title = sys.argv[1], sys.argv[2], sys.argv[3]
    recs = [json.loads(line) for line in open(log)]
    tr = [(r["tokens"] / 1e6, r["train_loss"]) for r in recs]
    va = [(r["tokens"] / 1e6, r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*tr), lw=0.8, alpha=0.7, label="train (mean of 10 steps)")
    ax.plot(*zip(*va), "o-", ms=3, lw=1.5, label="validation (128 fixed windows)")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(min(v for _, v in tr + va) - 0.1, 6.0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
