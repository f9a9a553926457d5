//! Fuzz target: see `moe_models::fuzz::config_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = moe_models::fuzz::config_json(data); });
