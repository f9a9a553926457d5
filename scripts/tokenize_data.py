#!/usr/bin/env python3
"""Tokenize the train / validation / test splits with models/tokenizer.json, and write models/heldout.txt.

Input:  ${ALLOC_MOE_CACHE:-~/.cache/alloc-moe}/data/text/{train,validation,test}.jsonl (scripts/fetch_data.py)
Output: ${ALLOC_MOE_CACHE:-~/.cache/alloc-moe}/data/tokens/{train,validation,test}.npy  (uint16 token ids)
        .../tokens/meta.json (token counts per split and source, tokenizer sha256)
        models/heldout.txt (committed; see below), unless --no-heldout
        with --carry DIR: train.npy, validation.npy and meta.json copied to DIR (the GPU call's carry folder)

Stream format: every document is followed by <|endoftext|> (id 0); documents in file order. Training samples
random windows of this stream, so windows may span a document boundary, as in GPT-style pre-training.

models/heldout.txt: the State of the Union addresses of 1905, 1915, ..., 2015 (test split: years ending in 5;
works of the US government, public domain), oldest first, one address per paragraph, separated by a blank
line. ~0.57 MB. The default sweep evaluates on it with no download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test")
HELDOUT_YEARS = range(1905, 2016, 10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--carry", type=Path, help="also copy train/validation arrays here")
    ap.add_argument("--no-heldout", action="store_true")
    args = ap.parse_args()
    data = Path(os.environ.get("ALLOC_MOE_CACHE") or os.path.expanduser("~/.cache/alloc-moe")) / "data"
    tok_path = REPO / "models" / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_path))
    assert tok.get_vocab_size() <= 65536 and tok.token_to_id("<|endoftext|>") == 0
    tok_sha = hashlib.sha256(tok_path.read_bytes()).hexdigest()
    out = data / "tokens"
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("tokenizer_sha256") != tok_sha or not all((out / f"{s}.npy").exists() for s in SPLITS):
        meta = {"tokenizer_sha256": tok_sha, "eot_id": 0, "splits": {}}
        for split in SPLITS:
            src = data / "text" / f"{split}.jsonl"
            if not src.exists():
                print(f"error: {src} missing: run scripts/fetch_data.py first", file=sys.stderr)
                return 1
            docs = [json.loads(line) for line in open(src, encoding="utf-8")]
            encs = tok.encode_batch([d["text"] for d in docs], add_special_tokens=False)
            per_source: dict[str, int] = {}
            chunks = []
            for d, e in zip(docs, encs):
                chunks.append(np.asarray(e.ids + [0], dtype=np.uint16))
                per_source[d["source"]] = per_source.get(d["source"], 0) + len(e.ids) + 1
            arr = np.concatenate(chunks)
            tmp = out / f".{split}.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, out / f"{split}.npy")
            chars = sum(len(d["text"]) for d in docs)
            meta["splits"][split] = {"tokens": int(arr.size), "docs": len(docs), "chars": chars,
                                     "chars_per_token": round(chars / arr.size, 3), "tokens_per_source": per_source}
            print(f"{split:>10}: {arr.size:>10,d} tokens from {len(docs)} docs ({chars / arr.size:.2f} chars/token)")
        tmp = out / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)
    else:
        print(f"{out}: up to date")
    if args.carry:
        args.carry.mkdir(parents=True, exist_ok=True)
        for name in ("train.npy", "validation.npy", "meta.json"):
            shutil.copyfile(out / name, args.carry / name)
        print(f"copied train/validation tokens to {args.carry}")
    if not args.no_heldout:
        speeches = []
        for line in open(data / "text" / "test.jsonl", encoding="utf-8"):
            d = json.loads(line)
            if d["source"] == "sotu" and int(d["doc"][:4]) in HELDOUT_YEARS:
                speeches.append((d["doc"], d["text"]))
        speeches.sort()
        assert [int(s[0][:4]) for s in speeches] == list(HELDOUT_YEARS), [s[0] for s in speeches]
        text = "\n\n".join(t for _, t in speeches) + "\n"
        assert len(text.encode()) <= 1_000_000
        (REPO / "models" / "heldout.txt").write_text(text, encoding="utf-8")
        print(f"wrote models/heldout.txt: {len(speeches)} addresses, {len(text.encode())} bytes, "
              f"{len(tok.encode(text).ids)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
