//! Replays every committed fuzz corpus file through the decoders it was found for, so an input
//! that once crashed a decoder is checked on every `cargo test`. The frame and session
//! properties are the fuzz targets' own code, included from `fuzz/src`.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use mover::format::{manifest, pack};

#[path = "../fuzz/src/frame_roundtrip.rs"]
mod frame_roundtrip;
#[path = "../fuzz/src/session_ops.rs"]
mod session_ops;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn is_seed(name: &str) -> bool {
    name.rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with("seed-"))
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
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
    let mut versions = std::collections::BTreeSet::new();
    for (name, bytes) in files {
        if let Ok(m) = manifest::decode(&bytes, None) {
            versions.insert(m.version);
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
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        [1, 2],
        "a seed of each manifest version"
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
        let is_seed = is_seed(&name);
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

/// Runs `f` on a corpus file, naming the file when it panics.
fn named<T>(name: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        eprintln!("corpus file {name} failed");
        resume_unwind(panic)
    })
}

#[test]
fn frame_corpus_round_trips() {
    let files = corpus("frame_decode");
    assert!(!files.is_empty());
    let mut kinds = BTreeSet::new();
    for (name, bytes) in files {
        let frames = named(&name, || frame_roundtrip::check(&bytes));
        if is_seed(&name) {
            // Seeds are whole, valid streams.
            let seen = frame_roundtrip::kinds(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(frames > 0 && frames == seen.len(), "{name}");
            kinds.extend(seen);
        }
    }
    assert_eq!(
        kinds,
        (1..=17).collect(),
        "the frame_decode seeds must cover every frame type"
    );
}

#[test]
fn session_corpus_keeps_the_invariants() {
    let files = corpus("session");
    assert!(!files.is_empty());
    let mut seeds = session_ops::Stats::default();
    for (name, bytes) in files {
        let stats = named(&name, || session_ops::run(&bytes));
        if is_seed(&name) {
            seeds.ops += stats.ops;
            seeds.chunks_acked += stats.chunks_acked;
            seeds.largest_chunk = seeds.largest_chunk.max(stats.largest_chunk);
            seeds.credit_waits += stats.credit_waits;
            seeds.refused += stats.refused;
            seeds.injected_accepted += stats.injected_accepted;
            seeds.fetched += stats.fetched;
            seeds.manifests += stats.manifests;
            seeds.drained |= stats.drained;
        }
    }
    // The seeds reach every state worth mutating from; if an op's encoding changes, regenerate
    // them (see `write_seeds`).
    assert!(seeds.ops > 0 && seeds.chunks_acked > 0, "{seeds:?}");
    assert_eq!(
        seeds.largest_chunk,
        transport::frame::CHUNK_BYTES_MAX,
        "{seeds:?}"
    );
    assert!(seeds.credit_waits > 0 && seeds.refused > 0, "{seeds:?}");
    assert!(
        seeds.injected_accepted > 0 && seeds.fetched > 0,
        "{seeds:?}"
    );
    assert!(seeds.manifests > 0 && seeds.drained, "{seeds:?}");
}

fn generated_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let frames = frame_roundtrip::seed_streams()
        .into_iter()
        .map(|(name, bytes)| ("frame_decode", format!("seed-{name}"), bytes));
    let sessions = session_ops::seed_programs()
        .into_iter()
        .map(|(name, bytes)| ("session", format!("seed-{name}"), bytes));
    // The version-2 manifest seed holds the version-1 seed's entries in blocks.
    let v1 = std::fs::read(corpus_dir("manifest_decode").join("seed-small-tree")).unwrap();
    let mut tree = manifest::decode(&v1, None).unwrap();
    tree.version = mover::format::manifest_blocks::MANIFEST_V2_VERSION;
    let v2 = manifest::encode(&tree).unwrap().bytes;
    let manifests = std::iter::once(("manifest_decode", "seed-v2-small-tree".to_string(), v2));
    frames.chain(sessions).chain(manifests).collect()
}

#[test]
fn committed_seeds_are_current() {
    for (target, name, bytes) in generated_seeds() {
        let path = corpus_dir(target).join(&name);
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            committed == bytes,
            "{} differs from what the code generates now: run \
             `cargo test -p mover --test fuzz_corpus -- --ignored write_seeds`",
            path.display()
        );
        if target == "session" {
            let (config, ops) = session_ops::decode_program(&bytes);
            assert_eq!(session_ops::encode_program(config, &ops), bytes, "{name}");
        }
    }
}

/// Writes the generated seeds into `fuzz/corpus/<target>/seed-*`.
#[test]
#[ignore = "writes the seed files: run by hand after a format change"]
fn write_seeds() {
    for (target, name, bytes) in generated_seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
