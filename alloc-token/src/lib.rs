//! Alloc-T and the token-level routing policies.
//!
//! Each policy is first a reference implementation on host slices (the specification, implementing
//! [`alloc_core::routing::RoutingPolicy`]); the `tch` feature adds a device implementation of the same
//! struct ([`device::DevicePolicy`]) on libtorch tensors that selects exactly the same experts without
//! synchronising with the host.
//!
//! Every policy gives each valid token a prefix of its experts sorted by decreasing probability (ties:
//! lower expert index) and padding tokens nothing; the policies differ only in how many experts each
//! token gets:
//!
//! | policy | experts per token |
//! |---|---|
//! | [`TopK`] | k |
//! | [`PerLayerTopK`] (Alloc-L) | the layer's k from a [`alloc_core::LayerAllocation`] |
//! | [`AllocT`] (Alloc-T, Alloc-L+T) | `round(K_l * T)` pairs over the batch by score, within `[floor, cap]` |
//! | [`TopP`] | smallest prefix with mass >= p, within `[min_k, max_k]` |
//! | [`Threshold`] | experts with `p >= tau`, within `[min_k, max_k]` |
//! | [`Skip`] (NAEE) | top-k experts with `p >= beta * p_top1` |
//! | [`RandomK`] | k random experts (not a prefix; seeded) |

pub mod accounting;
pub mod alloc_t;
pub mod batch;
mod common;
pub mod mass;
pub mod nucleus;
pub mod per_layer;
pub mod random;
pub mod skip;
pub mod threshold;
pub mod topk;

#[cfg(feature = "tch")]
pub mod device;

pub use alloc_t::{pairs_for, AllocT, LayerBudget, Scope, Score};
pub use batch::router_batch;
pub use mass::MassCurve;
pub use nucleus::TopP;
pub use per_layer::PerLayerTopK;
pub use random::RandomK;
pub use skip::Skip;
pub use threshold::Threshold;
pub use topk::TopK;
