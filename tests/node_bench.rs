//! `mover bench`: one JSON shape for every kind, each figure beside its limit, scratch files
//! and sites removed afterwards, bad sizes refused in one line. Rates are not checked (they
//! depend on the machine); that they were measured over the bytes asked for is.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn bench(args: &[&str], scratch: &Path) -> Value {
    let mut command = mover();
    command.arg("bench").args(args);
    bench_with(command, scratch)
}

/// Runs `command` (a `mover bench`) in `scratch` and checks the report's shape and that it
/// left nothing there.
fn bench_with(mut command: std::process::Command, scratch: &Path) -> Value {
    let report = run_json(command.current_dir(scratch));
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
        vec!["link", "b", "--size-mib", "0"],
    ] {
        let mut command = mover();
        if args[0] == "link" {
            // A site directory (empty): `link` checks its sizes before reading the site.
            command.arg("--site-dir").arg(work.path());
        }
        let output = run(command.arg("bench").args(&args).current_dir(work.path()));
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let err = stderr(&output);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("--size-mib") && err.contains("expected"),
            "{err}"
        );
    }
    for seconds in ["0", "100"] {
        let output = run(mover()
            .arg("--site-dir")
            .arg(work.path())
            .args(["bench", "link", "b", "--seconds", seconds])
            .current_dir(work.path()));
        assert_eq!(output.status.code(), Some(1), "--seconds {seconds}");
        let err = stderr(&output);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("--seconds") && err.contains("expected"),
            "{err}"
        );
    }
    let output = run(mover()
        .args(["bench", "backup"])
        .arg(work.path().join("missing")));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("missing"), "{}", stderr(&output));
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn fingerprint(site: &Path) -> String {
    let value = run_json(mover().arg("identity").arg("--site-dir").arg(site));
    value["fingerprint"].as_str().unwrap().to_string()
}

fn peer_add(site: &Path, name: &str, address: &str, fingerprint: &str) {
    let output = run(mover()
        .args(["peer", "add", name, address, fingerprint, "--site-dir"])
        .arg(site));
    assert!(output.status.success(), "{}", stderr(&output));
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                files_under(&e.path())
            } else {
                vec![e.path()]
            }
        })
        .collect()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn link_measures_a_peer_against_its_cap_or_raw_quic_and_stores_nothing_there() {
    let work = workdir();
    let scratch = work.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let port = free_udp_port();
    let address = format!("127.0.0.1:{port}");
    let a = init_site(work.path(), "a");
    let b = work.path().join("site-b");
    run_json(
        mover()
            .args(["init", "--site", "b", "--listen", &address, "--dir"])
            .arg(&b)
            .arg("--socket")
            .arg(b.join("api.sock")),
    );
    // c names b as its peer, but b does not know c.
    let c = init_site(work.path(), "c");
    peer_add(&a, "b", &address, &fingerprint(&b));
    peer_add(&c, "b", &address, &fingerprint(&b));
    peer_add(&b, "a", "127.0.0.1:9", &fingerprint(&a));
    let (daemon, line) = spawn_daemon(&b.join("mover.toml"), &work.path().join("daemon-b.log"));
    let _daemon = KillOnDrop(daemon);
    assert!(line.contains(&address), "b's daemon said {line:?}");
    let link = |site: &Path, args: &[&str]| {
        let mut command = mover();
        command.arg("--site-dir").arg(site).args(["bench", "link"]);
        command.args(args);
        command
    };

    // Uncapped: held against raw QUIC on this node, over the same bytes.
    let report = bench_with(link(&a, &["b", "--size-mib", "8"]), &scratch);
    assert_eq!(report["bench"], "link", "{report}");
    let measured = row(&report, "link to b");
    assert_eq!(measured["bytes"], 8 << 20, "{measured}");
    assert_eq!(measured["ops"], 2, "two 4 MiB frames: {measured}");
    assert_eq!(
        measured["limit"], "raw QUIC on this node's loopback",
        "{measured}"
    );
    let raw = row(&report, "raw QUIC");
    assert_eq!(raw["bytes"], 8 << 20, "{raw}");
    assert_eq!(measured["limit_gb_per_s"], raw["gb_per_s"], "{report}");
    assert!(raw["gb_per_s"].as_f64().unwrap() > 0.0, "{raw}");

    // Capped: held against the cap; the same bucket paces the bench as the jobs.
    let config = a.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let last = text.rfind("\n[").map(|at| &text[at + 1..]);
    assert!(last.is_some_and(|l| l.starts_with("[peers.b]")), "{text}");
    std::fs::write(&config, format!("{text}bandwidth = \"16MB/s\"\n")).unwrap();
    let report = bench_with(link(&a, &["b", "--size-mib", "6"]), &scratch);
    let measured = row(&report, "link to b");
    assert_eq!(measured["bytes"], 6 << 20, "{measured}");
    assert_eq!(measured["limit"], "bandwidth cap", "{measured}");
    assert_eq!(measured["limit_gb_per_s"], 0.016, "{measured}");
    assert_eq!(report["rows"].as_array().unwrap().len(), 1, "{report}");

    // A site b does not trust is refused by b's TLS before any bench byte.
    let output = run(&mut link(&c, &["b", "--size-mib", "1"]));
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("site b does not trust this site"), "{err}");

    // b stored nothing: no pack, no snapshot.
    let packs = files_under(&b.join("tiers/hot"));
    assert!(packs.is_empty(), "the bench left {packs:?} at b");
}
