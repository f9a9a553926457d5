//! `eval profile`: measure a checkpoint's sensitivity profile (Alloc-L's input) and write it as JSON in
//! the format `eval solve` reads. `--source text` (default) measures on calibration text, `--metric nll`
//! (mean NLL increase, default) or `--metric kl` (mean KL to the full model's next-token distribution);
//! resumable: finished layers are kept in `<out>.partial` and reused when the command is run again.
//! `--source lexi` is the data-free LExI-style profile (Gaussian inputs through each MoE layer alone;
//! see `crate::lexi`): no text is read.

use std::path::PathBuf;

use alloc_core::Calibration;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::lexi::{measure_lexi_profile, LexiJob};
use crate::methods::ModelShape;
use crate::profiling::{measure_profile, Passes, ProfileJob, ProfileMetric};
use crate::results::write_atomic;
use crate::scorer::Scorer;
use crate::tasks::text;

/// Arguments of `eval profile`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (UTF-8).
    #[arg(long, default_value = "models/heldout.txt")]
    pub text: PathBuf,
    /// Calibration tokens (from the start of the text).
    #[arg(long, default_value_t = 8192)]
    pub calib_tokens: usize,
    /// Tokens per scored sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Comma-separated k values to profile (k = K is always included with delta 0).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
    pub k: Vec<u32>,
    /// cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Most tokens per forward pass.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// What the text profile measures: nll (mean NLL increase) or kl (mean KL to the full model).
    #[arg(long, value_enum, default_value = "nll")]
    pub metric: ProfileMetric,
    /// Where the sensitivity comes from: text (calibration text) or lexi (data-free Gaussian inputs).
    #[arg(long, value_enum, default_value = "text")]
    pub source: Source,
    /// Gaussian vectors per layer of the LExI-style profile.
    #[arg(long, default_value_t = 8192)]
    pub lexi_tokens: usize,
    /// Seed of the LExI-style profile's Gaussian inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run a whole forward pass per (layer, k) instead of starting each from the cached input of the
    /// profiled layer (the same numbers, more work; a check of the cached passes).
    #[arg(long)]
    pub full_passes: bool,
    /// Output JSON file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Where a profile's sensitivity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Calibration text, one forward pass per layer and k (from the profiled layer on).
    Text,
    /// Data-free: Gaussian inputs through each MoE layer alone (LExI-style).
    Lexi,
}

/// Run `eval profile`.
pub fn run(args: Args) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    let kind = crate::device::parse_kind(&args.dtype)?;
    let model = moe_models::load(&args.model, device, kind)?;
    let tokenizer = crate::cmd::sweep::load_tokenizer(&args.model)?;
    let info = model.info().clone();
    let shape = ModelShape { moe_layers: info.moe_layers.clone(), native_k: info.native_k, experts: info.n_routed_experts };
    let name = crate::cmd::sweep::model_name(&args.model);
    if args.source == Source::Lexi {
        if args.metric != ProfileMetric::Nll {
            anyhow::bail!("--metric applies to --source text; the LExI-style profile measures output deviation");
        }
        let job = LexiJob { model: name, tokens: args.lexi_tokens, seed: args.seed, k_values: args.k.clone(), renormalize: Default::default() };
        let bar = ProgressBar::new(crate::lexi::passes(&shape, &args.k) as u64);
        let profile = measure_lexi_profile(&model, &shape, &job, || bar.inc(1))?;
        bar.finish_and_clear();
        write_atomic(&args.out, profile.to_json().as_bytes()).with_context(|| format!("cannot write {}", args.out.display()))?;
        println!("{}", args.out.display());
        return Ok(());
    }
    let text_s = text::read_text(&args.text)?;
    let calib = text::tokenize_into_sequences(&tokenizer, &text_s, args.seq_len, 0, args.calib_tokens)?;
    let scorer = Scorer { model: &model, renormalize: Default::default(), batch_tokens: args.batch_tokens.max(args.seq_len), head_chunk: 2048 };
    let partial_path = args.out.with_extension("partial");
    let partial = std::fs::read_to_string(&partial_path).ok().and_then(|t| serde_json::from_str(&t).ok());
    let ks_below = args.k.iter().filter(|&&k| (k as usize) < shape.native_k).count();
    let bar = ProgressBar::new((1 + shape.moe_layers.len() * ks_below) as u64);
    bar.set_style(
        ProgressStyle::with_template("profile [{bar:30}] {pos}/{len} passes (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let job = ProfileJob {
        model: name,
        scorer: &scorer,
        shape: &shape,
        calib: &calib.sequences,
        k_values: args.k.clone(),
        calibration: Calibration {
            source: args.text.display().to_string(),
            tokens: (calib.sequences.len() * args.seq_len) as u64,
            seq_len: args.seq_len as u64,
            sha256: None,
            reference_nll: None,
        },
        metric: args.metric,
        passes: if args.full_passes { Passes::Full } else { Passes::FromCachedLayerInput },
    };
    let profile = measure_profile(&job, partial, |p| write_atomic(&partial_path, p.to_json().as_bytes()), || bar.inc(1))?;
    bar.finish_and_clear();
    write_atomic(&args.out, profile.to_json().as_bytes()).with_context(|| format!("cannot write {}", args.out.display()))?;
    let _ = std::fs::remove_file(&partial_path);
    println!("{}", args.out.display());
    Ok(())
}
