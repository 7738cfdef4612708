//! The command's output. A reader that goes away (`mover jobs | head -3`) ends the command
//! quietly, as it ends coreutils (killed by SIGPIPE), where `println!` would panic: Rust
//! ignores SIGPIPE so that sockets report EPIPE, and the API client relies on that.

use std::io::Write;

/// Writes `args` and a newline to stdout (or stderr).
pub fn line(to_stderr: bool, args: std::fmt::Arguments) {
    let written = if to_stderr {
        let mut err = std::io::stderr().lock();
        err.write_fmt(args).and_then(|()| err.write_all(b"\n"))
    } else {
        let mut out = std::io::stdout().lock();
        out.write_fmt(args)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush())
    };
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => reader_gone(),
        Err(e) if !to_stderr => {
            // A full disk under a redirect: the output is incomplete, say so.
            let _ = writeln!(std::io::stderr(), "mover: writing the output: {e}");
            std::process::exit(crate::exit::FAILED.into());
        }
        // Nowhere left to say it.
        Err(_) => std::process::exit(crate::exit::FAILED.into()),
    }
}

/// Ends the process the way a closed pipe ends any Unix filter.
fn reader_gone() -> ! {
    // SAFETY: restoring a signal's default disposition and raising it on this thread; the
    // default action ends the whole process.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(128 + libc::SIGPIPE)
}
