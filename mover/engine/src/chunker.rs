//! Content-defined chunk boundaries (FastCDC 2020, normalisation level 1).
//!
//! Boundaries depend only on the bytes from the start of the extent, never on how the bytes
//! arrived (read sizes, buffer sizes, which worker): a property test pins this.

use fastcdc::v2020::FastCDC;

use mover_format::constants::{CHUNK_BYTES_AVG, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN};

/// Length of the chunk starting at `data[0]`.
///
/// The answer is final only if `data` holds more than `CHUNK_BYTES_MAX` bytes or is the rest
/// of the extent; otherwise more data might move the cut, and the caller must wait for it.
pub fn next_chunk_len(data: &[u8]) -> usize {
    if data.len() <= CHUNK_BYTES_MIN {
        return data.len();
    }
    let cdc = FastCDC::new(
        data,
        CHUNK_BYTES_MIN as u32,
        CHUNK_BYTES_AVG as u32,
        CHUNK_BYTES_MAX as u32,
    );
    let (_hash, len) = cdc.cut(0, data.len());
    debug_assert!(len > 0 && len <= CHUNK_BYTES_MAX);
    len
}

/// Whether `next_chunk_len` on `available` bytes gives a final answer.
pub fn cut_is_final(available: usize, at_end: bool) -> bool {
    at_end || available > CHUNK_BYTES_MAX
}

/// All chunk lengths of a complete extent held in memory (tests, benchmarks).
pub fn chunk_lengths(extent: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < extent.len() {
        let len = next_chunk_len(&extent[at..]);
        out.push(len);
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    }

    /// Chunks the way a worker does: bytes arrive in pieces of `step`, cuts are taken only
    /// when final.
    fn chunk_streaming(data: &[u8], step: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let (mut start, mut end) = (0, 0);
        while start < data.len() {
            end = (end + step).min(data.len());
            let at_end = end == data.len();
            while start < end && cut_is_final(end - start, at_end) {
                let len = next_chunk_len(&data[start..end]);
                out.push(len);
                start += len;
            }
        }
        out
    }

    #[test]
    fn sizes_are_within_bounds_and_average_near_target() {
        let data = random_bytes(64 << 20, 1);
        let lengths = chunk_lengths(&data);
        assert_eq!(lengths.iter().sum::<usize>(), data.len());
        for &len in &lengths[..lengths.len() - 1] {
            assert!((CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&len));
        }
        let average = data.len() / lengths.len();
        assert!(
            average > CHUNK_BYTES_AVG / 2 && average < CHUNK_BYTES_AVG * 2,
            "{average}"
        );
    }

    #[test]
    fn an_edit_moves_only_nearby_boundaries() {
        let original = random_bytes(32 << 20, 2);
        let mut edited = original.clone();
        for b in &mut edited[10 << 20..(10 << 20) + 4096] {
            *b ^= 0xff;
        }
        let a = chunk_lengths(&original);
        let b = chunk_lengths(&edited);
        let ids = |data: &[u8], lens: &[usize]| {
            let mut at = 0;
            lens.iter()
                .map(|&l| {
                    at += l;
                    blake3::hash(&data[at - l..at])
                })
                .collect::<std::collections::HashSet<_>>()
        };
        let (ia, ib) = (ids(&original, &a), ids(&edited, &b));
        let changed = ib.difference(&ia).count();
        assert!(changed <= 2, "{changed} chunks changed for one 4 KiB edit");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn boundaries_do_not_depend_on_read_size(seed in any::<u64>(), len in 0usize..(12 << 20), step_kib in 4usize..2048) {
            let data = random_bytes(len, seed);
            prop_assert_eq!(chunk_streaming(&data, step_kib * 1024), chunk_lengths(&data));
        }
    }
}
