//! mover's daemon: what turns the engine into a service.
//!
//! - [`jobs`]: typed job requests, the board (queue, retries, idempotency) and the runner
//!   that dispatches a request to the engine.
//! - [`api`]: the Unix-socket HTTP API and its client.
//! - [`audit`]: the append-only record of who asked for what.
//! - [`daemon`]: the process: threads, peer server, reload, shutdown.
//! - [`quickstart`]: the README's first command, end to end on an embedded default.

pub mod api;
pub mod audit;
pub mod daemon;
pub mod jobs;
pub mod quickstart;
