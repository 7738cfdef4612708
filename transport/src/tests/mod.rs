//! The peer protocol end to end in memory: a [`pair::Pair`] of stream ends over byte pipes,
//! with one fault injected per run. Every fault ends in one named [`Failure`] on the end that
//! sees it (or, where the session cannot see it, in a stall that names what the end waits
//! for), and nothing half-committed: every chunk the receiver holds durably arrived whole and
//! checked, every chunk the sender was told is durable is, and a manifest is committed whole
//! or not at all.

mod pair;

use pair::{
    chunks, id_of, ids, ControlClient, ControlServer, Failure, Fault, FetchEnd, FetchServer,
    Injection, Pair, Status, StoreClient, StoreServer, Who,
};
use proptest::prelude::*;

use crate::frame::{ErrorCode, FrameError, FRAME_PAYLOAD_BYTES_MAX};
use crate::session::Rule;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const QUERY: u8 = 3;
const MISSING: u8 = 4;
const CHUNK: u8 = 5;
const FLUSH: u8 = 6;
const ACK: u8 = 7;
const MANIFEST_PART: u8 = 8;
const COMMIT: u8 = 9;

/// Least credit a sender accepts: one largest chunk frame.
const CREDIT: u64 = FRAME_PAYLOAD_BYTES_MAX as u64;

/// Six chunks of 1000 bytes; the receiver already holds the second.
fn store_payloads() -> Vec<Vec<u8>> {
    chunks(6, 1000)
}

/// The Store exchange every fault test starts from: queries of two ids, two in flight, an Ack
/// every two chunks. Its frames, in order: client Hello, Attempt, Query 1-2, Query 3, Chunk
/// ×5, Flush; server Welcome, Missing 1-3, Ack ×3.
fn store() -> Pair<StoreClient, StoreServer> {
    let payloads = store_payloads();
    Pair::new(
        StoreClient::new(&payloads, 2, 2),
        StoreServer::new(CREDIT, 2, &payloads[1..2]),
    )
}

fn fault(from: Who, kind: u8, nth: usize, fault: Fault) -> Injection {
    Injection {
        from,
        kind,
        nth,
        fault,
    }
}

/// Nothing half-committed on a Store stream, whatever happened.
fn check_store(pair: &Pair<StoreClient, StoreServer>) {
    let payloads = store_payloads();
    let offered = ids(&payloads);
    let server = pair.server();
    for (id, payload) in &server.durable {
        assert_eq!(
            id_of(payload),
            *id,
            "a durable chunk is not what its id says"
        );
        assert!(offered.contains(id), "a durable chunk nobody offered");
    }
    for id in pair.client().acked() {
        assert!(
            server.durable.contains_key(id),
            "the sender was told a chunk is durable that the receiver does not hold"
        );
    }
    if *pair.status().0 == Status::Done {
        assert!(
            offered.iter().all(|id| server.durable.contains_key(id)),
            "the sender is done but not every chunk is durable"
        );
    }
}

fn failed(failure: Failure) -> Status {
    Status::Failed(failure)
}

/// The receiver sees the fault: it names the broken rule and refuses the stream.
fn receiver_refuses(pair: &Pair<StoreClient, StoreServer>, expected: Failure) {
    let code = match expected {
        Failure::Corrupt => ErrorCode::Corrupt,
        _ => ErrorCode::Protocol,
    };
    assert_eq!(
        pair.status(),
        (&failed(Failure::Peer(code)), &failed(expected))
    );
    check_store(pair);
}

/// The sender sees the fault; it stops its stream, and the receiver keeps what it verified.
fn sender_refuses(pair: &Pair<StoreClient, StoreServer>, expected: Failure) {
    assert_eq!(pair.status(), (&failed(expected), &Status::Done));
    check_store(pair);
}

#[test]
fn a_clean_store_exchange_makes_every_chunk_durable_once() {
    let pair = store().drive();
    assert_eq!(pair.status(), (&Status::Done, &Status::Done));
    let payloads = store_payloads();
    // The chunk the receiver held is not sent again.
    assert_eq!(pair.client().sent.len(), payloads.len() - 1);
    assert!(!pair.client().sent.contains(&id_of(&payloads[1])));
    assert_eq!(pair.client().acked(), &pair.client().sent[..]);
    check_store(&pair);
    let kinds: Vec<(Who, u8)> = pair.transcript.iter().map(|&(w, k, _)| (w, k)).collect();
    assert_eq!(kinds.iter().filter(|k| k.1 == CHUNK).count(), 5);
    assert_eq!(kinds.iter().filter(|k| k.1 == ACK).count(), 3);
}

#[test]
fn a_dropped_chunk_is_a_chunk_out_of_order_at_the_receiver() {
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 0, Fault::Drop))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::ChunkOrder));
}

#[test]
fn a_dropped_last_chunk_makes_the_flush_a_violation_instead_of_a_hang() {
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 4, Fault::Drop))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::FlushOwed));
}

#[test]
fn a_duplicated_chunk_is_refused() {
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 0, Fault::Duplicate))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::ChunkOrder));
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 4, Fault::Duplicate))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::ChunkNotAsked));
}

#[test]
fn reordered_chunks_are_refused() {
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 1, Fault::Reorder))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::ChunkOrder));
}

#[test]
fn a_dropped_or_duplicated_query_breaks_the_query_order() {
    for f in [Fault::Drop, Fault::Duplicate] {
        let pair = store().inject(fault(Who::Client, QUERY, 0, f)).drive();
        receiver_refuses(&pair, Failure::Session(Rule::QueryOrder));
    }
}

#[test]
fn a_lost_duplicated_or_reordered_answer_is_refused_by_the_sender() {
    for (nth, f) in [(0, Fault::Drop), (0, Fault::Reorder), (2, Fault::Duplicate)] {
        let pair = store().inject(fault(Who::Server, MISSING, nth, f)).drive();
        sender_refuses(&pair, Failure::Session(Rule::AnswerMismatch));
    }
}

#[test]
fn acks_are_cumulative_so_a_lost_or_repeated_one_does_no_harm() {
    for f in [Fault::Drop, Fault::Duplicate] {
        let pair = store().inject(fault(Who::Server, ACK, 0, f)).drive();
        assert_eq!(pair.status(), (&Status::Done, &Status::Done), "{f:?}");
        check_store(&pair);
    }
}

#[test]
fn an_ack_that_goes_backwards_is_refused() {
    let pair = store()
        .inject(fault(Who::Server, ACK, 0, Fault::Reorder))
        .drive();
    sender_refuses(&pair, Failure::Session(Rule::AckMismatch));
    // An Ack claiming 2^31 more bytes than were sent.
    let pair = store()
        .inject(fault(
            Who::Server,
            ACK,
            0,
            Fault::Flip { at: 19, mask: 0x80 },
        ))
        .drive();
    sender_refuses(&pair, Failure::Session(Rule::AckMismatch));
}

/// Frames lost where no rule can see it (QUIC streams do not lose frames; a peer whose
/// application stops does the same): both ends wait, and say for what. On a live link only
/// QUIC's idle timeout would end this, and keep-alives keep it from firing.
#[test]
fn a_lost_final_ack_or_flush_leaves_both_ends_waiting_and_saying_for_what() {
    let pair = store()
        .inject(fault(Who::Server, ACK, 2, Fault::Drop))
        .drive();
    assert_eq!(
        pair.status(),
        (&Status::Stalled("ack"), &Status::Stalled("frames"))
    );
    check_store(&pair);
    assert_eq!(pair.server().durable.len(), 6);
    let pair = store()
        .inject(fault(Who::Client, FLUSH, 0, Fault::Drop))
        .drive();
    assert_eq!(
        pair.status(),
        (&Status::Stalled("ack"), &Status::Stalled("frames"))
    );
    check_store(&pair);
    let pair = store()
        .inject(fault(Who::Server, WELCOME, 0, Fault::Drop))
        .drive();
    assert_eq!(pair.status().0, &Status::Stalled("welcome"));
    let pair = store()
        .inject(fault(Who::Client, HELLO, 0, Fault::Drop))
        .drive();
    assert_eq!(pair.status().1, &Status::Stalled("hello"));
}

#[test]
fn a_truncated_chunk_swallows_the_next_frame_and_fails_its_check() {
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 1, Fault::Truncate { keep: 1000 }))
        .drive();
    receiver_refuses(&pair, Failure::Corrupt);
    // The chunk before it was whole and checked: kept.
    assert_eq!(pair.server().durable.len(), 2);
}

#[test]
fn bad_lengths_are_refused_by_the_decoder() {
    let len = (FRAME_PAYLOAD_BYTES_MAX + 1) as u32;
    let pair = store()
        .inject(fault(Who::Client, CHUNK, 0, Fault::Length { len }))
        .drive();
    receiver_refuses(
        &pair,
        Failure::Frame(FrameError::TooLong {
            kind: "Chunk",
            len: len as usize,
            max: FRAME_PAYLOAD_BYTES_MAX,
        }),
    );
    // One byte short: the raw payload no longer matches its raw length.
    let pair = store()
        .inject(fault(
            Who::Client,
            CHUNK,
            0,
            Fault::Length { len: 37 + 999 },
        ))
        .drive();
    receiver_refuses(
        &pair,
        Failure::Frame(FrameError::Malformed {
            kind: "Chunk",
            detail: "raw chunk whose payload length is not raw_len",
        }),
    );
}

#[test]
fn damaged_headers_are_refused_by_the_decoder() {
    let pair = store()
        .inject(fault(Who::Client, QUERY, 0, Fault::Flip { at: 1, mask: 1 }))
        .drive();
    receiver_refuses(&pair, Failure::Frame(FrameError::Reserved));
    let pair = store()
        .inject(fault(
            Who::Client,
            QUERY,
            0,
            Fault::Flip { at: 0, mask: 0x40 },
        ))
        .drive();
    receiver_refuses(&pair, Failure::Frame(FrameError::UnknownType(QUERY | 0x40)));
}

#[test]
fn a_damaged_chunk_payload_fails_its_check_and_is_not_kept() {
    let pair = store()
        .inject(fault(
            Who::Client,
            CHUNK,
            0,
            Fault::Flip {
                at: 8 + 37 + 500,
                mask: 4,
            },
        ))
        .drive();
    receiver_refuses(&pair, Failure::Corrupt);
    assert_eq!(pair.server().durable.len(), 1, "only what it held before");
}

#[test]
fn a_damaged_id_in_a_query_is_caught_when_the_real_chunk_arrives() {
    let pair = store()
        .inject(fault(
            Who::Client,
            QUERY,
            0,
            Fault::Flip {
                at: 8 + 12,
                mask: 1,
            },
        ))
        .drive();
    receiver_refuses(&pair, Failure::Session(Rule::ChunkOrder));
}

#[test]
fn a_damaged_welcome_is_refused_by_the_sender() {
    // unacked_bytes_max = 0x400025 loses its 0x40 in byte 2: less credit than one chunk.
    let pair = store()
        .inject(fault(
            Who::Server,
            WELCOME,
            0,
            Fault::Flip {
                at: 8 + 5 + 2,
                mask: 0x40,
            },
        ))
        .drive();
    assert_eq!(
        pair.status().0,
        &failed(Failure::Session(Rule::CreditBelowOneChunk))
    );
    let pair = store()
        .inject(fault(
            Who::Server,
            WELCOME,
            0,
            Fault::Flip { at: 8, mask: 4 },
        ))
        .drive();
    assert_eq!(pair.status().0, &failed(Failure::Session(Rule::Version)));
}

/// The frames of a clean run, to cut the connection at each boundary and inside each frame.
fn clean_transcript<C: pair::End, S: pair::End>(
    make: &dyn Fn() -> Pair<C, S>,
) -> Vec<(Who, u8, usize)> {
    let pair = make().drive();
    assert_eq!(pair.status(), (&Status::Done, &Status::Done));
    pair.transcript.clone()
}

fn ended(status: &Status) -> bool {
    matches!(status, Status::Done | Status::Failed(_))
}

#[test]
fn a_store_stream_cut_or_its_receiver_killed_at_every_frame_loses_nothing_acknowledged() {
    let frames = clean_transcript(&store);
    assert_eq!(frames.len(), 18);
    // A cut link (the receiver keeps what it verified) and a killed receiver (it keeps only
    // what it sealed), after every frame.
    for (k, crash) in (0..frames.len()).flat_map(|k| [(k, false), (k, true)]) {
        let pair = if crash {
            store().server_crashes_on_cut().cut_after(k).drive()
        } else {
            store().cut_after(k).drive()
        };
        let (client, server) = pair.status();
        assert!(
            ended(client) && ended(server),
            "cut after {k}: {client:?} {server:?}"
        );
        assert!(
            [client, server].contains(&&failed(Failure::Lost)),
            "cut after {k}: nobody saw it"
        );
        for status in [client, server] {
            assert!(
                matches!(status, Status::Done | Status::Failed(Failure::Lost)),
                "cut after {k}: {status:?}"
            );
        }
        check_store(&pair);
    }
}

#[test]
fn a_store_stream_cut_inside_any_frame_ends_inside_a_frame_for_its_reader() {
    let frames = clean_transcript(&store);
    for (i, &(from, kind, len)) in frames.iter().enumerate() {
        let pair = store().cut_inside(i, len / 2).drive();
        let (client, server) = pair.status();
        let reader = if from == Who::Client { server } else { client };
        assert_eq!(
            reader,
            &failed(Failure::EndedInsideFrame),
            "cut inside frame {i} (type {kind})"
        );
        check_store(&pair);
    }
}

#[test]
fn a_receiver_that_stops_reading_holds_the_sender_to_its_credit() {
    let payloads = chunks(8, 1_500_000);
    let make = |reads| {
        let mut pair = Pair::new(
            StoreClient::new(&payloads, 2, 2),
            StoreServer::new(CREDIT, 2, &[]),
        )
        .server_stops_reading_after(reads);
        pair.window = 8 << 20;
        pair.drive()
    };
    // After Hello, Attempt and two queries: the sender ships what it was asked for until the
    // credit is spent, then waits; nothing beyond the credit sits in the pipe.
    let pair = make(4);
    assert_eq!(
        pair.status(),
        (&Status::Stalled("credit"), &Status::Stalled("frames"))
    );
    let (sent_chunks, sent_bytes) = pair.client().session.sent();
    assert_eq!(pair.client().session.acked(), (0, 0));
    assert_eq!(sent_chunks, 2);
    assert!(sent_bytes <= CREDIT);
    assert!(pair.unread_by_server() as u64 <= CREDIT + 2 * 64 * 1024);
    // Before any answer: two queries out, then the sender waits for an answer.
    let pair = make(2);
    assert_eq!(pair.status().0, &Status::Stalled("answer"));
    assert_eq!(pair.client().session.sent(), (0, 0));
}

// ---- Control stream

fn manifest() -> Vec<u8> {
    chunks(1, 2500).remove(0)
}

fn control() -> Pair<ControlClient, ControlServer> {
    Pair::new(
        ControlClient::new(manifest(), 1000),
        ControlServer::new(1 << 20),
    )
}

/// A manifest is committed whole or not at all.
fn check_control(pair: &Pair<ControlClient, ControlServer>) {
    if let Some(committed) = &pair.server().committed {
        assert_eq!(committed, &manifest(), "a partial manifest was committed");
    }
    if pair.client().committed {
        assert!(pair.server().committed.is_some());
    }
}

#[test]
fn a_clean_control_exchange_commits_the_whole_manifest() {
    let pair = control().drive();
    assert_eq!(pair.status(), (&Status::Done, &Status::Done));
    assert_eq!(pair.server().committed.as_deref(), Some(&manifest()[..]));
}

#[test]
fn a_lost_duplicated_or_reordered_manifest_part_is_refused() {
    for (nth, f) in [(1, Fault::Drop), (0, Fault::Duplicate), (0, Fault::Reorder)] {
        let pair = control()
            .inject(fault(Who::Client, MANIFEST_PART, nth, f))
            .drive();
        assert_eq!(
            pair.status(),
            (
                &failed(Failure::Peer(ErrorCode::Protocol)),
                &failed(Failure::Session(Rule::ManifestOrder))
            ),
            "{f:?}"
        );
        assert_eq!(pair.server().committed, None);
    }
}

#[test]
fn a_commit_after_a_lost_last_part_is_refused_as_incomplete() {
    let pair = control()
        .inject(fault(Who::Client, MANIFEST_PART, 2, Fault::Drop))
        .drive();
    assert_eq!(
        pair.status().1,
        &failed(Failure::Session(Rule::ManifestIncomplete))
    );
    assert_eq!(pair.server().committed, None);
}

#[test]
fn a_damaged_manifest_part_is_caught_by_the_id_check_at_commit() {
    let pair = control()
        .inject(fault(
            Who::Client,
            MANIFEST_PART,
            1,
            Fault::Flip {
                at: 8 + 48 + 3,
                mask: 1,
            },
        ))
        .drive();
    assert_eq!(pair.status().1, &failed(Failure::Corrupt));
    assert_eq!(pair.server().committed, None);
    let pair = control()
        .inject(fault(Who::Client, COMMIT, 0, Fault::Drop))
        .drive();
    assert_eq!(pair.status().0, &Status::Stalled("committed"));
    assert_eq!(pair.server().committed, None);
}

#[test]
fn a_control_stream_cut_anywhere_commits_all_or_nothing() {
    let frames = clean_transcript(&control);
    for k in 0..frames.len() {
        let pair = control().cut_after(k).drive();
        let (client, server) = pair.status();
        assert!(ended(client) && ended(server), "cut after {k}");
        check_control(&pair);
    }
    for (i, &(_, _, len)) in frames.iter().enumerate() {
        let pair = control().cut_inside(i, len / 2).drive();
        assert!(pair.status().0 != &Status::Done, "cut inside {i}");
        check_control(&pair);
    }
}

// ---- Fetch stream

fn fetch() -> Pair<FetchEnd, FetchServer> {
    let payloads = chunks(5, 700);
    let ids = payloads.iter().map(|p| id_of(p)).collect();
    Pair::new(FetchEnd::new(ids, 2), FetchServer::new(&payloads))
}

#[test]
fn a_restore_fetch_refuses_lost_repeated_reordered_and_damaged_chunks() {
    let pair = fetch().drive();
    assert_eq!(pair.status(), (&Status::Done, &Status::Done));
    for (nth, f, expected) in [
        (0, Fault::Drop, Failure::Session(Rule::ChunkOrder)),
        (3, Fault::Duplicate, Failure::Session(Rule::ChunkOrder)),
        (1, Fault::Reorder, Failure::Session(Rule::ChunkOrder)),
        (
            2,
            Fault::Flip {
                at: 8 + 37 + 9,
                mask: 2,
            },
            Failure::Corrupt,
        ),
    ] {
        let pair = fetch().inject(fault(Who::Server, CHUNK, nth, f)).drive();
        assert_eq!(pair.status(), (&failed(expected), &Status::Done), "{f:?}");
        // Only chunks that passed their check were handed on, in order.
        let all: Vec<_> = chunks(5, 700).iter().map(|p| id_of(p)).collect();
        assert_eq!(pair.client().received, all[..pair.client().received.len()]);
    }
}

#[test]
fn a_fetch_cut_anywhere_hands_on_only_checked_chunks_in_order() {
    let frames = clean_transcript(&fetch);
    let all: Vec<_> = chunks(5, 700).iter().map(|p| id_of(p)).collect();
    for k in 0..frames.len() {
        let pair = fetch().cut_after(k).drive();
        assert!(
            ended(pair.status().0) && ended(pair.status().1),
            "cut after {k}"
        );
        let received = &pair.client().received;
        assert_eq!(received[..], all[..received.len()]);
    }
}

// ---- Any single fault

fn any_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Drop),
        Just(Fault::Duplicate),
        Just(Fault::Reorder),
        (0usize..1100).prop_map(|keep| Fault::Truncate { keep }),
        (0u32..5000).prop_map(|len| Fault::Length { len }),
        (0usize..1100, 1u8..=255).prop_map(|(at, mask)| Fault::Flip { at, mask }),
    ]
}

proptest! {
    /// Whatever single fault hits whichever frame, the pair ends (done, failed or stalled
    /// saying why), never panics, and commits nothing half-way.
    #[test]
    fn any_single_fault_leaves_nothing_half_committed(
        from in prop_oneof![Just(Who::Client), Just(Who::Server)],
        kind in 1u8..=15,
        nth in 0usize..6,
        f in any_fault(),
    ) {
        // A flip beyond the frame would be no fault at all; keep it inside the smallest one.
        let f = match f {
            Fault::Flip { at, mask } => Fault::Flip { at: at % 16, mask },
            f => f,
        };
        let pair = store().inject(fault(from, kind, nth, f)).drive();
        check_store(&pair);
        let (client, server) = pair.status();
        prop_assert!(*client != Status::Running && *server != Status::Running);
        let control = control().inject(fault(from, kind, nth, f)).drive();
        check_control(&control);
    }
}
