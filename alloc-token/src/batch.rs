//! Host batches from ndarray: recorded router traces are `[T, E]` matrices, and policies read them as a
//! [`RouterBatch`] without copying.

use alloc_core::routing::RouterBatch;
use alloc_core::{Error, Result};
use ndarray::ArrayView2;

/// A checked [`RouterBatch`] over a `[T, E]` probability matrix, which must be in standard (row-major,
/// contiguous) layout; use `.as_standard_layout()` on a transposed or sliced view first.
pub fn router_batch<'a>(probs: ArrayView2<'a, f32>) -> Result<RouterBatch<'a>> {
    let (t, e) = probs.dim();
    let slice = probs.to_slice().ok_or_else(|| {
        Error::InvalidRouting(format!("[{t}, {e}] probabilities are not in standard (row-major) layout"))
    })?;
    RouterBatch::new(slice, t, e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn router_batch_reads_rows_and_rejects_transposed_views() {
        let a = array![[0.25f32, 0.75], [1.0, 0.0], [0.5, 0.5]];
        let b = router_batch(a.view()).unwrap();
        assert_eq!((b.tokens, b.experts), (3, 2));
        assert_eq!(b.row(1), &[1.0, 0.0]);
        assert!(router_batch(a.t()).unwrap_err().to_string().contains("standard"));
    }
}
