//! CUDA kernels compiled at run time (NVRTC, through `cuda_graph::jit`) for the decode hot path: no CUDA
//! toolkit at build time, and nothing of this runs on a CPU.
//!
//! [`fused_moe`] evaluates a MoE layer's routed experts for a few tokens in two kernels
//! (`moe_decode.cu`), replacing the sort / gather / grouped-GEMM / scatter sequence of
//! [`crate::layers::moe::Experts`]' grouped path where that path is launch-bound.

use std::sync::OnceLock;

use cuda_graph::jit::{Arg, Function, Module};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The largest `tokens x slots` the fused path takes; above it the grouped GEMMs win.
pub const FUSED_MOE_MAX_PAIRS: i64 = 64;

const SOURCE: &str = include_str!("moe_decode.cu");
const WARPS: u32 = 4;

struct MoeKernels {
    gate_up: Function,
    down: Function,
    _module: Module,
}

static KERNELS: OnceLock<std::result::Result<MoeKernels, String>> = OnceLock::new();

fn kernels(device: Device) -> Result<&'static MoeKernels> {
    let k = KERNELS.get_or_init(|| {
        let built = (|| {
            let module = Module::compile(device, "moe_decode.cu", SOURCE)?;
            let gate_up = module.function("moe_gate_up")?;
            let down = module.function("moe_down")?;
            Ok::<_, cuda_graph::Error>(MoeKernels { gate_up, down, _module: module })
        })();
        built.map_err(|e| {
            tracing::warn!("fused MoE kernels unavailable, using grouped GEMMs: {e}");
            e.to_string()
        })
    });
    k.as_ref().map_err(|msg| Error::Input(format!("fused MoE kernels unavailable: {msg}")))
}

/// Whether [`fused_moe`] applies: a CUDA bf16 model, at most [`FUSED_MOE_MAX_PAIRS`] (token, slot)
/// pairs, 16-byte rows.
pub fn fused_moe_applies(x: &Tensor, ids: &Tensor, gate_up: &Tensor) -> bool {
    let (n, w) = (ids.size()[0], ids.size()[1]);
    let (h, i2) = (gate_up.size()[2], gate_up.size()[1]);
    x.device().is_cuda() && x.kind() == Kind::BFloat16 && gate_up.kind() == Kind::BFloat16 && n * w <= FUSED_MOE_MAX_PAIRS
        && h % 8 == 0 && (i2 / 2) % 8 == 0
}

/// [`fused_moe_applies`], and the kernels compile on this GPU (compiled on first use; a failure is
/// logged once and the grouped path is used instead).
pub fn fused_moe_available(x: &Tensor, ids: &Tensor, gate_up: &Tensor) -> bool {
    fused_moe_applies(x, ids, gate_up) && kernels(x.device()).is_ok()
}

/// Mix the chosen experts for `x` `(n, h)` bf16 on CUDA: `ids` `(n, w)` i64 (`-1` = none), `weights`
/// `(n, w)` f32, `gate_up` `(e, 2i, h)` and `down` `(e, h, i)` bf16. Returns `(n, h)` bf16. Every shape,
/// dtype and device is checked here, because the kernels trust them.
pub fn fused_moe(x: &Tensor, ids: &Tensor, weights: &Tensor, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let bad = |what: &str| Error::Input(format!("fused MoE: {what}"));
    let device = x.device();
    let (xs, is, ws, gs, ds) = (x.size(), ids.size(), weights.size(), gate_up.size(), down.size());
    if xs.len() != 2 || is.len() != 2 || gs.len() != 3 || ds.len() != 3 {
        return Err(bad("expects x (n, h), ids (n, w), gate_up (e, 2i, h), down (e, h, i)"));
    }
    let (n, h, w, e, i) = (xs[0], xs[1], is[1], gs[0], gs[1] / 2);
    if is[0] != n || ws != is || gs != [e, 2 * i, h] || ds != [e, h, i] {
        return Err(bad(&format!("inconsistent shapes x {xs:?}, ids {is:?}, weights {ws:?}, gate_up {gs:?}, down {ds:?}")));
    }
    if !fused_moe_applies(x, ids, gate_up) || down.kind() != Kind::BFloat16 {
        return Err(bad("needs CUDA bf16, at most 64 pairs and sizes that are multiples of 8"));
    }
    for (name, t, kind) in [("ids", ids, Kind::Int64), ("weights", weights, Kind::Float), ("gate_up", gate_up, Kind::BFloat16)] {
        if t.device() != device || t.kind() != kind {
            return Err(bad(&format!("{name} must be {kind:?} on {device:?}")));
        }
    }
    if down.device() != device || !gate_up.is_contiguous() || !down.is_contiguous() {
        return Err(bad("expert weights must be contiguous and on the input's device"));
    }
    let k = kernels(device)?;
    let x = x.contiguous();
    let ids = ids.contiguous();
    let weights = weights.contiguous();
    let act = Tensor::f_empty([n * w, i], (Kind::Float, device))?;
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, device))?;
    let dims = [Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32)];
    let block = [32 * WARPS, 1, 1];
    let rows = |r: i64| (r as u32).div_ceil(WARPS);
    launch(k.gate_up, [rows(i), (n * w) as u32, 1], block, &[Arg::Tensor(&x), Arg::Tensor(&ids), Arg::Tensor(gate_up), Arg::Tensor(&act)], &dims)?;
    launch(k.down, [rows(h), n as u32, 1], block, &[Arg::Tensor(&act), Arg::Tensor(&ids), Arg::Tensor(&weights), Arg::Tensor(down), Arg::Tensor(&out)], &dims)?;
    Ok(out)
}

#[allow(unsafe_code)]
fn launch(f: Function, grid: [u32; 3], block: [u32; 3], tensors: &[Arg<'_>], dims: &[Arg<'_>]) -> Result<()> {
    let args: Vec<Arg<'_>> = tensors.iter().chain(dims).copied().collect();
    // SAFETY: `fused_moe` checked that every tensor is contiguous, on the kernel's device, of the dtype
    // and shape the kernel indexes with (H, I, W, E); ids outside 0..E are skipped by the kernels; the
    // grid covers exactly the rows and pairs those shapes give.
    unsafe { f.launch(grid, block, 0, &args) }.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Dispatch;
    use crate::layers::moe::Experts;

    /// On a GPU: the fused kernels agree with the grouped GEMMs (bf16 tolerance), for one and several
    /// tokens, with empty slots and a token without experts.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_matches_grouped_on_the_gpu() {
        let dev = Device::Cuda(0);
        tch::manual_seed(1);
        let (e, h, i) = (16i64, 256i64, 136i64);
        let ex = Experts {
            gate_up_proj: (Tensor::randn([e, 2 * i, h], (Kind::Float, dev)) * 0.05).to_kind(Kind::BFloat16),
            down_proj: (Tensor::randn([e, h, i], (Kind::Float, dev)) * 0.05).to_kind(Kind::BFloat16),
            num_experts: e,
        };
        for (n, ids) in [
            (1i64, vec![3i64, 7, 0, 15, 9, 2]),
            (3, vec![1, 4, -1, 15, 15, 2, -1, -1, -1]),
        ] {
            let w = ids.len() as i64 / n;
            let ids = Tensor::from_slice(&ids).reshape([n, w]).to_device(dev);
            let mix = Tensor::rand([n, w], (Kind::Float, dev));
            let x = Tensor::randn([n, h], (Kind::Float, dev)).to_kind(Kind::BFloat16);
            let a = ex.forward(&x, &ids, &mix, Dispatch::Fused).expect("fused").to_kind(Kind::Float);
            let b = ex.forward(&x, &ids, &mix, Dispatch::Grouped).expect("grouped").to_kind(Kind::Float);
            let err = (&a - &b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            eprintln!("n = {n}: max |fused - grouped| = {err:.3e} (max |grouped| = {scale:.3e})");
            assert!(err <= 0.02 * scale + 1e-3, "fused differs from grouped: {err} vs scale {scale}");
        }
    }
}
