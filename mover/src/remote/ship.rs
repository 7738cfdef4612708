//! The sending end of a Store stream, one per worker: new chunks are gathered into batches,
//! the destination is asked which ids it lacks, and only those are shipped.
//!
//! Runs on the worker's own thread and tokio-uring runtime (quinn drives its connection as a
//! task on the same ring), so reading, chunking and shipping share one pinned core and no
//! buffer crosses threads. A reader task applies the peer's frames to the sans-IO
//! [`StoreSender`]; the worker awaits answers and credit through one `Notify`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use transport::frame::{self, Frame, Purpose};
use transport::quic::{FrameReader, FrameWriter, ReadError};
use transport::session::{SenderEvent, StoreSender};
use transport::tls::SiteCredentials;

use crate::constants::{SHIP_BATCH_BYTES, SHIP_QUERIES_IN_FLIGHT};
use crate::error::{Error, Result};
use crate::peers::Link;

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

struct Shared {
    state: RefCell<StoreSender>,
    answers: RefCell<VecDeque<Vec<bool>>>,
    failure: RefCell<Option<String>>,
    notify: Notify,
}

pub struct Shipper {
    link: Link,
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    writer: FrameWriter,
    shared: Rc<Shared>,
    reader_task: tokio::task::JoinHandle<()>,
    batch: BytesMut,
    entries: Vec<Entry>,
    outstanding: VecDeque<(Bytes, Vec<Entry>)>,
    /// Batches already shipped. quinn holds slices of them until the peer acknowledges the
    /// packets; once it lets go a batch buffer is reused, so the hot path does not fault in
    /// fresh pages for every batch (that cost more kernel time than the sends).
    spare: Vec<Bytes>,
    batches_allocated: u64,
    pub stats: ShipStats,
}

/// Shipped batches kept for reuse; beyond this they are freed.
const SPARE_BATCHES_MAX: usize = 4;
const BATCH_CAPACITY: usize = SHIP_BATCH_BYTES + frame::CHUNK_BYTES_MAX;

/// Opens a stream and performs the Hello/Welcome exchange.
pub async fn open_stream(
    link: &Link,
    connection: &quinn::Connection,
    hello: &Frame<'_>,
) -> Result<(FrameWriter, FrameReader, u16, u64)> {
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| Error::peer(&link.site, format!("opening a stream: {e}")))?;
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
        Err(e) => Err(Error::peer(&link.site, read_failure(&e, connection))),
    }
}

/// A read error, with the connection's close reason when there is one (that is where a
/// refused TLS handshake or a peer's error shows).
pub fn read_failure(e: &ReadError, connection: &quinn::Connection) -> String {
    match connection.close_reason() {
        Some(reason) => format!("connection closed: {reason}"),
        None => e.to_string(),
    }
}

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
    .map_err(|e| Error::peer(&link.site, e))
}

impl Shipper {
    pub async fn connect(
        link: &Link,
        credentials: &SiteCredentials,
        tier: &str,
        job: &str,
    ) -> Result<Shipper> {
        let (endpoint, connection) = connect(link, credentials).await?;
        let mut state = StoreSender::new(SHIP_QUERIES_IN_FLIGHT);
        let hello = state.hello(&credentials.site, tier, job);
        let (writer, mut reader, version, unacked_bytes_max) =
            open_stream(link, &connection, &hello).await?;
        state
            .handle(&Frame::Welcome {
                version,
                site: &link.site,
                unacked_bytes_max,
            })
            .map_err(|e| Error::peer(&link.site, e))?;
        let shared = Rc::new(Shared {
            state: RefCell::new(state),
            answers: RefCell::new(VecDeque::new()),
            failure: RefCell::new(None),
            notify: Notify::new(),
        });
        let reader_shared = shared.clone();
        let reader_connection = connection.clone();
        let reader_task = tokio::task::spawn_local(async move {
            let shared = reader_shared;
            let failure = loop {
                let frame = match reader.next().await {
                    Ok(frame) => frame,
                    Err(ReadError::Finished) => break "the peer closed the stream".to_string(),
                    Err(e) => break read_failure(&e, &reader_connection),
                };
                if let Frame::Error { reason, .. } = frame {
                    break format!("refused: {reason}");
                }
                let event = shared.state.borrow_mut().handle(&frame);
                match event {
                    Ok(SenderEvent::Missing { wanted, .. }) => {
                        shared.answers.borrow_mut().push_back(wanted)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        reader.stop(1);
                        break format!("protocol violation: {e}");
                    }
                }
                shared.notify.notify_one();
            };
            shared.failure.borrow_mut().get_or_insert(failure);
            shared.notify.notify_one();
        });
        Ok(Shipper {
            link: link.clone(),
            endpoint,
            connection,
            writer,
            shared,
            reader_task,
            batch: BytesMut::with_capacity(BATCH_CAPACITY),
            entries: Vec::new(),
            outstanding: VecDeque::new(),
            spare: Vec::new(),
            batches_allocated: 1,
            stats: ShipStats::default(),
        })
    }

    /// A send failed; the peer's own reason (an Error frame the reader saw) says more than
    /// "stream stopped", so it wins when there is one.
    fn fail(&self, detail: impl std::fmt::Display) -> Error {
        match self.shared.failure.borrow().as_ref() {
            Some(reason) => Error::peer(&self.link.site, reason),
            None => Error::peer(&self.link.site, detail),
        }
    }

    /// Waits until `ready` holds; fails when the reader saw the stream fail.
    async fn wait_for(&self, ready: impl Fn(&Shared) -> bool) -> Result<()> {
        loop {
            if ready(&self.shared) {
                return Ok(());
            }
            if let Some(failure) = self.shared.failure.borrow().as_ref() {
                return Err(self.fail(failure));
            }
            self.shared.notify.notified().await;
        }
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

    /// Sends the current batch's ids as a Query, first making room by serving answers.
    async fn close_batch(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        // Ship what the peer already asked for; wait only while the pipeline is full (the
        // batches awaiting or holding answers are what bounds this worker's memory).
        while !self.shared.answers.borrow().is_empty()
            || self.outstanding.len() >= SHIP_QUERIES_IN_FLIGHT
            || !self.shared.state.borrow().can_query()
        {
            self.serve_answer().await?;
        }
        let ids: Vec<[u8; 32]> = self.entries.iter().map(|e| e.id).collect();
        let seq = self.shared.state.borrow_mut().query(ids.len());
        self.writer
            .send(&Frame::Query {
                seq,
                ids: frame::id_list(&ids),
            })
            .await
            .map_err(|e| self.fail(format!("sending a query: {e}")))?;
        let next = self.reuse_batch();
        let full = std::mem::replace(&mut self.batch, next);
        self.outstanding
            .push_back((full.freeze(), std::mem::take(&mut self.entries)));
        Ok(())
    }

    fn reuse_batch(&mut self) -> BytesMut {
        for i in 0..self.spare.len() {
            if self.spare[i].is_unique() {
                if let Ok(mut buffer) = self.spare.swap_remove(i).try_into_mut() {
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

    /// Waits for the oldest query's answer and ships the chunks it asks for.
    async fn serve_answer(&mut self) -> Result<()> {
        self.wait_for(|s| !s.answers.borrow().is_empty()).await?;
        let wanted = self
            .shared
            .answers
            .borrow_mut()
            .pop_front()
            .expect("waited for it");
        let (bytes, entries) = self
            .outstanding
            .pop_front()
            .expect("an answer implies an outstanding batch");
        debug_assert_eq!(wanted.len(), entries.len());
        for (entry, wanted) in entries.iter().zip(wanted) {
            if !wanted {
                self.stats.chunks_present += 1;
                self.stats.raw_bytes_present += entry.raw_len as u64;
                continue;
            }
            let len = entry.range.len() as u64;
            self.wait_for(|s| s.state.borrow().credit_bytes() >= len)
                .await?;
            if let Some(bucket) = &self.link.bucket {
                let wait = bucket
                    .lock()
                    .expect("bucket lock")
                    .take(len + 45, Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            self.writer
                .send_chunk(
                    &entry.id,
                    entry.codec,
                    entry.raw_len,
                    bytes.slice(entry.range.clone()),
                )
                .await
                .map_err(|e| self.fail(format!("sending a chunk: {e}")))?;
            self.shared.state.borrow_mut().chunk_sent(len);
            self.stats.chunks_sent += 1;
            self.stats.payload_bytes_sent += len;
            self.stats.raw_bytes_sent += entry.raw_len as u64;
        }
        if self.spare.len() < SPARE_BATCHES_MAX {
            self.spare.push(bytes);
        }
        Ok(())
    }

    /// Ships what is left, asks for durability and waits until every chunk is acknowledged.
    pub async fn finish(mut self) -> Result<ShipStats> {
        self.close_batch().await?;
        while !self.outstanding.is_empty() {
            self.serve_answer().await?;
        }
        let seq = self.shared.state.borrow_mut().flush();
        self.writer
            .send(&Frame::Flush { seq })
            .await
            .map_err(|e| self.fail(format!("sending flush: {e}")))?;
        self.wait_for(|s| s.state.borrow().is_drained()).await?;
        self.writer.finish();
        let stats = self.connection.stats();
        tracing::debug!(
            peer = %self.link.site,
            mtu = stats.path.current_mtu,
            rtt_us = stats.path.rtt.as_micros() as u64,
            lost_packets = stats.path.lost_packets,
            congestion_events = stats.path.congestion_events,
            datagrams = stats.udp_tx.datagrams,
            batches_allocated = self.batches_allocated,
            "worker connection done"
        );
        self.stats.wire_bytes_sent = stats.udp_tx.bytes;
        self.stats.wire_bytes_received = stats.udp_rx.bytes;
        self.reader_task.abort();
        transport::quic::hang_up(&self.endpoint, &self.connection).await;
        Ok(self.stats)
    }
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
