//! Watching a run: `plot` on reports (the real binary), and `/metrics` scraped while a paced
//! 4-rank `run` is in flight under `mpirun`.

use std::process::Command;

mod common;
use common::{report_status, tmpdir, BIN};

fn plot(report: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    Command::new(BIN).arg("plot").arg(report).arg("--output").arg(out).output().unwrap()
}

#[test]
fn plot_refuses_a_bad_report_with_exit_2_and_writes_nothing() {
    let d = tmpdir("plot-bad");
    for (name, text, want) in [
        ("missing.json", None, "cannot read report"),
        ("broken.json", Some("{\"series\": "), "not valid JSON"),
        ("old.json", Some("{\"steps\": 100, \"rounds\": []}"), "no `series` object"),
        (
            "ragged.json",
            Some(r#"{"series": {"step": [0, 1], "balancedness_static": [0.5], "balancedness_live": [0.6, 0.7]}}"#),
            "balancedness static has 1 values",
        ),
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

/// The mpirun job of a test, killed if the test ends before it does (every wait here is bounded).
struct Job(std::process::Child);

impl Drop for Job {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `GET /metrics` with every step bounded: (status line, content type, body).
fn scrape(addr: &str) -> Result<(String, String, String), String> {
    use std::io::{Read, Write};
    use std::time::Duration;
    let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no end of headers")?;
    let status = head.lines().next().unwrap_or("").to_string();
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim()))
        .unwrap_or("")
        .to_string();
    Ok((status, content_type, body.to_string()))
}

/// The value of the sample `name` (with its labels, if any) in an exposition.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} not served:\n{body}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn metrics_answer_while_a_paced_run_is_in_flight_and_every_counter_matches_the_report() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let d = tmpdir("metrics");
    let report = d.join("report.json");
    let steps = 60u64;
    let child = common::mpirun(4)
        .arg(BIN)
        .args(["run", "--steps", &steps.to_string(), "--step-ms", "50", "--eplb-update-interval-steps", "10"])
        .args(["--expert-bytes", "65536", "--metrics-port", "0", "--metrics-linger", "10", "--report"])
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mpirun must be installed (scripts/test.sh installs Open MPI)");
    let mut job = Job(child);
    // The header names the address (port 0: any free port).
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = job.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| {
            panic!("no metrics line in the header:\n{}", out.join("\n"));
        });
        if let Some(a) = line.strip_prefix("#  metrics: http://").and_then(|r| r.strip_suffix("/metrics")) {
            break a.to_string();
        }
        out.push(line);
    };
    assert!(addr.starts_with("127.0.0.1:"), "loopback by default: {addr}");

    // In flight: some steps done, not all, and no report yet.
    let in_flight = loop {
        assert!(Instant::now() < deadline, "no step served in time");
        let (status, content_type, body) = scrape(&addr).unwrap_or_else(|e| panic!("scrape {addr}: {e}"));
        assert!(status.contains(" 200"), "{status}");
        assert_eq!(content_type, "text/plain; version=0.0.4");
        if sample(&body, "eplb_steps_total") >= 1.0 {
            break body;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let done = sample(&in_flight, "eplb_steps_total");
    assert!(
        done < steps as f64 && report_status(&report).as_deref() != Some("ok"),
        "the scrape came after the run: {done} steps"
    );
    let live = sample(&in_flight, "eplb_balancedness");
    assert!(live > 0.0 && live <= 1.0, "{live}");
    assert_eq!(in_flight.matches("eplb_layer_balancedness{layer=").count(), 8, "one series a layer");

    // Finished: the report says ok (it says "running" from the start), and the endpoint still
    // serves the final values (--metrics-linger).
    while report_status(&report).as_deref() != Some("ok") {
        assert!(Instant::now() < deadline && job.0.try_wait().unwrap().is_none(), "the run ended without a report");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, _, last) = scrape(&addr).unwrap_or_else(|e| panic!("final scrape {addr}: {e}"));
    let r = common::read_report(&report);
    let u = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("report {k}")) as f64;
    assert!(u("rebalances") >= 1.0 && u("bytes_moved") > 0.0, "the run moved nothing: {r}");
    for (metric, key) in [
        ("eplb_steps_total", "steps"),
        ("eplb_rebalances_total", "rebalances"),
        ("eplb_layers_updated_total", "layers_updated"),
        ("eplb_experts_moved_total", "experts_moved"),
        ("eplb_bytes_moved_total", "bytes_moved"),
        ("eplb_wrong_bytes_total", "wrong_bytes"),
    ] {
        assert_eq!(sample(&last, metric), u(key), "{metric} against the report's {key}");
    }
    let rounds = r["rounds"].as_array().unwrap().len() as f64;
    assert_eq!(sample(&last, "eplb_rounds_total"), rounds);
    assert_eq!(sample(&last, "eplb_plan_seconds_count"), rounds);
    assert_eq!(sample(&last, "eplb_migration_seconds_count"), u("layers_updated"));
    let secs = r["migration_seconds"].as_f64().unwrap();
    assert!((sample(&last, "eplb_migration_seconds_sum") - secs).abs() <= 1e-9 * secs.max(1.0));
    assert_eq!(sample(&last, "eplb_manager_step_seconds_count") + rounds, u("steps"));
    // The run's per-step series is in the report, one sample a step.
    assert_eq!(r["series"]["step"].as_array().unwrap().len() as u64, steps);

    // The job ends by itself once the linger is over.
    while job.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the job did not end");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(job.0.try_wait().unwrap().and_then(|s| s.code()), Some(0));

    // And `plot` draws the run's report: three SVG files.
    let out = plot(&report, &d.join("plots"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["balancedness.svg", "layers.svg", "migrations.svg"] {
        let svg = std::fs::read_to_string(d.join("plots").join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{name}");
    }
}

#[test]
fn a_metrics_port_in_use_stops_every_rank_with_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = common::mpirun_bounded(120, 2)
        .arg(BIN)
        .args(["run", "--steps", "5", "--expert-bytes", "8192", "--metrics-port", &port])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--metrics-port: cannot listen on 127.0.0.1:") && stderr.contains("choose a free port"),
        "{stderr}"
    );
    drop(taken);
}
