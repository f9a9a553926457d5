//! Device and dtype flags, and the timing helpers every speed measurement shares.

use anyhow::{bail, Result};
use moe_models::tch::{self, Device, Kind};

/// Parse `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Ok(Device::Cuda(n)),
            None => bail!("unknown device {s:?} (expected cpu, cuda or cuda:N)"),
        },
    }
}

/// Parse `f32`, `bf16` or `f16` (CPU runs should use f32: bf16 matmul is far slower there).
pub fn parse_kind(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        _ => bail!("unknown dtype {s:?} (expected f32, bf16 or f16)"),
    })
}

/// Wait for the device's queued work, so a clock read measures it.
pub fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The median of `v` (the upper middle for an even count); NaN for an empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
