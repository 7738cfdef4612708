//! `mover-bench`: the transport and API measured alone, so a slow end-to-end number can be
//! traced to the part that bounds it.
//!
//! The stage speeds of one node (FastCDC, BLAKE3, lz4, direct reads) are `mover bench` in the
//! main binary (`mover::node_bench`), for harnesses on any node that has mover installed.
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

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mover-bench",
    version,
    about = "Benchmarks of mover's transport and API (stage speeds: `mover bench`)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Raw quinn transfer, memory to memory, client and server in separate processes, with
    /// mover's transport settings (transport::quic) and pinned mutual TLS.
    Quic {
        /// Payload bytes in all (4GiB, 512MiB, 2GB ...), split evenly over the streams.
        #[arg(long, default_value = "4GiB")]
        size: units::ByteSize,
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
        bandwidth: Option<units::Rate>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
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
        } => quic::run(quic::QuicArgs {
            bytes: size.bytes(),
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
