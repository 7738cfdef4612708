//! Writes chunk records into a pack, one pack per worker at a time.
//!
//! Records are appended with positioned writes straight from the worker's buffers. Nothing is
//! findable until `seal`: the footer is written, the file and its directory entry are made
//! durable, and only then does the caller commit the returned entries to the index.

use std::sync::Arc;

use super::backend::{Appender, Backend};
use super::index::SealedPack;
use super::pack_key;
use crate::error::Result;
use crate::format::pack::{
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
