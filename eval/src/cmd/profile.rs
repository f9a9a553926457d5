//! `eval profile`: measure a checkpoint's sensitivity profile (Alloc-L's input) on calibration text and
//! write it as JSON in the format `eval solve` reads. Resumable: finished layers are kept in
//! `<out>.partial` and reused when the command is run again.

use std::path::PathBuf;

use alloc_core::Calibration;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::methods::ModelShape;
use crate::profiling::{measure_profile, ProfileJob};
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
    /// Output JSON file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Run `eval profile`.
pub fn run(args: Args) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    let kind = crate::device::parse_kind(&args.dtype)?;
    let model = moe_models::load(&args.model, device, kind)?;
    let tokenizer = crate::cmd::sweep::load_tokenizer(&args.model)?;
    let info = model.info().clone();
    let shape = ModelShape { moe_layers: info.moe_layers.clone(), native_k: info.native_k, experts: info.n_routed_experts };
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
    let name = crate::cmd::sweep::model_name(&args.model);
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
    };
    let profile = measure_profile(&job, partial, |p| write_atomic(&partial_path, p.to_json().as_bytes()), || bar.inc(1))?;
    bar.finish_and_clear();
    write_atomic(&args.out, profile.to_json().as_bytes()).with_context(|| format!("cannot write {}", args.out.display()))?;
    let _ = std::fs::remove_file(&partial_path);
    println!("{}", args.out.display());
    Ok(())
}
