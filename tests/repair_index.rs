//! A lost index is never read as an empty site, and `mover repair-index` rebuilds it from the
//! sealed packs and manifests.

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
    let mut packs = Vec::new();
    let mut stack = vec![site.join("tiers/hot/packs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                let modified = entry.metadata().unwrap().modified().unwrap();
                packs.push((modified, entry.path()));
            }
        }
    }
    packs.sort();
    packs.pop().expect("a pack").1
}
