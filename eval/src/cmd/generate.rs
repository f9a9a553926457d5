//! `eval generate`: greedy decoding with the KV cache, for a human check of a checkpoint.

use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use moe_models::ForwardCtx;

use super::logits::{parse_tokens, RunFlags};

/// Arguments of `eval generate`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model, device, dtype and policy.
    #[command(flatten)]
    pub run: RunFlags,
    /// Prompt text (tokenised with the checkpoint's tokenizer.json).
    #[arg(long, conflicts_with = "tokens")]
    pub prompt: Option<String>,
    /// Prompt as token ids instead of text ("1 2 3").
    #[arg(long)]
    pub tokens: Option<String>,
    /// New tokens to generate at most (stops early at end-of-sequence).
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
}

/// Run `eval generate`.
pub fn run(args: Args) -> Result<()> {
    let model = args.run.load()?;
    let tokenizer = moe_models::load_tokenizer(&args.run.model).ok();
    let prompt: Vec<i64> = match (&args.prompt, &args.tokens) {
        (_, Some(t)) => parse_tokens(t)?,
        (Some(text), None) => {
            let tok = tokenizer.as_ref().ok_or_else(|| anyhow!("--prompt needs tokenizer.json in the model directory"))?;
            let enc = tok.encode(text.as_str(), true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
            enc.get_ids().iter().map(|&i| i as i64).collect()
        }
        (None, None) => return Err(anyhow!("give --prompt or --tokens")),
    };
    let policy = args.run.policy(&model)?;
    let mut ctx = ForwardCtx::new(&policy).with_renormalize(args.run.renormalize);
    let start = Instant::now();
    let new = model.generate_greedy(&prompt, args.max_new_tokens, &mut ctx).context("generating")?;
    let secs = start.elapsed().as_secs_f64();
    let text = match &tokenizer {
        Some(tok) => {
            let ids: Vec<u32> = new.iter().map(|&i| i as u32).collect();
            tok.decode(&ids, false).map_err(|e| anyhow!("decoding: {e}"))?
        }
        None => new.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "),
    };
    println!("{text}");
    eprintln!(
        "{} prompt + {} new tokens in {:.2} s ({:.1} tokens/s incl. prefill); ids: {:?}",
        prompt.len(),
        new.len(),
        secs,
        new.len() as f64 / secs.max(1e-9),
        new
    );
    Ok(())
}
