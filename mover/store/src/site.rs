//! A site on disk: `mover init` creates one, every other command opens one.
//!
//! ```text
//! DIR/mover.toml            configuration (commented)
//! DIR/identity/key.pem      site private key, mode 0600
//! DIR/identity/cert.pem     self-signed certificate; its SHA-256 is the site's fingerprint
//! DIR/index.redb            chunk index, pack registry, snapshot catalog, job history
//! DIR/manifests/xx/<id>     snapshot manifests, content-addressed
//! DIR/<tier path>/packs/xx/<pack id>.pack   chunk records, per tier
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::inflight::InFlight;
use crate::pack_reader::ChunkReader;
use crate::reclaim::{self, Reclaimed};
use crate::repack;
use crate::{manifest_key, Backend, Index, LocalDir};
use mover_config::{self as config, Config, CONFIG_FILE_NAME};
use mover_format::error::{Error, Result};
use mover_format::manifest::{self, Manifest};
use mover_format::manifest_blocks::ManifestStream;

pub const INDEX_FILE_NAME: &str = "index.redb";

/// A site's storage, opened: its config, tiers, index and manifests. The engine's
/// `Site` adds this process's links to peers.
pub struct Store {
    pub dir: PathBuf,
    pub config: Config,
    pub index: Index,
    pub tiers: HashMap<String, Arc<dyn Backend>>,
    pub metadata: LocalDir,
    /// Chunks being stored by this site's writers (jobs, peers' streams) and not yet indexed,
    /// shared so that writers running at the same time store each chunk once.
    pub in_flight: InFlight,
}

pub struct InitOptions<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub listen: Option<&'a str>,
    pub socket: Option<&'a Path>,
}

pub struct Initialised {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub fingerprint: String,
}

/// Creates a site. Refuses a directory that already holds a site or anything else.
pub fn init(options: &InitOptions) -> Result<Initialised> {
    transport::identity::validate_site_name(options.name)
        .map_err(|e| Error::Site(e.to_string()))?;
    let dir = options.dir;
    if dir.join(CONFIG_FILE_NAME).exists() || dir.join(INDEX_FILE_NAME).exists() {
        return Err(Error::Refused(format!(
            "{} already holds a mover site; it is never overwritten",
            dir.display()
        )));
    }
    if dir.exists() {
        let mut listing =
            std::fs::read_dir(dir).map_err(|e| Error::io("read directory", dir, e))?;
        if listing.next().is_some() {
            return Err(Error::Refused(format!(
                "{} is not empty: expected a new or empty directory for the site",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::io("resolve", dir, e))?;

    let identity =
        transport::identity::generate(options.name).map_err(|e| Error::Site(e.to_string()))?;
    let identity_dir = dir.join("identity");
    std::fs::create_dir(&identity_dir)
        .map_err(|e| Error::io("create directory", &identity_dir, e))?;
    write_new(
        &identity_dir.join("key.pem"),
        identity.private_key_pem.as_bytes(),
        0o600,
    )?;
    write_new(
        &identity_dir.join("cert.pem"),
        identity.certificate_pem.as_bytes(),
        0o644,
    )?;

    let text = config::template(options.name, options.listen, options.socket);
    let config_path = dir.join(CONFIG_FILE_NAME);
    let config = Config::parse(&text, &config_path)?;
    for tier in config.tiers.values() {
        let path = dir.join(&tier.path);
        std::fs::create_dir_all(&path).map_err(|e| Error::io("create directory", &path, e))?;
    }
    Index::open(&dir.join(INDEX_FILE_NAME))?;
    // The config is written last: a site whose init was interrupted has no mover.toml and
    // is not mistaken for a working one.
    write_new(&config_path, text.as_bytes(), 0o644)?;
    crate::backend::sync_dir(&dir)?;
    Ok(Initialised {
        dir,
        config_path,
        fingerprint: identity.fingerprint.to_string(),
    })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io("write", path, e))
}

impl Store {
    /// Opens the site in `dir` (the directory holding mover.toml).
    pub fn open(dir: &Path) -> Result<Store> {
        let config_path = dir.join(CONFIG_FILE_NAME);
        if !config_path.exists() {
            return Err(Error::Site(format!(
                "{} is not a mover site: expected {} (create one with `mover init --site NAME --dir DIR`)",
                dir.display(),
                config_path.display()
            )));
        }
        let config = Config::load(&config_path)?;
        Self::open_with(dir, config)
    }

    /// Opens a site from its config file path (`--config FILE`).
    pub fn open_config(config_path: &Path) -> Result<Store> {
        let config = Config::load(config_path)?;
        let dir = config_path.parent().unwrap_or(Path::new("."));
        Self::open_with(dir, config)
    }

    fn open_with(dir: &Path, config: Config) -> Result<Store> {
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io("resolve", dir, e))?;
        let tiers = open_tiers(&dir, &config)?;
        let metadata = LocalDir::new(&dir);
        let index_path = dir.join(INDEX_FILE_NAME);
        if !index_path.exists() {
            crate::repair::refuse_lost_index(&index_path, &tiers, &metadata)?;
        }
        let index = Index::open(&index_path).map_err(|e| e.in_index(&index_path))?;
        let site = Store {
            metadata,
            dir,
            config,
            index,
            tiers,
            in_flight: InFlight::default(),
        };
        for tier in site.tiers.keys() {
            site.reclaim_packs(tier);
        }
        Ok(site)
    }

    /// Removes the packs of `tier` left unsealed by writers that were killed or failed
    /// (`store::reclaim`); safe beside running writers. Housekeeping: a failure is logged,
    /// never fatal.
    pub fn reclaim_packs(&self, tier: &str) -> Reclaimed {
        let Some(backend) = self.tiers.get(tier) else {
            return Reclaimed::default();
        };
        reclaim::reclaim_tier(&self.index, tier, &**backend).unwrap_or_else(|e| {
            tracing::warn!(tier, error = %e, "could not look for unsealed packs to reclaim");
            Reclaimed::default()
        })
    }

    /// Merges the small packs of `tier` once there are enough of them (`store::repack`);
    /// returns how many packs were merged away. Housekeeping: a failure is logged, never
    /// fatal (the packs stay as they are, all of them readable). `stop` ends it early
    /// (`repack::merge_small_packs`).
    pub fn merge_small_packs(&self, tier: &str, stop: &dyn Fn() -> bool) -> u64 {
        let Some(backend) = self.tiers.get(tier) else {
            return 0;
        };
        repack::merge_small_packs(
            &self.index,
            tier,
            backend,
            self.config.pack_target_bytes(),
            stop,
        )
        .map(|merged| merged.packs)
        .unwrap_or_else(|e| {
            tracing::warn!(tier, error = %e, "could not merge small packs");
            0
        })
    }

    pub fn name(&self) -> &str {
        &self.config.site.name
    }

    pub fn tier(&self, name: &str) -> Result<&Arc<dyn Backend>> {
        self.tiers.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.tiers.keys().map(String::as_str).collect();
            known.sort();
            Error::NotFound(format!(
                "tier {name:?}: expected one of {}",
                known.join(", ")
            ))
        })
    }

    /// The index database's file, which index errors name ([`Error::in_index`]).
    pub fn index_path(&self) -> PathBuf {
        self.dir.join(INDEX_FILE_NAME)
    }

    pub fn chunk_reader(&self) -> ChunkReader<'_> {
        ChunkReader::new(&self.index, &self.tiers)
    }

    pub fn store_manifest(&self, manifest: &Manifest) -> Result<[u8; 32]> {
        let encoded = manifest::encode(manifest)?;
        let key = manifest_key(&encoded.id);
        if !self.metadata.exists(&key)? {
            self.metadata.put_durable(&key, &encoded.bytes)?;
        }
        Ok(encoded.id)
    }

    /// A snapshot's manifest object as a byte stream (buffered).
    pub fn manifest_reader(&self, id: &[u8; 32]) -> Result<Box<dyn std::io::Read + Send>> {
        let path = self.metadata.path_of(&manifest_key(id));
        let file = std::fs::File::open(&path).map_err(|e| Error::io("open", &path, e))?;
        Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, file)))
    }

    /// A snapshot's entries, read one at a time (checked against `id` at the end).
    pub fn open_manifest(
        &self,
        id: &[u8; 32],
    ) -> Result<ManifestStream<Box<dyn std::io::Read + Send>>> {
        ManifestStream::open(self.manifest_reader(id)?, Some(id))
    }

    pub fn load_manifest(&self, id: &[u8; 32]) -> Result<Manifest> {
        let key = manifest_key(id);
        let bytes = self.metadata.read_all(&key)?;
        manifest::decode(&bytes, Some(id))
    }

    pub fn identity_dir(&self) -> PathBuf {
        self.dir.join(&self.config.site.identity)
    }

    pub fn fingerprint(&self) -> Result<String> {
        fingerprint_of(&self.identity_dir())
    }
}

/// The backend of every tier of `config`, whose directories must exist.
pub fn open_tiers(dir: &Path, config: &Config) -> Result<HashMap<String, Arc<dyn Backend>>> {
    let mut tiers: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    let mut resolved = Vec::new();
    for (name, tier) in &config.tiers {
        let path = dir.join(&tier.path);
        if !path.is_dir() {
            return Err(Error::Site(format!(
                "tier {name:?}: directory {} does not exist",
                path.display()
            )));
        }
        resolved.push((
            name.as_str(),
            path.canonicalize()
                .map_err(|e| Error::io("resolve", &path, e))?,
        ));
        tiers.insert(name.clone(), Arc::new(LocalDir::new(path)));
    }
    // The config check compares paths as written; links can still join two tiers.
    config::check_tier_dirs(&resolved).map_err(Error::Site)?;
    Ok(tiers)
}

/// The fingerprint of the certificate in an identity directory.
pub fn fingerprint_of(identity_dir: &Path) -> Result<String> {
    let path = identity_dir.join("cert.pem");
    let pem = std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))?;
    transport::identity::Fingerprint::of_pem(&pem)
        .map(|f| f.to_string())
        .map_err(|e| Error::Site(format!("{}: {e}", path.display())))
}
