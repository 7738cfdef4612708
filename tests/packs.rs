//! Pack space: a killed or failed backup leaves no preallocated pack behind once the site is
//! opened again, and reclaiming never takes a pack that a live writer (here: this test
//! process) is writing, nor a sealed one. Small incremental backups do not leave a small
//! pack each: the tier's small packs are merged once there are enough of them.

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mover::format::pack::{decode_trailer, RecordHeader, TRAILER_BYTES};
use mover::format::{ChunkId, Codec};
use mover::store::pack_writer::PackWriter;
use mover::store::{Backend, LocalDir};

const MIB: usize = 1024 * 1024;

/// Pack files of the site's `hot` tier, each with whether it is sealed (ends with a trailer
/// that fits it, as a seal leaves it).
fn packs(site: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let Ok(folders) = std::fs::read_dir(site.join("tiers/hot/packs")) else {
        return out;
    };
    for folder in folders {
        for entry in std::fs::read_dir(folder.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            let file = std::fs::File::open(&path).unwrap();
            let len = file.metadata().unwrap().len();
            let take = (TRAILER_BYTES as u64).min(len);
            let mut tail = vec![0u8; take as usize];
            file.read_exact_at(&mut tail, len - take).unwrap();
            let sealed = take == TRAILER_BYTES as u64 && decode_trailer(&tail, len).is_ok();
            out.push((path, sealed));
        }
    }
    out.sort();
    out
}

fn unsealed(site: &Path) -> Vec<PathBuf> {
    packs(site)
        .into_iter()
        .filter(|(_, sealed)| !sealed)
        .map(|(path, _)| path)
        .collect()
}

fn verify_clean(site: &Path) {
    let report = run_json(mover().arg("verify").arg("--site-dir").arg(site));
    assert_eq!(report["damage"].as_array().unwrap().len(), 0, "{report}");
}

#[test]
fn a_backup_killed_mid_pack_leaves_no_unsealed_pack_after_the_next_open() {
    let work = workdir();
    let data = work.path().join("data");
    for i in 0..4 {
        write_random(&data.join(format!("f{i}.bin")), 32 * MIB, i as u64);
    }
    let site = init_site(work.path(), "a");
    // The default pack target (128 MiB) is more than the data set: no pack is sealed before
    // the end of the job, so a kill once the first pack exists lands inside a pack.
    let mut child = mover()
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while packs(&site).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before it opened a pack"
        );
        assert!(Instant::now() < deadline, "no pack appeared within 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the backup finished before the kill ({status}); the test needs a slower disk or more data"
    );
    assert!(
        !unsealed(&site).is_empty(),
        "the kill left no unsealed pack: {:?}",
        packs(&site)
    );

    // Any command opens the site, which reclaims.
    run_json(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert_eq!(unsealed(&site), Vec::<PathBuf>::new());

    backup(&site, &data);
    assert_eq!(unsealed(&site), Vec::<PathBuf>::new());
    verify_clean(&site);
}

#[test]
fn a_backup_that_fails_mid_pack_leaves_no_pack() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("big.bin"), 48 * MIB, 1);
    let site = init_site(work.path(), "a");
    set_engine(&site, "workers = 1");
    // Files may not grow past 16 MiB in the backup's process: its pack write fails there
    // (EFBIG, with SIGXFSZ ignored), which is an I/O error like a full disk.
    let mut command = mover();
    command
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site);
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 16 << 20,
                rlim_max: 16 << 20,
            };
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                || libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = run(&mut command);
    assert!(
        !output.status.success(),
        "the backup was expected to fail at the file size limit"
    );
    assert!(
        stderr(&output).contains("File too large"),
        "{}",
        stderr(&output)
    );
    // Checked before anything opens the site again: the failing writer removed its pack.
    assert_eq!(packs(&site), Vec::<(PathBuf, bool)>::new());

    backup(&site, &data);
    verify_clean(&site);
}

#[test]
fn a_pack_being_written_by_another_process_survives_a_reclaim_and_a_sealed_one_too() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("small.bin"), MIB, 2);
    let site = init_site(work.path(), "a");

    // This test process is the other writer: its pack is open, unsealed and preallocated,
    // while `mover backup` opens the site and starts a job (both reclaim).
    let backend: Arc<dyn Backend> = Arc::new(LocalDir::new(site.join("tiers/hot")));
    let mut pack = PackWriter::create(&backend, "hot", 64 << 20).unwrap();
    let payload = random_bytes(100_000, 3);
    let id = ChunkId::of(&payload);
    let header = RecordHeader::new(id, Codec::Raw, payload.len(), &payload);
    pack.append(&header, &payload).unwrap();
    let ours = unsealed(&site);
    assert_eq!(ours.len(), 1);

    backup(&site, &data);
    let after = unsealed(&site);
    assert_eq!(after, ours, "the live writer's pack was reclaimed");

    let sealed = pack.seal().unwrap();
    run_json(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert!(
        packs(&site)
            .iter()
            .any(|(path, is_sealed)| *is_sealed && path == &ours[0]),
        "the sealed, uncommitted pack {:016x} was removed: {:?}",
        sealed.pack_id,
        packs(&site)
    );
    verify_clean(&site);
}

#[test]
fn two_tiers_in_one_directory_are_refused() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();

    // As written in the config.
    let shared = format!("{text}\n[tiers.warm]\npath = \"tiers/./hot\"\n");
    std::fs::write(&config, shared).unwrap();
    let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("tiers \"hot\"")
            && message.contains("\"warm\"")
            && message.contains("a directory of its own"),
        "{message}"
    );

    // Through a link: only the site's open can tell.
    std::os::unix::fs::symlink("hot", site.join("tiers/warm")).unwrap();
    let linked = format!("{text}\n[tiers.warm]\npath = \"tiers/warm\"\n");
    std::fs::write(&config, linked).unwrap();
    let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("tiers \"hot\"")
            && message.contains("\"warm\"")
            && message.contains("a directory of its own"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message}");
}

#[test]
fn an_oversized_pack_target_is_refused_at_its_position() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    set_engine(&site, "pack_target_bytes = 9223372036854775807");
    let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("mover.toml:") && !message.contains("mover.toml:0:0"),
        "{message}"
    );
    assert!(
        message.contains("engine.pack_target_bytes") && message.contains("1073741824 (1 GiB)"),
        "{message}"
    );
}

#[test]
fn small_incremental_backups_do_not_leave_a_pack_each() {
    const BACKUPS: u64 = 40;
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("base.bin"), 2 * MIB, 1);
    let note = |i: u64| random_bytes(20_000 + i as usize, 100 + i);
    let site = init_site(work.path(), "a");
    let mut snapshots = Vec::new();
    let mut merged = 0;
    for i in 0..BACKUPS {
        std::fs::write(data.join("note.bin"), note(i)).unwrap();
        let job = backup(&site, &data);
        merged += job["packs_merged"]
            .as_u64()
            .expect("the job reports packs_merged");
        snapshots.push(snapshot_id(&job));
    }
    let files = packs(&site);
    assert!(
        files.len() <= mover::constants::SMALL_PACKS_MERGE_AT + 2,
        "{} pack files after {BACKUPS} small backups ({merged} merged away)",
        files.len()
    );
    assert!(merged > 0);
    assert!(files.iter().all(|(_, sealed)| *sealed), "{files:?}");

    // Every snapshot still restores exactly what it saw, and nothing reads as damaged.
    for (i, snapshot) in snapshots.iter().enumerate() {
        let to = work.path().join(format!("restored-{i}"));
        restore(&site, snapshot, &to);
        assert!(
            std::fs::read(to.join("base.bin")).unwrap()
                == std::fs::read(data.join("base.bin")).unwrap()
        );
        assert!(
            std::fs::read(to.join("note.bin")).unwrap() == note(i as u64),
            "snapshot {i}"
        );
    }
    verify_clean(&site);
}
