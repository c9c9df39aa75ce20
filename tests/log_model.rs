//! Model-based test of the action log: random operations run against the real log and against
//! an in-memory model, and every answer must match.

use ferry::action::{Entry, Meta};
use ferry::log::{AppendOutcome, CommitListener, Log, LogOptions};
use proptest::prelude::*;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Number of generated cases; small so that the test takes a few seconds.
const CASES_COUNT: u32 = 64;
/// Number of distinct action ids, small so that duplicates are frequent.
const ID_POOL_LEN: usize = 10;
/// Highest position the reads and the retention ask about; a bit above what the cases reach.
const POSITION_MAX: u64 = 60;

const CHANNELS: [&str; 3] = ["a", "b", "a/b"];
const USERS: [&str; 2] = ["10", "11"];
const CLIENTS: [&str; 2] = ["10:x", "11:y"];
const NODES: [&str; 2] = ["10:x:1", "11:y:1"];

#[derive(Debug, Clone)]
struct EntrySpec {
    id: usize,
    value: u8,
    channels: Vec<usize>,
    users: Vec<usize>,
    clients: Vec<usize>,
    nodes: Vec<usize>,
}

impl EntrySpec {
    fn to_entry(&self) -> Entry {
        let pick = |pool: &[&str], picks: &[usize]| -> Vec<String> {
            picks.iter().map(|&n| pool[n].to_owned()).collect()
        };
        Entry::new(
            json!({ "type": "model", "value": self.value }),
            Meta {
                id: id_of(self.id),
                time: i64::from(self.value),
                channels: pick(&CHANNELS, &self.channels),
                users: pick(&USERS, &self.users),
                clients: pick(&CLIENTS, &self.clients),
                nodes: pick(&NODES, &self.nodes),
                ..Meta::default()
            },
        )
    }
}

fn id_of(n: usize) -> String {
    format!("{} 10:x:1 0", 1000 + n)
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<EntrySpec>),
    ReadChannelSince {
        channel: usize,
        after: u64,
        upto: u64,
        limit: usize,
    },
    ReadChannelTail {
        channel: usize,
        upto: u64,
        limit: usize,
    },
    ReadTargeted {
        user: Option<usize>,
        client: usize,
        node: usize,
        after: u64,
        upto: u64,
        limit: usize,
    },
    ReadEntriesAfter {
        after: u64,
        limit: usize,
    },
    ReadEntryAt(u64),
    RemoveBefore(u64),
    Reboot,
}

fn picks(pool_len: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..pool_len, 0..=2)
}

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    (
        0..ID_POOL_LEN,
        any::<u8>(),
        picks(CHANNELS.len()),
        picks(USERS.len()),
        picks(CLIENTS.len()),
        picks(NODES.len()),
    )
        .prop_map(|(id, value, channels, users, clients, nodes)| EntrySpec {
            id,
            value,
            channels,
            users,
            clients,
            nodes,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let position = 0..=POSITION_MAX;
    prop_oneof![
        4 => proptest::collection::vec(entry_spec(), 0..5).prop_map(Op::Append),
        2 => (0..CHANNELS.len(), position.clone(), position.clone(), 0usize..6).prop_map(
            |(channel, after, upto, limit)| Op::ReadChannelSince { channel, after, upto, limit }
        ),
        1 => (0..CHANNELS.len(), position.clone(), 0usize..6)
            .prop_map(|(channel, upto, limit)| Op::ReadChannelTail { channel, upto, limit }),
        2 => (
            proptest::option::of(0..USERS.len()),
            0..CLIENTS.len(),
            0..NODES.len(),
            position.clone(),
            position.clone(),
            0usize..8,
        )
            .prop_map(|(user, client, node, after, upto, limit)| Op::ReadTargeted {
                user,
                client,
                node,
                after,
                upto,
                limit,
            }),
        1 => (position.clone(), 0usize..8)
            .prop_map(|(after, limit)| Op::ReadEntriesAfter { after, limit }),
        1 => position.clone().prop_map(Op::ReadEntryAt),
        1 => position.prop_map(Op::RemoveBefore),
        1 => Just(Op::Reboot),
    ]
}

/// The expected state of the log.
#[derive(Default)]
struct Model {
    /// Stored entries by position, with `meta.added` set.
    entries: BTreeMap<u64, Entry>,
    /// Positions of the stored ids.
    ids: HashMap<String, u64>,
    /// Highest position ever handed out.
    last_added: u64,
}

impl Model {
    fn append(&mut self, entries: Vec<Entry>) -> (Vec<AppendOutcome>, Vec<Entry>) {
        let mut outcomes = Vec::new();
        let mut fresh = Vec::new();
        for mut entry in entries {
            if let Some(&added) = self.ids.get(&entry.meta.id) {
                outcomes.push(AppendOutcome::Duplicate(added));
                continue;
            }
            self.last_added += 1;
            entry.meta.added = self.last_added;
            self.ids.insert(entry.meta.id.clone(), self.last_added);
            self.entries.insert(self.last_added, entry.clone());
            outcomes.push(AppendOutcome::Appended(self.last_added));
            fresh.push(entry);
        }
        (outcomes, fresh)
    }

    fn select(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        wanted: impl Fn(&Entry) -> bool,
    ) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|(added, entry)| after < **added && **added <= upto && wanted(entry))
            .map(|(_, entry)| entry.clone())
            .take(limit)
            .collect()
    }

    fn remove_before(&mut self, before: u64) -> usize {
        let kept = self.entries.split_off(&before);
        let removed = std::mem::replace(&mut self.entries, kept);
        for entry in removed.values() {
            self.ids.remove(&entry.meta.id);
        }
        removed.len()
    }
}

/// Collects the entries the log reports as committed.
#[derive(Default)]
struct Committed(Mutex<Vec<Entry>>);

impl CommitListener for Committed {
    fn committed(&self, entries: &[Arc<Entry>]) {
        let mut seen = self.0.lock().expect("listener lock");
        seen.extend(entries.iter().map(|entry| Entry::clone(entry)));
    }
}

impl Committed {
    fn take(&self) -> Vec<Entry> {
        std::mem::take(&mut *self.0.lock().expect("listener lock"))
    }
}

/// Most entries per stored block here: tiny, so that groups span several blocks and
/// retention cuts through them.
const BLOCK_ENTRIES_MAX: usize = 2;

/// Opens the log; without `window`, every read goes to storage.
fn open(dir: &Path, listener: &Arc<Committed>, window: bool) -> Log {
    let options = LogOptions {
        group_commit_entries_max: 4,
        writer_queue_len: 8,
        block_entries_max: BLOCK_ENTRIES_MAX,
        recent_bytes: if window {
            LogOptions::default().recent_bytes
        } else {
            0
        },
        ..LogOptions::default()
    };
    Log::open(dir, options, listener.clone()).expect("log opens")
}

fn plain(entries: Vec<Arc<Entry>>) -> Vec<Entry> {
    entries.iter().map(|entry| Entry::clone(entry)).collect()
}

async fn run(ops: Vec<Op>, window: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = Arc::new(Committed::default());
    let mut log = open(dir.path(), &listener, window);
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append(specs) => {
                let entries: Vec<Entry> = specs.iter().map(EntrySpec::to_entry).collect();
                let (expected, fresh) = model.append(entries.clone());
                let outcomes = log.append(entries, None).await.expect("append");
                prop_assert_eq!(outcomes, expected);
                prop_assert_eq!(listener.take(), fresh);
            }
            Op::ReadChannelSince {
                channel,
                after,
                upto,
                limit,
            } => {
                let name = CHANNELS[channel];
                let read = log.channel_since(name, after, upto, limit).expect("read");
                let expected = model.select(after, upto, limit, |entry| {
                    entry.meta.channels.iter().any(|c| c == name)
                });
                prop_assert_eq!(plain(read), expected);
            }
            Op::ReadChannelTail {
                channel,
                upto,
                limit,
            } => {
                let name = CHANNELS[channel];
                let read = log.channel_tail(name, upto, limit).expect("read");
                let mut expected = model.select(0, upto, usize::MAX, |entry| {
                    entry.meta.channels.iter().any(|c| c == name)
                });
                let skip = expected.len().saturating_sub(limit);
                expected.drain(..skip);
                prop_assert_eq!(plain(read), expected);
            }
            Op::ReadTargeted {
                user,
                client,
                node,
                after,
                upto,
                limit,
            } => {
                let user = user.map(|n| USERS[n]);
                let (client, node) = (CLIENTS[client], NODES[node]);
                let read = log
                    .targeted_since(user, client, node, after, upto, limit)
                    .expect("read");
                let expected = model.select(after, upto, limit, |entry| {
                    let meta = &entry.meta;
                    user.is_some_and(|user| meta.users.iter().any(|u| u == user))
                        || meta.clients.iter().any(|c| c == client)
                        || meta.nodes.iter().any(|n| n == node)
                });
                prop_assert_eq!(plain(read), expected);
            }
            Op::ReadEntriesAfter { after, limit } => {
                let read = log.entries_after(after, limit).expect("read");
                prop_assert_eq!(plain(read), model.select(after, u64::MAX, limit, |_| true));
            }
            Op::ReadEntryAt(added) => {
                let read = log.entry_at(added).expect("read");
                prop_assert_eq!(
                    read.map(|entry| Entry::clone(&entry)),
                    model.entries.get(&added).cloned()
                );
            }
            Op::RemoveBefore(before) => {
                let removed = log.remove_before(before).await.expect("retention");
                prop_assert_eq!(removed, model.remove_before(before));
            }
            Op::Reboot => {
                log.close().await.expect("close");
                drop(log);
                log = open(dir.path(), &listener, window);
            }
        }
        prop_assert_eq!(log.head(), model.last_added);
        for n in 0..ID_POOL_LEN {
            let id = id_of(n);
            prop_assert_eq!(
                log.added_of(&id).expect("read"),
                model.ids.get(&id).copied()
            );
        }
    }
    log.close().await.expect("close");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES_COUNT,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn log_matches_the_in_memory_model(
        ops in proptest::collection::vec(op(), 1..30),
        window in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(ops, window))?;
    }
}
