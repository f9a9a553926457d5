//! Alloc-T and the token-level routing policies.
//!
//! Each policy is first a reference implementation on host slices (the specification, implementing
//! [`alloc_core::routing::RoutingPolicy`]); the `tch` feature adds a device implementation on libtorch
//! tensors that selects exactly the same experts without synchronising with the host.

#[cfg(feature = "tch")]
pub mod device;
