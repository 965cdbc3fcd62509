use serde_json::json;

use super::*;

/// A report as `run` writes it: 20 steps, rounds at 4 and 14 (the second selects nothing).
fn run_report() -> Value {
    let steps: Vec<usize> = (0..20).collect();
    json!({
        "world_size": 4, "num_layers": 2, "num_logical": 8, "policy": "incremental", "load": "built-in",
        "series": {
            "stride": 1,
            "step": steps,
            "balancedness_static": steps.iter().map(|_| 0.6).collect::<Vec<_>>(),
            "balancedness_live": steps.iter().map(|&s| if s < 5 { 0.6 } else { 0.9 }).collect::<Vec<_>>(),
            "layer_balancedness_static": steps.iter().map(|_| vec![0.5, 0.7]).collect::<Vec<_>>(),
            "layer_balancedness_live": steps.iter().map(|&s| if s < 5 { vec![0.5, 0.7] } else { vec![0.9, 0.9] }).collect::<Vec<_>>(),
        },
        "rounds": [
            {"step": 4, "selected": [1, 0]},
            {"step": 14, "selected": []},
        ],
        "layers": [
            {"step": 4, "layer": 1, "bytes": 3 << 20, "seconds": 0.002},
            {"step": 5, "layer": 0, "bytes": 1 << 20, "seconds": 0.001},
            {"step": 5, "layer": 0, "bytes": 1 << 20, "seconds": 0.004},
        ],
    })
}

#[test]
fn a_run_report_gives_series_rounds_and_moves() {
    let p = PlotInput::from_report(&run_report()).unwrap();
    assert_eq!((p.stride, p.step.len()), (1, 20));
    assert_eq!(p.rebalance_steps, vec![4], "the round that selected nothing is not a rebalance");
    assert_eq!(p.moves.len(), 1);
    let m = &p.moves[0];
    assert_eq!((m.step, m.bytes), (4, 5 << 20));
    assert!((m.seconds - 0.007).abs() < 1e-12 && (m.worst_step_seconds - 0.005).abs() < 1e-12);
    assert!(p.title.contains("4 ranks") && p.title.contains("2 layers x 8 experts"), "{}", p.title);
    assert!(p.references.is_empty());
    assert_eq!(p.balancedness_static.as_ref().map(Vec::len), Some(20));
}

#[test]
fn a_simulation_report_with_a_baseline_and_per_round_moves() {
    let r = json!({
        "series": {"step": [0, 10, 20], "balancedness_static": [0.5, 0.5, 0.5],
                   "balancedness_live": [0.5, 0.8, 0.85], "balancedness_baseline": [0.9, 0.9, 0.9], "stride": 10},
        "rounds": [{"step": 9, "layers_selected": 3, "bytes_moved": 1000, "stall_seconds": 0.5}],
    });
    let p = PlotInput::from_report(&r).unwrap();
    assert_eq!(p.references, vec![("re-plan every step (reference)".to_string(), vec![0.9, 0.9, 0.9])]);
    assert_eq!(p.rebalance_steps, vec![9]);
    assert_eq!(p.moves, vec![RoundMoves { step: 9, bytes: 1000, seconds: 0.5, worst_step_seconds: 0.5 }]);
    assert!(p.layer_balancedness_live.is_none());
}

#[test]
fn a_simulate_report_with_cases_long_series_averaged_down() {
    let per_step = |b: f64| (0..2500).map(|_| b).collect::<Vec<_>>();
    let r = json!({
        "trace": "/data/traces/drift.npy", "num_gpus": 16, "num_layers": 58, "num_logical": 256,
        "cases": [
            {"name": "eplb", "balancedness_per_step": per_step(0.9)},
            {"name": "deepseek@1024", "balancedness_per_step": per_step(0.7)},
            {"name": "floor", "balancedness_per_step": per_step(0.95)},
        ],
    });
    let p = PlotInput::from_report(&r).unwrap();
    assert_eq!((p.stride, p.step.len(), p.step[1]), (3, 834, 3));
    assert_eq!(p.live_name, "eplb");
    assert!(p.balancedness_static.is_none() && p.balancedness_live.iter().all(|&b| (b - 0.9).abs() < 1e-12));
    let names: Vec<&str> = p.references.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["deepseek@1024", "floor"]);
    assert!(p.title.contains("16 GPUs (simulated)") && p.title.ends_with("drift.npy"), "{}", p.title);
    let dir = std::env::temp_dir().join(format!("eplb-plot-sim-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("plots")).unwrap();
    let written = charts::draw_all(&p, &dir.join("plots")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(written.len(), 1, "no layers and no moves: the balancedness chart only");
}

#[test]
fn many_rounds_are_summed_into_bins_and_drawn_as_a_rug() {
    // A layer switch at every one of 600 steps, 1 MiB and 2 ms each.
    let steps: Vec<usize> = (0..600).collect();
    let r = json!({
        "series": {"step": steps, "balancedness_static": vec![0.6; 600], "balancedness_live": vec![0.9; 600]},
        "rounds": steps.iter().map(|&s| json!({"step": s, "selected": [0]})).collect::<Vec<_>>(),
        "layers": steps.iter().map(|&s| json!({"step": s, "bytes": 1 << 20, "seconds": 0.002})).collect::<Vec<_>>(),
    });
    let p = PlotInput::from_report(&r).unwrap();
    assert_eq!((p.moves.len(), p.rebalance_steps.len()), (600, 600));
    let dir = std::env::temp_dir().join(format!("eplb-plot-bins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    charts::draw_all(&p, &dir).unwrap();
    let mig = std::fs::read_to_string(dir.join("migrations.svg")).unwrap();
    // 600 steps in bins of 5: 120 bars of 5 MiB, 10 ms.
    assert!(mig.contains("per 5 steps (total 600.0 MiB)") && mig.contains("bars of 5 steps"), "{}", &mig[..2000]);
    let bal = std::fs::read_to_string(dir.join("balancedness.svg")).unwrap();
    assert!(bal.contains("a round or a layer switch (600)"));
}

#[test]
fn bad_reports_say_what_is_wrong() {
    let mut r = run_report();
    r["series"]["balancedness_live"] = json!([0.5]);
    assert!(PlotInput::from_report(&r).unwrap_err().contains("balancedness live has 1 values, series.step 20"));
    let mut r = run_report();
    r["series"]["layer_balancedness_live"][3] = json!([0.5]);
    assert!(PlotInput::from_report(&r).unwrap_err().contains("rectangular"));
    let mut r = run_report();
    r["series"]["step"] = json!([]);
    assert!(PlotInput::from_report(&r).unwrap_err().contains("no step in the series"));
    assert!(PlotInput::from_report(&json!({"steps": 3})).unwrap_err().contains("no `series`"));
    assert!(PlotInput::from_report(&json!({"cases": [{"name": "eplb"}]}))
        .unwrap_err()
        .contains("balancedness_per_step"));
    let mut r = run_report();
    r["series"]["balancedness_static"][0] = json!("x");
    assert!(PlotInput::from_report(&r).unwrap_err().contains("is not a number"));
}

#[test]
fn the_charts_are_well_formed_svg_with_axes_and_legends() {
    let dir = std::env::temp_dir().join(format!("eplb-plot-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let report = dir.join("report.json");
    std::fs::write(&report, run_report().to_string()).unwrap();
    let written = run_plot(&PlotArgs { report, output: dir.join("plots") }).unwrap();
    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["balancedness.svg", "layers.svg", "migrations.svg"]);
    for path in &written {
        let text = std::fs::read_to_string(path).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        assert!(texts.iter().any(|t| t.contains("step")), "{}: no x axis title", path.display());
    }
    let bal = std::fs::read_to_string(dir.join("plots/balancedness.svg")).unwrap();
    for want in [
        "static: the initial placement",
        "live: the placement eplb keeps",
        "a round or a layer switch (1)",
        "mean 0.825",
    ] {
        assert!(bal.contains(want), "balancedness.svg lacks {want:?}");
    }
    assert!(std::fs::read_to_string(dir.join("plots/migrations.svg")).unwrap().contains("total 5.0 MiB"));
    // Nothing left behind but the charts.
    assert_eq!(std::fs::read_dir(dir.join("plots")).unwrap().count(), 3);
}

#[test]
fn a_missing_or_invalid_report_is_bad_input() {
    let dir = std::env::temp_dir().join(format!("eplb-plot-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = PlotArgs { report: dir.join("none.json"), output: dir.join("p") };
    let e = run_plot(&missing).unwrap_err();
    assert!(e.to_string().contains("cannot read report") && e.exit_code() == 2, "{e}");
    std::fs::write(dir.join("bad.json"), "{").unwrap();
    let e = run_plot(&PlotArgs { report: dir.join("bad.json"), output: dir.join("p") }).unwrap_err();
    assert!(e.to_string().contains("not valid JSON") && e.exit_code() == 2, "{e}");
}

#[test]
fn a_symlink_planted_at_the_temporary_name_is_never_written_through() {
    let d = std::env::temp_dir().join(format!("eplb-plot-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let victim = d.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    // The temporary name of balancedness.svg is predictable: plant a link there.
    let planted = d.join(format!("balancedness.svg.{}.tmp", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let input = PlotInput::from_report(&run_report()).unwrap();
    let result = charts::draw_all(&input, &d);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the link's target was overwritten");
    let e = result.expect_err("the exclusive create refuses the planted name");
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
}

#[test]
fn a_report_that_is_a_fifo_is_refused_at_once() {
    let d = std::env::temp_dir().join(format!("eplb-plot-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let fifo = d.join("report.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Without a writer, reading the FIFO would block forever.
    let args = PlotArgs { report: fifo, output: d.join("out") };
    let e = run_plot(&args).expect_err("a FIFO is not a report");
    assert!(e.exit_code() == 2 && e.to_string().contains("FIFO"), "{e}");
}

#[test]
fn moves_are_summed_per_round_and_step_in_any_order_of_rounds() {
    // Layer rows of two rounds (at 10 and 20), two steps of the first, out of step order.
    let rows = json!([
        {"step": 11, "layer": 0, "bytes": 1, "seconds": 0.5},
        {"step": 21, "layer": 0, "bytes": 4, "seconds": 0.25},
        {"step": 10, "layer": 1, "bytes": 2, "seconds": 0.25},
        {"step": 11, "layer": 1, "bytes": 8, "seconds": 0.5},
        {"step": 5, "layer": 1, "bytes": 16, "seconds": 0.125},
    ]);
    let rows = rows.as_array().unwrap();
    for rounds in [vec![10, 20], vec![20, 10]] {
        let m = moves_from_layers(rows, &rounds).unwrap();
        let got: Vec<(usize, u64, f64, f64)> =
            m.iter().map(|m| (m.step, m.bytes, m.seconds, m.worst_step_seconds)).collect();
        if rounds == vec![10, 20] {
            // Step 5 precedes every round: its own.
            assert_eq!(got, vec![(5, 16, 0.125, 0.125), (10, 11, 1.25, 1.0), (20, 4, 0.25, 0.25)]);
        } else {
            // Unsorted rounds keep the old rule: the last listed round at or before the step
            // (10 for step 21 too).
            assert_eq!(got, vec![(5, 16, 0.125, 0.125), (10, 15, 1.5, 1.0)]);
        }
    }
}
