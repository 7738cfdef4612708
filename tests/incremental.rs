//! A second backup reuses unchanged files without reading them, and a changed file costs only
//! its changed chunks.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

const MIB: usize = 1024 * 1024;

#[test]
fn unchanged_files_are_not_read_and_an_edit_costs_only_its_chunks() {
    let work = workdir();
    let data = work.path().join("data");
    for i in 0..4 {
        write_random(&data.join(format!("ckpt/step-{i}.f32")), 16 * MIB, 10 + i);
    }
    for i in 0..50 {
        write_random(
            &data.join(format!("small/{i}.json")),
            1000 + i as usize,
            100 + i,
        );
    }
    let site = init_site(work.path(), "a");
    let first = backup(&site, &data);
    let total = first["bytes_total"].as_u64().unwrap();
    assert_eq!(first["bytes_read"].as_u64().unwrap(), total);
    // Each byte read is copied exactly once in user space (read buffer to chunk window).
    assert_eq!(first["memcpy_per_byte"].as_f64().unwrap(), 1.0, "{first}");

    let second = backup(&site, &data);
    assert_eq!(second["bytes_read"], 0, "unchanged tree was read: {second}");
    assert_eq!(second["chunks_new"], 0);
    assert_eq!(second["files_reused"], first["files"]);
    assert_ne!(
        second["snapshot"], first["snapshot"],
        "each backup is its own snapshot"
    );

    // Change 2% of one checkpoint in place.
    let edited = data.join("ckpt/step-2.f32");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&edited)
        .unwrap();
    let edit = random_bytes(16 * MIB / 50, 77);
    file.write_all_at(&edit, 5 * MIB as u64).unwrap();
    drop(file);

    let third = backup(&site, &data);
    assert_eq!(
        third["bytes_read"].as_u64().unwrap(),
        16 * MIB as u64,
        "only the edited file is read: {third}"
    );
    let new = third["bytes_new"].as_u64().unwrap();
    // A 328 KiB edit touches one or two chunks, and FastCDC may need a chunk or two after it
    // to fall back onto the old boundaries (cut search starts min-size past each cut).
    assert!(
        new <= 8 * MIB as u64,
        "edit of {} bytes stored {new} new bytes",
        edit.len()
    );
    assert!(third["chunks_new"].as_u64().unwrap() <= 4, "{third}");
    assert!(third["bytes_sent"].as_u64().unwrap() < total / 10);

    let restored = work.path().join("restored");
    restore(&site, &snapshot_id(&third), &restored);
    assert_same_tree(&data, &restored);
    // The older snapshot still restores the old content.
    let old = work.path().join("old");
    restore(&site, &snapshot_id(&first), &old);
    assert_ne!(
        std::fs::read(old.join("ckpt/step-2.f32")).unwrap(),
        std::fs::read(&edited).unwrap()
    );
}

#[test]
fn identical_files_are_stored_once() {
    let work = workdir();
    let data = work.path().join("data");
    let bytes = random_bytes(6 * MIB, 5);
    for name in ["a.bin", "b.bin", "c/d.bin"] {
        std::fs::create_dir_all(data.join(name).parent().unwrap()).unwrap();
        std::fs::write(data.join(name), &bytes).unwrap();
    }
    let site = init_site(work.path(), "a");
    let job = backup(&site, &data);
    assert_eq!(job["bytes_total"].as_u64().unwrap(), 18 * MIB as u64);
    assert_eq!(job["bytes_new"].as_u64().unwrap(), 6 * MIB as u64, "{job}");
    let restored = work.path().join("restored");
    restore(&site, "latest", &restored);
    assert_same_tree(&data, &restored);
}

#[test]
fn a_touched_file_is_reread_but_stores_nothing_new() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("x.bin"), 3 * MIB, 1);
    let site = init_site(work.path(), "a");
    backup(&site, &data);
    // Same content, new mtime: must be read (metadata changed) but dedups to nothing.
    let content = std::fs::read(data.join("x.bin")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(data.join("x.bin"), content).unwrap();
    let job = backup(&site, &data);
    assert_eq!(job["bytes_read"].as_u64().unwrap(), 3 * MIB as u64);
    assert_eq!(job["bytes_new"], 0);
}
