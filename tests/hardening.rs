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

/// One test's regions (named after the test and this process) and report path. Made before its
/// regions: removes any left by an earlier run, and removes its `ranks` regions when dropped
/// (passed or failed).
struct Case {
    name: String,
    report: PathBuf,
    ranks: usize,
}

impl Case {
    fn new(test: &str, ranks: usize) -> Case {
        let case = Case { name: format!("h{}-{test}", std::process::id()), report: tmpdir(test).join("r.json"), ranks };
        case.cleanup();
        case
    }

    /// Engine rank `rank` of this case's regions (see [`engine_rank`]).
    fn engine(&self, rank: usize) -> EngineRank {
        engine_rank(&self.name, self.ranks, rank)
    }

    /// Engine rank `rank`, alive: its heartbeat beaten until the [`Beating`] is dropped.
    fn beating(&self, rank: usize) -> (EngineRank, Beating) {
        let engine = self.engine(rank);
        let beating = beat(&engine.region.path);
        (engine, beating)
    }

    /// Every engine rank of the case, alive.
    fn all_beating(&self) -> (Vec<EngineRank>, Vec<Beating>) {
        (0..self.ranks).map(|r| self.beating(r)).unzip()
    }

    /// `timeout BOUND_S mpirun -n ranks eplb-worker run --engine shm:NAME ...` on this case's
    /// regions and report, started.
    fn sidecar(&self, extra: &[&str]) -> Child {
        sidecar(self.ranks, &self.name, &self.report, extra)
    }

    /// The sidecar, run to its end.
    fn run(&self, extra: &[&str]) -> Out {
        finish(self.sidecar(extra))
    }

    /// The sidecar, started and reading the ring of every one of `engines` (the test fails, with
    /// its stderr, if it ended first).
    fn reading<'a>(&self, engines: impl IntoIterator<Item = &'a EngineRank>, extra: &[&str]) -> Child {
        let mut child = self.sidecar(extra);
        for e in engines {
            assert!(reading(&e.region, &mut child), "{}", finish(child).stderr);
        }
        child
    }

    fn cleanup(&self) {
        for r in 0..self.ranks {
            let _ = std::fs::remove_file(region_path(&self.name, r));
        }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Engine rank `rank` of `world`: 2 layers, 4 experts (4 slots on one rank, 3 a rank on more),
/// a ring of 16; published by rename over whatever file has its name.
fn engine_rank(name: &str, world: usize, rank: usize) -> EngineRank {
    // Enough slots for the 4 experts, with redundant ones over 2 ranks.
    let spr = if world == 1 { 4 } else { 3 };
    create_engine(name, 2, spr, world, rank, |_, e, b| b.fill(e as u8))
}

/// Engine rank `rank` of `world` with `num_layers` layers of `slots_per_rank` slots a rank, 4
/// logical experts (physical slot `i` of a layer holds expert `i % 4`), a ring of 16, 64 bytes an
/// expert.
fn create_engine(
    name: &str,
    num_layers: usize,
    slots_per_rank: usize,
    world: usize,
    rank: usize,
    fill: impl Fn(usize, usize, &mut [u8]),
) -> EngineRank {
    let layout = Layout::contiguous(
        &Shape { num_layers, slots_per_rank, num_logical: 4, world_size: world, rank, ring_len: 16, counts_kind: 0 },
        64,
    );
    let p = world * slots_per_rank;
    let phy2log: Vec<i32> = (0..num_layers * p).map(|i| ((i % p) % 4) as i32).collect();
    EngineRank::create(name, &layout, &phy2log, fill).unwrap()
}

/// Steps `steps` of every one of `engines`, step by step: 5 tokens in every slot.
fn record(engines: &[&EngineRank], steps: std::ops::Range<u64>) {
    for t in steps {
        for e in engines {
            e.record(t, phase::DECODE, &counts(&e.region), 0);
        }
    }
}

/// Leaves the ring entry of step `t` odd: a record that raised half way (as the Python client's did).
fn leave_half_written(engine: &EngineRank, t: u64) {
    let l = &engine.region.layout;
    let at = l.ring_offset + (t as usize % l.ring_len) * l.ring_entry_bytes + off::ENTRY_SEQ;
    engine.region.atomic(at).fetch_add(1, Ordering::SeqCst);
}

/// Marks `engine`'s region as left by an engine that finished and has exited (a reaped pid);
/// returns that pid.
fn left_by_a_dead_engine(engine: &EngineRank) -> u32 {
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    engine.region.write_u64(off::ENGINE_PID, dead as u64);
    engine.region.set(off::ENGINE_STATE, engine_state::FINISHED);
    dead
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

// ------------------------------------------------------------------ every wait is bounded

#[test]
fn a_ring_entry_left_half_written_fails_the_rank_within_the_engine_timeout() {
    let case = Case::new("odd", 1);
    let (engine, _beat) = case.beating(0);
    let child = case.reading([&engine], &["--engine-timeout", "1", "--enable-eplb", "false"]);
    record(&[&engine], 0..3);
    // A record that raised half way (as the Python client's did): step 3's entry stays odd.
    leave_half_written(&engine, 3);
    engine.region.set(off::ENGINE_STEP, 4);
    let out = finish(child);
    out.assert(1, &["ring entry of step 3", "half written", "engine rank 0"]);
    assert_failed(&case.report, "half written");
    assert_eq!(engine.region.get(off::SIDECAR_STATE), sidecar_state::FAILED, "the region says the sidecar left");
}

#[test]
fn a_step_counter_beyond_the_ring_is_a_corrupt_region_not_lost_steps() {
    let case = Case::new("jump", 1);
    let (engine, _beat) = case.beating(0);
    let child = case.reading([&engine], &["--enable-eplb", "false"]);
    record(&[&engine], 0..3);
    engine.region.set(off::ENGINE_STEP, 1 << 62);
    let out = finish(child);
    out.assert(1, &["is corrupt", "engine_step says 4611686018427387904"]);
    assert_failed(&case.report, "corrupt");
    assert!(!out.stderr.contains("overwritten before it was read"), "counted as lost steps:\n{}", out.stderr);
}

#[test]
fn an_engine_that_steps_on_without_answering_a_command_fails_the_run() {
    let case = Case::new("noanswer", 2);
    let (engines, _beats) = case.all_beating();
    let mut child = case.reading(&engines, &["--engine-timeout", "5"]);
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
    assert_failed(&case.report, "without answering command");
}

#[test]
fn a_pending_command_for_a_far_step_does_not_hold_attach() {
    let case = Case::new("far", 1);
    let (engine, _beat) = case.beating(0);
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
    let out = case.run(&[]);
    out.assert(1, &["pending for step 4611686018427387904", "far beyond"]);
    assert_failed(&case.report, "far beyond");
}

// ------------------------------------------------------------------ trust only regions you should

#[test]
fn a_region_writable_by_others_or_owned_by_another_user_is_refused() {
    let case = Case::new("mode", 1);
    let (engine, _beat) = case.beating(0);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&engine.region.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    case.run(&[]).assert(2, &["has mode 0666", "writable by the group or others"]);
    std::fs::set_permissions(&engine.region.path, std::fs::Permissions::from_mode(0o000)).unwrap();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // As root the test can give the region to another user (uid 1), as a careless or hostile
        // job on the same host would leave it.
        std::os::unix::fs::chown(&engine.region.path, Some(1), Some(1)).unwrap();
        case.run(&[]).assert(2, &["owned by uid 1"]);
    } else {
        eprintln!("not root: the owner case needs a file of another user; the mode case above ran");
    }
}

#[test]
fn a_region_with_a_live_sidecar_attached_is_refused_naming_its_pid() {
    let case = Case::new("second", 1);
    let (engine, _beat) = case.beating(0);
    // This test process stands for the sidecar attached already: alive, and not the new one.
    let me = std::process::id();
    engine.region.set(off::SIDECAR_PID, me as u64);
    engine.region.set(off::SIDECAR_STATE, sidecar_state::ATTACHED);
    case.run(&[]).assert(2, &[&format!("a live sidecar (pid {me}) is attached to it already")]);
}

#[test]
fn a_region_left_by_a_dead_engine_is_not_attached() {
    let case = Case::new("stale", 1);
    let engine = case.engine(0);
    let dead = left_by_a_dead_engine(&engine);
    let out = case.run(&["--engine-wait", "2"]);
    out.assert(2, &[&format!("left by engine pid {dead}, which is gone"), "remove it", "cleanup"]);
}

#[test]
fn a_new_region_replacing_a_stale_one_is_attached() {
    let case = Case::new("restart", 1);
    let old = case.engine(0);
    left_by_a_dead_engine(&old);
    let mut child = case.sidecar(&["--engine-wait", "60", "--enable-eplb", "false"]);
    // The new engine's region, published by rename over the stale one.
    let (engine, _beat) = case.beating(0);
    assert!(reading(&engine.region, &mut child), "{}", finish(child).stderr);
    assert_ne!(old.region.get(off::SIDECAR_STATE), sidecar_state::ATTACHED, "the stale region was attached");
    record(&[&engine], 0..5);
    engine.finish();
    let out = finish(child);
    out.assert(0, &[]);
    assert_eq!(report(&case.report)["status"], "ok");
}

#[test]
fn a_region_truncated_under_the_sidecar_is_an_error_not_sigbus() {
    let case = Case::new("trunc", 1);
    let (engine, _beat) = case.beating(0);
    let child = case.reading([&engine], &["--enable-eplb", "false"]);
    record(&[&engine], 0..1);
    // Only the header is left (the heartbeat, in the header, stays writable here).
    std::fs::OpenOptions::new().write(true).open(&engine.region.path).unwrap().set_len(4096).unwrap();
    let out = finish(child);
    out.assert(1, &["shrank to 4096 bytes"]);
    assert_failed(&case.report, "shrank");
}

#[test]
fn a_region_of_100000_slots_a_rank_is_bad_input() {
    let case = Case::new("huge", 1);
    let engine = create_engine(&case.name, 1, 100_000, 1, 0, |_, _, _| {});
    let _beat = beat(&engine.region.path);
    case.run(&[]).assert(2, &["100000", "is not supported"]);
}

// ------------------------------------------------------------------ signals

#[test]
fn sigterm_leaves_a_failed_report_and_a_region_that_says_the_sidecar_left() {
    let case = Case::new("term", 1);
    let (engine, _beat) = case.beating(0);
    let child = case.reading([&engine], &["--enable-eplb", "false"]);
    record(&[&engine], 0..1);
    let pid = engine.region.get(off::SIDECAR_PID) as i32;
    // SAFETY: signals the sidecar rank this test started (its pid, from the region).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = finish(child);
    out.assert(1, &["interrupted by SIGTERM"]);
    assert_failed(&case.report, "interrupted by SIGTERM");
    assert_eq!(engine.region.get(off::SIDECAR_STATE), sidecar_state::FAILED);
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
    let case = Case::new("odd2", 2);
    let (engines, _beats) = case.all_beating();
    let child = case.reading(&engines, &["--engine-timeout", "1", "--enable-eplb", "false"]);
    record(&[&engines[0], &engines[1]], 0..4);
    // Only engine rank 1 leaves step 3 half written; rank 0's sidecar waits for step 4.
    leave_half_written(&engines[1], 3);
    let out = finish(child);
    assert!(out.code != 0 && out.code != 124, "code {}: {}", out.code, out.stderr);
    assert!(out.stderr.contains("rank 1: error: engine rank 1"), "{}", out.stderr);
    let r = report(&case.report);
    assert_eq!(r["status"], "failed", "{r}");
    let error = r["error"].as_str().unwrap_or("");
    assert!(error.contains("rank 1: engine rank 1") && error.contains("half written"), "{r}");
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
