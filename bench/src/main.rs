//! `mover-bench`: single-thread throughput and per-chunk latency of each stage of mover's
//! backup path, so a slow end-to-end number can be traced to the stage that bounds it.
//!
//! `mover-bench stages` measures, over three in-memory inputs (random bytes, float32 weights
//! and JSONL text from `mover::sample`): memcpy, FastCDC chunking per 64 MiB extent, BLAKE3,
//! xxh3, lz4 compress and decompress per chunk, and the combined per-chunk pipeline; then one
//! io_uring direct-read pass over a file with the engine's buffer pool shape. Everything runs
//! on one thread because the engine runs one worker per core: per-core numbers times cores is
//! the ceiling a backup can reach.
//!
//! `mover-bench quic` measures raw quinn stream throughput, memory to memory between two
//! processes, with the transport settings mover uses between sites (see `quic.rs`).
//!
//! `mover-bench api` loads a running daemon's API socket from a process of its own: requests
//! per second and latency over keep-alive connections, and submit-to-running latency of jobs
//! (see `api.rs`; `bench/api.sh` sets up a site and daemon for it).
//!
//! GB/s means 1e9 bytes per second. Latencies are per chunk (per read for io_uring).

mod api;
mod quic;
mod stages;
mod uring;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

use stages::{InputKind, RemoveOnDrop, StageResult};

#[derive(Parser)]
#[command(
    name = "mover-bench",
    version,
    about = "Per-stage benchmarks of mover's backup path"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure each CPU stage and an io_uring direct read, one thread.
    Stages {
        /// Bytes of each input, in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Read this file in the io_uring stage instead of writing a scratch file.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// Where generated inputs and the scratch file go; must be on the disk to measure,
        /// not a tmpfs such as /tmp often is.
        #[arg(long, value_name = "DIR", default_value = "target/bench-tmp")]
        scratch_dir: PathBuf,
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Raw quinn transfer, memory to memory, client and server in separate processes, with
    /// mover's transport settings (transport::quic) and pinned mutual TLS.
    Quic {
        /// Payload bytes in all (4GiB, 512MiB, 2GB ...), split evenly over the streams.
        #[arg(long, default_value = "4GiB")]
        size: String,
        /// Connections, each from a thread of its own (mover opens one per worker).
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Bidirectional streams per connection.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Largest UDP payload MTU discovery may reach (mover's default: 65527 on loopback,
        /// 1452 elsewhere).
        #[arg(long)]
        udp_payload_bytes_max: Option<u16>,
        /// aes128, aes256 or chacha20.
        #[arg(long, default_value = "aes128")]
        cipher: String,
        /// cubic or bbr.
        #[arg(long, default_value = "cubic")]
        congestion: String,
        #[arg(long)]
        stream_window_bytes: Option<u32>,
        #[arg(long)]
        connection_window_bytes: Option<u32>,
        /// Pace the sender with mover's token bucket at this rate (1gbit, 950mbit ...).
        #[arg(long)]
        bandwidth: Option<String>,
        /// Runtime of each client connection's thread.
        #[arg(long, value_enum, default_value_t = quic::ClientRuntime::Uring)]
        runtime: quic::ClientRuntime,
        /// Server runtime threads (0 = one per core, as mover daemon).
        #[arg(long, default_value_t = 0)]
        server_threads: usize,
        /// Pin client connection thread i to core i (as mover pins its workers).
        #[arg(long)]
        pin: bool,
        /// Relay through `mover-wan` with these arguments, e.g. "--delay-ms 25 --loss 0.005
        /// --rate 1gbit" (the binary next to this one).
        #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
        wan: Option<String>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Load a running daemon's API socket: req/s and latency of GET /v1/jobs/{id} and
    /// GET /v1/status over keep-alive connections, then submit-to-running latency of small
    /// verify jobs.
    Api {
        /// The daemon's API socket (site.socket in its mover.toml; default: $MOVER_SOCKET).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Client threads, each with one keep-alive connection.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Length of the request run (0 leaves it out).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Verify jobs to submit one after another, timing each to `running` (0 leaves it
        /// out). Each verifies every snapshot: keep the site's catalog small.
        #[arg(long, default_value_t = 0)]
        submits: usize,
        /// Pause between the GETs that watch a submitted job for `running`.
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// The server end of `quic` (started by it).
    #[command(hide = true)]
    QuicServe {
        #[arg(long)]
        identity_dir: PathBuf,
        #[arg(long)]
        trust: String,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Serialize)]
struct Machine {
    cores: usize,
    cpu_model: String,
    kernel: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    size_mib: u64,
    threads: usize,
    stages: Vec<StageResult>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Stages {
            size_mib,
            file,
            scratch_dir,
            json,
        } => stages_command(size_mib, file.as_deref(), &scratch_dir, json),
        Command::Quic {
            size,
            connections,
            streams,
            udp_payload_bytes_max,
            cipher,
            congestion,
            stream_window_bytes,
            connection_window_bytes,
            bandwidth,
            runtime,
            server_threads,
            pin,
            wan,
            json,
        } => quic::parse_size(&size)
            .map_err(|e| format!("--size: {e}"))
            .and_then(|bytes| {
                quic::run(quic::QuicArgs {
                    bytes,
                    connections,
                    streams,
                    udp_payload_bytes_max,
                    cipher,
                    congestion,
                    stream_window_bytes,
                    connection_window_bytes,
                    bandwidth,
                    runtime,
                    server_threads,
                    pin,
                    wan,
                    json,
                })
            }),
        Command::Api {
            socket,
            connections,
            seconds,
            submits,
            poll_us,
            json,
        } => api::socket_path(socket).and_then(|socket| {
            api::run(api::ApiArgs {
                socket,
                connections,
                seconds,
                submits,
                poll_us,
                json,
            })
        }),
        Command::QuicServe {
            identity_dir,
            trust,
            threads,
        } => quic::serve(&identity_dir, &trust, threads),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mover-bench: {e}");
            ExitCode::from(1)
        }
    }
}

fn stages_command(
    size_mib: u64,
    file: Option<&Path>,
    scratch_dir: &Path,
    json: bool,
) -> Result<(), String> {
    if size_mib == 0 || size_mib > 64 * 1024 {
        return Err(format!(
            "--size-mib {size_mib}: expected 1 to 65536 (each input is held in memory twice)"
        ));
    }
    std::fs::create_dir_all(scratch_dir).map_err(|e| {
        format!(
            "--scratch-dir {}: expected a writable directory: {e}",
            scratch_dir.display()
        )
    })?;
    let bytes = size_mib << 20;
    let mut rows = Vec::new();
    for kind in InputKind::ALL {
        eprintln!("mover-bench: {} input, {size_mib} MiB ...", kind.name());
        let data = stages::make_input(kind, bytes, scratch_dir).map_err(|e| {
            format!(
                "{} input in {}: could not generate: {e}",
                kind.name(),
                scratch_dir.display()
            )
        })?;
        rows.extend(stages::run_all(kind.name(), &data));
    }

    eprintln!("mover-bench: io_uring direct read ...");
    let mut row = match file {
        Some(path) => uring::read_direct(path, &format!("file {}", path.display()))
            .map_err(|e| format!("--file {}: {e}", path.display()))?,
        None => {
            let path = scratch_dir.join(format!("uring-read-{}.dat", std::process::id()));
            let _remove = RemoveOnDrop(path.clone());
            uring::write_scratch_file(&path, bytes)
                .map_err(|e| format!("scratch file {}: could not write: {e}", path.display()))?;
            uring::read_direct(&path, &format!("scratch file {size_mib} MiB"))
                .map_err(|e| format!("scratch file {}: {e}", path.display()))?
        }
    };
    if uring::is_tmpfs(file.unwrap_or(scratch_dir)) {
        let note = row.note.take().unwrap_or_default();
        row.note = Some(format!(
            "{note}; ON TMPFS: this measured memory, not a disk"
        ));
    }
    rows.push(row);

    let report = Report {
        machine: machine(),
        size_mib,
        threads: 1,
        stages: rows,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        print_table(&report);
    }
    Ok(())
}

fn machine() -> Machine {
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

fn print_table(r: &Report) {
    println!(
        "machine: {} cores, {}, kernel {}; {} MiB per input, 1 thread; GB/s = 1e9 B/s",
        r.machine.cores, r.machine.cpu_model, r.machine.kernel, r.size_mib
    );
    println!();
    println!(
        "{:<24} {:<36} {:>8} {:>7} {:>10} {:>10} {:>10}",
        "input", "stage", "GB/s", "ratio", "p50 us", "p99 us", "max us"
    );
    let mut previous = "";
    for s in &r.stages {
        if s.input != previous && !previous.is_empty() {
            println!();
        }
        previous = &s.input;
        println!(
            "{:<24} {:<36} {:>8.3} {:>7} {:>10.1} {:>10.1} {:>10.1}",
            s.input,
            s.stage,
            s.gb_per_s,
            s.ratio.map(|x| format!("{x:.3}")).unwrap_or_default(),
            s.p50_us,
            s.p99_us,
            s.max_us
        );
    }
    println!();
    println!("notes:");
    for s in &r.stages {
        if let Some(note) = &s.note {
            println!("  {} / {}: {note}", s.input, s.stage);
        }
    }
}
