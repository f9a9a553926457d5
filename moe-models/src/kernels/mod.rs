//! CUDA kernels compiled at run time (NVRTC, through `cuda_graph::jit`) for the hot paths on CUDA bf16:
//! no CUDA toolkit at build time, and nothing of this runs on a CPU. One file per kernel family, each a
//! safe wrapper that checks every shape, dtype, stride and device the kernel trusts (or returns `None`
//! so the caller uses libtorch):
//! - [`fused_moe`] (`fused_moe.rs`, `moe_decode.cu`): a MoE layer for a few tokens (decode) in two to
//!   four kernels: the routed experts read straight from the stacked weights (each chosen expert once a
//!   step when several sequences decode together), optionally the router's top-k or a policy's batch
//!   split (Alloc-T) and the shared expert too, replacing ~30 libtorch kernels;
//! - [`moe_combine`] and [`swiglu`] (`grouped.rs`): the grouped path for many tokens (prefill);
//! - [`gqa_decode`] (`gqa.rs`): grouped-query attention of one new token per sequence (QK-norm, rotary,
//!   cache write, flash-decoding) in two kernels;
//! - [`mla_decode`] (`mla.rs`): DeepSeek-V2's absorbed attention for decode steps in three small kernels
//!   (one, with a thread block cluster per head, for a single token), with the step's rope, latent norm
//!   and cache write;
//! - [`rotary`] (`rotary.rs`): the rotary embedding in one kernel instead of five;
//! - [`project`] (`gemv.rs`): up to three projections of a few tokens with the RMSNorm before them and
//!   the residual add after them, in one kernel (tensor cores for several tokens);
//! - [`argmax`] (`argmax.rs`): the greedy next token;
//! - [`decode_plan`] (`step_plan.rs`): a decode step's positions, valid keys and attention bias.
//!
//! `common.cuh` (bf16 words, dot products, reductions) is prepended to every `.cu` file.

mod argmax;
mod fused_moe;
mod gemv;
mod gqa;
#[cfg(test)]
pub(crate) mod gpu_test;
mod grouped;
mod mla;
mod rotary;
mod step_plan;

use cuda_graph::jit::{Arg, Function, Kernels};
use tch::Device;

use crate::error::{Error, Result};

pub use fused_moe::{
    fused_moe, fused_moe_applies, fused_moe_available, split_applies, MixWeights, MoeCall, Routing, SharedExpert, FUSED_MOE_MAX_EXPERTS,
    FUSED_MOE_MAX_PAIRS, FUSED_MOE_MAX_TOKENS,
};
pub use argmax::argmax;
pub use gemv::{project, Project, Projection, PROJECT_MAX_TOKENS};
pub use gqa::{gqa_decode, GqaDecode, GqaQkNorm};
pub use grouped::{moe_combine, swiglu};
pub use mla::{mla_decode, MlaDecode, MlaPrep, MLA_DECODE_MAX_QUERIES};
pub use rotary::rotary;
pub use step_plan::{decode_plan, DecodePlan};

/// The kernels of `k` for `device`, compiled on first use (a failure is logged once and every later call
/// reports it, so callers fall back to libtorch).
pub(crate) fn compiled(k: &'static Kernels, device: Device) -> Result<&'static [Function]> {
    k.get(device, |e| tracing::warn!("{}: run-time compiled kernels unavailable, using libtorch: {e}", k.file()))
        .map_err(|msg| Error::Input(msg.to_string()))
}

/// Every run-time compiled source as `(file name, source)`, as NVRTC gets it (for compile checks).
pub fn sources() -> [(&'static str, &'static str); 8] {
    [&gemv::GEMV, &argmax::ARGMAX, &fused_moe::MOE, &rotary::ROTARY, &mla::MLA, &grouped::GROUPED, &step_plan::PLAN, &gqa::GQA].map(|k| (k.file(), k.source()))
}

pub(crate) fn launch(f: Function, grid: [u32; 3], block: [u32; 3], args: &[Arg<'_>]) -> Result<()> {
    launch_shared(f, grid, block, 0, args)
}

#[allow(unsafe_code)]
pub(crate) fn launch_shared(f: Function, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>]) -> Result<()> {
    // SAFETY: see `launch_dependent`.
    unsafe { f.launch(grid, block, shared, args) }.map_err(Error::from)
}

/// Launch a decode kernel as a programmatic dependent (`Function::launch_dependent`): it starts while the
/// previous kernel finishes, reads its weights, and waits (`pdl_wait` in `common.cuh`) before it touches
/// anything earlier work writes. Every kernel launched so calls `pdl_wait` before its first read of an
/// activation and before its first write.
#[allow(unsafe_code)]
pub(crate) fn launch_dependent(f: Function, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>]) -> Result<()> {
    // SAFETY (this and `launch_shared`): the callers (`fused_moe`, `rotary`, `mla_decode`, `gqa_decode`, `moe_combine`,
    // `project`, `argmax`, `decode_plan`) checked that every tensor is on the kernel's device, of the dtype, shape and
    // strides the kernel indexes with (the size arguments passed); `fused_moe`'s ids outside 0..E are
    // skipped by the kernels, and its null pointers are only for tensors the size and mode arguments say
    // are absent; the grids cover exactly the rows, pairs or elements those shapes give, and the kernels
    // bound-check the rest (`moe_combine` skips rows outside `y`). `mla_decode`'s and `project`'s dynamic
    // shared memory is sized from the same sizes; `project`'s null pointers are absent norms, biases,
    // residuals and unused segments (of 0 rows). The dependent launches' kernels wait before touching
    // activations (`pdl_wait`).
    unsafe { f.launch_dependent(grid, block, shared, args) }.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every run-time compiled kernel compiles with NVRTC for the H200 (sm_90), on any machine: CPU-only
    /// CI catches CUDA syntax and type errors before a GPU run does. NVRTC comes with torch's pip wheels;
    /// a build without the `cuda_graph` shim reports `NotCompiled` and checks nothing.
    #[test]
    fn kernels_compile_for_sm90() {
        for (name, source) in sources() {
            match cuda_graph::jit::check_compiles(name, source, "sm_90") {
                Ok(()) => {}
                Err(cuda_graph::Error::NotCompiled) => eprintln!("{name}: not checked (cuda-graph shim not compiled in)"),
                Err(e) => panic!("{name}: {e}"),
            }
        }
    }
}
