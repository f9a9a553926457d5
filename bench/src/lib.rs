//! Shared input builders for the criterion benches (built outside the timed loops).

use alloc_core::{LayerProfile, SensitivityProfile, SCHEMA_VERSION};

/// A deterministic synthetic profile: `layers` MoE layers, k in 1..=`k_values`, convex decreasing
/// deltas scaled per layer.
pub fn synthetic_profile(layers: usize, k_values: u32) -> SensitivityProfile {
    SensitivityProfile {
        schema_version: SCHEMA_VERSION,
        model: format!("synthetic-{layers}x{k_values}"),
        metric: "delta_nll".into(),
        full_k: k_values,
        layers: (0..layers)
            .map(|l| {
                let scale = 0.5 + ((l * 7919) % 101) as f64 / 100.0;
                LayerProfile {
                    layer: l + 1,
                    k: (1..=k_values).collect(),
                    delta: (1..=k_values)
                        .map(|k| scale * f64::from(k_values - k).powf(1.7) / f64::from(k_values))
                        .collect(),
                }
            })
            .collect(),
        calibration: None,
    }
}
