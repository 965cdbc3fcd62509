//! `eplb-worker bench-migrate`: the executor's migration benchmark.
//!
//! Every rank holds `slots_per_rank` slots per layer; the logical experts are
//! `num_ranks * (slots_per_rank - 1)` (DeepSeek-V3 at EP32 has 8 experts and 1 redundant slot
//! per GPU). Placement A is the trivial one; placement B is DeepSeek's plan for a real or
//! synthetic load, folded onto those experts. Each iteration migrates every layer from A to B or
//! back (ping-pong), so every iteration moves the same bytes and the live weights always verify.
//! Per rank it reports the bytes received, the transfer time and GB/s, and the stall: the time
//! from "plan ready" to "committed" (transfer, verification, agreement, commit).

use crate::exit::{ExitKind, Failure};
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use ndarray::Array2;
use serde_json::json;

use crate::collective::{Comm, MpiRuntime};
use crate::engine::synthetic::DriftingZipf;
use crate::executor::factory::StoreError;
use crate::executor::fault::{Faulty, StoreFaults};
use crate::executor::{migrate_layer, ExecError, ExpertStore, LayerMigration};
use crate::gpu::nccl::NcclComm;
use crate::gpu::open_local_gpu;
use crate::gpu::store::NcclTuning;
use crate::load::{self, TraceSelect};
use crate::output::named;
use crate::policy::{self, Placement, PlacementShape, PolicyConfig, PolicyKind};
use crate::rank::{Topology, TopologyError};

/// Arguments of `eplb-worker bench-migrate`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Expert sizes to sweep, in MiB (44 MiB is a DeepSeek-V3 expert in fp8: 3 x 7168 x 2048 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = [4.0, 16.0, 44.0, 64.0], value_parser = crate::limits::positive)]
    pub expert_mib: Vec<f64>,
    /// Slots per GPU (experts per GPU plus one redundant slot).
    #[arg(long, default_value_t = 9)]
    pub slots_per_rank: usize,
    /// Layers held and migrated per iteration, one after the other (58 for DeepSeek-V3).
    #[arg(long, default_value_t = 1)]
    pub layers: usize,
    /// Timed iterations per size (after one warm-up); each migrates every layer once.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// The load the new placement is planned for (plan formats); default: the built-in load.
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
    /// Which layer of --load to plan from.
    #[arg(long, default_value_t = 0)]
    pub load_layer: usize,
    /// Average bytes one rank moves per NCCL group, in MiB.
    #[arg(long, default_value_t = 1024.0, value_parser = crate::limits::positive)]
    pub group_mib: f64,
    /// Largest piece of one transfer in a group, in MiB (0: whole experts).
    #[arg(long, default_value_t = 0.0, value_parser = crate::limits::non_negative)]
    pub chunk_mib: f64,
    /// Register the buffers with NCCL (zero-copy send/recv on NVLink).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub register: bool,
    /// Write the transfer pattern (for scripts/bench_torch_p2p.py) to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub pattern_out: Option<PathBuf>,
    /// Write the results as JSON to this file (rank 0).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Test hook: this rank flips a staged byte in the first migration (verification must fail,
    /// nothing may be committed, the live weights must still verify).
    #[arg(long, hide = true)]
    pub fault_corrupt_rank: Option<usize>,
    /// Transport; only nccl is benchmarked here.
    #[arg(long, value_enum, default_value_t = BenchTransport::Nccl)]
    pub transport: BenchTransport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTransport {
    Nccl,
}

/// The benchmark's errors: those it shares with a store's set-up (the GPU, the executor, MPI, bad
/// input) are a [`StoreError`], with its messages and exit kinds.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
}

impl BenchError {
    /// Bad input: flags or a load that cannot work (the message names the flag or file).
    fn input(what: impl Into<String>) -> BenchError {
        BenchError::Store(StoreError::Config(what.into()))
    }
}

/// `?` on a [`StoreError`] and on every error it holds.
impl<E> From<E> for BenchError
where
    StoreError: From<E>,
{
    fn from(e: E) -> BenchError {
        BenchError::Store(e.into())
    }
}

impl Failure for BenchError {
    fn kind(&self) -> ExitKind {
        match self {
            BenchError::Store(e) => e.kind(),
            BenchError::Output(e) => e.kind(),
            BenchError::Topology(_) => ExitKind::Runtime,
        }
    }
}

/// The two placements of the benchmark: (trivial, planned), each `[num_replicas]`.
fn placements(args: &BenchArgs, num_ranks: usize) -> Result<(Vec<usize>, Vec<usize>, String), BenchError> {
    let spr = args.slots_per_rank;
    if spr < 2 {
        return Err(BenchError::input("--slots-per-rank must be at least 2"));
    }
    let num_logical = num_ranks * (spr - 1);
    let num_replicas = num_ranks * spr;
    let (row, what): (Vec<u64>, String) = match &args.load {
        Some(path) => {
            let trace =
                load::read_trace(path, &TraceSelect::default()).map_err(|e| BenchError::input(e.to_string()))?;
            let w = trace.summed().map_err(|e| BenchError::input(e.to_string()))?;
            if args.load_layer >= w.nrows() {
                return Err(BenchError::input(format!(
                    "--load-layer {} but the load has {} layers",
                    args.load_layer,
                    w.nrows()
                )));
            }
            (w.row(args.load_layer).to_vec(), format!("{} layer {}", path.display(), args.load_layer))
        }
        None => (DriftingZipf::new(1, num_logical, 0).step(0).row(0).to_vec(), "the built-in load".into()),
    };
    // Fold the load onto num_logical experts: expert j gets every e with e % num_logical == j.
    let mut folded = vec![0u64; num_logical];
    for (e, &w) in row.iter().enumerate() {
        folded[e % num_logical] = folded[e % num_logical].saturating_add(w);
    }
    let weight = Array2::from_shape_vec((1, num_logical), folded).expect("shape matches");
    let shape = PlacementShape { num_replicas, num_gpus: num_ranks, num_nodes: 1, num_groups: 1 };
    let config = PolicyConfig { kind: PolicyKind::DEEPSEEK, threads: 1, ..PolicyConfig::default() };
    let planned =
        policy::rebalance(weight.view(), &shape, None, &config).map_err(|e| BenchError::input(e.to_string()))?;
    let trivial = Placement::trivial(1, num_logical, num_replicas);
    Ok((
        trivial.phy2log.row(0).to_vec(),
        planned.phy2log.row(0).to_vec(),
        format!("{what}, folded to {num_logical} experts"),
    ))
}

/// One rank's timings of one layer's migration.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    recv_bytes: u64,
    transfer_s: f64,
    verify_s: f64,
    stall_s: f64,
}

/// Migrates one layer through the executor (stage, verify, agree, commit) and times it.
fn migrate(store: &mut dyn ExpertStore, world: &Comm, m: &LayerMigration, rank: usize) -> Result<Sample, ExecError> {
    let stats = migrate_layer(store, world, m, rank)?;
    Ok(Sample {
        recv_bytes: (m.for_rank(rank).recvs.len() * store.expert_bytes()) as u64,
        transfer_s: stats.timing.transfer_seconds,
        verify_s: stats.timing.verify_seconds,
        stall_s: stats.seconds,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark on every rank; rank 0 prints the tables.
pub fn run_bench(args: &BenchArgs) -> Result<(), BenchError> {
    let outputs = named([("--pattern-out", args.pattern_out.as_deref()), ("--report", args.report.as_deref())]);
    crate::output::check_outputs(&outputs, &named([("--load", args.load.as_deref())]))?;
    let _runtime = MpiRuntime::init()?;
    let world = Comm::world()?;
    let (rank, size) = (world.rank(), world.size());
    let topo = Topology::discover(&world, None)?;
    let (a, b, what) = placements(args, size)?;
    let spr = args.slots_per_rank;
    let forward = LayerMigration::derive(0, &a, &b, spr, topo.local_size);
    let backward = LayerMigration::derive(0, &b, &a, spr, topo.local_size);
    if rank == 0 {
        if let Some(path) = &args.pattern_out {
            let t = |m: &LayerMigration| {
                m.transfers.iter().map(|t| [t.src_rank, t.src_slot, t.dst_rank, t.dst_slot]).collect::<Vec<_>>()
            };
            let doc =
                json!({ "num_ranks": size, "slots_per_rank": spr, "forward": t(&forward), "backward": t(&backward) });
            crate::output::write_json("--pattern-out", path, &doc)?;
        }
    }
    let gpu = open_local_gpu(topo.local_rank)?;
    let devices = topo.devices_block(&world, &format!("cuda:{} {}", gpu.ordinal, gpu.name))?;
    if rank == 0 {
        println!("# eplb bench-migrate: {size} ranks, transport nccl, {spr} slots/rank, {} layer(s)", args.layers);
        println!("# plan: trivial -> deepseek for {what}");
        println!(
            "# transfers per layer: {} forward, {} backward; NCCL group {} MiB/rank, buffers {}registered, chunk {}",
            forward.transfers.len(),
            backward.transfers.len(),
            args.group_mib,
            if args.register { "" } else { "not " },
            if args.chunk_mib > 0.0 { format!("{} MiB", args.chunk_mib) } else { "whole experts".into() }
        );
        print!("{devices}");
    }
    let nccl = NcclComm::bootstrap(&world)?;
    let tuning = NcclTuning::from_mib(args.group_mib, args.chunk_mib, args.register);
    let mut parts = Some((gpu, nccl));
    let mut results = Vec::new();
    if rank == 0 {
        println!("#");
        println!(
            "# {:>10} {:>5} {:>6} {:>10} {:>9} {:>8} {:>9} {:>9} {:>9} {:>10} {:>7}",
            "expert_MiB",
            "rank",
            "recv",
            "recv_MiB",
            "xfer_ms",
            "GB/s",
            "verify_ms",
            "stall_ms",
            "stall_max",
            "total_ms",
            "#wrong"
        );
    }
    for &mib in &args.expert_mib {
        let expert_bytes = ((mib * (1 << 20) as f64) as usize) / 8 * 8;
        // One store per size; the previous one's memory is freed first.
        let (gpu, nccl) = parts.take().expect("the GPU and communicator come back after each size");
        let initial: Vec<Vec<usize>> = (0..args.layers).map(|_| a[rank * spr..(rank + 1) * spr].to_vec()).collect();
        let faults = StoreFaults { corrupt_next_stage: args.fault_corrupt_rank == Some(rank), ..Default::default() };
        // Undecorated unless a fault is asked for: `Faulty` without faults is the store itself.
        let mut store =
            Faulty::new(crate::executor::factory::device_store(gpu, nccl, &initial, expert_bytes, tuning)?, faults);
        let layer_migrations = |fwd: bool| -> Vec<LayerMigration> {
            (0..args.layers)
                .map(|l| {
                    let (old, new) = if fwd { (&a, &b) } else { (&b, &a) };
                    LayerMigration::derive(l, old, new, spr, topo.local_size)
                })
                .collect()
        };
        let (fwd, bwd) = (layer_migrations(true), layer_migrations(false));
        let mut samples: Vec<Sample> = Vec::new();
        let mut pass_seconds = Vec::new();
        for it in 0..=args.iters {
            let ms = if it % 2 == 0 { &fwd } else { &bwd };
            world.barrier()?;
            let t0 = Instant::now();
            let mut pass = Vec::new();
            for m in ms {
                match migrate(&mut store, &world, m, rank) {
                    Ok(sample) => pass.push(sample),
                    Err(e @ ExecError::Verification { .. }) => {
                        // Nothing was committed: the live slots must still hold the old experts.
                        let old = if it % 2 == 0 { &a } else { &b };
                        let live_wrong = store.verify_live(m.layer, &old[rank * spr..(rank + 1) * spr])?;
                        eprintln!(
                            "# rank {rank}: {e}; live weights of layer {} verify with {live_wrong} wrong bytes",
                            m.layer
                        );
                        return Err(e.into());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            world.barrier()?;
            if it > 0 {
                pass_seconds.push(t0.elapsed().as_secs_f64());
                samples.extend(pass);
            }
        }
        // The live weights of every layer must verify after the last pass.
        let last = if args.iters.is_multiple_of(2) { &b } else { &a };
        let mut live_wrong = 0;
        for l in 0..args.layers {
            live_wrong += store.verify_live(l, &last[rank * spr..(rank + 1) * spr])?;
        }
        // Per-sample GB/s: the two directions may receive different amounts on a rank.
        let gbs: Vec<f64> =
            samples.iter().filter(|s| s.transfer_s > 0.0).map(|s| s.recv_bytes as f64 / s.transfer_s / 1e9).collect();
        let mean_recv = samples.iter().map(|s| s.recv_bytes as f64).sum::<f64>() / samples.len().max(1) as f64;
        let row = [
            mean_recv,
            median(samples.iter().map(|s| s.transfer_s).collect()),
            median(samples.iter().map(|s| s.verify_s).collect()),
            median(samples.iter().map(|s| s.stall_s).collect()),
            samples.iter().map(|s| s.stall_s).fold(0.0, f64::max),
            median(pass_seconds.clone()),
            live_wrong as f64,
            mean_recv / expert_bytes.max(1) as f64,
            median(gbs),
        ];
        let bits: Vec<u64> = row.iter().map(|v| v.to_bits()).collect();
        let all: Vec<f64> = world.allgather_u64(&bits)?.into_iter().flatten().map(f64::from_bits).collect();
        if rank == 0 {
            for r in 0..size {
                let v = &all[r * row.len()..(r + 1) * row.len()];
                let gbs = v[8];
                println!(
                    "  {:>10.1} {:>5} {:>6.1} {:>10.1} {:>9.3} {:>8.1} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>7}",
                    mib,
                    r,
                    v[7],
                    v[0] / (1 << 20) as f64,
                    v[1] * 1e3,
                    gbs,
                    v[2] * 1e3,
                    v[3] * 1e3,
                    v[4] * 1e3,
                    v[5] * 1e3,
                    v[6] as u64
                );
                results.push(json!({
                    "expert_mib": mib, "rank": r, "recv_experts": v[7], "recv_bytes": v[0],
                    "transfer_ms_median": v[1] * 1e3, "gb_per_s": gbs, "verify_ms_median": v[2] * 1e3,
                    "stall_ms_median": v[3] * 1e3, "stall_ms_max": v[4] * 1e3, "pass_ms_median": v[5] * 1e3,
                    "wrong_bytes": v[6] as u64, "layers": args.layers,
                }));
            }
        }
        parts = Some(store.into_inner().into_parts());
    }
    if let Some((gpu, nccl)) = parts {
        // The communicator goes before the context it lives in.
        drop(nccl);
        drop(gpu);
    }
    drop(world);
    if rank == 0 {
        if let Some(path) = &args.report {
            let doc = json!({ "world_size": size, "slots_per_rank": spr, "layers": args.layers, "results": results });
            crate::output::write_json("--report", path, &doc)?;
        }
    }
    Ok(())
}
