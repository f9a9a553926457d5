//! Compile the C++ shim over `at::cuda::CUDAGraph` when libtorch has CUDA and CUDA's runtime headers are
//! at hand; otherwise build without it (every capture then reports that graphs are not compiled in).
//!
//! No CUDA toolkit is needed: the headers come from the pip wheels that torch 2.11 installs next to
//! itself (`nvidia/cu13/include` or `nvidia/cuda_runtime/include` when complete, else the copy bundled with
//! the `triton` wheel), found from
//! `LIBTORCH` (the torch package directory the workspace points at). `CUDA_GRAPH_CUDA_INCLUDE` overrides
//! the search; `CUDA_GRAPH_DISABLE=1` builds without the shim.
use std::env;
use std::path::{Path, PathBuf};

fn cuda_include(libtorch: &Path) -> Option<PathBuf> {
    if let Ok(dir) = env::var("CUDA_GRAPH_CUDA_INCLUDE") {
        return Some(PathBuf::from(dir));
    }
    let site = libtorch.canonicalize().ok()?.parent()?.to_path_buf();
    // A complete set (cuda_runtime.h needs crt/host_config.h, which the cu13 runtime wheel lacks but
    // the triton wheel that torch depends on bundles).
    let candidates = [
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cuda_runtime/include"),
        site.join("triton/backends/nvidia/include"),
        PathBuf::from("/usr/local/cuda/include"),
    ];
    candidates.into_iter().find(|d| d.join("cuda_runtime_api.h").exists() && d.join("crt/host_config.h").exists())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/graph.cpp");
    println!("cargo:rerun-if-changed=csrc/jit.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CUDA_GRAPH_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_GRAPH_DISABLE");
    println!("cargo::rustc-check-cfg=cfg(cuda_graph)");
    if env::var("CUDA_GRAPH_DISABLE").is_ok_and(|v| v == "1") {
        println!("cargo:warning=cuda-graph: disabled by CUDA_GRAPH_DISABLE=1");
        return;
    }
    let Ok(libtorch) = env::var("LIBTORCH") else {
        println!("cargo:warning=cuda-graph: LIBTORCH is not set; building without CUDA graphs");
        return;
    };
    // LIBTORCH may be relative to the workspace root (.cargo/config.toml sets `relative = true`, which
    // cargo resolves before handing it over), so it is usable as is.
    let libtorch = PathBuf::from(libtorch);
    let lib = libtorch.join("lib");
    if !lib.join("libtorch_cuda.so").exists() || !lib.join("libc10_cuda.so").exists() {
        println!("cargo:warning=cuda-graph: {} has no CUDA libraries; building without CUDA graphs", lib.display());
        return;
    }
    let Some(cuda) = cuda_include(&libtorch) else {
        println!("cargo:warning=cuda-graph: no cuda_runtime_api.h found; building without CUDA graphs");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("csrc/graph.cpp")
        .file("csrc/jit.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include(&cuda)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("amoe_cuda_graph");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for l in ["torch_cuda", "c10_cuda", "torch_cpu", "c10", "dl"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    println!("cargo:rustc-cfg=cuda_graph");
}
