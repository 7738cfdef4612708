//! `mover-wan`: a UDP relay that puts a WAN between two local processes, so that two mover
//! sites on one machine can be tested and benchmarked as if far apart (QUIC runs over it
//! unchanged).
//!
//! ```text
//! mover-wan --listen 127.0.0.1:0 --to 127.0.0.1:4433 --delay-ms 25 --jitter-ms 2 \
//!           --loss 0.005 --rate 1gbit --queue-ms 100 --seed 1 --json-stats
//! ```
//!
//! Each direction is an independent link: a bottleneck queue at `--rate` (drop-tail beyond
//! `--queue-ms`), random loss, then `--delay-ms` plus jitter that never reorders (`link`).
//! Datagrams sit in a preallocated ring per direction until due (`ring`); two threads per
//! direction move them (`relay`).
//!
//! Output: one line `listening on ADDR` on stdout once ready; on SIGTERM or SIGINT, exit 0
//! after printing, with `--json-stats`, one JSON object of per-direction counters
//! (`--stats-every-ms` adds one such line, with `t_s`, every interval). Bad
//! arguments: one line on stderr naming the flag, exit 2. Setup failures: one line, exit 1.

mod args;
mod link;
mod relay;
mod ring;

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match args::parse(std::env::args_os().skip(1)) {
        Ok(args::Parsed::Run(config)) => config,
        Ok(args::Parsed::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mover-wan: {e}");
            return ExitCode::from(2);
        }
    };
    // Block the signals before any thread starts so that every thread inherits the mask and
    // only `sigwait` below sees them (a signal that comes early stays pending until then).
    let signals = termination_signals();
    // SAFETY: `signals` is an initialised set; a null old set is allowed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if r != 0 {
        eprintln!(
            "mover-wan: pthread_sigmask: {}",
            std::io::Error::from_raw_os_error(r)
        );
        return ExitCode::from(1);
    }
    let relay = match relay::start(&config) {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("mover-wan: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    // A caller that closed our stdout still gets a working relay.
    let _ = writeln!(stdout, "listening on {}", relay.local_addr);
    let _ = stdout.flush();
    let started = std::time::Instant::now();
    let mut next_sample = config.stats_every.map(|every| started + every);
    loop {
        match next_sample {
            None => {
                let mut signal: libc::c_int = 0;
                // SAFETY: both pointers are valid for the call.
                if unsafe { libc::sigwait(&signals, &mut signal) } == 0 {
                    break;
                }
            }
            Some(due) => {
                let wait = due.saturating_duration_since(std::time::Instant::now());
                let timeout = libc::timespec {
                    tv_sec: wait.as_secs() as libc::time_t,
                    tv_nsec: wait.subsec_nanos() as libc::c_long,
                };
                // SAFETY: the set and the timeout are valid; a null info pointer is allowed.
                if unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &timeout) } > 0 {
                    break;
                }
                if std::time::Instant::now() >= due {
                    let t_s = started.elapsed().as_secs_f64();
                    let _ = writeln!(stdout, "{}", relay.stats.sample_json(t_s));
                    let _ = stdout.flush();
                    let every = config.stats_every.expect("sampling only when asked");
                    next_sample = Some(due + every);
                }
            }
        }
    }
    if config.json_stats {
        let _ = writeln!(stdout, "{}", relay.stats.to_json());
        let _ = stdout.flush();
    }
    // The relay's threads block in recv and sleep forever: leave without joining them.
    std::process::exit(0)
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
