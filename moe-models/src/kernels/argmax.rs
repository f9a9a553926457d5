//! The greedy next token of a decode step (`argmax.cu`): two small kernels over many SMs instead of
//! libtorch's single-block reduction.

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch_dependent};
use crate::error::Result;

const ARGMAX_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("argmax.cu"));
pub(super) static ARGMAX: Kernels = Kernels::new("argmax.cu", ARGMAX_SOURCE, &["argmax_part", "argmax_final"]);
/// Blocks per row (`ARGMAX_PARTS` in `argmax.cu`).
const PARTS: i64 = 64;

/// `logits.argmax(-1, keepdim = false)` for `(.., v)` bf16 logits on CUDA: the first index of each row's
/// largest value, NaN counting as the largest (torch's rule), as i64 of shape `(..)`. `None` when the
/// kernels do not apply (not CUDA bf16, `v` not a multiple of 8 or above `i32::MAX`, more than 65535
/// rows, or they did not compile) and the caller uses libtorch.
pub fn argmax(logits: &Tensor) -> Result<Option<Tensor>> {
    let device = logits.device();
    let size = logits.size();
    let Some(&v) = size.last() else { return Ok(None) };
    if !device.is_cuda() || logits.kind() != Kind::BFloat16 || v == 0 || v % 8 != 0 || v > i32::MAX as i64 {
        return Ok(None);
    }
    let rows = logits.numel() as i64 / v;
    if rows == 0 || rows > i32::MAX as i64 {
        return Ok(None);
    }
    if rows > 65535 {
        return Ok(None); // grid y
    }
    let Ok(k) = compiled(&ARGMAX, device) else {
        return Ok(None);
    };
    let logits = logits.contiguous();
    let out = Tensor::f_empty(&size[..size.len() - 1], (Kind::Int64, device))?;
    let pv = Tensor::f_empty([rows, PARTS], (Kind::Float, device))?;
    let pi = Tensor::f_empty([rows, PARTS], (Kind::Int, device))?;
    launch_dependent(k[0], [PARTS as u32, rows as u32, 1], [256, 1, 1], 0, &[Arg::Tensor(&logits), Arg::Tensor(&pv), Arg::Tensor(&pi), Arg::I32(v as i32)])?;
    launch_dependent(k[1], [rows as u32, 1, 1], [32, 1, 1], 0, &[Arg::Tensor(&pv), Arg::Tensor(&pi), Arg::Tensor(&out)])?;
    Ok(Some(out))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::{gpu, randn_bf16};

    /// On a GPU: the kernel gives torch.argmax's index on random rows, on rows with ties (the first
    /// wins), with -inf everywhere, and with NaN (the first NaN wins).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn argmax_matches_torch() {
        let dev = gpu(4);
        let mut x = randn_bf16(&[3, 1, 102400], 1.0, dev);
        let _ = x.get(1).get(0).narrow(0, 5000, 1).fill_(1000.0);
        let _ = x.get(1).get(0).narrow(0, 70000, 1).fill_(1000.0);
        let _ = x.get(2).get(0).fill_(f64::NEG_INFINITY);
        let got = argmax(&x).expect("argmax").expect("applies");
        assert_eq!(got.size(), vec![3, 1]);
        assert!(got.equal(&x.argmax(-1, false)), "{got:?}");
        let _ = x.get(0).get(0).narrow(0, 777, 1).fill_(f64::NAN);
        let _ = x.get(0).get(0).narrow(0, 900, 1).fill_(f64::NAN);
        x = x.contiguous();
        let got = argmax(&x).expect("argmax").expect("applies");
        assert_eq!(got.int64_value(&[0, 0]), 777);
        assert!(got.equal(&x.argmax(-1, false)), "{got:?}");
    }
}
