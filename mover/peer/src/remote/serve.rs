//! The daemon's peer service: accepts QUIC connections from configured peers and serves their
//! streams: Store (have/want, verified chunks into a pack, acknowledgements once durable),
//! Control (manifest lookup, manifest upload and snapshot commit), Fetch (chunks for a
//! restore) and Bench (`mover bench link`: data counted and dropped, bounded in bytes and time).
//!
//! Every peer frame goes through the bounded decoder and the sans-IO session; a stream that
//! breaks the protocol is answered with an Error frame naming the reason and closed, and the
//! daemon goes on serving everyone else. What a peer can make us hold in memory: per
//! connection the QUIC receive window, per stream one frame (≤ 4 MiB + 37 B; a Store stream
//! a bounded queue of them, see [`super::receive`]) and, on Control streams, one manifest
//! (≤ 1 GiB, grown only as its parts arrive).

use std::sync::Arc;

use bytes::Bytes;
use transport::frame::{ErrorCode, Frame, Purpose, MANIFEST_PART_BYTES_MAX};
use transport::quic::{close, FrameReader, FrameWriter, ReadError};
use transport::session::{negotiate, ManifestAssembly};
use transport::tls::TrustStore;

use super::attempts::Attempts;
use super::failure::Failure;
use crate::peers::LinkRegistry;
use mover_format::constants::{
    BENCH_BYTES_MAX, BENCH_STREAMS_MAX, BENCH_TIME_MAX, MANIFEST_BYTES_MAX, PEER_CONNECTIONS_MAX,
    RECEIVE_UNACKED_BYTES_MAX,
};
use mover_format::error::Error;
use mover_format::manifest;
use mover_format::pack::RECORD_HEADER_BYTES;
use mover_format::{hex, ChunkId};
use mover_store::Store;
use mover_store::{manifest_key, Backend};

/// What every connection of one server shares.
struct Shared {
    /// The newest attempt of each peer job, so an older attempt's streams stop.
    attempts: Attempts,
    /// This process's links: what is served to a peer is paced by the bucket its jobs use.
    links: Arc<LinkRegistry>,
}

/// Accepts peers until `shutdown` resolves, then closes every connection.
pub async fn accept_loop(
    site: Arc<Store>,
    links: Arc<LinkRegistry>,
    endpoint: quinn::Endpoint,
    trust: TrustStore,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PEER_CONNECTIONS_MAX));
    let shared = Arc::new(Shared {
        attempts: Attempts::default(),
        links,
    });
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            () = &mut shutdown => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), limit = PEER_CONNECTIONS_MAX, "refused peer connection: too many connections");
            incoming.refuse();
            continue;
        };
        let (site, trust, shared) = (site.clone(), trust.clone(), shared.clone());
        let open = || (PEER_CONNECTIONS_MAX - slots.available_permits()) as f64;
        mover_metrics::global().set(mover_metrics::names::PEER_CONNECTIONS, &[], open());
        let gauge_slots = slots.clone();
        tokio::spawn(async move {
            connection(site, trust, shared, incoming).await;
            drop(slot);
            let open = (PEER_CONNECTIONS_MAX - gauge_slots.available_permits()) as f64;
            mover_metrics::global().set(mover_metrics::names::PEER_CONNECTIONS, &[], open);
        });
    }
    // Its own code, so a sender tells a stopping daemon (retry later) from a finished one.
    endpoint.close(close::SHUTTING_DOWN.into(), b"daemon shutting down");
    // Draining lets peers learn of the close; a connection that never drains (a peer gone
    // silent, a broken driver) must not keep a stopping daemon from exiting.
    if tokio::time::timeout(CLOSE_DRAIN_MAX, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            limit_s = CLOSE_DRAIN_MAX.as_secs(),
            "peer connections still draining at the limit; stopping anyway"
        );
    }
}

/// How long a stopping daemon waits for its closed peer connections to drain.
const CLOSE_DRAIN_MAX: std::time::Duration = std::time::Duration::from_secs(5);

async fn connection(
    site: Arc<Store>,
    trust: TrustStore,
    shared: Arc<Shared>,
    incoming: quinn::Incoming,
) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "peer connection failed during the handshake");
            return;
        }
    };
    // The TLS verifier already refused unknown certificates; this names the site.
    let Some(peer) =
        transport::quic::peer_fingerprint(&connection).and_then(|fp| trust.site_of(&fp))
    else {
        tracing::error!(%remote, "refused peer: its certificate is no longer trusted");
        connection.close(close::NOT_A_PEER.into(), b"not a configured peer");
        return;
    };
    tracing::info!(%remote, peer = %peer, "peer connected");
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                let (site, peer, shared) = (site.clone(), peer.clone(), shared.clone());
                tokio::spawn(async move { stream(site, peer, &shared, send, recv).await });
            }
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => break,
            Err(e) => {
                tracing::warn!(%remote, peer = %peer, error = %e, "peer connection lost");
                break;
            }
        }
    }
}

async fn stream(
    site: Arc<Store>,
    peer: String,
    shared: &Shared,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut writer = FrameWriter::new(send);
    let reader = FrameReader::new(recv);
    // The reader goes with the stream's service; dropping it (when that fails) stops the
    // peer's side of the stream.
    let outcome = serve_stream(&site, &peer, shared, &mut writer, reader).await;
    match outcome {
        Ok(()) => writer.finish(),
        Err(failure) => {
            tracing::warn!(peer = %peer, code = ?failure.code, reason = %failure.reason, "closed a peer stream");
            let _ = writer
                .send(&Frame::Error {
                    code: failure.code,
                    reason: &failure.reason,
                })
                .await;
            writer.finish();
        }
    }
}

async fn serve_stream(
    site: &Arc<Store>,
    peer: &str,
    shared: &Shared,
    writer: &mut FrameWriter,
    mut reader: FrameReader,
) -> Result<(), Failure> {
    let (version, purpose, tier, job) = match reader.next().await? {
        Frame::Hello {
            version_min,
            version_max,
            purpose,
            site: claimed,
            tier,
            job,
        } => {
            let version = negotiate(version_min, version_max).ok_or_else(|| Failure {
                code: ErrorCode::Refused,
                reason: format!(
                    "no common protocol version: peer speaks {version_min}..={version_max}, we speak {}..={}",
                    transport::frame::VERSION_MIN,
                    transport::frame::VERSION_MAX
                ),
            })?;
            if claimed != peer {
                return Err(Failure {
                    code: ErrorCode::Refused,
                    reason: format!(
                        "hello names site {claimed:?} but the certificate is {peer:?}'s"
                    ),
                });
            }
            (version, purpose, tier.to_string(), job.to_string())
        }
        other => return Err(Failure::protocol(format!("expected Hello, got {other:?}"))),
    };
    let outcome = match purpose {
        Purpose::Store => {
            let hello = super::receive::Hello {
                peer,
                version,
                tier: &tier,
                job: &job,
            };
            return super::receive::store(site.clone(), &shared.attempts, hello, writer, reader)
                .await;
        }
        Purpose::Control => {
            writer.send(&welcome(site, version)).await?;
            control(site, peer, writer, &mut reader, &job).await
        }
        Purpose::Fetch => {
            writer.send(&welcome(site, version)).await?;
            fetch(site, &shared.links, peer, writer, &mut reader).await
        }
        Purpose::Bench => {
            if version < transport::frame::BENCH_VERSION {
                return Err(Failure {
                    code: ErrorCode::Refused,
                    reason: format!(
                        "a bench stream needs protocol version {} (negotiated {version})",
                        transport::frame::BENCH_VERSION
                    ),
                });
            }
            let Some(_slot) = BenchSlot::take() else {
                return Err(Failure {
                    code: ErrorCode::Refused,
                    reason: format!(
                        "{BENCH_STREAMS_MAX} bench streams are already running here; try again once they end"
                    ),
                });
            };
            writer.send(&welcome(site, version)).await?;
            tracing::info!(peer = %peer, "serving a bench stream");
            bench(writer, &mut reader).await
        }
    };
    if let Err(failure) = &outcome {
        reader.stop(failure.code as u32);
    }
    outcome
}

fn welcome(site: &Store, version: u16) -> Frame<'_> {
    Frame::Welcome {
        version,
        site: site.name(),
        unacked_bytes_max: RECEIVE_UNACKED_BYTES_MAX,
    }
}

async fn control(
    site: &Store,
    peer: &str,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
    job: &str,
) -> Result<(), Failure> {
    let mut assembly = ManifestAssembly::new(MANIFEST_BYTES_MAX as u64 + 32);
    loop {
        let frame = match reader.next().await {
            Ok(frame) => frame,
            Err(ReadError::Finished) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match frame {
            Frame::GetManifest { by_source, key } => {
                let found = if by_source {
                    let snapshots = site.index.snapshots()?;
                    snapshots
                        .into_iter()
                        .rev()
                        .find(|s| s.site == peer && s.source.as_bytes() == key)
                } else {
                    let spec = std::str::from_utf8(key)
                        .map_err(|_| Failure::protocol("snapshot spec is not UTF-8"))?;
                    Some(site.index.find_snapshot(spec)?)
                };
                let Some(info) = found else {
                    writer.send(&Frame::NoManifest).await?;
                    continue;
                };
                let id = mover_format::parse_hex32(&info.id).ok_or_else(|| {
                    Error::corrupt(
                        format!("catalog row {}", info.id),
                        "id is not 64 hex digits",
                    )
                })?;
                let object = site.metadata.read_all(&manifest_key(&id))?;
                let total = object.len() as u64;
                for (i, part) in object.chunks(MANIFEST_PART_BYTES_MAX).enumerate() {
                    writer
                        .send(&Frame::ManifestPart {
                            id,
                            total,
                            offset: (i * MANIFEST_PART_BYTES_MAX) as u64,
                            data: part,
                        })
                        .await?;
                }
            }
            ref part @ Frame::ManifestPart { .. } => {
                assembly.add(part).map_err(Failure::protocol)?;
            }
            Frame::Commit { id } => {
                let done = std::mem::replace(
                    &mut assembly,
                    ManifestAssembly::new(MANIFEST_BYTES_MAX as u64 + 32),
                );
                let object = done.finish(&id).map_err(Failure::protocol)?;
                tokio::task::block_in_place(|| commit(site, peer, job, &id, &object))?;
                writer.send(&Frame::Committed { id }).await?;
            }
            other => {
                return Err(Failure::protocol(format!(
                    "unexpected {other:?} on a control stream"
                )))
            }
        }
    }
}

/// Makes a received snapshot visible: manifest checked against its id, every chunk it names
/// present in the index, manifest durable, then the catalog row.
fn commit(site: &Store, peer: &str, job: &str, id: &[u8; 32], object: &[u8]) -> Result<(), Error> {
    let manifest = manifest::decode(object, Some(id))?;
    let tier = if manifest.tier.is_empty() || !site.tiers.contains_key(&manifest.tier) {
        site.config.default_tier().to_string()
    } else {
        manifest.tier.clone()
    };
    let check = site
        .index
        .reader()?
        .catalog_check(id, &manifest, tier, job)?;
    if let Some(first) = check.first_missing {
        return Err(Error::Refused(format!(
            "snapshot {} names {} chunks this site does not hold (first: {first}); nothing was committed",
            hex(id),
            check.missing
        )));
    }
    let key = manifest_key(id);
    if !site.metadata.exists(&key)? {
        site.metadata.put_durable(&key, object)?;
    }
    site.index.put_snapshot(&check.info)?;
    tracing::info!(peer = %peer, job = %job, snapshot = %hex(id), files = check.info.files, bytes = check.info.bytes, "committed a snapshot from a peer");
    Ok(())
}

async fn fetch(
    site: &Store,
    links: &LinkRegistry,
    peer: &str,
    writer: &mut FrameWriter,
    reader: &mut FrameReader,
) -> Result<(), Failure> {
    let mut chunks = site.chunk_reader();
    // What we serve to the peer shares its cap with the jobs shipping to it.
    let bucket = links.bucket(peer);
    let mut spare = RecordBuffers::default();
    loop {
        let frame = match reader.next().await {
            Ok(frame) => frame,
            Err(ReadError::Finished) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Frame::Fetch { ids, .. } = frame else {
            return Err(Failure::protocol(format!(
                "unexpected {frame:?} on a fetch stream"
            )));
        };
        let ids: Vec<[u8; 32]> = ids.iter().collect();
        for id in ids {
            let mut record = spare.take();
            let (header, capacity, record) = tokio::task::block_in_place(|| {
                read_for_peer(&mut chunks, &ChunkId(id), &mut record)
                    .map(|header| (header, record.capacity(), Bytes::from(record)))
            })?;
            // quinn keeps the slice until the peer acknowledges it; the record is reused after.
            let payload = record.slice(RECORD_HEADER_BYTES..);
            spare.keep(record, capacity);
            if let Some(bucket) = &bucket {
                bucket.pace_chunk(payload.len() as u64).await;
            }
            writer
                .send_chunk(&id, header.codec as u8, header.raw_len, payload)
                .await?;
        }
    }
}

/// A record a peer fetches, as stored; a chunk this site does not hold answers `NotFound` (its
/// error's kind), so the peer can look elsewhere, rather than a failure of ours.
fn read_for_peer(
    chunks: &mut mover_store::pack_reader::ChunkReader<'_>,
    id: &ChunkId,
    record: &mut Vec<u8>,
) -> Result<mover_format::pack::RecordHeader, Failure> {
    Ok(chunks.read_stored_into(id, record)?)
}

/// Bench streams running in this process (a daemon serves one site).
static BENCH_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the `BENCH_STREAMS_MAX` places for a running bench stream, given back on drop.
struct BenchSlot;

impl BenchSlot {
    fn take() -> Option<BenchSlot> {
        use std::sync::atomic::Ordering;
        BENCH_STREAMS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < BENCH_STREAMS_MAX).then_some(running + 1)
            })
            .ok()
            .map(|_| BenchSlot)
    }
}

impl Drop for BenchSlot {
    fn drop(&mut self) {
        BENCH_STREAMS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Counts and drops a peer's BenchData until it finishes its side, then answers with the
/// count and the time from the first byte. Nothing is stored; the stream is cut (Refused)
/// beyond `BENCH_BYTES_MAX` or `BENCH_TIME_MAX`, so a peer cannot hold the link or a runtime
/// thread with it for long.
async fn bench(writer: &mut FrameWriter, reader: &mut FrameReader) -> Result<(), Failure> {
    let mut bytes = 0u64;
    let mut first: Option<std::time::Instant> = None;
    let counted = tokio::time::timeout(BENCH_TIME_MAX, async {
        loop {
            match reader.next().await {
                Ok(Frame::BenchData { data }) => {
                    first.get_or_insert_with(std::time::Instant::now);
                    bytes += data.len() as u64;
                    if bytes > BENCH_BYTES_MAX {
                        return Err(Failure {
                            code: ErrorCode::Refused,
                            reason: format!(
                                "bench stream over its bound of {BENCH_BYTES_MAX} bytes"
                            ),
                        });
                    }
                }
                Ok(other) => {
                    return Err(Failure::protocol(format!(
                        "unexpected {} frame on a bench stream",
                        other.name()
                    )))
                }
                Err(ReadError::Finished) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    })
    .await;
    match counted {
        Ok(outcome) => outcome?,
        Err(_) => {
            return Err(Failure {
                code: ErrorCode::Refused,
                reason: format!(
                    "bench stream over its time bound of {} s",
                    BENCH_TIME_MAX.as_secs()
                ),
            })
        }
    }
    let micros = first.map_or(0, |first| first.elapsed().as_micros() as u64);
    writer.send(&Frame::BenchReceived { bytes, micros }).await?;
    Ok(())
}

/// Records sent on a Fetch stream, kept for reuse once quinn lets go of them, so the hot path
/// reads into memory already faulted in instead of a fresh allocation per chunk.
#[derive(Default)]
struct RecordBuffers {
    /// Each record with the capacity of the allocation behind it.
    sent: std::collections::VecDeque<(Bytes, usize)>,
    /// Capacity behind `sent`: what keeping them may hold beyond what quinn holds anyway.
    bytes: usize,
}

impl RecordBuffers {
    /// Sent records kept (by size); beyond this the oldest are dropped, freed once quinn
    /// lets go of them. A few maximum-size chunks: enough to cycle at loopback's pace.
    const KEPT_BYTES_MAX: usize = 16 << 20;

    fn take(&mut self) -> Vec<u8> {
        if self
            .sent
            .front()
            .is_some_and(|(oldest, _)| oldest.is_unique())
        {
            let (oldest, capacity) = self.sent.pop_front().expect("checked");
            self.bytes -= capacity;
            if let Ok(buffer) = oldest.try_into_mut() {
                return buffer.into();
            }
        }
        Vec::new()
    }

    /// Keeps `record`, sent from an allocation of `capacity` bytes.
    fn keep(&mut self, record: Bytes, capacity: usize) {
        self.bytes += capacity;
        self.sent.push_back((record, capacity));
        while self.bytes > Self::KEPT_BYTES_MAX {
            let (_, capacity) = self.sent.pop_front().expect("bytes > 0: something is kept");
            self.bytes -= capacity;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_this_site_does_not_hold_answers_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let index = mover_store::Index::open(&dir.path().join("index.redb")).unwrap();
        let tiers = std::collections::HashMap::new();
        let mut chunks = mover_store::pack_reader::ChunkReader::new(&index, &tiers);
        let id = ChunkId([7; 32]);
        let failure = read_for_peer(&mut chunks, &id, &mut Vec::new()).unwrap_err();
        assert_eq!(failure.code, ErrorCode::NotFound, "{}", failure.reason);
        assert!(
            failure.reason.contains(&id.to_string()),
            "{}",
            failure.reason
        );
    }

    #[test]
    fn errors_answer_peers_by_kind() {
        let code = |e: Error| Failure::from(e).code;
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(code(Error::io("append", "/p", enospc)), ErrorCode::NoSpace);
        assert_eq!(code(Error::corrupt("pack 1", "bad")), ErrorCode::Corrupt);
        assert_eq!(code(Error::Refused("x".into())), ErrorCode::Refused);
        assert_eq!(code(Error::NotFound("x".into())), ErrorCode::NotFound);
        assert_eq!(code(Error::Resource("x".into())), ErrorCode::Internal);
    }

    #[test]
    fn a_record_is_reused_only_once_nothing_else_holds_it() {
        let mut buffers = RecordBuffers::default();
        let record = Bytes::from(vec![7u8; 1000]);
        let at = record.as_ptr();
        let held_by_quinn = record.slice(RECORD_HEADER_BYTES..);
        buffers.keep(record, 1000);
        assert!(buffers.take().is_empty(), "still sent: a fresh buffer");
        drop(held_by_quinn);
        let reused = buffers.take();
        assert_eq!((reused.as_ptr(), reused.len()), (at, 1000));
        let record_bytes = RecordBuffers::KEPT_BYTES_MAX / 3;
        for _ in 0..10 {
            // Small records in large allocations count by the allocation.
            buffers.keep(Bytes::from(vec![0u8; 8]), record_bytes);
        }
        assert_eq!(buffers.sent.len(), 3);
        assert_eq!(buffers.bytes, 3 * record_bytes);
    }
}
