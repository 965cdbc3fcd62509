//! Watching a run: `plot` on reports (the real binary), and `/metrics` scraped while a paced
//! 4-rank `run` is in flight under `mpirun`.

use std::path::PathBuf;
use std::process::Command;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eplb-observe-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn plot(report: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_eplb-worker")).arg("plot").arg(report).arg("--output").arg(out).output().unwrap()
}

#[test]
fn plot_refuses_a_bad_report_with_exit_2_and_writes_nothing() {
    let d = tmpdir("plot-bad");
    for (name, text, want) in [
        ("missing.json", None, "cannot read report"),
        ("broken.json", Some("{\"series\": "), "not valid JSON"),
        ("old.json", Some("{\"steps\": 100, \"rounds\": []}"), "no `series` object"),
        ("ragged.json", Some(r#"{"series": {"step": [0, 1], "balancedness_static": [0.5], "balancedness_live": [0.6, 0.7]}}"#), "balancedness static has 1 values"),
    ] {
        let report = d.join(name);
        if let Some(t) = text {
            std::fs::write(&report, t).unwrap();
        }
        let out = plot(&report, &d.join("plots"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(want) && stderr.contains(name), "{name}: {stderr}");
        assert!(!d.join("plots").exists(), "{name}: nothing written for a bad report");
    }
}
