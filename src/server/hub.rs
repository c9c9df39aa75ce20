//! The hub: who is connected, who is subscribed to what, and delivery of committed actions.
//!
//! The log's writer calls `Hub::committed` once per group commit, after the flush, in `added`
//! order. The hub routes each action to the outboxes of the connections it targets. An outbox
//! is bounded; a connection whose outbox is full is a slow consumer and is disconnected (it
//! loses nothing: on reconnect it gets its targeted actions from the log and its channels'
//! actions through re-subscription with `since`).

use crate::action::{Entry, NodeIds};
use crate::log::CommitListener;
use crate::metrics::Metrics;
use dashmap::DashMap;
use serde_json::Number;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Notify};

/// Identifies one connection for the lifetime of the process.
pub type ConnId = u64;

/// What a connection's writer receives, in order.
#[derive(Debug)]
pub enum Outbound {
    /// Actions to send, in `added` order (live deliveries).
    Entries(Vec<Arc<Entry>>),
    /// A catch-up is being prepared: hold live entries until the matching `Catchup`.
    CatchupPending,
    /// One page of catch-up entries (history or missed actions), oldest first.
    Catchup(Vec<Arc<Entry>>),
    /// The catch-up announced by the oldest open `CatchupPending` is complete.
    CatchupDone,
    /// Positions already covered by a snapshot sent in a catch-up: never send them.
    Absorbed(Vec<u64>),
    /// The client's `sync` is durable: send `synced` with this `added`.
    Synced(Number),
    /// A ready-made frame (`debug`).
    Frame(String),
}

/// The hub's side of one connection.
#[derive(Debug)]
pub struct ConnHandle {
    /// Process-unique id.
    pub id: ConnId,
    /// Node, client and user ids of the authenticated client.
    pub ids: NodeIds,
    /// Its outbox.
    pub outbox: mpsc::Sender<Outbound>,
    /// Set once the connection must close (zombie, slow consumer, shutdown).
    kicked: AtomicBool,
    /// Wakes the connection task when `kicked` is set.
    pub kick_signal: Notify,
    /// Channels this connection subscribed to, so a disconnect costs O(its subscriptions).
    subscriptions: Mutex<HashSet<String>>,
    /// Shared metrics, to count slow-consumer disconnects.
    metrics: Arc<Metrics>,
}

impl ConnHandle {
    /// True once the hub asked this connection to close.
    pub fn is_kicked(&self) -> bool {
        self.kicked.load(Ordering::Acquire)
    }

    /// Asks the connection to close.
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.kick_signal.notify_one();
    }

    /// Queues an item without waiting; a full outbox kicks the connection.
    pub fn push(&self, item: Outbound) -> bool {
        if self.is_kicked() {
            return false;
        }
        match self.outbox.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(client = %self.ids.client_id, "outbox full, disconnecting slow consumer");
                self.metrics.slow_consumers.inc();
                self.kick();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Connection and subscription registry.
#[derive(Debug, Default)]
pub struct Hub {
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    conns: DashMap<ConnId, Arc<ConnHandle>>,
    by_client: DashMap<String, ConnId>,
    by_node: DashMap<String, ConnId>,
    by_user: DashMap<String, Vec<ConnId>>,
    channels: DashMap<String, HashSet<ConnId>>,
    subscription_count: AtomicU64,
}

impl Hub {
    /// An empty hub with its own metrics (tests).
    pub fn new() -> Hub {
        Hub::default()
    }

    /// An empty hub reporting to `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Hub {
        Hub {
            metrics,
            ..Hub::default()
        }
    }

    /// Registers an authenticated connection. An older connection with the same client id is
    /// kicked (Logux zombie rule).
    pub fn register(&self, ids: NodeIds, outbox: mpsc::Sender<Outbound>) -> Arc<ConnHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let handle = Arc::new(ConnHandle {
            id,
            ids: ids.clone(),
            outbox,
            kicked: AtomicBool::new(false),
            kick_signal: Notify::new(),
            subscriptions: Mutex::new(HashSet::new()),
            metrics: self.metrics.clone(),
        });
        self.conns.insert(id, handle.clone());
        if let Some(previous) = self.by_client.insert(ids.client_id.clone(), id) {
            if let Some(zombie) = self.conns.get(&previous) {
                tracing::info!(client = %ids.client_id, "closing zombie connection of the same client");
                zombie.kick();
            }
        }
        self.by_node.insert(ids.node_id.clone(), id);
        if let Some(user) = &ids.user_id {
            self.by_user.entry(user.clone()).or_default().push(id);
        }
        handle
    }

    /// Closes the connection of `client_id`, if this hub has one (the client connected to
    /// another cluster node); true when there was one.
    pub fn kick_client(&self, client_id: &str) -> bool {
        let Some(id) = self.by_client.get(client_id).map(|id| *id) else {
            return false;
        };
        match self.conns.get(&id) {
            Some(conn) => {
                conn.kick();
                true
            }
            None => false,
        }
    }

    /// Removes a connection and all its subscriptions.
    pub fn unregister(&self, handle: &ConnHandle) {
        self.conns.remove(&handle.id);
        self.by_client
            .remove_if(&handle.ids.client_id, |_, id| *id == handle.id);
        self.by_node
            .remove_if(&handle.ids.node_id, |_, id| *id == handle.id);
        if let Some(user) = &handle.ids.user_id {
            if let Some(mut ids) = self.by_user.get_mut(user) {
                ids.retain(|id| *id != handle.id);
            }
            self.by_user.remove_if(user, |_, ids| ids.is_empty());
        }
        let channels = match handle.subscriptions.lock() {
            Ok(mut subscriptions) => std::mem::take(&mut *subscriptions),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for channel in channels {
            self.remove_subscriber(&channel, handle.id);
        }
    }

    /// Subscribes a connection to a channel (idempotent).
    pub fn subscribe(&self, handle: &ConnHandle, channel: &str) {
        let added = match handle.subscriptions.lock() {
            Ok(mut subscriptions) => subscriptions.insert(channel.to_owned()),
            Err(poisoned) => poisoned.into_inner().insert(channel.to_owned()),
        };
        if added {
            self.channels
                .entry(channel.to_owned())
                .or_default()
                .insert(handle.id);
            self.subscription_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Unsubscribes a connection from a channel (idempotent).
    pub fn unsubscribe(&self, handle: &ConnHandle, channel: &str) {
        let removed = match handle.subscriptions.lock() {
            Ok(mut subscriptions) => subscriptions.remove(channel),
            Err(poisoned) => poisoned.into_inner().remove(channel),
        };
        if removed {
            self.remove_subscriber(channel, handle.id);
        }
    }

    fn remove_subscriber(&self, channel: &str, id: ConnId) {
        if let Some(mut subscribers) = self.channels.get_mut(channel) {
            if subscribers.remove(&id) {
                self.subscription_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.channels
            .remove_if(channel, |_, subscribers| subscribers.is_empty());
    }

    /// Number of connected, authenticated connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of (connection, channel) subscriptions.
    pub fn subscription_count(&self) -> u64 {
        self.subscription_count.load(Ordering::Relaxed)
    }

    /// The connections one entry goes to, following Logux's `sendAction` rules: `nodes` and
    /// `clients` targets always; `users` and `channels` except the author and
    /// `exclude_clients`. Each connection at most once: each source lists a connection once,
    /// so repeats are removed (sorting, O(n log n)) only when several sources contributed.
    fn targets(&self, entry: &Entry, out: &mut Vec<ConnId>) {
        out.clear();
        let meta = &entry.meta;
        let author = entry.author_client_id();
        let mut sources = 0;
        let mut source_end = 0;
        let mut end_source = |out: &Vec<ConnId>| {
            if out.len() > source_end {
                sources += 1;
                source_end = out.len();
            }
        };
        for node in &meta.nodes {
            if let Some(id) = self.by_node.get(node) {
                out.push(*id);
                end_source(out);
            }
        }
        for client in &meta.clients {
            if let Some(id) = self.by_client.get(client) {
                out.push(*id);
                end_source(out);
            }
        }
        let excluded = |id: ConnId| -> bool {
            match self.conns.get(&id) {
                Some(conn) => {
                    conn.ids.client_id == author
                        || meta.exclude_clients.contains(&conn.ids.client_id)
                }
                None => true,
            }
        };
        for user in &meta.users {
            if let Some(ids) = self.by_user.get(user) {
                for id in ids.iter().copied() {
                    if !excluded(id) {
                        out.push(id);
                    }
                }
                end_source(out);
            }
        }
        for channel in &meta.channels {
            if let Some(subscribers) = self.channels.get(channel) {
                for id in subscribers.iter().copied() {
                    if !excluded(id) {
                        out.push(id);
                    }
                }
                end_source(out);
            }
        }
        if sources > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

impl CommitListener for Hub {
    fn committed(&self, entries: &[Arc<Entry>]) {
        let mut per_conn: HashMap<ConnId, Vec<Arc<Entry>>> = HashMap::new();
        let mut targets = Vec::new();
        for entry in entries {
            self.targets(entry, &mut targets);
            for id in &targets {
                per_conn.entry(*id).or_default().push(entry.clone());
            }
        }
        for (id, batch) in per_conn {
            if let Some(conn) = self.conns.get(&id).map(|conn| conn.clone()) {
                conn.push(Outbound::Entries(batch));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::Meta;
    use serde_json::json;

    fn entry(id: &str, added: u64, channels: &[&str], clients: &[&str]) -> Arc<Entry> {
        Arc::new(Entry::new(
            json!({"type": "a"}),
            Meta {
                id: id.into(),
                added,
                channels: channels.iter().map(|c| c.to_string()).collect(),
                clients: clients.iter().map(|c| c.to_string()).collect(),
                ..Meta::default()
            },
        ))
    }

    fn received(rx: &mut mpsc::Receiver<Outbound>) -> Vec<u64> {
        let mut added = Vec::new();
        while let Ok(item) = rx.try_recv() {
            if let Outbound::Entries(entries) = item {
                added.extend(entries.iter().map(|e| e.meta.added));
            }
        }
        added
    }

    #[test]
    fn channel_actions_reach_subscribers_but_not_their_author() {
        let hub = Hub::new();
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        let a = hub.register(NodeIds::parse("1:a:t"), a_tx);
        let b = hub.register(NodeIds::parse("2:b:t"), b_tx);
        hub.subscribe(&a, "room/1");
        hub.subscribe(&b, "room/1");
        hub.committed(&[entry("1 1:a:t 0", 1, &["room/1"], &[])]);
        assert_eq!(received(&mut a_rx), Vec::<u64>::new());
        assert_eq!(received(&mut b_rx), vec![1]);
    }

    #[test]
    fn a_connection_named_by_several_targets_gets_the_entry_once() {
        let hub = Hub::new();
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        let a = hub.register(NodeIds::parse("1:a:t"), a_tx);
        let b = hub.register(NodeIds::parse("2:b:t"), b_tx);
        hub.subscribe(&a, "room");
        hub.subscribe(&a, "other");
        hub.subscribe(&b, "room");
        let mut both = entry("1 server:x 0", 5, &["room", "other"], &["1:a"]);
        Arc::make_mut(&mut both).meta.users = vec!["1".into(), "2".into()];
        hub.committed(&[both]);
        assert_eq!(received(&mut a_rx), vec![5]);
        assert_eq!(received(&mut b_rx), vec![5]);
    }

    #[test]
    fn client_targets_reach_the_author() {
        let hub = Hub::new();
        let (a_tx, mut a_rx) = mpsc::channel(8);
        hub.register(NodeIds::parse("1:a:t"), a_tx);
        hub.committed(&[entry("1 server:x 0", 5, &[], &["1:a"])]);
        assert_eq!(received(&mut a_rx), vec![5]);
    }

    #[test]
    fn a_new_connection_of_the_same_client_kicks_the_old_one() {
        let hub = Hub::new();
        let (tx1, _rx1) = mpsc::channel(8);
        let (tx2, _rx2) = mpsc::channel(8);
        let old = hub.register(NodeIds::parse("1:a:t1"), tx1);
        let new = hub.register(NodeIds::parse("1:a:t2"), tx2);
        assert!(old.is_kicked());
        assert!(!new.is_kicked());
        hub.unregister(&old);
        assert_eq!(hub.connection_count(), 1);
        assert_eq!(hub.by_client.get("1:a").map(|id| *id), Some(new.id));
    }

    #[test]
    fn disconnect_removes_every_subscription() {
        let hub = Hub::new();
        let (tx, _rx) = mpsc::channel(8);
        let conn = hub.register(NodeIds::parse("1:a:t"), tx);
        for n in 0..10 {
            hub.subscribe(&conn, &format!("room/{n}"));
        }
        hub.subscribe(&conn, "room/1");
        assert_eq!(hub.subscription_count(), 10);
        hub.unregister(&conn);
        assert_eq!(hub.subscription_count(), 0);
        assert!(hub.channels.is_empty());
    }

    #[test]
    fn a_full_outbox_kicks_the_slow_consumer_without_blocking() {
        let hub = Hub::new();
        let (tx, _rx) = mpsc::channel(1);
        let conn = hub.register(NodeIds::parse("1:a:t"), tx);
        hub.subscribe(&conn, "room/1");
        hub.committed(&[entry("1 2:b:t 0", 1, &["room/1"], &[])]);
        hub.committed(&[entry("2 2:b:t 0", 2, &["room/1"], &[])]);
        assert!(conn.is_kicked());
    }
}
