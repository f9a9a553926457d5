//! The error type of alloc-core: every variant says which value is wrong and why.

/// Errors from validating budgets, allocations and profiles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A budget that cannot be met or makes no sense for the model.
    #[error("invalid budget {budget}: {reason}")]
    InvalidBudget {
        /// The budget as the user wrote it.
        budget: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A sensitivity profile that violates the format's invariants.
    #[error("invalid sensitivity profile: {0}")]
    InvalidProfile(String),
    /// An allocation that does not fit the model's limits.
    #[error("invalid layer allocation: {0}")]
    InvalidAllocation(String),
    /// Router probabilities or a routing request that cannot be served.
    #[error("invalid routing input: {0}")]
    InvalidRouting(String),
    /// A JSON document that does not parse into the expected type.
    #[error("cannot parse {what}: {source}")]
    Json {
        /// What was being parsed (e.g. "sensitivity profile").
        what: &'static str,
        /// The parser's error, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A schema version this build does not understand.
    #[error("{what} has schema_version {found}; this build reads version {expected}")]
    SchemaVersion {
        /// Which document.
        what: &'static str,
        /// The version in the document.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
}

/// Result alias for alloc-core.
pub type Result<T> = std::result::Result<T, Error>;
