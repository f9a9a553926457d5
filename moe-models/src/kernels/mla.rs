//! DeepSeek-V2's absorbed multi-head latent attention for decode steps in four small kernels over many SMs
//! (`mla_decode.cu`: query absorption, split partial softmaxes, merge, value absorption).

use std::sync::OnceLock;

use cuda_graph::jit::Arg;
use tch::{Kind, Tensor};

use super::{compiled, launch, launch_shared, Compiled};
use crate::error::Result;

static MLA: OnceLock<std::result::Result<Compiled, String>> = OnceLock::new();
pub(super) const MLA_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("mla_decode.cu"));

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

/// DeepSeek-V2 attention for decode steps in four kernels (`mla_decode.cu`): `(b, t, nh, v)` bf16, or
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
    // Slot splits of about 32 slots (flash-decoding), at most 32.
    let splits = ((s + 31) / 32).clamp(1, 32);
    let per = (s + splits - 1) / splits;
    let part_shared = (rank + rope + 2048 + per + 64) * 4;
    // Rows are read 16 bytes at a time.
    let aligned = |x: &Tensor, strides: &[i64]| x.data_ptr() as usize % 16 == 0 && strides.iter().all(|st| st % 8 == 0);
    let sizes_ok = b * t <= MLA_DECODE_MAX_QUERIES
        && s > 0
        && rank % 256 == 0
        && (256..=2048).contains(&rank)
        && rope % 8 == 0
        && rope <= 256
        && (1..=256).contains(&nope)
        && v % 8 == 0
        && v > 0
        && part_shared <= 48 * 1024
        && aligned(a.ckv, &a.ckv.stride()[..2])
        && aligned(a.kpe, &a.kpe.stride()[..2])
        && aligned(a.w_uk, &[])
        && aligned(a.w_uv_t, &[]);
    if !(shapes_ok && bf16 && layout && sizes_ok) {
        return Ok(None);
    }
    let Ok(k) = compiled(&MLA, device, "mla_decode.cu", MLA_SOURCE, &["mla_q", "mla_part", "mla_combine", "mla_out"]) else {
        return Ok(None);
    };
    let bt = b * t;
    let f32s = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, device));
    let (qlat, olat) = (f32s(&[bt, nh, rank])?, f32s(&[bt, nh, rank])?);
    let (part_o, part_ml) = (f32s(&[bt, nh, splits, rank])?, f32s(&[bt, nh, splits, 2])?);
    let out = Tensor::f_empty([b, t, nh, v], (Kind::BFloat16, device))?;
    let (qs, cs, ks) = (a.q_nope.stride(), a.ckv.stride(), a.kpe.stride());
    let (nh32, t32, r32) = (nh as i32, t as i32, rank as i32);
    let q_args = [
        Arg::Tensor(a.q_nope), Arg::I64(qs[0]), Arg::I64(qs[1]), Arg::I64(qs[2]), Arg::Tensor(a.w_uk), Arg::Tensor(&qlat),
        Arg::I32(nh32), Arg::I32(t32), Arg::I32(nope as i32), Arg::I32(r32),
    ];
    launch(k[0], [nh as u32, (rank / 256) as u32, bt as u32], [256, 1, 1], &q_args)?;
    let part_args = [
        Arg::Tensor(&qlat), Arg::Tensor(a.q_pe), Arg::Tensor(a.ckv), Arg::I64(cs[0]), Arg::I64(cs[1]), Arg::Tensor(a.kpe),
        Arg::I64(ks[0]), Arg::I64(ks[1]), Arg::Tensor(a.bias), Arg::Tensor(&part_o), Arg::Tensor(&part_ml), Arg::I32(nh32),
        Arg::I32(t32), Arg::I32(s as i32), Arg::I32(rope as i32), Arg::I32(r32), Arg::I32(splits as i32),
        Arg::F32(a.scale as f32),
    ];
    launch_shared(k[1], [nh as u32, splits as u32, bt as u32], [256, 1, 1], part_shared as u32, &part_args)?;
    let c_args = [Arg::Tensor(&part_o), Arg::Tensor(&part_ml), Arg::Tensor(&olat), Arg::I32(nh32), Arg::I32(splits as i32), Arg::I32(r32)];
    launch(k[2], [nh as u32, bt as u32, 1], [256, 1, 1], &c_args)?;
    let o_args = [Arg::Tensor(&olat), Arg::Tensor(a.w_uv_t), Arg::Tensor(&out), Arg::I32(nh32), Arg::I32(t32), Arg::I32(r32), Arg::I32(v as i32)];
    launch(k[3], [nh as u32, (v / 8) as u32, bt as u32], [256, 1, 1], &o_args)?;
    Ok(Some(out))
}


#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

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
}
