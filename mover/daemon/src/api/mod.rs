//! The daemon's API: HTTP/1.1 + JSON on a Unix socket, so `curl --unix-socket` works.
//!
//! Dependencies point one way: `server` → `routes` → `access`, `refusals`.
//!
//! - [`server`]: the socket (mode, group, atomic creation), the accept loop that reads each
//!   caller by SO_PEERCRED, hyper's HTTP/1.1 connections with bounded heads and count.
//! - [`routes`]: the axum router: the endpoints and their JSON, the caller check, request
//!   metrics and the body bound as layers.
//! - [`access`]: who may call (`[api]`), judged once per connection.
//! - [`refusals`]: how often refused callers are audited.
//! - [`client`]: the CLI's side of the socket.

pub mod access;
pub mod client;
pub mod refusals;
pub mod routes;
pub mod server;
