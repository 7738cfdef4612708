//! The daemon's API: HTTP/1.1 + JSON on a Unix socket, so `curl --unix-socket` works.
//!
//! - [`server`]: the socket (mode, group, atomic creation), the caller check by SO_PEERCRED,
//!   hyper's HTTP/1.1 connection with bounded heads, bodies and connection count.
//! - [`routes`]: the endpoints and their JSON.
//! - [`refusals`]: how often refused callers are audited.
//! - [`client`]: the CLI's side of the socket.

pub mod client;
pub mod refusals;
pub mod routes;
pub mod server;
