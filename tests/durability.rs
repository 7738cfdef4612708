//! Kill -9 at random moments of a backup: every visible snapshot still verifies, no partial
//! snapshot is ever visible, and the next backup completes (and reuses what was made durable).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

const MIB: usize = 1024 * 1024;
const ROUNDS: usize = 10;

#[test]
fn kill_9_at_random_points_leaves_a_consistent_store() {
    let work = workdir();
    let data = work.path().join("data");
    for i in 0..24 {
        write_random(
            &data.join(format!("f{i:02}.bin")),
            4 * MIB + i * 4099,
            i as u64,
        );
    }
    let site = init_site(work.path(), "a");
    // Small packs so that kills land between pack commits as well as inside them.
    set_engine(&site, "pack_target_bytes = 8388608");

    backup(&site, &data);

    // Each round rewrites a quarter of the files; the first round runs uninterrupted to
    // measure how long such a round takes here, the others are killed somewhere inside it.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut round_time = Duration::ZERO;
    let mut killed = 0;
    for round in 0..=ROUNDS {
        for k in 0..6 {
            let i = (round * 6 + k) % 24;
            write_random(
                &data.join(format!("f{i:02}.bin")),
                4 * MIB + k,
                1000 + (round * 6 + k) as u64,
            );
        }
        if round == 0 {
            let started = Instant::now();
            backup(&site, &data);
            round_time = started.elapsed().max(Duration::from_millis(10));
            continue;
        }
        let mut child = mover()
            .arg("backup")
            .arg(&data)
            .arg("--site-dir")
            .arg(&site)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(round_time.mul_f64(rng.gen_range(0.0..1.0)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            killed += 1;
        }
        child.wait().unwrap();

        let snapshots = run_json(mover().arg("snapshots").arg("--site-dir").arg(&site));
        let report = run_json(mover().arg("verify").arg("--site-dir").arg(&site));
        assert_eq!(
            report["damage"].as_array().unwrap().len(),
            0,
            "round {round}: damage after kill: {report}"
        );
        assert_eq!(
            report["snapshots"].as_array().unwrap().len(),
            snapshots.as_array().unwrap().len()
        );
    }
    eprintln!("killed {killed} of {ROUNDS} backups mid-run");
    assert!(
        killed >= ROUNDS / 3,
        "only {killed} of {ROUNDS} backups were killed mid-run"
    );

    let last = backup(&site, &data);
    let restored = work.path().join("restored");
    restore(&site, &snapshot_id(&last), &restored);
    assert_same_tree(&data, &restored);
    let report = run_json(mover().arg("verify").arg("--site-dir").arg(&site));
    assert_eq!(report["damage"].as_array().unwrap().len(), 0);
}
