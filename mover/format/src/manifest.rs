//! Snapshot manifests: the file tree of one backup, stored as a content-addressed object.
//! This module holds the entry types and version 1 (one postcard value, written by builds
//! before streaming manifests; still read). New backups write version 2, the same entries in
//! bounded blocks (`manifest_blocks`).
//!
//! ```text
//! object  = "MVMANI01" codec:u8 reserved:[3]=0 raw_len:u32 stored_len:u32 reserved:u32=0
//!           payload_xxh3:u64                                                   (32 bytes)
//!           payload[stored_len]
//! ```
//! `payload` is the postcard encoding (<https://postcard.jamesmunns.com/wire-format>) of
//! [`Manifest`], lz4-block compressed when `codec` = 1. The object's name, and the snapshot id,
//! is the hex BLAKE3 of the uncompressed postcard bytes.
//!
//! Paths are raw bytes (Linux names need not be UTF-8), relative to the backed-up root,
//! separated by `/`; the root itself has the empty path. Entries are in depth-first order with
//! siblings sorted by name bytes, so a directory comes before its contents and the first path
//! of a hardlinked inode comes before the links to it.

use serde::{Deserialize, Serialize};

use super::{read_u32, read_u64, ChunkId, Codec};
use crate::constants::{MANIFEST_BYTES_MAX, PATH_BYTES_MAX};
use crate::error::Error;
use xxhash_rust::xxh3::xxh3_64;

pub const MANIFEST_MAGIC: &[u8; 8] = b"MVMANI01";
pub const MANIFEST_HEADER_BYTES: usize = 32;
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Absolute path that was backed up, as given after canonicalisation.
    pub source: Vec<u8>,
    pub hostname: String,
    pub site: String,
    pub tier: String,
    pub created_unix_ns: i64,
    /// The snapshot whose unchanged files were reused, if any.
    pub parent: Option<[u8; 32]>,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// ctime, inode and device are recorded only to decide, on the next backup, whether the
    /// file can be reused without reading it. Restore cannot set them.
    pub ctime_ns: i64,
    pub inode: u64,
    pub device: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Directory,
    /// A regular file of `size` bytes. Extents are its data; gaps between them are holes.
    File {
        size: u64,
        extents: Vec<Extent>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another path of the same inode as the earlier entry `target`.
    Hardlink {
        target: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

impl Extent {
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

impl Entry {
    /// Bytes of data the entry holds (not counting holes).
    pub fn data_bytes(&self) -> u64 {
        match &self.kind {
            EntryKind::File { extents, .. } => extents.iter().map(Extent::len).sum(),
            _ => 0,
        }
    }
}

/// An encoded manifest object and its id.
pub struct EncodedManifest {
    pub id: [u8; 32],
    pub bytes: Vec<u8>,
}

/// Encodes `manifest` in the format its `version` names (2: `manifest_blocks`).
pub fn encode(manifest: &Manifest) -> Result<EncodedManifest, Error> {
    if manifest.version == super::manifest_blocks::MANIFEST_V2_VERSION {
        return super::manifest_blocks::encode(manifest);
    }
    let raw = postcard::to_stdvec(manifest)
        .map_err(|e| Error::corrupt("manifest", format!("encoding failed: {e}")))?;
    if raw.len() > MANIFEST_BYTES_MAX {
        return Err(Error::Resource(format!(
            "manifest of {} bytes exceeds the {MANIFEST_BYTES_MAX}-byte limit: split the backup into smaller trees",
            raw.len()
        )));
    }
    let id = *blake3::hash(&raw).as_bytes();
    let compressed = lz4_flex::block::compress(&raw);
    let (codec, payload) = if compressed.len() < raw.len() {
        (Codec::Lz4, compressed)
    } else {
        (Codec::Raw, raw.clone())
    };
    let mut bytes = Vec::with_capacity(MANIFEST_HEADER_BYTES + payload.len());
    bytes.extend_from_slice(MANIFEST_MAGIC);
    bytes.push(codec as u8);
    bytes.extend_from_slice(&[0u8; 3]);
    bytes.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    Ok(EncodedManifest { id, bytes })
}

/// Decodes and checks a whole manifest object of either version. `expected_id`, when given,
/// must match its content.
pub fn decode(bytes: &[u8], expected_id: Option<&[u8; 32]>) -> Result<Manifest, Error> {
    if bytes.starts_with(super::manifest_blocks::MANIFEST_V2_MAGIC) {
        return super::manifest_blocks::ManifestStream::open(bytes, expected_id)?.collect();
    }
    let bad = |detail: String| Error::corrupt("manifest", detail);
    if bytes.len() < MANIFEST_HEADER_BYTES || &bytes[..8] != MANIFEST_MAGIC {
        return Err(bad("expected magic MVMANI01".into()));
    }
    let codec =
        Codec::from_u8(bytes[8]).ok_or_else(|| bad(format!("unknown codec {}", bytes[8])))?;
    let raw_len = read_u32(bytes, 12) as usize;
    let stored_len = read_u32(bytes, 16) as usize;
    if raw_len > MANIFEST_BYTES_MAX || stored_len > raw_len {
        return Err(bad(format!(
            "lengths raw {raw_len} stored {stored_len} out of bounds"
        )));
    }
    let payload = &bytes[MANIFEST_HEADER_BYTES..];
    if payload.len() != stored_len {
        return Err(bad(format!(
            "payload is {} bytes, header says {stored_len}",
            payload.len()
        )));
    }
    if xxh3_64(payload) != read_u64(bytes, 24) {
        return Err(bad("payload checksum (xxh3) mismatch".into()));
    }
    let raw = match codec {
        Codec::Raw => payload.to_vec(),
        Codec::Lz4 => {
            let mut out = vec![0u8; raw_len];
            let n = lz4_flex::block::decompress_into(payload, &mut out)
                .map_err(|e| bad(format!("lz4 payload: {e}")))?;
            if n != raw_len {
                return Err(bad(format!(
                    "decompressed to {n} bytes, expected {raw_len}"
                )));
            }
            out
        }
    };
    if let Some(id) = expected_id {
        if blake3::hash(&raw).as_bytes() != id {
            return Err(bad(
                "content hash (BLAKE3) does not match the snapshot id".into()
            ));
        }
    }
    let manifest: Manifest =
        postcard::from_bytes(&raw).map_err(|e| bad(format!("postcard: {e}")))?;
    if manifest.version != MANIFEST_VERSION {
        return Err(bad(format!(
            "version {}, expected {MANIFEST_VERSION}",
            manifest.version
        )));
    }
    Ok(manifest)
}

/// The order of entries in a manifest: depth first with siblings sorted by name bytes, which
/// is comparing paths component by component (so `a/b` comes before `a-c`, and a directory
/// before its contents).
pub fn path_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if a.is_empty() || b.is_empty() {
        return a.len().cmp(&b.len());
    }
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// Whether `ancestor` is a proper ancestor directory of `path` (the root, `""`, is of all).
pub fn is_ancestor(ancestor: &[u8], path: &[u8]) -> bool {
    ancestor.is_empty() && !path.is_empty()
        || path.len() > ancestor.len() && path.starts_with(ancestor) && path[ancestor.len()] == b'/'
}

/// Why a manifest path may not be restored, if it may not. Restore calls this for every entry:
/// a manifest is data from disk (or a peer) and may have been crafted.
pub fn check_relative_path(path: &[u8]) -> Result<(), String> {
    if path.is_empty() {
        return Ok(());
    }
    if path.len() > PATH_BYTES_MAX {
        return Err(format!(
            "path of {} bytes exceeds {PATH_BYTES_MAX}",
            path.len()
        ));
    }
    if path[0] == b'/' {
        return Err("absolute path".into());
    }
    if path.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" => return Err("empty path component".into()),
            b"." | b".." => {
                return Err(format!(
                    "'{}' path component",
                    String::from_utf8_lossy(component)
                ))
            }
            c if c.len() > 255 => return Err("path component longer than 255 bytes".into()),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            source: b"/data".to_vec(),
            hostname: "node1".into(),
            site: "onprem".into(),
            tier: "hot".into(),
            created_unix_ns: 1,
            parent: None,
            entries: vec![
                Entry {
                    path: vec![],
                    kind: EntryKind::Directory,
                    mode: 0o40755,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 5,
                    ctime_ns: 6,
                    inode: 7,
                    device: 8,
                },
                Entry {
                    path: b"caf\xe9".to_vec(),
                    kind: EntryKind::File {
                        size: 10,
                        extents: vec![Extent {
                            offset: 0,
                            chunks: vec![ChunkRef {
                                id: ChunkId([1; 32]),
                                len: 10,
                            }],
                        }],
                    },
                    mode: 0o100644,
                    uid: 1,
                    gid: 2,
                    mtime_ns: -3,
                    ctime_ns: 4,
                    inode: 9,
                    device: 8,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_id() {
        let m = sample();
        let encoded = encode(&m).unwrap();
        assert_eq!(decode(&encoded.bytes, Some(&encoded.id)).unwrap(), m);
        assert!(decode(&encoded.bytes, Some(&[0; 32])).is_err());
        let mut damaged = encoded.bytes.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(decode(&damaged, None).is_err());
    }

    #[test]
    fn path_order_is_depth_first_by_component() {
        use std::cmp::Ordering::*;
        assert_eq!(path_order(b"", b"a"), Less);
        assert_eq!(path_order(b"a/b", b"a-c"), Less);
        assert_eq!(path_order(b"a", b"a/b"), Less);
        assert_eq!(path_order(b"a/z", b"b"), Less);
        assert_eq!(path_order(b"a/b", b"a/b"), Equal);
        assert!(is_ancestor(b"", b"a") && is_ancestor(b"a", b"a/b"));
        assert!(!is_ancestor(b"a", b"ab") && !is_ancestor(b"a", b"a") && !is_ancestor(b"", b""));
    }

    #[test]
    fn escaping_paths_are_named() {
        assert!(check_relative_path(b"a/b/c").is_ok());
        assert!(check_relative_path(b"").is_ok());
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../b",
            b"..",
            b"a//b",
            b"a/",
            b"./a",
            b"a\0b",
        ] {
            assert!(
                check_relative_path(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..400), keep_header in any::<bool>()) {
            if keep_header && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(MANIFEST_MAGIC);
            }
            let _ = decode(&bytes, None);
        }

        #[test]
        fn arbitrary_postcard_payloads_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = postcard::from_bytes::<Manifest>(&raw);
        }
    }
}
