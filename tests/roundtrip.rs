//! Backup then restore is byte-exact for every kind of entry a data set can hold.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;

fn set_mtime(path: &Path, seconds: i64, nanos: i64) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [
        libc::timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        },
        libc::timespec {
            tv_sec: seconds,
            tv_nsec: nanos,
        },
    ];
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// Every entry type the issue lists: regular, empty, empty dirs, symlinks (also dangling),
/// hardlinks, sparse files, non-UTF-8 and 255-byte names, deep paths, modes and mtimes.
fn build_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    write_random(&root.join("data/weights.bin"), 9 * 1024 * 1024 + 123, 1);
    write_random(&root.join("data/small.bin"), 3000, 2);
    std::fs::write(root.join("data/empty"), b"").unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("data/small.bin", root.join("link-to-small")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::fs::hard_link(root.join("data/small.bin"), root.join("hardlink-to-small")).unwrap();

    let sparse = std::fs::File::create(root.join("sparse.img")).unwrap();
    sparse.set_len(200 * 1024 * 1024).unwrap();
    use std::os::unix::fs::FileExt;
    sparse
        .write_all_at(&random_bytes(8192, 3), 70 * 1024 * 1024)
        .unwrap();
    sparse.write_all_at(b"tail", 200 * 1024 * 1024 - 4).unwrap();
    drop(sparse);

    let latin1 = root.join(OsStr::from_bytes(b"caf\xe9-\xff.txt"));
    std::fs::write(&latin1, b"not utf-8 name").unwrap();
    let long_name = "n".repeat(255);
    std::fs::write(root.join(&long_name), b"long name").unwrap();
    let mut deep = root.join("deep");
    for i in 0..40 {
        deep = deep.join(format!("level-{i:02}-{}", "x".repeat(40)));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), b"deep file").unwrap();

    std::fs::set_permissions(
        root.join("data/small.bin"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::write(root.join("script.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("script.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir(root.join("locked")).unwrap();
    std::fs::write(root.join("locked/inside"), b"x").unwrap();
    std::fs::set_permissions(root.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();

    set_mtime(&root.join("data/weights.bin"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("dangling"), 1_500_000_000, 5);
    set_mtime(&root.join("empty-dir"), 1_400_000_000, 999_999_999);
}

#[test]
fn every_entry_kind_round_trips() {
    let work = workdir();
    let data = work.path().join("data");
    build_tree(&data);
    let site = init_site(work.path(), "a");

    let job = backup(&site, &data);
    for field in [
        "id",
        "state",
        "bytes_total",
        "bytes_done",
        "bytes_sent",
        "snapshot",
    ] {
        assert!(job.get(field).is_some(), "job lacks {field}: {job}");
    }
    assert_eq!(job["warnings"].as_array().unwrap().len(), 0, "{job}");
    assert_eq!(job["bytes_done"], job["bytes_total"]);
    let snapshot = snapshot_id(&job);

    let restored = work.path().join("restored");
    let restore_job = restore(&site, &snapshot, &restored);
    assert_same_tree(&data, &restored);
    // Throughput is over what was written: the 200 MiB sparse file is mostly a hole.
    let written = restore_job["bytes_written"].as_u64().unwrap();
    assert!(
        restore_job["bytes_total"].as_u64().unwrap() > 200 << 20 && written < 20 << 20,
        "{restore_job}"
    );

    // Holes stay holes: 200 MiB logical, a few KiB allocated.
    let meta = std::fs::metadata(restored.join("sparse.img")).unwrap();
    assert_eq!(meta.len(), 200 * 1024 * 1024);
    assert!(
        meta.blocks() * 512 < 1024 * 1024,
        "sparse file restored with {} blocks",
        meta.blocks()
    );
    // Hardlinks come back as hardlinks.
    let a = std::fs::metadata(restored.join("data/small.bin")).unwrap();
    let b = std::fs::metadata(restored.join("hardlink-to-small")).unwrap();
    assert_eq!(a.ino(), b.ino());

    let listed = run_json(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], snapshot.as_str());

    let verified = run_json(
        mover()
            .args(["verify", &snapshot[..8]])
            .arg("--site-dir")
            .arg(&site),
    );
    assert_eq!(verified["damage"].as_array().unwrap().len(), 0);
    assert!(verified["chunks_checked"].as_u64().unwrap() > 0);

    // Let the temp dir clean up the read-only directories.
    for dir in [&data, &restored] {
        std::fs::set_permissions(dir.join("locked"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
}

#[test]
fn subpath_restore_takes_only_that_subtree() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("a/one.bin"), 100_000, 1);
    write_random(&data.join("a/b/two.bin"), 200_000, 2);
    write_random(&data.join("c/three.bin"), 300_000, 3);
    std::fs::hard_link(data.join("c/three.bin"), data.join("a/linked-three.bin")).unwrap();
    let site = init_site(work.path(), "a");
    let snapshot = snapshot_id(&backup(&site, &data));

    let restored = work.path().join("restored");
    restore(&site, &format!("{snapshot}:a"), &restored);
    assert!(restored.join("a/one.bin").is_file());
    assert!(restored.join("a/b/two.bin").is_file());
    assert!(!restored.join("c").exists());
    // The inode's first path (c/three.bin) was not restored: the link gets the content.
    assert_eq!(
        std::fs::read(restored.join("a/linked-three.bin")).unwrap(),
        std::fs::read(data.join("c/three.bin")).unwrap()
    );

    let missing = run(mover()
        .args(["restore", &format!("{snapshot}:nope"), "--to"])
        .arg(work.path().join("r2"))
        .arg("--site-dir")
        .arg(&site));
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("nope"), "{}", stderr(&missing));
}

#[test]
fn a_single_file_can_be_backed_up() {
    let work = workdir();
    let file = work.path().join("model.bin");
    write_random(&file, 5_000_000, 9);
    let site = init_site(work.path(), "a");
    let snapshot = snapshot_id(&backup(&site, &file));
    let restored = work.path().join("restored");
    restore(&site, "latest", &restored);
    assert_eq!(
        std::fs::read(restored.join("model.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    assert_eq!(snapshot.len(), 64);
}

#[test]
fn quickstart_runs_and_reports() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("x.bin"), 2_000_000, 4);
    let report = run_json(
        mover()
            .arg("quickstart")
            .arg(&data)
            .arg("--dir")
            .arg(work.path().join("qs")),
    );
    assert_eq!(report["identical"], true);
    assert_eq!(report["second_backup_bytes_read"], 0);
    assert!(report["backup_gb_per_s"].as_f64().unwrap() > 0.0);
}

/// Whether `dir` refuses O_DIRECT: the check that the fault below is in force.
fn refuses_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(".probe");
    std::fs::write(&probe, b"").unwrap();
    let refused = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_err();
    std::fs::remove_file(&probe).unwrap();
    refused
}

/// `dir` served through mover-faultfs refusing O_DIRECT with EINVAL, as tmpfs did before
/// Linux 6.6 and some FUSE and network file systems still do.
fn refusing_direct_io(dir: &Path) -> FaultFs {
    assert!(
        is_root(),
        "this test mounts mover-faultfs (FUSE) and needs root; CI runs as root"
    );
    let fs = FaultFs::over(dir);
    fs.set("direct * EINVAL\n");
    assert!(refuses_direct_io(dir), "{} accepts O_DIRECT", dir.display());
    fs
}

#[test]
fn a_target_refusing_direct_io_falls_back_to_buffered_writes() {
    // A large file is then restored with ordinary writes, exactly.
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("large.bin"), 9_000_001, 12);
    let site = init_site(work.path(), "a");
    backup(&site, &data);
    let target = work.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let _fs = refusing_direct_io(&target);
    let restored = target.join("restored");
    let job = restore(&site, "latest", &restored);
    assert_eq!(job["direct_io"], false, "{job}");
    assert_same_tree(&data, &restored);
}

#[test]
fn a_source_refusing_direct_io_falls_back_to_buffered_reads() {
    // The backup must still work, and say it read buffered.
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("large.bin"), 9_000_001, 11);
    write_random(&data.join("small.bin"), 3_000_000, 13);
    let fs = refusing_direct_io(&data);
    let site = init_site(work.path(), "a");
    let job = backup(&site, &data);
    assert_eq!(job["direct_io"], false, "{job}");
    fs.set("");
    let restored = work.path().join("restored");
    restore(&site, "latest", &restored);
    assert_same_tree(&data, &restored);
}

/// Backs up two files several chunk windows long with `engine` settings (and the backup's
/// RLIMIT_MEMLOCK lowered to `memlock` bytes) and restores them.
fn window_round_trip(engine: &str, memlock: Option<u64>) -> serde_json::Value {
    let work = workdir();
    let site = init_site(work.path(), "a");
    set_engine(&site, engine);
    let data = work.path().join("data");
    write_random(&data.join("big.bin"), 40_000_000, 21);
    write_random(&data.join("tail.bin"), 5_000_123, 22);
    let mut command = mover();
    command
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site);
    if let Some(limit) = memlock {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; lowering a limit needs no privilege.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                match libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlimit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                }
            });
        }
    }
    let job = run_json(&mut command);
    assert_eq!(job["state"], "done", "{job}");
    let restored = work.path().join("restored");
    let restore_job = restore(&site, "latest", &restored);
    // Files of 8 MiB and more are restored with O_DIRECT (the target is on the same disk).
    assert_eq!(restore_job["direct_io"], job["direct_io"], "{restore_job}");
    assert_same_tree(&data, &restored);
    job
}

#[test]
fn reads_into_a_registered_window_round_trip() {
    // One worker's window (4 MiB chunk + 3 x 1 MiB reads) registered as fixed buffers; the
    // files are several windows long, so reads wrap around the ring many times.
    let window = 7 * 1024 * 1024;
    assert!(
        mover::buffers::memlock_limit_bytes().is_none_or(|limit| limit >= window),
        "this test needs RLIMIT_MEMLOCK of at least one chunk window (7 MiB; CI has 8 MiB)"
    );
    let job = window_round_trip(&format!("workers = 1\nio_memory_bytes = {window}"), None);
    assert_eq!(job["registered_reads"], true, "{job}");
    assert_eq!(job["direct_io"], true, "{job}");
    assert_eq!(job["memcpy_per_byte"], 1.0, "{job}");
}

#[test]
fn reads_into_an_unregistered_window_round_trip() {
    // One worker's window (7 MiB) exceeds the default budget (3/4 of RLIMIT_MEMLOCK) under
    // a 4 MiB limit, so it reads into an unregistered window.
    let job = window_round_trip("workers = 1", Some(4 << 20));
    assert_eq!(job["registered_reads"], false, "{job}");
}
