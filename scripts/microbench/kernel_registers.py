# Registers, spills and shared memory of every run-time compiled kernel, as ptxas reports them for the
# H200 (sm_90), through the NVRTC of the project's torch venv: runs on a machine without a GPU.
#
#   python3 scripts/microbench/kernel_registers.py [file.cu ...]     (default: every moe-models kernel file)
#   python3 scripts/microbench/kernel_registers.py --ptx DIR [file.cu ...]
#       writes each file's PTX for sm_90 (comments and line info dropped) into DIR instead: two trees'
#       PTX compared with `diff -r` shows whether a refactor changed any kernel's code.
#
# Registers decide which blocks fit beside the kernel before them while it finishes (programmatic
# dependent launches): docs/speed-notes.md (session 6) has a kernel that got slower at 167 registers a
# thread for that reason alone.
import ctypes
import glob
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "moe-models", "src", "kernels")
VENV = os.path.expanduser("~/.cache/alloc-moe/venv-torch-2.11.0")


def nvrtc():
    libs = glob.glob(os.path.join(VENV, "lib/python3*/site-packages/nvidia/cu13/lib"))
    if not libs:
        sys.exit(f"no NVRTC under {VENV} (run `make test` once to install the venv)")
    # NVRTC loads its builtins by name: load them first, from the same directory.
    ctypes.CDLL(os.path.join(libs[0], "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(libs[0], "libnvrtc.so.13"))


def report(lib, name, src):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None):
        sys.exit(f"{name}: nvrtcCreateProgram failed")
    # The options cuda-graph's jit.cpp compiles with, plus ptxas' report.
    opts = [b"--gpu-architecture=sm_90", b"--std=c++17", b"-default-device", b"--use_fast_math", b"--ptxas-options=-v"]
    failed = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if failed:
        sys.exit(f"{name}: does not compile\n{log.value.decode()}")
    kernel = None
    for line in log.value.decode().splitlines():
        if "Compiling entry function" in line:
            kernel = line.split("'")[1]
        elif "Used" in line and kernel:
            print(f"{name:16} {kernel:18} {line.split(':', 1)[1].strip()}")
        elif "spill" in line and kernel and not line.strip().startswith("ptxas         .     0 bytes stack frame, 0 bytes spill"):
            print(f"{name:16} {kernel:18} {line.strip()}")


def ptx(lib, name, src):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None):
        sys.exit(f"{name}: nvrtcCreateProgram failed")
    opts = [b"--gpu-architecture=compute_90", b"--std=c++17", b"-default-device", b"--use_fast_math"]
    if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
        sys.exit(f"{name}: does not compile")
    n = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    buf = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    keep = [l for l in buf.value.decode().splitlines() if not l.strip().startswith(("//", ".loc", ".file"))]
    return "\n".join(keep) + "\n"


def main():
    args = sys.argv[1:]
    out = None
    if args[:1] == ["--ptx"]:
        if len(args) < 2:
            sys.exit("--ptx needs a directory")
        out, args = args[1], args[2:]
        os.makedirs(out, exist_ok=True)
    lib = nvrtc()
    common = open(os.path.join(ROOT, "common.cuh")).read()
    files = args or sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.cu")))
    for f in files:
        src = common + open(os.path.join(ROOT, f)).read()
        if out is None:
            report(lib, f, src)
        else:
            open(os.path.join(out, f + ".ptx"), "w").write(ptx(lib, f, src))


if __name__ == "__main__":
    main()
