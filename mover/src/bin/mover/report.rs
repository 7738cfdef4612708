//! Text reports of in-process runs.

pub fn quickstart(r: &mover::quickstart::QuickstartReport) {
    outln!();
    outln!("quickstart report");
    outln!(
        "  data        {} ({} files, {:.0} MB)",
        r.data,
        r.files,
        r.bytes_total as f64 / 1e6
    );
    outln!(
        "  backup      {:.2} GB/s ({:.2} s)",
        r.backup_gb_per_s,
        r.backup_s
    );
    outln!(
        "  dedup       {:.2}x   compression {:.2}x   stored {:.0} MB",
        r.dedup_ratio,
        r.compression_ratio,
        r.bytes_stored as f64 / 1e6
    );
    outln!(
        "  unchanged   re-backup in {:.3} s, {} bytes read",
        r.second_backup_s,
        r.second_backup_bytes_read
    );
    outln!(
        "  restore     {:.2} GB/s ({:.2} s), verified {} chunks, identical: {}",
        r.restore_gb_per_s,
        r.restore_s,
        r.verify_chunks,
        r.identical
    );
    outln!(
        "  DR copy     {:.2} GB/s ({:.2} s) to site dr, {:.0} MB on the wire",
        r.dr_backup_gb_per_s,
        r.dr_backup_s,
        r.dr_wire_bytes as f64 / 1e6
    );
    outln!(
        "  DR restore  {:.2} s, {:.0} MB on the wire, verified {} chunks at dr, identical: {}",
        r.dr_restore_s,
        r.dr_restore_wire_bytes as f64 / 1e6,
        r.dr_verify_chunks,
        r.dr_identical
    );
    outln!("  snapshot    {}", r.snapshot);
    outln!("  sites       {} and {}", r.site, r.dr_site);
    outln!();
    outln!("next: mover snapshots --site-dir {}", r.site);
    outln!(
        "      mover daemon --config {}/mover.toml   (then backup --to dr, restore --from dr)",
        r.dr_site
    );
}

pub fn snapshots_value(list: &serde_json::Value) {
    let snapshots = list.as_array().cloned().unwrap_or_default();
    if snapshots.is_empty() {
        outln!("no snapshots");
        return;
    }
    outln!(
        "{:<12}  {:<20}  {:<5}  {:>8}  {:>12}  source",
        "id",
        "time",
        "tier",
        "files",
        "bytes"
    );
    for s in &snapshots {
        let id = s["id"].as_str().unwrap_or("");
        outln!(
            "{:<12}  {:<20}  {:<5}  {:>8}  {:>12}  {}",
            &id[..12.min(id.len())],
            s["time"].as_str().unwrap_or(""),
            s["tier"].as_str().unwrap_or(""),
            s["files"].as_u64().unwrap_or(0),
            s["bytes"].as_u64().unwrap_or(0),
            s["source"].as_str().unwrap_or("")
        );
    }
}

pub fn sites(list: &serde_json::Value) {
    for s in list.as_array().cloned().unwrap_or_default() {
        let local = s["local"].as_bool().unwrap_or(false);
        outln!(
            "{:<16} {:<6} {:<24} {}",
            s["site"].as_str().unwrap_or(""),
            if local { "local" } else { "peer" },
            s[if local { "listen" } else { "address" }]
                .as_str()
                .unwrap_or("-"),
            s["fingerprint"].as_str().unwrap_or("")
        );
    }
}

/// `mover audit [--verify]`: shows the log, or checks its hash chain (exit 3 if broken).
pub fn audit(
    log: &std::path::Path,
    verify: bool,
    last: Option<usize>,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    if verify {
        let result = mover::audit::verify(log)?;
        if json {
            crate::print_json(&result);
        } else {
            for problem in &result.problems {
                outln!("{}: {problem}", log.display());
            }
            outln!(
                "{}: {} entries, {}",
                log.display(),
                result.entries,
                if result.intact { "intact" } else { "TAMPERED" }
            );
        }
        if !result.intact {
            errln!(
                "mover: audit log {} was edited, cut or added to: {}",
                log.display(),
                result.problems.first().map(String::as_str).unwrap_or("")
            );
            return Ok(ExitCode::from(crate::exit::DAMAGE));
        }
    } else {
        let entries = mover::audit::read(log, last)?;
        if json {
            crate::print_json(&entries);
        } else {
            for e in &entries {
                outln!(
                    "{:>6} {} uid={} pid={} {} {} {}",
                    e.seq,
                    e.time,
                    e.uid,
                    e.pid,
                    e.action,
                    e.target,
                    e.result
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `mover bench` as a table: each figure, what bounds it, and how close it comes.
pub fn bench(r: &mover::node_bench::Report) {
    let m = &r.machine;
    outln!(
        "bench {}: {} cores, {}, kernel {}; GB/s = 1e9 B/s",
        r.bench,
        m.cores,
        m.cpu_model,
        m.kernel
    );
    outln!();
    outln!(
        "{:<14} {:<34} {:>8} {:>8}  {}",
        "input",
        "measured",
        "GB/s",
        "of limit",
        "limit"
    );
    for row in &r.rows {
        let share = match row.limit_gb_per_s {
            Some(limit) if limit > 0.0 => format!("{:.0}%", 100.0 * row.gb_per_s / limit),
            _ => String::new(),
        };
        let limit = match (&row.limit, row.limit_gb_per_s) {
            (Some(name), Some(rate)) => format!("{name} {rate:.3} GB/s"),
            _ => String::new(),
        };
        let input: String = row.input.chars().take(14).collect();
        outln!(
            "{:<14} {:<34} {:>8.3} {:>8}  {}",
            input,
            row.name,
            row.gb_per_s,
            share,
            limit
        );
    }
    let notes: Vec<_> = r.rows.iter().filter(|row| row.note.is_some()).collect();
    if !notes.is_empty() {
        outln!();
        for row in notes {
            outln!(
                "  {} / {}: {}",
                row.input,
                row.name,
                row.note.as_deref().unwrap_or_default()
            );
        }
    }
}
