//! Restores while someone else writes to the target: a root restore into a directory an
//! unprivileged user can write must never be redirected outside it, and an interrupted restore
//! must be finished, not mistaken for a complete one.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The unprivileged user of `.ci/run` (the API tests refuse it too).
const ATTACKER: &str = "mover-test";

/// Swaps every directory that appears in the target for a symlink to the victim directory,
/// as fast as it can, until the stop file appears. Run as the unprivileged user, who owns the
/// target (so may rename what root creates in it) but not the victim. With a `wait` above 0 it
/// swaps a directory only once it holds that many entries (or cannot be listed): late enough
/// to meet the final pass that sets directory modes, owners and times.
const ATTACK: &str = r#"
my ($target, $victim, $stop, $wait) = @ARGV;
my $swaps = 0;
until (-e $stop) {
    opendir(my $dh, $target) or next;
    my @names = readdir($dh);
    closedir($dh);
    for my $name (@names) {
        next if $name =~ /^\./ || $name =~ /\.moved$/;
        my $path = "$target/$name";
        next if -l $path || !-d _;
        if ($wait > 0 && opendir(my $inner, $path)) {
            my $entries = grep { !/^\.\.?$/ } readdir($inner);
            closedir($inner);
            next if $entries < $wait;
        }
        rename($path, "$path.moved") or next;
        symlink($victim, $path) and $swaps++;
    }
}
print "$swaps\n";
"#;

fn uid_of(user: &str) -> (u32, u32) {
    let output = Command::new("id").args(["-u", user]).output().unwrap();
    assert!(
        output.status.success(),
        "user {user} is missing: .ci/run creates it (useradd --system {user})"
    );
    let uid = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    let output = Command::new("id").args(["-g", user]).output().unwrap();
    let gid = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    (uid, gid)
}

/// Everything under `dir`: path, mode, owner, size and content, to compare before and after.
fn fingerprint(dir: &Path) -> Vec<(String, u32, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let meta = std::fs::symlink_metadata(&at).unwrap();
        let content = if meta.is_file() {
            std::fs::read(&at).unwrap()
        } else {
            Vec::new()
        };
        out.push((
            at.display().to_string(),
            meta.mode(),
            meta.uid(),
            meta.mtime() as u64,
            content,
        ));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&at).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_racing_user_cannot_redirect_a_root_restore() {
    assert!(
        is_root(),
        "this test needs root: it restores as root into a directory an unprivileged user races on"
    );
    let (uid, gid) = uid_of(ATTACKER);
    let work = workdir();
    // The unprivileged user must reach the target inside the work directory.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let site = init_site(work.path(), "race");

    // Many small directories, each created by the restore and then filled: every one is a
    // window in which the racer can swap it.
    let source = work.path().join("source");
    for d in 0..150 {
        for f in 0..12 {
            write_random(
                &source.join(format!("d{d:03}/f{f:02}")),
                64 << 10,
                d * 100 + f,
            );
        }
        let file = source.join(format!("d{d:03}/f00"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
    }
    let snapshot = snapshot_id(&backup(&site, &source));

    // The victim: root's, outside the target, holding root-only files by the names the
    // restore writes; a redirected restore would chown and chmod them (or the directory).
    let victim = work.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    for f in 0..12 {
        let file = victim.join(format!("f{f:02}"));
        std::fs::write(&file, b"root's secret").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
    let before = fingerprint(&victim);

    let mut outcomes = Vec::new();
    for round in 0..4 {
        let target = work.path().join(format!("target{round}"));
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::chown(&target, Some(uid), Some(gid)).unwrap();
        let stop = work.path().join(format!("stop{round}"));
        let attacker = Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
                "perl",
                "-e",
                ATTACK,
            ])
            .arg(&target)
            .arg(&victim)
            .arg(&stop)
            .arg(if round % 2 == 0 { "0" } else { "12" })
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the racer (setpriv from util-linux, which .ci/run installs, and perl, which Debian always has)");
        // Give the racer time to start polling before the restore begins.
        std::thread::sleep(Duration::from_millis(300));
        let output = run(mover()
            .args(["restore", &snapshot, "--to"])
            .arg(&target)
            .arg("--site-dir")
            .arg(&site));
        std::fs::write(&stop, b"").unwrap();
        let racer = attacker.wait_with_output().unwrap();
        assert!(racer.status.success(), "the racer failed");
        let swaps: u64 = String::from_utf8_lossy(&racer.stdout)
            .trim()
            .parse()
            .unwrap();
        let message = stderr(&output);
        let touched = fingerprint(&victim) != before;
        outcomes.push((output.status.success(), swaps, touched, message));
    }
    eprintln!("rounds (restore succeeded, swaps, victim touched, message): {outcomes:?}");
    // Every round first, so that a run which only failed oddly still shows a redirection.
    for (round, (_, swaps, touched, message)) in outcomes.iter().enumerate() {
        assert!(
            !touched,
            "round {round}: the restore touched the victim directory outside its target ({swaps} swaps; restore said: {message})"
        );
    }
    for (succeeded, _, _, message) in &outcomes {
        if !succeeded {
            // Stopped: one line, naming the swapped path.
            assert_eq!(message.trim().lines().count(), 1, "{message}");
            assert!(
                message.contains("no longer the directory this restore created"),
                "{message}"
            );
        }
    }
    assert!(
        outcomes.iter().any(|&(_, swaps, _, _)| swaps > 0),
        "the racer never swapped a directory, so nothing was tested: {outcomes:?}"
    );
}

#[test]
fn an_interrupted_restore_is_marked_and_finished_by_running_it_again() {
    let work = workdir();
    let site = init_site(work.path(), "resume");
    let source = work.path().join("source");
    for d in 0..40 {
        for f in 0..50 {
            write_random(
                &source.join(format!("d{d:02}/f{f:02}")),
                16 << 10,
                d * 100 + f,
            );
        }
    }
    let snapshot = snapshot_id(&backup(&site, &source));
    let target = work.path().join("target");
    let mut child = mover()
        .args(["restore", &snapshot, "--to"])
        .arg(&target)
        .arg("--site-dir")
        .arg(&site)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has written some files but not all.
    let marker = target.join(".mover-restore-in-progress");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let written = std::fs::read_dir(target.join("d00"))
            .map(|d| d.count())
            .unwrap_or(0);
        if written >= 10 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before it could be interrupted: make the data set larger"
        );
        assert!(
            Instant::now() < deadline,
            "the restore wrote nothing in 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        marker.exists(),
        "an interrupted restore must leave its marker so the partial tree is not taken for complete"
    );

    // Another restore into it is refused, naming what the target holds.
    let other = run(mover()
        .args(["restore", &format!("{snapshot}:d01"), "--to"])
        .arg(&target)
        .arg("--site-dir")
        .arg(&site));
    assert!(!other.status.success());
    let message = stderr(&other);
    assert!(message.contains("holds a partial restore"), "{message}");
    assert!(message.contains("run that restore again"), "{message}");

    // The same restore again finishes it.
    restore(&site, &snapshot, &target);
    assert!(!marker.exists(), "the finished restore removed its marker");
    assert_same_tree(&source, &target);
}
