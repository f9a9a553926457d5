//! Plain-text language modelling: tokenise a file and cut it into fixed-length sequences.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// A tokenised text ready for NLL scoring.
#[derive(Debug, Clone)]
pub struct TokenizedText {
    /// Non-overlapping sequences of equal length.
    pub sequences: Vec<Vec<i64>>,
    /// UTF-8 bytes of the text the sequences cover (for bits-per-byte).
    pub bytes: u64,
}

/// Read a UTF-8 text file, rejecting empty and binary files with a clear error.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read text file {}", path.display()))?;
    if bytes.is_empty() {
        bail!("text file {} is empty", path.display());
    }
    if bytes.contains(&0) {
        bail!("text file {} looks binary (contains NUL bytes)", path.display());
    }
    String::from_utf8(bytes).with_context(|| format!("text file {} is not valid UTF-8", path.display()))
}

/// Tokenise `text` and cut it into `seq_len`-token sequences (the tail shorter than `seq_len` is
/// dropped), keeping at most `max_tokens` tokens after skipping `skip_tokens`. Bits-per-byte uses the
/// byte length of the kept part, estimated proportionally to its share of the tokens.
pub fn tokenize_into_sequences(
    tokenizer: &tokenizers::Tokenizer,
    text: &str,
    seq_len: usize,
    skip_tokens: usize,
    max_tokens: usize,
) -> Result<TokenizedText> {
    if seq_len < 2 {
        bail!("sequence length must be at least 2, got {seq_len}");
    }
    let enc = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
    let avail = ids.len().saturating_sub(skip_tokens);
    let n_seq = avail.min(max_tokens) / seq_len;
    if n_seq == 0 {
        bail!("the text has {} tokens after skipping {skip_tokens}: too few for one sequence of {seq_len}", avail);
    }
    let sequences: Vec<Vec<i64>> =
        (0..n_seq).map(|i| ids[skip_tokens + i * seq_len..skip_tokens + (i + 1) * seq_len].to_vec()).collect();
    // Exact byte span from the tokenizer's offsets.
    let offsets = enc.get_offsets();
    let first = offsets.get(skip_tokens).map_or(0, |o| o.0);
    let last = offsets.get(skip_tokens + n_seq * seq_len - 1).map_or(text.len(), |o| o.1);
    Ok(TokenizedText { sequences, bytes: (last.saturating_sub(first)) as u64 })
}

/// Every token id must index the model's embedding: a tokenizer.json from another model gives ids at or
/// past `vocab_size`, which libtorch would reject only deep inside the forward pass (or, on a GPU, as a
/// device-side assert). Names the first offending id.
pub fn check_vocab<'a>(ids: impl IntoIterator<Item = &'a i64>, vocab_size: usize) -> Result<()> {
    if let Some(bad) = ids.into_iter().find(|&&i| i < 0 || i as u64 >= vocab_size as u64) {
        bail!(
            "tokenizer.json gives token id {bad}, outside the model's vocabulary (config.json vocab_size {vocab_size}): \
             the tokenizer does not match the checkpoint"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_vocab_names_the_first_id_past_the_vocabulary() {
        assert!(check_vocab(&[0, 5, 95], 96).is_ok());
        let e = check_vocab(&[3, 96, 200], 96).unwrap_err().to_string();
        assert!(e.contains("token id 96") && e.contains("vocab_size 96"), "{e}");
        assert!(check_vocab(&[-1], 96).is_err());
    }
}
