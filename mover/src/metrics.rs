//! Process-wide metrics for the daemon's `GET /metrics`, in Prometheus text format 0.0.4.
//!
//! What mover exports is listed once, in [`names`]: byte counters per site, tier and link
//! (read, deduplicated, stored, shipped, received, restored), job and API counters, gauges
//! for queue depth, job states and peer connections, and latency summaries for each pipeline
//! stage, queue wait and API route. Call sites pass a `&'static Def` from that table, so a
//! metric name can never be typo'd, and [`global`] is the one registry the daemon renders.
//!
//! Cost: every call takes one mutex and looks up a `BTreeMap` keyed by (name, sorted labels),
//! allocating the small label vector. That is fine per extent (64 MiB) or per batch (8 MiB)
//! from several threads; never call it per byte or per chunk in a hot loop. Summaries keep an
//! hdrhistogram of microseconds (1 µs .. 1 h, 3 significant digits, saturating) plus an exact
//! f64 sum. Nothing here panics: a poisoned mutex is recovered, bad observations are dropped.

use std::collections::btree_map::{BTreeMap, Entry};
use std::fmt::Write as _;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;

/// How a metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Summary,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

/// Every metric mover exports, with its help text: one table, so names are never typo'd at call sites.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// The table of every metric mover exports; each doc line shows the labels call sites pass.
pub mod names {
    use super::{Def, Kind};

    macro_rules! defs {
        ($($id:ident: $kind:ident $name:literal [$($l:ident)*] $help:literal;)*) => {$(
            #[doc = concat!("`", $name, "` (", stringify!($kind), $(", ", stringify!($l),)* "): ", $help)]
            pub const $id: &Def = &Def { name: $name, kind: Kind::$kind, help: $help };
        )*};
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
        STAGE_SECONDS: Summary "mover_stage_seconds" [stage]
            "Seconds per unit of work in each stage (read_extent, chunk_hash, pack_seal, \
             index_commit, ship_batch, receive_ack, restore_file, ...).";
        JOB_QUEUE_WAIT: Summary "mover_job_queue_wait_seconds" []
            "Seconds jobs waited in the queue before starting.";
        API_REQUEST_SECONDS: Summary "mover_api_request_seconds" [route]
            "HTTP API request latency in seconds, per route.";
    }
}

/// Largest recordable latency: one hour, in microseconds. Larger values clamp to it.
const MAX_US: u64 = 3_600_000_000;
const QUANTILES: [(f64, &str); 4] = [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (0.999, "0.999")];

type Labels = Vec<(&'static str, String)>;

struct Summary {
    hist: Histogram<u64>,
    sum: f64,
}

enum Value {
    Counter(u64),
    Gauge(f64),
    Summary(Box<Summary>),
}

struct Family {
    def: &'static Def,
    series: BTreeMap<Labels, Value>,
}

/// A registry of counters, gauges and summaries; see [`global`].
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Value {
    fn new(kind: Kind) -> Option<Value> {
        Some(match kind {
            Kind::Counter => Value::Counter(0),
            Kind::Gauge => Value::Gauge(0.0),
            Kind::Summary => {
                let hist = Histogram::new_with_bounds(1, MAX_US, 3).ok()?;
                Value::Summary(Box::new(Summary { hist, sum: 0.0 }))
            }
        })
    }
}

fn key(labels: &[(&'static str, &str)]) -> Labels {
    let mut key: Labels = labels.iter().map(|&(k, v)| (k, v.to_owned())).collect();
    key.sort();
    key
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            families: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<&'static str, Family>> {
        self.families.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the series for (def, labels), created on first use. A `def` of another
    /// kind than the caller expects is ignored rather than mixed in.
    fn update(
        &self,
        def: &'static Def,
        labels: &[(&'static str, &str)],
        kind: Kind,
        f: impl FnOnce(&mut Value),
    ) {
        if def.kind != kind {
            return;
        }
        let key = key(labels);
        let mut fams = self.lock();
        let fam = fams.entry(def.name).or_insert_with(|| Family {
            def,
            series: BTreeMap::new(),
        });
        match fam.series.entry(key) {
            Entry::Occupied(e) => f(e.into_mut()),
            Entry::Vacant(e) => {
                if let Some(v) = Value::new(kind) {
                    f(e.insert(v));
                }
            }
        }
    }

    fn read<T>(
        &self,
        def: &'static Def,
        labels: &[(&'static str, &str)],
        f: impl FnOnce(&Value) -> Option<T>,
    ) -> Option<T> {
        self.lock()
            .get(def.name)?
            .series
            .get(&key(labels))
            .and_then(f)
    }

    /// Adds `value` to a counter (saturating).
    pub fn add(&self, def: &'static Def, labels: &[(&'static str, &str)], value: u64) {
        self.update(def, labels, Kind::Counter, |v| {
            if let Value::Counter(c) = v {
                *c = c.saturating_add(value);
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, def: &'static Def, labels: &[(&'static str, &str)], value: f64) {
        self.update(def, labels, Kind::Gauge, |v| {
            if let Value::Gauge(g) = v {
                *g = value;
            }
        });
    }

    /// Records one latency in a summary. Negative or NaN seconds are ignored; values above
    /// one hour (infinity included) count as one hour.
    pub fn observe(&self, def: &'static Def, labels: &[(&'static str, &str)], seconds: f64) {
        if seconds.is_nan() || seconds < 0.0 {
            return;
        }
        let seconds = seconds.min(MAX_US as f64 / 1e6);
        let micros = ((seconds * 1e6).round() as u64).min(MAX_US);
        self.update(def, labels, Kind::Summary, |v| {
            if let Value::Summary(s) = v {
                s.hist.saturating_record(micros);
                s.sum += seconds;
            }
        });
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
        let f = |v: &Value| match v {
            Value::Counter(c) => Some(*c),
            _ => None,
        };
        self.read(def, labels, f).unwrap_or_default()
    }

    /// A gauge's current value, if it was ever set. For tests.
    pub fn gauge_value(&self, def: &'static Def, labels: &[(&'static str, &str)]) -> Option<f64> {
        self.read(def, labels, |v| match v {
            Value::Gauge(g) => Some(*g),
            _ => None,
        })
    }

    /// The full exposition text: every metric with at least one series, sorted by name, then
    /// its series sorted by labels.
    pub fn render(&self) -> String {
        let fams = self.lock();
        let mut out = String::with_capacity(4096);
        for (name, fam) in fams.iter().filter(|(_, f)| !f.series.is_empty()) {
            let help = fam.def.help.replace('\\', "\\\\").replace('\n', "\\n");
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {}", fam.def.kind.as_str());
            for (labels, value) in &fam.series {
                match value {
                    Value::Counter(c) => sample(&mut out, name, "", labels, None, *c as f64),
                    Value::Gauge(g) => sample(&mut out, name, "", labels, None, *g),
                    Value::Summary(s) => {
                        for (q, qs) in QUANTILES {
                            let secs = s.hist.value_at_quantile(q) as f64 / 1e6;
                            sample(&mut out, name, "", labels, Some(qs), secs);
                        }
                        sample(&mut out, name, "_sum", labels, None, s.sum);
                        sample(&mut out, name, "_count", labels, None, s.hist.len() as f64);
                    }
                }
            }
        }
        out
    }
}

/// Writes one sample line: `name{labels[,quantile]} value`.
fn sample(out: &mut String, name: &str, suffix: &str, labels: &Labels, q: Option<&str>, v: f64) {
    out.push_str(name);
    out.push_str(suffix);
    let quantile = q.map(|q| ("quantile", q));
    let all = labels.iter().map(|(k, v)| (*k, v.as_str())).chain(quantile);
    for (i, (k, val)) in all.enumerate() {
        out.push(if i == 0 { '{' } else { ',' });
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, val);
        out.push('"');
    }
    if !labels.is_empty() || q.is_some() {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&fmt_float(v));
    out.push('\n');
}

fn escape_label(out: &mut String, v: &str) {
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Prometheus floats: Go's `ParseFloat` syntax, with `+Inf`, `-Inf` and `NaN`.
fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The process's registry, rendered by the daemon's `GET /metrics`.
pub fn global() -> &'static Metrics {
    static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &GLOBAL
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
        // A def of the wrong kind is ignored; counters saturate.
        m.set(BYTES_STORED, &[("site", "a"), ("tier", "hot")], 1.0);
        m.add(BYTES_STORED, &[("site", "a"), ("tier", "cold")], u64::MAX);
        assert_eq!(get(&[("site", "a"), ("tier", "hot")]), 12_000);
        assert_eq!(get(&[("site", "a"), ("tier", "cold")]), u64::MAX);
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
    fn summary_quantiles() {
        let (m, stage) = (Metrics::new(), [("stage", "chunk_hash")]);
        (1..=1000u32).for_each(|ms| m.observe(STAGE_SECONDS, &stage, f64::from(ms) / 1e3));
        let text = m.render();
        for (q, want) in [("0.5", 0.5), ("0.9", 0.9), ("0.99", 0.99), ("0.999", 0.999)] {
            let series = format!("mover_stage_seconds{{stage=\"chunk_hash\",quantile=\"{q}\"}}");
            let got = line_value(&text, &series);
            assert!((got - want).abs() <= want * 0.01, "p{q}: {got} vs {want}");
        }
        let sum = line_value(&text, "mover_stage_seconds_sum{stage=\"chunk_hash\"}");
        assert!((sum - 500.5).abs() < 1e-9, "{sum}");
        let count = line_value(&text, "mover_stage_seconds_count{stage=\"chunk_hash\"}");
        assert_eq!(count, 1000.0);
    }

    #[test]
    fn bad_observations_do_not_panic() {
        let m = Metrics::new();
        let inf = f64::INFINITY;
        for s in [f64::NAN, -1.0, -inf, inf, 1e300, 0.0, 7200.0] {
            m.observe(JOB_QUEUE_WAIT, &[], s);
        }
        m.observe(BYTES_READ, &[], 1.0); // wrong kind: ignored
        let text = m.render();
        assert!(!text.contains("mover_bytes_read_total"), "{text}");
        assert_eq!(line_value(&text, "mover_job_queue_wait_seconds_count"), 4.0);
        assert_eq!(
            line_value(&text, "mover_job_queue_wait_seconds_sum"),
            10_800.0
        );
        let top = line_value(&text, "mover_job_queue_wait_seconds{quantile=\"0.999\"}");
        assert!((top - 3600.0).abs() < 3600.0 * 0.001, "{top}");
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
                let kind_ok = ["counter", "gauge", "summary"].contains(&kind);
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
            ];
            assert!(fam.iter().any(|f| typed.contains(*f)), "no TYPE: {line}");
        }
        assert!(
            !text.contains("mover_bytes_restored_total"),
            "empty: {text}"
        );
        assert_eq!(line_value(&text, "mover_up"), 1.0);
        assert_eq!(line_value(&text, "mover_start_time_seconds"), 1.7e9);
        assert!(text.contains("mover_peer_connections NaN\n"));
        assert_eq!(text, m.render());
        assert!(text.find("link=\"a->b\"").unwrap() < text.find("link=\"a->c\"").unwrap());
    }
}
