//! A store that lost or damaged something says so and mends: a lost index is never read as an
//! empty site (`mover repair-index` rebuilds it), and a damaged chunk is reported for every
//! snapshot it breaks and healed by the next backup that has its bytes.

mod common;

use common::*;

#[test]
fn a_lost_index_is_refused_and_rebuilt_from_packs_and_manifests() {
    let work = workdir();
    let site = init_site(work.path(), "lost");
    let source = work.path().join("source");
    for i in 0..6 {
        write_random(
            &source.join(format!("dir{}/f{i}", i % 2)),
            300_000 + i * 1000,
            i as u64,
        );
    }
    let first = snapshot_id(&backup(&site, &source));
    write_random(&source.join("later/new.bin"), 2 << 20, 99);
    let second = snapshot_id(&backup(&site, &source));

    // A manifest whose chunks no pack holds (a snapshot that would not restore), and a pack
    // a killed writer never sealed: neither may come back as if it were whole.
    let orphan = work.path().join("orphan");
    write_random(&orphan.join("only-here.bin"), 400_000, 7);
    let orphan_id = snapshot_id(&backup(&site, &orphan));
    let orphan_pack = newest_pack(&site);
    std::fs::remove_file(&orphan_pack).unwrap();
    let unsealed = orphan_pack.with_file_name("ff00000000000001.pack");
    std::fs::write(&unsealed, b"MVPACK\0\0 not sealed").unwrap();

    std::fs::remove_file(site.join("index.redb")).unwrap();
    for args in [
        vec!["snapshots"],
        vec!["verify"],
        vec!["backup", "/nonexistent"],
    ] {
        let output = run(mover().args(&args).arg("--site-dir").arg(&site));
        assert_eq!(output.status.code(), Some(1), "{args:?} must fail");
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{message}");
        assert!(message.contains("index.redb is missing"), "{message}");
        assert!(message.contains("mover repair-index"), "{message}");
    }
    assert!(
        !site.join("index.redb").exists(),
        "a refused open must not create an empty index"
    );

    let report = run_json(mover().arg("repair-index").arg("--site-dir").arg(&site));
    assert_eq!(report["snapshots"], 2, "{report}");
    assert_eq!(report["snapshots_left_out"], 1, "{report}");
    assert_eq!(report["packs_skipped"], 1, "{report}");
    let skipped = report["skipped"].to_string();
    assert!(skipped.contains(&orphan_id), "{report}");
    assert!(skipped.contains("ff00000000000001.pack"), "{report}");

    let listed = run_json(mover().arg("snapshots").arg("--site-dir").arg(&site));
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&first.as_str()) && ids.contains(&second.as_str()));
    assert!(!ids.contains(&orphan_id.as_str()));
    let verify = run(mover().arg("verify").arg("--site-dir").arg(&site));
    assert!(verify.status.success(), "{}", stderr(&verify));
    let target = work.path().join("restored");
    restore(&site, &second, &target);
    assert_same_tree(&source, &target);

    // Run again: the index exists now, so it is left alone.
    let again = run(mover().arg("repair-index").arg("--site-dir").arg(&site));
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("only rebuilds a missing index"));

    // And the rebuilt index takes new backups that deduplicate against the old packs.
    let third = backup(&site, &source);
    assert_eq!(third["bytes_new"], 0, "{third}");
}

fn newest_pack(site: &std::path::Path) -> std::path::PathBuf {
    all_packs(site)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a pack")
}

fn all_packs(site: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut packs = Vec::new();
    let mut stack = vec![site.join("tiers/hot/packs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                packs.push(entry.path());
            }
        }
    }
    packs
}

#[test]
fn a_damaged_chunk_is_reported_everywhere_and_healed_by_the_next_backup() {
    let work = workdir();
    let site = init_site(work.path(), "heal");
    let source = work.path().join("source");
    write_random(&source.join("model.bin"), 3_000_000, 1);
    write_random(&source.join("other.bin"), 500_000, 2);
    let first = snapshot_id(&backup(&site, &source));
    // Another snapshot of the same bytes under another name.
    let copy = work.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(source.join("model.bin"), copy.join("same-model.bin")).unwrap();
    let second = snapshot_id(&backup(&site, &copy));

    // One bit flips in the middle of the only pack holding model.bin's first chunk.
    let packs = all_packs(&site);
    let pack = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(pack).unwrap();
    bytes[100_000] ^= 0x40;
    std::fs::write(pack, bytes).unwrap();

    let output = run(mover().args(["verify", "--json", "--site-dir"]).arg(&site));
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let broken: Vec<&str> = report["damage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["snapshot"].as_str().unwrap())
        .collect();
    assert!(
        broken.contains(&first.as_str()) && broken.contains(&second.as_str()),
        "verify must name every snapshot the damaged chunk breaks: {report}"
    );
    assert_eq!(report["snapshots_damaged"], 2, "{report}");
    assert_eq!(report["files_damaged"], 2, "{report}");
    assert_eq!(report["chunks_damaged"], 1, "{report}");

    // The next backup of the intact (unchanged) source must not deduplicate against the bad
    // record: it reads the file again and its good chunk replaces the damaged one.
    let third = backup(&site, &source);
    assert!(
        third["bytes_new"].as_u64().unwrap() > 0,
        "the damaged chunk was stored again: {third}"
    );
    let output = run(mover().args(["verify", "--site-dir"]).arg(&site));
    assert!(
        output.status.success(),
        "every snapshot, old ones included, reads back once the chunk is healed: {}",
        stderr(&output)
    );
    let target = work.path().join("restored");
    restore(&site, &first, &target);
    assert_same_tree(&source, &target);

    // The index is lost afterwards: the rebuilt one must settle on the good copy of the
    // chunk, whichever pack is listed first.
    std::fs::remove_file(site.join("index.redb")).unwrap();
    let report = run_json(mover().arg("repair-index").arg("--site-dir").arg(&site));
    assert_eq!(report["snapshots"], 3, "{report}");
    let output = run(mover().args(["verify", "--site-dir"]).arg(&site));
    assert!(
        output.status.success(),
        "the rebuilt index points at the healed copy: {report} {}",
        stderr(&output)
    );
}

#[test]
fn a_truncated_pack_is_named_with_the_record_it_cuts() {
    let work = workdir();
    let site = init_site(work.path(), "cut");
    let source = work.path().join("source");
    write_random(&source.join("big.bin"), 3_000_000, 5);
    let snapshot = snapshot_id(&backup(&site, &source));
    let pack = all_packs(&site)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&pack).unwrap();
    file.set_len(1_000_000).unwrap();
    let output = run(mover().args(["verify", &snapshot, "--site-dir"]).arg(&site));
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(message.contains(name), "names the pack: {message}");
    assert!(
        message.contains("runs past the end of the pack") && message.contains("at offset"),
        "says what is cut: {message}"
    );
    assert!(
        !message.contains("failed to fill whole buffer"),
        "{message}"
    );
}
