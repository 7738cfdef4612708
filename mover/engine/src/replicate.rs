//! `mover replicate SNAPSHOT --to SITE[:TIER]`: copies a snapshot of this site to a peer now.
//!
//! The same path as a cross-site backup minus the reading and chunking: the snapshot's chunks
//! are read from the local packs as stored (compressed where that paid, checksum verified),
//! offered to the peer in batches, and only those it lacks cross the link; the peer verifies
//! each against its id. The manifest is committed last, under the same snapshot id, so the
//! copy at the peer is the same snapshot (restore it there by the same id).

use std::collections::HashSet;
use std::time::Instant;

use crate::backup::parse_destination;
use crate::job::{Job, JobControl, JobKind, JobState, Progress};
use crate::site::Site;
use mover_format::error::{Error, Result};
use mover_format::hex;
use mover_format::manifest::EntryKind;
use mover_peer::remote::client::Control;
use mover_peer::remote::ship::Shipper;
use mover_store::Backend;

pub struct ReplicateOptions<'a> {
    /// Snapshot id, unique prefix or `latest` (a `:SUBPATH` is refused: a copy is whole).
    pub spec: &'a str,
    /// `SITE[:TIER]`
    pub to: &'a str,
    pub control: Option<&'a JobControl>,
}

pub fn run(site: &Site, options: &ReplicateOptions) -> Result<Job> {
    let started = Instant::now();
    let control = options.control;
    if options.spec.contains(':') {
        return Err(Error::Refused(format!(
            "replicate {:?}: a replica is a whole snapshot; give its id without :SUBPATH",
            options.spec
        )));
    }
    let info = site.index.find_snapshot(options.spec)?;
    let id = mover_format::parse_hex32(&info.id).ok_or_else(|| {
        Error::corrupt(
            format!("catalog row {}", info.id),
            "id is not 64 hex digits",
        )
    })?;
    let object = site.metadata.read_all(&mover_store::manifest_key(&id))?;
    // Read entry by entry (the id is checked at the end, before anything is shipped).
    let mut manifest = mover_format::manifest_blocks::ManifestStream::open(&object[..], Some(&id))?;
    let (peer, tier) = parse_destination(options.to);
    let link = site.links.link(peer)?;
    let credentials = mover_peer::peers::credentials(site)?;
    let mut job = Job::new(
        JobKind::Replicate,
        site.name(),
        info.source.clone(),
        control,
    );
    job.snapshot = Some(info.id.clone());
    job.destination = Some(link.site.clone());
    job.tier = tier.map(str::to_string);
    job.workers = 1;
    job.direct_io = false;

    // Each chunk once, in manifest order (the order the peer's restore will read them).
    let mut seen = HashSet::new();
    let mut chunks = Vec::new();
    while let Some(entry) = manifest.next_entry()? {
        if let EntryKind::File { size, extents } = &entry.kind {
            job.files += 1;
            job.bytes_total += size;
            for chunk in extents.iter().flat_map(|e| &e.chunks) {
                job.chunks_total += 1;
                if seen.insert(chunk.id) {
                    chunks.push(chunk.id);
                }
            }
        } else if matches!(entry.kind, EntryKind::Directory) {
            job.directories += 1;
        }
    }
    drop(seen);
    control.total(job.bytes_total);
    // The object goes to the peer as stored (either version); it was checked against its
    // id when it was read above.
    let encoded = mover_format::manifest::EncodedManifest { id, bytes: object };

    // The process's endpoint and runtime carry both connections; the shipper's tasks are
    // local to this thread (it reads the packs between sends).
    let net = site.net()?;
    let local = tokio::task::LocalSet::new();
    let job_id = job.id.clone();
    let attempt = JobControl::attempt_of(control);
    let outcome = net.block_on(local.run_until(async {
        let mut reader = site.chunk_reader().preferring(&info.tier);
        let dialed = net.dial(&link, &credentials).await?;
        let mut shipper = Shipper::on(
            dialed,
            &link,
            &credentials,
            tier.unwrap_or(""),
            &job_id,
            attempt,
        )
        .await?;
        let mut read = 0u64;
        let mut reported = 0u64;
        for chunk in &chunks {
            control.check()?;
            let (header, payload) = reader.read_stored(chunk)?;
            read += payload.len() as u64;
            shipper
                .offer(chunk.0, header.codec as u8, header.raw_len, payload)
                .await?;
            let sent = shipper.payload_bytes_sent();
            control.sent(sent - reported);
            reported = sent;
            control.done(header.raw_len as u64);
        }
        let stats = shipper.finish().await?;
        control.sent(stats.payload_bytes_sent - reported);
        let mut commit = Control::open(&net, &link, &credentials, &job_id).await?;
        commit.commit(encoded.id, &encoded.bytes).await?;
        let wire = commit.close().await;
        Ok::<_, Error>((stats, wire, read))
    }));
    job.elapsed_s = started.elapsed().as_secs_f64();
    match outcome {
        Ok((stats, wire, read)) => {
            job.bytes_read = read;
            job.bytes_done = job.bytes_total;
            job.chunks_new = stats.chunks_sent;
            job.bytes_new = stats.raw_bytes_sent;
            job.bytes_sent = stats.payload_bytes_sent;
            job.bytes_reused = stats.raw_bytes_present;
            job.wire_bytes_sent = stats.wire_bytes_sent + wire.0;
            job.wire_bytes_received = stats.wire_bytes_received + wire.1;
            job.state = JobState::Done;
            tracing::info!(snapshot = %hex(&id), peer = %link.site, chunks_sent = stats.chunks_sent, "replicated");
            crate::backup::record_job(site, &job);
            Ok(job)
        }
        Err(e) => Err(crate::backup::record_failure(site, &mut job, e)),
    }
}
