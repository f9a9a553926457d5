//! DeepSeek-V2's absorbed multi-head latent attention for decode steps in three small kernels over many
//! SMs (`mla_decode.cu`: query absorption with the step's rope, latent norm and cache write; split partial
//! softmaxes; merge and value absorption), or, for one token, in one kernel with a thread block cluster
//! per head (`mla_cluster`).

use cuda_graph::jit::{Arg, Kernels};
use tch::{Kind, Tensor};

use super::{compiled, launch_dependent};
use crate::error::Result;

const MLA_SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("mla_decode.cu"));
/// `[mla_q, mla_part, mla_out, mla_cluster]`.
pub(super) static MLA: Kernels = Kernels::new("mla_decode.cu", MLA_SOURCE, &["mla_q", "mla_part", "mla_out", "mla_cluster"]);

/// Blocks per head in `mla_cluster` (`MLA_C`), and the latent rank and value width it is written for.
const CLUSTER: i64 = 8;
const CLUSTER_RANK: i64 = 512;
const CLUSTER_V: i64 = 128;
/// The most cache slots `mla_cluster` takes. Its 128 blocks attend over every slot; the three kernels
/// split the slots over up to 32 x 16 blocks. On an H200 (V2-Lite decode, top-6, both paths at b29bd82)
/// the cluster was ahead at 529 slots (1.987 vs 2.081 ms a token) and behind at 1129 (2.307 vs 2.241),
/// 2129 (2.831 vs 2.526) and 4129 (3.839 vs 3.194).
const CLUSTER_MAX_SLOTS: i64 = 768;

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
    /// The step's raw inputs, when the kernels rope, normalise and write the cache themselves: then
    /// `q_pe` is not yet roped, and `ckv` / `kpe` are the cache's whole buffers whose `prep.slots` the
    /// kernels write before attending.
    pub prep: Option<MlaPrep<'a>>,
}

/// What [`mla_decode`] does before attending when the step's inputs come raw (see [`MlaDecode::prep`]).
#[derive(Debug, Clone, Copy)]
pub struct MlaPrep<'a> {
    /// `(b, t, rank + rope)` bf16 contiguous: `kv_a_proj_with_mqa`'s output, `[c_kv | k_pe]`.
    pub kv: &'a Tensor,
    /// `kv_a_layernorm`: weight `(rank)` bf16 and epsilon.
    pub kv_norm: (&'a Tensor, f64),
    /// `(b, t, rope / 2)` f32 contiguous.
    pub cos: &'a Tensor,
    /// `(b, t, rope / 2)` f32 contiguous.
    pub sin: &'a Tensor,
    /// Pairs `(2j, 2j + 1)` (DeepSeek) or `(j, j + rope / 2)`.
    pub interleaved: bool,
    /// `(t)` i64: the cache slots of the step's tokens (the same for every sequence).
    pub slots: &'a Tensor,
}

/// The most `b * t` query tokens [`mla_decode`] takes (decode steps; prefill uses fused sdpa).
pub const MLA_DECODE_MAX_QUERIES: i64 = 64;

/// DeepSeek-V2 attention for decode steps in three kernels (`mla_decode.cu`), or in one (`mla_cluster`,
/// a thread block cluster per head) for one token with [`MlaDecode::prep`] at rank 512 and value width
/// 128: `(b, t, nh, v)` bf16, or
/// `None` when the kernels do not apply (not CUDA bf16, too many queries or slots for shared memory,
/// unsupported sizes, or they did not compile) and the caller uses libtorch; then nothing was written.
pub fn mla_decode(a: &MlaDecode<'_>) -> Result<Option<Tensor>> {
    let q = a.q_nope.size();
    if q.len() != 4 || !a.q_nope.device().is_cuda() {
        return Ok(None);
    }
    let device = a.q_nope.device();
    let (b, nh, t, nope) = (q[0], q[1], q[2], q[3]);
    let (s, rank) = (a.ckv.size().get(1).copied().unwrap_or(0), a.ckv.size().last().copied().unwrap_or(0));
    let (rope, v) = (a.q_pe.size().last().copied().unwrap_or(0), a.w_uv_t.size().last().copied().unwrap_or(0));
    let prep_ok = a.prep.is_none_or(|p| {
        let f32_on = |x: &Tensor| x.kind() == Kind::Float && x.device() == device && x.is_contiguous() && x.size() == [b, t, rope / 2];
        p.kv.kind() == Kind::BFloat16
            && p.kv.device() == device
            && p.kv.is_contiguous()
            && p.kv.size() == [b, t, rank + rope]
            && p.kv.data_ptr() as usize % 16 == 0
            && p.kv_norm.0.kind() == Kind::BFloat16
            && p.kv_norm.0.device() == device
            && p.kv_norm.0.size() == [rank]
            && p.kv_norm.0.data_ptr() as usize % 16 == 0
            && f32_on(p.cos)
            && f32_on(p.sin)
            && p.slots.kind() == Kind::Int64
            && p.slots.device() == device
            && p.slots.size() == [t]
            && a.q_pe.stride() == a.q_nope.stride()
    });
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
        && (a.prep.is_some() || a.q_pe.is_contiguous())
        && [a.w_uk, a.w_uv_t, a.bias].iter().all(|x| x.is_contiguous())
        && a.bias.kind() == Kind::Float
        && a.bias.device() == device;
    // Slot splits of about 16 slots (flash-decoding), at most 32 (mla_out merges them in one warp).
    let splits = ((s + 15) / 16).clamp(1, 32);
    let per = (s + splits - 1) / splits;
    let part_shared = (rank + rope + 2048 + per) * 4;
    // Rows are read 16 bytes at a time.
    let aligned = |x: &Tensor, strides: &[i64]| x.data_ptr() as usize % 16 == 0 && strides.iter().all(|st| st % 8 == 0);
    let sizes_ok = b * t <= MLA_DECODE_MAX_QUERIES
        && s > 0
        && rank % 256 == 0
        && (256..=512).contains(&rank)
        && rope % 8 == 0
        && rope <= 256
        && (1..=256).contains(&nope)
        && v % 32 == 0
        && v > 0
        && part_shared <= 48 * 1024
        && aligned(a.ckv, &a.ckv.stride()[..2])
        && aligned(a.kpe, &a.kpe.stride()[..2])
        && aligned(a.w_uk, &[])
        && aligned(a.w_uv_t, &[]);
    if !(shapes_ok && prep_ok && bf16 && layout && sizes_ok) {
        return Ok(None);
    }
    let Ok(k) = compiled(&MLA, device) else {
        return Ok(None);
    };
    let bt = b * t;
    let (qs, cs, ks) = (a.q_nope.stride(), a.ckv.stride(), a.kpe.stride());
    let (nh32, t32, r32, p32) = (nh as i32, t as i32, rank as i32, rope as i32);
    // One token with the step's raw inputs at DeepSeek-V2's sizes: one kernel, a block cluster per head.
    let per_block = (s + CLUSTER - 1) / CLUSTER;
    if let (1, Some(p)) = (bt, &a.prep) {
        if rank == CLUSTER_RANK && v == CLUSTER_V && nope % 32 == 0 && s <= CLUSTER_MAX_SLOTS {
            let out = Tensor::f_empty([b, t, nh, v], (Kind::BFloat16, device))?;
            let args = [
                Arg::Tensor(a.q_nope), Arg::I64(qs[1]), Arg::Tensor(a.q_pe), Arg::Tensor(a.w_uk), Arg::Tensor(a.w_uv_t),
                Arg::Tensor(p.cos), Arg::Tensor(p.sin), Arg::I32(p.interleaved as i32), Arg::Tensor(p.kv),
                Arg::Tensor(p.kv_norm.0), Arg::F32(p.kv_norm.1 as f32), Arg::Tensor(a.ckv), Arg::I64(cs[1]),
                Arg::Tensor(a.kpe), Arg::I64(ks[1]), Arg::Tensor(p.slots), Arg::Tensor(a.bias), Arg::Tensor(&out),
                Arg::I32(nope as i32), Arg::I32(p32), Arg::I32(s as i32), Arg::F32(a.scale as f32),
            ];
            launch_dependent(k[3], [(nh * CLUSTER) as u32, 1, 1], [256, 1, 1], (per_block * 4) as u32, &args)?;
            return Ok(Some(out));
        }
    }
    let f32s = |shape: &[i64]| Tensor::f_empty(shape, (Kind::Float, device));
    let qlat = f32s(&[bt, nh, rank])?;
    let (part_o, part_ml) = (f32s(&[bt, nh, splits, rank])?, f32s(&[bt, nh, splits, 2])?);
    let out = Tensor::f_empty([b, t, nh, v], (Kind::BFloat16, device))?;
    // With the prep, q_pe is roped into a buffer of its own and one more block per token fills the cache.
    let roped = if a.prep.is_some() { Tensor::f_empty([b, nh, t, rope], (Kind::BFloat16, device))? } else { a.q_pe.shallow_clone() };
    let null = Arg::I64(0);
    let mut q_args = vec![
        Arg::Tensor(a.q_nope), Arg::I64(qs[0]), Arg::I64(qs[1]), Arg::I64(qs[2]), Arg::Tensor(a.w_uk), Arg::Tensor(&qlat),
        Arg::I32(nh32), Arg::I32(t32), Arg::I32(nope as i32), Arg::I32(r32),
    ];
    match &a.prep {
        Some(p) => q_args.extend([
            Arg::Tensor(a.q_pe), Arg::Tensor(&roped), Arg::Tensor(p.cos), Arg::Tensor(p.sin), Arg::I32(p32), Arg::I32(p.interleaved as i32),
            Arg::Tensor(p.kv), Arg::Tensor(p.kv_norm.0), Arg::F32(p.kv_norm.1 as f32),
            Arg::Tensor(a.ckv), Arg::I64(cs[0]), Arg::I64(cs[1]), Arg::Tensor(a.kpe), Arg::I64(ks[0]), Arg::I64(ks[1]), Arg::Tensor(p.slots),
        ]),
        None => q_args.extend([
            null, null, null, null, Arg::I32(p32), Arg::I32(0), null, null, Arg::F32(0.0), null, Arg::I64(0), Arg::I64(0), null,
            Arg::I64(0), Arg::I64(0), null,
        ]),
    }
    let kv_blocks = u32::from(a.prep.is_some());
    launch_dependent(k[0], [nh as u32 + kv_blocks, (rank / 64) as u32, bt as u32], [256, 1, 1], 0, &q_args)?;
    let part_args = [
        Arg::Tensor(&qlat), Arg::Tensor(&roped), Arg::Tensor(a.ckv), Arg::I64(cs[0]), Arg::I64(cs[1]), Arg::Tensor(a.kpe),
        Arg::I64(ks[0]), Arg::I64(ks[1]), Arg::Tensor(a.bias), Arg::Tensor(&part_o), Arg::Tensor(&part_ml), Arg::I32(nh32),
        Arg::I32(t32), Arg::I32(s as i32), Arg::I32(p32), Arg::I32(r32), Arg::I32(splits as i32),
        Arg::F32(a.scale as f32),
    ];
    launch_dependent(k[1], [nh as u32, splits as u32, bt as u32], [256, 1, 1], part_shared as u32, &part_args)?;
    let o_args = [
        Arg::Tensor(&part_o), Arg::Tensor(&part_ml), Arg::Tensor(a.w_uv_t), Arg::Tensor(&out), Arg::I32(nh32), Arg::I32(splits as i32),
        Arg::I32(r32), Arg::I32(v as i32),
    ];
    launch_dependent(k[2], [nh as u32, (v / 32) as u32, bt as u32], [256, 1, 1], 0, &o_args)?;
    Ok(Some(out))
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gpu_test::{gpu, randn_bf16};

    /// On a GPU: the one-kernel MLA decode attention equals the libtorch absorbed path (q_nope x W_uk,
    /// concatenations, eager softmax attention, x W_uv) within bf16 rounding, with masked (-inf) slots
    /// that the kernel skips, two sequences and strided inputs.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn mla_decode_kernel_matches_the_absorbed_libtorch_path() {
        let dev = gpu(9);
        let (b, nh, t, nope, rope, rank, v) = (2i64, 16i64, 1i64, 128i64, 64i64, 512i64, 128i64);
        // 77 slots: splits of 16 slots; 1000: 32 splits of 32, whole splits masked in sequence 0.
        for s in [77i64, 1000] {
            let bf = |sh: &[i64], sd: f64| randn_bf16(sh, sd, dev);
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
            let got = mla_decode(&MlaDecode { q_nope: &q_nope, q_pe: &q_pe, w_uk: &w_uk, ckv: &ckv, kpe: &kpe, bias: &bias, w_uv_t: &w_uv_t, scale, prep: None })
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
            eprintln!("mla_decode, {s} slots: max |kernel - libtorch| = {err:.3e} (of {mag:.3e})");
            assert!(err <= 0.03 * mag + 1e-3, "{err} vs {mag}");
        }
    }

    /// On a GPU: with the step's raw inputs (`prep`), the kernels rope q_pe and k_pe, normalise the latent
    /// and write both into the cache slot themselves, and attend as the unfused path does (libtorch
    /// rotary and rms_norm, index_copy_ into the cache, then the kernels without prep): same cache
    /// contents and same output within bf16 rounding, one sequence (`mla_cluster`) and two.
    #[test]
    #[ignore = "needs a CUDA device"]
    fn mla_prep_matches_rope_norm_and_cache_write() {
        use crate::layers::rotary::{RopeSpec, RopeStyle, Rotary};
        use crate::layers::RmsNorm;
        let dev = gpu(11);
        let (nh, nope, rope, rank, v) = (16i64, 128i64, 64i64, 512i64, 128i64);
        let bf = |sh: &[i64], sd: f64| randn_bf16(sh, sd, dev);
        let rotary = Rotary::new(&RopeSpec { theta: 10000.0, yarn: None }, rope as usize, RopeStyle::Interleaved, dev).expect("rotary");
        let w_uk = bf(&[nh, nope, rank], 0.05);
        let w_uv_t = bf(&[nh, rank, v], 0.05);
        let norm = RmsNorm { weight: (Tensor::randn([rank], (Kind::Float, dev)) * 0.3 + 1.0).to_kind(Kind::BFloat16), eps: 1e-6 };
        // One sequence: the one-kernel cluster path (slot 40 is owned by block 0 of each head, 45 by block 5;
        // 480 slots: 60 a block, several rounds of four a warp). Two sequences, or one past the cluster's
        // 768 slots: the three kernels.
        for (b, slot, cap) in [(1i64, 40i64, 96i64), (1, 45, 96), (1, 300, 480), (2, 40, 96), (2, 450, 600), (1, 1000, 1100)] {
            let q = bf(&[b, 1, nh, nope + rope], 1.0).transpose(1, 2); // (b, nh, 1, dq)
            let (q_nope, q_pe_raw) = (q.narrow(-1, 0, nope), q.narrow(-1, nope, rope));
            let kv = bf(&[b, 1, rank + rope], 2.0);
            let (cos, sin) = rotary.cos_sin(&Tensor::full([b, 1], slot, (Kind::Int64, dev))).expect("cos sin");
            let slots = Tensor::full([1], slot, (Kind::Int64, dev));
            let (ckv0, kpe0) = (bf(&[b, cap, rank], 1.0), bf(&[b, cap, rope], 1.0));
            let keep = Tensor::arange(cap, (Kind::Int64, dev)).le(slot).view([1, 1, 1, cap]).expand([b, 1, 1, cap], false);
            let zero = Tensor::zeros([1], (Kind::Float, dev));
            let bias = zero.where_self(&keep, &Tensor::full([1], f64::NEG_INFINITY, (Kind::Float, dev))).contiguous();
            // Unfused: libtorch rope and norm, index_copy_ into the cache, then the kernels without prep.
            let (mut ckv1, mut kpe1) = (ckv0.copy(), kpe0.copy());
            let q_pe = rotary.apply(&q_pe_raw, &cos, &sin).expect("rope q");
            let c_kv = norm.forward(&kv.narrow(-1, 0, rank)).expect("norm");
            let k_pe = rotary.apply(&kv.narrow(-1, rank, rope).unsqueeze(1), &cos, &sin).expect("rope k").squeeze_dim(1);
            let _ = ckv1.index_copy_(1, &slots, &c_kv);
            let _ = kpe1.index_copy_(1, &slots, &k_pe);
            let call = MlaDecode { q_nope: &q_nope, q_pe: &q_pe, w_uk: &w_uk, ckv: &ckv1, kpe: &kpe1, bias: &bias, w_uv_t: &w_uv_t, scale: 0.07, prep: None };
            let want = mla_decode(&call).expect("mla").expect("applies").to_kind(Kind::Float);
            // Fused: the kernels do it all.
            let (ckv2, kpe2) = (ckv0.copy(), kpe0.copy());
            let prep = MlaPrep { kv: &kv, kv_norm: (&norm.weight, norm.eps), cos: &cos, sin: &sin, interleaved: true, slots: &slots };
            let call = MlaDecode { q_nope: &q_nope, q_pe: &q_pe_raw, w_uk: &w_uk, ckv: &ckv2, kpe: &kpe2, bias: &bias, w_uv_t: &w_uv_t, scale: 0.07, prep: Some(prep) };
            let got = mla_decode(&call).expect("mla").expect("applies").to_kind(Kind::Float);
            let cache_err = |x: &Tensor, y: &Tensor| (x.to_kind(Kind::Float) - y.to_kind(Kind::Float)).abs().max().double_value(&[]);
            let (ce, ke) = (cache_err(&ckv2, &ckv1), cache_err(&kpe2, &kpe1));
            let err = (&got - &want).abs().max().double_value(&[]);
            let mag = want.abs().max().double_value(&[]);
            eprintln!("b {b}, slot {slot}: cache |fused - unfused| latent {ce:.3e}, k_pe {ke:.3e}; output {err:.3e} (of {mag:.3e})");
            // At most one bf16 rounding step apart (the sum of squares is taken in another order).
            let steps = |x: &Tensor, y: &Tensor| {
                let (x, y) = (x.to_kind(Kind::Float), y.to_kind(Kind::Float));
                ((&x - &y).abs() - x.abs().maximum(&y.abs()) * (1.0 / 128.0)).max().double_value(&[])
            };
            assert!(steps(&ckv2, &ckv1) <= 1e-6 && steps(&kpe2, &kpe1) <= 1e-6, "cache entries differ by more than a rounding: {ce} {ke}");
            assert!(err <= 0.01 * mag + 1e-3, "{err} vs {mag}");
        }
    }
}
