//! The MoE block: an f32 router, the routing-policy hook, the family's mixing rule, routed experts over
//! stacked weights, and optional shared experts.
//!
//! Who decides what: the block computes router probabilities (softmax over all experts, f32) and, for
//! group-limited routing, zeroes the experts of groups a token does not keep *before* the policy sees the
//! probabilities, so every policy respects the group limit. The policy returns ids only. The block then
//! gathers the (masked) probabilities at those ids (`-1` contributes nothing), applies the mixing rule
//! (renormalise or not, scale) and runs the experts.
//!
//! Dispatch (see [`Dispatch`]): `Grouped` sorts the (token, slot) pairs by expert on the device and runs
//! `_grouped_mm` over all experts' stacked weights `(e, 2i, h)` / `(e, h, i)` with device-computed
//! offsets: no host synchronisation. `PerExpert` copies the ids to the host and runs one matmul pair per
//! non-empty expert group, which is what a CPU wants for small batches.

use alloc_token::device::{BatchSplit, DeviceBatch};
use tch::{Device, Kind, Tensor};

use super::mlp::Mlp;
use crate::kernels::{MixWeights, MoeCall, Routing, SharedExpert};
use super::{Linear, RmsNorm};
use crate::ctx::{Dispatch, ForwardCtx, LayerRoute, Renormalize};
use crate::error::{Error, Result, TorchContext};
use crate::loader::VarBuilder;

/// The routed experts' weights, stacked at load time.
#[derive(Debug)]
pub struct Experts {
    /// `(e, 2i, h)`: each expert's `gate_proj` rows, then its `up_proj` rows.
    pub gate_up_proj: Tensor,
    /// `(e, h, i)`.
    pub down_proj: Tensor,
    /// Number of experts `e`.
    pub num_experts: i64,
}

/// Checkpoint names of one expert's three projections (DeepSeek/Qwen: gate_proj, up_proj, down_proj;
/// Mixtral: w1, w3, w2).
#[derive(Debug, Clone, Copy)]
pub struct ExpertNames {
    /// The gate projection `(i, h)`.
    pub gate: &'static str,
    /// The up projection `(i, h)`.
    pub up: &'static str,
    /// The down projection `(h, i)`.
    pub down: &'static str,
}

/// `gate_proj` / `up_proj` / `down_proj`.
pub const SWIGLU_NAMES: ExpertNames = ExpertNames { gate: "gate_proj", up: "up_proj", down: "down_proj" };

impl Experts {
    /// Load `e` experts from `vb` (at `...mlp.experts`): either the hub's per-expert tensors
    /// `{j}.{gate,up,down}.weight`, stacked here, or already stacked `gate_up_proj` `(e, 2i, h)` and
    /// `down_proj` `(e, h, i)` (transformers 5's fused layout).
    pub fn load(vb: &VarBuilder<'_>, e: i64, h: i64, i: i64, names: ExpertNames) -> Result<Self> {
        if vb.contains("gate_up_proj") {
            return Ok(Self {
                gate_up_proj: vb.get("gate_up_proj", &[e, 2 * i, h])?,
                down_proj: vb.get("down_proj", &[e, h, i])?,
                num_experts: e,
            });
        }
        let mut gate_up = Vec::with_capacity(e as usize);
        let mut down = Vec::with_capacity(e as usize);
        for j in 0..e {
            let ej = vb.pp(j);
            let g = ej.pp(names.gate).get("weight", &[i, h])?;
            let u = ej.pp(names.up).get("weight", &[i, h])?;
            gate_up.push(Tensor::f_cat(&[g, u], 0)?); // (2i, h)
            down.push(ej.pp(names.down).get("weight", &[h, i])?);
        }
        Ok(Self {
            gate_up_proj: Tensor::f_stack(&gate_up, 0).ctx(vb.name("stack"))?,
            down_proj: Tensor::f_stack(&down, 0).ctx(vb.name("stack"))?,
            num_experts: e,
        })
    }

    /// Mix the chosen experts: `x` `(n, h)`, `ids` `(n, w)` i64 (`-1` = none), `weights` `(n, w)` f32.
    /// `max_pairs`, when given, must bound the chosen pairs (ids `>= 0`; see
    /// `DevicePolicy::max_pairs`): the grouped path then sizes its work to it instead of to `n * w`.
    /// Returns `(n, h)` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, ids: &Tensor, weights: &Tensor, dispatch: Dispatch, max_pairs: Option<usize>) -> Result<Tensor> {
        match self.resolve(dispatch, x, ids.numel() as i64) {
            Dispatch::PerExpert => self.forward_per_expert(x, ids, weights),
            Dispatch::Fused => self.forward_fused(x, Routing::Chosen { ids, mix: MixWeights::Given(weights) }, None),
            _ => self.forward_grouped(x, ids, weights, max_pairs),
        }
    }

    /// What `dispatch` means for `pairs` (token, slot) pairs of `x`: `Auto` takes the fused kernels where
    /// they apply, `_grouped_mm` on CUDA bf16 (its only dtype), per-expert matmuls elsewhere; the others
    /// stand as given.
    pub fn resolve(&self, dispatch: Dispatch, x: &Tensor, pairs: i64) -> Dispatch {
        match dispatch {
            Dispatch::Auto if crate::kernels::fused_moe_available(x, pairs, &self.gate_up_proj) => Dispatch::Fused,
            Dispatch::Auto if x.device().is_cuda() && x.kind() == Kind::BFloat16 => Dispatch::Grouped,
            Dispatch::Auto => Dispatch::PerExpert,
            d => d,
        }
    }

    /// The fused decode kernels' call ([`crate::kernels::fused_moe`]) over these experts for `x`, with
    /// `routing` and optionally a shared expert added in the same kernels (no norm, no residual).
    pub fn fused_call<'a>(&'a self, x: &'a Tensor, routing: Routing<'a>, shared: Option<SharedExpert<'a>>) -> MoeCall<'a> {
        MoeCall { x, norm: None, residual: None, routing, gate_up: &self.gate_up_proj, down: &self.down_proj, shared }
    }

    /// [`crate::kernels::fused_moe`] of [`Self::fused_call`].
    pub fn forward_fused(&self, x: &Tensor, routing: Routing<'_>, shared: Option<SharedExpert<'_>>) -> Result<Tensor> {
        crate::kernels::fused_moe(&self.fused_call(x, routing, shared))
    }

    fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
        let half = gate_up.size()[1] / 2;
        let (g, u) = (gate_up.f_narrow(1, 0, half)?, gate_up.f_narrow(1, half, half)?);
        if let Some(a) = crate::kernels::swiglu(&g, &u)? {
            return Ok(a); // CUDA bf16: one kernel
        }
        Ok(g.f_silu()?.f_mul(&u)?)
    }

    fn forward_grouped(&self, x: &Tensor, ids: &Tensor, weights: &Tensor, max_pairs: Option<usize>) -> Result<Tensor> {
        let _span = tracing::trace_span!("moe.experts", path = "grouped").entered();
        let (n, h) = (x.size()[0], x.size()[1]);
        let w = ids.size()[1];
        let e = self.num_experts;
        let dev = x.device();
        // Few kernels on purpose: at batch-1 decode this block runs once per MoE layer per token, and
        // every kernel launch costs about as much as the small ones themselves.
        // "No expert" (-1) becomes group e (-1 mod (e + 1) = e), past the last offset: the sort puts it
        // at the tail, where grouped_mm does not compute. The chosen pairs come first, so with a bound
        // on their number only that prefix is gathered and computed.
        let all = n * w;
        let m = max_pairs.map_or(all, |b| (b as i64).min(all));
        // i32 keys: the radix sort makes half the passes of i64 keys.
        let keyed = ids.f_reshape([-1])?.f_remainder(e + 1)?.f_to_kind(Kind::Int)?; // (all)
        let (sorted, perm) = keyed.f_sort_stable(true, 0, false)?; // (all)
        let (sorted, perm) = (sorted.f_narrow(0, 0, m)?, perm.f_narrow(0, 0, m)?); // (m)
        if m == 0 {
            return Ok(Tensor::f_zeros([n, h], (x.kind(), dev))?);
        }
        let token = perm.f_floor_divide_scalar(w)?; // (m)
        // Group ends: how many sorted keys are <= j, for j in 0..e.
        let groups = Tensor::f_arange(e, (Kind::Int, dev))?;
        let offs = groups.f_searchsorted(&sorted, true, true, "right", None::<&Tensor>)?; // (e) int32
        let xg = x.f_index_select(0, &token)?; // (m, h)
        let gu = xg.f_internal_grouped_mm(&self.gate_up_proj.f_transpose(1, 2)?, Some(&offs), None::<&Tensor>, None)?;
        if x.device().is_cuda() && x.kind() == Kind::BFloat16 && h % 8 == 0 {
            // Rows past the last offset are uninitialised in gu, act and y, but no chosen pair points
            // at them: the combine kernel reads only chosen pairs' rows, so no masking is needed.
            let act = Self::swiglu(&gu)?; // (m, i)
            let y = act.f_internal_grouped_mm(&self.down_proj.f_transpose(1, 2)?, Some(&offs), None::<&Tensor>, None)?; // (m, h)
            let rows = Tensor::f_arange(m, (Kind::Int64, dev))?;
            let row = Tensor::f_full([all], -1, (Kind::Int64, dev))?.f_index_copy(0, &perm, &rows)?.f_reshape([n, w])?;
            if let Some(out) = crate::kernels::moe_combine(&y, ids, &row, &weights.f_to_kind(Kind::Float)?)? {
                return Ok(out);
            }
            return self.combine_libtorch(&y, &sorted, &perm, weights, n, w, x.kind());
        }
        let unused = sorted.f_ge(e)?.f_unsqueeze(1)?; // (m, 1): rows past the last offset (uninitialised)
        let act = Self::swiglu(&gu.f_masked_fill(&unused, 0.0)?)?; // (m, i)
        let y = act.f_internal_grouped_mm(&self.down_proj.f_transpose(1, 2)?, Some(&offs), None::<&Tensor>, None)?;
        self.combine_libtorch(&y, &sorted, &perm, weights, n, w, x.kind())
    }

    /// The grouped path's last step with libtorch ops: weight the rows of `y` `(m, h)` (pairs in sorted
    /// order `perm`, rows past the last chosen pair zeroed) and sum each token's slots, in f32.
    #[allow(clippy::too_many_arguments)]
    fn combine_libtorch(&self, y: &Tensor, sorted: &Tensor, perm: &Tensor, weights: &Tensor, n: i64, w: i64, kind: Kind) -> Result<Tensor> {
        let h = y.size()[1];
        let unused = sorted.f_ge(self.num_experts)?.f_unsqueeze(1)?; // (m, 1)
        let wg = weights.f_reshape([-1])?.f_index_select(0, perm)?.f_unsqueeze(1)?; // (m, 1) f32
        let y = y.f_masked_fill(&unused, 0.0)?.f_mul(&wg)?; // (m, h) f32 (type promotion)
        // Back to (token, slot) order and sum the slots: deterministic, and no `index_add`, which is
        // pathologically slow on the CPU (~30 ms for one row on this machine's libtorch).
        let by_slot = Tensor::f_zeros([n * w, h], (y.kind(), y.device()))?.f_index_copy(0, perm, &y)?;
        let out = by_slot.f_reshape([n, w, h])?.f_sum_dim_intlist(1, false, Kind::Float)?;
        out.f_to_kind(kind).ctx("moe.experts.grouped")
    }

    fn forward_per_expert(&self, x: &Tensor, ids: &Tensor, weights: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("moe.experts", path = "per_expert").entered();
        let (n, h) = (x.size()[0], x.size()[1]);
        let w = ids.size()[1] as usize;
        let host_ids: Vec<i64> = Vec::<i64>::try_from(ids.f_reshape([-1])?.f_to_device(Device::Cpu)?)?;
        let host_w: Vec<f32> =
            Vec::<f32>::try_from(weights.f_reshape([-1])?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)?;
        let e = self.num_experts as usize;
        let mut rows: Vec<Vec<i64>> = vec![Vec::new(); e];
        let mut mix: Vec<Vec<f32>> = vec![Vec::new(); e];
        for (slot, &id) in host_ids.iter().enumerate() {
            if id < 0 {
                continue;
            }
            if id as usize >= e {
                return Err(Error::Input(format!("policy chose expert {id}, but the layer has {e}")));
            }
            rows[id as usize].push((slot / w) as i64);
            mix[id as usize].push(host_w[slot]);
        }
        let mut out = Tensor::f_zeros([n, h], (Kind::Float, x.device()))?;
        for j in 0..e {
            if rows[j].is_empty() {
                continue;
            }
            let idx = Tensor::f_from_slice(&rows[j])?.f_to_device(x.device())?;
            let mw = Tensor::f_from_slice(&mix[j])?.f_to_device(x.device())?.f_unsqueeze(1)?;
            let xj = x.f_index_select(0, &idx)?; // (nj, h)
            let gu = xj.f_linear(&self.gate_up_proj.f_get(j as i64)?, None::<&Tensor>)?; // (nj, 2i)
            let act = Self::swiglu(&gu)?;
            let y = act.f_linear(&self.down_proj.f_get(j as i64)?, None::<&Tensor>)?; // (nj, h)
            let y = y.f_to_kind(Kind::Float)?.f_mul(&mw)?;
            // Tokens are unique within a group; `index_put_` (accumulating) rather than `index_add`,
            // which is pathologically slow on the CPU.
            let _ = out.f_index_put_(&[Some(&idx)], &y, true)?;
        }
        out.f_to_kind(x.kind()).ctx("moe.experts.per_expert")
    }
}

/// The router's scoring and group limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// Every expert is a candidate.
    Greedy,
    /// Experts form `n_group` equal groups; a group's score is its best expert's probability; only the
    /// `topk_group` best groups stay candidates (DeepSeek-V2's `group_limited_greedy`).
    GroupLimited {
        /// Number of groups.
        n_group: i64,
        /// Groups kept per token.
        topk_group: i64,
    },
}

/// Renormalise-or-not and a scale: how chosen probabilities become mixing weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mixing {
    /// Divide by the chosen probabilities' sum (+1e-20, so a token with no experts gets zeros).
    pub renormalize: bool,
    /// Multiply afterwards.
    pub scale: f64,
}

/// The family's mixing for each [`Renormalize`] option.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixingTable {
    /// `Renormalize::Native`.
    pub native: Mixing,
    /// `Renormalize::Always`.
    pub always: Mixing,
    /// `Renormalize::Never`.
    pub never: Mixing,
}

impl MixingTable {
    /// The usual table: `always` renormalises (scale 1), `never` uses the raw probabilities times
    /// `raw_scale`, and `native` is one of the two as the family says.
    pub fn new(native_renormalizes: bool, raw_scale: f64) -> Self {
        let renorm = Mixing { renormalize: true, scale: 1.0 };
        let raw = Mixing { renormalize: false, scale: raw_scale };
        Self { native: if native_renormalizes { renorm } else { raw }, always: renorm, never: raw }
    }

    /// The mixing for option `r`.
    pub fn get(&self, r: Renormalize) -> Mixing {
        match r {
            Renormalize::Native => self.native,
            Renormalize::Always => self.always,
            Renormalize::Never => self.never,
        }
    }
}

/// Per-token facts shared by every MoE layer of one forward pass.
#[derive(Debug)]
pub struct TokenInfo {
    /// `(n)` bool, false for padding; `None`: all real.
    pub mask: Option<Tensor>,
    /// `(n)` i64: the batch row of each token.
    pub seq_ids: Tensor,
}

/// A sparse MoE feed-forward block.
#[derive(Debug)]
pub struct MoeBlock {
    /// Router weight `(e, h)`, kept in f32 whatever the model dtype (the checkpoint's `mlp.gate.weight`).
    pub gate: Tensor,
    /// Routed experts.
    pub experts: Experts,
    /// Always-on experts added unweighted (DeepSeek) or sigmoid-gated (Qwen2-MoE).
    pub shared_experts: Option<Mlp>,
    /// Per-token sigmoid gate of the shared expert `(1, h)` (Qwen2-MoE), if any.
    pub shared_expert_gate: Option<Linear>,
    /// Candidate restriction.
    pub topk_method: TopkMethod,
    /// Mixing rules.
    pub mixing: MixingTable,
}

impl MoeBlock {
    /// Load the router (`gate.weight` `(e, h)`, kept in f32) and `e` routed experts of width `i` from `vb`
    /// (the checkpoint's MoE module), with greedy routing and no shared experts; a family sets
    /// `shared_experts`, `shared_expert_gate` and `topk_method` afterwards where it has them.
    pub fn load(vb: &VarBuilder<'_>, e: i64, h: i64, i: i64, names: ExpertNames, mixing: MixingTable) -> Result<Self> {
        Ok(Self {
            gate: vb.pp("gate").get_kind("weight", &[e, h], Kind::Float)?,
            experts: Experts::load(&vb.pp("experts"), e, h, i, names)?,
            shared_experts: None,
            shared_expert_gate: None,
            topk_method: TopkMethod::Greedy,
            mixing,
        })
    }

    /// Router probabilities `(n, e)` f32 for `x` `(n, h)`, group-limited if the family routes so.
    pub fn router_probs(&self, x: &Tensor) -> Result<Tensor> {
        let logits = x.f_to_kind(Kind::Float)?.f_linear(&self.gate, None::<&Tensor>)?;
        let probs = logits.f_softmax(-1, Kind::Float)?;
        match self.topk_method {
            TopkMethod::Greedy => Ok(probs),
            TopkMethod::GroupLimited { n_group, topk_group } => {
                let n = probs.size()[0];
                let per = self.experts.num_experts / n_group;
                let group_scores = probs.f_reshape([n, n_group, per])?.f_amax(-1, false)?; // (n, g)
                let (_, order) = group_scores.f_sort_stable(true, -1, true)?;
                let keep = order.f_narrow(1, 0, topk_group)?;
                let group_mask = group_scores.f_zeros_like()?.f_scatter_value(1, &keep, 1.0)?; // (n, g)
                let mask = group_mask.f_unsqueeze(-1)?.f_expand([n, n_group, per], false)?.f_reshape([n, -1])?;
                probs.f_mul(&mask).ctx("moe.group_limit")
            }
        }
    }

    /// `out` plus the shared expert (sigmoid-gated where the family gates it), with libtorch ops.
    fn add_shared(&self, layer: usize, xf: &Tensor, out: Tensor) -> Result<Tensor> {
        let Some(shared) = &self.shared_experts else { return Ok(out) };
        let mut s = shared.forward(xf).ctx(format!("layers.{layer}.mlp.shared_experts"))?;
        if let Some(g) = &self.shared_expert_gate {
            s = s.f_mul(&g.forward(xf)?.f_sigmoid()?)?;
        }
        Ok(out.f_add(&s)?)
    }

    /// After a fused call: [`Self::add_shared`] if the kernels could not take the shared expert.
    fn add_unfused_shared(&self, layer: usize, xf: &Tensor, out: Tensor) -> Result<Tensor> {
        if self.shared().is_some() { Ok(out) } else { self.add_shared(layer, xf, out) }
    }

    /// The shared expert as the fused kernels take it: bias-free projections of a width that is a
    /// multiple of 8, in bf16 (`None` without one, or when the kernels cannot take it).
    fn shared(&self) -> Option<SharedExpert<'_>> {
        let s = self.shared_experts.as_ref()?;
        let w = &s.gate_proj.weight;
        let no_bias = s.gate_proj.bias.is_none() && s.up_proj.bias.is_none() && s.down_proj.bias.is_none()
            && w.size()[0] % 8 == 0 && w.kind() == Kind::BFloat16;
        let gate_logit = match &self.shared_expert_gate {
            Some(g) if g.bias.is_some() => return None,
            Some(g) => Some(&g.weight),
            None => None,
        };
        no_bias.then_some(SharedExpert { gate: &s.gate_proj.weight, up: &s.up_proj.weight, down: &s.down_proj.weight, gate_logit })
    }

    /// Whether this step may route inside the fused kernels with `w` slots a token: the dispatch allows
    /// them, greedy routing, no padding, no trace, at most [`crate::kernels::FUSED_MOE_MAX_EXPERTS`]
    /// experts, and the kernels take `xf`'s tokens (decode sizes on CUDA bf16).
    fn may_route_in_kernel(&self, xf: &Tensor, w: i64, tokens: &TokenInfo, ctx: &ForwardCtx<'_>) -> bool {
        let e = self.experts.num_experts;
        !matches!(ctx.dispatch, Dispatch::Grouped | Dispatch::PerExpert)
            && ctx.trace.is_none()
            && tokens.mask.is_none()
            && self.topk_method == TopkMethod::Greedy
            && e <= crate::kernels::FUSED_MOE_MAX_EXPERTS
            && crate::kernels::fused_moe_available(xf, xf.size()[0] * w, &self.experts.gate_up_proj)
    }

    /// The `k` of plain top-k routing inside the fused kernels, when this step takes it: the policy is a
    /// fixed top-k at this size and [`Self::may_route_in_kernel`].
    fn in_kernel_k(&self, layer: usize, xf: &Tensor, tokens: &TokenInfo, ctx: &ForwardCtx<'_>) -> Option<i64> {
        let n = xf.size()[0];
        let e = self.experts.num_experts;
        ctx.policy
            .fixed_top_k(layer, n as usize)
            .map(|k| k as i64)
            .filter(|&k| (1..=e).contains(&k) && self.may_route_in_kernel(xf, k, tokens, ctx))
    }

    /// The policy's batch split ([`alloc_token::device::BatchSplit`], Alloc-T) of this step's tokens inside
    /// the fused kernels, when it takes it: [`crate::kernels::split_applies`] (2 to 8 tokens: the sequences of
    /// a decode step) and [`Self::may_route_in_kernel`].
    fn in_kernel_split(&self, layer: usize, xf: &Tensor, tokens: &TokenInfo, ctx: &ForwardCtx<'_>) -> Option<BatchSplit> {
        let n = xf.size()[0];
        ctx.policy.batch_split(layer, n as usize).filter(|s| {
            crate::kernels::split_applies(n, self.experts.num_experts, s) && self.may_route_in_kernel(xf, s.cap as i64, tokens, ctx)
        })
    }

    /// The routing inside the fused kernels for this step, when it applies: the policy's fixed top-k
    /// ([`Self::in_kernel_k`]) or its batch split ([`Self::in_kernel_split`]).
    fn in_kernel_routing(&self, layer: usize, xf: &Tensor, tokens: &TokenInfo, ctx: &ForwardCtx<'_>) -> Option<Routing<'_>> {
        let m = self.mixing.get(ctx.renormalize);
        let (renormalize, scale) = (m.renormalize, m.scale);
        if let Some(k) = self.in_kernel_k(layer, xf, tokens, ctx) {
            return Some(Routing::TopK { router: &self.gate, k, renormalize, scale });
        }
        let split = self.in_kernel_split(layer, xf, tokens, ctx)?;
        Some(Routing::Split { router: &self.gate, split, renormalize, scale })
    }

    /// The decoder's feed-forward half of model layer `layer`: `x + forward(norm(x))` for the residual
    /// stream `x` `(b, t, h)`. When the in-kernel top-k applies (and `ctx.fuse_decode`), the norm runs
    /// inside the router kernel and the add inside the last expert kernel: two libtorch kernels fewer
    /// per layer at batch-1 decode.
    pub fn forward_residual(&self, layer: usize, x: &Tensor, norm: &RmsNorm, tokens: &TokenInfo, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let size = x.size();
        let h = size[size.len() - 1];
        let xf = x.f_reshape([-1, h])?;
        let shared_fuses = self.shared_experts.is_none() || self.shared().is_some();
        let bf16_norm = norm.weight.kind() == Kind::BFloat16;
        if let Some(routing) = self.in_kernel_routing(layer, &xf, tokens, ctx).filter(|_| ctx.fuse_decode && shared_fuses && bf16_norm) {
            let call = MoeCall {
                norm: Some((&norm.weight, norm.eps)),
                residual: Some(&xf),
                ..self.experts.fused_call(&xf, routing, self.shared())
            };
            let out = crate::kernels::fused_moe(&call).ctx(format!("layers.{layer}.mlp (fused norm, routing, residual)"))?;
            return out.f_reshape(&size).ctx("moe");
        }
        let f = self.forward(layer, &norm.forward(x)?, tokens, ctx)?;
        Ok(x.f_add(&f)?)
    }

    /// Route and mix `x` `(b, t, h)` at model layer `layer`; returns `(b, t, h)`.
    pub fn forward(&self, layer: usize, x: &Tensor, tokens: &TokenInfo, ctx: &mut ForwardCtx<'_>) -> Result<Tensor> {
        let size = x.size();
        let h = size[size.len() - 1];
        let xf = x.f_reshape([-1, h])?; // (n, h)
        let n = xf.size()[0];
        let m = self.mixing.get(ctx.renormalize);
        // Plain top-k, or a policy's batch split, at decode sizes: the routing runs inside the fused
        // kernels too (no probs or ids tensors; nothing to trace).
        if let Some(routing) = self.in_kernel_routing(layer, &xf, tokens, ctx) {
            let out = self.experts.forward_fused(&xf, routing, self.shared()).ctx(format!("layers.{layer}.mlp (fused routing)"))?;
            return self.add_unfused_shared(layer, &xf, out)?.f_reshape(&size).ctx("moe");
        }
        let probs = {
            let _span = tracing::trace_span!("moe.route", layer).entered();
            self.router_probs(&xf).ctx(format!("layers.{layer}.mlp.gate"))?
        };
        let batch = DeviceBatch { probs: &probs, mask: tokens.mask.as_ref(), seq_ids: Some(&tokens.seq_ids) };
        let ids = ctx.policy.select(layer, &batch).map_err(|source| Error::Policy { layer, source })?; // (n, w)
        let fused = self.experts.resolve(ctx.dispatch, &xf, ids.numel() as i64) == Dispatch::Fused;
        let out = if fused {
            // The kernels make the mixing weights from the probabilities and add the shared expert.
            let mix = MixWeights::Router { probs: &probs, renormalize: m.renormalize, scale: m.scale };
            let out = self.experts.forward_fused(&xf, Routing::Chosen { ids: &ids, mix }, self.shared()).ctx(format!("layers.{layer}.mlp (fused)"))?;
            self.add_unfused_shared(layer, &xf, out)?
        } else {
            let weights = mixing_weights(&probs, &ids, ctx.renormalize, &self.mixing).ctx(format!("layers.{layer}.mlp.mixing"))?;
            let bound = ctx.policy.max_pairs(layer, n as usize);
            let out = self.experts.forward(&xf, &ids, &weights, ctx.dispatch, Some(bound)).ctx(format!("layers.{layer}.mlp.experts"))?;
            self.add_shared(layer, &xf, out)?
        };
        if let Some(trace) = ctx.trace.as_deref_mut() {
            trace.layers.push(LayerRoute { layer, probs, ids, mask: tokens.mask.as_ref().map(|m| m.shallow_clone()) });
        }
        out.f_reshape(&size).ctx("moe")
    }
}

/// Reject a native top-k outside `1..=e` experts, naming `key` (the family's `num_experts_per_tok`).
pub fn check_top_k(key: &str, k: usize, e: usize) -> Result<()> {
    if k == 0 || k > e {
        return Err(Error::config(key, format!("{k} is outside 1..={e}")));
    }
    Ok(())
}

/// The Qwen MoE families' layer rule (transformers' `Qwen2MoeDecoderLayer`, `Qwen3MoeDecoderLayer`): layer
/// `i` is MoE iff it is not in `mlp_only_layers`, `num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`
/// (a step of 0, which `validate` rejects, counts as 1).
pub fn is_sparse_layer(i: usize, mlp_only_layers: &[usize], num_experts: usize, decoder_sparse_step: usize) -> bool {
    !mlp_only_layers.contains(&i) && num_experts > 0 && (i + 1) % decoder_sparse_step.max(1) == 0
}

/// Mixing weights `(n, w)` f32: the probabilities at the chosen ids (`-1` gives 0), renormalised or not,
/// scaled, as the family's table says for option `r`.
pub fn mixing_weights(probs: &Tensor, ids: &Tensor, r: Renormalize, table: &MixingTable) -> Result<Tensor> {
    let m = table.get(r);
    let mut w = probs.f_gather(1, &ids.f_clamp_min(0)?, false)?.f_masked_fill(&ids.f_lt(0)?, 0.0)?;
    if m.renormalize {
        let denom = w.f_sum_dim_intlist(-1, true, Kind::Float)?.f_add_scalar(1e-20)?;
        w = w.f_div(&denom)?;
    }
    if m.scale != 1.0 {
        w = w.f_mul_scalar(m.scale)?;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experts(e: i64, h: i64, i: i64) -> Experts {
        Experts {
            gate_up_proj: Tensor::randn([e, 2 * i, h], (Kind::Float, Device::Cpu)),
            down_proj: Tensor::randn([e, h, i], (Kind::Float, Device::Cpu)),
            num_experts: e,
        }
    }

    #[test]
    fn grouped_and_per_expert_dispatch_agree_and_ignore_empty_slots() {
        tch::manual_seed(0);
        let ex = experts(5, 16, 8);
        let x = Tensor::randn([4, 16], (Kind::Float, Device::Cpu));
        let ids = Tensor::from_slice(&[3i64, 0, -1, 4, 2, 1, -1, -1, -1, 0, 1, 3]).reshape([4, 3]);
        let w = Tensor::rand([4, 3], (Kind::Float, Device::Cpu));
        let a = ex.forward(&x, &ids, &w, Dispatch::Grouped, None).expect("grouped");
        let b = ex.forward(&x, &ids, &w, Dispatch::PerExpert, None).expect("per expert");
        // The exact bound on the chosen pairs (8 of 12 slots) gives the same result; a zero bound, zeros.
        let c = ex.forward(&x, &ids, &w, Dispatch::Grouped, Some(8)).expect("bounded");
        assert!(a.allclose(&c, 1e-6, 1e-6, false));
        let z = ex.forward(&x, &ids, &w, Dispatch::Grouped, Some(0)).expect("zero bound");
        assert_eq!(z.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(a.allclose(&b, 1e-5, 1e-5, false), "{a} vs {b}");
        // Token 2 has no experts at all: exact zeros.
        assert_eq!(a.get(2).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // A direct evaluation of token 0.
        let mut r = Tensor::zeros([16], (Kind::Float, Device::Cpu));
        for (slot, j) in [(0i64, 3i64), (1, 0)] {
            let gu = ex.gate_up_proj.get(j).matmul(&x.get(0));
            let act = gu.narrow(0, 0, 8).silu() * gu.narrow(0, 8, 8);
            r += ex.down_proj.get(j).matmul(&act) * w.get(0).get(slot);
        }
        assert!(a.get(0).allclose(&r, 1e-4, 1e-4, false));
    }

    #[test]
    fn mixing_renormalises_and_scales_as_the_table_says() {
        let probs = Tensor::from_slice(&[0.5f32, 0.3, 0.2]).reshape([1, 3]);
        let ids = Tensor::from_slice(&[0i64, 2, -1]).reshape([1, 3]);
        let table = MixingTable {
            native: Mixing { renormalize: false, scale: 2.0 },
            always: Mixing { renormalize: true, scale: 1.0 },
            never: Mixing { renormalize: false, scale: 2.0 },
        };
        let v = |r| Vec::<f32>::try_from(mixing_weights(&probs, &ids, r, &table).expect("w").reshape([-1])).expect("v");
        assert_eq!(v(Renormalize::Native), vec![1.0, 0.4, 0.0]);
        let a = v(Renormalize::Always);
        assert!((a[0] - 0.5 / 0.7).abs() < 1e-6 && (a[1] - 0.2 / 0.7).abs() < 1e-6 && a[2] == 0.0);
    }
}
