//! Realized accounting on the host: what a selection actually used, added to
//! [`alloc_core::LayerActivationStats`] (activations per token: mean and histogram; unique experts
//! touched per batch).

use alloc_core::routing::{RouterBatch, Selection};
use alloc_core::{Error, LayerActivationStats, Result};

/// Experts per valid token of `selection` (padding tokens are skipped) and the number of distinct
/// experts the batch touched.
pub fn selection_counts(selection: &Selection, mask: Option<&[bool]>) -> Result<(Vec<u32>, u64)> {
    if let Some(m) = mask {
        if m.len() != selection.tokens {
            return Err(Error::InvalidRouting(format!(
                "mask has {} entries for a selection of {} tokens",
                m.len(),
                selection.tokens
            )));
        }
    }
    let counts = (0..selection.tokens)
        .filter(|&t| mask.is_none_or(|m| m[t]))
        .map(|t| selection.token(t).len() as u32)
        .collect();
    Ok((counts, selection.unique_experts()))
}

/// Add one batch's selection to the layer's statistics; `batch` supplies the padding mask.
pub fn record_selection(stats: &mut LayerActivationStats, selection: &Selection, batch: &RouterBatch<'_>) -> Result<()> {
    let (counts, unique) = selection_counts(selection, batch.mask)?;
    stats.record_batch(&counts, unique);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use alloc_core::routing::NO_EXPERT;

    #[test]
    fn padding_tokens_are_not_counted() {
        let s = Selection { ids: vec![2, 0, NO_EXPERT, NO_EXPERT, 2, NO_EXPERT], tokens: 3, width: 2 };
        let p = [0.5f32; 6];
        let mask = [true, false, true];
        let b = RouterBatch::new(&p, 3, 2).unwrap().with_mask(&mask).unwrap();
        let mut st = LayerActivationStats::new(4);
        record_selection(&mut st, &s, &b).unwrap();
        assert_eq!(st.tokens, 2);
        assert_eq!(st.histogram, vec![0, 1, 1]);
        assert_eq!(st.unique_experts_sum, 2);
        assert!((st.mean_per_token() - 1.5).abs() < 1e-12);
    }
}
