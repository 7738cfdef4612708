//! Command line of `mover-wan`, parsed by clap; every mistake is still reported as one line
//! naming the flag and what was expected (clap's own rendering spans several lines).

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;

/// Longest one-way delay, jitter or queue accepted: a minute is already far beyond any WAN.
const MAX_MS: f64 = 60_000.0;

#[derive(Parser, Debug)]
#[command(
    name = "mover-wan",
    version,
    allow_negative_numbers = true,
    about = "UDP relay that makes two local processes (QUIC endpoints) look far apart",
    long_about = "UDP relay that makes two local processes (QUIC endpoints) look far apart. \
Datagrams sent to --listen go to --to from one upstream socket per client address; replies \
come back. Each direction has its own delay, jitter, loss and rate cap, so the round trip is \
2 x --delay-ms.",
    after_help = "Prints `listening on ADDR` once started; exits 0 on SIGTERM or SIGINT, 2 on bad arguments."
)]
struct Cli {
    /// Where client datagrams go (host:port).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    to: SocketAddr,
    /// Address clients send to (port 0 picks one).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// One-way delay per direction, in milliseconds (fractions allowed).
    #[arg(long = "delay-ms", value_name = "MS", value_parser = parse_ms, default_value = "0")]
    delay_ns: u64,
    /// Extra uniform delay in [0, MS] per datagram; never reorders.
    #[arg(long = "jitter-ms", value_name = "MS", value_parser = parse_ms, default_value = "0")]
    jitter_ns: u64,
    /// Independent drop probability per datagram in [0, 1].
    #[arg(long, value_name = "P", value_parser = parse_probability, default_value = "0")]
    loss: f64,
    /// Link rate per direction, read as mover.toml's bandwidth: 100mbit, 1gbit, 2Gbps, 50Mb/s
    /// (bits), 125MB/s, 1GiB/s (bytes); counts UDP payload bytes [default: unlimited].
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    rate: Option<u64>,
    /// Bottleneck queue in time at --rate; drop-tail beyond it.
    #[arg(long = "queue-ms", value_name = "MS", value_parser = parse_ms, default_value = "100")]
    queue_ns: u64,
    /// Relay buffer per direction in MiB [default: sized from rate, delay and queue].
    #[arg(long = "buffer-mib", value_name = "MIB", value_parser = parse_buffer_mib)]
    buffer_bytes: Option<usize>,
    /// Seed of the loss and jitter generators.
    #[arg(long, value_name = "N", value_parser = parse_seed, default_value = "1")]
    seed: u64,
    /// On SIGTERM/SIGINT print one JSON object of per-direction counters.
    #[arg(long = "json-stats")]
    json_stats: bool,
    /// Also print the counters as one JSON line (with "t_s", seconds since start) every MS
    /// milliseconds, for a time series of the link's use.
    #[arg(long = "stats-every-ms", value_name = "MS", value_parser = parse_stats_every)]
    stats_every: Option<Duration>,
}

/// Everything the relay needs, in the units it computes with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub link: LinkParams,
    pub buffer_bytes: Option<usize>,
    pub seed: u64,
    pub json_stats: bool,
    /// Print the counters every this often (a time series), if set.
    pub stats_every: Option<Duration>,
}

/// The emulated link of one direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkParams {
    pub delay_ns: u64,
    pub jitter_ns: u64,
    /// Drop probability in [0, 1].
    pub loss: f64,
    /// None: unlimited.
    pub rate_bits_per_s: Option<u64>,
    pub queue_ns: u64,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            delay_ns: 0,
            jitter_ns: 0,
            loss: 0.0,
            rate_bits_per_s: None,
            queue_ns: 100_000_000,
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Box<Config>),
    /// `--help` or `--version`: the text to print on stdout, exit 0.
    Print(String),
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
    let argv = std::iter::once(OsString::from("mover-wan")).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            return Ok(Parsed::Print(e.render().to_string()));
        }
        Err(e) => return Err(one_line(&e)),
    };
    Ok(Parsed::Run(Box::new(Config {
        listen: cli.listen,
        to: cli.to,
        link: LinkParams {
            delay_ns: cli.delay_ns,
            jitter_ns: cli.jitter_ns,
            loss: cli.loss,
            rate_bits_per_s: cli.rate,
            queue_ns: cli.queue_ns,
        },
        buffer_bytes: cli.buffer_bytes,
        seed: cli.seed,
        json_stats: cli.json_stats,
        stats_every: cli.stats_every,
    })))
}

/// A clap error as one line: the flag (without its value name), the value, what was expected.
fn one_line(e: &clap::Error) -> String {
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => Some(v.join(", ")),
        _ => None,
    };
    // "--delay-ms <MS>" -> "--delay-ms"
    let flag = context(ContextKind::InvalidArg)
        .map(|a| a.split(' ').next().unwrap_or_default().to_string())
        .unwrap_or_default();
    match e.kind() {
        ErrorKind::InvalidValue
            if context(ContextKind::InvalidValue).is_none_or(|v| v.is_empty()) =>
        {
            format!("{flag}: missing value")
        }
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let value = context(ContextKind::InvalidValue).unwrap_or_default();
            let why = std::error::Error::source(e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not a valid value".to_string());
            format!("{flag} {value:?}: {why}")
        }
        ErrorKind::MissingRequiredArgument => format!(
            "{}: required, the address to relay to, e.g. --to 127.0.0.1:4433",
            flag.trim_end_matches(',')
        ),
        ErrorKind::UnknownArgument => format!(
            "unknown argument {:?} (see --help for the flags)",
            context(ContextKind::InvalidArg).unwrap_or_default()
        ),
        ErrorKind::TooManyValues | ErrorKind::NoEquals => format!("{flag}: takes no value"),
        ErrorKind::ArgumentConflict => format!("{flag}: given more than once"),
        ErrorKind::InvalidUtf8 => "an argument is not UTF-8".to_string(),
        _ if !flag.is_empty() => format!("{flag}: {}", e.kind()),
        _ => format!("bad arguments: {} (see --help)", e.kind()),
    }
}

fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected host:port such as 127.0.0.1:4433 or [::1]:4433";
    // Resolve names such as localhost:4433; an unresolvable one is an argument error.
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("resolves to no address; {expected}")),
        Err(_) => Err(expected.to_string()),
    }
}

/// Milliseconds (fractions allowed) to nanoseconds.
fn parse_ms(text: &str) -> Result<u64, String> {
    match text.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && (0.0..=MAX_MS).contains(&ms) => Ok((ms * 1e6).round() as u64),
        _ => Err("expected milliseconds, a number in 0..=60000 such as 25 or 0.5".to_string()),
    }
}

fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err("expected a probability in [0, 1] such as 0.005".to_string()),
    }
}

/// A rate through mover's one units parser, in bits per second.
fn parse_rate(text: &str) -> Result<u64, String> {
    let rate: units::Rate = text
        .parse()
        .map_err(|e: units::ParseError| format!("{}; expected {}", e.reason, e.kind.expected()))?;
    Ok(rate.bits_per_second())
}

fn parse_buffer_mib(text: &str) -> Result<usize, String> {
    text.parse::<usize>()
        .ok()
        .filter(|m| (1..=16_384).contains(m))
        .map(|mib| mib << 20)
        .ok_or_else(|| "expected a whole number of MiB in 1..=16384".to_string())
}

fn parse_stats_every(text: &str) -> Result<Duration, String> {
    text.parse::<u64>()
        .ok()
        .filter(|m| (10..=60_000).contains(m))
        .map(Duration::from_millis)
        .ok_or_else(|| "expected a whole number of milliseconds in 10..=60000".to_string())
}

fn parse_seed(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| "expected a whole number in 0..2^64".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().map(OsString::from))? {
            Parsed::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rates_are_read_as_mover_reads_them() {
        for (text, bits) in [
            ("100mbit", 100_000_000),
            ("1gbit", 1_000_000_000),
            ("2Gbps", 2_000_000_000),
            ("125MB/s", 1_000_000_000),
            ("50Mb/s", 50_000_000),
            ("1GiB/s", 8 << 30),
        ] {
            let c = run(&["--to", "127.0.0.1:9", "--rate", text]).unwrap();
            assert_eq!(c.link.rate_bits_per_s, Some(bits), "{text}");
        }
        // A bare number was bits/s here and bytes/s in mover.toml: now refused everywhere.
        let err = run(&["--to", "127.0.0.1:9", "--rate", "1000000"]).unwrap_err();
        assert!(err.starts_with("--rate \"1000000\": "), "{err}");
        assert!(err.contains("ambiguous"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    /// The rate a user gives the relay and the cap in mover.toml go through one parser, so
    /// an emulated link and a capped peer written alike move the same bytes per second.
    #[test]
    fn a_rate_means_the_same_to_mover_wan_and_mover_toml() {
        let fingerprint = format!("sha256:{}", "ab".repeat(32));
        for text in [
            "50Mb/s", "50MB/s", "1gbit", "100mbit", "2Gbps", "512KiB/s", "2.5gbit",
        ] {
            let toml = format!(
                "[site]\nname = \"a\"\n[tiers.hot]\npath = \"x\"\n[peers.b]\naddress = \"127.0.0.1:1\"\nfingerprint = \"{fingerprint}\"\nbandwidth = \"{text}\"\n"
            );
            let config =
                mover::config::Config::parse(&toml, std::path::Path::new("/site/mover.toml"))
                    .unwrap();
            let mover_bytes = config.peers["b"].bandwidth.unwrap().bytes_per_second();
            let wan = run(&["--to", "127.0.0.1:9", "--rate", text]).unwrap();
            let wan_bits = wan.link.rate_bits_per_s.unwrap();
            assert_eq!(mover_bytes, wan_bits / 8, "{text}");
        }
    }

    #[test]
    fn full_command_line() {
        let c = run(&[
            "--listen",
            "127.0.0.1:0",
            "--to",
            "127.0.0.1:4433",
            "--delay-ms",
            "25",
            "--jitter-ms=2",
            "--loss",
            "0.005",
            "--rate",
            "1gbit",
            "--queue-ms",
            "50",
            "--seed",
            "7",
            "--json-stats",
            "--stats-every-ms",
            "100",
        ])
        .unwrap();
        assert_eq!(c.to, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(c.link.delay_ns, 25_000_000);
        assert_eq!(c.link.jitter_ns, 2_000_000);
        assert_eq!(c.link.loss, 0.005);
        assert_eq!(c.link.rate_bits_per_s, Some(1_000_000_000));
        assert_eq!(c.link.queue_ns, 50_000_000);
        assert_eq!(c.seed, 7);
        assert!(c.json_stats);
        assert_eq!(c.stats_every, Some(std::time::Duration::from_millis(100)));
        let d = run(&["--to", "[::1]:9"]).unwrap();
        assert_eq!(d.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(d.link, LinkParams::default());
    }

    #[test]
    fn odd_values_never_panic() {
        let values = [
            "",
            " ",
            "-",
            ".",
            "..",
            "1..2",
            "é",
            "1é",
            "1ébit",
            "1 kibit/s",
            "1e400",
            "-0",
            "inf",
            "nan",
            "18446744073709551616",
            "99999999999999999999999",
            "1\u{0}",
            "1B/sB/s",
            "bit",
            "1KiB/s",
            "0.0000001",
            "[::1]:99999",
            ":80",
            "localhost:",
        ];
        let flags = [
            "--listen",
            "--to",
            "--delay-ms",
            "--jitter-ms",
            "--loss",
            "--rate",
            "--queue-ms",
            "--buffer-mib",
            "--seed",
            "--stats-every-ms",
        ];
        for flag in flags {
            for value in values {
                let _ = parse(["--to", "127.0.0.1:9", flag, value].map(OsString::from));
                let _ = parse([format!("{flag}={value}")].map(OsString::from));
            }
        }
    }

    #[test]
    fn help_and_version_are_printed_not_errors() {
        let Ok(Parsed::Print(help)) = parse([OsString::from("--help")]) else {
            panic!("--help is not printed")
        };
        assert!(
            help.contains("--delay-ms <MS>") && help.contains("listening on ADDR"),
            "{help}"
        );
        let Ok(Parsed::Print(version)) = parse([OsString::from("-V")]) else {
            panic!("-V is not printed")
        };
        assert_eq!(
            version.trim(),
            format!("mover-wan {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn errors_name_the_flag() {
        for (args, flag) in [
            (&["--delay-ms", "25"][..], "--to"),
            (&["--to", "nowhere"][..], "--to"),
            (
                &["--to", "127.0.0.1:1", "--delay-ms", "abc"][..],
                "--delay-ms",
            ),
            (
                &["--to", "127.0.0.1:1", "--delay-ms", "-1"][..],
                "--delay-ms",
            ),
            (
                &["--to", "127.0.0.1:1", "--jitter-ms", "NaN"][..],
                "--jitter-ms",
            ),
            (&["--to", "127.0.0.1:1", "--loss", "1.5"][..], "--loss"),
            (&["--to", "127.0.0.1:1", "--rate", "fast"][..], "--rate"),
            (&["--to", "127.0.0.1:1", "--seed", "x"][..], "--seed"),
            (
                &["--to", "127.0.0.1:1", "--stats-every-ms", "1"][..],
                "--stats-every-ms",
            ),
            (&["--to", "127.0.0.1:1", "--queue-ms"][..], "--queue-ms"),
            (
                &["--to", "127.0.0.1:1", "--buffer-mib", "0"][..],
                "--buffer-mib",
            ),
            (
                &["--to", "127.0.0.1:1", "--json-stats=yes"][..],
                "--json-stats",
            ),
            (&["--to", "127.0.0.1:1", "--bogus"][..], "--bogus"),
        ] {
            let e = run(args).unwrap_err();
            assert!(e.contains(flag), "{e:?} should name {flag}");
            assert!(!e.contains('\n'), "{e:?} should be one line");
        }
    }
}
