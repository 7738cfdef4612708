//! Shared helpers for the integration tests: they drive the real `mover` binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

pub fn mover() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mover"));
    command
        .env_remove("MOVER_SITE_DIR")
        .env("MOVER_LOG", "warn");
    command
}

pub fn run(command: &mut Command) -> Output {
    command.output().expect("run mover")
}

/// Runs a command that must succeed and returns its stdout parsed as JSON.
pub fn run_json(command: &mut Command) -> Value {
    let output = run(command.arg("--json"));
    assert!(
        output.status.success(),
        "{:?} failed: {}",
        command,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{command:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn init_site(dir: &Path, name: &str) -> PathBuf {
    let site = dir.join(format!("site-{name}"));
    let value = run_json(mover().args(["init", "--site", name, "--dir"]).arg(&site));
    assert_eq!(value["site"], name);
    site
}

/// Adds `lines` (TOML `key = value` lines) at the top of the site's `[engine]` section.
pub fn set_engine(site: &Path, lines: &str) {
    let config = site.join("mover.toml");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[engine]",
        &format!("[engine]\n{lines}"),
        1,
    );
    std::fs::write(&config, text).unwrap();
}

pub fn backup(site: &Path, path: &Path) -> Value {
    let job = run_json(mover().arg("backup").arg(path).arg("--site-dir").arg(site));
    assert_eq!(job["state"], "done", "{job}");
    job
}

pub fn restore(site: &Path, spec: &str, to: &Path) -> Value {
    let job = run_json(
        mover()
            .args(["restore", spec, "--to"])
            .arg(to)
            .arg("--site-dir")
            .arg(site),
    );
    assert_eq!(job["state"], "done", "{job}");
    job
}

pub fn snapshot_id(job: &Value) -> String {
    job["snapshot"]
        .as_str()
        .expect("job has a snapshot")
        .to_string()
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

pub fn write_random(path: &Path, len: usize, seed: u64) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, random_bytes(len, seed)).unwrap();
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    if let Err(difference) = mover::quickstart::compare_trees(a, b) {
        panic!("{} and {} differ: {difference}", a.display(), b.display());
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A work directory on the same file system as the checkout (not tmpfs), so O_DIRECT and
/// holes behave as on a storage node.
pub fn workdir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Starts `mover daemon --config CONFIG` (stderr appended to LOG) and returns it with the
/// line it prints on stdout once it serves.
pub fn spawn_daemon(config: &Path, log: &Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = mover()
        .env("MOVER_LOG", "info")
        .arg("daemon")
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// The write end of a pipe whose reader has already gone (`mover ... | head -0`, with head
/// done before mover writes).
pub fn pipe_without_reader() -> std::process::Stdio {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors, which are then owned here exactly once.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        std::process::Stdio::from(std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    }
}

/// A tmpfs of `size` mounted over `dir`, with `dir`'s files moved in; lazily unmounted on
/// drop (a daemon may still hold files there).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Sets the file system's size (`mount -o remount,size=`): space coming back.
    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount {} to {size}", self.0.display());
    }

    pub fn over(dir: &Path, size: &str) -> Tmpfs {
        let kept = dir.with_extension("on-disk");
        std::fs::rename(dir, &kept).unwrap();
        std::fs::create_dir(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            mounted.status.success(),
            "mount -t tmpfs failed (needs root with CAP_SYS_ADMIN): {}",
            stderr(&mounted)
        );
        let mount = Tmpfs(dir.to_path_buf());
        let copied = Command::new("cp")
            .arg("-a")
            .arg(kept.join("."))
            .arg(dir)
            .output()
            .unwrap();
        assert!(copied.status.success(), "{}", stderr(&copied));
        mount
    }

    /// Writes a file until the file system is full; returns it.
    pub fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        loop {
            match file.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return path,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `dir` served through `mover-faultfs` (a pass-through FUSE file system that fails chosen
/// operations): `dir`'s files move to a backing directory beside it and the mount takes its
/// place. Unmounted on drop.
pub struct FaultFs {
    mount: PathBuf,
    control: PathBuf,
    child: std::process::Child,
}

impl FaultFs {
    pub fn over(dir: &Path) -> FaultFs {
        let tool = Path::new(env!("CARGO_BIN_EXE_mover")).with_file_name("mover-faultfs");
        assert!(
            tool.exists(),
            "{} is missing: `cargo test --workspace` builds it (or `cargo build -p mover-tools`)",
            tool.display()
        );
        let backing = dir.with_extension("backing");
        std::fs::rename(dir, &backing).unwrap();
        std::fs::create_dir(dir).unwrap();
        let control = dir.with_extension("faults");
        std::fs::write(&control, "").unwrap();
        let child = Command::new(&tool)
            .arg(&backing)
            .arg(dir)
            .arg("--control")
            .arg(&control)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut fs = FaultFs {
            mount: dir.to_path_buf(),
            control,
            child,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let wanted = dir.canonicalize().unwrap();
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            if mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(wanted.to_str().unwrap()))
            {
                return fs;
            }
            if let Ok(Some(status)) = fs.child.try_wait() {
                panic!(
                    "mover-faultfs exited ({status}) before mounting {}: needs root and /dev/fuse",
                    dir.display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "mover-faultfs did not mount {} within 20 s",
                dir.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Replaces the faults in force (`OP SUFFIX ERRNO` lines; "" for none), atomically.
    pub fn set(&self, faults: &str) {
        let next = self.control.with_extension("next");
        std::fs::write(&next, faults).unwrap();
        std::fs::rename(&next, &self.control).unwrap();
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        // The tool exits once the kernel tells it the mount is gone; only a busy mount
        // needs the lazy unmount and the kill.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mount)
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}
