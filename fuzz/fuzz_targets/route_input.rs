//! Fuzz target: see `route::fuzz_input` (`eval route`'s flags and `--probs` file). eval is a binary
//! crate, so its route module is included by path; it only uses alloc-core, alloc-token, anyhow, clap,
//! serde and serde_json.
#![no_main]
#[allow(dead_code)]
#[path = "../../eval/src/cmd/route.rs"]
mod route;
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = route::fuzz_input(data); });
