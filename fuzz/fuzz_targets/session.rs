//! The session state machines against any sequence of operations: a sender and a receiver
//! talking through the codec, a fetch client and a manifest assembly, with arbitrary and
//! synthesized frames injected anywhere. The interpreter and the invariants it checks are in
//! `src/session_ops.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mover_fuzz::session_ops::run(data);
});
