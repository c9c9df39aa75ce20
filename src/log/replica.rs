//! Cluster mode: the log as a view of a shared, ordered stream.
//!
//! In cluster mode appends do not reach the local writer: `Log::submit` hands them to the
//! replication queue (`Log::replicate`), whose owner publishes them to the stream. Every node
//! applies the stream in order (`Log::apply`): each message at its stream sequence, which
//! becomes its `added`, with the same de-duplication, indexes, tasks and object states as a
//! local append, so every node that applied a sequence holds the same log up to it.

use super::keys::task_key;
use super::writer::{encode_entry, CountedBatch, GroupEntries, Writer};
use super::{AppendOutcome, DurableHook, LogError};
use crate::action::Entry;
use std::collections::HashMap;
use tokio::sync::oneshot;

/// An append waiting for the cluster (the replication queue's item).
pub struct Append {
    /// The entries, in the caller's order (`Meta::fresh_id`, `Meta::answers_previous` set).
    pub entries: Vec<Entry>,
    /// Their task changes.
    pub tasks: Vec<super::TaskOp>,
    hook: Option<DurableHook>,
    reply: oneshot::Sender<Result<Vec<AppendOutcome>, LogError>>,
}

impl Append {
    /// An append answered through `reply` (`Log::submit` builds them; tests too).
    pub fn new(
        entries: Vec<Entry>,
        tasks: Vec<super::TaskOp>,
        hook: Option<DurableHook>,
        reply: oneshot::Sender<Result<Vec<AppendOutcome>, LogError>>,
    ) -> Append {
        Append {
            entries,
            tasks,
            hook,
            reply,
        }
    }

    /// Answers the appender: on success its hook runs first (as after a local flush).
    pub fn finish(mut self, result: Result<Vec<AppendOutcome>, LogError>) {
        if let (Ok(outcomes), Some(hook)) = (&result, self.hook.take()) {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(outcomes))).is_err() {
                tracing::error!("a durable hook of the log panicked");
            }
        }
        // An appender that stopped waiting does not need the answer.
        let _ = self.reply.send(result);
    }
}

/// A task named by queue and the `added` of its entry.
pub type TaskRef = (String, u64);

/// One message of the stream, applied at its sequence.
#[derive(Debug, Clone, Default)]
pub struct Replicated {
    /// The stream sequence: the entry's `added`.
    pub seq: u64,
    /// The entry, unless the message only changes tasks.
    pub entry: Option<Entry>,
    /// This entry answers the action with this id published at this sequence: it is stored
    /// only if that action was stored there (not a duplicate of an earlier one).
    pub answers: Option<(String, u64)>,
    /// A task created for this entry when it is stored: queue and value.
    pub task: Option<(String, Vec<u8>)>,
    /// The message belongs to a task's result: it is applied only while that task exists,
    /// so a task is finished once even when two nodes answered it.
    pub requires: Option<TaskRef>,
    /// Tasks this message finishes.
    pub done: Vec<TaskRef>,
}

/// What the writer tracks across the messages of one group.
#[derive(Default)]
pub(super) struct GroupTasks(HashMap<Vec<u8>, bool>);

impl Writer {
    /// Turns replicated messages into records of `batch`. A message at or below the applied
    /// head was applied before (a replay after a restart) and is skipped.
    pub(super) fn stage_replicated(
        &mut self,
        messages: Vec<Replicated>,
        group_ids: &mut HashMap<String, u64>,
        group_states: &mut HashMap<String, Vec<u8>>,
        group_tasks: &mut GroupTasks,
        batch: &mut CountedBatch,
        stored: &mut GroupEntries,
    ) -> Result<Vec<AppendOutcome>, LogError> {
        let mut outcomes = Vec::with_capacity(messages.len());
        for message in messages {
            if message.seq < self.next_added {
                outcomes.push(AppendOutcome::Duplicate(message.seq));
                continue;
            }
            self.next_added = message.seq + 1;
            if let Some((queue, added)) = &message.requires {
                if !self.task_exists(queue, *added, group_tasks)? {
                    outcomes.push(AppendOutcome::Duplicate(message.seq));
                    continue;
                }
            }
            let outcome = match message.entry {
                Some(entry) => self.stage_replicated_entry(
                    entry,
                    message.seq,
                    message.answers.as_ref(),
                    (group_ids, group_states),
                    batch,
                    stored,
                )?,
                None => AppendOutcome::Appended(message.seq),
            };
            if let (AppendOutcome::Appended(added), Some((queue, value))) = (outcome, message.task)
            {
                let key = task_key(&queue, added);
                batch.insert(&key, value);
                group_tasks.0.insert(key, true);
            }
            for (queue, added) in message.done {
                let key = task_key(&queue, added);
                batch.remove(&key);
                group_tasks.0.insert(key, false);
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Stages one replicated entry at `seq`, or says which stored action it duplicates.
    fn stage_replicated_entry(
        &mut self,
        mut entry: Entry,
        seq: u64,
        answers: Option<&(String, u64)>,
        (group_ids, group_states): (&mut HashMap<String, u64>, &mut HashMap<String, Vec<u8>>),
        batch: &mut CountedBatch,
        stored: &mut GroupEntries,
    ) -> Result<AppendOutcome, LogError> {
        if let Some((id, at)) = answers {
            match self.existing_added(id, group_ids)? {
                Some(added) if added == *at => {}
                Some(added) => return Ok(AppendOutcome::Duplicate(added)),
                None => return Ok(AppendOutcome::Duplicate(*at)),
            }
        }
        let fresh_id = std::mem::take(&mut entry.meta.fresh_id);
        entry.meta.answers_previous = false;
        if !fresh_id {
            if let Some(existing) = self.existing_added(&entry.meta.id, group_ids)? {
                return Ok(AppendOutcome::Duplicate(existing));
            }
        }
        entry.meta.added = seq;
        let mut states = HashMap::new();
        self.reduce(&entry, group_states, &mut states)?;
        let (json, bytes) = encode_entry(&entry)?;
        for (object, state) in states {
            batch.insert(super::keys::state_key(&object), &state);
            group_states.insert(object, state);
        }
        if !fresh_id {
            group_ids.insert(entry.meta.id.clone(), seq);
        }
        stored.push(entry, json, bytes);
        Ok(AppendOutcome::Appended(seq))
    }

    /// Whether the task is stored (or was created by this group and not finished since).
    fn task_exists(
        &self,
        queue: &str,
        added: u64,
        group_tasks: &GroupTasks,
    ) -> Result<bool, LogError> {
        let key = task_key(queue, added);
        match group_tasks.0.get(&key) {
            Some(&exists) => Ok(exists),
            None => Ok(self.shared.db.get(&key)?.is_some()),
        }
    }
}
