//! Policy speed at DeepSeek-V3 scale: 58 layers x 256 experts, zipf-like loads.
//!
//! `cargo bench --bench plan` prints, for each shape, policy, previous placement (none, or the
//! policy's own plan of a load 5 drift steps away) and thread count, the median, min and p90 wall
//! time of one whole 58-layer plan over many repetitions (nothing else is timed: no I/O), and the
//! plan's mean balancedness. `EPLB_BENCH_REPS` sets the repetitions, `EPLB_BENCH_POLICY` picks one
//! policy, `EPLB_BENCH_MOVE_COST` the incremental policy's move cost. Run it on an otherwise idle
//! machine; on shared machines compare medians and ratios only.

use std::time::Instant;

use eplb::engine::synthetic::DriftingZipf;
use eplb::policy::{self, metrics, PlacementShape, PolicyConfig, PolicyKind, Price};

fn main() {
    let reps: usize = std::env::var("EPLB_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(300);
    let move_cost: f64 = std::env::var("EPLB_BENCH_MOVE_COST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(policy::incremental::DEFAULT_MOVE_COST);
    let zipf = DriftingZipf::new(58, 256, 1);
    let weight = zipf.step(0);
    let prev_weight = zipf.step(5);
    // After a jump: the live placement was made for an unrelated load (another seed).
    let jump_weight = DriftingZipf::new(58, 256, 99).step(0);
    let shapes = [
        (
            "R=288 hier 8 groups 4 nodes 32 GPUs",
            PlacementShape { num_replicas: 288, num_gpus: 32, num_nodes: 4, num_groups: 8 },
        ),
        ("R=320 global 64 GPUs", PlacementShape { num_replicas: 320, num_gpus: 64, num_nodes: 1, num_groups: 1 }),
        ("R=384 global 128 GPUs", PlacementShape { num_replicas: 384, num_gpus: 128, num_nodes: 1, num_groups: 1 }),
    ];
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "# eplb policy benchmark: 58 layers x 256 experts, zipf-like load, {reps} reps, {cores} cores, move cost {move_cost}"
    );
    println!(
        "# {:<38} {:>12} {:>9} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>8}",
        "shape", "policy", "previous", "threads", "median_ms", "min_ms", "p90_ms", "balance", "moved", "cpu_ms"
    );
    println!("#   (cpu_ms: median CPU time of the planning thread, one thread only: comparable on a busy machine)");
    for (name, shape) in &shapes {
        for kind in policy_kinds() {
            let plan_for = |w: &ndarray::Array2<u64>| {
                let cfg = PolicyConfig { kind, move_cost: Price::from_fraction(move_cost), ..PolicyConfig::default() };
                policy::rebalance(w.view(), shape, None, &cfg).expect("valid shape")
            };
            let (previous, jumped) = (plan_for(&prev_weight), plan_for(&jump_weight));
            for (label, prev) in [("no", None), ("yes", Some(&previous)), ("jump", Some(&jumped))] {
                for threads in [1, 0] {
                    let config = PolicyConfig { kind, threads, move_cost: Price::from_fraction(move_cost) };
                    let mut times = Vec::with_capacity(reps);
                    let mut cpu = Vec::with_capacity(reps);
                    let mut plan = None;
                    for _ in 0..reps + 5 {
                        let (start, cpu_start) = (Instant::now(), thread_cpu_ms());
                        let p = policy::rebalance(weight.view(), shape, prev, &config).expect("valid shape");
                        times.push(start.elapsed().as_secs_f64() * 1e3);
                        cpu.push(thread_cpu_ms() - cpu_start);
                        plan = Some(std::hint::black_box(p));
                    }
                    let plan = plan.expect("at least one repetition");
                    let (spr, gpn) = (shape.slots_per_rank(), shape.gpus_per_node());
                    let balance = metrics::balance_report(weight.view(), plan.phy2log.view(), spr, gpn).balancedness;
                    // Expert copies moved from the previous placement (all of them without one).
                    let moved = prev.map_or(plan.phy2log.len(), |p| {
                        metrics::copies_moved_all(p.phy2log.view(), plan.phy2log.view(), spr)
                    });
                    let mut t = times.split_off(5);
                    t.sort_by(|a, b| a.total_cmp(b));
                    let mut c = cpu.split_off(5);
                    c.sort_by(|a, b| a.total_cmp(b));
                    // The thread's CPU time means something with one thread only.
                    let cpu_label = if threads == 1 { format!("{:.3}", c[c.len() / 2]) } else { "-".to_string() };
                    let threads_label = if threads == 0 { format!("{cores}") } else { threads.to_string() };
                    println!(
                        "  {:<38} {:>12} {:>9} {:>8} {:>10.3} {:>10.3} {:>10.3} {:>8.4} {:>7} {:>8}",
                        name,
                        format!("{kind:?}").to_lowercase(),
                        label,
                        threads_label,
                        t[t.len() / 2],
                        t[0],
                        t[t.len() * 9 / 10],
                        balance,
                        moved,
                        cpu_label
                    );
                }
            }
        }
    }
}

/// Every policy, or only `$EPLB_BENCH_POLICY`.
fn policy_kinds() -> Vec<PolicyKind> {
    let only = std::env::var("EPLB_BENCH_POLICY").ok();
    PolicyKind::all()
        .filter(|k| only.as_deref().is_none_or(|o| PolicyKind::from_name(&o.to_lowercase()) == Some(*k)))
        .collect()
}

/// CPU time of the calling thread, ms.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec; CLOCK_THREAD_CPUTIME_ID is supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}
