//! The sending end of a Store stream, one per worker: new chunks are gathered into batches,
//! the destination is asked which ids it lacks, and only those are shipped.
//!
//! Runs on the worker's own thread and tokio-uring runtime (quinn drives its connection as a
//! task on the same ring), so reading, chunking and shipping share one pinned core and no
//! buffer crosses threads. Three tasks: the worker closes batches ([`Shipper::offer`]); a
//! ship task sends each batch's Query as soon as it is closed and ships the chunks the peer
//! asked for, one at a time; a reader task applies the peer's frames to the sans-IO
//! [`StoreSender`]. The ship task runs whenever the worker waits (for a disk read, or for
//! room in the pipeline), so a read that takes long does not leave the link idle: with a
//! bandwidth cap the chunks are handed to quinn at the link's rate, quinn holds almost
//! nothing in reserve, and before this split every stall of the worker was a gap on the
//! wire (BENCHMARKS.md, run 4).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use transport::frame::{self, ErrorCode, Frame, Purpose};
use transport::quic::{close, ConnectFailure, FrameReader, FrameWriter, QuicError, ReadError};
use transport::session::{SenderEvent, StoreSender};
use transport::tls::SiteCredentials;

use crate::peers::Link;
use mover_format::constants::{SHIP_BATCH_BYTES, SHIP_QUERIES_IN_FLIGHT};
use mover_format::error::{Error, Result};

/// What one worker's shipping amounted to.
#[derive(Default, Debug, Clone)]
pub struct ShipStats {
    pub chunks_sent: u64,
    /// Chunk payload bytes sent (compressed where that paid).
    pub payload_bytes_sent: u64,
    /// Plaintext bytes of the chunks sent.
    pub raw_bytes_sent: u64,
    /// Chunks the destination already had.
    pub chunks_present: u64,
    pub raw_bytes_present: u64,
    /// UDP payload bytes of the connection (both directions), headers and acks included.
    pub wire_bytes_sent: u64,
    pub wire_bytes_received: u64,
}

struct Entry {
    id: [u8; 32],
    codec: u8,
    raw_len: u32,
    range: Range<usize>,
}

/// A closed batch: the payloads back to back, and what each entry is.
struct Batch {
    bytes: Bytes,
    entries: Vec<Entry>,
}

/// A batch whose Query is out: `wanted` once the peer answered, `next` the entry to ship.
struct Queried {
    batch: Batch,
    wanted: Option<Vec<bool>>,
    next: usize,
}

struct Shared {
    state: RefCell<StoreSender>,
    answers: RefCell<VecDeque<Vec<bool>>>,
    failure: RefCell<Option<Stop>>,
    /// Wakes the ship task: an answer or credit came (reader), a batch was closed or the
    /// worker finished (worker), or the reader failed.
    notify: Notify,
    /// Closed batches not queried yet.
    closed: RefCell<VecDeque<Batch>>,
    /// Batches closed and not wholly shipped: what bounds this worker's memory.
    held: Cell<usize>,
    /// The worker closed its last batch.
    done: Cell<bool>,
    /// Wakes the worker: a batch was shipped (room in the pipeline), or the ship task failed.
    room: Notify,
    /// Batches already shipped. quinn holds slices of them until the peer acknowledges the
    /// packets; once it lets go a batch buffer is reused, so the hot path does not fault in
    /// fresh pages for every batch (that cost more kernel time than the sends).
    spare: RefCell<Vec<Bytes>>,
    stats: RefCell<ShipStats>,
}

impl Shared {
    fn fail(&self, stop: Stop) {
        self.failure.borrow_mut().get_or_insert(stop);
        self.notify.notify_one();
        self.room.notify_one();
    }
}

/// Time the ship task spent blocked, by cause (reported at debug level at the end).
#[derive(Default)]
struct Waits {
    /// For the peer's answer to the oldest query while nothing else could be shipped.
    answer: Duration,
    /// For credit (chunks the peer has not acknowledged as durable).
    credit: Duration,
    /// In the link's token bucket.
    bucket: Duration,
    /// Handing a chunk to quinn (its send buffer and the peer's flow-control window).
    send: Duration,
}

pub struct Shipper {
    link: Link,
    dialed: super::net::Dialed,
    shared: Rc<Shared>,
    reader_task: tokio::task::JoinHandle<()>,
    ship_task: Option<tokio::task::JoinHandle<Result<Waits, Stop>>>,
    batch: BytesMut,
    entries: Vec<Entry>,
    batches_allocated: u64,
}

/// Shipped batches kept for reuse; beyond this they are freed.
const SPARE_BATCHES_MAX: usize = 4;
const BATCH_CAPACITY: usize = SHIP_BATCH_BYTES + frame::CHUNK_BYTES_MAX;

/// Opens a stream and performs the Hello/Welcome exchange.
pub async fn open_stream(
    link: &Link,
    credentials: &SiteCredentials,
    connection: &quinn::Connection,
    hello: &Frame<'_>,
) -> Result<(FrameWriter, FrameReader, u16, u64)> {
    let opened = hello_exchange(link, connection, hello).await;
    // TLS 1.3 finishes the client's handshake before the server has checked the client's
    // certificate: a peer that does not trust us shows here, as the connection's close.
    let refused = connection
        .close_reason()
        .is_some_and(|reason| ConnectFailure::of(&reason) == ConnectFailure::NotTrusted);
    if opened.is_err() && refused {
        return Err(not_trusted(link, credentials));
    }
    opened
}

async fn hello_exchange(
    link: &Link,
    connection: &quinn::Connection,
    hello: &Frame<'_>,
) -> Result<(FrameWriter, FrameReader, u16, u64)> {
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| connection_lost(&e).error(&link.site))?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    writer
        .send(hello)
        .await
        .map_err(|e| Error::peer(&link.site, format!("sending hello: {e}")))?;
    match reader.next().await {
        Ok(Frame::Welcome {
            version,
            site,
            unacked_bytes_max,
        }) => {
            if site != link.site {
                return Err(Error::peer(&link.site, format!("answers as site {site:?}")));
            }
            Ok((writer, reader, version, unacked_bytes_max))
        }
        Ok(Frame::Error { reason, .. }) => {
            Err(Error::peer(&link.site, format!("refused: {reason}")))
        }
        Ok(other) => Err(Error::peer(
            &link.site,
            format!("answered the hello with {other:?}"),
        )),
        Err(e) => Err(read_failure(&e, connection).error(&link.site)),
    }
}

/// Why talking to a peer stopped: what to tell, and whether it passes by itself (a daemon
/// job then runs again later instead of failing).
#[derive(Debug, Clone)]
pub struct Stop {
    pub detail: String,
    pub transient: bool,
}

impl Stop {
    pub fn permanent(detail: impl Into<String>) -> Stop {
        Stop {
            detail: detail.into(),
            transient: false,
        }
    }

    pub fn transient(detail: impl Into<String>) -> Stop {
        Stop {
            detail: detail.into(),
            transient: true,
        }
    }

    pub fn error(&self, site: &str) -> Error {
        if self.transient {
            Error::peer_transient(site, &self.detail)
        } else {
            Error::peer(site, &self.detail)
        }
    }
}

/// An Error frame on a Store stream: the peer's refusal, as the job's error.
fn refusal(code: ErrorCode, reason: &str) -> Stop {
    match code {
        // This sender is an old attempt whose job has a newer one running: nobody waits for
        // it, and a retry would only supersede the newer one in turn.
        ErrorCode::Superseded => Stop::permanent(format!("stopped this stream: {reason}")),
        _ => Stop::permanent(format!("refused: {reason}")),
    }
}

/// A read error, judged by the connection's close reason when there is one (that is where a
/// stopping peer or a lost path shows).
pub fn read_failure(e: &ReadError, connection: &quinn::Connection) -> Stop {
    match (connection.close_reason(), e) {
        (Some(reason), _) => connection_lost(&reason),
        (None, ReadError::Finished) => {
            Stop::transient("closed the stream before the transfer was complete")
        }
        (None, e) => Stop::permanent(e.to_string()),
    }
}

/// What a closed connection means for the job.
fn connection_lost(reason: &quinn::ConnectionError) -> Stop {
    use quinn::ConnectionError as E;
    match reason {
        E::ApplicationClosed(c) if c.error_code == close::SHUTTING_DOWN.into() => Stop::transient(
            "is shutting down (it closed the connection); try again once it is back",
        ),
        // A peer that closes normally mid-transfer (an older daemon stopping), a lost path,
        // a restarted peer: nothing to fix here.
        E::ApplicationClosed(c) if c.error_code == close::DONE.into() => {
            Stop::transient("closed the connection before the transfer was complete")
        }
        E::TimedOut | E::Reset => Stop::transient(format!("connection lost: {reason}")),
        _ => Stop::permanent(format!("connection closed: {reason}")),
    }
}

/// A failed write. When the peer stopped our stream it also sends its reason (an Error frame,
/// or the connection's close), which the reader task reports: wait for that, briefly, rather
/// than report quinn's "sending stopped by peer: error 0".
async fn write_failed(shared: &Shared, what: &str, e: quinn::WriteError) -> Stop {
    let from_reader = async {
        loop {
            if let Some(stop) = shared.failure.borrow().as_ref() {
                return stop.clone();
            }
            shared.notify.notified().await;
        }
    };
    if let Ok(stop) = tokio::time::timeout(PEER_REASON_WAIT, from_reader).await {
        return stop;
    }
    match e {
        quinn::WriteError::ConnectionLost(reason) => connection_lost(&reason),
        e => Stop::permanent(format!("{what}: {e}")),
    }
}

/// How long a sender whose stream the peer stopped waits for the peer's reason.
const PEER_REASON_WAIT: Duration = Duration::from_secs(10);

/// The peer's TLS refused our certificate: what to run there.
fn not_trusted(link: &Link, credentials: &SiteCredentials) -> Error {
    Error::peer(
        &link.site,
        format!(
            "site {peer} does not trust this site's certificate; on {peer} run `mover peer add {us} HOST:PORT {fingerprint}` (HOST:PORT: where {peer} reaches this site)",
            peer = link.site,
            us = credentials.site,
            fingerprint = credentials.fingerprint(),
        ),
    )
}

/// Maps a failed connection attempt to the job's error: what to do when the peer does not
/// trust us, and transient when it is only unreachable.
pub(crate) fn connect_error(link: &Link, credentials: &SiteCredentials, e: QuicError) -> Error {
    match e {
        QuicError::Connect {
            failure: ConnectFailure::NotTrusted,
            ..
        } => not_trusted(link, credentials),
        e @ QuicError::Connect {
            failure: ConnectFailure::Unreachable,
            ..
        } => Error::peer_transient(&link.site, e),
        e => Error::peer(&link.site, e),
    }
}

/// Dials `link` from an endpoint of its own (a worker's).
pub async fn connect(
    link: &Link,
    credentials: &SiteCredentials,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    transport::quic::connect(
        credentials,
        &link.site,
        link.address,
        link.fingerprint,
        &link.settings,
    )
    .await
    .map_err(|e| connect_error(link, credentials, e))
}

impl Shipper {
    /// A worker's Store stream, on a connection and endpoint of its own (driven on the
    /// worker's ring). `attempt`: which try of `job` this is (grows across retries and
    /// restarts), so the peer stops a killed try's streams once this one has begun.
    pub async fn connect(
        link: &Link,
        credentials: &SiteCredentials,
        tier: &str,
        job: &str,
        attempt: u64,
    ) -> Result<Shipper> {
        let (endpoint, connection) = connect(link, credentials).await?;
        let dialed = super::net::Dialed::own(endpoint, connection);
        Shipper::on(dialed, link, credentials, tier, job, attempt).await
    }

    /// A Store stream on `dialed` (the process's endpoint, for a replication). Runs inside a
    /// `LocalSet`: its tasks are local to the calling thread.
    pub async fn on(
        dialed: super::net::Dialed,
        link: &Link,
        credentials: &SiteCredentials,
        tier: &str,
        job: &str,
        attempt: u64,
    ) -> Result<Shipper> {
        let connection = dialed.connection.clone();
        let mut state = StoreSender::new(SHIP_QUERIES_IN_FLIGHT);
        let hello = state.hello(&credentials.site, tier, job);
        let (writer, mut reader, version, unacked_bytes_max) =
            open_stream(link, credentials, &connection, &hello).await?;
        state
            .handle(&Frame::Welcome {
                version,
                site: &link.site,
                unacked_bytes_max,
            })
            .map_err(|e| Error::peer(&link.site, e))?;
        let mut writer = writer;
        if let Some(frame) = state.attempt(attempt) {
            writer
                .send(&frame)
                .await
                .map_err(|e| Error::peer(&link.site, format!("sending the attempt: {e}")))?;
        }
        let shared = Rc::new(Shared {
            state: RefCell::new(state),
            answers: RefCell::new(VecDeque::new()),
            failure: RefCell::new(None),
            notify: Notify::new(),
            closed: RefCell::new(VecDeque::new()),
            held: Cell::new(0),
            done: Cell::new(false),
            room: Notify::new(),
            spare: RefCell::new(Vec::new()),
            stats: RefCell::new(ShipStats::default()),
        });
        let reader_shared = shared.clone();
        let reader_connection = connection.clone();
        let reader_task = tokio::task::spawn_local(async move {
            let shared = reader_shared;
            let failure = loop {
                let frame = match reader.next().await {
                    Ok(frame) => frame,
                    Err(e) => break read_failure(&e, &reader_connection),
                };
                if let Frame::Error { code, reason } = frame {
                    break refusal(code, reason);
                }
                let event = shared.state.borrow_mut().handle(&frame);
                match event {
                    Ok(SenderEvent::Missing { wanted, .. }) => {
                        shared.answers.borrow_mut().push_back(wanted)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        reader.stop(1);
                        break Stop::permanent(format!("protocol violation: {e}"));
                    }
                }
                shared.notify.notify_one();
            };
            shared.fail(failure);
        });
        let ship_task = tokio::task::spawn_local(ship(shared.clone(), writer, link.clone()));
        Ok(Shipper {
            link: link.clone(),
            dialed,
            shared,
            reader_task,
            ship_task: Some(ship_task),
            batch: BytesMut::with_capacity(BATCH_CAPACITY),
            entries: Vec::new(),
            batches_allocated: 1,
        })
    }

    /// Chunk payload bytes handed to quinn so far (for live progress).
    pub fn payload_bytes_sent(&self) -> u64 {
        self.shared.stats.borrow().payload_bytes_sent
    }

    /// The ship task's or reader's reason, as the job's error.
    fn failed(&self) -> Option<Error> {
        self.shared
            .failure
            .borrow()
            .as_ref()
            .map(|stop| stop.error(&self.link.site))
    }

    /// Adds a new chunk (payload as it will be stored) to the current batch.
    pub async fn offer(
        &mut self,
        id: [u8; 32],
        codec: u8,
        raw_len: u32,
        payload: &[u8],
    ) -> Result<()> {
        let start = self.batch.len();
        self.batch.extend_from_slice(payload);
        self.entries.push(Entry {
            id,
            codec,
            raw_len,
            range: start..self.batch.len(),
        });
        if self.batch.len() >= SHIP_BATCH_BYTES || self.entries.len() == frame::IDS_PER_FRAME_MAX {
            self.close_batch().await?;
        }
        Ok(())
    }

    /// Hands the current batch to the ship task, first waiting while the pipeline is full.
    async fn close_batch(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        loop {
            if let Some(e) = self.failed() {
                return Err(e);
            }
            if self.shared.held.get() < SHIP_QUERIES_IN_FLIGHT {
                break;
            }
            self.shared.room.notified().await;
        }
        let next = self.reuse_batch();
        let full = std::mem::replace(&mut self.batch, next);
        self.shared.closed.borrow_mut().push_back(Batch {
            bytes: full.freeze(),
            entries: std::mem::take(&mut self.entries),
        });
        self.shared.held.set(self.shared.held.get() + 1);
        self.shared.notify.notify_one();
        Ok(())
    }

    fn reuse_batch(&mut self) -> BytesMut {
        let mut spare = self.shared.spare.borrow_mut();
        for i in 0..spare.len() {
            if spare[i].is_unique() {
                if let Ok(mut buffer) = spare.swap_remove(i).try_into_mut() {
                    buffer.clear();
                    if buffer.capacity() >= BATCH_CAPACITY {
                        return buffer;
                    }
                }
                break;
            }
        }
        self.batches_allocated += 1;
        BytesMut::with_capacity(BATCH_CAPACITY)
    }

    /// Ships what is left, asks for durability and waits until every chunk is acknowledged.
    pub async fn finish(mut self) -> Result<ShipStats> {
        self.close_batch().await?;
        self.shared.done.set(true);
        self.shared.notify.notify_one();
        let shipped = self
            .ship_task
            .take()
            .expect("finish runs once")
            .await
            .map_err(|e| Error::peer(&self.link.site, format!("the ship task failed: {e}")))?;
        let waits = match shipped {
            Ok(waits) => waits,
            Err(stop) => return Err(self.failed().unwrap_or(stop.error(&self.link.site))),
        };
        let stats = self.dialed.connection.stats();
        tracing::debug!(
            peer = %self.link.site,
            mtu = stats.path.current_mtu,
            rtt_us = stats.path.rtt.as_micros() as u64,
            lost_packets = stats.path.lost_packets,
            congestion_events = stats.path.congestion_events,
            datagrams = stats.udp_tx.datagrams,
            batches_allocated = self.batches_allocated,
            wait_answer_ms = waits.answer.as_millis() as u64,
            wait_credit_ms = waits.credit.as_millis() as u64,
            wait_bucket_ms = waits.bucket.as_millis() as u64,
            wait_send_ms = waits.send.as_millis() as u64,
            "worker connection done"
        );
        let mut ship = self.shared.stats.borrow().clone();
        (ship.wire_bytes_sent, ship.wire_bytes_received) = self.dialed.wire_bytes();
        self.reader_task.abort();
        self.dialed.done().await;
        Ok(ship)
    }
}

impl Drop for Shipper {
    /// A worker that stops early (its job failed or was cancelled) stops its tasks with it.
    fn drop(&mut self) {
        self.reader_task.abort();
        if let Some(task) = &self.ship_task {
            task.abort();
        }
    }
}

/// The ship task: sends each closed batch's Query at once (ahead of chunks already asked for,
/// so its answer does not wait behind them on the stream), ships the wanted chunks of the
/// oldest answered batch one at a time within credit and the link's bandwidth cap, and when
/// the worker is done, flushes and waits for the peer to acknowledge everything as durable.
async fn ship(shared: Rc<Shared>, mut writer: FrameWriter, link: Link) -> Result<Waits, Stop> {
    let outcome = ship_all(&shared, &mut writer, &link).await;
    if let Err(stop) = &outcome {
        shared.fail(stop.clone());
    }
    outcome
}

async fn ship_all(shared: &Shared, writer: &mut FrameWriter, link: &Link) -> Result<Waits, Stop> {
    let mut queried: VecDeque<Queried> = VecDeque::new();
    let mut waits = Waits::default();
    let mut idle_since: Option<Instant> = None;
    loop {
        if let Some(stop) = shared.failure.borrow().as_ref() {
            return Err(stop.clone());
        }
        // Queries first: they are small, and each one's answer takes a round trip.
        loop {
            if !shared.state.borrow().can_query() {
                break;
            }
            let Some(batch) = shared.closed.borrow_mut().pop_front() else {
                break;
            };
            let ids: Vec<[u8; 32]> = batch.entries.iter().map(|e| e.id).collect();
            let seq = shared.state.borrow_mut().query(ids.len());
            if let Err(e) = writer
                .send(&Frame::Query {
                    seq,
                    ids: frame::id_list(&ids),
                })
                .await
            {
                return Err(write_failed(shared, "sending a query", e).await);
            }
            queried.push_back(Queried {
                batch,
                wanted: None,
                next: 0,
            });
        }
        if let Some(front) = queried.front_mut() {
            if front.wanted.is_none() {
                front.wanted = shared.answers.borrow_mut().pop_front();
            }
        }
        match queried.front_mut() {
            Some(Queried {
                batch,
                wanted: Some(wanted),
                next,
            }) => {
                if let Some(since) = idle_since.take() {
                    waits.answer += since.elapsed();
                }
                debug_assert_eq!(wanted.len(), batch.entries.len());
                // Entries the peer already holds are counted, not sent.
                while *next < batch.entries.len() && !wanted[*next] {
                    let entry = &batch.entries[*next];
                    let mut stats = shared.stats.borrow_mut();
                    stats.chunks_present += 1;
                    stats.raw_bytes_present += entry.raw_len as u64;
                    *next += 1;
                }
                if *next == batch.entries.len() {
                    let done = queried.pop_front().expect("front exists");
                    let mut spare = shared.spare.borrow_mut();
                    if spare.len() < SPARE_BATCHES_MAX {
                        spare.push(done.batch.bytes);
                    }
                    shared.held.set(shared.held.get() - 1);
                    shared.room.notify_one();
                    continue;
                }
                let entry = &batch.entries[*next];
                let len = entry.range.len() as u64;
                if shared.state.borrow().credit_bytes() < len {
                    let waiting = Instant::now();
                    shared.notify.notified().await;
                    waits.credit += waiting.elapsed();
                    continue;
                }
                if let Some(bucket) = &link.bucket {
                    waits.bucket += bucket.pace_chunk(len).await;
                }
                let sending = Instant::now();
                if let Err(e) = writer
                    .send_chunk(
                        &entry.id,
                        entry.codec,
                        entry.raw_len,
                        batch.bytes.slice(entry.range.clone()),
                    )
                    .await
                {
                    return Err(write_failed(shared, "sending a chunk", e).await);
                }
                waits.send += sending.elapsed();
                shared.state.borrow_mut().chunk_sent(len);
                let mut stats = shared.stats.borrow_mut();
                stats.chunks_sent += 1;
                stats.payload_bytes_sent += len;
                stats.raw_bytes_sent += entry.raw_len as u64;
                *next += 1;
            }
            Some(_) => {
                // The oldest query is not answered yet.
                idle_since.get_or_insert_with(Instant::now);
                shared.notify.notified().await;
            }
            None if shared.done.get() && shared.closed.borrow().is_empty() => break,
            None => shared.notify.notified().await,
        }
    }
    let seq = shared.state.borrow_mut().flush();
    if let Err(e) = writer.send(&Frame::Flush { seq }).await {
        return Err(write_failed(shared, "sending flush", e).await);
    }
    loop {
        if let Some(stop) = shared.failure.borrow().as_ref() {
            return Err(stop.clone());
        }
        if shared.state.borrow().is_drained() {
            break;
        }
        shared.notify.notified().await;
    }
    writer.finish();
    Ok(waits)
}

/// Purpose-specific hello for the streams other than Store.
pub fn hello<'a>(purpose: Purpose, site: &'a str, job: &'a str) -> Frame<'a> {
    Frame::Hello {
        version_min: frame::VERSION_MIN,
        version_max: frame::VERSION_MAX,
        purpose,
        site,
        tier: "",
        job,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_superseded_stream_is_a_permanent_stop() {
        let stop = refusal(
            ErrorCode::Superseded,
            "attempt 1 of job \"b-3\" from site a was superseded by attempt 2",
        );
        assert!(!stop.transient);
        assert!(stop.detail.contains("superseded by attempt 2"), "{stop:?}");
    }
}
