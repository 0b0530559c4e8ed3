//! Fuzz target `snapshot_table`: see `checks::snapshot_table` in fuzz/checks.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::snapshot_table(data));
