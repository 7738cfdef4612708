//! `mover bench`: one JSON shape for every kind, each figure beside its limit, scratch files
//! and sites removed afterwards, bad sizes refused in one line. Rates are not checked (they
//! depend on the machine); that they were measured over the bytes asked for is.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn bench(args: &[&str], scratch: &Path) -> Value {
    let report = run_json(mover().arg("bench").args(args).current_dir(scratch));
    assert!(
        report["machine"]["cores"].as_u64().unwrap() >= 1,
        "{report}"
    );
    for row in report["rows"].as_array().unwrap() {
        for key in [
            "name",
            "input",
            "gb_per_s",
            "bytes",
            "seconds",
            "limit",
            "limit_gb_per_s",
        ] {
            assert!(row.get(key).is_some(), "row without {key}: {row}");
        }
    }
    let left: Vec<_> = std::fs::read_dir(scratch)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "bench left {left:?} in {}",
        scratch.display()
    );
    report
}

fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"].as_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("no {name} row: {report}"))
}

#[test]
fn stages_disk_and_backup_report_one_shape_and_clean_up() {
    let work = workdir();
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();

    let stages = bench(&["stages", "--size-mib", "2"], &scratch);
    assert_eq!(stages["bench"], "stages");
    let blake3 = row(&stages, "blake3");
    assert_eq!(blake3["bytes"], 2 << 20, "{blake3}");
    assert_eq!(blake3["limit"], "memcpy, one core", "{blake3}");
    assert_eq!(stages["rows"].as_array().unwrap().len(), 3 * 7, "{stages}");

    let disk = bench(
        &[
            "disk",
            "--dir",
            scratch.to_str().unwrap(),
            "--size-mib",
            "8",
        ],
        &scratch,
    );
    assert_eq!(disk["bench"], "disk");
    let engine = row(&disk, "io_uring direct read qd3");
    assert_eq!(engine["bytes"], 8 << 20, "{engine}");
    assert!(
        engine["limit"].as_str().unwrap().contains("qd32"),
        "{engine}"
    );

    let data = work.path().join("data");
    write_random(&data.join("a"), 3 << 20, 1);
    write_random(&data.join("d/b"), 1 << 20, 2);
    let backup = bench(
        &["backup", data.to_str().unwrap(), "--scratch-dir", "."],
        &scratch,
    );
    assert_eq!(backup["bench"], "backup");
    let first = &backup["rows"][0];
    assert_eq!(first["name"], "backup", "{backup}");
    assert_eq!(first["bytes"], 4 << 20, "{first}");
    assert_eq!(first["ops"], 2, "{first}");
    assert!(first["limit_gb_per_s"].as_f64().unwrap() > 0.0, "{first}");
}

#[test]
fn bad_sizes_are_refused_in_one_line() {
    let work = workdir();
    for args in [
        vec!["stages", "--size-mib", "0"],
        vec!["stages", "--size-mib", "100000"],
        vec!["disk", "--size-mib", "0"],
    ] {
        let output = run(mover().arg("bench").args(&args).current_dir(work.path()));
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = stderr(&output);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("--size-mib") && err.contains("expected"),
            "{err}"
        );
    }
    let output = run(mover()
        .args(["bench", "backup"])
        .arg(work.path().join("missing")));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("missing"), "{}", stderr(&output));
}
