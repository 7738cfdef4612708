//! Frames come from peers: `decode_all` must refuse any byte string without panicking, and
//! every frame it yields must re-encode to the same bytes and decode back to an equal frame
//! (see `src/frame_roundtrip.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mover_fuzz::frame_roundtrip::check(data);
});
