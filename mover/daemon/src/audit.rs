//! The daemon's audit log: who did what, when, with what result, as append-only JSON lines.
//!
//! Why a chain: the log is evidence, so changing it should not go unnoticed. Every entry carries
//! `prev`, the BLAKE3 hash of the previous line's exact bytes, so editing or removing any line
//! breaks the next line's `prev` (or the `seq` run). Removing lines from the end, or adding
//! well-chained lines at the end, leaves a valid chain, so a small head file beside the log
//! (`audit.log.head`, one line `{"seq":N,"hash":"<hex>"}`) pins the last sequence number and
//! line hash: a log that stops short of its head or runs past it is flagged.
//!
//! What it protects against: accidental damage, a torn write, and an editor who changes,
//! inserts, deletes or appends lines without rewriting the head. What it does not: anyone who
//! can write both files can rebuild the whole chain and the head consistently, and that is not
//! detected (there is no key and no external anchor). It is tamper-evident against partial
//! edits, not tamper-proof.
//!
//! Appending, and why a line past the head can be told from an added one: a crash between
//! writing a line and updating the head leaves the log one line past its head, exactly as
//! someone appending one well-chained line does; from the two files alone the cases are the
//! same. So the head announces each line before it is written: an append (1) replaces the head
//! with `{"seq":N,"hash":H,"next":X}`, X the hash of the line about to be written, durably
//! (file and directory fsync); (2) writes the line in one `write` on an `O_APPEND` descriptor,
//! then `fdatasync`; (3) replaces the head with `{"seq":N+1,"hash":X}`. Whatever the crash
//! point, the files are then in one of three states, and only these are accepted (by
//! [`verify`] and [`AuditLog::open`] alike, through one judgement): the log ends at the head;
//! or it ends at the head and the head announces a line (crash before or during (2)); or it has
//! exactly one line past the head and that line's hash is the announced `next` (crash before
//! (3); `open` then advances the head). Anything else past the head is an addition: producing
//! a line with the announced hash would need a BLAKE3 preimage, and a head at rest announces
//! nothing. Step (3) therefore needs no directory fsync: if it is lost, the state is the
//! accepted one of step (2).
//!
//! A failed append is undone (the log cut back to its previous length, the head left
//! announcing a line that is not there, which is accepted), so the caller can refuse the
//! unaudited action and retry later; if the undo fails the log stops taking appends, since its
//! tail is unknown. A torn last line is never truncated silently: `open` refuses with the file
//! and offset, so a person decides.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mover_format::error::{Error, Result};

/// The longest line read back: entries are a few hundred bytes; the bound keeps `verify` from
/// allocating without limit on a hostile file. `append` refuses entries longer than this.
pub const MAX_LINE: usize = 1 << 20;
/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// How much of the log's tail `open` reads first to find the last line (doubled while needed).
const TAIL_WINDOW: u64 = 64 << 10;
/// How often `verify` reads on after a head that moved while the log was read.
const VERIFY_ROUNDS_MAX: u32 = 100;
/// Stop listing problems after this many.
const MAX_PROBLEMS: usize = 100;

/// Who did something: the caller's credentials from SO_PEERCRED, or the daemon itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Who {
    pub fn this_process() -> Who {
        // SAFETY: getuid, getgid and getpid take no arguments and cannot fail.
        unsafe {
            Who {
                uid: libc::getuid(),
                gid: libc::getgid(),
                pid: libc::getpid(),
            }
        }
    }
}

/// One line of the log. Field order is the serialised order, so a line's bytes are stable.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub time: String,
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub action: String,
    pub target: String,
    pub result: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
    pub prev: String,
}

#[derive(PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    hash: String,
    /// The hash of the line being appended after `seq`, set before that line is written (see
    /// the module doc): the one line past the head that is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

impl Head {
    fn at(seq: u64, hash: &str) -> Head {
        Head {
            seq,
            hash: hash.to_owned(),
            next: None,
        }
    }
}

/// The end of a log: its last entry's seq, the hash of that line and its `prev`.
struct End<'a> {
    seq: u64,
    hash: &'a str,
    prev: &'a str,
}

/// How the end of a log stands against its head, shared by [`verify`] and [`AuditLog::open`]
/// so that they agree. `Ok(true)`: one line past the head, the one the head announced (a crash
/// before the head caught up; `open` advances it). `Err`: why they disagree.
fn judge(head: &Head, end: Option<End>) -> std::result::Result<bool, String> {
    let Some(end) = end else {
        return match head.seq {
            0 => Ok(false),
            n => Err(format!(
                "head says {n} entries, log has 0 (lines removed from the end)"
            )),
        };
    };
    if end.seq < head.seq {
        return Err(format!(
            "head says {} entries, log has {} (lines removed from the end)",
            head.seq, end.seq
        ));
    }
    if end.seq == head.seq {
        return match end.hash == head.hash {
            true => Ok(false),
            false => Err("the last line's hash differs from the head's (last line edited)".into()),
        };
    }
    if end.seq > head.seq + 1 {
        return Err(format!(
            "the log runs {} lines past its head (seq {}): lines appended without the daemon",
            end.seq - head.seq,
            head.seq
        ));
    }
    match &head.next {
        Some(next) if next == end.hash && end.prev == head.hash => Ok(true),
        Some(_) => Err(format!(
            "the line with seq {} is not the one the head announced: a line appended or \
             edited without the daemon",
            end.seq
        )),
        None => Err(format!(
            "the line with seq {} runs past the head (seq {}), which announced no further \
             line: a line appended without the daemon",
            end.seq, head.seq
        )),
    }
}

struct State {
    file: File,
    seq: u64,
    hash: String,
    len: u64,
    /// Set when a failed append could not be undone: the file's tail is unknown.
    broken: Option<String>,
}

/// An open audit log; `append` is safe from many threads.
pub struct AuditLog {
    path: PathBuf,
    head: PathBuf,
    state: Mutex<State>,
}

fn line_hash(line: &[u8]) -> String {
    blake3::hash(line).to_hex().to_string()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The head file that goes with a log: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    with_suffix(log, ".head")
}

fn corrupt_log(path: &Path, detail: String) -> Error {
    Error::corrupt(format!("audit log {}", path.display()), detail)
}

fn read_head(path: &Path) -> Result<Option<Head>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let mut text = String::new();
    file.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| Error::io("read", path, e))?;
    let head: Head = serde_json::from_str(text.trim_end())
        .map_err(|e| Error::corrupt(format!("audit head {}", path.display()), e.to_string()))?;
    let bad_next = head.next.as_ref().is_some_and(|n| n.len() != 64);
    if head.hash.len() != 64 || bad_next || (head.seq == 0 && head.hash != GENESIS) {
        let detail = format!("bad hash {:?} for seq {}", head.hash, head.seq);
        return Err(Error::corrupt(
            format!("audit head {}", path.display()),
            detail,
        ));
    }
    Ok(Some(head))
}

/// Replaces the head atomically: temporary file, fsync, rename, then (when `durable`) a
/// directory fsync so that the rename itself survives a crash.
fn write_head(path: &Path, head: &Head, durable: bool) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let mut body =
        serde_json::to_vec(head).map_err(|e| Error::corrupt("audit head", e.to_string()))?;
    body.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(&body)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, e))?;
    if !durable {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync", dir, e))
}

/// Finds the last line from the end of the file: (its offset, its bytes without '\n').
fn last_line(file: &File, len: u64, path: &Path) -> Result<Option<(u64, Vec<u8>)>> {
    if len == 0 {
        return Ok(None);
    }
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        let mut buf = vec![0u8; (len - start) as usize];
        file.read_exact_at(&mut buf, start)
            .map_err(|e| Error::io("read", path, e))?;
        let terminated = buf.last() == Some(&b'\n');
        let body = &buf[..buf.len() - terminated as usize];
        let line_start = match body.iter().rposition(|&b| b == b'\n') {
            Some(i) => Some(start + i as u64 + 1),
            None if start == 0 => Some(0),
            None => None,
        };
        if let Some(off) = line_start {
            if !terminated {
                let detail = format!(
                    "the last line, at byte offset {off}, has no newline: a torn write (crash \
                     or full disk); inspect it, then move the log and its head aside"
                );
                return Err(corrupt_log(path, detail));
            }
            let line = &body[(off - start) as usize..];
            if line.len() > MAX_LINE {
                break;
            }
            return Ok(Some((off, line.to_vec())));
        }
        if window > MAX_LINE as u64 {
            break;
        }
        window *= 2;
    }
    let detail =
        format!("the last line, ending at byte offset {len}, is longer than {MAX_LINE} bytes");
    Err(corrupt_log(path, detail))
}

impl AuditLog {
    /// Opens (creating with mode 0640 if absent) the log and continues its chain from the last
    /// line, without verifying the whole file. A head one announced line behind (a crash
    /// during an append) is advanced; a torn or unparsable last line, a missing head, or a head
    /// the log stops short of or runs past is refused, so that evidence is not overwritten.
    pub fn open(path: &Path) -> Result<AuditLog> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let (seq, hash, prev) = match last_line(&file, len, path)? {
            None => (0, GENESIS.to_owned(), String::new()),
            Some((off, line)) => {
                let entry: Entry = serde_json::from_slice(&line).map_err(|e| {
                    corrupt_log(path, format!("the last line, at byte offset {off}: {e}"))
                })?;
                (entry.seq, line_hash(&line), entry.prev)
            }
        };
        let head = head_path(path);
        let mismatch = |what: String| {
            corrupt_log(
                path,
                format!(
                    "{what}; verify the log, then move it and {} aside to start anew",
                    head.display()
                ),
            )
        };
        let end = (seq > 0).then_some(End {
            seq,
            hash: &hash,
            prev: &prev,
        });
        match read_head(&head)? {
            None if seq == 0 => write_head(&head, &Head::at(0, GENESIS), true)?,
            None => {
                return Err(mismatch(format!(
                    "head file missing, log has {seq} entries"
                )))
            }
            Some(h) => match judge(&h, end) {
                Ok(true) => write_head(&head, &Head::at(seq, &hash), true)?,
                Ok(false) => {}
                Err(why) => return Err(mismatch(why)),
            },
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            head,
            state: Mutex::new(State {
                file,
                seq,
                hash,
                len,
                broken: None,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry (next seq, time now, prev = hash of the last line): announce it in
    /// the head, one write of the line and its newline, fdatasync, then the head (see the
    /// module doc). Returns the entry written; on `Err` nothing was added to the log.
    pub fn append(
        &self,
        who: Who,
        action: &str,
        target: &str,
        result: &str,
        detail: serde_json::Value,
    ) -> Result<Entry> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.broken {
            return Err(Error::Refused(format!(
                "audit log {}: {why}",
                self.path.display()
            )));
        }
        let entry = Entry {
            seq: st.seq + 1,
            time: mover_engine::job::rfc3339_ms(mover_engine::job::now_unix_ms()),
            uid: who.uid,
            gid: who.gid,
            pid: who.pid,
            action: action.to_owned(),
            target: target.to_owned(),
            result: result.to_owned(),
            detail,
            prev: st.hash.clone(),
        };
        let mut line =
            serde_json::to_vec(&entry).map_err(|e| Error::corrupt("audit entry", e.to_string()))?;
        if line.len() > MAX_LINE {
            return Err(Error::Refused(format!(
                "audit entry of {} bytes is longer than {MAX_LINE}",
                line.len()
            )));
        }
        let hash = line_hash(&line);
        line.push(b'\n');
        let announce = Head {
            seq: st.seq,
            hash: st.hash.clone(),
            next: Some(hash.clone()),
        };
        write_head(&self.head, &announce, true)?;
        let written = match st.file.write_all(&line) {
            Err(e) => Err(Error::io("append to", &self.path, e)),
            Ok(()) => st
                .file
                .sync_data()
                .map_err(|e| Error::io("fdatasync", &self.path, e)),
        };
        if let Err(e) = written {
            // Cut back to the last whole line so the chain stays parsable and the caller can
            // retry; a synced cut also takes back a line whose fdatasync failed. If even that
            // fails, the tail is unknown: stop appending.
            let undo = st.file.set_len(st.len).and_then(|()| st.file.sync_data());
            if let Err(t) = undo {
                st.broken = Some(format!("a failed append ({e}) could not be undone: {t}"));
            }
            return Err(e);
        }
        st.seq = entry.seq;
        st.hash = hash;
        st.len += line.len() as u64;
        if let Err(e) = write_head(&self.head, &Head::at(st.seq, &st.hash), false) {
            // The line is durable and announced: the next append or start brings the head up.
            tracing::warn!(log = %self.path.display(), error = %e, "audit head not advanced");
        }
        Ok(entry)
    }
}

/// Outcome of checking a whole log.
#[derive(Debug, serde::Serialize)]
pub struct Verification {
    pub path: String,
    pub entries: u64,
    pub intact: bool,
    /// One line per problem, first problem first, each naming the line number (1-based).
    pub problems: Vec<String>,
}

/// Reads one line (without its '\n') into `buf`, keeping at most `MAX_LINE + 1` bytes of it.
/// Returns None at end of file, else whether the line was newline-terminated.
fn read_line_bounded<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(any.then_some(false));
        }
        any = true;
        let nl = avail.iter().position(|&b| b == b'\n');
        let chunk = &avail[..nl.unwrap_or(avail.len())];
        let room = (MAX_LINE + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len() + nl.is_some() as usize;
        r.consume(used);
        if nl.is_some() {
            return Ok(Some(true));
        }
    }
}

fn open_reader(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    Ok(BufReader::with_capacity(64 << 10, f))
}

/// The chain check of [`verify`], fed the log's lines as they are read.
struct Chain {
    problems: Vec<String>,
    more: bool,
    lines: u64,
    expected: u64,
    /// The hash of the last line read (empty after an overlong one).
    prev_hash: String,
    /// The last entry read: its seq, line hash and `prev`.
    last: Option<(u64, String, String)>,
}

impl Chain {
    fn note(&mut self, p: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.more = true;
        }
    }

    /// Checks lines up to the end of the file as it is now; returns how many were read.
    fn read_on<R: BufRead>(&mut self, reader: &mut R, path: &Path) -> Result<u64> {
        let (start, mut buf) = (self.lines, Vec::new());
        while let Some(terminated) =
            read_line_bounded(reader, &mut buf).map_err(|e| Error::io("read", path, e))?
        {
            self.lines += 1;
            self.line(&buf, terminated);
        }
        Ok(self.lines - start)
    }

    fn line(&mut self, buf: &[u8], terminated: bool) {
        let n = self.lines;
        if buf.len() > MAX_LINE {
            self.note(format!("line {n}: longer than {MAX_LINE} bytes"));
            self.prev_hash.clear();
            self.expected += 1;
            return;
        }
        if !terminated {
            self.note(format!(
                "line {n}: no newline at the end of the file (a torn write)"
            ));
        }
        let hash = line_hash(buf);
        match serde_json::from_slice::<Entry>(buf) {
            Err(e) => {
                self.note(format!("line {n}: not a JSON audit entry: {e}"));
                self.expected += 1;
            }
            Ok(entry) => {
                if entry.seq != self.expected {
                    let why = if entry.seq > self.expected {
                        "a line was removed"
                    } else {
                        "a line was repeated or moved"
                    };
                    let expected = self.expected;
                    self.note(format!(
                        "line {n}: seq {}, expected {expected} ({why})",
                        entry.seq
                    ));
                }
                if entry.prev != self.prev_hash {
                    self.note(if n == 1 {
                        "line 1: prev hash is not the first entry's (lines removed from the start)"
                            .to_owned()
                    } else {
                        format!(
                            "line {n}: prev hash does not match line {} (line {} edited, or a \
                             line removed before line {n})",
                            n - 1,
                            n - 1
                        )
                    });
                }
                self.expected = entry.seq + 1;
                self.last = Some((entry.seq, hash.clone(), entry.prev));
            }
        }
        self.prev_hash = hash;
    }

    fn end(&self) -> Option<End<'_>> {
        self.last.as_ref().map(|(seq, hash, prev)| End {
            seq: *seq,
            hash,
            prev,
        })
    }
}

/// Checks every line (a JSON [`Entry`], seq consecutive from 1, `prev` chained), then the end
/// of the log against the head as [`AuditLog::open`] does: one line past the head only if the
/// head announced it. Safe beside a running daemon: when the head has moved on while the log
/// was read, the lines appended since are read and the end judged again.
pub fn verify(path: &Path) -> Result<Verification> {
    let head_file = head_path(path);
    let mut reader = open_reader(path)?;
    let mut chain = Chain {
        problems: Vec::new(),
        more: false,
        lines: 0,
        expected: 1,
        prev_hash: GENESIS.to_owned(),
        last: None,
    };
    chain.read_on(&mut reader, path)?;
    let mut seen: Option<Head> = None;
    let mut rounds = 0;
    let verdict = loop {
        rounds += 1;
        let head = match read_head(&head_file) {
            Err(e) => break Some(format!("head: {e}")),
            Ok(None) if chain.lines > 0 => {
                break Some(format!("head: {} is missing", head_file.display()))
            }
            Ok(None) => break None,
            Ok(Some(h)) => h,
        };
        let why = match judge(&head, chain.end()) {
            Ok(_) => break None,
            Err(why) => why,
        };
        // A daemon appending meanwhile moves the head; an unchanged head and no new lines
        // make the verdict final (as does a daemon that never pauses long enough).
        let moved = seen.as_ref() != Some(&head);
        seen = Some(head);
        let read = chain.read_on(&mut reader, path)?;
        if (read == 0 && !moved) || rounds > VERIFY_ROUNDS_MAX {
            break Some(why);
        }
    };
    if let Some(problem) = verdict {
        chain.note(problem);
    }
    let Chain {
        mut problems,
        more,
        lines,
        ..
    } = chain;
    if more {
        problems.push(format!(
            "(more problems not listed after the first {MAX_PROBLEMS})"
        ));
    }
    Ok(Verification {
        path: path.display().to_string(),
        entries: lines,
        intact: problems.is_empty(),
        problems,
    })
}

/// All entries, oldest first; `last = Some(n)` keeps the last n. A missing log has none.
/// Does not check the chain (that is [`verify`]); an unparsable line is an error.
pub fn read(path: &Path, last: Option<usize>) -> Result<Vec<Entry>> {
    let mut reader = match open_reader(path) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Vec::new())
        }
        r => r?,
    };
    let mut out = VecDeque::new();
    let (mut n, mut buf) = (0u64, Vec::new());
    while read_line_bounded(&mut reader, &mut buf)
        .map_err(|e| Error::io("read", path, e))?
        .is_some()
    {
        n += 1;
        if buf.len() > MAX_LINE {
            return Err(corrupt_log(
                path,
                format!("line {n}: longer than {MAX_LINE} bytes"),
            ));
        }
        let entry: Entry = serde_json::from_slice(&buf)
            .map_err(|e| corrupt_log(path, format!("line {n}: not a JSON audit entry: {e}")))?;
        out.push_back(entry);
        if last.is_some_and(|k| out.len() > k) {
            out.pop_front();
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn add(log: &AuditLog, target: &str) -> Entry {
        let root = Who {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let null = serde_json::Value::Null;
        log.append(root, "job.submit", target, "ok", null).unwrap()
    }

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        (0..n).for_each(|i| drop(add(&log, &format!("job-{i}"))));
        (dir, path)
    }

    fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        f(&mut lines);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).unwrap();
    }

    fn problems(path: &Path) -> Vec<String> {
        let v = verify(path).unwrap();
        assert_eq!(v.intact, v.problems.is_empty());
        v.problems
    }

    #[test]
    fn concurrent_appends_chain() {
        let (_dir, path) = log_with(0);
        let log = Arc::new(AuditLog::open(&path).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for i in 0..5 {
                        let d = serde_json::json!({ "thread": t, "i": i });
                        log.append(Who::this_process(), "job.done", "", "done", d)
                            .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let v = verify(&path).unwrap();
        assert!(v.intact, "{:?}", v.problems);
        assert_eq!(v.entries, 20);
        let entries = read(&path, None).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut prev = GENESIS.to_owned();
        for ((i, e), line) in entries.iter().enumerate().zip(text.lines()) {
            assert_eq!(e.seq, i as u64 + 1);
            assert_eq!(e.prev, prev);
            assert_eq!(e.time.len(), 24, "{}", e.time);
            prev = line_hash(line.as_bytes());
        }
        let tail: Vec<u64> = read(&path, Some(3))
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(tail, [18, 19, 20]);
    }

    #[test]
    fn reopen_continues_chain() {
        let (_dir, path) = log_with(3);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(add(&log, "").seq, 4);
        assert!(problems(&path).is_empty());
        assert_eq!(read(&path, None).unwrap().len(), 4);
    }

    #[test]
    fn edited_middle_line_names_next_line() {
        let (_dir, path) = log_with(5);
        rewrite(&path, |l| l[2] = l[2].replace("\"uid\":0", "\"uid\":1"));
        let p = problems(&path);
        assert!(
            p[0].starts_with("line 4: prev hash does not match line 3"),
            "{p:?}"
        );
    }

    #[test]
    fn removed_and_edited_lines_detected() {
        let (_dir, path) = log_with(5);
        let orig = std::fs::read_to_string(&path).unwrap();
        rewrite(&path, |l| drop(l.remove(2)));
        let p = problems(&path);
        assert!(p[0].starts_with("line 3: seq 4, expected 3"), "{p:?}");
        std::fs::write(&path, &orig).unwrap();
        rewrite(&path, |l| drop(l.pop()));
        let p = problems(&path);
        assert!(
            p[0].starts_with("head says 5 entries") && p[0].contains("log has 4"),
            "{p:?}"
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            AuditLog::open(&path).is_err(),
            "open must not paper over a truncation"
        );
        std::fs::write(&path, &orig).unwrap();
        rewrite(&path, |l| l[4] = l[4].replace("job-4", "job-9"));
        assert_eq!(
            problems(&path),
            ["the last line's hash differs from the head's (last line edited)"]
        );
        std::fs::write(&path, orig.replace("\"ok\",", "\"ok\",\"x\":1,")).unwrap();
        assert!(problems(&path)[0].contains("line 1: not a JSON audit entry: unknown field"));
    }

    #[test]
    fn torn_last_line_refused() {
        let (_dir, path) = log_with(3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":4,\"ti").unwrap();
        let err = AuditLog::open(&path).err().expect("refused").to_string();
        let named = err.contains(&path.display().to_string());
        assert!(named && err.contains("byte offset"), "{err}");
        let p = problems(&path);
        assert!(p[0].starts_with("line 4: no newline"), "{p:?}");
        assert!(p[1].starts_with("line 4: not a JSON audit entry"), "{p:?}");
    }

    #[test]
    fn overlong_line_bounded() {
        let (_dir, path) = log_with(2);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        f.write_all(b"\n").unwrap();
        assert!(problems(&path)[0].starts_with("line 3: longer than"));
        let err = AuditLog::open(&path).err().expect("refused").to_string();
        assert!(err.contains("longer than"), "{err}");
    }

    /// A well-chained line added to the log alone, as someone able to append would add it.
    fn forge_next(path: &Path) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        let last = text.lines().last().unwrap();
        let mut entry: Entry = serde_json::from_str(last).unwrap();
        entry.seq += 1;
        entry.prev = line_hash(last.as_bytes());
        entry.target = "forged".into();
        let line = serde_json::to_string(&entry).unwrap();
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(format!("{line}\n").as_bytes()).unwrap();
        line
    }

    #[test]
    fn a_line_appended_past_the_head_is_flagged() {
        let (_dir, path) = log_with(3);
        let head = head_path(&path);
        let head_before = std::fs::read(&head).unwrap();
        forge_next(&path);
        let p = problems(&path);
        assert!(
            p.len() == 1 && p[0].contains("seq 4 runs past the head (seq 3)"),
            "{p:?}"
        );
        let err = AuditLog::open(&path).err().expect("refused").to_string();
        assert!(err.contains("runs past the head"), "{err}");
        assert_eq!(
            std::fs::read(&head).unwrap(),
            head_before,
            "head adopted it"
        );
        forge_next(&path);
        let p = problems(&path);
        assert!(p[0].contains("runs 2 lines past its head (seq 3)"), "{p:?}");
        assert!(AuditLog::open(&path).is_err());
    }

    #[test]
    fn an_announced_line_past_the_head_is_a_crash_and_repaired() {
        let (_dir, path) = log_with(3);
        let head = head_path(&path);
        let at_rest = read_head(&head).unwrap().unwrap();
        // Killed after writing the announced line, before the head caught up.
        let log = AuditLog::open(&path).unwrap();
        add(&log, "job-3");
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let line4 = line_hash(text.lines().last().unwrap().as_bytes());
        let announced = Head {
            next: Some(line4.clone()),
            ..Head::at(at_rest.seq, &at_rest.hash)
        };
        write_head(&head, &announced, true).unwrap();
        assert!(problems(&path).is_empty());
        let log = AuditLog::open(&path).unwrap();
        assert!(read_head(&head).unwrap().unwrap() == Head::at(4, &line4));
        assert_eq!(add(&log, "job-4").seq, 5);
        drop(log);
        assert!(problems(&path).is_empty());
        // The head announces one line only: one more past it is an addition.
        let announced = Head {
            next: Some(hash_of_line(&path, 5)),
            ..Head::at(4, &hash_of_line(&path, 4))
        };
        write_head(&head, &announced, true).unwrap();
        assert!(problems(&path).is_empty());
        forge_next(&path);
        let p = problems(&path);
        assert!(p[0].contains("runs 2 lines past its head (seq 4)"), "{p:?}");
        assert!(AuditLog::open(&path).is_err());
        std::fs::remove_file(&head).unwrap();
        assert!(problems(&path)[0].contains("is missing"));
    }

    fn hash_of_line(path: &Path, n: usize) -> String {
        let text = std::fs::read_to_string(path).unwrap();
        line_hash(text.lines().nth(n - 1).unwrap().as_bytes())
    }

    #[test]
    fn killed_after_the_announcement_before_the_line() {
        let (_dir, path) = log_with(2);
        let head = head_path(&path);
        let rest = read_head(&head).unwrap().unwrap();
        let announced = Head {
            next: Some("ab".repeat(32)),
            ..Head::at(rest.seq, &rest.hash)
        };
        write_head(&head, &announced, true).unwrap();
        assert!(problems(&path).is_empty());
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(add(&log, "job-2").seq, 3);
        assert!(problems(&path).is_empty());
    }

    #[test]
    fn a_failed_append_adds_nothing_and_the_next_one_succeeds() {
        let (_dir, path) = log_with(2);
        let log = AuditLog::open(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        // The head's temporary name taken by a directory: the append cannot announce its line.
        let blocker = with_suffix(&head_path(&path), ".tmp");
        std::fs::create_dir(&blocker).unwrap();
        let root = Who::this_process();
        let failed = log.append(root, "job.submit", "x", "ok", serde_json::Value::Null);
        let err = failed.expect_err("append failed").to_string();
        assert!(err.contains(&blocker.display().to_string()), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "a line was added");
        assert!(problems(&path).is_empty());
        std::fs::remove_dir(&blocker).unwrap();
        assert_eq!(add(&log, "job-2").seq, 3);
        assert!(problems(&path).is_empty());
    }
}
