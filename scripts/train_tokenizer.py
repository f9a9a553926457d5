#!/usr/bin/env python3
"""Train the project's byte-level BPE tokenizer (8192 tokens) on the training split.

Input: ${ALLOC_MOE_CACHE:-~/.cache/alloc-moe}/data/text/train.jsonl (from scripts/fetch_data.py).
Training text: the first 3,000,000 characters of each source, documents in file order (which is sorted),
so the six sources weigh about equally and the run is short and deterministic (~18 M characters).

Output:
  models/tokenizer.json                        Hugging Face format (copied into each checkpoint)
  moe-models/tests/fixtures/tokenizer_ids.json sample strings and the ids Python gives them; the Rust test
                                               moe-models/tests/tokenizer_matches_python.rs must agree

Tokenizer: byte-level BPE (GPT-2 byte alphabet and regex pre-split, no prefix space), vocabulary 8192
including one special token <|endoftext|> = id 0, which separates documents in the training stream.
No normaliser and no post-processor: encoding adds no tokens. Trained with RAYON_NUM_THREADS=1 so
merge order cannot depend on thread scheduling.

  ~/.cache/alloc-moe/venv-torch-2.11.0/bin/python scripts/train_tokenizer.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

VOCAB_SIZE = 8192
PER_SOURCE_CHARS = 3_000_000
EOT = "<|endoftext|>"
REPO = Path(__file__).resolve().parent.parent

SAMPLES = [
    "Hello, world!",
    "Fellow-Citizens of the Senate and House of Representatives:",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "To be, or not to be, that is the question:\n    Whether 'tis nobler in the mind to suffer",
    "def forward(self, x):\n\treturn self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))\n",
    "   leading spaces, trailing spaces   \n\n\nand blank lines",
    "Unicode: caf\u00e9, na\u00efve, \u2014 em dash, \u201cquotes\u201d, \u00b0C, \u4e2d\u6587, emoji \U0001f600.",
    "The kernel's `CONFIG_PREEMPT_RT` option; see Documentation/admin-guide/README.rst.",
    "1790 1861 2021 3.14159 0x1F 1,000,000",
    f"end of one document.{EOT}Start of the next.",
    "",
]


def training_texts(train_jsonl: Path):
    used: dict[str, int] = {}
    with open(train_jsonl, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            n = used.get(d["source"], 0)
            if n >= PER_SOURCE_CHARS:
                continue
            text = d["text"][: PER_SOURCE_CHARS - n]
            used[d["source"]] = n + len(text)
            yield text


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def main() -> int:
    cache = Path(os.environ.get("ALLOC_MOE_CACHE") or os.path.expanduser("~/.cache/alloc-moe"))
    train_jsonl = cache / "data" / "text" / "train.jsonl"
    if not train_jsonl.exists():
        print(f"error: {train_jsonl} missing: run scripts/fetch_data.py first", file=sys.stderr)
        return 1
    tok = build()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(train_jsonl), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id(EOT) == 0
    out = REPO / "models" / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=False)

    # Reload from disk so the fixture reflects exactly what was saved.
    saved = Tokenizer.from_file(str(out))
    cases = []
    for s in SAMPLES:
        enc = saved.encode(s)
        assert saved.decode(enc.ids, skip_special_tokens=False) == s, s
        cases.append({"text": s, "ids": enc.ids})
    fixture = {
        "tokenizer": "models/tokenizer.json",
        "made_by": "scripts/train_tokenizer.py (Python tokenizers "
        + __import__("tokenizers").__version__ + "), add_special_tokens=true",
        "cases": cases,
    }
    fx = REPO / "moe-models" / "tests" / "fixtures" / "tokenizer_ids.json"
    fx.parent.mkdir(parents=True, exist_ok=True)
    # One case per line keeps the fixture readable and its diffs small.
    body = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)
    head = json.dumps({k: v for k, v in fixture.items() if k != "cases"}, ensure_ascii=False)[:-1]
    fx.write_text(f'{head}, "cases": [\n  {body}\n]}}\n', encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes) and {fx}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
