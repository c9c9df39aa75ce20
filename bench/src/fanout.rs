//! `fanout`: C clients in one room, each sending M actions (one per `sync`, at most
//! `--window` `sync`s without `synced`, optionally at `--rate` per second); every action must
//! reach the C-1 others. Measures deliveries/s, processed actions/s, and the send-to-receive
//! latency (the `sent_at_ms` inside the action against the receiver's wall clock: the same
//! clock, since every client lives in this process).

use crate::client::{self, wall_ms, wall_us, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::proto::{self, IdGen, SyncFrame};
use crate::stats;
use crate::sys;
use crate::Outcome;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most deliveries one run may expect (C·(C−1)·M): bounds the receive bitmaps and latency
/// samples (4 bytes each).
pub const FANOUT_DELIVERIES_MAX: u64 = 50_000_000;
/// How often a subscribed client checks whether the sending phase started.
pub const START_POLL_MS: u64 = 5;

/// `fanout` flags.
#[derive(clap::Args, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients in the room (C).
    #[arg(long, default_value_t = 50)]
    pub clients: usize,
    /// Actions each client sends (M).
    #[arg(long, default_value_t = 200)]
    pub actions: usize,
    /// Actions per second per client (default: as fast as the window allows).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Most `sync`s per client without `synced`.
    #[arg(long, default_value_t = 100)]
    pub window: usize,
}

/// State shared by the fanout clients.
#[derive(Debug)]
struct Shared {
    /// Protocol settings and counters.
    ctx: Arc<ClientCtx>,
    /// JSON literal of the action type.
    type_json: String,
    /// The action type.
    action_type: String,
    /// JSON literal of the room id.
    room_json: String,
    /// JSON literal of the room's channel.
    channel_json: String,
    /// C.
    clients: usize,
    /// M.
    actions: usize,
    /// Most `sync`s without `synced`.
    window: usize,
    /// Time between two actions of a client, if rate-limited.
    interval: Option<Duration>,
    /// Clients whose first subscribe was processed.
    subscribed: AtomicUsize,
    /// Clients that got every answer and every delivery.
    done: AtomicUsize,
    /// Woken when `subscribed` or `done` reaches C.
    wake: Notify,
    /// The sending phase started.
    started: AtomicBool,
    /// Deliveries received so far (progress).
    deliveries: AtomicU64,
    /// Actions processed so far (progress).
    processed: AtomicU64,
}

/// One action of a fanout client.
#[derive(Debug, Clone)]
struct Act {
    /// Id `ms`.
    ms: u64,
    /// Id `seq`.
    seq: u32,
    /// Our log position.
    added: u64,
    /// Wall clock when first sent, µs.
    sent_us: u64,
    /// `added` of the `sync` it went out in on this connection (0 = not sent).
    in_sync: u64,
    /// Got `synced`.
    synced: bool,
    /// Times `logux/processed`/`undo` arrived.
    answers: u8,
}

/// One fanout client.
#[derive(Debug)]
struct FanoutClient {
    /// Client number.
    index: usize,
    /// Node id.
    node_id: String,
    /// Shared state.
    shared: Arc<Shared>,
    /// Id generator.
    ids: IdGen,
    /// Our log position.
    own_added: u64,
    /// Highest server `added` seen.
    last_received: u64,
    /// `since` for re-subscribing.
    since: Option<(String, i64)>,
    /// This connection's `baseTime`.
    base_time: i64,
    /// This connection's server node id.
    server_node: String,
    /// Connected now.
    connected: bool,
    /// Unacknowledged actions must be re-sent on this connection.
    resend: bool,
    /// The subscribe must be sent on this connection.
    send_subscribe: bool,
    /// This connection's subscribe id.
    sub: Option<(u64, u32)>,
    /// The first subscribe was processed (counted in `subscribed`).
    subscribed: bool,
    /// Actions created so far (the next one is number `acts.len()`).
    acts: Vec<Act>,
    /// `sync`s without `synced` on this connection.
    in_flight: usize,
    /// Earliest time of the next action when rate-limited.
    next_send_at: Instant,
    /// Actions answered with processed.
    processed: usize,
    /// Actions answered with undo.
    undone: usize,
    /// Answers beyond the first for one action.
    duplicated_processed: u64,
    /// Received bitmap over action numbers (C·M bits).
    received: Vec<u64>,
    /// Distinct actions received.
    received_count: u64,
    /// Actions received again.
    duplicated_received: u64,
    /// Own actions received back, or numbers out of range.
    unexpected: u64,
    /// Send-to-receive latencies, µs.
    latencies_us: Vec<u32>,
    /// Send-to-processed latencies, µs.
    ack_latencies_us: Vec<u32>,
    /// Last delivery and last processed.
    last_delivery: Option<Instant>,
    /// When the last own action was processed.
    last_processed: Option<Instant>,
    /// Counted in `done`.
    done: bool,
    /// Connect attempts.
    attempts: u32,
}

impl FanoutClient {
    fn expected_deliveries(&self) -> u64 {
        ((self.shared.clients - 1) * self.shared.actions) as u64
    }

    fn check_done(&mut self) {
        if !self.done
            && self.processed + self.undone >= self.shared.actions
            && self.received_count >= self.expected_deliveries()
        {
            self.done = true;
            if self.shared.done.fetch_add(1, Ordering::AcqRel) + 1 >= self.shared.clients {
                self.shared.wake.notify_one();
            }
        }
    }

    fn action_frame(&mut self, i: usize) -> Outgoing {
        let act = &mut self.acts[i];
        act.in_sync = act.added;
        let n = (self.index * self.shared.actions + i) as u64;
        let mut frame = SyncFrame::new(act.added);
        frame.push(
            &proto::bench_action(
                &self.shared.type_json,
                &self.shared.room_json,
                n,
                act.sent_us as f64 / 1000.0,
            ),
            &proto::own_meta(act.ms, act.seq, self.base_time),
        );
        self.in_flight += 1;
        Outgoing {
            text: frame.finish(),
            expects_answer: true,
        }
    }
}

impl Workload for FanoutClient {
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
        self.own_added
    }
    fn on_attempt(&mut self, _now: Instant) {
        self.attempts += 1;
    }
    fn on_connected(&mut self, base_time: i64, server_node: &str, _now: Instant) {
        self.base_time = base_time;
        self.server_node = server_node.to_owned();
        self.connected = true;
        self.resend = true;
        self.send_subscribe = true;
    }
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if !self.connected {
            return None;
        }
        if self.send_subscribe {
            self.send_subscribe = false;
            let (ms, seq) = self.ids.next(wall_ms());
            self.own_added += 1;
            let mut frame = SyncFrame::new(self.own_added);
            frame.push(
                &proto::subscribe_action(&self.shared.channel_json, self.since.as_ref()),
                &proto::own_meta(ms, seq, self.base_time),
            );
            self.sub = Some((ms, seq));
            // Subscribes do not count against the window.
            return Some(Outgoing {
                text: frame.finish(),
                expects_answer: true,
            });
        }
        if self.resend {
            // Actions sent on an earlier connection that never got `synced`: same ids.
            if let Some(i) = self.acts.iter().position(|a| !a.synced && a.in_sync == 0) {
                return Some(self.action_frame(i));
            }
            self.resend = false;
        }
        if !self.subscribed || !self.shared.started.load(Ordering::Relaxed) {
            return None;
        }
        if self.acts.len() >= self.shared.actions || self.in_flight >= self.shared.window {
            return None;
        }
        if self.shared.interval.is_some() && now < self.next_send_at {
            return None;
        }
        if let Some(interval) = self.shared.interval {
            // A steady rate; after a stall (window full), no burst of catch-up sends.
            self.next_send_at += interval;
            if self.next_send_at <= now {
                self.next_send_at = now + interval;
            }
        }
        let (ms, seq) = self.ids.next(wall_ms());
        self.own_added += 1;
        self.acts.push(Act {
            ms,
            seq,
            added: self.own_added,
            sent_us: wall_us(),
            in_sync: 0,
            synced: false,
            answers: 0,
        });
        Some(self.action_frame(self.acts.len() - 1))
    }
    fn wake_at(&self) -> Option<Instant> {
        if !self.connected || self.acts.len() >= self.shared.actions {
            return None;
        }
        if self.subscribed && !self.shared.started.load(Ordering::Relaxed) {
            return Some(Instant::now() + Duration::from_millis(START_POLL_MS));
        }
        if self.shared.interval.is_some() && self.in_flight < self.shared.window {
            return Some(self.next_send_at);
        }
        None
    }
    fn on_sync(&mut self, pairs: &[Value], now: Instant) {
        let now_us = wall_us();
        let per_client = self.shared.actions;
        let total = (self.shared.clients * per_client) as u64;
        for pair in pairs.chunks_exact(2) {
            let (action, meta) = (&pair[0], &pair[1]);
            match client::action_type(action) {
                kind @ ("logux/processed" | "logux/undo") => {
                    let undo = kind == "logux/undo";
                    let id = action.get("id").and_then(Value::as_str).unwrap_or("");
                    let Some(p) = proto::parse_action_id(id).filter(|p| p.node == self.node_id)
                    else {
                        self.shared.ctx.errors.add("unknown_processed");
                        continue;
                    };
                    if undo {
                        let reason = action
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or("none");
                        self.shared.ctx.errors.add(&format!("undo:{reason}"));
                    }
                    if self.sub == Some((p.ms, p.seq)) {
                        if !undo {
                            let since_id = meta.get("id").and_then(|id| {
                                proto::decode_meta_id(id, self.base_time, &self.server_node)
                            });
                            if let (Some(id), Some(time)) =
                                (since_id, meta.get("time").and_then(Value::as_i64))
                            {
                                self.since = Some((id, time + self.base_time));
                            }
                        }
                        if !self.subscribed {
                            self.subscribed = true;
                            let count = self.shared.subscribed.fetch_add(1, Ordering::AcqRel) + 1;
                            if count >= self.shared.clients {
                                self.shared.wake.notify_one();
                            }
                        }
                        continue;
                    }
                    let Ok(i) = self
                        .acts
                        .binary_search_by(|a| (a.ms, a.seq).cmp(&(p.ms, p.seq)))
                    else {
                        continue;
                    };
                    let act = &mut self.acts[i];
                    act.answers = act.answers.saturating_add(1);
                    if act.answers > 1 {
                        self.duplicated_processed += 1;
                        continue;
                    }
                    if undo {
                        self.undone += 1;
                    } else {
                        self.processed += 1;
                        self.shared.processed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.ack_latencies_us
                        .push(now_us.saturating_sub(act.sent_us).min(u32::MAX as u64) as u32);
                    self.last_processed = Some(now);
                }
                t if t == self.shared.action_type => {
                    let n = action.get("n").and_then(Value::as_u64).unwrap_or(u64::MAX);
                    if n >= total || n as usize / per_client == self.index {
                        self.unexpected += 1;
                        continue;
                    }
                    let (word, bit) = ((n / 64) as usize, n % 64);
                    if self.received[word] & (1 << bit) != 0 {
                        self.duplicated_received += 1;
                        continue;
                    }
                    self.received[word] |= 1 << bit;
                    self.received_count += 1;
                    self.shared.deliveries.fetch_add(1, Ordering::Relaxed);
                    let sent_us = action
                        .get("sent_at_ms")
                        .and_then(Value::as_f64)
                        .map_or(now_us, |ms| (ms * 1000.0) as u64);
                    self.latencies_us
                        .push(now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
                    self.last_delivery = Some(now);
                }
                other => self.shared.ctx.errors.add(&format!("received:{other}")),
            }
        }
        self.check_done();
    }
    fn on_synced(&mut self, added: u64, _now: Instant) {
        if let Ok(i) = self.acts.binary_search_by(|a| a.added.cmp(&added)) {
            let act = &mut self.acts[i];
            if act.in_sync == added {
                act.synced = true;
                act.in_sync = 0;
                self.in_flight = self.in_flight.saturating_sub(1);
            }
        }
        self.check_done();
    }
    fn on_closed(&mut self, _now: Instant) {
        self.connected = false;
        for act in &mut self.acts {
            act.in_sync = 0;
        }
        self.in_flight = 0;
        self.sub = None;
    }
    fn on_fatal(&mut self) {
        // A client that stops for good cannot finish; the run ends at the timeout.
        self.shared.ctx.errors.add("fanout:client_gave_up");
    }
}

/// Runs the scenario.
pub async fn run(args: FanoutArgs) -> Result<Outcome, String> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let c = args.clients;
    let m = args.actions;
    if c < 2 {
        return Err("--clients must be at least 2".into());
    }
    if m == 0 {
        return Err("--actions must be at least 1".into());
    }
    if args.window == 0 {
        return Err("--window must be at least 1".into());
    }
    let expected = (c as u64) * (c as u64 - 1) * m as u64;
    if expected > FANOUT_DELIVERIES_MAX {
        return Err(format!(
            "clients·(clients−1)·actions = {expected} deliveries is over the limit of {FANOUT_DELIVERIES_MAX}"
        ));
    }
    let interval = match args.rate {
        Some(rate) if rate > 0.0 && rate.is_finite() => Some(Duration::from_secs_f64(1.0 / rate)),
        Some(_) => return Err("--rate must be a positive number".into()),
        None => None,
    };
    setup.check_fds(c as u64, &format!("fanout with {c} clients"))?;
    let ctx = setup.ctx.clone();
    let deadline = setup.deadline;
    let pid = common.server_pid;
    let room = format!("{}-fanout", setup.run_id);
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        type_json: setup.type_json.clone(),
        action_type: common.action_type.clone(),
        channel_json: proto::json_str(&format!("{}{room}", common.channel_prefix)),
        room_json: proto::json_str(&room),
        clients: c,
        actions: m,
        window: args.window,
        interval,
        subscribed: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        wake: Notify::new(),
        started: AtomicBool::new(false),
        deliveries: AtomicU64::new(0),
        processed: AtomicU64::new(0),
    });
    eprintln!(
        "ferry-bench fanout: run {} against {}: {c} clients x {m} actions in room {room}, window {}, rate {}",
        setup.run_id,
        ctx.connector.target.url,
        args.window,
        args.rate.map_or_else(|| "max".to_owned(), |r| format!("{r}/s"))
    );
    let (stop_tx, stop) = Stop::new();
    let words = (c * m).div_ceil(64);
    let mut handles = Vec::with_capacity(c);
    for i in 0..c {
        let mut fc = FanoutClient {
            index: i,
            node_id: format!("{}{i}:{}:t1", common.user_prefix, setup.run_id),
            shared: shared.clone(),
            ids: IdGen::default(),
            own_added: 0,
            last_received: 0,
            since: None,
            base_time: 0,
            server_node: String::new(),
            connected: false,
            resend: false,
            send_subscribe: false,
            sub: None,
            subscribed: false,
            acts: Vec::with_capacity(m),
            in_flight: 0,
            next_send_at: Instant::now(),
            processed: 0,
            undone: 0,
            duplicated_processed: 0,
            received: vec![0; words],
            received_count: 0,
            duplicated_received: 0,
            unexpected: 0,
            latencies_us: Vec::with_capacity((c - 1) * m),
            ack_latencies_us: Vec::with_capacity(m),
            last_delivery: None,
            last_processed: None,
            done: false,
            attempts: 0,
        };
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        handles.push(tokio::spawn(async move {
            client::run(&ctx, &mut fc, &mut stop).await;
            fc
        }));
    }
    let rss_sampler = pid.map(|pid| {
        let peak = Arc::new(AtomicU64::new(0));
        let p = peak.clone();
        let task = tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_millis(crate::monitor::RSS_SAMPLE_MS));
            loop {
                tick.tick().await;
                if let Some(bytes) = sys::rss_bytes(pid) {
                    p.fetch_max(bytes, Ordering::Relaxed);
                }
            }
        });
        (peak, task)
    });

    // Phase 1: everybody subscribed.
    let mut timed_out = false;
    let connect_start = Instant::now();
    while shared.subscribed.load(Ordering::Acquire) < c {
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
        }
    }
    let subscribe_ms = connect_start.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "[fanout] {} of {c} clients subscribed in {:.1} ms; sending",
        shared.subscribed.load(Ordering::Relaxed),
        subscribe_ms
    );
    // Phase 2: send.
    let cpu_send_start = pid.and_then(|p| sys::cpu_times(&p.to_string()));
    let start = Instant::now();
    shared.started.store(true, Ordering::Release);
    let progress = {
        let shared = shared.clone();
        common::progress(common.progress_ms, move || {
            format!(
                "[fanout] {:.1}s processed {}/{} deliveries {}/{} done clients {}",
                start.elapsed().as_secs_f64(),
                shared.processed.load(Ordering::Relaxed),
                c * m,
                shared.deliveries.load(Ordering::Relaxed),
                expected,
                shared.done.load(Ordering::Relaxed)
            )
        })
    };
    while !timed_out && shared.done.load(Ordering::Acquire) < c {
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => { timed_out = true; break; }
        }
    }
    let send_elapsed = start.elapsed();
    let cpu_send_end = pid.and_then(|p| sys::cpu_times(&p.to_string()));
    let _ = stop_tx.send(true);
    let mut clients = Vec::with_capacity(c);
    for handle in handles {
        match handle.await {
            Ok(fc) => clients.push(fc),
            Err(_) => ctx.errors.add("internal:client_task_failed"),
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let server_peak = rss_sampler.map(|(peak, task)| {
        task.abort();
        peak.load(Ordering::Relaxed)
    });

    let received: u64 = clients.iter().map(|f| f.received_count).sum();
    let processed: u64 = clients.iter().map(|f| f.processed as u64).sum();
    let undone: u64 = clients.iter().map(|f| f.undone as u64).sum();
    let sent: u64 = clients.iter().map(|f| f.acts.len() as u64).sum();
    let dup_received: u64 = clients.iter().map(|f| f.duplicated_received).sum();
    let dup_processed: u64 = clients.iter().map(|f| f.duplicated_processed).sum();
    let unexpected: u64 = clients.iter().map(|f| f.unexpected).sum();
    let reconnects: u64 = clients
        .iter()
        .map(|f| u64::from(f.attempts.saturating_sub(1)))
        .sum();
    let missing = expected.saturating_sub(received);
    let last_delivery = clients.iter().filter_map(|f| f.last_delivery).max();
    let last_processed = clients.iter().filter_map(|f| f.last_processed).max();
    let secs = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(start).as_secs_f64());
    let per_s = |count: u64, s: Option<f64>| match s {
        Some(s) if s > 0.0 => json!(sys::round3(count as f64 / s)),
        _ => Value::Null,
    };
    let mut latencies: Vec<u64> = clients
        .iter()
        .flat_map(|f| f.latencies_us.iter().map(|us| u64::from(*us)))
        .collect();
    let mut ack_latencies: Vec<u64> = clients
        .iter()
        .flat_map(|f| f.ack_latencies_us.iter().map(|us| u64::from(*us)))
        .collect();
    let duplicated = dup_received + dup_processed;
    let ok = !timed_out && missing == 0 && duplicated == 0 && undone == 0 && unexpected == 0;
    let summary = json!({
        "scenario": "fanout",
        "ok": ok,
        "timed_out": timed_out,
        "run_id": setup.run_id,
        "url": ctx.connector.target.url,
        "params": {
            "clients": c,
            "actions": m,
            "rate": args.rate,
            "window": args.window,
            "timeout_s": common.timeout_s,
        },
        "subscribe_ms": sys::round3(subscribe_ms),
        "send_ms": sys::round3(send_elapsed.as_secs_f64() * 1000.0),
        "actions_sent": sent,
        "actions_processed": processed,
        "actions_undone": undone,
        "actions_per_s": per_s(processed, secs(last_processed)),
        "deliveries_expected": expected,
        "deliveries": received,
        "deliveries_per_s": per_s(received, secs(last_delivery)),
        "missing_deliveries": missing,
        "duplicated": {
            "total": duplicated,
            "deliveries": dup_received,
            "processed": dup_processed,
        },
        "unexpected_deliveries": unexpected,
        "latency_ms": stats::summary_ms(&mut latencies, stats::P50_P99_P999),
        "processed_latency_ms": stats::summary_ms(&mut ack_latencies, stats::P50_P99_P999),
        "reconnects": reconnects,
        "errors": ctx.errors.to_json(),
        "server": pid.map(|pid| json!({
            "pid": pid,
            "peak_rss_bytes": server_peak,
            "cpu_s_sending": match (cpu_send_start, cpu_send_end) {
                (Some(a), Some(b)) => json!(sys::round3(b.since(&a).total_s())),
                _ => Value::Null,
            },
            "cpu_s": setup.server_cpu_s(common),
        })),
        "generator": setup.generator_json(common),
    });
    Ok(Outcome { summary, ok })
}
