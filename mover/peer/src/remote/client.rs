//! Client ends of the Control and Fetch streams: manifest lookup and commit for a cross-site
//! backup, and the in-order chunk stream a cross-site restore reads from. Both dial from the
//! process's endpoint and run on its runtime ([`super::net`]).

use std::sync::Arc;

use transport::frame::{self, ErrorCode, Frame, Purpose, MANIFEST_PART_BYTES_MAX};
use transport::quic::{FrameReader, FrameWriter, Piecewise};
use transport::session::{FetchClient, ManifestAssembly};
use transport::tls::SiteCredentials;

use super::net::{Dialed, Net};
use super::ship::{hello, open_stream, read_failure};
use crate::peers::Link;
use mover_format::constants::{
    FETCH_IDS_IN_FLIGHT, MANIFEST_BYTES_MAX, PIECE_BYTES_FOR_HASHING_IN_PLACE,
};
use mover_format::error::{Error, Result};
use mover_format::pack::{check_received, check_received_pieces};
use mover_format::{ChunkId, Codec, PieceHasher};

/// Manifest objects carry a 32-byte header before the (bounded) payload.
const MANIFEST_OBJECT_BYTES_MAX: u64 = MANIFEST_BYTES_MAX as u64 + 32;

/// A Control stream to a peer.
pub struct Control {
    link: Link,
    dialed: Dialed,
    writer: FrameWriter,
    reader: FrameReader,
}

impl Control {
    /// Dials `link` from `net`'s endpoint; must run on `net`'s runtime.
    pub async fn open(
        net: &Net,
        link: &Link,
        credentials: &SiteCredentials,
        job: &str,
    ) -> Result<Control> {
        let dialed = net.dial(link, credentials).await?;
        let (writer, reader, _, _) = open_stream(
            link,
            credentials,
            &dialed.connection,
            &hello(Purpose::Control, &credentials.site, job),
        )
        .await?;
        Ok(Control {
            link: link.clone(),
            dialed,
            writer,
            reader,
        })
    }

    fn fail(&self, detail: impl std::fmt::Display) -> Error {
        Error::peer(&self.link.site, detail)
    }

    async fn send(&mut self, frame: &Frame<'_>) -> Result<()> {
        let result = self.writer.send(frame).await;
        result.map_err(|e| self.fail(format!("sending: {e}")))
    }

    /// Looks a manifest up at the peer: by snapshot spec (id, prefix, `latest`) or the newest
    /// snapshot this site made of a source path. Returns the id and the stored object bytes.
    pub async fn get_manifest(
        &mut self,
        by_source: bool,
        key: &[u8],
    ) -> Result<Option<([u8; 32], Vec<u8>)>> {
        if key.len() > frame::KEY_BYTES_MAX {
            return Err(Error::Refused(format!(
                "manifest key of {} bytes: expected at most {}",
                key.len(),
                frame::KEY_BYTES_MAX
            )));
        }
        self.send(&Frame::GetManifest { by_source, key }).await?;
        let mut assembly = ManifestAssembly::new(MANIFEST_OBJECT_BYTES_MAX);
        loop {
            let frame = match self.reader.next().await {
                Ok(frame) => frame,
                Err(e) => {
                    return Err(read_failure(&e, &self.dialed.connection).error(&self.link.site))
                }
            };
            match frame {
                Frame::NoManifest => return Ok(None),
                Frame::Error { code, reason } => {
                    let reason = reason.to_string();
                    return Err(if code == ErrorCode::NotFound {
                        Error::NotFound(format!("at {}: {reason}", self.link.site))
                    } else {
                        self.fail(reason)
                    });
                }
                ref part @ Frame::ManifestPart { .. } => {
                    let done = assembly.add(part).map_err(|e| self.fail(e))?;
                    if done {
                        let id = assembly.id();
                        return Ok(Some((id, assembly.into_bytes())));
                    }
                }
                other => {
                    let detail = format!("unexpected {other:?}");
                    return Err(Error::peer(&self.link.site, detail));
                }
            }
        }
    }

    /// Sends a manifest object and commits it as a snapshot at the peer.
    pub async fn commit(&mut self, id: [u8; 32], object: &[u8]) -> Result<()> {
        let total = object.len() as u64;
        for (i, part) in object.chunks(MANIFEST_PART_BYTES_MAX).enumerate() {
            let offset = (i * MANIFEST_PART_BYTES_MAX) as u64;
            self.send(&Frame::ManifestPart {
                id,
                total,
                offset,
                data: part,
            })
            .await?;
        }
        self.send(&Frame::Commit { id }).await?;
        let answer = self.reader.next().await;
        match answer {
            Ok(Frame::Committed { id: committed }) if committed == id => Ok(()),
            Ok(Frame::Error { reason, .. }) => {
                let reason = reason.to_string();
                Err(self.fail(format!("snapshot not committed: {reason}")))
            }
            Ok(other) => {
                let detail = format!("answered the commit with {other:?}");
                Err(self.fail(detail))
            }
            Err(e) => Err(read_failure(&e, &self.dialed.connection).error(&self.link.site)),
        }
    }

    /// Ends the stream and gives the connection back (kept a few seconds for the next
    /// stream to the peer, `Net`); returns the UDP bytes it sent and received for this job.
    pub async fn close(mut self) -> (u64, u64) {
        self.writer.finish();
        let wire = self.dialed.wire_bytes();
        self.dialed.done().await;
        wire
    }

    /// Whether the connection still stands (a Control held through a long job may have been
    /// closed by a restarted peer or an idle timeout).
    pub fn is_open(&self) -> bool {
        self.dialed.connection.close_reason().is_none()
    }
}

/// One chunk as the peer stores it.
struct Fetched {
    id: [u8; 32],
    codec: u8,
    raw_len: u32,
    payload: Payload,
}

enum Payload {
    /// A raw chunk in the pieces quinn received it in (pieces of 16 KiB and more: loopback's
    /// 64 KiB datagrams).
    Pieces(Vec<bytes::Bytes>),
    /// In one piece (the frame reader copies pieces under 16 KiB together: Ethernet and
    /// jumbo-frame datagrams).
    Whole(bytes::Bytes),
    /// Compressed in several pieces, or raw in many small ones: copied together.
    Gathered(Vec<u8>),
}

pub use mover_store::source::{ChunkSource, Plaintext};

/// Chunks on their way to the restore (the backpressure between the two threads).
const FETCHED_QUEUE: usize = 8;
/// Payload buffers handed back for reuse: every buffer in circulation fits (the queue, the
/// restore's, the one being filled), so fresh pages are not faulted in for every chunk.
const SPARE_BUFFERS: usize = FETCHED_QUEUE + 2;

/// A restore's chunk order as its reader produces it: batches of ids, or the error that
/// stopped the reader (see `RemoteChunks::start`).
pub type ReadOrder = tokio::sync::mpsc::Receiver<Result<Vec<ChunkId>>>;

/// Chunks from a peer, in the order a restore reads them. A task on the process's network
/// runtime runs the connection; a bounded channel (8 chunks) between it and the restore's
/// thread is the backpressure.
pub struct RemoteChunks {
    site: String,
    net: Arc<Net>,
    chunks: tokio::sync::mpsc::Receiver<Result<Fetched>>,
    spare: std::sync::mpsc::SyncSender<Vec<u8>>,
    hasher: Box<PieceHasher>,
    task: Option<tokio::task::JoinHandle<(u64, u64)>>,
    pub wire_bytes: (u64, u64),
}

impl RemoteChunks {
    /// Starts fetching the chunks `order` yields (batches of at most one Fetch frame's ids, in
    /// this order; an error ends the fetch with it) from the peer, over a connection of `net`.
    pub fn start(
        net: Arc<Net>,
        link: Link,
        credentials: SiteCredentials,
        job: String,
        order: ReadOrder,
    ) -> Result<RemoteChunks> {
        let (tx, rx) = tokio::sync::mpsc::channel(FETCHED_QUEUE);
        let (spare, spares) = std::sync::mpsc::sync_channel(SPARE_BUFFERS);
        let site = link.site.clone();
        let task = net.spawn(fetch_all(
            net.clone(),
            link,
            credentials,
            job,
            order,
            tx,
            spares,
        ));
        Ok(RemoteChunks {
            site,
            net,
            chunks: rx,
            spare,
            hasher: Box::new(PieceHasher::new()),
            task: Some(task),
            wire_bytes: (0, 0),
        })
    }

    /// The plaintext of the next chunk, which must be `id`; verified before it is returned.
    pub fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext> {
        self.read_verified(id, out).map_err(|e| match e {
            Error::Corrupt { what, detail } => Error::Corrupt {
                what: format!("{what} from peer {}", self.site),
                detail,
            },
            e => e,
        })
    }

    fn read_verified(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext> {
        let fetched = self
            .chunks
            .blocking_recv()
            .ok_or_else(|| Error::peer(&self.site, "fetch ended early"))??;
        if fetched.id != id.0 {
            return Err(Error::peer(
                &self.site,
                format!("sent chunk {} where {id} was expected", ChunkId(fetched.id)),
            ));
        }
        let codec = Codec::from_u8(fetched.codec)
            .ok_or_else(|| Error::peer(&self.site, "unknown codec"))?;
        let mut payload = match fetched.payload {
            Payload::Pieces(pieces) => {
                check_received_pieces(id, &pieces, &mut self.hasher)?;
                return Ok(Plaintext::Pieces(pieces));
            }
            Payload::Whole(whole) => {
                check_received(id, codec, fetched.raw_len, &whole, out)?;
                return Ok(match codec {
                    Codec::Raw => Plaintext::Pieces(vec![whole]),
                    Codec::Lz4 => Plaintext::InBuffer,
                });
            }
            Payload::Gathered(payload) => payload,
        };
        // An lz4 payload is decompressed straight into `out`; a raw one is swapped in. The
        // buffer left over goes back to the fetch thread.
        check_received(id, codec, fetched.raw_len, &payload, out)?;
        if codec == Codec::Raw {
            std::mem::swap(out, &mut payload);
        }
        let _ = self.spare.try_send(payload);
        Ok(Plaintext::InBuffer)
    }

    /// Waits for the fetch task; records the UDP bytes of its connection.
    pub fn finish(&mut self) {
        if let Some(task) = self.task.take() {
            // The task ends once every chunk was read (or on its first error), or once it
            // sees the channel closed.
            self.chunks.close();
            while self.chunks.try_recv().is_ok() {}
            if let Ok(bytes) = self.net.block_on(task) {
                self.wire_bytes = bytes;
            }
        }
    }
}

/// A peer as a source: chunks come in the order given to [`RemoteChunks::start`].
impl ChunkSource for RemoteChunks {
    fn read(&mut self, id: &ChunkId, out: &mut Vec<u8>) -> Result<Plaintext> {
        RemoteChunks::read(self, id, out)
    }

    fn finish(&mut self) -> (u64, u64) {
        RemoteChunks::finish(self);
        self.wire_bytes
    }
}

async fn fetch_all(
    net: Arc<Net>,
    link: Link,
    credentials: SiteCredentials,
    job: String,
    order: ReadOrder,
    tx: tokio::sync::mpsc::Sender<Result<Fetched>>,
    spares: std::sync::mpsc::Receiver<Vec<u8>>,
) -> (u64, u64) {
    let dialed = match net.dial(&link, &credentials).await {
        Ok(dialed) => dialed,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return (0, 0);
        }
    };
    let connection = &dialed.connection;
    let outcome = fetch_on(&link, connection, &credentials, &job, order, &tx, spares).await;
    let wire = dialed.wire_bytes();
    match outcome {
        // Every chunk arrived and the stream ended; a restore that stopped reading (closed
        // the channel) may have left chunks in flight: that connection is not kept.
        Ok(()) if !tx.is_closed() => dialed.done().await,
        Ok(()) => dialed.hang_up().await,
        Err(e) => {
            dialed.hang_up().await;
            let _ = tx.send(Err(e)).await;
        }
    }
    wire
}

async fn fetch_on(
    link: &Link,
    connection: &quinn::Connection,
    credentials: &SiteCredentials,
    job: &str,
    mut order: ReadOrder,
    tx: &tokio::sync::mpsc::Sender<Result<Fetched>>,
    // Owned: a borrowed std Receiver (not Sync) would keep the task from moving threads.
    spares: std::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<()> {
    let (mut writer, mut reader, _, _) = open_stream(
        link,
        credentials,
        connection,
        &hello(Purpose::Fetch, &credentials.site, job),
    )
    .await?;
    let mut client = FetchClient::new();
    let mut order_done = false;
    let fail = |detail: String| Error::peer(&link.site, detail);
    loop {
        while !order_done && client.outstanding() + frame::IDS_PER_FRAME_MAX <= FETCH_IDS_IN_FLIGHT
        {
            let batch: Vec<[u8; 32]> = match order.recv().await {
                Some(batch) => batch?.iter().map(|id| id.0).collect(),
                None => {
                    order_done = true;
                    break;
                }
            };
            if batch.is_empty() {
                continue;
            }
            if batch.len() > frame::IDS_PER_FRAME_MAX {
                return Err(Error::Resource(format!(
                    "a restore's order batch of {} ids: expected at most {}",
                    batch.len(),
                    frame::IDS_PER_FRAME_MAX
                )));
            }
            let seq = client.fetch(&batch);
            writer
                .send(&Frame::Fetch {
                    seq,
                    ids: frame::id_list(&batch),
                })
                .await
                .map_err(|e| fail(format!("sending fetch: {e}")))?;
        }
        if client.outstanding() == 0 {
            break;
        }
        // The payload stays in quinn's pieces; only what must be contiguous is gathered, once.
        let piecewise = reader
            .next_piecewise()
            .await
            .map_err(|e| read_failure(&e, connection).error(&link.site))?;
        let chunk = match piecewise {
            Piecewise::Chunk(chunk) => chunk,
            Piecewise::Frame(Frame::Error { code, reason }) => {
                return Err(if code == ErrorCode::NotFound {
                    Error::NotFound(format!("at {}: {reason}", link.site))
                } else {
                    fail(reason.to_string())
                });
            }
            Piecewise::Frame(other) => {
                return Err(fail(format!("unexpected {} frame", other.name())))
            }
        };
        let id = client
            .chunk_arrived(&chunk.id)
            .map_err(|e| fail(e.to_string()))?;
        let mut pieces = chunk.pieces;
        let payload = if chunk.codec == Codec::Raw as u8
            && chunk.len >= PIECE_BYTES_FOR_HASHING_IN_PLACE * pieces.len()
        {
            Payload::Pieces(pieces)
        } else if pieces.len() == 1 {
            Payload::Whole(pieces.pop().expect("one piece"))
        } else {
            let mut payload = spares.try_recv().unwrap_or_default();
            payload.clear();
            payload.reserve(chunk.len);
            for piece in &pieces {
                payload.extend_from_slice(piece);
            }
            Payload::Gathered(payload)
        };
        let fetched = Fetched {
            id,
            codec: chunk.codec,
            raw_len: chunk.raw_len,
            payload,
        };
        // Waits while the restore is behind; QUIC flow control holds the peer back meanwhile.
        if tx.send(Ok(fetched)).await.is_err() {
            return Ok(());
        }
    }
    writer.finish();
    Ok(())
}
