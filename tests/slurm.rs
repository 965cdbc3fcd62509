//! The Slurm templates under a real Slurm: `scripts/slurm_local.sh` brings up a private
//! single-node Slurm (its own directory, munge socket and ports, so that it never meets a system
//! Slurm or another run of this test), the templates are submitted with `sbatch --wait`, bounded
//! by `--time` and `timeout`, and the Slurm is stopped at the end, also when a test fails.
//!
//! Needs root and the slurm-wlm and munge packages (`scripts/slurm_local.sh install`). Without
//! them the tests print why and pass; with `EPLB_REQUIRE_SLURM=1` (CI sets it) they fail instead.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use serde_json::Value;

/// One local Slurm at a time: the tests of this file run one after the other.
static SLURM: Mutex<()> = Mutex::new(());

/// Seconds `timeout` gives one `sbatch --wait`, and the job's own `--time` in minutes.
const SBATCH_TIMEOUT_S: &str = "600";
const JOB_TIME_MIN: &str = "--time=8";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn required() -> bool {
    std::env::var("EPLB_REQUIRE_SLURM").is_ok_and(|v| v == "1")
}

/// Two distinct free TCP ports (both held until both are known, released before the daemons bind).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    (port(&a), port(&b))
}

/// A running private Slurm; dropping it stops it.
struct LocalSlurm {
    dir: PathBuf,
    ports: (u16, u16),
}

impl LocalSlurm {
    /// Starts one, or says why it cannot (the caller skips, or fails when Slurm is required).
    fn start(name: &str) -> Result<LocalSlurm, String> {
        let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if uid.as_deref().ok() != Some("0") {
            return Err("not root (slurm_local.sh runs the daemons as root)".into());
        }
        let have = ["slurmctld", "slurmd", "sbatch", "munged"].iter().all(|b| {
            Command::new("sh").args(["-c", &format!("command -v {b}")]).output().is_ok_and(|o| o.status.success())
        });
        if !have && !required() {
            return Err("slurm-wlm or munge not installed (scripts/slurm_local.sh install)".into());
        }
        // A short path: the munge socket's path must fit in a sockaddr_un.
        let dir = PathBuf::from(format!("/tmp/eplb-slurm-test-{}-{name}", std::process::id()));
        let slurm = LocalSlurm { dir, ports: free_ports() };
        let log = slurm.dir.with_extension("start.log");
        let out = slurm.script("start", &log);
        if !out {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("scripts/slurm_local.sh start failed:\n{text}"));
        }
        Ok(slurm)
    }

    /// Runs `scripts/slurm_local.sh VERB` for this instance, its output into `log` (a file, not
    /// a pipe: the daemons it starts must not hold our pipe open).
    fn script(&self, verb: &str, log: &Path) -> bool {
        let f = File::create(log).unwrap();
        Command::new(repo().join("scripts/slurm_local.sh"))
            .arg(verb)
            .env("EPLB_SLURM_DIR", &self.dir)
            .env("EPLB_SLURM_CTLD_PORT", self.ports.0.to_string())
            .env("EPLB_SLURM_SLURMD_PORT", self.ports.1.to_string())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `timeout 600 sbatch --wait --time=8 ARGS` from `submit_dir`, with EPLB_WORKER and `envs` set.
    fn sbatch(&self, submit_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Job {
        std::fs::create_dir_all(submit_dir).unwrap();
        let mut cmd = Command::new("timeout");
        // A test run inside a Slurm job must not hand that job's settings to this Slurm.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if ["SLURM_", "SBATCH_", "SRUN_", "SALLOC_"].iter().any(|p| k.starts_with(p)) {
                cmd.env_remove(&*k);
            }
        }
        let out = cmd
            .args([SBATCH_TIMEOUT_S, "sbatch", "--wait", JOB_TIME_MIN])
            .args(args)
            .current_dir(submit_dir)
            .env("SLURM_CONF", self.dir.join("etc/slurm.conf"))
            .env("EPLB_WORKER", env!("CARGO_BIN_EXE_eplb-worker"))
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("sbatch runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let job_id = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Submitted batch job "))
            .unwrap_or_else(|| panic!("no job id from sbatch; stdout:\n{stdout}\nstderr:\n{stderr}"))
            .trim()
            .to_string();
        let output = std::fs::read_to_string(submit_dir.join(format!("eplb-{job_id}.out"))).unwrap_or_default();
        Job { code: out.status.code().unwrap_or(-1), job_id, stderr, output, dir: submit_dir.to_path_buf() }
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let log = self.dir.with_extension("stop.log");
        let stopped = self.script("stop", &log);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if stopped {
            let _ = std::fs::remove_dir_all(&self.dir);
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_file(self.dir.with_extension("start.log"));
        } else if !std::thread::panicking() {
            panic!("scripts/slurm_local.sh stop failed:\n{text}");
        } else {
            eprintln!("scripts/slurm_local.sh stop failed:\n{text}");
        }
    }
}

/// What one `sbatch --wait` did: its exit code (the job's), and the job's output file.
struct Job {
    code: i32,
    job_id: String,
    stderr: String,
    output: String,
    dir: PathBuf,
}

impl Job {
    fn context(&self) -> String {
        format!("sbatch exit {}; sbatch stderr:\n{}\njob output:\n{}", self.code, self.stderr, self.output)
    }

    /// The JSON file `PREFIX-<jobid>.json` the job wrote in its submit directory.
    fn json(&self, prefix: &str) -> Value {
        let path = self.dir.join(format!("{prefix}-{}.json", self.job_id));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), self.context()));
        serde_json::from_str(&text).unwrap()
    }
}

/// Starts a local Slurm, or prints why not and returns None (fails when EPLB_REQUIRE_SLURM=1).
fn local_slurm(name: &str) -> Option<LocalSlurm> {
    match LocalSlurm::start(name) {
        Ok(s) => Some(s),
        Err(why) if required() => panic!("EPLB_REQUIRE_SLURM=1 but no local Slurm: {why}"),
        Err(why) => {
            eprintln!("skipped: no local Slurm: {why}");
            None
        }
    }
}

fn submit_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-slurm-submit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// The README's command on a 2-CPU node without GPU: 4 tasks (overcommitted), the host
/// transport, submitted from a directory that is not the checkout; the report lands there.
#[test]
fn eplb_sbatch_runs_on_a_cpu_node_from_any_directory() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(slurm) = local_slurm("template") else { return };
    let dir = submit_dir("template");
    let template = repo().join("scripts/eplb.sbatch");
    let job = slurm.sbatch(
        &dir,
        &[
            "--nodes=1",
            "--ntasks=4",
            "--overcommit",
            template.to_str().unwrap(),
            "--transport",
            "host",
            "--steps",
            "40",
            "--eplb-update-interval-steps",
            "10",
        ],
        &[],
    );
    assert_eq!(job.code, 0, "{}", job.context());
    let r = job.json("eplb-report");
    assert_eq!(r["world_size"], 4, "{}", job.context());
    assert_eq!(r["steps"], 40);
    assert!(r["error"].is_null(), "{}", job.context());
    assert_eq!(r["wrong_bytes"], 0);
    assert_eq!(r["plans_agreed"], true);
    assert!(r["rebalances"].as_u64().unwrap() >= 1, "{}", job.context());
    assert!(r["experts_moved"].as_u64().unwrap() > 0);
    // No GPU in the allocation and --transport host: no GPU option reached srun.
    assert!(!job.output.contains("--gpus-per-task"), "{}", job.context());
    assert!(job.output.contains("# Out of bounds values : 0 OK"), "{}", job.context());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job whose arguments disagree with its tasks fails, and sbatch --wait says so: the engine's
/// --ep-size (3) is passed through instead of the template's own, and eplb refuses it (exit 2).
#[test]
fn eplb_sbatch_fails_when_ep_size_does_not_match_the_tasks() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(slurm) = local_slurm("mismatch") else { return };
    let dir = submit_dir("mismatch");
    let template = repo().join("scripts/eplb.sbatch");
    let job = slurm.sbatch(
        &dir,
        &["--ntasks=2", "--overcommit", template.to_str().unwrap(), "--ep_size=3", "--steps", "5"],
        &[],
    );
    assert_eq!(job.code, 2, "{}", job.context());
    assert!(job.output.contains("--ep-size 3 must match the number of devices"), "{}", job.context());
    assert!(!job.output.contains("--ep-size 2"), "the template added its own --ep-size:\n{}", job.context());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Python of the engine sidecar's tests (scripts/pyvenv.sh), or why not.
fn pyvenv() -> Result<String, String> {
    let out = Command::new(repo().join("scripts/pyvenv.sh"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("scripts/pyvenv.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("scripts/pyvenv.sh failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The sidecar layout: one allocation, the reference engine (4 EP ranks, real MoE math) as one
/// job step and `eplb-worker run --engine shm:NAME` as a second step beside it, rank for rank on
/// the same node. The engine finishes every step with outputs matching its reference forward pass,
/// eplb moves layers, every engine rank switches each layer at the same step, and nothing is left
/// in /dev/shm.
#[test]
fn eplb_sidecar_sbatch_balances_the_reference_engine() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(slurm) = local_slurm("sidecar") else { return };
    let py = match pyvenv() {
        Ok(py) => py,
        Err(why) if required() => panic!("EPLB_REQUIRE_SLURM=1 but no Python for the reference engine: {why}"),
        Err(why) => return eprintln!("skipped: no Python for the reference engine: {why}"),
    };
    let dir = submit_dir("sidecar");
    let template = repo().join("scripts/eplb_sidecar.sbatch");
    let steps = "40";
    // Unique on this host, also among concurrent runs of this test (each Slurm starts at job 1).
    let name = format!("slurmtest{}", std::process::id());
    let job = slurm.sbatch(
        &dir,
        &["--nodes=1", "--ntasks=4", "--overcommit", template.to_str().unwrap(), "--eplb-update-interval-steps", "10"],
        &[("EPLB_PYTHON", &py), ("EPLB_ENGINE_STEPS", steps), ("EPLB_SHM_NAME", &name)],
    );
    assert_eq!(job.code, 0, "{}", job.context());
    let engine = job.json("eplb-engine");
    assert_eq!(engine["world_size"], 4, "{}", job.context());
    assert_eq!(engine["engine_steps"].to_string(), steps, "{}", job.context());
    assert_eq!(engine["outputs_match"], true, "{engine}");
    assert_eq!(engine["commit_step_disagreements"], 0, "{engine}");
    assert_eq!(engine["placements_agree"], true, "{engine}");
    assert_eq!(engine["wrong_bytes"], 0, "{engine}");
    assert!(engine["layers_committed"].as_u64().unwrap() >= 1, "no layer switched:\n{engine}\n{}", job.context());
    let sidecar = job.json("eplb-report");
    assert_eq!(sidecar["world_size"], 4, "{}", job.context());
    assert!(sidecar["error"].is_null(), "{}", job.context());
    assert_eq!(sidecar["wrong_bytes"], 0);
    assert!(sidecar["layers_updated"].as_u64().unwrap() >= 1, "{sidecar}");
    let prefix = format!("eplb-{name}-");
    let left: Vec<_> = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.trim_start_matches('.').starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "regions left in /dev/shm: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
