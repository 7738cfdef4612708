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
//! between the three parts, plus the open pack's staging buffers.

use std::sync::Arc;

use tokio::sync::mpsc;
use transport::frame::{self, Frame};
use transport::quic::{ChunkPieces, FrameReader, FrameWriter, Piecewise, ReadError};
use transport::session::{ReceiverInput, StoreReceiver};

use super::serve::Failure;
use crate::constants::{PIECE_BYTES_FOR_HASHING_IN_PLACE, RECEIVE_UNACKED_BYTES_MAX};
use crate::error::Error;
use crate::format::pack::{check_received, check_received_pieces, RecordHeader};
use crate::format::{ChunkId, Codec, PieceHasher};
use crate::site::Site;
use crate::store::pack_writer::PackWriter;
use crate::store::Backend;

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

/// Serves a Store stream after its Hello: have/want, verified chunks into packs of `tier`,
/// Acks once durable.
pub(super) async fn store(
    site: Arc<Site>,
    peer: &str,
    writer: &mut FrameWriter,
    reader: FrameReader,
    version: u16,
    tier: &str,
    job: &str,
) -> Result<(), Failure> {
    let tier = if tier.is_empty() {
        site.config.default_tier().to_string()
    } else {
        tier.to_string()
    };
    let backend: Arc<dyn Backend> = site.tier(&tier)?.clone();
    let mut session = StoreReceiver::new(RECEIVE_UNACKED_BYTES_MAX);
    writer.send(&session.welcome(version, site.name())).await?;

    let (inbound_tx, mut inbound) = mpsc::channel(INBOUND_QUEUE);
    let reader_task = tokio::spawn(read_frames(reader, inbound_tx));
    let (ops, ops_rx) = mpsc::channel(STORE_QUEUE_CHUNKS);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let thread = {
        let (site, tier) = (site.clone(), tier.clone());
        std::thread::Builder::new()
            .name("mover-store".into())
            .spawn(move || store_thread(&site, backend, &tier, ops_rx, events_tx))
            .map_err(|e| Error::Resource(format!("spawning a store thread: {e}")))?
    };

    let mut seal_asked = false;
    let outcome: Result<(), Failure> = async {
        loop {
            let next = tokio::select! {
                Some(event) = events.recv() => Err(event),
                next = inbound.recv() => Ok(next.unwrap_or(Inbound::Finished)),
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
                    let index = site.index.reader()?;
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
    tracing::info!(peer = %peer, job = %job, tier = %tier, chunks, bytes, "store stream ended");
    let link = format!("{peer}->{}", site.name());
    crate::metrics::global().add(
        crate::metrics::names::BYTES_RECEIVED,
        &[("site", site.name()), ("link", &link), ("tier", &tier)],
        bytes,
    );
    outcome
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
    site: &Site,
    backend: Arc<dyn Backend>,
    tier: &str,
    mut ops: mpsc::Receiver<StoreOp>,
    events: mpsc::UnboundedSender<StoreEvent>,
) -> (u64, u64) {
    let mut store = PackStore {
        site,
        backend,
        tier,
        pack: None,
        chunks: 0,
        bytes: 0,
        flush_seq: 0,
        gathered: Vec::new(),
        plaintext: Vec::new(),
        hasher: PieceHasher::new(),
    };
    while let Some(op) = ops.blocking_recv() {
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
            Err(failure) => {
                let _ = events.send(StoreEvent::Failed(failure));
                break;
            }
        }
    }
    if let Err(e) = store.seal() {
        tracing::error!(error = %e.reason, "could not keep the chunks received before the stream ended");
    }
    (store.chunks, store.bytes)
}

struct PackStore<'a> {
    site: &'a Site,
    backend: Arc<dyn Backend>,
    tier: &'a str,
    pack: Option<PackWriter>,
    /// Chunks and payload bytes appended (durable once the pack holding them is sealed).
    chunks: u64,
    bytes: u64,
    flush_seq: u64,
    gathered: Vec<u8>,
    plaintext: Vec<u8>,
    hasher: PieceHasher,
}

impl PackStore<'_> {
    /// Verifies and appends one chunk; returns whether a pack was sealed (an Ack is due).
    fn chunk(&mut self, chunk: ChunkPieces) -> Result<bool, Failure> {
        let id = ChunkId(chunk.id);
        let codec =
            Codec::from_u8(chunk.codec).ok_or_else(|| Failure::protocol("unknown codec"))?;
        let in_place = codec == Codec::Raw
            && chunk.len >= PIECE_BYTES_FOR_HASHING_IN_PLACE * chunk.pieces.len();
        let header = if in_place {
            // Raw payload in large pieces: hash and store them where quinn left them.
            check_received_pieces(&id, &chunk.pieces, &mut self.hasher)?;
            let parts: Vec<&[u8]> = chunk.pieces.iter().map(|p| &p[..]).collect();
            let header = RecordHeader::of_parts(id, codec, chunk.raw_len as usize, &parts);
            self.open_pack()?.append_parts(&header, &parts)?;
            header
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
            let appended = self.open_pack()?.append(&header, &payload);
            self.gathered = payload;
            appended?;
            header
        };
        self.chunks += 1;
        self.bytes += header.stored_len as u64;
        let full = self
            .pack
            .as_ref()
            .is_some_and(|pack| pack.bytes() >= self.site.config.pack_target_bytes());
        if full {
            self.seal()?;
        }
        Ok(full)
    }

    fn open_pack(&mut self) -> Result<&mut PackWriter, Error> {
        if self.pack.is_none() {
            self.pack = Some(PackWriter::create(
                &self.backend,
                self.tier,
                self.site.config.pack_target_bytes(),
            )?);
        }
        Ok(self.pack.as_mut().expect("created above"))
    }

    /// Seals the open pack and commits its chunks: after this they are durable and findable.
    fn seal(&mut self) -> Result<(), Failure> {
        let Some(writer) = self.pack.take() else {
            return Ok(());
        };
        if writer.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let sealed = writer.seal()?;
        crate::worker::stage("pack_seal", started);
        let committing = std::time::Instant::now();
        self.site.index.commit_pack(&sealed)?;
        crate::worker::stage("index_commit", committing);
        Ok(())
    }
}
