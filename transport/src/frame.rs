//! The peer protocol's frames: byte layout, hard size bounds, encoding and decoding.
//!
//! Every frame is `type u8 | reserved [3] = 0 | len u32` (little-endian) followed by `len`
//! payload bytes. Each type has its own upper bound on `len`, checked from the header alone,
//! so a reader never buffers more than [`FRAME_PAYLOAD_BYTES_MAX`] for one frame whatever the
//! peer sends. Decoders borrow from the payload and check every length before slicing.
//!
//! Layouts (all integers little-endian, `str` = u16 length + UTF-8, `id` = 32-byte BLAKE3):
//!
//! | type | frame | payload |
//! |---|---|---|
//! | 1 | Hello | version_min u16, version_max u16, purpose u8, site str, tier str, job str |
//! | 2 | Welcome | version u16, site str, unacked_bytes_max u64 |
//! | 3 | Query | seq u64, count u32, id × count (count ≤ [`IDS_PER_FRAME_MAX`]) |
//! | 4 | Missing | seq u64, count u32, bitmap ⌈count/8⌉ B (bit i set = id i wanted) |
//! | 5 | Chunk | id, codec u8, raw_len u32, payload (≤ raw_len ≤ [`CHUNK_BYTES_MAX`]) |
//! | 6 | Flush | seq u64 |
//! | 7 | Ack | chunks u64, bytes u64, flush_seq u64 (cumulative, durable at the receiver) |
//! | 8 | ManifestPart | id, total u64, offset u64, data (≤ [`MANIFEST_PART_BYTES_MAX`]) |
//! | 9 | Commit | id |
//! | 10 | Committed | id |
//! | 11 | Fetch | seq u64, count u32, id × count |
//! | 12 | GetManifest | by u8 (0 snapshot spec, 1 newest of a source path), key bytes (u32 len) |
//! | 13 | NoManifest | (empty) |
//! | 14 | Error | code u16, reason str (≤ [`REASON_BYTES_MAX`]) |
//! | 15 | Attempt | attempt u64 (version ≥ 2, Store streams only: the sender's first frame after the Welcome) |
//! | 16 | BenchData | data (≤ [`CHUNK_BYTES_MAX`], read and dropped; version ≥ 3, Bench streams only) |
//! | 17 | BenchReceived | bytes u64, micros u64 (the receiver's count, first data to the end) |
//!
//! Versions: 1 is the table without Attempt. 2 adds Attempt: which try of its job the stream's
//! sender is, so the receiver can stop a killed try's streams once a newer one has started.
//! It is a frame of its own rather than a field of the Hello because the Hello goes out before
//! the version is known and a version-1 receiver refuses a Hello with bytes after the job.
//! 3 adds the Bench purpose (`mover bench link`): the sender streams BenchData, which the
//! receiver counts and drops (nothing is stored), finishes its side, and reads one
//! BenchReceived. A Bench Hello asks for version 3 at least; an older receiver refuses its
//! purpose, which the sender reports as a peer too old to measure.
//!
//! Error codes (u16): 1 Protocol, 2 Refused, 3 NotFound, 4 Corrupt, 5 Internal, 6 NoSpace (the
//! receiving tier is full), 7 Superseded (a newer attempt of the stream's job has started: this
//! stream stored nothing more). Codes a build does not know decode as `Internal` (the reason
//! still reads), so a new code needs no new protocol version.

use std::fmt;

/// The ALPN protocol id both ends must offer.
pub const ALPN: &[u8] = b"mover/1";
/// Versions of the frame protocol this build speaks.
pub const VERSION_MIN: u16 = 1;
pub const VERSION_MAX: u16 = 3;
/// The first version whose Store streams carry an [`Frame::Attempt`].
pub const ATTEMPT_VERSION: u16 = 2;
/// The first version that serves Bench streams ([`Purpose::Bench`]).
pub const BENCH_VERSION: u16 = 3;

pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest chunk (plaintext) the protocol carries; equals the engine's FastCDC maximum.
pub const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Ids per Query or Fetch: 32 KiB of ids, about 1 GiB of data at 1 MiB chunks.
pub const IDS_PER_FRAME_MAX: usize = 1024;
/// Manifests travel in parts so no frame is larger than a chunk frame.
pub const MANIFEST_PART_BYTES_MAX: usize = 1024 * 1024;
/// Site, tier and job names.
pub const NAME_BYTES_MAX: usize = 128;
pub const REASON_BYTES_MAX: usize = 1024;
/// A GetManifest key is a snapshot spec or a source path (Linux PATH_MAX).
pub const KEY_BYTES_MAX: usize = 4096;

const CHUNK_FIXED_BYTES: usize = 32 + 1 + 4;
/// The largest payload of any frame type: a chunk frame.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = CHUNK_FIXED_BYTES + CHUNK_BYTES_MAX;

const _: () = assert!(12 + IDS_PER_FRAME_MAX * 32 <= FRAME_PAYLOAD_BYTES_MAX);
const _: () = assert!(48 + MANIFEST_PART_BYTES_MAX <= FRAME_PAYLOAD_BYTES_MAX);

/// Why a peer opened a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Ships chunks of a backup or replication into a tier (Query/Chunk/Flush).
    Store = 1,
    /// Manifest transfer and snapshot commit, and manifest lookups.
    Control = 2,
    /// Reads chunks for a restore (Fetch).
    Fetch = 3,
    /// Measures the link (BenchData in, BenchReceived out); stores nothing. Version ≥ 3.
    Bench = 4,
}

impl Purpose {
    fn from_u8(value: u8) -> Option<Purpose> {
        match value {
            1 => Some(Purpose::Store),
            2 => Some(Purpose::Control),
            3 => Some(Purpose::Fetch),
            4 => Some(Purpose::Bench),
            _ => None,
        }
    }
}

/// Error codes carried by an Error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    Protocol = 1,
    Refused = 2,
    NotFound = 3,
    Corrupt = 4,
    Internal = 5,
    /// The receiving tier's file system is full (ENOSPC); the reason names the tier.
    NoSpace = 6,
    /// A newer attempt of the stream's job has started; this stream stored nothing more. Final
    /// for the stream: its sender is the old attempt, which nobody waits for.
    Superseded = 7,
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> ErrorCode {
        match value {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::Refused,
            3 => ErrorCode::NotFound,
            4 => ErrorCode::Corrupt,
            6 => ErrorCode::NoSpace,
            7 => ErrorCode::Superseded,
            _ => ErrorCode::Internal,
        }
    }
}

/// A list of chunk ids inside a Query or Fetch payload (borrowed, already length-checked).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdList<'a>(&'a [u8]);

impl<'a> IdList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 32
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn get(&self, i: usize) -> [u8; 32] {
        self.0[i * 32..i * 32 + 32].try_into().expect("32 bytes")
    }
    pub fn iter(&self) -> impl Iterator<Item = [u8; 32]> + 'a {
        self.0
            .chunks_exact(32)
            .map(|id| id.try_into().expect("32 bytes"))
    }
}

impl fmt::Debug for IdList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdList({} ids)", self.len())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello {
        version_min: u16,
        version_max: u16,
        purpose: Purpose,
        site: &'a str,
        tier: &'a str,
        job: &'a str,
    },
    Welcome {
        version: u16,
        site: &'a str,
        unacked_bytes_max: u64,
    },
    Query {
        seq: u64,
        ids: IdList<'a>,
    },
    Missing {
        seq: u64,
        count: u32,
        bitmap: &'a [u8],
    },
    Chunk {
        id: [u8; 32],
        codec: u8,
        raw_len: u32,
        payload: &'a [u8],
    },
    Flush {
        seq: u64,
    },
    Ack {
        chunks: u64,
        bytes: u64,
        flush_seq: u64,
    },
    ManifestPart {
        id: [u8; 32],
        total: u64,
        offset: u64,
        data: &'a [u8],
    },
    Commit {
        id: [u8; 32],
    },
    Committed {
        id: [u8; 32],
    },
    Fetch {
        seq: u64,
        ids: IdList<'a>,
    },
    GetManifest {
        by_source: bool,
        key: &'a [u8],
    },
    NoManifest,
    Error {
        code: ErrorCode,
        reason: &'a str,
    },
    /// Which attempt of its job the sender of a Store stream is (1, 2, … across retries and
    /// restarts of the sending process).
    Attempt {
        attempt: u64,
    },
    /// Filler on a Bench stream, counted and dropped by the receiver.
    BenchData {
        data: &'a [u8],
    },
    /// The receiver's count of a Bench stream's data, sent once the sender finished its side:
    /// `bytes` of BenchData payload, `micros` from the first of it to the end.
    BenchReceived {
        bytes: u64,
        micros: u64,
    },
}

/// A frame the codec refused; the connection is closed with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    #[error("{kind} frame of {len} bytes exceeds its bound of {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} frame is malformed: {detail}")]
    Malformed {
        kind: &'static str,
        detail: &'static str,
    },
}

/// A decoded frame header: the type is known and the length is within that type's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: usize,
}

impl Frame<'_> {
    /// The frame type's name, for messages (never the payload: it can be megabytes).
    pub fn name(&self) -> &'static str {
        kind_name(match self {
            Frame::Hello { .. } => 1,
            Frame::Welcome { .. } => 2,
            Frame::Query { .. } => 3,
            Frame::Missing { .. } => 4,
            Frame::Chunk { .. } => 5,
            Frame::Flush { .. } => 6,
            Frame::Ack { .. } => 7,
            Frame::ManifestPart { .. } => 8,
            Frame::Commit { .. } => 9,
            Frame::Committed { .. } => 10,
            Frame::Fetch { .. } => 11,
            Frame::GetManifest { .. } => 12,
            Frame::NoManifest => 13,
            Frame::Error { .. } => 14,
            Frame::Attempt { .. } => 15,
            Frame::BenchData { .. } => 16,
            Frame::BenchReceived { .. } => 17,
        })
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "Hello",
        2 => "Welcome",
        3 => "Query",
        4 => "Missing",
        5 => "Chunk",
        6 => "Flush",
        7 => "Ack",
        8 => "ManifestPart",
        9 => "Commit",
        10 => "Committed",
        11 => "Fetch",
        12 => "GetManifest",
        13 => "NoManifest",
        14 => "Error",
        15 => "Attempt",
        16 => "BenchData",
        17 => "BenchReceived",
        _ => "unknown",
    }
}

fn payload_bound(kind: u8) -> Option<usize> {
    let str_max = 2 + NAME_BYTES_MAX;
    Some(match kind {
        1 => 5 + 3 * str_max,
        2 => 2 + str_max + 8,
        3 | 11 => 12 + IDS_PER_FRAME_MAX * 32,
        4 => 12 + IDS_PER_FRAME_MAX.div_ceil(8),
        5 => FRAME_PAYLOAD_BYTES_MAX,
        6 => 8,
        7 => 24,
        8 => 48 + MANIFEST_PART_BYTES_MAX,
        9 | 10 => 32,
        12 => 5 + KEY_BYTES_MAX,
        13 => 0,
        14 => 4 + REASON_BYTES_MAX,
        15 => 8,
        16 => CHUNK_BYTES_MAX,
        17 => 16,
        _ => return None,
    })
}

impl Header {
    /// Checks a header before any payload byte is read or buffered.
    pub fn decode(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<Header, FrameError> {
        let kind = bytes[0];
        let max = payload_bound(kind).ok_or(FrameError::UnknownType(kind))?;
        if bytes[1..4] != [0, 0, 0] {
            return Err(FrameError::Reserved);
        }
        let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        if len > max {
            return Err(FrameError::TooLong {
                kind: kind_name(kind),
                len,
                max,
            });
        }
        Ok(Header { kind, len })
    }
}

/// Reads fields off a payload, failing (never panicking) when it runs short.
struct Cursor<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn malformed(&self, detail: &'static str) -> FrameError {
        FrameError::Malformed {
            kind: self.kind,
            detail,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(self.malformed("payload shorter than its fields"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn id(&mut self) -> Result<[u8; 32], FrameError> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn str(&mut self, max: usize) -> Result<&'a str, FrameError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(self.malformed("string longer than its bound"));
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| self.malformed("string is not UTF-8"))
    }
    fn ids(&mut self) -> Result<IdList<'a>, FrameError> {
        let count = self.u32()? as usize;
        if count == 0 || count > IDS_PER_FRAME_MAX {
            return Err(self.malformed("id count must be 1..=1024"));
        }
        Ok(IdList(self.take(count * 32)?))
    }
    fn end(self) -> Result<(), FrameError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the last field"))
        }
    }
}

/// Decodes one frame payload whose header was accepted by [`Header::decode`].
pub fn decode(header: Header, payload: &[u8]) -> Result<Frame<'_>, FrameError> {
    debug_assert_eq!(payload.len(), header.len);
    let mut c = Cursor {
        bytes: payload,
        kind: kind_name(header.kind),
    };
    let frame = match header.kind {
        1 => {
            let version_min = c.u16()?;
            let version_max = c.u16()?;
            let purpose = Purpose::from_u8(c.u8()?).ok_or(c.malformed("unknown purpose"))?;
            Frame::Hello {
                version_min,
                version_max,
                purpose,
                site: c.str(NAME_BYTES_MAX)?,
                tier: c.str(NAME_BYTES_MAX)?,
                job: c.str(NAME_BYTES_MAX)?,
            }
        }
        2 => Frame::Welcome {
            version: c.u16()?,
            site: c.str(NAME_BYTES_MAX)?,
            unacked_bytes_max: c.u64()?,
        },
        3 => Frame::Query {
            seq: c.u64()?,
            ids: c.ids()?,
        },
        4 => {
            let seq = c.u64()?;
            let count = c.u32()?;
            if count == 0 || count as usize > IDS_PER_FRAME_MAX {
                return Err(c.malformed("id count must be 1..=1024"));
            }
            let bitmap = c.take((count as usize).div_ceil(8))?;
            let spare_bits = bitmap.len() * 8 - count as usize;
            if spare_bits > 0 && bitmap[bitmap.len() - 1] >> (8 - spare_bits) != 0 {
                return Err(c.malformed("bits set beyond the id count"));
            }
            Frame::Missing { seq, count, bitmap }
        }
        5 => {
            let id = c.id()?;
            let codec = c.u8()?;
            let raw_len = c.u32()?;
            let payload = c.take(c.bytes.len())?;
            check_chunk_fields(codec, raw_len, payload.len())?;
            Frame::Chunk {
                id,
                codec,
                raw_len,
                payload,
            }
        }
        6 => Frame::Flush { seq: c.u64()? },
        7 => Frame::Ack {
            chunks: c.u64()?,
            bytes: c.u64()?,
            flush_seq: c.u64()?,
        },
        8 => {
            let id = c.id()?;
            let total = c.u64()?;
            let offset = c.u64()?;
            let data = c.take(c.bytes.len())?;
            if offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > total)
            {
                return Err(c.malformed("part extends beyond the manifest's total"));
            }
            Frame::ManifestPart {
                id,
                total,
                offset,
                data,
            }
        }
        9 => Frame::Commit { id: c.id()? },
        10 => Frame::Committed { id: c.id()? },
        11 => Frame::Fetch {
            seq: c.u64()?,
            ids: c.ids()?,
        },
        12 => {
            let by = c.u8()?;
            if by > 1 {
                return Err(c.malformed("unknown lookup kind"));
            }
            let len = c.u32()? as usize;
            if len > KEY_BYTES_MAX {
                return Err(c.malformed("key longer than its bound"));
            }
            Frame::GetManifest {
                by_source: by == 1,
                key: c.take(len)?,
            }
        }
        13 => Frame::NoManifest,
        14 => Frame::Error {
            code: ErrorCode::from_u16(c.u16()?),
            reason: c.str(REASON_BYTES_MAX)?,
        },
        15 => Frame::Attempt { attempt: c.u64()? },
        16 => Frame::BenchData {
            data: c.take(payload.len())?,
        },
        17 => Frame::BenchReceived {
            bytes: c.u64()?,
            micros: c.u64()?,
        },
        other => return Err(FrameError::UnknownType(other)),
    };
    c.end()?;
    Ok(frame)
}

/// Appends the encoding of `frame` (header and payload) to `out`.
///
/// Panics if a field exceeds the bound the decoder enforces: that is a bug in the caller,
/// and sending it would only make the peer close the connection.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    let put_str = |out: &mut Vec<u8>, s: &str, max: usize| {
        assert!(s.len() <= max, "string field of {} bytes", s.len());
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let kind: u8 = match frame {
        Frame::Hello {
            version_min,
            version_max,
            purpose,
            site,
            tier,
            job,
        } => {
            out.extend_from_slice(&version_min.to_le_bytes());
            out.extend_from_slice(&version_max.to_le_bytes());
            out.push(*purpose as u8);
            put_str(out, site, NAME_BYTES_MAX);
            put_str(out, tier, NAME_BYTES_MAX);
            put_str(out, job, NAME_BYTES_MAX);
            1
        }
        Frame::Welcome {
            version,
            site,
            unacked_bytes_max,
        } => {
            out.extend_from_slice(&version.to_le_bytes());
            put_str(out, site, NAME_BYTES_MAX);
            out.extend_from_slice(&unacked_bytes_max.to_le_bytes());
            2
        }
        Frame::Query { seq, ids } | Frame::Fetch { seq, ids } => {
            assert!(!ids.is_empty() && ids.len() <= IDS_PER_FRAME_MAX);
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            out.extend_from_slice(ids.0);
            if matches!(frame, Frame::Query { .. }) {
                3
            } else {
                11
            }
        }
        Frame::Missing { seq, count, bitmap } => {
            assert_eq!(bitmap.len(), (*count as usize).div_ceil(8));
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            out.extend_from_slice(bitmap);
            4
        }
        Frame::Chunk {
            id,
            codec,
            raw_len,
            payload,
        } => {
            assert!(payload.len() <= CHUNK_BYTES_MAX);
            out.extend_from_slice(id);
            out.push(*codec);
            out.extend_from_slice(&raw_len.to_le_bytes());
            out.extend_from_slice(payload);
            5
        }
        Frame::Flush { seq } => {
            out.extend_from_slice(&seq.to_le_bytes());
            6
        }
        Frame::Ack {
            chunks,
            bytes,
            flush_seq,
        } => {
            out.extend_from_slice(&chunks.to_le_bytes());
            out.extend_from_slice(&bytes.to_le_bytes());
            out.extend_from_slice(&flush_seq.to_le_bytes());
            7
        }
        Frame::ManifestPart {
            id,
            total,
            offset,
            data,
        } => {
            assert!(data.len() <= MANIFEST_PART_BYTES_MAX);
            out.extend_from_slice(id);
            out.extend_from_slice(&total.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(data);
            8
        }
        Frame::Commit { id } => {
            out.extend_from_slice(id);
            9
        }
        Frame::Committed { id } => {
            out.extend_from_slice(id);
            10
        }
        Frame::GetManifest { by_source, key } => {
            assert!(key.len() <= KEY_BYTES_MAX);
            out.push(*by_source as u8);
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key);
            12
        }
        Frame::NoManifest => 13,
        Frame::Error { code, reason } => {
            out.extend_from_slice(&(*code as u16).to_le_bytes());
            // Reasons are for humans; cut rather than fail (on a char boundary).
            let mut end = reason.len().min(REASON_BYTES_MAX);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            put_str(out, &reason[..end], REASON_BYTES_MAX);
            14
        }
        Frame::Attempt { attempt } => {
            out.extend_from_slice(&attempt.to_le_bytes());
            15
        }
        Frame::BenchData { data } => {
            assert!(data.len() <= CHUNK_BYTES_MAX);
            out.extend_from_slice(data);
            16
        }
        Frame::BenchReceived { bytes, micros } => {
            out.extend_from_slice(&bytes.to_le_bytes());
            out.extend_from_slice(&micros.to_le_bytes());
            17
        }
    };
    let len = out.len() - start - FRAME_HEADER_BYTES;
    out[start] = kind;
    out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
}

/// The type byte of a Chunk frame.
pub const CHUNK_KIND: u8 = 5;

/// The fixed fields of a Chunk frame (id, codec, raw_len) after its 8-byte header.
pub const CHUNK_FIELDS_BYTES: usize = CHUNK_FIXED_BYTES;

/// The rules a Chunk frame's fields obey, for decoders that read its payload separately.
pub fn check_chunk_fields(codec: u8, raw_len: u32, payload_len: usize) -> Result<(), FrameError> {
    let malformed = |detail| FrameError::Malformed {
        kind: "Chunk",
        detail,
    };
    if raw_len == 0 || raw_len as usize > CHUNK_BYTES_MAX {
        return Err(malformed("raw_len must be 1..=4 MiB"));
    }
    match codec {
        0 if payload_len != raw_len as usize => {
            Err(malformed("raw chunk whose payload length is not raw_len"))
        }
        1 if payload_len == 0 || payload_len > raw_len as usize => {
            Err(malformed("compressed chunk larger than its plaintext"))
        }
        0 | 1 => Ok(()),
        _ => Err(malformed("unknown codec")),
    }
}

/// Header of a Chunk frame, for senders that write the payload separately (no copy into one
/// buffer): the result is the frame header followed by the chunk's fixed fields.
pub fn chunk_frame_prefix(id: &[u8; 32], codec: u8, raw_len: u32, payload_len: usize) -> [u8; 45] {
    assert!(payload_len <= CHUNK_BYTES_MAX);
    let mut out = [0u8; 45];
    out[0] = 5;
    out[4..8].copy_from_slice(&((CHUNK_FIXED_BYTES + payload_len) as u32).to_le_bytes());
    out[8..40].copy_from_slice(id);
    out[40] = codec;
    out[41..45].copy_from_slice(&raw_len.to_le_bytes());
    out
}

/// Header of a BenchData frame of `len` payload bytes, for senders that write the payload
/// separately.
pub fn bench_data_header(len: usize) -> [u8; FRAME_HEADER_BYTES] {
    assert!(len <= CHUNK_BYTES_MAX);
    let mut out = [0u8; FRAME_HEADER_BYTES];
    out[0] = 16;
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    out
}

/// Builds an id list for encoding from contiguous ids.
pub fn id_list(ids: &[[u8; 32]]) -> IdList<'_> {
    IdList(ids.as_flattened())
}

/// Splits a byte stream into frames: feed bytes, take frames. Holds at most one frame.
/// Used by the fuzz targets and by tests; the quinn glue reads exact lengths instead.
pub fn decode_all(mut bytes: &[u8], mut each: impl FnMut(Frame<'_>)) -> Result<(), FrameError> {
    while !bytes.is_empty() {
        if bytes.len() < FRAME_HEADER_BYTES {
            return Err(FrameError::Malformed {
                kind: "stream",
                detail: "ends inside a frame header",
            });
        }
        let header = Header::decode(bytes[..FRAME_HEADER_BYTES].try_into().expect("8"))?;
        let rest = &bytes[FRAME_HEADER_BYTES..];
        if rest.len() < header.len {
            return Err(FrameError::Malformed {
                kind: kind_name(header.kind),
                detail: "stream ends inside the payload",
            });
        }
        each(decode(header, &rest[..header.len])?);
        bytes = &rest[header.len..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(frame: Frame<'_>) {
        let mut out = Vec::new();
        encode(&frame, &mut out);
        let mut seen = Vec::new();
        decode_all(&out, |f| seen.push(format!("{f:?}"))).unwrap();
        assert_eq!(seen, vec![format!("{frame:?}")]);
    }

    #[test]
    fn every_frame_type_round_trips() {
        let ids = [[7u8; 32], [9u8; 32]];
        roundtrip(Frame::Hello {
            version_min: 1,
            version_max: 3,
            purpose: Purpose::Store,
            site: "onprem",
            tier: "hot",
            job: "b-1",
        });
        roundtrip(Frame::Welcome {
            version: 1,
            site: "dr",
            unacked_bytes_max: 1 << 30,
        });
        roundtrip(Frame::Query {
            seq: 4,
            ids: id_list(&ids),
        });
        roundtrip(Frame::Missing {
            seq: 4,
            count: 2,
            bitmap: &[0b10],
        });
        roundtrip(Frame::Chunk {
            id: [1; 32],
            codec: 0,
            raw_len: 3,
            payload: b"abc",
        });
        roundtrip(Frame::Flush { seq: 9 });
        roundtrip(Frame::Ack {
            chunks: 1,
            bytes: 2,
            flush_seq: 3,
        });
        roundtrip(Frame::ManifestPart {
            id: [2; 32],
            total: 10,
            offset: 4,
            data: b"xyz",
        });
        roundtrip(Frame::Commit { id: [3; 32] });
        roundtrip(Frame::Committed { id: [3; 32] });
        roundtrip(Frame::Fetch {
            seq: 1,
            ids: id_list(&ids[..1]),
        });
        roundtrip(Frame::GetManifest {
            by_source: true,
            key: b"/data",
        });
        roundtrip(Frame::NoManifest);
        roundtrip(Frame::Error {
            code: ErrorCode::Refused,
            reason: "no",
        });
        roundtrip(Frame::Attempt { attempt: 3 });
        roundtrip(Frame::BenchData { data: b"filler" });
        roundtrip(Frame::BenchReceived {
            bytes: 1 << 30,
            micros: 5_000_000,
        });
    }

    #[test]
    fn bench_frames_have_their_layout_and_bounds() {
        let mut out = Vec::new();
        encode(&Frame::BenchData { data: b"ab" }, &mut out);
        assert_eq!(out, [16, 0, 0, 0, 2, 0, 0, 0, b'a', b'b']);
        assert_eq!(bench_data_header(2), out[..8]);
        let mut too_long = [16u8, 0, 0, 0, 0, 0, 0, 0];
        too_long[4..].copy_from_slice(&(CHUNK_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&too_long),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            Header::decode(&[17, 0, 0, 0, 17, 0, 0, 0]),
            Err(FrameError::TooLong { .. })
        ));
        out.clear();
        encode(
            &Frame::BenchReceived {
                bytes: 3,
                micros: 4,
            },
            &mut out,
        );
        assert_eq!(out.len(), 24);
        assert!(decode_all(&out[..23], |_| {}).is_err());
        // A Bench Hello reads back; a version-2 build refused purpose 4 as unknown.
        roundtrip(Frame::Hello {
            version_min: BENCH_VERSION,
            version_max: VERSION_MAX,
            purpose: Purpose::Bench,
            site: "a",
            tier: "",
            job: "bench",
        });
        assert_eq!(Purpose::from_u8(5), None);
    }

    #[test]
    fn an_attempt_frame_has_its_layout_and_bound() {
        let mut out = Vec::new();
        encode(&Frame::Attempt { attempt: 0x0102 }, &mut out);
        assert_eq!(out, [15, 0, 0, 0, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Header::decode(&[15, 0, 0, 0, 9, 0, 0, 0]),
            Err(FrameError::TooLong { .. })
        ));
        assert!(decode_all(&out[..15], |_| {}).is_err());
    }

    #[test]
    fn a_superseded_error_keeps_its_code_across_the_wire() {
        let frame = Frame::Error {
            code: ErrorCode::Superseded,
            reason: "attempt 1 of job b-3 superseded by attempt 2",
        };
        roundtrip(frame);
        let mut out = Vec::new();
        encode(&frame, &mut out);
        assert_eq!(u16::from_le_bytes([out[8], out[9]]), 7);
        // Codes this build does not know still read (as Internal).
        assert_eq!(ErrorCode::from_u16(8), ErrorCode::Internal);
    }

    #[test]
    fn a_no_space_error_keeps_its_code_across_the_wire() {
        let frame = Frame::Error {
            code: ErrorCode::NoSpace,
            reason: "tier \"hot\" at site b is full (ENOSPC)",
        };
        roundtrip(frame);
        let mut out = Vec::new();
        encode(&frame, &mut out);
        assert_eq!(u16::from_le_bytes([out[8], out[9]]), 6);
    }

    #[test]
    fn oversized_lengths_are_refused_from_the_header() {
        let mut header = [5u8, 0, 0, 0, 0, 0, 0, 0];
        header[4..].copy_from_slice(&((FRAME_PAYLOAD_BYTES_MAX + 1) as u32).to_le_bytes());
        assert!(matches!(
            Header::decode(&header),
            Err(FrameError::TooLong { .. })
        ));
        let header = [6u8, 0, 0, 0, 9, 0, 0, 0];
        assert!(matches!(
            Header::decode(&header),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(
            Header::decode(&[99, 0, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnknownType(99))
        );
        assert_eq!(
            Header::decode(&[6, 1, 0, 0, 8, 0, 0, 0]),
            Err(FrameError::Reserved)
        );
    }

    #[test]
    fn inconsistent_chunk_and_missing_frames_are_refused() {
        let mut out = Vec::new();
        encode(
            &Frame::Chunk {
                id: [1; 32],
                codec: 0,
                raw_len: 3,
                payload: b"abc",
            },
            &mut out,
        );
        out[8 + 33] = 4; // raw_len 4 with a 3-byte raw payload
        assert!(decode_all(&out, |_| {}).is_err());
        let mut out = Vec::new();
        encode(
            &Frame::Missing {
                seq: 1,
                count: 3,
                bitmap: &[0b111],
            },
            &mut out,
        );
        out[8 + 12] = 0xff; // bits beyond the count
        assert!(decode_all(&out, |_| {}).is_err());
    }

    #[test]
    fn chunk_prefix_matches_the_encoder() {
        let mut out = Vec::new();
        encode(
            &Frame::Chunk {
                id: [4; 32],
                codec: 1,
                raw_len: 10,
                payload: b"12345",
            },
            &mut out,
        );
        assert_eq!(&out[..45], &chunk_frame_prefix(&[4; 32], 1, 10, 5));
    }

    /// Field values for any frame type; [`frame_of`] builds a valid frame from them.
    #[derive(Debug, Clone)]
    struct Fields {
        kind: u8,
        numbers: [u64; 3],
        id: [u8; 32],
        bytes: Vec<u8>,
        text: String,
        count: usize,
    }

    fn fields() -> impl Strategy<Value = Fields> {
        (
            1u8..=15,
            any::<[u64; 3]>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u8>(), 1..300),
            "[a-z0-9.-]{0,40}",
            1usize..=40,
        )
            .prop_map(|(kind, numbers, id, bytes, text, count)| Fields {
                kind,
                numbers,
                id,
                bytes,
                text,
                count,
            })
    }

    /// A valid frame of type `f.kind` borrowing from `f` (and `ids`, `bitmap`).
    fn frame_of<'a>(f: &'a Fields, ids: &'a [[u8; 32]], bitmap: &'a [u8]) -> Frame<'a> {
        let [a, b, c] = f.numbers;
        match f.kind {
            1 => Frame::Hello {
                version_min: a as u16,
                version_max: b as u16,
                purpose: [Purpose::Store, Purpose::Control, Purpose::Fetch][c as usize % 3],
                site: &f.text,
                tier: &f.text[..f.text.len() / 2],
                job: "",
            },
            2 => Frame::Welcome {
                version: a as u16,
                site: &f.text,
                unacked_bytes_max: b,
            },
            3 => Frame::Query {
                seq: a,
                ids: id_list(ids),
            },
            4 => Frame::Missing {
                seq: a,
                count: f.count as u32,
                bitmap,
            },
            5 => {
                let lz4 = b % 2 == 1;
                Frame::Chunk {
                    id: f.id,
                    codec: lz4 as u8,
                    raw_len: f.bytes.len() as u32 + if lz4 { (c % 1000) as u32 } else { 0 },
                    payload: &f.bytes,
                }
            }
            6 => Frame::Flush { seq: a },
            7 => Frame::Ack {
                chunks: a,
                bytes: b,
                flush_seq: c,
            },
            8 => {
                let offset = a % (1 << 40);
                Frame::ManifestPart {
                    id: f.id,
                    total: offset + f.bytes.len() as u64 + b % 1000,
                    offset,
                    data: &f.bytes,
                }
            }
            9 => Frame::Commit { id: f.id },
            10 => Frame::Committed { id: f.id },
            11 => Frame::Fetch {
                seq: a,
                ids: id_list(ids),
            },
            12 => Frame::GetManifest {
                by_source: a % 2 == 1,
                key: &f.bytes,
            },
            13 => Frame::NoManifest,
            14 => Frame::Error {
                code: ErrorCode::from_u16(a as u16 % 8),
                reason: &f.text,
            },
            _ => Frame::Attempt { attempt: a },
        }
    }

    proptest! {
        /// Any valid frame decodes to itself, its header states its length, and every strict
        /// prefix of its encoding is refused.
        #[test]
        fn frames_round_trip_and_no_prefix_decodes(f in fields()) {
            let ids: Vec<[u8; 32]> = (0..f.count).map(|i| { let mut id = f.id; id[0] ^= i as u8; id }).collect();
            let mut bitmap = vec![0u8; f.count.div_ceil(8)];
            for i in 0..f.count {
                if f.bytes[i % f.bytes.len()] % 2 == 1 {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
            let frame = frame_of(&f, &ids, &bitmap);
            let mut out = Vec::new();
            encode(&frame, &mut out);
            let header = Header::decode(out[..FRAME_HEADER_BYTES].try_into().unwrap()).unwrap();
            prop_assert_eq!(header.kind, f.kind);
            prop_assert_eq!(header.len + FRAME_HEADER_BYTES, out.len());
            prop_assert_eq!(decode(header, &out[FRAME_HEADER_BYTES..]), Ok(frame));
            for cut in 1..out.len() {
                prop_assert!(decode_all(&out[..cut], |_| ()).is_err(), "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes, |_| {});
        }

        #[test]
        fn truncation_is_always_an_error(cut in 0usize..60) {
            let mut out = Vec::new();
            encode(&Frame::Hello { version_min: 1, version_max: 1, purpose: Purpose::Fetch, site: "a", tier: "hot", job: "j" }, &mut out);
            encode(&Frame::Commit { id: [5; 32] }, &mut out);
            let cut = cut.min(out.len() - 1);
            let refused = decode_all(&out[..cut], |_| ()).is_err();
            prop_assert!(refused || cut == 0 || cut == 24);
        }
    }
}
