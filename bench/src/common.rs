//! Flags shared by every scenario and what is built from them.

use crate::client::ClientCtx;
use crate::net::{self, Connector, SourcePool};
use crate::proto;
use crate::stats::ErrorCounts;
use crate::sys::{self, CpuMeter, FdLimits};
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// How often a client that is ready checks whether the sending phase started.
pub const START_POLL_MS: u64 = 5;

/// Flags every scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Server WebSocket URL; loopback IPv4 only (ws://127.0.0.1:31337/). `fanout` takes
    /// several (repeat the flag, or separate with commas; `--urls` is the same flag): client
    /// i uses URL i % n.
    #[arg(long, alias = "urls", value_delimiter = ',', required = true)]
    pub url: Vec<String>,
    /// Server process id: its RSS (VmRSS) is sampled every 100 ms and its CPU time read.
    /// Repeat the flag (or separate with commas) for several processes: RSS and CPU are
    /// summed, and `fanout` also reports each one's CPU.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Other processes whose CPU time is reported on its own, next to the server's (the
    /// nats-servers of a Ferry cluster). Repeat or separate with commas. `fanout` only.
    #[arg(long, value_delimiter = ',')]
    pub nats_pid: Vec<u32>,
    /// Token sent in `connect`.
    #[arg(long, default_value = "secret")]
    pub token: String,
    /// User id prefix: client i is user `<prefix><i>`, node `<prefix><i>:<run-id>:t1`.
    #[arg(long, default_value = "bench")]
    pub user_prefix: String,
    /// Subprotocol sent in `connect`.
    #[arg(long, default_value_t = 1)]
    pub subprotocol: u32,
    /// Channel of a room: `<prefix><room id>`; must match the server's resend rule.
    #[arg(long, default_value = "room/")]
    pub channel_prefix: String,
    /// Type of the actions sent: `{type, room, n, sent_at_ms}`.
    #[arg(long, default_value = "room/message")]
    pub action_type: String,
    /// Hard limit on the whole scenario, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// TCP connects + upgrades in flight at once.
    #[arg(long, default_value_t = 2000)]
    pub connect_concurrency: usize,
    /// Deadline of one TCP connect + upgrade, in ms.
    #[arg(long, default_value_t = 30_000)]
    pub connect_timeout_ms: u64,
    /// Wait for `connected`/`synced`/`pong` before reconnecting (Logux `timeout`), in ms.
    #[arg(long, default_value_t = 70_000)]
    pub answer_timeout_ms: u64,
    /// Loopback source addresses to use: 127.0.0.1 .. 127.0.0.N.
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u8,
    /// Connections from one source address before moving to the next.
    #[arg(long, default_value_t = 20_000)]
    pub rotate_every: u64,
    /// Worker threads of the clients' runtime (1 = a current-thread runtime). The pingers
    /// and the RSS sampler always have a thread of their own.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Run id in node ids and room names (default: random). Keeps runs against the same
    /// data directory apart.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Progress line on stderr every this many ms (0 = none).
    #[arg(long, default_value_t = 1000)]
    pub progress_ms: u64,
}

/// What a scenario starts with.
#[derive(Debug)]
pub struct Setup {
    /// The run id.
    pub run_id: String,
    /// Shared client settings and counters.
    pub ctx: Arc<ClientCtx>,
    /// The scenario's hard deadline.
    pub deadline: Instant,
    /// Generator CPU since the start.
    pub cpu: CpuMeter,
    /// Open-file limits.
    pub fd: FdLimits,
    /// The measured server processes (`--server-pid`).
    pub server_pids: Option<sys::Pids>,
    /// The processes reported apart (`--nats-pid`).
    pub nats_pids: Option<sys::Pids>,
    /// Server CPU at the start.
    pub server_cpu_start: Option<sys::CpuSnapshot>,
    /// `--nats-pid` CPU at the start.
    pub nats_cpu_start: Option<sys::CpuSnapshot>,
    /// JSON string literal of the action type.
    pub type_json: String,
}

fn check_id_part(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() && what == "--run-id" {
        return Err(format!("{what} must not be empty"));
    }
    if value.contains([':', ' ']) {
        return Err(format!(
            "{what} {value:?} must not contain ':' or spaces (it is part of a Logux node id)"
        ));
    }
    Ok(())
}

impl Setup {
    /// Checks the flags and builds the connector and client context (one `--url` only).
    pub fn new(common: &Common) -> Result<Setup, String> {
        if common.url.len() > 1 {
            return Err(
                "several --url: only fanout spreads its clients over several servers".into(),
            );
        }
        if !common.nats_pid.is_empty() {
            return Err("--nats-pid: only fanout reports it".into());
        }
        Setup::new_multi(common)
    }

    /// Like [`Setup::new`], with one connector per `--url` (`ctx.connectors`).
    pub fn new_multi(common: &Common) -> Result<Setup, String> {
        let targets = common
            .url
            .iter()
            .map(|url| net::parse_url(url))
            .collect::<Result<Vec<_>, String>>()?;
        if targets.is_empty() {
            return Err("--url: name at least one server".into());
        }
        check_id_part("--user-prefix", &common.user_prefix)?;
        let run_id = match &common.run_id {
            Some(id) => id.clone(),
            None => {
                let mut rng = rand::thread_rng();
                (0..6)
                    .map(|_| {
                        let c = rng.gen_range(0..36u8);
                        (if c < 10 { b'0' + c } else { b'a' + c - 10 }) as char
                    })
                    .collect()
            }
        };
        check_id_part("--run-id", &run_id)?;
        if common.timeout_s == 0 {
            return Err("--timeout-s must be at least 1".into());
        }
        if common.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        if common.source_addrs == 0 || common.source_addrs > 254 {
            return Err("--source-addrs must be 1..254".into());
        }
        if common.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        for (flag, pid) in common
            .server_pid
            .iter()
            .map(|p| ("--server-pid", p))
            .chain(common.nats_pid.iter().map(|p| ("--nats-pid", p)))
        {
            if sys::rss_bytes_of(*pid).is_none() {
                return Err(format!(
                    "{flag} {pid}: cannot read /proc/{pid}/status (no such process?)"
                ));
            }
        }
        // One source pool for every connector: ephemeral ports are per source address,
        // whatever the destination.
        let sources = Arc::new(SourcePool::new(common.source_addrs, common.rotate_every));
        let connectors: Vec<Arc<Connector>> = targets
            .into_iter()
            .map(|target| {
                Arc::new(Connector {
                    target,
                    sources: sources.clone(),
                    connect_timeout: Duration::from_millis(common.connect_timeout_ms),
                })
            })
            .collect();
        let server_pids = sys::Pids::new(&common.server_pid);
        let nats_pids = sys::Pids::new(&common.nats_pid);
        let ctx = Arc::new(ClientCtx {
            connector: connectors[0].clone(),
            connectors,
            connect_slots: Arc::new(Semaphore::new(common.connect_concurrency)),
            errors: Arc::new(ErrorCounts::default()),
            token: common.token.clone(),
            subprotocol: common.subprotocol,
            answer_timeout: Duration::from_millis(common.answer_timeout_ms),
            idle_ping: Duration::from_secs(10),
            open_sessions: AtomicI64::new(0),
            connect_attempts: AtomicU64::new(0),
        });
        Ok(Setup {
            run_id,
            ctx,
            deadline: Instant::now() + Duration::from_secs(common.timeout_s),
            cpu: CpuMeter::start(),
            fd: sys::fd_limits(),
            server_pids,
            nats_pids,
            server_cpu_start: server_pids.and_then(sys::pids_cpu),
            nats_cpu_start: nats_pids.and_then(sys::pids_cpu),
            type_json: proto::json_str(&common.action_type),
        })
    }

    /// Fails clearly when `needed` sockets (plus the generator's own margin) exceed the
    /// open-file limit. The soft limit cannot be raised without libc's `setrlimit`.
    pub fn check_fds(&self, needed: u64, what: &str) -> Result<(), String> {
        let Some(soft) = self.fd.soft else {
            return Ok(());
        };
        let total = needed + sys::FD_MARGIN;
        if total > soft {
            return Err(format!(
                "{what} needs {needed} sockets + {} for the generator = {total} file descriptors, \
                 but this process may open only {soft} (`ulimit -n`; hard limit {}). \
                 Use fewer clients or raise the limit before starting (`ulimit -n <hard>`).",
                sys::FD_MARGIN,
                self.fd
                    .hard
                    .map_or_else(|| "unlimited".to_owned(), |h| h.to_string())
            ));
        }
        Ok(())
    }

    /// How many more sockets fit under the soft limit.
    pub fn fd_room(&self) -> Option<u64> {
        self.fd.soft.map(|soft| soft.saturating_sub(sys::FD_MARGIN))
    }

    /// The `generator` section of a summary.
    pub fn generator_json(&self, common: &Common) -> Value {
        let mut out = self.cpu.report();
        if let Value::Object(map) = &mut out {
            map.insert("threads".into(), json!(common.threads));
            map.insert("fd_limit_soft".into(), json!(self.fd.soft));
            map.insert("fd_limit_hard".into(), json!(self.fd.hard));
            map.insert("source_addrs".into(), json!(common.source_addrs));
            map.insert(
                "source_addr_exhaustions".into(),
                json!(self.ctx.connector.sources.exhaustions()),
            );
        }
        out
    }

    /// [`Setup::generator_json`] plus the generator's CPU in the scenario's measured phase
    /// (`phase_cpu_s`, and as a percentage of that phase's wall time).
    pub fn generator_json_phase(&self, common: &Common, cpu_s: f64, wall: Duration) -> Value {
        let mut out = self.generator_json(common);
        if let Value::Object(map) = &mut out {
            let wall_s = wall.as_secs_f64();
            map.insert("phase_cpu_s".into(), json!(sys::round3(cpu_s)));
            map.insert(
                "phase_cpu_pct_of_wall".into(),
                json!(if wall_s > 0.0 {
                    sys::round3(100.0 * cpu_s / wall_s)
                } else {
                    0.0
                }),
            );
        }
        out
    }

    /// Server CPU seconds since the start.
    pub fn server_cpu_s(&self, _common: &Common) -> Option<f64> {
        let start = self.server_cpu_start.as_ref()?;
        let now = sys::pids_cpu(self.server_pids?)?;
        Some(sys::round3(now.since(start).total_s()))
    }

    /// `--nats-pid` CPU seconds since the start.
    pub fn nats_cpu_s(&self) -> Option<f64> {
        let start = self.nats_cpu_start.as_ref()?;
        let now = sys::pids_cpu(self.nats_pids?)?;
        Some(sys::round3(now.since(start).total_s()))
    }
}

/// Prints a progress line on stderr every `every_ms` until the returned handle is aborted.
pub fn progress(
    every_ms: u64,
    line: impl Fn() -> String + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if every_ms == 0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(every_ms));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("{}", line());
        }
    }))
}

/// Sleeps until `until` or the deadline, whichever is first. False when the deadline cut it.
pub async fn sleep_bounded(until: Instant, deadline: Instant) -> bool {
    tokio::time::sleep_until(until.min(deadline)).await;
    until <= deadline
}
