//! A site opened for jobs: its store (config, tiers, index, manifests; `mover-store`) and this
//! process's links to its peers (`mover-peer`), which jobs dial and a daemon reloads.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use mover_config::PeerSection;
use mover_format::error::{Error, Result};
use mover_peer::peers::LinkRegistry;
use mover_peer::remote::net::Net;

pub use mover_store::site::{
    fingerprint_of, init, open_tiers, InitOptions, Initialised, Store, INDEX_FILE_NAME,
};

pub struct Site {
    store: Arc<Store>,
    /// The peers jobs may use, each with the one bucket capping what this process sends to
    /// it: `config.peers` at open, replaced when a daemon reloads. Shared with the peer
    /// server, which paces what it serves to a peer by the same bucket.
    pub links: Arc<LinkRegistry>,
    /// The endpoint and runtime this site's jobs dial peers from: the daemon's, set when it
    /// starts; unset, the process's own ([`Net::of_process`]).
    net: OnceLock<Arc<Net>>,
}

impl Deref for Site {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Site {
    /// Opens the site in `dir` (the directory holding mover.toml).
    pub fn open(dir: &Path) -> Result<Site> {
        Store::open(dir).map(Site::new)
    }

    /// Opens a site from its config file path (`--config FILE`).
    pub fn open_config(config_path: &Path) -> Result<Site> {
        Store::open_config(config_path).map(Site::new)
    }

    /// A site over a store already opened (its peers from the store's config).
    pub fn new(store: Store) -> Site {
        Site {
            links: Arc::new(LinkRegistry::new(&store.config.peers)),
            store: Arc::new(store),
            net: OnceLock::new(),
        }
    }

    /// The store alone, for the peer server, which outlives no job but runs beside them all.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// A copy of the current peers (reloads replace them).
    pub fn peers(&self) -> BTreeMap<String, PeerSection> {
        self.links.sections()
    }

    /// Where this site's jobs dial peers from (see the field).
    pub fn net(&self) -> Result<Arc<Net>> {
        match self.net.get() {
            Some(net) => Ok(net.clone()),
            None => Net::of_process(),
        }
    }

    /// Makes `net` (a daemon's) the one this site's jobs dial from; refused once set.
    pub fn set_net(&self, net: Arc<Net>) -> Result<()> {
        self.net
            .set(net)
            .map_err(|_| Error::Site("this site's network endpoint is already set".into()))
    }
}
