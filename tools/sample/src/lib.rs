//! A generator of AI-like sample data sets: float32 checkpoints (incompressible for lz4, a
//! little compressible for zstd), JSONL text shards (compressible), many small files, and
//! random bytes. Deterministic for a seed, so benchmarks and tests can regenerate the same
//! tree. `mover quickstart` uses it when no path is given; tools/ wraps it as `mover-datagen`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rand::{Rng, RngCore, SeedableRng};

#[derive(Clone, Debug)]
pub struct SampleSpec {
    pub checkpoints: usize,
    pub checkpoint_bytes: u64,
    pub jsonl_shards: usize,
    pub jsonl_bytes: u64,
    pub small_files: usize,
    pub random_files: usize,
    pub random_bytes: u64,
    pub seed: u64,
}

impl SampleSpec {
    /// About 200 MB: quick to back up anywhere, varied enough to show dedup and compression.
    pub fn quickstart() -> SampleSpec {
        SampleSpec {
            checkpoints: 2,
            checkpoint_bytes: 64 << 20,
            jsonl_shards: 2,
            jsonl_bytes: 16 << 20,
            small_files: 200,
            random_files: 1,
            random_bytes: 32 << 20,
            seed: 42,
        }
    }

    /// Only float32 checkpoint files, `total` bytes in files of `file_bytes`.
    pub fn checkpoints(total: u64, file_bytes: u64, seed: u64) -> SampleSpec {
        SampleSpec {
            checkpoints: total.div_ceil(file_bytes) as usize,
            checkpoint_bytes: file_bytes,
            jsonl_shards: 0,
            jsonl_bytes: 0,
            small_files: 0,
            random_files: 0,
            random_bytes: 0,
            seed,
        }
    }

    /// Only incompressible bytes, `total` bytes in files of `file_bytes`.
    pub fn incompressible(total: u64, file_bytes: u64, seed: u64) -> SampleSpec {
        SampleSpec {
            random_files: total.div_ceil(file_bytes) as usize,
            random_bytes: file_bytes,
            ..SampleSpec::checkpoints(0, 1, seed)
        }
    }

    /// Roughly the mix the peers were measured on: three quarters checkpoints, a fifth JSONL
    /// text, the rest small files (at most 2000, about 32 KiB each).
    pub fn mixed(total: u64, seed: u64) -> SampleSpec {
        let checkpoint_bytes = (total * 3 / 4 / 12).clamp(1 << 20, 256 << 20);
        SampleSpec {
            checkpoints: (total * 3 / 4).div_ceil(checkpoint_bytes) as usize,
            checkpoint_bytes,
            jsonl_shards: 4,
            jsonl_bytes: total / 5 / 4,
            small_files: (total / 20 / (32 << 10)).min(2000) as usize,
            random_files: 0,
            random_bytes: 0,
            seed,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SampleSummary {
    pub files: u64,
    pub bytes: u64,
}

pub fn generate(dir: &Path, spec: &SampleSpec) -> std::io::Result<SampleSummary> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(spec.seed);
    let mut summary = SampleSummary::default();
    let mut add = |path: &Path, bytes: u64| -> std::io::Result<BufWriter<File>> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        summary.files += 1;
        summary.bytes += bytes;
        Ok(BufWriter::with_capacity(1 << 20, File::create(path)?))
    };
    for i in 0..spec.checkpoints {
        let mut out = add(
            &dir.join(format!("checkpoints/step-{:06}.f32", (i + 1) * 1000)),
            spec.checkpoint_bytes,
        )?;
        write_f32_weights(&mut out, spec.checkpoint_bytes, &mut rng)?;
        out.flush()?;
    }
    for i in 0..spec.jsonl_shards {
        let mut out = add(
            &dir.join(format!("corpus/shard-{i:04}.jsonl")),
            spec.jsonl_bytes,
        )?;
        write_jsonl(&mut out, spec.jsonl_bytes, &mut rng)?;
        out.flush()?;
    }
    for i in 0..spec.random_files {
        let mut out = add(
            &dir.join(format!("blobs/blob-{i:04}.bin")),
            spec.random_bytes,
        )?;
        write_random(&mut out, spec.random_bytes, &mut rng)?;
        out.flush()?;
    }
    for i in 0..spec.small_files {
        let bytes = rng.gen_range(1u64..64 * 1024);
        let mut out = add(
            &dir.join(format!("samples/{:02}/sample-{i:05}.bin", i % 16)),
            bytes,
        )?;
        write_random(&mut out, bytes, &mut rng)?;
        out.flush()?;
    }
    Ok(summary)
}

/// Weights around N(0, 0.5): random mantissas, exponents within a narrow band, like trained
/// float32 tensors; lz4 finds nothing, zstd a few percent.
fn write_f32_weights(
    out: &mut impl Write,
    bytes: u64,
    rng: &mut impl RngCore,
) -> std::io::Result<()> {
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for word in block.chunks_exact_mut(4) {
            let r = rng.next_u32();
            let sign = r & 0x8000_0000;
            let exponent = 118 + (r >> 23 & 0x7); // 2^-9 .. 2^-2
            let mantissa = r & 0x007f_ffff;
            word.copy_from_slice(&(sign | exponent << 23 | mantissa).to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn write_jsonl(out: &mut impl Write, bytes: u64, rng: &mut impl RngCore) -> std::io::Result<()> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "gradient",
        "token",
        "layer",
        "attention",
        "batch",
        "loss",
        "weights",
        "training",
        "data",
        "node",
        "cluster",
        "storage",
        "checkpoint",
        "epoch",
        "learning",
        "rate",
        "of",
        "and",
        "a",
        "to",
        "in",
        "is",
        "with",
        "for",
        "on",
        "scheduler",
        "tensor",
        "precision",
        "inference",
        "prompt",
        "sequence",
        "vector",
        "embedding",
        "shard",
    ];
    let mut written = 0u64;
    let mut id = 0u64;
    let mut line = String::new();
    while written < bytes {
        line.clear();
        line.push_str(&format!(
            "{{\"id\":{id},\"score\":{:.4},\"text\":\"",
            (rng.next_u32() % 10000) as f64 / 10000.0
        ));
        let words = 8 + rng.next_u32() % 40;
        for w in 0..words {
            if w > 0 {
                line.push(' ');
            }
            line.push_str(WORDS[rng.next_u32() as usize % WORDS.len()]);
        }
        line.push_str("\"}\n");
        let take = line.len().min((bytes - written) as usize);
        out.write_all(&line.as_bytes()[..take])?;
        written += take as u64;
        id += 1;
    }
    Ok(())
}

fn write_random(out: &mut impl Write, bytes: u64, rng: &mut impl RngCore) -> std::io::Result<()> {
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}
