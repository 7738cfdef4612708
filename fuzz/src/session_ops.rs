//! The `session` fuzz target's interpreter, shared with `tests/fuzz_corpus.rs` (which includes
//! this file with `#[path]`, so it may only use `transport` and `std`).
//!
//! The input is a program: three configuration bytes, then operations (see [`Op`]) that drive
//! a [`StoreSender`] and a [`StoreReceiver`] connected by two in-order channels, a
//! [`FetchClient`] and a [`ManifestAssembly`] with a small bound. Frames between the two Store
//! ends go through the codec (encode, then `decode_all`); operations can also inject arbitrary
//! bytes or synthesized frames into any of the four machines. Mutators are only called when
//! their documented preconditions hold (tracked by a model where the API has no getter).
//!
//! Checked after every step:
//! - no `handle`/`add` panics, whatever the frame;
//! - a refused frame leaves the sender, receiver and fetch client unchanged (so a caller may
//!   report the error and the model stays exact);
//! - the sender: acked ≤ sent (chunks and bytes), sent − acked ≤ the credit it was granted and
//!   `credit_bytes` is exactly the rest, its outstanding queries are the ones we sent, answers
//!   arrive in order;
//! - the receiver never holds more than its credit of unacknowledged bytes, nor more than
//!   `QUERIES_OPEN_MAX` open queries;
//! - the fetch client yields exactly the ids asked for, in order;
//! - the manifest assembly accepts only contiguous parts of one manifest, never holds more than
//!   its bound, reports completion exactly at `total` and hands back exactly the bytes sent;
//! - liveness: as long as no injected frame was accepted by the Store ends, every frame one end
//!   produced is accepted by the other, and at the end of the program the pair drains (all
//!   queries answered, owed chunks sent, a flush acknowledged, `is_drained`).

use std::collections::hash_map::DefaultHasher;
use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::hash::Hasher;
use std::sync::OnceLock;

use transport::frame::{
    self, ErrorCode, Frame, Purpose, CHUNK_BYTES_MAX, FRAME_PAYLOAD_BYTES_MAX, IDS_PER_FRAME_MAX,
    MANIFEST_PART_BYTES_MAX,
};
use transport::session::{
    FetchClient, ManifestAssembly, ReceiverInput, SenderEvent, StoreReceiver, StoreSender,
    QUERIES_OPEN_MAX,
};

/// Fetches the client may have outstanding in one run (keeps runs short).
const FETCH_OUTSTANDING_MAX: usize = 2048;
/// Chunks up to this size travel encoded; larger ones are handed over as frames whose payload
/// is a shared zero buffer (no 4 MiB copy per chunk).
const ENCODED_CHUNK_MAX: usize = 4096;

/// The three bytes that start a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `StoreSender::new(1 + queries_max % QUERIES_OPEN_MAX)`.
    pub queries_max: u8,
    /// The receiver's credit: one to four largest frames, plus `credit / 4` × 4 KiB.
    pub credit: u8,
    /// `ManifestAssembly::new(1 + manifest_bound)`.
    pub manifest_bound: u8,
}

impl Config {
    fn queries_max(&self) -> usize {
        1 + self.queries_max as usize % QUERIES_OPEN_MAX
    }
    fn credit(&self) -> u64 {
        FRAME_PAYLOAD_BYTES_MAX as u64 * (1 + u64::from(self.credit % 4))
            + u64::from(self.credit / 4) * 4096
    }
    fn manifest_bound(&self) -> u64 {
        1 + u64::from(self.manifest_bound)
    }
}

/// Which machine an injected frame goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Receiver,
    Sender,
    Fetch,
    Manifest,
}

/// One operation. Each is a no-op when its precondition does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The receiver sends its Welcome (once).
    Welcome,
    /// If `can_query`, the sender queries ids `first_id`, `first_id + 1`, … (each id is 32
    /// copies of one byte); see [`id_count`].
    Query { count: u8, first_id: u8 },
    /// Deliver the oldest frame from sender to receiver.
    ToReceiver,
    /// Deliver the oldest frame from receiver to sender.
    ToSender,
    /// The receiver answers its oldest open query: id i is wanted when bit `i % 8` of
    /// `pattern` is set.
    Answer { pattern: u8 },
    /// The sender sends the next owed chunk if its credit allows; see [`chunk_size`]. Odd
    /// `codec`: an lz4 frame whose raw_len is larger than the payload.
    SendChunk { size: u8, codec: u8 },
    /// The (welcomed) sender flushes, once every query is answered and every chunk asked
    /// for is sent.
    Flush,
    /// The receiver makes everything durable and sends the Ack (after its Welcome).
    Durable,
    /// The fetch client asks for ids `first_id`, … ([`id_count`]).
    Fetch { count: u8, first_id: u8 },
    /// The peer sends the fetch client the next chunk it asked for.
    FetchChunk,
    /// The next part of the manifest being assembled, or the first part of a new one; see
    /// [`World::manifest_part`].
    ManifestPart { a: u8, b: u8, c: u8 },
    /// Bytes (at most 255) decoded with `decode_all`; each frame goes to `to`.
    Raw { to: Target, bytes: Vec<u8> },
    /// A well-formed frame built from five bytes (see [`synth`]), sent to `to`.
    Synth { to: Target, fields: [u8; 5] },
}

const OPS: u8 = 13;

fn target(byte: u8) -> Target {
    match byte % 4 {
        0 => Target::Receiver,
        1 => Target::Sender,
        2 => Target::Fetch,
        _ => Target::Manifest,
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next byte, 0 past the end.
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

impl Op {
    fn read(r: &mut Reader<'_>) -> Op {
        match r.u8() % OPS {
            0 => Op::Welcome,
            1 => Op::Query {
                count: r.u8(),
                first_id: r.u8(),
            },
            2 => Op::ToReceiver,
            3 => Op::ToSender,
            4 => Op::Answer { pattern: r.u8() },
            5 => Op::SendChunk {
                size: r.u8(),
                codec: r.u8(),
            },
            6 => Op::Flush,
            7 => Op::Durable,
            8 => Op::Fetch {
                count: r.u8(),
                first_id: r.u8(),
            },
            9 => Op::FetchChunk,
            10 => Op::ManifestPart {
                a: r.u8(),
                b: r.u8(),
                c: r.u8(),
            },
            11 => {
                let to = target(r.u8());
                let len = r.u8() as usize;
                Op::Raw {
                    to,
                    bytes: r.take(len).to_vec(),
                }
            }
            _ => Op::Synth {
                to: target(r.u8()),
                fields: [r.u8(), r.u8(), r.u8(), r.u8(), r.u8()],
            },
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let to_byte = |to: &Target| *to as u8;
        match self {
            Op::Welcome => out.push(0),
            Op::Query { count, first_id } => out.extend([1, *count, *first_id]),
            Op::ToReceiver => out.push(2),
            Op::ToSender => out.push(3),
            Op::Answer { pattern } => out.extend([4, *pattern]),
            Op::SendChunk { size, codec } => out.extend([5, *size, *codec]),
            Op::Flush => out.push(6),
            Op::Durable => out.push(7),
            Op::Fetch { count, first_id } => out.extend([8, *count, *first_id]),
            Op::FetchChunk => out.push(9),
            Op::ManifestPart { a, b, c } => out.extend([10, *a, *b, *c]),
            Op::Raw { to, bytes } => {
                let len = u8::try_from(bytes.len()).expect("at most 255 raw bytes");
                out.extend([11, to_byte(to), len]);
                out.extend_from_slice(bytes);
            }
            Op::Synth { to, fields } => {
                out.extend([12, to_byte(to)]);
                out.extend_from_slice(fields);
            }
        }
    }
}

/// Encodes a program (the inverse of [`decode_program`]).
pub fn encode_program(config: Config, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![config.queries_max, config.credit, config.manifest_bound];
    for op in ops {
        op.write(&mut out);
    }
    out
}

/// Reads a program; every byte string is one.
pub fn decode_program(bytes: &[u8]) -> (Config, Vec<Op>) {
    let mut r = Reader(bytes);
    let config = Config {
        queries_max: r.u8(),
        credit: r.u8(),
        manifest_bound: r.u8(),
    };
    let mut ops = Vec::new();
    while !r.0.is_empty() {
        ops.push(Op::read(&mut r));
    }
    (config, ops)
}

/// Ids in a Query or Fetch: 1..=64, or the most a frame carries for 255.
pub fn id_count(count: u8) -> usize {
    if count == u8::MAX {
        IDS_PER_FRAME_MAX
    } else {
        1 + count as usize % 64
    }
}

/// Payload bytes of a chunk: 1..=128 below 128, else 32 KiB steps up to the 4 MiB maximum.
pub fn chunk_size(size: u8) -> usize {
    if size < 128 {
        1 + size as usize
    } else {
        (size as usize - 127) * (CHUNK_BYTES_MAX / 128)
    }
}

fn ids(count: usize, first: u8) -> Vec<[u8; 32]> {
    (0..count)
        .map(|i| [first.wrapping_add(i as u8); 32])
        .collect()
}

fn zeros() -> &'static [u8] {
    static ZEROS: OnceLock<Vec<u8>> = OnceLock::new();
    ZEROS.get_or_init(|| vec![0; CHUNK_BYTES_MAX])
}

/// A frame in flight: encoded, or a large chunk whose payload is zeros.
enum Wire {
    Encoded(Vec<u8>),
    Chunk {
        id: [u8; 32],
        codec: u8,
        raw_len: u32,
        len: usize,
    },
}

impl Wire {
    fn of(frame: &Frame<'_>) -> Wire {
        let mut out = Vec::new();
        frame::encode(frame, &mut out);
        Wire::Encoded(out)
    }

    /// A chunk of `len` zero bytes; valid for the decoder when `raw_len` is (codec 0: equal,
    /// codec 1: at least `len`).
    fn chunk(id: [u8; 32], codec: u8, raw_len: u32, len: usize) -> Wire {
        assert!(len >= 1 && len <= raw_len as usize && raw_len as usize <= CHUNK_BYTES_MAX);
        assert!(codec == 1 || len == raw_len as usize);
        if len <= ENCODED_CHUNK_MAX {
            Wire::of(&Frame::Chunk {
                id,
                codec,
                raw_len,
                payload: &zeros()[..len],
            })
        } else {
            Wire::Chunk {
                id,
                codec,
                raw_len,
                len,
            }
        }
    }

    /// Hands the frame to `each`. Everything put on a wire is well formed and must decode.
    fn open(&self, mut each: impl FnMut(&Frame<'_>)) {
        match self {
            Wire::Encoded(bytes) => {
                let mut frames = 0;
                frame::decode_all(bytes, |f| {
                    frames += 1;
                    each(&f)
                })
                .unwrap_or_else(|e| panic!("a well-formed frame does not decode: {e}"));
                assert_eq!(frames, 1);
            }
            &Wire::Chunk {
                id,
                codec,
                raw_len,
                len,
            } => each(&Frame::Chunk {
                id,
                codec,
                raw_len,
                payload: &zeros()[..len],
            }),
        }
    }
}

/// A well-formed frame of type `1 + f[0] % 14` whose fields come from the other four bytes
/// (small numbers and one-byte ids, so they can match what the machines expect).
fn synth(f: [u8; 5]) -> Wire {
    let [kind, a, b, c, d] = f;
    let name = "x".repeat(b as usize % 8);
    let filler = vec![b'm'; 255];
    match kind % 14 + 1 {
        1 => Wire::of(&Frame::Hello {
            version_min: a.into(),
            version_max: b.into(),
            purpose: [Purpose::Store, Purpose::Control, Purpose::Fetch][c as usize % 3],
            site: &name,
            tier: "t",
            job: "j",
        }),
        2 => Wire::of(&Frame::Welcome {
            version: u16::from(a % 3),
            site: &name,
            unacked_bytes_max: (u64::from(b) + 1) << (c % 32),
        }),
        3 | 11 => {
            let ids = ids(1 + b as usize % 8, c);
            let ids = frame::id_list(&ids);
            let seq = a.into();
            Wire::of(&if kind % 14 + 1 == 3 {
                Frame::Query { seq, ids }
            } else {
                Frame::Fetch { seq, ids }
            })
        }
        4 => {
            let count = id_count(b);
            let mut bitmap = vec![c; count.div_ceil(8)];
            let spare = bitmap.len() * 8 - count;
            *bitmap.last_mut().expect("count ≥ 1") &= 0xff >> spare;
            Wire::of(&Frame::Missing {
                seq: a.into(),
                count: count as u32,
                bitmap: &bitmap,
            })
        }
        5 => {
            let len = if d & 0x80 != 0 {
                (b as usize + 1) * (CHUNK_BYTES_MAX / 256)
            } else {
                1 + b as usize
            };
            let (codec, raw_len) = if d & 1 == 1 {
                (1, (len + c as usize).min(CHUNK_BYTES_MAX))
            } else {
                (0, len)
            };
            Wire::chunk([a; 32], codec, raw_len as u32, len)
        }
        6 => Wire::of(&Frame::Flush { seq: a.into() }),
        7 => Wire::of(&Frame::Ack {
            chunks: a.into(),
            bytes: u16::from_le_bytes([b, c]).into(),
            flush_seq: d.into(),
        }),
        8 => {
            let total = u64::from(b);
            let offset = u64::from(c) % (total + 1);
            let len = u64::from(d).min(total - offset) as usize;
            Wire::of(&Frame::ManifestPart {
                id: [a; 32],
                total,
                offset,
                data: &filler[..len],
            })
        }
        9 => Wire::of(&Frame::Commit { id: [a; 32] }),
        10 => Wire::of(&Frame::Committed { id: [a; 32] }),
        12 => Wire::of(&Frame::GetManifest {
            by_source: a & 1 == 1,
            key: &filler[..b as usize],
        }),
        13 => Wire::of(&Frame::NoManifest),
        _ => Wire::of(&Frame::Error {
            code: ErrorCode::from_u16(a.into()),
            reason: &name,
        }),
    }
}

/// What a run did, so tests can check that the committed seeds reach the interesting states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub ops: usize,
    /// Chunks the sender saw acknowledged (the last Ack's count).
    pub chunks_acked: u64,
    pub largest_chunk: usize,
    /// SendChunk ops that waited because the sender's credit was too small.
    pub credit_waits: u64,
    /// Frames refused by any machine.
    pub refused: u64,
    /// Injected frames a Store end accepted (after which liveness is no longer checked).
    pub injected_accepted: u64,
    pub fetched: u64,
    pub manifests: u64,
    /// The end-of-program drain ran and the pair drained.
    pub drained: bool,
}

fn fingerprint(value: &impl fmt::Debug) -> u64 {
    struct H(DefaultHasher);
    impl fmt::Write for H {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut h = H(DefaultHasher::new());
    write!(h, "{value:?}").expect("hashing cannot fail");
    h.0.finish()
}

/// The four machines, the two channels between the Store ends, and the model.
struct World {
    queries_max: usize,
    credit: u64,
    manifest_bound: u64,
    sender: StoreSender,
    receiver: StoreReceiver,
    client: FetchClient,
    manifest: ManifestAssembly,
    to_receiver: VecDeque<Wire>,
    to_sender: VecDeque<Wire>,
    welcome_sent: bool,
    /// The credit of the Welcome the sender accepted.
    sender_credit: Option<u64>,
    /// Queries the sender sent and has no answer to: (seq, ids).
    sender_queries: VecDeque<(u64, Vec<[u8; 32]>)>,
    /// Chunks the sender owes, in order.
    owed: VecDeque<[u8; 32]>,
    /// Queries the receiver accepted and has not answered (there is no getter for this).
    receiver_queries: VecDeque<(u64, Vec<[u8; 32]>)>,
    /// Chunks the receiver asked for and has not received, in order.
    receiver_wanted: VecDeque<[u8; 32]>,
    fetch_expected: VecDeque<[u8; 32]>,
    /// The last Fetch sequence number (they start at 1).
    fetch_seq: u64,
    /// What the manifest assembly holds: (id, total, bytes).
    manifest_model: Option<([u8; 32], u64, Vec<u8>)>,
    /// An injected frame was accepted by a Store end: the ends may now disagree.
    tainted: bool,
    stats: Stats,
}

impl World {
    fn new(config: Config) -> World {
        World {
            queries_max: config.queries_max(),
            credit: config.credit(),
            manifest_bound: config.manifest_bound(),
            sender: StoreSender::new(config.queries_max()),
            receiver: StoreReceiver::new(config.credit()),
            client: FetchClient::new(),
            manifest: ManifestAssembly::new(config.manifest_bound()),
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            welcome_sent: false,
            sender_credit: None,
            sender_queries: VecDeque::new(),
            owed: VecDeque::new(),
            receiver_queries: VecDeque::new(),
            receiver_wanted: VecDeque::new(),
            fetch_expected: VecDeque::new(),
            fetch_seq: 0,
            manifest_model: None,
            tainted: false,
            stats: Stats::default(),
        }
    }

    fn run(&mut self, op: &Op) {
        self.stats.ops += 1;
        match *op {
            Op::Welcome => {
                if !self.welcome_sent {
                    self.welcome_sent = true;
                    let welcome = self.receiver.welcome(frame::VERSION_MAX, "dr");
                    self.to_sender.push_back(Wire::of(&welcome));
                }
            }
            Op::Query { count, first_id } => {
                if self.sender.can_query() {
                    let ids = ids(id_count(count), first_id);
                    let seq = self.sender.query(ids.len());
                    if let Some(&(last, _)) = self.sender_queries.back() {
                        assert!(seq > last, "query sequence numbers must increase");
                    }
                    self.to_receiver.push_back(Wire::of(&Frame::Query {
                        seq,
                        ids: frame::id_list(&ids),
                    }));
                    self.sender_queries.push_back((seq, ids));
                }
            }
            Op::ToReceiver => {
                if let Some(wire) = self.to_receiver.pop_front() {
                    wire.open(|f| self.receive(f, true));
                }
            }
            Op::ToSender => {
                if let Some(wire) = self.to_sender.pop_front() {
                    wire.open(|f| self.send_side(f, true));
                }
            }
            Op::Answer { pattern } => self.answer(pattern),
            Op::SendChunk { size, codec } => self.send_chunk(chunk_size(size), codec & 1),
            Op::Flush => {
                // A Flush follows every chunk asked for (the receiver refuses it otherwise).
                let shipped =
                    self.sender.queries_outstanding() == 0 && self.sender.chunks_owed() == 0;
                if self.sender_credit.is_some() && shipped {
                    let seq = self.sender.flush();
                    self.to_receiver.push_back(Wire::of(&Frame::Flush { seq }));
                }
            }
            Op::Durable => {
                if self.welcome_sent {
                    let ack = self.receiver.durable();
                    self.to_sender.push_back(Wire::of(&ack));
                }
            }
            Op::Fetch { count, first_id } => {
                let ids = ids(id_count(count), first_id);
                if self.fetch_expected.len() + ids.len() <= FETCH_OUTSTANDING_MAX {
                    let seq = self.client.fetch(&ids);
                    assert_eq!(seq, self.fetch_seq + 1, "fetch sequence numbers");
                    self.fetch_seq = seq;
                    self.fetch_expected.extend(ids);
                }
                assert_eq!(self.client.outstanding(), self.fetch_expected.len());
            }
            Op::FetchChunk => self.fetch_chunk(false),
            Op::ManifestPart { a, b, c } => self.manifest_part(a, b, c),
            Op::Raw { to, ref bytes } => {
                let _ = frame::decode_all(bytes, |f| self.inject(to, &f));
            }
            Op::Synth { to, fields } => synth(fields).open(|f| self.inject(to, f)),
        }
        self.check();
    }

    fn inject(&mut self, to: Target, frame: &Frame<'_>) {
        match to {
            Target::Receiver => self.receive(frame, false),
            Target::Sender => self.send_side(frame, false),
            Target::Fetch => self.fetch_handle(frame, false),
            Target::Manifest => self.manifest_add(frame, None),
        }
    }

    /// The receiver handles a frame; `honest` when the sender produced it.
    fn receive(&mut self, frame: &Frame<'_>, honest: bool) {
        // A refused honest frame fails below unless tainted: only then is the state compared,
        // in full while it is small enough to format quickly.
        let before = (!honest || self.tainted).then(|| {
            let full = (self.receiver_wanted.len() <= 64).then(|| fingerprint(&self.receiver));
            (full, self.receiver.pending_bytes())
        });
        match self.receiver.handle(frame) {
            Ok(input) => {
                if !honest {
                    self.tainted = true;
                    self.stats.injected_accepted += 1;
                }
                match input {
                    ReceiverInput::Query { seq, ids } => {
                        assert!(matches!(*frame, Frame::Query { seq: s, .. } if s == seq));
                        self.receiver_queries.push_back((seq, ids.iter().collect()));
                        assert!(self.receiver_queries.len() <= QUERIES_OPEN_MAX);
                    }
                    ReceiverInput::Chunk { id, payload, .. } => {
                        assert!(matches!(*frame, Frame::Chunk { id: i, .. } if i == id));
                        assert_eq!(
                            self.receiver_wanted.pop_front(),
                            Some(id),
                            "the receiver accepted a chunk it did not ask for next"
                        );
                        assert!(payload.len() as u64 <= self.receiver.pending_bytes());
                    }
                    ReceiverInput::Flush { .. } => {
                        assert!(matches!(*frame, Frame::Flush { .. }));
                    }
                }
                assert!(
                    self.receiver.pending_bytes() <= self.credit,
                    "the receiver holds {} unacknowledged bytes, over its credit of {}",
                    self.receiver.pending_bytes(),
                    self.credit
                );
            }
            Err(e) => {
                self.stats.refused += 1;
                assert!(
                    !honest || self.tainted,
                    "the receiver refused the sender's {frame:?}: {e}"
                );
                let full = before.and_then(|(full, _)| full.map(|_| fingerprint(&self.receiver)));
                assert_eq!(
                    before,
                    Some((full, self.receiver.pending_bytes())),
                    "refusing {frame:?} ({e}) changed the receiver"
                );
            }
        }
    }

    /// The sender handles a frame; `honest` when the receiver produced it.
    fn send_side(&mut self, frame: &Frame<'_>, honest: bool) {
        let before = (!honest || self.tainted).then(|| fingerprint(&self.sender));
        match self.sender.handle(frame) {
            Ok(event) => {
                if !honest {
                    self.tainted = true;
                    self.stats.injected_accepted += 1;
                }
                match event {
                    SenderEvent::Welcomed { .. } => {
                        let Frame::Welcome {
                            unacked_bytes_max, ..
                        } = *frame
                        else {
                            panic!("Welcomed from {frame:?}")
                        };
                        assert!(self.sender_credit.is_none(), "welcomed twice");
                        self.sender_credit = Some(unacked_bytes_max);
                    }
                    SenderEvent::Missing { seq, wanted } => {
                        let (expected, ids) = self
                            .sender_queries
                            .pop_front()
                            .expect("an answer was accepted with no query outstanding");
                        assert_eq!(seq, expected, "an answer out of order was accepted");
                        assert_eq!(wanted.len(), ids.len());
                        for (id, wanted) in ids.iter().zip(wanted) {
                            if wanted {
                                self.owed.push_back(*id);
                            }
                        }
                    }
                    SenderEvent::Acked { chunks, bytes } => {
                        assert_eq!(self.sender.acked(), (chunks, bytes));
                        self.stats.chunks_acked = chunks;
                    }
                }
            }
            Err(e) => {
                self.stats.refused += 1;
                assert!(
                    !honest || self.tainted,
                    "the sender refused the receiver's {frame:?}: {e}"
                );
                assert_eq!(
                    before,
                    Some(fingerprint(&self.sender)),
                    "refusing {frame:?} ({e}) changed the sender"
                );
            }
        }
    }

    fn answer(&mut self, pattern: u8) {
        let Some((seq, ids)) = self.receiver_queries.pop_front() else {
            return;
        };
        let wanted: Vec<bool> = (0..ids.len())
            .map(|i| pattern >> (i % 8) & 1 == 1)
            .collect();
        let bitmap = self.receiver.answer(frame::id_list(&ids), &wanted);
        assert_eq!(bitmap.len(), ids.len().div_ceil(8));
        for (i, (&w, id)) in wanted.iter().zip(&ids).enumerate() {
            assert_eq!(bitmap[i / 8] >> (i % 8) & 1 == 1, w);
            if w {
                self.receiver_wanted.push_back(*id);
            }
        }
        self.to_sender.push_back(Wire::of(&Frame::Missing {
            seq,
            count: ids.len() as u32,
            bitmap: &bitmap,
        }));
    }

    fn send_chunk(&mut self, len: usize, codec: u8) {
        let Some(&id) = self.owed.front() else {
            return;
        };
        if len as u64 > self.sender.credit_bytes() {
            self.stats.credit_waits += 1;
            return;
        }
        self.sender.chunk_sent(len as u64);
        self.owed.pop_front();
        self.stats.largest_chunk = self.stats.largest_chunk.max(len);
        let raw_len = if codec == 1 {
            (2 * len).min(CHUNK_BYTES_MAX)
        } else {
            len
        };
        self.to_receiver
            .push_back(Wire::chunk(id, codec, raw_len as u32, len));
    }

    /// The peer sends the next chunk asked for, through the codec or (`direct`, to drain
    /// thousands quickly) as a frame.
    fn fetch_chunk(&mut self, direct: bool) {
        let Some(&id) = self.fetch_expected.front() else {
            return;
        };
        if direct {
            let chunk = Frame::Chunk {
                id,
                codec: 0,
                raw_len: 1,
                payload: &[0],
            };
            self.fetch_handle(&chunk, true);
        } else {
            Wire::chunk(id, 0, 1, 1).open(|f| self.fetch_handle(f, true));
        }
    }

    /// The fetch client's state is its queue of expected ids, which the model mirrors: no
    /// fingerprint needed (it would format up to 2048 ids per frame).
    fn fetch_handle(&mut self, frame: &Frame<'_>, honest: bool) {
        match self.client.handle(frame) {
            Ok(id) => {
                assert_eq!(
                    Some(id),
                    self.fetch_expected.pop_front(),
                    "the fetch client accepted a chunk it did not ask for next"
                );
                self.stats.fetched += 1;
            }
            Err(e) => {
                self.stats.refused += 1;
                assert!(!honest, "the fetch client refused {frame:?}: {e}");
            }
        }
        assert_eq!(self.client.outstanding(), self.fetch_expected.len());
    }

    /// Continues the manifest being assembled with `1 + a % rest` bytes, or starts a new one
    /// with id `[b; 32]`, total `1 + a % (bound + 1)` (one more than the bound is refused) and
    /// a first part of `1 + c % total` bytes.
    fn manifest_part(&mut self, a: u8, b: u8, c: u8) {
        let (id, total, offset, len, expect) = match &self.manifest_model {
            Some((id, total, bytes)) => {
                let offset = bytes.len() as u64;
                let rest = (total - offset).min(MANIFEST_PART_BYTES_MAX as u64);
                (*id, *total, offset, 1 + u64::from(a) % rest, true)
            }
            None => {
                let total = 1 + u64::from(a) % (self.manifest_bound + 1);
                let len = 1 + u64::from(c) % total;
                ([b; 32], total, 0, len, total <= self.manifest_bound)
            }
        };
        let data: Vec<u8> = (offset..offset + len).map(|i| (i as u8) ^ id[0]).collect();
        Wire::of(&Frame::ManifestPart {
            id,
            total,
            offset,
            data: &data,
        })
        .open(|f| self.manifest_add(f, Some(expect)));
    }

    /// `expect`: whether the part must be accepted (None: either).
    fn manifest_add(&mut self, frame: &Frame<'_>, expect: Option<bool>) {
        let result = self.manifest.add(frame);
        if let Some(expect) = expect {
            assert_eq!(
                result.is_ok(),
                expect,
                "manifest part {frame:?}: {result:?}"
            );
        }
        let done = match result {
            Ok(done) => done,
            Err(_) => {
                self.stats.refused += 1;
                return;
            }
        };
        let Frame::ManifestPart {
            id,
            total,
            offset,
            data,
        } = *frame
        else {
            panic!("the manifest assembly accepted {frame:?}")
        };
        assert!(!data.is_empty(), "an empty manifest part was accepted");
        let model = self
            .manifest_model
            .get_or_insert_with(|| (id, total, Vec::new()));
        assert_eq!(
            (id, total, offset),
            (model.0, model.1, model.2.len() as u64),
            "a part that does not continue the manifest was accepted"
        );
        model.2.extend_from_slice(data);
        assert!(
            model.2.len() as u64 <= self.manifest_bound,
            "the manifest assembly holds {} bytes, over its bound of {}",
            model.2.len(),
            self.manifest_bound
        );
        assert_eq!(done, model.2.len() as u64 == total);
        if done {
            let bytes = std::mem::take(&mut model.2);
            self.manifest_model = None;
            let assembly = std::mem::replace(
                &mut self.manifest,
                ManifestAssembly::new(self.manifest_bound),
            );
            assert_eq!(assembly.id(), id);
            assert_eq!(assembly.into_bytes(), bytes);
            self.stats.manifests += 1;
        }
    }

    fn check(&self) {
        let (sent_chunks, sent_bytes) = self.sender.sent();
        let (acked_chunks, acked_bytes) = self.sender.acked();
        assert!(
            acked_chunks <= sent_chunks && acked_bytes <= sent_bytes,
            "acked {:?} > sent {:?}",
            self.sender.acked(),
            self.sender.sent()
        );
        assert_eq!(self.sender.queries_outstanding(), self.sender_queries.len());
        assert!(self.sender.queries_outstanding() <= self.queries_max);
        match self.sender_credit {
            Some(credit) => {
                let unacked = sent_bytes - acked_bytes;
                assert!(
                    unacked <= credit,
                    "{unacked} bytes unacknowledged, credit {credit}"
                );
                assert_eq!(self.sender.credit_bytes(), credit - unacked);
            }
            None => {
                assert!(!self.sender.can_query());
                assert_eq!(self.sender.credit_bytes(), 0);
                assert_eq!(self.sender.sent(), (0, 0));
            }
        }
        assert!(self.receiver.pending_bytes() <= self.credit);
    }

    /// Without injected frames the two ends must always be able to finish: answer every
    /// query, send every owed chunk (waiting for acks when out of credit), flush.
    fn drain_store(&mut self) {
        if !self.welcome_sent {
            self.run(&Op::Welcome);
        }
        let mut converged = false;
        for _ in 0..100_000 {
            let mut progress = false;
            while let Some(wire) = self.to_receiver.pop_front() {
                wire.open(|f| self.receive(f, true));
                progress = true;
            }
            while let Some(wire) = self.to_sender.pop_front() {
                wire.open(|f| self.send_side(f, true));
                progress = true;
            }
            while !self.receiver_queries.is_empty() {
                self.answer(0);
                progress = true;
            }
            while !self.owed.is_empty() && self.sender.credit_bytes() >= 1 {
                self.send_chunk(1, 0);
                progress = true;
            }
            if !progress && !self.owed.is_empty() {
                self.run(&Op::Durable);
                progress = true;
            }
            self.check();
            if !progress {
                converged = true;
                break;
            }
        }
        assert!(converged, "the Store ends did not drain");
        assert!(self.sender_queries.is_empty() && self.owed.is_empty());
        assert!(self.receiver_queries.is_empty() && self.receiver_wanted.is_empty());
        self.run(&Op::Flush);
        self.run(&Op::ToReceiver);
        self.run(&Op::Durable);
        self.run(&Op::ToSender);
        assert!(self.sender.is_drained(), "{:?}", self.sender);
        assert_eq!(self.sender.acked(), self.sender.sent());
        assert_eq!(self.receiver.pending_bytes(), 0);
        self.stats.drained = true;
    }

    fn finish(mut self) -> Stats {
        if !self.tainted {
            self.drain_store();
        }
        while !self.fetch_expected.is_empty() {
            self.fetch_chunk(true);
        }
        assert_eq!(self.client.outstanding(), 0);
        while self.manifest_model.is_some() {
            self.manifest_part(u8::MAX, 0, 0);
        }
        assert!(self.manifest.into_bytes().is_empty());
        self.stats
    }
}

/// Runs a program; panics when an invariant does not hold.
pub fn run(bytes: &[u8]) -> Stats {
    let (config, ops) = decode_program(bytes);
    let mut world = World::new(config);
    for op in &ops {
        world.run(op);
    }
    world.finish()
}

/// Seed programs for `corpus/session`, each reaching a state worth mutating from.
pub fn seed_programs() -> Vec<(&'static str, Vec<u8>)> {
    use Op::*;
    let config = Config {
        queries_max: 3,
        credit: 0,
        manifest_bound: 200,
    };
    // A query answered, wanted chunks sent, flushed, acknowledged.
    let store = vec![
        Welcome,
        ToSender,
        Query {
            count: 4,
            first_id: 10,
        },
        ToReceiver,
        Answer { pattern: 0b01101 },
        ToSender,
        SendChunk { size: 20, codec: 0 },
        ToReceiver,
        SendChunk { size: 7, codec: 1 },
        ToReceiver,
        SendChunk {
            size: 127,
            codec: 0,
        },
        ToReceiver,
        Flush,
        ToReceiver,
        Durable,
        ToSender,
    ];
    // Large chunks until the sender runs out of credit, then an ack opens it again.
    let mut credit = vec![
        Welcome,
        ToSender,
        Query {
            count: 5,
            first_id: 1,
        },
        ToReceiver,
        Answer { pattern: 0xff },
        ToSender,
    ];
    for _ in 0..3 {
        credit.extend([
            SendChunk {
                size: 255,
                codec: 0,
            },
            ToReceiver,
        ]);
    }
    credit.extend([
        Durable,
        ToSender,
        SendChunk {
            size: 255,
            codec: 1,
        },
        ToReceiver,
        SendChunk {
            size: 200,
            codec: 0,
        },
        ToReceiver,
    ]);
    // Queries pipelined up to the limit, answered in order, one of the most ids a frame holds.
    let mut pipelined = vec![Welcome, ToSender];
    for i in 0..16 {
        pipelined.push(Query {
            count: if i == 0 { u8::MAX } else { i },
            first_id: i * 16,
        });
    }
    for _ in 0..16 {
        pipelined.extend([ToReceiver, Answer { pattern: 0x81 }, ToSender]);
    }
    for _ in 0..8 {
        pipelined.extend([SendChunk { size: 3, codec: 0 }, ToReceiver]);
    }
    pipelined.extend([Flush, Flush, ToReceiver, Durable, ToReceiver, ToSender]);
    // Frames injected into both ends: a foreign chunk, an ack that does not match, a second
    // Welcome, a query out of order, and one the receiver accepts (which stops the checks
    // that assume only the two ends talk).
    let injected = vec![
        Welcome,
        ToSender,
        Query {
            count: 2,
            first_id: 40,
        },
        ToReceiver,
        Answer { pattern: 3 },
        ToSender,
        Synth {
            to: Target::Receiver,
            fields: [4, 9, 10, 0, 0],
        },
        Synth {
            to: Target::Sender,
            fields: [6, 5, 1, 0, 0],
        },
        Synth {
            to: Target::Sender,
            fields: [1, 1, 200, 12, 0],
        },
        Synth {
            to: Target::Receiver,
            fields: [2, 7, 0, 1, 0],
        },
        Raw {
            to: Target::Receiver,
            bytes: vec![99, 0, 0, 0, 0, 0, 0, 0],
        },
        SendChunk { size: 10, codec: 0 },
        ToReceiver,
        Synth {
            to: Target::Receiver,
            fields: [4, 41, 10, 0, 0],
        },
    ];
    // Fetches answered in order, with a chunk out of order and one not asked for.
    let fetch = vec![
        Fetch {
            count: 2,
            first_id: 50,
        },
        Synth {
            to: Target::Fetch,
            fields: [4, 51, 3, 0, 0],
        },
        FetchChunk,
        Fetch {
            count: u8::MAX,
            first_id: 0,
        },
        FetchChunk,
        Synth {
            to: Target::Fetch,
            fields: [6, 1, 0, 0, 0],
        },
    ];
    // A manifest in three parts, one over the bound, then parts that do not continue.
    let manifest = vec![
        // total 100 (bound 201), 31 bytes, then the other 69: complete.
        ManifestPart { a: 99, b: 7, c: 30 },
        ManifestPart { a: 68, b: 0, c: 0 },
        // total 202: over the bound, refused.
        ManifestPart { a: 201, b: 1, c: 0 },
        // total 50, 10 bytes; a part at offset 0 again (refused), one that continues
        // (accepted), then a frame of another type (refused).
        ManifestPart { a: 49, b: 2, c: 9 },
        Synth {
            to: Target::Manifest,
            fields: [7, 2, 50, 0, 20],
        },
        Synth {
            to: Target::Manifest,
            fields: [7, 2, 50, 10, 20],
        },
        Synth {
            to: Target::Manifest,
            fields: [8, 2, 0, 0, 0],
        },
    ];
    vec![
        ("store", encode_program(config, &store)),
        ("store-credit", encode_program(config, &credit)),
        (
            "store-pipelined",
            encode_program(
                Config {
                    queries_max: 15,
                    credit: 1,
                    manifest_bound: 0,
                },
                &pipelined,
            ),
        ),
        ("store-injected", encode_program(config, &injected)),
        ("fetch", encode_program(config, &fetch)),
        ("manifest", encode_program(config, &manifest)),
    ]
}
