//! Fused MoE kernels for a few tokens (`moe_decode.cu`): the routed experts read straight from the
//! stacked weights in two kernels, optionally with the router's top-k (a third, tiny kernel for the
//! logits) and the shared expert in the same kernels. Several tokens (sequences decoding together) take
//! kernels that read each chosen expert once for all of them, after one more small kernel that routes
//! each token once (top-k, or a policy's batch split: Alloc-T).

use alloc_token::device::BatchSplit;
use cuda_graph::jit::{Arg, Function, Kernels};
use tch::{Device, Kind, Tensor};

use super::{compiled, launch_dependent};
use crate::error::{Error, Result};

/// The largest `tokens x slots` the fused path takes; above it the grouped GEMMs win.
pub const FUSED_MOE_MAX_PAIRS: i64 = 64;

const WARPS: u32 = 4;
/// The widest input `moe_router_warp` takes (`256 * ROUTER_WARP_CHUNKS` in `moe_decode.cu`).
const ROUTER_WARP_MAX_WIDTH: i64 = 2048;

const MOE_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("moe_decode.cu"));
const MOE_NAMES: [&str; 18] = [
    "moe_router", "moe_down_1", "moe_down_2", "moe_down_4", "moe_gate_up_64", "moe_gate_up_128", "moe_gate_up_256", "moe_router_warp",
    "moe_route_64", "moe_route_128", "moe_route_256", "moe_gate_up_tokens", "moe_down_tokens_1", "moe_down_tokens_2", "moe_down_tokens_4",
    "moe_route_split_64", "moe_route_split_128", "moe_route_split_256",
];
pub(super) static MOE: Kernels = Kernels::new("moe_decode.cu", MOE_SOURCE, &MOE_NAMES);

/// The kernels of `MOE_NAMES`, in its order.
fn moe_kernels(device: Device) -> Result<&'static [Function]> {
    compiled(&MOE, device)
}

/// The variant of a ranking kernel (`first` of three, for 64, 128 and 256 experts) that ranks `e`
/// experts with the fewest registers.
fn ranking_variant(k: &[Function], first: usize, e: i64) -> Function {
    match e {
        ..=64 => k[first],
        65..=128 => k[first + 1],
        _ => k[first + 2],
    }
}

/// The `moe_gate_up` variant whose top-k ranks `e` experts with the fewest registers.
fn gate_up_variant(k: &[Function], e: i64) -> Function {
    ranking_variant(k, 4, e)
}

/// The most tokens the several-token kernels take (`TOK_MAX` in `moe_decode.cu`); one token, or more
/// than this, takes the per-pair kernels.
pub const FUSED_MOE_MAX_TOKENS: i64 = 8;

/// The `moe_down` variant for `n` tokens of `units` warps each (slots, plus the shared expert) over `h`
/// outputs, and its columns per block: the most columns (fewer blocks, about one wave) that still leave
/// ~3000 warps in the grid to keep the weight reads in flight (measured on the H200: 4 columns for
/// V2-Lite's 6 slots + shared, 2-column and 1-column grids for fewer slots).
fn down_variant(k: &[Function], n: i64, units: i64, h: i64) -> (Function, i64) {
    down_columns(&k[1..4], n, units, h)
}

/// Of `k` = the 1-, 2- and 4-column variants of a down kernel, the one for `n` tokens of `units` warps
/// each over `h` outputs, and its columns per block (see [`down_variant`]).
fn down_columns(k: &[Function], n: i64, units: i64, h: i64) -> (Function, i64) {
    match [4i64, 2].into_iter().find(|&c| h / c * n * units >= 3000) {
        Some(4) => (k[2], 4),
        Some(_) => (k[1], 2),
        None => (k[0], 1),
    }
}

/// The most routed experts the in-kernel top-k ranks (`MAX_EXPERTS` in `moe_decode.cu`).
pub const FUSED_MOE_MAX_EXPERTS: i64 = 256;

/// Whether [`fused_moe`] applies to `pairs` (token, slot) pairs of `x`: a CUDA bf16 model, at most
/// [`FUSED_MOE_MAX_PAIRS`] pairs, 16-byte rows, a hidden size the router kernel stages in one pass
/// (at most 8192).
pub fn fused_moe_applies(x: &Tensor, pairs: i64, gate_up: &Tensor) -> bool {
    let (h, i2) = (gate_up.size()[2], gate_up.size()[1]);
    x.device().is_cuda() && x.kind() == Kind::BFloat16 && gate_up.kind() == Kind::BFloat16 && pairs <= FUSED_MOE_MAX_PAIRS
        && h % 8 == 0 && h <= 8192 && (i2 / 2) % 8 == 0
}

/// [`fused_moe_applies`], and the kernels compile on this GPU (compiled on first use; a failure is
/// logged once and the grouped path is used instead).
pub fn fused_moe_available(x: &Tensor, pairs: i64, gate_up: &Tensor) -> bool {
    fused_moe_applies(x, pairs, gate_up) && moe_kernels(x.device()).is_ok()
}

/// Whether [`Routing::Split`] takes `split` for `n` tokens over `e` experts: 2 to
/// [`FUSED_MOE_MAX_TOKENS`] tokens, `floor <= cap`, a cap of 1 to 8 (and at most `e`), at most
/// [`FUSED_MOE_MAX_EXPERTS`] experts.
pub fn split_applies(n: i64, e: i64, split: &BatchSplit) -> bool {
    (2..=FUSED_MOE_MAX_TOKENS).contains(&n)
        && split.floor <= split.cap
        && (1..=8.min(e)).contains(&(split.cap as i64))
        && e <= FUSED_MOE_MAX_EXPERTS
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
    /// A batch's budget split across its 2 to [`FUSED_MOE_MAX_TOKENS`] tokens by score inside the
    /// kernels (Alloc-T, batch scope: the policy's [`BatchSplit`]): the router's logits and softmax as
    /// for `TopK`, then one small kernel ranks every token and splits the budget, weighted by the family's
    /// mixing rule over each token's chosen experts. Replaces the router's linear and softmax and the
    /// policy's selection kernels.
    Split {
        /// The router weight.
        router: &'a Tensor,
        /// The rule, with `cap <= 8`.
        split: BatchSplit,
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
    /// `(n, h)` bf16 on CUDA: the block's input, or with `norm` the residual stream before the norm.
    pub x: &'a Tensor,
    /// The decoder's post-attention RMSNorm (weight `(h)` bf16, epsilon), applied to `x` inside the
    /// router kernel; only with [`Routing::TopK`] (a policy needs the normalised input first).
    pub norm: Option<(&'a Tensor, f64)>,
    /// `(n, h)` bf16 added to the output (the decoder's residual add).
    pub residual: Option<&'a Tensor>,
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
/// read straight from the stacked weights, mixed as `call.routing` says, plus the shared expert, with
/// the norm before and the residual add after when the call has them. Returns `(n, h)` bf16. Every
/// shape, dtype, stride and device is checked here, because the kernels trust them.
pub fn fused_moe(call: &MoeCall<'_>) -> Result<Tensor> {
    let bad = |what: &str| Error::Input(format!("fused MoE: {what}"));
    let MoeCall { x, norm, residual, routing, gate_up, down, shared } = *call;
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
    if let Some((w, _)) = norm {
        check("norm weight", w, Kind::BFloat16, &[h])?;
        if matches!(routing, Routing::Chosen { .. }) {
            return Err(bad("a norm inside the kernels needs the routing inside them (top-k or split)"));
        }
    }
    if let Some(r) = residual {
        check("residual", r, Kind::BFloat16, &[n, h])?;
    }
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
        Routing::Split { router, split, .. } => {
            check("router", router, Kind::Float, &[e, h])?;
            let cap = split.cap as i64;
            if !split_applies(n, e, &split) {
                return Err(bad(&format!(
                    "a split of {n} tokens' budget over {e} experts with floor {} and cap {} (2 to {FUSED_MOE_MAX_TOKENS} tokens, a cap of 1 to 8, at most {FUSED_MOE_MAX_EXPERTS} experts)",
                    split.floor, split.cap
                )));
            }
            cap
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
    let residual = residual.map(|r| r.contiguous());
    let res = residual.as_ref().map_or(Arg::I64(0), Arg::Tensor);
    let f32s = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, device));
    let bf16s = |shape: &[i64]| Tensor::f_empty(shape, (Kind::BFloat16, device));
    let act = bf16s(&[n * w, i])?;
    let out = bf16s(&[n, h])?;
    let act_s = bf16s(&[n, is_.max(1)])?;
    let gate_w = f32s(&[n])?;
    let block = [32 * WARPS, 1, 1];
    let rows = |r: i64| (r as u32).div_ceil(WARPS);
    // Absent tensors are null pointers.
    let null = Arg::I64(0);
    let (sg, su, sd, sgate) = match shared {
        Some(s) => (Arg::Tensor(s.gate), Arg::Tensor(s.up), Arg::Tensor(s.down), s.gate_logit.map_or(null, Arg::Tensor)),
        None => (null, null, null, null),
    };
    let dims = Dims { h, i, w, e, is_, n };
    // Several tokens: the kernels that read each chosen expert once (their owner table holds at most
    // FUSED_MOE_MAX_EXPERTS experts).
    if (2..=FUSED_MOE_MAX_TOKENS).contains(&n) && e <= FUSED_MOE_MAX_EXPERTS {
        return several_tokens(k, call, &x, residual.as_ref(), dims, &act, &out, &act_s, &gate_w);
    }
    // One output row per warp (more rows per warp measured slower on the H200: fewer warps in flight);
    // blocks for each routed pair's I rows, then for each token's Is shared rows.
    let grid_gu = [rows(i) * (n * w) as u32 + rows(is_) * n as u32, 1, 1];
    let units = (w + i64::from(is_ > 0)).clamp(1, 8);
    let (down_kernel, cols) = down_variant(k, n, units, h);
    let grid_down = [(h / cols) as u32, n as u32, 1];
    let block_down = [32 * units as u32, 1, 1];
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
            launch_dependent(gate_up_variant(k, e), grid_gu, block, 0, &gu)?;
            let dn = [
                Arg::Tensor(&act), Arg::Tensor(&ids), Arg::Tensor(&mix_t), Arg::Tensor(down), Arg::Tensor(&out), Arg::Tensor(&act_s),
                sd, if shared.is_some_and(|s| s.gate_logit.is_some()) { Arg::Tensor(&gate_w) } else { null }, res,
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(ld as i32),
                Arg::I32(is_ as i32), Arg::I32(gather), Arg::I32(renorm), Arg::F32(scale as f32),
            ];
            launch_dependent(down_kernel, grid_down, block_down, 0, &dn)?;
        }
        // Checked above: a split has 2 to FUSED_MOE_MAX_TOKENS tokens, which several_tokens took.
        Routing::Split { .. } => return Err(bad("a split needs 2 to 8 tokens")),
        Routing::TopK { router, renormalize, scale, .. } => {
            let logits = f32s(&[n, e])?;
            let owned_ids = Tensor::f_empty([n, w], (Kind::Int64, device))?;
            let wts = f32s(&[n, w])?;
            // With the norm, the router kernel writes the normalised input the other two read.
            let xn = if norm.is_some() { bf16s(&[n, h])? } else { x.shallow_clone() };
            let r = [
                Arg::Tensor(&x), norm.map_or(null, |(nw, _)| Arg::Tensor(nw)), Arg::F32(norm.map_or(0.0, |(_, eps)| eps as f32)),
                Arg::Tensor(&xn), Arg::Tensor(router), Arg::Tensor(&logits), Arg::I32(h as i32), Arg::I32(e as i32),
            ];
            // One token of a width a lane's registers hold: a warp per expert with its row in registers.
            if n == 1 && h <= ROUTER_WARP_MAX_WIDTH {
                launch_dependent(k[7], [(e as u32).div_ceil(4), 1, 1], [128, 1, 1], 0, &r)?;
            } else {
                launch_dependent(k[0], [rows(e), n as u32, 1], block, (h * 2) as u32, &r)?;
            }
            let gu = [
                Arg::Tensor(&xn), null, Arg::Tensor(&logits), Arg::Tensor(gate_up), Arg::Tensor(&act), Arg::Tensor(&owned_ids),
                Arg::Tensor(&wts), sg, su, Arg::Tensor(&act_s), sgate, Arg::Tensor(&gate_w),
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(w as i32),
                Arg::I32(is_ as i32), Arg::I32(n as i32), Arg::I32(1), Arg::I32(renormalize as i32), Arg::F32(scale as f32),
            ];
            launch_dependent(gate_up_variant(k, e), grid_gu, block, 0, &gu)?;
            let dn = [
                Arg::Tensor(&act), Arg::Tensor(&owned_ids), Arg::Tensor(&wts), Arg::Tensor(down), Arg::Tensor(&out),
                Arg::Tensor(&act_s), sd, if shared.is_some_and(|s| s.gate_logit.is_some()) { Arg::Tensor(&gate_w) } else { null }, res,
                Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(w as i32),
                Arg::I32(is_ as i32), Arg::I32(0), Arg::I32(0), Arg::F32(1.0),
            ];
            launch_dependent(down_kernel, grid_down, block_down, 0, &dn)?;
        }
    }
    Ok(out)
}

/// The sizes of a [`fused_moe`] call: hidden `h`, expert width `i`, slots `w`, experts `e`, shared width
/// `is_` (0: none), tokens `n`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    h: i64,
    i: i64,
    w: i64,
    e: i64,
    is_: i64,
    n: i64,
}

/// [`fused_moe`] for 2 to [`FUSED_MOE_MAX_TOKENS`] tokens (sequences decoding together): each chosen
/// expert's rows, and the shared expert's, read once for all the tokens (`moe_gate_up_tokens`,
/// `moe_down_tokens`); the router's top-k, when asked for, ranks each token once (`moe_route`) after
/// the logits. `x`, `residual` and the outputs as [`fused_moe`] made them; the call is checked.
#[allow(clippy::too_many_arguments)]
fn several_tokens(
    k: &[Function],
    call: &MoeCall<'_>,
    x: &Tensor,
    residual: Option<&Tensor>,
    d: Dims,
    act: &Tensor,
    out: &Tensor,
    act_s: &Tensor,
    gate_w: &Tensor,
) -> Result<Tensor> {
    let Dims { h, i, w, e, is_, n } = d;
    let device = x.device();
    let null = Arg::I64(0);
    let res = residual.map_or(null, Arg::Tensor);
    let (sg, su, sd, sgate) = match call.shared {
        Some(s) => (Arg::Tensor(s.gate), Arg::Tensor(s.up), Arg::Tensor(s.down), s.gate_logit.map_or(null, Arg::Tensor)),
        None => (null, null, null, null),
    };
    let gated = call.shared.is_some_and(|s| s.gate_logit.is_some());
    // The experts chosen, their row stride, and how moe_down_tokens weights them.
    let (ids, xn, mix, gather, renorm, scale) = match call.routing {
        Routing::Chosen { ids, mix } => {
            let ids = if ids.stride()[1] == 1 { ids.shallow_clone() } else { ids.contiguous() };
            let (mix_t, gather, renorm, scale) = match mix {
                MixWeights::Given(t) => (t.contiguous(), 0, 0, 1.0),
                MixWeights::Router { probs, renormalize, scale } => (probs.contiguous(), 1, renormalize as i32, scale),
            };
            (ids, x.shallow_clone(), mix_t, gather, renorm, scale)
        }
        Routing::TopK { router, renormalize, scale, .. } | Routing::Split { router, renormalize, scale, .. } => {
            let logits = Tensor::f_empty([n, e], (Kind::Float, device))?;
            let xn = if call.norm.is_some() { Tensor::f_empty([n, h], (Kind::BFloat16, device))? } else { x.shallow_clone() };
            let r = [
                Arg::Tensor(x), call.norm.map_or(null, |(nw, _)| Arg::Tensor(nw)), Arg::F32(call.norm.map_or(0.0, |(_, eps)| eps as f32)),
                Arg::Tensor(&xn), Arg::Tensor(router), Arg::Tensor(&logits), Arg::I32(h as i32), Arg::I32(e as i32),
            ];
            launch_dependent(k[0], [(e as u32).div_ceil(WARPS), n as u32, 1], [32 * WARPS, 1, 1], (h * 2) as u32, &r)?;
            let ids = Tensor::f_empty([n, w], (Kind::Int64, device))?;
            let wts = Tensor::f_empty([n, w], (Kind::Float, device))?;
            let (renorm, scale) = (Arg::I32(renormalize as i32), Arg::F32(scale as f32));
            if let Routing::Split { split, .. } = call.routing {
                let route = [
                    Arg::Tensor(&logits), Arg::I32(e as i32), Arg::I32(n as i32), Arg::I32(split.floor as i32), Arg::I32(w as i32),
                    Arg::I32(split.extra as i32), Arg::I32(split.relative_to_top1 as i32), renorm, scale, Arg::Tensor(&ids),
                    Arg::Tensor(&wts),
                ];
                launch_dependent(ranking_variant(k, 15, e), [1, 1, 1], [32 * n as u32, 1, 1], 0, &route)?;
            } else {
                let route = [Arg::Tensor(&logits), Arg::I32(e as i32), Arg::I32(w as i32), renorm, scale, Arg::Tensor(&ids), Arg::Tensor(&wts)];
                launch_dependent(ranking_variant(k, 8, e), [n as u32, 1, 1], [32, 1, 1], 0, &route)?;
            }
            (ids, xn, wts, 0, 0, 1.0)
        }
    };
    let ld = ids.stride()[0];
    let rows = |r: i64| (r as u32).div_ceil(WARPS);
    let gu = [
        Arg::Tensor(&xn), Arg::Tensor(&ids), Arg::Tensor(call.gate_up), Arg::Tensor(act), sg, su, Arg::Tensor(act_s), sgate,
        Arg::Tensor(gate_w), Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32), Arg::I32(e as i32), Arg::I32(ld as i32),
        Arg::I32(is_ as i32), Arg::I32(n as i32),
    ];
    launch_dependent(k[11], [rows(i) * (n * w) as u32 + rows(is_), 1, 1], [32 * WARPS, 1, 1], 0, &gu)?;
    let warps = (n * w + i64::from(is_ > 0)).clamp(1, 8);
    let (down_kernel, cols) = down_columns(&k[12..15], 1, warps, h);
    let dn = [
        Arg::Tensor(act), Arg::Tensor(&ids), Arg::Tensor(&mix), Arg::Tensor(call.down), Arg::Tensor(out), Arg::Tensor(act_s), sd,
        if gated { Arg::Tensor(gate_w) } else { null }, res, Arg::I32(h as i32), Arg::I32(i as i32), Arg::I32(w as i32),
        Arg::I32(e as i32), Arg::I32(ld as i32), Arg::I32(is_ as i32), Arg::I32(n as i32), Arg::I32(gather), Arg::I32(renorm),
        Arg::F32(scale as f32),
    ];
    launch_dependent(down_kernel, [(h / cols) as u32, 1, 1], [32 * warps as u32, 1, 1], 0, &dn)?;
    Ok(out.shallow_clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::{gpu, randn_bf16};
    use crate::ctx::Dispatch;
    use crate::layers::moe::Experts;

    /// On a GPU: the fused kernels agree with the grouped GEMMs (bf16 tolerance), for one and several
    /// tokens, with empty slots and a token without experts.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn fused_matches_grouped_on_the_gpu() {
        let dev = gpu(1);
        let (e, h, i) = (16i64, 256i64, 136i64);
        let ex = Experts {
            gate_up_proj: randn_bf16(&[e, 2 * i, h], 0.05, dev),
            down_proj: randn_bf16(&[e, h, i], 0.05, dev),
            num_experts: e,
        };
        // Eight tokens of six slots: 48 pairs naming the 16 experts several times each (the several-token
        // kernels read each once), and some empty slots.
        let many: Vec<i64> = (0..8i64).flat_map(|t| (0..6i64).map(move |s| (t * 5 + s * 3) % 17 - 1)).collect();
        for (n, ids) in [
            (1i64, vec![3i64, 7, 0, 15, 9, 2]),
            (3, vec![1, 4, -1, 15, 15, 2, -1, -1, -1]),
            (8, many),
        ] {
            let w = ids.len() as i64 / n;
            let ids = Tensor::from_slice(&ids).reshape([n, w]).to_device(dev);
            let mix = Tensor::rand([n, w], (Kind::Float, dev));
            let x = randn_bf16(&[n, h], 1.0, dev);
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

    /// On a GPU: the batch-split kernel (`moe_route_split`) chooses exactly the experts of Alloc-T's own
    /// device selection on the same logits' softmax, for 2 to 8 tokens, fractional and integer budgets,
    /// floors 0 and 1, both scores, 60 and 200 experts; its weights are the router's mixing rule.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn batch_split_kernel_matches_alloc_t_on_the_gpu() {
        use alloc_token::device::{DeviceBatch, DevicePolicy};
        use alloc_token::{AllocT, Score};
        let dev = gpu(11);
        let k = moe_kernels(dev).expect("kernels");
        let mut cases = 0;
        for e in [60i64, 200] {
            for t in [2i64, 3, 5, 8] {
                for (k_avg, floor, cap, rel) in [(2.5, 1usize, 6usize, false), (3.0, 1, 6, true), (1.25, 0, 4, false), (4.0, 2, 8, true)] {
                    let policy = AllocT::new(k_avg, cap).with_floor(floor).with_score(if rel { Score::RelativeToTop1 } else { Score::Probability });
                    let split = policy.batch_split(0, t as usize).expect("a batch split");
                    let logits = Tensor::randn([t, e], (Kind::Float, dev)) * 2.0;
                    let probs = logits.softmax(-1, Kind::Float);
                    let want = policy.select(0, &DeviceBatch { probs: &probs, mask: None, seq_ids: None }).expect("select");
                    let ids = Tensor::full([t, cap as i64], -7, (Kind::Int64, dev));
                    let w = Tensor::zeros([t, cap as i64], (Kind::Float, dev));
                    let args = [
                        Arg::Tensor(&logits), Arg::I32(e as i32), Arg::I32(t as i32), Arg::I32(floor as i32), Arg::I32(cap as i32),
                        Arg::I32(split.extra as i32), Arg::I32(rel as i32), Arg::I32(1), Arg::F32(1.5), Arg::Tensor(&ids), Arg::Tensor(&w),
                    ];
                    launch_dependent(ranking_variant(k, 15, e), [1, 1, 1], [32 * t as u32, 1, 1], 0, &args).expect("launch");
                    assert!(ids.equal(&want), "e {e}, t {t}, K {k_avg}, floor {floor}, cap {cap}, relative {rel}:\n{ids}\nvs\n{want}");
                    // Weights: p / (sum of the token's chosen p + 1e-20) * 1.5, 0 for an empty slot.
                    let chosen = ids.ge(0);
                    let p = probs.gather(1, &ids.clamp_min(0), false) * chosen.to_kind(Kind::Float);
                    let want_w = &p / (p.sum_dim_intlist(1, true, Kind::Float) + 1e-20) * 1.5;
                    let err = (&w - &want_w).abs().max().double_value(&[]);
                    assert!(err < 1e-5, "weights differ by {err}");
                    cases += 1;
                }
            }
        }
        eprintln!("{cases} batch splits equal Alloc-T's device selection");
    }

    /// A random bf16 MoE block on the GPU: `e` experts of width `i`, hidden `h`, with a shared expert of
    /// width `is` (gated or not) when `is > 0`.
    fn random_block(e: i64, h: i64, i: i64, is: i64, gated: bool, renormalize: bool) -> crate::layers::moe::MoeBlock {
        use crate::layers::mlp::Mlp;
        use crate::layers::moe::{MoeBlock, Mixing, MixingTable, TopkMethod};
        use crate::layers::Linear;
        let dev = Device::Cuda(0);
        let bf = |s: &[i64], sd: f64| randn_bf16(s, sd, dev);
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
        let dev = gpu(5);
        for (e, is, gated, renorm, k) in [(64i64, 272i64, false, false, 6usize), (60, 176, true, true, 4), (8, 0, false, true, 2), (8, 0, false, true, 1)] {
            let block = random_block(e, 256, 136, is, gated, renorm);
            let policy = DeviceTopK { k };
            assert_eq!(alloc_token::device::DevicePolicy::fixed_top_k(&policy, 3, 5), Some(k));
            for n in [1i64, 5, 8, 10] {
                let x = randn_bf16(&[1, n, 256], 1.0, dev);
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
        // Alloc-T (a batch split inside the kernels) against its libtorch path (router softmax, the
        // policy's selection kernels, grouped GEMMs).
        for (e, is, gated, renorm, k) in [(64i64, 272i64, false, false, 6usize), (60, 176, true, true, 4)] {
            let block = random_block(e, 256, 136, is, gated, renorm);
            let policy = alloc_token::AllocT::new(k as f64 / 2.0 + 0.5, k);
            for n in [2i64, 5, 8] {
                assert!(alloc_token::device::DevicePolicy::batch_split(&policy, 3, n as usize).is_some());
                let x = randn_bf16(&[1, n, 256], 1.0, dev);
                let tokens = TokenInfo { mask: None, seq_ids: Tensor::zeros([n], (Kind::Int64, dev)) };
                let got = block.forward(3, &x, &tokens, &mut ForwardCtx::new(&policy)).expect("fused").to_kind(Kind::Float);
                let mut ref_ctx = ForwardCtx::new(&policy);
                ref_ctx.dispatch = Dispatch::Grouped;
                let want = block.forward(3, &x, &tokens, &mut ref_ctx).expect("grouped").to_kind(Kind::Float);
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                eprintln!("alloc-t, e {e}, shared {is}, cap {k}, n {n}: max |fused split - libtorch| = {err:.3e} (of {scale:.3e})");
                assert!(err <= 0.02 * scale + 1e-3, "fused split block differs: {err} vs {scale}");
            }
        }
        // The decoder's feed-forward half with the norm and the residual add inside the kernels.
        for (e, is, gated, renorm, k) in [(64i64, 272i64, false, false, 6usize), (60, 176, true, true, 4), (8, 0, false, true, 2)] {
            let block = random_block(e, 256, 136, is, gated, renorm);
            let policy = DeviceTopK { k };
            let norm = crate::layers::RmsNorm { weight: (Tensor::randn([256], (Kind::Float, dev)) * 0.5 + 1.0).to_kind(Kind::BFloat16), eps: 1e-6 };
            for n in [1i64, 5, 8] {
                let x = randn_bf16(&[1, n, 256], 2.0, dev);
                let tokens = TokenInfo { mask: None, seq_ids: Tensor::zeros([n], (Kind::Int64, dev)) };
                let got = block.forward_residual(3, &x, &norm, &tokens, &mut ForwardCtx::new(&policy)).expect("fused").to_kind(Kind::Float);
                let mut ref_ctx = ForwardCtx::new(&policy).with_fuse_decode(false);
                let want = block.forward_residual(3, &x, &norm, &tokens, &mut ref_ctx).expect("libtorch").to_kind(Kind::Float);
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]);
                eprintln!("e {e}, shared {is}, k {k}, n {n}: max |fused norm + residual - libtorch| = {err:.3e} (of {scale:.3e})");
                assert!(err <= 0.01 * scale + 1e-2, "fused norm + residual differs: {err} vs {scale}");
            }
        }
        // Chosen ids (with empty slots) plus a gated shared expert.
        let block = random_block(16, 256, 136, 176, true, true);
        let x = randn_bf16(&[3, 256], 1.0, dev);
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
}
