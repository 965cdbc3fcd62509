//! `eplb-worker simulate` end to end on a small generated trace: a drifting, sampled load whose
//! hot experts jump half way. The default manager (only the cost-model flags set) must beat
//! DeepSeek re-planned at fixed cadences, come back within 0.01 of a fresh DeepSeek plan within
//! 128 steps of the jump, and its placements file must reproduce its score.

use std::path::{Path, PathBuf};
use std::process::Command;

use eplb::engine::splitmix64;
use eplb::policy::{self, PlacementShape, PolicyConfig, PolicyKind};
use eplb::simulate::competition_par;
use ndarray::Array2;
use serde_json::Value;

const LAYERS: usize = 6;
const EXPERTS: usize = 32;
const STEPS: usize = 640;
const JUMP: usize = 320;
const TOKENS: u64 = 4096;
const GPUS: usize = 8;
const REDUNDANT: usize = 8;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-simulate-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Expected shares `[layers][experts]` at `step`: two zipf-like distributions (over layer- and
/// phase-dependent expert orders) mixed with a weight that drifts; after `JUMP` the hot experts
/// are others (a different order).
fn shares(step: usize) -> Vec<Vec<f64>> {
    let phase = if step < JUMP { 0 } else { 1 };
    let order = |layer: usize, which: u64| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..EXPERTS).collect();
        idx.sort_by_key(|&e| splitmix64((layer as u64) << 32 | (phase as u64) << 16 | which << 8 | e as u64));
        idx
    };
    let mix = 0.5 + 0.4 * ((step as f64) / 150.0).sin();
    (0..LAYERS)
        .map(|l| {
            let mut p = vec![0.0; EXPERTS];
            for (which, weight) in [(0u64, mix), (1, 1.0 - mix)] {
                for (rank, &e) in order(l, which).iter().enumerate() {
                    p[e] += weight / (rank as f64 + 1.0);
                }
            }
            let sum: f64 = p.iter().sum();
            p.iter().map(|x| x / sum).collect()
        })
        .collect()
}

/// The sampled trace `[steps][layers][experts]`: `TOKENS` tokens a layer a step, each drawn from
/// the shares (a deterministic generator).
fn trace() -> Vec<Array2<u64>> {
    let mut state = 7u64;
    (0..STEPS)
        .map(|t| {
            let p = shares(t);
            let mut a = Array2::<u64>::zeros((LAYERS, EXPERTS));
            for l in 0..LAYERS {
                let cdf: Vec<f64> = p[l]
                    .iter()
                    .scan(0.0, |c, x| {
                        Some({
                            *c += x;
                            *c
                        })
                    })
                    .collect();
                for _ in 0..TOKENS {
                    state = splitmix64(state);
                    let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                    let e = cdf.partition_point(|&c| c < u).min(EXPERTS - 1);
                    a[[l, e]] += 1;
                }
            }
            a
        })
        .collect()
}

/// Writes `steps` as a little-endian u64 `.npy` `[steps, layers, experts]`.
fn write_npy(path: &Path, steps: &[Array2<u64>]) {
    let mut header =
        format!("{{'descr': '<u8', 'fortran_order': False, 'shape': ({}, {}, {}), }}", steps.len(), LAYERS, EXPERTS);
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for s in steps {
        for &v in s.iter() {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

fn case<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no case {name}"))
}

#[test]
fn default_manager_beats_deepseek_cadences_and_recovers_after_a_jump() {
    let d = tmpdir("jump");
    let (npy, report, placements) = (d.join("trace.npy"), d.join("report.json"), d.join("placements.jsonl"));
    let steps = trace();
    write_npy(&npy, &steps);
    let step_ms = format!("{}", 60_000.0 / STEPS as f64);
    let out = Command::new(env!("CARGO_BIN_EXE_eplb-worker"))
        .args(["simulate", "--trace", npy.to_str().unwrap(), "--num-gpus", "8", "--num-redundant-experts", "8"])
        .args(["--expert-bytes", "88080384", "--migration-gbps", "900", "--step-ms", &step_ms])
        .args(["--baseline", "deepseek@32", "--baseline", "deepseek@128", "--baseline", "deepseek@256"])
        .args(["--report", report.to_str().unwrap(), "--placements-out", placements.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("#wrong") && stdout.contains("deepseek@128"), "{stdout}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let ours = case(&r, "eplb");
    let modeled = |c: &Value| c["modeled_seconds"].as_f64().unwrap();
    for b in ["deepseek@32", "deepseek@128", "deepseek@256"] {
        assert!(
            modeled(ours) < modeled(case(&r, b)),
            "eplb {} vs {b} {}:\n{stdout}",
            modeled(ours),
            modeled(case(&r, b))
        );
    }

    // Recovery: a fresh DeepSeek plan of the new load (its expected shares), scored on the same
    // sampled steps, against ours from 128 steps after the jump on.
    let shape = PlacementShape { num_replicas: EXPERTS + REDUNDANT, num_gpus: GPUS, num_nodes: 1, num_groups: 1 };
    let spr = shape.slots_per_rank();
    let expected = Array2::from_shape_fn((LAYERS, EXPERTS), |(l, e)| (shares(JUMP)[l][e] * 1e9) as u64);
    let ds = PolicyConfig { kind: PolicyKind::Deepseek, threads: 1, move_cost: 0.0 };
    let fresh = policy::rebalance(expected.view(), &shape, None, &ds).unwrap();
    let per_step = ours["balancedness_per_step"].as_array().unwrap();
    for window in [(JUMP + 128)..(JUMP + 160), (STEPS - 32)..STEPS] {
        let n = window.len() as f64;
        let (mut theirs, mut mine) = (0.0, 0.0);
        for t in window.clone() {
            for l in 0..LAYERS {
                let (w, row, cnt) =
                    (steps[t].row(l).to_vec(), fresh.phy2log.row(l).to_vec(), fresh.logcnt.row(l).to_vec());
                theirs += 1.0 / competition_par(&w, &row, spr, &cnt) / LAYERS as f64 / n;
            }
            mine += per_step[t].as_f64().unwrap() / n;
        }
        assert!(mine >= theirs - 0.01, "steps {window:?}: balancedness {mine} vs fresh DeepSeek {theirs}");
    }

    // The placements file reproduces the score: replay it on the trace.
    let text = std::fs::read_to_string(&placements).unwrap();
    let mut live = Array2::<usize>::zeros((LAYERS, shape.num_replicas));
    let mut changes: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let row: Vec<usize> = v["phy2log"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        changes.push((v["step"].as_u64().unwrap() as usize, v["layer"].as_u64().unwrap() as usize, row));
    }
    assert!(changes.iter().take(LAYERS).all(|c| c.0 == 0), "the first lines are the initial placement");
    let (mut par_sum, mut changed, mut next) = (0.0, 0u64, 0);
    for (t, load) in steps.iter().enumerate() {
        while next < changes.len() && changes[next].0 <= t {
            let (_, l, row) = &changes[next];
            if changes[next].0 > 0 {
                changed += live.row(*l).iter().zip(row).filter(|(a, b)| a != b).count() as u64;
            }
            live.row_mut(*l).assign(&ndarray::ArrayView1::from(row));
            next += 1;
        }
        for l in 0..LAYERS {
            let row = live.row(l).to_vec();
            let mut cnt = vec![0usize; EXPERTS];
            row.iter().for_each(|&e| cnt[e] += 1);
            par_sum += competition_par(&load.row(l).to_vec(), &row, spr, &cnt);
        }
    }
    // Switches decided at the last step serve the step after the trace: moved, never scored.
    for (_, l, row) in &changes[next..] {
        changed += live.row(*l).iter().zip(row).filter(|(a, b)| a != b).count() as u64;
        live.row_mut(*l).assign(&ndarray::ArrayView1::from(row));
    }
    assert_eq!(changed, ours["changed_slots"].as_u64().unwrap());
    let mean_par = par_sum / (STEPS * LAYERS) as f64;
    assert!((mean_par - ours["mean_par"].as_f64().unwrap()).abs() < 1e-9, "{mean_par} vs {}", ours["mean_par"]);
}

#[test]
fn bad_input_exits_2() {
    let d = tmpdir("bad");
    let npy = d.join("t.npy");
    write_npy(&npy, &trace()[..4]);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_eplb-worker")).arg("simulate").args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["--trace", npy.to_str().unwrap(), "--num-gpus", "8", "--num-redundant-experts", "3"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["--trace", d.join("missing.npy").to_str().unwrap(), "--num-gpus", "8"]);
    assert!(code == Some(2) && err.contains("missing.npy"), "{err}");
    let (code, err) = run(&["--trace", npy.to_str().unwrap(), "--num-gpus", "8", "--baseline", "deepseek@0"]);
    assert!(code == Some(2) && err.contains("deepseek@0"), "{err}");
}
