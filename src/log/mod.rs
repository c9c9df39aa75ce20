//! The durable, append-only action log on sled.
//!
//! All records live in one sled tree under one-byte key prefixes (see `keys`), so that every
//! group commit is a single crash-atomic `apply_batch`. A group's entries are packed into a
//! few blocks and its index positions into one posting per name (see `block`), so a client
//! action costs about one sled record (its id) plus a share of its group's. One writer task owns the `added`
//! counter: `append` queues a request, the writer gathers the queued requests into a group,
//! writes them with one batch and one flush, and only then moves `head`, calls the hooks, the
//! commit listener and answers the callers. Readers go to sled directly and never see entries
//! above `head`, so they only ever return durable entries.

mod block;
mod ids;
mod keys;
mod recent;
mod replica;
mod writer;

#[cfg(test)]
mod tests;

use crate::action::Entry;
use block::{decode_posting, encode_block, encode_posting, Block};
use keys::{
    block_key, channel_head, decode_added, decode_entry, format_key, index_prefixes,
    last_added_key, posting_key, posting_prefix, setting_key, target_head, TargetKind,
    BLOCK_PREFIX, FORMAT_1_ENTRY_PREFIX, FORMAT_VERSION,
};
use recent::RecentEntries;
pub use replica::{Append, Replicated, TaskRef};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
pub use writer::Written;
use writer::{RecordOps, Request, Writer};

/// Entries after which one retention batch stops taking blocks, so that retention never
/// builds a huge batch (it may exceed this by one block).
const REMOVE_BATCH_ENTRIES: usize = 1_024;
/// Default most entries in one block.
pub const BLOCK_ENTRIES_MAX_DEFAULT: usize = 256;
/// Default bytes of entry JSON after which a block is closed.
pub const BLOCK_BYTES_MAX_DEFAULT: usize = 8 * 1024;
/// How long `open` waits for the directory lock: after `close`, sled's background threads
/// may hold the lock of the same directory for a moment, and reopening in the same process
/// (tests, restarts of the server inside one process) must not fail because of that.
const OPEN_LOCK_WAIT_MS: u64 = 2_000;
/// Pause between two attempts to take the directory lock.
const OPEN_LOCK_RETRY_MS: u64 = 5;

/// Errors of the log layer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// sled failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The key of the record, printable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A flush failed earlier; the log refuses writes until restart (fjall-style poisoning).
    #[error("log is poisoned after a failed flush: {0}")]
    Poisoned(String),
    /// The writer task is gone (shutdown).
    #[error("log writer stopped")]
    Closed,
    /// The data directory was written in a log format this version does not read.
    #[error("{0}")]
    UnsupportedFormat(String),
    /// Cluster mode: the shared stream did not take the append before its deadline (the
    /// client keeps its actions and re-sends them).
    #[error("the cluster stream is unavailable: {0}")]
    Unavailable(String),
}

/// Default size of sled's page cache (`[limits] log_cache_bytes` uses it too). Since log
/// format 3 a 15,000 x 20 storm writes about 93,000 records; with 128 MiB it took the same
/// server CPU as with 512 MiB (15.3 s against 15.2-16.2 s) at 691 MB peak RSS instead of
/// 765-780 MB, and with 64 MiB 15.6 s at 666 MB (bench/README, 2026-12-03 format 3).
pub const CACHE_BYTES_DEFAULT: u64 = 128 * 1024 * 1024;
/// Default memory budget of the newest entries kept in memory (see `recent`).
pub const RECENT_BYTES_DEFAULT: usize = 64 * 1024 * 1024;

/// What happened to one entry of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored at this position.
    Appended(u64),
    /// An entry with the same id was already stored at this position (or earlier in the batch),
    /// or the entry answers (`Meta::answers_previous`) an action that was such a duplicate:
    /// then this is the position of that action. Nothing was stored for it.
    Duplicate(u64),
}

/// Called by the writer, once per group commit, after the flush, in `added` order.
pub trait CommitListener: Send + Sync + 'static {
    /// Entries stored by this group commit (duplicates excluded), ordered by `added`.
    fn committed(&self, entries: &[Arc<Entry>]);

    /// One group commit wrote `entries` and its batch and flush took `elapsed` (metrics).
    fn flushed(&self, _entries: usize, _elapsed: std::time::Duration) {}

    /// One durable group commit wrote these sled records (metrics: records per action).
    fn records_written(&self, _written: Written) {}

    /// A write or flush failed and the log is now poisoned (metrics and alerts).
    fn write_failed(&self, _reason: &str) {}

    /// A reader asked for the entry at one position: `true` when the window of recent
    /// entries had it, `false` when it went to storage (metrics: sizes `log_recent_bytes`).
    fn recent_read(&self, _hit: bool) {}
}

/// Keeps per-object state next to the log: the writer calls it for every stored entry, in
/// `added` order, and writes the new state in the same batch as the entry, so state and log
/// never disagree after a crash.
pub trait StateReducer: Send + Sync + 'static {
    /// The key of the object whose state `entry` updates, if any.
    fn object_key(&self, entry: &Entry) -> Option<String>;

    /// The object's new state after `entry` (`state` is `None` for a new object), or `None`
    /// to leave it unchanged.
    fn reduce(&self, key: &str, state: Option<&[u8]>, entry: &Entry) -> Option<Vec<u8>>;
}

/// An object's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState {
    /// The object key.
    pub key: String,
    /// Position of the last entry applied to it: the state includes every entry of the
    /// object up to here.
    pub added: u64,
    /// The reducer's state bytes.
    pub state: Vec<u8>,
}

/// A change to the durable tasks (pending back-end work), written in the same batch as the
/// entries of its append, so a task and the entries it belongs to never disagree after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOp {
    /// A task in `queue` for the entry at index `entry` of this append, holding `value`;
    /// only written when that entry is stored (not a duplicate).
    Add {
        /// The queue (tasks of one queue are read in `added` order).
        queue: String,
        /// Index of the entry in the append.
        entry: usize,
        /// The caller's bytes.
        value: Vec<u8>,
    },
    /// Removes the task of `queue` for the entry at `added`.
    Done {
        /// The queue.
        queue: String,
        /// The entry's position.
        added: u64,
    },
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Its queue.
    pub queue: String,
    /// Position of the entry it belongs to.
    pub added: u64,
    /// The bytes given with `TaskOp::Add`.
    pub value: Vec<u8>,
}

/// Called after the flush and before the `CommitListener`, with this request's outcomes.
pub type DurableHook = Box<dyn FnOnce(&[AppendOutcome]) + Send>;

/// An append queued by `Log::submit`; `outcomes` waits until it is durable (or failed).
/// Awaiting `&mut` of it through `wait` does not consume it, so it can be raced safely.
#[derive(Debug)]
pub struct PendingAppend(tokio::sync::oneshot::Receiver<Result<Vec<AppendOutcome>, LogError>>);

impl PendingAppend {
    /// The outcomes, once the append is durable.
    pub async fn outcomes(mut self) -> Result<Vec<AppendOutcome>, LogError> {
        self.wait().await
    }

    /// Like `outcomes`, by reference: cancelling it loses nothing. Not to be called again
    /// once it has returned.
    pub async fn wait(&mut self) -> Result<Vec<AppendOutcome>, LogError> {
        (&mut self.0).await.map_err(|_| LogError::Closed)?
    }
}

/// Tunables of the log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Most entries written in one group commit.
    pub group_commit_entries_max: usize,
    /// Capacity of the writer's request queue.
    pub writer_queue_len: usize,
    /// Bytes of sled's page cache (sled's own default is 1 GiB, too much for small hosts).
    pub cache_bytes: u64,
    /// Memory budget, in estimated bytes, of the newest entries kept in memory, which readers
    /// get without sled; 0 turns the window off.
    pub recent_bytes: usize,
    /// Most entries in one stored block.
    pub block_entries_max: usize,
    /// Bytes of entry JSON after which a block is closed (a larger entry gets its own).
    pub block_bytes_max: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            group_commit_entries_max: 10_000,
            writer_queue_len: 4_096,
            cache_bytes: CACHE_BYTES_DEFAULT,
            recent_bytes: RECENT_BYTES_DEFAULT,
            block_entries_max: BLOCK_ENTRIES_MAX_DEFAULT,
            block_bytes_max: BLOCK_BYTES_MAX_DEFAULT,
        }
    }
}

/// The storage and counters shared by the handles and the writer task.
struct Shared {
    /// The sled database; its default tree holds every record.
    db: sled::Db,
    /// Highest durable `added`; readers never look above it.
    head: AtomicU64,
    /// The same head, for readers that wait for a position to become durable. Also woken
    /// (unchanged) when the log is poisoned or its writer stops, so no waiter hangs.
    head_changed: watch::Sender<u64>,
    /// Test hook: when set, the flusher takes one permit before each flush, so a test can
    /// hold applied groups between their write and their flush.
    #[cfg(test)]
    flush_gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Number of group commits that wrote entries, to observe batching.
    group_commits: AtomicU64,
    /// Why the log refuses writes, once a write failed.
    poison: Mutex<Option<String>>,
    /// The newest durable entries, kept in memory.
    recent: RecentEntries,
    /// Told whether reads found their entry in `recent`.
    listener: Arc<dyn CommitListener>,
}

impl Shared {
    /// The reason the log is poisoned, if it is.
    fn poison_reason(&self) -> Option<String> {
        self.poison
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the log refuse writes from now on; the first reason wins. Wakes the readers
    /// waiting for positions that will now never become durable.
    fn poison(&self, reason: &str) {
        {
            let mut poison = self.poison.lock().unwrap_or_else(PoisonError::into_inner);
            if poison.is_none() {
                *poison = Some(reason.to_owned());
            }
        }
        self.head_changed.send_modify(|_| {});
    }

    /// Moves the durable head up to `added` and wakes its waiters.
    fn advance_head(&self, added: u64) {
        self.head.fetch_max(added, Ordering::AcqRel);
        self.head_changed.send_if_modified(|head| {
            let moved = added > *head;
            *head = (*head).max(added);
            moved
        });
    }

    /// The entry stored at `added`, if it is still there.
    fn entry_at(&self, added: u64) -> Result<Option<Arc<Entry>>, LogError> {
        self.entry_through(added, &mut None)
    }

    /// Like `entry_at`, keeping the last block read in `cursor` for the next position.
    fn entry_through(
        &self,
        added: u64,
        cursor: &mut Option<CachedBlock>,
    ) -> Result<Option<Arc<Entry>>, LogError> {
        if let Some(entry) = self.recent.get(added) {
            self.listener.recent_read(true);
            return Ok(Some(entry));
        }
        self.listener.recent_read(false);
        let covered = cursor
            .as_ref()
            .is_some_and(|cached| cached.first <= added && added <= cached.last);
        if !covered {
            *cursor = self.block_holding(added)?;
        }
        let Some(cached) = cursor.as_ref() else {
            return Ok(None);
        };
        match cached.block.get(added)? {
            Some(json) => Ok(Some(Arc::new(decode_entry(cached.block.key(), json)?))),
            None => Ok(None),
        }
    }

    /// The block that would hold `added`: the last one starting at or before it.
    fn block_holding(&self, added: u64) -> Result<Option<CachedBlock>, LogError> {
        match self.db.range(block_key(0)..=block_key(added)).next_back() {
            Some(item) => {
                let (key, value) = item?;
                let first = keys::added_suffix(&key)?;
                let block = Block::new(&key, value)?;
                let last = block.last();
                Ok(Some(CachedBlock { first, last, block }))
            }
            None => Ok(None),
        }
    }

    /// The positions recorded in index `head` for `name` with `from <= added <= to`, in
    /// `order`. Names that cannot be indexed have no positions.
    fn index_positions(
        &self,
        head: &[u8],
        name: &str,
        (from, to): (u64, u64),
        order: Order,
    ) -> Box<dyn Iterator<Item = Result<u64, LogError>>> {
        let Some(prefix) = posting_prefix(head, name) else {
            return Box::new(std::iter::empty());
        };
        if from > to {
            return Box::new(std::iter::empty());
        }
        // The posting holding `from` may start below it: the last one starting at or before.
        let lower = match self
            .db
            .range(posting_key(&prefix, 0)..=posting_key(&prefix, from))
            .next_back()
        {
            Some(Ok((key, _))) => key.to_vec(),
            Some(Err(error)) => return Box::new(std::iter::once(Err(error.into()))),
            None => posting_key(&prefix, from),
        };
        let postings = self.db.range(lower..=posting_key(&prefix, to));
        let in_range = move |item: sled::Result<(sled::IVec, sled::IVec)>| {
            let positions = item
                .map_err(LogError::from)
                .and_then(|(key, value)| decode_posting(&key, &value));
            match positions {
                Ok(positions) => positions
                    .into_iter()
                    .filter(|added| (from..=to).contains(added))
                    .map(Ok)
                    .collect(),
                Err(error) => vec![Err(error)],
            }
        };
        match order {
            Order::Ascending => Box::new(postings.flat_map(in_range)),
            Order::Descending => Box::new(
                postings
                    .rev()
                    .flat_map(move |item| in_range(item).into_iter().rev()),
            ),
        }
    }

    /// Loads the entries at `positions` in their order, skipping the ones retention removed,
    /// until `limit` entries are found.
    fn load(
        &self,
        positions: impl Iterator<Item = Result<u64, LogError>>,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, LogError> {
        let mut entries = Vec::new();
        if limit == 0 {
            return Ok(entries);
        }
        let mut cursor = None;
        for added in positions {
            if let Some(entry) = self.entry_through(added?, &mut cursor)? {
                entries.push(entry);
                if entries.len() >= limit {
                    break;
                }
            }
        }
        Ok(entries)
    }
}

/// The direction positions come out of an index.
#[derive(Debug, Clone, Copy)]
enum Order {
    Ascending,
    Descending,
}

/// A block read for a run of positions, with the range of positions it holds.
struct CachedBlock {
    first: u64,
    last: u64,
    block: Block<sled::IVec>,
}

/// The per-log state behind the cheap `Log` handles.
struct Inner {
    /// Storage and counters, also held by the writer.
    shared: Arc<Shared>,
    /// The writer's queue; `None` once `close` stopped accepting appends.
    sender: Mutex<Option<mpsc::Sender<Request>>>,
    /// Cluster mode: where appends go instead of the writer (`Log::replicate`).
    appends: Mutex<Option<mpsc::Sender<Append>>>,
    /// Becomes `true` when the writer has finished and released the storage.
    stopped: watch::Receiver<bool>,
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct Log {
    /// The shared state of all handles of this log.
    inner: Arc<Inner>,
}

impl Log {
    /// Opens (or creates) the log in `dir` and starts its writer task.
    ///
    /// Must be called inside a tokio runtime; outside one it returns `LogError::Closed`
    /// because the writer cannot start.
    pub fn open(
        dir: &Path,
        options: LogOptions,
        listener: Arc<dyn CommitListener>,
    ) -> Result<Log, LogError> {
        Log::open_with_reducer(dir, options, listener, None)
    }

    /// Like `open`, with a reducer that keeps object states in the same writes as the log.
    pub fn open_with_reducer(
        dir: &Path,
        options: LogOptions,
        listener: Arc<dyn CommitListener>,
        reducer: Option<Arc<dyn StateReducer>>,
    ) -> Result<Log, LogError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|error| {
            tracing::error!(%error, "the log must be opened inside a tokio runtime");
            LogError::Closed
        })?;
        let db = open_db(dir, options.cache_bytes)?;
        check_format(&db, dir)?;
        let last_added = {
            let key = last_added_key();
            match db.get(&key)? {
                Some(value) => decode_added(&key, &value)?,
                None => 0,
            }
        };
        let highest_entry = match db.scan_prefix([BLOCK_PREFIX]).next_back() {
            Some(item) => {
                let (key, value) = item?;
                Block::new(&key, value)?.last()
            }
            None => 0,
        };
        let head = last_added.max(highest_entry);
        let shared = Arc::new(Shared {
            db,
            head: AtomicU64::new(head),
            head_changed: watch::Sender::new(head),
            #[cfg(test)]
            flush_gate: Mutex::new(None),
            group_commits: AtomicU64::new(0),
            poison: Mutex::new(None),
            recent: RecentEntries::new(options.recent_bytes),
            listener: Arc::clone(&listener),
        });
        let (sender, receiver) = mpsc::channel(options.writer_queue_len.max(1));
        let (stopped_sender, stopped) = watch::channel(false);
        let writer = Writer {
            shared: Arc::clone(&shared),
            receiver,
            listener,
            reducer,
            next_added: head + 1,
            group_entries_max: options.group_commit_entries_max.max(1),
            block_limits: (options.block_entries_max.max(1), options.block_bytes_max),
            node_heads: Default::default(),
        };
        runtime.spawn(writer.run(stopped_sender));
        Ok(Log {
            inner: Arc::new(Inner {
                shared,
                sender: Mutex::new(Some(sender)),
                appends: Mutex::new(None),
                stopped,
            }),
        })
    }

    /// Appends entries durably in one group commit, assigning `meta.added`.
    ///
    /// Returns one outcome per entry, in the given order. The hook runs only when the append
    /// succeeds. After `close` this returns `LogError::Closed`; after a failed write it
    /// returns `LogError::Poisoned`.
    pub async fn append(
        &self,
        entries: Vec<Entry>,
        hook: Option<DurableHook>,
    ) -> Result<Vec<AppendOutcome>, LogError> {
        self.append_with_tasks(entries, Vec::new(), hook).await
    }

    /// Like `append`, with task changes written in the same crash-atomic batch.
    pub async fn append_with_tasks(
        &self,
        entries: Vec<Entry>,
        tasks: Vec<TaskOp>,
        hook: Option<DurableHook>,
    ) -> Result<Vec<AppendOutcome>, LogError> {
        self.submit(entries, tasks, hook).await?.outcomes().await
    }

    /// Queues an append in the writer and returns as soon as it is queued, without waiting
    /// for it to be durable. Appends are stored, and their hooks called, in the order they
    /// were queued, so one caller may keep several in flight.
    pub async fn submit(
        &self,
        entries: Vec<Entry>,
        tasks: Vec<TaskOp>,
        hook: Option<DurableHook>,
    ) -> Result<PendingAppend, LogError> {
        let sender = self.sender()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let replicated = self
            .inner
            .appends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(appends) = replicated {
            let append = Append::new(entries, tasks, hook, reply);
            appends.send(append).await.map_err(|_| LogError::Closed)?;
            return Ok(PendingAppend(answer));
        }
        let request = Request {
            entries,
            tasks,
            hook,
            records: RecordOps::default(),
            reply,
            replicated: Vec::new(),
        };
        sender.send(request).await.map_err(|_| LogError::Closed)?;
        Ok(PendingAppend(answer))
    }

    /// Cluster mode: from now on appends go to the returned queue (whose owner publishes
    /// them to the shared stream and answers them) instead of the local writer, which then
    /// only applies the stream (`apply`), settings and retention.
    pub fn replicate(&self, queue_len: usize) -> mpsc::Receiver<Append> {
        let (sender, receiver) = mpsc::channel(queue_len.max(1));
        *self
            .inner
            .appends
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sender);
        receiver
    }

    /// Cluster mode: applies messages of the shared stream at their sequences (ascending),
    /// in the writer's next group commit; the head moves to the last one once durable.
    pub async fn apply(&self, messages: Vec<Replicated>) -> Result<PendingAppend, LogError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = Request {
            entries: Vec::new(),
            tasks: Vec::new(),
            hook: None,
            records: RecordOps::default(),
            reply,
            replicated: messages,
        };
        self.sender()?
            .send(request)
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(PendingAppend(answer))
    }

    /// The writer's queue, while the log accepts writes.
    fn sender(&self) -> Result<mpsc::Sender<Request>, LogError> {
        if let Some(reason) = self.inner.shared.poison_reason() {
            return Err(LogError::Poisoned(reason));
        }
        self.inner
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(LogError::Closed)
    }

    /// A request that writes only `records`, and where its answer comes.
    fn records_request(
        records: RecordOps,
    ) -> (
        Request,
        tokio::sync::oneshot::Receiver<Result<Vec<AppendOutcome>, LogError>>,
    ) {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = Request {
            entries: Vec::new(),
            tasks: Vec::new(),
            hook: None,
            records,
            reply,
            replicated: Vec::new(),
        };
        (request, answer)
    }

    /// Writes `records` in the writer's next group commit and waits until they are durable.
    async fn write_records(&self, records: RecordOps) -> Result<(), LogError> {
        let (request, answer) = Log::records_request(records);
        self.sender()?
            .send(request)
            .await
            .map_err(|_| LogError::Closed)?;
        PendingAppend(answer).outcomes().await.map(drop)
    }

    /// Highest durable `added`.
    pub fn head(&self) -> u64 {
        self.inner.shared.head.load(Ordering::Acquire)
    }

    /// Number of group commits (batch plus flush) this handle's writer performed since open.
    /// Groups that stored nothing new (only duplicates) are not counted: they write nothing.
    pub fn group_commits(&self) -> u64 {
        self.inner.shared.group_commits.load(Ordering::Relaxed)
    }

    /// Waits until every position up to `added` is durable. Fails when it never will be:
    /// the log is poisoned (a write or flush failed) or closed.
    pub async fn durable(&self, added: u64) -> Result<(), LogError> {
        let shared = &self.inner.shared;
        let mut head = shared.head_changed.subscribe();
        let mut stopped = self.inner.stopped.clone();
        loop {
            if *head.borrow_and_update() >= added {
                return Ok(());
            }
            if let Some(reason) = shared.poison_reason() {
                return Err(LogError::Poisoned(reason));
            }
            if *stopped.borrow_and_update() {
                return Err(LogError::Closed);
            }
            let woken = tokio::select! {
                woken = head.changed() => woken,
                woken = stopped.changed() => woken,
            };
            if woken.is_err() {
                return Err(LogError::Closed);
            }
        }
    }

    /// The durable state of one object. The writer applies a group's states before the
    /// group is flushed, so a state that covers entries not yet durable is returned only
    /// once they are (and never when their flush fails).
    pub async fn state(&self, object: &str) -> Result<Option<ObjectState>, LogError> {
        let key = keys::state_key(object);
        let state = match self.inner.shared.db.get(&key)? {
            Some(value) => decode_state(object, &key, &value)?,
            None => return Ok(None),
        };
        self.durable(state.added).await?;
        Ok(Some(state))
    }

    /// The durable states of every object whose key starts with `prefix`, in key order (see
    /// `state`).
    pub async fn states_with_prefix(&self, prefix: &str) -> Result<Vec<ObjectState>, LogError> {
        let mut states = Vec::new();
        for item in self.inner.shared.db.scan_prefix(keys::state_key(prefix)) {
            let (key, value) = item?;
            let object = String::from_utf8_lossy(&key[1..]).into_owned();
            states.push(decode_state(&object, &key, &value)?);
        }
        let newest = states.iter().map(|state| state.added).max().unwrap_or(0);
        self.durable(newest).await?;
        Ok(states)
    }

    /// Bytes the log's files take on disk, as sled reports it.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.inner.shared.db.size_on_disk()?)
    }

    /// Why the log refuses writes, once a write or flush failed.
    pub fn poison_reason(&self) -> Option<String> {
        self.inner.shared.poison_reason()
    }

    /// The durable entry stored at `added`, if retention did not remove it.
    pub fn entry_at(&self, added: u64) -> Result<Option<Arc<Entry>>, LogError> {
        if added > self.head() {
            return Ok(None);
        }
        self.inner.shared.entry_at(added)
    }

    /// Position of a stored action id.
    pub fn added_of(&self, id: &str) -> Result<Option<u64>, LogError> {
        let added = ids::lookup(&self.inner.shared.db, id)?;
        Ok(added.filter(|&added| added <= self.head()))
    }

    /// The positions indexed for `channel` with `after < added <= upto` (at most `upto -
    /// after` of them), without loading the entries.
    pub fn channel_positions(
        &self,
        channel: &str,
        after: u64,
        upto: u64,
    ) -> Result<Vec<u64>, LogError> {
        let upto = upto.min(self.head());
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.inner
            .shared
            .index_positions(&channel_head(), channel, (from, upto), Order::Ascending)
            .collect()
    }

    /// Entries of `channel` with `after < added <= upto`, oldest first, at most `limit`.
    pub fn channel_since(
        &self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, LogError> {
        let upto = upto.min(self.head());
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let shared = &self.inner.shared;
        shared.load(
            shared.index_positions(&channel_head(), channel, (from, upto), Order::Ascending),
            limit,
        )
    }

    /// The newest `limit` entries of `channel` with `added <= upto`, oldest first.
    pub fn channel_tail(
        &self,
        channel: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, LogError> {
        let upto = upto.min(self.head());
        let shared = &self.inner.shared;
        let mut entries = shared.load(
            shared.index_positions(&channel_head(), channel, (0, upto), Order::Descending),
            limit,
        )?;
        entries.reverse();
        Ok(entries)
    }

    /// Entries targeted at the given user, client or node (through `meta.users`, `meta.clients`,
    /// `meta.nodes`) with `after < added <= upto`, oldest first, each once, at most `limit`.
    pub fn targeted_since(
        &self,
        user: Option<&str>,
        client: &str,
        node: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Arc<Entry>>, LogError> {
        let upto = upto.min(self.head());
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let shared = &self.inner.shared;
        let mut sources = Vec::with_capacity(3);
        let mut source = |kind, name| {
            sources.push(shared.index_positions(
                &target_head(kind),
                name,
                (from, upto),
                Order::Ascending,
            ));
        };
        if let Some(user) = user {
            source(TargetKind::User, user);
        }
        source(TargetKind::Client, client);
        source(TargetKind::Node, node);
        shared.load(MergeAscending::new(sources), limit)
    }

    /// The durable tasks of `queue` in `added` order, at most `limit`. A task whose batch is
    /// applied but not yet flushed is not returned (its entry is not readable yet either).
    pub fn tasks(&self, queue: &str, limit: usize) -> Result<Vec<Task>, LogError> {
        let head = self.head();
        let mut tasks = Vec::new();
        for item in self
            .inner
            .shared
            .db
            .scan_prefix(keys::task_queue_prefix(queue))
        {
            if tasks.len() >= limit {
                break;
            }
            let (key, value) = item?;
            let (queue, added) = keys::decode_task_key(&key)?;
            if added > head {
                break;
            }
            tasks.push(Task {
                queue,
                added,
                value: value.to_vec(),
            });
        }
        Ok(tasks)
    }

    /// How many durable tasks `queue` holds (the ones `tasks` would return with no limit),
    /// counted over the keys alone: no task value is copied and no key decoded.
    pub fn task_count(&self, queue: &str) -> Result<usize, LogError> {
        let range = keys::task_queue_prefix(queue)..=keys::task_key(queue, self.head());
        let mut count = 0;
        for item in self.inner.shared.db.range(range) {
            item?;
            count += 1;
        }
        Ok(count)
    }

    /// Every queue that holds tasks, with its oldest task's position.
    pub fn task_queues(&self) -> Result<Vec<(String, u64)>, LogError> {
        let db = &self.inner.shared.db;
        let mut queues = Vec::new();
        let mut from = vec![keys::TASK_PREFIX];
        loop {
            let Some(item) = db.range(from.clone()..).next() else {
                break;
            };
            let (key, _) = item?;
            if key.first() != Some(&keys::TASK_PREFIX) {
                break;
            }
            let (queue, added) = keys::decode_task_key(&key)?;
            // Continue after every key of this queue.
            from = keys::task_key(&queue, u64::MAX);
            from.push(0);
            queues.push((queue, added));
        }
        Ok(queues)
    }

    /// Stored entries with `added > after`, oldest first, at most `limit`.
    pub fn entries_after(&self, after: u64, limit: usize) -> Result<Vec<Arc<Entry>>, LogError> {
        let head = self.head();
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        if from > head {
            return Ok(Vec::new());
        }
        let shared = &self.inner.shared;
        let mut entries = Vec::new();
        let start = match shared.block_holding(from)? {
            Some(cached) => cached.first,
            None => from,
        };
        for item in shared.db.range(block_key(start)..=block_key(head)) {
            let (key, value) = item?;
            let block = Block::new(&key, value)?;
            for item in block.entries() {
                let (added, json) = item?;
                if added < from {
                    continue;
                }
                if added > head || entries.len() >= limit {
                    return Ok(entries);
                }
                entries.push(Arc::new(decode_entry(&key, json)?));
            }
        }
        Ok(entries)
    }

    /// Reads a small persistent string value (server node id and the like).
    pub fn get_setting(&self, key: &str) -> Result<Option<String>, LogError> {
        let record_key = setting_key(key);
        match self.inner.shared.db.get(&record_key)? {
            Some(value) => String::from_utf8(value.to_vec())
                .map(Some)
                .map_err(|error| LogError::Corrupt {
                    key: keys::describe_key(&record_key),
                    reason: error.to_string(),
                }),
            None => Ok(None),
        }
    }

    /// Writes a small persistent string value through the writer; returns once it is durable.
    pub async fn put_setting(&self, key: &str, value: &str) -> Result<(), LogError> {
        self.write_records(RecordOps::setting(key, value)).await
    }

    /// Queues a setting for the writer's next group commit without waiting (for start-up code
    /// that is not async); it is durable with that group, before any later append.
    pub fn queue_setting(&self, key: &str, value: &str) -> Result<(), LogError> {
        let (request, _answer) = Log::records_request(RecordOps::setting(key, value));
        self.sender()?
            .try_send(request)
            .map_err(|_| LogError::Closed)
    }

    /// Removes entries with `added < before` and their index records (retention), through the
    /// writer, in batches of `REMOVE_BATCH_ENTRIES`.
    ///
    /// Returns how many entries were removed. Entries above `head` (not yet durable) are never
    /// removed. `last_added` is kept, so positions are never handed out again. After a crash,
    /// removed entries may come back, which is harmless.
    pub async fn remove_before(&self, before: u64) -> Result<usize, LogError> {
        let before = before.min(self.head().saturating_add(1));
        let mut removed = 0;
        loop {
            let (records, count, more) = self.removal_batch(before)?;
            if !records.is_empty() {
                self.write_records(records).await?;
            }
            self.inner.shared.recent.remove_before(before);
            removed += count;
            if !more {
                break;
            }
        }
        Ok(removed)
    }

    /// The records to remove or rewrite for the oldest blocks below `before`, up to about
    /// `REMOVE_BATCH_ENTRIES` entries: the entries below `before`, their ids and their
    /// positions in the postings. Returns them, how many entries they remove, and whether
    /// older blocks are left for another batch.
    fn removal_batch(&self, before: u64) -> Result<(RecordOps, usize, bool), LogError> {
        let db = &self.inner.shared.db;
        let mut records = RecordOps::default();
        let mut count = 0;
        let mut more = false;
        // Every entry below `cut` is removed by this batch.
        let mut cut = before;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for item in db.range(block_key(0)..block_key(before)) {
            if count >= REMOVE_BATCH_ENTRIES {
                more = true;
                break;
            }
            let (key, value) = item?;
            let mut kept: Vec<(u64, &[u8])> = Vec::new();
            let mut removed_here = 0;
            let mut last = 0;
            let block = Block::new(&key, value.as_ref());
            match &block {
                Ok(block) => {
                    for item in block.entries() {
                        let (added, json) = match item {
                            Ok(read) => read,
                            // The rest of the block cannot be read: removing the block keeps
                            // retention going, and readers skip postings without an entry.
                            Err(error) => {
                                tracing::warn!(%error, "removing a torn block");
                                kept.clear();
                                break;
                            }
                        };
                        last = added;
                        if added >= before {
                            kept.push((added, json));
                            continue;
                        }
                        removed_here += 1;
                        self.forget_entry(&key, added, json, &mut records, &mut names)?;
                    }
                }
                Err(error) => tracing::warn!(%error, "removing an unreadable block"),
            }
            count += removed_here;
            if kept.is_empty() {
                records.remove.push(key.to_vec());
            } else if removed_here > 0 {
                records.insert.push((key.to_vec(), encode_block(kept)));
            }
            cut = before.min(last.saturating_add(1));
        }
        if !more {
            cut = before;
        }
        for prefix in names {
            for item in db.range(posting_key(&prefix, 0)..posting_key(&prefix, cut)) {
                let (key, value) = item?;
                let positions = decode_posting(&key, &value).unwrap_or_default();
                let kept: Vec<u64> = positions.iter().copied().filter(|&p| p >= cut).collect();
                if kept.is_empty() {
                    records.remove.push(key.to_vec());
                } else if kept.len() < positions.len() {
                    records.insert.push((key.to_vec(), encode_posting(&kept)));
                }
            }
        }
        Ok((records, count, more))
    }

    /// Adds the removal of the id of the entry at `added` (when it still points there) to
    /// `records`, and its posting prefixes to `names`.
    fn forget_entry(
        &self,
        block: &[u8],
        added: u64,
        json: &[u8],
        records: &mut RecordOps,
        names: &mut Vec<Vec<u8>>,
    ) -> Result<(), LogError> {
        let entry = match decode_entry(block, json) {
            Ok(entry) => entry,
            // Its postings cannot be found; readers skip them once the entry is gone.
            Err(error) => {
                tracing::warn!(%error, "removing an undecodable entry");
                return Ok(());
            }
        };
        records.forget_ids.push((entry.meta.id.clone(), added));
        for prefix in index_prefixes(&entry) {
            if !names.contains(&prefix) {
                names.push(prefix);
            }
        }
        Ok(())
    }

    /// Stops the writer after the queued requests and flushes.
    ///
    /// Appends already queued are still written; later appends get `LogError::Closed`.
    /// Returns `LogError::Poisoned` when an earlier write failed.
    pub async fn close(&self) -> Result<(), LogError> {
        let sender = self
            .inner
            .sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(sender);
        let appends = self
            .inner
            .appends
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(appends);
        let mut stopped = self.inner.stopped.clone();
        // An error means the writer is gone without reporting, which is just as stopped.
        let _ = stopped.wait_for(|stopped| *stopped).await;
        if let Some(reason) = self.inner.shared.poison_reason() {
            return Err(LogError::Poisoned(reason));
        }
        flush(&self.inner.shared.db).await?;
        Ok(())
    }
}

/// Refuses a data directory of another log format; marks a new one with this format.
fn check_format(db: &sled::Db, dir: &Path) -> Result<(), LogError> {
    let key = format_key();
    let refuse = |found: &str| {
        LogError::UnsupportedFormat(format!(
            "the data directory {} holds log format {found}, and this Ferry reads and writes \
             only format {FORMAT_VERSION} (since 2026-12-03: entries in blocks, ids in chunks per node); \
             it does not convert old directories: start on a new --data-dir, or keep the \
             older Ferry for this one",
            dir.display()
        ))
    };
    match db.get(&key)? {
        Some(value) => {
            let version = <[u8; 4]>::try_from(value.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| refuse("unknown"))?;
            if version == FORMAT_VERSION {
                Ok(())
            } else {
                Err(refuse(&version.to_string()))
            }
        }
        None => {
            let format_1 = db.get(last_added_key())?.is_some()
                || db.scan_prefix([FORMAT_1_ENTRY_PREFIX]).next().is_some();
            if format_1 {
                return Err(refuse("1"));
            }
            // A new directory (or one that only holds settings): this format from now on.
            db.insert(&key, &FORMAT_VERSION.to_be_bytes())?;
            db.flush()?;
            Ok(())
        }
    }
}

/// Opens the sled database, waiting a little for a lock that a closed log may still hold.
fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, LogError> {
    let deadline = Instant::now() + Duration::from_millis(OPEN_LOCK_WAIT_MS);
    loop {
        // Every group commit flushes explicitly, so sled's periodic flusher only adds work.
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None);
        match config.open() {
            // sled 0.34 reports a held lock only through this message, with kind `Other`.
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(OPEN_LOCK_RETRY_MS));
            }
            result => return Ok(result?),
        }
    }
}

/// Flushes the database on tokio's blocking pool.
///
/// Unlike sled's `flush_async`, the database handle is released before this returns, so that
/// after `close` no background thread keeps the directory locked.
async fn flush(db: &sled::Db) -> Result<(), sled::Error> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(result) => result.map(|_| ()),
        Err(error) => Err(sled::Error::Io(std::io::Error::other(format!(
            "flush task failed: {error}"
        )))),
    }
}

/// Merges ascending position streams into one ascending stream without repeats.
struct MergeAscending<I: Iterator<Item = Result<u64, LogError>>> {
    /// The sources with their next item looked at.
    sources: Vec<std::iter::Peekable<I>>,
}

impl<I: Iterator<Item = Result<u64, LogError>>> MergeAscending<I> {
    /// Merges `sources`, each of which must be ascending.
    fn new(sources: Vec<I>) -> Self {
        MergeAscending {
            sources: sources.into_iter().map(Iterator::peekable).collect(),
        }
    }
}

impl<I: Iterator<Item = Result<u64, LogError>>> Iterator for MergeAscending<I> {
    type Item = Result<u64, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut smallest: Option<u64> = None;
        for source in &mut self.sources {
            match source.peek() {
                Some(Ok(added)) => {
                    smallest = Some(smallest.map_or(*added, |current| current.min(*added)));
                }
                // Errors surface right away; the source after them is not trusted.
                Some(Err(_)) => return source.next(),
                None => {}
            }
        }
        let smallest = smallest?;
        for source in &mut self.sources {
            while matches!(source.peek(), Some(Ok(added)) if *added == smallest) {
                source.next();
            }
        }
        Some(Ok(smallest))
    }
}

/// Splits a state record into its position and state bytes.
fn decode_state(object: &str, key: &[u8], value: &[u8]) -> Result<ObjectState, LogError> {
    if value.len() < keys::ADDED_LEN_BYTES {
        return Err(LogError::Corrupt {
            key: keys::describe_key(key),
            reason: "state record is too short".into(),
        });
    }
    let (added, state) = value.split_at(keys::ADDED_LEN_BYTES);
    Ok(ObjectState {
        key: object.to_owned(),
        added: keys::decode_added(key, added)?,
        state: state.to_vec(),
    })
}
