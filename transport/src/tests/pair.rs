//! `Pair`: a client and a server end of one peer stream, joined by two in-memory byte pipes
//! and driven step by step on one thread, quinn-proto's way (`quinn-proto/src/tests/util.rs`),
//! with faults injected into the frames as they pass.
//!
//! Each end is the transport's sans-IO session ([`StoreSender`], [`StoreReceiver`],
//! [`FetchClient`], [`ManifestAssembly`]) plus the least application around it that makes a
//! stream run: which chunks to offer, what the receiver already has, a store that makes
//! received chunks durable when it seals. Bytes cross the pipes encoded, and are read back the
//! way `quic::FrameReader` reads them (header checked by [`Header::decode`] before the payload
//! is taken, then [`frame::decode`]), so a fault reaches the same checks as on a QUIC stream.
//!
//! The session has no timers, so neither does the pair: [`Pair::drive`] steps until nothing
//! moves, and an end that is neither done nor failed then is reported as stalled, naming what
//! it waits for. On a real link such an end waits for QUIC's idle timeout, which the
//! keep-alives of a peer that is up but stuck never let fire.
//!
//! A chunk's id here is SHA-256 of its payload (`ring`; mover uses BLAKE3 of the plaintext,
//! `format::pack::check_received`), which is what lets the receiver tell a damaged payload.

use std::collections::{BTreeSet, HashMap, VecDeque};

use ring::digest::{digest, SHA256};

use crate::frame::{
    self, ErrorCode, Frame, FrameError, Header, Purpose, FRAME_HEADER_BYTES, IDS_PER_FRAME_MAX,
};
use crate::session::{
    carries_attempt, negotiate, FetchClient, ManifestAssembly, ReceiverInput, Rule, SenderEvent,
    SessionError, StoreReceiver, StoreSender,
};

pub(super) type Id = [u8; 32];

pub(super) fn id_of(payload: &[u8]) -> Id {
    digest(&SHA256, payload)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// `count` distinct chunks of `len` bytes each.
pub(super) fn chunks(count: usize, len: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|n| {
            (0..len)
                .map(|i| (i.wrapping_mul(31).wrapping_add(n * 7919) >> 3) as u8 ^ n as u8)
                .collect()
        })
        .collect()
}

/// How one end stopped: the one named error an end reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    /// The frame decoder refused the bytes (unknown type, reserved bits, a length beyond the
    /// type's bound, a payload that does not parse).
    Frame(FrameError),
    /// A frame broke a session rule.
    Session(Rule),
    /// The stream ended inside a frame.
    EndedInsideFrame,
    /// The connection was cut before this end was done.
    Lost,
    /// A chunk whose payload does not hash to its id.
    Corrupt,
    /// The peer refused the stream with an Error frame.
    Peer(ErrorCode),
    /// The peer ended the stream before this end was done.
    PeerFinished,
    /// The application's own checks (hello, attempt, answers to its requests).
    Refused(&'static str),
}

impl From<SessionError> for Failure {
    fn from(e: SessionError) -> Failure {
        Failure::Session(e.rule)
    }
}

impl Failure {
    /// The code an end puts in its Error frame.
    fn code(&self) -> ErrorCode {
        match self {
            Failure::Corrupt => ErrorCode::Corrupt,
            Failure::Refused(_) => ErrorCode::Refused,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Frames one end wants to write, as long as the pipe has room (a peer that stops reading
/// fills it, as it fills a QUIC stream's flow-control window).
pub(super) struct Outbox {
    room: usize,
    frames: Vec<Vec<u8>>,
}

impl Outbox {
    /// Queues `frame`; false when the pipe is full (the end must try again later and must
    /// not count the frame as sent).
    fn send(&mut self, frame: &Frame<'_>) -> bool {
        let mut bytes = Vec::new();
        frame::encode(frame, &mut bytes);
        if bytes.len() > self.room {
            return false;
        }
        self.room -= bytes.len();
        self.frames.push(bytes);
        true
    }
}

/// One end of a stream.
pub(super) trait End {
    /// Sends what it can without a new frame from the peer.
    fn poll(&mut self, out: &mut Outbox) -> Result<(), Failure>;
    /// Takes one frame from the peer.
    fn handle(&mut self, frame: &Frame<'_>, out: &mut Outbox) -> Result<(), Failure>;
    /// The peer finished its side of the stream between two frames.
    fn peer_finished(&mut self) -> Result<(), Failure>;
    /// Whether this end did its part (it then finishes its side of the stream).
    fn is_done(&self) -> bool;
    /// What it waits for when it is neither done nor failed.
    fn waiting_for(&self) -> &'static str;
    /// The end stops (failed, cut off or peer gone): keep what is durable, as the real
    /// receiver seals what it verified before the stream broke.
    fn stopped(&mut self) {}
    /// The end's process died with the connection: what it had not made durable is gone.
    fn crashed(&mut self) {}
    /// Whether a failure is answered with an Error frame (the daemon's side does; a sender
    /// just stops its stream).
    fn answers_failures(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    Running,
    Done,
    Failed(Failure),
    /// Nothing moves and this end is not done: what it waits for.
    Stalled(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Who {
    Client,
    Server,
}

/// A fault applied to the `nth` (from 0) frame of type `kind` that `from` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Injection {
    pub(super) from: Who,
    pub(super) kind: u8,
    pub(super) nth: usize,
    pub(super) fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    Drop,
    Duplicate,
    /// Written after the next frame of the same end.
    Reorder,
    /// Only the first `keep` bytes go out; the stream goes on with the next frame.
    Truncate {
        keep: usize,
    },
    /// The header's length field says `len`.
    Length {
        len: u32,
    },
    /// Byte `at` of the frame (header included) is xored with `mask`.
    Flip {
        at: usize,
        mask: u8,
    },
}

/// One direction: the bytes written and not yet read.
#[derive(Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    /// The writer finished its side (after the bytes).
    finished: bool,
    /// The connection is gone: nothing arrives after what is buffered.
    cut: bool,
}

struct Side<E> {
    end: E,
    status: Status,
    finish_sent: bool,
    /// Stops taking frames off its pipe after this many (a peer that stops reading).
    reads_left: Option<usize>,
    /// A frame held back by [`Fault::Reorder`].
    held: Option<Vec<u8>>,
    /// Frames written so far, by type (for [`Injection::nth`]).
    written: HashMap<u8, usize>,
}

impl<E> Side<E> {
    fn new(end: E) -> Side<E> {
        Side {
            end,
            status: Status::Running,
            finish_sent: false,
            reads_left: None,
            held: None,
            written: HashMap::new(),
        }
    }
}

/// Two ends of one stream over in-memory pipes.
pub(super) struct Pair<C, S> {
    client: Side<C>,
    server: Side<S>,
    to_server: Pipe,
    to_client: Pipe,
    /// Bytes a pipe holds at most (the stream's flow-control window).
    pub(super) window: usize,
    injections: Vec<Injection>,
    /// Frames delivered so far, both directions, in order.
    pub(super) delivered: usize,
    /// The connection is cut once this many frames were delivered.
    cut_after: Option<usize>,
    /// The connection is cut when this many bytes of the next frame were delivered.
    cut_inside: Option<(usize, usize)>,
    /// The cut is the server's process dying (kill -9, power loss), not only the link.
    server_crashes: bool,
    /// Every frame that went on the wire: (from, type, length with header).
    pub(super) transcript: Vec<(Who, u8, usize)>,
}

/// Steps after which a pair that still moves is a bug (a livelock) rather than a slow run.
const STEPS_MAX: usize = 100_000;

impl<C: End, S: End> Pair<C, S> {
    pub(super) fn new(client: C, server: S) -> Pair<C, S> {
        Pair {
            client: Side::new(client),
            server: Side::new(server),
            to_server: Pipe::default(),
            to_client: Pipe::default(),
            window: 64 << 20,
            injections: Vec::new(),
            delivered: 0,
            cut_after: None,
            cut_inside: None,
            server_crashes: false,
            transcript: Vec::new(),
        }
    }

    pub(super) fn inject(mut self, injection: Injection) -> Self {
        self.injections.push(injection);
        self
    }

    /// Cuts the connection after `frames` frames (both directions) were delivered.
    pub(super) fn cut_after(mut self, frames: usize) -> Self {
        self.cut_after = Some(frames);
        self
    }

    /// Cuts the connection inside frame `frame` (0-based, both directions), after `bytes` of
    /// it went out.
    pub(super) fn cut_inside(mut self, frame: usize, bytes: usize) -> Self {
        self.cut_inside = Some((frame, bytes));
        self
    }

    /// A cut kills the server's process: it keeps only what it had made durable.
    pub(super) fn server_crashes_on_cut(mut self) -> Self {
        self.server_crashes = true;
        self
    }

    /// The server stops reading after `frames` frames.
    pub(super) fn server_stops_reading_after(mut self, frames: usize) -> Self {
        self.server.reads_left = Some(frames);
        self
    }

    pub(super) fn client(&self) -> &C {
        &self.client.end
    }
    pub(super) fn server(&self) -> &S {
        &self.server.end
    }
    pub(super) fn status(&self) -> (&Status, &Status) {
        (&self.client.status, &self.server.status)
    }
    /// Bytes the server's pipe holds unread.
    pub(super) fn unread_by_server(&self) -> usize {
        self.to_server.bytes.len()
    }

    /// Steps until nothing moves; ends that are not done then are stalled.
    pub(super) fn drive(mut self) -> Self {
        for _ in 0..STEPS_MAX {
            if !self.step() {
                if self.client.status == Status::Running {
                    self.client.status = Status::Stalled(self.client.end.waiting_for());
                }
                if self.server.status == Status::Running {
                    self.server.status = Status::Stalled(self.server.end.waiting_for());
                }
                return self;
            }
        }
        panic!("the pair still moves after {STEPS_MAX} steps");
    }

    /// One turn of each end; whether anything moved.
    fn step(&mut self) -> bool {
        let a = self.turn(Who::Client);
        let b = self.turn(Who::Server);
        a || b
    }

    fn turn(&mut self, who: Who) -> bool {
        let mut moved = self.read(who);
        moved |= self.write(who);
        moved
    }

    /// The end takes the complete frames its pipe holds.
    fn read(&mut self, who: Who) -> bool {
        let mut moved = false;
        loop {
            let (status, pipe, reads_left) = match who {
                Who::Client => (
                    &self.client.status,
                    &mut self.to_client,
                    &mut self.client.reads_left,
                ),
                Who::Server => (
                    &self.server.status,
                    &mut self.to_server,
                    &mut self.server.reads_left,
                ),
            };
            let done = match who {
                Who::Client => self.client.end.is_done(),
                Who::Server => self.server.end.is_done(),
            };
            // An end that did its part reads no further (a restore stops at its last chunk).
            if *status != Status::Running || *reads_left == Some(0) || done {
                return moved;
            }
            let next = next_frame(pipe);
            let Some(next) = next else {
                return moved;
            };
            if let Some(left) = reads_left {
                *left -= 1;
            }
            moved = true;
            let outcome = match next {
                Ok(Some(bytes)) => self.handle(who, &bytes),
                Ok(None) => match who {
                    Who::Client => self.client.end.peer_finished(),
                    Who::Server => self.server.end.peer_finished(),
                },
                Err(failure) => Err(failure),
            };
            if let Err(failure) = outcome {
                self.fail(who, failure);
                return true;
            }
        }
    }

    fn handle(&mut self, who: Who, bytes: &[u8]) -> Result<(), Failure> {
        let header =
            Header::decode(bytes[..FRAME_HEADER_BYTES].try_into().expect("8 bytes")).unwrap();
        let frame = frame::decode(header, &bytes[FRAME_HEADER_BYTES..]).map_err(Failure::Frame)?;
        let mut out = self.outbox(who);
        let handled = match who {
            Who::Client => self.client.end.handle(&frame, &mut out),
            Who::Server => self.server.end.handle(&frame, &mut out),
        };
        self.put(who, out);
        handled
    }

    fn outbox(&self, who: Who) -> Outbox {
        let pipe = match who {
            Who::Client => &self.to_server,
            Who::Server => &self.to_client,
        };
        Outbox {
            room: self.window.saturating_sub(pipe.bytes.len()),
            frames: Vec::new(),
        }
    }

    /// The end sends what it can, and finishes its side once done.
    fn write(&mut self, who: Who) -> bool {
        let running = match who {
            Who::Client => self.client.status == Status::Running,
            Who::Server => self.server.status == Status::Running,
        };
        if !running {
            return false;
        }
        let mut out = self.outbox(who);
        let polled = match who {
            Who::Client => self.client.end.poll(&mut out),
            Who::Server => self.server.end.poll(&mut out),
        };
        let mut moved = !out.frames.is_empty();
        self.put(who, out);
        if let Err(failure) = polled {
            self.fail(who, failure);
            return true;
        }
        let (done, finish_sent) = match who {
            Who::Client => (self.client.end.is_done(), &mut self.client.finish_sent),
            Who::Server => (self.server.end.is_done(), &mut self.server.finish_sent),
        };
        if done && !*finish_sent {
            *finish_sent = true;
            moved = true;
            self.finish(who);
            match who {
                Who::Client => self.client.status = Status::Done,
                Who::Server => self.server.status = Status::Done,
            }
        }
        moved
    }

    /// The end's side of the stream ends (a frame held back for reordering goes first).
    fn finish(&mut self, who: Who) {
        let held = match who {
            Who::Client => self.client.held.take(),
            Who::Server => self.server.held.take(),
        };
        if let Some(bytes) = held {
            self.deliver(who, bytes);
        }
        match who {
            Who::Client => self.to_server.finished = true,
            Who::Server => self.to_client.finished = true,
        }
    }

    fn fail(&mut self, who: Who, failure: Failure) {
        let answers = match who {
            Who::Client => self.client.end.answers_failures(),
            Who::Server => self.server.end.answers_failures(),
        };
        if answers && failure != Failure::Lost {
            let reason = format!("{failure:?}");
            let mut bytes = Vec::new();
            frame::encode(
                &Frame::Error {
                    code: failure.code(),
                    reason: &reason,
                },
                &mut bytes,
            );
            self.deliver(who, bytes);
        }
        self.finish(who);
        match who {
            Who::Client => {
                self.client.end.stopped();
                self.client.status = Status::Failed(failure);
            }
            Who::Server => {
                if self.server_crashes && failure == Failure::Lost {
                    self.server.end.crashed();
                } else {
                    self.server.end.stopped();
                }
                self.server.status = Status::Failed(failure);
            }
        }
    }

    /// Frames an end wrote go through the injections onto the wire.
    fn put(&mut self, who: Who, out: Outbox) {
        for bytes in out.frames {
            let kind = bytes[0];
            let side_written = match who {
                Who::Client => &mut self.client.written,
                Who::Server => &mut self.server.written,
            };
            let nth = side_written.entry(kind).or_default();
            let this = *nth;
            *nth += 1;
            let fault = self
                .injections
                .iter()
                .find(|i| i.from == who && i.kind == kind && i.nth == this)
                .map(|i| i.fault);
            let held = match who {
                Who::Client => &mut self.client.held,
                Who::Server => &mut self.server.held,
            };
            let release = held.take();
            match fault {
                None => self.deliver(who, bytes),
                Some(Fault::Drop) => {}
                Some(Fault::Duplicate) => {
                    self.deliver(who, bytes.clone());
                    self.deliver(who, bytes);
                }
                Some(Fault::Reorder) => {
                    let held = match who {
                        Who::Client => &mut self.client.held,
                        Who::Server => &mut self.server.held,
                    };
                    *held = Some(bytes);
                }
                Some(Fault::Truncate { keep }) => {
                    self.deliver(who, bytes[..keep.min(bytes.len())].to_vec())
                }
                Some(Fault::Length { len }) => {
                    let mut bytes = bytes;
                    bytes[4..8].copy_from_slice(&len.to_le_bytes());
                    self.deliver(who, bytes);
                }
                Some(Fault::Flip { at, mask }) => {
                    let mut bytes = bytes;
                    bytes[at] ^= mask;
                    self.deliver(who, bytes);
                }
            }
            if let Some(bytes) = release {
                self.deliver(who, bytes);
            }
        }
    }

    /// Puts one frame's bytes on the wire, unless the connection is (or gets) cut.
    fn deliver(&mut self, who: Who, bytes: Vec<u8>) {
        let (to, from_pipe) = match who {
            Who::Client => (&mut self.to_server, &mut self.to_client),
            Who::Server => (&mut self.to_client, &mut self.to_server),
        };
        if to.cut {
            return;
        }
        let mut keep = 0;
        let mut cut = self.cut_after == Some(self.delivered);
        if let Some((frame, at)) = self.cut_inside {
            if frame == self.delivered {
                keep = at.min(bytes.len());
                cut = true;
            }
        }
        if cut {
            // Both directions go at once, and what was in flight with them.
            to.bytes.extend(&bytes[..keep]);
            to.cut = true;
            from_pipe.cut = true;
            return;
        }
        self.transcript.push((who, bytes[0], bytes.len()));
        to.bytes.extend(&bytes);
        self.delivered += 1;
    }
}

/// The next frame in `pipe`: `Ok(Some(bytes))` a whole frame (header and payload, header
/// checked), `Ok(None)` the writer finished between frames, `None` nothing yet.
fn next_frame(pipe: &mut Pipe) -> Option<Result<Option<Vec<u8>>, Failure>> {
    let ended = pipe.finished || pipe.cut;
    if pipe.bytes.len() < FRAME_HEADER_BYTES {
        return match (ended, pipe.bytes.is_empty(), pipe.cut) {
            (false, _, _) => None,
            (true, false, _) => Some(Err(Failure::EndedInsideFrame)),
            (true, true, true) => Some(Err(Failure::Lost)),
            (true, true, false) => {
                // Reported once: afterwards the pipe reads as empty and unfinished.
                pipe.finished = false;
                Some(Ok(None))
            }
        };
    }
    let mut head = [0u8; FRAME_HEADER_BYTES];
    for (i, b) in pipe.bytes.iter().take(FRAME_HEADER_BYTES).enumerate() {
        head[i] = *b;
    }
    let header = match Header::decode(&head) {
        Ok(header) => header,
        Err(e) => return Some(Err(Failure::Frame(e))),
    };
    if pipe.bytes.len() < FRAME_HEADER_BYTES + header.len {
        return ended.then_some(Err(Failure::EndedInsideFrame));
    }
    Some(Ok(Some(
        pipe.bytes
            .drain(..FRAME_HEADER_BYTES + header.len)
            .collect(),
    )))
}

// ---- Store stream

/// The sending end of a Store stream, shaped like `mover::remote::ship`: ids in batches,
/// each batch's Query as soon as a query slot is free, the wanted chunks of the oldest
/// answered batch within credit, a Flush once everything asked for went out, done when the
/// receiver acknowledged all of it as durable.
pub(super) struct StoreClient {
    pub(super) session: StoreSender,
    chunks: Vec<(Id, Vec<u8>)>,
    batch: usize,
    attempt: u64,
    hello_sent: bool,
    attempt_sent: bool,
    /// Batches not queried yet: index of the next chunk.
    next_query: usize,
    /// Queried batches (chunk indices), oldest first, with the answer once it came.
    queried: VecDeque<(Vec<usize>, Option<Vec<bool>>)>,
    flushed: bool,
    /// Chunks sent, in order.
    pub(super) sent: Vec<Id>,
}

impl StoreClient {
    pub(super) fn new(payloads: &[Vec<u8>], batch: usize, queries_max: usize) -> StoreClient {
        assert!((1..=IDS_PER_FRAME_MAX).contains(&batch));
        StoreClient {
            session: StoreSender::new(queries_max),
            chunks: payloads.iter().map(|p| (id_of(p), p.clone())).collect(),
            batch,
            attempt: 1,
            hello_sent: false,
            attempt_sent: false,
            next_query: 0,
            queried: VecDeque::new(),
            flushed: false,
            sent: Vec::new(),
        }
    }

    /// The chunks the receiver acknowledged as durable (the first `acked` sent).
    pub(super) fn acked(&self) -> &[Id] {
        &self.sent[..self.session.acked().0 as usize]
    }
}

impl End for StoreClient {
    fn poll(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        if !self.hello_sent {
            self.hello_sent = out.send(&self.session.hello("a", "hot", "b-1"));
            return Ok(());
        }
        if !self.session.is_welcomed() {
            return Ok(());
        }
        if !self.attempt_sent {
            self.attempt_sent = match self.session.attempt(self.attempt) {
                Some(frame) => out.send(&frame),
                None => true,
            };
            if !self.attempt_sent {
                return Ok(());
            }
        }
        while self.session.can_query() && self.next_query < self.chunks.len() {
            let batch: Vec<usize> =
                (self.next_query..(self.next_query + self.batch).min(self.chunks.len())).collect();
            let ids: Vec<Id> = batch.iter().map(|&i| self.chunks[i].0).collect();
            // The sequence number is the session's; register only once the frame fits.
            let mut probe = Vec::new();
            frame::encode(
                &Frame::Query {
                    seq: 0,
                    ids: frame::id_list(&ids),
                },
                &mut probe,
            );
            if probe.len() > out.room {
                return Ok(());
            }
            let seq = self.session.query(ids.len());
            assert!(out.send(&Frame::Query {
                seq,
                ids: frame::id_list(&ids),
            }));
            self.next_query += batch.len();
            self.queried.push_back((batch, None));
        }
        // The wanted chunks of the oldest answered batch, in order, within credit.
        while let Some((batch, Some(wanted))) = self.queried.front_mut() {
            let Some(position) = wanted.iter().position(|&w| w) else {
                self.queried.pop_front();
                continue;
            };
            let (id, payload) = &self.chunks[batch[position]];
            if self.session.credit_bytes() < payload.len() as u64 {
                return Ok(());
            }
            let sent = out.send(&Frame::Chunk {
                id: *id,
                codec: 0,
                raw_len: payload.len() as u32,
                payload,
            });
            if !sent {
                return Ok(());
            }
            self.session.chunk_sent(payload.len() as u64);
            self.sent.push(*id);
            wanted[position] = false;
        }
        let shipped = self.next_query == self.chunks.len() && self.queried.is_empty();
        if shipped && !self.flushed {
            let mut probe = Vec::new();
            frame::encode(&Frame::Flush { seq: 1 }, &mut probe);
            if probe.len() <= out.room {
                let seq = self.session.flush();
                assert!(out.send(&Frame::Flush { seq }));
                self.flushed = true;
            }
        }
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, _out: &mut Outbox) -> Result<(), Failure> {
        if let Frame::Error { code, .. } = *frame {
            return Err(Failure::Peer(code));
        }
        match self.session.handle(frame)? {
            SenderEvent::Missing { wanted, .. } => {
                let open = self
                    .queried
                    .iter_mut()
                    .find(|(_, answer)| answer.is_none())
                    .expect("the session matched the answer to an open query");
                open.1 = Some(wanted);
            }
            SenderEvent::Welcomed { .. } | SenderEvent::Acked { .. } => {}
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        Err(Failure::PeerFinished)
    }

    fn is_done(&self) -> bool {
        self.flushed && self.session.is_drained()
    }

    fn waiting_for(&self) -> &'static str {
        if !self.session.is_welcomed() {
            "welcome"
        } else if self.session.queries_outstanding() > 0
            && self.queried.front().is_some_and(|(_, a)| a.is_none())
        {
            "answer"
        } else if self.session.chunks_owed() > 0 {
            "credit"
        } else {
            "ack"
        }
    }
}

/// The receiving end of a Store stream, shaped like `mover::remote::receive`: the Hello
/// answered with a Welcome, the Attempt of a version-2 sender, queries answered from what it
/// holds durably, each chunk checked against its id before it is kept, a seal (everything
/// received made durable, then an Ack) every `seal_every` chunks and on each Flush. When the
/// stream ends or breaks, the verified chunks are sealed (a resumed sender then finds them).
pub(super) struct StoreServer {
    session: StoreReceiver,
    credit: u64,
    hello: bool,
    attempt_due: bool,
    seal_every: usize,
    /// Received and verified, not yet durable.
    pending: Vec<(Id, Vec<u8>)>,
    /// Durable (sealed and committed): id → payload.
    pub(super) durable: HashMap<Id, Vec<u8>>,
    finished: bool,
}

impl StoreServer {
    pub(super) fn new(credit: u64, seal_every: usize, holds: &[Vec<u8>]) -> StoreServer {
        StoreServer {
            session: StoreReceiver::new(credit),
            credit,
            hello: false,
            attempt_due: false,
            seal_every,
            pending: Vec::new(),
            durable: holds.iter().map(|p| (id_of(p), p.clone())).collect(),
            finished: false,
        }
    }

    fn seal(&mut self) {
        for (id, payload) in self.pending.drain(..) {
            self.durable.insert(id, payload);
        }
    }
}

impl End for StoreServer {
    fn poll(&mut self, _out: &mut Outbox) -> Result<(), Failure> {
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, out: &mut Outbox) -> Result<(), Failure> {
        if !self.hello {
            let Frame::Hello {
                version_min,
                version_max,
                purpose: Purpose::Store,
                ..
            } = *frame
            else {
                return Err(Failure::Refused("expected a Store Hello"));
            };
            let version =
                negotiate(version_min, version_max).ok_or(Failure::Refused("no common version"))?;
            self.hello = true;
            self.attempt_due = carries_attempt(version);
            assert!(out.send(&Frame::Welcome {
                version,
                site: "b",
                unacked_bytes_max: self.credit,
            }));
            return Ok(());
        }
        if self.attempt_due {
            // mover's receiver checks this (`remote::receive::store`), not the session.
            let Frame::Attempt { .. } = *frame else {
                return Err(Failure::Refused("expected Attempt after the Welcome"));
            };
            self.attempt_due = false;
            return Ok(());
        }
        if let Frame::Error { code, .. } = *frame {
            return Err(Failure::Peer(code));
        }
        match self.session.handle(frame)? {
            ReceiverInput::Query { ids, .. } => {
                let wanted: Vec<bool> = ids
                    .iter()
                    .map(|id| !self.durable.contains_key(&id))
                    .collect();
                let seq = match *frame {
                    Frame::Query { seq, .. } => seq,
                    _ => unreachable!("a query comes from a Query frame"),
                };
                let bitmap = self.session.answer(ids, &wanted);
                if !out.send(&Frame::Missing {
                    seq,
                    count: ids.len() as u32,
                    bitmap: &bitmap,
                }) {
                    return Err(Failure::Refused("answer does not fit the window"));
                }
            }
            ReceiverInput::Chunk { id, payload, .. } => {
                if id_of(payload) != id {
                    return Err(Failure::Corrupt);
                }
                self.pending.push((id, payload.to_vec()));
                if self.pending.len() >= self.seal_every {
                    self.seal();
                    if !out.send(&self.session.durable()) {
                        return Err(Failure::Refused("ack does not fit the window"));
                    }
                }
            }
            ReceiverInput::Flush { .. } => {
                self.seal();
                if !out.send(&self.session.durable()) {
                    return Err(Failure::Refused("ack does not fit the window"));
                }
            }
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        // As `remote::receive`: a sender that finishes its stream is done, and what it sent
        // and we verified is kept.
        self.finished = true;
        self.seal();
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.finished
    }

    fn waiting_for(&self) -> &'static str {
        if self.hello {
            "frames"
        } else {
            "hello"
        }
    }

    fn stopped(&mut self) {
        self.seal();
    }

    fn crashed(&mut self) {
        self.pending.clear();
    }

    fn answers_failures(&self) -> bool {
        true
    }
}

// ---- Control stream (manifest upload and commit)

/// Sends a manifest in parts of `part` bytes, then Commit; done on Committed.
pub(super) struct ControlClient {
    manifest: Vec<u8>,
    part: usize,
    hello_sent: bool,
    welcomed: bool,
    offset: usize,
    commit_sent: bool,
    pub(super) committed: bool,
}

impl ControlClient {
    pub(super) fn new(manifest: Vec<u8>, part: usize) -> ControlClient {
        ControlClient {
            manifest,
            part,
            hello_sent: false,
            welcomed: false,
            offset: 0,
            commit_sent: false,
            committed: false,
        }
    }
}

impl End for ControlClient {
    fn poll(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        if !self.hello_sent {
            self.hello_sent = out.send(&Frame::Hello {
                version_min: frame::VERSION_MIN,
                version_max: frame::VERSION_MAX,
                purpose: Purpose::Control,
                site: "a",
                tier: "",
                job: "b-1",
            });
            return Ok(());
        }
        if !self.welcomed {
            return Ok(());
        }
        let id = id_of(&self.manifest);
        while self.offset < self.manifest.len() {
            let end = (self.offset + self.part).min(self.manifest.len());
            if !out.send(&Frame::ManifestPart {
                id,
                total: self.manifest.len() as u64,
                offset: self.offset as u64,
                data: &self.manifest[self.offset..end],
            }) {
                return Ok(());
            }
            self.offset = end;
        }
        if !self.commit_sent {
            self.commit_sent = out.send(&Frame::Commit { id });
        }
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, _out: &mut Outbox) -> Result<(), Failure> {
        match *frame {
            Frame::Welcome { .. } if !self.welcomed => self.welcomed = true,
            Frame::Committed { id } if self.commit_sent && id == id_of(&self.manifest) => {
                self.committed = true
            }
            Frame::Error { code, .. } => return Err(Failure::Peer(code)),
            _ => return Err(Failure::Refused("unexpected frame on a control stream")),
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        Err(Failure::PeerFinished)
    }

    fn is_done(&self) -> bool {
        self.committed
    }

    fn waiting_for(&self) -> &'static str {
        if self.welcomed {
            "committed"
        } else {
            "welcome"
        }
    }
}

/// Assembles parts with [`ManifestAssembly`]; on Commit, the whole manifest checked against
/// its id becomes the committed snapshot (as `mover::remote::serve::commit`).
pub(super) struct ControlServer {
    assembly: ManifestAssembly,
    bytes_max: u64,
    hello: bool,
    pub(super) committed: Option<Vec<u8>>,
    finished: bool,
}

impl ControlServer {
    pub(super) fn new(bytes_max: u64) -> ControlServer {
        ControlServer {
            assembly: ManifestAssembly::new(bytes_max),
            bytes_max,
            hello: false,
            committed: None,
            finished: false,
        }
    }
}

impl End for ControlServer {
    fn poll(&mut self, _out: &mut Outbox) -> Result<(), Failure> {
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, out: &mut Outbox) -> Result<(), Failure> {
        match *frame {
            Frame::Hello {
                purpose: Purpose::Control,
                ..
            } if !self.hello => {
                self.hello = true;
                assert!(out.send(&Frame::Welcome {
                    version: frame::VERSION_MAX,
                    site: "b",
                    unacked_bytes_max: frame::FRAME_PAYLOAD_BYTES_MAX as u64,
                }));
            }
            _ if !self.hello => return Err(Failure::Refused("expected a Control Hello")),
            Frame::ManifestPart { .. } => {
                self.assembly.add(frame)?;
            }
            Frame::Commit { id } => {
                let assembly =
                    std::mem::replace(&mut self.assembly, ManifestAssembly::new(self.bytes_max));
                let manifest = assembly.finish(&id)?;
                // mover decodes the manifest against its id (`manifest::decode`).
                if id_of(&manifest) != id {
                    return Err(Failure::Corrupt);
                }
                self.committed = Some(manifest);
                assert!(out.send(&Frame::Committed { id }));
            }
            Frame::Error { code, .. } => return Err(Failure::Peer(code)),
            _ => return Err(Failure::Refused("unexpected frame on a control stream")),
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        self.finished = true;
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.finished
    }

    fn waiting_for(&self) -> &'static str {
        "frames"
    }

    fn answers_failures(&self) -> bool {
        true
    }
}

// ---- Fetch stream (a restore reading chunks)

/// Asks for chunks in Fetch frames of `batch` ids and checks each one that comes back.
pub(super) struct FetchEnd {
    session: FetchClient,
    ids: Vec<Id>,
    batch: usize,
    hello_sent: bool,
    welcomed: bool,
    asked: usize,
    pub(super) received: Vec<Id>,
}

impl FetchEnd {
    pub(super) fn new(ids: Vec<Id>, batch: usize) -> FetchEnd {
        FetchEnd {
            session: FetchClient::new(),
            ids,
            batch,
            hello_sent: false,
            welcomed: false,
            asked: 0,
            received: Vec::new(),
        }
    }
}

impl End for FetchEnd {
    fn poll(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        if !self.hello_sent {
            self.hello_sent = out.send(&Frame::Hello {
                version_min: frame::VERSION_MIN,
                version_max: frame::VERSION_MAX,
                purpose: Purpose::Fetch,
                site: "a",
                tier: "",
                job: "r-1",
            });
            return Ok(());
        }
        while self.welcomed && self.asked < self.ids.len() {
            let batch = &self.ids[self.asked..(self.asked + self.batch).min(self.ids.len())];
            let mut probe = Vec::new();
            frame::encode(
                &Frame::Fetch {
                    seq: 0,
                    ids: frame::id_list(batch),
                },
                &mut probe,
            );
            if probe.len() > out.room {
                return Ok(());
            }
            let seq = self.session.fetch(batch);
            assert!(out.send(&Frame::Fetch {
                seq,
                ids: frame::id_list(batch),
            }));
            self.asked += batch.len();
        }
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, _out: &mut Outbox) -> Result<(), Failure> {
        match *frame {
            Frame::Welcome { .. } if !self.welcomed => self.welcomed = true,
            Frame::Chunk { payload, .. } if self.welcomed => {
                let id = self.session.handle(frame)?;
                // The restore checks every chunk before it writes it.
                if id_of(payload) != id {
                    return Err(Failure::Corrupt);
                }
                self.received.push(id);
            }
            Frame::Error { code, .. } => return Err(Failure::Peer(code)),
            _ => return Err(Failure::Refused("unexpected frame on a fetch stream")),
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        Err(Failure::PeerFinished)
    }

    fn is_done(&self) -> bool {
        self.received.len() == self.ids.len()
    }

    fn waiting_for(&self) -> &'static str {
        if self.welcomed {
            "chunks"
        } else {
            "welcome"
        }
    }
}

/// Serves the chunks it holds, in the order asked for.
pub(super) struct FetchServer {
    holds: HashMap<Id, Vec<u8>>,
    hello: bool,
    /// Asked for, not sent yet.
    queue: VecDeque<Id>,
    finished: bool,
}

impl FetchServer {
    pub(super) fn new(holds: &[Vec<u8>]) -> FetchServer {
        FetchServer {
            holds: holds.iter().map(|p| (id_of(p), p.clone())).collect(),
            hello: false,
            queue: VecDeque::new(),
            finished: false,
        }
    }
}

impl End for FetchServer {
    fn poll(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        while let Some(id) = self.queue.front() {
            let Some(payload) = self.holds.get(id) else {
                return Err(Failure::Refused(
                    "asked for a chunk this site does not hold",
                ));
            };
            if !out.send(&Frame::Chunk {
                id: *id,
                codec: 0,
                raw_len: payload.len() as u32,
                payload,
            }) {
                return Ok(());
            }
            self.queue.pop_front();
        }
        Ok(())
    }

    fn handle(&mut self, frame: &Frame<'_>, out: &mut Outbox) -> Result<(), Failure> {
        match *frame {
            Frame::Hello {
                purpose: Purpose::Fetch,
                ..
            } if !self.hello => {
                self.hello = true;
                assert!(out.send(&Frame::Welcome {
                    version: frame::VERSION_MAX,
                    site: "b",
                    unacked_bytes_max: frame::FRAME_PAYLOAD_BYTES_MAX as u64,
                }));
            }
            Frame::Fetch { ids, .. } if self.hello => self.queue.extend(ids.iter()),
            _ => return Err(Failure::Refused("unexpected frame on a fetch stream")),
        }
        Ok(())
    }

    fn peer_finished(&mut self) -> Result<(), Failure> {
        self.finished = true;
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.finished
    }

    fn waiting_for(&self) -> &'static str {
        "fetches"
    }

    fn answers_failures(&self) -> bool {
        true
    }
}

/// The ids of `payloads`, as a set.
pub(super) fn ids(payloads: &[Vec<u8>]) -> BTreeSet<Id> {
    payloads.iter().map(|p| id_of(p)).collect()
}
