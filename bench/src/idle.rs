//! `idle`: as many idle authenticated connections as the open-file limit allows, held open
//! (answering pings) for `--hold-s`, then closed. With `--server-pid`, the server's RSS
//! before, with everybody connected, and after the close gives its bytes per connection.

use crate::client::{self, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::sys;
use crate::Outcome;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Wait after the last `connected` (and after the close) before reading the server's RSS,
/// so that buffers freed or allocated just after the handshake are counted.
pub const RSS_SETTLE_MS: u64 = 1_000;

/// `idle` flags.
#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections wanted; capped at the open-file limit minus a margin.
    #[arg(long, default_value_t = 18_000)]
    pub clients: usize,
    /// How long to hold them all open, in seconds.
    #[arg(long, default_value_t = 5)]
    pub hold_s: u64,
}

/// State shared by the idle clients.
#[derive(Debug)]
struct Shared {
    /// Clients connected at least once.
    connected: AtomicUsize,
    /// Clients wanted.
    clients: usize,
    /// Woken when everybody connected once.
    all: Notify,
}

/// One idle client: connects, authenticates, answers pings.
#[derive(Debug)]
struct IdleClient {
    /// Node id.
    node_id: String,
    /// Highest server `added` seen.
    last_received: u64,
    /// Connect attempts.
    attempts: u32,
    /// Counted in `connected`.
    counted: bool,
    /// Time from the first attempt to the first `connected`.
    connect_us: Option<u64>,
    /// First attempt.
    first_attempt: Option<Instant>,
    /// Shared state.
    shared: Arc<Shared>,
}

impl Workload for IdleClient {
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
    fn on_attempt(&mut self, now: Instant) {
        self.attempts += 1;
        self.first_attempt.get_or_insert(now);
    }
    fn on_connected(&mut self, _base_time: i64, _server_node: &str, now: Instant) {
        if !self.counted {
            self.counted = true;
            self.connect_us = self
                .first_attempt
                .map(|t| now.duration_since(t).as_micros() as u64);
            if self.shared.connected.fetch_add(1, Ordering::AcqRel) + 1 >= self.shared.clients {
                self.shared.all.notify_one();
            }
        }
    }
    fn next_frame(&mut self, _now: Instant) -> Option<Outgoing> {
        None
    }
    fn on_sync(&mut self, _pairs: &[crate::proto::Pair], _now: Instant) {}
    fn on_synced(&mut self, _added: u64, _now: Instant) {}
}

/// Runs the scenario.
pub async fn run(args: IdleArgs) -> Result<Outcome, String> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let room = setup.fd_room().unwrap_or(u64::MAX);
    let n = (args.clients as u64).min(room) as usize;
    if n == 0 {
        return Err("no room for any connection under the open-file limit".into());
    }
    if n < args.clients {
        eprintln!(
            "ferry-bench idle: capping {} clients to {n} (open-file limit {:?} minus a margin of {})",
            args.clients,
            setup.fd.soft,
            sys::FD_MARGIN
        );
    }
    let ctx: Arc<ClientCtx> = setup.ctx.clone();
    let deadline = setup.deadline;
    let pid = sys::Pids::new(&common.server_pid);
    let shared = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        clients: n,
        all: Notify::new(),
    });
    eprintln!(
        "ferry-bench idle: run {} against {}: {n} connections, hold {} s",
        setup.run_id, ctx.connector.target.url, args.hold_s
    );
    let rss_before = pid.and_then(sys::rss_bytes);
    let peak = Arc::new(AtomicU64::new(rss_before.unwrap_or(0)));
    let sampler = pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(crate::monitor::RSS_SAMPLE_MS));
            loop {
                tick.tick().await;
                if let Some(bytes) = sys::rss_bytes(pid) {
                    peak.fetch_max(bytes, Ordering::Relaxed);
                }
            }
        })
    });

    let start = Instant::now();
    let (stop_tx, stop) = Stop::new();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = IdleClient {
            node_id: format!("{}{i}:{}:t1", common.user_prefix, setup.run_id),
            last_received: 0,
            attempts: 0,
            counted: false,
            connect_us: None,
            first_attempt: None,
            shared: shared.clone(),
        };
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        handles.push(tokio::spawn(async move {
            client::run(&ctx, &mut c, &mut stop).await;
            c
        }));
    }
    let progress = {
        let shared = shared.clone();
        let ctx = ctx.clone();
        common::progress(common.progress_ms, move || {
            format!(
                "[idle] {:.1}s connected {}/{} open {} errors {}",
                start.elapsed().as_secs_f64(),
                shared.connected.load(Ordering::Relaxed),
                shared.clients,
                ctx.open_sessions.load(Ordering::Relaxed),
                ctx.errors.total()
            )
        })
    };
    let mut timed_out = false;
    while shared.connected.load(Ordering::Acquire) < n {
        tokio::select! {
            _ = shared.all.notified() => {}
            _ = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
        }
    }
    let connect_elapsed = start.elapsed();
    let connected = shared.connected.load(Ordering::Relaxed);
    eprintln!(
        "[idle] {connected}/{n} connected in {:.3}s{}",
        connect_elapsed.as_secs_f64(),
        if timed_out { " (TIMED OUT)" } else { "" }
    );
    let mut rss_connected = None;
    let mut open_at_end_of_hold = None;
    if !timed_out {
        common::sleep_bounded(
            Instant::now() + Duration::from_millis(RSS_SETTLE_MS),
            deadline,
        )
        .await;
        rss_connected = pid.and_then(sys::rss_bytes);
        let hold_until = start + connect_elapsed + Duration::from_secs(args.hold_s);
        if !common::sleep_bounded(hold_until, deadline).await {
            timed_out = true;
        }
        open_at_end_of_hold = Some(ctx.open_sessions.load(Ordering::Relaxed));
    }
    let close_start = Instant::now();
    let _ = stop_tx.send(true);
    let mut clients = Vec::with_capacity(n);
    for handle in handles {
        match handle.await {
            Ok(c) => clients.push(c),
            Err(_) => ctx.errors.add("internal:client_task_failed"),
        }
    }
    let close_ms = close_start.elapsed().as_secs_f64() * 1000.0;
    if let Some(p) = progress {
        p.abort();
    }
    tokio::time::sleep(Duration::from_millis(RSS_SETTLE_MS)).await;
    let rss_after_close = pid.and_then(sys::rss_bytes);
    if let Some(task) = sampler {
        task.abort();
    }
    let mut connect_us: Vec<u64> = clients.iter().filter_map(|c| c.connect_us).collect();
    let reconnects: u64 = clients
        .iter()
        .map(|c| u64::from(c.attempts.saturating_sub(1)))
        .sum();
    let per_conn = match (rss_before, rss_connected) {
        (Some(before), Some(after)) if connected > 0 => {
            json!(sys::round3(
                (after as f64 - before as f64) / connected as f64
            ))
        }
        _ => Value::Null,
    };
    let dropped = open_at_end_of_hold.map(|open| connected as i64 - open);
    let ok = !timed_out && connected == n && dropped.unwrap_or(0) == 0;
    let summary = json!({
        "scenario": "idle",
        "ok": ok,
        "timed_out": timed_out,
        "run_id": setup.run_id,
        "url": ctx.connector.target.url,
        "params": {
            "clients_requested": args.clients,
            "clients": n,
            "capped_by_fd_limit": n < args.clients,
            "hold_s": args.hold_s,
            "connect_concurrency": common.connect_concurrency,
            "timeout_s": common.timeout_s,
        },
        "connected": connected,
        "open_at_end_of_hold": open_at_end_of_hold,
        "dropped_during_hold": dropped,
        "connect_total_ms": sys::round3(connect_elapsed.as_secs_f64() * 1000.0),
        "connect_ms": crate::stats::summary_ms(&mut connect_us, crate::stats::P50_P90_P99),
        "close_ms": sys::round3(close_ms),
        "reconnects": reconnects,
        "errors": ctx.errors.to_json(),
        "server": pid.map(|pid| json!({
            "pid": pid.first(),
            "pids": pid.list(),
            "rss_before_bytes": rss_before,
            "rss_connected_bytes": rss_connected,
            "rss_after_close_bytes": rss_after_close,
            "peak_rss_bytes": peak.load(Ordering::Relaxed),
            "bytes_per_connection": per_conn,
            "cpu_s": setup.server_cpu_s(common),
        })),
        "generator": setup.generator_json(common),
    });
    Ok(Outcome { summary, ok })
}
