//! With `--features tch`, keep libtorch_cuda.so linked into this crate's test binaries, so the GPU test
//! of the Alloc-T kernel sees CUDA: the linker's default `--as-needed` drops it from a binary that calls
//! no CUDA symbol directly (../shared/GPU.md; eval/build.rs does the same for the eval binary).
fn main() {
    let libtorch = std::env::var("LIBTORCH").unwrap_or_default();
    let has_cuda = std::path::Path::new(&libtorch).join("lib/libtorch_cuda.so").exists();
    if has_cuda && std::env::var_os("CARGO_FEATURE_TCH").is_some() {
        for flag in ["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"] {
            println!("cargo:rustc-link-arg-tests={flag}");
        }
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
}
