//! Manifest objects come from disk (and, with the transport, from peers): decoding arbitrary
//! bytes must fail cleanly, and anything that decodes must re-encode to an equal manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mover::format::manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = manifest::decode(data, None) {
        for entry in &decoded.entries {
            let _ = manifest::check_relative_path(&entry.path);
        }
        let encoded = manifest::encode(&decoded).expect("a decoded manifest re-encodes");
        let again = manifest::decode(&encoded.bytes, Some(&encoded.id)).expect("round trip");
        assert_eq!(again, decoded);
    }
});
