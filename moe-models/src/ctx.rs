//! The per-forward context: routing policy, padding mask, KV cache, mixing option, routing trace.

use alloc_token::device::DevicePolicy;
use tch::Tensor;

use crate::cache::KvCache;

/// How the chosen experts' router probabilities become mixing weights when a policy picks a different
/// number of experts than the model was trained with. Recorded in results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Renormalize {
    /// The family's own rule (DeepSeek-V2: renormalise iff `norm_topk_prob`; Mixtral: always).
    #[default]
    Native,
    /// Renormalise the chosen experts' probabilities to sum to one.
    Always,
    /// Use the raw probabilities (times the family's scaling factor, if any).
    Never,
}

impl std::str::FromStr for Renormalize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Self::Native),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => Err(format!("unknown renormalize option `{other}` (native, always, never)")),
        }
    }
}

/// How routed experts are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// `Fused` on CUDA in bf16 for a few tokens, `Grouped` on CUDA in bf16 otherwise; `PerExpert` otherwise (on the CPU the two measured alike, see
    /// `examples/dispatch_cpu.rs`).
    #[default]
    Auto,
    /// Sort (token, expert) pairs by expert and run `_grouped_mm` over the stacked expert weights: no
    /// host synchronisation, CUDA-graph friendly.
    Grouped,
    /// Copy the chosen ids to the host, group tokens by expert, one matmul pair per non-empty expert.
    PerExpert,
    /// Two run-time compiled CUDA kernels reading the chosen experts' rows straight from the stacked
    /// weights (CUDA bf16, at most [`crate::kernels::FUSED_MOE_MAX_PAIRS`] token-slot pairs; see
    /// [`crate::kernels`]). `Auto` takes it where it applies.
    Fused,
}

impl std::str::FromStr for Dispatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "grouped" => Ok(Self::Grouped),
            "per-expert" => Ok(Self::PerExpert),
            "fused" => Ok(Self::Fused),
            other => Err(format!("unknown dispatch `{other}` (auto, grouped, per-expert, fused)")),
        }
    }
}

/// How multi-head latent attention (DeepSeek) is evaluated; other families ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaPath {
    /// Expanded for a prefill without history, absorbed when attending to cached tokens.
    #[default]
    Auto,
    /// Decompress the latent into per-head keys and values (`kv_b_proj`), as transformers does.
    Expanded,
    /// Attend in the latent space: `kv_b_proj`'s key part folded into the query, its value part applied
    /// after attention.
    Absorbed,
}

/// One MoE layer's routing in one forward pass.
#[derive(Debug)]
pub struct LayerRoute {
    /// The model's layer index.
    pub layer: usize,
    /// `(n, e)` f32: exactly what the policy was handed (after group limiting, where the family has it),
    /// for `n = b * t` tokens in row-major `(b, t)` order.
    pub probs: Tensor,
    /// `(n, w)` i64: the policy's choice, `-1` padded.
    pub ids: Tensor,
    /// `(n)` bool: false for padding tokens. `None`: all valid.
    pub mask: Option<Tensor>,
}

/// A record of every MoE layer's routing, appended to by each forward pass, in layer order. Tensors
/// stay on the model's device (no host sync); drain them with [`RoutingTrace::take`].
#[derive(Debug, Default)]
pub struct RoutingTrace {
    /// The recorded layers.
    pub layers: Vec<LayerRoute>,
}

impl RoutingTrace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remove and return everything recorded so far.
    pub fn take(&mut self) -> Vec<LayerRoute> {
        std::mem::take(&mut self.layers)
    }
}

/// Everything one forward pass needs besides the token ids. Build with [`ForwardCtx::new`] and the
/// `with_*` methods; the model reads it and updates the cache and trace.
pub struct ForwardCtx<'a> {
    /// Picks the experts of every MoE layer.
    pub policy: &'a dyn DevicePolicy,
    /// `(b, t)` bool or integer, true/1 for real tokens, false/0 for padding, for the tokens of this
    /// call. Left and right padding both work: each sequence's real tokens get positions 0, 1, 2, ...
    /// in order (continuing from the cache), padding keys are masked, padding tokens get no experts.
    /// `None`: all real.
    pub mask: Option<&'a Tensor>,
    /// Incremental decoding state; `None` for a stateless forward.
    pub cache: Option<&'a mut KvCache>,
    /// Mixing rule for the chosen experts.
    pub renormalize: Renormalize,
    /// Where to record routing, if anywhere.
    pub trace: Option<&'a mut RoutingTrace>,
    /// Expert evaluation strategy.
    pub dispatch: Dispatch,
    /// MLA evaluation path (DeepSeek).
    pub mla: MlaPath,
    /// Fold the layers' RMSNorms and residual adds into the run-time compiled kernels of few-token
    /// steps on CUDA bf16 (`crate::kernels`: projections, fused MoE), where they apply. Default true;
    /// false keeps them as libtorch ops (the reference the fused path is checked against).
    pub fuse_decode: bool,
}

impl std::fmt::Debug for ForwardCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardCtx")
            .field("policy", &self.policy.name())
            .field("mask", &self.mask.is_some())
            .field("cache", &self.cache.as_ref().map(|c| c.len()))
            .field("renormalize", &self.renormalize)
            .field("trace", &self.trace.is_some())
            .field("dispatch", &self.dispatch)
            .field("mla", &self.mla)
            .field("fuse_decode", &self.fuse_decode)
            .finish()
    }
}

impl<'a> ForwardCtx<'a> {
    /// A context with `policy`, no mask, no cache, native mixing, no trace, automatic dispatch.
    pub fn new(policy: &'a dyn DevicePolicy) -> Self {
        Self {
            policy,
            mask: None,
            cache: None,
            renormalize: Renormalize::Native,
            trace: None,
            dispatch: Dispatch::Auto,
            mla: MlaPath::Auto,
            fuse_decode: true,
        }
    }

    /// The same policy, mixing rule, dispatch, MLA path and fusion, without mask, cache or trace (for a forward
    /// of its own, such as a decode loop built on the caller's settings).
    pub fn settings(&self) -> ForwardCtx<'a> {
        ForwardCtx { policy: self.policy, mask: None, cache: None, renormalize: self.renormalize, trace: None, dispatch: self.dispatch, mla: self.mla, fuse_decode: self.fuse_decode }
    }

    /// Set the padding mask.
    pub fn with_mask(mut self, mask: &'a Tensor) -> Self {
        self.mask = Some(mask);
        self
    }

    /// Use and update a KV cache.
    pub fn with_cache(mut self, cache: &'a mut KvCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Set the mixing rule.
    pub fn with_renormalize(mut self, r: Renormalize) -> Self {
        self.renormalize = r;
        self
    }

    /// Record routing into `trace`.
    pub fn with_trace(mut self, trace: &'a mut RoutingTrace) -> Self {
        self.trace = Some(trace);
        self
    }

    /// Set the expert dispatch strategy.
    pub fn with_dispatch(mut self, d: Dispatch) -> Self {
        self.dispatch = d;
        self
    }

    /// Set the MLA path.
    pub fn with_mla(mut self, m: MlaPath) -> Self {
        self.mla = m;
        self
    }

    /// Fold norms and residual adds into the decode kernels or not ([`ForwardCtx::fuse_decode`]).
    pub fn with_fuse_decode(mut self, fuse: bool) -> Self {
        self.fuse_decode = fuse;
        self
    }
}
