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

/// Deterministic softmax router probabilities, row-major `[tokens, experts]`: logits from a fixed
/// integer hash scaled so rows range from peaked to flat (as real routers do).
pub fn synthetic_router_probs(tokens: usize, experts: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens * experts);
    for t in 0..tokens {
        let temperature = 0.5 + (t % 7) as f32 * 0.5;
        let logits: Vec<f32> = (0..experts)
            .map(|e| {
                let h = (t as u64 * 2_654_435_761 + e as u64 * 40_503).wrapping_mul(0x9e37_79b9) >> 40;
                (h % 1000) as f32 / 1000.0 * 4.0 / temperature
            })
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        out.extend(logits.iter().map(|l| (l - max).exp() / z));
    }
    out
}
