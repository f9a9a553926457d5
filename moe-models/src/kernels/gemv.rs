//! Projections of a few tokens with the RMSNorm before them and the residual add after them, in one
//! kernel (`gemv.cu`): the attention block's input projections and output projection at decode sizes.

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch_dependent};
use crate::error::Result;

const GEMV_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("gemv.cu"));
/// `[gemv_norm, gemv_warp, gemv_warp_norm, gemv_warp16, gemv_warp16_norm]`.
pub(super) static GEMV: Kernels =
    Kernels::new("gemv.cu", GEMV_SOURCE, &["gemv_norm", "gemv_warp", "gemv_warp_norm", "gemv_warp16", "gemv_warp16_norm"]);

/// The most tokens [`project`] takes (`GEMV_MAX_T` in `gemv.cu`).
pub const PROJECT_MAX_TOKENS: i64 = 8;
const WARPS: i64 = 4;
/// Warps of a `gemv_norm` block (several tokens; `GEMV_KSPLIT` in `gemv.cu`): each takes an eighth of
/// the row width of the block's 16-row tiles.
const STAGED_WARPS: i64 = 8;
/// Rows of a `gemv_norm` tile (`GEMV_TILE`).
const STAGED_TILE: i64 = 16;
/// `gemv_norm`'s most blocks: with more tiles each block takes several (a grid-stride loop), so that the
/// inputs are staged once per block and not once per 16 rows (the LM head has 6400 tiles).
const STAGED_MAX_BLOCKS: i64 = 512;
/// `GEMV_STAGE` in `gemv.cu`: staged 16-byte chunks per thread and row.
const STAGE_CHUNKS: i64 = 4;
/// The widest input `gemv_warp` takes (`32 * 8 * GEMV_WARP_CHUNKS` in `gemv.cu`); `gemv_warp16` twice it.
const WARP_MAX_WIDTH: i64 = 2048;
/// Shared memory for the staged inputs (`T * H` bf16): the 48 KB a kernel gets without opting in, less
/// `gemv_norm`'s own ~5 KB.
const MAX_STAGED_BYTES: i64 = 42 * 1024;

/// One projection of [`Project`]: `y = x W^T (+ b)`.
#[derive(Debug, Clone, Copy)]
pub struct Projection<'a> {
    /// `(r, h)` bf16, contiguous.
    pub weight: &'a Tensor,
    /// `(r)` bf16, if any.
    pub bias: Option<&'a Tensor>,
}

/// Inputs of [`project`]: up to three projections of the same (optionally normalised) input.
#[derive(Debug, Clone, Copy)]
pub struct Project<'a> {
    /// `(.., h)` bf16 on CUDA, at most [`PROJECT_MAX_TOKENS`] rows.
    pub x: &'a Tensor,
    /// RMSNorm applied to `x` first: weight `(h)` bf16 and epsilon (transformers' rounding).
    pub norm: Option<(&'a Tensor, f64)>,
    /// One to three projections of width `h`.
    pub projections: &'a [Projection<'a>],
    /// `(.., r_0)` bf16, added to the first projection's output.
    pub residual: Option<&'a Tensor>,
}

/// `[rmsnorm](x) W_s^T (+ b_s)` for each projection `s` in one kernel (plus `residual` on the first), as
/// `(.., r_s)` bf16 tensors; `None` when the kernel does not apply (not CUDA bf16, more than
/// [`PROJECT_MAX_TOKENS`] rows, sizes that are not multiples of 8, inputs wider than 8192 or over 42 KB, strided
/// weights, or it did not compile) and the caller uses libtorch.
pub fn project(p: &Project<'_>) -> Result<Option<Vec<Tensor>>> {
    let (x, device) = (p.x, p.x.device());
    let size = x.size();
    let Some(&h) = size.last() else { return Ok(None) };
    let t = x.numel() as i64 / h.max(1);
    let bf16_on = |y: &Tensor| y.kind() == Kind::BFloat16 && y.device() == device;
    let ok = device.is_cuda()
        && bf16_on(x)
        && (1..=PROJECT_MAX_TOKENS).contains(&t)
        && h % 8 == 0
        && h <= STAGE_CHUNKS * 8 * 32 * STAGED_WARPS
        && t * h * 2 <= MAX_STAGED_BYTES
        && (1..=3).contains(&p.projections.len())
        && p.norm.is_none_or(|(w, _)| bf16_on(w) && w.size() == [h])
        && p.projections.iter().all(|q| {
            let ws = q.weight.size();
            bf16_on(q.weight)
                && ws.len() == 2
                && ws[1] == h
                && q.weight.is_contiguous()
                && q.bias.is_none_or(|b| bf16_on(b) && b.size() == [ws[0]] && b.is_contiguous())
        });
    let Some(first) = p.projections.first() else { return Ok(None) };
    let r0 = first.weight.size()[0];
    let mut out_size = size.clone();
    *out_size.last_mut().expect("x has a last dimension") = r0;
    let res_ok = p.residual.is_none_or(|r| bf16_on(r) && r.size() == out_size);
    if !(ok && res_ok) {
        return Ok(None);
    }
    let Ok(k) = compiled(&GEMV, device) else {
        return Ok(None);
    };
    let x = x.contiguous();
    let residual = p.residual.map(|r| r.contiguous());
    let outs = p
        .projections
        .iter()
        .map(|q| {
            let mut s = size.clone();
            *s.last_mut().expect("x has a last dimension") = q.weight.size()[0];
            Tensor::f_empty(s.as_slice(), (Kind::BFloat16, device))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let null = Arg::I64(0);
    let mut args = vec![
        Arg::Tensor(&x),
        Arg::I32(t as i32),
        Arg::I32(h as i32),
        p.norm.map_or(null, |(w, _)| Arg::Tensor(w)),
        Arg::F32(p.norm.map_or(0.0, |(_, eps)| eps as f32)),
    ];
    let mut rows = 0i64;
    for s in 0..3 {
        match (p.projections.get(s), outs.get(s)) {
            (Some(q), Some(o)) => {
                let r = q.weight.size()[0];
                rows += r;
                args.extend([Arg::Tensor(q.weight), q.bias.map_or(null, Arg::Tensor), Arg::Tensor(o), Arg::I32(r as i32)]);
            }
            _ => args.extend([null, null, null, Arg::I32(0)]),
        }
    }
    args.push(residual.as_ref().map_or(null, Arg::Tensor));
    // One token of a width a lane's registers hold: each warp keeps its row in registers and normalises
    // the input itself (no staging), in its own kernel when there is a norm. Several tokens: the inputs
    // are staged in shared memory once per block and tensor cores take each weight row once for all.
    if t == 1 && h <= 2 * WARP_MAX_WIDTH {
        let kernel = match (h <= WARP_MAX_WIDTH, p.norm.is_some()) {
            (true, false) => k[1],
            (true, true) => k[2],
            (false, false) => k[3],
            (false, true) => k[4],
        };
        let grid = [(rows as u32).div_ceil(WARPS as u32), 1, 1];
        launch_dependent(kernel, grid, [32 * WARPS as u32, 1, 1], 0, &args)?;
    } else {
        let tiles = (rows + STAGED_TILE - 1) / STAGED_TILE;
        let grid = [tiles.min(STAGED_MAX_BLOCKS) as u32, 1, 1];
        launch_dependent(k[0], grid, [32 * STAGED_WARPS as u32, 1, 1], (t * h * 2) as u32, &args)?;
    }
    Ok(Some(outs))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::{gpu, randn_bf16};
    use crate::layers::{Linear, RmsNorm};

    /// On a GPU: the one-kernel projections equal libtorch's rms_norm, linear (with and without bias)
    /// and residual add within bf16 rounding, for one and several tokens and rows wider than one pass.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn projections_match_libtorch() {
        let dev = gpu(3);
        let bf = |s: &[i64], sd: f64| randn_bf16(s, sd, dev);
        // One token up to 2048 wide: gemv_warp (136: a partial last chunk), up to 4096: gemv_warp16 (4096,
        // 2200: a partial chunk); else gemv_norm.
        // Several tokens: gemv_norm (8 x 2048: V2-Lite's input projections at 8 sequences).
        for (t, h) in [(1i64, 2048i64), (1, 136), (3, 512), (1, 4096), (1, 2200), (2, 136), (8, 2048), (5, 4096)] {
            let x = bf(&[1, t, h], 1.0);
            let norm = RmsNorm { weight: bf(&[h], 1.0), eps: 1e-6 };
            let lins = [
                Linear { weight: bf(&[300, h], 0.05), bias: Some(bf(&[300], 0.5)) },
                Linear { weight: bf(&[72, h], 0.05), bias: None },
                Linear { weight: bf(&[8, h], 0.05), bias: Some(bf(&[8], 0.5)) },
            ];
            let res = bf(&[1, t, 300], 1.0);
            let projections: Vec<Projection<'_>> = lins.iter().map(|l| Projection { weight: &l.weight, bias: l.bias.as_ref() }).collect();
            for (use_norm, use_res) in [(true, true), (false, false)] {
                let got = project(&Project {
                    x: &x,
                    norm: use_norm.then_some((&norm.weight, norm.eps)),
                    projections: &projections,
                    residual: use_res.then_some(&res),
                })
                .expect("project")
                .expect("applies");
                let xn = if use_norm { norm.forward(&x).expect("norm") } else { x.shallow_clone() };
                for (s, (g, l)) in got.iter().zip(&lins).enumerate() {
                    let mut want = l.forward(&xn).expect("linear");
                    if s == 0 && use_res {
                        want += &res;
                    }
                    let err = (g.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs().max().double_value(&[]);
                    let mag = want.to_kind(Kind::Float).abs().max().double_value(&[]);
                    eprintln!("t {t}, h {h}, norm {use_norm}, residual {use_res}, projection {s}: max |kernel - libtorch| = {err:.3e} (of {mag:.3e})");
                    assert!(err <= 0.02 * mag + 1e-2, "{err} vs {mag}");
                }
            }
        }
        // More rows than the staged grid has warps (an LM head): each warp takes several rows.
        for t in [1i64, 4] {
            let (h, r) = (4608i64, 9000i64);
            let x = bf(&[t, h], 1.0);
            let head = Linear { weight: bf(&[r, h], 0.05), bias: None };
            let p = Project { x: &x, norm: None, projections: &[Projection { weight: &head.weight, bias: None }], residual: None };
            let got = project(&p).expect("project").expect("applies").pop().expect("one output");
            let want = head.forward(&x).expect("linear");
            let err = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float)).abs().max().double_value(&[]);
            let mag = want.to_kind(Kind::Float).abs().max().double_value(&[]);
            eprintln!("t {t}, h {h}, {r} rows: max |kernel - libtorch| = {err:.3e} (of {mag:.3e})");
            assert!(err <= 0.02 * mag + 1e-2, "{err} vs {mag}");
        }
    }
}
