//! `eplb-worker plan` end to end: the real binary, its output file, and its errors.

mod common;

use std::process::Command;

use common::{tmpdir, BIN};
use serde_json::Value;

/// Runs `eplb-worker plan ARGS`; returns (exit code, stderr).
fn plan(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).arg("plan").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// DeepSeek's README example: 2 layers x 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs.
const README_LOAD: &str = "90,132,40,61,104,165,39,4,73,56,183,86\n20,107,104,64,19,197,187,157,172,86,16,27\n";

#[test]
fn readme_example_matches_deepseek_exactly() {
    let d = tmpdir("readme");
    let load = d.join("load.csv");
    std::fs::write(&load, README_LOAD).unwrap();
    let out = d.join("placement.json");
    let sg = d.join("sglang.json");
    let (code, err) = plan(&[
        "--load",
        load.to_str().unwrap(),
        "--num-replicas",
        "16",
        "--num-gpus",
        "8",
        "--num-nodes",
        "2",
        "--num-groups",
        "4",
        "--policy",
        "deepseek",
        "--output",
        out.to_str().unwrap(),
        "--sglang-output",
        sg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("balancedness"), "summary on stderr: {err}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let expect = serde_json::json!([
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
    ]);
    assert_eq!(doc["physical_to_logical_map"], expect);
    assert_eq!(doc["logical_count"][0], serde_json::json!([1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]));
    assert_eq!(doc["logical_to_physical_map"][0][1], serde_json::json!([13, 15]));
    let m = &doc["metrics"];
    assert!(m["plan_seconds"].as_f64().is_some_and(f64::is_finite), "plan_seconds is a number: {m}");
    // Balancedness recomputed from the load and DeepSeek's placement: a replica carries its
    // expert's load over its copies, GPU g holds slots 2g and 2g + 1; mean over max GPU load.
    let per_layer: Vec<f64> = README_LOAD
        .lines()
        .zip(expect.as_array().unwrap())
        .map(|(row, phy2log)| {
            let load: Vec<f64> = row.split(',').map(|x| x.parse().unwrap()).collect();
            let slots: Vec<usize> = phy2log.as_array().unwrap().iter().map(|e| e.as_u64().unwrap() as usize).collect();
            let copies = |e: usize| slots.iter().filter(|&&x| x == e).count() as f64;
            let gpu: Vec<f64> = slots.chunks(2).map(|c| c.iter().map(|&e| load[e] / copies(e)).sum()).collect();
            gpu.iter().sum::<f64>() / gpu.len() as f64 / gpu.iter().cloned().fold(0.0, f64::max)
        })
        .collect();
    let theirs: Vec<f64> =
        m["balancedness_per_layer"].as_array().unwrap().iter().map(|b| b.as_f64().unwrap()).collect();
    assert_eq!(theirs.len(), 2);
    for (ours, theirs) in per_layer.iter().zip(&theirs) {
        assert!((ours - theirs).abs() < 1e-6, "balancedness per layer {theirs:?}, recomputed {per_layer:?}");
    }
    let b = m["balancedness"].as_f64().unwrap();
    assert!((b - (per_layer[0] + per_layer[1]) / 2.0).abs() < 1e-6, "balancedness {b}, recomputed {per_layer:?}");
    let sgdoc: Value = serde_json::from_str(&std::fs::read_to_string(&sg).unwrap()).unwrap();
    assert_eq!(sgdoc, serde_json::json!({ "physical_to_logical_map": expect }));
}

#[test]
fn previous_and_eval_iteration_are_reported() {
    let Some(shared) = common::shared_dir() else { return };
    let trace = shared.join("traces/harmoeny_qwen15moe_switch/expert_freq_qwen_policy_datasets.csv");
    let d = tmpdir("prev");
    let (p0, p1) = (d.join("p0.json"), d.join("p1.json"));
    let base = ["--load", trace.to_str().unwrap(), "--dataset", "wikitext", "--num-replicas", "64", "--num-gpus", "4"];
    let (code, err) = plan(&[&base[..], &["--iteration", "0", "--output", p0.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{err}");
    let (code, err) = plan(
        &[
            &base[..],
            &[
                "--iteration",
                "1",
                "--eval-iteration",
                "2",
                "--previous",
                p0.to_str().unwrap(),
                "--output",
                p1.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&p1).unwrap()).unwrap();
    let m = &doc["metrics"];
    assert!(m["copies_moved"].as_u64().is_some(), "{m}");
    assert!(m["eval"]["balancedness"].as_f64().unwrap() > 0.5, "{m}");
    assert!(m["eval"]["previous_balancedness"].as_f64().is_some(), "{m}");
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    let d = tmpdir("bad");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let good = write("good.csv", "1,2,3,4\n5,6,7,8\n");
    let out = d.join("out.json");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--load".into(), d.join("nope.json").to_str().unwrap().into()], "nope.json"),
        (vec!["--load".into(), write("bad.json", "{\"weight\": [[1, 2],")], "bad.json"),
        (vec!["--load".into(), write("ragged.csv", "1,2,3,4\n5,6\n")], "ragged.csv"),
        (vec!["--load".into(), write("neg.csv", "1,2,-3,4\n")], "neg.csv"),
        (vec!["--load".into(), write("nan.json", "{\"counts\": [[1, NaN]]}")], "nan.json"),
        (vec!["--load".into(), write("inf.csv", "1,inf,3,4\n")], "inf.csv"),
        (vec!["--load".into(), write("big.csv", "18446744073709551615,1,1,1\n")], "big.csv"),
        (vec!["--load".into(), write("empty.json", "{\"weight\": []}")], "empty.json"),
        (vec!["--load".into(), write("nokey.json", "{\"foo\": [[1]]}")], "nokey.json"),
    ];
    for (mut args, want) in cases {
        args.extend(["--num-replicas", "4", "--num-gpus", "2", "--output", out].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = plan(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: message should name {want}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Shapes that cannot be placed, with the fix named where it is obvious.
    for (extra, want) in [
        (&["--num-replicas", "6", "--num-gpus", "4"][..], "use 8"),
        (&["--num-replicas", "2", "--num-gpus", "2"][..], "at least 4"),
        (&["--num-replicas", "4", "--num-gpus", "2", "--num-groups", "3"][..], "divide"),
        (&["--num-replicas", "6", "--num-gpus", "3", "--num-nodes", "2"][..], "nodes"),
        (&["--num-replicas", "4", "--num-gpus", "0"][..], "at least 1"),
    ] {
        let args = [&["--load", good.as_str(), "--output", out][..], extra].concat();
        let (code, err) = plan(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want) && err.contains("good.csv"), "{args:?}: {err}");
    }
    // A bad --previous file.
    let prev = write("prev.json", "{\"physical_to_logical_map\": [[0, 1, 2]]}");
    let (code, err) =
        plan(&["--load", &good, "--num-replicas", "4", "--num-gpus", "2", "--previous", &prev, "--output", out]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("prev.json"), "{err}");
    // Out-of-range iteration.
    let (code, err) =
        plan(&["--load", &good, "--num-replicas", "4", "--num-gpus", "2", "--iteration", "3", "--output", out]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn help_describes_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_eplb-worker")).args(["plan", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in
        ["--load", "--num-replicas", "--num-gpus", "--num-nodes", "--num-groups", "--policy", "--previous", "--output"]
    {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
}
