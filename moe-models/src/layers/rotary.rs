//! Rotary position embeddings: default and YaRN frequencies, interleaved and half-split rotation.
//!
//! Frequencies follow transformers' `modeling_rope_utils` (`_compute_default_rope_parameters`,
//! `_compute_yarn_parameters`) exactly, including its defaults (`beta_fast` 32, `beta_slow` 1,
//! `truncate` true) and its attention factor: the given `attention_factor`, else
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set and non-zero, else
//! `mscale(factor, 1)`, with `mscale(s, m) = 0.1 m ln(s) + 1` (1 for `s <= 1`). cos and sin are multiplied
//! by that factor, so both q and k carry it.

use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result, TorchContext};

/// How the rotated dimensions are paired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)` (DeepSeek-V2's `view_as_complex` rotation).
    Interleaved,
    /// Pairs `(i, i + d/2)` (Llama/NeoX `rotate_half`: Qwen2-MoE, Mixtral).
    HalfSplit,
}

/// YaRN parameters as read from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// Context extension factor `s`.
    pub factor: f64,
    /// Pre-training context length.
    pub original_max_position_embeddings: f64,
    /// Extrapolation boundary (rotations).
    pub beta_fast: f64,
    /// Interpolation boundary (rotations).
    pub beta_slow: f64,
    /// `mscale` (numerator of the cos/sin factor).
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (denominator of the cos/sin factor; DeepSeek also squares it into the softmax
    /// scale).
    pub mscale_all_dim: Option<f64>,
    /// An explicit cos/sin factor, overriding the mscale rule.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions.
    pub truncate: bool,
}

/// The resolved rope configuration of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    /// `rope_theta`.
    pub theta: f64,
    /// YaRN scaling, or `None` for plain rope.
    pub yarn: Option<Yarn>,
}

/// `0.1 m ln(s) + 1`, or 1 for `s <= 1` (YaRN's magnitude correction).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

fn num(v: &Value, key: &str, prefix: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::Config { key: format!("{prefix}.{key}"), msg: format!("expected a number, got {x}") }),
    }
}

impl RopeSpec {
    /// Resolve the rope settings from config.json's `rope_theta`, the legacy `rope_scaling` dict
    /// (`{"type": "yarn", ...}`, as in the hub's DeepSeek-V2 configs) or transformers 5's
    /// `rope_parameters` dict (`{"rope_type": "yarn", "rope_theta": ..., ...}`). Rope types other than
    /// default and yarn are rejected, naming the key.
    pub fn from_config(
        rope_theta: Option<f64>,
        rope_scaling: Option<&Value>,
        rope_parameters: Option<&Value>,
        max_position_embeddings: usize,
    ) -> Result<Self> {
        let (dict, prefix) = match (rope_parameters, rope_scaling) {
            (Some(p), _) if !p.is_null() => (Some(p), "rope_parameters"),
            (_, Some(s)) if !s.is_null() => (Some(s), "rope_scaling"),
            _ => (None, ""),
        };
        let Some(dict) = dict else {
            return Ok(Self { theta: rope_theta.unwrap_or(10000.0), yarn: None });
        };
        if !dict.is_object() {
            return Err(Error::Config { key: prefix.into(), msg: "expected an object".into() });
        }
        let theta = num(dict, "rope_theta", prefix)?.or(rope_theta).unwrap_or(10000.0);
        let (ty, ty_key) = match (dict.get("rope_type"), dict.get("type")) {
            (Some(Value::String(s)), _) => (s.as_str(), "rope_type"),
            (_, Some(Value::String(s))) => (s.as_str(), "type"),
            _ => ("default", "rope_type"),
        };
        match ty {
            "default" => Ok(Self { theta, yarn: None }),
            "yarn" => {
                let orig = num(dict, "original_max_position_embeddings", prefix)?
                    .unwrap_or(max_position_embeddings as f64);
                let factor = num(dict, "factor", prefix)?.unwrap_or(max_position_embeddings as f64 / orig);
                // transformers: `rope_parameters.get("beta_fast") or 32`, so 0 also means the default.
                let nz = |x: Option<f64>, d: f64| x.filter(|v| *v != 0.0).unwrap_or(d);
                let truncate = match dict.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(x) => {
                        return Err(Error::Config { key: format!("{prefix}.truncate"), msg: format!("expected a bool, got {x}") })
                    }
                };
                Ok(Self {
                    theta,
                    yarn: Some(Yarn {
                        factor,
                        original_max_position_embeddings: orig,
                        beta_fast: nz(num(dict, "beta_fast", prefix)?, 32.0),
                        beta_slow: nz(num(dict, "beta_slow", prefix)?, 1.0),
                        mscale: num(dict, "mscale", prefix)?,
                        mscale_all_dim: num(dict, "mscale_all_dim", prefix)?,
                        attention_factor: num(dict, "attention_factor", prefix)?,
                        truncate,
                    }),
                })
            }
            other => Err(Error::Config {
                key: format!("{prefix}.{ty_key}"),
                msg: format!("rope type `{other}` is not implemented (supported: default, yarn)"),
            }),
        }
    }

    /// Inverse frequencies (`dim / 2` values) and the cos/sin magnitude factor for a rotary dim `dim`.
    pub fn inv_freq(&self, dim: usize) -> (Vec<f64>, f64) {
        let half = dim / 2;
        let base = self.theta;
        let extrap: Vec<f64> = (0..half).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect();
        let Some(y) = &self.yarn else { return (extrap, 1.0) };
        let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, ma),
            _ => yarn_mscale(y.factor, 1.0),
        };
        let d = dim as f64;
        let orig = y.original_max_position_embeddings;
        let corr = |rot: f64| d * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
        let (mut low, mut high) = (corr(y.beta_fast), corr(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(d - 1.0);
        let span = if low == high { high + 0.001 - low } else { high - low };
        let inv = (0..half)
            .map(|i| {
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let extrap_factor = 1.0 - ramp;
                let interp = extrap[i] / y.factor;
                interp * (1.0 - extrap_factor) + extrap[i] * extrap_factor
            })
            .collect();
        (inv, attention_factor)
    }
}

/// Rotary embedding for one rotary dimension: precomputed inverse frequencies on the device.
#[derive(Debug)]
pub struct Rotary {
    /// `(dim / 2)` f32.
    inv_freq: Tensor,
    /// cos/sin magnitude (YaRN), 1 for plain rope.
    pub attention_factor: f64,
    /// Pairing of the rotated dimensions.
    pub style: RopeStyle,
    /// Rotary dimension.
    pub dim: usize,
}

impl Rotary {
    /// Build for rotary dimension `dim` (even).
    pub fn new(spec: &RopeSpec, dim: usize, style: RopeStyle, device: Device) -> Result<Self> {
        if dim & 1 == 1 {
            return Err(Error::Config { key: "rope dim".into(), msg: format!("rotary dimension {dim} is odd") });
        }
        let (inv, attention_factor) = spec.inv_freq(dim);
        let inv: Vec<f32> = inv.iter().map(|&x| x as f32).collect();
        let inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(device)?;
        Ok(Self { inv_freq, attention_factor, style, dim })
    }

    /// cos and sin, each `(b, t, dim / 2)` f32, for `(b, t)` i64 positions; both carry the attention
    /// factor.
    pub fn cos_sin(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?; // (b, t, 1)
        let freqs = pos.f_mul(&self.inv_freq)?; // (b, t, d/2)
        let cos = freqs.f_cos()?.f_mul_scalar(self.attention_factor)?;
        let sin = freqs.f_sin()?.f_mul_scalar(self.attention_factor)?;
        Ok((cos, sin))
    }

    /// Rotate `x` of shape `(b, heads, t, dim)` (computed in f32, returned in `x`'s dtype).
    ///
    /// Each rotary pair is a complex number multiplied by `cos + i sin`: one complex kernel instead of
    /// six real ones (the products and sums are the same, in f32).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::kernels::rotary(x, cos, sin, self.style == RopeStyle::Interleaved)? {
            return Ok(y); // CUDA bf16: one run-time compiled kernel, same arithmetic
        }
        let kind = x.kind();
        let rot = Tensor::f_complex(&cos.f_unsqueeze(1)?, &sin.f_unsqueeze(1)?)?; // (b, 1, t, d/2) complex
        let size = x.size();
        let half = (self.dim / 2) as i64;
        let mut pairs = size.clone();
        let last = pairs.len() - 1;
        let out = match self.style {
            RopeStyle::Interleaved => {
                // (.., d) -> (.., d/2, 2): pair j is (x[2j], x[2j+1]).
                pairs[last] = half;
                pairs.push(2);
                let xc = x.f_reshape(&pairs)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view_as_complex()?;
                xc.f_mul(&rot)?.f_view_as_real()?.f_reshape(&size)?
            }
            RopeStyle::HalfSplit => {
                // (.., d) -> (.., 2, d/2) -> (.., d/2, 2): pair j is (x[j], x[j + d/2]).
                pairs[last] = 2;
                pairs.push(half);
                let xc = x.f_reshape(&pairs)?.f_transpose(-1, -2)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view_as_complex()?;
                xc.f_mul(&rot)?.f_view_as_real()?.f_transpose(-1, -2)?.f_reshape(&size)?
            }
        };
        out.f_to_kind(kind).ctx("rotary")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite() -> RopeSpec {
        let scaling = serde_json::json!({"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707});
        RopeSpec::from_config(Some(10000.0), Some(&scaling), None, 163840).expect("yarn")
    }

    #[test]
    fn lite_yarn_has_unit_cos_sin_factor_and_blends_frequencies() {
        let (inv, af) = lite().inv_freq(64);
        assert!((af - 1.0).abs() < 1e-12);
        // The highest frequency is extrapolated (kept), the lowest interpolated (divided by 40).
        assert!((inv[0] - 1.0).abs() < 1e-12);
        let plain = 1.0 / 10000f64.powf(62.0 / 64.0);
        assert!((inv[31] - plain / 40.0).abs() < 1e-15);
    }

    #[test]
    fn unknown_rope_type_names_the_key() {
        let scaling = serde_json::json!({"type": "dynamic", "factor": 2.0});
        let e = RopeSpec::from_config(None, Some(&scaling), None, 4096).expect_err("dynamic");
        assert!(e.to_string().contains("rope_scaling.type"), "{e}");
    }

    #[test]
    fn interleaved_rotation_preserves_pair_norms() {
        let spec = RopeSpec { theta: 10000.0, yarn: None };
        let rot = Rotary::new(&spec, 8, RopeStyle::Interleaved, Device::Cpu).expect("rotary");
        let x = Tensor::randn([1, 2, 5, 8], (Kind::Float, Device::Cpu));
        let pos = Tensor::arange(5, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let (c, s) = rot.cos_sin(&pos).expect("cos sin");
        let y = rot.apply(&x, &c, &s).expect("apply");
        let n = |t: &Tensor| t.reshape([1, 2, 5, 4, 2]).square().sum_dim_intlist(-1, false, Kind::Float);
        assert!(n(&x).allclose(&n(&y), 1e-5, 1e-5, false));
        // Position 0 is the identity.
        assert!(x.narrow(2, 0, 1).allclose(&y.narrow(2, 0, 1), 1e-6, 1e-6, false));
    }
}
