//! Reads chunks back by id: index lookup, ranged read of the record, checks, decompression.

use std::collections::HashMap;
use std::sync::Arc;

use super::backend::Backend;
use super::index::{Index, Location};
use super::pack_key;
use crate::error::{Error, Result};
use crate::format::pack::{open_record, RecordHeader, RECORD_HEADER_BYTES};
use crate::format::ChunkId;

pub struct ChunkReader<'a> {
    index: &'a Index,
    tiers: &'a HashMap<String, Arc<dyn Backend>>,
    pack_tiers: HashMap<u64, Arc<dyn Backend>>,
    record: Vec<u8>,
}

impl<'a> ChunkReader<'a> {
    pub fn new(index: &'a Index, tiers: &'a HashMap<String, Arc<dyn Backend>>) -> Self {
        ChunkReader {
            index,
            tiers,
            pack_tiers: HashMap::new(),
            record: Vec::new(),
        }
    }

    pub fn locate(&self, id: &ChunkId) -> Result<Location> {
        self.index.lookup(id)?.ok_or_else(|| {
            Error::corrupt(
                format!("chunk {id}"),
                "not in the index (missing from the store)",
            )
        })
    }

    /// Reads chunk `id` into `out`, verifying the record's header, xxh3 and BLAKE3. A record
    /// found damaged is marked so in the index: it no longer satisfies dedup, and the next
    /// backup or replication that has the good bytes stores them again.
    pub fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<()> {
        let mut record = std::mem::take(&mut self.record);
        let fetched = self.fetch_record(id, &mut record);
        self.record = record;
        let (header, key, location) = fetched?;
        open_record(&header, &self.record[RECORD_HEADER_BYTES..], out)
            .map_err(|e| Error::corrupt(format!("chunk {id} in {key}"), e.to_string()))
            .map_err(|e| self.noted(id, location, e))
    }

    /// Reads chunk `id`'s record as stored (compressed or raw) with its header and payload
    /// checksum verified, for a peer that checks the plaintext itself.
    pub fn read_stored(&mut self, id: &ChunkId) -> Result<(RecordHeader, &[u8])> {
        let mut record = std::mem::take(&mut self.record);
        let read = self.read_stored_into(id, &mut record);
        self.record = record;
        Ok((read?, &self.record[RECORD_HEADER_BYTES..]))
    }

    /// [`read_stored`](ChunkReader::read_stored) into the caller's buffer: `record` then holds
    /// the whole record, its header's [`RECORD_HEADER_BYTES`] and the payload after them.
    pub fn read_stored_into(&mut self, id: &ChunkId, record: &mut Vec<u8>) -> Result<RecordHeader> {
        let (header, key, location) = self.fetch_record(id, record)?;
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

    /// Reads `id`'s record into `record` and checks its header against the index.
    fn fetch_record(
        &mut self,
        id: &ChunkId,
        record: &mut Vec<u8>,
    ) -> Result<(RecordHeader, String, Location)> {
        let location = self.locate(id)?;
        let backend = self.backend_of(location.pack_id)?;
        let len = RECORD_HEADER_BYTES + location.stored_len as usize;
        let key = pack_key(location.pack_id);
        let damaged = |detail: String| Error::corrupt(format!("chunk {id} in {key}"), detail);
        match backend.read_range(&key, location.offset, len, record) {
            Ok(()) => {}
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.noted(
                    id,
                    location,
                    damaged(format!(
                        "the record of {len} bytes at offset {} runs past the end of the pack (truncated?)",
                        location.offset
                    )),
                ));
            }
            Err(e) => return Err(e),
        }
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

    fn backend_of(&mut self, pack_id: u64) -> Result<Arc<dyn Backend>> {
        if let Some(backend) = self.pack_tiers.get(&pack_id) {
            return Ok(backend.clone());
        }
        let tier = self.index.pack_tier(pack_id)?.ok_or_else(|| {
            Error::corrupt(
                format!("pack {pack_id:016x}"),
                "referenced by the index but not registered",
            )
        })?;
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
        Ok(backend)
    }
}
