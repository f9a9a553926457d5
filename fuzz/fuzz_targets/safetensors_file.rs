//! Fuzz target: see `moe_models::fuzz::safetensors_file`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = moe_models::fuzz::safetensors_file(data); });
