//! Bad input gets a clear one-line reason and loses nothing: special files, unreadable files,
//! crafted manifests, damaged packs, bad configs, misuse.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use mover::format::manifest::{Entry, EntryKind, Manifest, MANIFEST_VERSION};

#[test]
fn special_files_become_warnings_not_failures() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("ok.bin"), 10_000, 1);
    let fifo = std::ffi::CString::new(data.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let _listener = std::os::unix::net::UnixListener::bind(data.join("sock")).unwrap();
    let site = init_site(work.path(), "a");
    let job = backup(&site, &data);
    let warnings = job["warnings"].as_array().unwrap();
    let paths: Vec<&str> = warnings
        .iter()
        .map(|w| w["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"pipe") && paths.contains(&"sock"), "{job}");
    assert!(warnings
        .iter()
        .any(|w| w["reason"].as_str().unwrap().contains("fifo")));
    let restored = work.path().join("restored");
    restore(&site, "latest", &restored);
    assert!(restored.join("ok.bin").is_file());
    assert!(!restored.join("pipe").exists());
}

#[test]
fn unreadable_files_are_named_and_left_out() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("readable.bin"), 50_000, 1);
    write_random(&data.join("secret.bin"), 50_000, 2);
    std::fs::set_permissions(
        data.join("secret.bin"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let mut backup_cmd = mover();
    let site;
    if is_root() {
        // Root reads anything: run the backup as nobody, which cannot read the 0000 file.
        for dir in [work.path(), data.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::fs::set_permissions(
            data.join("readable.bin"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        site = work.path().join("site-nobody");
        let status = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_mover"),
                "init",
                "--site",
                "n",
                "--dir",
            ])
            .arg(&site)
            .status()
            .unwrap();
        assert!(status.success());
        backup_cmd = std::process::Command::new("setpriv");
        backup_cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_mover"),
        ]);
    } else {
        site = init_site(work.path(), "a");
    }
    let job = run_json(
        backup_cmd
            .arg("backup")
            .arg(&data)
            .arg("--site-dir")
            .arg(&site),
    );
    assert_eq!(job["state"], "done");
    let warnings = job["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{job}");
    assert_eq!(warnings[0]["path"], "secret.bin");
    assert!(
        warnings[0]["reason"]
            .as_str()
            .unwrap()
            .contains("ermission denied"),
        "{job}"
    );
    assert_eq!(job["files"], 1);
}

/// Stores a crafted manifest in the site and makes it visible, as a damaged disk or a hostile
/// peer could.
fn plant_manifest(site_dir: &Path, entries: Vec<Entry>) -> String {
    let site = mover::site::Site::open(site_dir).unwrap();
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        source: b"/crafted".to_vec(),
        hostname: "h".into(),
        site: "a".into(),
        tier: "hot".into(),
        created_unix_ns: 1,
        parent: None,
        entries,
    };
    let id = site.store_manifest(&manifest).unwrap();
    let hex = mover::format::hex(&id);
    site.index
        .put_snapshot(&mover::store::SnapshotInfo {
            id: hex.clone(),
            time: "x".into(),
            created_unix_ns: 1,
            site: "a".into(),
            tier: "hot".into(),
            source: "/crafted".into(),
            hostname: "h".into(),
            parent: None,
            job: "j".into(),
            files: 0,
            directories: 0,
            bytes: 0,
            warnings: 0,
            held_since_unix_ns: 1,
        })
        .unwrap();
    hex
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode: 0o100644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        inode: 0,
        device: 0,
    }
}

#[test]
fn restore_refuses_entries_that_escape_the_target() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let empty_file = EntryKind::File {
        size: 0,
        extents: vec![],
    };
    let cases: Vec<(Vec<Entry>, &str)> = vec![
        (vec![entry(b"../escape", empty_file.clone())], "../escape"),
        (vec![entry(b"/etc/owned", empty_file.clone())], "/etc/owned"),
        (
            vec![
                entry(
                    b"link",
                    EntryKind::Symlink {
                        target: outside.to_str().unwrap().as_bytes().to_vec(),
                    },
                ),
                entry(b"link/planted", empty_file.clone()),
            ],
            "link/planted",
        ),
        // Out of manifest order: what lies beneath a path must follow it directly, so a
        // symlink could otherwise be planted after the entries it would redirect.
        (
            vec![
                entry(b"b", empty_file.clone()),
                entry(b"a", empty_file.clone()),
            ],
            "\"a\"",
        ),
        (
            vec![
                entry(b"a", empty_file.clone()),
                entry(b"a", empty_file.clone()),
            ],
            "appears twice",
        ),
        (
            vec![entry(
                b"a",
                EntryKind::Hardlink {
                    target: b"../../etc/passwd".to_vec(),
                },
            )],
            "\"a\"",
        ),
    ];
    for (i, (entries, named)) in cases.into_iter().enumerate() {
        let snapshot = plant_manifest(&site, entries);
        let target = work.path().join(format!("target-{i}"));
        let output = run(mover()
            .args(["restore", &snapshot, "--to"])
            .arg(&target)
            .arg("--site-dir")
            .arg(&site));
        let message = stderr(&output);
        assert!(!output.status.success(), "case {i} restored");
        assert!(message.contains(named), "case {i}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "case {i} wrote outside"
        );
        let written = std::fs::read_dir(&target).map(|d| d.count()).unwrap_or(0);
        assert_eq!(written, 0, "case {i} left a partial restore");
    }
}

#[test]
fn damage_in_a_pack_is_found_and_named() {
    let work = workdir();
    let data = work.path().join("data");
    write_random(&data.join("victim.bin"), 3_000_000, 1);
    let site = init_site(work.path(), "a");
    let snapshot = snapshot_id(&backup(&site, &data));
    let pack = walk_files(&site.join("tiers/hot/packs"))
        .pop()
        .expect("a pack file");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100_000] ^= 0x40;
    std::fs::write(&pack, bytes).unwrap();

    let output = run(mover()
        .args(["verify", &snapshot])
        .arg("--site-dir")
        .arg(&site));
    assert_eq!(output.status.code(), Some(3));
    let message = stderr(&output);
    assert!(
        message.contains("victim.bin") && message.contains("chunk"),
        "{message}"
    );

    let output = run(mover()
        .args(["restore", &snapshot, "--to"])
        .arg(work.path().join("r"))
        .arg("--site-dir")
        .arg(&site));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("victim.bin"),
        "{}",
        stderr(&output)
    );
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn misuse_gets_one_line_reasons() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    let cases: Vec<(Vec<std::ffi::OsString>, &str)> = vec![
        (
            vec![
                "init".into(),
                "--site".into(),
                "b".into(),
                "--dir".into(),
                site.clone().into(),
            ],
            "already holds a mover site",
        ),
        (
            vec![
                "init".into(),
                "--site".into(),
                "Bad Name".into(),
                "--dir".into(),
                work.path().join("x").into(),
            ],
            "not valid",
        ),
        (
            vec![
                "backup".into(),
                "/nonexistent/path".into(),
                "--site-dir".into(),
                site.clone().into(),
            ],
            "/nonexistent/path",
        ),
        (vec!["backup".into(), "/tmp".into()], "--site-dir"),
        (
            vec!["snapshots".into(), "--site-dir".into(), work.path().into()],
            "not a mover site",
        ),
        (
            vec![
                "restore".into(),
                "abcd".into(),
                "--to".into(),
                work.path().join("r").into(),
                "--site-dir".into(),
                site.clone().into(),
            ],
            "no such snapshot",
        ),
        (
            vec![
                "restore".into(),
                "zz".into(),
                "--to".into(),
                work.path().join("r").into(),
                "--site-dir".into(),
                site.clone().into(),
            ],
            "hex",
        ),
    ];
    for (args, expected) in cases {
        let output = run(mover().args(&args));
        let message = stderr(&output);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(message.contains(expected), "{args:?}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "{args:?}: {message}");
    }

    // A restore never writes into a non-empty directory.
    let data = work.path().join("data");
    write_random(&data.join("f"), 10, 1);
    backup(&site, &data);
    let output = run(mover()
        .args(["restore", "latest", "--to"])
        .arg(&data)
        .arg("--site-dir")
        .arg(&site));
    assert!(stderr(&output).contains("not empty"), "{}", stderr(&output));

    // A config typo is named with file, line and column.
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[engine]", "[engine]\nworkerz = 2");
    std::fs::write(&config, text).unwrap();
    let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
    let message = stderr(&output);
    assert!(
        message.contains("mover.toml:") && message.contains("workerz"),
        "{message}"
    );
}

#[test]
fn io_memory_beyond_memlock_is_a_named_error() {
    use std::os::unix::process::CommandExt;
    // The child gets an 8 MiB memlock limit of its own (lowering a limit needs no privilege),
    // so the check runs on a machine whose limit is unlimited too.
    const LIMIT: u64 = 8 << 20;
    let limit = mover::buffers::memlock_limit_bytes().map_or(LIMIT, |l| l.min(LIMIT));
    let work = workdir();
    let site = init_site(work.path(), "a");
    set_engine(&site, &format!("io_memory_bytes = {}", limit * 4));
    let data = work.path().join("data");
    write_random(&data.join("f"), 10, 1);
    let mut command = mover();
    command
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site);
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = run(&mut command);
    assert!(
        stderr(&output).contains("RLIMIT_MEMLOCK"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_reader_that_goes_away_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let work = workdir();
    let site = init_site(work.path(), "a");
    let data = work.path().join("data");
    write_random(&data.join("f"), 10, 1);
    backup(&site, &data);
    let site_arg = ["--site-dir", site.to_str().unwrap()];
    let commands: Vec<Vec<&str>> = vec![
        vec!["snapshots"],
        vec!["snapshots", "--json"],
        vec!["identity"],
        vec!["sites"],
        vec!["verify"],
        vec!["backup", data.to_str().unwrap()],
        // The error line on a closed stderr.
        vec!["restore", "abcd", "--to", "/nonexistent/x"],
    ];
    for args in commands {
        let closes_stderr = args[0] == "restore";
        let mut command = mover();
        command.args(&args).args(site_arg);
        command.stdout(pipe_without_reader());
        if closes_stderr {
            command.stderr(pipe_without_reader());
        } else {
            command.stderr(std::process::Stdio::piped());
        }
        let output = command.output().unwrap();
        let message = stderr(&output);
        assert_eq!(
            output.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}: {message}",
            output.status
        );
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
}

#[test]
fn workers_beyond_the_cores_are_a_named_error() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    set_engine(&site, "workers = 100000");
    let data = work.path().join("data");
    write_random(&data.join("f"), 10, 1);
    for args in [vec!["backup", data.to_str().unwrap()], vec!["snapshots"]] {
        let output = run(mover().args(&args).arg("--site-dir").arg(&site));
        let message = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {message}");
        assert!(
            message.contains("engine.workers = 100000: expected 0 (one per core) to"),
            "{args:?}: {message}"
        );
        assert_eq!(message.trim().lines().count(), 1, "{message}");
    }
}

#[test]
fn errors_are_said_once_and_where() {
    let work = workdir();
    let site = init_site(work.path(), "a");

    // An OS error once, not once per layer.
    let output = run(mover()
        .args(["backup", "/nonexistent/path", "--site-dir"])
        .arg(&site));
    let message = stderr(&output);
    assert_eq!(
        message.matches("No such file or directory").count(),
        1,
        "{message}"
    );

    // --json on a failed in-process job prints the job document.
    let output = run(mover()
        .args(["backup", "/nonexistent/path", "--json", "--site-dir"])
        .arg(&site));
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let job: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no job document ({e}): {}", stderr(&output)));
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["kind"], "backup", "{job}");
    assert_eq!(job["site"], "a", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("/nonexistent/path"),
        "{job}"
    );

    // A value the types accept but the checks refuse is named at its line and column.
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[api]\n", "[api]\nrunning_jobs_max = 0\n");
    let line = text
        .lines()
        .position(|l| l.starts_with("running_jobs_max = 0"))
        .unwrap()
        + 1;
    std::fs::write(&config, text).unwrap();
    let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
    let message = stderr(&output);
    assert!(
        message.contains(&format!("mover.toml:{line}:1: api.running_jobs_max = 0")),
        "{message}"
    );
}

#[test]
fn dot_dot_targets_make_no_stray_directories_and_control_characters_are_escaped() {
    use std::os::unix::ffi::OsStrExt;
    let work = workdir();
    let site = init_site(work.path(), "a");
    let data = work.path().join("data");
    write_random(&data.join("f"), 10, 1);
    // A fifo (a warning naming it) whose name would clear a terminal and break the line.
    let fifo = data.join("p\x1b[2J\nq");
    let name = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let output = run(mover()
        .arg("backup")
        .arg(&data)
        .arg("--site-dir")
        .arg(&site));
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(
        !message.contains('\x1b') && message.contains("p\\u{1b}[2J\\nq"),
        "{message:?}"
    );
    assert_eq!(message.trim().lines().count(), 1, "{message:?}");

    // `..` after a name that does not exist: the kernel's meaning, no stray directory.
    let target = work.path().join("missing/../restored");
    restore(&site, "latest", &target);
    assert!(!work.path().join("missing").exists());
    assert!(work.path().join("restored/f").is_file());
}

/// A peer's bandwidth, cipher or congestion that does not parse stops `mover` when the config
/// loads, at the value's line and column, saying what was expected: not later, when a job
/// first dials the peer.
#[test]
fn bad_peer_values_fail_at_load_with_their_position() {
    let work = workdir();
    let site = init_site(work.path(), "a");
    let config = site.join("mover.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    let fingerprint = format!("sha256:{}", "ab".repeat(32));
    for (line, expected) in [
        (
            "bandwidth = \"100 furlongs\"",
            "peers.b.bandwidth: \"100 furlongs\": unknown unit \"furlongs\"; expected a rate such as \"1gbit\" or \"50MB/s\"",
        ),
        (
            "bandwidth = \"100MBps\"",
            "peers.b.bandwidth: \"100MBps\": \"MBps\" is ambiguous",
        ),
        (
            "cipher = \"aes512\"",
            "peers.b.cipher: cipher \"aes512\" is not known: expected aes128, aes256 or chacha20",
        ),
        (
            "congestion = \"reno\"",
            "peers.b.congestion: congestion \"reno\" is not known: expected cubic or bbr",
        ),
    ] {
        let text = format!(
            "{original}\n[peers.b]\naddress = \"127.0.0.1:7401\"\nfingerprint = \"{fingerprint}\"\n{line}\n"
        );
        let line_number = text.lines().count();
        let column = line.find('"').unwrap() + 1;
        std::fs::write(&config, text).unwrap();
        let output = run(mover().arg("snapshots").arg("--site-dir").arg(&site));
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
        assert!(
            message.contains(&format!("mover.toml:{line_number}:{column}: {expected}")),
            "{line}: {message}"
        );
    }
}
