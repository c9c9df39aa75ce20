//! The monitor: pingers (already-connected clients that `ping` every 100 ms and time the
//! `pong`) and the server RSS sampler, on their own OS thread and tokio runtime.
//!
//! A separate runtime keeps the measurement honest: thousands of storm clients on the main
//! runtime would otherwise delay the pingers' own reads and timers, and a saturated
//! generator would look like a slow server. (Both still share the machine's cores; the
//! generator's CPU use is reported next to the numbers.)

use crate::client::{self, ClientCtx, Outgoing, Stop, Workload};
use crate::net::Connector;
use crate::proto;
use crate::stats::{self, ErrorCounts};
use crate::sys;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::time::Instant;

/// How often the server's RSS is read.
pub const RSS_SAMPLE_MS: u64 = 100;

/// The server's peak RSS, sampled every `RSS_SAMPLE_MS` by a task on the calling runtime
/// (for scenarios without a [`Monitor`]).
#[derive(Debug)]
pub struct RssPeak {
    /// Highest sample.
    peak: Arc<AtomicU64>,
    /// The sampling task.
    task: tokio::task::JoinHandle<()>,
}

impl RssPeak {
    /// Starts sampling `pids`.
    pub fn start(pids: sys::Pids) -> RssPeak {
        let peak = Arc::new(AtomicU64::new(0));
        let sampled = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(RSS_SAMPLE_MS));
            loop {
                tick.tick().await;
                if let Some(bytes) = sys::rss_bytes(pids) {
                    sampled.fetch_max(bytes, Ordering::Relaxed);
                }
            }
        });
        RssPeak { peak, task }
    }

    /// Stops sampling; the highest sample in bytes.
    pub fn stop(self) -> u64 {
        self.task.abort();
        self.peak.load(Ordering::Relaxed)
    }
}

/// Phase tags stamped on every ping when it is sent. A round `r` (from 0) has
/// `storm(r)` and `disconnect(r)`.
pub mod phase {
    /// Before the first storm.
    pub const BASELINE: u32 = 0;
    /// Anything else (verification, between phases).
    pub const OTHER: u32 = 1;
    /// Round `r`'s storm.
    pub const fn storm(round: u32) -> u32 {
        ((round + 1) << 8) | 2
    }
    /// Round `r`'s mass disconnect and watch.
    pub const fn disconnect(round: u32) -> u32 {
        ((round + 1) << 8) | 3
    }
    /// The measured load of a one-round scenario other than storm (`backlog`).
    pub const LOAD: u32 = storm(0);
    /// What follows that load.
    pub const AFTER_LOAD: u32 = disconnect(0);
    /// True for any round's storm.
    pub fn is_storm(tag: u32) -> bool {
        tag & 0xff == 2
    }
    /// True for any round's disconnect.
    pub fn is_disconnect(tag: u32) -> bool {
        tag & 0xff == 3
    }
}

/// What the monitor needs.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Number of pingers.
    pub pingers: usize,
    /// Time between two pings of one pinger.
    pub ping_interval: Duration,
    /// The server process to sample.
    pub server_pid: Option<sys::Pids>,
    /// Node id prefix: pinger `j` is `<prefix>pinger<j>:<run>:t1`.
    pub user_prefix: String,
    /// The run id.
    pub run_id: String,
    /// Token and subprotocol for `connect`.
    pub token: String,
    /// Subprotocol for `connect`.
    pub subprotocol: u32,
    /// Logux answer timeout.
    pub answer_timeout: Duration,
}

/// Peak and latest server RSS.
#[derive(Debug, Default)]
struct Rss {
    /// Last sample (0 = none yet).
    latest: AtomicU64,
    /// Highest sample.
    peak: AtomicU64,
    /// Highest sample since the last `take_window_peak`.
    window_peak: AtomicU64,
}

/// Ping results: `(phase, µs)`.
#[derive(Debug, Default)]
pub struct PingResults {
    /// Answered pings: phase at send, round trip, and wall clock at send (µs since the
    /// epoch, to line a slow ping up with a server profile).
    pub answered: Vec<(u32, u64, u64)>,
    /// Pings never answered: phase at send and age when given up (connection closed or end).
    pub unanswered: Vec<(u32, u64)>,
}

impl PingResults {
    /// `{count, p50, p99, max, unanswered, oldest_unanswered_ms}` for phases matching `which`.
    pub fn summary(&self, which: impl Fn(u32) -> bool) -> Value {
        let mut rtts: Vec<u64> = self
            .answered
            .iter()
            .filter(|(p, _, _)| which(*p))
            .map(|(_, us, _)| *us)
            .collect();
        let lost: Vec<u64> = self
            .unanswered
            .iter()
            .filter(|(p, _)| which(*p))
            .map(|(_, us)| *us)
            .collect();
        let mut out = stats::summary_ms(&mut rtts, stats::P50_P99);
        if let Value::Object(map) = &mut out {
            map.insert("unanswered".into(), json!(lost.len()));
            map.insert(
                "oldest_unanswered_ms".into(),
                lost.iter()
                    .max()
                    .map_or(Value::Null, |us| json!(stats::us_to_ms(*us))),
            );
        }
        out
    }

    /// The `count` slowest answered pings of the phases matching `which`, slowest first:
    /// `[{sent_wall_ms, rtt_ms}]`.
    pub fn slowest(&self, which: impl Fn(u32) -> bool, count: usize) -> Value {
        let mut pings: Vec<&(u32, u64, u64)> =
            self.answered.iter().filter(|(p, _, _)| which(*p)).collect();
        pings.sort_by_key(|p| std::cmp::Reverse(p.1));
        Value::Array(
            pings
                .into_iter()
                .take(count)
                .map(|(_, rtt, sent)| {
                    json!({"sent_wall_ms": stats::us_to_ms(*sent), "rtt_ms": stats::us_to_ms(*rtt)})
                })
                .collect(),
        )
    }
}

/// A running monitor.
#[derive(Debug)]
pub struct Monitor {
    /// The phase stamped on pings sent now.
    phase: Arc<AtomicU32>,
    /// RSS samples.
    rss: Arc<Rss>,
    /// Pingers connected at least once.
    ready: Arc<AtomicUsize>,
    /// Pingers wanted.
    pingers: usize,
    /// Stops the monitor.
    stop_tx: watch::Sender<bool>,
    /// The pingers' results, when stopped.
    done_rx: oneshot::Receiver<(PingResults, Value)>,
}

impl Monitor {
    /// Starts the monitor thread.
    pub fn start(cfg: MonitorConfig, connector: Arc<Connector>) -> std::io::Result<Monitor> {
        let phase = Arc::new(AtomicU32::new(phase::BASELINE));
        let rss = Arc::new(Rss::default());
        let ready = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop) = Stop::new();
        let (done_tx, done_rx) = oneshot::channel();
        let pingers = cfg.pingers;
        let thread_phase = phase.clone();
        let thread_rss = rss.clone();
        let thread_ready = ready.clone();
        std::thread::Builder::new()
            .name("ferry-bench-monitor".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        eprintln!("ferry-bench: cannot start the monitor runtime: {error}");
                        return;
                    }
                };
                let out = runtime.block_on(monitor_main(
                    cfg,
                    connector,
                    thread_phase,
                    thread_rss,
                    thread_ready,
                    stop,
                ));
                let _ = done_tx.send(out);
            })?;
        Ok(Monitor {
            phase,
            rss,
            ready,
            pingers,
            stop_tx,
            done_rx,
        })
    }

    /// Waits until every pinger is connected, or `deadline`. True when they all are.
    pub async fn wait_ready(&self, deadline: Instant) -> bool {
        while self.ready.load(Ordering::Relaxed) < self.pingers {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stamps pings sent from now on with `tag`.
    pub fn set_phase(&self, tag: u32) {
        self.phase.store(tag, Ordering::Relaxed);
    }

    /// The highest RSS since the last call (or the start), and starts a new window.
    pub fn take_window_peak(&self) -> Option<u64> {
        let latest = self.rss.latest.load(Ordering::Relaxed);
        let peak = self.rss.window_peak.swap(latest, Ordering::Relaxed);
        (peak > 0).then_some(peak)
    }

    /// The highest RSS seen.
    pub fn peak_rss(&self) -> Option<u64> {
        let peak = self.rss.peak.load(Ordering::Relaxed);
        (peak > 0).then_some(peak)
    }

    /// Stops the pingers and returns their results and their error counts.
    pub async fn finish(self) -> (PingResults, Value) {
        let _ = self.stop_tx.send(true);
        self.done_rx
            .await
            .unwrap_or_else(|_| (PingResults::default(), json!({})))
    }
}

async fn monitor_main(
    cfg: MonitorConfig,
    connector: Arc<Connector>,
    phase: Arc<AtomicU32>,
    rss: Arc<Rss>,
    ready: Arc<AtomicUsize>,
    stop: Stop,
) -> (PingResults, Value) {
    if let Some(pid) = cfg.server_pid {
        let rss = rss.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(RSS_SAMPLE_MS));
            while stop.or(tick.tick()).await.is_some() {
                if let Some(bytes) = sys::rss_bytes(pid) {
                    rss.latest.store(bytes, Ordering::Relaxed);
                    rss.peak.fetch_max(bytes, Ordering::Relaxed);
                    rss.window_peak.fetch_max(bytes, Ordering::Relaxed);
                }
            }
        });
    }
    let ctx = Arc::new(ClientCtx {
        connector: connector.clone(),
        connectors: vec![connector],
        connect_slots: Arc::new(Semaphore::new(cfg.pingers.max(1))),
        errors: Arc::new(ErrorCounts::default()),
        token: cfg.token.clone(),
        subprotocol: cfg.subprotocol,
        answer_timeout: cfg.answer_timeout,
        idle_ping: Duration::from_secs(10),
        open_sessions: AtomicI64::new(0),
        connect_attempts: AtomicU64::new(0),
    });
    let mut tasks = Vec::new();
    for j in 0..cfg.pingers {
        let mut pinger = Pinger {
            node_id: format!("{}pinger{j}:{}:t1", cfg.user_prefix, cfg.run_id),
            phase: phase.clone(),
            ready: ready.clone(),
            interval: cfg.ping_interval,
            connected: false,
            was_connected: false,
            next_ping: Instant::now(),
            outstanding: VecDeque::new(),
            results: PingResults::default(),
            last_received: 0,
        };
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            client::run(&ctx, &mut pinger, &mut stop).await;
            pinger.on_closed(Instant::now());
            pinger.results
        }));
    }
    let mut results = PingResults::default();
    for task in tasks {
        if let Ok(one) = task.await {
            results.answered.extend(one.answered);
            results.unanswered.extend(one.unanswered);
        }
    }
    (results, ctx.errors.to_json())
}

/// A connected client that pings every `interval` and times the answers.
#[derive(Debug)]
struct Pinger {
    /// Node id.
    node_id: String,
    /// Current phase tag.
    phase: Arc<AtomicU32>,
    /// Counts pingers connected at least once.
    ready: Arc<AtomicUsize>,
    /// Time between pings.
    interval: Duration,
    /// True between `connected` and the close.
    connected: bool,
    /// True once `ready` counted this pinger.
    was_connected: bool,
    /// When the next ping goes out.
    next_ping: Instant,
    /// Pings waiting for their pong (answers come in order): send time, phase, wall µs.
    outstanding: VecDeque<(Instant, u32, u64)>,
    /// What was measured.
    results: PingResults,
    /// Highest server `added` seen.
    last_received: u64,
}

impl Workload for Pinger {
    fn node_id(&self) -> &str {
        &self.node_id
    }
    fn last_received(&self) -> u64 {
        self.last_received
    }
    fn set_last_received(&mut self, added: u64) {
        self.last_received = added;
    }
    fn own_added(&self) -> u64 {
        0
    }
    fn on_attempt(&mut self, _now: Instant) {}
    fn on_connected(&mut self, _base_time: i64, _server_node: &str, now: Instant) {
        self.connected = true;
        self.next_ping = now;
        if !self.was_connected {
            self.was_connected = true;
            self.ready.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if !self.connected || now < self.next_ping {
            return None;
        }
        // Keep a steady rate; after a stall, do not send a burst of catch-up pings.
        self.next_ping += self.interval;
        if self.next_ping <= now {
            self.next_ping = now + self.interval;
        }
        self.outstanding
            .push_back((now, self.phase.load(Ordering::Relaxed), client::wall_us()));
        Some(Outgoing {
            text: proto::ping_frame(0),
            expects_answer: true,
        })
    }
    fn wake_at(&self) -> Option<Instant> {
        self.connected.then_some(self.next_ping)
    }
    fn on_sync(&mut self, _pairs: &[proto::Pair], _now: Instant) {}
    fn on_synced(&mut self, _added: u64, _now: Instant) {}
    fn on_pong(&mut self, now: Instant) {
        if let Some((sent, tag, wall)) = self.outstanding.pop_front() {
            self.results
                .answered
                .push((tag, now.duration_since(sent).as_micros() as u64, wall));
        }
    }
    fn on_closed(&mut self, now: Instant) {
        self.connected = false;
        for (sent, tag, _) in self.outstanding.drain(..) {
            self.results
                .unanswered
                .push((tag, now.duration_since(sent).as_micros() as u64));
        }
    }
}
