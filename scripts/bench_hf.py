#!/usr/bin/env python3
"""Hugging Face transformers' throughput for an MoE config.json with random weights: the peer of `eval speed`.

Any family transformers knows by `model_type` (deepseek_v2, qwen2_moe, mixtral, ...).

Same protocol as `cargo run -p eval -- speed --model CONFIG --random` (eval/src/cmd/speed.rs):
  prefill  `--batch x --len` random tokens, one forward with logits for the last position only;
  decode   one sequence, a `--context`-token prompt, then `--decode-tokens` greedy steps with transformers'
           cache, the next token kept on the device; the prompt's own forward is timed separately and
           subtracted. Warm-up first, CUDA synchronised before each clock read, medians of `--repeats`.
Routing at k experts per token is set through `num_experts_per_tok` (transformers' stock top-k).

    python3 scripts/bench_hf.py --config moe-models/configs/deepseek_v2_lite.json \
        --device cuda --dtype bf16 --k 6

Prints one JSON line shaped like `eval speed`'s.
"""

import argparse
import json
import statistics
import time

import torch
import transformers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32", "f16"])
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--phases", default="both", choices=["both", "prefill", "decode"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--experts", default="grouped_mm", help="transformers experts_implementation")
    a = ap.parse_args()

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[a.dtype]
    device = torch.device(a.device)
    with open(a.config) as f:
        raw = json.load(f)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    if a.k is not None:
        config.num_experts_per_tok = a.k
    config._attn_implementation = a.attn
    config._experts_implementation = a.experts
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    vocab = config.vocab_size

    @torch.no_grad()
    def prefill(ids):
        model(input_ids=ids, logits_to_keep=1, use_cache=False)

    @torch.no_grad()
    def decode(prompt, steps):
        cache = transformers.DynamicCache(config=config)
        ids = prompt
        for _ in range(steps):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids = out.logits[:, -1:].argmax(-1)

    prefill_ms = None
    if a.phases in ("both", "prefill"):
        ids = torch.randint(0, vocab, (a.batch, a.len), device=device)
        prefill(ids)
        sync(device)
        times = []
        for _ in range(a.repeats):
            s = time.perf_counter()
            prefill(ids)
            sync(device)
            times.append((time.perf_counter() - s) * 1e3)
        prefill_ms = statistics.median(times)

    decode_ms = None
    if a.phases in ("both", "decode"):
        prompt = torch.randint(0, vocab, (a.decode_batch, a.context), device=device)
        decode(prompt, 3)
        sync(device)
        times = []
        for _ in range(a.repeats):
            s = time.perf_counter()
            decode(prompt, 1)
            sync(device)
            first = time.perf_counter() - s
            s = time.perf_counter()
            decode(prompt, a.decode_tokens + 1)
            sync(device)
            times.append((time.perf_counter() - s - first) * 1e3 / a.decode_tokens)
        decode_ms = statistics.median(times)
    print(json.dumps({
        "engine": f"transformers {transformers.__version__} ({a.attn}, experts {a.experts})",
        "model_type": config.model_type, "weights": "random", "device": a.device, "dtype": a.dtype,
        "k": config.num_experts_per_tok,
        "prefill": None if prefill_ms is None else {
            "batch": a.batch, "len": a.len, "ms": prefill_ms, "tokens_per_s": a.batch * a.len / (prefill_ms / 1e3)},
        # ms_per_token: per decode step (one token for each of the `batch` sequences).
        "decode": None if decode_ms is None else {
            "batch": a.decode_batch, "context": a.context, "tokens": a.decode_tokens, "ms_per_token": decode_ms,
            "tokens_per_s": a.decode_batch * 1e3 / decode_ms},
        "repeats": a.repeats,
    }))


if __name__ == "__main__":
    main()
