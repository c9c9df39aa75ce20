//! Prometheus metrics. Names follow Prometheus conventions: the `ferry_` prefix, `_total` for
//! counters, base units (`_seconds`, `_bytes`). Labels have bounded values only: never user
//! ids, client ids or channel names.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 0.5 ms to 60 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Every metric Ferry exports.
pub struct Metrics {
    registry: Registry,
    /// Open connections by `transport` and `state` (`handshaking`, `waiting`, `admitted`).
    pub connections: IntGaugeVec,
    /// Finished handshakes by `result` (`ok`, `wrong_credentials`, `wrong_protocol`, ...).
    pub handshakes: IntCounterVec,
    /// Actions received from clients by `outcome` (`processed`, `denied`, `unknown_type`,
    /// `wrong_channel`, `duplicate`).
    pub actions_received: IntCounterVec,
    /// Actions sent to clients (each copy counts).
    pub actions_delivered: IntCounter,
    /// Time from a client's `sync` arriving to its `synced` being queued (durable).
    pub sync_latency: Histogram,
    /// Entries appended to the log.
    pub log_appended: IntCounter,
    /// Group commits (one batch and one flush each).
    pub log_group_commits: IntCounter,
    /// sled records written (inserted or removed) by durable group commits.
    pub log_records_written: IntCounter,
    /// Bytes of those records (keys and values).
    pub log_bytes_written: IntCounter,
    /// Batch-and-flush time of a group commit.
    pub log_flush_latency: Histogram,
    /// Failed log writes; after one the log refuses writes until restart.
    pub log_write_failures: IntCounter,
    /// Highest durable log position.
    pub log_head: IntGauge,
    /// Bytes of the log on disk (read on scrape).
    pub log_disk_bytes: IntGauge,
    /// 1 while the log refuses writes after a failure.
    pub log_poisoned: IntGauge,
    /// Log reads by `result`: `hit` when the window of recent entries had the entry,
    /// `miss` when it came from storage.
    pub log_recent_reads: IntCounterVec,
    /// `log_recent_reads` for `hit`, resolved once (it is counted per entry read).
    pub log_recent_hits: IntCounter,
    /// `log_recent_reads` for `miss`.
    pub log_recent_misses: IntCounter,
    /// Channel subscriptions (read on scrape).
    pub subscriptions: IntGauge,
    /// Protocol errors sent, by wire `kind`.
    pub protocol_errors: IntCounterVec,
    /// Connections closed because their outbox was full.
    pub slow_consumers: IntCounter,
    /// Clients waiting for admission.
    pub waiting_room: IntGauge,
    /// Time clients waited for admission, by `kind` (`handshake`, `resync`).
    pub admission_wait: HistogramVec,
    /// Connections or requests refused, by `reason`.
    pub rejections: IntCounterVec,
    /// Open long-poll sessions.
    pub long_poll_sessions: IntGauge,
    /// Running pipeline workers (a connection has one only while it has `sync`s to handle).
    pub pipeline_workers: IntGauge,
    /// Back-end hook requests by `hook` and `outcome` (`ok`, `error`).
    pub hook_requests: IntCounterVec,
    /// Back-end hook request time by `hook`.
    pub hook_latency: HistogramVec,
    /// `process` tasks stored and not yet answered.
    pub process_pending: IntGauge,
    /// Finished `process` tasks by `outcome` (`processed`, `failed`, `deadline`).
    pub process_finished: IntCounterVec,
    /// Events delivered to the back-end.
    pub events_delivered: IntCounter,
    /// Server API requests by `outcome` (`ok`, `unauthorized`, `bad_request`, ...).
    pub api_requests: IntCounterVec,
    /// Cluster mode (stay at 0 on a single node).
    pub cluster: ClusterMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The metrics of the cluster mode.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// `ferry_cluster_view_lag_messages`: stream head minus the last sequence this node applied.
    pub view_lag: IntGauge,
    /// `ferry_cluster_applied_sequence`: the last stream sequence this node applied.
    pub applied: IntGauge,
    /// `ferry_cluster_append_seconds`: from an append handed to the stream to its
    /// acknowledgement and local application.
    pub append_latency: Histogram,
    /// `ferry_cluster_append_retries_total`: publishes repeated (same message id) after a
    /// failure or timeout.
    pub append_retries: IntCounter,
    /// `ferry_cluster_append_failures_total`: appends given up after the deadline.
    pub append_failures: IntCounter,
    /// `ferry_cluster_nats_connected`: 1 while the NATS connection is up.
    pub nats_connected: IntGauge,
    /// `ferry_cluster_kicks_total{direction}`: zombie kicks sent to the other nodes and
    /// connections closed here because a client connected to another node.
    pub kicks: IntCounterVec,
}

impl ClusterMetrics {
    fn new() -> ClusterMetrics {
        ClusterMetrics {
            view_lag: gauge(
                "ferry_cluster_view_lag_messages",
                "Stream messages this node has not applied yet (stream head minus applied).",
            ),
            applied: gauge(
                "ferry_cluster_applied_sequence",
                "Last stream sequence this node applied to its view.",
            ),
            append_latency: histogram(
                "ferry_cluster_append_seconds",
                "Time from an append handed to the stream to its acknowledgement and local application.",
            ),
            append_retries: counter(
                "ferry_cluster_append_retries_total",
                "Stream publishes repeated with the same message id after a failure.",
            ),
            append_failures: counter(
                "ferry_cluster_append_failures_total",
                "Appends given up after the append deadline (clients re-send).",
            ),
            nats_connected: gauge(
                "ferry_cluster_nats_connected",
                "1 while the connection to NATS is up.",
            ),
            kicks: counter_vec(
                "ferry_cluster_kicks_total",
                "Zombie kicks across nodes: sent to others, or received and closing a connection here.",
                &["direction"],
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.view_lag.clone()),
            Box::new(self.applied.clone()),
            Box::new(self.append_latency.clone()),
            Box::new(self.append_retries.clone()),
            Box::new(self.append_failures.clone()),
            Box::new(self.nats_connected.clone()),
            Box::new(self.kicks.clone()),
        ]
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // The names and labels are constants checked by the tests, so this cannot fail.
    #[allow(clippy::expect_used)]
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str) -> Histogram {
    #[allow(clippy::expect_used)]
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS_SECONDS.to_vec()))
        .expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    #[allow(clippy::expect_used)]
    IntGauge::new(name, help).expect("valid metric")
}

fn counter(name: &str, help: &str) -> IntCounter {
    #[allow(clippy::expect_used)]
    IntCounter::new(name, help).expect("valid metric")
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        #[allow(clippy::expect_used)]
        let connections = IntGaugeVec::new(
            Opts::new("ferry_connections", "Open client connections."),
            &["transport", "state"],
        )
        .expect("valid metric");
        #[allow(clippy::expect_used)]
        let admission_wait = HistogramVec::new(
            HistogramOpts::new(
                "ferry_admission_wait_seconds",
                "Time clients waited in the waiting room before admission.",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["kind"],
        )
        .expect("valid metric");
        #[allow(clippy::expect_used)]
        let hook_latency = HistogramVec::new(
            HistogramOpts::new(
                "ferry_backend_hook_seconds",
                "Time of back-end hook requests by hook.",
            )
            .buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            &["hook"],
        )
        .expect("valid metric");
        let log_recent_reads = counter_vec(
            "ferry_log_recent_reads_total",
            "Log entry reads by result: hit when the window of recent entries had it.",
            &["result"],
        );
        let log_recent_hits = log_recent_reads.with_label_values(&["hit"]);
        let log_recent_misses = log_recent_reads.with_label_values(&["miss"]);
        let metrics = Metrics {
            registry: Registry::new(),
            connections,
            handshakes: counter_vec(
                "ferry_handshakes_total",
                "Finished connect handshakes by result.",
                &["result"],
            ),
            actions_received: counter_vec(
                "ferry_actions_received_total",
                "Actions received from clients by outcome.",
                &["outcome"],
            ),
            actions_delivered: counter(
                "ferry_actions_delivered_total",
                "Actions sent to clients, each copy counted.",
            ),
            sync_latency: histogram(
                "ferry_sync_seconds",
                "Time from a client sync arriving to its synced answer (actions durable).",
            ),
            log_appended: counter("ferry_log_appended_total", "Entries appended to the log."),
            log_group_commits: counter(
                "ferry_log_group_commits_total",
                "Group commits: one batch and one flush each.",
            ),
            log_records_written: counter(
                "ferry_log_records_written_total",
                "sled records written (inserted or removed) by durable group commits.",
            ),
            log_bytes_written: counter(
                "ferry_log_written_bytes_total",
                "Bytes of the sled records written by durable group commits (keys and values).",
            ),
            log_flush_latency: histogram(
                "ferry_log_flush_seconds",
                "Batch and flush time of one group commit.",
            ),
            log_write_failures: counter(
                "ferry_log_write_failures_total",
                "Failed log writes; the log refuses writes afterwards.",
            ),
            log_head: gauge("ferry_log_head", "Highest durable log position."),
            log_disk_bytes: gauge("ferry_log_disk_bytes", "Bytes of the log on disk."),
            log_poisoned: gauge(
                "ferry_log_poisoned",
                "1 while the log refuses writes after a failed write.",
            ),
            log_recent_reads,
            log_recent_hits,
            log_recent_misses,
            subscriptions: gauge("ferry_subscriptions", "Channel subscriptions."),
            protocol_errors: counter_vec(
                "ferry_protocol_errors_total",
                "Protocol error messages sent to clients, by kind.",
                &["kind"],
            ),
            slow_consumers: counter(
                "ferry_slow_consumer_disconnects_total",
                "Connections closed because their outbox was full.",
            ),
            waiting_room: gauge(
                "ferry_waiting_room_clients",
                "Clients waiting for admission.",
            ),
            admission_wait,
            rejections: counter_vec(
                "ferry_rejections_total",
                "Connections or requests refused, by reason.",
                &["reason"],
            ),
            long_poll_sessions: gauge("ferry_long_poll_sessions", "Open long-poll sessions."),
            pipeline_workers: gauge(
                "ferry_pipeline_workers",
                "Running pipeline workers; a connection has one only while it has syncs to handle.",
            ),
            hook_requests: counter_vec(
                "ferry_backend_hook_requests_total",
                "Back-end hook requests by hook and outcome.",
                &["hook", "outcome"],
            ),
            hook_latency,
            process_pending: gauge(
                "ferry_backend_process_pending",
                "Process tasks stored and not yet answered by the back-end.",
            ),
            process_finished: counter_vec(
                "ferry_backend_process_finished_total",
                "Finished process tasks by outcome.",
                &["outcome"],
            ),
            events_delivered: counter(
                "ferry_backend_events_delivered_total",
                "Actions delivered to the back-end events hook.",
            ),
            api_requests: counter_vec(
                "ferry_api_requests_total",
                "Server API requests by outcome.",
                &["outcome"],
            ),
            cluster: ClusterMetrics::new(),
        };
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(metrics.connections.clone()),
            Box::new(metrics.handshakes.clone()),
            Box::new(metrics.actions_received.clone()),
            Box::new(metrics.actions_delivered.clone()),
            Box::new(metrics.sync_latency.clone()),
            Box::new(metrics.log_appended.clone()),
            Box::new(metrics.log_group_commits.clone()),
            Box::new(metrics.log_records_written.clone()),
            Box::new(metrics.log_bytes_written.clone()),
            Box::new(metrics.log_flush_latency.clone()),
            Box::new(metrics.log_write_failures.clone()),
            Box::new(metrics.log_head.clone()),
            Box::new(metrics.log_disk_bytes.clone()),
            Box::new(metrics.log_poisoned.clone()),
            Box::new(metrics.log_recent_reads.clone()),
            Box::new(metrics.subscriptions.clone()),
            Box::new(metrics.protocol_errors.clone()),
            Box::new(metrics.slow_consumers.clone()),
            Box::new(metrics.waiting_room.clone()),
            Box::new(metrics.admission_wait.clone()),
            Box::new(metrics.rejections.clone()),
            Box::new(metrics.long_poll_sessions.clone()),
            Box::new(metrics.pipeline_workers.clone()),
            Box::new(metrics.hook_requests.clone()),
            Box::new(metrics.hook_latency.clone()),
            Box::new(metrics.process_pending.clone()),
            Box::new(metrics.process_finished.clone()),
            Box::new(metrics.events_delivered.clone()),
            Box::new(metrics.api_requests.clone()),
            #[cfg(target_os = "linux")]
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        collectors.extend(metrics.cluster.collectors());
        for collector in collectors {
            if let Err(error) = metrics.registry.register(collector) {
                tracing::error!(%error, "registering a metric failed");
            }
        }
        metrics
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(%error, "encoding metrics failed");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Keeps a connection counted in one state and moves it between states.
#[derive(Debug)]
pub struct ConnectionGauge<'a> {
    metrics: &'a Metrics,
    transport: &'static str,
    state: &'static str,
}

impl<'a> ConnectionGauge<'a> {
    /// Counts a new connection in `state`.
    pub fn new(metrics: &'a Metrics, transport: &'static str, state: &'static str) -> Self {
        metrics
            .connections
            .with_label_values(&[transport, state])
            .inc();
        ConnectionGauge {
            metrics,
            transport,
            state,
        }
    }

    /// Moves the connection to `state`.
    pub fn set(&mut self, state: &'static str) {
        if state == self.state {
            return;
        }
        self.metrics
            .connections
            .with_label_values(&[self.transport, self.state])
            .dec();
        self.metrics
            .connections
            .with_label_values(&[self.transport, state])
            .inc();
        self.state = state;
    }
}

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        self.metrics
            .connections
            .with_label_values(&[self.transport, self.state])
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_metric_with_the_ferry_prefix() {
        let metrics = Metrics::new();
        metrics.handshakes.with_label_values(&["ok"]).inc();
        metrics.sync_latency.observe(0.01);
        let gauge = ConnectionGauge::new(&metrics, "ws", "handshaking");
        let text = metrics.render();
        for name in [
            "ferry_connections",
            "ferry_handshakes_total",
            "ferry_sync_seconds_bucket",
            "ferry_log_flush_seconds",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                name.starts_with("ferry_") || name.starts_with("process_"),
                "{line}"
            );
        }
        drop(gauge);
        assert!(metrics
            .render()
            .contains(r#"ferry_connections{state="handshaking",transport="ws"} 0"#));
    }
}
