//! Host-path benchmark, run under MPI:
//!
//! ```sh
//! cargo build --release --examples
//! mpirun -n 4 --oversubscribe target/release/examples/host_bench
//! ```
//!
//! Every rank moves `slots` experts of `expert_bytes` to its left neighbour (a ring: every slot of
//! the layer changes), timed four ways, `reps` times each after warm-ups; medians on rank 0:
//! * `mpi one message`: the baseline: one MPI_Isend/MPI_Irecv of all the bytes, nothing else;
//! * `host transport`: [`HostTransport::exchange`], one message per expert, chunked;
//! * `migrate_layer`: the executor's whole layer: stage, verify, all-reduce of errors, commit;
//! * `allreduce L x E`: the manager's load all-reduce (DeepSeek-V3's 58 x 256 u64 and 1 flag),
//!   alone, as the baseline of the manager's per-step cost.
//!
//! Environment: `EPLB_BENCH_EXPERT_BYTES` (default 4 MiB), `EPLB_BENCH_SLOTS` (8 a rank),
//! `EPLB_BENCH_REPS` (20), `EPLB_BENCH_CHUNK` (1 MiB).

use std::time::Instant;

use eplb::collective::host::{HostTransport, Message, DEFAULT_CHUNK_BYTES};
use eplb::collective::{Comm, MpiRuntime};
use eplb::executor::{migrate_layer, HostExpertStore, LayerMigration};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Times `f` `reps` times after 3 warm-ups, each run started together (barrier); seconds.
fn time(world: &Comm, reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t = Vec::with_capacity(reps);
    for i in 0..reps + 3 {
        world.barrier().expect("barrier");
        let start = Instant::now();
        f();
        if i >= 3 {
            t.push(start.elapsed().as_secs_f64());
        }
    }
    // The slowest rank sets the pace: take the max over ranks of each median.
    let mine = median(t);
    let all = world.allreduce_u64(&[(mine * 1e9) as u64], eplb::collective::ReduceOp::Max).expect("allreduce");
    all[0] as f64 / 1e9
}

fn main() {
    let _mpi = MpiRuntime::init().expect("MPI_Init");
    let world = Comm::world().expect("world");
    let (rank, size) = (world.rank(), world.size());
    let eb = env("EPLB_BENCH_EXPERT_BYTES", 4 << 20);
    let spr = env("EPLB_BENCH_SLOTS", 8);
    let reps = env("EPLB_BENCH_REPS", 20);
    let chunk = env("EPLB_BENCH_CHUNK", DEFAULT_CHUNK_BYTES);
    let bytes = spr * eb;
    let (left, right) = ((rank + size - 1) % size, (rank + 1) % size);
    let print = |what: &str, s: f64, b: usize| {
        if rank == 0 {
            println!("  {what:<26} {:>12} {:>12.1} {:>12.3}", b, s * 1e6, b as f64 / s / 1e9);
        }
    };
    if rank == 0 {
        println!("# eplb host benchmark: {size} ranks, {spr} experts of {eb} B a rank to the left neighbour, chunk {chunk} B, {reps} reps (median, slowest rank)");
        println!("# {:<26} {:>12} {:>12} {:>12}", "what", "bytes/rank", "time(us)", "GB/s/rank");
    }

    // Baseline: one plain MPI message of all the bytes.
    let plain = HostTransport::new(world.dup().expect("dup"), usize::MAX);
    let send = vec![7u8; bytes];
    let mut recv = vec![0u8; bytes];
    let one = |peer| [Message { peer, tag: 0, offset: 0, len: bytes }];
    let s = time(&world, reps, || plain.exchange(&send, &one(left), &mut recv, &one(right)).expect("exchange"));
    print("mpi one message", s, bytes);

    // The host transport: one message per expert, chunked.
    let host = HostTransport::new(world.dup().expect("dup"), chunk);
    let per = |peer| (0..spr).map(|k| Message { peer, tag: k as i32, offset: k * eb, len: eb }).collect::<Vec<_>>();
    let (sends, recvs) = (per(left), per(right));
    let s = time(&world, reps, || host.exchange(&send, &sends, &mut recv, &recvs).expect("exchange"));
    print("host transport", s, bytes);

    // The executor: a whole layer whose every slot takes the right neighbour's expert.
    let num = spr * size;
    let mut row: Vec<usize> = (0..num).collect();
    let mine = |row: &[usize]| vec![row[rank * spr..(rank + 1) * spr].to_vec()];
    let store_comm = world.dup().expect("dup");
    let mut store = HostExpertStore::new(HostTransport::new(store_comm, chunk), eb, &mine(&row)).expect("host store");
    let (mut stage, mut verify) = (Vec::new(), Vec::new());
    let s = time(&world, reps, || {
        let new: Vec<usize> = (0..num).map(|s| row[(s + spr) % num]).collect();
        let m = LayerMigration::derive(0, &row, &new, spr, size);
        let stats = migrate_layer(&mut store, &world, &m, rank).expect("migrate");
        stage.push(stats.timing.transfer_seconds);
        verify.push(stats.timing.verify_seconds);
        row = new;
    });
    print("migrate_layer (verified)", s, bytes);
    print("  of which stage (rank 0)", median(stage), bytes);
    print("  of which verify (rank 0)", median(verify), bytes);

    // The manager's load all-reduce, alone.
    let loads = vec![1u64; 58 * 256];
    let s = time(&world, reps.max(200), || {
        world.allreduce_loads(&loads, &[false]).expect("allreduce");
    });
    print("allreduce 58x256 u64 + 1", s, loads.len() * 8 + 8);
}
