//! `run --metrics-port PORT`: rank 0 serves the Prometheus text exposition format at `/metrics`.
//!
//! The format is the `prometheus` crate's [`TextEncoder`] (`text/plain; version=0.0.4`), the
//! HTTP server a small bounded one of its own ([`MetricsServer`]); the run loop only feeds [`Metrics`] through
//! the [`RunObserver`] seam, and a scrape never waits for the loop (the metrics are atomics).
//!
//! One endpoint per job, on rank 0: everything eplb knows is global (the loads are all-reduced,
//! a layer's migration statistics cover all ranks, every rank takes the same decisions), so an
//! endpoint per node would repeat the same numbers. Scrape the host of rank 0 (under Slurm, the
//! first node of the allocation); it listens on 127.0.0.1 unless `--metrics-bind` opens it.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
pub(crate) struct Metrics {
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
                "The manager's time on a step (all-reduce, estimate, decision), rounds of the round-based manager apart",
            )?,
            plan_seconds: histogram(
                "eplb_plan_seconds",
                "The manager's decision with the policy, of a round or a step that switched layers",
            )?,
            registry,
        })
    }

    /// The text exposition of every metric.
    pub(crate) fn encode(&self) -> Result<String, MetricsError> {
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

/// Bounds of the endpoint, so that no client (it may be anyone who reaches the port with
/// `--metrics-bind 0.0.0.0`) can hold rank 0's memory, its serving or the job's exit.
#[derive(Debug, Clone)]
pub(crate) struct ServeLimits {
    /// Connections served at once; one more is answered 503 and closed at once.
    pub max_connections: usize,
    /// Bytes of a request line and headers; a longer request is answered 431 and closed.
    pub max_request_bytes: usize,
    /// Time a connection may take from accept to the end of its response (reading the request,
    /// writing the response); then it is closed.
    pub request_time: Duration,
    /// Tests: the first this many `accept` calls fail as if the process had run out of file
    /// descriptors (`EMFILE`), which must not end the endpoint.
    #[doc(hidden)]
    pub fail_accepts: usize,
}

impl Default for ServeLimits {
    fn default() -> ServeLimits {
        ServeLimits {
            max_connections: 16,
            max_request_bytes: 8 << 10,
            request_time: Duration::from_secs(5),
            fail_accepts: 0,
        }
    }
}

/// How often the accept loop looks at its stop flag: the most a stop (the job's exit) waits.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The HTTP endpoint: `GET /metrics` answers the exposition, any other path 404; one request a
/// connection (`Connection: close`), so a pipelining client gets one answer.
///
/// A small server of its own rather than `tiny_http`: that one reads a request line and headers
/// until CRLF with no size limit, lets a client that pipelines requests and never reads block
/// its one serving thread, gives up for good after one `accept` error, and is joined at the end,
/// so a stuck client held the job's exit. Here every connection runs on a thread of its own,
/// bounded by [`ServeLimits`] (count, bytes, time), and is never joined: dropping the server
/// stops accepting within `STOP_POLL` and returns.
pub(crate) struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `bind:port` (port 0: any free port; see [`MetricsServer::addr`]).
    pub fn start(metrics: Metrics, bind: IpAddr, port: u16) -> Result<MetricsServer, MetricsError> {
        MetricsServer::start_with(metrics, bind, port, ServeLimits::default())
    }

    /// [`MetricsServer::start`] with other bounds.
    pub(crate) fn start_with(
        metrics: Metrics,
        bind: IpAddr,
        port: u16,
        limits: ServeLimits,
    ) -> Result<MetricsServer, MetricsError> {
        let want = SocketAddr::new(bind, port);
        let bind_err = |e: std::io::Error| MetricsError::Bind { addr: want, reason: e.to_string() };
        let listener = TcpListener::bind(want).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().unwrap_or(want);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("eplb-metrics".into())
            .spawn(move || accept_loop(&listener, &metrics, &limits, &stopping))
            .map_err(|e| MetricsError::Bind { addr, reason: format!("cannot start its thread: {e}") })?;
        Ok(MetricsServer { stop, thread: Some(thread), addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loop sees the flag within STOP_POLL; connection threads are not waited for.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`: each connection on a thread of its own, at most
/// `limits.max_connections` at once. An `accept` error (out of file descriptors, a connection
/// reset before it was accepted) is logged, at its 1st, 2nd, 4th, ... occurrence, and the loop
/// goes on after a short pause.
fn accept_loop(listener: &TcpListener, metrics: &Metrics, limits: &ServeLimits, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    let (mut errors, mut fail) = (0u64, limits.fail_accepts);
    while !stop.load(Ordering::SeqCst) {
        let accepted = if fail > 0 {
            fail -= 1;
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        } else {
            listener.accept()
        };
        match accepted {
            Ok((stream, _)) => {
                if active.load(Ordering::SeqCst) >= limits.max_connections {
                    refuse(stream, "503 Service Unavailable", "eplb: too many connections\n");
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (metrics, limits, done) = (metrics.clone(), limits.clone(), Arc::clone(&active));
                let spawned = std::thread::Builder::new().name("eplb-metrics-conn".into()).spawn(move || {
                    serve_one(stream, &metrics, &limits);
                    done.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(listener, STOP_POLL),
            Err(e) => {
                errors += 1;
                if errors.is_power_of_two() {
                    log::warn!("metrics endpoint: accept failed ({e}; {errors} so far): still serving");
                }
                std::thread::sleep(STOP_POLL);
            }
        }
    }
}

/// Waits at most `timeout` for a connection to accept.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

/// Answers `status` with `body` and closes, never waiting (a fresh socket's buffer holds it).
fn refuse(mut stream: TcpStream, status: &str, body: &str) {
    let _ = stream.set_nonblocking(true);
    // One write of the whole answer (`write!` on the stream would send it piece by piece, and a
    // close with the request unread resets the connection between the pieces).
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
}

/// One connection: reads one request (bounded in bytes and time), answers it, closes.
fn serve_one(mut stream: TcpStream, metrics: &Metrics, limits: &ServeLimits) {
    let deadline = Instant::now() + limits.request_time;
    let _ = stream.set_nonblocking(false);
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if request.len() > limits.max_request_bytes {
            return refuse(stream, "431 Request Header Fields Too Large", "eplb: request too large\n");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return refuse(stream, "408 Request Timeout", "eplb: request timeout\n");
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return refuse(stream, "408 Request Timeout", "eplb: request timeout\n"),
        }
    };
    let head = String::from_utf8_lossy(&request[..end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match metrics.encode() {
            Ok(body) => ("200 OK", TextEncoder::new().format_type().to_string(), body),
            Err(e) => ("500 Internal Server Error", "text/plain".into(), e.to_string()),
        },
        _ => ("404 Not Found", "text/plain".into(), "eplb: metrics are at /metrics\n".into()),
    };
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let _ = stream.set_write_timeout(Some(left));
    // A client that hung up or never reads is not the run's problem.
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Runs `f` on a thread; its result, or a panic naming `what` if it has not ended within 60 s
    /// (a hang bound, not a timing: every case here ends at once when it works).
    fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what}: hung"))
    }

    #[test]
    fn a_client_that_pipelines_and_never_reads_blocks_neither_scrapes_nor_the_exit() {
        let server = MetricsServer::start(Metrics::new(&[]).unwrap(), "127.0.0.1".parse().unwrap(), 0).unwrap();
        let addr = server.addr();
        // Many requests in one go, never reading the answers.
        let mut hog = std::net::TcpStream::connect(addr).unwrap();
        hog.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = hog.write_all("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000).as_bytes());
        let r = within("a second scrape", move || get(addr, "/metrics"));
        assert!(r.contains(" 200 ") && r.contains("eplb_steps_total"), "{r}");
        within("dropping the server", move || drop(server));
        drop(hog);
    }

    #[test]
    fn a_request_without_an_end_is_cut_at_its_size_bound() {
        let server = MetricsServer::start(Metrics::new(&[]).unwrap(), "127.0.0.1".parse().unwrap(), 0).unwrap();
        let addr = server.addr();
        let answer = within("an endless request line", move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            // 1 MiB of a request line with no CRLF: the server must stop reading long before.
            let _ = s.write_all(&vec![b'A'; 1 << 20]);
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
                Err(e) => Err(e.kind()),
            }
        });
        match answer {
            // The 431 answer, or none, or its start: closing with the request unread resets the
            // connection, which may cut what the client had not yet read.
            Ok(text) => assert!(
                text.contains(" 431 ") || "HTTP/1.1 431 Request Header Fields Too Large".starts_with(text.as_str()),
                "{text}"
            ),
            // Closed while we were still sending: a reset, never a wait.
            Err(kind) => assert!(
                matches!(kind, std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
                "the server did not end the request: {kind:?}"
            ),
        }
        assert!(get(addr, "/metrics").contains(" 200 "), "still serving");
    }

    #[test]
    fn connections_beyond_the_bound_are_refused_and_idle_ones_time_out() {
        let limits = ServeLimits { max_connections: 2, request_time: Duration::from_secs(5), ..Default::default() };
        let server =
            MetricsServer::start_with(Metrics::new(&[]).unwrap(), "127.0.0.1".parse().unwrap(), 0, limits).unwrap();
        let addr = server.addr();
        let idle: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        // A third is answered 503 at once (accepted after the two, which wait for their time).
        // It sends nothing: its request unread at the close would turn the close into a reset.
        let third = within("a connection beyond the bound", move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        assert!(third.contains(" 503 "), "{third}");
        // Each idle connection is answered 408 and closed once its time is up.
        for mut c in idle {
            let text = within("an idle connection", move || {
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut out = String::new();
                let _ = c.read_to_string(&mut out);
                out
            });
            assert!(text.contains(" 408 "), "{text}");
        }
        assert!(within("a scrape after", move || get(addr, "/metrics")).contains(" 200 "));
    }

    #[test]
    fn accept_errors_do_not_end_the_endpoint() {
        let limits = ServeLimits { fail_accepts: 3, ..Default::default() };
        let server =
            MetricsServer::start_with(Metrics::new(&[]).unwrap(), "127.0.0.1".parse().unwrap(), 0, limits).unwrap();
        let addr = server.addr();
        let r = within("a scrape after accept errors", move || get(addr, "/metrics"));
        assert!(r.contains(" 200 "), "{r}");
    }
}
