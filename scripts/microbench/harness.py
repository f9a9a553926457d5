# Shared pieces of the microbenchmarks (gemv.py, moe.py): bf16 conversion, compiling the kernel sources,
# launches through cuLaunchKernelEx (as cuda-graph's Function::launch_dependent does), and timing a body
# captured N times in one CUDA graph.
import ctypes

import cupy as cp
import numpy as np

_cuda = ctypes.CDLL("libcuda.so.1")
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _Attr(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("val", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _Cfg(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint), ("bx", ctypes.c_uint), ("by", ctypes.c_uint),
                ("bz", ctypes.c_uint), ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)),
                ("n", ctypes.c_uint)]


def bf16(a):
    """f32 values (anything cupy takes) as bf16 words (uint16), truncated."""
    return (cp.asarray(a, dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)


def f32(b):
    """bf16 words as f32."""
    return (b.astype(cp.uint32) << 16).view(cp.float32)


def compile_module(root, files):
    """The concatenated sources (paths relative to the repository root), compiled for sm_90."""
    return cp.RawModule(code="".join(open(f"{root}/{f}").read() for f in files), options=("-arch=sm_90", "-std=c++17"))


def launch(stream, fn, grid, block, args, smem=0, pdl=True):
    """Launch RawKernel `fn` on `stream`; with `pdl`, as a programmatic dependent launch. Arguments: cupy
    arrays (their device pointers), np.int32, np.float32, np.uint64."""
    vals = []
    for a in args:
        if isinstance(a, cp.ndarray): vals.append(ctypes.c_uint64(a.data.ptr))
        elif isinstance(a, np.int32): vals.append(ctypes.c_int32(int(a)))
        elif isinstance(a, np.float32): vals.append(ctypes.c_float(float(a)))
        elif isinstance(a, np.uint64): vals.append(ctypes.c_uint64(int(a)))
        else: raise TypeError(type(a))
    ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    attr = _Attr(); attr.id = _PROGRAMMATIC_STREAM_SERIALIZATION; attr.val = 1
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = (tuple(block) if isinstance(block, tuple) else (block,)) + (1, 1)
    cfg = _Cfg(g[0], g[1], g[2], b[0], b[1], b[2], smem, ctypes.c_void_p(stream.ptr), ctypes.pointer(attr), 1 if pdl else 0)
    r = _cuda.cuLaunchKernelEx(ctypes.byref(cfg), ctypes.c_void_p(fn.kernel.ptr), ptrs, None)
    assert r == 0, r


def timeit(stream, body, n):
    """Microseconds per call of body(i), i = 0..n-1 captured in one CUDA graph: the best of 5 replays."""
    with stream:
        body(0)  # warm-up (compiles, allocates)
        stream.synchronize()
        stream.begin_capture()
        for i in range(n):
            body(i)
        g = stream.end_capture()
        g.launch(stream=stream); stream.synchronize()
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        best = 1e9
        for _ in range(5):
            e0.record(stream); g.launch(stream=stream); e1.record(stream); e1.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(e0, e1) * 1000 / n)
    return best
