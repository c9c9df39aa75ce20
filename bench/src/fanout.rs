//! `fanout`: C clients in one room, each sending M actions (one per `sync`, at most
//! `--window` `sync`s without `synced`, optionally at `--rate` per second); every action must
//! reach the C-1 others. Measures deliveries/s, processed actions/s, and the send-to-receive
//! latency (the `sent_at_ms` inside the action against the receiver's wall clock: the same
//! clock, since every client lives in this process).
//!
//! With several `--url`s client i connects to URL i % n, and the latency is also split by
//! whether sender and receiver were on the same server. `--rooms R` puts client i in room
//! i % R (R = C: no fan-out at all, only acknowledged actions). `--failover` moves a client
//! to the next URL whenever its connection closes, and the summary's `reconnected` section
//! times how long each client took from the close to being synchronized again.

use crate::client::{self, wall_ms, wall_us, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::monitor::RssPeak;
use crate::proto::{self, SyncFrame};
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

/// Most deliveries one run may expect (C·(C−1)·M): bounds the receive bitmaps and latency
/// samples (4 bytes each).
pub const FANOUT_DELIVERIES_MAX: u64 = 50_000_000;

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
    /// Rooms: client i is in room i % rooms and receives only its room's actions. With
    /// `--rooms` equal to `--clients` nobody receives anything: acknowledged actions only.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// When a client's connection closes, reconnect to the next `--url` (i+1 mod n) instead
    /// of the same one.
    #[arg(long)]
    pub failover: bool,
}

/// Clients in room `room` when `clients` are spread over `rooms` (client i in room i % rooms).
fn room_members(clients: usize, rooms: usize, room: usize) -> usize {
    clients / rooms + usize::from(room < clients % rooms)
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
    /// JSON literal of each room's id.
    room_json: Vec<String>,
    /// JSON literal of each room's channel.
    channel_json: Vec<String>,
    /// Rooms (client i is in room i % rooms).
    rooms: usize,
    /// Server URLs.
    urls: usize,
    /// Move to the next URL when a connection closes.
    failover: bool,
    /// The URL index of each client's current (or last) connection, for the same-node /
    /// cross-node split of the latency.
    node_of: Vec<AtomicUsize>,
    /// C.
    clients: usize,
    /// M.
    actions: usize,
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
    /// The run is ending: closes from now on are ours, not drops.
    stopping: AtomicBool,
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
    /// Our actions (and the ids and log positions of the subscribes too).
    sending: Sending,
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
    /// The subscribe must be sent on this connection.
    send_subscribe: bool,
    /// This connection's subscribe id.
    sub: Option<(u64, u32)>,
    /// The first subscribe was processed (counted in `subscribed`).
    subscribed: bool,
    /// Received bitmap over action numbers (C·M bits).
    received: Vec<u64>,
    /// Distinct actions received.
    received_count: u64,
    /// Actions received again.
    duplicated_received: u64,
    /// Own actions received back, or numbers out of range.
    unexpected: u64,
    /// Send-to-receive latencies, µs: sender and receiver on the same `--url` (all of them
    /// when there is one URL).
    latencies_us: Vec<u32>,
    /// Send-to-receive latencies, µs, sender on another `--url` than the receiver.
    cross_latencies_us: Vec<u32>,
    /// The `--url` index used for the next attempt / the current connection.
    url: usize,
    /// The subscribe of the current connection was processed.
    subscribed_here: bool,
    /// First close of a connection after `connected` (a drop, not our stop): wall µs.
    closed_at_us: Option<u64>,
    /// The first `connected` after that close: wall µs.
    reconnected_at_us: Option<u64>,
    /// Actions created before that close: all of them must be answered to be resynchronized.
    pending_at_close: usize,
    /// When, after that close, the client was connected again, its subscribe processed and
    /// every action created before the close answered: wall µs.
    resynced_at_us: Option<u64>,
    /// When the last delivery arrived.
    last_delivery: Option<Instant>,
    /// Counted in `done`.
    done: bool,
    /// Connect attempts.
    attempts: u32,
}

impl FanoutClient {
    fn expected_deliveries(&self) -> u64 {
        let members = room_members(self.shared.clients, self.shared.rooms, self.room());
        ((members - 1) * self.shared.actions) as u64
    }

    fn room(&self) -> usize {
        self.index % self.shared.rooms
    }

    /// After a drop: synchronized again once connected, subscribed on this connection, and
    /// every action created before the drop answered.
    fn check_resynced(&mut self) {
        if self.closed_at_us.is_none() || self.resynced_at_us.is_some() {
            return;
        }
        if self.connected
            && self.subscribed_here
            && self.sending.first_answered(self.pending_at_close)
        {
            self.resynced_at_us = Some(wall_us());
        }
    }

    fn check_done(&mut self) {
        if !self.done
            && self.sending.answered() >= self.shared.actions
            && self.received_count >= self.expected_deliveries()
        {
            self.done = true;
            if self.shared.done.fetch_add(1, Ordering::AcqRel) + 1 >= self.shared.clients {
                self.shared.wake.notify_one();
            }
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
        self.sending.own_added
    }
    fn url_index(&self) -> usize {
        self.url
    }
    fn on_attempt(&mut self, _now: Instant) {
        self.attempts += 1;
    }
    fn on_connected(&mut self, base_time: i64, server_node: &str, _now: Instant) {
        self.shared.node_of[self.index].store(self.url, Ordering::Relaxed);
        if self.closed_at_us.is_some() && self.reconnected_at_us.is_none() {
            self.reconnected_at_us = Some(wall_us());
        }
        self.subscribed_here = false;
        self.base_time = base_time;
        self.server_node = server_node.to_owned();
        self.connected = true;
        self.sending.on_connected();
        self.send_subscribe = true;
    }
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if !self.connected {
            return None;
        }
        if self.send_subscribe {
            self.send_subscribe = false;
            let (ms, seq, added) = self.sending.next_id(wall_ms());
            let mut frame = SyncFrame::new(added);
            frame.push(
                &proto::subscribe_action(
                    &self.shared.channel_json[self.room()],
                    self.since.as_ref(),
                ),
                &proto::own_meta(ms, seq, self.base_time),
            );
            self.sub = Some((ms, seq));
            // Subscribes do not count against the window.
            return Some(Outgoing {
                text: frame.finish(),
                expects_answer: true,
            });
        }
        // Actions sent on an earlier connection without `synced` go first (same ids), then
        // new ones once subscribed and the sending phase started.
        let may_send_new = self.subscribed && self.shared.started.load(Ordering::Relaxed);
        let shared = &self.shared;
        let room_json = &shared.room_json[self.index % shared.rooms];
        let first_n = self.index * shared.actions;
        self.sending
            .next_frame(now, self.base_time, may_send_new, |i, sent_us| {
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
        if self.subscribed && !self.shared.started.load(Ordering::Relaxed) {
            return Some(Instant::now() + Duration::from_millis(common::START_POLL_MS));
        }
        self.sending.wake_at()
    }
    fn on_sync(&mut self, pairs: &[proto::Pair], now: Instant) {
        let now_us = wall_us();
        let per_client = self.shared.actions;
        let total = (self.shared.clients * per_client) as u64;
        for pair in pairs {
            let (action, meta) = (&pair.action, &pair.meta);
            match action.kind() {
                kind @ ("logux/processed" | "logux/undo") => {
                    let undo = kind == "logux/undo";
                    let errors = &self.shared.ctx.errors;
                    let Some((ms, seq)) = sending::own_answer(action, undo, &self.node_id, errors)
                    else {
                        continue;
                    };
                    if self.sub == Some((ms, seq)) {
                        if !undo {
                            let since_id =
                                proto::decode_meta_id(&meta.id, self.base_time, &self.server_node);
                            if let (Some(id), Some(time)) = (since_id, meta.time()) {
                                self.since = Some((id, time + self.base_time));
                            }
                        }
                        self.subscribed_here = true;
                        if !self.subscribed {
                            self.subscribed = true;
                            let count = self.shared.subscribed.fetch_add(1, Ordering::AcqRel) + 1;
                            if count >= self.shared.clients {
                                self.shared.wake.notify_one();
                            }
                        }
                        continue;
                    }
                    if self.sending.on_answer(ms, seq, undo, now, now_us) == Answer::Processed {
                        self.shared.processed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                t if t == self.shared.action_type => {
                    let n = action.n().unwrap_or(u64::MAX);
                    let sender = (n as usize) / per_client;
                    if n >= total
                        || sender == self.index
                        || sender % self.shared.rooms != self.room()
                    {
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
                        .sent_at_ms()
                        .map_or(now_us, |ms| (ms * 1000.0) as u64);
                    let latency = now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32;
                    // The sender's node as it is now (it may have moved since, with
                    // --failover; its node changes only on a reconnect).
                    if self.shared.node_of[sender].load(Ordering::Relaxed) == self.url {
                        self.latencies_us.push(latency);
                    } else {
                        self.cross_latencies_us.push(latency);
                    }
                    self.last_delivery = Some(now);
                }
                other => self.shared.ctx.errors.add(&format!("received:{other}")),
            }
        }
        self.check_resynced();
        self.check_done();
    }
    fn on_synced(&mut self, added: u64, now: Instant) {
        // A subscribe's `synced` is none of `sending`'s.
        self.sending.on_synced(added, now, wall_us());
        self.check_resynced();
        self.check_done();
    }
    fn on_closed(&mut self, _now: Instant) {
        // `on_closed` also runs after our own stop; only a drop while running counts.
        if self.connected
            && !self.shared.stopping.load(Ordering::Relaxed)
            && self.closed_at_us.is_none()
        {
            self.closed_at_us = Some(wall_us());
            self.pending_at_close = self.sending.acts.len();
        }
        if self.shared.failover {
            self.url = (self.url + 1) % self.shared.urls;
        }
        self.subscribed_here = false;
        self.connected = false;
        self.sending.on_closed();
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
    let setup = Setup::new_multi(common)?;
    let urls = setup.ctx.connectors.len();
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
    if args.rooms == 0 || args.rooms > c {
        return Err("--rooms must be 1..=--clients".into());
    }
    let rooms = args.rooms;
    // Σ over clients of (members of its room − 1)·M; C·(C−1)·M with one room.
    let expected: u64 = (0..rooms)
        .map(|r| {
            let k = room_members(c, rooms, r) as u64;
            k * k.saturating_sub(1) * m as u64
        })
        .sum();
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
    let pid = setup.server_pids;
    let nats = setup.nats_pids;
    // One room keeps the old name; several are numbered.
    let room_names: Vec<String> = if rooms == 1 {
        vec![format!("{}-fanout", setup.run_id)]
    } else {
        (0..rooms)
            .map(|r| format!("{}-fanout-{r}", setup.run_id))
            .collect()
    };
    let room = room_names[0].clone();
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        type_json: setup.type_json.clone(),
        action_type: common.action_type.clone(),
        channel_json: room_names
            .iter()
            .map(|r| proto::json_str(&format!("{}{r}", common.channel_prefix)))
            .collect(),
        room_json: room_names.iter().map(|r| proto::json_str(r)).collect(),
        rooms,
        urls,
        failover: args.failover,
        node_of: (0..c).map(|i| AtomicUsize::new(i % urls)).collect(),
        stopping: AtomicBool::new(false),
        clients: c,
        actions: m,
        subscribed: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        wake: Notify::new(),
        started: AtomicBool::new(false),
        deliveries: AtomicU64::new(0),
        processed: AtomicU64::new(0),
    });
    let url_list: Vec<String> = ctx
        .connectors
        .iter()
        .map(|k| k.target.url.clone())
        .collect();
    eprintln!(
        "ferry-bench fanout: run {} against {}: {c} clients x {m} actions in {} (first {room}), window {}, rate {}{}",
        setup.run_id,
        url_list.join(", "),
        if rooms == 1 { "one room".to_owned() } else { format!("{rooms} rooms") },
        args.window,
        args.rate.map_or_else(|| "max".to_owned(), |r| format!("{r}/s")),
        if args.failover { ", failover" } else { "" }
    );
    let (stop_tx, stop) = Stop::new();
    let words = (c * m).div_ceil(64);
    let mut handles = Vec::with_capacity(c);
    for i in 0..c {
        let mut fc = FanoutClient {
            index: i,
            node_id: format!("{}{i}:{}:t1", common.user_prefix, setup.run_id),
            shared: shared.clone(),
            sending: Sending::new(Pace {
                total: m,
                window: args.window,
                batch: 1,
                interval,
            }),
            last_received: 0,
            since: None,
            base_time: 0,
            server_node: String::new(),
            connected: false,
            send_subscribe: false,
            sub: None,
            subscribed: false,
            received: vec![0; words],
            received_count: 0,
            duplicated_received: 0,
            unexpected: 0,
            latencies_us: Vec::with_capacity(
                (room_members(c, rooms, i % rooms) - 1) * m / if urls > 1 { 2 } else { 1 },
            ),
            cross_latencies_us: Vec::new(),
            url: i % urls,
            subscribed_here: false,
            closed_at_us: None,
            reconnected_at_us: None,
            pending_at_close: 0,
            resynced_at_us: None,
            last_delivery: None,
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
    let rss_sampler = pid.map(RssPeak::start);

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
    let cpu_send_start = pid.and_then(sys::pids_cpu);
    let nats_send_start = nats.and_then(sys::pids_cpu);
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
    let cpu_send_end = pid.and_then(sys::pids_cpu);
    let nats_send_end = nats.and_then(sys::pids_cpu);
    shared.stopping.store(true, Ordering::Release);
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
    let server_peak = rss_sampler.map(RssPeak::stop);

    let received: u64 = clients.iter().map(|f| f.received_count).sum();
    let processed: u64 = clients.iter().map(|f| f.sending.processed as u64).sum();
    let undone: u64 = clients.iter().map(|f| f.sending.undone as u64).sum();
    let sent: u64 = clients.iter().map(|f| f.sending.acts.len() as u64).sum();
    let dup_received: u64 = clients.iter().map(|f| f.duplicated_received).sum();
    let dup_processed: u64 = clients.iter().map(|f| f.sending.duplicated_answers).sum();
    let unexpected: u64 = clients.iter().map(|f| f.unexpected).sum();
    let reconnects: u64 = clients
        .iter()
        .map(|f| u64::from(f.attempts.saturating_sub(1)))
        .sum();
    let missing = expected.saturating_sub(received);
    let last_delivery = clients.iter().filter_map(|f| f.last_delivery).max();
    let last_processed = clients.iter().filter_map(|f| f.sending.last_answered).max();
    let secs = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(start).as_secs_f64());
    let per_s = |count: u64, s: Option<f64>| match s {
        Some(s) if s > 0.0 => json!(sys::round3(count as f64 / s)),
        _ => Value::Null,
    };
    let mut same_latencies: Vec<u64> = clients
        .iter()
        .flat_map(|f| f.latencies_us.iter().map(|us| u64::from(*us)))
        .collect();
    let mut cross_latencies: Vec<u64> = clients
        .iter()
        .flat_map(|f| f.cross_latencies_us.iter().map(|us| u64::from(*us)))
        .collect();
    let mut latencies: Vec<u64> = same_latencies
        .iter()
        .chain(cross_latencies.iter())
        .copied()
        .collect();
    // Clients whose connection dropped during the run: close → synchronized again.
    let dropped: Vec<&FanoutClient> = clients
        .iter()
        .filter(|f| f.closed_at_us.is_some())
        .collect();
    let mut resync_us: Vec<u64> = dropped
        .iter()
        .filter_map(|f| Some(f.resynced_at_us?.saturating_sub(f.closed_at_us?)))
        .collect();
    let mut reconnect_us: Vec<u64> = dropped
        .iter()
        .filter_map(|f| Some(f.reconnected_at_us?.saturating_sub(f.closed_at_us?)))
        .collect();
    let mut catch_up_us: Vec<u64> = dropped
        .iter()
        .filter_map(|f| Some(f.resynced_at_us?.saturating_sub(f.reconnected_at_us?)))
        .collect();
    let wall_ms_of = |us: Option<u64>| us.map_or(Value::Null, |us| json!(us as f64 / 1000.0));
    let reconnected = json!({
        "clients": dropped.len(),
        "not_resynchronized": dropped.iter().filter(|f| f.resynced_at_us.is_none()).count(),
        "first_close_wall_ms": wall_ms_of(dropped.iter().filter_map(|f| f.closed_at_us).min()),
        "last_close_wall_ms": wall_ms_of(dropped.iter().filter_map(|f| f.closed_at_us).max()),
        "last_resynchronized_wall_ms": wall_ms_of(dropped.iter().filter_map(|f| f.resynced_at_us).max()),
        "close_to_resynchronized_ms": stats::summary_ms(&mut resync_us, stats::P50_P99),
        "close_to_connected_ms": stats::summary_ms(&mut reconnect_us, stats::P50_P99),
        "connected_to_resynchronized_ms": stats::summary_ms(&mut catch_up_us, stats::P50_P99),
        "on_url_at_end": (0..urls)
            .map(|u| clients.iter().filter(|f| f.url == u).count())
            .collect::<Vec<_>>(),
    });
    let mut ack_latencies = sending::gather_us(
        clients
            .iter()
            .map(|f| f.sending.answer_latencies_us.as_slice()),
    );
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
            "rooms": rooms,
            "failover": args.failover,
            "timeout_s": common.timeout_s,
        },
        "urls": url_list,
        "clients_per_url": (0..urls).map(|u| (0..c).filter(|i| i % urls == u).count()).collect::<Vec<_>>(),
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
        "latency_same_node_ms": stats::summary_ms(&mut same_latencies, stats::P50_P99_P999),
        "latency_cross_node_ms": stats::summary_ms(&mut cross_latencies, stats::P50_P99_P999),
        "processed_latency_ms": stats::summary_ms(&mut ack_latencies, stats::P50_P99_P999),
        "reconnects": reconnects,
        "reconnected": reconnected,
        "errors": ctx.errors.to_json(),
        "server": pid.map(|pid| json!({
            "pid": pid.first(),
            "pids": pid.list(),
            "peak_rss_bytes": server_peak,
            "cpu_s_sending": sys::cpu_s_between(&cpu_send_start, &cpu_send_end),
            "cpu_s_sending_by_pid": sys::cpu_s_between_each(&cpu_send_start, &cpu_send_end),
            "cpu_s": setup.server_cpu_s(common),
        })),
        "nats": nats.map(|nats| json!({
            "pids": nats.list(),
            "cpu_s_sending": sys::cpu_s_between(&nats_send_start, &nats_send_end),
            "cpu_s_sending_by_pid": sys::cpu_s_between_each(&nats_send_start, &nats_send_end),
            "cpu_s": setup.nats_cpu_s(),
        })),
        "generator": setup.generator_json(common),
    });
    Ok(Outcome { summary, ok })
}
