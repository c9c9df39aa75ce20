//! The single writer task: it owns the `added` counter and turns queued appends into group
//! commits (one sled batch and one flush for many requests).

use super::block::{encode_posting, BlockBuilder};
use super::ids::{IdChanges, NodeHeads};
use super::keys::{
    block_key, entry_json, index_prefixes, last_added_key, posting_key, setting_key, state_key,
    task_key, ADDED_LEN_BYTES,
};
use super::recent::estimated_bytes;
use super::replica::{GroupTasks, Replicated};
use super::{AppendOutcome, CommitListener, DurableHook, LogError, Shared, StateReducer, TaskOp};
use crate::action::Entry;
use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// The answer an `append` waits for.
pub(super) type Reply = oneshot::Sender<Result<Vec<AppendOutcome>, LogError>>;

/// One `append` call waiting in the writer's queue.
pub(super) struct Request {
    /// The entries to store, in the caller's order.
    pub(super) entries: Vec<Entry>,
    /// Task changes written with the entries.
    pub(super) tasks: Vec<TaskOp>,
    /// Called with the outcomes after the flush, before the commit listener.
    pub(super) hook: Option<DurableHook>,
    /// Records written with the entries (settings), and records removed (retention): every
    /// write to the store goes through this task.
    pub(super) records: RecordOps,
    /// Where the outcomes go.
    pub(super) reply: Reply,
    /// Cluster mode: messages of the shared stream to apply at their sequences (then
    /// `entries` and `tasks` are empty).
    pub(super) replicated: Vec<Replicated>,
}

/// Raw records a request writes or removes besides its entries.
#[derive(Debug, Default)]
pub(super) struct RecordOps {
    /// `(key, value)` records to insert.
    pub(super) insert: Vec<(Vec<u8>, Vec<u8>)>,
    /// Keys to remove.
    pub(super) remove: Vec<Vec<u8>>,
    /// Ids to drop from the id index, each while it still points at that `added`
    /// (retention).
    pub(super) forget_ids: Vec<(String, u64)>,
}

impl RecordOps {
    /// One settings record (`put_setting`).
    pub(super) fn setting(key: &str, value: &str) -> RecordOps {
        RecordOps {
            insert: vec![(setting_key(key), value.as_bytes().to_vec())],
            remove: Vec::new(),
            forget_ids: Vec::new(),
        }
    }

    /// Whether there is nothing to write.
    pub(super) fn is_empty(&self) -> bool {
        self.insert.is_empty() && self.remove.is_empty() && self.forget_ids.is_empty()
    }

    /// Adds the changes to `batch`, and the ids to forget to the group's `ids`.
    fn stage(self, batch: &mut CountedBatch, ids: &mut IdChanges) {
        for (key, value) in self.insert {
            batch.insert(key, value);
        }
        for key in self.remove {
            batch.remove(key);
        }
        for (id, added) in self.forget_ids {
            ids.forget(&id, added);
        }
    }
}

/// A sled batch that counts what it writes, for `ferry_log_records_written_total`.
#[derive(Default)]
pub(super) struct CountedBatch {
    batch: sled::Batch,
    written: Written,
}

/// What one group commit wrote to sled.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Records inserted or removed.
    pub records: u64,
    /// Bytes of the inserted keys and values and of the removed keys.
    pub bytes: u64,
}

impl CountedBatch {
    pub(super) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.written.records += 1;
        self.written.bytes += (key.len() + value.len()) as u64;
        self.batch.insert(key, value);
    }

    pub(super) fn remove(&mut self, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.written.records += 1;
        self.written.bytes += key.len() as u64;
        self.batch.remove(key);
    }

    pub(super) fn finish(self) -> (sled::Batch, Written) {
        (self.batch, self.written)
    }
}

/// A request whose entries were turned into records for the group's batch.
struct Staged {
    /// The outcomes, or why this request alone failed before anything was written.
    result: Result<Vec<AppendOutcome>, LogError>,
    /// The caller's hook, called only when the group commit succeeds.
    hook: Option<DurableHook>,
    /// Where the outcomes go.
    reply: Reply,
}

/// Groups applied to sled and waiting for the flush that makes them durable.
const FLUSH_QUEUE_GROUPS_MAX: usize = 4;

/// One applied group on its way to the flusher.
struct Applied {
    staged: Vec<Staged>,
    stored: Vec<Arc<Entry>>,
    /// Estimated memory of each stored entry, for the window of recent entries.
    stored_bytes: Vec<usize>,
    /// What the batch wrote; a group that wrote nothing needs no flush.
    written: Written,
    /// Whether `last_added` moved (entries stored, or replicated messages applied).
    moved: bool,
    last_added: u64,
    started: std::time::Instant,
}

/// Durable groups waiting for the delivery task (the commit listener, then the replies).
const DELIVERY_QUEUE_GROUPS_MAX: usize = 64;

/// Flushes applied groups, then answers them in order: head and hooks (`synced`) on its own
/// task, then the listener (delivery to subscribers) and the replies on the delivery task, so
/// that a large fan-out does not hold up the next group's flush and acknowledgements.
struct Flusher {
    shared: Arc<Shared>,
    listener: Arc<dyn CommitListener>,
    receiver: mpsc::Receiver<Applied>,
    deliveries: mpsc::Sender<Durable>,
}

/// A durable group on its way to the delivery task.
struct Durable {
    /// The entries it stored, for the commit listener.
    stored: Vec<Arc<Entry>>,
    /// Its requests, whose hooks already ran: only the replies are left.
    staged: Vec<Staged>,
}

/// Calls the commit listener for each durable group, in order, then answers its appenders.
async fn deliver(listener: Arc<dyn CommitListener>, mut groups: mpsc::Receiver<Durable>) {
    while let Some(Durable { stored, staged }) = groups.recv().await {
        if !stored.is_empty()
            && catch_unwind(AssertUnwindSafe(|| listener.committed(&stored))).is_err()
        {
            tracing::error!("the commit listener of the log panicked");
        }
        for request in staged {
            let _ = request.reply.send(request.result);
        }
    }
}

impl Flusher {
    async fn run(mut self) {
        while let Some(first) = self.receiver.recv().await {
            let mut groups = vec![first];
            while let Ok(more) = self.receiver.try_recv() {
                groups.push(more);
            }
            #[cfg(test)]
            self.wait_for_gate().await;
            let failure = if let Some(reason) = self.shared.poison_reason() {
                Some(reason)
            } else if groups.iter().any(|group| group.written.records > 0) {
                // One flush makes every group applied so far durable.
                match super::flush(&self.shared.db).await {
                    Ok(()) => None,
                    Err(error) => {
                        let reason = error.to_string();
                        tracing::error!(error = %reason, "log flush failed; the log refuses further writes");
                        self.shared.poison(&reason);
                        self.listener.write_failed(&reason);
                        Some(reason)
                    }
                }
            } else {
                None
            };
            for group in groups {
                match &failure {
                    Some(reason) => {
                        for request in group.staged {
                            let _ = request.reply.send(Err(LogError::Poisoned(reason.clone())));
                        }
                    }
                    None => self.answer(group).await,
                }
            }
        }
    }

    /// Test hook: waits for a permit of the flush gate, when a test set one.
    #[cfg(test)]
    async fn wait_for_gate(&self) {
        let gate = self
            .shared
            .flush_gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(gate) = gate {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
    }

    /// The group is durable: move the head, run the hooks, and hand it to the delivery task.
    async fn answer(&self, group: Applied) {
        let Applied {
            mut staged,
            stored,
            stored_bytes,
            last_added,
            started,
            written,
            moved,
        } = group;
        if written.records > 0 {
            self.listener.records_written(written);
        }
        if !stored.is_empty() {
            self.listener.flushed(stored.len(), started.elapsed());
            // Before the head moves: retention never removes above the head, so it cannot
            // have removed these yet.
            self.shared.recent.push(&stored, &stored_bytes);
            self.shared.group_commits.fetch_add(1, Ordering::Relaxed);
        }
        if moved {
            self.shared.advance_head(last_added);
        }
        for request in &mut staged {
            if let (Ok(outcomes), Some(hook)) = (&request.result, request.hook.take()) {
                if catch_unwind(AssertUnwindSafe(|| hook(outcomes))).is_err() {
                    tracing::error!("a durable hook of the log panicked");
                }
            }
        }
        if let Err(mpsc::error::SendError(group)) =
            self.deliveries.send(Durable { stored, staged }).await
        {
            // The delivery task only stops after the flusher: answer anyway.
            for request in group.staged {
                let _ = request.reply.send(request.result);
            }
        }
    }
}

/// Adds one successful request's task changes to `batch`. A task is only created for an
/// entry stored by this request, never for a duplicate.
fn stage_tasks(tasks: Vec<TaskOp>, outcomes: &[AppendOutcome], batch: &mut CountedBatch) {
    for task in tasks {
        match task {
            TaskOp::Add {
                queue,
                entry,
                value,
            } => {
                if let Some(AppendOutcome::Appended(added)) = outcomes.get(entry) {
                    batch.insert(task_key(&queue, *added), value);
                }
            }
            TaskOp::Done { queue, added } => batch.remove(task_key(&queue, added)),
        }
    }
}

/// The entry as stored (JSON with `meta.added` set) and its estimated memory in the window
/// of recent entries.
pub(super) fn encode_entry(entry: &Entry) -> Result<(Vec<u8>, usize), LogError> {
    let json = entry_json(entry).map_err(|error| LogError::Corrupt {
        key: entry.meta.id.clone(),
        reason: format!("cannot encode the entry: {error}"),
    })?;
    let bytes = estimated_bytes(json.len());
    Ok((json, bytes))
}

/// The entries one group commit stores, in `added` order.
#[derive(Default)]
pub(super) struct GroupEntries {
    /// The decoded entries, for the listener and the window of recent entries.
    entries: Vec<Arc<Entry>>,
    /// Estimated memory of each, for the window.
    bytes: Vec<usize>,
    /// Each one's stored JSON.
    json: Vec<Vec<u8>>,
}

impl GroupEntries {
    /// Adds an entry the group stores (above every entry added before).
    pub(super) fn push(&mut self, mut entry: Entry, json: Vec<u8>, bytes: usize) {
        // Readers of stored entries send their text; few ever need the value again.
        entry.keep_json_only();
        self.entries.push(Arc::new(entry));
        self.bytes.push(bytes);
        self.json.push(json);
    }

    /// Writes the group's blocks and one posting per indexed name to `batch`, and returns the
    /// decoded entries with their estimated sizes.
    fn stage(
        self,
        (entries_max, bytes_max): (usize, usize),
        batch: &mut CountedBatch,
    ) -> (Vec<Arc<Entry>>, Vec<usize>) {
        let mut blocks = BlockBuilder::new(entries_max, bytes_max);
        // Posting prefixes in the order first seen, so the batch is the same on every node.
        let mut postings: Vec<(Vec<u8>, Vec<u64>)> = Vec::new();
        let mut posting_of: HashMap<Vec<u8>, usize> = HashMap::new();
        for (entry, json) in self.entries.iter().zip(&self.json) {
            let added = entry.meta.added;
            blocks.push(added, json);
            for prefix in index_prefixes(entry) {
                match posting_of.get(&prefix) {
                    Some(&index) => postings[index].1.push(added),
                    None => {
                        posting_of.insert(prefix.clone(), postings.len());
                        postings.push((prefix, vec![added]));
                    }
                }
            }
        }
        for (first, value) in blocks.finish() {
            batch.insert(block_key(first), value);
        }
        for (prefix, positions) in postings {
            batch.insert(
                posting_key(&prefix, positions[0]),
                encode_posting(&positions),
            );
        }
        (self.entries, self.bytes)
    }
}

/// State of the writer task.
pub(super) struct Writer {
    /// The storage shared with the readers.
    pub(super) shared: Arc<Shared>,
    /// The queue of appends.
    pub(super) receiver: mpsc::Receiver<Request>,
    /// Told about every group commit.
    pub(super) listener: Arc<dyn CommitListener>,
    /// Keeps object states in the same batches as the entries.
    pub(super) reducer: Option<Arc<dyn StateReducer>>,
    /// The `added` the next new entry gets.
    pub(super) next_added: u64,
    /// Most entries gathered into one group commit.
    pub(super) group_entries_max: usize,
    /// Most entries, and the bytes after which a block is closed, of one block.
    pub(super) block_limits: (usize, usize),
    /// Each node's newest stored id, read at most once per group commit.
    pub(super) node_heads: RefCell<NodeHeads>,
}

impl Writer {
    /// Serves the queue until every sender is gone, then reports through `stopped`.
    pub(super) async fn run(mut self, stopped: watch::Sender<bool>) {
        let (to_flusher, from_writer) = mpsc::channel(FLUSH_QUEUE_GROUPS_MAX);
        let (to_delivery, deliveries) = mpsc::channel(DELIVERY_QUEUE_GROUPS_MAX);
        let delivering = tokio::spawn(deliver(Arc::clone(&self.listener), deliveries));
        let flusher = Flusher {
            shared: Arc::clone(&self.shared),
            listener: Arc::clone(&self.listener),
            receiver: from_writer,
            deliveries: to_delivery,
        };
        let flushing = tokio::spawn(flusher.run());
        while let Some(first) = self.receiver.recv().await {
            let group = self.gather(first);
            self.commit(group, &to_flusher).await;
        }
        drop(to_flusher);
        // The flusher answers everything already applied before the writer reports a stop.
        let _ = flushing.await;
        let _ = delivering.await;
        // The storage must be released before `close` returns, so that the directory can be
        // opened again right away: sled holds a file lock while any handle is alive.
        drop(self);
        // Nobody waiting for the stop is fine: then nobody needs to know.
        let _ = stopped.send(true);
    }

    /// Takes the requests that are already queued behind `first`, up to the entry limit.
    fn gather(&mut self, first: Request) -> Vec<Request> {
        let mut count = first.entries.len();
        let mut group = vec![first];
        while count < self.group_entries_max {
            match self.receiver.try_recv() {
                Ok(request) => {
                    count += request.entries.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        group
    }

    /// Stages and applies one group, then hands it to the flusher, so that the next group is
    /// prepared while this one is being flushed (the CPU work of a group overlaps the disk
    /// work of the previous one).
    async fn commit(&mut self, group: Vec<Request>, flusher: &mpsc::Sender<Applied>) {
        if let Some(reason) = self.shared.poison_reason() {
            for request in group {
                // A caller that stopped waiting does not need the answer.
                let _ = request.reply.send(Err(LogError::Poisoned(reason.clone())));
            }
            return;
        }

        self.node_heads.get_mut().clear();
        let mut batch = CountedBatch::default();
        let mut group_ids = HashMap::new();
        let mut group_states = HashMap::new();
        let mut group_tasks = GroupTasks::default();
        let mut stored = GroupEntries::default();
        let mut id_changes = IdChanges::default();
        let mut staged = Vec::with_capacity(group.len());
        let next_before = self.next_added;
        for request in group {
            let result = if request.replicated.is_empty() {
                self.stage(
                    request.entries,
                    &mut group_ids,
                    &mut group_states,
                    &mut batch,
                    &mut stored,
                )
            } else {
                self.stage_replicated(
                    request.replicated,
                    &mut group_ids,
                    &mut group_states,
                    &mut group_tasks,
                    &mut batch,
                    &mut stored,
                )
            };
            if let Ok(outcomes) = &result {
                stage_tasks(request.tasks, outcomes, &mut batch);
                request.records.stage(&mut batch, &mut id_changes);
            }
            staged.push(Staged {
                result,
                hook: request.hook,
                reply: request.reply,
            });
        }

        let (stored, stored_bytes) = stored.stage(self.block_limits, &mut batch);
        for (id, added) in group_ids {
            id_changes.store(&id, added);
        }
        let ids_staged = id_changes.stage(&self.shared.db, &mut batch);
        let started = std::time::Instant::now();
        let last_added = self.next_added.saturating_sub(1);
        let moved = self.next_added > next_before;
        if moved {
            batch.insert(last_added_key(), last_added.to_be_bytes());
        }
        let mut written = Written::default();
        // Anything staged (entries, tasks, settings, removals) must be written and flushed.
        if batch.written.records > 0 || ids_staged.is_err() {
            let batch = {
                let (batch, counted) = batch.finish();
                written = counted;
                batch
            };
            // The id index could not be read: writing the group without it would lose
            // de-duplication, so it fails as a failed write does.
            let applied = ids_staged.and_then(|()| Ok(self.shared.db.apply_batch(batch)?));
            if let Err(error) = applied {
                let reason = error.to_string();
                tracing::error!(error = %reason, "log write failed; the log refuses further writes");
                self.shared.poison(&reason);
                self.listener.write_failed(&reason);
                for request in staged {
                    let _ = request.reply.send(Err(LogError::Poisoned(reason.clone())));
                }
                return;
            }
        }
        let applied = Applied {
            staged,
            stored,
            stored_bytes,
            written,
            moved,
            last_added,
            started,
        };
        if let Err(mpsc::error::SendError(applied)) = flusher.send(applied).await {
            // The flusher only stops after the writer; answer rather than leave callers hanging.
            for request in applied.staged {
                let _ = request.reply.send(Err(LogError::Closed));
            }
        }
    }

    /// Turns one request's entries into records of `batch`.
    ///
    /// Entries whose id is already stored, or appears earlier in the group, become duplicates.
    /// When anything fails, this request leaves no trace: its numbers are handed out again and
    /// its records are not added to the batch.
    fn stage(
        &mut self,
        entries: Vec<Entry>,
        group_ids: &mut HashMap<String, u64>,
        group_states: &mut HashMap<String, Vec<u8>>,
        batch: &mut CountedBatch,
        stored: &mut GroupEntries,
    ) -> Result<Vec<AppendOutcome>, LogError> {
        let first_added = self.next_added;
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut fresh = Vec::new();
        // States changed by this request; merged into the group's only if it succeeds.
        let mut states: HashMap<String, Vec<u8>> = HashMap::new();
        let mut result = Ok(());
        for mut entry in entries {
            // Not stored: the entry readers get back from the window must equal the decoded one.
            let fresh_id = std::mem::take(&mut entry.meta.fresh_id);
            if std::mem::take(&mut entry.meta.answers_previous) {
                // The action this answers is a duplicate: so is its answer (the original's
                // answer is stored with the original).
                if let Some(&AppendOutcome::Duplicate(original)) = outcomes.last() {
                    outcomes.push(AppendOutcome::Duplicate(original));
                    continue;
                }
            }
            if !fresh_id {
                match self.existing_added(&entry.meta.id, group_ids) {
                    Ok(Some(existing)) => {
                        outcomes.push(AppendOutcome::Duplicate(existing));
                        continue;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                }
            }
            let added = self.next_added;
            entry.meta.added = added;
            let (json, bytes) = match encode_entry(&entry) {
                Ok(encoded) => encoded,
                Err(error) => {
                    result = Err(error);
                    break;
                }
            };
            if let Err(error) = self.reduce(&entry, group_states, &mut states) {
                result = Err(error);
                break;
            }
            if !fresh_id {
                group_ids.insert(entry.meta.id.clone(), added);
            }
            // A u64 counter that grows by one per stored entry does not overflow in practice.
            self.next_added += 1;
            outcomes.push(AppendOutcome::Appended(added));
            fresh.push((entry, json, bytes));
        }
        if let Err(error) = result {
            self.next_added = first_added;
            for (entry, _, _) in &fresh {
                group_ids.remove(&entry.meta.id);
            }
            return Err(error);
        }
        for (object, state) in states {
            batch.insert(state_key(&object), state.clone());
            group_states.insert(object, state);
        }
        for (entry, json, bytes) in fresh {
            stored.push(entry, json, bytes);
        }
        Ok(outcomes)
    }

    /// Applies the reducer to one entry; the new state record (added + state) goes to
    /// `states`, on top of what this group already changed.
    pub(super) fn reduce(
        &self,
        entry: &Entry,
        group_states: &HashMap<String, Vec<u8>>,
        states: &mut HashMap<String, Vec<u8>>,
    ) -> Result<(), LogError> {
        let Some(reducer) = &self.reducer else {
            return Ok(());
        };
        let Some(object) = reducer.object_key(entry) else {
            return Ok(());
        };
        let current = match states.get(&object).or_else(|| group_states.get(&object)) {
            Some(record) => Some(record.clone()),
            None => self
                .shared
                .db
                .get(state_key(&object))?
                .map(|value| value.to_vec()),
        };
        let previous = current
            .as_deref()
            .and_then(|record| record.get(ADDED_LEN_BYTES..));
        if let Some(state) = reducer.reduce(&object, previous, entry) {
            let mut record = Vec::with_capacity(ADDED_LEN_BYTES + state.len());
            record.extend_from_slice(&entry.meta.added.to_be_bytes());
            record.extend_from_slice(&state);
            states.insert(object, record);
        }
        Ok(())
    }

    /// The position of `id` when it is already in this group or stored.
    pub(super) fn existing_added(
        &self,
        id: &str,
        group_ids: &HashMap<String, u64>,
    ) -> Result<Option<u64>, LogError> {
        match group_ids.get(id) {
            Some(&added) => Ok(Some(added)),
            None => self.stored_added(id),
        }
    }

    /// The position of an already stored id.
    fn stored_added(&self, id: &str) -> Result<Option<u64>, LogError> {
        self.node_heads.borrow_mut().lookup(&self.shared.db, id)
    }
}
