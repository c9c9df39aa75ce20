//! Publishes appends to the shared stream and answers them once this node applied them.
//!
//! One group at a time, in submission order (so hooks and replies keep their order): every
//! message of the group that answers nothing is published (pipelined), then the answers,
//! which name the sequence of the action they answer. A failed or timed-out publish is
//! repeated with the same message id until the append deadline; JetStream answers a repeat
//! with the original sequence. Then the publisher waits until the local view applied the
//! group's last sequence (read-your-writes) and derives each entry's outcome from the view.

use super::record::{answer_id, plan, Planned};
use super::State;
use crate::log::{Append, AppendOutcome, Log, LogError};
use crate::metrics::ClusterMetrics;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::Context;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most entries published as one group.
const PUBLISH_GROUP_ENTRIES_MAX: usize = 4_096;
/// First pause before a failed publish is repeated; it doubles up to the maximum.
const PUBLISH_RETRY_INITIAL_MS: u64 = 50;
/// Longest pause between two repeats of a failed publish.
const PUBLISH_RETRY_MAX_MS: u64 = 1_000;

/// The publishing side of one node.
pub(super) struct Publisher {
    pub(super) jetstream: Context,
    pub(super) subject: String,
    pub(super) log: Log,
    pub(super) state: Arc<State>,
    pub(super) metrics: ClusterMetrics,
    pub(super) deadline: Duration,
}

impl Publisher {
    /// Serves the replication queue until the log closes it.
    pub(super) async fn run(self, mut appends: mpsc::Receiver<Append>) {
        while let Some(first) = appends.recv().await {
            let mut count = first.entries.len();
            let mut group = vec![first];
            while count < PUBLISH_GROUP_ENTRIES_MAX {
                match appends.try_recv() {
                    Ok(append) => {
                        count += append.entries.len();
                        group.push(append);
                    }
                    Err(_) => break,
                }
            }
            if !self.publish_group(group).await {
                // The appends queued behind a failed group come from the same clients (their
                // connections are closing now): publishing them would store a client's later
                // actions before the earlier ones it is about to re-send.
                let mut behind = Vec::new();
                while let Ok(append) = appends.try_recv() {
                    behind.push(append);
                }
                if !behind.is_empty() {
                    self.metrics.append_failures.inc_by(behind.len() as u64);
                    for append in behind {
                        append.finish(Err(LogError::Unavailable(
                            "an earlier append to the stream failed".to_owned(),
                        )));
                    }
                }
            }
        }
    }

    /// Publishes one group and answers each of its appends; false when it failed.
    async fn publish_group(&self, group: Vec<Append>) -> bool {
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut plans: Vec<Vec<Planned>> = group.iter().map(plan).collect();
        let result = self.publish_plans(&mut plans, deadline).await;
        let result = match result {
            Ok(acks) => self.settle(&acks, deadline).await.map(|()| acks),
            Err(error) => Err(error),
        };
        match result {
            Ok(acks) => {
                self.metrics
                    .append_latency
                    .observe(started.elapsed().as_secs_f64());
                for (append, acks) in group.into_iter().zip(acks) {
                    let outcomes = self.outcomes(&append, &acks);
                    append.finish(outcomes);
                }
                true
            }
            Err(error) => {
                self.metrics.append_failures.inc_by(group.len() as u64);
                tracing::warn!(%error, appends = group.len(), "the stream did not take appends before the deadline; their clients re-send");
                for append in group {
                    append.finish(Err(group_error(&error)));
                }
                false
            }
        }
    }

    /// Publishes every message of `plans`: first those that answer nothing, then the answers.
    /// Returns the acknowledgement of every message, per append.
    async fn publish_plans(
        &self,
        plans: &mut [Vec<Planned>],
        deadline: Instant,
    ) -> Result<Vec<Vec<Acked>>, LogError> {
        let mut seqs: Vec<Vec<Acked>> = plans
            .iter()
            .map(|plan| vec![Acked::default(); plan.len()])
            .collect();
        for answers in [false, true] {
            let mut batch = Vec::new();
            for (a, plan) in plans.iter_mut().enumerate() {
                for m in 0..plan.len() {
                    let Some(answered) = plan[m].answers_message else {
                        if !answers {
                            batch.push((a, m));
                        }
                        continue;
                    };
                    if !answers {
                        continue;
                    }
                    let action_seq = seqs[a][answered].seq;
                    let action_id = plan[answered]
                        .record
                        .entry
                        .as_ref()
                        .map(|entry| entry.meta.id.clone())
                        .unwrap_or_default();
                    plan[m].msg_id = answer_id(&action_id, action_seq);
                    plan[m].record.answers = Some((action_id, action_seq));
                    batch.push((a, m));
                }
            }
            let messages = batch
                .iter()
                .map(|&(a, m)| {
                    let planned = &plans[a][m];
                    let payload =
                        serde_json::to_vec(&planned.record).map_err(|error| LogError::Corrupt {
                            key: planned.msg_id.clone(),
                            reason: format!("cannot encode the stream message: {error}"),
                        })?;
                    Ok((planned.msg_id.clone(), Bytes::from(payload)))
                })
                .collect::<Result<Vec<_>, LogError>>()?;
            let published = self.publish_all(messages, deadline).await?;
            for (&(a, m), seq) in batch.iter().zip(published) {
                seqs[a][m] = seq;
            }
        }
        Ok(seqs)
    }

    /// Publishes `messages` pipelined and repeats the failed ones (same ids) until they are
    /// all acknowledged or the deadline passes.
    async fn publish_all(
        &self,
        messages: Vec<(String, Bytes)>,
        deadline: Instant,
    ) -> Result<Vec<Acked>, LogError> {
        let mut seqs = vec![Acked::default(); messages.len()];
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        let mut pause = Duration::from_millis(PUBLISH_RETRY_INITIAL_MS);
        let mut last_error = String::new();
        let mut repeated = false;
        while !pending.is_empty() {
            let mut acks = Vec::with_capacity(pending.len());
            for &i in &pending {
                let (id, payload) = &messages[i];
                let publish = PublishMessage::build()
                    .message_id(id)
                    .payload(payload.clone());
                let sent = tokio::time::timeout_at(
                    deadline,
                    self.jetstream.send_publish(self.subject.clone(), publish),
                )
                .await;
                acks.push((i, sent));
            }
            let mut failed = Vec::new();
            for (i, sent) in acks {
                let acked = match sent {
                    Ok(Ok(ack)) => match tokio::time::timeout_at(deadline, ack).await {
                        // After a repeat, `duplicate` may only mean that our own first
                        // attempt landed: then the view decides.
                        Ok(Ok(ack)) => Ok(Acked {
                            seq: ack.sequence,
                            duplicate: ack.duplicate && !repeated,
                        }),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    },
                    Ok(Err(error))
                        if error.kind() == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded =>
                    {
                        // Repeating cannot help: fail the group now.
                        return Err(LogError::Unavailable(error.to_string()));
                    }
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                };
                match acked {
                    Ok(acked) => {
                        seqs[i] = acked;
                        self.state.saw_head(acked.seq);
                    }
                    Err(error) => {
                        last_error = error;
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                self.state.set_appending(true);
                break;
            }
            self.state.set_appending(false);
            if Instant::now() + pause >= deadline {
                return Err(LogError::Unavailable(last_error));
            }
            self.metrics.append_retries.inc_by(failed.len() as u64);
            tracing::debug!(error = %last_error, failed = failed.len(), "stream publish failed; repeating");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(PUBLISH_RETRY_MAX_MS));
            pending = failed;
            repeated = true;
        }
        Ok(seqs)
    }

    /// Waits until this node's view applied every sequence of the group.
    async fn settle(&self, acks: &[Vec<Acked>], deadline: Instant) -> Result<(), LogError> {
        let last = acks
            .iter()
            .flatten()
            .map(|acked| acked.seq)
            .max()
            .unwrap_or(0);
        if last == 0 {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, self.log.durable(last)).await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable(format!(
                "this node's view did not reach sequence {last} before the deadline"
            ))),
        }
    }

    /// Each entry's outcome, read from the view: stored at its own sequence by this
    /// publish, or a duplicate of the action stored earlier (JetStream answered with the
    /// original's sequence, or the view already had the id), or of nothing when a task's
    /// result came too late.
    fn outcomes(&self, append: &Append, acks: &[Acked]) -> Result<Vec<AppendOutcome>, LogError> {
        let mut outcomes: Vec<AppendOutcome> = Vec::with_capacity(append.entries.len());
        for (entry, acked) in append.entries.iter().zip(acks) {
            let seq = acked.seq;
            let outcome = if acked.duplicate {
                AppendOutcome::Duplicate(seq)
            } else if entry.meta.fresh_id {
                match (entry.meta.answers_previous, outcomes.last()) {
                    (true, Some(&AppendOutcome::Duplicate(original))) => {
                        AppendOutcome::Duplicate(original)
                    }
                    _ => AppendOutcome::Appended(seq),
                }
            } else {
                match self.log.added_of(&entry.meta.id)? {
                    Some(added) if added == seq => AppendOutcome::Appended(seq),
                    Some(added) => AppendOutcome::Duplicate(added),
                    None => AppendOutcome::Duplicate(seq),
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

/// What JetStream answered for one published message.
#[derive(Debug, Clone, Copy, Default)]
struct Acked {
    /// The message's stream sequence (the original's, for a repeat within the window).
    seq: u64,
    /// The stream already had a message with this id.
    duplicate: bool,
}

/// The same failure for every append of a failed group. `LogError` is not `Clone` (it wraps
/// sled's error); a group fails with the variants that are, anything else is reported as
/// the stream being unavailable.
fn group_error(error: &LogError) -> LogError {
    match error {
        LogError::Unavailable(reason) => LogError::Unavailable(reason.clone()),
        LogError::Poisoned(reason) => LogError::Poisoned(reason.clone()),
        LogError::Closed => LogError::Closed,
        other => LogError::Unavailable(other.to_string()),
    }
}
