//! Keep libtorch_cuda.so linked into the eval binary.
//!
//! The linker's default `--as-needed` drops libtorch_cuda.so from a binary that calls no CUDA symbol
//! directly, and then CUDA is silently unavailable even on a GPU machine (../shared/GPU.md). These flags
//! apply to this crate's binaries only; global rustflags would break every build script instead.
#[path = "src/git_commit.rs"]
mod git_commit;

fn main() {
    let libtorch = std::env::var("LIBTORCH").unwrap_or_default();
    let has_cuda = std::path::Path::new(&libtorch).join("lib/libtorch_cuda.so").exists();
    if has_cuda {
        for flag in ["-Wl,--no-as-needed", "-ltorch_cuda", "-Wl,--as-needed"] {
            println!("cargo:rustc-link-arg-bins={flag}");
        }
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // Provenance: the git commit the binary was built from (results also record the commit of the tree
    // it runs in, which differs when the binary is carried to another machine).
    let (sha, dirty) = git_commit::git_commit();
    println!("cargo:rustc-env=ALLOC_MOE_BUILD_SHA={sha}{}", if dirty { "-dirty" } else { "" });
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    // And after any edit to the code the binary is built from, so that `-dirty` is not missed (cargo
    // scans directories recursively): without this, a binary built from an edited tree after a commit
    // claimed that commit's clean sha.
    for dir in ["alloc-core/src", "alloc-layer/src", "alloc-token/src", "cuda-graph/src", "cuda-graph/csrc", "moe-models/src", "eval/src"] {
        println!("cargo:rerun-if-changed=../{dir}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/git_commit.rs");
}
