//! Fuzz target `image_read`: see `checks::image_read` in fuzz/checks.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::image_read(data));
