//! alloc-token's CUDA kernels (`kernels.cu`, compiled at run time by NVRTC through `cuda_graph::jit`),
//! each behind a safe wrapper that returns `None` when it does not apply (not CUDA, sizes out of range,
//! or NVRTC / the driver unavailable) so the caller keeps its libtorch path. Every kernel reproduces the
//! libtorch path's ids exactly (GPU tests: `tests/alloc_t_kernel_gpu.rs`).
//!
//! - [`sorted_prefix`]: each row's `width` most probable experts in stable descending order, one warp a
//!   row (the full row sort that libtorch runs costs 0.066 ms at 8192 x 64 on an H200).
//! - [`alloc_t_small`]: Alloc-T's batch-wide selection in one block (radix select + tie scan), for small
//!   batches such as decode steps, where one launch replaces ~25 (V2-Lite batch-1 decode with Alloc-T:
//!   5.49 -> 4.92 ms/token). It scales with the candidates (0.27 ms at 8192 x 5), hence
//!   [`SMALL_MAX_CANDIDATES`].
//! - [`alloc_t_large`]: the same selection for large batches: a scores kernel, libtorch's stable sort of
//!   the `T x (cap - floor)` candidates, a counting kernel and an emitting kernel, instead of ~20 libtorch
//!   kernels around the sort.

use cuda_graph::jit::{Arg, Function, Kernels};
use tch::{Device, Kind, Tensor};

use super::{torch, DeviceError, DeviceResult};
use crate::alloc_t::{AllocT, Score};

/// The most candidates (`tokens x (cap - floor)`) [`alloc_t_small`] takes (its selection bitmap holds
/// exactly these); above it [`alloc_t_large`] is faster.
pub const SMALL_MAX_CANDIDATES: i64 = 512 * 32;

/// The most experts a row of [`sorted_prefix`] may have (`MAX_E` in `kernels.cu`).
pub const ROW_MAX_EXPERTS: i64 = 1024;

const SOURCE: &str = include_str!("kernels.cu");
const NAMES: [&str; 5] = ["row_topk", "alloc_t_batch", "alloc_t_scores", "alloc_t_count", "alloc_t_emit"];

static KERNELS: Kernels = Kernels::new("kernels.cu", SOURCE, &NAMES);

/// The compiled kernels in [`NAMES`] order, or `None` when NVRTC or the driver is unavailable (the
/// libtorch paths are then used; they are always correct).
fn kernels(device: Device) -> Option<&'static [Function]> {
    KERNELS.get(device, |_| {}).ok()
}

fn launch(op: &'static str, f: Function, grid: u32, block: u32, args: &[Arg<'_>]) -> DeviceResult<()> {
    // SAFETY: every caller passes exactly the kernel's parameters (number, order and types), tensors of
    // the dtype, shape and row strides those parameters describe, with unit column stride, on the
    // kernel's device, and sizes the kernel bounds its indices by; the grids cover the rows, candidates
    // or slots those sizes give. The tensors outlive the launch (same stream, caching allocator).
    #[allow(unsafe_code)]
    let r = unsafe { f.launch([grid, 1, 1], [block, 1, 1], 0, args) };
    r.map_err(|e| DeviceError::Torch { op, source: tch::TchError::Torch(e.to_string()) })
}

/// The valid-token mask as the kernels read it (one byte per token), or a null pointer for "all valid".
fn mask_arg(mask: Option<&Tensor>, t: i64, device: Device) -> DeviceResult<Option<Option<Tensor>>> {
    match mask {
        None => Ok(Some(None)),
        Some(m) if m.size() == [t] && m.kind() == Kind::Bool && m.device() == device => {
            Ok(Some(Some(torch("kernels.mask", m.f_contiguous())?)))
        }
        Some(_) => Ok(None),
    }
}

/// `(vals, idx)`, `[T, width]` f32 / i64: each row's `width` largest probabilities and their experts,
/// in the order of a stable descending sort (ties to the lower index). `probs` `[T, E]` f32 on CUDA with
/// unit column stride, `width <= E <= ROW_MAX_EXPERTS`; `None` otherwise.
pub fn sorted_prefix(probs: &Tensor, width: i64) -> DeviceResult<Option<(Tensor, Tensor)>> {
    let device = probs.device();
    let (t, e) = match probs.size()[..] {
        [t, e] => (t, e),
        _ => return Ok(None),
    };
    let fits = device.is_cuda()
        && probs.kind() == Kind::Float
        && probs.stride()[1] == 1
        && (0..=e).contains(&width)
        && e <= ROW_MAX_EXPERTS
        && t <= i64::from(i32::MAX) / 8;
    if !fits {
        return Ok(None);
    }
    let Some(k) = kernels(device) else { return Ok(None) };
    let vals = torch("kernels.sorted_prefix", Tensor::f_empty([t, width], (Kind::Float, device)))?;
    let idx = torch("kernels.sorted_prefix", Tensor::f_empty([t, width], (Kind::Int64, device)))?;
    if t > 0 && width > 0 {
        let args = [
            Arg::Tensor(probs), Arg::I64(probs.stride()[0]), Arg::I32(t as i32), Arg::I32(e as i32), Arg::I32(width as i32),
            Arg::Tensor(&vals), Arg::Tensor(&idx),
        ];
        launch("kernels.row_topk", k[0], ((t + 7) / 8) as u32, 256, &args)?;
    }
    Ok(Some((vals, idx)))
}

/// Checks shared by the Alloc-T kernels: `vals` `[T, >= cap]` f32 and `idx` `[T, >= cap]` i64 (each row's
/// stable descending sort or its prefix), unit column stride, on CUDA.
fn alloc_t_fits(p: &AllocT, vals: &Tensor, idx: &Tensor) -> Option<(i64, i64, i64)> {
    let (t, w) = match vals.size()[..] {
        [t, w] => (t, w),
        _ => return None,
    };
    let (floor, cap) = (p.floor as i64, p.cap as i64);
    let ok = vals.device().is_cuda()
        && idx.device() == vals.device()
        && vals.kind() == Kind::Float
        && idx.kind() == Kind::Int64
        && idx.size() == [t, w]
        && vals.stride()[1] == 1
        && idx.stride()[1] == 1
        && floor <= cap
        && cap <= w
        && t <= i64::from(i32::MAX) / cap.max(1);
    ok.then_some((t, floor, cap))
}

/// `[T, cap]` ids of the batch-wide Alloc-T selection in one kernel (small batches: at most
/// [`SMALL_MAX_CANDIDATES`] candidates), from each row's sorted values and experts (`vals`, `idx`), the
/// valid tokens (`None`: all) and the layer's `k_avg`; `None` when it does not apply.
pub fn alloc_t_small(p: &AllocT, vals: &Tensor, idx: &Tensor, valid: Option<&Tensor>, k_avg: f64) -> DeviceResult<Option<Tensor>> {
    let Some((t, floor, cap)) = alloc_t_fits(p, vals, idx) else { return Ok(None) };
    let device = vals.device();
    if t * (cap - floor) > SMALL_MAX_CANDIDATES {
        return Ok(None);
    }
    let Some(valid) = mask_arg(valid, t, device)? else { return Ok(None) };
    let Some(k) = kernels(device) else { return Ok(None) };
    let ids = torch("kernels.alloc_t_small", Tensor::f_empty([t, cap], (Kind::Int64, device)))?;
    if t == 0 {
        return Ok(Some(ids));
    }
    let args = [
        Arg::Tensor(vals), Arg::I64(vals.stride()[0]), Arg::Tensor(idx), Arg::I64(idx.stride()[0]),
        valid.as_ref().map_or(Arg::I64(0), Arg::Tensor), Arg::I32(t as i32), Arg::I32(floor as i32), Arg::I32(cap as i32),
        Arg::F64(k_avg), Arg::I32(i32::from(matches!(p.score, Score::RelativeToTop1))), Arg::Tensor(&ids),
    ];
    launch("kernels.alloc_t_batch", k[1], 1, 1024, &args)?;
    Ok(Some(ids))
}

/// [`alloc_t_small`]'s result for any batch size: scores kernel, libtorch's stable sort of the
/// candidates, counting kernel, emitting kernel. `None` when it does not apply.
pub fn alloc_t_large(p: &AllocT, vals: &Tensor, idx: &Tensor, valid: Option<&Tensor>, k_avg: f64) -> DeviceResult<Option<Tensor>> {
    let Some((t, floor, cap)) = alloc_t_fits(p, vals, idx) else { return Ok(None) };
    let device = vals.device();
    let Some(valid) = mask_arg(valid, t, device)? else { return Ok(None) };
    let Some(k) = kernels(device) else { return Ok(None) };
    let c = cap - floor;
    let n = t * c;
    let ids = torch("kernels.alloc_t_large", Tensor::f_empty([t, cap], (Kind::Int64, device)))?;
    if t == 0 {
        return Ok(Some(ids));
    }
    let counts = torch("kernels.alloc_t_large", Tensor::f_zeros([t], (Kind::Int, device)))?;
    let vmask = valid.as_ref().map_or(Arg::I64(0), Arg::Tensor);
    if n > 0 {
        let flat = torch("kernels.alloc_t_large", Tensor::f_empty([n], (Kind::Float, device)))?;
        let relative = i32::from(matches!(p.score, Score::RelativeToTop1));
        let args = [
            Arg::Tensor(vals), Arg::I64(vals.stride()[0]), vmask, Arg::I32(t as i32), Arg::I32(floor as i32), Arg::I32(c as i32),
            Arg::I32(relative), Arg::Tensor(&flat),
        ];
        launch("kernels.alloc_t_scores", k[2], ((n + 255) / 256) as u32, 256, &args)?;
        let (_, order) = torch("kernels.alloc_t_large", flat.f_sort_stable(true, 0, true))?;
        let args = [
            Arg::Tensor(&order), vmask, Arg::I32(t as i32), Arg::I32(c as i32), Arg::I32(floor as i32), Arg::F64(k_avg),
            Arg::Tensor(&counts),
        ];
        launch("kernels.alloc_t_count", k[3], ((n + 1023) / 1024) as u32, 1024, &args)?;
    }
    let args = [
        Arg::Tensor(idx), Arg::I64(idx.stride()[0]), Arg::Tensor(&counts), vmask, Arg::I32(t as i32), Arg::I32(cap as i32),
        Arg::I32(floor as i32), Arg::Tensor(&ids),
    ];
    launch("kernels.alloc_t_emit", k[4], ((t * cap + 255) / 256) as u32, 256, &args)?;
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC for the H200 (sm_90) on any machine with torch's NVRTC wheel; a
    /// build without the cuda-graph shim has nothing to check.
    #[test]
    fn kernels_compile_for_sm90() {
        match cuda_graph::jit::check_compiles("kernels.cu", SOURCE, "sm_90") {
            Ok(()) | Err(cuda_graph::Error::NotCompiled) => {}
            Err(e) => panic!("kernels.cu: {e}"),
        }
    }
}
