//! `run --metrics-port PORT`: rank 0 serves the Prometheus text exposition format at `/metrics`.
//!
//! The format is the `prometheus` crate's [`TextEncoder`] (`text/plain; version=0.0.4`), the
//! HTTP server `tiny_http` on one thread of its own; the run loop only feeds [`Metrics`] through
//! the [`RunObserver`] seam, and a scrape never waits for the loop (the metrics are atomics).
//!
//! One endpoint per job, on rank 0: everything eplb knows is global (the loads are all-reduced,
//! a layer's migration statistics cover all ranks, every rank takes the same decisions), so an
//! endpoint per node would repeat the same numbers. Scrape the host of rank 0 (under Slurm, the
//! first node of the allocation); it listens on 127.0.0.1 unless `--metrics-bind` opens it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus::{
    exponential_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, Opts, Registry, TextEncoder,
};
use thiserror::Error;

use super::{LayerEvent, ManagerEvent, RoundEvent, RunObserver, StepEvent};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("--metrics-port: cannot listen on {addr}: {reason} (choose a free port, or 0 for any)")]
    Bind { addr: SocketAddr, reason: String },
    #[error("metrics registry: {0}")]
    Registry(#[from] prometheus::Error),
}

/// The metrics of a run, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    steps: IntCounter,
    balancedness: Gauge,
    balancedness_static: Gauge,
    layer_balancedness: GaugeVec,
    rebalances: IntCounter,
    rounds: IntCounter,
    layers_updated: IntCounter,
    experts_moved: IntCounter,
    bytes_moved: IntCounter,
    wrong_bytes: IntCounter,
    migration_seconds: Histogram,
    manager_step_seconds: Histogram,
    plan_seconds: Histogram,
}

impl Metrics {
    /// The metrics, with `labels` (e.g. policy, transport, world size) on `eplb_info`.
    pub fn new(labels: &[(&str, String)]) -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<Gauge, MetricsError> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        // Seconds: 10 us .. 84 s, doubling.
        let histogram = |name: &str, help: &str| -> Result<Histogram, MetricsError> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(exponential_buckets(1e-5, 2.0, 24)?))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let info = GaugeVec::new(
            Opts::new("eplb_info", "The run's settings as labels (value 1)"),
            &labels.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        )?;
        registry.register(Box::new(info.clone()))?;
        info.with_label_values(&labels.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>()).set(1.0);
        let layer_balancedness = GaugeVec::new(
            Opts::new(
                "eplb_layer_balancedness",
                "Balancedness of one MoE layer's live placement on the last step's load",
            ),
            &["layer"],
        )?;
        registry.register(Box::new(layer_balancedness.clone()))?;
        Ok(Metrics {
            steps: counter("eplb_steps_total", "Steps completed")?,
            balancedness: gauge(
                "eplb_balancedness",
                "Mean GPU load / peak GPU load of the live placement on the last step's load, mean over layers (1 is perfect)",
            )?,
            balancedness_static: gauge(
                "eplb_balancedness_static",
                "The same for the initial placement, as if eplb had moved nothing",
            )?,
            layer_balancedness,
            rebalances: counter("eplb_rebalances_total", "Rebalance rounds that selected at least one layer")?,
            rounds: counter("eplb_rounds_total", "Rebalance rounds, with or without layers to move")?,
            layers_updated: counter("eplb_layers_updated_total", "Layers migrated and committed")?,
            experts_moved: counter("eplb_experts_moved_total", "Expert copies that crossed between ranks")?,
            bytes_moved: counter("eplb_bytes_moved_total", "Bytes of expert weights that crossed between ranks")?,
            wrong_bytes: counter("eplb_wrong_bytes_total", "Staged bytes that failed verification (nothing committed)")?,
            migration_seconds: histogram(
                "eplb_migration_seconds",
                "Time of one layer's migration on rank 0: stage, verify, agree, commit",
            )?,
            manager_step_seconds: histogram(
                "eplb_manager_step_seconds",
                "The manager's time on a step without a round: load all-reduce, window, decision",
            )?,
            plan_seconds: histogram("eplb_plan_seconds", "The policy and the layer selection of one round")?,
            registry,
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

impl RunObserver for Metrics {
    fn step(&mut self, e: &StepEvent) {
        self.steps.inc();
        self.balancedness.set(e.balancedness_live);
        self.balancedness_static.set(e.balancedness_static);
        for (layer, b) in e.layer_live.iter().enumerate() {
            self.layer_balancedness.with_label_values(&[layer.to_string().as_str()]).set(*b);
        }
    }

    fn manager(&mut self, e: &ManagerEvent) {
        if !e.round {
            self.manager_step_seconds.observe(e.seconds);
        }
    }

    fn round(&mut self, e: &RoundEvent) {
        self.rounds.inc();
        if e.layers_selected > 0 {
            self.rebalances.inc();
        }
        self.plan_seconds.observe(e.plan_seconds);
    }

    fn layer(&mut self, e: &LayerEvent) {
        if e.wrong_bytes > 0 {
            self.wrong_bytes.inc_by(e.wrong_bytes);
            return;
        }
        self.layers_updated.inc();
        self.experts_moved.inc_by(e.experts_moved as u64);
        self.bytes_moved.inc_by(e.bytes);
        self.migration_seconds.observe(e.seconds);
    }
}

/// The HTTP endpoint: `GET /metrics` answers the exposition, any other path 404. Stops (and joins
/// its thread) when dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `bind:port` (port 0: any free port; see [`MetricsServer::addr`]).
    pub fn start(metrics: Metrics, bind: IpAddr, port: u16) -> Result<MetricsServer, MetricsError> {
        let want = SocketAddr::new(bind, port);
        let server =
            tiny_http::Server::http(want).map_err(|e| MetricsError::Bind { addr: want, reason: e.to_string() })?;
        let addr = server.server_addr().to_ip().unwrap_or(want);
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("eplb-metrics".into())
            .spawn(move || serve(&serving, &metrics))
            .map_err(|e| MetricsError::Bind { addr, reason: format!("cannot start its thread: {e}") })?;
        Ok(MetricsServer { server, thread: Some(thread), addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, metrics: &Metrics) {
    let header = tiny_http::Header::from_bytes("Content-Type", TextEncoder::new().format_type());
    for request in server.incoming_requests() {
        let path = request.url().split('?').next().unwrap_or("");
        let response = match (request.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match (metrics.encode(), &header) {
                (Ok(body), Ok(h)) => tiny_http::Response::from_string(body).with_header(h.clone()),
                (Err(e), _) => tiny_http::Response::from_string(e.to_string()).with_status_code(500),
                (_, Err(())) => tiny_http::Response::from_string("bad content type").with_status_code(500),
            },
            _ => tiny_http::Response::from_string("eplb: metrics are at /metrics\n").with_status_code(404),
        };
        // A client that hung up is not the run's problem.
        let _ = request.respond(response);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn events_become_prometheus_series() {
        let mut m = Metrics::new(&[("policy", "incremental".into())]).unwrap();
        let layers = [0.5, 0.75];
        m.step(&StepEvent {
            step: 0,
            balancedness_static: 0.5,
            balancedness_live: 0.625,
            layer_static: &layers,
            layer_live: &layers,
        });
        m.manager(&ManagerEvent { step: 0, seconds: 0.0002, round: false });
        m.round(&RoundEvent { step: 0, layers_selected: 2, plan_seconds: 0.001 });
        m.round(&RoundEvent { step: 5, layers_selected: 0, plan_seconds: 0.001 });
        for layer in 0..2 {
            m.layer(&LayerEvent { step: 1, layer, experts_moved: 3, bytes: 3 << 20, seconds: 0.01, wrong_bytes: 0 });
        }
        m.layer(&LayerEvent { step: 2, layer: 0, experts_moved: 3, bytes: 3 << 20, seconds: 0.01, wrong_bytes: 7 });
        let t = m.encode().unwrap();
        assert_eq!(sample(&t, "eplb_steps_total"), 1.0);
        assert_eq!(sample(&t, "eplb_balancedness"), 0.625);
        assert_eq!(sample(&t, "eplb_balancedness_static"), 0.5);
        assert_eq!(sample(&t, "eplb_layer_balancedness{layer=\"1\"}"), 0.75);
        assert_eq!((sample(&t, "eplb_rebalances_total"), sample(&t, "eplb_rounds_total")), (1.0, 2.0));
        assert_eq!(sample(&t, "eplb_layers_updated_total"), 2.0);
        assert_eq!(sample(&t, "eplb_experts_moved_total"), 6.0);
        assert_eq!(sample(&t, "eplb_bytes_moved_total"), (6 << 20) as f64);
        assert_eq!(sample(&t, "eplb_wrong_bytes_total"), 7.0);
        assert_eq!(sample(&t, "eplb_migration_seconds_count"), 2.0);
        assert_eq!(sample(&t, "eplb_manager_step_seconds_count"), 1.0);
        assert_eq!(sample(&t, "eplb_plan_seconds_count"), 2.0);
        assert_eq!(sample(&t, "eplb_info{policy=\"incremental\"}"), 1.0);
        assert!(t.contains("# TYPE eplb_migration_seconds histogram"), "{t}");
    }

    #[test]
    fn the_server_answers_metrics_and_404_and_refuses_a_taken_port() {
        let mut m = Metrics::new(&[]).unwrap();
        let server = MetricsServer::start(m.clone(), "127.0.0.1".parse().unwrap(), 0).unwrap();
        let addr = server.addr();
        assert!(addr.port() != 0 && addr.ip().is_loopback());
        m.round(&RoundEvent { step: 0, layers_selected: 1, plan_seconds: 0.0 });
        let r = get(addr, "/metrics");
        assert!(r.starts_with("HTTP/1.") && r.contains(" 200 "), "{r}");
        assert!(r.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("eplb_rebalances_total 1"), "{r}");
        assert!(get(addr, "/").contains(" 404 "));
        // A second server on the same port is refused with a clear error.
        let e = MetricsServer::start(Metrics::new(&[]).unwrap(), addr.ip(), addr.port()).err().unwrap();
        assert!(e.to_string().contains("cannot listen"), "{e}");
        // Dropping it stops the serving thread (and does not hang).
        drop(server);
    }
}
