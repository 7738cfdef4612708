//! The `frame_decode` property, shared by the fuzz target and `tests/fuzz_corpus.rs` (which
//! includes this file with `#[path]`, so it may only use `transport` and `std`).
//!
//! For any bytes: `decode_all` never panics; every frame it yields re-encodes to exactly the
//! bytes it was decoded from (the encoding is canonical; the one exception is an Error frame
//! whose code is unknown, which decodes as `Internal` and re-encodes as code 5), and decoding
//! that encoding gives back an equal frame.

use transport::frame::{
    self, ErrorCode, Frame, Header, Purpose, CHUNK_BYTES_MAX, FRAME_HEADER_BYTES,
    FRAME_PAYLOAD_BYTES_MAX, IDS_PER_FRAME_MAX, KEY_BYTES_MAX, MANIFEST_PART_BYTES_MAX,
    NAME_BYTES_MAX, REASON_BYTES_MAX,
};

/// Checks the property on `data`; returns how many frames decoded (before the first error).
pub fn check(data: &[u8]) -> usize {
    if let Some(header) = data.get(..FRAME_HEADER_BYTES) {
        if let Ok(header) = Header::decode(header.try_into().expect("8 bytes")) {
            assert!(header.len <= FRAME_PAYLOAD_BYTES_MAX, "{header:?}");
        }
    }
    let mut offset = 0;
    let mut frames = 0;
    let mut encoded = Vec::new();
    let _ = frame::decode_all(data, |decoded| {
        encoded.clear();
        frame::encode(&decoded, &mut encoded);
        let original = data
            .get(offset..offset + encoded.len())
            .unwrap_or_else(|| panic!("{decoded:?} re-encodes longer than the input"));
        if let Frame::Error { code, .. } = decoded {
            // Unknown codes decode as Internal: compare the code through the decoder.
            let sent = u16::from_le_bytes([original[8], original[9]]);
            assert_eq!(ErrorCode::from_u16(sent), code);
            assert_eq!(original[..8], encoded[..8], "{decoded:?}");
            assert_eq!(original[10..], encoded[10..], "{decoded:?}");
        } else {
            assert_eq!(
                original,
                &encoded[..],
                "{decoded:?} does not re-encode canonically"
            );
        }
        if let Frame::Chunk {
            id,
            codec,
            raw_len,
            payload,
        } = decoded
        {
            let prefix = frame::chunk_frame_prefix(&id, codec, raw_len, payload.len());
            assert_eq!(prefix[..], encoded[..prefix.len()]);
        }
        let mut again = 0;
        frame::decode_all(&encoded, |redecoded| {
            assert_eq!(redecoded, decoded);
            again += 1;
        })
        .unwrap_or_else(|e| panic!("{decoded:?} re-encodes to bytes that do not decode: {e}"));
        assert_eq!(again, 1);
        offset += encoded.len();
        frames += 1;
    });
    frames
}

/// The frame type numbers (1..=17) of the frames in `data`, stopping at the first error.
pub fn kinds(data: &[u8]) -> Result<Vec<u8>, frame::FrameError> {
    let mut kinds = Vec::new();
    let mut encoded = Vec::new();
    frame::decode_all(data, |decoded| {
        encoded.clear();
        frame::encode(&decoded, &mut encoded);
        kinds.push(encoded[0]);
    })?;
    Ok(kinds)
}

/// Seed streams for `corpus/frame_decode`: every frame type, plus the bounds and a whole Store
/// conversation. `tests/fuzz_corpus.rs` writes them (`write_seeds`, ignored) and checks the
/// committed ones.
pub fn seed_streams() -> Vec<(&'static str, Vec<u8>)> {
    let ids: Vec<[u8; 32]> = (0..IDS_PER_FRAME_MAX).map(|i| [i as u8; 32]).collect();
    let name = "n".repeat(NAME_BYTES_MAX);
    let reason = "r".repeat(REASON_BYTES_MAX);
    let key = vec![b'/'; KEY_BYTES_MAX];
    let part = vec![7u8; 4096];
    let chunk = vec![3u8; 64];
    // 1021 ids: the last byte has 3 spare bits, which must be clear.
    let mut bitmap = vec![0xa5u8; IDS_PER_FRAME_MAX / 8];
    *bitmap.last_mut().expect("not empty") &= 0x1f;
    let one = |frame: Frame<'_>| {
        let mut out = Vec::new();
        frame::encode(&frame, &mut out);
        out
    };
    let many = |frames: &[Frame<'_>]| {
        let mut out = Vec::new();
        for frame in frames {
            frame::encode(frame, &mut out);
        }
        out
    };
    vec![
        (
            "01-hello",
            one(Frame::Hello {
                version_min: 1,
                version_max: 1,
                purpose: Purpose::Store,
                site: "onprem",
                tier: "hot",
                job: "backup-1",
            }),
        ),
        (
            "01-hello-longest-names",
            one(Frame::Hello {
                version_min: 0,
                version_max: u16::MAX,
                purpose: Purpose::Fetch,
                site: &name,
                tier: &name,
                job: &name,
            }),
        ),
        (
            "02-welcome",
            one(Frame::Welcome {
                version: 1,
                site: "dr",
                unacked_bytes_max: 64 << 20,
            }),
        ),
        (
            "03-query",
            one(Frame::Query {
                seq: 1,
                ids: frame::id_list(&ids[..3]),
            }),
        ),
        (
            "03-query-most-ids",
            one(Frame::Query {
                seq: u64::MAX,
                ids: frame::id_list(&ids),
            }),
        ),
        (
            "04-missing",
            one(Frame::Missing {
                seq: 1,
                count: 3,
                bitmap: &[0b101],
            }),
        ),
        (
            "04-missing-most-ids",
            one(Frame::Missing {
                seq: 2,
                count: IDS_PER_FRAME_MAX as u32 - 3,
                bitmap: &bitmap,
            }),
        ),
        (
            "05-chunk-raw",
            one(Frame::Chunk {
                id: [1; 32],
                codec: 0,
                raw_len: chunk.len() as u32,
                payload: &chunk,
            }),
        ),
        (
            "05-chunk-lz4",
            one(Frame::Chunk {
                id: [2; 32],
                codec: 1,
                raw_len: CHUNK_BYTES_MAX as u32,
                payload: &chunk[..9],
            }),
        ),
        ("06-flush", one(Frame::Flush { seq: 1 })),
        (
            "07-ack",
            one(Frame::Ack {
                chunks: 2,
                bytes: 128,
                flush_seq: 1,
            }),
        ),
        (
            "08-manifest-part",
            one(Frame::ManifestPart {
                id: [4; 32],
                total: 10_000,
                offset: 4096,
                data: &part,
            }),
        ),
        (
            "08-manifest-part-last",
            one(Frame::ManifestPart {
                id: [4; 32],
                total: MANIFEST_PART_BYTES_MAX as u64 + 5,
                offset: MANIFEST_PART_BYTES_MAX as u64,
                data: &part[..5],
            }),
        ),
        ("09-commit", one(Frame::Commit { id: [5; 32] })),
        ("10-committed", one(Frame::Committed { id: [5; 32] })),
        (
            "11-fetch",
            one(Frame::Fetch {
                seq: 1,
                ids: frame::id_list(&ids[10..12]),
            }),
        ),
        (
            "12-get-manifest-snapshot",
            one(Frame::GetManifest {
                by_source: false,
                key: b"snap-20250101",
            }),
        ),
        (
            "12-get-manifest-longest-key",
            one(Frame::GetManifest {
                by_source: true,
                key: &key,
            }),
        ),
        ("13-no-manifest", one(Frame::NoManifest)),
        (
            "14-error",
            one(Frame::Error {
                code: ErrorCode::NotFound,
                reason: "no such snapshot",
            }),
        ),
        (
            "14-error-longest-reason",
            one(Frame::Error {
                code: ErrorCode::Corrupt,
                reason: &reason,
            }),
        ),
        (
            "14-error-superseded",
            one(Frame::Error {
                code: ErrorCode::Superseded,
                reason: "attempt 1 of job b-3 superseded by attempt 2",
            }),
        ),
        ("15-attempt", one(Frame::Attempt { attempt: 2 })),
        ("16-bench-data", one(Frame::BenchData { data: &chunk })),
        (
            "17-bench-received",
            one(Frame::BenchReceived {
                bytes: 8 << 20,
                micros: 41_000,
            }),
        ),
        (
            "stream-store",
            many(&[
                Frame::Hello {
                    version_min: 1,
                    version_max: 1,
                    purpose: Purpose::Store,
                    site: "onprem",
                    tier: "hot",
                    job: "j",
                },
                Frame::Welcome {
                    version: 1,
                    site: "dr",
                    unacked_bytes_max: 8 << 20,
                },
                Frame::Query {
                    seq: 1,
                    ids: frame::id_list(&ids[1..3]),
                },
                Frame::Missing {
                    seq: 1,
                    count: 2,
                    bitmap: &[0b10],
                },
                Frame::Chunk {
                    id: [2; 32],
                    codec: 0,
                    raw_len: 5,
                    payload: b"chunk",
                },
                Frame::Flush { seq: 1 },
                Frame::Ack {
                    chunks: 1,
                    bytes: 5,
                    flush_seq: 1,
                },
            ]),
        ),
        (
            "stream-control",
            many(&[
                Frame::Hello {
                    version_min: 1,
                    version_max: 1,
                    purpose: Purpose::Control,
                    site: "onprem",
                    tier: "",
                    job: "j",
                },
                Frame::ManifestPart {
                    id: [9; 32],
                    total: 6,
                    offset: 0,
                    data: b"man",
                },
                Frame::ManifestPart {
                    id: [9; 32],
                    total: 6,
                    offset: 3,
                    data: b"ife",
                },
                Frame::Commit { id: [9; 32] },
                Frame::Committed { id: [9; 32] },
                Frame::GetManifest {
                    by_source: true,
                    key: b"/data/train",
                },
                Frame::NoManifest,
            ]),
        ),
        (
            "stream-bench",
            many(&[
                Frame::Hello {
                    version_min: 3,
                    version_max: 3,
                    purpose: Purpose::Bench,
                    site: "onprem",
                    tier: "",
                    job: "bench",
                },
                Frame::Welcome {
                    version: 3,
                    site: "dr",
                    unacked_bytes_max: 0,
                },
                Frame::BenchData { data: &chunk },
                Frame::BenchData { data: &chunk[..1] },
                Frame::BenchReceived {
                    bytes: 65,
                    micros: 12,
                },
            ]),
        ),
    ]
}
