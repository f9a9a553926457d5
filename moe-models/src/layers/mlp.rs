//! The SwiGLU feed-forward block `down(silu(gate(x)) * up(x))`: dense layers and shared experts.

use tch::Tensor;

use super::Linear;
use crate::error::{Result, TorchContext};
use crate::loader::VarBuilder;

/// A SwiGLU MLP with the checkpoint's field names.
#[derive(Debug)]
pub struct Mlp {
    /// `(i, h)`.
    pub gate_proj: Linear,
    /// `(i, h)`.
    pub up_proj: Linear,
    /// `(h, i)`.
    pub down_proj: Linear,
}

impl Mlp {
    /// Load `gate_proj`, `up_proj`, `down_proj` for hidden size `h` and width `i`.
    pub fn load(vb: &VarBuilder<'_>, h: i64, i: i64) -> Result<Self> {
        Ok(Self {
            gate_proj: Linear::load(&vb.pp("gate_proj"), h, i, false)?,
            up_proj: Linear::load(&vb.pp("up_proj"), h, i, false)?,
            down_proj: Linear::load(&vb.pp("down_proj"), i, h, false)?,
        })
    }

    /// Apply to `(.., h)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let u = self.up_proj.forward(x)?;
        let size = g.size();
        let cols = size.last().copied().unwrap_or(0);
        // CUDA bf16: silu and the product in one kernel.
        let fused = crate::kernels::swiglu(&g.f_reshape([-1, cols])?, &u.f_reshape([-1, cols])?)?;
        let act = match fused {
            Some(a) => a.f_reshape(&size)?,
            None => g.f_silu()?.f_mul(&u).ctx("mlp")?,
        };
        self.down_proj.forward(&act)
    }
}
