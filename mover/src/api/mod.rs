//! The daemon's API: HTTP/1.1 + JSON on a Unix socket, so `curl --unix-socket` works.
//!
//! - [`server`]: the socket (mode, group, atomic creation), the caller check by SO_PEERCRED,
//!   hyper's HTTP/1.1 connection with bounded heads, bodies and connection count.
//! - [`routes`]: the endpoints and their JSON.
//! - [`client`]: the CLI's side of the socket.

pub mod client;
pub mod routes;
pub mod server;

/// Who is calling, from the socket's peer credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

impl Caller {
    pub fn who(&self) -> crate::audit::Who {
        crate::audit::Who {
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }
}
