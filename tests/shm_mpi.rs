//! `eplb-worker run --engine shm:NAME` end to end on CPU: the fake engine (`eplb-fake-engine`,
//! a lock-step engine that follows docs/engine-contract.md) beside `mpirun -n 4 eplb-worker`.
//! Every process is bounded: a test kills what is still running at its deadline.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-shm-mpi-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A region name unique to this test process and test.
fn region_name(test: &str) -> String {
    format!("t{}-{test}", std::process::id())
}

/// Waits for `child` at most `limit`, then kills it; its exit code (-1 when killed or signalled).
fn wait_bounded(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return -1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drains a pipe on a thread (a full pipe would block the child), giving its text at the end.
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `child` to its end (at most `limit`): exit code, stdout, stderr.
fn finish(mut child: Child, limit: Duration) -> (i32, String, String) {
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let code = wait_bounded(&mut child, limit);
    (code, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

/// The fake engine: 4 ranks, 4 layers of 12 experts in 16 slots, waiting (bounded) for the
/// sidecar to attach before its first step.
fn engine(name: &str, report: &std::path::Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eplb-fake-engine"))
        .args(["--name", name, "--ranks", "4", "--steps", "240", "--step-ms", "4", "--wait-sidecar", "60"])
        .arg("--report")
        .arg(report)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("the fake engine starts")
}

fn sidecar(ranks: usize, name: &str, report: &std::path::Path, extra: &[&str]) -> Child {
    Command::new("mpirun")
        .args(["-n", &ranks.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        // A session directory of its own: mpiruns started at once race on the shared one.
        .env("OMPI_MCA_orte_tmpdir_base", tmpdir(&format!("ompi-{name}")))
        .arg(env!("CARGO_BIN_EXE_eplb-worker"))
        .args(["run", "--engine", &format!("shm:{name}"), "--eplb-update-interval-steps", "10"])
        .args(if extra.contains(&"--engine-wait") { &[][..] } else { &["--engine-wait", "60"][..] })
        .arg("--report")
        .arg(report)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun must be installed (scripts/test.sh installs Open MPI)")
}

/// What one engine + sidecar pair did.
struct Pair {
    engine_code: i32,
    sidecar_code: i32,
    stdout: String,
    stderr: String,
    engine: Option<Value>,
    sidecar: Option<Value>,
}

fn run_pair(test: &str, engine_args: &[&str], sidecar_args: &[&str]) -> Pair {
    run_pair_within(test, engine_args, sidecar_args, Duration::from_secs(60))
}

/// One engine + sidecar pair at a time: 5 processes stepping every few milliseconds each, and
/// several pairs at once on a 2-core machine fall behind their 16-step rings (lost steps) and
/// their step times, which the tests check.
static PAIRS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// [`run_pair`], killing the engine if it has not ended `engine_limit` after the sidecar did.
fn run_pair_within(test: &str, engine_args: &[&str], sidecar_args: &[&str], engine_limit: Duration) -> Pair {
    let _one = PAIRS.lock().unwrap_or_else(|e| e.into_inner());
    let name = region_name(test);
    let d = tmpdir(test);
    let (er, sr) = (d.join("engine.json"), d.join("sidecar.json"));
    let _ = std::fs::remove_file(&er);
    let _ = std::fs::remove_file(&sr);
    let mut e = engine(&name, &er, engine_args);
    let (sidecar_code, stdout, stderr) = finish(sidecar(4, &name, &sr, sidecar_args), Duration::from_secs(120));
    // An engine that stopped itself is killed here; a healthy one finishes on its own.
    let engine_code = wait_bounded(&mut e, engine_limit);
    for r in 0..4 {
        let _ = std::fs::remove_file(format!("/dev/shm/eplb-{name}-{r}"));
    }
    let read = |p: &std::path::Path| std::fs::read_to_string(p).ok().and_then(|t| serde_json::from_str(&t).ok());
    Pair { engine_code, sidecar_code, stdout, stderr, engine: read(&er), sidecar: read(&sr) }
}

impl Pair {
    fn engine(&self) -> &Value {
        self.engine.as_ref().unwrap_or_else(|| panic!("no engine report; sidecar stderr:\n{}", self.stderr))
    }

    fn sidecar(&self) -> &Value {
        self.sidecar.as_ref().unwrap_or_else(|| panic!("no sidecar report; stderr:\n{}", self.stderr))
    }
}

#[test]
fn the_sidecar_balances_the_fake_engine_and_every_rank_switches_at_the_same_step() {
    let p = run_pair("e2e", &[], &[]);
    assert_eq!(p.sidecar_code, 0, "stderr:\n{}\nstdout:\n{}", p.stderr, p.stdout);
    assert_eq!(p.engine_code, 0, "the engine checks its weights and the switch steps");
    let (e, s) = (p.engine(), p.sidecar());
    assert_eq!(e["outputs_match"], Value::Bool(true), "every live slot holds the expert its placement names");
    assert_eq!(e["commit_step_disagreements"], 0);
    assert_eq!(e["placements_agree"], Value::Bool(true));
    let committed = e["layers_committed"].as_u64().unwrap();
    assert!(committed >= 1, "no layer committed:\n{}", p.stdout);
    assert_eq!(s["layers_updated"].as_u64(), Some(committed), "the sidecar's commits are the engine's applies");
    assert_eq!(
        (s["wrong_bytes"].as_u64(), s["engine"].as_str()),
        (Some(0), Some(&*format!("shm:{}", region_name("e2e"))))
    );
    // The apply steps the sidecar learned are the steps every engine rank switched at.
    let engine_steps: Vec<u64> =
        e["applies"][0].as_array().unwrap().iter().map(|a| a["step"].as_u64().unwrap()).collect();
    let sidecar_steps: Vec<u64> =
        s["layers"].as_array().unwrap().iter().map(|l| l["apply_step"].as_u64().unwrap()).collect();
    assert_eq!(engine_steps, sidecar_steps);
    for rank in e["applies"].as_array().unwrap() {
        assert_eq!(rank, &e["applies"][0], "every engine rank applied the same layers at the same steps");
    }
    // Every step the engine ran after the sidecar attached was read (the engine waited for it).
    assert_eq!(s["steps"].as_u64(), Some(240));
    // The engine reports its MoE time (4 ms a step when balanced, times the mean PAR): without
    // --step-ms the cost model's step time is measured, not the default 20 ms.
    let cost = &s["cost_model"];
    let step_ms = cost["step_ms"].as_f64().unwrap();
    assert!(cost["step_samples"].as_u64().unwrap() >= 200, "{cost}");
    assert!((3.5..12.0).contains(&step_ms), "the balanced step time is the engine's 4 ms (sleeps overshoot): {cost}");
    assert_eq!(cost["migration_samples"], 0, "migrations are measured only with --measure-migration");
    assert!(p.stdout.contains("engine shm:") && p.stdout.contains("# Out of bounds values : 0 OK"), "{}", p.stdout);
    // Several tensors a layer, one of them global: never written, proven by both sides.
    assert_eq!(e["tensors_per_layer"], 4);
    assert_eq!(e["global_bytes_changed"], 0);
    assert_eq!(
        s["globals_unchanged"],
        Value::Bool(true),
        "the sidecar hashed the global tensor at attach and at the end"
    );
    assert!(p.stdout.contains("# global tensors unchanged: yes"), "{}", p.stdout);
}

#[test]
fn without_moe_times_the_step_time_is_the_default_and_migrations_can_be_measured() {
    let p = run_pair("measure", &["--no-moe-time"], &["--measure-migration"]);
    assert_eq!(p.sidecar_code, 0, "stderr:\n{}\nstdout:\n{}", p.stderr, p.stdout);
    let s = p.sidecar();
    let cost = &s["cost_model"];
    assert_eq!((cost["step_samples"].as_u64(), cost["step_ms"].as_f64()), (Some(0), Some(20.0)), "{cost}");
    let updated = s["layers_updated"].as_u64().unwrap();
    assert!(updated >= 1 && cost["migration_samples"].as_u64() == Some(updated), "one sample a migration: {cost}");
    // Host MPI between 4 ranks on this machine is far below the 200 GB/s default.
    assert!(cost["migration_gbps"].as_f64().unwrap() < 200.0, "{cost}");
    assert!(p.stdout.contains("# cost model: step 20.000 ms (flag or default)"), "{}", p.stdout);
}

#[test]
fn an_absurd_moe_time_counts_as_not_measured() {
    let p = run_pair("absurd", &["--moe-ns", "18446744073709551615"], &[]);
    assert_eq!(p.sidecar_code, 0, "stderr:\n{}", p.stderr);
    let cost = &p.sidecar()["cost_model"];
    assert_eq!((cost["step_samples"].as_u64(), cost["step_ms"].as_f64()), (Some(0), Some(20.0)), "{cost}");
    assert!(p.stderr.contains("beyond an hour"), "{}", p.stderr);
}

#[test]
fn a_corrupted_transfer_applies_nothing_anywhere() {
    let p = run_pair("corrupt", &[], &["--eplb-layers-per-step", "0", "--fault", "corrupt-transfer-on-rank=1"]);
    assert_eq!(p.sidecar_code, 1, "stderr:\n{}", p.stderr);
    assert!(p.stderr.contains("failed verification") && p.stderr.contains("nothing was committed"), "{}", p.stderr);
    assert!(p.sidecar()["wrong_bytes"].as_u64().unwrap() > 0);
    assert_eq!(p.sidecar()["layers_updated"], 0);
    // The engine goes on without the sidecar, every step, with its initial weights.
    assert_eq!(p.engine_code, 0);
    assert_eq!(p.engine()["layers_committed"], 0);
    assert_eq!(p.engine()["outputs_match"], Value::Bool(true));
}

#[test]
fn an_engine_that_dies_stops_the_sidecar_with_a_clear_message() {
    let p = run_pair("dies", &["--kill-self-at-step", "60"], &[]);
    assert_eq!(p.sidecar_code, 1, "stderr:\n{}", p.stderr);
    assert!(p.stderr.contains("engine rank") && p.stderr.contains("is gone"), "{}", p.stderr);
    eprintln!("{}", p.stderr);
    assert_ne!(p.engine_code, 0);
}

#[test]
fn an_engine_that_stops_stops_the_sidecar_within_the_timeout() {
    // The stopped engine is killed once the sidecar has exited.
    let p = run_pair_within("stops", &["--stop-self-at-step", "60"], &["--engine-timeout", "1"], Duration::ZERO);
    assert_eq!(p.sidecar_code, 1, "stderr:\n{}", p.stderr);
    assert!(p.stderr.contains("engine rank") && p.stderr.contains("stopped or hung"), "{}", p.stderr);
}

#[test]
fn a_bad_or_missing_region_exits_2() {
    let name = region_name("bad");
    let path = format!("/dev/shm/eplb-{name}-0");
    let d = tmpdir("bad");
    let report = d.join("r.json");
    // Missing: a bounded wait, then a clear error.
    let (code, _, err) = finish(sidecar(1, &name, &report, &["--engine-wait", "0.5"]), Duration::from_secs(60));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no engine region") && err.contains(&path), "{err}");
    // Present but not a region: bad magic.
    std::fs::write(&path, vec![0u8; 8192]).unwrap();
    let (code, _, err) = finish(sidecar(1, &name, &report, &[]), Duration::from_secs(60));
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bad magic") && err.contains(&path), "{err}");
}

#[test]
fn a_gpu_weights_region_needs_the_gpu_path() {
    use eplb::engine::shm::region::{counts_kind, IpcHandle, IpcWeights, Layout, Shape, TensorDesc, TensorEntry};
    use eplb::engine::shm::writer::EngineRank;
    let name = region_name("ipc");
    let d = tmpdir("ipc");
    let report = d.join("r.json");
    let shape = Shape {
        num_layers: 2,
        slots_per_rank: 4,
        num_logical: 3,
        world_size: 1,
        rank: 0,
        ring_len: 16,
        counts_kind: counts_kind::LOCAL,
    };
    let host = Layout::host(
        &shape,
        &[TensorDesc::expert("w13_weight", "bf16", 256), TensorDesc::expert("w2_weight", "bf16", 128)],
    );
    // Every tensor its own allocation (one handle each), at offset 0.
    let entries: Vec<TensorEntry> = host
        .tensors
        .iter()
        .enumerate()
        .map(|(i, e)| TensorEntry { offset: 0, handle: i as u16, ..e.clone() })
        .collect();
    let handles = (0..entries.len()).map(|i| IpcHandle { handle: [i as u8 + 3; 64], bytes: 4096 }).collect();
    let layout =
        Layout::cuda_ipc(&shape, entries, IpcWeights { pci_bus_id: "0000:ff:1f.0".into(), uuid: [0; 16], handles });
    let phy2log: Vec<i32> = (0..2).flat_map(|_| [0, 1, 2, 0]).collect();
    let region = EngineRank::create(&name, &layout, &phy2log, |_, _, _| unreachable!("GPU weights are not filled"))
        .expect("create the region");
    // The host transport cannot move GPU weights: a flag error.
    let (code, _, err) = finish(sidecar(1, &name, &report, &["--transport", "host"]), Duration::from_secs(60));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("keeps its weights on its GPU") && err.contains("--transport nccl"), "{err}");
    // The GPU path: without CUDA a clear refusal (exit 2); with CUDA, this fake GPU is not there.
    let (code, _, err) = finish(sidecar(1, &name, &report, &[]), Duration::from_secs(60));
    drop(region);
    let _ = std::fs::remove_file(format!("/dev/shm/eplb-{name}-0"));
    assert_ne!(code, 0, "{err}");
    assert!(
        (code == 2 && err.contains("no CUDA driver")) || err.contains("0000:ff:1f.0"),
        "want a refusal naming what is missing: {err}"
    );
}

#[test]
fn physical_counts_balance_like_local_counts() {
    let p = run_pair("physical", &["--counts", "physical", "--ring-len", "64"], &[]);
    assert_eq!(p.sidecar_code, 0, "stderr:\n{}\nstdout:\n{}", p.stderr, p.stdout);
    assert_eq!(p.engine_code, 0);
    let (e, s) = (p.engine(), p.sidecar());
    assert_eq!(e["outputs_match"], Value::Bool(true));
    let committed = e["layers_committed"].as_u64().unwrap();
    assert!(committed >= 1, "{}", p.stdout);
    assert_eq!(s["layers_updated"].as_u64(), Some(committed), "the sidecar's commits are the engine's applies");
    assert_eq!(e["global_bytes_changed"], 0);
}

#[test]
fn a_reallocated_tensor_stops_the_sidecar_before_anything_is_posted() {
    // table_fault from the first step: every command would be rejected; the sidecar must not post.
    let p = run_pair("fault", &["--table-fault-at-step", "0"], &[]);
    assert_eq!(p.sidecar_code, 1, "stderr:\n{}", p.stderr);
    assert!(
        p.stderr.contains("table_fault 2") && p.stderr.contains("layer 0, tensor 1 (w13_weight_scale_inv)"),
        "names the layer and the tensor: {}",
        p.stderr
    );
    assert!(p.stderr.contains("nothing was posted"), "{}", p.stderr);
    assert_eq!(p.sidecar()["layers_updated"], 0);
    assert_eq!(p.engine_code, 0);
    assert_eq!(p.engine()["layers_committed"], 0);
    assert_eq!(p.engine()["outputs_match"], Value::Bool(true));
}

#[test]
fn a_version_1_region_exits_2_naming_both_versions() {
    let name = region_name("v1");
    let path = format!("/dev/shm/eplb-{name}-0");
    let d = tmpdir("v1");
    let report = d.join("r.json");
    let mut header = vec![0u8; 8192];
    header[..8].copy_from_slice(&0x314d_4853_424c_5045u64.to_le_bytes());
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&path, header).unwrap();
    let (code, _, err) = finish(sidecar(1, &name, &report, &[]), Duration::from_secs(60));
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("contract version 1") && err.contains("speaks version 2") && err.contains(&path), "{err}");
}

#[test]
fn forced_moves_on_one_engine_rank_switch_many_times_and_never_touch_the_global_tensor() {
    // One engine rank, one sidecar rank: nothing can move for balance; --force-moves 4 moves a
    // layer inside the rank every 4 steps through the whole protocol (staged rows, verified,
    // posted, applied by the engine at one step).
    let name = region_name("force");
    let d = tmpdir("force");
    let (er, sr) = (d.join("engine.json"), d.join("sidecar.json"));
    let _ = std::fs::remove_file(&er);
    let _ = std::fs::remove_file(&sr);
    let _one = PAIRS.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = engine(&name, &er, &["--ranks", "1", "--experts", "3", "--slots-per-rank", "4", "--steps", "200"]);
    let (code, stdout, stderr) = finish(sidecar(1, &name, &sr, &["--force-moves", "4"]), Duration::from_secs(120));
    let engine_code = wait_bounded(&mut e, Duration::from_secs(60));
    let _ = std::fs::remove_file(format!("/dev/shm/eplb-{name}-0"));
    assert_eq!(code, 0, "stderr:\n{stderr}\nstdout:\n{stdout}");
    assert_eq!(engine_code, 0);
    let read = |p: &std::path::Path| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let (e, s) = (read(&er), read(&sr));
    let committed = e["layers_committed"].as_u64().unwrap();
    assert!(committed >= 20, "a forced move every 4 steps (some may be cancelled): {committed}\n{stdout}");
    assert_eq!(
        s["forced_moves"].as_u64(),
        Some(committed),
        "every forced move the sidecar committed, the engine applied"
    );
    assert_eq!(e["outputs_match"], Value::Bool(true), "every live slot holds the expert its placement names");
    assert_eq!(e["global_bytes_changed"], 0, "the global tensor's bytes are unchanged after {committed} switches");
    assert_eq!(s["globals_unchanged"], Value::Bool(true));
    assert_eq!(s["wrong_bytes"], 0);
}
