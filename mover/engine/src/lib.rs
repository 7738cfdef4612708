//! mover's engine: the thread-per-core backup, restore, verify and replicate paths of one site.
//!
//! - [`site`] is a site opened for jobs: its store (`mover-store`) and this process's links
//!   to peers (`mover-peer`).
//! - [`backup`] runs a job: [`scan`] walks the tree and feeds extents to pinned [`worker`]s,
//!   which read them with io_uring into registered buffers, cut them with the [`chunker`],
//!   hash, [`compress`] and store new chunks (into this site's packs or shipped to a peer);
//!   the control thread writes the manifest as it goes and commits it last.
//! - [`restore`] (writing through [`restore_target`] and [`restore_sink`]) and [`verify`] read
//!   snapshots back, checking every chunk; [`replicate`] copies one to a peer.
//! - [`job`] is what every job shares: its control (cancel, progress), state and report.
//! - [`node_bench`] measures this node for `mover bench`.

pub mod backup;
pub mod chunker;
pub mod compress;
pub mod job;
pub mod node_bench;
pub mod replicate;
pub mod restore;
pub mod restore_sink;
pub mod restore_target;
pub mod scan;
pub mod site;
pub mod verify;
pub mod window;
pub mod worker;
