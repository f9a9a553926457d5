//! CUDA kernels compiled at run time (NVRTC, through `cuda_graph::jit`) for the decode hot path: no CUDA
//! toolkit at build time, and nothing of this runs on a CPU.
//!
//! [`fused_moe`] evaluates a MoE layer's routed experts for a few tokens in two kernels
//! (`moe_decode.cu`), replacing the sort / gather / grouped-GEMM / scatter sequence of
//! [`crate::layers::moe::Experts`]' grouped path where that path is launch-bound; [`rotary`] applies the
//! rotary embedding in one kernel (`rotary.cu`) instead of five.

use std::sync::OnceLock;

use cuda_graph::jit::{Arg, Function, Module};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The largest `tokens x slots` the fused path takes; above it the grouped GEMMs win.
pub const FUSED_MOE_MAX_PAIRS: i64 = 64;

const WARPS: u32 = 4;

/// One `.cu` file compiled once per process (on first use), with the kernels looked up by name.
struct Compiled {
    functions: Vec<Function>,
    _module: Module,
}

/// Compile `source` on first use (`cell` caches the outcome; a failure is logged once and every later
/// call reports it, so callers fall back to libtorch).
fn compiled<'a>(
    cell: &'a OnceLock<std::result::Result<Compiled, String>>,
    device: Device,
    file: &str,
    source: &str,
    names: &[&str],
) -> Result<&'a [Function]> {
    let c = cell.get_or_init(|| {
        let built = (|| {
            let module = Module::compile(device, file, source)?;
            let functions = names.iter().map(|n| module.function(n)).collect::<std::result::Result<Vec<_>, _>>()?;
            Ok::<_, cuda_graph::Error>(Compiled { functions, _module: module })
        })();
        built.map_err(|e| {
            tracing::warn!("{file}: run-time compiled kernels unavailable, using libtorch: {e}");
            e.to_string()
        })
    });
    c.as_ref().map(|c| c.functions.as_slice()).map_err(|msg| Error::Input(format!("{file}: {msg}")))
}

static MOE: OnceLock<std::result::Result<Compiled, String>> = OnceLock::new();
static ROTARY: OnceLock<std::result::Result<Compiled, String>> = OnceLock::new();

/// `[moe_gate_up, moe_down]`.
fn moe_kernels(device: Device) -> Result<&'static [Function]> {
    compiled(&MOE, device, "moe_decode.cu", include_str!("moe_decode.cu"), &["moe_gate_up", "moe_down"])
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
    fused_moe_applies(x, ids, gate_up) && moe_kernels(x.device()).is_ok()
}

/// How [`fused_moe`] gets each chosen expert's mixing weight.
#[derive(Debug, Clone, Copy)]
pub enum MixWeights<'a> {
    /// `(n, w)` f32: the weights themselves.
    Given(&'a Tensor),
    /// `(n, e)` f32 router probabilities: weight = the chosen expert's probability, renormalised over the
    /// token's chosen experts or not, times a scale (the family's [`crate::layers::moe::Mixing`]).
    Router {
        /// The probabilities.
        probs: &'a Tensor,
        /// Divide by the chosen probabilities' sum (+1e-20).
        renormalize: bool,
        /// Multiply afterwards.
        scale: f64,
    },
}

/// Mix the chosen experts for `x` `(n, h)` bf16 on CUDA: `ids` `(n, w)` i64 (`-1` = none; any row stride),
/// mixing weights as `mix` says, `gate_up` `(e, 2i, h)` and `down` `(e, h, i)` bf16. Returns `(n, h)`
/// bf16. Every shape, dtype, stride and device is checked here, because the kernels trust them.
pub fn fused_moe(x: &Tensor, ids: &Tensor, mix: MixWeights<'_>, gate_up: &Tensor, down: &Tensor) -> Result<Tensor> {
    let bad = |what: &str| Error::Input(format!("fused MoE: {what}"));
    let device = x.device();
    let (xs, is, gs, ds) = (x.size(), ids.size(), gate_up.size(), down.size());
    if xs.len() != 2 || is.len() != 2 || gs.len() != 3 || ds.len() != 3 {
        return Err(bad("expects x (n, h), ids (n, w), gate_up (e, 2i, h), down (e, h, i)"));
    }
    let (n, h, w, e, i) = (xs[0], xs[1], is[1], gs[0], gs[1] / 2);
    let (mix_t, mix_shape, gather, renorm, scale) = match mix {
        MixWeights::Given(t) => (t, [n, w], 0, 0, 1.0),
        MixWeights::Router { probs, renormalize, scale } => (probs, [n, e], 1, renormalize as i32, scale),
    };
    if is[0] != n || mix_t.size() != mix_shape || gs != [e, 2 * i, h] || ds != [e, h, i] {
        return Err(bad(&format!(
            "inconsistent shapes x {xs:?}, ids {is:?}, mixing {:?} (want {mix_shape:?}), gate_up {gs:?}, down {ds:?}",
            mix_t.size()
        )));
    }
    if !fused_moe_applies(x, ids, gate_up) || down.kind() != Kind::BFloat16 {
        return Err(bad("needs CUDA bf16, at most 64 pairs and sizes that are multiples of 8"));
    }
    for (name, t, kind) in [("ids", ids, Kind::Int64), ("mixing", mix_t, Kind::Float), ("gate_up", gate_up, Kind::BFloat16)] {
        if t.device() != device || t.kind() != kind {
            return Err(bad(&format!("{name} must be {kind:?} on {device:?}")));
        }
    }
    if down.device() != device || !gate_up.is_contiguous() || !down.is_contiguous() {
        return Err(bad("expert weights must be contiguous and on the input's device"));
    }
    let k = moe_kernels(device)?;
    let x = x.contiguous();
    let mix_t = mix_t.contiguous();
    // Rows of ids may be strided (a policy's narrowed sort); elements must be adjacent.
    let ids = if ids.stride()[1] == 1 { ids.shallow_clone() } else { ids.contiguous() };
    let ld = ids.stride()[0];
    let act = Tensor::f_empty([n * w, i], (Kind::Float, device))?;
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, device))?;
    let dims = [Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(ld as i32)];
    let block = [32 * WARPS, 1, 1];
    let rows = |r: i64| (r as u32).div_ceil(WARPS);
    launch(k[0], [rows(i), (n * w) as u32, 1], block, &[Arg::Tensor(&x), Arg::Tensor(&ids), Arg::Tensor(gate_up), Arg::Tensor(&act)], &dims)?;
    let down_args = [Arg::Tensor(&act), Arg::Tensor(&ids), Arg::Tensor(&mix_t), Arg::Tensor(down), Arg::Tensor(&out)];
    let mode = [Arg::I32(gather), Arg::I32(renorm), Arg::F32(scale as f32)];
    let tail: Vec<Arg<'_>> = dims.iter().chain(&mode).copied().collect();
    launch(k[1], [rows(h), n as u32, 1], block, &down_args, &tail)?;
    Ok(out)
}

/// Rotate `x` `(b, heads, t, d)` bf16 on CUDA (any strides) by `cos`/`sin` `(b, t, d / 2)` f32 in one
/// kernel; `None` when that does not apply (not CUDA bf16, other shapes, or the kernel did not compile),
/// and the caller uses libtorch. Returns a contiguous `(b, heads, t, d)` bf16 tensor.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Option<Tensor>> {
    let device = x.device();
    let size = x.size();
    if !device.is_cuda() || x.kind() != Kind::BFloat16 || size.len() != 4 || size[3] % 2 == 1 {
        return Ok(None);
    }
    let (b, hh, t, d) = (size[0], size[1], size[2], size[3]);
    let cs = [b, t, d / 2];
    for c in [cos, sin] {
        if c.size() != cs || c.kind() != Kind::Float || c.device() != device || !c.is_contiguous() {
            return Ok(None);
        }
    }
    let Ok(k) = compiled(&ROTARY, device, "rotary.cu", include_str!("rotary.cu"), &["rotary_bf16"]) else {
        return Ok(None);
    };
    let pairs = b * hh * t * d / 2;
    if pairs > i32::MAX as i64 {
        return Ok(None);
    }
    let out = Tensor::f_empty([b, hh, t, d], (Kind::BFloat16, device))?;
    let st = x.stride();
    let args = [
        Arg::Tensor(x), Arg::Tensor(cos), Arg::Tensor(sin), Arg::Tensor(&out),
        Arg::I32(hh as i32), Arg::I32(t as i32), Arg::I32(d as i32), Arg::I32(interleaved as i32), Arg::I32(pairs as i32),
        Arg::I64(st[0]), Arg::I64(st[1]), Arg::I64(st[2]), Arg::I64(st[3]),
    ];
    launch(k[0], [(pairs as u32).div_ceil(256), 1, 1], [256, 1, 1], &args, &[])?;
    Ok(Some(out))
}

#[allow(unsafe_code)]
fn launch(f: Function, grid: [u32; 3], block: [u32; 3], tensors: &[Arg<'_>], dims: &[Arg<'_>]) -> Result<()> {
    let args: Vec<Arg<'_>> = tensors.iter().chain(dims).copied().collect();
    // SAFETY: the callers (`fused_moe`, `rotary`) checked that every tensor is on the kernel's device, of
    // the dtype, shape and strides the kernel indexes with (the size arguments passed); `fused_moe`'s ids
    // outside 0..E are skipped by the kernels; the grids cover exactly the rows, pairs or elements those
    // shapes give, and the kernels bound-check the rest.
    unsafe { f.launch(grid, block, 0, &args) }.map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Dispatch;
    use crate::layers::moe::Experts;

    /// On a GPU: the rotary kernel agrees with the libtorch path run on the CPU in f32 (within bf16
    /// rounding), for both pairings and a non-contiguous input.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn rotary_kernel_matches_the_cpu_path() {
        use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
        let dev = Device::Cuda(0);
        let spec = RopeSpec { theta: 10000.0, yarn: None };
        for style in [RopeStyle::Interleaved, RopeStyle::HalfSplit] {
            let cpu = Rotary::new(&spec, 16, style, Device::Cpu).expect("rotary");
            let gpu = Rotary::new(&spec, 16, style, dev).expect("rotary");
            let x = Tensor::randn([2, 5, 3, 16], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16); // (b, t, h, d)
            let pos = Tensor::arange(5, (Kind::Int64, Device::Cpu)).unsqueeze(0).repeat([2, 1]) + 7;
            let (c, s) = cpu.cos_sin(&pos).expect("cos sin");
            let want = cpu.apply(&x.to_kind(Kind::Float).transpose(1, 2), &c, &s).expect("cpu");
            let (cg, sg) = gpu.cos_sin(&pos.to_device(dev)).expect("cos sin");
            let got = gpu.apply(&x.to_device(dev).transpose(1, 2), &cg, &sg).expect("gpu"); // strided input
            assert_eq!(got.kind(), Kind::BFloat16);
            let err = (got.to_kind(Kind::Float).to_device(Device::Cpu) - &want).abs().max().double_value(&[]);
            eprintln!("{style:?}: max |kernel - cpu f32| = {err:.3e}");
            assert!(err < 0.03, "{style:?}: {err}");
        }
    }

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
            // Mixing weights made in the kernel from router probabilities == mixing_weights + grouped.
            let probs = Tensor::rand([n, e], (Kind::Float, dev)).softmax(-1, Kind::Float);
            for (renormalize, s) in [(false, 2.5), (true, 1.0)] {
                let m = crate::layers::moe::Mixing { renormalize, scale: s };
                let table = crate::layers::moe::MixingTable { native: m, always: m, never: m };
                let wts = crate::layers::moe::mixing_weights(&probs, &ids, crate::ctx::Renormalize::Native, &table).expect("w");
                let want = ex.forward(&x, &ids, &wts, Dispatch::Grouped).expect("grouped").to_kind(Kind::Float);
                let got = fused_moe(&x, &ids, MixWeights::Router { probs: &probs, renormalize, scale: s }, &ex.gate_up_proj, &ex.down_proj)
                    .expect("fused router")
                    .to_kind(Kind::Float);
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                eprintln!("n = {n}, renormalize {renormalize}: max |fused - grouped| = {err:.3e} (of {scale:.3e})");
                assert!(err <= 0.02 * scale + 1e-3, "router-mixed fused differs: {err} vs {scale}");
            }
        }
    }
}
