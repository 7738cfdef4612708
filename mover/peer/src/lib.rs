//! The peer layer: how this site talks to others over `transport`'s QUIC.
//!
//! - [`peers`]: the configured peers resolved into links, each with the one bucket capping
//!   what this process sends to it, and `mover peer add`.
//! - [`remote`]: the process's endpoint and runtime, the client side (shipping chunks, manifest
//!   lookup and commit, chunk fetch for restores) and the server side (a peer's streams into
//!   this site's store).
//!
//! It stores through `mover-store` and knows nothing of jobs: the engine drives the client,
//! the daemon runs the server.

pub mod peers;
pub mod remote;
