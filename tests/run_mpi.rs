//! `eplb-worker run` end to end: the real binary under `mpirun --oversubscribe` with 2, 4 and 8
//! ranks, several nodes faked on one host with `--ranks-per-node`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{tmpdir, BIN};
use serde_json::Value;

/// What one `mpirun -n N eplb-worker run ...` did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    report: Option<Value>,
}

impl Run {
    fn report(&self) -> &Value {
        self.report.as_ref().unwrap_or_else(|| panic!("no report; stderr:\n{}", self.stderr))
    }

    fn u(&self, key: &str) -> u64 {
        self.report()[key].as_u64().unwrap_or_else(|| panic!("report key {key}: {}", self.report()[key]))
    }

    fn f(&self, key: &str) -> f64 {
        self.report()[key].as_f64().unwrap()
    }

    /// The invariants of every successful run.
    fn assert_healthy(&self) {
        assert_eq!(self.code, 0, "exit code; stderr:\n{}\nstdout:\n{}", self.stderr, self.stdout);
        assert_eq!(self.u("wrong_bytes"), 0);
        assert_eq!(self.report()["plans_agreed"], Value::Bool(true));
        assert!(self.report()["error"].is_null());
        assert!(self.stdout.contains("# Out of bounds values : 0 OK"), "{}", self.stdout);
    }

    /// At least one rebalance that moved experts, and a clear balance gain.
    fn assert_balanced(&self, gain: f64) {
        assert!(self.u("rebalances") >= 1, "no rebalance:\n{}", self.stdout);
        assert!(self.u("experts_moved") > 0 && self.u("bytes_moved") > 0);
        let (live, stat) = (self.f("balancedness_live"), self.f("balancedness_static"));
        assert!(live > stat + gain, "balancedness live {live} static {stat}:\n{}", self.stdout);
    }
}

/// Runs `mpirun -n ranks --oversubscribe eplb-worker run ARGS --report FILE`.
fn mpirun(ranks: usize, name: &str, args: &[&str]) -> Run {
    let report = tmpdir(name).join("report.json");
    let out = common::mpirun(ranks)
        .arg(BIN)
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .expect("mpirun must be installed (scripts/test.sh installs Open MPI)");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report: std::fs::read_to_string(&report).ok().map(|_| common::read_report(&report)),
    }
}

fn qwen_trace(shared: &Path) -> String {
    shared.join("traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv").display().to_string()
}

/// The Qwen1.5-MoE trace (12 layers x 60 experts, 20 iterations) replayed for 40 steps, a round
/// every 5 steps, 64 KiB experts.
fn trace_args(trace: &str) -> Vec<&str> {
    vec!["--trace", trace, "--steps", "40", "--eplb-update-interval-steps", "5", "--expert-bytes", "65536"]
}

#[test]
fn readme_demo_on_4_ranks_with_the_builtin_load() {
    let r = mpirun(4, "demo", &["--eplb-update-interval-steps", "10"]);
    r.assert_healthy();
    r.assert_balanced(0.1);
    assert_eq!((r.u("world_size"), r.u("steps"), r.u("num_layers"), r.u("num_logical")), (4, 100, 8, 64));
    assert!(r.stdout.contains("# Using devices"), "{}", r.stdout);
    for rank in 0..4 {
        assert!(r.stdout.contains(&format!("#  Rank {rank:>3} Node  0 Local {rank:>2}")), "{}", r.stdout);
    }
    assert!(r.stdout.contains("#wrong") && r.stdout.contains("device cpu"));
    // Every migrated layer has its row: step, layer, experts, bytes, ..., #wrong.
    let rows = r.report()["layers"].as_array().unwrap();
    assert_eq!(rows.len() as u64, r.u("layers_updated"));
    assert!(rows.iter().all(|l| l["wrong_bytes"] == 0 && l["bytes"].as_u64().unwrap() > 0));
    assert!(r.f("migration_seconds") > 0.0);
}

#[test]
fn default_manager_decides_in_time_and_balances_the_demo() {
    // The README demo with default flags: the time-based manager, one layer a step at most.
    let r = mpirun(4, "demo-default", &[]);
    r.assert_healthy();
    assert!(r.stdout.contains("decisions in time"), "{}", r.stdout);
    let live = r.f("balancedness_live");
    assert!(live >= 0.94, "balancedness live {live}:\n{}", r.stdout);
    // At most one layer switches a step, and every switch was agreed by every rank.
    let layers = r.report()["layers"].as_array().unwrap();
    let mut steps: Vec<u64> = layers.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    steps.dedup();
    assert_eq!(steps.len(), layers.len(), "one layer a step");
    assert!(r.report()["plans_agreed"].as_bool().unwrap());
}

#[test]
fn qwen_trace_on_2_and_4_ranks() {
    let Some(shared) = common::shared_dir() else { return };
    let trace = qwen_trace(&shared);
    for ranks in [2, 4] {
        let r = mpirun(ranks, &format!("qwen{ranks}"), &trace_args(&trace));
        r.assert_healthy();
        r.assert_balanced(0.08);
        assert_eq!((r.u("world_size"), r.u("num_layers"), r.u("num_logical")), (ranks as u64, 12, 60));
        assert!(r.report()["load"].as_str().unwrap().contains("dataset bookcorpus"));
    }
}

#[test]
fn qwen_trace_on_8_ranks_as_2_nodes_with_the_hierarchical_policy() {
    let Some(shared) = common::shared_dir() else { return };
    let trace = qwen_trace(&shared);
    let mut args = trace_args(&trace);
    args.extend(["--ranks-per-node", "4", "--num-groups", "4", "--policy", "deepseek"]);
    let r = mpirun(8, "qwen8", &args);
    r.assert_healthy();
    r.assert_balanced(0.15);
    assert_eq!((r.u("world_size"), r.u("num_nodes"), r.u("ranks_per_node")), (8, 2, 4));
    assert!(r.stdout.contains("hierarchical mode"), "{}", r.stdout);
    assert!(r.stdout.contains("#  Rank   7 Node  1 Local  3"), "{}", r.stdout);
}

#[test]
fn a_corrupted_load_on_one_rank_is_caught_and_nothing_moves() {
    let r = mpirun(4, "corrupt-load", &["--eplb-update-interval-steps", "5", "--fault", "corrupt-load-on-rank=2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("different plans") && r.stderr.contains("nothing was moved"), "{}", r.stderr);
    assert_eq!(r.report()["plans_agreed"], Value::Bool(false));
    assert_eq!((r.u("experts_moved"), r.u("layers_updated"), r.u("bytes_moved")), (0, 0, 0));
    assert_eq!(r.u("steps"), 4, "stopped at the first round (step 4)");
}

#[test]
fn a_corrupted_transfer_fails_verification_and_nothing_is_committed() {
    let r = mpirun(
        4,
        "corrupt-transfer",
        &["--eplb-update-interval-steps", "5", "--eplb-layers-per-step", "0", "--fault", "corrupt-transfer-on-rank=1"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("failed verification") && r.stderr.contains("nothing was committed"), "{}", r.stderr);
    assert!(r.u("wrong_bytes") > 0);
    assert_eq!((r.u("experts_moved"), r.u("layers_updated")), (0, 0));
    assert!(r.report()["error"].as_str().unwrap().contains("failed verification"));
}

#[test]
fn live_weights_verify_at_every_step() {
    let args =
        ["--eplb-update-interval-steps", "4", "--steps", "30", "--expert-bytes", "32768", "--verify-live-every-step"];
    let r = mpirun(4, "verify-live", &args);
    r.assert_healthy();
    r.assert_balanced(0.0);
    assert_eq!(r.u("wrong_live_bytes"), 0);
    // Every rank checked every live slot of every layer at every step.
    let per_step = r.u("num_replicas") * r.u("num_layers") * 32768;
    assert_eq!(r.u("live_verified_bytes"), per_step * 30);
    assert!(r.stdout.contains("wrong OK"), "{}", r.stdout);
}

#[test]
fn xllm_flags_and_the_time_based_interval() {
    // xLLM's gflags pasted as they are; a 1 ms interval on rank 0's clock must still make every
    // rank act on the same step (no hang, plans agreed).
    let r = mpirun(
        2,
        "xllm",
        &[
            "--enable_eplb=true",
            "--expert_parallel_degree=2",
            "--ep_size=2",
            "--eplb_update_interval=0.001",
            "--eplb_update_threshold=0.9",
            "--redundant_experts_num=2",
            "--steps",
            "30",
            "--expert-bytes",
            "8192",
        ],
    );
    r.assert_healthy();
    assert_eq!(r.u("num_replicas"), 64 + 2 * 2);
    assert!(r.u("rebalances") >= 1, "{}", r.stdout);
}

#[test]
fn observe_only_and_init_placement() {
    let d = tmpdir("init");
    let placement = d.join("placement.json");
    // A placement planned on the built-in load's first step, with 8 extra slots on 4 ranks.
    let out = Command::new(env!("CARGO_BIN_EXE_eplb-worker"))
        .args(["plan", "--synthetic", "8x64", "--num-replicas", "72", "--num-gpus", "4", "--output"])
        .arg(&placement)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let base = ["--enable-eplb=false", "--steps", "5", "--expert-bytes", "8192", "--num-redundant-experts", "8"];
    let trivial = mpirun(4, "observe", &base);
    trivial.assert_healthy();
    assert_eq!((trivial.u("rebalances"), trivial.u("experts_moved")), (0, 0));
    assert_eq!(trivial.f("balancedness_live"), trivial.f("balancedness_static"));
    let p = placement.display().to_string();
    let planned = mpirun(4, "observe-init", &[&base[..], &["--init-placement", &p]].concat());
    planned.assert_healthy();
    assert!(planned.f("balancedness_static") > trivial.f("balancedness_static") + 0.1);
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    for (args, want) in [
        (vec!["--ep-size", "3"], "must match the number of devices"),
        // No GPU here (CI, the dev machine): a clear error, not a panic.
        (vec!["--transport", "nccl"], "no CUDA driver"),
        (vec!["--num-redundant-experts", "3"], "use --num-redundant-experts 4"),
        (vec!["--trace", "/nonexistent/load.csv"], "cannot read load file"),
    ] {
        let r = mpirun(2, "bad", &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.matches("error:").count(), 1, "printed once: {}", r.stderr);
    }
}

#[test]
fn forced_moves_on_one_rank_stage_verify_and_commit_inside_the_rank() {
    // One rank: balance can never move anything, so --force-moves does, every 3 steps, through
    // the normal stage/verify/commit path; the synthetic weights verify by their pattern.
    let base = [
        "--steps",
        "30",
        "--num-layers",
        "2",
        "--num-experts",
        "6",
        "--num-redundant-experts",
        "2",
        "--expert-bytes",
        "4096",
        "--eplb-update-interval-steps",
        "1000",
    ];
    let r = mpirun(1, "force-1", &[&base[..], &["--force-moves", "3", "--verify-live-every-step"]].concat());
    r.assert_healthy();
    assert_eq!(r.u("forced_moves"), 10, "steps 3, 6, .. 30:\n{}", r.stdout);
    assert_eq!(r.u("layers_updated"), 10);
    assert!(r.u("live_verified_bytes") > 0);
    assert_eq!(r.u("wrong_live_bytes"), 0);
    assert_eq!(r.u("experts_moved"), 0, "nothing crosses between ranks: every move is a local copy");
    assert_ne!(r.report()["final_placement_hash"], mpirun(1, "force-0", &base).report()["final_placement_hash"]);
}
