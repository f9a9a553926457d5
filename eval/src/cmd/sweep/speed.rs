//! Prefill and decode throughput of one sweep point.

use std::time::Instant;

use alloc_token::device::DevicePolicy;
use anyhow::{bail, Result};
use moe_models::{ForwardCtx, KvCache, Model, Renormalize};
use tch::Tensor;

use super::task_data::TaskData;
use crate::device::{median, sync};
use crate::spec::SweepSpec;

/// Prefill and decode throughput (tokens/s, the median of 2 timed runs after a warm-up) under `policy`.
/// Prefill: `speed_batch` sequences of `seq_len` tokens. Decode: the same sequences' first 32 tokens as
/// prompts, then `speed_decode_steps` greedy steps with the KV cache, all sequences together; on CUDA
/// the step is captured once in a CUDA graph and replayed (as `eval bench` does), elsewhere eager.
pub fn measure_speed(model: &Model, policy: &dyn DevicePolicy, renormalize: Renormalize, data: &TaskData, spec: &SweepSpec) -> Result<(f64, f64)> {
    let TaskData::Text { sequences, .. } = data else { bail!("speed is measured on text tasks") };
    let _guard = tch::no_grad_guard();
    let device = model.info().device;
    let b = spec.speed_batch.min(sequences.len()).max(1);
    let flat: Vec<i64> = sequences[..b].iter().flatten().copied().collect();
    let ids = Tensor::f_from_slice(&flat)?.f_reshape([b as i64, spec.seq_len as i64])?.f_to_device(device)?;
    let mut prefill = Vec::new();
    for rep in 0..3 {
        sync(device);
        let t = Instant::now();
        let mut ctx = ForwardCtx::new(policy).with_renormalize(renormalize);
        let h = model.forward_hidden(&ids, &mut ctx)?;
        let _ = model.lm_head(&h.f_narrow(1, spec.seq_len as i64 - 1, 1)?)?;
        sync(device);
        if rep > 0 {
            prefill.push((b * spec.seq_len) as f64 / t.elapsed().as_secs_f64());
        }
    }
    let prompt_len = 32.min(spec.seq_len) as i64;
    let prompt = ids.f_narrow(1, 0, prompt_len)?;
    if device.is_cuda() && cuda_graph::compiled() {
        let mut ctx = ForwardCtx::new(policy).with_renormalize(renormalize);
        let ms = crate::cmd::bench::decode_graph(model, &mut ctx, &prompt, spec.speed_decode_steps.max(1), 2)?;
        return Ok((median(prefill), b as f64 * 1e3 / ms));
    }
    let mut decode = Vec::new();
    for rep in 0..3 {
        let mut cache = KvCache::new();
        let mut ctx = ForwardCtx::new(policy).with_renormalize(renormalize).with_cache(&mut cache);
        let h = model.forward_hidden(&prompt, &mut ctx)?;
        let mut next = model.lm_head(&h.f_narrow(1, prompt_len - 1, 1)?)?.f_argmax(-1, false)?; // (b, 1)
        sync(device);
        let t = Instant::now();
        for _ in 0..spec.speed_decode_steps {
            let h = model.forward_hidden(&next, &mut ctx)?;
            next = model.lm_head(&h)?.f_argmax(-1, false)?;
        }
        sync(device);
        if rep > 0 {
            decode.push((b * spec.speed_decode_steps) as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok((median(prefill), median(decode)))
}

