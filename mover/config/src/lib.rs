//! The site configuration file, `DIR/mover.toml`.
//!
//! Written once by `mover init` (with comments a newcomer can follow) and read by every command.
//! Unknown keys are refused so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use transport::quic::Congestion;
use transport::tls::Cipher;
use units::{ByteSize, Rate};

use mover_format::constants;
use mover_format::error::Error;

pub const CONFIG_FILE_NAME: &str = "mover.toml";
pub const DEFAULT_TIER: &str = "hot";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub site: SiteSection,
    #[serde(default)]
    pub engine: EngineSection,
    pub tiers: BTreeMap<String, TierSection>,
    /// Sites we exchange data with, pinned by certificate fingerprint (`mover peer add`).
    #[serde(default)]
    pub peers: BTreeMap<String, PeerSection>,
    #[serde(default)]
    pub api: ApiSection,
}

/// Who may use the daemon's API socket and how many jobs it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Permission bits of the socket file, as an octal string ("0660").
    #[serde(default = "default_socket_mode")]
    pub socket_mode: String,
    /// Group owning the socket (name or number); members reach it through the file mode.
    pub socket_group: Option<String>,
    /// Callers (by SO_PEERCRED) allowed besides root and the daemon's own user.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Callers whose primary or supplementary group is one of these are allowed too.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Jobs running at once; more wait in the queue by priority, then submission order.
    #[serde(default = "default_running_jobs_max")]
    pub running_jobs_max: usize,
    #[serde(default = "default_queued_jobs_max")]
    pub queued_jobs_max: usize,
    /// Retention of ended jobs (done, failed, cancelled) in the queue table: the newest this
    /// many are kept, and none longer than `ended_jobs_kept_days` after it ended. Within it,
    /// `GET /v1/jobs/ID`, `mover wait` and a retried idempotency key find the job.
    #[serde(default = "default_ended_jobs_kept")]
    pub ended_jobs_kept: usize,
    #[serde(default = "default_ended_jobs_kept_days")]
    pub ended_jobs_kept_days: u32,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            socket_mode: default_socket_mode(),
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            running_jobs_max: default_running_jobs_max(),
            queued_jobs_max: default_queued_jobs_max(),
            ended_jobs_kept: default_ended_jobs_kept(),
            ended_jobs_kept_days: default_ended_jobs_kept_days(),
        }
    }
}

fn default_socket_mode() -> String {
    "0660".into()
}

fn default_running_jobs_max() -> usize {
    1
}

fn default_queued_jobs_max() -> usize {
    constants::JOBS_QUEUED_MAX_DEFAULT
}

fn default_ended_jobs_kept() -> usize {
    constants::ENDED_JOBS_KEPT_DEFAULT
}

fn default_ended_jobs_kept_days() -> u32 {
    constants::ENDED_JOBS_KEPT_DAYS_DEFAULT
}

impl ApiSection {
    pub fn socket_mode_bits(&self) -> Option<u32> {
        let digits = self.socket_mode.trim_start_matches("0o");
        u32::from_str_radix(digits, 8).ok().filter(|&m| m <= 0o777)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    /// QUIC address of the peer's daemon, HOST:PORT.
    pub address: String,
    /// `sha256:<64 hex>` of the peer's certificate, as its `mover identity` prints it.
    pub fingerprint: String,
    /// Largest UDP payload MTU discovery may use: 1452 (Ethernet WAN, default), 8952 (jumbo
    /// frames), 65527 (loopback, the default for loopback addresses).
    pub udp_payload_bytes_max: Option<u16>,
    /// Cap on what we send to this peer, e.g. "1GB/s" or "800mbit"; absent = no cap.
    pub bandwidth: Option<Rate>,
    /// "aes128" (default), "aes256" or "chacha20" (CPUs without AES instructions).
    #[serde(default, deserialize_with = "units::deserialize_option_from_str")]
    pub cipher: Option<Cipher>,
    /// "bbr" (default; long paths with random loss) or "cubic" (the default for loopback
    /// addresses).
    #[serde(default, deserialize_with = "units::deserialize_option_from_str")]
    pub congestion: Option<Congestion>,
    pub stream_window_bytes: Option<u32>,
    pub connection_window_bytes: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    pub name: String,
    pub listen: Option<String>,
    pub socket: Option<PathBuf>,
    /// Private key and certificate, relative to the site directory.
    #[serde(default = "default_identity_dir")]
    pub identity: PathBuf,
}

fn default_identity_dir() -> PathBuf {
    PathBuf::from("identity")
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Worker threads, one pinned per core; 0 or absent means one per available core.
    #[serde(default)]
    pub workers: usize,
    /// Locked memory for the workers' registered chunk windows, all together; 0 or absent
    /// registers them when they fit 3/4 of RLIMIT_MEMLOCK (capped at 64 MiB). Sizes are
    /// bytes or a size with a unit ("64MiB").
    #[serde(default)]
    pub io_memory_bytes: ByteSize,
    #[serde(default)]
    pub read_buffer_bytes: Option<ByteSize>,
    #[serde(default, deserialize_with = "pack_target_bytes")]
    pub pack_target_bytes: Option<ByteSize>,
    /// Pin workers to cores (default true). Off is useful when several movers share a node.
    #[serde(default)]
    pub pin_workers: Option<bool>,
}

/// Checked while parsing (not in `validate`) so that the error carries the value's line and
/// column.
fn pack_target_bytes<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ByteSize>, D::Error> {
    let bytes = ByteSize::deserialize(deserializer)?.bytes();
    let (min, max) = (
        constants::PACK_BYTES_TARGET_MIN,
        constants::PACK_BYTES_TARGET_MAX,
    );
    if !(min..=max).contains(&bytes) {
        return Err(serde::de::Error::custom(format!(
            "engine.pack_target_bytes = {bytes}: expected {min} ({} MiB) to {max} ({} GiB)",
            min >> 20,
            max >> 30
        )));
    }
    Ok(Some(ByteSize::from_bytes(bytes)))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    /// Directory of the tier, relative to the site directory unless absolute.
    pub path: PathBuf,
    #[serde(default)]
    pub default: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read config", path, e))?;
        let config = Self::parse(&text, path)?;
        for (peer, spelling, stem) in rates_read_differently_before(&text) {
            let (line, column) = position(&text, &["peers", &peer, "bandwidth"]);
            tracing::warn!(
                "{}:{line}:{column}: peers.{peer}.bandwidth = {spelling:?} is read as bits per second; builds before mover-units read it as bytes per second: write \"{stem}B/s\" for bytes or \"{stem}bit\" for bits",
                path.display(),
            );
        }
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // Without a span (a missing section) the file as a whole is at fault.
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            // A value's own parser (a rate, a cipher) knows what it expected, not which key
            // it was under: name the key too.
            let message = match e.span().and_then(|span| key_of_value_at(text, span.start)) {
                Some(key) if !e.message().starts_with(&key) => format!("{key}: {}", e.message()),
                _ => e.message().to_string(),
            };
            Error::Config {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        })?;
        config.validate(text, path)?;
        Ok(config)
    }

    /// Checks what the types cannot; each error names the key, at its line and column.
    fn validate(&self, text: &str, path: &Path) -> Result<(), Error> {
        let at = |keys: &[&str], message: String| {
            let (line, column) = position(text, keys);
            Error::Config {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        transport::identity::validate_site_name(&self.site.name)
            .map_err(|e| at(&["site", "name"], e.to_string()))?;
        if self.tiers.is_empty() {
            return Err(at(
                &["tiers"],
                "expected at least one [tiers.NAME] section".into(),
            ));
        }
        for name in self.tiers.keys() {
            transport::identity::validate_site_name(name).map_err(|_| {
                at(
                    &["tiers", name],
                    format!("tier name {name:?} is not valid: expected a-z, 0-9, '-' or '_'"),
                )
            })?;
        }
        for (name, peer) in &self.peers {
            check_peer(name, peer)
                .map_err(|e| at(&["peers", name], format!("[peers.{name}]: {e}")))?;
        }
        if self.api.socket_mode_bits().is_none() {
            return Err(at(
                &["api", "socket_mode"],
                format!(
                    "api.socket_mode = {:?}: expected octal permission bits such as \"0660\"",
                    self.api.socket_mode
                ),
            ));
        }
        if self.api.running_jobs_max == 0 || self.api.running_jobs_max > 64 {
            return Err(at(
                &["api", "running_jobs_max"],
                format!(
                    "api.running_jobs_max = {}: expected 1 to 64",
                    self.api.running_jobs_max
                ),
            ));
        }
        if self.api.queued_jobs_max == 0 {
            return Err(at(
                &["api", "queued_jobs_max"],
                "api.queued_jobs_max = 0: expected at least 1".into(),
            ));
        }
        if self.api.ended_jobs_kept == 0 {
            return Err(at(
                &["api", "ended_jobs_kept"],
                "api.ended_jobs_kept = 0: expected at least 1".into(),
            ));
        }
        if !(1..=36_500).contains(&self.api.ended_jobs_kept_days) {
            return Err(at(
                &["api", "ended_jobs_kept_days"],
                format!(
                    "api.ended_jobs_kept_days = {}: expected 1 to 36500",
                    self.api.ended_jobs_kept_days
                ),
            ));
        }
        if let Some((second, _)) = self.tiers.iter().filter(|(_, t)| t.default).nth(1) {
            return Err(at(
                &["tiers", second, "default"],
                "more than one tier has default = true".into(),
            ));
        }
        let cores = available_cores();
        if self.engine.workers > cores {
            return Err(at(&["engine", "workers"], format!(
                "engine.workers = {}: expected 0 (one per core) to {cores}, the cores this process may run on",
                self.engine.workers
            )));
        }
        if let Some(size) = self.engine.read_buffer_bytes {
            let size = size.bytes();
            if size == 0 || size % constants::IO_ALIGNMENT as u64 != 0 || size > 64 * 1024 * 1024 {
                return Err(at(
                    &["engine", "read_buffer_bytes"],
                    format!(
                        "engine.read_buffer_bytes = {size}: expected a multiple of {} up to 64 MiB",
                        constants::IO_ALIGNMENT
                    ),
                ));
            }
        }
        // Relative to the config's directory, as the site resolves them; links are resolved
        // when the site opens.
        let base = path.parent().unwrap_or(Path::new(""));
        let dirs: Vec<(&str, PathBuf)> = self
            .tiers
            .iter()
            .map(|(name, tier)| (name.as_str(), lexical_join(base, &tier.path)))
            .collect();
        check_tier_dirs(&dirs).map_err(|message| at(&["tiers"], message))?;
        Ok(())
    }

    /// The tier backups land in when none is named.
    pub fn default_tier(&self) -> &str {
        self.tiers
            .iter()
            .find(|(_, t)| t.default)
            .map(|(name, _)| name.as_str())
            .or_else(|| {
                self.tiers
                    .contains_key(DEFAULT_TIER)
                    .then_some(DEFAULT_TIER)
            })
            .unwrap_or_else(|| {
                self.tiers
                    .keys()
                    .next()
                    .expect("validated: tiers not empty")
            })
    }

    pub fn pack_target_bytes(&self) -> u64 {
        self.engine
            .pack_target_bytes
            .map_or(constants::PACK_BYTES_TARGET_DEFAULT, ByteSize::bytes)
    }

    /// The API socket: `site.socket`, else the default under /run/mover.
    pub fn socket_path(&self) -> PathBuf {
        self.site
            .socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(constants::API_SOCKET_DEFAULT))
    }

    /// Worker threads of a job (and of the daemon's runtime): `engine.workers`, or one per
    /// core; validated not to exceed the cores.
    pub fn workers(&self) -> usize {
        match self.engine.workers {
            0 => available_cores(),
            n => n,
        }
    }

    /// `engine.read_buffer_bytes`, validated to be a multiple of the I/O alignment up to
    /// 64 MiB, so it fits a usize.
    pub fn read_buffer_bytes(&self) -> Option<usize> {
        self.engine
            .read_buffer_bytes
            .map(|size| usize::try_from(size.bytes()).unwrap_or(usize::MAX))
    }

    pub fn pin_workers(&self) -> bool {
        self.engine.pin_workers.unwrap_or(true)
    }
}

/// Refuses two tiers whose directories are the same or one inside the other: each tier's
/// packs, capacity and reclaim must be its own.
/// The peers whose `bandwidth` is spelled with a lower-case `b` per second (`"125mb/s"`,
/// `"1Gbps"`): bits now, as everywhere in mover, but bytes to the parser before mover-units,
/// which ignored case; a config written then would silently get an eighth of its cap.
/// Returns (peer, spelling, the spelling without `b/s` or `bps`).
fn rates_read_differently_before(text: &str) -> Vec<(String, String, String)> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(peers) = table.get("peers").and_then(toml::Value::as_table) else {
        return Vec::new();
    };
    peers
        .iter()
        .filter_map(|(name, peer)| {
            let spelling = peer.get("bandwidth")?.as_str()?.trim();
            let stem = spelling
                .strip_suffix("b/s")
                .or_else(|| spelling.strip_suffix("bps"))?;
            // "125m" -> "125M" (a lower-case m reads as milli to people), "1k" stays.
            let stem = match stem.chars().last() {
                Some(prefix) if prefix.is_ascii_alphabetic() && prefix != 'k' => {
                    format!("{}{}", &stem[..stem.len() - 1], prefix.to_ascii_uppercase())
                }
                _ => stem.to_string(),
            };
            Some((name.clone(), spelling.to_string(), stem))
        })
        .collect()
}

pub fn check_tier_dirs(dirs: &[(&str, PathBuf)]) -> Result<(), String> {
    for (i, (a, dir_a)) in dirs.iter().enumerate() {
        for (b, dir_b) in &dirs[i + 1..] {
            if dir_a.starts_with(dir_b) || dir_b.starts_with(dir_a) {
                return Err(format!(
                    "tiers {a:?} ({}) and {b:?} ({}) overlap: expected a directory of its own for each tier, not shared or inside another's",
                    dir_a.display(),
                    dir_b.display()
                ));
            }
        }
    }
    Ok(())
}

/// `base` joined with `path`, with `.` and `..` folded away without touching the file system.
fn lexical_join(base: &Path, path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in base.join(path).components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Where the key at `keys` (from the top: `["api", "running_jobs_max"]`) is written in
/// `text`: the line and column of its deepest key that is there, else 1:1.
fn position(text: &str, keys: &[&str]) -> (usize, usize) {
    let Ok(document) = toml_edit::ImDocument::parse(text) else {
        return (1, 1);
    };
    let mut table: &dyn toml_edit::TableLike = document.as_table();
    let mut found = None;
    for key in keys {
        let Some((key, item)) = table.get_key_value(key) else {
            break;
        };
        found = key.span().map(|span| span.start).or(found);
        match item.as_table_like() {
            Some(inner) => table = inner,
            None => break,
        }
    }
    found.map_or((1, 1), |offset| line_column(text, offset))
}

/// The dotted key (`peers.b.bandwidth`) whose value starts at byte `offset` of `text`.
fn key_of_value_at(text: &str, offset: usize) -> Option<String> {
    fn search(table: &dyn toml_edit::TableLike, offset: usize, path: &mut Vec<String>) -> bool {
        for (key, item) in table.iter() {
            path.push(key.to_string());
            if let Some(inner) = item.as_table_like() {
                if search(inner, offset, path) {
                    return true;
                }
            } else if item.span().is_some_and(|span| span.start == offset) {
                return true;
            }
            path.pop();
        }
        false
    }
    let document = toml_edit::ImDocument::parse(text).ok()?;
    let mut path = Vec::new();
    search(document.as_table(), offset, &mut path).then(|| path.join("."))
}

/// The cores this process may run on (affinity and cgroup quota included).
fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// The commented file `mover init` writes.
pub fn template(site: &str, listen: Option<&str>, socket: Option<&Path>) -> String {
    let listen_line = match listen {
        Some(addr) => format!("listen = {addr:?}"),
        None => "# listen = \"0.0.0.0:7400\"      # QUIC endpoint for peer movers".to_string(),
    };
    let socket_line = match socket {
        Some(path) => format!("socket = {:?}", path.display().to_string()),
        None => format!(
            "# socket = {:?}   # API socket for the CLI and schedulers",
            constants::API_SOCKET_DEFAULT
        ),
    };
    format!(
        r#"# mover site configuration, written by `mover init`.
# Paths are relative to the directory holding this file unless absolute.

[site]
name = "{site}"
{listen_line}
{socket_line}
identity = "identity"   # key.pem (private, mode 0600) and cert.pem; `mover identity` prints the fingerprint

[engine]
# One pinned worker per core reads with io_uring and O_DIRECT, chunks, hashes and compresses.
# workers = 0                  # 0 = one per available core; at most the available cores
# pin_workers = true
# Reads land in each worker's chunk window (largest chunk + 3 reads: 7 MiB by default), which
# is registered with io_uring (locked memory) when every worker's window fits this budget.
# 0 = register if they fit 3/4 of RLIMIT_MEMLOCK (at most 64 MiB), else read unregistered.
# A value > 0 must hold them all. Raise LimitMEMLOCK in the systemd unit before raising this.
# Sizes are bytes or a string with a unit: "64MiB" (binary), "64MB" (decimal).
# io_memory_bytes = 0
# read_buffer_bytes = 1048576  # one direct read, a multiple of 4096
# pack_target_bytes = 134217728  # 8 MiB to 1 GiB; each open pack reserves this much on disk

# The daemon's API socket (HTTP/1.1 + JSON; `curl --unix-socket`). Callers are checked by
# their SO_PEERCRED uid/gid: root and the daemon's own user always, plus those listed here.
[api]
# socket_mode = "0660"
# socket_group = "mover"
# allowed_uids = []
# allowed_gids = []
# running_jobs_max = 1         # more wait in the queue by priority, then submission order
# queued_jobs_max = 10000
# Ended jobs stay findable (GET /v1/jobs/ID, `mover wait`, a retried --idempotency-key) while
# they are among the newest `ended_jobs_kept` and ended less than `ended_jobs_kept_days` ago;
# older rows are deleted from the queue table.
# ended_jobs_kept = 10000
# ended_jobs_kept_days = 30

# Storage tiers of this site. Backups land in the default tier.
[tiers.hot]
path = "tiers/hot"
default = true
"#
    )
}

/// Checks one `[peers.NAME]` section; the message names the key and what was expected.
pub fn check_peer(name: &str, peer: &PeerSection) -> std::result::Result<(), String> {
    transport::identity::validate_site_name(name).map_err(|e| e.to_string())?;
    if !peer.address.contains(':') {
        return Err(format!("address {:?}: expected HOST:PORT", peer.address));
    }
    transport::identity::Fingerprint::parse(&peer.fingerprint)
        .map_err(|e| format!("fingerprint: {e}"))?;
    if let Some(size) = peer.udp_payload_bytes_max {
        if !(1200..=65527).contains(&size) {
            return Err(format!(
                "udp_payload_bytes_max = {size}: expected 1200..=65527"
            ));
        }
    }
    for (key, value) in [
        ("stream_window_bytes", peer.stream_window_bytes),
        ("connection_window_bytes", peer.connection_window_bytes),
    ] {
        if let Some(v) = value {
            if !(64 * 1024..=1 << 30).contains(&v) {
                return Err(format!("{key} = {v}: expected 64 KiB..=1 GiB"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_whose_meaning_changed_are_found() {
        let text = "[peers.a]\nbandwidth = \"125mb/s\"\n[peers.b]\nbandwidth = \"1Gbps\"\n[peers.c]\nbandwidth = \"1gbit\"\n[peers.d]\nbandwidth = \"50MB/s\"\n[peers.e]\n";
        let found = rates_read_differently_before(text);
        assert_eq!(
            found,
            vec![
                ("a".into(), "125mb/s".into(), "125M".into()),
                ("b".into(), "1Gbps".into(), "1G".into()),
            ]
        );
    }

    #[test]
    fn template_parses() {
        let text = template("onprem", Some("127.0.0.1:7400"), None);
        let config = Config::parse(&text, Path::new("mover.toml")).unwrap();
        assert_eq!(config.site.name, "onprem");
        assert_eq!(config.default_tier(), "hot");
        assert_eq!(config.site.listen.as_deref(), Some("127.0.0.1:7400"));
    }

    #[test]
    fn unknown_key_is_refused_with_position() {
        let text = "[site]\nname = \"a\"\nsurprise = 1\n[tiers.hot]\npath = \"x\"\n";
        let err = Config::parse(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.toml:3:"), "{err}");
        assert!(err.contains("surprise"), "{err}");
    }

    fn engine_error(line: &str) -> String {
        let text = format!("[site]\nname = \"a\"\n[engine]\n{line}\n[tiers.hot]\npath = \"x\"\n");
        match Config::parse(&text, Path::new("m.toml")) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn pack_target_is_bounded_with_its_position() {
        for too_large in ["9223372036854775807", "1073741825", "1099511627776"] {
            let err = engine_error(&format!("pack_target_bytes = {too_large}"));
            assert!(err.starts_with("m.toml:4:21: "), "{err}");
            assert!(err.contains("engine.pack_target_bytes"), "{err}");
            assert!(
                err.contains("8388608 (8 MiB) to 1073741824 (1 GiB)"),
                "{err}"
            );
        }
        let err = engine_error("pack_target_bytes = 8388607");
        assert!(err.starts_with("m.toml:4:21: "), "{err}");
        assert_eq!(engine_error("pack_target_bytes = 8388608"), "");
        assert_eq!(engine_error("pack_target_bytes = 1073741824"), "");
    }

    #[test]
    fn engine_sizes_take_units() {
        let text = "[site]\nname = \"a\"\n[engine]\npack_target_bytes = \"128MiB\"\nio_memory_bytes = \"8MiB\"\nread_buffer_bytes = \"512KiB\"\n[tiers.hot]\npath = \"x\"\n";
        let config = Config::parse(text, Path::new("m.toml")).unwrap();
        assert_eq!(config.pack_target_bytes(), 128 << 20);
        assert_eq!(config.engine.io_memory_bytes.bytes(), 8 << 20);
        assert_eq!(config.read_buffer_bytes(), Some(512 << 10));
        let err = engine_error("pack_target_bytes = \"4MiB\"");
        assert!(
            err.starts_with("m.toml:4:21: engine.pack_target_bytes = 4194304: expected"),
            "{err}"
        );
        let err = engine_error("io_memory_bytes = \"lots\"");
        assert!(
            err.starts_with("m.toml:4:19: engine.io_memory_bytes: \"lots\": no number; expected a size such as \"4GiB\""),
            "{err}"
        );
    }

    #[test]
    fn tiers_sharing_a_directory_are_refused() {
        for (a, b) in [
            ("tiers/hot", "tiers/hot"),
            ("tiers/hot", "./tiers/x/../hot/"),
            ("tiers", "tiers/warm"),
        ] {
            let text = format!(
                "[site]\nname = \"s\"\n[tiers.hot]\npath = {a:?}\n[tiers.warm]\npath = {b:?}\n"
            );
            let err = Config::parse(&text, Path::new("/site/mover.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("tiers \"hot\""), "{err}");
            assert!(err.contains("\"warm\""), "{err}");
            assert!(err.contains("a directory of its own"), "{err}");
        }
        let text = "[site]\nname = \"s\"\n[tiers.hot]\npath = \"tiers/hot\"\n[tiers.warm]\npath = \"tiers/hotter\"\n";
        Config::parse(text, Path::new("/site/mover.toml")).unwrap();
    }

    #[test]
    fn invalid_values_are_named_at_their_line_and_column() {
        let text =
            "[site]\nname = \"a\"\n[api]\n  running_jobs_max = 0\n[tiers.hot]\npath = \"x\"\n";
        let err = Config::parse(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m.toml:4:3: api.running_jobs_max = 0"),
            "{err}"
        );
        let text = "[site]\nname = \"a\"\n[tiers.hot]\npath = \"x\"\ndefault = true\n[tiers.warm]\npath = \"y\"\ndefault = true\n";
        let err = Config::parse(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m.toml:8:1: more than one tier"), "{err}");
        let text = "[site]\nname = \"a\"\n";
        let err = Config::parse(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m.toml:1:1: "), "{err}");
    }

    fn peer_error(line: &str) -> String {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let text = format!(
            "[site]\nname = \"a\"\n[tiers.hot]\npath = \"x\"\n[peers.b]\naddress = \"127.0.0.1:1\"\nfingerprint = \"{fp}\"\n{line}\n"
        );
        match Config::parse(&text, Path::new("m.toml")) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn peer_values_are_typed_at_load_with_their_position() {
        for (line, expected) in [
            (
                "bandwidth = \"50 furlongs\"",
                "m.toml:8:13: peers.b.bandwidth: \"50 furlongs\": unknown unit \"furlongs\"; expected a rate such as \"1gbit\" or \"50MB/s\"",
            ),
            (
                "bandwidth = \"1000\"",
                "m.toml:8:13: peers.b.bandwidth: \"1000\": a number without a unit is ambiguous",
            ),
            (
                "cipher = \"aes512\"",
                "m.toml:8:10: peers.b.cipher: cipher \"aes512\" is not known: expected aes128, aes256 or chacha20",
            ),
            (
                "congestion = \"reno\"",
                "m.toml:8:14: peers.b.congestion: congestion \"reno\" is not known: expected cubic or bbr",
            ),
        ] {
            let err = peer_error(line);
            assert!(err.starts_with(expected), "{line}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let text = format!(
            "[site]\nname = \"a\"\n[tiers.hot]\npath = \"x\"\n[peers.b]\naddress = \"127.0.0.1:1\"\nfingerprint = \"sha256:{}\"\nbandwidth = \"50Mb/s\"\ncipher = \"chacha20\"\ncongestion = \"bbr\"\n",
            "ab".repeat(32)
        );
        let config = Config::parse(&text, Path::new("m.toml")).unwrap();
        let peer = &config.peers["b"];
        // Megabits: the same 6.25 MB/s that mover-wan's --rate 50Mb/s emulates.
        assert_eq!(peer.bandwidth.unwrap().bytes_per_second(), 6_250_000);
        // `mover peers --json` and the API keep printing a string.
        let json = serde_json::json!({ "bandwidth": peer.bandwidth });
        assert_eq!(json["bandwidth"], "50Mbit");
        assert_eq!(peer.cipher, Some(Cipher::ChaCha20));
        assert_eq!(peer.congestion, Some(Congestion::Bbr));
    }

    #[test]
    fn bad_buffer_size_is_refused() {
        let text =
            "[site]\nname = \"a\"\n[engine]\nread_buffer_bytes = 1000\n[tiers.hot]\npath = \"x\"\n";
        let err = Config::parse(text, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("read_buffer_bytes"), "{err}");
    }
}
