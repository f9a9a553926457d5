//! Errors of the layer allocator.

/// What can go wrong when allocating k per layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The profile or allocation is malformed (see alloc-core's validation).
    #[error(transparent)]
    Core(#[from] alloc_core::Error),
    /// The budget is below what the smallest allowed k of every layer adds up to.
    #[error("budget {budget} is infeasible: the smallest allowed k of every layer already adds up to {min_total}")]
    InfeasibleBudget {
        /// The requested total.
        budget: u32,
        /// Sum over layers of the smallest allowed k.
        min_total: u32,
    },
    /// After applying the k bounds a layer has no profiled k left.
    #[error("layer {layer}: no profiled k lies within the bounds [{k_min}, {k_max}] (profiled: {profiled:?})")]
    NoAllowedK {
        /// The model layer index.
        layer: usize,
        /// Lower bound.
        k_min: u32,
        /// Upper bound.
        k_max: u32,
        /// The profiled k values of the layer.
        profiled: Vec<u32>,
    },
    /// Bounds with `k_min > k_max`.
    #[error("k bounds are empty: k_min = {k_min} > k_max = {k_max}")]
    EmptyBounds {
        /// Lower bound.
        k_min: u32,
        /// Upper bound.
        k_max: u32,
    },
    /// A baseline could not express the budget with the allowed k values.
    #[error("{method}: {reason}")]
    Baseline {
        /// Which baseline.
        method: &'static str,
        /// Why.
        reason: String,
    },
    /// The DP table for this problem and budget would be too large to build or fill.
    #[error(
        "the DP for this budget needs {cells} table cells and {steps} steps (limits {max_cells} and {max_steps}): \
         lower the budget or profile fewer k values"
    )]
    DpTooLarge {
        /// Layers times budget columns.
        cells: u64,
        /// Cells times options per layer, summed.
        steps: u64,
        /// [`crate::dp::MAX_DP_CELLS`].
        max_cells: u64,
        /// [`crate::dp::MAX_DP_STEPS`].
        max_steps: u64,
    },
    /// The ILP solver failed (it should not on a feasible problem).
    #[error("ILP solver failed: {0}")]
    Solver(String),
}

/// Result alias for alloc-layer.
pub type Result<T> = std::result::Result<T, Error>;
