//! Faults injected for real: a tier or a metadata disk that fills up under a backup (small
//! tmpfs mounts; the tests need root, as CI runs them). After each fault the backup has failed
//! with one line naming the cause, no snapshot became visible, the store verifies, nothing the
//! failed backup wrote is left taking space, and once space is back the next backup succeeds
//! and restores exactly.
//!
//! EIO (on a pack write, a pack's fdatasync, the index's commit, a pack read) comes from
//! `mover-faultfs`, a pass-through FUSE file system of tools/ that fails the operations a test
//! names, mounted over the tier or the site's metadata.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn snapshots(site: &Path) -> Vec<Value> {
    run_json(mover().args(["snapshots", "--site-dir"]).arg(site))
        .as_array()
        .unwrap()
        .clone()
}

fn verify_clean(site: &Path) {
    let output = run(mover().args(["verify", "--site-dir"]).arg(site));
    assert!(output.status.success(), "verify: {}", stderr(&output));
}

/// The one error line of a failed command (tracing warnings aside).
fn error_line(output: &std::process::Output) -> String {
    let err = stderr(output);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("mover:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    errors[0].to_string()
}

/// Bytes in the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            bytes_under(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

#[test]
fn a_full_tier_fails_the_backup_in_one_line_and_leaves_no_trace() {
    assert!(
        is_root(),
        "this test mounts a small tmpfs and needs root; CI runs as root"
    );
    let work = workdir();
    let site = init_site(work.path(), "a");
    let tier = Tmpfs::over(&site.join("tiers/hot"), "24m");
    // A first backup fits (a new pack reserves pack_target_bytes where it can, but a smaller
    // disk only costs the reservation, not the backup).
    let small = work.path().join("small");
    write_random(&small.join("x"), 1 << 20, 1);
    let first = backup(&site, &small);
    let before = bytes_under(tier.path());

    let data = work.path().join("data");
    for i in 0..3u64 {
        write_random(&data.join(format!("f{i}")), 16 << 20, 10 + i);
    }
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site));
    assert!(!output.status.success(), "48 MiB fit a 24 MiB tier?");
    let line = error_line(&output);
    assert!(
        line.contains("No space left on device") && line.contains(".pack"),
        "the error names the pack and ENOSPC: {line}"
    );
    let visible = snapshots(&site);
    assert_eq!(visible.len(), 1, "{visible:?}");
    assert_eq!(visible[0]["id"], snapshot_id(&first).as_str());
    verify_clean(&site);
    assert_eq!(
        bytes_under(tier.path()),
        before,
        "the failed backup left bytes in the tier"
    );

    // Space back: the same backup succeeds and restores exactly.
    tier.resize("128m");
    let done = backup(&site, &data);
    let restored = work.path().join("restored");
    restore(&site, &snapshot_id(&done), &restored);
    assert_same_tree(&data, &restored);
    verify_clean(&site);
}

#[test]
fn a_full_metadata_disk_fails_the_commit_and_loses_nothing() {
    assert!(
        is_root(),
        "this test mounts a small tmpfs and needs root; CI runs as root"
    );
    let work = workdir();
    let site = init_site(work.path(), "a");
    // Packs on the ordinary disk; the index and manifests on a 4 MiB file system.
    let packs = work.path().join("packs-disk");
    std::fs::create_dir(&packs).unwrap();
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "path = \"tiers/hot\"",
        &format!("path = \"{}\"", packs.display()),
    );
    std::fs::write(&config, text).unwrap();
    let metadata = Tmpfs::over(&site, "4m");

    let data = work.path().join("data");
    write_random(&data.join("base"), 1 << 20, 2);
    backup(&site, &data);

    // Fill it but for a few KiB: small enough that the index cannot grow, then a little more,
    // so that commits fail at different steps (manifest, index).
    let mut failures = 0;
    let mut successes = 1;
    for (i, free_kib) in [0u64, 4, 8, 16].into_iter().enumerate() {
        let filler = metadata.fill();
        let full = std::fs::metadata(&filler).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        file.set_len(full.saturating_sub(free_kib << 10)).unwrap();
        drop(file);
        write_random(&data.join(format!("new{i}")), 64 << 10, 20 + i as u64);
        let output = run(mover()
            .arg("backup")
            .arg(&data)
            .arg("--site-dir")
            .arg(&site));
        if output.status.success() {
            successes += 1;
        } else {
            failures += 1;
            let line = error_line(&output);
            assert!(line.contains("No space left on device"), "{line}");
        }
        let visible = snapshots(&site);
        assert_eq!(visible.len(), successes, "{visible:?}");
        std::fs::remove_file(&filler).unwrap();
        verify_clean(&site);
    }
    assert!(failures > 0, "no backup failed on a full metadata disk");

    // Space back: the next backup succeeds and restores exactly.
    let done = backup(&site, &data);
    let restored = work.path().join("restored");
    restore(&site, &snapshot_id(&done), &restored);
    assert_same_tree(&data, &restored);
    verify_clean(&site);
}

/// A site whose default tier is served through mover-faultfs, with one snapshot already in it.
struct FaultyTier {
    work: tempfile::TempDir,
    site: std::path::PathBuf,
    data: std::path::PathBuf,
    fs: FaultFs,
}

impl FaultyTier {
    fn new() -> FaultyTier {
        assert!(
            is_root(),
            "this test mounts a FUSE file system and needs root; CI runs as root"
        );
        let work = workdir();
        let site = init_site(work.path(), "a");
        let fs = FaultFs::over(&site.join("tiers/hot"));
        let data = work.path().join("data");
        write_random(&data.join("base"), 2 << 20, 7);
        backup(&site, &data);
        FaultyTier {
            work,
            site,
            data,
            fs,
        }
    }

    /// A backup of new data under `faults` fails in one line containing each of `expect`,
    /// and shows nothing; with the faults gone the store verifies and the backup succeeds.
    fn backup_fails_cleanly(&self, faults: &str, expect: &[&str]) {
        write_random(&self.data.join("new"), 3 << 20, 8);
        self.fs.set(faults);
        let output = run(mover()
            .arg("backup")
            .arg(&self.data)
            .arg("--site-dir")
            .arg(&self.site));
        self.fs.set("");
        assert!(!output.status.success(), "the backup ignored {faults:?}");
        let line = error_line(&output);
        for word in expect {
            assert!(line.contains(word), "{word:?} not in: {line}");
        }
        assert_eq!(
            snapshots(&self.site).len(),
            1,
            "a failed backup became visible"
        );
        verify_clean(&self.site);
        let done = backup(&self.site, &self.data);
        let restored = self.work.path().join("restored");
        restore(&self.site, &snapshot_id(&done), &restored);
        assert_same_tree(&self.data, &restored);
    }
}

#[test]
fn eio_on_a_pack_write_fails_the_backup_and_loses_nothing() {
    FaultyTier::new().backup_fails_cleanly("write .pack EIO", &[".pack", "Input/output error"]);
}

#[test]
fn eio_on_a_packs_fdatasync_fails_the_backup_and_loses_nothing() {
    FaultyTier::new().backup_fails_cleanly("fsync .pack EIO", &[".pack", "Input/output error"]);
}

#[test]
fn eio_on_the_index_commit_fails_the_backup_and_loses_nothing() {
    assert!(
        is_root(),
        "this test mounts a FUSE file system and needs root; CI runs as root"
    );
    let work = workdir();
    let site = init_site(work.path(), "a");
    // Packs on the ordinary disk; the index (and manifests) through faultfs.
    let packs = work.path().join("packs-disk");
    std::fs::create_dir(&packs).unwrap();
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "path = \"tiers/hot\"",
        &format!("path = \"{}\"", packs.display()),
    );
    std::fs::write(&config, text).unwrap();
    let fs = FaultFs::over(&site);
    let data = work.path().join("data");
    write_random(&data.join("base"), 1 << 20, 3);
    backup(&site, &data);

    write_random(&data.join("new"), 1 << 20, 4);
    fs.set("fsync index.redb EIO");
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site));
    fs.set("");
    assert!(
        !output.status.success(),
        "the backup ignored a failed index commit"
    );
    let line = error_line(&output);
    assert!(
        line.contains("index database") && line.contains("Input/output error"),
        "{line}"
    );
    assert_eq!(snapshots(&site).len(), 1, "a failed commit became visible");
    verify_clean(&site);
    let done = backup(&site, &data);
    let restored = work.path().join("restored");
    restore(&site, &snapshot_id(&done), &restored);
    assert_same_tree(&data, &restored);
}

#[test]
fn eio_reading_a_pack_stops_the_restore_in_one_line_and_a_rerun_finishes_it() {
    let t = FaultyTier::new();
    let snapshot = snapshot_id(&backup(&t.site, &t.data));
    let target = t.work.path().join("restored");
    t.fs.set("read .pack EIO");
    let output = run(mover()
        .args(["restore", &snapshot, "--to"])
        .arg(&target)
        .arg("--site-dir")
        .arg(&t.site));
    t.fs.set("");
    assert!(
        !output.status.success(),
        "the restore ignored unreadable packs"
    );
    let line = error_line(&output);
    assert!(
        line.contains(".pack") && line.contains("Input/output error"),
        "{line}"
    );
    // The device error is not damage: with the disk back, the same restore finishes.
    restore(&t.site, &snapshot, &target);
    assert_same_tree(&t.data, &target);
    verify_clean(&t.site);
}
