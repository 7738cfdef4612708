//! Per-site storage: tier backends holding packs, the metadata backend holding manifests, and
//! the index that ties chunk ids to records.

pub mod backend;
pub mod buffers;
pub mod direct;
pub mod index;
pub mod inflight;
pub mod pack_reader;
pub mod pack_writer;
pub mod reclaim;
pub mod repack;
pub mod repair;
pub mod sink;
pub mod site;
pub mod source;

pub use backend::{Appender, Backend, LocalDir};
pub use index::{Index, Location, SealedPack, SnapshotInfo};
pub use site::Store;

pub fn pack_key(pack_id: u64) -> String {
    format!("packs/{:02x}/{pack_id:016x}.pack", pack_id >> 56)
}

pub fn manifest_key(id: &[u8; 32]) -> String {
    let hex = mover_format::hex(id);
    format!("manifests/{}/{hex}", &hex[..2])
}
