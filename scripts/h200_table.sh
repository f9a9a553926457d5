#!/bin/bash
# One run, one H200: our engine vs transformers 5.17, full vs half k, the real shapes (random bf16 weights);
# plus Alloc-T at the same budgets and its routing cost at 8192 tokens (V2-Lite), our speed for the
# OLMoE / Qwen3-MoE shapes (transformers on all five), V2-Lite decode at a 2000-token context, and decode
# of 4 and 8 sequences together (ours with Alloc-T, all five shapes; transformers at 4 on V2-Lite, Qwen1.5
# and Mixtral). Run from the repository root with the release eval binary in .carry/bin:
#   bash scripts/h200_table.sh        (JSON lands in $OUT, default ./bench-out)
#   PACK=1 bash scripts/h200_table.sh   (also packs everything into $OUT/bench.tgz: the device tool returns
#                                       at most 8 files)
OUT=${OUT:-bench-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/table.log") 2>&1
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib; export LD_LIBRARY_PATH=$TL
P="--context 32 --decode-tokens 32 --repeats 3 --batch 8 --len 1024"
python3 -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
B=".carry/bin/eval bench --random --device cuda --dtype bf16 $P"
timeout 200 $B --model moe-models/configs/deepseek_v2_lite.json --alloc-t --phases prefill,decode,routing --out $OUT/ours-deepseek_v2_lite.json 2>&1 | grep -v "^bench:"
for c in qwen1.5_moe_a2.7b mixtral_8x7b olmoe_1b_7b qwen3_moe_30b_a3b; do
  timeout 200 $B --model moe-models/configs/$c.json --out $OUT/ours-$c.json 2>&1 | grep -v "^bench:"
done
# Decode at a long context (the cache's reads grow with it): V2-Lite at 2000 tokens, ours only.
timeout 200 .carry/bin/eval bench --random --device cuda --dtype bf16 --context 2000 --decode-tokens 32 --repeats 3 \
  --phases decode --model moe-models/configs/deepseek_v2_lite.json --out $OUT/ours-deepseek_v2_lite-context2000.json 2>&1 | grep -v "^bench:"
for ck in deepseek_v2_lite:6 deepseek_v2_lite:3 qwen1.5_moe_a2.7b:4 qwen1.5_moe_a2.7b:2 mixtral_8x7b:2 mixtral_8x7b:1 \
          olmoe_1b_7b:8 olmoe_1b_7b:4 qwen3_moe_30b_a3b:8 qwen3_moe_30b_a3b:4; do
  c=${ck%:*}; k=${ck#*:}
  timeout 100 python3 scripts/bench_hf.py --config moe-models/configs/$c.json --k $k $P 2>/dev/null | tail -1 | tee -a $OUT/hf.jsonl
done
# Several sequences decoding together (where Alloc-T redistributes across the step's tokens): ours on
# every shape at 4 sequences and V2-Lite at 8 too, transformers at 4.
D="--context 32 --decode-tokens 32 --repeats 3 --phases decode --alloc-t"
for cb in deepseek_v2_lite:4 deepseek_v2_lite:8 qwen1.5_moe_a2.7b:4 mixtral_8x7b:4 olmoe_1b_7b:4 qwen3_moe_30b_a3b:4; do
  c=${cb%:*}; b=${cb#*:}
  timeout 200 .carry/bin/eval bench --random --device cuda --dtype bf16 $D --decode-batch $b --model moe-models/configs/$c.json \
    --out $OUT/ours-$c-decode$b.json 2>&1 | grep -v "^bench:"
done
for ck in deepseek_v2_lite:6 deepseek_v2_lite:3 qwen1.5_moe_a2.7b:4 qwen1.5_moe_a2.7b:2 mixtral_8x7b:2 mixtral_8x7b:1; do
  c=${ck%:*}; k=${ck#*:}
  timeout 100 python3 scripts/bench_hf.py --config moe-models/configs/$c.json --k $k --phases decode --decode-batch 4 \
    --context 32 --decode-tokens 32 --repeats 3 2>/dev/null | tail -1 | tee -a $OUT/hf-decode4.jsonl
done
if [ -n "$PACK" ]; then
  sleep 1  # let tee finish the log
  tar -C "$OUT" -czf "$OUT/../bench.tgz.$$" --exclude=bench.tgz . && find "$OUT" -mindepth 1 -delete && mv "$OUT/../bench.tgz.$$" "$OUT/bench.tgz"
fi
