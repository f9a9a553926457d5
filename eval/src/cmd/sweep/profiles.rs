//! The sensitivity profiles of one model in a results directory: the text-calibrated one
//! (`profile-<model>.json` for NLL, `profile-<model>.kl.json` for KL) and the data-free LExI-style one
//! (`lexi-<model>.json`). Each is loaded when present and measured otherwise (the text profile resumes a
//! partial one layer by layer).
//!
//! Two kinds of failure: a profile file that is present but unusable (does not parse, belongs to other
//! layers or another metric) is bad input and stops the sweep before any point runs; a measurement
//! that fails (non-finite loss, out of memory) is returned as [`Measured::Failed`], and only the points
//! of methods that need the profile are recorded as failed.

use std::path::{Path, PathBuf};

use alloc_core::{Calibration, SensitivityProfile};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::model::RunCtx;
use crate::lexi::{measure_lexi_profile, LexiJob};
use crate::methods::ModelShape;
use crate::profiling::{measure_profile, ProfileJob, ProfileMetric};
use crate::results::write_atomic;
use crate::scorer::Scorer;

/// A profile, or why it could not be measured (recorded on the points that need it).
pub enum Measured {
    /// The profile.
    Ok(SensitivityProfile),
    /// The measurement's error chain.
    Failed(String),
}

fn bar(len: usize, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} passes (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}

/// The stored profile at `path`, checked against the model and the expected metric; `None` if absent.
fn load(path: &Path, shape: &ModelShape, metric: &str) -> Result<Option<SensitivityProfile>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let p = SensitivityProfile::from_json(&text).with_context(|| format!("profile {}", path.display()))?;
    if p.layer_indices() != shape.moe_layers || p.full_k != shape.native_k as u32 {
        bail!("{} does not match the model's MoE layers; remove it to re-profile", path.display());
    }
    if p.metric != metric {
        bail!("{} has metric {:?}, expected {metric:?}; remove it to re-profile", path.display(), p.metric);
    }
    Ok(Some(p))
}

/// The file name of a model's text-calibrated profile for `metric`.
fn text_profile_path(out: &Path, name: &str, metric: ProfileMetric) -> (PathBuf, PathBuf) {
    let stem = crate::cmd::plot::sanitize(name);
    let suffix = match metric {
        ProfileMetric::Nll => String::new(),
        ProfileMetric::Kl => ".kl".into(),
    };
    (out.join(format!("profile-{stem}{suffix}.json")), out.join(format!(".profile-{stem}{suffix}.partial.json")))
}

/// Load the text-calibrated profile from the results directory, or measure it (resuming a partial one).
pub fn text_profile(rc: &RunCtx<'_>, name: &str, scorer: &Scorer<'_>, shape: &ModelShape, calib: &[Vec<i64>]) -> Result<Measured> {
    let metric = rc.spec.profile_metric;
    let (path, partial_path) = text_profile_path(rc.out, name, metric);
    if let Some(p) = load(&path, shape, metric.profile_name())? {
        return Ok(Measured::Ok(p));
    }
    let partial = std::fs::read_to_string(&partial_path).ok().and_then(|t| serde_json::from_str::<SensitivityProfile>(&t).ok());
    let ks: Vec<u32> = rc.spec.profile_k.clone();
    let passes = 1 + shape.moe_layers.len() * ks.iter().filter(|&&k| (k as usize) < shape.native_k).count();
    let bar = bar(passes, format!("{name} / profile ({})", metric.profile_name()));
    let job = ProfileJob {
        model: name.to_string(),
        scorer,
        shape,
        calib,
        k_values: ks,
        calibration: Calibration {
            source: rc.spec.heldout.display().to_string(),
            tokens: (calib.len() * calib.first().map_or(0, Vec::len)) as u64,
            seq_len: calib.first().map_or(0, Vec::len) as u64,
            sha256: None,
            reference_nll: None,
        },
        metric,
        passes: Default::default(),
    };
    let measured = measure_profile(&job, partial, |p| write_atomic(&partial_path, p.to_json().as_bytes()), || bar.inc(1));
    bar.finish_and_clear();
    let profile = match measured {
        Ok(p) => p,
        Err(e) => return Ok(Measured::Failed(format!("{e:#}"))),
    };
    write_atomic(&path, profile.to_json().as_bytes())?;
    let _ = std::fs::remove_file(&partial_path);
    Ok(Measured::Ok(profile))
}

/// Load the LExI-style profile from the results directory, or measure it (`calib_tokens` Gaussian
/// vectors per layer, seeded by the spec's seed).
pub fn lexi_profile(rc: &RunCtx<'_>, name: &str, model: &moe_models::Model, shape: &ModelShape) -> Result<Measured> {
    let path = rc.out.join(format!("lexi-{}.json", crate::cmd::plot::sanitize(name)));
    if let Some(p) = load(&path, shape, crate::lexi::METRIC)? {
        return Ok(Measured::Ok(p));
    }
    let job = LexiJob { model: name.to_string(), tokens: rc.spec.calib_tokens, seed: rc.spec.seed, k_values: rc.spec.profile_k.clone(), renormalize: rc.engine.renormalize };
    let bar = bar(crate::lexi::passes(shape, &job.k_values), format!("{name} / lexi profile"));
    let measured = measure_lexi_profile(model, shape, &job, || bar.inc(1));
    bar.finish_and_clear();
    match measured {
        Ok(p) => {
            write_atomic(&path, p.to_json().as_bytes())?;
            Ok(Measured::Ok(p))
        }
        Err(e) => Ok(Measured::Failed(format!("{e:#}"))),
    }
}
