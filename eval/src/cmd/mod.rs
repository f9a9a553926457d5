//! One module per subcommand.

pub mod bench;
pub mod generate;
pub mod logits;
pub mod plot;
pub mod profile;
pub mod route;
pub mod routing_cost;
pub mod solve;
pub mod sweep;
