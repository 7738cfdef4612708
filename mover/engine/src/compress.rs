//! Chunk compression: lz4 where it saves enough, raw otherwise, without paying a full lz4
//! pass on data that keeps refusing to compress.
//!
//! Trying lz4 on incompressible data (random, already-compressed, encrypted) costs ~0.12 ns
//! per byte, a tenth of a cross-site backup's whole CPU budget on this machine
//! (BENCHMARKS.md). Data sets come in runs: a file of safetensors or a tarball of JPEGs is
//! incompressible from end to end. After a run of chunks stored raw, only a sample of each
//! chunk is tried; a sample that compresses brings full attempts back. Which codec a chunk
//! gets never changes its id (the hash of the plaintext), so dedup is unaffected.

use mover_format::constants::{CHUNK_BYTES_MAX, COMPRESSION_SAVING_DIVISOR};
use mover_format::Codec;

/// Consecutive raw chunks after which only samples are tried.
const RAW_STREAK_FOR_SAMPLING: u32 = 4;
/// Bytes of a chunk tried when sampling (from its middle: headers at the start of a file
/// compress better than what follows).
const SAMPLE_BYTES: usize = 64 * 1024;

pub struct Compressor {
    out: Vec<u8>,
    raw_streak: u32,
    /// Chunks whose full lz4 attempt was skipped on a sample's verdict (for the job's stats).
    pub skipped: u64,
}

impl Default for Compressor {
    fn default() -> Compressor {
        Compressor::new()
    }
}

impl Compressor {
    pub fn new() -> Compressor {
        Compressor {
            out: vec![0u8; lz4_flex::block::get_maximum_output_size(CHUNK_BYTES_MAX)],
            raw_streak: 0,
            skipped: 0,
        }
    }

    /// The codec and the payload to store for `data` (at most `CHUNK_BYTES_MAX` bytes).
    pub fn compress<'a>(&'a mut self, data: &'a [u8]) -> (Codec, &'a [u8]) {
        assert!(data.len() <= CHUNK_BYTES_MAX, "chunk over the maximum");
        if self.raw_streak >= RAW_STREAK_FOR_SAMPLING && data.len() > 2 * SAMPLE_BYTES {
            let from = (data.len() - SAMPLE_BYTES) / 2;
            let sample = &data[from..from + SAMPLE_BYTES];
            if !saves_enough(sample.len(), self.lz4(sample)) {
                self.skipped += 1;
                return (Codec::Raw, data);
            }
        }
        let n = self.lz4(data);
        if saves_enough(data.len(), n) {
            self.raw_streak = 0;
            (Codec::Lz4, &self.out[..n])
        } else {
            self.raw_streak = self.raw_streak.saturating_add(1);
            (Codec::Raw, data)
        }
    }

    fn lz4(&mut self, data: &[u8]) -> usize {
        lz4_flex::block::compress_into(data, &mut self.out)
            .expect("output buffer sized for the worst case")
    }
}

/// lz4 is kept only when it saves at least 1/COMPRESSION_SAVING_DIVISOR of the chunk.
fn saves_enough(len: usize, compressed: usize) -> bool {
    compressed < len - len / COMPRESSION_SAVING_DIVISOR
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut data = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        data
    }

    fn text(len: usize) -> Vec<u8> {
        b"step=1000 loss=0.2731 lr=3e-4 grad_norm=1.02\n"
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    #[test]
    fn compressible_chunks_are_compressed_and_round_trip() {
        let mut c = Compressor::new();
        let data = text(1 << 20);
        let (codec, payload) = c.compress(&data);
        assert_eq!(codec, Codec::Lz4);
        let back = lz4_flex::block::decompress(payload, data.len()).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_run_of_raw_chunks_switches_to_sampling_and_a_compressible_chunk_switches_back() {
        let mut c = Compressor::new();
        for seed in 0..RAW_STREAK_FOR_SAMPLING as u64 + 3 {
            let data = random(1 << 20, seed);
            let (codec, payload) = c.compress(&data);
            assert_eq!(codec, Codec::Raw);
            assert_eq!(payload, &data[..]);
        }
        assert_eq!(
            c.skipped, 3,
            "chunks after the streak were judged on a sample"
        );
        // Compressible data right after the streak is still compressed (its sample says so).
        let data = text(1 << 20);
        assert_eq!(c.compress(&data).0, Codec::Lz4);
        assert_eq!(c.raw_streak, 0);
        assert_eq!(c.skipped, 3);
    }

    #[test]
    fn small_chunks_are_always_tried_whole() {
        let mut c = Compressor::new();
        c.raw_streak = RAW_STREAK_FOR_SAMPLING;
        let mut data = random(100_000, 7);
        data[..50_000].fill(0);
        assert_eq!(c.compress(&data).0, Codec::Lz4);
        assert_eq!(c.skipped, 0);
    }
}
