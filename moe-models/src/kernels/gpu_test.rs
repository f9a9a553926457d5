//! The shared prologue of the kernels' GPU tests (`#[ignore]`d: they need a CUDA device).

use tch::{Device, Kind, Tensor};

/// The first CUDA device, with libtorch's generator seeded, so a test draws the same inputs every run.
pub(crate) fn gpu(seed: i64) -> Device {
    tch::manual_seed(seed);
    Device::Cuda(0)
}

/// Normal values of standard deviation `sd` on `dev`, drawn in f32 and rounded to bf16.
pub(crate) fn randn_bf16(shape: &[i64], sd: f64, dev: Device) -> Tensor {
    (Tensor::randn(shape, (Kind::Float, dev)) * sd).to_kind(Kind::BFloat16)
}
