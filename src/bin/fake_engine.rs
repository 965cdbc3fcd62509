//! `eplb-fake-engine`: a minimal engine that follows docs/engine-contract.md, for the sidecar's
//! end-to-end tests on CPU. One process, one thread per engine rank, in lock-step (a barrier
//! stands in for the engine's collective). Every step, every rank: the boundary (read the
//! command, agree with the other ranks on min/max of `have`, apply in place or cancel, answer),
//! then a "forward pass" that routes the built-in drifting load on its own `phy2log` and records
//! its slots' counts. Its expert weights are bytes eplb cannot predict, stored the way real
//! engines store them (contract 2): several tensors a layer, each its own area of the region
//! (`w13_weight`, a small `w13_weight_scale_inv` whose row stride is larger than its row, and
//! `w2_weight`), plus one global tensor (`w13_input_scale`) that must never change. After every
//! apply and at the end each rank checks that every live slot holds the expert its `phy2log`
//! names and that the global tensor's bytes are untouched.
//!
//! The report (`--report FILE`) holds `engine_steps`, `applies` per rank (layer, step, epoch),
//! `layers_committed`, `commit_step_disagreements`, `wrong_bytes`, `outputs_match`,
//! `placements_agree`, `tensors_per_layer`, `global_bytes_changed`.

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use clap::Parser;
use eplb::engine::shm::region::{counts_kind, off, phase, sidecar_state, Layout, Shape, TensorDesc};
use eplb::engine::shm::writer::{Decision, EngineRank};
use eplb::engine::synthetic::DriftingZipf;
use eplb::engine::{fill_expert, slot_loads};
use eplb::exit::ExitKind;
use eplb::manager::cost::{par_q32, PAR_ONE};
use eplb::policy::Placement;
use ndarray::Array2;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "eplb-fake-engine", args_override_self = true)]
struct Args {
    /// Region name: /dev/shm/eplb-NAME-RANK.
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 4)]
    ranks: usize,
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 12)]
    experts: usize,
    #[arg(long, default_value_t = 4)]
    slots_per_rank: usize,
    /// f32 elements of a row of `w13_weight` (the expert's largest tensor; `w2_weight` has as
    /// many bytes, `w13_weight_scale_inv` 12 bytes in rows 32 bytes apart).
    #[arg(long, default_value_t = 1024)]
    expert_floats: u32,
    /// What the ring's counts are: this rank's local slots (`local`, counts_kind 0) or this
    /// rank's view of every physical slot (`physical`, counts_kind 1).
    #[arg(long, default_value = "local", value_parser = ["local", "physical"])]
    counts: String,
    /// Tests: from the boundary before this step on, report table entry 1 (layer 0's second
    /// tensor) re-allocated (`table_fault`), rejecting every command.
    #[arg(long)]
    table_fault_at_step: Option<u64>,
    #[arg(long, default_value_t = 16)]
    ring_len: usize,
    /// Milliseconds of "compute" per step when balanced: a step takes this times the mean over
    /// layers of the placement's PAR on the step's load (the peak GPU over the mean), and the
    /// engine reports that time as the step's MoE time.
    #[arg(long, default_value_t = 2)]
    step_ms: u64,
    /// Report no MoE time (an engine that does not measure it).
    #[arg(long)]
    no_moe_time: bool,
    /// Tests: report this MoE time (ns) every step instead of the measured one (a broken engine).
    #[arg(long)]
    moe_ns: Option<u64>,
    #[arg(long, default_value_t = 20)]
    drift_steps: usize,
    /// Every other step is a prefill step (phase 1), the others decode (2); default: all decode.
    #[arg(long)]
    alternate_phases: bool,
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Before the first step, wait up to this many seconds for a sidecar to attach to every
    /// rank and start its loop (tests; a real engine never waits for its sidecar).
    #[arg(long, default_value_t = 0.0)]
    wait_sidecar: f64,
    /// Tests: SIGKILL this process at the boundary before this step (an engine that dies).
    #[arg(long)]
    kill_self_at_step: Option<u64>,
    /// Tests: SIGSTOP this process at the boundary before this step (an engine that hangs).
    #[arg(long)]
    stop_self_at_step: Option<u64>,
}

/// The fake weights: not the synthetic engine's pattern (layer offset by 1000), so the sidecar
/// can only check them by the sender's checksum.
fn fill(layer: usize, expert: usize, buf: &mut [u8]) {
    fill_expert(buf, layer + 1000, expert);
}

fn main() {
    let args = Args::parse();
    let (n, spr, layers, experts) = (args.ranks, args.slots_per_rank, args.layers, args.experts);
    let p = n * spr;
    if p < experts || n == 0 {
        eprintln!("eplb-fake-engine: {p} slots cannot hold {experts} experts");
        std::process::exit(ExitKind::BadInput.code());
    }
    let initial: Vec<i32> = (0..layers * p).map(|i| ((i % p) % experts) as i32).collect();
    let haves = Arc::new(Mutex::new(vec![0u64; n]));
    let barrier = Arc::new(Barrier::new(n));
    let load = DriftingZipf { drift_steps: args.drift_steps, ..DriftingZipf::new(layers, experts, 7) };
    let args = Arc::new(args);
    let mut ranks = Vec::new();
    let tensors = tensors(args.expert_floats as u64, experts as u32);
    let kind = if args.counts == "physical" { counts_kind::PHYSICAL } else { counts_kind::LOCAL };
    for r in 0..n {
        let shape = Shape {
            num_layers: layers,
            slots_per_rank: spr,
            num_logical: experts,
            world_size: n,
            rank: r,
            ring_len: args.ring_len,
            counts_kind: kind,
        };
        let layout = Layout::host(&shape, &tensors);
        let rank = EngineRank::create(&args.name, &layout, &initial, fill).unwrap_or_else(|e| {
            eprintln!("eplb-fake-engine: rank {r}: {e}");
            std::process::exit(ExitKind::BadInput.code())
        });
        ranks.push(rank);
    }
    let handles: Vec<_> = ranks
        .into_iter()
        .enumerate()
        .map(|(r, mut rank)| {
            let (haves, barrier, load, args) = (haves.clone(), barrier.clone(), load.clone(), args.clone());
            std::thread::spawn(move || {
                let mut applies = Vec::new();
                let mut wrong = 0u64;
                let globals = rank.global_bytes();
                let mut globals_changed = 0u64;
                let deadline = std::time::Instant::now() + Duration::from_secs_f64(args.wait_sidecar);
                // Attached, and past its set-up: its first heartbeat comes from its loop, once it has
                // fixed the first step it reads (so no step runs before the sidecar reads it).
                while !(rank.region.get(off::SIDECAR_STATE) == sidecar_state::ATTACHED
                    && rank.region.get(off::SIDECAR_HEARTBEAT_NS) != 0)
                    && std::time::Instant::now() < deadline
                {
                    rank.beat();
                    std::thread::sleep(Duration::from_millis(5));
                }
                barrier.wait();
                for t in 0..args.steps {
                    if r == 0 {
                        for (at, signal) in
                            [(args.kill_self_at_step, libc::SIGKILL), (args.stop_self_at_step, libc::SIGSTOP)]
                        {
                            if at == Some(t) {
                                // SAFETY: signals this very process.
                                unsafe { libc::kill(libc::getpid(), signal) };
                            }
                        }
                    }
                    if args.table_fault_at_step == Some(t) {
                        rank.set_table_fault(1);
                    }
                    let (have, cmd) = rank.have(t);
                    haves.lock().expect("lock")[r] = have;
                    barrier.wait();
                    let (min, max) = {
                        let h = haves.lock().expect("lock");
                        (*h.iter().min().unwrap_or(&0), *h.iter().max().unwrap_or(&0))
                    };
                    barrier.wait();
                    if let Decision::Applied { layer, epoch, .. } = rank.decide(t, cmd, min, max) {
                        applies.push(json!({"layer": layer, "step": t, "epoch": epoch}));
                        wrong += check(&rank, layer, r, spr);
                        globals_changed += changed(&globals, &rank.global_bytes());
                    }
                    // The forward pass: the load routed on this rank's own placement.
                    let phy2log =
                        Array2::from_shape_vec((layers, p), rank.phy2log().iter().map(|&e| e as usize).collect())
                            .expect("shape");
                    let placement = Placement::from_phy2log(phy2log, experts).expect("a valid placement");
                    let global = load.step(t as usize);
                    let counts = if args.counts == "physical" {
                        physical_counts(global.view(), &placement, spr, r)
                    } else {
                        slot_loads(global.view(), &placement, r, spr)
                    };
                    let ph = if args.alternate_phases && t % 2 == 0 { phase::PREFILL } else { phase::DECODE };
                    // Every rank waits for the most loaded GPU of each layer.
                    let par_sum: u128 = (0..layers)
                        .map(|l| par_q32(&global.row(l).to_vec(), &placement.phy2log.row(l).to_vec(), spr) as u128)
                        .sum();
                    let moe =
                        Duration::from_millis(args.step_ms).as_nanos() * par_sum / (layers as u128 * PAR_ONE as u128);
                    let started = std::time::Instant::now();
                    std::thread::sleep(Duration::from_nanos(moe as u64));
                    let moe_ns = match (args.no_moe_time, args.moe_ns) {
                        (true, _) => 0,
                        (false, Some(ns)) => ns,
                        (false, None) => started.elapsed().as_nanos() as u64,
                    };
                    rank.record(t, ph, counts.as_slice().expect("contiguous"), moe_ns);
                }
                for layer in 0..layers {
                    wrong += check(&rank, layer, r, spr);
                }
                globals_changed += changed(&globals, &rank.global_bytes());
                barrier.wait();
                rank.finish();
                (applies, wrong, rank.phy2log().to_vec(), globals_changed)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("an engine rank panicked")).collect();
    let applies: Vec<&Vec<serde_json::Value>> = results.iter().map(|r| &r.0).collect();
    let wrong: u64 = results.iter().map(|r| r.1).sum();
    let globals_changed: u64 = results.iter().map(|r| r.3).sum();
    // A layer switch (layer, epoch) whose step differs between ranks, or that some rank lacks.
    let mut disagreements = 0;
    for a in applies[0].iter() {
        let same = |b: &&serde_json::Value| b["layer"] == a["layer"] && b["epoch"] == a["epoch"];
        if applies.iter().any(|other| other.iter().find(same).is_none_or(|b| b["step"] != a["step"])) {
            disagreements += 1;
        }
    }
    disagreements += applies.iter().map(|a| a.len().abs_diff(applies[0].len())).max().unwrap_or(0);
    let report = json!({
        "engine_steps": args.steps,
        "ranks": n,
        "applies": applies,
        "layers_committed": applies[0].len(),
        "commit_step_disagreements": disagreements,
        "wrong_bytes": wrong,
        "outputs_match": wrong == 0,
        "placements_agree": results.iter().all(|r| r.2 == results[0].2),
        "tensors_per_layer": tensors.len(),
        "global_bytes_changed": globals_changed,
    });
    if let Some(path) = &args.report {
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&report).unwrap_or_default()) {
            eprintln!("eplb-fake-engine: {}: {e}", path.display());
            std::process::exit(ExitKind::Runtime.code());
        }
    }
    println!("{report}");
    std::process::exit(if wrong == 0 && disagreements == 0 && globals_changed == 0 {
        0
    } else {
        ExitKind::Runtime.code()
    });
}

/// The tensors of one layer: three per-expert tensors (one with padded rows) and a global one.
fn tensors(expert_floats: u64, experts: u32) -> Vec<TensorDesc> {
    vec![
        TensorDesc::expert("w13_weight", "f32", 4 * expert_floats),
        TensorDesc::expert("w13_weight_scale_inv", "f32", 12).strided(32),
        TensorDesc::global("w13_input_scale", "f32", 4, experts),
        TensorDesc::expert("w2_weight", "f8e4m3", expert_floats),
    ]
}

/// Rank `rank`'s view of every physical slot's load (`counts_kind` 1), `[layers, num_physical]`:
/// the pairs it routed there. Every rank routes its share of the step's tokens: slot `p`'s load
/// `L` is split as `L / ranks`, plus one for the first `L % ranks` ranks, so the ranks' views sum
/// to the slot's load exactly.
fn physical_counts(global: ndarray::ArrayView2<u64>, placement: &Placement, spr: usize, rank: usize) -> Array2<u64> {
    let ranks = (placement.num_replicas() / spr) as u64;
    let mut out = Array2::zeros((global.nrows(), placement.num_replicas()));
    for r in 0..ranks as usize {
        let local = slot_loads(global, placement, r, spr);
        out.slice_mut(ndarray::s![.., r * spr..(r + 1) * spr]).assign(&local);
    }
    out.mapv_inplace(|l| l / ranks + u64::from((rank as u64) < l % ranks));
    out
}

/// Bytes of `now` that differ from `before`.
fn changed(before: &[u8], now: &[u8]) -> u64 {
    before.iter().zip(now).filter(|(a, b)| a != b).count() as u64 + before.len().abs_diff(now.len()) as u64
}

/// Bytes of `layer`'s live slots on rank `r` that are not the expert its placement names.
fn check(rank: &EngineRank, layer: usize, r: usize, spr: usize) -> u64 {
    let p = rank.region.layout.num_physical();
    let eb = rank.region.layout.expert_bytes;
    let mut want = vec![0u8; eb];
    (0..spr)
        .map(|k| {
            let e = rank.phy2log()[layer * p + r * spr + k] as usize;
            fill(layer, e, &mut want);
            changed(&want, &rank.live(layer, k))
        })
        .sum()
}
