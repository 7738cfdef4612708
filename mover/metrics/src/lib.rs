//! Process-wide metrics for the daemon's `GET /metrics`, in Prometheus text format 0.0.4,
//! kept and encoded by prometheus-client.
//!
//! What mover exports is listed once, in [`names`]: byte counters per site, tier and link
//! (read, deduplicated, stored, shipped, received, restored), job and API counters, gauges
//! for queue depth, job states and peer connections, and latency histograms for each pipeline
//! stage, queue wait and API route. Call sites pass a `&'static Def` from that table, so a
//! metric name can never be typo'd, and [`global`] is the one registry the daemon renders.
//!
//! Latencies are histograms, not summaries, because buckets add up across series and sites
//! (`sum by (le)`), where quantiles cannot. One bucket layout serves every latency: see
//! [`LATENCY_BUCKETS`].
//!
//! Cost: every call looks up its family in a fixed map, allocates the small sorted label
//! vector and takes the family's read lock (its write lock for a new series); counters and
//! gauges are atomics, a histogram observation takes that series' mutex. That is fine per
//! extent (64 MiB) or per batch (8 MiB) from several threads; never call it per byte or per
//! chunk in a hot loop. Nothing here panics: bad observations are dropped.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric mover exports, with its help text: one table, so names are never typo'd at call sites.
#[derive(Debug)]
pub struct Def {
    /// The name as exposed (a counter's ends in `_total`).
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// The table of every metric mover exports; each doc line shows the labels call sites pass.
pub mod names {
    use super::{Def, Kind};

    macro_rules! defs {
        ($($id:ident: $kind:ident $name:literal [$($l:ident)*] $help:literal;)*) => {
            $(
                #[doc = concat!("`", $name, "` (", stringify!($kind), $(", ", stringify!($l),)* "): ", $help)]
                pub const $id: &Def = &Def { name: $name, kind: Kind::$kind, help: $help };
            )*
            /// Every definition above, in the order they are exposed.
            pub const ALL: &[&Def] = &[$($id),*];
        };
    }

    defs! {
        BYTES_READ: Counter "mover_bytes_read_total" [site] "Source bytes read by backup jobs.";
        BYTES_DEDUPLICATED: Counter "mover_bytes_deduplicated_total" [site tier]
            "Chunk bytes not stored because an identical chunk was already stored.";
        BYTES_STORED: Counter "mover_bytes_stored_total" [site tier]
            "Chunk bytes appended to pack files.";
        BYTES_SENT: Counter "mover_bytes_sent_total" [site link]
            "Payload bytes shipped to a peer; link is \"a->b\".";
        WIRE_BYTES_SENT: Counter "mover_wire_bytes_sent_total" [site link]
            "Bytes written to peer connections, framing included.";
        WIRE_BYTES_RECEIVED: Counter "mover_wire_bytes_received_total" [site link]
            "Bytes read from peer connections, framing included.";
        BYTES_RECEIVED: Counter "mover_bytes_received_total" [site link tier]
            "Chunk bytes received from peers and stored.";
        BYTES_RESTORED: Counter "mover_bytes_restored_total" [site]
            "File bytes written by restores.";
        JOBS_FINISHED: Counter "mover_jobs_finished_total" [kind state]
            "Jobs that reached a final state.";
        API_REQUESTS: Counter "mover_api_requests_total" [method status]
            "HTTP API requests answered.";
        API_REFUSED: Counter "mover_api_refused_total" [reason] "HTTP API requests refused.";
        JOBS: Gauge "mover_jobs" [state] "Jobs currently in each state (queued, running, ...).";
        JOB_QUEUE_DEPTH: Gauge "mover_job_queue_depth" [] "Jobs waiting to start.";
        PEER_CONNECTIONS: Gauge "mover_peer_connections" [] "Open connections to peer sites.";
        UP: Gauge "mover_up" [] "1 while the daemon is serving.";
        START_TIME: Gauge "mover_start_time_seconds" []
            "Daemon start time, seconds since the Unix epoch.";
        STAGE_SECONDS: Histogram "mover_stage_seconds" [stage]
            "Seconds per unit of work in each stage (read_extent, chunk_hash, pack_seal, \
             index_commit, ship_batch, receive_ack, restore_file, ...).";
        JOB_QUEUE_WAIT: Histogram "mover_job_queue_wait_seconds" []
            "Seconds jobs waited in the queue before starting.";
        API_REQUEST_SECONDS: Histogram "mover_api_request_seconds" [route]
            "HTTP API request latency in seconds, per route.";
    }
}

/// Upper bounds (seconds) of every latency histogram: 1, 2.5 and 5 per decade from 10 µs to
/// 50 000 s. The summaries they replace covered 1 µs .. 1 h; nothing mover times is under
/// 10 µs (an API answer from memory takes ~30 µs), and the top reaches past the longest
/// API long poll (1 h) and covers queue waits of half a day; beyond lands in `+Inf`. Three
/// buckets a decade keep `histogram_quantile` within a factor of 2.5 everywhere, for 31
/// series lines per label set.
pub const LATENCY_BUCKETS: [f64; 30] = [
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4,
];

/// A series' labels, sorted by name, so the order at call sites does not matter.
type Labels = Vec<(&'static str, String)>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

enum Series {
    Counter(Family<Labels, Counter>),
    Gauge(Family<Labels, Gauge<f64, AtomicU64>>),
    Histogram(Family<Labels, Histogram, fn() -> Histogram>),
}

/// A registry holding every metric of [`names::ALL`]; see [`global`].
pub struct Metrics {
    registry: Registry,
    series: HashMap<&'static str, Series>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn key(labels: &[(&'static str, &str)]) -> Labels {
    let mut key: Labels = labels.iter().map(|&(k, v)| (k, v.to_owned())).collect();
    key.sort();
    key
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let mut series = HashMap::new();
        for def in names::ALL {
            // prometheus-client adds a counter's `_total` and the help's final period itself.
            let name = def.name.strip_suffix("_total").unwrap_or(def.name);
            let help = def.help.strip_suffix('.').unwrap_or(def.help);
            let s = match def.kind {
                Kind::Counter => {
                    let family = Family::default();
                    registry.register(name, help, family.clone());
                    Series::Counter(family)
                }
                Kind::Gauge => {
                    let family = Family::default();
                    registry.register(name, help, family.clone());
                    Series::Gauge(family)
                }
                Kind::Histogram => {
                    let family = Family::new_with_constructor(latency_histogram as fn() -> _);
                    registry.register(name, help, family.clone());
                    Series::Histogram(family)
                }
            };
            series.insert(def.name, s);
        }
        Metrics { registry, series }
    }

    /// Adds `value` to a counter. A `def` of another kind is ignored rather than mixed in.
    pub fn add(&self, def: &'static Def, labels: &[(&'static str, &str)], value: u64) {
        if let Some(Series::Counter(f)) = self.series.get(def.name) {
            f.get_or_create(&key(labels)).inc_by(value);
        }
    }

    /// Sets a gauge.
    pub fn set(&self, def: &'static Def, labels: &[(&'static str, &str)], value: f64) {
        if let Some(Series::Gauge(f)) = self.series.get(def.name) {
            f.get_or_create(&key(labels)).set(value);
        }
    }

    /// Records one latency in a histogram. Negative, NaN and infinite seconds are dropped:
    /// they are clock errors, and one would poison the histogram's sum for good.
    pub fn observe(&self, def: &'static Def, labels: &[(&'static str, &str)], seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if let Some(Series::Histogram(f)) = self.series.get(def.name) {
            f.get_or_create(&key(labels)).observe(seconds);
        }
    }

    /// [`Metrics::observe`] for a measured [`Duration`].
    pub fn observe_duration(
        &self,
        def: &'static Def,
        labels: &[(&'static str, &str)],
        d: Duration,
    ) {
        self.observe(def, labels, d.as_secs_f64());
    }

    /// A counter's current value; 0 when the series doesn't exist. For tests.
    pub fn counter_value(&self, def: &'static Def, labels: &[(&'static str, &str)]) -> u64 {
        match self.series.get(def.name) {
            Some(Series::Counter(f)) => f.get(&key(labels)).map_or(0, |c| c.get()),
            _ => 0,
        }
    }

    /// A gauge's current value, if it was ever set. For tests.
    pub fn gauge_value(&self, def: &'static Def, labels: &[(&'static str, &str)]) -> Option<f64> {
        match self.series.get(def.name) {
            Some(Series::Gauge(f)) => f.get(&key(labels)).map(|g| g.get()),
            _ => None,
        }
    }

    /// The full exposition text (Prometheus text format 0.0.4, [`CONTENT_TYPE`]): every
    /// metric of the table with at least one series, in the table's order.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; the encoder's own errors are only the writer's.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The process's registry, rendered by the daemon's `GET /metrics`.
pub fn global() -> &'static Metrics {
    static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &GLOBAL
}

/// Records how long one unit of a pipeline stage took (per extent or pack, never per byte).
pub fn stage(name: &'static str, started: std::time::Instant) {
    global().observe(
        names::STAGE_SECONDS,
        &[("stage", name)],
        started.elapsed().as_secs_f64(),
    );
}

#[cfg(test)]
mod tests {
    use super::names::*;
    use super::*;
    use std::collections::HashSet;

    fn line_value(text: &str, series: &str) -> f64 {
        let line = text.lines().find(|l| l.starts_with(&format!("{series} ")));
        line.unwrap_or_else(|| panic!("no {series} in\n{text}"))[series.len() + 1..]
            .parse()
            .unwrap()
    }

    #[test]
    fn counter_adds_across_threads() {
        let m = Metrics::new();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (m, tier) = (&m, ["hot", "cold"][t % 2]);
                s.spawn(move || {
                    (0..1000).for_each(|_| m.add(BYTES_STORED, &[("tier", tier), ("site", "a")], 3))
                });
            }
        });
        let get = |l: &[(&'static str, &str)]| m.counter_value(BYTES_STORED, l);
        // Label order at the call site doesn't matter.
        assert_eq!(get(&[("site", "a"), ("tier", "hot")]), 12_000);
        assert_eq!(get(&[("tier", "cold"), ("site", "a")]), 12_000);
        assert_eq!(get(&[("site", "b"), ("tier", "hot")]), 0);
        // A def of the wrong kind is ignored.
        m.set(BYTES_STORED, &[("site", "a"), ("tier", "hot")], 1.0);
        m.observe(BYTES_STORED, &[("site", "a"), ("tier", "hot")], 1.0);
        assert_eq!(get(&[("site", "a"), ("tier", "hot")]), 12_000);
        global().add(BYTES_RESTORED, &[("site", "global-test")], 2);
        global().add(BYTES_RESTORED, &[("site", "global-test")], 3);
        assert_eq!(
            global().counter_value(BYTES_RESTORED, &[("site", "global-test")]),
            5
        );
    }

    #[test]
    fn gauge_set_overwrites() {
        let m = Metrics::new();
        m.set(JOBS, &[("state", "running")], 3.0);
        m.set(JOBS, &[("state", "running")], 1.0);
        m.set(JOB_QUEUE_DEPTH, &[], 7.0);
        assert_eq!(m.gauge_value(JOBS, &[("state", "running")]), Some(1.0));
        assert_eq!(m.gauge_value(JOBS, &[("state", "queued")]), None);
        let text = m.render();
        assert_eq!(line_value(&text, "mover_jobs{state=\"running\"}"), 1.0);
        assert_eq!(line_value(&text, "mover_job_queue_depth"), 7.0);
    }

    #[test]
    fn histogram_buckets_count_cumulatively() {
        let (m, stage) = (Metrics::new(), [("stage", "chunk_hash")]);
        (1..=1000u32).for_each(|ms| m.observe(STAGE_SECONDS, &stage, f64::from(ms) / 1e3));
        let text = m.render();
        let bucket = |le: &str| {
            let series = format!("mover_stage_seconds_bucket{{stage=\"chunk_hash\",le=\"{le}\"}}");
            line_value(&text, &series)
        };
        // Bounds are inclusive: 1 ms, 2 ms (≤ 2.5 ms), ..., 1 s.
        for (le, want) in [
            ("0.0005", 0.0),
            ("0.001", 1.0),
            ("0.0025", 2.0),
            ("0.1", 100.0),
        ] {
            assert_eq!(bucket(le), want, "le={le}\n{text}");
        }
        assert_eq!(bucket("0.5"), 500.0);
        assert_eq!(bucket("1"), 1000.0);
        assert_eq!(bucket("+Inf"), 1000.0);
        let sum = line_value(&text, "mover_stage_seconds_sum{stage=\"chunk_hash\"}");
        assert!((sum - 500.5).abs() < 1e-9, "{sum}");
        let count = line_value(&text, "mover_stage_seconds_count{stage=\"chunk_hash\"}");
        assert_eq!(count, 1000.0);
        // The buckets cover what the summaries did, up to past the API's longest wait.
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(
            LATENCY_BUCKETS[LATENCY_BUCKETS.len() - 1]
                > mover_format::constants::API_WAIT_S_MAX as f64
        );
    }

    #[test]
    fn bad_observations_do_not_panic() {
        let m = Metrics::new();
        let inf = f64::INFINITY;
        for s in [f64::NAN, -1.0, -inf, inf, 0.0, 7200.0, 1e300] {
            m.observe(JOB_QUEUE_WAIT, &[], s);
        }
        m.observe(BYTES_READ, &[], 1.0); // wrong kind: ignored
        let text = m.render();
        assert!(!text.contains("mover_bytes_read_total "), "{text}");
        assert_eq!(line_value(&text, "mover_job_queue_wait_seconds_count"), 3.0);
        assert_eq!(
            line_value(&text, "mover_job_queue_wait_seconds_sum"),
            7200.0 + 1e300
        );
        let top = "mover_job_queue_wait_seconds_bucket{le=\"50000\"}";
        assert_eq!(line_value(&text, top), 2.0, "{text}");
        let all = "mover_job_queue_wait_seconds_bucket{le=\"+Inf\"}";
        assert_eq!(line_value(&text, all), 3.0, "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.add(API_REFUSED, &[("reason", "a\\b \"c\"\nd")], 1);
        let series = r#"mover_api_refused_total{reason="a\\b \"c\"\nd"}"#;
        assert_eq!(line_value(&m.render(), series), 1.0);
    }

    fn is_name(s: &str) -> bool {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    /// `k="v",k="v"` with only the three escapes the format allows.
    fn labels_ok(mut rest: &str) -> bool {
        while !rest.is_empty() {
            let Some((k, after)) = rest.split_once("=\"") else {
                return false;
            };
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) if matches!(chars.next(), Some((_, '\\' | '"' | 'n'))) => {}
                    Some((i, '"')) => break i,
                    Some((_, '\\' | '\n')) | None => return false,
                    _ => {}
                }
            };
            if !is_name(k) {
                return false;
            }
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        true
    }

    #[test]
    fn render_parses() {
        let m = Metrics::new();
        m.set(UP, &[], 1.0);
        m.set(START_TIME, &[], 1.7e9);
        m.set(PEER_CONNECTIONS, &[], f64::NAN);
        m.add(BYTES_SENT, &[("site", "a"), ("link", "a->c")], 1);
        m.add(BYTES_SENT, &[("site", "a"), ("link", "a->b")], 8 << 20);
        m.add(BYTES_READ, &[("site", "we\"ird,=} \n")], 64 << 20);
        m.observe(API_REQUEST_SECONDS, &[("route", "/jobs")], 0.002);
        m.observe(API_REQUEST_SECONDS, &[("route", "/metrics")], 0.0001);
        m.observe_duration(JOB_QUEUE_WAIT, &[], Duration::from_millis(30));
        let text = m.render();
        let mut typed = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let kind_ok = ["counter", "gauge", "histogram"].contains(&kind);
                assert!(is_name(name) && kind_ok, "{line}");
                assert!(typed.insert(name.to_owned()), "second TYPE: {line}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
            assert!(is_name(name) && labels_ok(labels), "{line}");
            let fam = [
                name,
                name.trim_end_matches("_sum"),
                name.trim_end_matches("_count"),
                name.trim_end_matches("_bucket"),
            ];
            assert!(fam.iter().any(|f| typed.contains(*f)), "no TYPE: {line}");
        }
        // A metric without series is left out.
        assert!(!text.contains("mover_bytes_restored_total"), "{text}");
        assert_eq!(line_value(&text, "mover_up"), 1.0);
        assert_eq!(line_value(&text, "mover_start_time_seconds"), 1.7e9);
        assert!(text.contains("mover_peer_connections NaN\n"));
        assert_eq!(text, m.render());
    }
}
