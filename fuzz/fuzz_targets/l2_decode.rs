//! Fuzz target `l2_decode`: see `checks::l2_decode` in fuzz/checks.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::l2_decode(data));
