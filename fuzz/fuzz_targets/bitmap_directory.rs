//! Fuzz target `bitmap_directory`: see `checks::bitmap_directory` in fuzz/checks.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::bitmap_directory(data));
