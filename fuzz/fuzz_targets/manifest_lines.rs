#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = suite_support::manifest::read_manifest(data, "fuzz");
});
