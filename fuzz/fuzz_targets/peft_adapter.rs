#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| roe_fuzzing::peft_adapter(data));
