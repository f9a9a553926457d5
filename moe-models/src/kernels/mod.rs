//! CUDA kernels compiled at run time (NVRTC, through `cuda_graph::jit`) for the decode hot path: no CUDA
//! toolkit at build time, and nothing of this runs on a CPU.
//!
//! [`fused_moe`] evaluates a MoE layer for a few tokens in two or three kernels (`moe_decode.cu`): the
//! routed experts read straight from the stacked weights, optionally the router's top-k and the shared
//! expert too, replacing the ~30 kernels of the router, the sort / gather / grouped-GEMM / scatter
//! sequence of [`crate::layers::moe::Experts`]' grouped path and the shared MLP where those are
//! launch-bound; [`rotary`] applies the rotary embedding in one kernel (`rotary.cu`) instead of five.

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
static MLA: OnceLock<std::result::Result<Compiled, String>> = OnceLock::new();
static COMBINE: OnceLock<std::result::Result<Compiled, String>> = OnceLock::new();

const MOE_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("moe_decode.cu"));
const ROTARY_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("rotary.cu"));
const MLA_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("mla_decode.cu"));
const COMBINE_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("moe_combine.cu"));

/// Every run-time compiled source as `(file name, source)`, as NVRTC gets it (for compile checks).
pub fn sources() -> [(&'static str, &'static str); 4] {
    [("moe_decode.cu", MOE_SOURCE), ("rotary.cu", ROTARY_SOURCE), ("mla_decode.cu", MLA_SOURCE), ("moe_combine.cu", COMBINE_SOURCE)]
}

/// `[moe_router, moe_gate_up, moe_down]`.
fn moe_kernels(device: Device) -> Result<&'static [Function]> {
    compiled(&MOE, device, "moe_decode.cu", MOE_SOURCE, &["moe_router", "moe_gate_up", "moe_down"])
}

/// The most routed experts the in-kernel top-k ranks (`MAX_EXPERTS` in `moe_decode.cu`).
pub const FUSED_MOE_MAX_EXPERTS: i64 = 1024;

/// Whether [`fused_moe`] applies to `pairs` (token, slot) pairs of `x`: a CUDA bf16 model, at most
/// [`FUSED_MOE_MAX_PAIRS`] pairs, 16-byte rows.
pub fn fused_moe_applies(x: &Tensor, pairs: i64, gate_up: &Tensor) -> bool {
    let (h, i2) = (gate_up.size()[2], gate_up.size()[1]);
    x.device().is_cuda() && x.kind() == Kind::BFloat16 && gate_up.kind() == Kind::BFloat16 && pairs <= FUSED_MOE_MAX_PAIRS
        && h % 8 == 0 && (i2 / 2) % 8 == 0
}

/// [`fused_moe_applies`], and the kernels compile on this GPU (compiled on first use; a failure is
/// logged once and the grouped path is used instead).
pub fn fused_moe_available(x: &Tensor, pairs: i64, gate_up: &Tensor) -> bool {
    fused_moe_applies(x, pairs, gate_up) && moe_kernels(x.device()).is_ok()
}

/// How [`fused_moe`] gets each chosen expert's mixing weight when a policy chose the experts.
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

/// Which experts [`fused_moe`] mixes, and with which weights.
#[derive(Debug, Clone, Copy)]
pub enum Routing<'a> {
    /// A routing policy chose: `ids` `(n, w)` i64 (`-1` = none; any row stride) and the weights.
    Chosen {
        /// The chosen experts.
        ids: &'a Tensor,
        /// Their mixing weights.
        mix: MixWeights<'a>,
    },
    /// Plain top-k inside the kernels: logits `x . router^T` in f32 (`router` `(e, h)` f32), a softmax,
    /// the `k` most probable experts (ties to the lower index, as a stable descending sort), weighted by
    /// the family's mixing rule. Replaces the router's linear, softmax and sort kernels.
    TopK {
        /// The router weight.
        router: &'a Tensor,
        /// Experts per token.
        k: i64,
        /// Divide by the chosen probabilities' sum (+1e-20).
        renormalize: bool,
        /// Multiply afterwards.
        scale: f64,
    },
}

/// An always-on SwiGLU expert added to the routed sum in the same kernels: DeepSeek's shared experts
/// (weight 1) or Qwen2-MoE's shared expert, weighted by `sigmoid(x . gate)`.
#[derive(Debug, Clone, Copy)]
pub struct SharedExpert<'a> {
    /// `gate_proj` `(is, h)` bf16.
    pub gate: &'a Tensor,
    /// `up_proj` `(is, h)` bf16.
    pub up: &'a Tensor,
    /// `down_proj` `(h, is)` bf16.
    pub down: &'a Tensor,
    /// `shared_expert_gate` `(1, h)` bf16, if the family gates the shared expert.
    pub gate_logit: Option<&'a Tensor>,
}

/// One MoE layer's work for [`fused_moe`].
#[derive(Debug, Clone, Copy)]
pub struct MoeCall<'a> {
    /// `(n, h)` bf16 on CUDA.
    pub x: &'a Tensor,
    /// The chosen experts and weights.
    pub routing: Routing<'a>,
    /// `(e, 2i, h)` bf16: each expert's gate rows, then its up rows.
    pub gate_up: &'a Tensor,
    /// `(e, h, i)` bf16.
    pub down: &'a Tensor,
    /// Shared expert added in the same kernels.
    pub shared: Option<SharedExpert<'a>>,
}

/// Evaluate a MoE layer for a few tokens in two kernels (three with in-kernel top-k): the routed experts
/// read straight from the stacked weights, mixed as `call.routing` says, plus the shared expert. Returns
/// `(n, h)` bf16. Every shape, dtype, stride and device is checked here, because the kernels trust them.
pub fn fused_moe(call: &MoeCall<'_>) -> Result<Tensor> {
    let bad = |what: &str| Error::Input(format!("fused MoE: {what}"));
    let MoeCall { x, routing, gate_up, down, shared } = *call;
    let device = x.device();
    let (xs, gs, ds) = (x.size(), gate_up.size(), down.size());
    if xs.len() != 2 || gs.len() != 3 || ds.len() != 3 {
        return Err(bad("expects x (n, h), gate_up (e, 2i, h), down (e, h, i)"));
    }
    let (n, h, e, i) = (xs[0], xs[1], gs[0], gs[1] / 2);
    if gs != [e, 2 * i, h] || ds != [e, h, i] {
        return Err(bad(&format!("inconsistent shapes x {xs:?}, gate_up {gs:?}, down {ds:?}")));
    }
    let check = |name: &str, t: &Tensor, kind: Kind, shape: &[i64]| -> Result<()> {
        if t.device() != device || t.kind() != kind || t.size() != shape {
            return Err(bad(&format!("{name} must be {kind:?} {shape:?} on {device:?}, got {:?} {:?}", t.kind(), t.size())));
        }
        Ok(())
    };
    check("down", down, Kind::BFloat16, &ds)?;
    if !gate_up.is_contiguous() || !down.is_contiguous() {
        return Err(bad("expert weights must be contiguous"));
    }
    let w = match routing {
        Routing::Chosen { ids, mix } => {
            let is = ids.size();
            if is.len() != 2 || is[0] != n {
                return Err(bad(&format!("ids {is:?} must be (n = {n}, w)")));
            }
            check("ids", ids, Kind::Int64, &is)?;
            match mix {
                MixWeights::Given(t) => check("mixing weights", t, Kind::Float, &[n, is[1]])?,
                MixWeights::Router { probs, .. } => check("router probabilities", probs, Kind::Float, &[n, e])?,
            }
            is[1]
        }
        Routing::TopK { router, k, .. } => {
            check("router", router, Kind::Float, &[e, h])?;
            if k < 1 || k > e || e > FUSED_MOE_MAX_EXPERTS {
                return Err(bad(&format!("top-{k} of {e} experts (at most {FUSED_MOE_MAX_EXPERTS} experts)")));
            }
            k
        }
    };
    if !fused_moe_applies(x, n * w, gate_up) {
        return Err(bad("needs CUDA bf16, at most 64 pairs and sizes that are multiples of 8"));
    }
    let is_ = match shared {
        None => 0,
        Some(s) => {
            let is_ = s.gate.size()[0];
            check("shared gate_proj", s.gate, Kind::BFloat16, &[is_, h])?;
            check("shared up_proj", s.up, Kind::BFloat16, &[is_, h])?;
            check("shared down_proj", s.down, Kind::BFloat16, &[h, is_])?;
            if let Some(g) = s.gate_logit {
                check("shared_expert_gate", g, Kind::BFloat16, &[1, h])?;
            }
            if is_ % 8 != 0 || ![s.gate, s.up, s.down].iter().all(|t| t.is_contiguous()) {
                return Err(bad("the shared expert's width must be a multiple of 8 and its weights contiguous"));
            }
            is_
        }
    };
    let k = moe_kernels(device)?;
    let x = x.contiguous();
    let f32s = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, device));
    let act = f32s(&[n * w, i])?;
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, device))?;
    let act_s = f32s(&[n, is_.max(1)])?;
    let gate_w = f32s(&[n])?;
    let block = [32 * WARPS, 1, 1];
    let rows = |r: i64| (r as u32).div_ceil(WARPS);
    // Absent tensors are null pointers.
    let null = Arg::I64(0);
    let (sg, su, sd, sgate) = match shared {
        Some(s) => (Arg::Tensor(s.gate), Arg::Tensor(s.up), Arg::Tensor(s.down), s.gate_logit.map_or(null, Arg::Tensor)),
        None => (null, null, null, null),
    };
    let grid_gu = [rows(i.max(is_)), (n * w + if is_ > 0 { n } else { 0 }) as u32, 1];
    match routing {
        Routing::Chosen { ids, mix } => {
            // Rows of ids may be strided (a policy's narrowed sort); elements must be adjacent.
            let ids = if ids.stride()[1] == 1 { ids.shallow_clone() } else { ids.contiguous() };
            let ld = ids.stride()[0];
            let (mix_t, gather, renorm, scale) = match mix {
                MixWeights::Given(t) => (t.contiguous(), 0, 0, 1.0),
                MixWeights::Router { probs, renormalize, scale } => (probs.contiguous(), 1, renormalize as i32, scale),
            };
            let gu = [
                Arg::Tensor(&x), Arg::Tensor(&ids), null, Arg::Tensor(gate_up), Arg::Tensor(&act), null, null, sg, su,
                Arg::Tensor(&act_s), sgate, Arg::Tensor(&gate_w),
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(ld as i32),
                Arg::I32(is_ as i32), Arg::I32(n as i32), Arg::I32(0), Arg::I32(0), Arg::F32(1.0),
            ];
            launch(k[1], grid_gu, block, &gu)?;
            let dn = [
                Arg::Tensor(&act), Arg::Tensor(&ids), Arg::Tensor(&mix_t), Arg::Tensor(down), Arg::Tensor(&out), Arg::Tensor(&act_s),
                sd, if shared.is_some_and(|s| s.gate_logit.is_some()) { Arg::Tensor(&gate_w) } else { null },
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(ld as i32),
                Arg::I32(is_ as i32), Arg::I32(gather), Arg::I32(renorm), Arg::F32(scale as f32),
            ];
            launch(k[2], [rows(h), n as u32, 1], block, &dn)?;
        }
        Routing::TopK { router, renormalize, scale, .. } => {
            let logits = f32s(&[n, e])?;
            let owned_ids = Tensor::f_empty([n, w], (Kind::Int64, device))?;
            let wts = f32s(&[n, w])?;
            let r = [Arg::Tensor(&x), Arg::Tensor(router), Arg::Tensor(&logits), Arg::I32(h as i32), Arg::I32(e as i32)];
            launch(k[0], [rows(e), n as u32, 1], block, &r)?;
            let gu = [
                Arg::Tensor(&x), null, Arg::Tensor(&logits), Arg::Tensor(gate_up), Arg::Tensor(&act), Arg::Tensor(&owned_ids),
                Arg::Tensor(&wts), sg, su, Arg::Tensor(&act_s), sgate, Arg::Tensor(&gate_w),
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(w as i32),
                Arg::I32(is_ as i32), Arg::I32(n as i32), Arg::I32(1), Arg::I32(renormalize as i32), Arg::F32(scale as f32),
            ];
            launch(k[1], grid_gu, block, &gu)?;
            let dn = [
                Arg::Tensor(&act), Arg::Tensor(&owned_ids), Arg::Tensor(&wts), Arg::Tensor(down), Arg::Tensor(&out),
                Arg::Tensor(&act_s), sd, if shared.is_some_and(|s| s.gate_logit.is_some()) { Arg::Tensor(&gate_w) } else { null },
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(w as i32),
                Arg::I32(is_ as i32), Arg::I32(0), Arg::I32(0), Arg::F32(1.0),
            ];
            launch(k[2], [rows(h), n as u32, 1], block, &dn)?;
        }
    }
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
    let Ok(k) = compiled(&ROTARY, device, "rotary.cu", ROTARY_SOURCE, &["rotary_bf16"]) else {
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
    launch(k[0], [(pairs as u32).div_ceil(256), 1, 1], [256, 1, 1], &args)?;
    Ok(Some(out))
}

/// The weighted per-token sum of the grouped path's expert outputs in one kernel (`moe_combine.cu`):
/// `out[t] = sum_s weights[t, s] * y[row[t, s]]` over chosen slots (`ids >= 0`, `row >= 0`), f32
/// accumulation in slot order, `(n, h)` bf16. `y` `(m, h)` bf16, `ids` / `row` `(n, w)` i64, `weights`
/// `(n, w)` f32, all on one CUDA device. `None` when it does not apply (not CUDA bf16, `h % 8 != 0`, or
/// the kernel did not compile): the caller uses libtorch.
pub fn moe_combine(y: &Tensor, ids: &Tensor, row: &Tensor, weights: &Tensor) -> Result<Option<Tensor>> {
    let device = y.device();
    let (ys, is) = (y.size(), ids.size());
    if !device.is_cuda() || y.kind() != Kind::BFloat16 || ys.len() != 2 || is.len() != 2 || ys[1] % 8 != 0 {
        return Ok(None);
    }
    let (m, h, n, w) = (ys[0], ys[1], is[0], is[1]);
    for (name, t, kind) in [("ids", ids, Kind::Int64), ("rows", row, Kind::Int64), ("weights", weights, Kind::Float)] {
        if t.size() != [n, w] || t.kind() != kind || t.device() != device {
            return Err(Error::Input(format!("MoE combine: {name} must be {kind:?} [{n}, {w}] on {device:?}, got {:?} {:?}", t.kind(), t.size())));
        }
    }
    if n == 0 || m == 0 {
        return Ok(Some(Tensor::f_zeros([n, h], (Kind::BFloat16, device))?));
    }
    let Ok(k) = compiled(&COMBINE, device, "moe_combine.cu", COMBINE_SOURCE, &["moe_combine"]) else {
        return Ok(None);
    };
    let (y, ids, row, weights) = (y.contiguous(), ids.contiguous(), row.contiguous(), weights.contiguous());
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, device))?;
    let args = [Arg::Tensor(&y), Arg::Tensor(&ids), Arg::Tensor(&row), Arg::Tensor(&weights), Arg::Tensor(&out), Arg::I32(h as i32), Arg::I32(w as i32), Arg::I64(m)];
    launch(k[0], [((h / 8) as u32).div_ceil(256), n as u32, 1], [256, 1, 1], &args)?;
    Ok(Some(out))
}

/// Inputs of [`mla_decode`]: DeepSeek-V2's absorbed multi-head latent attention for a few query tokens.
#[derive(Debug, Clone, Copy)]
pub struct MlaDecode<'a> {
    /// `(b, nh, t, nope)` bf16, unit last stride.
    pub q_nope: &'a Tensor,
    /// `(b, nh, t, rope)` bf16, roped.
    pub q_pe: &'a Tensor,
    /// `(nh, nope, rank)` bf16: the key part of `kv_b_proj`.
    pub w_uk: &'a Tensor,
    /// `(b, s, rank)` bf16: the cached normalised latents, unit last stride.
    pub ckv: &'a Tensor,
    /// `(b, s, rope)` bf16: the cached roped key parts, unit last stride.
    pub kpe: &'a Tensor,
    /// `(b, 1, t, s)` f32 additive bias (-inf: not attended, and not read).
    pub bias: &'a Tensor,
    /// `(nh, rank, v)` bf16: the value part of `kv_b_proj`, transposed.
    pub w_uv_t: &'a Tensor,
    /// Softmax scale.
    pub scale: f64,
}

/// The most `b * t` query tokens [`mla_decode`] takes (decode steps; prefill uses fused sdpa).
pub const MLA_DECODE_MAX_QUERIES: i64 = 64;

/// DeepSeek-V2 attention for decode steps in one kernel (`mla_decode.cu`): `(b, t, nh, v)` bf16, or
/// `None` when the kernel does not apply (not CUDA bf16, too many queries or slots for shared memory,
/// unsupported sizes, or it did not compile) and the caller uses libtorch.
pub fn mla_decode(a: &MlaDecode<'_>) -> Result<Option<Tensor>> {
    let q = a.q_nope.size();
    if q.len() != 4 || !a.q_nope.device().is_cuda() {
        return Ok(None);
    }
    let device = a.q_nope.device();
    let (b, nh, t, nope) = (q[0], q[1], q[2], q[3]);
    let (s, rank) = (a.ckv.size().get(1).copied().unwrap_or(0), a.ckv.size().last().copied().unwrap_or(0));
    let (rope, v) = (a.q_pe.size().last().copied().unwrap_or(0), a.w_uv_t.size().last().copied().unwrap_or(0));
    let shapes_ok = a.q_pe.size() == [b, nh, t, rope]
        && a.w_uk.size() == [nh, nope, rank]
        && a.ckv.size() == [b, s, rank]
        && a.kpe.size() == [b, s, rope]
        && a.bias.size() == [b, 1, t, s]
        && a.w_uv_t.size() == [nh, rank, v];
    let bf16 = [a.q_nope, a.q_pe, a.w_uk, a.ckv, a.kpe, a.w_uv_t].iter().all(|x| x.kind() == Kind::BFloat16 && x.device() == device);
    let layout = a.q_nope.stride()[3] == 1
        && a.ckv.stride()[2] == 1
        && a.kpe.stride()[2] == 1
        && [a.q_pe, a.w_uk, a.w_uv_t, a.bias].iter().all(|x| x.is_contiguous())
        && a.bias.kind() == Kind::Float
        && a.bias.device() == device;
    let shared_bytes = (2 * rank + rope + 320 + s) * 4;
    let sizes_ok = b * t <= MLA_DECODE_MAX_QUERIES
        && rank % 8 == 0
        && rope % 8 == 0
        && rank > 0
        && (1..=256).contains(&nope)
        && (1..=256).contains(&v)
        && shared_bytes <= 48 * 1024;
    if !(shapes_ok && bf16 && layout && sizes_ok) {
        return Ok(None);
    }
    let Ok(k) = compiled(&MLA, device, "mla_decode.cu", MLA_SOURCE, &["mla_decode"]) else {
        return Ok(None);
    };
    let out = Tensor::f_empty([b, t, nh, v], (Kind::BFloat16, device))?;
    let (qs, cs, ks) = (a.q_nope.stride(), a.ckv.stride(), a.kpe.stride());
    let args = [
        Arg::Tensor(a.q_nope), Arg::I64(qs[0]), Arg::I64(qs[1]), Arg::I64(qs[2]),
        Arg::Tensor(a.q_pe), Arg::Tensor(a.w_uk),
        Arg::Tensor(a.ckv), Arg::I64(cs[0]), Arg::I64(cs[1]),
        Arg::Tensor(a.kpe), Arg::I64(ks[0]), Arg::I64(ks[1]),
        Arg::Tensor(a.bias), Arg::Tensor(a.w_uv_t), Arg::Tensor(&out),
        Arg::I32(nh as i32), Arg::I32(t as i32), Arg::I32(s as i32), Arg::I32(nope as i32), Arg::I32(rope as i32),
        Arg::I32(rank as i32), Arg::I32(v as i32), Arg::F32(a.scale as f32),
    ];
    launch_shared(k[0], [nh as u32, (b * t) as u32, 1], [256, 1, 1], shared_bytes as u32, &args)?;
    Ok(Some(out))
}

fn launch(f: Function, grid: [u32; 3], block: [u32; 3], args: &[Arg<'_>]) -> Result<()> {
    launch_shared(f, grid, block, 0, args)
}

#[allow(unsafe_code)]
fn launch_shared(f: Function, grid: [u32; 3], block: [u32; 3], shared: u32, args: &[Arg<'_>]) -> Result<()> {
    // SAFETY: the callers (`fused_moe`, `rotary`, `mla_decode`, `moe_combine`) checked that every tensor is on the kernel's device, of
    // the dtype, shape and strides the kernel indexes with (the size arguments passed); `fused_moe`'s ids
    // outside 0..E are skipped by the kernels, and its null pointers are only for tensors the size and
    // mode arguments say are absent; the grids cover exactly the rows, pairs or elements those shapes
    // give, and the kernels bound-check the rest (`moe_combine` skips rows outside `y`).
    // `mla_decode`'s dynamic shared memory is sized from the same sizes.
    unsafe { f.launch(grid, block, shared, args) }.map_err(Error::from)
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
            let a = ex.forward(&x, &ids, &mix, Dispatch::Fused, None).expect("fused").to_kind(Kind::Float);
            let b = ex.forward(&x, &ids, &mix, Dispatch::Grouped, None).expect("grouped").to_kind(Kind::Float);
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
                let want = ex.forward(&x, &ids, &wts, Dispatch::Grouped, None).expect("grouped").to_kind(Kind::Float);
                let mix = MixWeights::Router { probs: &probs, renormalize, scale: s };
                let got = ex
                    .forward_fused(&x, Routing::Chosen { ids: &ids, mix }, None)
                    .expect("fused router")
                    .to_kind(Kind::Float);
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                eprintln!("n = {n}, renormalize {renormalize}: max |fused - grouped| = {err:.3e} (of {scale:.3e})");
                assert!(err <= 0.02 * scale + 1e-3, "router-mixed fused differs: {err} vs {scale}");
            }
        }
    }

    /// A random bf16 MoE block on the GPU: `e` experts of width `i`, hidden `h`, with a shared expert of
    /// width `is` (gated or not) when `is > 0`.
    fn random_block(e: i64, h: i64, i: i64, is: i64, gated: bool, renormalize: bool) -> crate::layers::moe::MoeBlock {
        use crate::layers::mlp::Mlp;
        use crate::layers::moe::{MoeBlock, Mixing, MixingTable, TopkMethod};
        use crate::layers::Linear;
        let dev = Device::Cuda(0);
        let bf = |s: &[i64], sd: f64| (Tensor::randn(s, (Kind::Float, dev)) * sd).to_kind(Kind::BFloat16);
        let lin = |o: i64, n: i64| Linear { weight: bf(&[o, n], 0.05), bias: None };
        let m = Mixing { renormalize, scale: if renormalize { 1.0 } else { 1.5 } };
        MoeBlock {
            gate: Tensor::randn([e, h], (Kind::Float, dev)) * 0.2,
            experts: Experts { gate_up_proj: bf(&[e, 2 * i, h], 0.05), down_proj: bf(&[e, h, i], 0.05), num_experts: e },
            shared_experts: (is > 0).then(|| Mlp { gate_proj: lin(is, h), up_proj: lin(is, h), down_proj: lin(h, is) }),
            shared_expert_gate: (is > 0 && gated).then(|| lin(1, h)),
            topk_method: TopkMethod::Greedy,
            mixing: MixingTable { native: m, always: m, never: m },
        }
    }

    /// On a GPU: a whole MoE block with the router's top-k inside the kernels and the shared expert
    /// added there (`Dispatch::Auto` at decode sizes) equals the libtorch path (router linear, softmax,
    /// stable sort, mixing weights, grouped GEMMs, shared MLP), for DeepSeek-like (ungated shared,
    /// unnormalised scaled weights), Qwen-like (sigmoid-gated shared, 60 experts) and Mixtral-like (no
    /// shared) blocks, one and several tokens. Also: a policy-chosen selection (Alloc-T-like ids through
    /// `Routing::Chosen`) with the shared expert fused.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_top_k_and_shared_expert_match_the_libtorch_block() {
        use crate::ctx::ForwardCtx;
        use crate::layers::moe::TokenInfo;
        use alloc_token::device::DeviceTopK;
        let dev = Device::Cuda(0);
        tch::manual_seed(5);
        for (e, is, gated, renorm, k) in [(64i64, 272i64, false, false, 6usize), (60, 176, true, true, 4), (8, 0, false, true, 2)] {
            let block = random_block(e, 256, 136, is, gated, renorm);
            let policy = DeviceTopK { k };
            assert_eq!(alloc_token::device::DevicePolicy::fixed_top_k(&policy, 3), Some(k));
            for n in [1i64, 5] {
                let x = (Tensor::randn([1, n, 256], (Kind::Float, dev))).to_kind(Kind::BFloat16);
                let tokens = TokenInfo { mask: None, seq_ids: Tensor::zeros([n], (Kind::Int64, dev)) };
                let mut fused_ctx = ForwardCtx::new(&policy);
                let got = block.forward(3, &x, &tokens, &mut fused_ctx).expect("fused").to_kind(Kind::Float);
                let mut ref_ctx = ForwardCtx::new(&policy);
                ref_ctx.dispatch = Dispatch::Grouped;
                let want = block.forward(3, &x, &tokens, &mut ref_ctx).expect("grouped").to_kind(Kind::Float);
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                eprintln!("e {e}, shared {is} (gated {gated}), k {k}, n {n}: max |fused top-k - libtorch| = {err:.3e} (of {scale:.3e})");
                assert!(err <= 0.02 * scale + 1e-3, "fused top-k block differs: {err} vs {scale}");
            }
        }
        // Chosen ids (with empty slots) plus a gated shared expert.
        let block = random_block(16, 256, 136, 176, true, true);
        let x = Tensor::randn([3, 256], (Kind::Float, dev)).to_kind(Kind::BFloat16);
        let ids = Tensor::from_slice(&[1i64, 4, -1, 15, 15, 2, -1, -1, -1]).reshape([3, 3]).to_device(dev);
        let probs = block.router_probs(&x).expect("probs");
        let mix = MixWeights::Router { probs: &probs, renormalize: true, scale: 1.0 };
        let shared = block.shared_experts.as_ref().expect("shared");
        let gate = block.shared_expert_gate.as_ref().expect("gate");
        let s = SharedExpert { gate: &shared.gate_proj.weight, up: &shared.up_proj.weight, down: &shared.down_proj.weight, gate_logit: Some(&gate.weight) };
        let got = block.experts.forward_fused(&x, Routing::Chosen { ids: &ids, mix }, Some(s)).expect("fused").to_kind(Kind::Float);
        let w = crate::layers::moe::mixing_weights(&probs, &ids, crate::ctx::Renormalize::Native, &block.mixing).expect("w");
        let routed = block.experts.forward(&x, &ids, &w, Dispatch::Grouped, None).expect("grouped");
        let sh = shared.forward(&x).expect("shared") * gate.forward(&x).expect("gate").sigmoid();
        let want = (routed + sh).to_kind(Kind::Float);
        let err = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        eprintln!("chosen ids + gated shared: max |fused - libtorch| = {err:.3e} (of {scale:.3e})");
        assert!(err <= 0.02 * scale + 1e-3, "{err} vs {scale}");
    }

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

    /// On a GPU: the one-kernel MLA decode attention equals the libtorch absorbed path (q_nope x W_uk,
    /// concatenations, eager softmax attention, x W_uv) within bf16 rounding, with masked (-inf) slots
    /// that the kernel skips, two sequences and strided inputs.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn mla_decode_kernel_matches_the_absorbed_libtorch_path() {
        let dev = Device::Cuda(0);
        tch::manual_seed(9);
        let (b, nh, t, nope, rope, rank, v, s) = (2i64, 16i64, 1i64, 128i64, 64i64, 512i64, 128i64, 77i64);
        let bf = |sh: &[i64], sd: f64| (Tensor::randn(sh, (Kind::Float, dev)) * sd).to_kind(Kind::BFloat16);
        let q = bf(&[b, t, nh, nope + rope], 1.0).transpose(1, 2); // (b, nh, t, nope + rope), strided
        let q_nope = q.narrow(-1, 0, nope);
        let q_pe = q.narrow(-1, nope, rope).contiguous();
        let w_uk = bf(&[nh, nope, rank], 0.05);
        let w_uv_t = bf(&[nh, rank, v], 0.05);
        let cache = bf(&[b, s, rank + rope], 1.0);
        let ckv = cache.narrow(-1, 0, rank); // strided rows
        let kpe = cache.narrow(-1, rank, rope);
        // Slots 50.. of sequence 0 and 0..3 of sequence 1 are masked.
        let keep = Tensor::ones([b, s], (Kind::Bool, dev));
        let _ = keep.get(0).narrow(0, 50, s - 50).fill_(0);
        let _ = keep.get(1).narrow(0, 0, 3).fill_(0);
        let zero = Tensor::zeros([1], (Kind::Float, dev));
        let ninf = Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, dev));
        let bias = zero.where_self(&keep, &ninf).view([b, 1, 1, s]).contiguous();
        let scale = 0.07;
        let got = mla_decode(&MlaDecode { q_nope: &q_nope, q_pe: &q_pe, w_uk: &w_uk, ckv: &ckv, kpe: &kpe, bias: &bias, w_uv_t: &w_uv_t, scale })
            .expect("mla")
            .expect("applies")
            .to_kind(Kind::Float); // (b, t, nh, v)
        let q_lat = q_nope.matmul(&w_uk);
        let qf = Tensor::cat(&[q_lat, q_pe.shallow_clone()], -1);
        let kf = Tensor::cat(&[&ckv, &kpe], -1).unsqueeze(1);
        let o_lat = crate::layers::attention::eager_attention(&qf, &kf, &ckv.unsqueeze(1), &bias, scale).expect("eager");
        let want = o_lat.matmul(&w_uv_t).transpose(1, 2).to_kind(Kind::Float);
        let err = (&got - &want).abs().max().double_value(&[]);
        let mag = want.abs().max().double_value(&[]);
        eprintln!("mla_decode: max |kernel - libtorch| = {err:.3e} (of {mag:.3e})");
        assert!(err <= 0.03 * mag + 1e-3, "{err} vs {mag}");
    }

    /// On a GPU: the grouped path for many tokens (grouped GEMMs, then the combine kernel) equals the
    /// per-expert path in f32 on the CPU, with Alloc-T-like prefix selections (some slots empty, one
    /// token with none) and the chosen pairs' exact count as the bound.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn grouped_combine_matches_the_cpu_reference() {
        let dev = Device::Cuda(0);
        tch::manual_seed(11);
        let (e, h, i, n, w) = (16i64, 256i64, 136i64, 300i64, 6i64);
        let ex = Experts {
            gate_up_proj: (Tensor::randn([e, 2 * i, h], (Kind::Float, dev)) * 0.05).to_kind(Kind::BFloat16),
            down_proj: (Tensor::randn([e, h, i], (Kind::Float, dev)) * 0.05).to_kind(Kind::BFloat16),
            num_experts: e,
        };
        let x = Tensor::randn([n, h], (Kind::Float, dev)).to_kind(Kind::BFloat16);
        // Distinct experts per token (a random permutation's prefix), count 0..=w per token.
        let perm = Tensor::rand([n, e], (Kind::Float, dev)).argsort(-1, false).narrow(1, 0, w);
        let counts = Tensor::randint(w + 1, [n, 1], (Kind::Int64, dev));
        let slot = Tensor::arange(w, (Kind::Int64, dev)).unsqueeze(0);
        let ids = perm.where_self(&slot.lt_tensor(&counts), &Tensor::full([1], -1, (Kind::Int64, dev)));
        let mix = Tensor::rand([n, w], (Kind::Float, dev));
        let chosen = ids.ge(0).sum(Kind::Int64).int64_value(&[]) as usize;
        let got = ex.forward(&x, &ids, &mix, Dispatch::Grouped, Some(chosen)).expect("grouped").to_kind(Kind::Float).to_device(Device::Cpu);
        let cpu = Experts {
            gate_up_proj: ex.gate_up_proj.to_kind(Kind::Float).to_device(Device::Cpu),
            down_proj: ex.down_proj.to_kind(Kind::Float).to_device(Device::Cpu),
            num_experts: e,
        };
        let want = cpu
            .forward(&x.to_kind(Kind::Float).to_device(Device::Cpu), &ids.to_device(Device::Cpu), &mix.to_device(Device::Cpu), Dispatch::PerExpert, None)
            .expect("cpu");
        let err = (&got - &want).abs().max().double_value(&[]);
        let mag = want.abs().max().double_value(&[]);
        eprintln!("grouped + combine ({chosen} of {} pairs): max |gpu - cpu f32| = {err:.3e} (of {mag:.3e})", n * w);
        assert!(err <= 0.02 * mag + 1e-3, "{err} vs {mag}");
    }
}
