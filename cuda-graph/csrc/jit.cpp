// Run-time compiled CUDA kernels for the cuda-graph crate: NVRTC compiles CUDA C source to a cubin for
// the current device, the driver API loads it, and launches go to libtorch's current stream (so they
// order with tch's kernels and are recorded when that stream is capturing a graph).
//
// libnvrtc and libcuda are opened at run time (dlopen) and only the handful of C functions used here are
// looked up, with their stable C signatures: the build links neither library (nor needs nvrtc.h), and a
// CPU-only machine never loads them.
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "guarded.h"

#include <dirent.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// Driver types (CUresult, CUmodule, ...) come from cuda.h, which c10's CUDA headers include anyway;
// libcuda itself is not linked. NVRTC's two types are declared here.
using nvrtcResult = int;
using nvrtcProgram = void*;

struct DriverApi {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void**, void**);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  // CUDA 12.0+; null on an older driver, where launches never overlap.
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);
};

struct NvrtcApi {
  nvrtcResult (*nvrtcCreateProgram)(nvrtcProgram*, const char*, const char*, int, const char* const*,
                                    const char* const*);
  nvrtcResult (*nvrtcCompileProgram)(nvrtcProgram, int, const char* const*);
  nvrtcResult (*nvrtcGetProgramLogSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetProgramLog)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcGetCUBINSize)(nvrtcProgram, size_t*);
  nvrtcResult (*nvrtcGetCUBIN)(nvrtcProgram, char*);
  nvrtcResult (*nvrtcDestroyProgram)(nvrtcProgram*);
  const char* (*nvrtcGetErrorString)(nvrtcResult);
};

// The directory of libtorch_cuda.so, whose pip layout puts NVRTC at ../../nvidia/<pkg>/lib.
std::string torch_lib_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&c10::cuda::device_synchronize), &info) == 0 || info.dli_fname == nullptr)
    return "";
  std::string path(info.dli_fname);
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

void* open_first(const std::vector<std::string>& names, std::string& tried) {
  for (const auto& n : names) {
    if (void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    tried += " " + n;
  }
  return nullptr;
}

template <typename T>
void sym(void* lib, const char* name, T& out) {
  out = reinterpret_cast<T>(dlsym(lib, name));
  if (out == nullptr) throw std::runtime_error(std::string("missing symbol ") + name);
}

// Load a library's symbols once; a failure is kept and reported to every caller.
template <typename T, typename F>
const T& load_once(F fill) {
  static std::once_flag once;
  static T a;
  static std::string failure;
  std::call_once(once, [&] {
    try {
      fill(a);
    } catch (const std::exception& e) {
      failure = e.what();
    }
  });
  if (!failure.empty()) throw std::runtime_error(failure);
  return a;
}

// NVRTC opens its builtins library by name when it compiles; when NVRTC itself was found by path (torch's
// pip layout, not on the loader's search path), load the builtins from NVRTC's own directory first, so
// that lookup finds the library already loaded.
void preload_builtins(void* nvrtc) {
  Dl_info info;
  void* s = dlsym(nvrtc, "nvrtcCreateProgram");
  if (s == nullptr || dladdr(s, &info) == 0 || info.dli_fname == nullptr) return;
  std::string path(info.dli_fname);
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return;
  std::string dir = path.substr(0, slash);
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n.rfind("libnvrtc-builtins.so", 0) == 0 && dlopen((dir + "/" + n).c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) break;
  }
  closedir(d);
}

// NVRTC alone: enough to compile (and so to check kernels on a machine without a GPU).
const NvrtcApi& nvrtc_api() {
  return load_once<NvrtcApi>([](NvrtcApi& a) {
    std::string tried;
    std::string dir = torch_lib_dir();
    std::vector<std::string> nvrtc_names = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
    for (const char* rel : {"/../../nvidia/cu13/lib/libnvrtc.so.13", "/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.12"})
      if (!dir.empty()) nvrtc_names.push_back(dir + rel);
    void* nvrtc = open_first(nvrtc_names, tried);
    if (nvrtc == nullptr) throw std::runtime_error("cannot open NVRTC (tried" + tried + ")");
    preload_builtins(nvrtc);
    sym(nvrtc, "nvrtcCreateProgram", a.nvrtcCreateProgram);
    sym(nvrtc, "nvrtcCompileProgram", a.nvrtcCompileProgram);
    sym(nvrtc, "nvrtcGetProgramLogSize", a.nvrtcGetProgramLogSize);
    sym(nvrtc, "nvrtcGetProgramLog", a.nvrtcGetProgramLog);
    sym(nvrtc, "nvrtcGetCUBINSize", a.nvrtcGetCUBINSize);
    sym(nvrtc, "nvrtcGetCUBIN", a.nvrtcGetCUBIN);
    sym(nvrtc, "nvrtcDestroyProgram", a.nvrtcDestroyProgram);
    sym(nvrtc, "nvrtcGetErrorString", a.nvrtcGetErrorString);
  });
}

const DriverApi& api() {
  return load_once<DriverApi>([](DriverApi& a) {
    std::string tried;
    void* cuda = open_first({"libcuda.so.1", "libcuda.so"}, tried);
    if (cuda == nullptr) throw std::runtime_error("cannot open the CUDA driver (tried" + tried + ")");
    sym(cuda, "cuInit", a.cuInit);
    sym(cuda, "cuCtxGetCurrent", a.cuCtxGetCurrent);
    sym(cuda, "cuCtxSetCurrent", a.cuCtxSetCurrent);
    sym(cuda, "cuDeviceGet", a.cuDeviceGet);
    sym(cuda, "cuDevicePrimaryCtxRetain", a.cuDevicePrimaryCtxRetain);
    sym(cuda, "cuDeviceGetAttribute", a.cuDeviceGetAttribute);
    sym(cuda, "cuModuleLoadData", a.cuModuleLoadData);
    sym(cuda, "cuModuleGetFunction", a.cuModuleGetFunction);
    sym(cuda, "cuLaunchKernel", a.cuLaunchKernel);
    sym(cuda, "cuGetErrorString", a.cuGetErrorString);
    a.cuLaunchKernelEx = reinterpret_cast<decltype(a.cuLaunchKernelEx)>(dlsym(cuda, "cuLaunchKernelEx"));
  });
}

void check_cu(CUresult r, const char* what) {
  if (r == 0) return;
  const char* msg = nullptr;
  api().cuGetErrorString(r, &msg);
  throw std::runtime_error(std::string(what) + ": " + (msg ? msg : "CUDA driver error ") + " (" + std::to_string(r) + ")");
}

void check_nvrtc(nvrtcResult r, const char* what) {
  if (r != 0) throw std::runtime_error(std::string(what) + ": " + nvrtc_api().nvrtcGetErrorString(r));
}

// Make the device's primary context (the one libtorch's runtime API uses) current on this thread.
CUdevice bind_device(int device) {
  const DriverApi& a = api();
  check_cu(a.cuInit(0), "cuInit");
  CUdevice dev;
  check_cu(a.cuDeviceGet(&dev, device), "cuDeviceGet");
  CUcontext ctx = nullptr;
  check_cu(a.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (ctx == nullptr) {
    check_cu(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check_cu(a.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  }
  return dev;
}

// NVRTC-compile `source` for `arch` (e.g. "sm_90") to a cubin; compile errors carry NVRTC's log.
std::vector<char> compile_cubin(const char* source, const char* name, const std::string& arch) {
  const NvrtcApi& a = nvrtc_api();
  std::string arch_opt = "--gpu-architecture=" + arch;
  const char* opts[] = {arch_opt.c_str(), "--std=c++17", "-default-device", "--use_fast_math"};
  nvrtcProgram prog = nullptr;
  check_nvrtc(a.nvrtcCreateProgram(&prog, source, name, 0, nullptr, nullptr), "nvrtcCreateProgram");
  nvrtcResult r = a.nvrtcCompileProgram(prog, 4, opts);
  if (r != 0) {
    size_t n = 0;
    a.nvrtcGetProgramLogSize(prog, &n);
    std::string log(n, '\0');
    a.nvrtcGetProgramLog(prog, log.data());
    a.nvrtcDestroyProgram(&prog);
    throw std::runtime_error(std::string("NVRTC could not compile ") + name + ":\n" + log);
  }
  size_t n = 0;
  check_nvrtc(a.nvrtcGetCUBINSize(prog, &n), "nvrtcGetCUBINSize");
  std::vector<char> cubin(n);
  check_nvrtc(a.nvrtcGetCUBIN(prog, cubin.data()), "nvrtcGetCUBIN");
  a.nvrtcDestroyProgram(&prog);
  return cubin;
}

}  // namespace

using amoe::guarded;

extern "C" {

// Compile `source` for `arch` without loading it (no GPU or driver needed).
char* amoe_jit_check(const char* source, const char* name, const char* arch) {
  return guarded([&] { (void)compile_cubin(source, name, arch); });
}

// Compile `source` for `device`'s architecture and load it; `*module` is valid for the process.
char* amoe_jit_compile(const char* source, const char* name, int device, void** module) {
  *module = nullptr;
  return guarded([&] {
    const DriverApi& a = api();
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    CUdevice dev = bind_device(device);
    int major = 0, minor = 0;
    check_cu(a.cuDeviceGetAttribute(&major, 75, dev), "compute capability");  // ..._MAJOR
    check_cu(a.cuDeviceGetAttribute(&minor, 76, dev), "compute capability");  // ..._MINOR
    std::vector<char> cubin = compile_cubin(source, name, "sm_" + std::to_string(major) + std::to_string(minor));
    CUmodule m = nullptr;
    check_cu(a.cuModuleLoadData(&m, cubin.data()), "cuModuleLoadData");
    *module = m;
  });
}

char* amoe_jit_function(void* module, const char* name, void** function) {
  *function = nullptr;
  return guarded([&] {
    CUfunction f = nullptr;
    check_cu(api().cuModuleGetFunction(&f, static_cast<CUmodule>(module), name), name);
    *function = f;
  });
}

// Launch on libtorch's current stream of `device`. With `programmatic`, the launch may begin while the
// stream's previous kernel is still running (programmatic dependent launch, sm_90): the kernel must
// execute `griddepcontrol.wait` before it touches memory that earlier work writes or reads. Without
// cuLaunchKernelEx (a pre-12.0 driver) it is an ordinary launch.
char* amoe_jit_launch(void* function, int device, const unsigned* grid, const unsigned* block, unsigned shared,
                      void** args, int programmatic) {
  return guarded([&] {
    auto stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream());
    auto f = static_cast<CUfunction>(function);
    if (programmatic != 0 && api().cuLaunchKernelEx != nullptr) {
      CUlaunchAttribute attr;
      std::memset(&attr, 0, sizeof(attr));
      attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attr.value.programmaticStreamSerializationAllowed = 1;
      CUlaunchConfig config;
      std::memset(&config, 0, sizeof(config));
      config.gridDimX = grid[0], config.gridDimY = grid[1], config.gridDimZ = grid[2];
      config.blockDimX = block[0], config.blockDimY = block[1], config.blockDimZ = block[2];
      config.sharedMemBytes = shared;
      config.hStream = stream;
      config.attrs = &attr;
      config.numAttrs = 1;
      check_cu(api().cuLaunchKernelEx(&config, f, args, nullptr), "cuLaunchKernelEx");
      return;
    }
    check_cu(api().cuLaunchKernel(f, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared, stream, args, nullptr),
             "cuLaunchKernel");
  });
}

void amoe_jit_free_error(char* e) { std::free(e); }

}  // extern "C"
