#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tensor_formats::torch::pickle::fuzz_unpickle(data));
