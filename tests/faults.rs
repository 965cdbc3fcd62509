//! The fault suite (issue 12): the real binary, under `mpirun` where it runs ranks, given the
//! faults a hostile user or a broken machine produces. Every case ends within a bound (each
//! command runs under `timeout`), with the exit code docs/failure-behaviour.md documents:
//! 2 for bad input, 1 for a runtime failure, never 101/134/139, never a hang, never a destroyed
//! input or device node, and no report that claims a success that did not happen.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{read_report as report, tmpdir, BIN};

/// Longest any single command of this suite may take before `timeout` kills it (a hang fails).
const BOUND_S: u64 = 120;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
    seconds: f64,
}

impl Out {
    /// A documented exit code, never a crash, a panic or a kill by `timeout`.
    fn assert_code(&self, want: i32, what: &str) {
        assert_ne!(self.code, 124, "{what}: hung (killed by timeout); stderr:\n{}", self.stderr);
        assert_eq!(self.code, want, "{what}: stderr:\n{}\nstdout:\n{}", self.stderr, self.stdout);
        assert!(!self.stderr.contains("panicked"), "{what}: {}", self.stderr);
    }
}

/// `timeout BOUND_S cmd args`.
fn bounded(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let start = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "5", &BOUND_S.to_string(), cmd])
        .args(args)
        .envs(env.iter().copied())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .expect("timeout(1) and the binary must run");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn plan(args: &[&str]) -> Out {
    bounded(BIN, &[&["plan"], args].concat(), &[])
}

/// `mpirun -n ranks eplb-worker run ARGS`.
fn mpirun<A: AsRef<str>>(ranks: usize, args: &[A]) -> Out {
    let n = ranks.to_string();
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    bounded("mpirun", &[&["-n", &n, "--oversubscribe", BIN, "run"], &args[..]].concat(), &[])
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A 2-layer load of 4 experts.
fn small_load(dir: &Path) -> PathBuf {
    let p = dir.join("load.csv");
    std::fs::write(&p, "90,132,40,61\n20,107,104,64\n").unwrap();
    p
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(st.success());
}

// ------------------------------------------------------------------ outputs never destroy

#[test]
fn plan_refuses_an_output_that_is_its_input() {
    let d = tmpdir("same");
    let load = small_load(&d);
    let before = std::fs::read(&load).unwrap();
    let link = d.join("link.csv");
    std::os::unix::fs::symlink(&load, &link).unwrap();
    for out in [&load, &link] {
        let r = plan(&["--load", &s(&load), "--num-replicas", "4", "--num-gpus", "2", "--output", &s(out)]);
        r.assert_code(2, "output = load");
        assert!(r.stderr.contains("is the same file as --load"), "{}", r.stderr);
        assert_eq!(std::fs::read(&load).unwrap(), before, "the input is untouched");
    }
    // --previous too, and two outputs on one path.
    let p = d.join("p.json");
    plan(&["--load", &s(&load), "--num-replicas", "4", "--num-gpus", "2", "--output", &s(&p)]).assert_code(0, "plan");
    let prev = std::fs::read(&p).unwrap();
    let r = plan(&[
        "--load",
        &s(&load),
        "--num-replicas",
        "4",
        "--num-gpus",
        "2",
        "--previous",
        &s(&p),
        "--output",
        &s(&p),
    ]);
    r.assert_code(2, "output = previous");
    assert_eq!(std::fs::read(&p).unwrap(), prev);
    let q = d.join("q.json");
    let r = plan(&[
        "--load",
        &s(&load),
        "--num-replicas",
        "4",
        "--num-gpus",
        "2",
        "--output",
        &s(&q),
        "--sglang-output",
        &s(&q),
    ]);
    r.assert_code(2, "two outputs on one path");
}

#[test]
fn plan_writes_into_devices_fifos_and_through_symlinks() {
    let d = tmpdir("special");
    let load = small_load(&d);
    let base = ["--load", &s(&load), "--num-replicas", "4", "--num-gpus", "2", "--output"];
    // /dev/null stays a character device.
    plan(&[&base[..], &["/dev/null"]].concat()).assert_code(0, "/dev/null");
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // A symlink: its target gets the placement, the link stays a link.
    let target = d.join("target.json");
    std::fs::write(&target, "old").unwrap();
    let link = d.join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    plan(&[&base[..], &[&s(&link)]].concat()).assert_code(0, "symlink");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(report(&target)["physical_to_logical_map"].is_array());
    // A FIFO with a reader gets the placement and stays a FIFO.
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let reader = Command::new("timeout").args(["60", "cat"]).arg(&fifo).stdout(Stdio::piped()).spawn().unwrap();
    plan(&[&base[..], &[&s(&fifo)]].concat()).assert_code(0, "fifo");
    let got = reader.wait_with_output().unwrap();
    let doc: Value = serde_json::from_slice(&got.stdout).unwrap();
    assert!(doc["physical_to_logical_map"].is_array());
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn unwritable_outputs_are_refused_before_any_work() {
    let d = tmpdir("unwritable");
    let load = small_load(&d);
    let base = ["--load", &s(&load), "--num-replicas", "4", "--num-gpus", "2", "--output"];
    for (out, want) in [
        (s(&d), "is a folder"),
        ("/proc/eplb-placement.json".to_string(), "cannot be written"),
        (s(&d.join("missing/dir/p.json")), "cannot be written"),
    ] {
        let r = plan(&[&base[..], &[&out]].concat());
        r.assert_code(2, &out);
        assert!(r.stderr.contains(want), "{out}: {}", r.stderr);
        assert!(!r.stderr.contains("# eplb plan"), "no work was done: {}", r.stderr);
    }
}

// ------------------------------------------------------------------ strict inputs, sizes

#[test]
fn bad_inputs_and_absurd_sizes_exit_2_at_once() {
    let d = tmpdir("inputs");
    let load = small_load(&d);
    let placement = d.join("placement.json");
    plan(&["--load", &s(&load), "--num-replicas", "4", "--num-gpus", "2", "--output", &s(&placement)])
        .assert_code(0, "plan");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        s(&p)
    };
    let hex = write("hex.csv", "0x10,2,3,4\n4,5,6,7\n");
    let letter = write("letter.csv", "1O,2,3,4\n4,5,6,7\n");
    let pandas = write("pandas.csv", ",e0,e1,e2,e3\n0,1,2,3,4\n1,5,6,7,8\n");
    let dup = write("dup.json", r#"{"counts": [[1, 2, 3, 4]], "counts": [[5, 6, 7, 8]]}"#);
    let out = s(&d.join("out.json"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--load".into(), s(&placement)], "is a placement file"),
        (vec!["--load".into(), hex], "\"0x10\" is not a number"),
        (vec!["--load".into(), letter], "\"1O\" is not a number"),
        (vec!["--load".into(), pandas], "index=False"),
        (vec!["--load".into(), dup], "appears twice"),
        (vec!["--load".into(), s(&load), "--move-cost".into(), "inf".into()], "not a finite number"),
        (vec!["--load".into(), s(&load), "--move-cost".into(), "nan".into()], "not a finite number"),
        (vec!["--load".into(), s(&load), "--move-cost=-0.5".into()], "negative"),
    ];
    for (args, want) in cases {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["--num-replicas", "4", "--num-gpus", "2", "--output", &out]);
        let r = plan(&a);
        r.assert_code(2, &format!("{args:?}"));
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
    for replicas in ["18446744073709551615", "1000000000", "1000000"] {
        let r = plan(&["--synthetic", "2x4", "--num-replicas", replicas, "--num-gpus", "4", "--output", &out]);
        r.assert_code(2, replicas);
        assert!(r.seconds < 30.0, "{replicas}: refused at once, not after minutes of work");
    }
    let r = plan(&[
        "--synthetic",
        "2x4",
        "--num-replicas",
        "8",
        "--num-gpus",
        "4",
        "--iteration",
        "100000000000",
        "--output",
        &out,
    ]);
    r.assert_code(2, "a synthetic load of 1e11 steps");
    assert!(r.stderr.contains("host memory"), "{}", r.stderr);
    assert!(!Path::new(&out).exists(), "nothing written");
}

#[test]
fn run_refuses_absurd_sizes_and_bad_float_flags() {
    for (args, want) in [
        (vec!["--expert-bytes", "1000000000000"], "host memory"),
        (vec!["--move-cost", "nan"], "not a finite number"),
        (vec!["--nccl-group-mib", "inf"], "not a finite number"),
        (vec!["--timeout", "0"], "greater than 0"),
        (vec!["--timeout", "1e300"], "longer than a week"),
        (vec!["--step-ms", "1e300"], "longer than a week"),
    ] {
        let r = mpirun(2, &args);
        r.assert_code(2, &format!("{args:?}"));
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn simulate_refuses_absurd_sizes_at_once() {
    let d = tmpdir("simulate-sizes");
    let trace = d.join("trace.json");
    std::fs::write(&trace, "[[[1, 2, 3, 4]], [[4, 3, 2, 1]]]").unwrap();
    for redundant in ["100000000000", "18446744073709551615"] {
        let r = bounded(
            BIN,
            &["simulate", "--trace", &s(&trace), "--num-gpus", "2", "--num-redundant-experts", redundant],
            &[],
        );
        r.assert_code(2, redundant);
        assert!(r.stderr.contains("slots a layer is not supported"), "{redundant}: {}", r.stderr);
    }
}

// ------------------------------------------------------------------ run: reports and outputs

#[test]
fn run_report_checks_happen_before_the_run_and_never_destroy() {
    let d = tmpdir("run-report");
    let trace = small_load(&d);
    let before = std::fs::read(&trace).unwrap();
    let t = s(&trace);
    for (report_path, want) in [
        (s(&d), "is a folder"),
        ("/proc/eplb-report.json".to_string(), "cannot be written"),
        (t.clone(), "is the same file as --trace"),
    ] {
        let r = mpirun(2, &["--trace", &t, "--steps", "5", "--report", &report_path]);
        r.assert_code(2, &report_path);
        assert!(r.stderr.contains(want), "{report_path}: {}", r.stderr);
        assert!(r.seconds < 60.0);
    }
    assert_eq!(std::fs::read(&trace).unwrap(), before, "the trace is untouched");
    // /dev/null as the report: the run succeeds and /dev/null stays a device.
    mpirun(2, &["--steps", "5", "--expert-bytes", "8192", "--report", "/dev/null"]).assert_code(0, "/dev/null");
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
}

#[test]
fn an_old_success_report_never_stands_for_a_failed_run() {
    let d = tmpdir("stale");
    let path = d.join("report.json");
    std::fs::write(&path, r#"{"status": "ok", "steps": 100, "error": null}"#).unwrap();
    let args = ["--eplb-update-interval-steps", "5", "--fault", "corrupt-load-on-rank=1", "--report", &s(&path)];
    mpirun(2, &args).assert_code(1, "plans differ");
    let doc = report(&path);
    assert_eq!(doc["status"], "failed", "{doc}");
    assert!(doc["error"].as_str().unwrap().contains("different plans"), "{doc}");
    // Only measured figures: balancedness is a mean over the steps it was measured on.
    for key in ["balancedness_static", "balancedness_live"] {
        let b = doc[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&b), "{key} {b}");
    }
    // A successful run says ok.
    mpirun(2, &["--steps", "5", "--expert-bytes", "8192", "--report", &s(&path)]).assert_code(0, "ok run");
    assert_eq!(report(&path)["status"], "ok");
}

// ------------------------------------------------------------------ settings agreement

#[test]
fn ranks_with_different_settings_stop_before_anything_moves() {
    let d = tmpdir("mpmd");
    let path = d.join("report.json");
    let common = ["--steps", "20", "--eplb-update-interval-steps", "5", "--expert-bytes", "8192"];
    let mut args: Vec<&str> = vec!["-n", "2", "--oversubscribe", BIN, "run", "--num-experts", "64", "--report"];
    let p = s(&path);
    args.push(&p);
    args.extend(common);
    args.extend([":", "-n", "2", BIN, "run", "--num-experts", "32", "--eplb-layers-per-step", "2"]);
    args.extend(common);
    let r = bounded("mpirun", &args, &[]);
    r.assert_code(2, "MPMD with different settings");
    assert!(r.stderr.contains("--num-experts differs: rank 0 has 64, rank 2 has 32"), "{}", r.stderr);
    assert!(r.stderr.contains("--eplb-layers-per-step differs: rank 0 has 1, rank 2 has 2"), "{}", r.stderr);
    let doc = report(&path);
    assert_eq!(doc["status"], "failed");
    assert!(doc["error"].as_str().unwrap().contains("--num-experts differs"), "{doc}");
    assert!(!r.stdout.contains("round 1"), "nothing moved: {}", r.stdout);
}

// ------------------------------------------------------------------ a rank stopped or killed

/// Spawns `cmd` with its stdout and stderr piped, and reads its stderr to the end on a thread of
/// its own (a full pipe never blocks the child while the caller reads its stdout).
fn spawn_piped(cmd: &mut Command) -> (Child, JoinHandle<String>) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stderr.read_to_end(&mut bytes).ok();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    (child, err_reader)
}

/// Starts `mpirun -n ranks eplb-worker run ARGS`, reads rank 0's `# Using devices` block for the
/// pid of `victim`, sends it `signal` once `wait_line` has been printed, and waits for the end.
fn run_and_signal<A: AsRef<OsStr>>(ranks: usize, args: &[A], victim: usize, signal: &str) -> (Out, u32) {
    let start = Instant::now();
    let (mut child, err_reader) = spawn_piped(common::mpirun_bounded(BOUND_S, ranks).args([BIN, "run"]).args(args));
    let mut stdout = String::new();
    let mut pid = 0u32;
    let mut signalled = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        stdout.push_str(&line);
        stdout.push('\n');
        // "#  Rank   2 Node  0 Local  2 Pid    8178 on ..."
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() > 8 && words[1] == "Rank" && words[2] == victim.to_string() && words[7] == "Pid" {
            pid = words[8].parse().unwrap();
        }
        if !signalled && pid != 0 && line.starts_with("# round 1") {
            // The run is under way (a rebalance started): the fault hits during the run.
            let st = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
            assert!(st.success());
            signalled = true;
        }
    }
    let status = child.wait().unwrap();
    assert!(signalled, "never saw the round to signal at:\n{stdout}");
    let out = Out {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr: err_reader.join().unwrap(),
        seconds: start.elapsed().as_secs_f64(),
    };
    (out, pid)
}

fn gone(pid: u32) -> bool {
    // A zombie or nothing: /proc/PID/stat state Z, or no such entry.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
}

/// `--timeout` of the cases where a rank stops answering, seconds: short, so that they end soon.
const TIMEOUT_S: u64 = 3;

/// `args`, then `--report` into a fresh folder `name`; and that report's path.
fn with_report(name: &str, args: &[&str]) -> (Vec<String>, PathBuf) {
    let path = tmpdir(name).join("report.json");
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--report".to_string(), s(&path)]);
    (all, path)
}

/// The flags of a case where a rank stops answering: `args`, then `--timeout` [`TIMEOUT_S`] and
/// `--report` into a fresh folder `name`; and that report's path.
fn timeout_case(name: &str, args: &[&str]) -> (Vec<String>, PathBuf) {
    with_report(name, &[args, &["--timeout", &TIMEOUT_S.to_string()]].concat())
}

/// The job ended nonzero within `--timeout` ([`TIMEOUT_S`]) + 30 s (and 10 s of slack), named
/// `silent` as the rank that did not answer, and its report says failed. Returns the report.
fn assert_timed_out(r: &Out, silent: usize, report_path: &Path) -> Value {
    assert_ne!(r.code, 124, "hung:\n{}", r.stderr);
    assert_ne!(r.code, 0);
    assert!(r.seconds < TIMEOUT_S as f64 + 30.0 + 10.0, "took {} s", r.seconds);
    assert!(r.stderr.contains(&format!("rank(s) {silent} did not answer")), "{}", r.stderr);
    let doc = report(report_path);
    assert_eq!(doc["status"], "failed", "{doc}");
    doc
}

#[test]
fn a_stopped_rank_ends_the_job_within_the_timeout() {
    let args = ["--steps", "100000000", "--eplb-update-interval-steps", "20", "--expert-bytes", "8192"];
    let (args, path) = timeout_case("sigstop", &args);
    let (r, pid) = run_and_signal(4, &args, 2, "-STOP");
    let doc = assert_timed_out(&r, 2, &path);
    assert!(doc["error"].as_str().unwrap().contains("rank(s) 2 did not answer"), "{doc}");
    std::thread::sleep(Duration::from_secs(1));
    if !gone(pid) {
        // Never leave a stopped process behind, even if the launcher did.
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        panic!("the stopped rank {pid} was left behind");
    }
}

#[test]
fn a_killed_rank_during_migration_leaves_no_success_and_nothing_half_committed() {
    let d = tmpdir("sigkill");
    let path = d.join("report.json");
    std::fs::write(&path, r#"{"status": "ok"}"#).unwrap();
    // Large experts and every layer at once, so that the kill lands in a migration.
    let args = [
        "--steps",
        "100000000",
        "--eplb-update-interval-steps",
        "20",
        "--eplb-layers-per-step",
        "0",
        "--expert-bytes",
        "1048576",
        "--timeout",
        "5",
        "--report",
        &s(&path),
    ];
    let (r, _) = run_and_signal(4, &args, 1, "-KILL");
    assert_ne!(r.code, 124, "hung:\n{}", r.stderr);
    assert_ne!(r.code, 0);
    let doc = report(&path);
    assert_ne!(doc["status"], "ok", "{doc}");
    // The report written before the run (status "ok") was replaced: it says "running" (rank 0 was
    // ended by the launcher) or "failed" with the error that ended the job, never anything else.
    // A kill is not a corruption: no layer row reports a wrong byte.
    match doc["status"].as_str() {
        Some("running") => {}
        Some("failed") => {
            assert!(doc["error"].as_str().is_some_and(|e| !e.is_empty()), "a failed report names its error: {doc}");
            assert!(doc["layers"].as_array().unwrap().iter().all(|l| l["wrong_bytes"] == 0), "{doc}");
        }
        other => panic!("status {other:?}: {doc}"),
    }
}

// ------------------------------------------------------------------ corrupted transfer

#[test]
fn a_corrupted_transfer_commits_nothing_and_the_live_weights_verify() {
    let flags = ["--eplb-update-interval-steps", "5", "--eplb-layers-per-step", "0", "--expert-bytes", "65536"];
    let (args, path) = with_report("corrupt", &[&flags[..], &["--fault", "corrupt-transfer-on-rank=1"]].concat());
    let r = mpirun(4, &args);
    r.assert_code(1, "corrupted transfer");
    let doc = report(&path);
    assert_eq!(doc["status"], "failed");
    assert!(doc["wrong_bytes"].as_u64().unwrap() > 0);
    assert_eq!((doc["layers_updated"].as_u64(), doc["experts_moved"].as_u64()), (Some(0), Some(0)));
    // After the failed layer every rank re-verified every live slot: all intact.
    let per_run = doc["num_replicas"].as_u64().unwrap() * doc["num_layers"].as_u64().unwrap() * 65536;
    assert_eq!(doc["live_verified_bytes"].as_u64(), Some(per_run), "{doc}");
    assert_eq!(doc["wrong_live_bytes"].as_u64(), Some(0));
}

#[test]
fn a_rank_hung_at_its_migration_ends_the_job_within_the_timeout_with_nothing_committed() {
    let args = ["--eplb-update-interval-steps", "5", "--expert-bytes", "65536", "--fault", "hang-transfer-on-rank=1"];
    let (args, path) = timeout_case("hang", &args);
    let r = mpirun(4, &args);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let doc = assert_timed_out(&r, 1, &path);
    // The hang came at the first migration: no layer was committed anywhere.
    assert_eq!((doc["layers_updated"].as_u64(), doc["experts_moved"].as_u64()), (Some(0), Some(0)), "{doc}");
}

// ------------------------------------------------------------------ a bug: a panic on one rank

#[test]
fn a_panic_on_one_rank_exits_1_and_ends_the_job() {
    let args = ["--eplb-update-interval-steps", "5", "--expert-bytes", "8192", "--fault", "panic-on-rank=1"];
    let (args, path) = with_report("panic", &args);
    let r = mpirun(4, &args);
    assert_ne!(r.code, 124, "hung:\n{}", r.stderr);
    assert_eq!(r.code, 1, "exit 1, never 101 or 134: {}", r.stderr);
    assert!(r.stderr.contains("rank 1: internal error") && r.stderr.contains("panic-on-rank=1"), "{}", r.stderr);
    assert_ne!(report(&path)["status"], "ok");
}
