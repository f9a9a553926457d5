# One run, one H200: our engine vs transformers 5.17, full vs half k, three real shapes (random bf16 weights).
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib; export LD_LIBRARY_PATH=$TL
P="--context 32 --decode-tokens 32 --repeats 3 --batch 8 --len 1024"
.carry/bin/moe_models_tests --ignored 2>&1 | grep -E "test |max \|" | head
python3 -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
for c in deepseek_v2_lite qwen1.5_moe_a2.7b mixtral_8x7b; do
  timeout 150 .carry/bin/eval bench --model moe-models/configs/$c.json --random --device cuda --dtype bf16 $P --out $OUT/ours-$c.json 2>&1 | grep -v "^bench:"
done
for ck in deepseek_v2_lite:6 deepseek_v2_lite:3 qwen1.5_moe_a2.7b:4 qwen1.5_moe_a2.7b:2 mixtral_8x7b:2 mixtral_8x7b:1; do
  c=${ck%:*}; k=${ck#*:}
  timeout 100 python3 scripts/bench_hf.py --config moe-models/configs/$c.json --k $k $P 2>/dev/null | tail -1 | tee -a $OUT/hf.jsonl
done
