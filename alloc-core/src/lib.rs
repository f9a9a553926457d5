//! Budget math and shared types for budget-aware expert activation in Mixture-of-Experts inference.
//!
//! This crate has no heavy dependencies: the allocators (`alloc-layer`, `alloc-token`) and the models
//! (`moe-models`) all speak these types, and every artifact a user keeps (profiles, allocations,
//! activation statistics) is one of them, serialised as JSON with a `schema_version`.
//!
//! * [`Budget`]: routed expert activations per token summed over MoE layers, absolute or a fraction.
//! * [`LayerAllocation`]: the top-k chosen for each MoE layer (Alloc-L's output).
//! * [`SensitivityProfile`]: per layer and k, the measured quality loss (Alloc-L's input).
//! * [`activations`]: realized-activation accounting (what a run actually used).
//! * [`routing`]: the routing-policy interface (which experts each token gets).

pub mod activations;
pub mod allocation;
pub mod budget;
pub mod error;
pub mod profile;
pub mod routing;

pub use activations::{LayerActivationStats, RealizedActivations};
pub use allocation::LayerAllocation;
pub use budget::Budget;
pub use error::{Error, Result};
pub use profile::{Calibration, LayerProfile, SensitivityProfile};

/// Version of the JSON schemas written by this crate (profiles, allocations, statistics).
pub const SCHEMA_VERSION: u32 = 1;
