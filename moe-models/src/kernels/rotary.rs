//! The rotary embedding in one kernel (`rotary.cu`) instead of five libtorch kernels.

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch};
use crate::error::Result;

const ROTARY_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("rotary.cu"));
pub(super) static ROTARY: Kernels = Kernels::new("rotary.cu", ROTARY_SOURCE, &["rotary_bf16"]);

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
    let Ok(k) = compiled(&ROTARY, device) else {
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


#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
}
