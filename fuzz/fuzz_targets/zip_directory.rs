#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tensor_formats::torch::zip::read_central_directory(data);
});
