//! The peer session as pure state: which frame may come next, have/want bookkeeping, credit and
//! acknowledgements. No sockets and no clocks: the quinn glue feeds decoded frames in and
//! writes out what these types return, so every rule here is tested (and fuzzed) in memory.
//!
//! A Store stream runs:
//!
//! ```text
//! sender                                   receiver
//! Hello(Store, site, tier, job)  ───────►
//!                                ◄───────  Welcome(version, site, unacked_bytes_max)
//! Attempt(n)  (version ≥ 2)      ───────►  (stops the job's streams of older attempts)
//! Query(seq, ids)                ───────►  (looks ids up in its index)
//!                                ◄───────  Missing(seq, bitmap)
//! Chunk × wanted, in bitmap order ──────►  (verifies, appends to a pack)
//!                                ◄───────  Ack(chunks, bytes, flush_seq) after each pack seal
//! Flush(seq)                     ───────►  (seals, commits the index)
//!                                ◄───────  Ack(…, flush_seq = seq)
//! ```
//!
//! Queries are answered in order, and the receiver accepts only the chunks it asked for, in
//! the order it asked for them. Credit: the sender keeps at most `unacked_bytes_max` chunk
//! payload bytes sent but not acknowledged as durable, so a receiver's pack tail (what a crash
//! could lose and a resumed job must resend) stays bounded; a sender that exceeds it is
//! refused.

use std::collections::VecDeque;

use crate::frame::{self, Frame, IdList, Purpose, IDS_PER_FRAME_MAX};

/// A peer broke the protocol; the stream is closed with this reason. `rule` says which rule
/// (for code and tests), `detail` says it for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct SessionError {
    pub rule: Rule,
    pub detail: String,
}

/// The session rules a peer can break, one per check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// A frame this side of this stream does not take now (before the handshake, or a type
    /// the stream never carries).
    UnexpectedFrame,
    /// The Welcome names a version this build does not speak.
    Version,
    /// The Welcome grants less credit than one chunk frame.
    CreditBelowOneChunk,
    /// A Missing that does not answer the oldest open query (sequence, count or bitmap).
    AnswerMismatch,
    /// An Ack that goes backwards or above what was sent or flushed.
    AckMismatch,
    /// A Query whose sequence number is not the next one.
    QueryOrder,
    /// More than [`QUERIES_OPEN_MAX`] queries unanswered.
    QueriesOpen,
    /// More than [`WANTED_IDS_MAX`] ids asked for and not sent.
    WantedIds,
    /// A Chunk that is not the next one asked for.
    ChunkOrder,
    /// A Chunk nobody asked for.
    ChunkNotAsked,
    /// More chunk bytes than the credit allows.
    Credit,
    /// A Flush whose sequence number is not the next one.
    FlushOrder,
    /// A Flush while chunks asked for are still owed.
    FlushOwed,
    /// A manifest larger than the bound, or empty.
    ManifestSize,
    /// A manifest part that does not continue the manifest being sent.
    ManifestOrder,
    /// A Commit (or end) before every part of the manifest arrived.
    ManifestIncomplete,
}

fn violation(rule: Rule, detail: impl Into<String>) -> SessionError {
    SessionError {
        rule,
        detail: detail.into(),
    }
}

/// Picks the highest version both ranges contain.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let high = peer_max.min(frame::VERSION_MAX);
    let low = peer_min.max(frame::VERSION_MIN);
    (low <= high).then_some(high)
}

/// Whether a Store stream of negotiated `version` carries the sender's attempt: its first
/// frame after the Welcome is an Attempt (a version-1 peer knows no such frame).
pub fn carries_attempt(version: u16) -> bool {
    version >= frame::ATTEMPT_VERSION
}

/// What the sending side learns from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The receiver accepted the stream.
    Welcomed { version: u16, site: String },
    /// The answer to query `seq`: `wanted[i]` is true when the receiver lacks id i.
    Missing { seq: u64, wanted: Vec<bool> },
    /// Chunks (and payload bytes) durable at the receiver, cumulative.
    Acked { chunks: u64, bytes: u64 },
}

/// The sending side of a Store stream.
#[derive(Debug)]
pub struct StoreSender {
    welcomed: bool,
    /// The version the receiver chose (0 before the Welcome).
    version: u16,
    next_seq: u64,
    /// Queries sent and not answered: (seq, id count), oldest first.
    outstanding: VecDeque<(u64, u32)>,
    queries_max: usize,
    /// Chunks the receiver asked for and we have not sent yet.
    owed: u64,
    sent_chunks: u64,
    sent_bytes: u64,
    acked_chunks: u64,
    acked_bytes: u64,
    unacked_bytes_max: u64,
    flush_seq: u64,
    flush_acked: u64,
}

impl StoreSender {
    /// `queries_max` bounds the queries in flight (and with them the chunks the caller holds
    /// while it waits for answers).
    pub fn new(queries_max: usize) -> StoreSender {
        // More would be refused by an honest receiver.
        assert!(queries_max > 0 && queries_max <= QUERIES_OPEN_MAX);
        StoreSender {
            welcomed: false,
            version: 0,
            next_seq: 1,
            outstanding: VecDeque::new(),
            queries_max,
            owed: 0,
            sent_chunks: 0,
            sent_bytes: 0,
            acked_chunks: 0,
            acked_bytes: 0,
            unacked_bytes_max: 0,
            flush_seq: 0,
            flush_acked: 0,
        }
    }

    pub fn hello<'a>(&self, site: &'a str, tier: &'a str, job: &'a str) -> Frame<'a> {
        Frame::Hello {
            version_min: frame::VERSION_MIN,
            version_max: frame::VERSION_MAX,
            purpose: Purpose::Store,
            site,
            tier,
            job,
        }
    }

    /// The Attempt frame to send right after the Welcome, when the receiver speaks a version
    /// that has one; `None` for a version-1 receiver (the stream then works as before).
    pub fn attempt(&self, attempt: u64) -> Option<Frame<'static>> {
        assert!(self.welcomed, "the attempt follows the Welcome");
        carries_attempt(self.version).then_some(Frame::Attempt { attempt })
    }

    // ---- getters

    pub fn is_welcomed(&self) -> bool {
        self.welcomed
    }
    /// Chunks the receiver asked for that have not been sent ([`StoreSender::chunk_sent`]
    /// needs one).
    pub fn chunks_owed(&self) -> u64 {
        self.owed
    }
    pub fn can_query(&self) -> bool {
        self.welcomed && self.outstanding.len() < self.queries_max
    }
    pub fn queries_outstanding(&self) -> usize {
        self.outstanding.len()
    }
    /// Payload bytes that may be sent before an acknowledgement must arrive.
    pub fn credit_bytes(&self) -> u64 {
        self.unacked_bytes_max
            .saturating_sub(self.sent_bytes - self.acked_bytes)
    }
    pub fn acked(&self) -> (u64, u64) {
        (self.acked_chunks, self.acked_bytes)
    }
    pub fn sent(&self) -> (u64, u64) {
        (self.sent_chunks, self.sent_bytes)
    }
    /// Everything sent is durable at the receiver and the last flush was answered.
    pub fn is_drained(&self) -> bool {
        self.outstanding.is_empty()
            && self.owed == 0
            && self.acked_chunks == self.sent_chunks
            && self.flush_acked == self.flush_seq
    }

    // ---- mutators (the caller sends the corresponding frame)

    /// Registers a query of `count` ids and returns its sequence number.
    pub fn query(&mut self, count: usize) -> u64 {
        assert!(self.can_query(), "query without a free slot");
        assert!((1..=IDS_PER_FRAME_MAX).contains(&count));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.push_back((seq, count as u32));
        seq
    }

    /// Records that one wanted chunk with `payload_bytes` went out.
    pub fn chunk_sent(&mut self, payload_bytes: u64) {
        assert!(self.owed > 0, "sent a chunk nobody asked for");
        assert!(payload_bytes <= self.credit_bytes(), "sent beyond credit");
        self.owed -= 1;
        self.sent_chunks += 1;
        self.sent_bytes += payload_bytes;
    }

    /// Asks the receiver to make everything durable; returns the Flush sequence number. Only
    /// once every query is answered and every chunk asked for sent: the receiver refuses a
    /// Flush while it still waits for chunks ([`Rule::FlushOwed`]).
    pub fn flush(&mut self) -> u64 {
        self.flush_seq += 1;
        self.flush_seq
    }

    // ---- inputs

    pub fn handle(&mut self, frame: &Frame<'_>) -> Result<SenderEvent, SessionError> {
        match *frame {
            Frame::Welcome {
                version,
                site,
                unacked_bytes_max,
            } if !self.welcomed => {
                if negotiate(version, version) != Some(version) {
                    return Err(violation(
                        Rule::Version,
                        format!(
                            "peer chose protocol version {version}, we speak {}..={}",
                            frame::VERSION_MIN,
                            frame::VERSION_MAX
                        ),
                    ));
                }
                if unacked_bytes_max < frame::FRAME_PAYLOAD_BYTES_MAX as u64 {
                    return Err(violation(
                        Rule::CreditBelowOneChunk,
                        format!(
                            "peer grants {unacked_bytes_max} bytes of credit, less than one chunk"
                        ),
                    ));
                }
                self.welcomed = true;
                self.version = version;
                self.unacked_bytes_max = unacked_bytes_max;
                Ok(SenderEvent::Welcomed {
                    version,
                    site: site.to_string(),
                })
            }
            Frame::Missing { seq, count, bitmap } if self.welcomed => {
                let Some(&(expected, sent_count)) = self.outstanding.front() else {
                    return Err(violation(
                        Rule::AnswerMismatch,
                        format!("answer to query {seq}, none is open"),
                    ));
                };
                if seq != expected || count != sent_count {
                    return Err(violation(Rule::AnswerMismatch, format!(
                        "answer to query {seq} with {count} ids, expected query {expected} with {sent_count}"
                    )));
                }
                if bitmap.len() != (count as usize).div_ceil(8) {
                    return Err(violation(
                        Rule::AnswerMismatch,
                        "answer bitmap does not match its id count",
                    ));
                }
                self.outstanding.pop_front();
                let wanted: Vec<bool> = (0..count as usize)
                    .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
                    .collect();
                self.owed += wanted.iter().filter(|&&w| w).count() as u64;
                Ok(SenderEvent::Missing { seq, wanted })
            }
            Frame::Ack {
                chunks,
                bytes,
                flush_seq,
            } if self.welcomed => {
                if chunks < self.acked_chunks
                    || chunks > self.sent_chunks
                    || bytes < self.acked_bytes
                    || bytes > self.sent_bytes
                    || flush_seq < self.flush_acked
                    || flush_seq > self.flush_seq
                {
                    return Err(violation(Rule::AckMismatch, format!(
                        "acknowledgement of {chunks} chunks / {bytes} bytes / flush {flush_seq} does not match {} sent / {} bytes / flush {}",
                        self.sent_chunks, self.sent_bytes, self.flush_seq
                    )));
                }
                self.acked_chunks = chunks;
                self.acked_bytes = bytes;
                self.flush_acked = flush_seq;
                Ok(SenderEvent::Acked { chunks, bytes })
            }
            ref other => Err(unexpected(other, self.welcomed)),
        }
    }
}

fn unexpected(frame: &Frame<'_>, ready: bool) -> SessionError {
    let name = frame.name();
    violation(
        Rule::UnexpectedFrame,
        if ready {
            format!("unexpected {name} frame")
        } else {
            format!("unexpected {name} frame before the handshake")
        },
    )
}

/// What the receiving side must do after a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverInput<'a> {
    /// Look the ids up and answer with [`StoreReceiver::answer`].
    Query { seq: u64, ids: IdList<'a> },
    /// A chunk we asked for: verify it, store it.
    Chunk {
        id: [u8; 32],
        codec: u8,
        raw_len: u32,
        payload: &'a [u8],
    },
    /// Make everything received durable, then send [`StoreReceiver::durable`]'s Ack.
    Flush { seq: u64 },
}

/// The receiving side of a Store stream (after the Hello was accepted).
#[derive(Debug, Clone)]
pub struct StoreReceiver {
    next_query: u64,
    /// Ids asked for and not yet received, in the order they must arrive.
    wanted: VecDeque<[u8; 32]>,
    queries_open: usize,
    received_chunks: u64,
    received_bytes: u64,
    durable_chunks: u64,
    durable_bytes: u64,
    unacked_bytes_max: u64,
    last_flush: u64,
}

/// Unanswered queries a receiver tolerates; a sender needs only a few to fill a pipe.
pub const QUERIES_OPEN_MAX: usize = 16;
/// Ids a receiver asked for and still waits for (512 KiB of ids): a sender that keeps
/// querying without sending what it was asked for is refused.
pub const WANTED_IDS_MAX: usize = QUERIES_OPEN_MAX * IDS_PER_FRAME_MAX;

impl StoreReceiver {
    pub fn new(unacked_bytes_max: u64) -> StoreReceiver {
        // Less than one chunk frame of credit is refused by every sender.
        assert!(unacked_bytes_max >= frame::FRAME_PAYLOAD_BYTES_MAX as u64);
        StoreReceiver {
            next_query: 1,
            wanted: VecDeque::new(),
            queries_open: 0,
            received_chunks: 0,
            received_bytes: 0,
            durable_chunks: 0,
            durable_bytes: 0,
            unacked_bytes_max,
            last_flush: 0,
        }
    }

    pub fn welcome<'a>(&self, version: u16, site: &'a str) -> Frame<'a> {
        Frame::Welcome {
            version,
            site,
            unacked_bytes_max: self.unacked_bytes_max,
        }
    }

    /// Queries handed out by [`StoreReceiver::handle`] and not answered yet
    /// ([`StoreReceiver::answer`] needs one).
    pub fn queries_open(&self) -> usize {
        self.queries_open
    }

    /// Bytes received since the last [`StoreReceiver::durable`].
    pub fn pending_bytes(&self) -> u64 {
        self.received_bytes - self.durable_bytes
    }

    pub fn handle<'a>(&mut self, frame: &Frame<'a>) -> Result<ReceiverInput<'a>, SessionError> {
        match *frame {
            Frame::Query { seq, ids } => {
                if seq != self.next_query {
                    return Err(violation(
                        Rule::QueryOrder,
                        format!("query {seq} out of order, expected {}", self.next_query),
                    ));
                }
                if self.queries_open >= QUERIES_OPEN_MAX {
                    return Err(violation(
                        Rule::QueriesOpen,
                        format!("more than {QUERIES_OPEN_MAX} queries without reading the answers"),
                    ));
                }
                if self.wanted.len() + ids.len() > WANTED_IDS_MAX {
                    return Err(violation(
                        Rule::WantedIds,
                        format!("more than {WANTED_IDS_MAX} chunks asked for and not sent"),
                    ));
                }
                self.next_query += 1;
                self.queries_open += 1;
                Ok(ReceiverInput::Query { seq, ids })
            }
            Frame::Chunk {
                id,
                codec,
                raw_len,
                payload,
            } => {
                self.chunk_arrived(&id, payload.len())?;
                Ok(ReceiverInput::Chunk {
                    id,
                    codec,
                    raw_len,
                    payload,
                })
            }
            Frame::Flush { seq } => {
                // An honest sender flushes only after shipping everything it was asked for;
                // taking this Flush would ack less than was sent and leave both ends waiting.
                if !self.wanted.is_empty() {
                    return Err(violation(
                        Rule::FlushOwed,
                        format!(
                            "flush {seq} while {} chunks asked for were not sent",
                            self.wanted.len()
                        ),
                    ));
                }
                if seq != self.last_flush + 1 {
                    return Err(violation(
                        Rule::FlushOrder,
                        format!("flush {seq} out of order, expected {}", self.last_flush + 1),
                    ));
                }
                self.last_flush = seq;
                Ok(ReceiverInput::Flush { seq })
            }
            ref other => Err(unexpected(other, true)),
        }
    }

    /// A Chunk frame's fields arrived (its payload is read separately): it must be the next
    /// chunk asked for and within the sender's credit.
    pub fn chunk_arrived(&mut self, id: &[u8; 32], payload_len: usize) -> Result<(), SessionError> {
        match self.wanted.front() {
            Some(next) if next == id => {}
            Some(_) => {
                return Err(violation(
                    Rule::ChunkOrder,
                    "chunk out of order: not the next one asked for",
                ))
            }
            None => {
                return Err(violation(
                    Rule::ChunkNotAsked,
                    "chunk that was not asked for",
                ))
            }
        }
        let payload_bytes = payload_len as u64;
        if self.pending_bytes() + payload_bytes > self.unacked_bytes_max {
            return Err(violation(
                Rule::Credit,
                format!(
                    "sender exceeded its credit of {} unacknowledged bytes",
                    self.unacked_bytes_max
                ),
            ));
        }
        self.wanted.pop_front();
        self.received_chunks += 1;
        self.received_bytes += payload_bytes;
        Ok(())
    }

    /// Records which ids of query `seq` we lack and returns the Missing bitmap.
    pub fn answer(&mut self, ids: IdList<'_>, wanted: &[bool]) -> Vec<u8> {
        assert_eq!(ids.len(), wanted.len());
        assert!(self.queries_open > 0);
        self.queries_open -= 1;
        let mut bitmap = vec![0u8; wanted.len().div_ceil(8)];
        for (i, &w) in wanted.iter().enumerate() {
            if w {
                bitmap[i / 8] |= 1 << (i % 8);
                self.wanted.push_back(ids.get(i));
            }
        }
        bitmap
    }

    /// Everything received so far is durable: the Ack to send.
    pub fn durable(&mut self) -> Frame<'static> {
        self.durable_through(self.received_chunks, self.received_bytes, self.last_flush)
    }

    /// The first `chunks` chunks received (`bytes` of payload) are durable, and so is
    /// everything before flush `flush_seq`: the Ack to send. For receivers that store behind
    /// a queue, where what is durable trails what was received.
    pub fn durable_through(&mut self, chunks: u64, bytes: u64, flush_seq: u64) -> Frame<'static> {
        assert!(chunks <= self.received_chunks && bytes <= self.received_bytes);
        assert!(chunks >= self.durable_chunks && bytes >= self.durable_bytes);
        assert!(flush_seq <= self.last_flush);
        self.durable_chunks = chunks;
        self.durable_bytes = bytes;
        Frame::Ack {
            chunks,
            bytes,
            flush_seq,
        }
    }
}

/// The client side of a Fetch stream: chunks come back in the order they were asked for.
#[derive(Debug)]
pub struct FetchClient {
    next_seq: u64,
    expected: VecDeque<[u8; 32]>,
}

impl Default for FetchClient {
    fn default() -> FetchClient {
        FetchClient::new()
    }
}

impl FetchClient {
    pub fn new() -> FetchClient {
        FetchClient {
            next_seq: 1,
            expected: VecDeque::new(),
        }
    }

    /// Registers a Fetch of `ids`; returns its sequence number.
    pub fn fetch(&mut self, ids: &[[u8; 32]]) -> u64 {
        assert!(!ids.is_empty() && ids.len() <= IDS_PER_FRAME_MAX);
        self.expected.extend(ids.iter().copied());
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    pub fn outstanding(&self) -> usize {
        self.expected.len()
    }

    /// Checks that a received Chunk is the next one asked for.
    pub fn handle(&mut self, frame: &Frame<'_>) -> Result<[u8; 32], SessionError> {
        match *frame {
            Frame::Chunk { id, .. } => self.chunk_arrived(&id),
            ref other => Err(unexpected(other, true)),
        }
    }

    /// [`handle`](FetchClient::handle) for a Chunk whose payload was read in pieces.
    pub fn chunk_arrived(&mut self, id: &[u8; 32]) -> Result<[u8; 32], SessionError> {
        match self.expected.front() {
            Some(next) if next == id => {
                self.expected.pop_front();
                Ok(*id)
            }
            Some(_) => Err(violation(
                Rule::ChunkOrder,
                "peer sent a chunk out of order",
            )),
            None => Err(violation(
                Rule::ChunkNotAsked,
                "peer sent a chunk that was not asked for",
            )),
        }
    }
}

/// Reassembles a manifest sent as ManifestPart frames, in order, within a size bound.
#[derive(Debug)]
pub struct ManifestAssembly {
    id: [u8; 32],
    total: u64,
    bytes: Vec<u8>,
    bytes_max: u64,
}

impl ManifestAssembly {
    pub fn new(bytes_max: u64) -> ManifestAssembly {
        ManifestAssembly {
            id: [0; 32],
            total: 0,
            bytes: Vec::new(),
            bytes_max,
        }
    }

    /// Adds a part; returns true once the manifest is complete.
    pub fn add(&mut self, frame: &Frame<'_>) -> Result<bool, SessionError> {
        let Frame::ManifestPart {
            id,
            total,
            offset,
            data,
        } = *frame
        else {
            return Err(unexpected(frame, true));
        };
        if offset == 0 && self.bytes.is_empty() {
            if total == 0 || total > self.bytes_max {
                return Err(violation(
                    Rule::ManifestSize,
                    format!(
                        "manifest of {total} bytes: expected 1..={} bytes",
                        self.bytes_max
                    ),
                ));
            }
            self.id = id;
            self.total = total;
            // Grow with what arrives, never by what the peer claims.
            self.bytes.reserve(data.len());
        } else if id != self.id || total != self.total || offset != self.bytes.len() as u64 {
            return Err(violation(
                Rule::ManifestOrder,
                "manifest part does not continue the manifest being sent",
            ));
        }
        if offset.saturating_add(data.len() as u64) > self.total {
            return Err(violation(
                Rule::ManifestOrder,
                "manifest part extends beyond the manifest's total",
            ));
        }
        if data.is_empty() && total > 0 {
            return Err(violation(Rule::ManifestOrder, "empty manifest part"));
        }
        self.bytes.extend_from_slice(data);
        Ok(self.bytes.len() as u64 == self.total)
    }

    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The whole manifest, for a Commit of `id`: refused unless every part of the manifest
    /// `id` arrived (a Commit after a lost part would otherwise hand on a prefix).
    pub fn finish(self, id: &[u8; 32]) -> Result<Vec<u8>, SessionError> {
        if self.total == 0 || self.id != *id {
            return Err(violation(
                Rule::ManifestIncomplete,
                "commit of a manifest that was not sent",
            ));
        }
        if self.bytes.len() as u64 != self.total {
            return Err(violation(
                Rule::ManifestIncomplete,
                format!(
                    "commit of a manifest of {} bytes after {} arrived",
                    self.total,
                    self.bytes.len()
                ),
            ));
        }
        Ok(self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::id_list;

    fn welcomed(credit: u64) -> StoreSender {
        let mut sender = StoreSender::new(2);
        sender
            .handle(&Frame::Welcome {
                version: 1,
                site: "b",
                unacked_bytes_max: credit,
            })
            .unwrap();
        sender
    }

    /// Drives a sender and a receiver against each other through encoded frames.
    #[test]
    fn have_want_credit_and_acks_between_two_ends() {
        let credit = 16 << 20;
        let mut sender = welcomed(credit);
        let mut receiver = StoreReceiver::new(credit);
        let ids = [[1u8; 32], [2u8; 32], [3u8; 32]];
        let seq = sender.query(ids.len());
        let input = receiver
            .handle(&Frame::Query {
                seq,
                ids: id_list(&ids),
            })
            .unwrap();
        let ReceiverInput::Query { ids: asked, .. } = input else {
            panic!("{input:?}")
        };
        // The receiver already has the second chunk.
        let bitmap = receiver.answer(asked, &[true, false, true]);
        let event = sender
            .handle(&Frame::Missing {
                seq,
                count: 3,
                bitmap: &bitmap,
            })
            .unwrap();
        assert_eq!(
            event,
            SenderEvent::Missing {
                seq,
                wanted: vec![true, false, true]
            }
        );
        for id in [ids[0], ids[2]] {
            sender.chunk_sent(10);
            receiver
                .handle(&Frame::Chunk {
                    id,
                    codec: 0,
                    raw_len: 10,
                    payload: &[0; 10],
                })
                .unwrap();
        }
        assert!(!sender.is_drained());
        let flush = sender.flush();
        assert_eq!(
            receiver.handle(&Frame::Flush { seq: flush }).unwrap(),
            ReceiverInput::Flush { seq: flush }
        );
        let ack = receiver.durable();
        sender.handle(&ack).unwrap();
        assert!(sender.is_drained());
        assert_eq!(sender.acked(), (2, 20));
    }

    #[test]
    fn a_receiver_storing_behind_a_queue_acks_what_is_durable_and_frees_credit() {
        let credit = 2 * frame::FRAME_PAYLOAD_BYTES_MAX as u64;
        let mut sender = welcomed(credit);
        let mut receiver = StoreReceiver::new(credit);
        let ids = [[1u8; 32], [2u8; 32], [3u8; 32]];
        let seq = sender.query(3);
        receiver
            .handle(&Frame::Query {
                seq,
                ids: id_list(&ids),
            })
            .unwrap();
        let bitmap = receiver.answer(id_list(&ids), &[true, true, true]);
        sender
            .handle(&Frame::Missing {
                seq,
                count: 3,
                bitmap: &bitmap,
            })
            .unwrap();
        let big = frame::CHUNK_BYTES_MAX;
        for id in &ids[..2] {
            sender.chunk_sent(big as u64);
            receiver.chunk_arrived(id, big).unwrap();
        }
        // The third would exceed the credit until the first is durable.
        assert!(receiver.clone().chunk_arrived(&ids[2], big).is_err());
        let ack = receiver.durable_through(1, big as u64, 0);
        sender.handle(&ack).unwrap();
        assert_eq!(sender.acked(), (1, big as u64));
        sender.chunk_sent(big as u64);
        receiver.chunk_arrived(&ids[2], big).unwrap();
        let flush = sender.flush();
        receiver.handle(&Frame::Flush { seq: flush }).unwrap();
        sender
            .handle(&receiver.durable_through(3, 3 * big as u64, flush))
            .unwrap();
        assert!(sender.is_drained());
    }

    #[test]
    fn receiver_refuses_chunks_it_did_not_ask_for() {
        let mut receiver = StoreReceiver::new(1 << 30);
        let chunk = Frame::Chunk {
            id: [9; 32],
            codec: 0,
            raw_len: 1,
            payload: &[0],
        };
        assert!(receiver.handle(&chunk).is_err());
        let ids = [[8u8; 32], [9u8; 32]];
        receiver
            .handle(&Frame::Query {
                seq: 1,
                ids: id_list(&ids),
            })
            .unwrap();
        receiver.answer(id_list(&ids), &[true, true]);
        // Out of order: 9 before 8.
        assert!(receiver.handle(&chunk).is_err());
    }

    #[test]
    fn receiver_refuses_a_sender_beyond_its_credit() {
        let mut receiver = StoreReceiver::new(frame::FRAME_PAYLOAD_BYTES_MAX as u64);
        let ids = [[1u8; 32], [2u8; 32]];
        receiver
            .handle(&Frame::Query {
                seq: 1,
                ids: id_list(&ids),
            })
            .unwrap();
        receiver.answer(id_list(&ids), &[true, true]);
        let big = vec![0u8; frame::CHUNK_BYTES_MAX];
        let chunk = |id, payload: &'static [u8]| Frame::Chunk {
            id,
            codec: 0,
            raw_len: payload.len() as u32,
            payload,
        };
        let big: &'static [u8] = big.leak();
        receiver.handle(&chunk(ids[0], big)).unwrap();
        let err = receiver.handle(&chunk(ids[1], &[0; 40])).unwrap_err();
        assert_eq!(err.rule, Rule::Credit, "{err}");
    }

    #[test]
    fn sender_refuses_answers_and_acks_that_do_not_match() {
        let mut sender = welcomed(16 << 20);
        assert!(sender
            .handle(&Frame::Missing {
                seq: 1,
                count: 1,
                bitmap: &[1]
            })
            .is_err());
        let seq = sender.query(2);
        assert!(sender
            .handle(&Frame::Missing {
                seq,
                count: 1,
                bitmap: &[1]
            })
            .is_err());
        let mut sender = welcomed(16 << 20);
        assert!(sender
            .handle(&Frame::Ack {
                chunks: 1,
                bytes: 0,
                flush_seq: 0
            })
            .is_err());
    }

    #[test]
    fn frames_before_the_welcome_are_refused() {
        let mut sender = StoreSender::new(1);
        assert!(!sender.can_query());
        let err = sender
            .handle(&Frame::Ack {
                chunks: 0,
                bytes: 0,
                flush_seq: 0,
            })
            .unwrap_err();
        assert_eq!(err.rule, Rule::UnexpectedFrame, "{err}");
        assert!(err.detail.contains("before the handshake"), "{err}");
        assert!(sender
            .handle(&Frame::Welcome {
                version: 1,
                site: "b",
                unacked_bytes_max: 10
            })
            .is_err());
    }

    #[test]
    fn versions_negotiate_to_the_highest_common() {
        assert_eq!(negotiate(1, 5), Some(frame::VERSION_MAX));
        assert_eq!(negotiate(frame::VERSION_MAX + 1, 9), None);
    }

    #[test]
    fn a_sender_names_its_attempt_only_to_a_receiver_of_version_2() {
        let hello = StoreSender::new(1).hello("a", "hot", "b-1");
        let Frame::Hello {
            version_min,
            version_max,
            ..
        } = hello
        else {
            panic!("{hello:?}")
        };
        assert_eq!((version_min, version_max), (1, frame::VERSION_MAX));
        // A version-1 receiver chooses 1 (the highest it speaks): no Attempt frame, which it
        // would refuse as an unknown type.
        assert_eq!(welcomed(16 << 20).attempt(3), None);
        let mut sender = StoreSender::new(1);
        sender
            .handle(&Frame::Welcome {
                version: 2,
                site: "b",
                unacked_bytes_max: 16 << 20,
            })
            .unwrap();
        assert_eq!(sender.attempt(3), Some(Frame::Attempt { attempt: 3 }));
    }

    #[test]
    fn a_receiver_negotiates_version_1_with_an_old_sender_and_2_with_a_new_one() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert!(!carries_attempt(1));
        assert_eq!(negotiate(1, 2), Some(2));
        assert!(carries_attempt(2));
    }

    #[test]
    fn fetch_client_checks_order() {
        let mut client = FetchClient::new();
        client.fetch(&[[1; 32], [2; 32]]);
        let chunk = |id| Frame::Chunk {
            id,
            codec: 0,
            raw_len: 1,
            payload: &[0],
        };
        assert!(client.handle(&chunk([2; 32])).is_err());
        assert_eq!(client.handle(&chunk([1; 32])).unwrap(), [1; 32]);
        assert_eq!(client.handle(&chunk([2; 32])).unwrap(), [2; 32]);
        assert!(client.handle(&chunk([3; 32])).is_err());
    }

    #[test]
    fn manifest_assembly_is_bounded_and_ordered() {
        let part = |offset, total, data: &'static [u8]| Frame::ManifestPart {
            id: [1; 32],
            total,
            offset,
            data,
        };
        let mut big = ManifestAssembly::new(10);
        assert!(big.add(&part(0, 11, b"x")).is_err());
        let mut m = ManifestAssembly::new(10);
        assert!(!m.add(&part(0, 4, b"ab")).unwrap());
        assert!(m.add(&part(3, 4, b"d")).is_err());
        let mut m = ManifestAssembly::new(10);
        m.add(&part(0, 4, b"ab")).unwrap();
        assert!(m.add(&part(2, 4, b"cd")).unwrap());
        assert_eq!(m.into_bytes(), b"abcd");
    }
}
