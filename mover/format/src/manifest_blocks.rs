//! Manifest objects of version 2: the same entries as version 1, written and read one bounded
//! block at a time, so neither a backup nor a restore holds a snapshot's whole file list.
//!
//! ```text
//! object = "MVMANI02" head-block entries-block* end-block
//! block  = kind:u8 codec:u8 reserved:[2]=0 raw_len:u32 stored_len:u32 payload_xxh3:u64
//!          payload[stored_len]                                         (20-byte header)
//! kind 1 head     postcard Head (version 2, source, hostname, site, tier, parent)
//! kind 2 entries  1..=65 536 postcard Entry values back to back (raw ≤ 16 MiB)
//! kind 3 end      postcard End (created_unix_ns, number of entries); nothing may follow
//! ```
//! `payload` is lz4-block compressed when `codec` = 1 (kept only when smaller). The object's
//! name, and the snapshot id, is BLAKE3 over `"MVMANI02"` then, per block, `kind`, `raw_len`
//! (u32 LE) and the raw payload: computed as blocks are written or read, and checked by the
//! reader when it meets the end block. Entries keep version 1's order (depth first, siblings
//! sorted by name bytes), which is what lets a backup merge the parent's entries with its
//! scan and a restore check the tree with bounded memory.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::manifest::{Entry, Manifest, MANIFEST_MAGIC};
use super::Codec;
use crate::constants::{
    MANIFEST_BLOCK_BYTES, MANIFEST_BLOCK_BYTES_MAX, MANIFEST_BLOCK_ENTRIES_MAX, MANIFEST_BYTES_MAX,
    PATH_BYTES_MAX,
};
use crate::error::Error;

pub const MANIFEST_V2_MAGIC: &[u8; 8] = b"MVMANI02";
pub const MANIFEST_V2_VERSION: u32 = 2;
const BLOCK_HEADER_BYTES: usize = 20;
const KIND_HEAD: u8 = 1;
const KIND_ENTRIES: u8 = 2;
const KIND_END: u8 = 3;

/// What a snapshot says about itself before its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub version: u32,
    pub source: Vec<u8>,
    pub hostname: String,
    pub site: String,
    pub tier: String,
    pub parent: Option<[u8; 32]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct End {
    created_unix_ns: i64,
    entries: u64,
}

fn bad(detail: impl Into<String>) -> Error {
    Error::corrupt("manifest", detail.into())
}

/// Writes a version-2 manifest entry by entry; `finish` returns the snapshot id.
pub struct ManifestWriter<W: Write> {
    out: W,
    hasher: blake3::Hasher,
    block: Vec<u8>,
    block_entries: usize,
    entries: u64,
}

impl<W: Write> ManifestWriter<W> {
    pub fn new(out: W, head: &Head) -> Result<Self, Error> {
        let mut writer = ManifestWriter {
            out,
            hasher: blake3::Hasher::new(),
            block: Vec::with_capacity(MANIFEST_BLOCK_BYTES + 4096),
            block_entries: 0,
            entries: 0,
        };
        writer.hasher.update(MANIFEST_V2_MAGIC);
        writer.write_all(MANIFEST_V2_MAGIC)?;
        let head = Head {
            version: MANIFEST_V2_VERSION,
            ..head.clone()
        };
        let raw = postcard::to_stdvec(&head).map_err(|e| bad(format!("encoding: {e}")))?;
        writer.write_block(KIND_HEAD, &raw)?;
        Ok(writer)
    }

    pub fn push(&mut self, entry: &Entry) -> Result<(), Error> {
        let before = self.block.len();
        self.block = postcard::to_extend(entry, std::mem::take(&mut self.block))
            .map_err(|e| bad(format!("encoding: {e}")))?;
        if self.block.len() - before > MANIFEST_BLOCK_BYTES_MAX {
            return Err(Error::Resource(format!(
                "manifest entry {:?} takes {} bytes, more than the {MANIFEST_BLOCK_BYTES_MAX}-byte block limit",
                String::from_utf8_lossy(&entry.path),
                self.block.len() - before
            )));
        }
        self.block_entries += 1;
        self.entries += 1;
        if self.block.len() >= MANIFEST_BLOCK_BYTES
            || self.block_entries == MANIFEST_BLOCK_ENTRIES_MAX
        {
            self.flush_entries()?;
        }
        Ok(())
    }

    fn flush_entries(&mut self) -> Result<(), Error> {
        if self.block_entries == 0 {
            return Ok(());
        }
        // A block only ever exceeds the limit by the entry that closed it: split before it.
        let block = std::mem::take(&mut self.block);
        if block.len() > MANIFEST_BLOCK_BYTES_MAX {
            return Err(Error::Resource(format!(
                "manifest block of {} bytes exceeds {MANIFEST_BLOCK_BYTES_MAX}",
                block.len()
            )));
        }
        self.write_block(KIND_ENTRIES, &block)?;
        self.block = block;
        self.block.clear();
        self.block_entries = 0;
        Ok(())
    }

    /// Writes the end block and hands back the id and the output.
    pub fn finish(mut self, created_unix_ns: i64) -> Result<([u8; 32], W), Error> {
        self.flush_entries()?;
        let end = End {
            created_unix_ns,
            entries: self.entries,
        };
        let raw = postcard::to_stdvec(&end).map_err(|e| bad(format!("encoding: {e}")))?;
        self.write_block(KIND_END, &raw)?;
        self.out
            .flush()
            .map_err(|e| Error::Resource(format!("writing the manifest: {e}")))?;
        Ok((*self.hasher.finalize().as_bytes(), self.out))
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn write_block(&mut self, kind: u8, raw: &[u8]) -> Result<(), Error> {
        self.hasher.update(&[kind]);
        self.hasher.update(&(raw.len() as u32).to_le_bytes());
        self.hasher.update(raw);
        let compressed = lz4_flex::block::compress(raw);
        let (codec, payload) = if compressed.len() < raw.len() {
            (Codec::Lz4, &compressed[..])
        } else {
            (Codec::Raw, raw)
        };
        let mut header = [0u8; BLOCK_HEADER_BYTES];
        header[0] = kind;
        header[1] = codec as u8;
        header[4..8].copy_from_slice(&(raw.len() as u32).to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[12..20].copy_from_slice(&xxh3_64(payload).to_le_bytes());
        self.write_all(&header)?;
        self.write_all(payload)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::Resource(format!("writing the manifest: {e}")))
    }
}

/// Reads a version-2 manifest entry by entry, after its magic. Every block is bounded and
/// checked (xxh3) before it is decompressed; the id is checked at the end block, so a caller
/// that acts on entries before [`ManifestReader::next_entry`] returned `None` must be able to
/// undo or refuse (restore reads the manifest twice: to check, then to write).
pub struct ManifestReader<R: Read> {
    input: R,
    hasher: blake3::Hasher,
    expected: Option<[u8; 32]>,
    head: Head,
    stored: Vec<u8>,
    raw: Vec<u8>,
    at: usize,
    block_entries: usize,
    entries: u64,
    created_unix_ns: Option<i64>,
}

impl<R: Read> ManifestReader<R> {
    /// `input` is positioned just after the magic.
    pub fn open(input: R, expected: Option<&[u8; 32]>) -> Result<Self, Error> {
        let mut reader = ManifestReader {
            input,
            hasher: blake3::Hasher::new(),
            expected: expected.copied(),
            head: Head {
                version: 0,
                source: Vec::new(),
                hostname: String::new(),
                site: String::new(),
                tier: String::new(),
                parent: None,
            },
            stored: Vec::new(),
            raw: Vec::new(),
            at: 0,
            block_entries: 0,
            entries: 0,
            created_unix_ns: None,
        };
        reader.hasher.update(MANIFEST_V2_MAGIC);
        let kind = reader
            .read_block()?
            .ok_or_else(|| bad("ends before its head block"))?;
        if kind != KIND_HEAD {
            return Err(bad(format!(
                "first block is of kind {kind}, expected a head"
            )));
        }
        let head: Head =
            postcard::from_bytes(&reader.raw).map_err(|e| bad(format!("head: {e}")))?;
        if head.version != MANIFEST_V2_VERSION {
            return Err(bad(format!(
                "version {}, expected {MANIFEST_V2_VERSION}",
                head.version
            )));
        }
        if head.source.len() > PATH_BYTES_MAX {
            return Err(bad("source path longer than PATH_MAX"));
        }
        reader.head = head;
        reader.raw.clear();
        Ok(reader)
    }

    pub fn head(&self) -> &Head {
        &self.head
    }

    /// Known once the end block was read.
    pub fn created_unix_ns(&self) -> Option<i64> {
        self.created_unix_ns
    }

    /// The next entry, or `None` once the end block was read and the object checked whole.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        loop {
            if self.at < self.raw.len() {
                let (entry, rest): (Entry, &[u8]) = postcard::take_from_bytes(&self.raw[self.at..])
                    .map_err(|e| bad(format!("entry {}: {e}", self.entries)))?;
                self.at = self.raw.len() - rest.len();
                self.block_entries += 1;
                self.entries += 1;
                if self.block_entries > MANIFEST_BLOCK_ENTRIES_MAX {
                    return Err(bad(format!(
                        "block of more than {MANIFEST_BLOCK_ENTRIES_MAX} entries"
                    )));
                }
                return Ok(Some(entry));
            }
            if self.created_unix_ns.is_some() {
                return Ok(None);
            }
            let kind = self
                .read_block()?
                .ok_or_else(|| bad("ends without its end block"))?;
            match kind {
                KIND_ENTRIES if !self.raw.is_empty() => {
                    self.at = 0;
                    self.block_entries = 0;
                }
                KIND_ENTRIES => return Err(bad("empty entries block")),
                KIND_END => {
                    let end: End =
                        postcard::from_bytes(&self.raw).map_err(|e| bad(format!("end: {e}")))?;
                    self.raw.clear();
                    self.at = 0;
                    if end.entries != self.entries {
                        return Err(bad(format!(
                            "end block counts {} entries, the blocks hold {}",
                            end.entries, self.entries
                        )));
                    }
                    let mut byte = [0u8; 1];
                    match self.input.read(&mut byte) {
                        Ok(0) => {}
                        Ok(_) => return Err(bad("bytes after the end block")),
                        Err(e) => return Err(bad(format!("reading: {e}"))),
                    }
                    let id = *self.hasher.finalize().as_bytes();
                    if self.expected.is_some_and(|expected| expected != id) {
                        return Err(bad("content hash (BLAKE3) does not match the snapshot id"));
                    }
                    self.created_unix_ns = Some(end.created_unix_ns);
                    return Ok(None);
                }
                other => return Err(bad(format!("block of kind {other} among the entries"))),
            }
        }
    }

    /// Reads the next block into `raw`; `None` at a clean end of input.
    fn read_block(&mut self) -> Result<Option<u8>, Error> {
        let mut header = [0u8; BLOCK_HEADER_BYTES];
        match read_full(&mut self.input, &mut header)? {
            0 => return Ok(None),
            n if n < BLOCK_HEADER_BYTES => return Err(bad("truncated block header")),
            _ => {}
        }
        let kind = header[0];
        let codec =
            Codec::from_u8(header[1]).ok_or_else(|| bad(format!("unknown codec {}", header[1])))?;
        let raw_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        let stored_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
        let checksum = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
        if header[2..4] != [0, 0]
            || raw_len > MANIFEST_BLOCK_BYTES_MAX
            || stored_len > raw_len
            || (codec == Codec::Raw && stored_len != raw_len)
        {
            return Err(bad(format!(
                "block header: kind {kind} raw {raw_len} stored {stored_len} out of bounds"
            )));
        }
        self.stored.resize(stored_len, 0);
        if read_full(&mut self.input, &mut self.stored)? != stored_len {
            return Err(bad("truncated block"));
        }
        if xxh3_64(&self.stored) != checksum {
            return Err(bad("block checksum (xxh3) mismatch"));
        }
        match codec {
            Codec::Raw => std::mem::swap(&mut self.raw, &mut self.stored),
            Codec::Lz4 => {
                self.raw.resize(raw_len, 0);
                let n = lz4_flex::block::decompress_into(&self.stored, &mut self.raw)
                    .map_err(|e| bad(format!("lz4 block: {e}")))?;
                if n != raw_len {
                    return Err(bad(format!(
                        "block decompressed to {n} bytes, expected {raw_len}"
                    )));
                }
            }
        }
        self.hasher.update(&[kind]);
        self.hasher.update(&(raw_len as u32).to_le_bytes());
        self.hasher.update(&self.raw);
        Ok(Some(kind))
    }
}

fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad(format!("reading: {e}"))),
        }
    }
    Ok(filled)
}

/// A manifest of either version, read entry by entry. Version 1 objects are one postcard
/// value and are decoded whole (they were written whole, ≤ 1 GiB); version 2 streams.
pub enum ManifestStream<R: Read> {
    V1 {
        head: Head,
        created_unix_ns: i64,
        entries: std::vec::IntoIter<Entry>,
    },
    /// Boxed: the reader's BLAKE3 state is ~2 KiB.
    V2(Box<ManifestReader<R>>),
}

impl<R: Read> ManifestStream<R> {
    pub fn open(mut input: R, expected: Option<&[u8; 32]>) -> Result<Self, Error> {
        let mut magic = [0u8; 8];
        if read_full(&mut input, &mut magic)? != 8 {
            return Err(bad("expected magic MVMANI01 or MVMANI02"));
        }
        if &magic == MANIFEST_V2_MAGIC {
            return Ok(ManifestStream::V2(Box::new(ManifestReader::open(
                input, expected,
            )?)));
        }
        if &magic != MANIFEST_MAGIC {
            return Err(bad("expected magic MVMANI01 or MVMANI02"));
        }
        let mut bytes = magic.to_vec();
        input
            .take(MANIFEST_BYTES_MAX as u64 + 64)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("reading: {e}")))?;
        let manifest = super::manifest::decode(&bytes, expected)?;
        Ok(ManifestStream::V1 {
            head: Head {
                version: manifest.version,
                source: manifest.source,
                hostname: manifest.hostname,
                site: manifest.site,
                tier: manifest.tier,
                parent: manifest.parent,
            },
            created_unix_ns: manifest.created_unix_ns,
            entries: manifest.entries.into_iter(),
        })
    }

    pub fn head(&self) -> &Head {
        match self {
            ManifestStream::V1 { head, .. } => head,
            ManifestStream::V2(reader) => reader.head(),
        }
    }

    /// The next entry; `None` once the object was read whole and checked.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, Error> {
        match self {
            ManifestStream::V1 { entries, .. } => Ok(entries.next()),
            ManifestStream::V2(reader) => reader.next_entry(),
        }
    }

    /// Known for version 1 at once, for version 2 after the last entry.
    pub fn created_unix_ns(&self) -> Option<i64> {
        match self {
            ManifestStream::V1 {
                created_unix_ns, ..
            } => Some(*created_unix_ns),
            ManifestStream::V2(reader) => reader.created_unix_ns(),
        }
    }

    /// Reads every entry into memory (bounded by `MANIFEST_BYTES_MAX` of raw entries), for
    /// the callers that still need the whole list.
    pub fn collect(mut self) -> Result<Manifest, Error> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        while let Some(entry) = self.next_entry()? {
            bytes += entry.path.len() + 64 + 40 * entry_chunks(&entry);
            if bytes > MANIFEST_BYTES_MAX {
                return Err(Error::Resource(format!(
                    "manifest larger than {MANIFEST_BYTES_MAX} bytes in memory"
                )));
            }
            entries.push(entry);
        }
        let created_unix_ns = self.created_unix_ns().unwrap_or_default();
        let head = self.head().clone();
        Ok(Manifest {
            version: head.version,
            source: head.source,
            hostname: head.hostname,
            site: head.site,
            tier: head.tier,
            created_unix_ns,
            parent: head.parent,
            entries,
        })
    }
}

fn entry_chunks(entry: &Entry) -> usize {
    match &entry.kind {
        super::manifest::EntryKind::File { extents, .. } => {
            extents.iter().map(|e| e.chunks.len()).sum()
        }
        _ => 0,
    }
}

/// Encodes a whole manifest as version 2 (tests, replicas of version-2 snapshots).
pub fn encode(manifest: &Manifest) -> Result<super::manifest::EncodedManifest, Error> {
    let head = Head {
        version: MANIFEST_V2_VERSION,
        source: manifest.source.clone(),
        hostname: manifest.hostname.clone(),
        site: manifest.site.clone(),
        tier: manifest.tier.clone(),
        parent: manifest.parent,
    };
    let mut writer = ManifestWriter::new(Vec::new(), &head)?;
    for entry in &manifest.entries {
        writer.push(entry)?;
    }
    let (id, bytes) = writer.finish(manifest.created_unix_ns)?;
    Ok(super::manifest::EncodedManifest { id, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkRef, EntryKind, Extent};
    use crate::ChunkId;
    use proptest::prelude::*;

    fn file(i: usize) -> Entry {
        Entry {
            path: format!("d{}/f{i:07}", i / 1000).into_bytes(),
            kind: EntryKind::File {
                size: 10,
                extents: vec![Extent {
                    offset: 0,
                    chunks: vec![ChunkRef {
                        id: ChunkId([(i % 251) as u8; 32]),
                        len: 10,
                    }],
                }],
            },
            mode: 0o100644,
            uid: 1,
            gid: 2,
            mtime_ns: i as i64,
            ctime_ns: 4,
            inode: i as u64,
            device: 8,
        }
    }

    /// Entries blocks in an object, by walking its block headers.
    fn entry_blocks(bytes: &[u8]) -> usize {
        let (mut at, mut blocks) = (8, 0);
        while at < bytes.len() {
            let stored = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
            blocks += usize::from(bytes[at] == KIND_ENTRIES);
            at += BLOCK_HEADER_BYTES + stored;
        }
        blocks
    }

    fn manifest(entries: usize) -> Manifest {
        Manifest {
            version: MANIFEST_V2_VERSION,
            source: b"/data".to_vec(),
            hostname: "node1".into(),
            site: "onprem".into(),
            tier: "hot".into(),
            created_unix_ns: 77,
            parent: Some([3; 32]),
            entries: (0..entries).map(file).collect(),
        }
    }

    #[test]
    fn many_blocks_round_trip_and_check_the_id() {
        let m = manifest(40_000);
        let encoded = encode(&m).unwrap();
        assert!(entry_blocks(&encoded.bytes) > 1);
        let read = ManifestStream::open(&encoded.bytes[..], Some(&encoded.id))
            .unwrap()
            .collect()
            .unwrap();
        assert_eq!(read, m);
        let wrong = ManifestStream::open(&encoded.bytes[..], Some(&[0; 32]))
            .unwrap()
            .collect();
        assert!(wrong.is_err());
        // The whole-object decoder takes either version.
        assert_eq!(
            crate::manifest::decode(&encoded.bytes, Some(&encoded.id)).unwrap(),
            m
        );
    }

    #[test]
    fn entries_are_read_one_block_at_a_time() {
        let m = manifest(200_000);
        let encoded = encode(&m).unwrap();
        let mut reader = ManifestReader::open(&encoded.bytes[8..], Some(&encoded.id)).unwrap();
        let mut seen = 0;
        let mut largest = 0;
        while let Some(entry) = reader.next_entry().unwrap() {
            assert_eq!(entry, m.entries[seen]);
            seen += 1;
            largest = largest.max(reader.raw.capacity());
        }
        assert_eq!(seen, m.entries.len());
        assert_eq!(reader.created_unix_ns(), Some(77));
        assert!(
            largest <= MANIFEST_BLOCK_BYTES + 4096,
            "a block buffer grew to {largest} bytes"
        );
    }

    #[test]
    fn damage_and_truncation_are_refused() {
        let encoded = encode(&manifest(3000)).unwrap();
        for cut in [8, 20, 40, encoded.bytes.len() / 2, encoded.bytes.len() - 1] {
            let read = ManifestStream::open(&encoded.bytes[..cut], None).and_then(|s| s.collect());
            assert!(read.is_err(), "cut at {cut} read");
        }
        let mut longer = encoded.bytes.clone();
        longer.push(0);
        assert!(ManifestStream::open(&longer[..], None)
            .and_then(|s| s.collect())
            .is_err());
        for at in [9, 30, encoded.bytes.len() - 3] {
            let mut damaged = encoded.bytes.clone();
            damaged[at] ^= 0x40;
            assert!(
                ManifestStream::open(&damaged[..], None)
                    .and_then(|s| s.collect())
                    .is_err(),
                "flip at {at} read"
            );
        }
    }

    #[test]
    fn an_oversized_block_header_is_refused_before_allocating() {
        let mut bytes = MANIFEST_V2_MAGIC.to_vec();
        let mut header = [0u8; BLOCK_HEADER_BYTES];
        header[0] = KIND_HEAD;
        header[1] = 1;
        header[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        header[8..12].copy_from_slice(&1000u32.to_le_bytes());
        bytes.extend_from_slice(&header);
        let err = ManifestStream::open(&bytes[..], None).err().unwrap();
        assert!(err.to_string().contains("out of bounds"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if bytes.len() >= 8 {
                bytes[..8].copy_from_slice(MANIFEST_V2_MAGIC);
            }
            let _ = ManifestStream::open(&bytes[..], None).and_then(|s| s.collect());
        }
    }
}
