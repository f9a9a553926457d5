//! Per-token negative log-likelihood, with the LM head applied in row chunks so that a long sequence's
//! full-vocabulary f32 logits never exist at once.

use tch::{Kind, Tensor};

use crate::ctx::ForwardCtx;
use crate::error::{Error, Result, TorchContext};
use crate::model::Model;

/// Default rows per LM-head chunk (1024 x 102400 f32 logits = 400 MiB).
pub const DEFAULT_CHUNK_TOKENS: usize = 1024;

/// `(b, t - 1)` f32: entry `(i, j)` is `-log p(ids[i, j + 1] | ids[i, ..= j])`, and 0 where either token
/// is padding (per `ctx.mask`). Runs one forward pass with `ctx`, then the LM head on at most
/// `chunk_tokens` positions at a time.
pub fn token_nll(model: &Model, ids: &Tensor, ctx: &mut ForwardCtx<'_>, chunk_tokens: usize) -> Result<Tensor> {
    let size = ids.size();
    if size.len() != 2 || size[1] < 2 {
        return Err(Error::Input(format!("token_nll needs (batch, time >= 2) ids, got {size:?}")));
    }
    let (b, t) = (size[0], size[1]);
    let hidden = model.forward_hidden(ids, ctx)?; // (b, t, h)
    let _guard = tch::no_grad_guard();
    let h = hidden.size()[2];
    let dev = hidden.device();
    let src = hidden.f_narrow(1, 0, t - 1)?.f_reshape([-1, h])?; // (b (t-1), h)
    let tgt = ids.f_to_device(dev)?.f_narrow(1, 1, t - 1)?.f_reshape([-1, 1])?; // (b (t-1), 1)
    let rows = src.size()[0];
    let chunk = chunk_tokens.max(1) as i64;
    let mut parts = Vec::new();
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let logits = model.lm_head(&src.f_narrow(0, start, len)?)?.f_to_kind(Kind::Float)?; // (len, v)
        let lse = logits.f_logsumexp([-1], false)?;
        let picked = logits.f_gather(1, &tgt.f_narrow(0, start, len)?, false)?.f_squeeze_dim(1)?;
        parts.push(lse.f_sub(&picked)?);
        start += len;
    }
    let nll = Tensor::f_cat(&parts, 0)?.f_reshape([b, t - 1])?;
    match ctx.mask {
        None => Ok(nll),
        Some(m) => {
            let m = m.f_to_device(dev)?.f_ne(0)?;
            let pair = m.f_narrow(1, 0, t - 1)?.f_logical_and(&m.f_narrow(1, 1, t - 1)?)?;
            nll.f_mul(&pair.f_to_kind(Kind::Float)?).ctx("nll mask")
        }
    }
}
