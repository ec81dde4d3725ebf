#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_formats::torch::reader::fuzz_parse(data));
