//! The server: shared state (rules, log, hub, clock) and the per-connection logic that joins
//! the protocol core to the log. Transports feed it frames; it knows nothing about sockets.

pub mod admission;
pub mod answer;
mod catchup;
pub mod connection;
pub mod events;
pub mod hub;
mod judge;
pub mod objects;
pub mod pipeline;
pub mod process;

use crate::action::Entry;
use crate::backend::Backend;
use crate::clock::Clock;
use crate::cluster::{Cluster, ClusterError, Kicks};
use crate::config::{Config, Env};
use crate::log::{CommitListener, Log, LogError, LogOptions};
use crate::metrics::Metrics;
use crate::protocol::SessionConfig;
use crate::rules::auth::{Authenticator, BruteForceGuard};
use crate::rules::Rules;
use hub::Hub;
use process::ProcessLoops;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};

/// Key of the persisted server node id in the log's settings.
const NODE_ID_SETTING: &str = "server_node_id";

/// How many of the newest log entries are read at start-up to find the server's last own
/// action id, so that ids created after a restart are new even if the clock went back.
const ID_SEED_SCAN_ENTRIES: u64 = 10_000;

/// How often retention runs when `retention_actions_max` is set.
pub const RETENTION_INTERVAL_MS: u64 = 60_000;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The log could not be opened.
    #[error("cannot open the log in {dir}: {source}")]
    Log {
        /// The data directory.
        dir: String,
        /// Why.
        source: LogError,
    },
    /// The back-end client could not be set up (`[backend] ca_file`).
    #[error("[backend]: {0}")]
    Backend(String),
    /// The event hooks cannot start (their saved cursor is unreadable).
    #[error(transparent)]
    Events(#[from] events::EventsError),
    /// The cluster mode cannot start (NATS, the stream, or a data directory of another
    /// stream).
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// The generator of the server's own action ids, shared by the server and its loops.
pub struct ActionIds {
    /// The server's node id, the middle part of every id.
    node_id: String,
    /// The time part.
    clock: Arc<dyn Clock>,
    /// Last ms and sequence handed out.
    state: Mutex<(i64, u64)>,
}

impl ActionIds {
    /// A generator for `node_id` whose ids come after `(ms, seq)` (the newest one on disk).
    pub fn new(node_id: String, clock: Arc<dyn Clock>, seed: (i64, u64)) -> ActionIds {
        ActionIds {
            node_id,
            clock,
            state: Mutex::new(seed),
        }
    }

    /// A new id, `"<ms> server:<id> <seq>"`, growing like Logux's `generateId`, and its time.
    pub fn next(&self) -> (String, i64) {
        let now = self.clock.now_ms();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now <= state.0 {
            state.1 += 1;
        } else {
            *state = (now, 0);
        }
        (format!("{} {} {}", state.0, self.node_id, state.1), now)
    }
}

/// The receiving end of the server's shutdown watch, for loops that get no `Server`.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Flips to `true` once when shutdown starts.
    receiver: watch::Receiver<bool>,
}

impl Shutdown {
    /// True once shutdown started, or once the server is gone.
    pub fn is_started(&self) -> bool {
        *self.receiver.borrow() || self.receiver.has_changed().is_err()
    }

    /// Resolves once shutdown started (at once if it already has, or if the server is gone).
    pub async fn started(&self) {
        let mut receiver = self.receiver.clone();
        // An error means the sender, and so the server, is gone: that is a shutdown too.
        let _ = receiver.wait_for(|started| *started).await;
    }

    /// Sleeps for `delay`; false when shutdown started first.
    pub async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => !self.is_started(),
            _ = self.started() => false,
        }
    }
}

/// Everything the connections share.
pub struct Server {
    /// The configuration the server runs with.
    pub config: Config,
    /// Compiled channel and type rules.
    pub rules: Rules,
    /// Credential checks.
    pub auth: Authenticator,
    /// Slows down addresses that fail authentication repeatedly.
    pub bruteforce: BruteForceGuard,
    /// The durable action log.
    pub log: Log,
    /// Connections and subscriptions.
    pub hub: Arc<Hub>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The waiting room for handshakes.
    pub admission: Arc<admission::Admission>,
    /// Bytes of `sync` frames that may still enter the action pipeline, all connections
    /// together (`limits.pipeline_backlog_bytes`); see `connection::Connection`.
    pub backlog: Arc<Semaphore>,
    /// The only source of wall time.
    pub clock: Arc<dyn Clock>,
    /// Settings for every protocol session.
    pub session_config: Arc<SessionConfig>,
    /// The back-end hook client, when `[backend]` is configured.
    pub backend: Option<Arc<Backend>>,
    /// The `process` loops (one per client with tasks), when `[backend]` is configured.
    pub process: Option<Arc<ProcessLoops>>,
    /// Woken after every group commit (the events dispatcher waits on it).
    pub events_wake: Arc<Notify>,
    /// The runtime of the pipeline workers and the log writer, when it is separate from the
    /// connections' (`limits.pipeline_threads`).
    pub pipeline: Option<tokio::runtime::Handle>,
    /// Cluster mode: the shared stream this node is a view of.
    pub cluster: Option<Arc<Cluster>>,
    /// Cluster mode: announces this node's connections to the other nodes (zombie rule).
    pub kicks: Option<Kicks>,
    /// The server's own action id generator.
    ids: Arc<ActionIds>,
    /// Set when shutdown starts.
    shutting_down: AtomicBool,
    /// Set to true when shutdown starts; connections and loops watch it.
    shutdown: watch::Sender<bool>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("node_id", &self.session_config.server_node_id)
            .finish_non_exhaustive()
    }
}

/// Delivers committed entries through the hub and counts them.
struct Committed {
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    events_wake: Arc<Notify>,
}

impl CommitListener for Committed {
    fn committed(&self, entries: &[Arc<Entry>]) {
        self.metrics.log_appended.inc_by(entries.len() as u64);
        if let Some(last) = entries.last() {
            self.metrics
                .log_head
                .set(i64::try_from(last.meta.added).unwrap_or(i64::MAX));
        }
        self.hub.committed(entries);
        self.events_wake.notify_one();
    }

    fn flushed(&self, _entries: usize, elapsed: std::time::Duration) {
        self.metrics.log_group_commits.inc();
        self.metrics
            .log_flush_latency
            .observe(elapsed.as_secs_f64());
    }

    fn records_written(&self, written: crate::log::Written) {
        self.metrics.log_records_written.inc_by(written.records);
        self.metrics.log_bytes_written.inc_by(written.bytes);
    }

    fn write_failed(&self, _reason: &str) {
        self.metrics.log_write_failures.inc();
        self.metrics.log_poisoned.set(1);
    }

    fn recent_read(&self, hit: bool) {
        if hit {
            self.metrics.log_recent_hits.inc();
        } else {
            self.metrics.log_recent_misses.inc();
        }
    }
}

/// The `(ms, seq)` of the newest action id of `node_id` among the last log entries.
fn last_own_id(log: &Log, node_id: &str) -> Result<(i64, u64), LogError> {
    let head = log.head();
    let mut newest = (0, 0);
    for added in (head.saturating_sub(ID_SEED_SCAN_ENTRIES) + 1..=head).rev() {
        let Some(entry) = log.entry_at(added)? else {
            continue;
        };
        if let Some(id) = crate::action::ActionId::parse(&entry.meta.id) {
            if id.node == node_id {
                newest = newest.max((id.ms, id.seq));
            }
        }
    }
    Ok(newest)
}

impl Server {
    /// Opens the log in `config.data_dir` and builds the shared state. Must run inside a
    /// tokio runtime. `node_id` overrides the persisted server node id (tests).
    pub fn open(
        config: Config,
        clock: Arc<dyn Clock>,
        node_id: Option<String>,
    ) -> Result<Arc<Server>, ServerError> {
        Server::open_with_pipeline(config, clock, node_id, None)
    }

    /// Like `open`; pipeline workers and the log writer run on `pipeline` when given.
    pub fn open_with_pipeline(
        config: Config,
        clock: Arc<dyn Clock>,
        node_id: Option<String>,
        pipeline: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<Server>, ServerError> {
        if config.cluster.is_some() {
            return Err(ServerError::Cluster(ClusterError::Identity(
                "[cluster] is configured: the server must be opened with Server::open_clustered"
                    .to_owned(),
            )));
        }
        let server = Server::open_parts(
            config,
            clock,
            node_id,
            pipeline,
            Arc::new(Metrics::new()),
            None,
        )?;
        if server
            .log
            .get_setting(crate::cluster::STREAM_SETTING)
            .map_err(|source| ServerError::Log {
                dir: server.config.data_dir.display().to_string(),
                source,
            })?
            .is_some()
        {
            return Err(ServerError::Cluster(ClusterError::Identity(
                "the data directory is a cluster node's view of a stream; without [cluster] it would serve a copy that no longer follows the stream. Configure [cluster] or use a new data directory".to_owned(),
            )));
        }
        Ok(server)
    }

    /// Opens a cluster node (`[cluster]`): connects to NATS, checks that the data directory
    /// is a view of the configured stream, and starts publishing and applying.
    pub async fn open_clustered(
        config: Config,
        clock: Arc<dyn Clock>,
        pipeline: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<Server>, ServerError> {
        let Some(cluster_config) = config.cluster.clone() else {
            return Server::open_with_pipeline(config, clock, None, pipeline);
        };
        let metrics = Arc::new(Metrics::new());
        let cluster = Arc::new(Cluster::connect(&cluster_config, metrics.cluster.clone()).await?);
        let hub_slot: Arc<std::sync::OnceLock<Arc<Hub>>> = Arc::default();
        let on_kick = {
            let hub_slot = hub_slot.clone();
            Arc::new(move |client: &str| hub_slot.get().is_some_and(|hub| hub.kick_client(client)))
        };
        let kicks = cluster.kicks(on_kick).await?;
        let server = Server::open_parts(
            config,
            clock,
            None,
            pipeline.clone(),
            metrics,
            Some((cluster.clone(), kicks)),
        )?;
        let _ = hub_slot.set(server.hub.clone());
        cluster.check_identity(&server.log).await?;
        let entered = pipeline.as_ref().map(tokio::runtime::Handle::enter);
        cluster.start(&server.log);
        drop(entered);
        Ok(server)
    }

    /// Builds the server around a log opened in `config.data_dir`.
    fn open_parts(
        config: Config,
        clock: Arc<dyn Clock>,
        node_id: Option<String>,
        pipeline: Option<tokio::runtime::Handle>,
        metrics: Arc<Metrics>,
        cluster: Option<(Arc<Cluster>, Kicks)>,
    ) -> Result<Arc<Server>, ServerError> {
        let rules = config.rules.clone();
        let auth = Authenticator::new(&config.auth);
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let events_wake = Arc::new(Notify::new());
        let listener = Arc::new(Committed {
            hub: hub.clone(),
            metrics: metrics.clone(),
            events_wake: events_wake.clone(),
        });
        let log_error = |source| ServerError::Log {
            dir: config.data_dir.display().to_string(),
            source,
        };
        // The log's writer task starts on the pipeline runtime, when there is one.
        let entered = pipeline.as_ref().map(tokio::runtime::Handle::enter);
        let log = Log::open_with_reducer(
            &config.data_dir,
            LogOptions {
                cache_bytes: config.limits.log_cache_bytes,
                recent_bytes: config.limits.log_recent_bytes,
                ..LogOptions::default()
            },
            listener,
            Some(Arc::new(objects::ObjectReducer::new(rules.clone()))),
        )
        .map_err(log_error)?;
        drop(entered);
        let node_id = match node_id {
            Some(node_id) => node_id,
            None => match log.get_setting(NODE_ID_SETTING).map_err(log_error)? {
                Some(node_id) => node_id,
                None => {
                    let random = ulid::Ulid::new().to_string().to_lowercase();
                    let node_id = format!("server:{}", &random[random.len() - 8..]);
                    log.queue_setting(NODE_ID_SETTING, &node_id)
                        .map_err(log_error)?;
                    node_id
                }
            },
        };
        let id_seed = last_own_id(&log, &node_id).map_err(log_error)?;
        let admission = admission::Admission::start(&config.limits, metrics.clone());
        let backend = match config.backend.clone() {
            Some(backend) => Some(Arc::new(
                Backend::new(backend, metrics.clone(), clock.clone())
                    .map_err(|error| ServerError::Backend(error.to_string()))?,
            )),
            None => None,
        };
        let ids = Arc::new(ActionIds::new(node_id.clone(), clock.clone(), id_seed));
        let shutdown = watch::channel(false).0;
        let process = backend.as_ref().map(|backend| {
            Arc::new(ProcessLoops::new(process::Uses {
                log: log.clone(),
                backend: backend.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
                ids: ids.clone(),
                subprotocol: config.subprotocol,
                shutdown: Shutdown {
                    receiver: shutdown.subscribe(),
                },
                leases: cluster.as_ref().map(|(cluster, _)| cluster.leases.clone()),
            }))
        });
        let session_config = Arc::new(SessionConfig {
            server_node_id: node_id,
            development: config.env == Env::Development,
            subprotocol: config.subprotocol,
            min_subprotocol: config.min_subprotocol,
            sync_pairs_max: config.limits.sync_pairs_max,
        });
        let backlog = config
            .limits
            .pipeline_backlog_bytes
            .min(Semaphore::MAX_PERMITS);
        let backlog = Arc::new(Semaphore::new(backlog));
        Ok(Arc::new(Server {
            config,
            rules,
            auth,
            bruteforce: BruteForceGuard::default(),
            log,
            hub,
            admission,
            backlog,
            metrics,
            clock,
            session_config,
            backend,
            process,
            events_wake,
            pipeline,
            cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
            kicks: cluster.map(|(_, kicks)| kicks),
            ids,
            shutting_down: AtomicBool::new(false),
            shutdown,
        }))
    }

    /// Whether load balancers should send clients here (`/ready`): the log accepts writes
    /// and, in cluster mode, the node can append and its view is close to the stream head.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(reason) = self.log.poison_reason() {
            return Err(format!("the log refuses writes: {reason}"));
        }
        match &self.cluster {
            Some(cluster) => cluster.ready(),
            None => Ok(()),
        }
    }

    /// This server's node id.
    pub fn node_id(&self) -> &str {
        &self.session_config.server_node_id
    }

    /// A new id for an action the server creates, `"<ms> server:<id> <seq>"`, growing like
    /// Logux's `generateId`.
    pub fn next_action_id(&self) -> (String, i64) {
        self.ids.next()
    }

    /// Starts the loops of the back-end hooks: the events dispatcher (when a channel rule has
    /// the `events` hook) and a `process` loop for every client with stored tasks. Does
    /// nothing without `[backend]`. Fails when the saved events cursor is unreadable, so that
    /// a corrupt cursor never silently replays or skips events.
    pub fn start_hooks(&self) -> Result<(), ServerError> {
        let Some(backend) = &self.backend else {
            return Ok(());
        };
        if self.rules.has_event_hooks() {
            events::start(events::Uses {
                log: self.log.clone(),
                rules: self.rules.clone(),
                backend: backend.clone(),
                metrics: self.metrics.clone(),
                wake: self.events_wake.clone(),
                shutdown: self.shutdown_signal(),
                leases: self.cluster.as_ref().map(|cluster| cluster.leases.clone()),
            })?;
        }
        if let Some(process) = &self.process {
            if let Err(error) = process::resume(process) {
                tracing::error!(%error, "resuming process tasks failed");
            }
            if let Some(cluster) = &self.cluster {
                // Tasks of other nodes' clients arrive through the stream: look for queues
                // without a loop here, so that a task whose node died is taken over.
                let (process, shutdown) = (process.clone(), self.shutdown_signal());
                let every = cluster.leases.lease;
                tokio::spawn(async move {
                    while shutdown.sleep(every).await {
                        process::sweep(&process);
                    }
                });
            }
        }
        Ok(())
    }

    /// Applies `retention_actions_max` now: removes the oldest actions beyond it.
    /// Returns how many were removed.
    pub async fn apply_retention(&self) -> Result<usize, LogError> {
        let Some(max) = self.config.retention_actions_max.filter(|max| *max > 0) else {
            return Ok(0);
        };
        let head = self.log.head();
        if head <= max {
            return Ok(0);
        }
        // Actions still waiting for their `process` answer are kept.
        let oldest_task = self
            .log
            .task_queues()?
            .into_iter()
            .map(|(_, added)| added)
            .min()
            .unwrap_or(u64::MAX);
        self.log
            .remove_before((head - max + 1).min(oldest_task))
            .await
    }

    /// Runs retention every `RETENTION_INTERVAL_MS` until shutdown.
    pub fn spawn_retention(self: &Arc<Self>) {
        if self.config.retention_actions_max.unwrap_or(0) == 0 {
            return;
        }
        let server = self.clone();
        tokio::spawn(async move {
            let period = std::time::Duration::from_millis(RETENTION_INTERVAL_MS);
            while !server.is_shutting_down() {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = server.shut_down() => break,
                }
                match server.apply_retention().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "retention removed old actions"),
                    Err(error) => tracing::error!(%error, "retention failed"),
                }
            }
        });
    }

    /// The metrics text, with the gauges that are read on demand brought up to date.
    pub fn render_metrics(&self) -> String {
        let metrics = &self.metrics;
        metrics
            .subscriptions
            .set(i64::try_from(self.hub.subscription_count()).unwrap_or(i64::MAX));
        metrics
            .log_head
            .set(i64::try_from(self.log.head()).unwrap_or(i64::MAX));
        if let Ok(bytes) = self.log.size_on_disk() {
            metrics
                .log_disk_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        metrics
            .log_poisoned
            .set(i64::from(self.log.poison_reason().is_some()));
        metrics.render()
    }

    /// Spawns `future` on the pipeline runtime (or the current one without it).
    pub fn spawn_pipeline<F>(&self, future: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        match &self.pipeline {
            Some(runtime) => runtime.spawn(future),
            None => tokio::spawn(future),
        }
    }

    /// A shutdown receiver for a loop that does not hold the server.
    pub fn shutdown_signal(&self) -> Shutdown {
        Shutdown {
            receiver: self.shutdown.subscribe(),
        }
    }

    /// Resolves once shutdown started (at once if it already has).
    pub async fn shut_down(&self) {
        let mut receiver = self.shutdown.subscribe();
        // An error means the sender is gone, which only happens with the server itself.
        let _ = receiver.wait_for(|started| *started).await;
    }

    /// True once shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Starts shutdown: connections close, new ones are refused.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.shutdown.send_replace(true);
    }
}
