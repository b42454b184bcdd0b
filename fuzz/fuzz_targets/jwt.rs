#![no_main]
// See agentgate::fuzzing::jwt for what is run and which invariants are checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| agentgate::fuzzing::jwt(data));
