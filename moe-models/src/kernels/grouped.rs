//! Kernels of the grouped MoE path for many tokens (prefill), in `grouped.cu`: the weighted per-token
//! combine of the expert outputs ([`moe_combine`]) and a one-pass SwiGLU ([`swiglu`]).

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch};
use crate::error::{Error, Result};

const GROUPED_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("grouped.cu"));
pub(super) static GROUPED: Kernels = Kernels::new("grouped.cu", GROUPED_SOURCE, &["moe_combine", "swiglu"]);

/// `[moe_combine, swiglu]`, or `None` when they did not compile (logged once).
fn kernels(device: tch::Device) -> Option<&'static [cuda_graph::jit::Function]> {
    compiled(&GROUPED, device).ok()
}

/// The weighted per-token sum of the grouped path's expert outputs in one kernel:
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
    let Some(k) = kernels(device) else { return Ok(None) };
    let (y, ids, row, weights) = (y.contiguous(), ids.contiguous(), row.contiguous(), weights.contiguous());
    let out = Tensor::f_empty([n, h], (Kind::BFloat16, device))?;
    let args = [Arg::Tensor(&y), Arg::Tensor(&ids), Arg::Tensor(&row), Arg::Tensor(&weights), Arg::Tensor(&out), Arg::I32(h as i32), Arg::I32(w as i32), Arg::I64(m)];
    launch(k[0], [((h / 8) as u32).div_ceil(256), n as u32, 1], [256, 1, 1], &args)?;
    Ok(Some(out))
}


/// `silu(g) * u` in one kernel, f32 inside, rounded to bf16 once: `g` and `u` `(rows, cols)` bf16 on one
/// CUDA device (strided rows allowed, e.g. the halves of a fused gate/up projection). Returns a
/// contiguous `(rows, cols)` bf16 tensor, or `None` when it does not apply (not CUDA bf16, sizes or row
/// strides not multiples of 8, or the kernel did not compile): the caller uses libtorch.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    let device = g.device();
    let size = g.size();
    let fits = |x: &Tensor| {
        let st = x.stride();
        x.size() == size
            && x.device() == device
            && x.kind() == Kind::BFloat16
            && st.len() == 2
            && st[1] == 1
            && st[0] % 8 == 0
            && x.data_ptr() as usize % 16 == 0
    };
    if !device.is_cuda() || size.len() != 2 || size[1] % 8 != 0 || !fits(g) || !fits(u) {
        return Ok(None);
    }
    let Some(k) = kernels(device) else { return Ok(None) };
    let (rows, cols) = (size[0], size[1]);
    let out = Tensor::f_empty([rows, cols], (Kind::BFloat16, device))?;
    let groups = rows * cols / 8;
    if groups == 0 {
        return Ok(Some(out));
    }
    let Ok(blocks) = u32::try_from((groups + 255) / 256) else { return Ok(None) };
    let args = [
        Arg::Tensor(g), Arg::Tensor(u), Arg::Tensor(&out), Arg::I64(rows), Arg::I32(cols as i32), Arg::I64(g.stride()[0]),
        Arg::I64(u.stride()[0]),
    ];
    launch(k[1], [blocks, 1, 1], [256, 1, 1], &args)?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::{gpu, randn_bf16};
    use tch::Device;
    use crate::ctx::Dispatch;
    use crate::layers::moe::Experts;

    /// On a GPU: the grouped path for many tokens (grouped GEMMs, then the combine kernel) equals the
    /// per-expert path in f32 on the CPU, with Alloc-T-like prefix selections (some slots empty, one
    /// token with none) and the chosen pairs' exact count as the bound.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn grouped_combine_matches_the_cpu_reference() {
        let dev = gpu(11);
        let (e, h, i, n, w) = (16i64, 256i64, 136i64, 300i64, 6i64);
        let ex = Experts {
            gate_up_proj: randn_bf16(&[e, 2 * i, h], 0.05, dev),
            down_proj: randn_bf16(&[e, h, i], 0.05, dev),
            num_experts: e,
        };
        let x = randn_bf16(&[n, h], 1.0, dev);
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

    /// On a GPU: the one-pass SwiGLU equals silu(g) * u computed in f32, within one bf16 rounding, on the
    /// strided halves of a fused gate/up tensor and on separate tensors.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn swiglu_kernel_matches_libtorch() {
        let dev = gpu(12);
        let gu = randn_bf16(&[37, 2 * 136], 3.0, dev);
        let (g, u) = (gu.narrow(1, 0, 136), gu.narrow(1, 136, 136));
        for (g, u) in [(g.shallow_clone(), u.shallow_clone()), (g.contiguous(), u.contiguous())] {
            let got = swiglu(&g, &u).expect("swiglu").expect("applies").to_kind(Kind::Float);
            let (gf, uf) = (g.to_kind(Kind::Float), u.to_kind(Kind::Float));
            let want = gf.silu() * uf;
            let err = ((&got - &want).abs() / (want.abs() + 1e-3)).max().double_value(&[]);
            eprintln!("swiglu: max relative |kernel - f32| = {err:.3e}");
            assert!(err < 1e-2, "{err}");
        }
    }
}
