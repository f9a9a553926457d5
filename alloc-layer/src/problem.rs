//! The allocation problem (allowed k values and their losses per layer) and its solution.

use alloc_core::{LayerAllocation, SensitivityProfile};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Inclusive bounds on every layer's k. `None` means unbounded on that side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KBounds {
    /// Smallest k any layer may take.
    pub k_min: Option<u32>,
    /// Largest k any layer may take.
    pub k_max: Option<u32>,
}

/// Which allocator produced a solution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Exact dynamic programming (Alloc-L).
    Dp,
    /// Integer linear program (the referee).
    Ilp,
    /// The budget spread evenly.
    Uniform,
    /// Greedy by marginal loss reduction per activation.
    Greedy,
    /// Seeded random spread of the budget.
    Random,
}

impl Method {
    /// The name used on the command line and in results.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Dp => "dp",
            Method::Ilp => "ilp",
            Method::Uniform => "uniform",
            Method::Greedy => "greedy",
            Method::Random => "random",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "dp" => Method::Dp,
            "ilp" => Method::Ilp,
            "uniform" => Method::Uniform,
            "greedy" => Method::Greedy,
            "random" => Method::Random,
            _ => return Err(format!("unknown method {s:?} (expected dp, ilp, uniform, greedy or random)")),
        })
    }
}

/// One layer's allowed choices: k values (increasing) and the loss at each.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerChoices {
    /// The model layer index.
    pub layer: usize,
    /// Allowed k values, strictly increasing.
    pub k: Vec<u32>,
    /// Loss at each k.
    pub delta: Vec<f64>,
}

/// A multiple-choice knapsack instance: one [`LayerChoices`] per MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// The layers, in model order.
    pub layers: Vec<LayerChoices>,
}

impl Problem {
    /// Build the problem from a validated profile, keeping only the k values within `bounds`.
    pub fn from_profile(profile: &SensitivityProfile, bounds: KBounds) -> Result<Self> {
        profile.validate()?;
        let k_min = bounds.k_min.unwrap_or(0);
        let k_max = bounds.k_max.unwrap_or(u32::MAX);
        if k_min > k_max {
            return Err(Error::EmptyBounds { k_min, k_max });
        }
        let layers = profile
            .layers
            .iter()
            .map(|lp| {
                let (k, delta): (Vec<u32>, Vec<f64>) = lp
                    .k
                    .iter()
                    .zip(&lp.delta)
                    .filter(|(&k, _)| k >= k_min && k <= k_max)
                    .map(|(&k, &d)| (k, d))
                    .unzip();
                if k.is_empty() {
                    return Err(Error::NoAllowedK {
                        layer: lp.layer,
                        k_min,
                        k_max: bounds.k_max.unwrap_or(profile.full_k),
                        profiled: lp.k.clone(),
                    });
                }
                Ok(LayerChoices { layer: lp.layer, k, delta })
            })
            .collect::<Result<Vec<_>>>()?;
        // Every allocation's predicted loss is a sum of one delta per layer: if even the sum of the
        // largest magnitudes overflows f64, losses are not comparable (the DP's sums turn infinite).
        let worst: f64 = layers.iter().map(|l| l.delta.iter().fold(0.0f64, |m, d| m.max(d.abs()))).sum();
        if !worst.is_finite() {
            return Err(alloc_core::Error::InvalidProfile(
                "deltas are too large: one per layer, their sum overflows a 64-bit float".into(),
            )
            .into());
        }
        Ok(Self { layers })
    }

    /// Sum over layers of the smallest allowed k: budgets below it are infeasible. Saturates at
    /// `u32::MAX` (k values come from a user's profile; found by fuzz/profile_json).
    pub fn min_total(&self) -> u32 {
        self.layers.iter().fold(0u32, |acc, l| acc.saturating_add(l.k[0]))
    }

    /// Sum over layers of the largest allowed k: budgets above it constrain nothing. Saturates at
    /// `u32::MAX`.
    pub fn max_total(&self) -> u32 {
        self.layers.iter().fold(0u32, |acc, l| acc.saturating_add(l.k[l.k.len() - 1]))
    }

    /// Error unless `budget` is at least [`Self::min_total`].
    pub fn check_feasible(&self, budget: u32) -> Result<()> {
        let min_total = self.min_total();
        if budget < min_total {
            return Err(Error::InfeasibleBudget { budget, min_total });
        }
        Ok(())
    }

    /// Model layer indices in order.
    pub fn layer_indices(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.layer).collect()
    }

    /// Summed loss of choosing `choice[l]` (an index into layer l's options) for every layer.
    pub fn objective(&self, choice: &[usize]) -> f64 {
        self.layers.iter().zip(choice).map(|(l, &i)| l.delta[i]).sum()
    }

    /// Turn per-layer option indices into a [`Solution`].
    pub fn solution(&self, choice: &[usize], budget: u32, method: Method) -> Solution {
        let k: Vec<u32> = self.layers.iter().zip(choice).map(|(l, &i)| l.k[i]).collect();
        Solution {
            allocation: LayerAllocation {
                schema_version: alloc_core::SCHEMA_VERSION,
                layers: self.layer_indices(),
                k,
            },
            predicted_delta: self.objective(choice),
            budget,
            method,
        }
    }
}

/// An allocation with the loss the profile predicts for it (the sum of per-layer deltas).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Solution {
    /// k per MoE layer.
    pub allocation: LayerAllocation,
    /// Sum of the chosen per-layer deltas (assumes losses add up across layers).
    pub predicted_delta: f64,
    /// The budget the allocation was solved for (its total may be lower).
    pub budget: u32,
    /// Which allocator produced it.
    pub method: Method,
}

impl Solution {
    /// Total activations per token of the allocation.
    pub fn total(&self) -> u32 {
        self.allocation.total()
    }
}
