//! `mover quickstart`: a newcomer's first run on this machine. Creates two sites, `local` and
//! `dr`, that trust each other, with `dr`'s daemon serving on loopback; backs up a data set
//! (a generated AI-like sample when none is given) to `local`, backs it up again unchanged,
//! sends a disaster-recovery copy to `dr` over QUIC, restores from `local` and from `dr`,
//! verifies both sites and compares the restored trees with the original.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use mover_engine::site::{self, InitOptions, Site};
use mover_format::error::{Error, Result};
use mover_sample::{self as sample, SampleSpec};

#[derive(Debug, Serialize)]
pub struct QuickstartReport {
    pub dir: String,
    pub site: String,
    pub data: String,
    pub generated: bool,
    pub snapshot: String,
    pub files: u64,
    pub bytes_total: u64,
    pub bytes_stored: u64,
    pub backup_s: f64,
    pub backup_gb_per_s: f64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub second_backup_s: f64,
    pub second_backup_bytes_read: u64,
    pub restore_s: f64,
    pub restore_gb_per_s: f64,
    pub verify_chunks: u64,
    pub identical: bool,
    pub warnings: usize,
    pub dr_site: String,
    pub dr_address: String,
    pub dr_backup_s: f64,
    pub dr_backup_gb_per_s: f64,
    /// UDP bytes the DR copy put on the wire (both directions).
    pub dr_wire_bytes: u64,
    pub dr_restore_s: f64,
    pub dr_restore_wire_bytes: u64,
    pub dr_verify_chunks: u64,
    pub dr_identical: bool,
}

pub fn run(
    data: Option<&Path>,
    dir: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<QuickstartReport> {
    let base = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            std::env::temp_dir().join(format!("mover-quickstart-{now}-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&base).map_err(|e| Error::io("create directory", &base, e))?;
    let site_dir = base.join("site-local");
    let init = site::init(&InitOptions {
        name: "local",
        dir: &site_dir,
        listen: None,
        socket: None,
    })?;
    progress(&format!(
        "created site 'local' in {} (fingerprint {})",
        init.dir.display(),
        init.fingerprint
    ));
    let dr_dir = base.join("site-dr");
    // A fixed free port (not 0) so the configs stay valid for `mover daemon` afterwards.
    let dr_listen = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| Error::io("find a free UDP port on", "127.0.0.1", e))?
        .to_string();
    let dr_init = site::init(&InitOptions {
        name: "dr",
        dir: &dr_dir,
        listen: Some(&dr_listen),
        socket: None,
    })?;
    mover_peer::peers::add_to_config(
        &dr_init.config_path,
        "local",
        "127.0.0.1:9",
        &init.fingerprint,
    )?;
    let dr_daemon = crate::daemon::Daemon::start(&dr_init.config_path)?;
    mover_peer::peers::add_to_config(
        &init.config_path,
        "dr",
        &dr_daemon.address.to_string(),
        &dr_init.fingerprint,
    )?;
    progress(&format!(
        "created site 'dr' in {} with its daemon on {} (QUIC, mutual TLS pinned by fingerprint)",
        dr_init.dir.display(),
        dr_daemon.address
    ));

    let (data_dir, generated) = match data {
        Some(path) => (path.to_path_buf(), false),
        None => {
            let path = base.join("sample-data");
            let summary = sample::generate(&path, &SampleSpec::quickstart())
                .map_err(|e| Error::io("generate sample data", &path, e))?;
            progress(&format!(
                "generated a sample AI data set: {} files, {:.0} MB (checkpoints, JSONL shards, small files)",
                summary.files,
                summary.bytes as f64 / 1e6
            ));
            (path, true)
        }
    };

    let site = Site::open(&site_dir)?;
    let first = mover_engine::backup::run(
        &site,
        &mover_engine::backup::BackupOptions {
            control: None,
            source: &data_dir,
            to: None,
            tier: None,
        },
    )?;
    let snapshot = first
        .snapshot
        .clone()
        .expect("a finished backup has a snapshot");
    progress(&format!(
        "backup {}: {} files, {:.0} MB in {:.2} s ({:.2} GB/s), {:.0} MB stored",
        &snapshot[..12],
        first.files,
        first.bytes_total as f64 / 1e6,
        first.elapsed_s,
        first.gb_per_s(),
        first.bytes_sent as f64 / 1e6
    ));
    let second = mover_engine::backup::run(
        &site,
        &mover_engine::backup::BackupOptions {
            control: None,
            source: &data_dir,
            to: None,
            tier: None,
        },
    )?;
    progress(&format!(
        "second backup of the unchanged tree: {:.3} s, {} bytes read, {} new chunks",
        second.elapsed_s, second.bytes_read, second.chunks_new
    ));

    let restore_dir = base.join("restored");
    let restored = mover_engine::restore::run(
        &site,
        &mover_engine::restore::RestoreOptions {
            control: None,
            resume: false,
            spec: &snapshot,
            target: &restore_dir,
            from: None,
        },
    )?;
    let restore_gb_per_s = if restored.elapsed_s > 0.0 {
        restored.bytes_written as f64 / restored.elapsed_s / 1e9
    } else {
        0.0
    };
    progress(&format!(
        "restored to {} in {:.2} s ({:.2} GB/s)",
        restore_dir.display(),
        restored.elapsed_s,
        restore_gb_per_s
    ));
    let verify = mover_engine::verify::run(&site, Some(&snapshot))?;
    if let Some(damage) = verify.damage.first() {
        return Err(Error::corrupt(
            format!("snapshot {}", &snapshot[..12]),
            format!("{}: {}", damage.path, damage.reason),
        ));
    }
    progress(&format!(
        "verified {} chunks ({:.0} MB): all checksums and ids match",
        verify.chunks_checked,
        verify.bytes_checked as f64 / 1e6
    ));
    compare_trees(&data_dir, &restore_dir).map_err(|why| Error::corrupt("restored tree", why))?;
    progress("restored tree is identical to the original (content, modes, mtimes, links)");

    let dr_copy = mover_engine::backup::run(
        &site,
        &mover_engine::backup::BackupOptions {
            control: None,
            source: &data_dir,
            to: Some("dr"),
            tier: None,
        },
    )?;
    let dr_wire_bytes = dr_copy.wire_bytes_sent + dr_copy.wire_bytes_received;
    progress(&format!(
        "DR copy to 'dr': {:.0} MB in {:.2} s ({:.2} GB/s), {:.0} MB on the wire",
        dr_copy.bytes_total as f64 / 1e6,
        dr_copy.elapsed_s,
        dr_copy.gb_per_s(),
        dr_wire_bytes as f64 / 1e6
    ));
    let dr_restore_dir = base.join("restored-from-dr");
    let dr_restored = mover_engine::restore::run(
        &site,
        &mover_engine::restore::RestoreOptions {
            control: None,
            resume: false,
            spec: dr_copy
                .snapshot
                .as_deref()
                .expect("a finished backup has a snapshot"),
            target: &dr_restore_dir,
            from: Some("dr"),
        },
    )?;
    let dr_restore_wire_bytes = dr_restored.wire_bytes_sent + dr_restored.wire_bytes_received;
    progress(&format!(
        "restored from 'dr' to {} in {:.2} s, {:.0} MB on the wire",
        dr_restore_dir.display(),
        dr_restored.elapsed_s,
        dr_restore_wire_bytes as f64 / 1e6
    ));
    compare_trees(&data_dir, &dr_restore_dir)
        .map_err(|why| Error::corrupt("tree restored from dr", why))?;
    // The daemon holds dr's index; stop it to verify dr's store in this process.
    dr_daemon.stop();
    let dr_site = Site::open(&dr_dir)?;
    let dr_verify = mover_engine::verify::run(&dr_site, None)?;
    if let Some(damage) = dr_verify.damage.first() {
        return Err(Error::corrupt(
            "site dr",
            format!("{}: {}", damage.path, damage.reason),
        ));
    }
    progress(&format!(
        "verified 'dr': {} chunks; the tree restored from 'dr' is identical to the original",
        dr_verify.chunks_checked
    ));

    Ok(QuickstartReport {
        dir: base.display().to_string(),
        site: init.dir.display().to_string(),
        data: data_dir.display().to_string(),
        generated,
        snapshot,
        files: first.files,
        bytes_total: first.bytes_total,
        bytes_stored: first.bytes_sent,
        backup_s: first.elapsed_s,
        backup_gb_per_s: first.gb_per_s(),
        dedup_ratio: ratio(first.bytes_total, first.bytes_new),
        compression_ratio: ratio(first.bytes_new, first.bytes_sent),
        second_backup_s: second.elapsed_s,
        second_backup_bytes_read: second.bytes_read,
        restore_s: restored.elapsed_s,
        restore_gb_per_s,
        verify_chunks: verify.chunks_checked,
        identical: true,
        warnings: first.warnings.len(),
        dr_site: dr_init.dir.display().to_string(),
        dr_address: dr_listen,
        dr_backup_s: dr_copy.elapsed_s,
        dr_backup_gb_per_s: dr_copy.gb_per_s(),
        dr_wire_bytes,
        dr_restore_s: dr_restored.elapsed_s,
        dr_restore_wire_bytes,
        dr_verify_chunks: dr_verify.chunks_checked,
        dr_identical: true,
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

/// Compares two trees: entry types, file contents, symlink targets, permission bits, mtimes
/// (not of symlinks' targets), and which paths share an inode. Returns the first difference.
pub fn compare_trees(a: &Path, b: &Path) -> std::result::Result<(), String> {
    let list_a = walk(a)?;
    let list_b = walk(b)?;
    let names_a: Vec<&PathBuf> = list_a.iter().map(|(p, _)| p).collect();
    let names_b: Vec<&PathBuf> = list_b.iter().map(|(p, _)| p).collect();
    if names_a != names_b {
        let missing: Vec<_> = names_a
            .iter()
            .filter(|p| !names_b.contains(p))
            .take(3)
            .collect();
        let extra: Vec<_> = names_b
            .iter()
            .filter(|p| !names_a.contains(p))
            .take(3)
            .collect();
        return Err(format!(
            "different entries: missing {missing:?}, extra {extra:?}"
        ));
    }
    let mut inodes_a = std::collections::HashMap::new();
    let mut inodes_b = std::collections::HashMap::new();
    for ((rel, ma), (_, mb)) in list_a.iter().zip(&list_b) {
        let (pa, pb) = (a.join(rel), b.join(rel));
        let what = rel.display();
        if ma.file_type() != mb.file_type() {
            return Err(format!("{what}: file type differs"));
        }
        if !ma.file_type().is_symlink() && ma.mode() & 0o7777 != mb.mode() & 0o7777 {
            return Err(format!(
                "{what}: mode {:o} vs {:o}",
                ma.mode() & 0o7777,
                mb.mode() & 0o7777
            ));
        }
        if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec())
            && !rel.as_os_str().is_empty()
        {
            return Err(format!("{what}: mtime differs"));
        }
        if ma.file_type().is_symlink() {
            let (ta, tb) = (std::fs::read_link(&pa), std::fs::read_link(&pb));
            if ta.map_err(|e| e.to_string())? != tb.map_err(|e| e.to_string())? {
                return Err(format!("{what}: symlink target differs"));
            }
        } else if ma.is_file() {
            if ma.len() != mb.len() {
                return Err(format!("{what}: size {} vs {}", ma.len(), mb.len()));
            }
            if !same_content(&pa, &pb).map_err(|e| format!("{what}: {e}"))? {
                return Err(format!("{what}: content differs"));
            }
            if ma.nlink() > 1 {
                let first_a = inodes_a
                    .entry(ma.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                let first_b = inodes_b
                    .entry(mb.ino())
                    .or_insert_with(|| rel.clone())
                    .clone();
                if first_a != first_b {
                    return Err(format!("{what}: hardlink structure differs"));
                }
            }
        }
    }
    Ok(())
}

fn walk(root: &Path) -> std::result::Result<Vec<(PathBuf, std::fs::Metadata)>, String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| rel.join(e.file_name())))
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
        }
        let is_special = !(meta.is_dir() || meta.is_file() || meta.file_type().is_symlink());
        if !is_special {
            out.push((rel, meta));
        }
    }
    out.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

fn same_content(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
}
