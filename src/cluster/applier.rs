//! Applies the shared stream, in order, to this node's log (its view).
//!
//! An ordered consumer starts after the last sequence the view applied (`Log::head`), so a
//! restarted node resumes where it stopped and a new node builds its view from the start.
//! Messages that are ready are applied together as one group commit; the next group waits
//! until the previous one is durable, which keeps the view's head exact.

use super::record::decode;
use super::State;
use crate::log::{Log, LogError};
use crate::metrics::ClusterMetrics;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::Stream;
use futures_util::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;

/// Most stream messages applied in one group commit.
const APPLY_GROUP_MESSAGES_MAX: usize = 4_096;
/// A consumer that delivers nothing for this long while the stream is known to have more
/// is replaced.
const CONSUMER_STALL_MS: u64 = 2_000;
/// Pause before the consumer is created again after it failed.
const CONSUMER_RETRY_MS: u64 = 500;

/// The applying side of one node.
pub(super) struct Applier {
    pub(super) stream: Stream,
    pub(super) log: Log,
    pub(super) state: Arc<State>,
    pub(super) metrics: ClusterMetrics,
}

/// Why applying stopped for good.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
    #[error(transparent)]
    Log(#[from] LogError),
}

impl Applier {
    /// Applies the stream until the log closes, or a message cannot be applied (then the
    /// node stays not ready: it never skips a message).
    pub(super) async fn run(self) {
        loop {
            match self.follow().await {
                Ok(()) => tokio::time::sleep(Duration::from_millis(CONSUMER_RETRY_MS)).await,
                Err(ApplyError::Log(LogError::Closed)) => return,
                Err(error) => {
                    tracing::error!(%error, "this node cannot apply the shared stream; it stays not ready");
                    self.state.set_stuck(error.to_string());
                    return;
                }
            }
        }
    }

    /// One consumer's life: from the view's head until the consumer fails (`Ok`, retried).
    async fn follow(&self) -> Result<(), ApplyError> {
        let start = self.log.head() + 1;
        let config = OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..OrderedConfig::default()
        };
        let consumer = match self.stream.create_consumer(config).await {
            Ok(consumer) => consumer,
            Err(error) => {
                tracing::warn!(%error, start, "creating the stream consumer failed; retrying");
                return Ok(());
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "reading the stream failed; retrying");
                return Ok(());
            }
        };
        loop {
            let next =
                tokio::time::timeout(Duration::from_millis(CONSUMER_STALL_MS), messages.next())
                    .await;
            let first = match next {
                Err(_) if self.state.known_head() > self.log.head() => {
                    // The stream has messages this consumer does not deliver (its server
                    // restarted and forgot it): start a new one from the view's head.
                    tracing::warn!(
                        applied = self.log.head(),
                        head = self.state.known_head(),
                        "the stream consumer stalled; creating it again"
                    );
                    return Ok(());
                }
                Err(_) => continue,
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "the stream consumer failed; creating it again");
                    return Ok(());
                }
                Ok(None) => return Ok(()),
            };
            let mut batch = vec![first];
            while batch.len() < APPLY_GROUP_MESSAGES_MAX {
                match messages.next().now_or_never() {
                    Some(Some(Ok(message))) => batch.push(message),
                    _ => break,
                }
            }
            let mut replicated = Vec::with_capacity(batch.len());
            let mut head = 0;
            for message in &batch {
                let info = message
                    .info()
                    .map_err(|error| super::record::RecordError::Decode {
                        seq: 0,
                        reason: format!("message metadata: {error}"),
                    })?;
                head = head.max(info.stream_sequence + info.pending);
                replicated.push(decode(info.stream_sequence, &message.payload)?);
            }
            let last = replicated.last().map_or(0, |message| message.seq);
            self.log.apply(replicated).await?.outcomes().await?;
            self.state.saw_head(head);
            self.metrics
                .applied
                .set(i64::try_from(last).unwrap_or(i64::MAX));
            self.state.update_lag(self.log.head(), &self.metrics);
        }
    }
}
