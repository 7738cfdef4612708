//! Where a restored file's bytes go. Large files are written with O_DIRECT through
//! [`DirectWriter`] (staged, several writes in flight, each extent allocated first): buffered
//! writes of restored files cost this VM 2.4 ns of kernel time per byte and were most of a
//! restore's CPU (3.9-6.1 s of a 2 GiB restore's client time). Small files, file systems that
//! refuse O_DIRECT (tmpfs) and layouts a direct writer cannot follow go through ordinary
//! positioned writes. Either way holes stay holes, and nothing is synced here: the restore
//! ends with one syncfs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mover_format::error::{Error, Result};
use mover_format::manifest::Extent;
use mover_store::buffers::is_aligned;
use mover_store::direct::{reopen_direct, DirectWriter, STAGE_BYTES};

/// Files below this are written buffered: a direct writer's threads and staging buffers
/// would cost more than the kernel's copy of a few MiB.
pub const DIRECT_RESTORE_MIN_BYTES: u64 = 8 * STAGE_BYTES as u64;

pub enum FileSink {
    Buffered { file: File, path: PathBuf },
    Direct(DirectWriter),
}

impl FileSink {
    /// Takes `file`, just created empty at `path`, and sets its length to `size`, every byte a
    /// hole until written. `direct` says whether O_DIRECT may be tried; it is cleared when the
    /// file system refuses it, so the rest of the restore does not ask again.
    pub fn create(
        file: File,
        path: &Path,
        size: u64,
        extents: &[Extent],
        direct: &mut bool,
    ) -> Result<Self> {
        file.set_len(size)
            .map_err(|e| Error::io("truncate", path, e))?;
        if *direct && size >= DIRECT_RESTORE_MIN_BYTES && direct_layout(extents) {
            match reopen_direct(&file) {
                Ok(direct_file) => {
                    return Ok(FileSink::Direct(DirectWriter::new(
                        file,
                        direct_file,
                        path.to_path_buf(),
                    )))
                }
                // tmpfs and some FUSE file systems refuse O_DIRECT (and without /proc there
                // is no second descriptor): the rest of the restore writes buffered.
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e, "no O_DIRECT here; restoring with buffered writes");
                    *direct = false;
                }
            }
        }
        Ok(FileSink::Buffered {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn is_direct(&self) -> bool {
        matches!(self, FileSink::Direct(_))
    }

    /// The next bytes written belong to an extent of `len` bytes at `offset`.
    pub fn start_extent(&mut self, offset: u64, len: u64) -> Result<()> {
        if let FileSink::Direct(writer) = self {
            writer.skip_to(offset)?;
            writer.reserve(offset, len);
        }
        Ok(())
    }

    /// Writes `data` at `at`: within the current extent, right after what came before it.
    pub fn write_parts(&mut self, mut at: u64, parts: &[&[u8]]) -> Result<()> {
        match self {
            FileSink::Buffered { file, path } => {
                let path = &*path;
                for part in parts {
                    file.write_all_at(part, at)
                        .map_err(|e| Error::io("write", path, e))?;
                    at += part.len() as u64;
                }
                Ok(())
            }
            FileSink::Direct(writer) => {
                debug_assert_eq!(writer.len(), at);
                writer.append(parts).map(|_| ())
            }
        }
    }

    /// Waits until every byte is written (not synced).
    pub fn finish(self) -> Result<()> {
        match self {
            FileSink::Buffered { .. } => Ok(()),
            FileSink::Direct(writer) => writer.finish().map(drop),
        }
    }
}

/// Whether a direct writer can follow these extents: aligned starts, in order, no overlap.
/// (A manifest from this engine always qualifies; anything else is written buffered.)
fn direct_layout(extents: &[Extent]) -> bool {
    let mut end = 0u64;
    for extent in extents {
        if !is_aligned(extent.offset) || extent.offset < end {
            return false;
        }
        end = extent.offset.saturating_add(extent.len());
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use mover_format::manifest::ChunkRef;
    use mover_format::ChunkId;

    fn extent(offset: u64, lens: &[u32]) -> Extent {
        Extent {
            offset,
            chunks: lens
                .iter()
                .map(|&len| ChunkRef {
                    id: ChunkId([0; 32]),
                    len,
                })
                .collect(),
        }
    }

    #[test]
    fn only_aligned_ordered_extents_go_direct() {
        assert!(direct_layout(&[extent(0, &[4096, 10]), extent(8192, &[1])]));
        assert!(!direct_layout(&[extent(100, &[1])]));
        assert!(!direct_layout(&[extent(8192, &[1]), extent(0, &[1])]));
        assert!(!direct_layout(&[extent(0, &[8192]), extent(4096, &[1])]));
    }

    #[test]
    fn a_sparse_file_is_written_exactly() {
        // Two extents with a hole between them and an unaligned end, through the direct
        // writer and through positioned writes, data in parts (as a peer's pieces): the
        // bytes land where the extents say and the hole reads as zeros.
        for direct in [true, false] {
            sparse_file_round_trip(direct);
        }
    }

    fn sparse_file_round_trip(mut direct: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.bin");
        let first: Vec<u8> = (0..3 * STAGE_BYTES + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let second: Vec<u8> = (0..STAGE_BYTES + 5).map(|i| (i % 13) as u8 + 1).collect();
        let hole_at = 16 * STAGE_BYTES as u64;
        let size = hole_at + second.len() as u64;
        let extents = [
            extent(0, &[first.len() as u32]),
            extent(hole_at, &[second.len() as u32]),
        ];
        let wanted = direct;
        let file = std::fs::File::create_new(&path).unwrap();
        let mut sink = FileSink::create(file, &path, size, &extents, &mut direct).unwrap();
        if wanted && !sink.is_direct() {
            // The positioned-write round still runs.
            eprintln!(
                "{} refuses O_DIRECT: direct round skipped",
                dir.path().display()
            );
            return;
        }
        assert!(!sink.is_direct() || wanted);
        sink.start_extent(0, first.len() as u64).unwrap();
        sink.write_parts(0, &[&first[..1000]]).unwrap();
        sink.write_parts(1000, &[&first[1000..70_000], &[], &first[70_000..]])
            .unwrap();
        sink.start_extent(hole_at, second.len() as u64).unwrap();
        sink.write_parts(hole_at, &[&second[..5], &second[5..]])
            .unwrap();
        sink.finish().unwrap();
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len() as u64, size);
        assert!(written[..first.len()] == first[..]);
        assert!(written[first.len()..hole_at as usize]
            .iter()
            .all(|&b| b == 0));
        assert!(written[hole_at as usize..] == second[..]);
    }
}
