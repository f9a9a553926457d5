//! Pieces every host policy shares: the expert order, option checks, and building a selection from
//! per-token counts.
//!
//! Every policy in this crate gives each valid token a *prefix* of its experts sorted by decreasing
//! probability (ties: lower expert index first), so a policy is fully described by how many experts each
//! token gets. Padding tokens get none.

use std::cmp::Ordering;

use alloc_core::routing::{RouterBatch, Selection, NO_EXPERT};
use alloc_core::{Error, Result};

/// The order of experts within a token: decreasing probability, then increasing expert index.
///
/// `+ 0.0` maps -0.0 to +0.0 so the two zeros tie, as they do in libtorch's sort; NaN never reaches
/// here ([`RouterBatch::check`] rejects it).
pub(crate) fn expert_order(a: (f32, usize), b: (f32, usize)) -> Ordering {
    (b.0 + 0.0).total_cmp(&(a.0 + 0.0)).then(a.1.cmp(&b.1))
}

/// The first `n` experts of `row` in [`expert_order`] (`n <= row.len()`), in O(E + n log n).
pub(crate) fn sorted_prefix(row: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    let n = n.min(row.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &usize, b: &usize| expert_order((row[*a], *a), (row[*b], *b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx
}

/// An [`Error::InvalidRouting`] that names the policy and layer.
pub(crate) fn invalid(policy: &str, layer: usize, reason: impl std::fmt::Display) -> Error {
    Error::InvalidRouting(format!("{policy}, layer {layer}: {reason}"))
}

/// Reject a selection width above the expert count: a policy never pads a token with fewer experts than
/// it asked for, it fails instead (the option is almost certainly a mistake for this model).
pub(crate) fn check_width(policy: &str, layer: usize, option: &str, width: usize, experts: usize) -> Result<()> {
    if width > experts {
        return Err(invalid(policy, layer, format!("{option} = {width} exceeds the {experts} experts of the router")));
    }
    Ok(())
}

/// Build a `[tokens, width]` selection in which valid token t gets the first `count(t, sorted)` of its
/// experts, where `sorted` is its first `width` experts in [`expert_order`] with their probabilities.
/// `count` must return at most `width`.
pub(crate) fn prefix_selection(
    batch: &RouterBatch<'_>,
    width: usize,
    mut count: impl FnMut(usize, &[(usize, f32)]) -> usize,
) -> Selection {
    let mut ids = vec![NO_EXPERT; batch.tokens * width];
    for t in 0..batch.tokens {
        if !batch.is_valid(t) || width == 0 {
            continue;
        }
        let row = batch.row(t);
        let sorted: Vec<(usize, f32)> = sorted_prefix(row, width).into_iter().map(|e| (e, row[e])).collect();
        let n = count(t, &sorted).min(width);
        for (slot, &(e, _)) in ids[t * width..].iter_mut().zip(&sorted[..n]) {
            *slot = e as i64;
        }
    }
    Selection { ids, tokens: batch.tokens, width }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn sorted_prefix_matches_full_sort() {
        let row = [0.1, 0.3, 0.3, 0.0, -0.0, 0.2];
        assert_eq!(sorted_prefix(&row, 6), alloc_core::routing::sorted_experts(&row));
        assert_eq!(sorted_prefix(&row, 3), vec![1, 2, 5]);
        assert!(sorted_prefix(&row, 0).is_empty());
    }
}
