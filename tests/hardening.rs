//! Issue 24, the sidecar's side: the shared-memory region, the inputs that are not plain files
//! and the signals. The test process is the engine: it creates the regions with the engine side
//! of the contract (`eplb::engine::shm::writer`) and then breaks them on purpose (an entry left
//! half written, a garbage step counter, a command never answered, a truncated file, a region of
//! a dead engine, ...), each deterministically, beside a real `mpirun eplb-worker run`. Every
//! process runs under `timeout`: a hang fails the test (exit 124), it never blocks the suite.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eplb::engine::shm::region::{
    engine_state, off, phase, region_path, sidecar_state, Command as Cmd, Layout, Region, Shape,
};
use eplb::engine::shm::writer::EngineRank;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_eplb-worker");
/// Longest any command here may run before `timeout` kills it (a hang fails).
const BOUND_S: &str = "120";

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-hardening-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn region_name(test: &str) -> String {
    format!("h{}-{test}", std::process::id())
}

struct Out {
    code: i32,
    stderr: String,
}

impl Out {
    fn assert(&self, want: i32, says: &[&str]) {
        assert_ne!(self.code, 124, "hung (killed by timeout); stderr:\n{}", self.stderr);
        assert_eq!(self.code, want, "stderr:\n{}", self.stderr);
        for s in says {
            assert!(self.stderr.contains(s), "stderr does not say {s:?}:\n{}", self.stderr);
        }
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
    }
}

/// `timeout BOUND_S mpirun -n ranks eplb-worker run --engine shm:NAME ...`, started.
fn sidecar(ranks: usize, name: &str, report: &Path, extra: &[&str]) -> Child {
    Command::new("timeout")
        .args(["-k", "5", BOUND_S, "mpirun", "-n", &ranks.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("OMPI_MCA_orte_tmpdir_base", tmpdir(&format!("ompi-{name}")))
        .args([BIN, "run", "--engine", &format!("shm:{name}"), "--eplb-update-interval-steps", "4"])
        .arg("--report")
        .arg(report)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("timeout(1) and mpirun must be installed")
}

fn finish(child: Child) -> Out {
    let out = child.wait_with_output().unwrap();
    Out { code: out.status.code().unwrap_or(-1), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

fn assert_failed(path: &Path, says: &str) {
    let r = report(path);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["error"].as_str().unwrap_or("").contains(says), "the report's error does not say {says:?}: {r}");
}

/// Engine rank `rank` of `world`: 2 layers, 4 experts (4 slots on one rank, 3 a rank on more),
/// a ring of 16.
fn engine_rank(name: &str, world: usize, rank: usize) -> EngineRank {
    let _ = std::fs::remove_file(region_path(name, rank));
    // Enough slots for the 4 experts, with redundant ones over 2 ranks.
    let spr = if world == 1 { 4 } else { 3 };
    let layout = Layout::contiguous(
        &Shape {
            num_layers: 2,
            slots_per_rank: spr,
            num_logical: 4,
            world_size: world,
            rank,
            ring_len: 16,
            counts_kind: 0,
        },
        64,
    );
    let p = world * spr;
    let phy2log: Vec<i32> = (0..2 * p).map(|i| ((i % p) % 4) as i32).collect();
    EngineRank::create(name, &layout, &phy2log, |_, e, b| b.fill(e as u8)).unwrap()
}

/// Beats `rank`'s heartbeat (through a mapping of its own) until dropped: an engine that is
/// alive, whatever else it does.
struct Beating {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn beat(path: &Path) -> Beating {
    let region = Region::open(path).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::SeqCst) {
            region.set(off::ENGINE_HEARTBEAT_NS, eplb::engine::shm::region::monotonic_ns());
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    Beating { stop, thread: Some(thread) }
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (bounded) until the sidecar reads `region`'s ring: its heartbeat, beaten by every wait
/// on the engine, is set only once it waits for a step (after the collective start, which fixes
/// the first step it reads at the engine's step then). False if the sidecar ended first.
fn reading(region: &Region, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(100);
    while Instant::now() < deadline {
        if region.get(off::SIDECAR_HEARTBEAT_NS) != 0 {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn counts(region: &Region) -> Vec<u64> {
    vec![5; region.layout.num_layers * region.layout.slots_per_rank]
}

fn cleanup(name: &str, ranks: usize) {
    for r in 0..ranks {
        let _ = std::fs::remove_file(region_path(name, r));
    }
}

// ------------------------------------------------------------------ every wait is bounded

#[test]
fn a_ring_entry_left_half_written_fails_the_rank_within_the_engine_timeout() {
    let name = region_name("odd");
    let report_path = tmpdir("odd").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    let mut child = sidecar(1, &name, &report_path, &["--engine-timeout", "1", "--enable-eplb", "false"]);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    for t in 0..3 {
        engine.record(t, phase::DECODE, &counts(&engine.region), 0);
    }
    // A record that raised half way (as the Python client's did): step 3's entry stays odd.
    let l = &engine.region.layout;
    let seq = engine.region.atomic(l.ring_offset + 3 * l.ring_entry_bytes + off::ENTRY_SEQ);
    seq.fetch_add(1, Ordering::SeqCst);
    engine.region.set(off::ENGINE_STEP, 4);
    let out = finish(child);
    out.assert(1, &["ring entry of step 3", "half written", "engine rank 0"]);
    assert_failed(&report_path, "half written");
    assert_eq!(engine.region.get(off::SIDECAR_STATE), sidecar_state::FAILED, "the region says the sidecar left");
    cleanup(&name, 1);
}

#[test]
fn a_step_counter_beyond_the_ring_is_a_corrupt_region_not_lost_steps() {
    let name = region_name("jump");
    let report_path = tmpdir("jump").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    let mut child = sidecar(1, &name, &report_path, &["--enable-eplb", "false"]);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    for t in 0..3 {
        engine.record(t, phase::DECODE, &counts(&engine.region), 0);
    }
    engine.region.set(off::ENGINE_STEP, 1 << 62);
    let out = finish(child);
    out.assert(1, &["is corrupt", "engine_step says 4611686018427387904"]);
    assert_failed(&report_path, "corrupt");
    assert!(!out.stderr.contains("overwritten before it was read"), "counted as lost steps:\n{}", out.stderr);
    cleanup(&name, 1);
}

#[test]
fn an_engine_that_steps_on_without_answering_a_command_fails_the_run() {
    let name = region_name("noanswer");
    let report_path = tmpdir("noanswer").join("r.json");
    let engines: Vec<EngineRank> = (0..2).map(|r| engine_rank(&name, 2, r)).collect();
    let _beats: Vec<Beating> = engines.iter().map(|e| beat(&e.region.path)).collect();
    let mut child = sidecar(2, &name, &report_path, &["--engine-timeout", "5"]);
    assert!(reading(&engines[0].region, &mut child), "{}", finish(child).stderr);
    assert!(reading(&engines[1].region, &mut child), "{}", finish(child).stderr);
    // It steps (2 ms a step), skewed so that a rebalance is due, and never reads its mailbox,
    // until the sidecar ends (bounded: 20 000 steps).
    let spr = 3;
    for t in 0..20_000u64 {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        for e in &engines {
            e.beat();
            let mut c = vec![1u64; 2 * spr];
            if e.region.layout.rank == 0 {
                c[2] = 1000;
                c[spr + 2] = 1000;
            }
            e.record(t, phase::DECODE, &c, 0);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = finish(child);
    assert_ne!(out.code, 0, "{}", out.stderr);
    out.assert(out.code, &["without answering command"]);
    assert_failed(&report_path, "without answering command");
    cleanup(&name, 2);
}

#[test]
fn a_pending_command_for_a_far_step_does_not_hold_attach() {
    let name = region_name("far");
    let report_path = tmpdir("far").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    let p = engine.region.layout.num_physical();
    let spr = engine.region.layout.slots_per_rank;
    engine.region.post(&Cmd {
        id: 7,
        layer: 0,
        apply_step: 1 << 62,
        epoch: 1,
        new_row: (0..p).map(|i| (i % 4) as i32).collect(),
        copy_mask: vec![false; spr],
    });
    let out = finish(sidecar(1, &name, &report_path, &[]));
    out.assert(1, &["pending for step 4611686018427387904", "far beyond"]);
    assert_failed(&report_path, "far beyond");
    cleanup(&name, 1);
}

// ------------------------------------------------------------------ trust only regions you should

#[test]
fn a_region_writable_by_others_or_owned_by_another_user_is_refused() {
    let name = region_name("mode");
    let report_path = tmpdir("mode").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&engine.region.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = finish(sidecar(1, &name, &report_path, &[]));
    out.assert(2, &["has mode 0666", "writable by the group or others"]);
    std::fs::set_permissions(&engine.region.path, std::fs::Permissions::from_mode(0o000)).unwrap();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // As root the test can give the region to another user (uid 1), as a careless or hostile
        // job on the same host would leave it.
        std::os::unix::fs::chown(&engine.region.path, Some(1), Some(1)).unwrap();
        let out = finish(sidecar(1, &name, &report_path, &[]));
        out.assert(2, &["owned by uid 1"]);
    } else {
        eprintln!("not root: the owner case needs a file of another user; the mode case above ran");
    }
    cleanup(&name, 1);
}

#[test]
fn a_region_with_a_live_sidecar_attached_is_refused_naming_its_pid() {
    let name = region_name("second");
    let report_path = tmpdir("second").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    // This test process stands for the sidecar attached already: alive, and not the new one.
    let me = std::process::id();
    engine.region.set(off::SIDECAR_PID, me as u64);
    engine.region.set(off::SIDECAR_STATE, sidecar_state::ATTACHED);
    let out = finish(sidecar(1, &name, &report_path, &[]));
    out.assert(2, &[&format!("a live sidecar (pid {me}) is attached to it already")]);
    cleanup(&name, 1);
}

#[test]
fn a_region_left_by_a_dead_engine_is_not_attached() {
    let name = region_name("stale");
    let report_path = tmpdir("stale").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    // A pid that has exited (and been reaped).
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    engine.region.write_u64(off::ENGINE_PID, dead as u64);
    engine.region.set(off::ENGINE_STATE, engine_state::FINISHED);
    let out = finish(sidecar(1, &name, &report_path, &["--engine-wait", "2"]));
    out.assert(2, &[&format!("left by engine pid {dead}, which is gone"), "remove it", "cleanup"]);
    cleanup(&name, 1);
}

#[test]
fn a_new_region_replacing_a_stale_one_is_attached() {
    let name = region_name("restart");
    let report_path = tmpdir("restart").join("r.json");
    let old = engine_rank(&name, 1, 0);
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    old.region.write_u64(off::ENGINE_PID, dead as u64);
    old.region.set(off::ENGINE_STATE, engine_state::FINISHED);
    let mut child = sidecar(1, &name, &report_path, &["--engine-wait", "60", "--enable-eplb", "false"]);
    // The new engine's region, published by rename over the stale one.
    let engine = {
        let spr = 4;
        let layout = Layout::contiguous(
            &Shape {
                num_layers: 2,
                slots_per_rank: spr,
                num_logical: 4,
                world_size: 1,
                rank: 0,
                ring_len: 16,
                counts_kind: 0,
            },
            64,
        );
        let phy2log: Vec<i32> = (0..2 * spr).map(|i| ((i % spr) % 4) as i32).collect();
        EngineRank::create(&name, &layout, &phy2log, |_, e, b| b.fill(e as u8)).unwrap()
    };
    let _beat = beat(&engine.region.path);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    assert_ne!(old.region.get(off::SIDECAR_STATE), sidecar_state::ATTACHED, "the stale region was attached");
    for t in 0..5 {
        engine.record(t, phase::DECODE, &counts(&engine.region), 0);
    }
    engine.finish();
    let out = finish(child);
    out.assert(0, &[]);
    assert_eq!(report(&report_path)["status"], "ok");
    cleanup(&name, 1);
}

#[test]
fn a_region_truncated_under_the_sidecar_is_an_error_not_sigbus() {
    let name = region_name("trunc");
    let report_path = tmpdir("trunc").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    let mut child = sidecar(1, &name, &report_path, &["--enable-eplb", "false"]);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    engine.record(0, phase::DECODE, &counts(&engine.region), 0);
    // Only the header is left (the heartbeat, in the header, stays writable here).
    std::fs::OpenOptions::new().write(true).open(&engine.region.path).unwrap().set_len(4096).unwrap();
    let out = finish(child);
    out.assert(1, &["shrank to 4096 bytes"]);
    assert_failed(&report_path, "shrank");
    cleanup(&name, 1);
}

#[test]
fn a_region_of_100000_slots_a_rank_is_bad_input() {
    let name = region_name("huge");
    let report_path = tmpdir("huge").join("r.json");
    let _ = std::fs::remove_file(region_path(&name, 0));
    let layout = Layout::contiguous(
        &Shape {
            num_layers: 1,
            slots_per_rank: 100_000,
            num_logical: 4,
            world_size: 1,
            rank: 0,
            ring_len: 16,
            counts_kind: 0,
        },
        64,
    );
    let phy2log: Vec<i32> = (0..100_000i32).map(|i| i % 4).collect();
    let engine = EngineRank::create(&name, &layout, &phy2log, |_, _, _| {}).unwrap();
    let _beat = beat(&engine.region.path);
    let out = finish(sidecar(1, &name, &report_path, &[]));
    out.assert(2, &["100000", "is not supported"]);
    cleanup(&name, 1);
}

// ------------------------------------------------------------------ signals

#[test]
fn sigterm_leaves_a_failed_report_and_a_region_that_says_the_sidecar_left() {
    let name = region_name("term");
    let report_path = tmpdir("term").join("r.json");
    let engine = engine_rank(&name, 1, 0);
    let _beat = beat(&engine.region.path);
    let mut child = sidecar(1, &name, &report_path, &["--enable-eplb", "false"]);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    engine.record(0, phase::DECODE, &counts(&engine.region), 0);
    let pid = engine.region.get(off::SIDECAR_PID) as i32;
    // SAFETY: signals the sidecar rank this test started (its pid, from the region).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = finish(child);
    out.assert(1, &["interrupted by SIGTERM"]);
    assert_failed(&report_path, "interrupted by SIGTERM");
    assert_eq!(engine.region.get(off::SIDECAR_STATE), sidecar_state::FAILED);
    cleanup(&name, 1);
}

// ------------------------------------------------------------------ inputs that are not files

fn bounded(args: &[&str]) -> Out {
    let out = Command::new("timeout")
        .args(["-k", "5", BOUND_S])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap();
    Out { code: out.status.code().unwrap_or(-1), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

#[test]
fn every_input_that_is_a_fifo_or_a_device_is_refused_at_once() {
    let d = tmpdir("fifo");
    let fifo = |n: &str| {
        let p = d.join(n);
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
        p.display().to_string()
    };
    let (csv, json) = (fifo("load.csv"), fifo("placement.json"));
    let load = d.join("real.csv");
    std::fs::write(&load, "90,132,40,61\n20,107,104,64\n").unwrap();
    let load = load.display().to_string();
    let placement = d.join("out.json").display().to_string();
    let plan =
        bounded(&[BIN, "plan", "--load", &csv, "--num-replicas", "8", "--num-gpus", "2", "--output", &placement]);
    plan.assert(2, &["a FIFO"]);
    // A character device behind a name with a load's extension: read until memory ran out.
    let zero = d.join("zero.csv");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let zero = zero.display().to_string();
    bounded(&[BIN, "plan", "--load", &zero, "--num-replicas", "8", "--num-gpus", "2", "--output", &placement])
        .assert(2, &["a character device"]);
    bounded(&[BIN, "simulate", "--trace", &csv, "--num-gpus", "2"]).assert(2, &["a FIFO"]);
    bounded(&[BIN, "simulate", "--trace", &load, "--num-gpus", "2", "--oracle", &json]).assert(2, &["a FIFO"]);
    bounded(&[BIN, "plot", &json, "--output", &d.join("out").display().to_string()]).assert(2, &["a FIFO"]);
    bounded(&["mpirun", "-n", "1", "--oversubscribe", BIN, "run", "--trace", &csv, "--timeout", "30"])
        .assert(2, &["a FIFO"]);
}

// ------------------------------------------------------------------ bounded work

#[test]
fn simulate_refuses_a_replay_it_cannot_finish_in_reasonable_time() {
    let d = tmpdir("simsize");
    // 40 steps of 4 layers x 64 experts, about the 33 KB of the trace.
    let steps: Vec<Vec<Vec<u64>>> = (0..40u64)
        .map(|s| (0..4u64).map(|l| (0..64u64).map(|e| (s * 7 + l * 13 + e * 31) % 100).collect()).collect())
        .collect();
    let trace = d.join("t.json");
    std::fs::write(&trace, serde_json::json!({ "counts": steps }).to_string()).unwrap();
    let t = trace.display().to_string();
    let out = bounded(&[BIN, "simulate", "--trace", &t, "--num-gpus", "8192"]);
    out.assert(2, &["--num-gpus 8192", "would run for many minutes"]);
    // A size it finishes stays allowed.
    bounded(&[BIN, "simulate", "--trace", &t, "--num-gpus", "16"]).assert(0, &[]);
}

#[test]
fn the_rank_whose_entry_stays_half_written_names_itself_and_the_report_says_failed() {
    let name = region_name("odd2");
    let report_path = tmpdir("odd2").join("r.json");
    let engines: Vec<EngineRank> = (0..2).map(|r| engine_rank(&name, 2, r)).collect();
    let _beats: Vec<Beating> = engines.iter().map(|e| beat(&e.region.path)).collect();
    let mut child = sidecar(2, &name, &report_path, &["--engine-timeout", "1", "--enable-eplb", "false"]);
    for e in &engines {
        assert!(reading(&e.region, &mut child), "{}", finish(child).stderr);
    }
    for t in 0..4 {
        for e in &engines {
            e.record(t, phase::DECODE, &counts(&e.region), 0);
        }
    }
    // Only engine rank 1 leaves step 3 half written; rank 0's sidecar waits for step 4.
    let l = &engines[1].region.layout;
    engines[1].region.atomic(l.ring_offset + 3 * l.ring_entry_bytes + off::ENTRY_SEQ).fetch_add(1, Ordering::SeqCst);
    let out = finish(child);
    assert!(out.code != 0 && out.code != 124, "code {}: {}", out.code, out.stderr);
    assert!(out.stderr.contains("rank 1: error: engine rank 1"), "{}", out.stderr);
    let r = report(&report_path);
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap_or("");
    assert!(error.contains("rank 1: engine rank 1") && error.contains("half written"), "{r}");
    cleanup(&name, 2);
}

#[test]
fn sigint_of_one_rank_stops_every_rank_at_the_same_step_with_a_failed_report() {
    use std::io::{BufRead, BufReader};
    let report_path = tmpdir("sigint").join("r.json");
    let mut child = Command::new("timeout")
        .args(["-k", "5", BOUND_S, "mpirun", "-n", "2", "--oversubscribe", BIN, "run"])
        .args(["--steps", "100000000", "--eplb-update-interval-steps", "20", "--expert-bytes", "8192"])
        .arg("--report")
        .arg(&report_path)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s).ok();
        s
    });
    let (mut pid, mut signalled) = (0i32, false);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        // "#  Rank   1 Node  0 Local  1 Pid    8178 on ..."
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() > 8 && words[1] == "Rank" && words[2] == "1" && words[7] == "Pid" {
            pid = words[8].parse().unwrap();
        }
        if !signalled && pid != 0 && line.starts_with("# round 1") {
            // SAFETY: signals rank 1 of the job this test started.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
            signalled = true;
        }
    }
    let status = child.wait().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(signalled, "never saw a round to signal at: {stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let r = report(&report_path);
    assert_eq!(r["status"], "failed", "{r}");
    assert!(r["error"].as_str().unwrap_or("").contains("rank(s) [1] were interrupted by a signal"), "{r}");
}
