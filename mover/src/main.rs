//! The `mover` command line: parses arguments, opens the site, calls the engine, prints.
//!
//! Exit codes: 0 success; 1 the command failed (one line on stderr says why); 2 bad usage;
//! 3 `verify` found damage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

use mover::site::{self, Site};

#[derive(Parser)]
#[command(
    name = "mover",
    version,
    about = "Moves and protects AI/HPC data across sites and tiers"
)]
struct Cli {
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Run in-process on the site in DIR, without a daemon (default: $MOVER_SITE_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    site_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
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
        /// Wait for the job to finish (in --site-dir mode jobs always run to completion).
        #[arg(long)]
        wait: bool,
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
        #[arg(long)]
        wait: bool,
    },
    /// Trust between sites: `mover peer add NAME HOST:PORT FINGERPRINT`.
    Peer {
        #[command(subcommand)]
        action: PeerAction,
    },
    /// Run the site's daemon in the foreground: serves peers over QUIC (SIGTERM stops it,
    /// SIGHUP reloads the peers).
    Daemon {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List snapshots.
    Snapshots,
    /// Read every chunk of SNAPSHOT (default: all snapshots) back and check it.
    Verify { snapshot: Option<String> },
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
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOVER_LOG")
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of contexts joined, outermost first.
            eprintln!("mover: {e:#}");
            ExitCode::from(1)
        }
    }
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
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
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
                println!("created site {site} in {}", done.dir.display());
                println!("config:      {}", done.config_path.display());
                println!("fingerprint: {}", done.fingerprint);
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
                println!("{} {fingerprint}", config.site.name);
            }
        }
        Command::Backup {
            path,
            tier,
            to,
            wait: _,
        } => {
            let site = Site::open(&site_dir(&cli.site_dir)?)?;
            let job = mover::backup::run(
                &site,
                &mover::backup::BackupOptions {
                    source: path,
                    tier: tier.as_deref(),
                    to: to.as_deref(),
                },
            )?;
            print_warnings(&job.warnings);
            if cli.json {
                print_json(&job);
            } else {
                println!(
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
                    println!(
                        "to {peer}: {:.3} GB on the wire ({:.3} GB back)",
                        job.wire_bytes_sent as f64 / 1e9,
                        job.wire_bytes_received as f64 / 1e9
                    );
                }
            }
        }
        Command::Restore {
            spec,
            to,
            from,
            wait: _,
        } => {
            let site = Site::open(&site_dir(&cli.site_dir)?)?;
            let job = mover::restore::run(
                &site,
                &mover::restore::RestoreOptions {
                    spec,
                    target: to,
                    from: from.as_deref(),
                },
            )?;
            if cli.json {
                print_json(&job);
            } else {
                println!(
                    "restored {} to {}: {} files, {:.3} GB in {:.2} s",
                    job.snapshot.as_deref().unwrap_or("-"),
                    to.display(),
                    job.files,
                    job.bytes_total as f64 / 1e9,
                    job.elapsed_s
                );
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
                    println!(
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
                        println!("{name}  {}  {}", p.address, p.fingerprint);
                    }
                }
            }
        },
        Command::Daemon { config } => {
            let json = cli.json;
            let site_name = mover::config::Config::load(config)?.site.name;
            mover::daemon::run_foreground(config, |address| {
                // One line on stdout once peers can connect (tests and scripts wait for it).
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"site": site_name, "listening": address.to_string()})
                    );
                } else {
                    println!("mover daemon: site {site_name} listening on {address}");
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
        }
        Command::Snapshots => {
            let site = Site::open(&site_dir(&cli.site_dir)?)?;
            let snapshots = site.index.snapshots()?;
            if cli.json {
                print_json(&snapshots);
            } else if snapshots.is_empty() {
                println!("no snapshots");
            } else {
                println!(
                    "{:<12}  {:<20}  {:<5}  {:>8}  {:>12}  source",
                    "id", "time", "tier", "files", "bytes"
                );
                for s in &snapshots {
                    println!(
                        "{:<12}  {:<20}  {:<5}  {:>8}  {:>12}  {}",
                        &s.id[..12],
                        s.time,
                        s.tier,
                        s.files,
                        s.bytes,
                        s.source
                    );
                }
            }
        }
        Command::Verify { snapshot } => {
            let site = Site::open(&site_dir(&cli.site_dir)?)?;
            let report = mover::verify::run(&site, snapshot.as_deref())?;
            if cli.json {
                print_json(&report);
            } else {
                for d in &report.damage {
                    eprintln!(
                        "damaged: snapshot {} file {:?} chunk {}: {}",
                        &d.snapshot[..12],
                        d.path,
                        d.chunk.as_deref().unwrap_or("-"),
                        d.reason
                    );
                }
                println!(
                    "verified {} snapshot(s): {} chunks, {:.3} GB in {:.2} s; {} damaged",
                    report.snapshots.len(),
                    report.chunks_checked,
                    report.bytes_checked as f64 / 1e9,
                    report.elapsed_s,
                    report.damage.len()
                );
            }
            if let Some(d) = report.damage.first() {
                if cli.json {
                    eprintln!(
                        "mover: snapshot {} is damaged: file {:?}, chunk {}: {}",
                        &d.snapshot[..12],
                        d.path,
                        d.chunk.as_deref().unwrap_or("-"),
                        d.reason
                    );
                }
                return Ok(ExitCode::from(3));
            }
        }
        Command::Quickstart { path, dir } => {
            let json = cli.json;
            let mut progress = |line: &str| {
                if !json {
                    println!("{line}");
                }
            };
            let report = mover::quickstart::run(path.as_deref(), dir.as_deref(), &mut progress)
                .context("quickstart")?;
            if json {
                print_json(&report);
            } else {
                print_quickstart(&report);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_warnings(warnings: &[mover::job::Warning]) {
    for w in warnings {
        eprintln!("warning: {}: {}", w.path, w.reason);
    }
}

fn print_quickstart(r: &mover::quickstart::QuickstartReport) {
    println!();
    println!("quickstart report");
    println!(
        "  data        {} ({} files, {:.0} MB)",
        r.data,
        r.files,
        r.bytes_total as f64 / 1e6
    );
    println!(
        "  backup      {:.2} GB/s ({:.2} s)",
        r.backup_gb_per_s, r.backup_s
    );
    println!(
        "  dedup       {:.2}x   compression {:.2}x   stored {:.0} MB",
        r.dedup_ratio,
        r.compression_ratio,
        r.bytes_stored as f64 / 1e6
    );
    println!(
        "  unchanged   re-backup in {:.3} s, {} bytes read",
        r.second_backup_s, r.second_backup_bytes_read
    );
    println!(
        "  restore     {:.2} GB/s ({:.2} s), verified {} chunks, identical: {}",
        r.restore_gb_per_s, r.restore_s, r.verify_chunks, r.identical
    );
    println!(
        "  DR copy     {:.2} GB/s ({:.2} s) to site dr, {:.0} MB on the wire",
        r.dr_backup_gb_per_s,
        r.dr_backup_s,
        r.dr_wire_bytes as f64 / 1e6
    );
    println!(
        "  DR restore  {:.2} s, {:.0} MB on the wire, verified {} chunks at dr, identical: {}",
        r.dr_restore_s,
        r.dr_restore_wire_bytes as f64 / 1e6,
        r.dr_verify_chunks,
        r.dr_identical
    );
    println!("  snapshot    {}", r.snapshot);
    println!("  sites       {} and {}", r.site, r.dr_site);
    println!();
    println!("next: mover snapshots --site-dir {}", r.site);
    println!(
        "      mover daemon --config {}/mover.toml   (then backup --to dr, restore --from dr)",
        r.dr_site
    );
}
