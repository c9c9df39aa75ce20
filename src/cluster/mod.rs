//! Cluster mode: several Ferry nodes share one ordered log, a NATS JetStream stream.
//!
//! Each node publishes its clients' appends to the stream (`publisher`), answers `synced`
//! only once JetStream acknowledged them (a quorum of replicas) and its own view applied
//! them, and applies the whole stream in order into its local sled log (`applier`), from
//! which it reads and delivers exactly as a single node does. `added` is the stream
//! sequence, so positions mean the same on every node. Leases in a JetStream key-value
//! bucket (`lease`) make one node at a time run a `process` task or the events hook; core
//! NATS messages carry the zombie rule across nodes (`kicks`).

mod applier;
mod kicks;
pub mod lease;
mod publisher;
pub mod record;

pub use kicks::Kicks;

use crate::config::ClusterConfig;
use crate::log::{Log, LogError};
use crate::metrics::ClusterMetrics;
use async_nats::jetstream::{self, stream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// The settings key of the stream this node's view belongs to: `<name> <epoch>`.
pub const STREAM_SETTING: &str = "cluster_stream";
/// How long the NATS client waits for a JetStream answer (an acknowledgement) before the
/// publisher repeats the publish.
const JETSTREAM_TIMEOUT_MS: u64 = 2_000;
/// How long a starting node retries finding or creating the stream before it gives up.
const START_DEADLINE_MS: u64 = 60_000;
/// Pause between two of those attempts.
const START_RETRY_MS: u64 = 1_000;
/// Attempts to find or publish the stream's epoch record at start.
const EPOCH_ATTEMPTS_MAX: usize = 20;
/// Pause between two of them.
const EPOCH_RETRY_MS: u64 = 250;
/// How often the stream head is read (readiness, view lag).
const PROBE_INTERVAL_MS: u64 = 1_000;
/// Replication queue capacity (appends waiting to be published).
const APPEND_QUEUE_LEN: usize = 4_096;

/// Errors starting the cluster mode; the server refuses to start with them.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A credentials or CA file could not be read.
    #[error("cluster: cannot read {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// NATS could not be reached or refused us.
    #[error("cluster: cannot connect to NATS ({urls}): {reason}")]
    Connect {
        /// The configured URLs.
        urls: String,
        /// Why.
        reason: String,
    },
    /// The stream could not be found or created.
    #[error("cluster: stream {stream}: {reason}")]
    Stream {
        /// The stream name.
        stream: String,
        /// Why.
        reason: String,
    },
    /// This data directory is a view of another stream (or a single-node log).
    #[error("cluster: {0}")]
    Identity(String),
    /// The local log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What the publisher, the applier and the readiness check share.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The highest stream sequence this node knows exists (acknowledgements, consumer).
    head: AtomicU64,
    /// False while publishes fail.
    appending: AtomicBool,
    /// Why applying stopped for good, if it did.
    stuck: Mutex<Option<String>>,
    /// NATS connection state.
    connected: AtomicBool,
    /// The view's lag at the last update.
    lag: AtomicU64,
}

impl State {
    fn saw_head(&self, seq: u64) {
        self.head.fetch_max(seq, Ordering::AcqRel);
    }

    fn known_head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    fn set_appending(&self, appending: bool) {
        self.appending.store(appending, Ordering::Release);
    }

    fn set_stuck(&self, reason: String) {
        *self.stuck.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }

    fn update_lag(&self, applied: u64, metrics: &ClusterMetrics) {
        let lag = self.head.load(Ordering::Acquire).saturating_sub(applied);
        self.lag.store(lag, Ordering::Release);
        metrics.view_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
    }
}

/// A connection to the cluster: NATS, the stream, the lease bucket.
pub struct Cluster {
    config: ClusterConfig,
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: stream::Stream,
    /// `<name> <epoch>` of the stream (`stream_epoch`).
    identity: String,
    state: Arc<State>,
    metrics: ClusterMetrics,
    /// The last stream-head request: when it started, and the head it read.
    head_probe: tokio::sync::Mutex<Option<(tokio::time::Instant, u64)>>,
    /// Process and events leases.
    pub leases: lease::Leases,
    /// A unique name of this process among the nodes (lease holder, kick sender).
    pub node_uid: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("stream", &self.config.stream)
            .field("node_uid", &self.node_uid)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to NATS and finds or creates the stream and the lease bucket.
    pub async fn connect(
        config: &ClusterConfig,
        metrics: ClusterMetrics,
    ) -> Result<Cluster, ClusterError> {
        let state = Arc::new(State::default());
        let client = connect_nats(config, state.clone(), metrics.clone()).await?;
        state.connected.store(true, Ordering::Release);
        metrics.nats_connected.set(1);
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(JETSTREAM_TIMEOUT_MS))
            .build(client.clone());
        let node_uid = ulid::Ulid::new().to_string().to_lowercase();
        // JetStream may still be electing leaders when the node starts (all of a cluster
        // coming up at once): retry for a while instead of exiting at the first timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(START_DEADLINE_MS);
        let (stream, identity, last_sequence, leases) = loop {
            match open_stream(&jetstream, config, &node_uid).await {
                Ok(opened) => break opened,
                Err(reason) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%reason, stream = %config.stream, "the stream is not available yet; retrying");
                    tokio::time::sleep(Duration::from_millis(START_RETRY_MS)).await;
                }
                Err(reason) => {
                    return Err(ClusterError::Stream {
                        stream: config.stream.clone(),
                        reason,
                    })
                }
            }
        };
        state.saw_head(last_sequence);
        let max_payload = client.server_info().max_payload;
        tracing::info!(
            stream = %config.stream,
            max_payload,
            "cluster: one stream message per log entry; an entry larger than the NATS max_payload cannot be stored in cluster mode"
        );
        Ok(Cluster {
            config: config.clone(),
            client,
            jetstream,
            stream,
            identity,
            state,
            metrics,
            head_probe: tokio::sync::Mutex::new(None),
            leases,
            node_uid,
        })
    }

    /// Starts publishing `log`'s appends and applying the stream to it (after
    /// `check_identity`). Spawns on the current runtime.
    pub fn start(&self, log: &Log) {
        let appends = log.replicate(APPEND_QUEUE_LEN);
        let publisher = publisher::Publisher {
            jetstream: self.jetstream.clone(),
            subject: log_subject(&self.config.stream),
            log: log.clone(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
            deadline: Duration::from_millis(self.config.append_deadline_ms),
        };
        tokio::spawn(publisher.run(appends));
        let applier = applier::Applier {
            stream: self.stream.clone(),
            log: log.clone(),
            state: self.state.clone(),
            metrics: self.metrics.clone(),
        };
        tokio::spawn(applier.run());
        self.state.set_appending(true);
        // A new or restarted view is behind by what the stream holds beyond it, from the
        // first moment: not ready until it caught up, not after its first batch.
        self.state.update_lag(log.head(), &self.metrics);
        tokio::spawn(probe(
            self.stream.clone(),
            log.clone(),
            self.state.clone(),
            self.metrics.clone(),
        ));
    }

    /// Refuses a data directory that belongs to another stream, holds a single-node log, or
    /// is ahead of the stream (the stream was replaced or purged).
    pub async fn check_identity(&self, log: &Log) -> Result<(), ClusterError> {
        let head = self.state.known_head();
        match log.get_setting(STREAM_SETTING)? {
            Some(identity) if identity == self.identity => {}
            Some(identity) => {
                return Err(ClusterError::Identity(format!(
                    "the data directory is a view of stream {identity:?}, but the stream is now {:?} (it was deleted and created again: its epoch record differs): refusing to serve positions from another history. Move the data directory away to build a new view",
                    self.identity
                )))
            }
            None if log.head() > 0 => {
                return Err(ClusterError::Identity(
                    "the data directory holds a single-node log; a cluster node needs a new data directory (its view is built from the stream)".to_owned(),
                ))
            }
            None => log.put_setting(STREAM_SETTING, &self.identity).await?,
        }
        if log.head() > head {
            return Err(ClusterError::Identity(format!(
                "the view has applied sequence {} but the stream ends at {head}: the stream lost messages; move the data directory away to build a new view",
                log.head()
            )));
        }
        Ok(())
    }

    /// Waits until the view reached the stream head as it is now (and at least `synced`), so
    /// that a client reading after its own writes on another node sees them. Fails past
    /// `catch_up_wait_ms`.
    pub async fn caught_up(&self, log: &Log, synced: u64) -> Result<(), LogError> {
        let wait = Duration::from_millis(self.config.catch_up_wait_ms);
        let target = match tokio::time::timeout(wait, self.stream_head()).await {
            Ok(Some(head)) => head.max(synced),
            _ => {
                return Err(LogError::Unavailable(
                    "the stream head could not be read".to_owned(),
                ))
            }
        };
        match tokio::time::timeout(wait, log.durable(target)).await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable(format!(
                "this node's view did not reach sequence {target} in time"
            ))),
        }
    }

    /// The stream's last sequence, asked of the stream leader by a request that started
    /// after this call did. Concurrent callers share one request (a reconnect storm asks
    /// the leader once per round trip, not once per client).
    async fn stream_head(&self) -> Option<u64> {
        let asked = tokio::time::Instant::now();
        let mut last = self.head_probe.lock().await;
        if let Some((started, head)) = *last {
            if started >= asked {
                return Some(head);
            }
        }
        let started = tokio::time::Instant::now();
        let mut stream = self.stream.clone();
        match stream.info().await {
            Ok(info) => {
                let head = info.state.last_sequence;
                self.state.saw_head(head);
                *last = Some((started, head));
                Some(head)
            }
            Err(error) => {
                tracing::debug!(%error, "reading the stream head failed");
                None
            }
        }
    }

    /// Whether load balancers should send clients here: NATS connected, appends going
    /// through, the view applying and not too far behind. `Err` says why not.
    pub fn ready(&self) -> Result<(), String> {
        if let Some(reason) = self
            .state
            .stuck
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(format!("the view stopped: {reason}"));
        }
        if !self.state.connected.load(Ordering::Acquire) {
            return Err("not connected to NATS".to_owned());
        }
        if !self.state.appending.load(Ordering::Acquire) {
            return Err("appends to the stream are failing".to_owned());
        }
        let lag = self.state.lag.load(Ordering::Acquire);
        if lag > self.config.ready_lag_max {
            return Err(format!("the view is {lag} messages behind the stream"));
        }
        Ok(())
    }

    /// The zombie rule across nodes, on core NATS.
    pub async fn kicks(&self, on_kick: kicks::OnKick) -> Result<Kicks, ClusterError> {
        Kicks::start(
            self.client.clone(),
            &self.config.stream,
            self.node_uid.clone(),
            self.metrics.clone(),
            on_kick,
        )
        .await
        .map_err(|reason| ClusterError::Connect {
            urls: self.config.nats_urls.join(","),
            reason,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
}

/// Asks the stream leader for the stream head every `PROBE_INTERVAL_MS`: keeps the view lag
/// right while nothing arrives, and says appends can go through again after a failure
/// (a load balancer sends no clients to a node that is not ready, so no publish would).
async fn probe(stream: stream::Stream, log: Log, state: Arc<State>, metrics: ClusterMetrics) {
    let mut stream = stream;
    loop {
        tokio::time::sleep(Duration::from_millis(PROBE_INTERVAL_MS)).await;
        if log.poison_reason().is_some() {
            continue;
        }
        match stream.info().await {
            Ok(info) => {
                state.saw_head(info.state.last_sequence);
                state.set_appending(true);
            }
            Err(error) => {
                tracing::debug!(%error, "the stream leader did not answer");
                state.set_appending(false);
            }
        }
        state.update_lag(log.head(), &metrics);
    }
}

/// What a starting node finds: the stream, its identity `<name> <epoch>`, its last
/// sequence, and the lease bucket.
type Opened = (stream::Stream, String, u64, lease::Leases);

/// Finds or creates the stream, reads (or writes) its epoch record and opens the buckets.
async fn open_stream(
    jetstream: &jetstream::Context,
    config: &ClusterConfig,
    node_uid: &str,
) -> Result<Opened, String> {
    let mut stream = jetstream
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![log_subject(&config.stream)],
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            ..stream::Config::default()
        })
        .await
        .map_err(|error| error.to_string())?;
    let (epoch, last_sequence) = stream_epoch(jetstream, &mut stream).await?;
    let leases = lease::Leases::open(jetstream, config, node_uid.to_owned())
        .await
        .map_err(|reason| format!("lease bucket: {reason}"))?;
    Ok((
        stream,
        format!("{} {epoch}", config.stream),
        last_sequence,
        leases,
    ))
}

/// The stream's epoch: the name in its first message, which the first node to find the
/// stream empty publishes (the creation time is no identity: nats-server 2.9 was seen to
/// report two different ones for one stream across restarts).
async fn stream_epoch(
    jetstream: &jetstream::Context,
    stream: &mut stream::Stream,
) -> Result<(String, u64), String> {
    let name = stream.cached_info().config.name.clone();
    for _ in 0..EPOCH_ATTEMPTS_MAX {
        let info = stream.info().await.map_err(|error| error.to_string())?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if last == 0 {
            let record = record::Record {
                v: record::RECORD_VERSION,
                epoch: Some(ulid::Ulid::new().to_string()),
                ..record::Record::default()
            };
            let payload = serde_json::to_vec(&record).map_err(|error| error.to_string())?;
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .message_id(record::EPOCH_MSG_ID)
                .payload(payload.into());
            match jetstream.send_publish(log_subject(&name), publish).await {
                Ok(ack) => {
                    if let Err(error) = ack.await {
                        tracing::warn!(%error, "publishing the stream epoch failed; retrying");
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "publishing the stream epoch failed; retrying")
                }
            }
            tokio::time::sleep(Duration::from_millis(EPOCH_RETRY_MS)).await;
            continue;
        }
        let message = stream
            .get_raw_message(first)
            .await
            .map_err(|error| error.to_string())?;
        let record: record::Record = serde_json::from_slice(&message.payload)
            .map_err(|error| format!("its first message is not Ferry's: {error}"))?;
        let epoch = record.epoch.ok_or_else(|| {
            format!("its first message (sequence {first}) is not Ferry's epoch record")
        })?;
        return Ok((epoch, last));
    }
    Err("the stream's epoch record could not be written".to_owned())
}

/// The one subject of the stream's log messages.
fn log_subject(stream: &str) -> String {
    format!("{stream}.log")
}

/// Connects to NATS with the configured credentials; the client reconnects by itself and
/// reports its state to `state` and the metrics.
async fn connect_nats(
    config: &ClusterConfig,
    state: Arc<State>,
    metrics: ClusterMetrics,
) -> Result<async_nats::Client, ClusterError> {
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|error| ClusterError::File {
            path: path.display().to_string(),
            reason: error.to_string(),
        })
    };
    let mut options = async_nats::ConnectOptions::new()
        .name("ferry")
        .max_reconnects(None)
        .event_callback(move |event| {
            let state = state.clone();
            let metrics = metrics.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        state.connected.store(true, Ordering::Release);
                        metrics.nats_connected.set(1);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        state.connected.store(false, Ordering::Release);
                        metrics.nats_connected.set(0);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
    if let Some(path) = &config.user_password_file {
        let text = read(path)?;
        let line = text.lines().next().unwrap_or_default();
        let Some((user, password)) = line.split_once(':') else {
            return Err(ClusterError::File {
                path: path.display().to_string(),
                reason: "the first line must be user:password".to_owned(),
            });
        };
        options = options.user_and_password(user.to_owned(), password.to_owned());
    }
    if let Some(path) = &config.nkey_seed_file {
        options = options.nkey(read(path)?.trim().to_owned());
    }
    if let Some(path) = &config.ca_file {
        options = options
            .add_root_certificates(path.clone())
            .require_tls(true);
    }
    options
        .connect(config.nats_urls.clone())
        .await
        .map_err(|error| ClusterError::Connect {
            urls: config.nats_urls.join(","),
            reason: error.to_string(),
        })
}
