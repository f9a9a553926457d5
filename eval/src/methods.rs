//! The methods a sweep compares, and how each turns an activation budget into a routing policy.
//!
//! | method | policy at budget B (activations per token over L MoE layers) |
//! |---|---|
//! | `full` | native top-K everywhere (the reference; budget 1.0 only) |
//! | `uniform` | top-k per layer from Alloc-L's uniform baseline (B/L each, remainder to the first layers) |
//! | `alloc-l` | top-k per layer from the exact DP on the sensitivity profile |
//! | `alloc-t` | Alloc-T with K_l = B/L in every layer (token redistribution only) |
//! | `alloc-l+t` | Alloc-T with a fractional K_l per layer: the DP on a 1/8-expert grid, the profile's loss interpolated over the router mass Alloc-T keeps (`alloc_layer::fractional`) |
//! | `lexi` | top-k per layer from the DP on the data-free LExI-style profile (`crate::lexi`) |
//! | `random-l` | top-k per layer from a seeded random allocation (ablation) |
//! | `greedy-l` | top-k per layer from the greedy marginal-gain allocation |
//! | `top-p` | nucleus routing, p calibrated so the replayed full-model trace uses B |
//! | `threshold` | probability threshold tau, calibrated likewise |
//! | `skip` | NAEE-style skip (drop p_j < beta p_top1), beta calibrated likewise |
//!
//! Calibrated methods are tuned offline on the full model's recorded router probabilities (host
//! reference policies, replayed across layers in parallel); their *realized* activations are measured
//! in the actual run and recorded, since later layers see different inputs once earlier layers change.

use alloc_core::routing::{RouterBatch, RoutingPolicy};
use alloc_core::LayerAllocation;
use alloc_layer::baselines::{greedy, random, uniform};
use alloc_layer::{solve_dp, solve_fractional, LayerMass, Problem, Solution};
use alloc_token::device::DevicePolicy;
use alloc_token::{AllocT, MassCurve, PerLayerTopK, Skip, Threshold, TopK, TopP};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;

/// A method name from the table above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// Native top-K.
    Full,
    /// Uniform per-layer k.
    Uniform,
    /// Alloc-L (DP).
    AllocL,
    /// Alloc-T at uniform K_l.
    AllocT,
    /// Alloc-L+T.
    AllocLT,
    /// Random per-layer allocation.
    RandomL,
    /// Greedy per-layer allocation.
    GreedyL,
    /// Calibrated top-p.
    TopP,
    /// Calibrated threshold.
    Threshold,
    /// Calibrated NAEE-style skip.
    Skip,
    /// DP on the data-free LExI-style profile.
    Lexi,
}

impl Method {
    /// Every method, in plotting order.
    pub const ALL: [Method; 11] = [
        Method::Full,
        Method::Uniform,
        Method::AllocL,
        Method::AllocT,
        Method::AllocLT,
        Method::RandomL,
        Method::GreedyL,
        Method::Lexi,
        Method::TopP,
        Method::Threshold,
        Method::Skip,
    ];

    /// The name used on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Uniform => "uniform",
            Method::AllocL => "alloc-l",
            Method::AllocT => "alloc-t",
            Method::AllocLT => "alloc-l+t",
            Method::RandomL => "random-l",
            Method::GreedyL => "greedy-l",
            Method::TopP => "top-p",
            Method::Threshold => "threshold",
            Method::Skip => "skip",
            Method::Lexi => "lexi",
        }
    }

    /// Whether the method needs a sensitivity profile.
    pub fn needs_profile(self) -> bool {
        matches!(self, Method::AllocL | Method::AllocLT | Method::GreedyL)
    }

    /// Whether the method needs the data-free LExI-style profile.
    pub fn needs_lexi_profile(self) -> bool {
        self == Method::Lexi
    }

    /// Whether the method's policy is per-layer top-k with its allocation as the only parameter (two
    /// such points with equal allocations route every token identically).
    pub fn is_per_layer_top_k(self) -> bool {
        matches!(self, Method::Uniform | Method::AllocL | Method::RandomL | Method::GreedyL | Method::Lexi)
    }

    /// Whether the method is tuned on the recorded full-model routing (Alloc-L+T: its retained-mass
    /// curves).
    pub fn needs_calibration_trace(self) -> bool {
        matches!(self, Method::TopP | Method::Threshold | Method::Skip | Method::AllocLT)
    }
}

impl std::str::FromStr for Method {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL.into_iter().find(|m| m.as_str() == s).with_context(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
            format!("unknown method {s:?}; known methods: {}", names.join(", "))
        })
    }
}

/// Facts about the model a method needs.
#[derive(Debug, Clone)]
pub struct ModelShape {
    /// MoE layer indices.
    pub moe_layers: Vec<usize>,
    /// Native experts per token.
    pub native_k: usize,
    /// Routed experts per layer.
    pub experts: usize,
}

impl ModelShape {
    /// Native k times the number of MoE layers.
    pub fn full_budget(&self) -> u32 {
        (self.native_k * self.moe_layers.len()) as u32
    }
}

/// What determines a point's routing completely, for methods where that is the policy kind and the
/// per-layer allocation (per-layer top-k; see [`Method::is_per_layer_top_k`]); `None` for the others
/// (token-level and calibrated policies, and `full`, which is evaluated once anyway). Points of one model
/// and task with equal keys run the same computation, so the sweep evaluates the first and shares its
/// results with the others.
pub fn routing_key(method: Method, allocation: Option<&[f64]>) -> Option<String> {
    let a = allocation.filter(|_| method.is_per_layer_top_k())?;
    Some(format!("per-layer-top-k {a:?}"))
}

/// One layer's recorded router probabilities on the host: row-major `[tokens, experts]`.
#[derive(Debug, Clone)]
pub struct HostRoute {
    /// The model's layer index.
    pub layer: usize,
    /// Probabilities.
    pub probs: Vec<f32>,
    /// Tokens.
    pub tokens: usize,
}

/// A built policy and what the sweep records about it.
pub struct Built {
    /// The routing policy to run.
    pub policy: Box<dyn DevicePolicy>,
    /// k (or mean K_l) per MoE layer, if the method has a per-layer allocation.
    pub allocation: Option<Vec<f64>>,
    /// The profile's predicted loss for the allocation.
    pub predicted_delta: Option<f64>,
    /// Method parameters (calibrated p / tau / beta, seeds), recorded with the result.
    pub params: serde_json::Value,
}

/// Grid steps per expert of Alloc-L+T's fractional allocation (K_l in multiples of 1/8).
pub const FRACTIONAL_STEPS: u32 = 8;

/// What the methods of one model are built from (each part only when some method needs it).
#[derive(Default)]
pub struct Inputs<'a> {
    /// The allocation problem of the text-calibrated profile.
    pub problem: Option<&'a Problem>,
    /// The allocation problem of the data-free LExI-style profile.
    pub lexi: Option<&'a Problem>,
    /// The full model's recorded routing on the calibration text.
    pub trace: Option<&'a [HostRoute]>,
    /// Per MoE layer, the router mass top-k and Alloc-T keep on that routing ([`mass_curves`]).
    pub mass: Option<&'a [LayerMass]>,
    /// Seed of random allocations.
    pub seed: u64,
}

/// Build `method`'s policy at `budget` total activations per token.
pub fn build(method: Method, budget: u32, shape: &ModelShape, inputs: &Inputs<'_>) -> Result<Built> {
    let (problem, trace, seed) = (inputs.problem, inputs.trace, inputs.seed);
    let k = shape.native_k;
    let layers = shape.moe_layers.clone();
    let per_layer = |sol: Solution| -> Result<Built> {
        let alloc = sol.allocation.clone();
        Ok(Built {
            allocation: Some(alloc.k.iter().map(|&k| f64::from(k)).collect()),
            predicted_delta: Some(sol.predicted_delta),
            params: serde_json::json!({"k_per_layer": alloc.k}),
            policy: Box::new(PerLayerTopK::new(alloc)),
        })
    };
    let need_problem = || problem.context("this method needs a sensitivity profile");
    let uniform_problem = || -> Result<Problem> {
        // A flat profile (zero deltas, k = 0..=K) lets the baseline allocators run without a profile.
        let flat = alloc_core::SensitivityProfile {
            schema_version: alloc_core::SCHEMA_VERSION,
            model: "flat".into(),
            metric: "none".into(),
            full_k: k as u32,
            layers: layers
                .iter()
                .map(|&l| alloc_core::LayerProfile { layer: l, k: (1..=k as u32).collect(), delta: vec![0.0; k] })
                .collect(),
            calibration: None,
        };
        Ok(Problem::from_profile(&flat, alloc_layer::KBounds::default())?)
    };
    let predicted = |alloc: &LayerAllocation| -> Option<f64> {
        problem.and_then(|p| {
            p.layers
                .iter()
                .zip(&alloc.k)
                .map(|(lc, &k)| lc.k.iter().position(|&x| x == k).map(|i| lc.delta[i]))
                .sum::<Option<f64>>()
        })
    };
    Ok(match method {
        Method::Full => Built {
            policy: Box::new(TopK::new(k)),
            allocation: Some(vec![k as f64; layers.len()]),
            predicted_delta: Some(0.0),
            params: serde_json::json!({"k": k}),
        },
        Method::Uniform => {
            let mut b = per_layer(uniform(&uniform_problem()?, budget)?)?;
            b.predicted_delta = predicted(&LayerAllocation::new(layers.clone(), b.allocation.as_ref().map(|a| a.iter().map(|&x| x as u32).collect()).unwrap_or_default())?);
            b
        }
        Method::AllocL => per_layer(solve_dp(need_problem()?, budget)?)?,
        Method::Lexi => {
            let mut b = per_layer(solve_dp(inputs.lexi.context("lexi needs the LExI-style profile")?, budget)?)?;
            // Report the text profile's prediction (comparable with the other methods), if there is one.
            b.predicted_delta = b
                .allocation
                .as_ref()
                .and_then(|a| LayerAllocation::new(layers.clone(), a.iter().map(|&x| x as u32).collect()).ok())
                .and_then(|a| predicted(&a));
            b
        }
        Method::GreedyL => per_layer(greedy(need_problem()?, budget)?)?,
        Method::RandomL => {
            let mut b = per_layer(random(&uniform_problem()?, budget, seed)?)?;
            b.predicted_delta = predicted(&LayerAllocation::new(layers.clone(), b.allocation.as_ref().map(|a| a.iter().map(|&x| x as u32).collect()).unwrap_or_default())?);
            b
        }
        Method::AllocT => {
            let k_avg = f64::from(budget) / layers.len() as f64;
            if k_avg < 1.0 {
                bail!("alloc-t needs at least one expert per token per layer (floor 1); budget {budget} gives {k_avg:.3}");
            }
            Built {
                policy: Box::new(AllocT::new(k_avg.min(k as f64), k)),
                allocation: Some(vec![k_avg.min(k as f64); layers.len()]),
                predicted_delta: None,
                params: serde_json::json!({"k_avg": k_avg, "floor": 1, "cap": k}),
            }
        }
        Method::AllocLT => {
            let mass = inputs.mass.context("alloc-l+t needs the retained-mass curves of the recorded routing")?;
            let sol = solve_fractional(need_problem()?, mass, FRACTIONAL_STEPS, budget)?;
            Built {
                allocation: Some(sol.k.clone()),
                predicted_delta: Some(sol.predicted_delta),
                params: serde_json::json!({"k_per_layer": sol.k, "steps_per_expert": FRACTIONAL_STEPS, "floor": 1, "cap": k,
                    "predicted_delta_is": "estimate: profile loss interpolated over Alloc-T's retained router mass"}),
                policy: Box::new(AllocT::per_layer(sol.layers, sol.k, k)),
            }
        }
        Method::TopP | Method::Threshold | Method::Skip => {
            let trace = trace.context("calibrated methods need the full model's recorded routing")?;
            let target = f64::from(budget);
            let (param, realized) = calibrate(method, trace, shape, target)?;
            let policy: Box<dyn DevicePolicy> = make_calibrated(method, param, k);
            Built {
                policy,
                allocation: None,
                predicted_delta: None,
                params: serde_json::json!({"param": param, "replayed_activations_per_token": realized}),
            }
        }
    })
}

fn make_calibrated(method: Method, param: f64, k: usize) -> Box<dyn DevicePolicy> {
    match method {
        Method::TopP => Box::new(TopP::new(param, 1, k)),
        Method::Threshold => Box::new(Threshold::new(param as f32, 1, k)),
        _ => Box::new(Skip::new(param as f32, k)),
    }
}

fn make_host(method: Method, param: f64, k: usize) -> Box<dyn RoutingPolicy> {
    match method {
        Method::TopP => Box::new(TopP::new(param, 1, k)),
        Method::Threshold => Box::new(Threshold::new(param as f32, 1, k)),
        _ => Box::new(Skip::new(param as f32, k)),
    }
}

/// Mean routed activations per token summed over layers when `policy` replays `trace` (host reference,
/// layers in parallel).
pub fn replay_activations(policy: &dyn RoutingPolicy, trace: &[HostRoute], experts: usize) -> Result<f64> {
    let per_layer: Vec<f64> = trace
        .par_iter()
        .map(|r| -> Result<f64> {
            let batch = RouterBatch::new(&r.probs, r.tokens, experts)?;
            let sel = policy.select(r.layer, &batch)?;
            Ok(sel.total() as f64 / r.tokens.max(1) as f64)
        })
        .collect::<Result<_>>()?;
    Ok(per_layer.iter().sum())
}

/// Per MoE layer of `problem`, the router mass top-k and Alloc-T (floor 1, cap K) keep on the recorded
/// routing, at [`FRACTIONAL_STEPS`] grid points per expert (layers in parallel).
pub fn mass_curves(problem: &Problem, trace: &[HostRoute], shape: &ModelShape) -> Result<Vec<LayerMass>> {
    problem
        .layers
        .par_iter()
        .map(|lc| -> Result<LayerMass> {
            let r = trace.iter().find(|r| r.layer == lc.layer).with_context(|| format!("no recorded routing of layer {}", lc.layer))?;
            let batch = RouterBatch::new(&r.probs, r.tokens, shape.experts)?;
            let c = MassCurve::measure(lc.layer, &batch, 1, shape.native_k, FRACTIONAL_STEPS)?;
            Ok(LayerMass { topk: c.topk, spread: c.spread, floor: 1 })
        })
        .collect()
}

/// Bisect the method's parameter in [0, 1] so the replayed activations per token come closest to
/// `target` (top-p: more mass = more experts; threshold and skip: a higher cut = fewer experts).
fn calibrate(method: Method, trace: &[HostRoute], shape: &ModelShape, target: f64) -> Result<(f64, f64)> {
    let increasing = method == Method::TopP;
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let eval = |p: f64| replay_activations(make_host(method, p, shape.native_k).as_ref(), trace, shape.experts);
    // Take the parameter whose activations come closest to the target without exceeding it; when
    // nothing fits (the one-expert floor already exceeds the budget) the point fails.
    let mut under: Option<(f64, f64)> = None;
    let mut closest = (0.0f64, f64::INFINITY, 0.0f64);
    for _ in 0..30 {
        let mid = 0.5 * (lo + hi);
        let acts = eval(mid)?;
        if acts <= target + 1e-9 && under.is_none_or(|(_, a)| acts > a) {
            under = Some((mid, acts));
        }
        if (acts - target).abs() < closest.1 {
            closest = (mid, (acts - target).abs(), acts);
        }
        let too_many = acts > target;
        if too_many == increasing {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let Some(best) = under else {
        bail!(
            "{} cannot route as few as {target} activations per token (its floor of one expert per token \
             uses {:.2} on the calibration routing)",
            method.as_str(),
            closest.2
        );
    };
    Ok(best)
}
