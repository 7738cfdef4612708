//! Replays every committed fuzz corpus file through the decoders it was found for, so an input
//! that once crashed a decoder is checked on every `cargo test`.

use std::path::Path;

use mover::format::{manifest, pack};

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn manifest_corpus_decodes_or_fails_cleanly() {
    let files = corpus("manifest_decode");
    assert!(!files.is_empty());
    let mut decoded = 0;
    for (name, bytes) in files {
        if let Ok(m) = manifest::decode(&bytes, None) {
            let encoded = manifest::encode(&m).unwrap();
            assert_eq!(
                manifest::decode(&encoded.bytes, Some(&encoded.id)).unwrap(),
                m,
                "{name}"
            );
            decoded += 1;
        }
        // Every truncation of a valid object is rejected, never a panic.
        for cut in [0, 7, 31, 32, bytes.len() / 2, bytes.len().saturating_sub(1)] {
            assert!(
                manifest::decode(&bytes[..cut.min(bytes.len())], None).is_err()
                    || cut == bytes.len(),
                "{name} cut {cut}"
            );
        }
    }
    assert!(
        decoded > 0,
        "the seed manifest no longer decodes: format changed without a new seed"
    );
}

#[test]
fn pack_corpus_decodes_or_fails_cleanly() {
    let files = corpus("pack_decode");
    assert!(!files.is_empty());
    for (name, bytes) in files {
        let _ = pack::check_pack_header(&bytes);
        if bytes.len() < pack::PACK_HEADER_BYTES + pack::TRAILER_BYTES {
            continue;
        }
        let trailer = &bytes[bytes.len() - pack::TRAILER_BYTES..];
        let Ok((entries, footer_offset, checksum)) =
            pack::decode_trailer(trailer, bytes.len() as u64)
        else {
            continue;
        };
        let footer = &bytes[footer_offset as usize..bytes.len() - pack::TRAILER_BYTES];
        // Committed seeds are real packs and must open fully; other corpus files (left by a
        // local fuzz run) only have to be handled without a panic.
        let is_seed = name
            .rsplit('/')
            .next()
            .is_some_and(|f| f.starts_with("seed-"));
        let entries_decoded = match pack::decode_footer(footer, checksum) {
            Ok(decoded) => decoded,
            Err(e) => {
                assert!(!is_seed, "{name}: {e}");
                continue;
            }
        };
        assert_eq!(entries_decoded.len(), entries as usize, "{name}");
        for entry in entries_decoded {
            let at = entry.offset as usize;
            let outcome = bytes
                .get(at..at + pack::RECORD_HEADER_BYTES)
                .ok_or_else(|| "record header out of bounds".to_string())
                .and_then(|h| pack::RecordHeader::decode(h).map_err(|e| e.to_string()))
                .and_then(|header| {
                    let start = at + pack::RECORD_HEADER_BYTES;
                    let payload = bytes
                        .get(start..start + header.stored_len as usize)
                        .ok_or_else(|| "payload out of bounds".to_string())?;
                    let mut out = Vec::new();
                    pack::open_record(&header, payload, &mut out).map_err(|e| e.to_string())?;
                    Ok(out.len())
                });
            match outcome {
                Ok(len) => assert_eq!(len, entry.raw_len as usize, "{name}"),
                Err(e) => assert!(!is_seed, "{name}: {e}"),
            }
        }
    }
}
