//! `acks`: the durable-acknowledgement path, without fan-out. C clients connect (no
//! subscription), then each sends M actions in `sync` frames of `--batch` actions, keeping at
//! most `--window` frames without `synced`. Client i's actions name room `<run>-acks-<i>`, so
//! the server's resend rule looks up the channel `room/<run>-acks-<i>`, which nobody is
//! subscribed to: each action is judged, stored (group commit + fsync), acknowledged with
//! `synced`, and answered to its author with `logux/processed`, and reaches no other client.
//! Measures acknowledged actions/s and the latency from the send to `synced` and to
//! `logux/processed`, and checks that every action got exactly one of each.

use crate::client::{self, wall_us, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::monitor::RssPeak;
use crate::proto;
use crate::sending::{self, Answer, Pace, Sending};
use crate::stats;
use crate::sys;
use crate::Outcome;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// `acks` flags.
#[derive(clap::Args, Debug)]
pub struct AcksArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients (C), each in a room of its own that nobody subscribes to.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Actions each client sends (M).
    #[arg(long, default_value_t = 1000)]
    pub actions: usize,
    /// Most `sync` frames per client without `synced`.
    #[arg(long, default_value_t = 100)]
    pub window: usize,
    /// Actions per `sync` frame (1 is what an online `@logux/client` sends).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// `sync` frames per second per client (default: as fast as the window allows).
    #[arg(long)]
    pub rate: Option<f64>,
}

/// State shared by the clients.
#[derive(Debug)]
struct Shared {
    /// Protocol settings and counters.
    ctx: Arc<ClientCtx>,
    /// JSON literal of the action type.
    type_json: String,
    /// C.
    clients: usize,
    /// M.
    actions: usize,
    /// Clients connected at least once.
    connected: AtomicUsize,
    /// Clients with every action acknowledged and answered.
    done: AtomicUsize,
    /// Woken when `connected` or `done` reaches C.
    wake: Notify,
    /// The sending phase started.
    started: AtomicBool,
    /// Actions acknowledged so far (progress).
    synced: AtomicU64,
    /// Actions processed so far (progress).
    processed: AtomicU64,
}

impl Shared {
    fn count(&self, counter: &AtomicUsize) {
        if counter.fetch_add(1, Ordering::AcqRel) + 1 >= self.clients {
            self.wake.notify_one();
        }
    }

    async fn wait_all(&self, counter: &AtomicUsize, deadline: Instant) -> bool {
        while counter.load(Ordering::Acquire) < self.clients {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
        true
    }
}

/// One client.
#[derive(Debug)]
struct AcksClient {
    /// Client number.
    index: usize,
    /// Node id.
    node_id: String,
    /// JSON literal of this client's room id.
    room_json: String,
    /// Shared state.
    shared: Arc<Shared>,
    /// Our actions.
    sending: Sending,
    /// Highest server `added` seen.
    last_received: u64,
    /// This connection's `baseTime`.
    base_time: i64,
    /// Connected now.
    connected: bool,
    /// Counted in `connected`.
    counted: bool,
    /// Counted in `done`.
    done: bool,
    /// `synced` for no frame of ours waiting for one (a second `synced`).
    unexpected_synced: u64,
    /// Connect attempts.
    attempts: u32,
}

impl AcksClient {
    fn check_done(&mut self) {
        if !self.done && self.sending.all_answered() {
            self.done = true;
            self.shared.count(&self.shared.done);
        }
    }
}

impl Workload for AcksClient {
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
        self.sending.own_added
    }
    fn on_attempt(&mut self, _now: Instant) {
        self.attempts += 1;
    }
    fn on_connected(&mut self, base_time: i64, _server_node: &str, _now: Instant) {
        self.base_time = base_time;
        self.connected = true;
        self.sending.on_connected();
        if !self.counted {
            self.counted = true;
            self.shared.count(&self.shared.connected);
        }
    }
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if !self.connected {
            return None;
        }
        let shared = &self.shared;
        let room_json = &self.room_json;
        let first_n = self.index * shared.actions;
        let started = shared.started.load(Ordering::Relaxed);
        self.sending
            .next_frame(now, self.base_time, started, |i, sent_us| {
                proto::bench_action(
                    &shared.type_json,
                    room_json,
                    (first_n + i) as u64,
                    sent_us as f64 / 1000.0,
                )
            })
    }
    fn wake_at(&self) -> Option<Instant> {
        if !self.connected || self.sending.all_created() {
            return None;
        }
        if !self.shared.started.load(Ordering::Relaxed) {
            return Some(Instant::now() + Duration::from_millis(common::START_POLL_MS));
        }
        self.sending.wake_at()
    }
    fn on_sync(&mut self, pairs: &[proto::Pair], now: Instant) {
        let now_us = wall_us();
        let errors = &self.shared.ctx.errors;
        for action in pairs.iter().map(|pair| &pair.action) {
            let undo = match action.kind() {
                "logux/processed" => false,
                "logux/undo" => true,
                // Nobody else is in this client's room: anything else is unexpected.
                other => {
                    errors.add(&format!("received:{other}"));
                    continue;
                }
            };
            let Some((ms, seq)) = sending::own_answer(action, undo, &self.node_id, errors) else {
                continue;
            };
            if self.sending.on_answer(ms, seq, undo, now, now_us) == Answer::Processed {
                self.shared.processed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.check_done();
    }
    fn on_synced(&mut self, added: u64, now: Instant) {
        let before = self.sending.synced;
        if self.sending.on_synced(added, now, wall_us()) {
            let newly = (self.sending.synced - before) as u64;
            self.shared.synced.fetch_add(newly, Ordering::Relaxed);
        } else {
            self.unexpected_synced += 1;
        }
        self.check_done();
    }
    fn on_closed(&mut self, _now: Instant) {
        self.connected = false;
        self.sending.on_closed();
    }
    fn on_fatal(&mut self) {
        // A client that stops for good cannot finish; the run ends at the timeout.
        self.shared.ctx.errors.add("acks:client_gave_up");
    }
}

/// Runs the scenario.
pub async fn run(args: AcksArgs) -> Result<Outcome, String> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let (c, m) = (args.clients, args.actions);
    if c == 0 || m == 0 || args.window == 0 || args.batch == 0 {
        return Err("--clients, --actions, --window and --batch must be at least 1".into());
    }
    let interval = match args.rate {
        Some(rate) if rate > 0.0 && rate.is_finite() => Some(Duration::from_secs_f64(1.0 / rate)),
        Some(_) => return Err("--rate must be a positive number".into()),
        None => None,
    };
    setup.check_fds(c as u64, &format!("acks with {c} clients"))?;
    let ctx = setup.ctx.clone();
    let deadline = setup.deadline;
    let pid = setup.server_pids;
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        type_json: setup.type_json.clone(),
        clients: c,
        actions: m,
        connected: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        wake: Notify::new(),
        started: AtomicBool::new(false),
        synced: AtomicU64::new(0),
        processed: AtomicU64::new(0),
    });
    let total = (c * m) as u64;
    eprintln!(
        "ferry-bench acks: run {} against {}: {c} clients x {m} actions, {} per sync, window {}, rate {}, no subscriptions (rooms {}-acks-<i>)",
        setup.run_id,
        ctx.connector.target.url,
        args.batch,
        args.window,
        args.rate.map_or_else(|| "max".to_owned(), |r| format!("{r} syncs/s")),
        setup.run_id,
    );
    let (stop_tx, stop) = Stop::new();
    let mut handles = Vec::with_capacity(c);
    for i in 0..c {
        let mut client = AcksClient {
            index: i,
            node_id: format!("{}{i}:{}:t1", common.user_prefix, setup.run_id),
            room_json: proto::json_str(&format!("{}-acks-{i}", setup.run_id)),
            shared: shared.clone(),
            sending: Sending::new(Pace {
                total: m,
                window: args.window,
                batch: args.batch,
                interval,
            }),
            last_received: 0,
            base_time: 0,
            connected: false,
            counted: false,
            done: false,
            unexpected_synced: 0,
            attempts: 0,
        };
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        handles.push(tokio::spawn(async move {
            client::run(&ctx, &mut client, &mut stop).await;
            client
        }));
    }
    let rss = pid.map(RssPeak::start);

    // Phase 1: everybody connected.
    let connect_start = Instant::now();
    let mut timed_out = !shared.wait_all(&shared.connected, deadline).await;
    let connect_ms = connect_start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "[acks] {} of {c} clients connected in {connect_ms:.1} ms; sending",
        shared.connected.load(Ordering::Relaxed)
    );
    // Phase 2: send until every action is acknowledged and answered.
    let cpu_start = pid.and_then(sys::pids_cpu);
    let threads = pid.map(sys::ThreadsMeter::start);
    let own_cpu_start = sys::own_cpu();
    let start = Instant::now();
    shared.started.store(true, Ordering::Release);
    let progress = {
        let shared = shared.clone();
        common::progress(common.progress_ms, move || {
            format!(
                "[acks] {:.1}s synced {}/{total} processed {} done clients {}",
                start.elapsed().as_secs_f64(),
                shared.synced.load(Ordering::Relaxed),
                shared.processed.load(Ordering::Relaxed),
                shared.done.load(Ordering::Relaxed)
            )
        })
    };
    if !timed_out {
        timed_out = !shared.wait_all(&shared.done, deadline).await;
    }
    let send_elapsed = start.elapsed();
    let cpu_end = pid.and_then(sys::pids_cpu);
    let threads_cpu = threads.as_ref().map(sys::ThreadsMeter::json);
    let own_cpu_sending = sys::own_cpu().since(&own_cpu_start).total_s();
    let _ = stop_tx.send(true);
    let mut clients = Vec::with_capacity(c);
    for handle in handles {
        match handle.await {
            Ok(client) => clients.push(client),
            Err(_) => ctx.errors.add("internal:client_task_failed"),
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let server_peak = rss.map(RssPeak::stop);

    let sum = |f: fn(&AcksClient) -> u64| clients.iter().map(f).sum::<u64>();
    let sent = sum(|a| a.sending.acts.len() as u64);
    let synced = sum(|a| a.sending.synced as u64);
    let processed = sum(|a| a.sending.processed as u64);
    let undone = sum(|a| a.sending.undone as u64);
    let dup_answers = sum(|a| a.sending.duplicated_answers);
    let unexpected_synced = sum(|a| a.unexpected_synced);
    let reconnects = sum(|a| u64::from(a.attempts.saturating_sub(1)));
    // Acknowledged but never answered: the server stored them without processing them.
    let unanswered: u64 = clients
        .iter()
        .map(|a| {
            a.sending
                .acts
                .iter()
                .filter(|act| act.synced && act.answers == 0)
                .count() as u64
        })
        .sum();
    let per_s = |count: u64, last: Option<Instant>| match last {
        Some(t) if t > start => json!(sys::round3(
            count as f64 / t.duration_since(start).as_secs_f64()
        )),
        _ => Value::Null,
    };
    let last_synced = clients.iter().filter_map(|a| a.sending.last_synced).max();
    let last_answered = clients.iter().filter_map(|a| a.sending.last_answered).max();
    let mut synced_latency = sending::gather_us(
        clients
            .iter()
            .map(|a| a.sending.synced_latencies_us.as_slice()),
    );
    let mut answer_latency = sending::gather_us(
        clients
            .iter()
            .map(|a| a.sending.answer_latencies_us.as_slice()),
    );
    let duplicated = dup_answers + unexpected_synced;
    let ok = !timed_out && synced == total && processed == total && duplicated == 0;
    let summary = json!({
        "scenario": "acks",
        "ok": ok,
        "timed_out": timed_out,
        "run_id": setup.run_id,
        "url": ctx.connector.target.url,
        "params": {
            "clients": c,
            "actions": m,
            "window": args.window,
            "batch": args.batch,
            "rate": args.rate,
            "timeout_s": common.timeout_s,
        },
        "connect_ms": sys::round3(connect_ms),
        "send_ms": sys::round3(send_elapsed.as_secs_f64() * 1000.0),
        "actions_expected": total,
        "actions_sent": sent,
        "actions_synced": synced,
        "actions_processed": processed,
        "actions_undone": undone,
        "not_synced": total.saturating_sub(synced),
        "synced_not_answered": unanswered,
        "synced_per_s": per_s(synced, last_synced),
        "processed_per_s": per_s(processed, last_answered),
        "synced_latency_ms": stats::summary_ms(&mut synced_latency, stats::P50_P99_P999),
        "processed_latency_ms": stats::summary_ms(&mut answer_latency, stats::P50_P99_P999),
        "duplicated": {
            "total": duplicated,
            "synced": unexpected_synced,
            "processed": dup_answers,
        },
        "reconnects": reconnects,
        "errors": ctx.errors.to_json(),
        "server": pid.map(|pid| json!({
            "pid": pid.first(),
            "pids": pid.list(),
            "peak_rss_bytes": server_peak,
            "cpu_s_sending": sys::cpu_s_between(&cpu_start, &cpu_end),
            "threads_cpu_s_sending": threads_cpu,
            "cpu_s": setup.server_cpu_s(common),
        })),
        "generator": setup.generator_json_phase(common, own_cpu_sending, send_elapsed),
    });
    Ok(Outcome { summary, ok })
}
