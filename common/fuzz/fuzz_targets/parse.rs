//! Any bytes: a service spec, then a frame. The checks are
//! `sluice_common::fuzz::check` (the parser's invariants), which unit tests
//! run too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_common::fuzz::check(data));
