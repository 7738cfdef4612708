//! Reads chunks back by id: index lookup, ranged read of the record, checks, decompression.

use std::collections::HashMap;
use std::sync::Arc;

use super::backend::Backend;
use super::index::{Index, Location};
use super::pack_key;
use mover_format::error::{Error, Result};
use mover_format::pack::{
    check_pack_header, decode_footer, decode_trailer, open_record, FooterEntry, RecordHeader,
    FOOTER_ENTRY_BYTES, PACK_HEADER_BYTES, RECORD_HEADER_BYTES, TRAILER_BYTES,
};
use mover_format::ChunkId;

/// How reading a record's bytes went.
enum Raw {
    Read,
    /// The pack is not there (any more): the error to report if the chunk did not move.
    PackGone(Error),
}

pub struct ChunkReader<'a> {
    index: &'a Index,
    tiers: &'a HashMap<String, Arc<dyn Backend>>,
    pack_tiers: HashMap<u64, Arc<dyn Backend>>,
    record: Vec<u8>,
    /// The tier whose copies are read first.
    prefer: Option<String>,
}

impl<'a> ChunkReader<'a> {
    pub fn new(index: &'a Index, tiers: &'a HashMap<String, Arc<dyn Backend>>) -> Self {
        ChunkReader {
            index,
            tiers,
            pack_tiers: HashMap::new(),
            record: Vec::new(),
            prefer: None,
        }
    }

    /// Reads copies in `tier` first, where a chunk has one there.
    pub fn preferring(mut self, tier: &str) -> Self {
        self.prefer = Some(tier.to_string());
        self
    }

    /// The copy of `id` to read first.
    pub fn locate(&self, id: &ChunkId) -> Result<Location> {
        self.copies(id)?
            .into_iter()
            .next()
            .ok_or_else(|| Self::unindexed(id))
    }

    fn copies(&self, id: &ChunkId) -> Result<Vec<Location>> {
        Ok(self
            .index
            .copies_preferring(id, self.prefer.as_deref())?
            .into_iter()
            .map(|c| c.location)
            .collect())
    }

    fn unindexed(id: &ChunkId) -> Error {
        Error::ChunkMissing {
            chunk: id.to_string(),
        }
    }

    /// Reads chunk `id` into `out`, verifying the record's header, xxh3 and BLAKE3. A record
    /// found damaged is marked so in the index: it no longer satisfies dedup, and the next
    /// backup or replication that has the good bytes stores them again. A copy that cannot
    /// be read is passed over for the chunk's next copy, if it has one; with none left, the
    /// first copy's error is returned.
    pub fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        self.with_copies(id, |reader, location, record| {
            let (header, key, location) = reader.fetch_from(id, location, record)?;
            open_record(&header, &record[RECORD_HEADER_BYTES..], out)
                .map_err(|e| Error::corrupt(format!("chunk {id} in {key}"), e.to_string()))
                .map_err(|e| reader.noted(id, location, e))?;
            Ok(header)
        })
        .map(|_| ())
    }

    /// Runs `read` on each copy of `id` in turn until one succeeds, with `self.record` as the
    /// record buffer.
    fn with_copies(
        &mut self,
        id: &ChunkId,
        mut read: impl FnMut(&mut Self, Location, &mut Vec<u8>) -> Result<RecordHeader>,
    ) -> Result<RecordHeader> {
        let copies = self.copies(id)?;
        if copies.is_empty() {
            return Err(Self::unindexed(id));
        }
        let mut record = std::mem::take(&mut self.record);
        let mut first_error = None;
        for location in copies {
            match read(self, location, &mut record) {
                Ok(header) => {
                    self.record = record;
                    return Ok(header);
                }
                Err(e) => {
                    if first_error.is_some() {
                        tracing::warn!(chunk = %id, pack = %pack_key(location.pack_id), error = %e, "another copy is unreadable too");
                    } else {
                        first_error = Some(e);
                    }
                }
            }
        }
        self.record = record;
        Err(first_error.expect("at least one copy was tried"))
    }

    /// Reads chunk `id`'s record as stored (compressed or raw) with its header and payload
    /// checksum verified, for a peer that checks the plaintext itself.
    pub fn read_stored(&mut self, id: &ChunkId) -> Result<(RecordHeader, &[u8])> {
        let header = self.with_copies(id, |reader, location, record| {
            reader.read_stored_at(id, location, record)
        })?;
        Ok((header, &self.record[RECORD_HEADER_BYTES..]))
    }

    /// [`read_stored`](ChunkReader::read_stored) into the caller's buffer: `record` then holds
    /// the whole record, its header's [`RECORD_HEADER_BYTES`] and the payload after them.
    pub fn read_stored_into(&mut self, id: &ChunkId, record: &mut Vec<u8>) -> Result<RecordHeader> {
        let mut first_error = None;
        let copies = self.copies(id)?;
        for location in copies {
            match self.read_stored_at(id, location, record) {
                Ok(header) => return Ok(header),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Self::unindexed(id)))
    }

    /// The record of `id`'s copy at `location`, its payload checksum checked.
    fn read_stored_at(
        &mut self,
        id: &ChunkId,
        location: Location,
        record: &mut Vec<u8>,
    ) -> Result<RecordHeader> {
        let (header, key, location) = self.fetch_from(id, location, record)?;
        if xxhash_rust::xxh3::xxh3_64(&record[RECORD_HEADER_BYTES..]) != header.payload_xxh3 {
            return Err(self.noted(
                id,
                location,
                Error::corrupt(
                    format!("chunk {id} in {key}"),
                    "payload checksum (xxh3) mismatch",
                ),
            ));
        }
        Ok(header)
    }

    /// Records damage found at `location` in the index, and passes the error on.
    fn noted(&self, id: &ChunkId, location: Location, error: Error) -> Error {
        if let Error::Corrupt { .. } = &error {
            if let Err(e) = self.index.mark_damaged(id, &location, &error.to_string()) {
                tracing::warn!(chunk = %id, error = %e, "could not mark a damaged chunk in the index");
            }
        }
        error
    }

    /// Reads `id`'s record at `location`, where the index put it when it was looked up, into
    /// `record` and checks its header against the index.
    ///
    /// A repack (`store::repack`) may move the chunk and delete its old pack between our
    /// lookup and our read: a pack that is gone (no longer registered, or its file removed)
    /// sends us back to the index once, and a chunk that moved is read from its new home.
    fn fetch_from(
        &mut self,
        id: &ChunkId,
        location: Location,
        record: &mut Vec<u8>,
    ) -> Result<(RecordHeader, String, Location)> {
        let location = match self.read_record(id, location, record)? {
            Raw::Read => location,
            Raw::PackGone(e) => {
                let moved = self.locate(id)?;
                if moved == location {
                    return Err(e);
                }
                match self.read_record(id, moved, record)? {
                    Raw::Read => moved,
                    Raw::PackGone(e) => return Err(e),
                }
            }
        };
        let key = pack_key(location.pack_id);
        let damaged = |detail: String| Error::corrupt(format!("chunk {id} in {key}"), detail);
        let header = match RecordHeader::decode(&record[..RECORD_HEADER_BYTES]) {
            Ok(header) => header,
            Err(e) => return Err(self.noted(id, location, damaged(e.to_string()))),
        };
        if header.id != *id || header.stored_len != location.stored_len {
            return Err(self.noted(
                id,
                location,
                damaged(format!(
                    "record at offset {} holds chunk {}",
                    location.offset, header.id
                )),
            ));
        }
        Ok((header, key, location))
    }

    /// Reads the record at `location` into `record`, unchecked.
    fn read_record(
        &mut self,
        id: &ChunkId,
        location: Location,
        record: &mut Vec<u8>,
    ) -> Result<Raw> {
        let pack_id = location.pack_id;
        let key = pack_key(pack_id);
        let Some(backend) = self.backend_of(pack_id)? else {
            return Ok(Raw::PackGone(Error::corrupt(
                format!("pack {pack_id:016x}"),
                "referenced by the index but not registered",
            )));
        };
        let len = RECORD_HEADER_BYTES + location.stored_len as usize;
        match backend.read_range(&key, location.offset, len, record) {
            Ok(()) => Ok(Raw::Read),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.noted(
                    id,
                    location,
                    Error::corrupt(
                        format!("chunk {id} in {key}"),
                        format!(
                            "the record of {len} bytes at offset {} runs past the end of the pack (truncated?)",
                            location.offset
                        ),
                    ),
                ))
            }
            Err(Error::Io { op, path, source }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(Raw::PackGone(Error::Io { op, path, source }))
            }
            Err(e) => Err(e),
        }
    }

    /// The backend holding `pack_id`; `None` when no tier registers it (any more).
    fn backend_of(&mut self, pack_id: u64) -> Result<Option<Arc<dyn Backend>>> {
        if let Some(backend) = self.pack_tiers.get(&pack_id) {
            return Ok(Some(backend.clone()));
        }
        let Some(tier) = self.index.pack_tier(pack_id)? else {
            return Ok(None);
        };
        let backend = self
            .tiers
            .get(&tier)
            .ok_or_else(|| {
                Error::Site(format!(
                    "tier {tier:?} holds pack {pack_id:016x} but is not in the config"
                ))
            })?
            .clone();
        self.pack_tiers.insert(pack_id, backend.clone());
        Ok(Some(backend))
    }
}

/// The footer of the sealed pack `key` of `len` bytes, checked against its header, trailer and
/// checksum, and every entry against the records' extent. `read(offset, len, buf)` reads the
/// pack: by name, or through a descriptor held under the pack's lock.
pub fn read_footer(
    key: &str,
    len: u64,
    mut read: impl FnMut(u64, usize, &mut Vec<u8>) -> Result<()>,
) -> Result<Vec<FooterEntry>> {
    if len < (PACK_HEADER_BYTES + TRAILER_BYTES) as u64 {
        return Err(Error::corrupt(
            format!("pack {key}"),
            format!("{len} bytes is shorter than a sealed pack's header and trailer"),
        ));
    }
    let mut buf = Vec::new();
    read(0, PACK_HEADER_BYTES, &mut buf)?;
    check_pack_header(&buf)?;
    read(len - TRAILER_BYTES as u64, TRAILER_BYTES, &mut buf)?;
    let (entries, footer_offset, checksum) = decode_trailer(&buf, len)?;
    let footer_len = entries as usize * FOOTER_ENTRY_BYTES;
    read(footer_offset, footer_len, &mut buf)?;
    let entries = decode_footer(&buf, checksum)?;
    for e in &entries {
        // Footer offsets point at the record's header; its payload follows.
        let end = e
            .offset
            .checked_add(RECORD_HEADER_BYTES as u64 + e.stored_len as u64);
        if e.offset < PACK_HEADER_BYTES as u64 || end.is_none_or(|end| end > footer_offset) {
            return Err(Error::corrupt(
                format!("pack {key}"),
                format!(
                    "footer entry {} at {} runs outside the records",
                    e.id, e.offset
                ),
            ));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack_writer::PackWriter;
    use crate::repack::merge;
    use crate::repack::tests::{committed_pack, id_of, payload, tier};
    use crate::LocalDir;
    use mover_format::pack::encode_footer;

    #[test]
    fn a_reader_takes_the_tier_asked_for_and_fails_over_to_another_copy() {
        let mut t = tier();
        let hot = committed_pack(&t, &[7]);
        let root = t.root.parent().unwrap().join("cold");
        std::fs::create_dir(&root).unwrap();
        let cold: Arc<dyn Backend> = Arc::new(LocalDir::new(&root));
        t.tiers.insert("cold".into(), cold.clone());
        let data = payload(7);
        let id = id_of(&data);
        let mut writer = PackWriter::create(&cold, "cold", 8 << 20).unwrap();
        let header = RecordHeader::new(id, mover_format::Codec::Raw, data.len(), &data);
        writer.append(&header, &data).unwrap();
        let sealed = writer.seal().unwrap();
        t.index.commit_pack(&sealed).unwrap();

        let reader = ChunkReader::new(&t.index, &t.tiers);
        assert_eq!(
            reader.preferring("cold").locate(&id).unwrap().pack_id,
            sealed.pack_id
        );
        let reader = ChunkReader::new(&t.index, &t.tiers);
        assert_eq!(
            reader.preferring("hot").locate(&id).unwrap().pack_id,
            hot.pack_id
        );

        // The hot copy goes bad: a reader preferring it reads the cold one and marks it.
        let path = t.root.join(pack_key(hot.pack_id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[hot.entries[0].offset as usize + RECORD_HEADER_BYTES + 3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let mut out = Vec::new();
        let mut reader = ChunkReader::new(&t.index, &t.tiers).preferring("hot");
        reader.read(&id, &mut out).unwrap();
        assert_eq!(out, data);
        let damaged = t.index.damaged_copies().unwrap();
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!((damaged[0].0, damaged[0].1), (id, hot.pack_id));
        let (header, stored) = reader.read_stored(&id).unwrap();
        assert_eq!((header.id, stored), (id, data.as_slice()));

        // With both copies bad, the error is the first copy's.
        let path = root.join(pack_key(sealed.pack_id));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[sealed.entries[0].offset as usize + RECORD_HEADER_BYTES + 3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = ChunkReader::new(&t.index, &t.tiers)
            .preferring("hot")
            .read(&id, &mut out)
            .unwrap_err();
        assert!(err.to_string().contains(&pack_key(sealed.pack_id)), "{err}");
        assert_eq!(t.index.damaged_copies().unwrap().len(), 2);
    }

    #[test]
    fn a_chunk_whose_pack_a_merge_deleted_after_the_lookup_is_read_from_its_new_home() {
        let t = tier();
        let old: Vec<u64> = (0..3)
            .map(|i| committed_pack(&t, &[i, 10 + i]).pack_id)
            .collect();
        let id = id_of(&payload(0));
        let looked_up = t.index.lookup(&id).unwrap().unwrap();
        // A reader that already read from the old pack (it knows its tier) ...
        let mut warm = ChunkReader::new(&t.index, &t.tiers);
        let mut out = Vec::new();
        warm.read(&id_of(&payload(10)), &mut out).unwrap();
        // ... and one that did not.
        let mut cold = ChunkReader::new(&t.index, &t.tiers);

        let merged = merge(&t.index, "hot", &t.backend, &old, 1 << 20, &|| false).unwrap();
        assert_eq!(merged.packs, 3);
        assert!(!t.root.join(pack_key(looked_up.pack_id)).exists());

        let mut record = Vec::new();
        for reader in [&mut warm, &mut cold] {
            let (header, key, at) = reader.fetch_from(&id, looked_up, &mut record).unwrap();
            assert_eq!(header.id, id);
            assert_ne!(at.pack_id, looked_up.pack_id);
            assert_eq!(key, pack_key(at.pack_id));
            open_record(&header, &record[RECORD_HEADER_BYTES..], &mut out).unwrap();
            assert_eq!(out, payload(0));
        }
        assert!(t.index.damaged().unwrap().is_empty());
    }

    /// A sealed, committed pack of three records and its bytes.
    fn sealed_bytes(t: &crate::repack::tests::Tier) -> (SealedPackBytes, Vec<u8>) {
        let pack = committed_pack(t, &[1, 2, 3]);
        let key = pack_key(pack.pack_id);
        let bytes = std::fs::read(t.root.join(&key)).unwrap();
        assert_eq!(bytes.len() as u64, pack.bytes);
        (SealedPackBytes { key, pack }, bytes)
    }

    struct SealedPackBytes {
        key: String,
        pack: crate::SealedPack,
    }

    /// [`read_footer`] over `bytes`; also returns the largest read it asked for.
    fn footer_of(key: &str, bytes: &[u8]) -> (Result<Vec<FooterEntry>>, usize) {
        let mut largest = 0;
        let footer = read_footer(key, bytes.len() as u64, |offset, len, buf| {
            largest = largest.max(len);
            let end = offset as usize + len;
            assert!(end <= bytes.len(), "read past the end: {offset}+{len}");
            buf.clear();
            buf.extend_from_slice(&bytes[offset as usize..end]);
            Ok(())
        });
        (footer, largest)
    }

    fn is_corrupt<T: std::fmt::Debug>(result: &Result<T>) -> bool {
        matches!(result, Err(Error::Corrupt { .. }))
    }

    #[test]
    fn a_sealed_pack_cut_at_any_length_is_refused_as_corrupt() {
        let t = tier();
        let (sealed, bytes) = sealed_bytes(&t);
        assert_eq!(
            footer_of(&sealed.key, &bytes).0.unwrap(),
            sealed.pack.entries
        );
        for len in 0..bytes.len() {
            let (footer, _) = footer_of(&sealed.key, &bytes[..len]);
            assert!(
                is_corrupt(&footer),
                "cut at {len} of {}: {footer:?}",
                bytes.len()
            );
        }
    }

    #[test]
    fn any_damaged_bit_in_the_footer_or_trailer_is_refused() {
        let t = tier();
        let (sealed, bytes) = sealed_bytes(&t);
        let footer_offset =
            bytes.len() - sealed.pack.entries.len() * FOOTER_ENTRY_BYTES - TRAILER_BYTES;
        for bit in footer_offset * 8..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let (footer, _) = footer_of(&sealed.key, &damaged);
            assert!(is_corrupt(&footer), "bit {bit} of {}", bytes.len() * 8);
        }
        // The pack header too: a footer is only trusted in a pack of this format.
        for bit in 0..PACK_HEADER_BYTES * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                is_corrupt(&footer_of(&sealed.key, &damaged).0),
                "header bit {bit}"
            );
        }
    }

    #[test]
    fn a_footer_entry_pointing_outside_the_records_is_refused() {
        let t = tier();
        let (sealed, bytes) = sealed_bytes(&t);
        let footer_offset =
            (bytes.len() - sealed.pack.entries.len() * FOOTER_ENTRY_BYTES - TRAILER_BYTES) as u64;
        let records = &bytes[..footer_offset as usize];
        let last = *sealed.pack.entries.last().unwrap();
        for bad in [
            // Into the pack header.
            FooterEntry { offset: 8, ..last },
            // One byte past the records.
            FooterEntry {
                stored_len: last.stored_len + 1,
                ..last
            },
            // An offset that overflows with its length.
            FooterEntry {
                offset: u64::MAX - 10,
                ..last
            },
        ] {
            let mut entries = sealed.pack.entries.clone();
            *entries.last_mut().unwrap() = bad;
            let mut pack = records.to_vec();
            pack.extend(encode_footer(&entries, footer_offset));
            let (footer, _) = footer_of(&sealed.key, &pack);
            let err = footer.unwrap_err();
            assert!(
                err.to_string().contains("runs outside the records"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn an_entry_count_past_what_the_records_hold_is_refused_before_the_footer_is_read() {
        // A pack of 100 bytes of records whose trailer claims 1000 entries, with a footer of
        // zeros (and its right checksum) to make the length add up.
        let footer_offset = (PACK_HEADER_BYTES + 100) as u64;
        let footer = vec![0u8; 1000 * FOOTER_ENTRY_BYTES];
        let mut pack = mover_format::pack::pack_header().to_vec();
        pack.resize(footer_offset as usize, 0);
        pack.extend(&footer);
        pack.extend(1000u32.to_le_bytes());
        pack.extend(0u32.to_le_bytes());
        pack.extend(footer_offset.to_le_bytes());
        pack.extend(xxhash_rust::xxh3::xxh3_64(&footer).to_le_bytes());
        pack.extend(b"MVPKEND1");
        let (footer, largest) = footer_of("packs/00/0000000000000000.pack", &pack);
        assert!(is_corrupt(&footer), "{footer:?}");
        assert!(
            largest <= TRAILER_BYTES,
            "read {largest} bytes on the trailer's word"
        );
    }

    #[test]
    fn a_damaged_record_on_disk_is_refused_and_marked_damaged() {
        let t = tier();
        let (sealed, bytes) = sealed_bytes(&t);
        let path = t.root.join(&sealed.key);
        let second = sealed.pack.entries[1];
        let third = sealed.pack.entries[2];
        // A flipped payload byte of the second record, a flipped header byte of the third.
        let mut damaged = bytes.clone();
        damaged[second.offset as usize + RECORD_HEADER_BYTES + 100] ^= 0x20;
        damaged[third.offset as usize + 9] ^= 0x01;
        std::fs::write(&path, &damaged).unwrap();
        let mut reader = ChunkReader::new(&t.index, &t.tiers);
        let mut out = Vec::new();
        reader.read(&id_of(&payload(1)), &mut out).unwrap();
        assert_eq!(out, payload(1));
        let err = reader.read(&id_of(&payload(2)), &mut out).unwrap_err();
        assert!(err.to_string().contains("xxh3"), "{err}");
        let err = reader.read_stored(&id_of(&payload(2))).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        let err = reader.read(&id_of(&payload(3)), &mut out).unwrap_err();
        assert!(err.to_string().contains("header checksum"), "{err}");
        let mut marked: Vec<ChunkId> = t
            .index
            .damaged()
            .unwrap()
            .into_iter()
            .map(|d| d.0)
            .collect();
        marked.sort_by_key(|id| id.0);
        let mut expected = vec![id_of(&payload(2)), id_of(&payload(3))];
        expected.sort_by_key(|id| id.0);
        assert_eq!(marked, expected);
    }

    #[test]
    fn a_pack_cut_inside_a_record_is_refused_for_that_record_only() {
        let t = tier();
        let (sealed, bytes) = sealed_bytes(&t);
        let last = sealed.pack.entries[2];
        let cut = last.offset as usize + RECORD_HEADER_BYTES + last.stored_len as usize / 2;
        std::fs::write(t.root.join(&sealed.key), &bytes[..cut]).unwrap();
        let mut reader = ChunkReader::new(&t.index, &t.tiers);
        let mut out = Vec::new();
        reader.read(&id_of(&payload(1)), &mut out).unwrap();
        let err = reader.read(&id_of(&payload(3)), &mut out).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("runs past the end"), "{err}");
        let marked: Vec<ChunkId> = t
            .index
            .damaged()
            .unwrap()
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(marked, vec![id_of(&payload(3))]);
    }

    #[test]
    fn a_pack_gone_without_a_move_is_reported_as_before() {
        let t = tier();
        let pack = committed_pack(&t, &[5]);
        std::fs::remove_file(t.root.join(pack_key(pack.pack_id))).unwrap();
        let mut out = Vec::new();
        let err = ChunkReader::new(&t.index, &t.tiers)
            .read(&id_of(&payload(5)), &mut out)
            .unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{err}"
        );
    }
}
