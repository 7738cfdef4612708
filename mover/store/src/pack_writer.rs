//! Writes chunk records into a pack, one pack per worker at a time.
//!
//! Records are appended with positioned writes straight from the worker's buffers. Nothing is
//! findable until `seal`: the footer is written, the file and its directory entry are made
//! durable, and only then does the caller commit the returned entries to the index.

use std::sync::Arc;

use super::backend::{Appender, Backend};
use super::index::SealedPack;
use super::pack_key;
use mover_format::error::Result;
use mover_format::pack::{
    encode_footer, pack_header, FooterEntry, RecordHeader, PACK_HEADER_BYTES,
};

pub struct PackWriter {
    pack_id: u64,
    tier: String,
    appender: Box<dyn Appender>,
    entries: Vec<FooterEntry>,
}

impl PackWriter {
    /// `target_bytes`: the size at which the caller seals the pack (space is reserved for it).
    pub fn create(backend: &Arc<dyn Backend>, tier: &str, target_bytes: u64) -> Result<PackWriter> {
        loop {
            let pack_id: u64 = rand::random();
            let key = pack_key(pack_id);
            // Random 64-bit ids: a clash is astronomically unlikely, but create_new makes it
            // an error rather than an overwrite, and we simply draw again.
            if backend.exists(&key)? {
                continue;
            }
            let mut appender = backend.create_appender(&key, target_bytes)?;
            appender.append(&[&pack_header()])?;
            return Ok(PackWriter {
                pack_id,
                tier: tier.to_string(),
                appender,
                entries: Vec::new(),
            });
        }
    }

    pub fn append(&mut self, header: &RecordHeader, payload: &[u8]) -> Result<()> {
        self.append_parts(header, &[payload])
    }

    /// Appends a record whose payload is the concatenation of `parts`.
    pub fn append_parts(&mut self, header: &RecordHeader, parts: &[&[u8]]) -> Result<()> {
        debug_assert_eq!(
            parts.iter().map(|p| p.len()).sum::<usize>(),
            header.stored_len as usize
        );
        let encoded = header.encode();
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.push(&encoded[..]);
        all.extend_from_slice(parts);
        let offset = self.appender.append(&all)?;
        self.entries.push(FooterEntry {
            id: header.id,
            offset,
            stored_len: header.stored_len,
            raw_len: header.raw_len,
            codec: header.codec,
        });
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.appender.len()
    }

    /// Records appended so far.
    pub fn records(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the footer and makes the pack durable.
    pub fn seal(mut self) -> Result<SealedPack> {
        let footer_offset = self.appender.len();
        debug_assert!(footer_offset >= PACK_HEADER_BYTES as u64);
        self.appender
            .append(&[&encode_footer(&self.entries, footer_offset)])?;
        let bytes = self.appender.len();
        self.appender.finish_durable()?;
        Ok(SealedPack {
            pack_id: self.pack_id,
            tier: self.tier,
            entries: self.entries,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::direct::{reopen_direct, STAGE_BYTES};
    use crate::pack_reader::read_footer;
    use crate::LocalDir;
    use mover_format::pack::{open_record, FOOTER_ENTRY_BYTES, RECORD_HEADER_BYTES, TRAILER_BYTES};
    use mover_format::{ChunkId, Codec};

    /// Direct-I/O alignment (the device's logical block).
    const ALIGN: usize = 4096;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let dir = tempfile::tempdir().unwrap();
        // Without O_DIRECT the appender writes buffered and the aligned path goes untested.
        let probe = std::fs::File::create(dir.path().join("probe")).unwrap();
        if let Err(e) = reopen_direct(&probe) {
            panic!(
                "{} refuses O_DIRECT ({e}): run this test where the temporary directory takes it",
                dir.path().display()
            );
        }
        let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(dir.path()));
        (dir, backend)
    }

    /// `len` bytes that lz4 cannot shrink (xorshift).
    fn data(len: usize, seed: u8) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed as u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    /// Writes `chunks` into a new pack (lz4 where it shrinks them) and seals it.
    fn write_pack(backend: &Arc<dyn Backend>, chunks: &[Vec<u8>]) -> SealedPack {
        let mut writer = PackWriter::create(backend, "hot", 8 << 20).unwrap();
        assert!(writer.is_empty());
        for chunk in chunks {
            let compressed = lz4_flex::block::compress(chunk);
            let (codec, payload) = if compressed.len() < chunk.len() {
                (Codec::Lz4, compressed)
            } else {
                (Codec::Raw, chunk.clone())
            };
            let header = RecordHeader::new(ChunkId::of(chunk), codec, chunk.len(), &payload);
            // Some records go in as several parts, as a receiver appends pieces.
            let parts: Vec<&[u8]> = payload.chunks(1000 + chunk.len() % 3000).collect();
            writer.append_parts(&header, &parts).unwrap();
        }
        writer.seal().unwrap()
    }

    /// Every record read back by its footer entry: header, payload checksum, id.
    fn check_pack(backend: &Arc<dyn Backend>, sealed: &SealedPack, chunks: &[Vec<u8>]) {
        let key = pack_key(sealed.pack_id);
        let len = backend.size(&key).unwrap();
        assert_eq!(len, sealed.bytes, "sealed length vs file length");
        let footer = read_footer(&key, len, |offset, n, buf| {
            backend.read_range(&key, offset, n, buf)
        })
        .unwrap();
        assert_eq!(footer, sealed.entries);
        assert_eq!(footer.len(), chunks.len());
        let mut expected_offset = PACK_HEADER_BYTES as u64;
        let mut record = Vec::new();
        let mut plaintext = Vec::new();
        for (entry, chunk) in footer.iter().zip(chunks) {
            assert_eq!(entry.offset, expected_offset, "records are back to back");
            assert_eq!(entry.id, ChunkId::of(chunk));
            let record_len = RECORD_HEADER_BYTES + entry.stored_len as usize;
            backend
                .read_range(&key, entry.offset, record_len, &mut record)
                .unwrap();
            let header = RecordHeader::decode(&record[..RECORD_HEADER_BYTES]).unwrap();
            assert_eq!((header.id, header.codec), (entry.id, entry.codec));
            open_record(&header, &record[RECORD_HEADER_BYTES..], &mut plaintext).unwrap();
            assert_eq!(&plaintext, chunk);
            expected_offset += record_len as u64;
        }
        let footer_offset = expected_offset;
        assert_eq!(
            footer_offset + (footer.len() * FOOTER_ENTRY_BYTES + TRAILER_BYTES) as u64,
            len,
            "footer and trailer follow the last record, nothing after"
        );
    }

    #[test]
    fn a_sealed_pack_reads_back_record_for_record() {
        let (_dir, backend) = backend();
        let chunks: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                if i % 3 == 0 {
                    vec![i; 3000 + i as usize * 100]
                } else {
                    data(1 + i as usize * 997, i)
                }
            })
            .collect();
        let sealed = write_pack(&backend, &chunks);
        assert_eq!(sealed.tier, "hot");
        assert!(sealed.entries.iter().any(|e| e.codec == Codec::Lz4));
        assert!(sealed.entries.iter().any(|e| e.codec == Codec::Raw));
        check_pack(&backend, &sealed, &chunks);
    }

    #[test]
    fn records_crossing_the_direct_io_alignment_and_the_staging_buffers_keep_their_bytes() {
        let (_dir, backend) = backend();
        // Records that end just before, on and just after 4 KiB boundaries and the 1 MiB
        // staging buffers' edges, one spanning two buffers, one of a single byte.
        let stage = STAGE_BYTES as u64;
        let align = ALIGN as u64;
        let ends = [
            align - 1,
            2 * align,
            3 * align + 1,
            3 * align + 1 + RECORD_HEADER_BYTES as u64 + 1,
            stage - 1,
            stage + align,
            3 * stage + 1,
            3 * stage + align + 200,
        ];
        let mut start = PACK_HEADER_BYTES as u64;
        let chunks: Vec<Vec<u8>> = ends
            .iter()
            .enumerate()
            .map(|(i, &end)| {
                let payload = end - start - RECORD_HEADER_BYTES as u64;
                start = end;
                data(payload as usize, i as u8 + 1)
            })
            .collect();
        let sealed = write_pack(&backend, &chunks);
        let written: Vec<u64> = sealed
            .entries
            .iter()
            .map(|e| e.offset + RECORD_HEADER_BYTES as u64 + e.stored_len as u64)
            .collect();
        assert_eq!(written, ends, "records are stored raw, back to back");
        check_pack(&backend, &sealed, &chunks);
    }

    #[test]
    fn an_empty_pack_seals_to_a_header_and_a_trailer() {
        let (_dir, backend) = backend();
        let sealed = write_pack(&backend, &[]);
        assert_eq!(sealed.bytes, (PACK_HEADER_BYTES + TRAILER_BYTES) as u64);
        check_pack(&backend, &sealed, &[]);
    }

    #[test]
    fn a_writer_dropped_before_its_seal_leaves_no_pack_behind() {
        let (_dir, backend) = backend();
        let mut writer = PackWriter::create(&backend, "hot", 8 << 20).unwrap();
        let chunk = data(10_000, 9);
        let header = RecordHeader::new(ChunkId::of(&chunk), Codec::Raw, chunk.len(), &chunk);
        writer.append(&header, &chunk).unwrap();
        let key = pack_key(writer.pack_id);
        assert!(backend.exists(&key).unwrap());
        drop(writer);
        assert!(!backend.exists(&key).unwrap(), "an unsealed pack was left");
        assert!(backend.list("packs").unwrap().is_empty());
    }

    #[test]
    fn a_sealed_pack_is_durable_bytes_not_a_preallocated_tail() {
        // The pack was given its target size up front; the seal cuts it to what was written.
        let (dir, backend) = backend();
        let chunks = [data(100_000, 3)];
        let sealed = write_pack(&backend, &chunks);
        let key = pack_key(sealed.pack_id);
        let path = dir.path().join(&key);
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), sealed.bytes);
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, sealed.bytes - 8).unwrap();
        assert_eq!(&magic, b"MVPKEND1");
    }
}
