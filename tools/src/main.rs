//! `mover-datagen`: builds and changes the sample data sets that mover's benchmarks back up.
//!
//! - `generate` writes a deterministic tree with `mover_sample::generate`, so a benchmark run
//!   on one machine can be reproduced byte for byte on another from (kind, size, seed).
//! - `mutate` overwrites a contiguous `fraction` of one file in place, which models the common
//!   incremental case "a few percent of one checkpoint changed since the last backup".
//! - `size` prints a size argument in bytes, so shell scripts share this parser instead of
//!   growing their own.
//!
//! Errors are one line on stderr naming the argument or file and what was expected; exit 1.
//! Usage errors found by the argument parser exit 2, as for `mover`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use mover_sample::{self as sample, SampleSpec};
use rand::{Rng, RngCore, SeedableRng};

#[derive(Parser)]
#[command(
    name = "mover-datagen",
    version,
    about = "Generates and mutates sample data sets for mover benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a deterministic sample data set into DIR.
    Generate {
        #[arg(long, value_enum)]
        kind: Kind,
        /// Total bytes, e.g. 4GiB, 256MiB, 1GB (rounded up to whole files).
        #[arg(long, value_name = "BYTES")]
        size: Option<String>,
        /// Bytes per file for checkpoints and incompressible (default 256MiB, at most --size).
        #[arg(long, value_name = "BYTES")]
        file_size: Option<String>,
        /// Seed of the generator (quickstart always uses its own fixed seed).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Overwrite a contiguous FRACTION of FILE with new random bytes, in place.
    Mutate {
        file: PathBuf,
        /// Share of the file's bytes to overwrite, in (0, 1].
        #[arg(long, default_value_t = 0.02)]
        fraction: f64,
        /// Chooses the offset and the new bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Print a size such as 4GiB in bytes.
    Size { value: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// The fixed ~200 MB mix `mover quickstart` uses.
    Quickstart,
    /// float32 weights only.
    Checkpoints,
    /// Random bytes only.
    Incompressible,
    /// Checkpoints, JSONL text and ~2000 small files.
    Mixed,
}

const DEFAULT_FILE_BYTES: u64 = 256 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Generate {
            kind,
            size,
            file_size,
            seed,
            out,
        } => generate(kind, size.as_deref(), file_size.as_deref(), seed, &out),
        Command::Mutate {
            file,
            fraction,
            seed,
        } => mutate(&file, fraction, seed),
        Command::Size { value } => parse_size(&value)
            .map(|bytes| println!("{bytes}"))
            .map_err(|e| format!("size {e}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mover-datagen: {e}");
            ExitCode::from(1)
        }
    }
}

fn generate(
    kind: Kind,
    size: Option<&str>,
    file_size: Option<&str>,
    seed: u64,
    out: &Path,
) -> Result<(), String> {
    let size = size
        .map(|s| parse_size(s).map_err(|e| format!("--size {e}")))
        .transpose()?;
    let file_size = file_size
        .map(|s| parse_size(s).map_err(|e| format!("--file-size {e}")))
        .transpose()?;
    let need_size = |what: &str| {
        size.ok_or_else(|| format!("--size: expected a total size for --kind {what}, e.g. 4GiB"))
    };
    let spec = match kind {
        Kind::Quickstart => {
            if size.is_some() || file_size.is_some() {
                return Err("--size/--file-size: the quickstart kind has a fixed size (about 200 MB); expected neither".into());
            }
            SampleSpec::quickstart()
        }
        Kind::Mixed => {
            if file_size.is_some() {
                return Err("--file-size: the mixed kind chooses its own file sizes; expected no --file-size".into());
            }
            SampleSpec::mixed(need_size("mixed")?, seed)
        }
        Kind::Checkpoints | Kind::Incompressible => {
            let total = need_size(if matches!(kind, Kind::Checkpoints) {
                "checkpoints"
            } else {
                "incompressible"
            })?;
            // The spec rounds the total up to whole files; capping the file size keeps a
            // small --size from silently producing one much larger file.
            let per_file = file_size.unwrap_or(DEFAULT_FILE_BYTES).min(total);
            if matches!(kind, Kind::Checkpoints) {
                SampleSpec::checkpoints(total, per_file, seed)
            } else {
                SampleSpec::incompressible(total, per_file, seed)
            }
        }
    };
    let summary = sample::generate(out, &spec)
        .map_err(|e| format!("--out {}: could not write the data set: {e}", out.display()))?;
    println!(
        "generated {} files, {} bytes ({:.3} GiB) of {} data in {}",
        summary.files,
        summary.bytes,
        summary.bytes as f64 / (1u64 << 30) as f64,
        format!("{kind:?}").to_lowercase(),
        out.display()
    );
    Ok(())
}

fn mutate(file: &Path, fraction: f64, seed: u64) -> Result<(), String> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!(
            "--fraction {fraction}: expected a share of the file in (0, 1], e.g. 0.02"
        ));
    }
    let name = file.display();
    let handle = OpenOptions::new()
        .write(true)
        .open(file)
        .map_err(|e| format!("{name}: expected a writable regular file: {e}"))?;
    let meta = handle
        .metadata()
        .map_err(|e| format!("{name}: could not stat: {e}"))?;
    if !meta.is_file() || meta.len() == 0 {
        return Err(format!("{name}: expected a non-empty regular file"));
    }
    let size = meta.len();
    let (offset, len) = region(size, fraction, seed);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ 0x6d75_7461_7465);
    let mut block = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(block.len() as u64) as usize;
        rng.fill_bytes(&mut block[..n]);
        handle
            .write_all_at(&block[..n], offset + done)
            .map_err(|e| format!("{name}: write at offset {}: {e}", offset + done))?;
        done += n as u64;
    }
    // The benchmark drops caches next; without fsync the change could still be in flight.
    handle
        .sync_all()
        .map_err(|e| format!("{name}: fsync: {e}"))?;
    println!(
        "mutated {name} offset={offset} length={len} size={size} fraction={:.4}",
        len as f64 / size as f64
    );
    Ok(())
}

/// The region to overwrite: `fraction` of `size` (at least one byte), wholly inside the file.
fn region(size: u64, fraction: f64, seed: u64) -> (u64, u64) {
    let len = ((size as f64 * fraction).round() as u64).clamp(1, size);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let offset = rng.gen_range(0..=size - len);
    (offset, len)
}

/// A size in bytes, parsed by `units::ByteSize` (as in `mover.toml`): `4GiB`, `1GB`, `8K`,
/// `0.5GiB`; zero bytes is no data set.
fn parse_size(text: &str) -> Result<u64, String> {
    let size: units::ByteSize = text.parse().map_err(|e: units::ParseError| e.to_string())?;
    match size.bytes() {
        0 => Err(format!("{text:?}: zero bytes; expected more than 0 bytes")),
        bytes => Ok(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("256mib"), Ok(256 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert_eq!(parse_size("0.5GiB"), Ok(512 << 20));
        assert_eq!(parse_size(" 2 TiB "), Ok(2 << 40));
    }

    #[test]
    fn bad_sizes_say_what_was_expected() {
        for bad in ["", "GiB", "4XB", "1.2.3GiB", "0", "-1GiB", "99999999999TiB"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("expected"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn mutated_region_lies_inside_the_file() {
        for seed in 0..100 {
            let (offset, len) = region(1000, 0.02, seed);
            assert_eq!(len, 20);
            assert!(offset + len <= 1000);
        }
        assert_eq!(region(10, 0.0001, 3).1, 1);
        assert_eq!(region(10, 1.0, 3), (0, 10));
    }
}
