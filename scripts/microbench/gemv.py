# Microbenchmark of the one-token projection kernels at DeepSeek-V2-Lite sizes (H = 2048, T = 1), on the GPU
# machine (needs CuPy): python3 scripts/microbench/gemv.py .
# Each kernel is launched through cuLaunchKernelEx (with programmatic stream serialisation when PDL), N
# launches captured in a CUDA graph cycling over 8 weight copies (more than L2), alone or each after a
# 92 MB read (PAIR: a proxy for the MoE kernels around a projection; subtract "read_rows 92 MB alone").
# gemv_norm is gemv.cu's (the several-token kernel since session 8, here at T = 1); gemv_variants.cu has a bare read of the rows and the variants measured in
# session 5 (docs/speed-notes.md), from which gemv_warp was made. Launch and timing helpers: harness.py.
import itertools
import sys

import cupy as cp

import harness
from harness import bf16, f32

root = sys.argv[1]
mod = harness.compile_module(root, ["moe-models/src/kernels/common.cuh", "moe-models/src/kernels/gemv.cu", "scripts/microbench/gemv_variants.cu"])
H = 2048
NC = 8
x = bf16(cp.random.randn(H))
nw = bf16(1 + 0.1 * cp.random.randn(H))
s = cp.cuda.Stream(non_blocking=True)
PDL = True  # set by the loop below
PAIR = False
def launch(fn, grid, block, args, smem=0):
    harness.launch(s, fn, grid, block, args, smem, pdl=PDL)
BIG = bf16(cp.random.randn(5632, 2048 * 4))  # 92 MB streamed between projections (a proxy for the MoE kernels)
NBIG = 5632 * 4
fo_big = cp.zeros(NBIG, cp.float32)
def launch_rr(i):
    launch(mod.get_function("read_rows"), ((NBIG + 3) // 4,), (128,), (BIG, cp.int32(NBIG), cp.int32(2048), fo_big))
def timeit(body, n=200):
    def step(i):
        if PAIR: launch_rr(i)
        body(i)
    return harness.timeit(s, step, n)
for PDL, PAIR, R in itertools.product((False, True), (False, True), (3648, 2048)):
    print(f"== PDL {PDL} PAIR {PAIR}")
    if PAIR:
        t = timeit(lambda i: None); print(f"   read_rows 92 MB alone: {t:.2f} us")
    Ws = [bf16(0.02 * cp.random.randn(R, H)) for _ in range(NC)]
    res = bf16(cp.random.randn(R)); out = cp.zeros(R, cp.uint16); o2 = cp.zeros(R, cp.uint16)
    fo = cp.zeros(R, cp.float32)
    k0 = mod.get_function("gemv_norm")
    z = cp.uint64(0)
    def base(i, W=None):
        W = Ws[i % NC] if W is None else W
        # gemv_norm's launch as gemv.rs makes it: 16-row tiles, 8 warps a block (GEMV_KSPLIT), at most 512 blocks.
        launch(k0, (min((R + 15) // 16, 512),), (256,), (x, cp.int32(1), cp.int32(H), nw, cp.float32(1e-6), W, z, out, cp.int32(R), z, z, z, cp.int32(0), z, z, z, cp.int32(0), res), smem=H * 2)
    t = timeit(base); gb = R * H * 2 / 1e9
    print(f"R={R} ({gb*1000:.1f} MB): gemv_norm {t:.2f} us ({gb/t*1e6/1000:.2f} TB/s)")
    rr = mod.get_function("read_rows")
    t = timeit(lambda i: launch(rr, ((R + 3) // 4,), (128,), (Ws[i % NC], cp.int32(R), cp.int32(H), fo)))
    print(f"   read_rows {t:.2f} us ({gb/t*1e6/1000:.2f} TB/s)")
    base(0, Ws[0]); s.synchronize(); ref = f32(out).copy()
    for name in ("gv_n0_r1", "gv_n1_r1", "gv_n2_r1", "gv_n0_r2", "gv_n1_r2", "gv_n2_r2", "gv_n1_r1_b8", "gv_n2_r1_b8"):
        k = mod.get_function(name)
        rpw = 2 if "_r2" in name else 1
        nb = (R + 4 * rpw - 1) // (4 * rpw)
        def go(i, W=None):
            W = Ws[i % NC] if W is None else W
            launch(k, (nb,), (128,), (x, cp.int32(H), nw, cp.float32(1e-6), W, o2, cp.int32(R), res))
        t = timeit(go)
        go(0, Ws[0]); s.synchronize()
        err = float(cp.abs(f32(o2) - ref).max()); mag = float(cp.abs(ref).max())
        print(f"   {name}: {t:.2f} us ({gb/t*1e6/1000:.2f} TB/s) maxdiff {err:.3g} of {mag:.3g}, regs {k.num_regs}")
