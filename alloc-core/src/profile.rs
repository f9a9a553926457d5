//! The sensitivity profile: for each MoE layer and each profiled k, how much quality is lost when only
//! that layer runs top-k (every other layer at its full k). Alloc-L's input.
//!
//! The JSON format is stable and documented in the README:
//!
//! ```json
//! {"schema_version": 1, "model": "name", "metric": "delta_nll", "full_k": 6,
//!  "layers": [{"layer": 1, "k": [1, 2, 3, 4, 5, 6], "delta": [0.9, 0.41, 0.2, 0.08, 0.02, 0.0]}]}
//! ```
//!
//! `layer` is the model's layer index (MoE layers only); `k` lists the profiled k values (not necessarily
//! contiguous: a solver chooses only among them); `delta[i]` is the loss increase at `k[i]`. Deltas may
//! be negative or non-monotone in k: measured losses are noisy. Unknown extra fields are allowed.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::SCHEMA_VERSION;

/// Where the calibration text came from, so a profile can be traced to its data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Source of the text (file path or data-set name).
    #[serde(default)]
    pub source: String,
    /// Number of tokens scored per (layer, k) point.
    #[serde(default)]
    pub tokens: u64,
    /// Sequence length used for scoring.
    #[serde(default)]
    pub seq_len: u64,
    /// sha256 of the calibration text, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Mean NLL of the full model on the calibration text (the reference the deltas are relative to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_nll: Option<f64>,
}

/// One MoE layer's measured sensitivity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerProfile {
    /// The model's layer index (not the index among MoE layers).
    pub layer: usize,
    /// The profiled k values, strictly increasing.
    pub k: Vec<u32>,
    /// `delta[i]` is the quality loss (e.g. mean NLL increase) at `k[i]`.
    pub delta: Vec<f64>,
}

impl LayerProfile {
    /// The loss at `k`, if `k` was profiled.
    pub fn delta_at(&self, k: u32) -> Option<f64> {
        self.k.iter().position(|&x| x == k).map(|i| self.delta[i])
    }
}

/// A whole model's sensitivity profile (see the module docs for the JSON format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityProfile {
    /// Format version; this build reads [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Model identifier (name or path).
    #[serde(default)]
    pub model: String,
    /// What `delta` measures: `delta_nll` (mean NLL increase), `kl` (KL to the full model), or
    /// `output_deviation` (a data-free proxy).
    #[serde(default = "default_metric")]
    pub metric: String,
    /// The model's native top-k (the k every layer uses at full budget).
    pub full_k: u32,
    /// One entry per MoE layer, in the model's layer order.
    pub layers: Vec<LayerProfile>,
    /// Where the calibration text came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibration>,
}

fn default_metric() -> String {
    "delta_nll".to_string()
}

impl SensitivityProfile {
    /// Parse and validate a profile from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let p: Self = serde_json::from_str(text)
            .map_err(|source| Error::Json { what: "sensitivity profile", source })?;
        p.validate()?;
        Ok(p)
    }

    /// Serialise to pretty JSON.
    pub fn to_json(&self) -> String {
        // INVARIANT: plain data with string keys and finite-or-not floats; serde_json cannot fail here
        // except for non-finite floats, which `validate` rejects before a profile is ever written.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Check the format's invariants: known schema version, at least one layer, no duplicate layers,
    /// each layer's `k` strictly increasing, within 1..=full_k... (k = 0 is allowed: "skip the routed
    /// experts"), as many deltas as k values, and every delta finite.
    pub fn validate(&self) -> Result<()> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(Error::SchemaVersion {
                what: "sensitivity profile",
                found: self.schema_version,
                expected: SCHEMA_VERSION,
            });
        }
        if self.full_k == 0 {
            return Err(Error::InvalidProfile("full_k must be at least 1".into()));
        }
        if self.layers.is_empty() {
            return Err(Error::InvalidProfile("the profile has no layers".into()));
        }
        let mut seen = BTreeSet::new();
        for lp in &self.layers {
            let l = lp.layer;
            if !seen.insert(l) {
                return Err(Error::InvalidProfile(format!("layer {l} appears more than once")));
            }
            if lp.k.is_empty() {
                return Err(Error::InvalidProfile(format!("layer {l} lists no k values")));
            }
            if lp.k.len() != lp.delta.len() {
                return Err(Error::InvalidProfile(format!(
                    "layer {l} has {} k values but {} deltas",
                    lp.k.len(),
                    lp.delta.len()
                )));
            }
            if lp.k.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::InvalidProfile(format!(
                    "layer {l}: k values must be strictly increasing, got {:?}",
                    lp.k
                )));
            }
            if let Some(&k) = lp.k.iter().find(|&&k| k > self.full_k) {
                return Err(Error::InvalidProfile(format!(
                    "layer {l}: k = {k} is above full_k = {}",
                    self.full_k
                )));
            }
            if let Some(i) = lp.delta.iter().position(|d| !d.is_finite()) {
                return Err(Error::InvalidProfile(format!(
                    "layer {l}: delta at k = {} is {} (must be finite)",
                    lp.k[i], lp.delta[i]
                )));
            }
        }
        Ok(())
    }

    /// The model's full budget: `full_k` times the number of MoE layers.
    pub fn full_budget(&self) -> u32 {
        self.full_k.saturating_mul(self.layers.len() as u32)
    }

    /// The model layer indices, in profile order.
    pub fn layer_indices(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.layer).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"schema_version": 1, "model": "name", "metric": "delta_nll", "full_k": 6,
        "layers": [{"layer": 1, "k": [1, 2, 3, 4, 5, 6], "delta": [0.9, 0.41, 0.2, 0.08, 0.02, 0.0]}],
        "extra": "ignored"}"#;

    #[test]
    fn readme_example_parses() {
        let p = SensitivityProfile::from_json(EXAMPLE).unwrap();
        assert_eq!(p.full_budget(), 6);
        assert_eq!(p.layers[0].delta_at(3), Some(0.2));
        assert_eq!(p.layers[0].delta_at(7), None);
    }

    #[test]
    fn broken_profiles_are_rejected_with_the_layer_named() {
        let cases = [
            (r#"{"schema_version": 2, "full_k": 6, "layers": []}"#, "schema_version"),
            (r#"{"schema_version": 1, "full_k": 6, "layers": []}"#, "no layers"),
            (
                r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 3, "k": [1], "delta": [0.1]},
                   {"layer": 3, "k": [1], "delta": [0.2]}]}"#,
                "layer 3 appears more than once",
            ),
            (r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 2, "k": [2, 1], "delta": [0, 0]}]}"#, "increasing"),
            (r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 2, "k": [1, 7], "delta": [0, 0]}]}"#, "above full_k"),
            (r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 2, "k": [1, 2], "delta": [0]}]}"#, "deltas"),
            (r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 2, "k": [1], "delta": ["x"]}]}"#, "cannot parse"),
            (r#"{"schema_version": 1, "full_k": 6, "layers": [{"layer": 2, "k": [1], "delta": [1e999]}]}"#, ""),
            (r#"{"schema_version": 1, "full_k": 6"#, "cannot parse"),
        ];
        for (text, needle) in cases {
            let err = SensitivityProfile::from_json(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
