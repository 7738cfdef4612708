//! A site made by an earlier mover opens, lists, verifies and restores exactly with this one,
//! and takes new backups. `fixtures/site-v1.tar.gz` is a site written by mover at ce0ef89
//! (index, manifests and packs as they were before the index of copies): two snapshots of a
//! small tree (a random file, a text file, a 0640 file, a symlink, an empty directory), with
//! the trees they were taken of (`expected/first`, `expected/second`) and what `mover
//! snapshots --json` printed then (`expected/snapshots.json`). Its identity key is a test key.
//! A change to an on-disk format must keep this test passing by upgrading in place.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn unpack(into: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/site-v1.tar.gz");
    let output = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(into)
        .output()
        .unwrap();
    assert!(output.status.success(), "tar: {}", stderr(&output));
}

#[test]
fn a_site_made_by_the_previous_version_opens_verifies_and_restores() {
    let work = workdir();
    unpack(work.path());
    let site = work.path().join("site");
    let expected = work.path().join("expected");
    let then: Value =
        serde_json::from_slice(&std::fs::read(expected.join("snapshots.json")).unwrap()).unwrap();
    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };

    let now = run_json(mover().args(["snapshots", "--site-dir"]).arg(&site));
    assert_eq!(ids(&now), ids(&then), "{now}");
    for (field, index) in [("files", 0), ("bytes", 1), ("parent", 1), ("time", 0)] {
        assert_eq!(now[index][field], then[index][field], "{field}: {now}");
    }

    let verify = run(mover().args(["verify", "--site-dir"]).arg(&site));
    assert!(verify.status.success(), "{}", stderr(&verify));

    for (id, tree) in ids(&then).iter().zip(["first", "second"]) {
        let target = work.path().join(format!("restored-{tree}"));
        restore(&site, id, &target);
        assert_same_tree(&expected.join(tree), &target);
    }

    // New work lands beside the old: a backup of the second tree finds every chunk present.
    let again = backup(&site, &expected.join("second"));
    assert_eq!(again["chunks_new"], 0, "{again}");
    let verify = run(mover().args(["verify", "--site-dir"]).arg(&site));
    assert!(verify.status.success(), "{}", stderr(&verify));
}
