//! mover's engine: one site's store and the thread-per-core backup, restore and verify paths.
//!
//! - [`site`] opens a site directory: [`config`], the [`store`] (tier backends, pack files,
//!   redb index and catalog) and the identity.
//! - [`backup`] runs a job: [`scan`] plans extents on the control thread, pinned [`worker`]s
//!   read them with io_uring into registered [`buffers`], cut them with the [`chunker`], hash,
//!   compress and append new chunks to packs; the control thread assembles the manifest
//!   ([`format::manifest`]) and commits it last.
//! - [`restore`] and [`verify`] read snapshots back, checking every chunk; [`repair`] rebuilds
//!   a lost index.
//! - [`constants`] holds every limit; [`format`] every on-disk encoding.

pub mod api;
pub mod audit;
pub mod backup;
pub mod buffers;
pub mod chunker;
pub mod compress;
pub mod config;
pub mod constants;
pub mod daemon;
pub mod error;
pub mod format;
pub mod job;
pub mod jobs;
pub mod metrics;
pub mod node_bench;
pub mod peers;
pub mod quickstart;
pub mod remote;
pub mod repair;
pub mod replicate;
pub mod restore;
pub mod restore_sink;
pub mod restore_target;
pub mod sample;
pub mod scan;
pub mod site;
pub mod store;
pub mod verify;
pub mod window;
pub mod worker;

pub use error::{Error, Result};
