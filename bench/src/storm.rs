//! `storm`: N clients come back from offline at once, each with K unsent actions and one
//! subscription, then all drop at once; optionally repeated.
//!
//! Per round: every client is given K new actions (created "offline", before it connects),
//! opens its socket (at most `--connect-concurrency` TCP connects + upgrades in flight),
//! sends `connect`, and after `connected` sends ONE `sync` with every unacknowledged action
//! and a second `sync` with a `logux/subscribe` to its room. It is *synchronized* when every
//! `sync` it sent got `synced`, and every action of the round plus the subscribe of the
//! current connection got `logux/processed` (or `logux/undo`). A server-side close makes it
//! reconnect like `@logux/client` and re-send what was not `synced` (same ids). When all are
//! synchronized (or the deadline passes) every client closes at once, and the pingers keep
//! measuring for `--disconnect-watch-ms`.

use crate::client::{self, wall_ms, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::monitor::{self, Monitor, MonitorConfig, PingResults};
use crate::proto::{self, IdGen, SyncFrame};
use crate::stats;
use crate::sys;
use crate::Outcome;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// `storm` flags.
#[derive(clap::Args, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients (N).
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Unsent actions per client per round (K).
    #[arg(long, default_value_t = 20)]
    pub actions: usize,
    /// Rooms; client i is in room i % rooms (default N/10).
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Clients connected before the storm that ping every --ping-interval-ms.
    #[arg(long, default_value_t = 20)]
    pub pingers: usize,
    /// Time between two pings of a pinger.
    #[arg(long, default_value_t = 100)]
    pub ping_interval_ms: u64,
    /// Pinger-only measurement before the first storm, in ms.
    #[arg(long, default_value_t = 1000)]
    pub baseline_ms: u64,
    /// Rounds (storm + mass disconnect), same node ids and cursors, new actions each round.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// How long the pingers keep measuring after the mass disconnect, in ms.
    #[arg(long, default_value_t = 3000)]
    pub disconnect_watch_ms: u64,
    /// After the last round, subscribe to every room without `since` and check that every
    /// processed action comes back exactly once (needs a server that replays channel
    /// history on subscribe, like Ferry; @logux/server does not).
    #[arg(long)]
    pub verify: bool,
}

/// State shared by the storm clients.
#[derive(Debug)]
struct Shared {
    /// Protocol settings and counters.
    ctx: Arc<ClientCtx>,
    /// JSON literal of the action type.
    type_json: String,
    /// The action type.
    action_type: String,
    /// N.
    clients: usize,
    /// K.
    actions: usize,
    /// Room actions received from other clients.
    deliveries: AtomicU64,
    /// Clients of this round that are synchronized or gave up.
    finished: AtomicUsize,
    /// Clients of this round that are synchronized.
    synchronized: AtomicUsize,
    /// Woken when `finished` reaches N.
    round_done: Notify,
    /// `logux/processed`/`undo` for an action already resolved.
    duplicated_processed: AtomicU64,
    /// The same for a subscribe.
    duplicated_subscribe: AtomicU64,
    /// Duplicates (of either kind) for an action this client had sent more than once.
    duplicated_after_resend: AtomicU64,
    /// `logux/processed`/`undo` for an id this client never sent.
    unknown_processed: AtomicU64,
}

impl Shared {
    fn finish_one(&self) {
        if self.finished.fetch_add(1, Ordering::AcqRel) + 1 >= self.clients {
            self.round_done.notify_one();
        }
    }
}

/// Where an action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `logux/processed` or `logux/undo`.
    Pending,
    /// Processed.
    Processed,
    /// Undone.
    Undone,
    /// A subscribe of an earlier connection that never got an answer (replaced).
    Superseded,
}

/// One action of a client (a room message or a subscribe).
#[derive(Debug, Clone)]
struct Act {
    /// Id `ms`.
    ms: u64,
    /// Id `seq`.
    seq: u32,
    /// Our log position.
    added: u64,
    /// The run-unique action number (`None` for a subscribe).
    n: Option<u64>,
    /// `added` of the `sync` it went out in on this connection (0 = not sent).
    in_sync: u64,
    /// Got `synced`: it will never be re-sent.
    synced: bool,
    /// Times sent (more than once after a connection dropped before `synced`).
    sends: u8,
    /// Resolution.
    state: State,
}

/// One storm client; lives across rounds (same node id, cursors and id generator).
#[derive(Debug)]
struct StormClient {
    /// Client number.
    index: usize,
    /// Node id.
    node_id: String,
    /// JSON literal of the room id.
    room_json: String,
    /// JSON literal of the room's channel.
    channel_json: String,
    /// Shared state.
    shared: Arc<Shared>,
    /// Id generator.
    ids: IdGen,
    /// Our log position.
    own_added: u64,
    /// Highest server `added` seen.
    last_received: u64,
    /// `since` for the next subscribe: the id and time of the last subscribe's processed.
    since: Option<(String, i64)>,
    /// Every action, sorted by id.
    acts: Vec<Act>,
    /// This connection's `baseTime`.
    base_time: i64,
    /// This connection's server node id.
    server_node: String,
    /// Unacknowledged actions still have to be sent on this connection.
    send_actions: bool,
    /// The subscribe still has to be sent on this connection.
    send_subscribe: bool,
    /// Index in `acts` of this connection's subscribe.
    current_sub: Option<usize>,
    /// `sync`s of this connection without `synced`.
    unsynced_syncs: u32,
    /// Index in `acts` where this round's messages start.
    round_first: usize,
    /// First connect attempt this round.
    first_attempt: Option<Instant>,
    /// When every action of this round was answered (the subscribe may still wait).
    actions_done_at: Option<Instant>,
    /// When this round's work was all acknowledged.
    synchronized_at: Option<Instant>,
    /// Connect attempts this round.
    attempts: u32,
    /// Stopped reconnecting after a fatal error.
    gave_up: bool,
}

impl StormClient {
    fn begin_round(&mut self, round: u32, now_ms: u64) {
        self.round_first = self.acts.len();
        let (n_clients, k) = (self.shared.clients as u64, self.shared.actions as u64);
        for j in 0..k {
            let (ms, seq) = self.ids.next(now_ms);
            self.own_added += 1;
            self.acts.push(Act {
                ms,
                seq,
                added: self.own_added,
                n: Some((round as u64 * n_clients + self.index as u64) * k + j),
                in_sync: 0,
                synced: false,
                sends: 0,
                state: State::Pending,
            });
        }
        self.first_attempt = None;
        self.synchronized_at = None;
        self.actions_done_at = None;
        self.attempts = 0;
    }

    fn find(&self, ms: u64, seq: u32) -> Option<usize> {
        self.acts
            .binary_search_by(|a| (a.ms, a.seq).cmp(&(ms, seq)))
            .ok()
    }

    fn check_synchronized(&mut self, now: Instant) {
        if self.synchronized_at.is_some() || self.gave_up {
            return;
        }
        let actions_done = || {
            !self.acts[self.round_first..]
                .iter()
                .any(|a| a.n.is_some() && a.state == State::Pending)
        };
        if self.actions_done_at.is_none() && actions_done() {
            self.actions_done_at = Some(now);
        }
        if self.actions_done_at.is_none() || self.unsynced_syncs > 0 {
            return;
        }
        let Some(sub) = self.current_sub else {
            return;
        };
        if self.acts[sub].state == State::Pending {
            return;
        }
        self.synchronized_at = Some(now);
        self.shared.synchronized.fetch_add(1, Ordering::Relaxed);
        self.shared.finish_one();
    }

    /// A `logux/processed` (undo = false) or `logux/undo` for one of our ids.
    fn resolve(&mut self, action: &proto::Action, meta: &proto::Meta, undo: bool) {
        let errors = &self.shared.ctx.errors;
        let Some(id) = action.id() else {
            errors.add("protocol:processed_without_id");
            return;
        };
        let Some(parsed) = proto::parse_action_id(id) else {
            errors.add("protocol:bad_action_id");
            return;
        };
        let found = (parsed.node == self.node_id)
            .then(|| self.find(parsed.ms, parsed.seq))
            .flatten();
        let Some(i) = found else {
            self.shared
                .unknown_processed
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if undo {
            errors.add(&format!("undo:{}", action.reason().unwrap_or("none")));
        }
        let act = &mut self.acts[i];
        match act.state {
            State::Pending | State::Superseded => {
                act.state = if undo {
                    State::Undone
                } else {
                    State::Processed
                };
                if act.n.is_none() && !undo {
                    // Real clients re-subscribe with the processed's id and time.
                    let since_id =
                        proto::decode_meta_id(&meta.id, self.base_time, &self.server_node);
                    let since_time = meta.time();
                    if let (Some(id), Some(time)) = (since_id, since_time) {
                        self.since = Some((id, time + self.base_time));
                    }
                }
            }
            State::Processed | State::Undone => {
                let counter = if act.n.is_some() {
                    &self.shared.duplicated_processed
                } else {
                    &self.shared.duplicated_subscribe
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if act.sends > 1 {
                    self.shared
                        .duplicated_after_resend
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Workload for StormClient {
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
    fn on_attempt(&mut self, now: Instant) {
        self.attempts += 1;
        self.first_attempt.get_or_insert(now);
    }
    fn on_connected(&mut self, base_time: i64, server_node: &str, _now: Instant) {
        self.base_time = base_time;
        if self.server_node != server_node {
            self.server_node = server_node.to_owned();
        }
        self.send_actions = true;
        self.send_subscribe = true;
    }
    fn next_frame(&mut self, _now: Instant) -> Option<Outgoing> {
        if self.send_actions {
            self.send_actions = false;
            let added = self
                .acts
                .iter()
                .filter(|a| a.n.is_some() && !a.synced && a.state == State::Pending)
                .map(|a| a.added)
                .max();
            if let Some(added) = added {
                let mut frame = SyncFrame::new(added);
                let room_json = &self.room_json;
                for act in self
                    .acts
                    .iter_mut()
                    .filter(|a| a.n.is_some() && !a.synced && a.state == State::Pending)
                {
                    let n = act.n.unwrap_or_default();
                    frame.push(
                        &proto::bench_action(&self.shared.type_json, room_json, n, act.ms as f64),
                        &proto::own_meta(act.ms, act.seq, self.base_time),
                    );
                    act.in_sync = added;
                    act.sends = act.sends.saturating_add(1);
                }
                self.unsynced_syncs += 1;
                return Some(Outgoing {
                    text: frame.finish(),
                    expects_answer: true,
                });
            }
        }
        if self.send_subscribe {
            self.send_subscribe = false;
            let (ms, seq) = self.ids.next(wall_ms());
            self.own_added += 1;
            let mut frame = SyncFrame::new(self.own_added);
            frame.push(
                &proto::subscribe_action(&self.channel_json, self.since.as_ref()),
                &proto::own_meta(ms, seq, self.base_time),
            );
            self.acts.push(Act {
                ms,
                seq,
                added: self.own_added,
                n: None,
                in_sync: self.own_added,
                synced: false,
                sends: 1,
                state: State::Pending,
            });
            self.current_sub = Some(self.acts.len() - 1);
            self.unsynced_syncs += 1;
            return Some(Outgoing {
                text: frame.finish(),
                expects_answer: true,
            });
        }
        None
    }
    fn on_sync(&mut self, pairs: &[proto::Pair], now: Instant) {
        for pair in pairs {
            let (action, meta) = (&pair.action, &pair.meta);
            match action.kind() {
                "logux/processed" => self.resolve(action, meta, false),
                "logux/undo" => self.resolve(action, meta, true),
                t if t == self.shared.action_type => {
                    self.shared.deliveries.fetch_add(1, Ordering::Relaxed);
                }
                other => self.shared.ctx.errors.add(&format!("received:{other}")),
            }
        }
        self.check_synchronized(now);
    }
    fn on_synced(&mut self, added: u64, now: Instant) {
        let mut matched = false;
        for act in self.acts.iter_mut().filter(|a| a.in_sync == added) {
            act.synced = true;
            act.in_sync = 0;
            matched = true;
        }
        if matched {
            self.unsynced_syncs = self.unsynced_syncs.saturating_sub(1);
        } else {
            self.shared.ctx.errors.add("protocol:unexpected_synced");
        }
        self.check_synchronized(now);
    }
    fn on_closed(&mut self, _now: Instant) {
        for act in &mut self.acts {
            act.in_sync = 0;
        }
        if let Some(sub) = self.current_sub.take() {
            if self.acts[sub].state == State::Pending {
                self.acts[sub].state = State::Superseded;
            }
        }
        self.unsynced_syncs = 0;
        self.send_actions = false;
        self.send_subscribe = false;
    }
    fn on_fatal(&mut self) {
        if !self.gave_up && self.synchronized_at.is_none() {
            self.gave_up = true;
            self.shared.finish_one();
        }
    }
}

/// Runs the scenario.
pub async fn run(args: StormArgs) -> Result<Outcome, String> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let n = args.clients;
    let k = args.actions;
    if n == 0 {
        return Err("--clients must be at least 1".into());
    }
    if args.repeat == 0 {
        return Err("--repeat must be at least 1".into());
    }
    let rooms = args.rooms.unwrap_or(n / 10).max(1);
    let extra = args.pingers as u64 + u64::from(args.verify);
    setup.check_fds(
        n as u64 + extra,
        &format!("storm with {n} clients and {} pingers", args.pingers),
    )?;
    let total_actions = n as u64 * k as u64 * u64::from(args.repeat);
    let ctx = setup.ctx.clone();
    let deadline = setup.deadline;
    let pid = sys::Pids::new(&common.server_pid);
    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        type_json: setup.type_json.clone(),
        action_type: common.action_type.clone(),
        clients: n,
        actions: k,
        deliveries: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
        synchronized: AtomicUsize::new(0),
        round_done: Notify::new(),
        duplicated_processed: AtomicU64::new(0),
        duplicated_subscribe: AtomicU64::new(0),
        duplicated_after_resend: AtomicU64::new(0),
        unknown_processed: AtomicU64::new(0),
    });
    eprintln!(
        "ferry-bench storm: run {} against {}: {n} clients x {k} actions, {rooms} rooms, {} pingers, {} round(s)",
        setup.run_id, ctx.connector.target.url, args.pingers, args.repeat
    );

    let monitor = Monitor::start(
        MonitorConfig {
            pingers: args.pingers,
            ping_interval: Duration::from_millis(args.ping_interval_ms.max(1)),
            server_pid: pid,
            user_prefix: common.user_prefix.clone(),
            run_id: setup.run_id.clone(),
            token: common.token.clone(),
            subprotocol: common.subprotocol,
            answer_timeout: ctx.answer_timeout,
        },
        ctx.connector.clone(),
    )
    .map_err(|e| format!("cannot start the monitor thread: {e}"))?;
    let mut timed_out = false;
    if !monitor.wait_ready(deadline).await {
        timed_out = true;
        eprintln!("ferry-bench storm: the pingers could not all connect before the timeout");
    } else if args.pingers > 0 {
        common::sleep_bounded(
            Instant::now() + Duration::from_millis(args.baseline_ms),
            deadline,
        )
        .await;
    }
    let rss_before = pid.and_then(sys::rss_bytes);

    let mut clients: Vec<StormClient> = (0..n)
        .map(|i| {
            let room = format!("{}-{}", setup.run_id, i % rooms);
            StormClient {
                index: i,
                node_id: format!("{}{i}:{}:t1", common.user_prefix, setup.run_id),
                channel_json: proto::json_str(&format!("{}{room}", common.channel_prefix)),
                room_json: proto::json_str(&room),
                shared: shared.clone(),
                ids: IdGen::default(),
                own_added: 0,
                last_received: 0,
                since: None,
                acts: Vec::with_capacity(k + 2),
                base_time: 0,
                server_node: String::new(),
                send_actions: false,
                send_subscribe: false,
                current_sub: None,
                unsynced_syncs: 0,
                round_first: 0,
                first_attempt: None,
                synchronized_at: None,
                actions_done_at: None,
                attempts: 0,
                gave_up: false,
            }
        })
        .collect();

    let mut rounds = Vec::new();
    let mut all_client_us: Vec<u64> = Vec::new();
    let mut not_synchronized = 0usize;
    let mut total_ms_max = 0.0f64;
    for round in 0..args.repeat {
        if timed_out {
            break;
        }
        shared.finished.store(0, Ordering::Relaxed);
        shared.synchronized.store(0, Ordering::Relaxed);
        monitor.set_phase(monitor::phase::storm(round));
        monitor.take_window_peak();
        let cpu_storm_start = pid.and_then(sys::pids_cpu);
        let attempts_before = ctx.connect_attempts.load(Ordering::Relaxed);
        let round_start = Instant::now();
        let now_ms = wall_ms();
        for c in &mut clients {
            c.begin_round(round, now_ms);
        }
        let (stop_tx, stop) = Stop::new();
        let mut handles = Vec::with_capacity(n);
        for mut c in clients.drain(..) {
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
                    "[storm round {}] {:.1}s open {} synchronized {}/{} connect attempts {} deliveries {} errors {}",
                    round + 1,
                    round_start.elapsed().as_secs_f64(),
                    ctx.open_sessions.load(Ordering::Relaxed),
                    shared.synchronized.load(Ordering::Relaxed),
                    shared.clients,
                    ctx.connect_attempts.load(Ordering::Relaxed) - attempts_before,
                    shared.deliveries.load(Ordering::Relaxed),
                    ctx.errors.total()
                )
            })
        };
        while shared.finished.load(Ordering::Acquire) < n {
            tokio::select! {
                _ = shared.round_done.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    timed_out = true;
                    break;
                }
            }
        }
        let storm_elapsed = round_start.elapsed();
        let storm_rss_peak = monitor.take_window_peak();
        let cpu_disconnect_start = pid.and_then(sys::pids_cpu);
        let synchronized = shared.synchronized.load(Ordering::Relaxed);
        eprintln!(
            "[storm round {}] {} in {:.3}s: {synchronized}/{n} synchronized; mass disconnect",
            round + 1,
            if timed_out { "TIMED OUT" } else { "done" },
            storm_elapsed.as_secs_f64()
        );

        // The mass disconnect: every client closes at once.
        monitor.set_phase(monitor::phase::disconnect(round));
        let disconnect_start = Instant::now();
        let _ = stop_tx.send(true);
        for handle in handles {
            match handle.await {
                Ok(c) => clients.push(c),
                Err(_) => ctx.errors.add("internal:client_task_failed"),
            }
        }
        let disconnect_elapsed = disconnect_start.elapsed();
        if let Some(p) = progress {
            p.abort();
        }
        // The watch is cut short by the scenario's hard deadline (and skipped after a timeout).
        let watch_complete = !timed_out
            && common::sleep_bounded(
                disconnect_start + Duration::from_millis(args.disconnect_watch_ms),
                deadline,
            )
            .await;
        let disconnect_rss_peak = monitor.take_window_peak();
        let cpu_end = pid.and_then(sys::pids_cpu);
        let cpu_seconds = |a: &Option<sys::CpuSnapshot>, b: &Option<sys::CpuSnapshot>| match (a, b)
        {
            (Some(a), Some(b)) => Some(b.since(a).total_s()),
            _ => None,
        };
        let cpu_delta =
            |a: &Option<sys::CpuSnapshot>, b: &Option<sys::CpuSnapshot>| match cpu_seconds(a, b) {
                Some(seconds) => json!(sys::round3(seconds)),
                None => Value::Null,
            };
        // The storm's server CPU per unit of work, so runs of different sizes compare and the
        // server's share stands next to the generator's.
        let storm_cpu = cpu_seconds(&cpu_storm_start, &cpu_disconnect_start);
        let per = |units: f64| match storm_cpu {
            Some(seconds) if units > 0.0 => json!(sys::round3(seconds / units)),
            _ => Value::Null,
        };
        let storm_cpu_per = json!({
            "1000_clients": per(n as f64 / 1_000.0),
            "10000_actions": per((n * k) as f64 / 10_000.0),
        });

        let mut actions_us: Vec<u64> = clients
            .iter()
            .filter_map(|c| {
                Some(
                    c.actions_done_at?
                        .duration_since(c.first_attempt?)
                        .as_micros() as u64,
                )
            })
            .collect();
        let mut client_us: Vec<u64> = clients
            .iter()
            .filter_map(|c| {
                Some(
                    c.synchronized_at?
                        .duration_since(c.first_attempt?)
                        .as_micros() as u64,
                )
            })
            .collect();
        all_client_us.extend_from_slice(&client_us);
        not_synchronized += clients
            .iter()
            .filter(|c| c.synchronized_at.is_none())
            .count();
        let attempts: u64 = clients.iter().map(|c| u64::from(c.attempts)).sum();
        let reconnects: u64 = clients
            .iter()
            .map(|c| u64::from(c.attempts.saturating_sub(1)))
            .sum();
        let total_ms = if timed_out {
            Value::Null
        } else {
            let ms = sys::round3(storm_elapsed.as_secs_f64() * 1000.0);
            total_ms_max = total_ms_max.max(ms);
            json!(ms)
        };
        rounds.push(json!({
            "round": round + 1,
            "total_ms": total_ms,
            "synchronized": synchronized,
            "gave_up": clients.iter().filter(|c| c.gave_up).count(),
            "client_ms": stats::summary_ms(&mut client_us, stats::P50_P90_P99),
            "client_actions_ms": stats::summary_ms(&mut actions_us, stats::P50_P90_P99),
            "connect_attempts": attempts,
            "reconnects": reconnects,
            "disconnect_ms": sys::round3(disconnect_elapsed.as_secs_f64() * 1000.0),
            "disconnect_watch_complete": watch_complete,
            "server_peak_rss_bytes": {"storm": storm_rss_peak, "disconnect": disconnect_rss_peak},
            "server_cpu_s": {
                "storm": cpu_delta(&cpu_storm_start, &cpu_disconnect_start),
                "disconnect": cpu_delta(&cpu_disconnect_start, &cpu_end),
                "storm_per": storm_cpu_per,
            },
        }));
    }

    let verify = if args.verify && !timed_out {
        monitor.set_phase(monitor::phase::OTHER);
        Some(verify_rooms(&setup, common, &clients, rooms, args.repeat, k).await)
    } else {
        None
    };
    if args.verify && verify.is_none() {
        eprintln!("ferry-bench storm: --verify skipped because the storm timed out");
    }
    let verify_timed_out = verify.as_ref().is_some_and(|v| v.timed_out);
    timed_out |= verify_timed_out;

    monitor.set_phase(monitor::phase::OTHER);
    let server_peak = monitor.peak_rss();
    let (pings, pinger_errors) = monitor.finish().await;
    for (round, r) in rounds.iter_mut().enumerate() {
        if let Value::Object(map) = r {
            map.insert("pinger_rtt_ms".into(), round_pings(&pings, round as u32));
        }
    }
    let rss_after = pid.and_then(sys::rss_bytes);

    // Action accounting over every round.
    let (mut synced, mut processed, mut undone, mut lost, mut unsynced) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut resent = 0u64;
    for c in &clients {
        for a in c.acts.iter().filter(|a| a.n.is_some()) {
            if a.sends > 1 {
                resent += 1;
            }
            match a.state {
                State::Processed => processed += 1,
                State::Undone => undone += 1,
                State::Pending | State::Superseded if a.synced => lost += 1,
                State::Pending | State::Superseded => unsynced += 1,
            }
            if a.synced {
                synced += 1;
            }
        }
    }
    let dup_processed = shared.duplicated_processed.load(Ordering::Relaxed);
    let dup_subscribe = shared.duplicated_subscribe.load(Ordering::Relaxed);
    let dup_checker = verify.as_ref().map_or(0, |v| v.duplicated);
    let duplicated = dup_processed + dup_subscribe + dup_checker;
    let verify_missing = verify.as_ref().map_or(0, |v| v.missing);
    let total_attempts: u64 = rounds
        .iter()
        .filter_map(|r| r["connect_attempts"].as_u64())
        .sum();
    let total_reconnects: u64 = rounds.iter().filter_map(|r| r["reconnects"].as_u64()).sum();
    let ok =
        !timed_out && lost == 0 && duplicated == 0 && verify_missing == 0 && not_synchronized == 0;
    let summary = json!({
        "scenario": "storm",
        "ok": ok,
        "timed_out": timed_out,
        "run_id": setup.run_id,
        "url": ctx.connector.target.url,
        "params": {
            "clients": n,
            "actions": k,
            "rooms": rooms,
            "pingers": args.pingers,
            "ping_interval_ms": args.ping_interval_ms,
            "repeat": args.repeat,
            "connect_concurrency": common.connect_concurrency,
            "disconnect_watch_ms": args.disconnect_watch_ms,
            "verify": args.verify,
            "timeout_s": common.timeout_s,
        },
        "total_ms": if rounds.is_empty() || rounds.iter().any(|r| r["total_ms"].is_null()) { Value::Null } else { json!(total_ms_max) },
        "client_ms": stats::summary_ms(&mut all_client_us, stats::P50_P90_P99),
        "not_synchronized": not_synchronized,
        "actions": {
            "created": total_actions,
            "synced": synced,
            "processed": processed,
            "undone": undone,
            "lost": lost,
            "unsynced": unsynced,
            "resent": resent,
        },
        "lost": lost,
        "duplicated": {
            "total": duplicated,
            "processed": dup_processed,
            "subscribe_processed": dup_subscribe,
            "checker": dup_checker,
            "of_resent_actions": shared.duplicated_after_resend.load(Ordering::Relaxed),
        },
        "unknown_processed": shared.unknown_processed.load(Ordering::Relaxed),
        "deliveries_received": shared.deliveries.load(Ordering::Relaxed),
        "connect_attempts": total_attempts,
        "reconnects": total_reconnects,
        "errors": ctx.errors.to_json(),
        "pinger_rtt_ms": {
            "baseline": pings.summary(|p| p == monitor::phase::BASELINE),
            "storm": pings.summary(monitor::phase::is_storm),
            "disconnect": pings.summary(monitor::phase::is_disconnect),
        },
        "pinger_errors": pinger_errors,
        "rounds": rounds,
        "verify": verify.as_ref().map(|v| v.json.clone()),
        "server": pid.map(|pid| json!({
            "pid": pid.first(),
            "pids": pid.list(),
            "peak_rss_bytes": server_peak,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": rss_after,
            "cpu_s": setup.server_cpu_s(common),
        })),
        "generator": setup.generator_json(common),
    });
    Ok(Outcome { summary, ok })
}

/// Per-round ping stats, so a round's storm and disconnect can be told apart.
fn round_pings(pings: &PingResults, round: u32) -> Value {
    json!({
        "storm": pings.summary(|p| p == monitor::phase::storm(round)),
        "disconnect": pings.summary(|p| p == monitor::phase::disconnect(round)),
    })
}

/// The checker's verdict.
#[derive(Debug)]
struct Verdict {
    /// The `verify` section.
    json: Value,
    /// Processed actions that no room replayed.
    missing: u64,
    /// Actions replayed more than once.
    duplicated: u64,
    /// The checker did not finish before the deadline.
    timed_out: bool,
}

/// Subscribes one checker client to every room (no `since`) and counts what comes back.
async fn verify_rooms(
    setup: &Setup,
    common: &Common,
    clients: &[StormClient],
    rooms: usize,
    repeat: u32,
    k: usize,
) -> Verdict {
    let n = clients.len();
    let total = n * k * repeat as usize;
    // 1 = processed, 2 = created but not processed.
    let mut expected = vec![0u8; total];
    for c in clients {
        for a in &c.acts {
            if let Some(idx) = a.n.map(|n| n as usize).filter(|i| *i < total) {
                expected[idx] = if a.state == State::Processed { 1 } else { 2 };
            }
        }
    }
    let started = Instant::now();
    let done = Arc::new(Notify::new());
    let mut checker = Checker {
        node_id: format!("{}checker:{}:t1", common.user_prefix, setup.run_id),
        channels: (0..rooms)
            .map(|r| proto::json_str(&format!("{}{}-{r}", common.channel_prefix, setup.run_id)))
            .collect(),
        action_type: common.action_type.clone(),
        errors: setup.ctx.errors.clone(),
        ids: IdGen::default(),
        own_added: 0,
        last_received: 0,
        base_time: 0,
        send: false,
        subs: Vec::new(),
        answered: 0,
        seen: vec![0u8; total],
        out_of_range: 0,
        misrouted: 0,
        clients: n,
        actions: k,
        rooms,
        done: done.clone(),
        finished: false,
    };
    eprintln!("[verify] subscribing to {rooms} rooms");
    let (stop_tx, mut stop) = Stop::new();
    let ctx = setup.ctx.clone();
    let deadline = setup.deadline;
    let task = tokio::spawn(async move {
        client::run(&ctx, &mut checker, &mut stop).await;
        checker
    });
    let timed_out = tokio::select! {
        _ = done.notified() => false,
        _ = tokio::time::sleep_until(deadline) => true,
    };
    let _ = stop_tx.send(true);
    let Ok(checker) = task.await else {
        return Verdict {
            json: json!({"error": "checker task failed"}),
            missing: 0,
            duplicated: 0,
            timed_out: true,
        };
    };
    let (mut missing, mut duplicated, mut seen_unprocessed, mut seen) = (0u64, 0u64, 0u64, 0u64);
    for (count, want) in checker.seen.iter().zip(&expected) {
        if *count > 0 {
            seen += 1;
        }
        if *count > 1 {
            duplicated += u64::from(*count - 1);
        }
        match (want, count) {
            (1, 0) => missing += 1,
            (2, c) if *c > 0 => seen_unprocessed += 1,
            _ => {}
        }
    }
    let expected_count = expected.iter().filter(|e| **e == 1).count();
    let json = json!({
        "rooms": rooms,
        "expected": expected_count,
        "seen": seen,
        "missing": missing,
        "duplicated": duplicated,
        "seen_unprocessed": seen_unprocessed,
        "misrouted": checker.misrouted,
        "out_of_range": checker.out_of_range,
        "timed_out": timed_out,
        "ms": sys::round3(started.elapsed().as_secs_f64() * 1000.0),
    });
    Verdict {
        json,
        missing: missing + checker.misrouted,
        duplicated,
        timed_out,
    }
}

/// The `--verify` client: one connection subscribed to every room.
#[derive(Debug)]
struct Checker {
    /// Node id.
    node_id: String,
    /// JSON literals of the rooms' channels.
    channels: Vec<String>,
    /// The storm action type.
    action_type: String,
    /// Error counts.
    errors: Arc<stats::ErrorCounts>,
    /// Id generator.
    ids: IdGen,
    /// Our log position.
    own_added: u64,
    /// Highest server `added` seen.
    last_received: u64,
    /// This connection's `baseTime`.
    base_time: i64,
    /// The subscribes still have to go out on this connection.
    send: bool,
    /// This connection's subscribe ids.
    subs: Vec<(u64, u32)>,
    /// Subscribes answered (processed or undone) on this connection.
    answered: usize,
    /// Times each action number was received.
    seen: Vec<u8>,
    /// Actions with a number outside this run.
    out_of_range: u64,
    /// Actions received on the wrong room.
    misrouted: u64,
    /// N.
    clients: usize,
    /// K.
    actions: usize,
    /// Rooms.
    rooms: usize,
    /// Woken when every subscribe is answered.
    done: Arc<Notify>,
    /// `done` was notified.
    finished: bool,
}

impl Workload for Checker {
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
    fn on_attempt(&mut self, _now: Instant) {}
    fn on_connected(&mut self, base_time: i64, _server_node: &str, _now: Instant) {
        self.base_time = base_time;
        self.send = true;
        // A new connection replays every room again: count from scratch.
        self.seen.iter_mut().for_each(|c| *c = 0);
        self.subs.clear();
        self.answered = 0;
        self.misrouted = 0;
        self.out_of_range = 0;
    }
    fn next_frame(&mut self, _now: Instant) -> Option<Outgoing> {
        if !self.send {
            return None;
        }
        self.send = false;
        self.own_added += self.channels.len() as u64;
        let mut frame = SyncFrame::new(self.own_added);
        for channel in &self.channels {
            let (ms, seq) = self.ids.next(wall_ms());
            frame.push(
                &proto::subscribe_action(channel, None),
                &proto::own_meta(ms, seq, self.base_time),
            );
            self.subs.push((ms, seq));
        }
        Some(Outgoing {
            text: frame.finish(),
            expects_answer: true,
        })
    }
    fn on_sync(&mut self, pairs: &[proto::Pair], _now: Instant) {
        for pair in pairs {
            let action = &pair.action;
            match action.kind() {
                "logux/processed" | "logux/undo" => {
                    if let Some(p) = proto::parse_action_id(action.id().unwrap_or("")) {
                        if p.node == self.node_id && self.subs.contains(&(p.ms, p.seq)) {
                            self.answered += 1;
                        }
                    }
                    if action.kind() == "logux/undo" {
                        self.errors.add("verify:subscribe_undone");
                    }
                }
                t if t == self.action_type => {
                    let Some(n) = action.n() else {
                        self.out_of_range += 1;
                        continue;
                    };
                    let Some(count) = self.seen.get_mut(n as usize) else {
                        self.out_of_range += 1;
                        continue;
                    };
                    *count = count.saturating_add(1);
                    // The author is (n / K) % N; its room is author % rooms.
                    let author = (n as usize / self.actions.max(1)) % self.clients.max(1);
                    let want_room = author % self.rooms;
                    let room_ok = action
                        .room()
                        .and_then(|room| room.rsplit('-').next())
                        .and_then(|r| r.parse::<usize>().ok())
                        == Some(want_room);
                    if !room_ok {
                        self.misrouted += 1;
                    }
                }
                _ => {}
            }
        }
        if !self.finished && self.answered >= self.channels.len() {
            self.finished = true;
            self.done.notify_one();
        }
    }
    fn on_synced(&mut self, _added: u64, _now: Instant) {}
}
