//! The CPU stages of a backup, each measured alone on one thread over an in-memory input, then
//! together as the per-chunk work a worker does for a new chunk.
//!
//! Chunks are cut per `EXTENT_BYTES` extent exactly as the engine cuts them, so the chunk size
//! distribution (and so per-call overheads) matches a real backup.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::chunker::next_chunk_len;
use hdrhistogram::Histogram;
use mover_format::constants::{COMPRESSION_SAVING_DIVISOR, EXTENT_BYTES};
use mover_format::ChunkId;
use mover_sample::{self as sample, SampleSpec};
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

/// One measured figure of a report, with the limit it is held against. The shape is the same
/// for every kind of bench (stages, disk, backup), so a harness parses one thing.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured: a stage ("blake3"), a read pattern, "backup".
    pub name: String,
    /// What it ran over: an input kind, a file, a source path.
    pub input: String,
    /// 1e9 bytes per second of wall time over the whole pass.
    pub gb_per_s: f64,
    pub bytes: u64,
    pub seconds: f64,
    /// What bounds this figure on this node (memory bandwidth for a CPU stage, the disk's
    /// deep-queue direct read for the engine's read pattern), and its rate.
    pub limit: Option<String>,
    pub limit_gb_per_s: Option<f64>,
    /// Input bytes / lz4 output bytes (compression stages only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Per-operation latency (a chunk, a read); absent where one pass is one operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// Timed operations (chunks, or reads).
    pub ops: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Row {
    /// Holds this row against `limit` (another row's figure).
    pub fn against(&mut self, limit: &str, gb_per_s: f64) {
        self.limit = Some(limit.to_string());
        self.limit_gb_per_s = Some(gb_per_s);
    }
}

/// Per-operation latencies plus the wall time of the pass.
pub struct Recorder {
    // Nanoseconds, reported as microseconds: a 256 KiB xxh3 call takes only a few
    // microseconds, and whole-microsecond buckets would flatten it.
    hist: Histogram<u64>,
    bytes: u64,
    started: Instant,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            hist: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid bounds"),
            bytes: 0,
            started: Instant::now(),
        }
    }

    pub fn record(&mut self, bytes: usize, took: Duration) {
        self.hist.saturating_record(took.as_nanos() as u64);
        self.bytes += bytes as u64;
    }

    pub fn time<R>(&mut self, bytes: usize, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let out = f();
        self.record(bytes, t.elapsed());
        out
    }

    pub fn finish(self, input: &str, name: &str) -> Row {
        let wall = self.started.elapsed().as_secs_f64();
        let us = |ns: u64| Some(round3(ns as f64 / 1000.0));
        Row {
            name: name.to_string(),
            input: input.to_string(),
            gb_per_s: round3(if wall > 0.0 {
                self.bytes as f64 / wall / 1e9
            } else {
                0.0
            }),
            bytes: self.bytes,
            seconds: round3(wall),
            limit: None,
            limit_gb_per_s: None,
            ratio: None,
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            max_us: us(self.hist.max()),
            ops: self.hist.len(),
            note: None,
        }
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The three kinds of data an AI site backs up, by how they behave under lz4.
#[derive(Clone, Copy, Debug)]
pub enum InputKind {
    Random,
    Float32Weights,
    JsonlText,
}

impl InputKind {
    pub const ALL: [InputKind; 3] = [
        InputKind::Random,
        InputKind::Float32Weights,
        InputKind::JsonlText,
    ];

    pub fn name(self) -> &'static str {
        match self {
            InputKind::Random => "random",
            InputKind::Float32Weights => "f32-weights",
            InputKind::JsonlText => "jsonl",
        }
    }
}

/// Builds `bytes` of input. Weights and text come from `sample::generate` (through a
/// file in `scratch`, since its generators are private) so the bench measures the same bytes
/// the data sets hold.
pub fn make_input(kind: InputKind, bytes: u64, scratch: &Path) -> std::io::Result<Vec<u8>> {
    const SEED: u64 = 42;
    let spec = match kind {
        InputKind::Random => {
            let mut data = vec![0u8; bytes as usize];
            rand::rngs::SmallRng::seed_from_u64(SEED).fill_bytes(&mut data);
            return Ok(data);
        }
        InputKind::Float32Weights => SampleSpec::checkpoints(bytes, bytes, SEED),
        InputKind::JsonlText => SampleSpec {
            jsonl_shards: 1,
            jsonl_bytes: bytes,
            ..SampleSpec::checkpoints(0, 1, SEED)
        },
    };
    let dir = RemoveOnDrop(scratch.join(format!("input-{}-{}", kind.name(), std::process::id())));
    sample::generate(&dir.0, &spec)?;
    let file = only_file(&dir.0)?;
    let data = std::fs::read(&file)?;
    if data.len() as u64 != bytes {
        return Err(std::io::Error::other(format!(
            "{}: generated {} bytes, expected {bytes}",
            file.display(),
            data.len()
        )));
    }
    Ok(data)
}

/// Removes a file or directory tree when dropped, so an early `?` does not leave gigabytes
/// behind in the scratch directory.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = if self.0.is_dir() {
            std::fs::remove_dir_all(&self.0)
        } else {
            std::fs::remove_file(&self.0)
        };
    }
}

fn only_file(dir: &Path) -> std::io::Result<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                return Ok(entry.path());
            }
        }
    }
    Err(std::io::Error::other(format!(
        "{}: the generator wrote no file",
        dir.display()
    )))
}

/// Runs every CPU stage over `data` and returns one row per stage, each held against the
/// memcpy row (one core's memory bandwidth: no stage that reads its input can beat it).
pub fn run_all(input: &str, data: &[u8]) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    warm_up(data);

    // Chunking first: every later stage works on these boundaries.
    let mut chunks: Vec<(usize, usize)> = Vec::new();
    let mut rec = Recorder::new();
    for (e, extent) in data.chunks(EXTENT_BYTES as usize).enumerate() {
        let base = e * EXTENT_BYTES as usize;
        let mut at = 0;
        while at < extent.len() {
            let t = Instant::now();
            let len = next_chunk_len(&extent[at..]);
            rec.record(len, t.elapsed());
            chunks.push((base + at, len));
            at += len;
        }
    }
    let mut row = rec.finish(input, "fastcdc");
    row.note = Some(format!(
        "{} chunks, mean {:.0} KiB",
        chunks.len(),
        data.len() as f64 / chunks.len().max(1) as f64 / 1024.0
    ));
    rows.push(row);

    // Pre-faulted, so the copy measures bandwidth and not first-touch page faults.
    let mut dst = vec![1u8; data.len()];
    let mut rec = Recorder::new();
    for &(at, len) in &chunks {
        rec.time(len, || {
            dst[at..at + len].copy_from_slice(&data[at..at + len]);
        });
    }
    std::hint::black_box(&dst);
    rows.push(rec.finish(input, "memcpy"));

    let mut rec = Recorder::new();
    for &(at, len) in &chunks {
        std::hint::black_box(rec.time(len, || ChunkId::of(&data[at..at + len])));
    }
    rows.push(rec.finish(input, "blake3"));

    let mut rec = Recorder::new();
    for &(at, len) in &chunks {
        std::hint::black_box(rec.time(len, || xxh3_64(&data[at..at + len])));
    }
    rows.push(rec.finish(input, "xxh3_64"));

    // Compressed chunks are kept, back to back, for the decompression pass.
    let mut compressed = vec![
        1u8;
        chunks
            .iter()
            .map(|&(_, len)| lz4_flex::block::get_maximum_output_size(len))
            .sum::<usize>()
    ];
    let mut stored: Vec<(usize, usize)> = Vec::with_capacity(chunks.len());
    let (mut out_at, mut kept) = (0usize, 0usize);
    let mut rec = Recorder::new();
    for &(at, len) in &chunks {
        let n = rec.time(len, || {
            lz4_flex::block::compress_into(&data[at..at + len], &mut compressed[out_at..])
                .expect("output sized for the worst case")
        });
        if n < len - len / COMPRESSION_SAVING_DIVISOR {
            kept += 1;
        }
        stored.push((out_at, n));
        out_at += n;
    }
    let mut row = rec.finish(input, "lz4 compress");
    row.ratio = Some(round3(data.len() as f64 / out_at.max(1) as f64));
    row.note = Some(format!(
        "engine would keep lz4 for {kept}/{} chunks (needs >= 1/{COMPRESSION_SAVING_DIVISOR} saved)",
        chunks.len()
    ));
    rows.push(row);

    let mut rec = Recorder::new();
    for (&(at, len), &(from, n)) in chunks.iter().zip(&stored) {
        let got = rec
            .time(len, || {
                lz4_flex::block::decompress_into(
                    &compressed[from..from + n],
                    &mut dst[at..at + len],
                )
            })
            .map_err(|e| format!("{input}: lz4 could not read back its own block: {e}"))?;
        if got != len {
            return Err(format!(
                "{input}: lz4 round trip gave {got} bytes of a {len}-byte chunk"
            ));
        }
    }
    let mut row = rec.finish(input, "lz4 decompress");
    row.ratio = Some(round3(data.len() as f64 / out_at.max(1) as f64));
    if dst != data {
        return Err(format!("{input}: the lz4 round trip changed the bytes"));
    }
    rows.push(row);
    drop((dst, compressed));

    rows.push(pipeline(input, data));
    let memcpy = rows
        .iter()
        .find(|r| r.name == "memcpy")
        .map(|r| r.gb_per_s)
        .unwrap_or_default();
    // lz4 decompress writes more than it reads (a restore stage): memcpy does not bound it.
    for row in &mut rows {
        if row.name != "memcpy" && row.name != "lz4 decompress" {
            row.against("memcpy, one core", memcpy);
        }
    }
    Ok(rows)
}

/// An untimed pass over a little of the input, so the first timed stage does not pay for
/// clock ramp-up and cold code paths that later stages would not.
fn warm_up(data: &[u8]) {
    let head = &data[..data.len().min(16 << 20)];
    let mut scratch = vec![0u8; lz4_flex::block::get_maximum_output_size(head.len())];
    for len in crate::chunker::chunk_lengths(head) {
        std::hint::black_box(len);
    }
    std::hint::black_box(ChunkId::of(head));
    std::hint::black_box(lz4_flex::block::compress_into(head, &mut scratch).ok());
}

/// What a worker does for each new chunk of an extent: cut, hash, compress, keep lz4 only
/// when it saves enough, checksum the stored payload (the record header's xxh3).
fn pipeline(input: &str, data: &[u8]) -> Row {
    let max = mover_format::constants::CHUNK_BYTES_MAX;
    let mut scratch = vec![1u8; lz4_flex::block::get_maximum_output_size(max)];
    let mut rec = Recorder::new();
    let mut stored = 0usize;
    for extent in data.chunks(EXTENT_BYTES as usize) {
        let mut at = 0;
        while at < extent.len() {
            let t = Instant::now();
            let len = next_chunk_len(&extent[at..]);
            let chunk = &extent[at..at + len];
            let id = ChunkId::of(chunk);
            let n = lz4_flex::block::compress_into(chunk, &mut scratch)
                .expect("output sized for the worst case");
            let payload = if n < len - len / COMPRESSION_SAVING_DIVISOR {
                &scratch[..n]
            } else {
                chunk
            };
            let check = xxh3_64(payload);
            rec.record(len, t.elapsed());
            std::hint::black_box((id, check));
            stored += payload.len();
            at += len;
        }
    }
    let mut row = rec.finish(input, "pipeline cdc+blake3+lz4+xxh3");
    row.ratio = Some(round3(data.len() as f64 / stored.max(1) as f64));
    row.note = Some("ratio = bytes in / bytes stored under the engine's keep rule".into());
    row
}
