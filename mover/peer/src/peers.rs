//! Peer sites from the config: address, pinned fingerprint, link settings and bandwidth cap
//! (one shared bucket per peer and process, `links`), and `mover peer add`, which edits the
//! config file in place (comments kept).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use transport::identity::Fingerprint;
use transport::quic::LinkSettings;
use transport::tls::{SiteCredentials, TrustStore};

use mover_config::PeerSection;
use mover_format::error::{Error, Result};
use mover_store::Store;

pub mod links;

pub use links::{LinkRegistry, SharedBucket};

/// A configured peer, resolved and ready to dial.
#[derive(Clone)]
pub struct Link {
    pub site: String,
    pub address: SocketAddr,
    pub fingerprint: Fingerprint,
    pub settings: LinkSettings,
    /// The peer's cap, shared by everything this process sends to it (`links`), so the cap
    /// holds for the link, not per worker or per job.
    pub bucket: Option<Arc<SharedBucket>>,
}

impl Link {
    /// `name`'s section resolved: address looked up, settings applied, `rate` (the parsed
    /// cap) and its shared `bucket` from the process's [`LinkRegistry`].
    pub(crate) fn resolve(
        name: &str,
        peer: &PeerSection,
        rate: Option<u64>,
        bucket: Option<Arc<SharedBucket>>,
    ) -> Result<Link> {
        let address = peer
            .address
            .to_socket_addrs()
            .map_err(|e| Error::peer(name, format!("address {:?}: {e}", peer.address)))?
            .next()
            .ok_or_else(|| {
                Error::peer(
                    name,
                    format!("address {:?} resolves to nothing", peer.address),
                )
            })?;
        let fingerprint =
            Fingerprint::parse(&peer.fingerprint).map_err(|e| Error::peer(name, e))?;
        let mut settings = LinkSettings::for_address(&address);
        if let Some(size) = peer.udp_payload_bytes_max {
            settings.udp_payload_bytes_max = size;
        }
        if let Some(cipher) = peer.cipher {
            settings.cipher = cipher;
        }
        if let Some(congestion) = peer.congestion {
            settings.congestion = congestion;
        }
        if let Some(v) = peer.stream_window_bytes {
            settings.stream_window_bytes = v;
        }
        if let Some(v) = peer.connection_window_bytes {
            settings.connection_window_bytes = v;
            settings.send_window_bytes = settings.send_window_bytes.max(v as u64);
        }
        if let Some(rate) = rate {
            settings.start_at_rate(rate);
        }
        Ok(Link {
            site: name.to_string(),
            address,
            fingerprint,
            settings,
            bucket,
        })
    }
}

/// This site's TLS credentials from its identity directory.
pub fn credentials(site: &Store) -> Result<SiteCredentials> {
    credentials_in(&site.identity_dir(), site.name())
}

/// The TLS credentials of site `name` from its identity directory `dir`, for a process that
/// dials peers without opening the site's index (`mover bench link`, beside a running daemon).
pub fn credentials_in(dir: &Path, name: &str) -> Result<SiteCredentials> {
    let cert = std::fs::read(dir.join("cert.pem"))
        .map_err(|e| Error::io("read", dir.join("cert.pem"), e))?;
    let key = std::fs::read(dir.join("key.pem"))
        .map_err(|e| Error::io("read", dir.join("key.pem"), e))?;
    SiteCredentials::from_pem(name, &cert, &key)
        .map_err(|e| Error::Site(format!("{}: {e}", dir.display())))
}

/// The configured peers' fingerprints, for the daemon's client verifier.
pub fn trust_of(config: &mover_config::Config) -> TrustStore {
    TrustStore::new(trusted_peers(config))
}

/// (site, fingerprint) of every configured peer (validated when the config was loaded).
pub fn trusted_peers(config: &mover_config::Config) -> Vec<(String, Fingerprint)> {
    config
        .peers
        .iter()
        .filter_map(|(name, peer)| {
            Fingerprint::parse(&peer.fingerprint)
                .ok()
                .map(|fp| (name.clone(), fp))
        })
        .collect()
}

/// Adds (or replaces) `[peers.NAME]` in the config file, keeping its comments and layout.
pub fn add_to_config(
    config_path: &Path,
    name: &str,
    address: &str,
    fingerprint: &str,
) -> Result<bool> {
    let section = PeerSection {
        address: address.to_string(),
        fingerprint: fingerprint.to_string(),
        udp_payload_bytes_max: None,
        bandwidth: None,
        cipher: None,
        congestion: None,
        stream_window_bytes: None,
        connection_window_bytes: None,
    };
    mover_config::check_peer(name, &section)
        .map_err(|e| Error::Refused(format!("peer {name}: {e}")))?;
    let text = std::fs::read_to_string(config_path)
        .map_err(|e| Error::io("read config", config_path, e))?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        Error::Site(format!("{}: {}", config_path.display(), e.message()))
    })?;
    let peers = doc
        .entry("peers")
        .or_insert_with(|| {
            let mut table = toml_edit::Table::new();
            table.set_implicit(true);
            toml_edit::Item::Table(table)
        })
        .as_table_mut()
        .ok_or_else(|| Error::Site(format!("{}: `peers` is not a table", config_path.display())))?;
    let replaced = peers.contains_key(name);
    let mut table = toml_edit::Table::new();
    table["address"] = toml_edit::value(address);
    table["fingerprint"] = toml_edit::value(fingerprint.trim());
    peers.insert(name, toml_edit::Item::Table(table));
    let new_text = doc.to_string();
    // The result must still be a valid config before it replaces the old one.
    mover_config::Config::parse(&new_text, config_path)?;
    let tmp = config_path.with_extension("toml.tmp");
    std::fs::write(&tmp, &new_text).map_err(|e| Error::io("write", &tmp, e))?;
    std::fs::rename(&tmp, config_path).map_err(|e| Error::io("rename", config_path, e))?;
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_add_keeps_comments_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mover.toml");
        std::fs::write(
            &path,
            mover_config::template("a", Some("127.0.0.1:7400"), None),
        )
        .unwrap();
        let fp = format!("sha256:{}", "ab".repeat(32));
        assert!(!add_to_config(&path, "b", "127.0.0.1:7401", &fp).unwrap());
        assert!(add_to_config(&path, "b", "127.0.0.1:7402", &fp).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# mover site configuration"), "{text}");
        let config = mover_config::Config::parse(&text, &path).unwrap();
        assert_eq!(config.peers["b"].address, "127.0.0.1:7402");
        let err = add_to_config(&path, "c", "127.0.0.1:7403", "sha256:nope")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fingerprint"), "{err}");
        let err = add_to_config(&path, "c", "nowhere", &fp)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HOST:PORT"), "{err}");
    }
}
