# Microbenchmark of the MoE decode kernels at DeepSeek-V2-Lite sizes (T = 1, top-6 of 64, shared 2 x 1408) on
# the GPU machine (needs CuPy): python3 scripts/microbench/moe.py . [variants]
# Launched through cuLaunchKernelEx with programmatic stream serialisation, 100 launches per CUDA graph,
# a different expert choice per launch and 4 copies of the shared expert (so weights come from DRAM).
# With a second argument it also compiles moe_variants.cu and runs the lines of moe_variants.py. The launch and
# timing helpers are in harness.py.
import sys

import cupy as cp
import numpy as np

import harness
from harness import bf16

root = sys.argv[1]
files = ["moe-models/src/kernels/common.cuh", "moe-models/src/kernels/moe_decode.cu"]
extra = len(sys.argv) > 2
mod = harness.compile_module(root, files + (["scripts/microbench/moe_variants.cu"] if extra else []))
s = cp.cuda.Stream(non_blocking=True)
def launch(name, grid, block, args, smem=0):
    harness.launch(s, mod.get_function(name), grid, block, args, smem)
def timeit(body, n=100):
    return harness.timeit(s, body, n)
H, I, E, W, Is = 2048, 1408, 64, 6, 2816
i32, f32, z = np.int32, np.float32, np.uint64(0)
w_gu = cp.empty((E, 2 * I, H), cp.uint16); w_gu[...] = bf16(0.02 * cp.random.randn(2 * I, H))[None]  # values only matter for NaN-free
w_d = cp.empty((E, H, I), cp.uint16); w_d[...] = bf16(0.02 * cp.random.randn(H, I))[None]
NS = 4
s_g = [bf16(0.02 * cp.random.randn(Is, H)) for _ in range(NS)]; s_u = [bf16(0.02 * cp.random.randn(Is, H)) for _ in range(NS)]
s_d = [bf16(0.02 * cp.random.randn(H, Is)) for _ in range(NS)]
x = bf16(cp.random.randn(H)); res = bf16(cp.random.randn(H))
rng = np.random.default_rng(0)
NI = 100
ids = [cp.asarray(rng.choice(E, W, replace=False).astype(np.int64)) for _ in range(NI)]
logits = [cp.asarray(rng.standard_normal(E).astype(np.float32)) for _ in range(NI)]
act = cp.zeros(W * I, cp.uint16); act_s = cp.zeros(Is, cp.uint16); out = cp.zeros(H, cp.uint16)
ids_out = cp.zeros(W, cp.int64); w_out = cp.zeros(W, cp.float32); mix = cp.full(W, 1.0 / W, cp.float32); gbuf = cp.zeros(1, cp.float32)
def gate_up(i, warps=4, route=0, name="moe_gate_up_64"):
    BR, BS = -(-I // warps), -(-Is // warps)
    launch(name, (W * BR + BS,), 32 * warps, (x, ids[i % NI], logits[i % NI], w_gu, act, ids_out, w_out, s_g[i % NS], s_u[i % NS], act_s, z, gbuf,
           i32(H), i32(I), i32(W), i32(E), i32(W), i32(Is), i32(1), i32(route), i32(1), f32(1.0)))
def down(i, cols=4, warps=7, name=None):
    launch(name or f"moe_down_{cols}", (H // cols, 1), 32 * warps, (act, ids[i % NI], mix, w_d, out, act_s, s_d[i % NS], z, res,
           i32(H), i32(I), i32(W), i32(E), i32(W), i32(Is), i32(0), i32(0), f32(1.0)))
gu_mb = (W + 2) * 2 * I * H * 2 / 1e6; dn_mb = (W + 2) * I * H * 2 / 1e6
def rep(label, t, mb): print(f"{label:44s} {t:7.2f} us  {mb / t:5.2f} TB/s")  # MB / us = TB / s
rep("gate_up route=0 warps=4", timeit(lambda i: gate_up(i)), gu_mb)
rep("gate_up route=1 warps=4", timeit(lambda i: gate_up(i, route=1)), gu_mb)
for wp in (2, 8):
    rep(f"gate_up route=0 warps={wp}", timeit(lambda i: gate_up(i, warps=wp)), gu_mb)
for c in (1, 2, 4):
    rep(f"down cols={c}", timeit(lambda i: down(i, cols=c)), dn_mb)
rep("gate_up + down (4)", timeit(lambda i: (gate_up(i, route=1), down(i))), gu_mb + dn_mb)
if extra:
    for line in open(f"{root}/scripts/microbench/moe_variants.py"):
        exec(line)
