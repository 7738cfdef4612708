//! Every limit of the engine in one place, with the reason for its value.
//!
//! Decoders of bytes from disk check against these before allocating, so a corrupt or hostile
//! pack or manifest cannot make mover allocate more than these bounds.

/// FastCDC bounds. 1 MiB average keeps the index small (1 entry per MiB stored) while a 2% edit
/// of a multi-GiB checkpoint still costs only the chunks it touches.
pub const CHUNK_BYTES_MIN: usize = 256 * 1024;
pub const CHUNK_BYTES_AVG: usize = 1024 * 1024;
pub const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Files are cut into extents on a fixed grid of this size; chunking restarts at each extent.
/// That makes chunk boundaries independent of which worker reads which extent, and lets
/// several workers share one large file.
pub const EXTENT_BYTES: u64 = 64 * 1024 * 1024;

/// Direct I/O alignment of offsets, lengths and buffer addresses (the logical block size of
/// every device we expect; 512-byte devices accept it too).
pub const IO_ALIGNMENT: usize = 4096;

/// Size of one direct read. Measured here (4 GiB backup, 2 workers): 3 x 1 MiB per worker
/// 0.83 GB/s, 6 x 512 KiB 0.67 GB/s, 4 x 512 KiB 0.60 GB/s; larger reads matter more than
/// more of them.
pub const READ_BUFFER_BYTES_DEFAULT: usize = 1024 * 1024;
/// Reads in flight per worker. 3, 4, 6 and 8 x 1 MiB measured alike on a cross-site backup
/// from this machine's disk, which reads ~0.95 GB/s from QD 2 upwards (BENCHMARKS.md).
pub const READS_PER_WORKER: usize = 3;

/// Default share of RLIMIT_MEMLOCK the registered chunk windows may take (3/4), leaving room
/// for the rings themselves on kernels older than 5.12, which still charge them to the limit.
pub const IO_MEMORY_SHARE_OF_MEMLOCK: (u64, u64) = (3, 4);
/// Cap on the default registered memory when the limit is large or unlimited.
pub const IO_MEMORY_BYTES_DEFAULT_MAX: u64 = 64 * 1024 * 1024;

/// A pack is sealed once it reaches this size: big enough that a tier holds few files and
/// migrations move large objects, small enough to re-upload on failure.
pub const PACK_BYTES_TARGET_DEFAULT: u64 = 128 * 1024 * 1024;
/// Bounds of `engine.pack_target_bytes`. Below: a pack must hold the largest chunk and the one
/// that crosses the target. Above: every open pack (one per worker and per received stream)
/// reserves its target with `fallocate` until it is sealed, and a pack is the unit a migration
/// moves or an upload retries; per-pack costs (a seal's fdatasync and directory fsync, one
/// index commit) stopped mattering long before 1 GiB.
pub const PACK_BYTES_TARGET_MIN: u64 = 2 * CHUNK_BYTES_MAX as u64;
pub const PACK_BYTES_TARGET_MAX: u64 = 1024 * 1024 * 1024;

/// A worker also seals its pack at this many records. Everything a pack costs until its
/// commit grows with its records, not its bytes: the footer entries (52 B each), the site's
/// in-flight claims and the index transaction that commits it. Small files make tiny records
/// (1 M files of 0-96 bytes fit one 128 MiB pack), so without this a backup of many small
/// files held a claim and a footer entry per file until its end.
pub const PACK_RECORDS_TARGET: usize = 65_536;

/// Small packs: a pack under 1/4 of the pack target is small. A small incremental backup
/// seals one per worker that stored anything; once a tier holds this many small packs, the
/// next local backup merges them (`store::repack`), so a tier holds at most about this many
/// small files however many jobs ran, and a merge copies at most one pack target.
pub const SMALL_PACK_SHARE_OF_TARGET: u64 = 4;
pub const SMALL_PACKS_MERGE_AT: usize = 16;

/// Work items queued ahead of the workers; bounds the scanner's lead (and its memory).
pub const WORK_QUEUE_DEPTH: usize = 256;
/// Results waiting for the control thread.
pub const RESULT_QUEUE_DEPTH: usize = 256;

/// Compression must save at least 1/32 (3%) of a chunk to be kept; below that the CPU spent
/// on every later decompression is not repaid.
pub const COMPRESSION_SAVING_DIVISOR: usize = 32;

/// Upper bound of a decoded manifest. A file entry with its chunk list costs about
/// 100 B + 36 B per MiB of data; 1 GiB covers roughly ten million files.
pub const MANIFEST_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// A version-2 manifest is written in blocks of about this many raw (postcard) bytes, each
/// compressed and checked on its own, so writer and reader hold one block at a time.
pub const MANIFEST_BLOCK_BYTES: usize = 1024 * 1024;

/// Upper bound of one decoded manifest block: one entry must fit (a file's chunk list costs
/// 37 B per chunk, so 16 MiB holds a file of ~450 000 chunks, ~450 TB at the average size).
pub const MANIFEST_BLOCK_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Most entries in one manifest block (an entry takes at least 16 postcard bytes, so a
/// block the writer closes at `MANIFEST_BLOCK_BYTES` holds fewer).
pub const MANIFEST_BLOCK_ENTRIES_MAX: usize = 65_536;

/// Good chunks a verify remembers, so a chunk many files reference is read once: 1 Mi ids
/// (about 40 MiB with the hash set's overhead) cover 1 TiB of distinct data at the average
/// chunk size. Past it the set starts again, and a chunk referenced after that is read again
/// (the same answer, one more read); damaged chunks are always remembered (each is in the
/// report anyway).
pub const VERIFY_GOOD_CHUNKS_MAX: usize = 1 << 20;

/// Entries a backup holds between the scan and the manifest writer: those after the oldest
/// file still being read. The scan waits beyond this, which bounds the backup's memory
/// whatever the tree's size.
pub const BACKUP_PENDING_ENTRIES_MAX: usize = 65_536;

/// Pages of the index redb keeps in memory. Its default (1 GiB) let a site's resident memory
/// grow with its chunk count (~100 B a chunk: 1 M small files made a backup's RSS 243 MiB);
/// the pages beyond this are read from the page cache when needed.
pub const INDEX_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Longest path and link target accepted from a manifest (Linux PATH_MAX).
pub const PATH_BYTES_MAX: usize = 4096;

const _: () = assert!(MANIFEST_BLOCK_BYTES * 4 <= MANIFEST_BLOCK_BYTES_MAX);
const _: () = assert!(MANIFEST_BLOCK_BYTES_MAX <= MANIFEST_BYTES_MAX);
const _: () = assert!(MANIFEST_BLOCK_ENTRIES_MAX * 16 >= MANIFEST_BLOCK_BYTES);
const _: () = assert!(CHUNK_BYTES_MIN < CHUNK_BYTES_AVG && CHUNK_BYTES_AVG < CHUNK_BYTES_MAX);
const _: () = assert!(EXTENT_BYTES as usize >= 4 * CHUNK_BYTES_MAX);
const _: () = assert!(EXTENT_BYTES as usize % IO_ALIGNMENT == 0);
const _: () = assert!(READ_BUFFER_BYTES_DEFAULT % IO_ALIGNMENT == 0);
const _: () = assert!(
    PACK_BYTES_TARGET_MIN < PACK_BYTES_TARGET_DEFAULT
        && PACK_BYTES_TARGET_DEFAULT <= PACK_BYTES_TARGET_MAX
);
// Record lengths are stored as u32.
const _: () = assert!(CHUNK_BYTES_MAX <= u32::MAX as usize);

/// Cross-site shipping: a worker gathers new chunks into a batch of about this many bytes
/// before asking the destination which it lacks (one Query of ≤ 1024 ids). Four batches may
/// wait for answers while a fifth fills: two already cover a 50 ms × 1 Gbit/s path (6 MB in
/// flight) per worker in steady state, four keep the pipe full while BBR ramps up and after a
/// loss (+3 points of that link, BENCHMARKS.md). Sender memory per worker:
/// ≤ (4 + 1) × (batch + one maximum chunk).
pub const SHIP_BATCH_BYTES: usize = 8 * 1024 * 1024;
pub const SHIP_QUERIES_IN_FLIGHT: usize = 4;

/// Credit a receiver grants each Store stream: chunk bytes sent and not yet acknowledged as
/// durable. The receiver seals its pack at half of it, so an acknowledgement always comes
/// before the sender runs out; what a crash can make a resumed job resend is bounded by it.
pub const RECEIVE_UNACKED_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// A received raw chunk whose pieces average at least this is hashed and written from the
/// pieces; below it they are gathered into one buffer first, since many small parts cost
/// more than one copy. (The frame reader already copies runs of pieces under 16 KiB
/// together; this catches a chunk whose pieces alternate around that size.)
pub const PIECE_BYTES_FOR_HASHING_IN_PLACE: usize = 16 * 1024;

/// Peer connections a daemon serves at once; each may buffer up to its connection window.
pub const PEER_CONNECTIONS_MAX: usize = 64;

/// A Bench stream (`mover bench link`) a daemon serves is cut after this much data or this
/// long, whichever comes first: it stores nothing, but it takes the link and a runtime thread's
/// time from real jobs. 64 GiB is 10 s at 50 Gbit/s; the time bound is what stops a slow peer.
/// At most `BENCH_STREAMS_MAX` run at once per daemon; more are refused.
pub const BENCH_BYTES_MAX: u64 = 64 << 30;
pub const BENCH_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(30);
pub const BENCH_STREAMS_MAX: usize = 2;
/// What `mover bench link` sends by default (unless `--seconds` pass first): the bounds above
/// leave it room.
pub const BENCH_LINK_BYTES_DEFAULT: u64 = 1 << 30;
pub const BENCH_LINK_SECONDS_DEFAULT: u64 = 10;
const _: () = assert!(BENCH_LINK_BYTES_DEFAULT <= BENCH_BYTES_MAX);
const _: () = assert!(BENCH_LINK_SECONDS_DEFAULT < BENCH_TIME_MAX.as_secs());

/// A receiving daemon forgets the newest attempt of a peer's job (`remote::attempts`) once no
/// stream of the job has been open for this long. An older attempt's stream can only arrive on
/// a connection that was alive, and a connection whose sender is gone times out after 10 s
/// idle (`transport::quic`); a minute keeps a margin for a stream whose opening waits behind
/// its connection's flow control. Memory: one small entry per job seen in the last minute.
pub const PEER_ATTEMPTS_FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Chunk ids a restore asks a peer for ahead of what it has written.
pub const FETCH_IDS_IN_FLIGHT: usize = 2048;

/// Batches of a remote restore's chunk order (each at most one Fetch frame's ids, 1024) read
/// ahead of the fetch: enough to keep `FETCH_IDS_IN_FLIGHT` asked for while the order thread
/// decodes the next manifest block; 4 x 1024 x 32 B = 128 KiB whatever the snapshot's size.
pub const FETCH_ORDER_BATCHES_QUEUED: usize = 4;

const _: () = assert!(SHIP_BATCH_BYTES >= CHUNK_BYTES_MAX);
const _: () = assert!(RECEIVE_UNACKED_BYTES_MAX >= 4 * (SHIP_BATCH_BYTES as u64));

/// The API socket when neither the config nor the caller names one (`/run/mover` is where
/// systemd's RuntimeDirectory=mover puts it).
pub const API_SOCKET_DEFAULT: &str = "/run/mover/mover.sock";
/// Largest request body the API reads (a job request is a few hundred bytes).
pub const API_BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest request head (request line and headers) the API parses.
pub const API_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Connections served at once; more wait in the listen backlog.
pub const API_CONNECTIONS_MAX: usize = 256;
/// A client must send a complete request head within this time.
pub const API_HEAD_TIMEOUT_S: u64 = 10;
/// Longest a `wait` request is held open before answering with the job as it stands.
pub const API_WAIT_S_MAX: u64 = 3600;
/// A refused caller's first refusal is audited, further ones within this window are counted
/// into one line: a flood costs two audit lines a window per uid, not one per request.
pub const API_REFUSAL_WINDOW_S: u64 = 60;
/// Jobs waiting in the queue; a submit beyond this is refused (503) rather than queued.
pub const JOBS_QUEUED_MAX_DEFAULT: usize = 10_000;
/// Ended jobs whose records the daemon keeps in memory (the newest); older ones are read from
/// the queue table when asked for, so memory stays bounded however many the table keeps.
pub const ENDED_JOBS_IN_MEMORY_MAX: usize = 1000;
/// Ended jobs kept in the queue table by default (`api.ended_jobs_kept`): a week of a busy
/// scheduler's jobs, a few tens of MB of rows.
pub const ENDED_JOBS_KEPT_DEFAULT: usize = 10_000;
/// Days an ended job stays in the queue table by default (`api.ended_jobs_kept_days`): long
/// enough for a scheduler's retries and a person's look the next morning or after a holiday.
pub const ENDED_JOBS_KEPT_DAYS_DEFAULT: u32 = 30;
/// Longest idempotency key accepted.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// How long a draining daemon waits for running jobs to checkpoint before it exits anyway.
pub const DRAIN_WAIT_S: u64 = 60;

/// A daemon job that fails with a transient peer error (the peer is shutting down or
/// restarting, the path dropped) goes back to the queue and runs again after a wait that
/// doubles from 2 s up to 5 min: 2, 4, 8, … 256, 300, 300 s. The first retries catch a peer
/// restart (seconds); the cap keeps a peer down for maintenance from being dialled more than
/// every few minutes. After 20 retries (about 70 min of waiting) the job fails with the peer's
/// last error. A retried backup resumes: what the peer acknowledged is not sent again.
pub const PEER_RETRY_DELAY_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
pub const PEER_RETRY_DELAY_MAX: std::time::Duration = std::time::Duration::from_secs(300);
pub const PEER_RETRIES_MAX: u32 = 20;
