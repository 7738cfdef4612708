//! mover as one library: the layers under `mover/`, re-exported under the names the binary,
//! the integration tests, `bench/`, `tools/` and `fuzz/` use. Nothing is defined here; each
//! module below lives in the crate named beside it (ARCHITECTURE.md, "Crates"), bottom first:
//!
//! - `mover-format`: [`constants`] (every limit), [`error`], [`format`] (ids, pack and manifest
//!   codecs), [`time`].
//! - `mover-metrics`: [`metrics`]. `mover-config`: [`config`].
//! - `mover-store`: [`store`] (backends, packs, index, catalog), [`buffers`], [`repair`].
//! - `mover-peer`: [`peers`], [`remote`].
//! - `mover-engine`: [`site`], [`backup`], [`restore`], [`verify`], [`replicate`], [`scan`],
//!   [`worker`], [`job`], [`node_bench`] and the stages they use.
//! - `mover-daemon`: [`jobs`], [`api`], [`audit`], [`daemon`], [`quickstart`].

pub use mover_config as config;
pub use mover_format as format;
pub use mover_format::{constants, error, time, Error, Result};
pub use mover_metrics as metrics;
pub use mover_store as store;
pub use mover_store::{buffers, repair};

pub use mover_peer::{peers, remote};

pub use mover_engine::{
    backup, chunker, compress, job, node_bench, replicate, restore, restore_sink, restore_target,
    scan, site, verify, window, worker,
};

pub use mover_daemon::{api, audit, daemon, jobs, quickstart};
