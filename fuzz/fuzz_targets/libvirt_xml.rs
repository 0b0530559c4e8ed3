//! Fuzz target `libvirt_xml`: see `checks::libvirt_xml` in fuzz/checks.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::libvirt_xml(data));
