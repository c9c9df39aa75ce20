//! `backlog`: one client that was offline for weeks comes back with N unsent actions and
//! sends them all in ONE `sync` frame, as `@logux/client` does after reconnecting, while P
//! pingers that were connected before (on the monitor's own thread, as in `storm`) ping
//! every `--ping-interval-ms`. The backlog's actions name room `<run>-backlog`, whose channel
//! nobody is subscribed to, so the server's work is the frame, judging, storing and
//! answering, with no fan-out. Measures the time from the send to `synced` and to every
//! `logux/processed`, processed actions/s, and the bystanders' ping round trips during the
//! backlog; checks that every action is acknowledged and processed once.

use crate::client::{self, wall_ms, wall_us, ClientCtx, Outgoing, Stop, Workload};
use crate::common::{self, Common, Setup};
use crate::monitor::{self, Monitor, MonitorConfig};
use crate::net;
use crate::proto;
use crate::sending::{self, Answer, Pace, Sending};
use crate::stats;
use crate::sys;
use crate::Outcome;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// `backlog` flags.
#[derive(clap::Args, Debug)]
pub struct BacklogArgs {
    #[command(flatten)]
    pub common: Common,
    /// Actions in the backlog (N), all sent in one `sync` frame.
    #[arg(long, default_value_t = 200_000)]
    pub actions: usize,
    /// Bystanders connected before the backlog that ping every --ping-interval-ms.
    #[arg(long, default_value_t = 20)]
    pub pingers: usize,
    /// Time between two pings of a pinger.
    #[arg(long, default_value_t = 100)]
    pub ping_interval_ms: u64,
    /// Pinger-only measurement before the backlog, in ms.
    #[arg(long, default_value_t = 1000)]
    pub baseline_ms: u64,
    /// How long the pingers keep measuring after the last `logux/processed`, in ms.
    #[arg(long, default_value_t = 1000)]
    pub after_ms: u64,
}

/// What the main task watches.
#[derive(Debug)]
struct Shared {
    /// Protocol settings and counters.
    ctx: Arc<ClientCtx>,
    /// Actions processed so far (progress).
    processed: AtomicU64,
    /// Actions acknowledged so far (progress).
    synced: AtomicU64,
    /// Woken when every action is acknowledged and answered.
    done: Notify,
}

/// The offline client.
#[derive(Debug)]
struct BacklogClient {
    /// Node id.
    node_id: String,
    /// JSON literal of the action type.
    type_json: String,
    /// JSON literal of the room id.
    room_json: String,
    /// Shared state.
    shared: Arc<Shared>,
    /// The backlog.
    sending: Sending,
    /// Highest server `added` seen.
    last_received: u64,
    /// This connection's `baseTime`.
    base_time: i64,
    /// Connected now.
    connected: bool,
    /// The first backlog frame was built and handed to the socket.
    sent_at: Option<Instant>,
    /// The same, wall µs.
    sent_wall_us: u64,
    /// Time to build that frame.
    build: Duration,
    /// Its size.
    frame_bytes: usize,
    /// Backlog frames sent (more than one after a dropped connection).
    frames: u32,
    /// Every action got `synced`.
    synced_at: Option<Instant>,
    /// The first answer arrived.
    first_answer_at: Option<Instant>,
    /// Every action was answered.
    answered_at: Option<Instant>,
    /// `synced` for no frame of ours waiting for one.
    unexpected_synced: u64,
    /// Connect attempts.
    attempts: u32,
}

impl Workload for BacklogClient {
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
    }
    fn next_frame(&mut self, now: Instant) -> Option<Outgoing> {
        if !self.connected {
            return None;
        }
        let (type_json, room_json) = (&self.type_json, &self.room_json);
        let out = self
            .sending
            .next_frame(now, self.base_time, false, |i, sent_us| {
                proto::bench_action(type_json, room_json, i as u64, sent_us as f64 / 1000.0)
            })?;
        self.frames += 1;
        if self.sent_at.is_none() {
            let built = Instant::now();
            self.sent_at = Some(built);
            self.sent_wall_us = wall_us();
            self.build = built.duration_since(now);
            self.frame_bytes = out.text.len();
            eprintln!(
                "[backlog] sending {} actions in one sync frame of {:.1} MB (built in {:.1} ms)",
                self.sending.acts.len(),
                out.text.len() as f64 / 1e6,
                self.build.as_secs_f64() * 1000.0
            );
        }
        Some(out)
    }
    fn on_sync(&mut self, pairs: &[proto::Pair], now: Instant) {
        let now_us = wall_us();
        let errors = &self.shared.ctx.errors;
        for action in pairs.iter().map(|pair| &pair.action) {
            let undo = match action.kind() {
                "logux/processed" => false,
                "logux/undo" => true,
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
            self.first_answer_at.get_or_insert(now);
        }
        self.check_done(now);
    }
    fn on_synced(&mut self, added: u64, now: Instant) {
        let before = self.sending.synced;
        if self.sending.on_synced(added, now, wall_us()) {
            let newly = (self.sending.synced - before) as u64;
            self.shared.synced.fetch_add(newly, Ordering::Relaxed);
            if self.sending.synced >= self.sending.acts.len() {
                self.synced_at.get_or_insert(now);
            }
        } else {
            self.unexpected_synced += 1;
        }
        self.check_done(now);
    }
    fn on_closed(&mut self, _now: Instant) {
        self.connected = false;
        self.sending.on_closed();
    }
}

impl BacklogClient {
    fn check_done(&mut self, now: Instant) {
        if self.answered_at.is_none() && self.sending.all_answered() {
            self.answered_at = Some(now);
            self.shared.done.notify_one();
        }
    }
}

/// An upper estimate of the backlog frame's size, to refuse one that cannot be sent.
fn frame_bytes_estimate(type_json: &str, room_json: &str, n: usize) -> usize {
    let action = proto::bench_action(type_json, room_json, n as u64, wall_ms() as f64);
    let meta = proto::own_meta(0, u32::try_from(n).unwrap_or(u32::MAX), -99_999_999);
    32 + n * (action.len() + meta.len() + 2)
}

/// Runs the scenario.
pub async fn run(args: BacklogArgs) -> Result<Outcome, String> {
    let common = &args.common;
    let setup = Setup::new(common)?;
    let n = args.actions;
    if n == 0 {
        return Err("--actions must be at least 1".into());
    }
    let room_json = proto::json_str(&format!("{}-backlog", setup.run_id));
    let estimate = frame_bytes_estimate(&setup.type_json, &room_json, n);
    if estimate > net::WS_WRITE_BACKLOG_BYTES_MAX {
        return Err(format!(
            "--actions {n}: the backlog frame would be about {estimate} bytes, over the {} bytes \
             ferry-bench can write in one frame (and Ferry's default [limits] frame_bytes_max, \
             64 MiB)",
            net::WS_WRITE_BACKLOG_BYTES_MAX
        ));
    }
    setup.check_fds(
        args.pingers as u64 + 1,
        &format!("backlog with {} pingers", args.pingers),
    )?;
    let ctx = setup.ctx.clone();
    let deadline = setup.deadline;
    let pid = setup.server_pids;
    eprintln!(
        "ferry-bench backlog: run {} against {}: {n} actions in one sync, {} pingers every {} ms",
        setup.run_id, ctx.connector.target.url, args.pingers, args.ping_interval_ms
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
    let mut timed_out = !monitor.wait_ready(deadline).await;
    if timed_out {
        eprintln!("ferry-bench backlog: the pingers could not all connect before the timeout");
    } else if args.pingers > 0 {
        common::sleep_bounded(
            Instant::now() + Duration::from_millis(args.baseline_ms),
            deadline,
        )
        .await;
    }

    let shared = Arc::new(Shared {
        ctx: ctx.clone(),
        processed: AtomicU64::new(0),
        synced: AtomicU64::new(0),
        done: Notify::new(),
    });
    let mut sending = Sending::new(Pace {
        total: n,
        window: 1,
        batch: n,
        interval: None,
    });
    // Created while offline: every id is older than the connection.
    sending.create_offline(wall_ms());
    let mut client = BacklogClient {
        node_id: format!("{}backlog:{}:t1", common.user_prefix, setup.run_id),
        type_json: setup.type_json.clone(),
        room_json,
        shared: shared.clone(),
        sending,
        last_received: 0,
        base_time: 0,
        connected: false,
        sent_at: None,
        sent_wall_us: 0,
        build: Duration::ZERO,
        frame_bytes: 0,
        frames: 0,
        synced_at: None,
        first_answer_at: None,
        answered_at: None,
        unexpected_synced: 0,
        attempts: 0,
    };
    // The backlog phase: from the client's connect until its last answer.
    monitor.set_phase(monitor::phase::LOAD);
    let cpu_start = pid.and_then(sys::pids_cpu);
    let threads = pid.map(sys::ThreadsMeter::start);
    let own_cpu_start = sys::own_cpu();
    let start = Instant::now();
    let (stop_tx, mut stop) = Stop::new();
    let task = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            client::run(&ctx, &mut client, &mut stop).await;
            client
        })
    };
    let progress = {
        let shared = shared.clone();
        common::progress(common.progress_ms, move || {
            format!(
                "[backlog] {:.1}s synced {}/{n} processed {}",
                start.elapsed().as_secs_f64(),
                shared.synced.load(Ordering::Relaxed),
                shared.processed.load(Ordering::Relaxed),
            )
        })
    };
    if !timed_out {
        timed_out = tokio::select! {
            _ = shared.done.notified() => false,
            _ = tokio::time::sleep_until(deadline) => true,
        };
    }
    let phase_elapsed = start.elapsed();
    monitor.set_phase(monitor::phase::AFTER_LOAD);
    let cpu_end = pid.and_then(sys::pids_cpu);
    let threads_cpu = threads.as_ref().map(sys::ThreadsMeter::json);
    let own_cpu_phase = sys::own_cpu().since(&own_cpu_start).total_s();
    if let Some(p) = progress {
        p.abort();
    }
    eprintln!(
        "[backlog] {} in {:.3}s; pingers keep measuring for {} ms",
        if timed_out { "TIMED OUT" } else { "done" },
        phase_elapsed.as_secs_f64(),
        args.after_ms
    );
    if !timed_out {
        common::sleep_bounded(
            Instant::now() + Duration::from_millis(args.after_ms),
            deadline,
        )
        .await;
    }
    let _ = stop_tx.send(true);
    let client = task
        .await
        .map_err(|_| "the backlog client's task failed".to_owned())?;
    monitor.set_phase(monitor::phase::OTHER);
    let server_peak = monitor.peak_rss();
    let (pings, pinger_errors) = monitor.finish().await;

    let s = &client.sending;
    let since_send = |t: Option<Instant>| match (client.sent_at, t) {
        (Some(sent), Some(t)) => json!(sys::round3(
            t.saturating_duration_since(sent).as_secs_f64() * 1000.0
        )),
        _ => Value::Null,
    };
    let per_s = |t: Option<Instant>| match (client.sent_at, t) {
        (Some(sent), Some(t)) if t > sent => {
            json!(sys::round3(n as f64 / t.duration_since(sent).as_secs_f64()))
        }
        _ => Value::Null,
    };
    let unanswered = s.acts.iter().filter(|a| a.synced && a.answers == 0).count();
    let duplicated = s.duplicated_answers + client.unexpected_synced;
    let ok = !timed_out
        && s.synced == n
        && s.processed == n
        && duplicated == 0
        && client.attempts == 1
        && client.frames == 1;
    let summary = json!({
        "scenario": "backlog",
        "ok": ok,
        "timed_out": timed_out,
        "run_id": setup.run_id,
        "url": ctx.connector.target.url,
        "params": {
            "actions": n,
            "pingers": args.pingers,
            "ping_interval_ms": args.ping_interval_ms,
            "baseline_ms": args.baseline_ms,
            "after_ms": args.after_ms,
            "timeout_s": common.timeout_s,
        },
        "frame_bytes": client.frame_bytes,
        "sent_wall_ms": stats::us_to_ms(client.sent_wall_us),
        "frame_build_ms": sys::round3(client.build.as_secs_f64() * 1000.0),
        "backlog_frames_sent": client.frames,
        "connect_attempts": client.attempts,
        "synced_ms": since_send(client.synced_at),
        "first_processed_ms": since_send(client.first_answer_at),
        "processed_ms": since_send(client.answered_at),
        "synced_actions_per_s": per_s(client.synced_at),
        "processed_actions_per_s": per_s(client.answered_at),
        "actions": {
            "created": n,
            "synced": s.synced,
            "processed": s.processed,
            "undone": s.undone,
            "synced_not_answered": unanswered,
        },
        "duplicated": {
            "total": duplicated,
            "synced": client.unexpected_synced,
            "processed": s.duplicated_answers,
        },
        "errors": ctx.errors.to_json(),
        "pinger_rtt_ms": {
            "baseline": pings.summary(|p| p == monitor::phase::BASELINE),
            "backlog": pings.summary(|p| p == monitor::phase::LOAD),
            "after": pings.summary(|p| p == monitor::phase::AFTER_LOAD),
        },
        "pinger_slowest_backlog": pings.slowest(|p| p == monitor::phase::LOAD, 10),
        "pinger_errors": pinger_errors,
        "server": pid.map(|pid| json!({
            "pid": pid.first(),
            "pids": pid.list(),
            "peak_rss_bytes": server_peak,
            "cpu_s_backlog": sys::cpu_s_between(&cpu_start, &cpu_end),
            "threads_cpu_s_backlog": threads_cpu,
            "cpu_s": setup.server_cpu_s(common),
        })),
        "generator": setup.generator_json_phase(common, own_cpu_phase, phase_elapsed),
    });
    Ok(Outcome { summary, ok })
}
