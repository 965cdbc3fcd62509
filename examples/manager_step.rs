//! The time-mode manager's CPU cost a step, without MPI: `observe` (the estimate) and `decide`
//! (ranking, plans, judging) at DeepSeek-V3's shape, one thread.
//!
//!   cargo run --release --example manager_step [STEPS]
//!
//! 58 layers x 256 experts on 64 GPUs, 320 slots; every step about 65,536 (token, expert)
//! assignments a layer, zipf-like with noise of a sampled count's size, the hot experts
//! relabelled every 100 steps.
//! The decided layers are applied as `run` does (one a step).

use std::time::Instant;

use eplb::manager::{CostModel, Manager, ManagerConfig, Mode};
use eplb::policy::{Placement, PlacementShape, PolicyConfig};
use ndarray::Array2;

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let (layers, experts, gpus) = (58, 256, 64);
    let shape = PlacementShape { num_replicas: experts + gpus, num_gpus: gpus, num_nodes: 1, num_groups: 1 };
    let config = ManagerConfig {
        enable: true,
        layers_per_step: 1,
        mode: Mode::Time,
        cost: CostModel::new(20.0, layers, 88_080_384, 200.0),
        move_cost: None,
        measure: Default::default(),
    };
    let policy = PolicyConfig { threads: 1, ..Default::default() };
    let mut manager = Manager::new(config, policy, shape, layers, experts);
    let mut live = Placement::trivial(layers, experts, shape.num_replicas);
    // Zipf weights (s = 0.8) as expected tokens of the 65,536 a layer draws a step.
    let w: Vec<f64> = (1..=experts).map(|i| (i as f64).powf(-0.8)).collect();
    let total: f64 = w.iter().sum();
    let expected: Vec<f64> = w.iter().map(|x| 65_536.0 * x / total).collect();
    let mut seed = 7u64;
    let mut next = || eplb::engine::lcg64(&mut seed) >> 32;
    let mut perm: Vec<Vec<usize>> = (0..layers).map(|_| (0..experts).collect()).collect();
    // The loads first, so that a profile of this program shows the manager.
    let loads: Vec<Array2<u64>> = (0..steps)
        .map(|step| {
            if step % 100 == 0 {
                for p in perm.iter_mut() {
                    for i in (1..experts).rev() {
                        p.swap(i, next() as usize % (i + 1));
                    }
                }
            }
            let mut load = Array2::<u64>::zeros((layers, experts));
            // Sampling noise of about a Poisson count's size: uniform within +-sqrt(3 x mean).
            for (l, p) in perm.iter().enumerate() {
                for (e, &m) in expected.iter().enumerate() {
                    let u = next() as f64 / 4294967296.0 - 0.5;
                    load[[l, p[e]]] = (m + u * 2.0 * (3.0 * m).sqrt()).round().max(0.0) as u64;
                }
            }
            load
        })
        .collect();
    let (mut observe_ns, mut decide_ns) = (Vec::new(), Vec::new());
    let mut switched = 0;
    for (step, load) in loads.into_iter().enumerate() {
        let t0 = Instant::now();
        manager.observe(load);
        let t1 = Instant::now();
        let d = manager.decide(step, false, &live).expect("decide").expect("time mode decides every step");
        manager.accept(step, d);
        let t2 = Instant::now();
        for u in manager.next_layers() {
            live.phy2log.row_mut(u.layer).assign(&ndarray::ArrayView1::from(&u.new_row));
            manager.committed(&u);
            switched += 1;
        }
        live = Placement::from_phy2log(live.phy2log, experts).expect("a valid placement");
        observe_ns.push((t1 - t0).as_nanos() as f64);
        decide_ns.push((t2 - t1).as_nanos() as f64);
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        (v[v.len() / 2] / 1e6, v.iter().sum::<f64>() / v.len() as f64 / 1e6)
    };
    let (om, oa) = stats(&mut observe_ns);
    let (dm, da) = stats(&mut decide_ns);
    println!(
        "# manager_step: {layers} layers x {experts} experts, {gpus} GPUs, {} slots, {steps} steps",
        shape.num_replicas
    );
    println!("#   part     median(ms)  mean(ms)");
    println!("    observe  {om:10.3} {oa:9.3}");
    println!("    decide   {dm:10.3} {da:9.3}");
    println!("# layers switched {switched}");
}
