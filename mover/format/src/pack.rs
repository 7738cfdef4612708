//! Pack files: append-only sequences of chunk records, sealed by a footer index.
//!
//! ```text
//! pack    = header record* footer trailer
//! header  = "MVPACK\0\0" version:u32=1 reserved:u32=0                       (16 bytes)
//! record  = "MVR1" codec:u8 flags:u8=0 reserved:u16=0 raw_len:u32 stored_len:u32
//!           id:[32] payload_xxh3:u64 header_xxh3:u64 payload[stored_len]      (64 + stored_len)
//! footer  = entry*  entry = id:[32] offset:u64 stored_len:u32 raw_len:u32 codec:u8 pad:[3]=0 (52)
//! trailer = entries:u32 reserved:u32=0 footer_offset:u64 footer_xxh3:u64 "MVPKEND1" (32 bytes)
//! ```
//! All integers little-endian. `header_xxh3` covers the first 56 bytes of the record header, so
//! a damaged length is caught before it is trusted; `payload_xxh3` lets a scrub check a record
//! without decompressing or holding keys; `id` (BLAKE3 of the plaintext) is checked after
//! decompression. An unsealed pack (a crash before the footer) is still readable record by
//! record from offset 16.

use super::{read_u32, read_u64, ChunkId, Codec, PieceHasher};
use crate::constants::CHUNK_BYTES_MAX;
use crate::error::Error;
use xxhash_rust::xxh3::xxh3_64;

pub const PACK_MAGIC: &[u8; 8] = b"MVPACK\0\0";
pub const PACK_VERSION: u32 = 1;
pub const PACK_HEADER_BYTES: usize = 16;
pub const RECORD_MAGIC: &[u8; 4] = b"MVR1";
pub const RECORD_HEADER_BYTES: usize = 64;
pub const FOOTER_ENTRY_BYTES: usize = 52;
pub const TRAILER_MAGIC: &[u8; 8] = b"MVPKEND1";
pub const TRAILER_BYTES: usize = 32;

pub fn pack_header() -> [u8; PACK_HEADER_BYTES] {
    let mut header = [0u8; PACK_HEADER_BYTES];
    header[..8].copy_from_slice(PACK_MAGIC);
    header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    header
}

pub fn check_pack_header(bytes: &[u8]) -> Result<(), Error> {
    if bytes.len() < PACK_HEADER_BYTES || &bytes[..8] != PACK_MAGIC {
        return Err(Error::corrupt("pack header", "expected magic MVPACK"));
    }
    let version = read_u32(bytes, 8);
    if version != PACK_VERSION {
        return Err(Error::corrupt(
            "pack header",
            format!("version {version}, expected {PACK_VERSION}"),
        ));
    }
    if read_u32(bytes, 12) != 0 {
        return Err(Error::corrupt("pack header", "reserved bytes are not zero"));
    }
    Ok(())
}

/// The decoded, checked header of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub codec: Codec,
    pub raw_len: u32,
    pub stored_len: u32,
    pub id: ChunkId,
    pub payload_xxh3: u64,
}

impl RecordHeader {
    pub fn new(id: ChunkId, codec: Codec, raw_len: usize, payload: &[u8]) -> RecordHeader {
        debug_assert!(raw_len <= CHUNK_BYTES_MAX);
        debug_assert!(payload.len() <= raw_len);
        RecordHeader {
            codec,
            raw_len: raw_len as u32,
            stored_len: payload.len() as u32,
            id,
            payload_xxh3: xxh3_64(payload),
        }
    }

    /// The header of a record whose payload is the concatenation of `parts`.
    pub fn of_parts(id: ChunkId, codec: Codec, raw_len: usize, parts: &[&[u8]]) -> RecordHeader {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut stored_len = 0;
        for part in parts {
            hasher.update(part);
            stored_len += part.len();
        }
        debug_assert!(raw_len <= CHUNK_BYTES_MAX && stored_len <= raw_len);
        RecordHeader {
            codec,
            raw_len: raw_len as u32,
            stored_len: stored_len as u32,
            id,
            payload_xxh3: hasher.digest(),
        }
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out[..4].copy_from_slice(RECORD_MAGIC);
        out[4] = self.codec as u8;
        out[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        out[16..48].copy_from_slice(&self.id.0);
        out[48..56].copy_from_slice(&self.payload_xxh3.to_le_bytes());
        let check = xxh3_64(&out[..56]);
        out[56..64].copy_from_slice(&check.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<RecordHeader, Error> {
        let bad = |detail: String| Error::corrupt("pack record header", detail);
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(bad(format!(
                "{} bytes, expected {RECORD_HEADER_BYTES}",
                bytes.len()
            )));
        }
        if &bytes[..4] != RECORD_MAGIC {
            return Err(bad("expected magic MVR1".into()));
        }
        if xxh3_64(&bytes[..56]) != read_u64(bytes, 56) {
            return Err(bad("header checksum mismatch".into()));
        }
        let codec =
            Codec::from_u8(bytes[4]).ok_or_else(|| bad(format!("unknown codec {}", bytes[4])))?;
        if bytes[5] != 0 || bytes[6] != 0 || bytes[7] != 0 {
            return Err(bad("reserved bytes are not zero".into()));
        }
        let raw_len = read_u32(bytes, 8);
        let stored_len = read_u32(bytes, 12);
        if raw_len as usize > CHUNK_BYTES_MAX || stored_len > raw_len {
            return Err(bad(format!(
                "lengths raw {raw_len} stored {stored_len}: expected stored <= raw <= {CHUNK_BYTES_MAX}"
            )));
        }
        if codec == Codec::Raw && stored_len != raw_len {
            return Err(bad("raw record with stored length != raw length".into()));
        }
        let mut id = [0u8; 32];
        id.copy_from_slice(&bytes[16..48]);
        Ok(RecordHeader {
            codec,
            raw_len,
            stored_len,
            id: ChunkId(id),
            payload_xxh3: read_u64(bytes, 48),
        })
    }

    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + self.stored_len as u64
    }
}

/// Checks a record's payload against its header and returns the plaintext in `out`.
/// Pair assertion to the writer's: the checksum and the id are verified on every read.
pub fn open_record(header: &RecordHeader, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
    if payload.len() != header.stored_len as usize {
        return Err(Error::corrupt(
            format!("chunk {}", header.id),
            format!(
                "payload is {} bytes, header says {}",
                payload.len(),
                header.stored_len
            ),
        ));
    }
    if xxh3_64(payload) != header.payload_xxh3 {
        return Err(Error::corrupt(
            format!("chunk {}", header.id),
            "payload checksum (xxh3) mismatch",
        ));
    }
    out.clear();
    match header.codec {
        Codec::Raw => out.extend_from_slice(payload),
        Codec::Lz4 => {
            out.resize(header.raw_len as usize, 0);
            let n = lz4_flex::block::decompress_into(payload, out).map_err(|e| {
                Error::corrupt(format!("chunk {}", header.id), format!("lz4 payload: {e}"))
            })?;
            if n != header.raw_len as usize {
                return Err(Error::corrupt(
                    format!("chunk {}", header.id),
                    format!("decompressed to {n} bytes, expected {}", header.raw_len),
                ));
            }
        }
    }
    if ChunkId::of(out) != header.id {
        return Err(Error::corrupt(
            format!("chunk {}", header.id),
            "content hash (BLAKE3) mismatch",
        ));
    }
    Ok(())
}

/// Checks a chunk that arrived from a peer before it is stored: the plaintext (decompressed
/// into `scratch` when needed) must be `raw_len` bytes whose BLAKE3 is `id`. A raw payload is
/// hashed where it lies.
pub fn check_received(
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), Error> {
    let bad = |detail: String| Error::corrupt(format!("received chunk {id}"), detail);
    let plaintext: &[u8] = match codec {
        Codec::Raw => payload,
        Codec::Lz4 => {
            scratch.resize(raw_len as usize, 0);
            let n = lz4_flex::block::decompress_into(payload, scratch)
                .map_err(|e| bad(format!("lz4 payload: {e}")))?;
            &scratch[..n]
        }
    };
    if plaintext.len() != raw_len as usize {
        return Err(bad(format!(
            "{} bytes of plaintext, expected {raw_len}",
            plaintext.len()
        )));
    }
    if ChunkId::of(plaintext) != *id {
        return Err(bad("content hash (BLAKE3) does not match its id".into()));
    }
    Ok(())
}

/// [`check_received`] for a raw chunk still in the pieces it arrived in (the frame decoder
/// checked that they add up to its length): BLAKE3 of the pieces against the id.
pub fn check_received_pieces<P: AsRef<[u8]>>(
    id: &ChunkId,
    pieces: &[P],
    hasher: &mut PieceHasher,
) -> Result<(), Error> {
    if hasher.hash(pieces) != *id {
        return Err(Error::corrupt(
            format!("received chunk {id}"),
            "content hash (BLAKE3) does not match its id",
        ));
    }
    Ok(())
}

/// One footer entry: where a record sits in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FooterEntry {
    pub id: ChunkId,
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub codec: Codec,
}

pub fn encode_footer(entries: &[FooterEntry], footer_offset: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * FOOTER_ENTRY_BYTES + TRAILER_BYTES);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.push(e.codec as u8);
        out.extend_from_slice(&[0u8; 3]);
    }
    let check = xxh3_64(&out);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&footer_offset.to_le_bytes());
    out.extend_from_slice(&check.to_le_bytes());
    out.extend_from_slice(TRAILER_MAGIC);
    out
}

/// Decodes the trailer at the end of a sealed pack of `pack_len` bytes.
/// Returns (entries, footer_offset) after checking they fit in the pack.
pub fn decode_trailer(trailer: &[u8], pack_len: u64) -> Result<(u32, u64, u64), Error> {
    let bad = |detail: String| Error::corrupt("pack trailer", detail);
    if trailer.len() != TRAILER_BYTES || &trailer[24..32] != TRAILER_MAGIC {
        return Err(bad("expected magic MVPKEND1 (pack not sealed?)".into()));
    }
    let entries = read_u32(trailer, 0);
    if read_u32(trailer, 4) != 0 {
        return Err(bad("reserved bytes are not zero".into()));
    }
    let footer_offset = read_u64(trailer, 8);
    let checksum = read_u64(trailer, 16);
    let footer_len = entries as u64 * FOOTER_ENTRY_BYTES as u64;
    let footer_end = footer_offset.checked_add(footer_len);
    if footer_offset < PACK_HEADER_BYTES as u64
        || footer_end != Some(pack_len.saturating_sub(TRAILER_BYTES as u64))
    {
        return Err(bad(format!(
            "footer of {entries} entries at {footer_offset} does not end where the trailer starts"
        )));
    }
    // Each entry names a record of at least a header before the footer: a count past that is
    // refused before a reader sizes a buffer for the footer by it.
    let records_bytes = footer_offset - PACK_HEADER_BYTES as u64;
    if entries as u64 > records_bytes / RECORD_HEADER_BYTES as u64 {
        return Err(bad(format!(
            "{entries} entries, but {records_bytes} bytes of records hold at most {}",
            records_bytes / RECORD_HEADER_BYTES as u64
        )));
    }
    Ok((entries, footer_offset, checksum))
}

pub fn decode_footer(footer: &[u8], checksum: u64) -> Result<Vec<FooterEntry>, Error> {
    let bad = |detail: String| Error::corrupt("pack footer", detail);
    if footer.len() % FOOTER_ENTRY_BYTES != 0 {
        return Err(bad(format!(
            "{} bytes is not a whole number of entries",
            footer.len()
        )));
    }
    if xxh3_64(footer) != checksum {
        return Err(bad("checksum mismatch".into()));
    }
    footer
        .chunks_exact(FOOTER_ENTRY_BYTES)
        .map(|e| {
            let mut id = [0u8; 32];
            id.copy_from_slice(&e[..32]);
            let codec =
                Codec::from_u8(e[48]).ok_or_else(|| bad(format!("unknown codec {}", e[48])))?;
            Ok(FooterEntry {
                id: ChunkId(id),
                offset: read_u64(e, 32),
                stored_len: read_u32(e, 40),
                raw_len: read_u32(e, 44),
                codec,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(data: &[u8], codec: Codec) -> (RecordHeader, Vec<u8>) {
        let payload = match codec {
            Codec::Raw => data.to_vec(),
            Codec::Lz4 => lz4_flex::block::compress(data),
        };
        (
            RecordHeader::new(ChunkId::of(data), codec, data.len(), &payload),
            payload,
        )
    }

    #[test]
    fn a_header_of_parts_equals_the_header_of_their_concatenation() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let parts: Vec<&[u8]> = data.chunks(1452).collect();
        let id = ChunkId::of(&data);
        assert_eq!(
            RecordHeader::of_parts(id, Codec::Raw, data.len(), &parts),
            RecordHeader::new(id, Codec::Raw, data.len(), &data)
        );
    }

    #[test]
    fn record_round_trip_both_codecs() {
        let data = b"hello hello hello hello hello hello".repeat(100);
        for codec in [Codec::Raw, Codec::Lz4] {
            let (header, payload) = record(&data, codec);
            let decoded = RecordHeader::decode(&header.encode()).unwrap();
            assert_eq!(decoded, header);
            let mut out = Vec::new();
            open_record(&decoded, &payload, &mut out).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn every_flipped_bit_in_header_or_payload_is_caught() {
        let data = vec![7u8; 1000];
        let (header, payload) = record(&data, Codec::Lz4);
        let encoded = header.encode();
        for bit in 0..encoded.len() * 8 {
            let mut damaged = encoded;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&damaged).is_err(), "header bit {bit}");
        }
        for bit in 0..payload.len() * 8 {
            let mut damaged = payload.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                open_record(&header, &damaged, &mut Vec::new()).is_err(),
                "payload bit {bit}"
            );
        }
    }

    #[test]
    fn footer_round_trip_and_bounds() {
        let entries: Vec<FooterEntry> = (0..5u8)
            .map(|i| FooterEntry {
                id: ChunkId([i; 32]),
                offset: 16 + i as u64 * 100,
                stored_len: 36,
                raw_len: 40,
                codec: Codec::Lz4,
            })
            .collect();
        let footer_offset = 516;
        let bytes = encode_footer(&entries, footer_offset);
        let pack_len = footer_offset + bytes.len() as u64;
        let trailer = &bytes[bytes.len() - TRAILER_BYTES..];
        let (n, at, check) = decode_trailer(trailer, pack_len).unwrap();
        assert_eq!((n, at), (5, footer_offset));
        let decoded = decode_footer(&bytes[..bytes.len() - TRAILER_BYTES], check).unwrap();
        assert_eq!(decoded, entries);
        assert!(decode_trailer(trailer, pack_len + 1).is_err());
    }

    fn footer_entry(id: [u8; 32], offset: u64, stored_len: u32, lz4: bool) -> FooterEntry {
        FooterEntry {
            id: ChunkId(id),
            offset,
            stored_len,
            raw_len: stored_len.saturating_add(lz4 as u32 * 7),
            codec: if lz4 { Codec::Lz4 } else { Codec::Raw },
        }
    }

    /// The footer and trailer of `entries` placed right after `records_bytes` of records, and
    /// the pack's length.
    fn sealed_tail(entries: &[FooterEntry], records_bytes: u64) -> (Vec<u8>, u64) {
        let footer_offset = PACK_HEADER_BYTES as u64 + records_bytes;
        let tail = encode_footer(entries, footer_offset);
        let pack_len = footer_offset + tail.len() as u64;
        (tail, pack_len)
    }

    /// What a reader of a sealed pack's end does: the trailer, then the footer it points at.
    fn decode_tail(tail: &[u8], pack_len: u64) -> Result<Vec<FooterEntry>, Error> {
        let trailer = &tail[tail.len() - TRAILER_BYTES..];
        let (entries, footer_offset, checksum) = decode_trailer(trailer, pack_len)?;
        let footer_start = tail.len() as u64 - (pack_len - footer_offset);
        let footer = &tail[footer_start as usize..tail.len() - TRAILER_BYTES];
        assert_eq!(footer.len(), entries as usize * FOOTER_ENTRY_BYTES);
        decode_footer(footer, checksum)
    }

    #[test]
    fn a_trailer_with_reserved_bytes_set_is_refused() {
        let entries = [footer_entry([1; 32], 16, 10, false)];
        let (mut tail, pack_len) = sealed_tail(&entries, 74);
        assert_eq!(decode_tail(&tail, pack_len).unwrap(), entries);
        let at = tail.len() - TRAILER_BYTES + 4;
        tail[at] = 1;
        assert!(decode_tail(&tail, pack_len).is_err());
    }

    #[test]
    fn an_entry_count_past_what_the_records_can_hold_is_refused() {
        // 3 entries need at least 3 record headers before the footer; 2 fit in 128 bytes.
        let entries: Vec<FooterEntry> = (0..3u8)
            .map(|i| footer_entry([i; 32], 16 + i as u64 * 40, 0, false))
            .collect();
        let (tail, pack_len) = sealed_tail(&entries, 3 * RECORD_HEADER_BYTES as u64 - 1);
        let err = decode_tail(&tail, pack_len).unwrap_err();
        assert!(err.to_string().contains("hold at most 2"), "{err}");
        let (tail, pack_len) = sealed_tail(&entries, 3 * RECORD_HEADER_BYTES as u64);
        assert_eq!(decode_tail(&tail, pack_len).unwrap(), entries);
        // The largest count a trailer can state, at the place where it would fit by length
        // alone: refused from the trailer, nothing read by it.
        let mut trailer = tail[tail.len() - TRAILER_BYTES..].to_vec();
        trailer[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let footer_offset = 1u64 << 20;
        trailer[8..16].copy_from_slice(&footer_offset.to_le_bytes());
        let pack_len = footer_offset + u32::MAX as u64 * FOOTER_ENTRY_BYTES as u64 + 32;
        assert!(decode_trailer(&trailer, pack_len).is_err());
    }

    proptest! {
        /// Footers round trip, and no single damaged byte of a footer or its trailer goes
        /// unnoticed.
        #[test]
        fn footers_round_trip_and_any_damaged_byte_is_refused(
            raw in proptest::collection::vec(
                (any::<[u8; 32]>(), 0u32..5000, any::<bool>()), 0..24),
            slack in 0u64..10_000,
            at in any::<proptest::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let mut offset = PACK_HEADER_BYTES as u64;
            let entries: Vec<FooterEntry> = raw
                .iter()
                .map(|&(id, stored_len, lz4)| {
                    let entry = footer_entry(id, offset, stored_len, lz4);
                    offset += RECORD_HEADER_BYTES as u64 + stored_len as u64;
                    entry
                })
                .collect();
            let records_bytes = offset - PACK_HEADER_BYTES as u64 + slack;
            let (mut tail, pack_len) = sealed_tail(&entries, records_bytes);
            prop_assert_eq!(tail.len(), entries.len() * FOOTER_ENTRY_BYTES + TRAILER_BYTES);
            prop_assert_eq!(&decode_tail(&tail, pack_len).unwrap(), &entries);
            let at = at.index(tail.len());
            tail[at] ^= mask;
            prop_assert!(decode_tail(&tail, pack_len).is_err(), "byte {} of {}", at, tail.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordHeader::decode(&bytes);
            let _ = check_pack_header(&bytes);
            if bytes.len() >= TRAILER_BYTES {
                let _ = decode_trailer(&bytes[..TRAILER_BYTES], bytes.len() as u64);
            }
            let _ = decode_footer(&bytes, 0);
        }

        #[test]
        fn lz4_bombs_are_bounded(payload in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0u32..(CHUNK_BYTES_MAX as u32)) {
            let header = RecordHeader { codec: Codec::Lz4, raw_len, stored_len: payload.len() as u32, id: ChunkId([0; 32]), payload_xxh3: xxh3_64(&payload) };
            let mut out = Vec::new();
            prop_assert!(open_record(&header, &payload, &mut out).is_err() || out.len() == raw_len as usize);
            prop_assert!(out.capacity() <= CHUNK_BYTES_MAX.max(1));
        }
    }
}
