//! On-disk formats: pack files (chunk records sealed by a footer) and snapshot manifests.
//! Both are documented byte for byte in ARCHITECTURE.md; every decoder here treats its input as
//! untrusted: lengths are checked against `constants` before anything is allocated.

pub mod constants;
pub mod error;
pub mod manifest;
pub mod manifest_blocks;
pub mod pack;
pub mod time;

pub use error::{Error, Result};

/// A chunk's identity: BLAKE3 of its plaintext.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// BLAKE3 of data that arrives in pieces (a received chunk as quinn hands it over), fed to the
/// hasher in whole runs of [`PieceHasher::RUN`] bytes. BLAKE3 hashes as many of its 1 KiB
/// chunks at once as the CPU's vectors hold (16 with AVX-512, 8 with AVX2) only from a
/// boundary of that many; after an unaligned start it works back up through subtrees of 1,
/// 2, 4, 8 chunks, so loopback's ~65 400-byte datagram pieces each began at a fraction of full
/// speed (1 MiB in such pieces: 3.2 GB/s, contiguous 4.3, through this 4.0; BENCHMARKS.md,
/// run 6). The hasher is kept between chunks only to reuse its carry buffer.
pub struct PieceHasher {
    hasher: blake3::Hasher,
    carry: Vec<u8>,
}

impl PieceHasher {
    pub const RUN: usize = 16 * 1024;

    pub fn new() -> PieceHasher {
        PieceHasher {
            hasher: blake3::Hasher::new(),
            carry: Vec::with_capacity(Self::RUN),
        }
    }

    /// The id of `pieces` back to back.
    pub fn hash<P: AsRef<[u8]>>(&mut self, pieces: &[P]) -> ChunkId {
        for piece in pieces {
            self.update(piece.as_ref());
        }
        self.finish()
    }

    fn update(&mut self, mut piece: &[u8]) {
        if !self.carry.is_empty() {
            let take = (Self::RUN - self.carry.len()).min(piece.len());
            self.carry.extend_from_slice(&piece[..take]);
            piece = &piece[take..];
            if self.carry.len() < Self::RUN {
                return;
            }
            self.hasher.update(&self.carry);
            self.carry.clear();
        }
        let whole = piece.len() - piece.len() % Self::RUN;
        self.hasher.update(&piece[..whole]);
        self.carry.extend_from_slice(&piece[whole..]);
    }

    /// The id of everything fed since the last call; ready for the next chunk.
    fn finish(&mut self) -> ChunkId {
        self.hasher.update(&self.carry);
        self.carry.clear();
        let id = ChunkId(*self.hasher.finalize().as_bytes());
        self.hasher.reset();
        id
    }
}

impl Default for PieceHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// How a payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
}

impl Codec {
    pub fn from_u8(value: u8) -> Option<Codec> {
        match value {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Lz4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Lz4 => "lz4",
        }
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However the data is cut into pieces, the id is BLAKE3 of the whole, and one hasher
        /// serves chunk after chunk.
        #[test]
        fn pieces_hash_as_the_whole(
            data in proptest::collection::vec(any::<u8>(), 0..200_000),
            cuts in proptest::collection::vec(0usize..200_000, 0..12),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut hasher = PieceHasher::new();
            for round in 0..2 {
                for pair in cuts.windows(2) {
                    hasher.update(&data[pair[0]..pair[1]]);
                }
                prop_assert_eq!(hasher.finish(), ChunkId::of(&data), "round {}", round);
            }
        }
    }

    #[test]
    fn datagram_sized_pieces_hash_as_the_whole() {
        let data: Vec<u8> = (0..(1u32 << 20) + 77)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut hasher = PieceHasher::new();
        for piece in data.chunks(65_400) {
            hasher.update(piece);
        }
        assert_eq!(hasher.finish(), ChunkId::of(&data));
    }
}
