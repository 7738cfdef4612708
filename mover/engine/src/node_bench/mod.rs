//! `mover bench`: what this node can do, for benchmark harnesses. Each figure stands beside the
//! limit that bounds it on this node, so a harness sees how far from the ceiling it is:
//!
//! - `stages`: each CPU stage of a backup on one thread (FastCDC, BLAKE3, xxh3, lz4, and the
//!   per-chunk pipeline), over in-memory inputs, against memcpy on the same core;
//! - `disk`: one worker's direct-read pattern on a scratch file, against the same reads with a
//!   deep queue (the disk's own rate);
//! - `backup PATH`: an end-to-end backup into a scratch site, against the slower of the
//!   source's deep-queue direct read and the CPU pipeline times the workers;
//! - `link SITE`: a Bench stream to a configured peer, against the link's bandwidth cap or,
//!   uncapped, raw QUIC on this node's loopback.
//!
//! Every report has one JSON shape ([`Report`]). GB/s means 1e9 bytes per second. Comparisons
//! with other tools (rsync, restic, borg, iperf3) stay in `bench/`.

pub mod disk;
pub mod link;
pub mod stages;

pub use link::link;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use mover_format::error::{Error, Result};
pub use stages::{InputKind, RemoveOnDrop, Row};

/// One bench's result: the node it ran on and its rows.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `stages`, `disk`, `backup` or `link`.
    pub bench: &'static str,
    pub machine: Machine,
    pub rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| k.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            kernel,
        }
    }
}

/// Largest input per kind for `stages` (each is held in memory twice).
pub const STAGES_MIB_MAX: u64 = 64 * 1024;

/// Each CPU stage over `size_mib` MiB of each input kind, on this thread. `scratch` receives
/// the generated inputs for a moment (the sample generator writes files).
pub fn stages(size_mib: u64, scratch: &Path) -> Result<Report> {
    if size_mib == 0 || size_mib > STAGES_MIB_MAX {
        return Err(Error::Refused(format!(
            "--size-mib {size_mib}: expected 1 to {STAGES_MIB_MAX} (each input is held in memory twice)"
        )));
    }
    let mut rows = Vec::new();
    for kind in InputKind::ALL {
        tracing::info!(input = kind.name(), size_mib, "measuring the CPU stages");
        let data = stages::make_input(kind, size_mib << 20, scratch)
            .map_err(|e| Error::io("generate bench input in", scratch, e))?;
        rows.extend(stages::run_all(kind.name(), &data).map_err(Error::Resource)?);
    }
    Ok(Report {
        bench: "stages",
        machine: Machine::this(),
        rows,
    })
}

/// The engine's read pattern and the deep-queue one over a `size_mib` MiB scratch file in
/// `dir`, written and made durable first (removed afterwards).
pub fn disk(dir: &Path, size_mib: u64) -> Result<Report> {
    if size_mib == 0 {
        return Err(Error::Refused(
            "--size-mib 0: expected at least 1 MiB to read".into(),
        ));
    }
    let path = dir.join(format!(".mover-bench-disk-{}.dat", std::process::id()));
    let _remove = RemoveOnDrop(path.clone());
    disk::write_scratch_file(&path, size_mib << 20)
        .map_err(|e| Error::io("write bench scratch file", &path, e))?;
    let input = format!("scratch file {size_mib} MiB in {}", dir.display());
    let rows = read_rows(&path, &input, u64::MAX)?;
    Ok(Report {
        bench: "disk",
        machine: Machine::this(),
        rows,
    })
}

/// Both read patterns over `path` (at most `limit_bytes` of it), the engine's held against the
/// deep one.
fn read_rows(path: &Path, input: &str, limit_bytes: u64) -> Result<Vec<Row>> {
    let read = |pattern| {
        disk::read_direct(path, input, pattern, limit_bytes)
            .map_err(|e| Error::io("bench read", path, e))
    };
    let deep = read(disk::Pattern::DEEP)?;
    let mut engine = read(disk::Pattern::ENGINE)?;
    engine.against(&deep.name, deep.gb_per_s);
    let mut rows = vec![engine, deep];
    if disk::is_tmpfs(path) {
        for row in &mut rows {
            let note = row.note.take().unwrap_or_default();
            row.note = Some(format!(
                "{note}; ON TMPFS: this measured memory, not a disk"
            ));
        }
    }
    Ok(rows)
}

/// How much of the source's largest file the limit read covers: enough to be past any
/// device cache's first burst, little enough to stay quick.
const SOURCE_READ_BYTES_MAX: u64 = 1 << 30;
/// The CPU pipeline is measured over this much random input.
const PIPELINE_MIB: u64 = 256;

/// Backs up `source` into a new site under `scratch` (removed afterwards) and holds the rate
/// against the slower of the source's deep-queue direct read and the CPU pipeline on every
/// worker.
pub fn backup(source: &Path, scratch: &Path) -> Result<Report> {
    let largest = largest_file(source)?;
    let site_dir = scratch.join(format!(".mover-bench-site-{}", std::process::id()));
    let _remove = RemoveOnDrop(site_dir.clone());
    crate::site::init(&crate::site::InitOptions {
        name: "bench",
        dir: &site_dir,
        listen: None,
        socket: None,
    })?;
    let site = crate::site::Site::open(&site_dir)?;
    let workers = site.config.workers();

    let started = Instant::now();
    let job = crate::backup::run(
        &site,
        &crate::backup::BackupOptions {
            source,
            tier: None,
            to: None,
            control: None,
        },
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let mut row = Row {
        name: "backup".into(),
        input: source.display().to_string(),
        gb_per_s: stages::round3(job.bytes_read as f64 / seconds.max(1e-9) / 1e9),
        bytes: job.bytes_read,
        seconds: stages::round3(seconds),
        limit: None,
        limit_gb_per_s: None,
        ratio: None,
        p50_us: None,
        p99_us: None,
        max_us: None,
        ops: job.files,
        note: Some(format!(
            "{} files, {} workers, {} B new, direct I/O {}, into a new site in {}",
            job.files,
            workers,
            job.bytes_new,
            job.direct_io,
            scratch.display()
        )),
    };

    let mut rows = Vec::new();
    if let Some(file) = largest {
        rows.extend(read_rows(
            &file,
            &format!("largest source file {}", file.display()),
            SOURCE_READ_BYTES_MAX,
        )?);
    }
    let data = stages::make_input(InputKind::Random, PIPELINE_MIB << 20, scratch)
        .map_err(|e| Error::io("generate bench input in", scratch, e))?;
    let mut pipeline = stages::run_all("random", &data)
        .map_err(Error::Resource)?
        .into_iter()
        .find(|r| r.name.starts_with("pipeline"))
        .ok_or_else(|| Error::Resource("the stages bench has no pipeline row".into()))?;
    let cpu = pipeline.gb_per_s * workers as f64;
    pipeline.note = Some(format!(
        "one core; x {workers} workers = {cpu:.3} GB/s for the whole node"
    ));
    rows.push(pipeline);
    let (limit, rate) = match rows.iter().find(|r| r.name == disk::Pattern::DEEP.name()) {
        Some(read) if read.gb_per_s < cpu => ("source direct read", read.gb_per_s),
        _ => ("CPU pipeline x workers", cpu),
    };
    row.against(limit, stages::round3(rate));
    rows.insert(0, row);
    Ok(Report {
        bench: "backup",
        machine: Machine::this(),
        rows,
    })
}

/// The largest regular file under `source` (None for a tree of empty files).
fn largest_file(source: &Path) -> Result<Option<PathBuf>> {
    let meta =
        std::fs::symlink_metadata(source).map_err(|e| Error::io("bench source", source, e))?;
    if meta.is_file() {
        return Ok((meta.len() > 0).then(|| source.to_path_buf()));
    }
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![source.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read directory", &dir, e))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("stat", &path, e))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && meta.len() > best.as_ref().map_or(0, |b| b.0) {
                best = Some((meta.len(), path));
            }
        }
    }
    Ok(best.map(|b| b.1))
}
