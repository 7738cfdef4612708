//! Where restore and verify read chunks from: one trait over this site's tiers
//! ([`ChunkReader`], which fails over between a chunk's copies) and a peer (the peer crate's
//! `RemoteChunks`). A later wrapper (decrypt, repair from another site) is one more
//! implementation over an inner source, and the jobs above need no change.

use mover_format::error::Result;
use mover_format::ChunkId;

use crate::pack_reader::ChunkReader;

/// A verified chunk's plaintext, as [`ChunkSource::read`] leaves it.
pub enum Plaintext {
    /// In the caller's buffer.
    InBuffer,
    /// In these pieces, back to back (a raw chunk from a peer is written from where quinn
    /// received it).
    Pieces(Vec<bytes::Bytes>),
}

impl Plaintext {
    /// The plaintext's length, given the buffer `read` was handed.
    pub fn len(&self, buffer: &[u8]) -> usize {
        match self {
            Plaintext::InBuffer => buffer.len(),
            Plaintext::Pieces(pieces) => pieces.iter().map(|p| p.len()).sum(),
        }
    }
}

pub trait ChunkSource {
    /// Chunk `id`'s plaintext, checked against `id` before it is returned: in `out`, or in
    /// pieces. A source that streams in an order fixed in advance (a peer's) must be asked
    /// in that order.
    fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext>;

    /// Ends the reading; returns what it put on the wire (bytes sent, received): zero for
    /// this site's own tiers.
    fn finish(&mut self) -> (u64, u64) {
        (0, 0)
    }
}

impl ChunkSource for ChunkReader<'_> {
    fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext> {
        ChunkReader::read(self, id, out).map(|()| Plaintext::InBuffer)
    }
}
