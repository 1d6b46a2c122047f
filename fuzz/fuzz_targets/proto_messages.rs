#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| roe_fuzzing::proto_messages(data));
