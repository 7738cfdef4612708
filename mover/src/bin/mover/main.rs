//! The `mover` command line. Job commands talk to the daemon over its API socket; with
//! `--site-dir DIR` (or `$MOVER_SITE_DIR`) they run in-process on that site instead.
//!
//! Exit codes (a scheduler acts on them):
//! 0 done; 1 failed (the job, or the command: one line on stderr says why); 2 bad usage;
//! 3 damage found (`verify` in-process, `audit --verify`); 4 the job was cancelled;
//! 5 refused by the daemon (not allowed, bad request, no such job); 6 daemon unreachable or
//! unavailable (not running, stopping, queue full: retry later); 7 `wait --timeout` expired.

/// `outln!` that ends the command quietly when its reader has gone (see `out`).
macro_rules! outln {
    () => {
        $crate::out::line(false, format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(false, format_args!($($arg)*))
    };
}

/// `errln!` likewise.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::line(true, format_args!($($arg)*))
    };
}

mod client;
mod out;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use mover::job::JobKind;
use mover::jobs::{JobReport, JobRequest, JobSpec, RequestBody};
use mover::site::{self, Site};

pub mod exit {
    pub const FAILED: u8 = 1;
    pub const DAMAGE: u8 = 3;
    pub const CANCELLED: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const UNREACHABLE: u8 = 6;
    pub const TIMED_OUT: u8 = 7;
}

#[derive(Parser)]
#[command(
    name = "mover",
    version,
    about = "Moves and protects AI/HPC data across sites and tiers",
    after_help = "Exit codes: 0 done, 1 failed, 2 usage, 3 damage found, 4 cancelled, 5 refused by the daemon, 6 daemon unreachable or unavailable, 7 wait timed out."
)]
struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Run in-process on the site in DIR, without a daemon (default: $MOVER_SITE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    site_dir: Option<PathBuf>,
    /// The daemon's API socket (default: $MOVER_SOCKET, else /run/mover/mover.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Flags every submitted job takes.
#[derive(clap::Args, Clone)]
struct Submit {
    /// Wait for the job to end (progress on a terminal); the exit code says how it ended.
    #[arg(long)]
    wait: bool,
    /// Higher runs first (-1000 to 1000; default 0).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// A retried submit with the same key returns the first job instead of adding one.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a site: identity, configuration and tier directories.
    Init {
        #[arg(long)]
        site: String,
        #[arg(long)]
        dir: PathBuf,
        /// QUIC address peers connect to.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// API socket path.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print this site's name and certificate fingerprint.
    Identity {
        /// The site's mover.toml (alternative to --site-dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Back up PATH into a new snapshot (here, or at a peer site with --to).
    Backup {
        path: PathBuf,
        /// Tier to store into (default: the site's default tier).
        #[arg(long)]
        tier: Option<String>,
        /// Back up to a peer site instead: only chunks it lacks cross the link.
        #[arg(long, value_name = "SITE[:TIER]")]
        to: Option<String>,
        #[command(flatten)]
        submit: Submit,
    },
    /// Restore SNAPSHOT[:SUBPATH] into a new or empty directory.
    Restore {
        /// Snapshot id (or unique prefix, or `latest`), optionally `:SUBPATH`.
        spec: String,
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Read the snapshot from this peer site.
        #[arg(long, value_name = "SITE")]
        from: Option<String>,
        #[command(flatten)]
        submit: Submit,
    },
    /// Copy SNAPSHOT of this site to a peer site now (only chunks it lacks cross the link).
    Replicate {
        snapshot: String,
        #[arg(long, value_name = "SITE[:TIER]")]
        to: String,
        #[command(flatten)]
        submit: Submit,
    },
    /// List the daemon's jobs.
    Jobs {
        /// Only jobs in this state: queued, running, done, failed, cancelled.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one job.
    Status { job: String },
    /// Wait for a job to end; the exit code says how it ended.
    Wait {
        job: String,
        /// Give up after this many seconds (exit code 7).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Cancel a queued or running job.
    Cancel { job: String },
    /// Trust between sites: `mover peer add NAME HOST:PORT FINGERPRINT`.
    Peer {
        #[command(subcommand)]
        action: PeerAction,
    },
    /// Run the site's daemon in the foreground: peers over QUIC, jobs over the API socket
    /// (SIGTERM drains and stops, SIGHUP reloads peers and API access).
    Daemon {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List snapshots.
    Snapshots,
    /// This site and its peers.
    Sites,
    /// Read every chunk of SNAPSHOT (default: all snapshots) back and check it.
    Verify {
        snapshot: Option<String>,
        #[command(flatten)]
        submit: Submit,
    },
    /// Show the audit log; --verify checks its hash chain (exit 3 if a line was edited,
    /// removed or added without the daemon).
    Audit {
        #[arg(long)]
        verify: bool,
        /// Only the last N entries.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
        /// The site's mover.toml (alternative to --site-dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Rebuild a lost index.redb from the sealed packs' footers and the manifests (in-process,
    /// with the site's daemon stopped).
    RepairIndex,
    /// Measure this node for benchmark harnesses: the CPU stages, the disk's direct reads, an
    /// end-to-end backup, the link to a peer; each figure beside the limit that bounds it (one
    /// JSON shape).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// First run: a site, a sample data set, backup, restore, verify, report.
    Quickstart {
        /// Data to back up (default: a generated sample AI data set).
        path: Option<PathBuf>,
        /// Where to put the site, sample and restore (default: a new directory under $TMPDIR).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Each CPU stage of a backup (FastCDC, BLAKE3, xxh3, lz4, the per-chunk pipeline) on one
    /// core over random, float32-weight and JSONL input, against memcpy.
    Stages {
        /// MiB of each input (held in memory twice).
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Where the inputs are generated for a moment.
        #[arg(long, value_name = "DIR", default_value = ".")]
        scratch_dir: PathBuf,
    },
    /// One worker's direct reads of a scratch file, against the same reads with a deep queue.
    Disk {
        /// A directory on the disk to measure (default: the site's default tier with
        /// --site-dir or $MOVER_SITE_DIR, else the current directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Size of the scratch file (written, made durable, read, removed).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    /// Back up PATH into a scratch site (removed afterwards), against the slower of the
    /// source's direct read and the CPU pipeline on every worker.
    Backup {
        path: PathBuf,
        /// Where the scratch site goes: put it on the disk a real site would use.
        #[arg(long, value_name = "DIR", default_value = ".")]
        scratch_dir: PathBuf,
    },
    /// Send to a configured peer's daemon, which counts the bytes and stores nothing, against
    /// the link's bandwidth cap or, uncapped, raw QUIC on this node's loopback. Needs the
    /// site (--site-dir or $MOVER_SITE_DIR); runs beside its daemon.
    Link {
        /// The peer, as named in this site's [peers.SITE].
        site: String,
        /// At most this much data.
        #[arg(long, default_value_t = mover::constants::BENCH_LINK_BYTES_DEFAULT >> 20)]
        size_mib: u64,
        /// At most this long sending.
        #[arg(long, default_value_t = mover::constants::BENCH_LINK_SECONDS_DEFAULT)]
        seconds: u64,
    },
}

#[derive(Subcommand)]
enum PeerAction {
    /// Add (or replace) a peer in the config: its name, QUIC address and certificate
    /// fingerprint (as its `mover identity` prints it).
    Add {
        name: String,
        #[arg(value_name = "HOST:PORT")]
        address: String,
        fingerprint: String,
        /// The site's mover.toml (default: DIR/mover.toml of --site-dir).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the configured peers.
    List {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

fn config_path(config: &Option<PathBuf>, cli_dir: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match config {
        Some(file) => Ok(file.clone()),
        None => Ok(site_dir(cli_dir)?.join(mover::config::CONFIG_FILE_NAME)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon logs what it serves; one-shot commands only what went wrong.
    let default_filter = match cli.command {
        Command::Daemon { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into the journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOVER_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            errln!("mover: {}", mover::error::escaped(&one_line(&e)));
            ExitCode::from(1)
        }
    };
    // Connections kept for a next job that will not come in this process.
    mover::remote::net::Net::close_process();
    code
}

/// A failed command in one line: its contexts, outermost first, down to the first engine
/// error, whose own line already ends with its cause (`{:#}` would print that cause twice).
fn one_line(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for link in e.chain() {
        parts.push(link.to_string());
        if link.downcast_ref::<mover::Error>().is_some() {
            break;
        }
    }
    parts.join(": ")
}

/// Runs an in-process job on the site; with `--json` a job that fails still prints its
/// document (`state: failed`, the error), as the daemon's jobs do.
fn in_process<T>(
    cli: &Cli,
    kind: mover::job::JobKind,
    subject: String,
    job: impl FnOnce(&Site) -> mover::Result<T>,
) -> anyhow::Result<T> {
    let dir = site_dir(&cli.site_dir)?;
    let mut site_name = String::new();
    let result = Site::open(&dir).and_then(|site| {
        site_name = site.name().to_string();
        job(&site)
    });
    result.map_err(|e| {
        if cli.json {
            let mut document = mover::job::Job::new(kind, &site_name, subject, None);
            document.state = mover::job::JobState::after(&e);
            document.error = Some(e.to_string());
            print_json(&document);
        }
        e.into()
    })
}

/// The default tier's directory of the site named by --site-dir or $MOVER_SITE_DIR; the
/// current directory when none is.
fn default_tier_dir(cli_dir: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let Ok(dir) = site_dir(cli_dir) else {
        return Ok(PathBuf::from("."));
    };
    let config = mover::config::Config::load(&dir.join(mover::config::CONFIG_FILE_NAME))?;
    let tier = &config.tiers[config.default_tier()];
    Ok(dir.join(&tier.path))
}

fn site_dir(cli_dir: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = cli_dir {
        return Ok(dir.clone());
    }
    match std::env::var_os("MOVER_SITE_DIR") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => bail!(
            "no site given: pass --site-dir DIR or set MOVER_SITE_DIR (created by `mover init`)"
        ),
    }
}

fn print_json(value: &impl serde::Serialize) {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

/// The site directory of an in-process run, if one was asked for.
fn local_site(cli_dir: &Option<PathBuf>) -> Option<PathBuf> {
    site_dir(cli_dir).ok()
}

fn session(cli: &Cli) -> anyhow::Result<client::Session> {
    let socket = mover::api::client::socket_path(cli.socket.as_deref());
    Ok(client::Session {
        client: mover::api::client::Client::new(socket)?,
        json: cli.json,
    })
}

/// Prints a failed daemon command's reason and turns it into its exit code.
fn outcome(result: client::Outcome) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(failed) => {
            errln!("mover: {}", mover::error::escaped(&failed.message));
            ExitCode::from(failed.code)
        }
    }
}

/// PATH made absolute with `.` and `..` resolved as the kernel would: the part that exists
/// is canonicalised (symlinks followed), and `..` after a name that does not exist yet drops
/// that name (it is no symlink). Creating the result then makes no stray directories.
fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
    use std::path::Component;
    let context = || format!("resolve {}", path.display());
    let absolute = std::path::absolute(path).with_context(context)?;
    let mut out = PathBuf::from("/");
    // Trailing names of `out` that do not exist.
    let mut missing = 0usize;
    for component in absolute.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                // `out` up to the missing names is canonical: its parent is lexical.
                out.pop();
                missing = missing.saturating_sub(1);
            }
            Component::Normal(name) if missing > 0 => {
                out.push(name);
                missing += 1;
            }
            Component::Normal(name) => match out.join(name).canonicalize() {
                Ok(real) => out = real,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    out.push(name);
                    missing = 1;
                }
                Err(e) => return Err(e).with_context(context),
            },
        }
    }
    Ok(out)
}

/// An absolute path for the daemon, which does not share our working directory.
fn absolute(path: &Path) -> anyhow::Result<String> {
    let path = resolve(path)?;
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{}: the API takes UTF-8 paths", path.display()))
}

/// The job a job command asks for, checked as the daemon checks a submit (one
/// [`JobRequest`] for both); `None` for the other commands.
fn job_request(command: &Command) -> anyhow::Result<Option<Result<JobRequest, String>>> {
    let (body, submit) = match command {
        Command::Backup {
            path,
            tier,
            to,
            submit,
        } => (
            RequestBody {
                kind: Some(JobKind::Backup),
                path: Some(absolute(path)?),
                tier: tier.clone(),
                to: to.clone(),
                ..RequestBody::default()
            },
            submit,
        ),
        Command::Restore {
            spec,
            to,
            from,
            submit,
        } => (
            RequestBody {
                kind: Some(JobKind::Restore),
                snapshot: Some(spec.clone()),
                to: Some(absolute(to)?),
                from: from.clone(),
                ..RequestBody::default()
            },
            submit,
        ),
        Command::Replicate {
            snapshot,
            to,
            submit,
        } => (
            RequestBody {
                kind: Some(JobKind::Replicate),
                snapshot: Some(snapshot.clone()),
                to: Some(to.clone()),
                ..RequestBody::default()
            },
            submit,
        ),
        Command::Verify { snapshot, submit } => (
            RequestBody {
                kind: Some(JobKind::Verify),
                snapshot: snapshot.clone(),
                ..RequestBody::default()
            },
            submit,
        ),
        _ => return Ok(None),
    };
    let body = RequestBody {
        priority: submit.priority,
        idempotency_key: submit.idempotency_key.clone(),
        ..body
    };
    Ok(Some(JobRequest::try_from(body)))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let local = local_site(&cli.site_dir);
    let request = job_request(&cli.command)?;
    match (&cli.command, request) {
        (
            Command::Backup { submit, .. }
            | Command::Restore { submit, .. }
            | Command::Replicate { submit, .. }
            | Command::Verify { submit, .. },
            Some(request),
        ) if local.is_none() => {
            let request = match request {
                Ok(request) => request,
                // Refused here as the daemon would refuse it (exit 5), without a round trip.
                Err(message) => {
                    let code = exit::REFUSED;
                    return Ok(outcome(Err(client::Failed { code, message })));
                }
            };
            return Ok(outcome(session(&cli)?.submit(&request, submit.wait)));
        }
        (_, Some(request)) => {
            let request = request.map_err(anyhow::Error::msg)?;
            return run_job(&cli, &request.spec);
        }
        _ => {}
    }
    match &cli.command {
        Command::Jobs { state, limit } => {
            return Ok(outcome(session(&cli)?.jobs(state.as_deref(), *limit)));
        }
        Command::Status { job } => return Ok(outcome(session(&cli)?.status(job))),
        Command::Wait { job, timeout } => {
            let timeout = timeout.map(std::time::Duration::from_secs_f64);
            return Ok(outcome(session(&cli)?.follow(job, timeout)));
        }
        Command::Cancel { job } => return Ok(outcome(session(&cli)?.cancel(job))),
        Command::Snapshots if local.is_none() => {
            return Ok(outcome(
                session(&cli)?.show("/v1/snapshots", report::snapshots_value),
            ));
        }
        Command::Sites if local.is_none() => {
            return Ok(outcome(session(&cli)?.show("/v1/sites", report::sites)));
        }
        _ => {}
    }
    run_local(cli)
}

fn run_local(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Init {
            site,
            dir,
            listen,
            socket,
        } => {
            let done = site::init(&site::InitOptions {
                name: site,
                dir,
                listen: listen.as_deref(),
                socket: socket.as_deref(),
            })?;
            if cli.json {
                print_json(&serde_json::json!({
                    "site": site,
                    "dir": done.dir,
                    "config": done.config_path,
                    "fingerprint": done.fingerprint,
                }));
            } else {
                outln!("created site {site} in {}", done.dir.display());
                outln!("config:      {}", done.config_path.display());
                outln!("fingerprint: {}", done.fingerprint);
            }
        }
        Command::Identity { config } => {
            // Reads only the config and certificate: works while a daemon holds the site.
            let path = config_path(config, &cli.site_dir)?;
            let config = mover::config::Config::load(&path)?;
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            let fingerprint = site::fingerprint_of(&dir.join(&config.site.identity))?;
            if cli.json {
                print_json(
                    &serde_json::json!({"site": config.site.name, "fingerprint": fingerprint}),
                );
            } else {
                outln!("{} {fingerprint}", config.site.name);
            }
        }
        Command::Peer { action } => match action {
            PeerAction::Add {
                name,
                address,
                fingerprint,
                config,
            } => {
                let path = config_path(config, &cli.site_dir)?;
                let replaced = mover::peers::add_to_config(&path, name, address, fingerprint)?;
                if cli.json {
                    print_json(&serde_json::json!({
                        "peer": name, "address": address, "fingerprint": fingerprint,
                        "config": path, "replaced": replaced,
                    }));
                } else {
                    outln!(
                        "{} peer {name} at {address} ({fingerprint}) in {}; a running daemon picks it up on SIGHUP",
                        if replaced { "replaced" } else { "added" },
                        path.display()
                    );
                }
            }
            PeerAction::List { config } => {
                let path = config_path(config, &cli.site_dir)?;
                let config = mover::config::Config::load(&path)?;
                if cli.json {
                    let peers: Vec<_> = config
                        .peers
                        .iter()
                        .map(|(name, p)| serde_json::json!({"peer": name, "address": p.address, "fingerprint": p.fingerprint, "bandwidth": p.bandwidth}))
                        .collect();
                    print_json(&peers);
                } else {
                    for (name, p) in &config.peers {
                        outln!("{name}  {}  {}", p.address, p.fingerprint);
                    }
                }
            }
        },
        Command::Daemon { config } => {
            let json = cli.json;
            let site_name = mover::config::Config::load(config)?.site.name;
            mover::daemon::run_foreground(config, |ready| {
                // One line on stdout once peers and callers can connect (tests and scripts
                // wait for it). Nobody reading it is no reason to stop serving.
                use std::io::Write;
                let peers = ready.peers.map(|a| a.to_string());
                let socket = ready.socket.as_ref().map(|p| p.display().to_string());
                let line = if json {
                    serde_json::json!({"site": site_name, "listening": peers, "socket": socket})
                        .to_string()
                } else {
                    format!(
                        "mover daemon: site {site_name} listening on {}, api on {}",
                        peers.as_deref().unwrap_or("(no peers: site.listen unset)"),
                        socket.as_deref().unwrap_or("-")
                    )
                };
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
            })?;
        }
        Command::RepairIndex => {
            let report = mover::repair::repair_index(&site_dir(&cli.site_dir)?)?;
            if cli.json {
                print_json(&report);
            } else {
                for skipped in &report.skipped {
                    outln!("skipped {skipped}");
                }
                outln!(
                    "rebuilt {}: {} packs ({} chunks), {} snapshots; {} packs skipped, {} snapshots left out; the job history and queue are not recoverable",
                    report.index,
                    report.packs_indexed,
                    report.chunks_indexed,
                    report.snapshots,
                    report.packs_skipped,
                    report.snapshots_left_out
                );
            }
        }
        Command::Snapshots => {
            let site = Site::open(&site_dir(&cli.site_dir)?)?;
            let snapshots = site
                .index
                .snapshots()
                .map_err(|e| e.in_index(&site.index_path()))?;
            if cli.json {
                print_json(&snapshots);
            } else {
                report::snapshots_value(&serde_json::to_value(&snapshots)?);
            }
        }
        Command::Sites => {
            let dir = site_dir(&cli.site_dir)?;
            let config = mover::config::Config::load(&dir.join(mover::config::CONFIG_FILE_NAME))?;
            let fingerprint = site::fingerprint_of(&dir.join(&config.site.identity)).ok();
            let mut sites = vec![serde_json::json!({
                "site": config.site.name, "local": true, "listen": config.site.listen,
                "fingerprint": fingerprint,
            })];
            for (name, p) in &config.peers {
                sites.push(serde_json::json!({
                    "site": name, "local": false, "address": p.address,
                    "fingerprint": p.fingerprint, "bandwidth": p.bandwidth,
                }));
            }
            let sites = serde_json::Value::Array(sites);
            if cli.json {
                print_json(&sites);
            } else {
                report::sites(&sites);
            }
        }
        Command::Audit {
            verify,
            last,
            config,
        } => {
            let path = config_path(config, &cli.site_dir)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let log = dir.join(mover::daemon::AUDIT_FILE_NAME);
            return report::audit(&log, *verify, *last, cli.json);
        }
        Command::Bench { what } => {
            let report = match what {
                BenchWhat::Stages {
                    size_mib,
                    scratch_dir,
                } => mover::node_bench::stages(*size_mib, scratch_dir)?,
                BenchWhat::Disk { dir, size_mib } => {
                    let dir = match dir {
                        Some(dir) => dir.clone(),
                        None => default_tier_dir(&cli.site_dir)?,
                    };
                    mover::node_bench::disk(&dir, *size_mib)?
                }
                BenchWhat::Backup { path, scratch_dir } => {
                    mover::node_bench::backup(path, scratch_dir)?
                }
                BenchWhat::Link {
                    site,
                    size_mib,
                    seconds,
                } => mover::node_bench::link(
                    &site_dir(&cli.site_dir)?,
                    site,
                    size_mib.saturating_mul(1 << 20),
                    *seconds,
                )?,
            };
            if cli.json {
                print_json(&report);
            } else {
                report::bench(&report);
            }
        }
        Command::Quickstart { path, dir } => {
            let json = cli.json;
            let mut progress = |line: &str| {
                if !json {
                    outln!("{line}");
                }
            };
            let report = mover::quickstart::run(path.as_deref(), dir.as_deref(), &mut progress)
                .context("quickstart")?;
            if json {
                print_json(&report);
            } else {
                report::quickstart(&report);
            }
        }
        Command::Jobs { .. }
        | Command::Status { .. }
        | Command::Wait { .. }
        | Command::Cancel { .. } => unreachable!("handled by run() through the daemon"),
        Command::Backup { .. }
        | Command::Restore { .. }
        | Command::Replicate { .. }
        | Command::Verify { .. } => unreachable!("handled by run() as jobs"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a job in-process through the daemon's runner and prints its report.
fn run_job(cli: &Cli, spec: &JobSpec) -> anyhow::Result<ExitCode> {
    let subject = match spec {
        JobSpec::Backup { path, .. } => path.as_str().to_string(),
        JobSpec::Restore { to, .. } => to.as_str().to_string(),
        JobSpec::Replicate { snapshot, .. } => snapshot.as_str().to_string(),
        JobSpec::Verify { snapshot } => snapshot
            .as_ref()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
    };
    let report = in_process(cli, spec.kind(), subject, |site| {
        mover::jobs::run(site, spec, None, false)
    })?;
    match (spec, report) {
        (JobSpec::Backup { .. }, JobReport::Backup(job)) => {
            print_warnings(&job.warnings);
            if cli.json {
                print_json(&job);
            } else {
                outln!(
                    "snapshot {}  {} files, {:.3} GB in {:.2} s ({:.2} GB/s); read {:.3} GB, new {:.3} GB, {} {:.3} GB",
                    job.snapshot.as_deref().unwrap_or("-"),
                    job.files,
                    job.bytes_total as f64 / 1e9,
                    job.elapsed_s,
                    job.gb_per_s(),
                    job.bytes_read as f64 / 1e9,
                    job.bytes_new as f64 / 1e9,
                    if job.destination.is_some() { "shipped" } else { "stored" },
                    job.bytes_sent as f64 / 1e9,
                );
                if let Some(peer) = &job.destination {
                    outln!(
                        "to {peer}: {:.3} GB on the wire ({:.3} GB back)",
                        job.wire_bytes_sent as f64 / 1e9,
                        job.wire_bytes_received as f64 / 1e9
                    );
                }
            }
        }
        (JobSpec::Restore { to, .. }, JobReport::Restore(job)) => {
            if cli.json {
                print_json(&job);
            } else {
                // Holes are not written: the rate is over the bytes written.
                outln!(
                    "restored {} to {}: {} files, {:.3} GB ({:.3} GB written) in {:.2} s ({:.2} GB/s written)",
                    job.snapshot.as_deref().unwrap_or("-"),
                    to.as_str(),
                    job.files,
                    job.bytes_total as f64 / 1e9,
                    job.bytes_written as f64 / 1e9,
                    job.elapsed_s,
                    job.bytes_written as f64 / job.elapsed_s.max(1e-6) / 1e9
                );
            }
        }
        (JobSpec::Replicate { to, .. }, JobReport::Replicate(job)) => {
            if cli.json {
                print_json(&job);
            } else {
                outln!(
                    "replicated {} to {to}: {} chunks ({:.3} GB) sent, {:.3} GB on the wire",
                    job.snapshot.as_deref().unwrap_or("-"),
                    job.chunks_new,
                    job.bytes_sent as f64 / 1e9,
                    job.wire_bytes_sent as f64 / 1e9
                );
            }
        }
        (JobSpec::Verify { .. }, JobReport::Verify(report)) => {
            if cli.json {
                print_json(&report);
            } else {
                for d in &report.damage {
                    errln!(
                        "damaged: snapshot {} file {:?} chunk {}: {}",
                        &d.snapshot[..12],
                        d.path,
                        d.chunk.as_deref().unwrap_or("-"),
                        d.reason
                    );
                }
                outln!(
                    "verified {} snapshot(s): {} chunks, {:.3} GB in {:.2} s; damaged: {} snapshot(s), {} file(s), {} chunk(s)",
                    report.snapshots.len(),
                    report.chunks_checked,
                    report.bytes_checked as f64 / 1e9,
                    report.elapsed_s,
                    report.snapshots_damaged,
                    report.files_damaged,
                    report.chunks_damaged
                );
            }
            if let Some(d) = report.damage.first() {
                if cli.json {
                    errln!(
                        "mover: snapshot {} is damaged: file {:?}, chunk {}: {}",
                        &d.snapshot[..12],
                        d.path,
                        d.chunk.as_deref().unwrap_or("-"),
                        d.reason
                    );
                }
                return Ok(ExitCode::from(exit::DAMAGE));
            }
        }
        (spec, report) => bail!(
            "a {} job reported as a {} (a bug)",
            spec.kind().name(),
            report.kind().name()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_warnings(warnings: &[mover::job::Warning]) {
    for w in warnings {
        let escaped = mover::error::escaped;
        errln!("warning: {}: {}", escaped(&w.path), escaped(&w.reason));
    }
}
