//! The receiving end of a Store stream, with the network and the disk kept apart.
//!
//! Three parts per stream: a reader task pulls frames off the QUIC stream (a Chunk's payload
//! stays in the pieces quinn received it in, owned, not copied); the stream's task applies the
//! sans-IO [`StoreReceiver`], answers queries and sends Acks; a store thread of its own
//! verifies each chunk (BLAKE3 against its id), appends it to a pack, seals and commits, and
//! reports what is durable. Before, the task did all of it on a runtime thread: a chunk
//! waiting for a pack staging buffer, or a seal waiting for fdatasync, held up the thread's
//! other connections and the acks quinn owed the sender, which read as RTT and cost the
//! sender's congestion window (BENCHMARKS.md, "Cross-site").
//!
//! What a peer can make one Store stream hold: its QUIC stream window, plus
//! `INBOUND_QUEUE + STORE_QUEUE_CHUNKS + 3` chunk frames (≤ 4 MiB + 37 B each, plus the
//! receive buffers behind their large pieces, see `FrameReader::next_piecewise`) in flight
//! between the three parts, plus the open pack's staging buffers, plus up to a pack target
//! of chunks deferred while another writer of the site stores them (`PackStore::deferred`).
//!
//! Each chunk is stored once per site even when several writers receive it at the same time
//! (another stream, a resumed sender's stale stream still draining, a local job): the store
//! thread claims it in the site's in-flight set (`store::inflight`) and acknowledges a chunk
//! another writer claimed only once that writer committed it. A stream whose sender named its
//! attempt (version 2) stops, without committing more, once a newer attempt of the same job
//! began (`super::attempts`): the stale stream's claims then end at once instead of at its
//! connection's timeout.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use transport::frame::{self, ErrorCode, Frame};
use transport::quic::{ChunkPieces, FrameReader, FrameWriter, Piecewise, ReadError};
use transport::session::{carries_attempt, ReceiverInput, StoreReceiver};

use super::attempts::{Attempts, Stream as AttemptStream, Superseded};
use super::failure::Failure;
use mover_format::constants::{PIECE_BYTES_FOR_HASHING_IN_PLACE, RECEIVE_UNACKED_BYTES_MAX};
use mover_format::error::Error;
use mover_format::pack::{check_received, check_received_pieces, RecordHeader};
use mover_format::{ChunkId, Codec, PieceHasher};
use mover_store::inflight::Owner;
use mover_store::sink::{self, Admit, PackSink};
use mover_store::Backend;
use mover_store::Store;

/// Frames the reader task may read ahead of the stream's task.
const INBOUND_QUEUE: usize = 2;
/// Chunks queued for the store thread. Enough to ride out a pack seal (one fdatasync and an
/// index commit, a few ms) at a few hundred MB/s; QUIC's window absorbs the rest.
const STORE_QUEUE_CHUNKS: usize = 8;

/// A frame as the stream's task needs it, owned.
enum Inbound {
    Query { seq: u64, ids: Vec<[u8; 32]> },
    Chunk(ChunkPieces),
    Flush { seq: u64 },
    PeerError(String),
    Unexpected(&'static str),
    Finished,
    Failed(ReadError),
}

enum StoreOp {
    Chunk(ChunkPieces),
    /// Seal the open pack and commit it; `flush` is the Flush it answers, if any.
    Seal {
        flush: Option<u64>,
    },
}

enum StoreEvent {
    /// The first `chunks` chunks of the stream (`bytes` of payload) are durable, and so is
    /// everything before flush `flush_seq`.
    Durable {
        chunks: u64,
        bytes: u64,
        flush_seq: u64,
    },
    Failed(Failure),
}

/// What a Store stream's Hello said, and the version it was answered with.
pub(super) struct Hello<'a> {
    pub(super) peer: &'a str,
    pub(super) version: u16,
    pub(super) tier: &'a str,
    pub(super) job: &'a str,
}

/// Serves a Store stream after its Hello: have/want, verified chunks into packs of `tier`,
/// Acks once durable; stops without committing more once a newer attempt of its job began.
pub(super) async fn store(
    site: Arc<Store>,
    attempts: &Attempts,
    hello: Hello<'_>,
    writer: &mut FrameWriter,
    mut reader: FrameReader,
) -> Result<(), Failure> {
    let Hello {
        peer,
        version,
        tier,
        job,
    } = hello;
    let tier = if tier.is_empty() {
        site.config.default_tier().to_string()
    } else {
        tier.to_string()
    };
    let backend: Arc<dyn Backend> = site.tier(&tier)?.clone();
    let mut session = StoreReceiver::new(RECEIVE_UNACKED_BYTES_MAX);
    writer.send(&session.welcome(version, site.name())).await?;
    // A version-1 sender names no attempt: its streams are never superseded (as before).
    let mut attempt = if carries_attempt(version) {
        let attempt = match reader.next().await? {
            Frame::Attempt { attempt } => attempt,
            other => {
                return Err(Failure::protocol(format!(
                    "expected Attempt after the Welcome of version {version}, got {}",
                    other.name()
                )))
            }
        };
        Some(attempts.begin(peer, job, attempt, Instant::now())?)
    } else {
        None
    };

    let (inbound_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE);
    let reader_task = tokio::spawn(read_frames(reader, inbound_tx));
    let (ops, ops_rx) = mpsc::channel(STORE_QUEUE_CHUNKS);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let thread = {
        let (site, tier, attempt) = (site.clone(), tier.clone(), attempt.clone());
        std::thread::Builder::new()
            .name("mover-store".into())
            .spawn(move || store_thread(&site, backend, &tier, attempt, ops_rx, events_tx))
            .map_err(|e| Error::Resource(format!("spawning a store thread: {e}")))?
    };

    let mut seal_asked = false;
    let outcome: Result<(), Failure> = async {
        loop {
            let next = tokio::select! {
                Some(event) = events.recv() => Err(event),
                next = inbound.recv() => Ok(next.unwrap_or(Inbound::Finished)),
                // Stop at once: the store thread then ends without committing, and the claims
                // the new attempt's streams wait for end with it.
                superseded = superseded(&mut attempt) => {
                    Err(StoreEvent::Failed(superseded.into()))
                }
            };
            let op = match next {
                Err(StoreEvent::Durable {
                    chunks,
                    bytes,
                    flush_seq,
                }) => {
                    seal_asked = false;
                    let ack = session.durable_through(chunks, bytes, flush_seq);
                    writer.send(&ack).await?;
                    continue;
                }
                Err(StoreEvent::Failed(failure)) => return Err(failure),
                Ok(Inbound::Finished) => return Ok(()),
                Ok(Inbound::Failed(e)) => return Err(e.into()),
                Ok(Inbound::PeerError(reason)) => {
                    return Err(Failure::protocol(format!("peer gave up: {reason}")))
                }
                Ok(Inbound::Unexpected(name)) => {
                    return Err(Failure::protocol(format!("unexpected {name} frame")))
                }
                Ok(Inbound::Query { seq, ids }) => {
                    let query = Frame::Query {
                        seq,
                        ids: frame::id_list(&ids),
                    };
                    let ReceiverInput::Query { ids, .. } =
                        session.handle(&query).map_err(Failure::protocol)?
                    else {
                        unreachable!("a Query frame is handed back as a query");
                    };
                    let index = site.index.reader_in(&tier)?;
                    let mut wanted = Vec::with_capacity(ids.len());
                    for id in ids.iter() {
                        wanted.push(!index.contains(&ChunkId(id))?);
                    }
                    let bitmap = session.answer(ids, &wanted);
                    let missing = Frame::Missing {
                        seq,
                        count: ids.len() as u32,
                        bitmap: &bitmap,
                    };
                    writer.send(&missing).await?;
                    continue;
                }
                Ok(Inbound::Chunk(chunk)) => {
                    session
                        .chunk_arrived(&chunk.id, chunk.len)
                        .map_err(Failure::protocol)?;
                    StoreOp::Chunk(chunk)
                }
                Ok(Inbound::Flush { seq }) => {
                    session
                        .handle(&Frame::Flush { seq })
                        .map_err(Failure::protocol)?;
                    StoreOp::Seal { flush: Some(seq) }
                }
            };
            if ops.send(op).await.is_err() {
                return Err(stopped(&mut events).await);
            }
            // An Ack must come before the sender runs out of credit.
            if !seal_asked && session.pending_bytes() >= RECEIVE_UNACKED_BYTES_MAX / 2 {
                seal_asked = true;
                if ops.send(StoreOp::Seal { flush: None }).await.is_err() {
                    return Err(stopped(&mut events).await);
                }
            }
        }
    }
    .await;
    reader_task.abort();
    // The store thread keeps what arrived intact even when the stream failed (it was
    // verified, and a resumed job then finds it instead of sending it again).
    drop(ops);
    let (chunks, bytes) = tokio::task::spawn_blocking(move || thread.join())
        .await
        .ok()
        .and_then(|joined| joined.ok())
        .unwrap_or_default();
    let attempt = attempt.as_ref().map(AttemptStream::attempt);
    tracing::info!(peer = %peer, job = %job, attempt, tier = %tier, chunks, bytes, "store stream ended");
    let link = format!("{peer}->{}", site.name());
    mover_metrics::global().add(
        mover_metrics::names::BYTES_RECEIVED,
        &[("site", site.name()), ("link", &link), ("tier", &tier)],
        bytes,
    );
    outcome
}

/// Resolves once a newer attempt of the stream's job began; never for a stream without one.
async fn superseded(attempt: &mut Option<AttemptStream>) -> Superseded {
    match attempt {
        Some(attempt) => attempt.wait_superseded().await,
        None => std::future::pending().await,
    }
}

/// The store thread stopped taking work: its failure, which it reported before leaving.
async fn stopped(events: &mut mpsc::UnboundedReceiver<StoreEvent>) -> Failure {
    while let Some(event) = events.recv().await {
        if let StoreEvent::Failed(failure) = event {
            return failure;
        }
    }
    Failure::from(Error::Resource("the store thread stopped".into()))
}

async fn read_frames(mut reader: FrameReader, out: mpsc::Sender<Inbound>) {
    loop {
        let inbound = match reader.next_piecewise().await {
            Ok(Piecewise::Chunk(chunk)) => Inbound::Chunk(chunk),
            Ok(Piecewise::Frame(Frame::Query { seq, ids })) => Inbound::Query {
                seq,
                ids: ids.iter().collect(),
            },
            Ok(Piecewise::Frame(Frame::Flush { seq })) => Inbound::Flush { seq },
            Ok(Piecewise::Frame(Frame::Error { reason, .. })) => {
                Inbound::PeerError(reason.to_string())
            }
            Ok(Piecewise::Frame(other)) => Inbound::Unexpected(other.name()),
            Err(ReadError::Finished) => Inbound::Finished,
            Err(e) => Inbound::Failed(e),
        };
        let last = !matches!(
            inbound,
            Inbound::Chunk(_) | Inbound::Query { .. } | Inbound::Flush { .. }
        );
        if out.send(inbound).await.is_err() || last {
            return;
        }
    }
}

/// Verifies and stores the stream's chunks in order; seals on the pack target and on request.
/// Returns the chunks and payload bytes it stored.
fn store_thread(
    site: &Store,
    backend: Arc<dyn Backend>,
    tier: &str,
    attempt: Option<AttemptStream>,
    mut ops: mpsc::Receiver<StoreOp>,
    events: mpsc::UnboundedSender<StoreEvent>,
) -> (u64, u64) {
    let mut store = PackStore {
        site,
        attempt,
        claims: site.in_flight.owner(),
        deferred: Vec::new(),
        deferred_bytes: 0,
        pack: PackSink::new(&site.index, tier, backend, site.config.pack_target_bytes()),
        chunks: 0,
        bytes: 0,
        flush_seq: 0,
        gathered: Vec::new(),
        plaintext: Vec::new(),
        hasher: PieceHasher::new(),
    };
    while let Some(op) = ops.blocking_recv() {
        if let Some(superseded) = store.superseded() {
            let _ = events.send(StoreEvent::Failed(superseded.into()));
            break;
        }
        let outcome = match op {
            StoreOp::Chunk(chunk) => store.chunk(chunk),
            StoreOp::Seal { flush } => {
                if let Some(seq) = flush {
                    store.flush_seq = seq;
                }
                store.seal().map(|()| true)
            }
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                let _ = events.send(StoreEvent::Durable {
                    chunks: store.chunks,
                    bytes: store.bytes,
                    flush_seq: store.flush_seq,
                });
            }
            Err(mut failure) => {
                if failure.code == ErrorCode::NoSpace {
                    // The sender's job error is all its operator sees: say which tier where.
                    failure.reason = format!(
                        "tier {tier:?} at site {} is full (ENOSPC): {}; free space there or send to another tier",
                        site.name(),
                        failure.reason
                    );
                }
                let _ = events.send(StoreEvent::Failed(failure));
                break;
            }
        }
    }
    match store.superseded() {
        // The open pack goes unsealed (its file is removed with its writer) and the claims
        // end with `store`: the newer attempt stores those chunks.
        Some(superseded) => {
            tracing::info!(reason = %superseded, "a superseded stream ended without committing");
        }
        None => {
            if let Err(e) = store.seal() {
                tracing::error!(error = %e.reason, "could not keep the chunks received before the stream ended");
            }
        }
    }
    (store.chunks, store.bytes)
}

struct PackStore<'a> {
    site: &'a Store,
    /// The sender's attempt of its job (version 2): once a newer one began, this stream
    /// commits nothing more.
    attempt: Option<AttemptStream>,
    /// This stream's claims in the site's in-flight set: a chunk another writer (another
    /// stream, a resumed sender's stale one, a local job) is storing is not stored again.
    claims: Owner<'a>,
    /// Verified chunks another writer held the claim of when they arrived: acknowledged only
    /// once that writer committed them, or stored here if it gave up (`seal`). Bounded by
    /// the pack target (`chunk`).
    deferred: Vec<ChunkPieces>,
    deferred_bytes: u64,
    /// The pipeline every writer of this site's packs shares (`mover_store::sink`).
    pack: PackSink<'a>,
    /// Chunks and payload bytes appended (durable once the pack holding them is sealed).
    chunks: u64,
    bytes: u64,
    flush_seq: u64,
    gathered: Vec<u8>,
    plaintext: Vec<u8>,
    hasher: PieceHasher,
}

impl PackStore<'_> {
    fn superseded(&self) -> Option<Superseded> {
        self.attempt.as_ref().and_then(AttemptStream::superseded)
    }

    /// Verifies and appends one chunk unless this site has it or another writer is storing
    /// it; returns whether a pack was sealed (an Ack is due).
    fn chunk(&mut self, chunk: ChunkPieces) -> Result<bool, Failure> {
        let id = ChunkId(chunk.id);
        self.chunks += 1;
        self.bytes += chunk.len as u64;
        match self.pack.admit(&self.claims, &id, None)? {
            // Sent twice on this stream: the first copy is in this stream's pack. Or
            // committed by another writer since the sender asked.
            Admit::Held | Admit::Known => return Ok(false),
            Admit::Other => {
                self.verify(&chunk)?;
                self.deferred_bytes += chunk.len as u64;
                self.deferred.push(chunk);
                // Held no longer than a pack's worth: settling them now holds up this
                // stream's queue, and so its sender, instead.
                if self.deferred_bytes >= self.site.config.pack_target_bytes() {
                    self.seal()?;
                    return Ok(true);
                }
                return Ok(false);
            }
            Admit::New => {}
        }
        self.append(&chunk)?;
        if self.pack.is_full() {
            self.seal()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Checks a chunk against its id without storing it.
    fn verify(&mut self, chunk: &ChunkPieces) -> Result<(), Failure> {
        let codec =
            Codec::from_u8(chunk.codec).ok_or_else(|| Failure::protocol("unknown codec"))?;
        self.gathered.clear();
        for piece in &chunk.pieces {
            self.gathered.extend_from_slice(piece);
        }
        check_received(
            &ChunkId(chunk.id),
            codec,
            chunk.raw_len,
            &self.gathered,
            &mut self.plaintext,
        )?;
        Ok(())
    }

    /// Verifies and appends one chunk to the open pack.
    fn append(&mut self, chunk: &ChunkPieces) -> Result<(), Failure> {
        let id = ChunkId(chunk.id);
        let codec =
            Codec::from_u8(chunk.codec).ok_or_else(|| Failure::protocol("unknown codec"))?;
        let in_place = codec == Codec::Raw
            && chunk.len >= PIECE_BYTES_FOR_HASHING_IN_PLACE * chunk.pieces.len();
        if in_place {
            // Raw payload in large pieces: hash and store them where quinn left them.
            check_received_pieces(&id, &chunk.pieces, &mut self.hasher)?;
            let parts: Vec<&[u8]> = chunk.pieces.iter().map(|p| &p[..]).collect();
            let header = RecordHeader::of_parts(id, codec, chunk.raw_len as usize, &parts);
            self.pack.append_parts(&header, &parts)?;
        } else {
            self.gathered.clear();
            for piece in &chunk.pieces {
                self.gathered.extend_from_slice(piece);
            }
            check_received(
                &id,
                codec,
                chunk.raw_len,
                &self.gathered,
                &mut self.plaintext,
            )?;
            let header = RecordHeader::new(id, codec, chunk.raw_len as usize, &self.gathered);
            let payload = std::mem::take(&mut self.gathered);
            let appended = self.pack.append(&header, &payload);
            self.gathered = payload;
            appended?;
        }
        Ok(())
    }

    /// Makes every chunk received so far durable and findable: seals and commits the open
    /// pack, then waits for the writers that held the deferred chunks' claims and stores
    /// those they gave up. A stream never waits while it holds a claim: the pack is sealed
    /// (its claims end with the commit) and every wait of a round is done before the round
    /// claims anything, so two streams deferring each other's chunks cannot wait on each
    /// other (ARCHITECTURE.md, "Durability protocol").
    fn seal(&mut self) -> Result<(), Failure> {
        loop {
            self.seal_pack()?;
            if self.deferred.is_empty() {
                return Ok(());
            }
            // Claims end with their writer's commit or its end, which a stream reaches at the
            // latest when its connection times out.
            for chunk in &self.deferred {
                let attempt = self.attempt.as_ref();
                let stop = || attempt.is_some_and(|a| a.superseded().is_some());
                if !self.claims.wait(&ChunkId(chunk.id), stop) {
                    break;
                }
            }
            if let Some(superseded) = self.superseded() {
                return Err(superseded.into());
            }
            self.deferred_bytes = 0;
            let index = self.site.index.reader_in(self.pack.tier())?;
            for chunk in std::mem::take(&mut self.deferred) {
                match self
                    .pack
                    .admit(&self.claims, &ChunkId(chunk.id), Some(&index))?
                {
                    // Committed by the writer waited for, or already in this stream's pack.
                    Admit::Known | Admit::Held => {}
                    // Claimed again since the wait: the next round waits for it.
                    Admit::Other => {
                        self.deferred_bytes += chunk.len as u64;
                        self.deferred.push(chunk);
                    }
                    Admit::New => {
                        self.append(&chunk)?;
                        if self.pack.is_full() {
                            self.seal_pack()?;
                        }
                    }
                }
            }
        }
    }

    /// Seals the open pack and commits its chunks, ending their claims. A superseded stream
    /// drops the pack instead (the newer attempt stores its chunks).
    fn seal_pack(&mut self) -> Result<(), Failure> {
        if self.pack.is_empty() {
            return Ok(());
        }
        if let Some(superseded) = self.superseded() {
            return Err(superseded.into());
        }
        if let Some(sealed) = self.pack.seal()? {
            sink::commit(&self.site.index, &self.claims, &sealed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u32) -> ChunkPieces {
        let payload: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(n) >> 13) as u8)
            .collect();
        ChunkPieces {
            id: ChunkId::of(&payload).0,
            codec: Codec::Raw as u8,
            raw_len: payload.len() as u32,
            len: payload.len(),
            pieces: vec![bytes::Bytes::from(payload)],
        }
    }

    /// The records in every sealed pack of `site`'s default tier.
    fn records(site: &Store) -> u64 {
        let backend = site.tier(site.config.default_tier()).unwrap();
        backend
            .list("packs")
            .unwrap()
            .iter()
            .map(|key| {
                mover_store::repair::read_footer(backend.as_ref(), key)
                    .unwrap()
                    .0
                    .len() as u64
            })
            .sum()
    }

    /// A new site "b" in `base`.
    fn new_site(base: &std::path::Path) -> Arc<Store> {
        let dir = base.join("site");
        mover_store::site::init(&mover_store::site::InitOptions {
            name: "b",
            dir: &dir,
            listen: None,
            socket: None,
        })
        .unwrap();
        Arc::new(Store::open(&dir).unwrap())
    }

    fn stream(
        site: &Arc<Store>,
    ) -> (
        mpsc::Sender<StoreOp>,
        mpsc::UnboundedReceiver<StoreEvent>,
        std::thread::JoinHandle<(u64, u64)>,
    ) {
        attempt_stream(site, None)
    }

    /// A stream whose sender named its attempt (protocol version 2).
    fn attempt_stream(
        site: &Arc<Store>,
        attempt: Option<AttemptStream>,
    ) -> (
        mpsc::Sender<StoreOp>,
        mpsc::UnboundedReceiver<StoreEvent>,
        std::thread::JoinHandle<(u64, u64)>,
    ) {
        let (ops, ops_rx) = mpsc::channel(STORE_QUEUE_CHUNKS);
        let (events_tx, events) = mpsc::unbounded_channel();
        let site = site.clone();
        let thread = std::thread::spawn(move || {
            let tier = site.config.default_tier().to_string();
            let backend = site.tier(&tier).unwrap().clone();
            store_thread(&site, backend, &tier, attempt, ops_rx, events_tx)
        });
        (ops, events, thread)
    }

    #[test]
    fn a_resumed_senders_stale_stream_and_its_new_one_store_each_chunk_once() {
        let base = tempfile::tempdir().unwrap();
        let site = new_site(base.path());
        const CHUNKS: u32 = 6;

        // The old stream received the chunks, then its sender was killed: the connection
        // lingers until its idle timeout, the pack unsealed.
        let (old, _old_events, old_thread) = stream(&site);
        for n in 0..CHUNKS {
            old.blocking_send(StoreOp::Chunk(chunk(n))).unwrap();
        }
        // Its store thread has taken them (whichever stream claims a chunk first, each is
        // stored once; this order is the stale stream's case).
        while old.capacity() < old.max_capacity() {
            std::thread::yield_now();
        }
        // The resumed sender asked again (nothing was committed) and sends everything again.
        let (new, mut new_events, new_thread) = stream(&site);
        for n in 0..CHUNKS {
            new.blocking_send(StoreOp::Chunk(chunk(n))).unwrap();
        }
        new.blocking_send(StoreOp::Seal { flush: Some(1) }).unwrap();
        // The old connection times out: its stream ends and keeps what it received.
        drop(old);
        old_thread.join().unwrap();
        // The new stream acknowledges all its chunks only once each is durable and indexed.
        match new_events.blocking_recv() {
            Some(StoreEvent::Durable { chunks, .. }) => assert_eq!(chunks, CHUNKS as u64),
            Some(StoreEvent::Failed(f)) => panic!("new stream failed: {}", f.reason),
            None => panic!("new stream ended without an ack"),
        }
        drop(new);
        new_thread.join().unwrap();

        assert_eq!(site.index.chunk_count().unwrap(), CHUNKS as u64);
        assert_eq!(
            records(&site),
            CHUNKS as u64,
            "records stored vs distinct chunks"
        );
        assert!(site.in_flight.is_empty(), "claims outlived their streams");
    }

    #[test]
    fn a_stale_stream_that_keeps_sending_after_a_newer_attempt_began_commits_nothing_more() {
        let base = tempfile::tempdir().unwrap();
        let site = new_site(base.path());
        let attempts = Attempts::default();
        let now = Instant::now();
        const CHUNKS: u32 = 6;

        // Attempt 1's stream received half the chunks, then its sender was killed.
        let first = attempts.begin("a", "b-9", 1, now).unwrap();
        let (old, mut old_events, old_thread) = attempt_stream(&site, Some(first));
        for n in 0..CHUNKS / 2 {
            old.blocking_send(StoreOp::Chunk(chunk(n))).unwrap();
        }
        while old.capacity() < old.max_capacity() {
            std::thread::yield_now();
        }
        // The resumed sender's stream says it is attempt 2; attempt 1's stream keeps going
        // (what was in flight when its sender died) and reaches a commit point.
        let second = attempts.begin("a", "b-9", 2, now).unwrap();
        for n in CHUNKS / 2..CHUNKS {
            // Once it stopped, it takes no more.
            let _ = old.blocking_send(StoreOp::Chunk(chunk(n)));
        }
        let _ = old.blocking_send(StoreOp::Seal { flush: Some(1) });
        match old_events.blocking_recv() {
            Some(StoreEvent::Failed(f)) => {
                assert_eq!(f.code, ErrorCode::Superseded, "{}", f.reason);
                for word in ["b-9", "attempt 1", "attempt 2"] {
                    assert!(f.reason.contains(word), "{}", f.reason);
                }
            }
            Some(StoreEvent::Durable { chunks, .. }) => {
                panic!("the superseded stream committed {chunks} chunks")
            }
            None => panic!("the superseded stream ended without saying why"),
        }
        drop(old);
        old_thread.join().unwrap();
        assert_eq!(site.index.chunk_count().unwrap(), 0, "chunks committed");
        let backend = site.tier(site.config.default_tier()).unwrap();
        assert_eq!(
            backend.list("packs").unwrap(),
            Vec::<String>::new(),
            "a pack was left behind"
        );
        assert!(site.in_flight.is_empty(), "its claims outlived it");
        // A late stream of attempt 1 is refused before it stores anything.
        assert!(attempts.begin("a", "b-9", 1, now).is_err());

        // Attempt 2 stores every chunk, once.
        let (new, mut new_events, new_thread) = attempt_stream(&site, Some(second));
        for n in 0..CHUNKS {
            new.blocking_send(StoreOp::Chunk(chunk(n))).unwrap();
        }
        new.blocking_send(StoreOp::Seal { flush: Some(1) }).unwrap();
        match new_events.blocking_recv() {
            Some(StoreEvent::Durable { chunks, .. }) => assert_eq!(chunks, CHUNKS as u64),
            Some(StoreEvent::Failed(f)) => panic!("attempt 2 failed: {}", f.reason),
            None => panic!("attempt 2 ended without an ack"),
        }
        drop(new);
        new_thread.join().unwrap();
        assert_eq!(records(&site), CHUNKS as u64);
    }

    #[test]
    fn two_streams_deferring_each_others_chunks_both_finish() {
        let base = tempfile::tempdir().unwrap();
        let site = new_site(base.path());
        let (a, b) = (chunk(1), chunk(2));
        // Two writers (killed senders' streams, local jobs) hold A and B and will give up.
        let holds_a = site.in_flight.owner();
        let holds_b = site.in_flight.owner();
        assert_eq!(
            holds_a.claim(&ChunkId(a.id)),
            mover_store::inflight::Claim::New
        );
        assert_eq!(
            holds_b.claim(&ChunkId(b.id)),
            mover_store::inflight::Claim::New
        );
        // Two streams meet them in opposite orders and defer both.
        let (s1, mut s1_events, s1_thread) = stream(&site);
        let (s2, mut s2_events, s2_thread) = stream(&site);
        for (ops, first, second) in [(&s1, 1, 2), (&s2, 2, 1)] {
            ops.blocking_send(StoreOp::Chunk(chunk(first))).unwrap();
            ops.blocking_send(StoreOp::Chunk(chunk(second))).unwrap();
            ops.blocking_send(StoreOp::Seal { flush: Some(1) }).unwrap();
        }
        // Let both reach their waits, then the holders give up one after the other: a
        // stream that stored A and then waited for B (held by the other stream, waiting for
        // A) would wait forever.
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(holds_a);
        drop(holds_b);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let acks = [s1_events.blocking_recv(), s2_events.blocking_recv()];
            let _ = done_tx.send(acks);
        });
        let acks = done_rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the two streams waited on each other (deadlock)");
        for ack in acks {
            match ack {
                Some(StoreEvent::Durable { chunks, .. }) => assert_eq!(chunks, 2),
                Some(StoreEvent::Failed(f)) => panic!("a stream failed: {}", f.reason),
                None => panic!("a stream ended without an ack"),
            }
        }
        drop((s1, s2));
        s1_thread.join().unwrap();
        s2_thread.join().unwrap();
        assert_eq!(records(&site), 2, "each chunk stored once");
        assert!(site.in_flight.is_empty());
    }
}
