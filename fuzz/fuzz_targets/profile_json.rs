//! Fuzz target: see `alloc_layer::fuzz::profile_json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| { let _ = alloc_layer::fuzz::profile_json(data); });
