//! Command line of `mover-wan`: a hand-written parser so that every mistake is reported as one
//! line naming the flag and what was expected (clap's usage errors span several lines).

use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};

/// Longest one-way delay, jitter or queue accepted: a minute is already far beyond any WAN.
const MAX_MS: f64 = 60_000.0;

pub const USAGE: &str = "\
usage: mover-wan --to ADDR [--listen ADDR] [--delay-ms MS] [--jitter-ms MS] [--loss P]
                 [--rate RATE] [--queue-ms MS] [--buffer-mib MIB] [--seed N] [--json-stats]
                 [--stats-every-ms MS]

UDP relay that makes two local processes (QUIC endpoints) look far apart. Datagrams sent to
--listen go to --to from one upstream socket per client address; replies come back. Each
direction has its own delay, jitter, loss and rate cap, so the round trip is 2 x --delay-ms.

  --to ADDR         where client datagrams go (host:port), required
  --listen ADDR     address clients send to (default 127.0.0.1:0; port 0 picks one)
  --delay-ms MS     one-way delay per direction (default 0; fractions allowed)
  --jitter-ms MS    extra uniform delay in [0, MS] per datagram; never reorders (default 0)
  --loss P          independent drop probability per datagram in [0, 1] (default 0)
  --rate RATE       link rate per direction, read as mover.toml's bandwidth: 100mbit, 1gbit,
                    2Gbps, 50Mb/s (bits), 125MB/s, 1GiB/s (bytes) (default unlimited);
                    counts UDP payload bytes
  --queue-ms MS     bottleneck queue in time at --rate; drop-tail beyond it (default 100)
  --buffer-mib MIB  relay buffer per direction (default sized from rate, delay and queue)
  --seed N          seed of the loss and jitter generators (default 1)
  --json-stats      on SIGTERM/SIGINT print one JSON object of per-direction counters
  --stats-every-ms MS  also print the counters as one JSON line (with \"t_s\", seconds since
                    start) every MS milliseconds, for a time series of the link's use

Prints `listening on ADDR` once started; exits 0 on SIGTERM or SIGINT, 2 on bad arguments.";

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
    pub stats_every: Option<std::time::Duration>,
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
    Help,
    Version,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, String> {
    let mut listen: Option<SocketAddr> = None;
    let mut to: Option<SocketAddr> = None;
    let mut link = LinkParams::default();
    let mut buffer_bytes = None;
    let mut seed = 1u64;
    let mut json_stats = false;
    let mut stats_every = None;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|a| format!("argument {a:?} is not UTF-8"))?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--json-stats" => {
                if inline.is_some() {
                    return Err("--json-stats: takes no value".into());
                }
                json_stats = true;
                continue;
            }
            _ => {}
        }
        let mut value = || -> Result<String, String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => match args.next() {
                    Some(v) => v
                        .into_string()
                        .map_err(|v| format!("{flag}: value {v:?} is not UTF-8")),
                    None => Err(format!("{flag}: missing value")),
                },
            }
        };
        match flag.as_str() {
            "--listen" => listen = Some(parse_addr(&flag, &value()?)?),
            "--to" => to = Some(parse_addr(&flag, &value()?)?),
            "--delay-ms" => link.delay_ns = parse_ms(&flag, &value()?)?,
            "--jitter-ms" => link.jitter_ns = parse_ms(&flag, &value()?)?,
            "--queue-ms" => link.queue_ns = parse_ms(&flag, &value()?)?,
            "--loss" => link.loss = parse_probability(&flag, &value()?)?,
            "--rate" => {
                let rate: units::Rate = value()?
                    .parse()
                    .map_err(|e: units::ParseError| format!("--rate {e}"))?;
                link.rate_bits_per_s = Some(rate.bits_per_second());
            }
            "--buffer-mib" => {
                let v = value()?;
                let mib: usize = v
                    .parse()
                    .ok()
                    .filter(|m| (1..=16_384).contains(m))
                    .ok_or_else(|| {
                        format!("--buffer-mib {v:?}: expected a whole number of MiB in 1..=16384")
                    })?;
                buffer_bytes = Some(mib << 20);
            }
            "--stats-every-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .ok()
                    .filter(|m| (10..=60_000).contains(m))
                    .ok_or_else(|| {
                        format!("--stats-every-ms {v:?}: expected a whole number of milliseconds in 10..=60000")
                    })?;
                stats_every = Some(std::time::Duration::from_millis(ms));
            }
            "--seed" => {
                let v = value()?;
                seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?}: expected a whole number in 0..2^64"))?;
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (see --help for the flags)"
                ))
            }
        }
    }
    let to = to.ok_or("--to: required, the address to relay to, e.g. --to 127.0.0.1:4433")?;
    let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    Ok(Parsed::Run(Box::new(Config {
        listen,
        to,
        link,
        buffer_bytes,
        seed,
        json_stats,
        stats_every,
    })))
}

fn parse_addr(flag: &str, text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let expected = "expected host:port such as 127.0.0.1:4433 or [::1]:4433";
    // Resolve names such as localhost:4433; an unresolvable one is an argument error.
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{flag} {text:?}: resolves to no address; {expected}")),
        Err(_) => Err(format!("{flag} {text:?}: {expected}")),
    }
}

fn parse_ms(flag: &str, text: &str) -> Result<u64, String> {
    match text.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && (0.0..=MAX_MS).contains(&ms) => Ok((ms * 1e6).round() as u64),
        _ => Err(format!(
            "{flag} {text:?}: expected milliseconds, a number in 0..=60000 such as 25 or 0.5"
        )),
    }
}

fn parse_probability(flag: &str, text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{flag} {text:?}: expected a probability in [0, 1] such as 0.005"
        )),
    }
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
