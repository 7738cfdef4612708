//! The links of this process: one entry per configured peer, holding its config section and
//! the ONE token bucket that caps what this process sends to that peer. Every job that ships
//! to the peer (all its workers' connections) and every restore this site serves to it take
//! from the same bucket, so the cap holds for the link whatever the number of jobs.
//!
//! The registry lives on the opened `Site` (mover-engine), of which a process has one per site directory
//! (redb's lock refuses a second open): the daemon's jobs and peer streams share it, an
//! in-process command builds its own. A reload keeps each capped peer's one bucket (so a
//! SIGHUP hands out no fresh burst) and sets a changed cap on it, so jobs already running
//! and restores being served follow the new cap at once: old and new jobs never add up to
//! two caps. A peer that was uncapped and gets a cap gets a new bucket: jobs running
//! uncapped stay so until they end; one whose cap is removed drops its bucket for new jobs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use transport::frame::{CHUNK_FIELDS_BYTES, FRAME_HEADER_BYTES};
use transport::rate::TokenBucket;

use super::Link;
use mover_config::PeerSection;
use mover_format::error::{Error, Result};

/// A peer's bandwidth cap, shared by everything this process sends to the peer.
#[derive(Debug)]
pub struct SharedBucket {
    bucket: Mutex<TokenBucket>,
}

impl SharedBucket {
    fn new(bytes_per_second: u64, now: Instant) -> SharedBucket {
        SharedBucket {
            bucket: Mutex::new(TokenBucket::for_link(bytes_per_second, now)),
        }
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.lock().bytes_per_second()
    }

    /// A reloaded cap, from `now` on, for every holder of this bucket.
    fn set_rate(&self, bytes_per_second: u64, now: Instant) {
        self.lock().set_link_rate(bytes_per_second, now);
    }

    /// Charges one chunk frame carrying `payload_bytes` (its header and fields included,
    /// what the link carries) and returns how long the caller must wait before sending it.
    pub fn take_chunk(&self, payload_bytes: u64, now: Instant) -> Duration {
        let frame = payload_bytes + (FRAME_HEADER_BYTES + CHUNK_FIELDS_BYTES) as u64;
        self.lock().take(frame, now)
    }

    /// Waits until one chunk frame of `payload_bytes` may go out; returns the time waited.
    pub async fn pace_chunk(&self, payload_bytes: u64) -> Duration {
        self.pace(payload_bytes + (FRAME_HEADER_BYTES + CHUNK_FIELDS_BYTES) as u64)
            .await
    }

    /// Waits until `frame_bytes` (a whole frame, header included) may go out; returns the
    /// time waited.
    pub async fn pace(&self, frame_bytes: u64) -> Duration {
        let wait = self.lock().take(frame_bytes, Instant::now());
        if wait.is_zero() {
            return wait;
        }
        let waiting = Instant::now();
        tokio::time::sleep(wait).await;
        waiting.elapsed()
    }

    /// The bucket's arithmetic cannot be left half done (no call into other code under the
    /// lock), so a holder that panicked leaves a usable bucket.
    fn lock(&self) -> std::sync::MutexGuard<'_, TokenBucket> {
        self.bucket.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One peer as this process knows it now.
struct Entry {
    section: PeerSection,
    /// The cap in bytes per second (two spellings of one rate are one cap).
    rate: Option<u64>,
    bucket: Option<Arc<SharedBucket>>,
}

/// Every configured peer of this process with its shared bucket.
pub struct LinkRegistry {
    entries: RwLock<BTreeMap<String, Arc<Entry>>>,
}

impl LinkRegistry {
    /// The registry of `peers` (a config's `[peers.*]`), each capped peer with a full bucket.
    pub fn new(peers: &BTreeMap<String, PeerSection>) -> LinkRegistry {
        LinkRegistry {
            entries: RwLock::new(build(peers, &BTreeMap::new(), Instant::now())),
        }
    }

    /// Replaces the peers with `peers`, all at once: a peer whose cap is unchanged keeps its
    /// bucket (and what it owes), one whose cap changed gets a new one, a removed peer is
    /// gone for new jobs. The caps were checked when the config loaded
    /// ([`mover_config::Config::load`]), so a config that does not parse never gets here.
    pub fn reload(&self, peers: &BTreeMap<String, PeerSection>) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        *entries = build(peers, &entries, Instant::now());
    }

    /// A copy of the current peers' config sections.
    pub fn sections(&self) -> BTreeMap<String, PeerSection> {
        self.read()
            .iter()
            .map(|(name, entry)| (name.clone(), entry.section.clone()))
            .collect()
    }

    /// The bucket capping what this process sends to `peer`; `None` when it is uncapped or
    /// not configured.
    pub fn bucket(&self, peer: &str) -> Option<Arc<SharedBucket>> {
        self.read().get(peer).and_then(|entry| entry.bucket.clone())
    }

    /// `peer` resolved and ready to dial, with the shared bucket.
    pub fn link(&self, peer: &str) -> Result<Link> {
        let entry = {
            let entries = self.read();
            match entries.get(peer) {
                Some(entry) => entry.clone(),
                None => {
                    let known: Vec<&str> = entries.keys().map(String::as_str).collect();
                    return Err(Error::NotFound(format!(
                        "site {peer:?} is not a configured peer (known: {}); add it with `mover peer add {peer} HOST:PORT FINGERPRINT`",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    )));
                }
            }
        };
        Link::resolve(peer, &entry.section, entry.rate, entry.bucket.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The entries of `peers`, reusing the bucket of each capped peer of `old` (set to its new
/// cap if that changed).
fn build(
    peers: &BTreeMap<String, PeerSection>,
    old: &BTreeMap<String, Arc<Entry>>,
    now: Instant,
) -> BTreeMap<String, Arc<Entry>> {
    let mut entries = BTreeMap::new();
    for (name, section) in peers {
        let rate = section.bandwidth.map(|rate| rate.bytes_per_second());
        let previous = old.get(name).and_then(|entry| entry.bucket.clone());
        let bucket = match (previous, rate) {
            (Some(bucket), Some(rate)) => {
                if bucket.bytes_per_second() != rate {
                    bucket.set_rate(rate, now);
                }
                Some(bucket)
            }
            (None, Some(rate)) => Some(Arc::new(SharedBucket::new(rate, now))),
            (_, None) => None,
        };
        let entry = Entry {
            section: section.clone(),
            rate,
            bucket,
        };
        entries.insert(name.clone(), Arc::new(entry));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: &str, bandwidth: Option<&str>) -> PeerSection {
        PeerSection {
            address: address.to_string(),
            fingerprint: format!("sha256:{}", "ab".repeat(32)),
            udp_payload_bytes_max: None,
            bandwidth: bandwidth.map(|text| text.parse().unwrap()),
            cipher: None,
            congestion: None,
            stream_window_bytes: None,
            connection_window_bytes: None,
        }
    }

    fn peers(list: &[(&str, PeerSection)]) -> BTreeMap<String, PeerSection> {
        list.iter()
            .map(|(name, section)| (name.to_string(), section.clone()))
            .collect()
    }

    #[test]
    fn two_handles_share_one_bucket() {
        let registry = LinkRegistry::new(&peers(&[
            ("b", peer("127.0.0.1:7401", Some("8MB/s"))),
            ("c", peer("127.0.0.1:7402", None)),
        ]));
        // Two jobs to b: each resolves its own Link, both hold the same bucket.
        let (one, two) = (registry.link("b").unwrap(), registry.link("b").unwrap());
        let (one, two) = (one.bucket.unwrap(), two.bucket.unwrap());
        assert!(Arc::ptr_eq(&one, &two));
        assert!(Arc::ptr_eq(&one, &registry.bucket("b").unwrap()));
        assert_eq!(one.bytes_per_second(), 8_000_000);
        // What one spends, the other must wait for: together they get the rate, not twice it.
        // 16 chunk frames of 1 MB at one instant, alternating handles: the last waits for
        // all of them beyond one burst (4 MiB + 37 B, one full chunk frame).
        let now = Instant::now() + Duration::from_secs(1);
        let mut wait = Duration::ZERO;
        for handle in [&one, &two].into_iter().cycle().take(16) {
            wait = handle.take_chunk(1_000_000, now);
        }
        let expected = (16.0 * 1_000_045.0 - ((4 << 20) + 37) as f64) / 8e6;
        assert!(
            (wait.as_secs_f64() - expected).abs() < 1e-6,
            "{wait:?}, expected {expected} s"
        );
        // An uncapped peer has no bucket; an unknown one is refused with the known names.
        assert!(registry.link("c").unwrap().bucket.is_none());
        let Err(err) = registry.link("d") else {
            panic!("an unknown peer resolved")
        };
        let err = err.to_string();
        assert!(err.contains("\"d\"") && err.contains("b, c"), "{err}");
    }

    #[test]
    fn a_reload_keeps_each_bucket_and_sets_a_changed_cap_on_it() {
        let registry = LinkRegistry::new(&peers(&[
            ("b", peer("127.0.0.1:7401", Some("8MB/s"))),
            ("c", peer("127.0.0.1:7402", Some("1gbit"))),
            ("d", peer("127.0.0.1:7403", None)),
        ]));
        let b = registry.bucket("b").unwrap();
        let c = registry.bucket("c").unwrap();
        // b: same cap spelled differently and a new address; c: a new cap; d: gone.
        registry.reload(&peers(&[
            ("b", peer("127.0.0.1:7404", Some("64Mbit"))),
            ("c", peer("127.0.0.1:7402", Some("2gbit"))),
        ]));
        assert!(Arc::ptr_eq(&b, &registry.bucket("b").unwrap()));
        assert_eq!(registry.link("b").unwrap().address.port(), 7404);
        // A job running to c holds `c`: it follows the new cap, as new jobs do.
        assert!(Arc::ptr_eq(&c, &registry.bucket("c").unwrap()));
        assert_eq!(c.bytes_per_second(), 250_000_000);
        assert!(registry.link("d").is_err());
        assert_eq!(registry.sections().len(), 2);
    }
}
