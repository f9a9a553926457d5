//! Building blocks shared by every family: linear layers, RMSNorm, rotary embeddings (default and YaRN,
//! interleaved and half-split), the SwiGLU MLP, the MoE block (router, policy hook, dispatch, shared
//! experts), attention (masks, positions, sliding window, eager attention, grouped-query attention) and
//! the decoder stack (embedding, pre-norm layers, final norm, LM head). A family file composes these and
//! keeps only what is its own.

pub mod attention;
pub mod decoder;
pub mod mlp;
pub mod moe;
pub mod qk_norm;
pub mod rotary;

use tch::Tensor;

use crate::error::{Result, TorchContext};
use crate::loader::VarBuilder;

/// `y = x W^T (+ b)`, the checkpoint's `nn.Linear`.
#[derive(Debug)]
pub struct Linear {
    /// `(out, in)`.
    pub weight: Tensor,
    /// `(out)`, when the checkpoint has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Load `weight` of shape `(out, in)` and, if `bias`, `bias` of shape `(out)`.
    pub fn load(vb: &VarBuilder<'_>, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get("weight", &[out_dim, in_dim])?;
        let bias = if bias { Some(vb.get("bias", &[out_dim])?) } else { None };
        Ok(Self { weight, bias })
    }

    /// Apply to `(.., in)`, giving `(.., out)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.f_linear(&self.weight, self.bias.as_ref()).ctx("linear")
    }

    /// This layer as an input of the fused projection kernel ([`crate::kernels::project`]).
    pub fn projection(&self) -> crate::kernels::Projection<'_> {
        crate::kernels::Projection { weight: &self.weight, bias: self.bias.as_ref() }
    }

    /// `residual + forward(x)`: in one kernel where [`crate::kernels::project`] applies (decode sizes on
    /// CUDA bf16), else a linear and an add.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let p = crate::kernels::Project { x, norm: None, projections: &[self.projection()], residual: Some(residual) };
        match crate::kernels::project(&p)? {
            Some(mut y) => Ok(y.pop().expect("one projection")),
            None => residual.f_add(&self.forward(x)?).ctx("residual add"),
        }
    }
}

/// Root-mean-square layer norm, computed in f32 and cast back before the weight, as transformers does.
#[derive(Debug)]
pub struct RmsNorm {
    /// `(h)`.
    pub weight: Tensor,
    /// Added to the mean square.
    pub eps: f64,
}

impl RmsNorm {
    /// Load `weight` of shape `(dim)`.
    pub fn load(vb: &VarBuilder<'_>, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get("weight", &[dim])?, eps })
    }

    /// Normalise the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // libtorch's rms_norm: transformers' formula (normalise in f32, scale by the weight) in one or two
        // kernels instead of eight. Exact in f32; in bf16 the fused CUDA kernel may round once where
        // transformers rounds twice (within one bf16 ulp).
        let dim = self.weight.size()[0];
        x.f_rms_norm([dim], Some(&self.weight), self.eps).ctx("rms_norm")
    }
}
