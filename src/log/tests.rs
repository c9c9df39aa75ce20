use super::*;
use crate::action::Meta;
use serde_json::json;
use std::sync::Mutex;

/// Records what the writer reports, in order.
#[derive(Default)]
struct Recorder {
    /// Every event, as text, shared with the hooks so their order can be checked.
    events: Arc<Mutex<Vec<String>>>,
    /// The entries of every `committed` call.
    groups: Mutex<Vec<Vec<Arc<Entry>>>>,
    /// What the durable group commits wrote, added up.
    written: Mutex<Written>,
}

impl CommitListener for Recorder {
    fn records_written(&self, written: Written) {
        let mut total = self.written.lock().expect("written lock");
        total.records += written.records;
        total.bytes += written.bytes;
    }

    fn committed(&self, entries: &[Arc<Entry>]) {
        let added: Vec<String> = entries.iter().map(|e| e.meta.added.to_string()).collect();
        self.events
            .lock()
            .expect("events lock")
            .push(format!("listener {}", added.join(",")));
        self.groups
            .lock()
            .expect("groups lock")
            .push(entries.to_vec());
    }
}

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.events.lock().expect("events lock").clone()
    }

    fn committed(&self) -> Vec<Arc<Entry>> {
        self.groups
            .lock()
            .expect("groups lock")
            .iter()
            .flatten()
            .cloned()
            .collect()
    }
}

fn entry(id: &str) -> Entry {
    Entry::new(
        json!({ "type": "test", "id": id }),
        Meta {
            id: id.to_owned(),
            time: 1,
            ..Meta::default()
        },
    )
}

fn in_channels(id: &str, channels: &[&str]) -> Entry {
    let mut entry = entry(id);
    entry.meta.channels = channels.iter().map(|c| (*c).to_owned()).collect();
    entry
}

fn targeted(id: &str, users: &[&str], clients: &[&str], nodes: &[&str]) -> Entry {
    let mut entry = entry(id);
    entry.meta.users = users.iter().map(|c| (*c).to_owned()).collect();
    entry.meta.clients = clients.iter().map(|c| (*c).to_owned()).collect();
    entry.meta.nodes = nodes.iter().map(|c| (*c).to_owned()).collect();
    entry
}

fn open(dir: &Path) -> (Log, Arc<Recorder>) {
    open_with(dir, LogOptions::default())
}

fn open_with(dir: &Path, options: LogOptions) -> (Log, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let log = Log::open(dir, options, recorder.clone()).expect("log opens");
    (log, recorder)
}

async fn reopen(log: Log, dir: &Path) -> (Log, Arc<Recorder>) {
    log.close().await.expect("log closes");
    drop(log);
    open(dir)
}

fn ids(entries: &[Arc<Entry>]) -> Vec<&str> {
    entries.iter().map(|e| e.meta.id.as_str()).collect()
}

fn positions(entries: &[Arc<Entry>]) -> Vec<u64> {
    entries.iter().map(|e| e.meta.added).collect()
}

async fn append_all(log: &Log, entries: Vec<Entry>) -> Vec<AppendOutcome> {
    log.append(entries, None).await.expect("append succeeds")
}

#[tokio::test]
async fn append_assigns_increasing_added_from_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    assert_eq!(log.head(), 0);
    let first = append_all(&log, vec![entry("1 a 0"), entry("2 a 0")]).await;
    let second = append_all(&log, vec![entry("3 a 0")]).await;
    assert_eq!(
        first,
        vec![AppendOutcome::Appended(1), AppendOutcome::Appended(2)]
    );
    assert_eq!(second, vec![AppendOutcome::Appended(3)]);
    assert_eq!(log.head(), 3);
    assert_eq!(log.added_of("2 a 0").expect("read"), Some(2));
    assert_eq!(log.added_of("9 a 0").expect("read"), None);
    let stored = log.entry_at(3).expect("read").expect("stored");
    assert_eq!(stored.meta.added, 3);
    assert_eq!(stored.meta.id, "3 a 0");
}

#[tokio::test]
async fn duplicate_within_a_batch_reports_the_earlier_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let outcomes = append_all(&log, vec![entry("1 a 0"), entry("2 a 0"), entry("1 a 0")]).await;
    assert_eq!(
        outcomes,
        vec![
            AppendOutcome::Appended(1),
            AppendOutcome::Appended(2),
            AppendOutcome::Duplicate(1),
        ]
    );
    assert_eq!(positions(&recorder.committed()), vec![1, 2]);
}

#[tokio::test]
async fn duplicate_across_batches_reports_the_stored_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    append_all(&log, vec![entry("1 a 0"), entry("2 a 0")]).await;
    let outcomes = append_all(&log, vec![entry("2 a 0"), entry("3 a 0")]).await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Duplicate(2), AppendOutcome::Appended(3)]
    );
    let only_duplicates = append_all(&log, vec![entry("1 a 0")]).await;
    assert_eq!(only_duplicates, vec![AppendOutcome::Duplicate(1)]);
    assert_eq!(positions(&recorder.committed()), vec![1, 2, 3]);
    assert_eq!(log.head(), 3);
}

#[tokio::test]
async fn hook_runs_after_the_flush_and_before_the_listener() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let events = recorder.events.clone();
    let hook_log = log.clone();
    let hook: DurableHook = Box::new(move |outcomes: &[AppendOutcome]| {
        let head_is_durable = outcomes.iter().all(|outcome| match outcome {
            AppendOutcome::Appended(added) | AppendOutcome::Duplicate(added) => {
                *added <= hook_log.head()
            }
        });
        events
            .lock()
            .expect("events lock")
            .push(format!("hook {outcomes:?} durable={head_is_durable}"));
    });
    let outcomes = log
        .append(vec![entry("1 a 0"), entry("1 a 0")], Some(hook))
        .await
        .expect("append succeeds");
    assert_eq!(
        recorder.events(),
        vec![
            format!("hook {outcomes:?} durable=true"),
            "listener 1".to_owned()
        ]
    );
}

#[tokio::test]
async fn empty_append_still_calls_the_hook() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let called = Arc::new(Mutex::new(false));
    let flag = called.clone();
    let outcomes = log
        .append(
            Vec::new(),
            Some(Box::new(move |_: &[AppendOutcome]| {
                *flag.lock().expect("flag lock") = true;
            })),
        )
        .await
        .expect("append succeeds");
    assert!(outcomes.is_empty());
    assert!(*called.lock().expect("flag lock"));
    assert!(
        recorder.events().is_empty(),
        "nothing new, no listener call"
    );
    assert_eq!(log.group_commits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_sees_entries_in_added_order_with_added_set() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let mut tasks = Vec::new();
    for task in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..5 {
                let id = format!("{n} t{task} 0");
                log.append(vec![entry(&id)], None).await.expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let committed = recorder.committed();
    assert_eq!(positions(&committed), (1..=40).collect::<Vec<u64>>());
    for entry in &committed {
        assert_eq!(
            log.added_of(&entry.meta.id).expect("read"),
            Some(entry.meta.added)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_only_grows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    let watcher_log = log.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher_done = done.clone();
    let watcher = tokio::spawn(async move {
        let mut last = 0;
        let mut samples = 0;
        while !watcher_done.load(Ordering::Acquire) {
            let head = watcher_log.head();
            assert!(head >= last, "head went back from {last} to {head}");
            last = head;
            samples += 1;
            tokio::task::yield_now().await;
        }
        samples
    });
    for n in 0..30 {
        let before = log.head();
        append_all(&log, vec![entry(&format!("{n} a 0"))]).await;
        assert!(log.head() > before);
    }
    log.remove_before(20).await.expect("retention");
    assert_eq!(log.head(), 30);
    done.store(true, Ordering::Release);
    assert!(watcher.await.expect("watcher") > 0);
}

#[tokio::test]
async fn reopen_preserves_entries_indexes_and_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        vec![
            in_channels("1 a 0", &["users/1"]),
            targeted("2 a 0", &["10"], &[], &[]),
        ],
    )
    .await;
    log.put_setting("node_id", "server:abc")
        .await
        .expect("setting");
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(log.head(), 2);
    assert_eq!(log.added_of("1 a 0").expect("read"), Some(1));
    let channel = log.channel_since("users/1", 0, u64::MAX, 10).expect("read");
    assert_eq!(ids(&channel), vec!["1 a 0"]);
    let targeted = log
        .targeted_since(Some("10"), "10:x", "10:x:1", 0, u64::MAX, 10)
        .expect("read");
    assert_eq!(ids(&targeted), vec!["2 a 0"]);
    assert_eq!(
        log.get_setting("node_id").expect("read").as_deref(),
        Some("server:abc")
    );
    assert_eq!(log.get_setting("missing").expect("read"), None);
    let outcomes = append_all(&log, vec![entry("1 a 0"), entry("3 a 0")]).await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Duplicate(1), AppendOutcome::Appended(3)]
    );
}

#[tokio::test]
async fn reopen_never_reuses_added_after_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(&log, (0..5).map(|n| entry(&format!("{n} a 0"))).collect()).await;
    assert_eq!(log.remove_before(u64::MAX).await.expect("retention"), 5);
    assert_eq!(log.entry_at(5).expect("read"), None);
    assert_eq!(log.added_of("4 a 0").expect("read"), None);
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(log.head(), 5);
    let outcomes = append_all(&log, vec![entry("4 a 0")]).await;
    assert_eq!(outcomes, vec![AppendOutcome::Appended(6)]);
}

#[tokio::test]
async fn setting_named_last_added_does_not_touch_the_counter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(&log, vec![entry("1 a 0")]).await;
    log.put_setting("last_added", "x").await.expect("setting");
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(log.head(), 1);
    assert_eq!(
        log.get_setting("last_added").expect("read").as_deref(),
        Some("x")
    );
}

#[tokio::test]
async fn channel_since_respects_bounds_and_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        vec![
            in_channels("1 a 0", &["a"]),
            in_channels("2 a 0", &["b"]),
            in_channels("3 a 0", &["a", "b"]),
            in_channels("4 a 0", &["ab"]),
            in_channels("5 a 0", &["a"]),
            in_channels("6 a 0", &["a"]),
        ],
    )
    .await;
    let read =
        |after, upto, limit| positions(&log.channel_since("a", after, upto, limit).expect("read"));
    assert_eq!(read(0, u64::MAX, 100), vec![1, 3, 5, 6]);
    assert_eq!(read(1, u64::MAX, 100), vec![3, 5, 6]);
    assert_eq!(read(1, 5, 100), vec![3, 5]);
    assert_eq!(read(0, 6, 2), vec![1, 3]);
    assert_eq!(read(0, 6, 0), Vec::<u64>::new());
    assert_eq!(read(6, 6, 10), Vec::<u64>::new());
    assert_eq!(read(5, 2, 10), Vec::<u64>::new());
    assert_eq!(read(u64::MAX, u64::MAX, 10), Vec::<u64>::new());
    let other = log.channel_since("ab", 0, u64::MAX, 10).expect("read");
    assert_eq!(positions(&other), vec![4]);
    assert!(log.channel_since("c", 0, 10, 10).expect("read").is_empty());
}

#[tokio::test]
async fn channel_tail_returns_the_newest_oldest_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        (1..=6)
            .map(|n| {
                in_channels(
                    &format!("{n} a 0"),
                    if n % 2 == 0 { &["e"] } else { &["o"] },
                )
            })
            .collect(),
    )
    .await;
    let tail = |upto, limit| positions(&log.channel_tail("e", upto, limit).expect("read"));
    assert_eq!(tail(u64::MAX, 2), vec![4, 6]);
    assert_eq!(tail(5, 2), vec![2, 4]);
    assert_eq!(tail(6, 10), vec![2, 4, 6]);
    assert_eq!(tail(1, 10), Vec::<u64>::new());
    assert_eq!(tail(6, 0), Vec::<u64>::new());
}

#[tokio::test]
async fn targeted_since_merges_users_clients_and_nodes_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        vec![
            targeted("1 a 0", &["10"], &[], &[]),
            targeted("2 a 0", &[], &["10:x"], &[]),
            targeted("3 a 0", &[], &[], &["10:x:1"]),
            targeted("4 a 0", &["10"], &["10:x"], &["10:x:1"]),
            targeted("5 a 0", &["11"], &["11:y"], &["11:y:1"]),
            targeted("6 a 0", &[], &["10:xy"], &["10:x:12"]),
            targeted("7 a 0", &["10"], &[], &[]),
        ],
    )
    .await;
    let read = |user, after, upto, limit| {
        positions(
            &log.targeted_since(user, "10:x", "10:x:1", after, upto, limit)
                .expect("read"),
        )
    };
    assert_eq!(read(Some("10"), 0, u64::MAX, 100), vec![1, 2, 3, 4, 7]);
    assert_eq!(read(None, 0, u64::MAX, 100), vec![2, 3, 4]);
    assert_eq!(read(Some("10"), 1, 4, 100), vec![2, 3, 4]);
    assert_eq!(read(Some("10"), 0, u64::MAX, 3), vec![1, 2, 3]);
    assert_eq!(read(Some("10"), 4, u64::MAX, 100), vec![7]);
    assert_eq!(read(Some("10"), 0, u64::MAX, 0), Vec::<u64>::new());
}

#[tokio::test]
async fn readers_skip_entries_removed_by_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        (1..=6)
            .map(|n| {
                let mut entry = in_channels(&format!("{n} a 0"), &["a"]);
                entry.meta.users = vec!["10".to_owned()];
                entry
            })
            .collect(),
    )
    .await;
    assert_eq!(log.remove_before(4).await.expect("retention"), 3);
    assert_eq!(log.remove_before(4).await.expect("retention"), 0);
    let channel = log.channel_since("a", 0, u64::MAX, 2).expect("read");
    assert_eq!(positions(&channel), vec![4, 5]);
    let tail = log.channel_tail("a", u64::MAX, 10).expect("read");
    assert_eq!(positions(&tail), vec![4, 5, 6]);
    let targeted = log
        .targeted_since(Some("10"), "c", "n", 0, u64::MAX, 2)
        .expect("read");
    assert_eq!(positions(&targeted), vec![4, 5]);
    assert_eq!(log.added_of("1 a 0").expect("read"), None);
}

#[tokio::test]
async fn readers_skip_index_records_without_entry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        (1..=3)
            .map(|n| in_channels(&format!("{n} a 0"), &["a"]))
            .collect(),
    )
    .await;
    // Simulate a posting that outlived its entry: the block keeps 1 and 3 only.
    let db = &log.inner.shared.db;
    let value = db
        .get(block_key(1))
        .expect("read block")
        .expect("one block");
    let block = Block::new(&block_key(1), value).expect("block");
    let kept: Vec<(u64, &[u8])> = block
        .entries()
        .map(|item| item.expect("entry"))
        .filter(|(added, _)| *added != 2)
        .collect();
    db.insert(block_key(1), encode_block(kept))
        .expect("rewrite block");
    // Such records only exist after a crash, so the window of recent entries starts empty.
    let (log, _) = reopen(log, dir.path()).await;
    let channel = log.channel_since("a", 0, u64::MAX, 10).expect("read");
    assert_eq!(positions(&channel), vec![1, 3]);
}

#[tokio::test]
async fn channel_with_nul_is_not_indexed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(&log, vec![in_channels("1 a 0", &["a\0b", "a"])]).await;
    assert!(log
        .channel_since("a\0b", 0, 10, 10)
        .expect("read")
        .is_empty());
    assert_eq!(
        positions(&log.channel_since("a", 0, 10, 10).expect("read")),
        vec![1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_share_group_commits() {
    const TASKS: usize = 50;
    const APPENDS_PER_TASK: usize = 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for n in 0..APPENDS_PER_TASK {
                let id = format!("{n} t{task} 0");
                // Each append repeats its id, so every group also sees duplicates.
                let outcomes = log
                    .append(vec![entry(&id), entry(&id)], None)
                    .await
                    .expect("append");
                match outcomes[..] {
                    [AppendOutcome::Appended(added), AppendOutcome::Duplicate(again)] => {
                        assert_eq!(added, again);
                        positions.push(added);
                    }
                    _ => panic!("unexpected outcomes {outcomes:?}"),
                }
            }
            positions
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let total = (TASKS * APPENDS_PER_TASK) as u64;
    all.sort_unstable();
    assert_eq!(all, (1..=total).collect::<Vec<u64>>());
    assert_eq!(log.head(), total);
    assert_eq!(positions(&recorder.committed()), all);
    assert!(
        log.group_commits() < total,
        "{} group commits for {total} appends",
        log.group_commits()
    );
    let tail = log.remove_before(u64::MAX).await.expect("retention");
    assert_eq!(tail as u64, total, "every entry stored exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_respects_the_entry_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = LogOptions {
        group_commit_entries_max: 3,
        writer_queue_len: 64,
        ..LogOptions::default()
    };
    let (log, recorder) = open_with(dir.path(), options);
    let mut tasks = Vec::new();
    for task in 0..20 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(vec![entry(&format!("1 t{task} 0"))], None)
                .await
                .expect("append")
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let groups = recorder.groups.lock().expect("groups lock");
    assert!(groups.iter().all(|group| group.len() <= 3));
    assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 20);
}

#[tokio::test]
async fn close_finishes_queued_appends_and_rejects_later_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    let queued = {
        let log = log.clone();
        tokio::spawn(async move { log.append(vec![entry("1 a 0")], None).await })
    };
    tokio::task::yield_now().await;
    log.close().await.expect("close");
    assert_eq!(
        queued.await.expect("task").expect("append"),
        vec![AppendOutcome::Appended(1)]
    );
    assert!(matches!(
        log.append(vec![entry("2 a 0")], None).await,
        Err(LogError::Closed)
    ));
    assert_eq!(log.head(), 1);
    assert_eq!(log.added_of("1 a 0").expect("read"), Some(1));
}

#[tokio::test]
async fn poisoned_log_refuses_appends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(&log, vec![entry("1 a 0")]).await;
    log.inner.shared.poison("disk on fire");
    let result = log.append(vec![entry("2 a 0")], None).await;
    assert!(matches!(result, Err(LogError::Poisoned(reason)) if reason == "disk on fire"));
    assert!(matches!(log.close().await, Err(LogError::Poisoned(_))));
    assert_eq!(log.added_of("1 a 0").expect("reads still work"), Some(1));
}

#[test]
fn open_outside_a_runtime_fails_without_panicking() {
    let dir = tempfile::tempdir().expect("temp dir");
    let result = Log::open(
        dir.path(),
        LogOptions::default(),
        Arc::new(Recorder::default()),
    );
    assert!(matches!(result, Err(LogError::Closed)));
}

#[tokio::test]
async fn tasks_are_stored_with_their_entry_only_when_it_is_new_and_survive_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    let add = |entry: usize| TaskOp::Add {
        queue: "10:a".to_owned(),
        entry,
        value: b"v".to_vec(),
    };
    log.append_with_tasks(vec![entry("1 a 0"), entry("2 a 0")], vec![add(1)], None)
        .await
        .expect("append");
    // A re-sent entry is a duplicate: it gets no second task.
    log.append_with_tasks(vec![entry("2 a 0")], vec![add(0)], None)
        .await
        .expect("append");
    log.append_with_tasks(vec![entry("3 a 0")], vec![add(0)], None)
        .await
        .expect("append");
    let tasks = log.tasks("10:a", 10).expect("tasks");
    assert_eq!(
        tasks.iter().map(|task| task.added).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(tasks[0].value, b"v");
    assert_eq!(log.tasks("10:b", 10).expect("tasks"), Vec::new());
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(
        log.task_queues().expect("queues"),
        vec![("10:a".to_owned(), 2)]
    );
    // Finishing a task and storing its answer is one write.
    log.append_with_tasks(
        vec![entry("4 server 0")],
        vec![TaskOp::Done {
            queue: "10:a".to_owned(),
            added: 2,
        }],
        None,
    )
    .await
    .expect("append");
    assert_eq!(
        log.tasks("10:a", 10)
            .expect("tasks")
            .iter()
            .map(|task| task.added)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        log.entries_after(2, 10)
            .expect("entries")
            .iter()
            .map(|entry| entry.meta.added)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );
    log.close().await.expect("close");
}

#[tokio::test]
async fn an_entry_with_a_fresh_id_is_stored_and_targeted_but_not_indexed_by_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    let mut answer = entry("5 server:x 0");
    answer.meta.fresh_id = true;
    answer.meta.clients = vec!["1:a".to_owned()];
    let outcomes = append_all(&log, vec![entry("1 a 0"), answer]).await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Appended(1), AppendOutcome::Appended(2)]
    );
    let stored = log.entry_at(2).expect("read").expect("stored");
    assert_eq!(stored.meta.id, "5 server:x 0");
    assert_eq!(log.added_of("1 a 0").expect("read"), Some(1));
    assert_eq!(log.added_of("5 server:x 0").expect("read"), None);
    let targeted = log
        .targeted_since(None, "1:a", "1:a:t", 0, 2, 10)
        .expect("read");
    assert_eq!(
        targeted.iter().map(|e| e.meta.added).collect::<Vec<_>>(),
        vec![2]
    );
}

#[tokio::test]
async fn reads_answer_the_same_from_the_recent_window_as_from_storage() {
    let with_window = tempfile::tempdir().expect("temp dir");
    let without_window = tempfile::tempdir().expect("temp dir");
    let (cached, _) = open(with_window.path());
    let (stored, _) = open_with(
        without_window.path(),
        LogOptions {
            recent_bytes: 0,
            ..LogOptions::default()
        },
    );
    for log in [&cached, &stored] {
        let mut answer = in_channels("9 server:x 0", &["room"]);
        answer.meta.fresh_id = true;
        let entries = vec![
            in_channels("1 a 0", &["room"]),
            in_channels("2 a 0", &["room", "other"]),
            answer,
        ];
        append_all(log, entries).await;
    }
    for added in 1..=4 {
        assert_eq!(
            cached.entry_at(added).expect("read"),
            stored.entry_at(added).expect("read"),
            "entry {added}"
        );
    }
    assert_eq!(
        cached.channel_tail("room", u64::MAX, 10).expect("read"),
        stored.channel_tail("room", u64::MAX, 10).expect("read")
    );
    assert!(
        !cached
            .entry_at(3)
            .expect("read")
            .expect("kept")
            .meta
            .fresh_id
    );

    cached.remove_before(3).await.expect("retention");
    assert_eq!(
        cached.entry_at(2).expect("read"),
        None,
        "retention wins over the window"
    );
    assert_eq!(
        ids(&cached.channel_tail("room", u64::MAX, 10).expect("read")),
        vec!["9 server:x 0"]
    );
    cached.close().await.expect("close");
    stored.close().await.expect("close");
}

/// Counts the entries of one object `obj`: its state is the count as text.
struct CountingReducer;

impl StateReducer for CountingReducer {
    fn object_key(&self, _entry: &Entry) -> Option<String> {
        Some("obj".to_owned())
    }

    fn reduce(&self, _key: &str, state: Option<&[u8]>, _entry: &Entry) -> Option<Vec<u8>> {
        let count: u64 = state
            .and_then(|bytes| std::str::from_utf8(bytes).ok())
            .and_then(|text| text.parse().ok())
            .unwrap_or(0);
        Some((count + 1).to_string().into_bytes())
    }
}

/// A log with `CountingReducer` whose flushes wait for permits of the returned gate.
fn open_gated(dir: &Path) -> (Log, Arc<tokio::sync::Semaphore>) {
    let log = Log::open_with_reducer(
        dir,
        LogOptions::default(),
        Arc::new(Recorder::default()),
        Some(Arc::new(CountingReducer)),
    )
    .expect("log opens");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *log.inner.shared.flush_gate.lock().expect("gate lock") = Some(Arc::clone(&gate));
    (log, gate)
}

/// Waits until the writer applied (not flushed) the state record of `obj` at `added`.
async fn state_applied(log: &Log, added: u64) {
    let key = keys::state_key("obj");
    for _ in 0..1_000 {
        let raw = log.inner.shared.db.get(&key).expect("sled get");
        if raw.is_some_and(|value| value.get(..8) == Some(&added.to_be_bytes()[..])) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("the writer never applied the state at {added}");
}

#[tokio::test]
async fn a_state_is_read_only_once_the_entries_it_covers_are_durable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, gate) = open_gated(dir.path());
    gate.add_permits(1);
    append_all(&log, vec![entry("1 a 0")]).await;
    let first = log.state("obj").await.expect("state").expect("stored");
    assert_eq!((first.added, first.state.as_slice()), (1, &b"1"[..]));

    let pending = log
        .submit(vec![entry("2 a 0")], Vec::new(), None)
        .await
        .expect("queued");
    state_applied(&log, 2).await;
    let early = tokio::time::timeout(Duration::from_millis(100), log.state("obj")).await;
    assert!(early.is_err(), "served a state before its flush: {early:?}");

    gate.add_permits(1);
    let second = log.state("obj").await.expect("state").expect("stored");
    assert_eq!((second.added, second.state.as_slice()), (2, &b"2"[..]));
    assert!(log.head() >= 2);
    pending.outcomes().await.expect("durable");
    let all = log.states_with_prefix("ob").await.expect("states");
    assert_eq!(all, vec![second]);
}

#[tokio::test]
async fn a_state_whose_flush_failed_is_never_served() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, gate) = open_gated(dir.path());
    gate.add_permits(1);
    append_all(&log, vec![entry("1 a 0")]).await;
    let pending = log
        .submit(vec![entry("2 a 0")], Vec::new(), None)
        .await
        .expect("queued");
    state_applied(&log, 2).await;
    let reader = {
        let log = log.clone();
        tokio::spawn(async move { log.state("obj").await })
    };
    let prefix_reader = {
        let log = log.clone();
        tokio::spawn(async move { log.states_with_prefix("obj").await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The flush of the second group fails: the log is poisoned before it could be durable.
    log.inner.shared.poison("disk on fire");
    gate.add_permits(1);
    assert!(matches!(
        pending.outcomes().await,
        Err(LogError::Poisoned(_))
    ));
    let read = reader.await.expect("reader task");
    assert!(
        matches!(read, Err(LogError::Poisoned(_))),
        "a state that never became durable was served: {read:?}"
    );
    let read = prefix_reader.await.expect("reader task");
    assert!(matches!(read, Err(LogError::Poisoned(_))), "{read:?}");
}

/// An action and its answer, as the pipeline stores them.
fn with_answer(id: &str, answer_id: &str) -> Vec<Entry> {
    let mut answer = targeted(answer_id, &[], &["10:a"], &[]);
    answer.meta.fresh_id = true;
    answer.meta.answers_previous = true;
    vec![entry(id), answer]
}

#[tokio::test]
async fn a_resend_queued_behind_its_unflushed_original_stores_no_second_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    // Both appends are queued before either is durable (a client re-sent on a new connection).
    let first = log
        .submit(with_answer("1 10:a:1 0", "1 server 0"), Vec::new(), None)
        .await
        .expect("queued");
    let resend = log
        .submit(with_answer("1 10:a:1 0", "2 server 0"), Vec::new(), None)
        .await
        .expect("queued");
    assert_eq!(
        first.outcomes().await.expect("durable"),
        vec![AppendOutcome::Appended(1), AppendOutcome::Appended(2)]
    );
    assert_eq!(
        resend.outcomes().await.expect("durable"),
        vec![AppendOutcome::Duplicate(1), AppendOutcome::Duplicate(1)]
    );
    assert_eq!(ids(&recorder.committed()), vec!["1 10:a:1 0", "1 server 0"]);
    assert_eq!(log.head(), 2);
    // An answer to an action stored in the same append is stored.
    let outcomes = append_all(&log, with_answer("2 10:a:1 0", "3 server 0")).await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Appended(3), AppendOutcome::Appended(4)]
    );
}

#[tokio::test]
async fn settings_and_retention_go_through_the_writer_and_stop_when_it_is_poisoned() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(&log, vec![entry("1 a 0"), entry("2 a 0")]).await;
    log.put_setting("cursor", "1").await.expect("setting");
    let commits = log.group_commits();
    log.inner.shared.poison("disk on fire");
    // Nothing is written to the store behind the writer's back once it refuses writes.
    let setting = log.put_setting("cursor", "2").await;
    assert!(matches!(setting, Err(LogError::Poisoned(_))), "{setting:?}");
    assert_eq!(log.get_setting("cursor").expect("read"), Some("1".into()));
    let removed = log.remove_before(u64::MAX).await;
    assert!(matches!(removed, Err(LogError::Poisoned(_))), "{removed:?}");
    assert!(log.entry_at(1).expect("read").is_some(), "retention wrote");
    assert_eq!(log.group_commits(), commits);
}

#[tokio::test]
async fn channel_positions_lists_the_indexed_positions_in_the_range() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    append_all(
        &log,
        vec![
            in_channels("1 a 0", &["room"]),
            in_channels("2 a 0", &["other"]),
            in_channels("3 a 0", &["room", "other"]),
            in_channels("4 a 0", &["room"]),
        ],
    )
    .await;
    assert_eq!(
        log.channel_positions("room", 0, 4).expect("read"),
        vec![1, 3, 4]
    );
    assert_eq!(log.channel_positions("room", 1, 3).expect("read"), vec![3]);
    assert_eq!(
        log.channel_positions("room", 4, 9).expect("read"),
        Vec::<u64>::new()
    );
    assert_eq!(
        log.channel_positions("room", u64::MAX, 9).expect("read"),
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn every_durable_record_is_counted_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    // The entry, its id, its channel index record, and `last_added`.
    append_all(&log, vec![in_channels("1 a 0", &["room"])]).await;
    let first = *recorder.written.lock().expect("written lock");
    assert_eq!(first.records, 4);
    assert!(first.bytes > 0);
    // A duplicate writes nothing.
    append_all(&log, vec![in_channels("1 a 0", &["room"])]).await;
    assert_eq!(*recorder.written.lock().expect("written lock"), first);
    // A setting is one record, and `last_added` is not rewritten for it.
    log.put_setting("cursor", "1").await.expect("setting");
    assert_eq!(recorder.written.lock().expect("written lock").records, 5);
}

/// A replicated message with an entry at `seq`.
fn replicated(seq: u64, entry: Entry) -> Replicated {
    Replicated {
        seq,
        entry: Some(entry),
        ..Replicated::default()
    }
}

async fn apply_all(log: &Log, messages: Vec<Replicated>) -> Vec<AppendOutcome> {
    log.apply(messages)
        .await
        .expect("queued")
        .outcomes()
        .await
        .expect("applied")
}

#[tokio::test]
async fn replicated_messages_are_stored_at_their_sequences_and_duplicates_beyond_the_window_are_skipped(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path());
    let outcomes = apply_all(
        &log,
        vec![
            replicated(2, in_channels("1 a:b:c 0", &["room/1"])),
            replicated(5, entry("2 a:b:c 0")),
        ],
    )
    .await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Appended(2), AppendOutcome::Appended(5)]
    );
    assert_eq!(log.head(), 5, "the head is the last sequence applied");
    // The same id again, later in the stream (another node's re-send after the window).
    let outcomes = apply_all(&log, vec![replicated(9, entry("1 a:b:c 0"))]).await;
    assert_eq!(outcomes, vec![AppendOutcome::Duplicate(2)]);
    assert_eq!(log.head(), 9, "a skipped message still moves the head");
    assert!(
        log.entry_at(9).expect("read").is_none(),
        "nothing stored at 9"
    );
    let history = log.channel_tail("room/1", log.head(), 10).expect("channel");
    assert_eq!(positions(&history), vec![2]);
    // A replay of applied sequences (after a restart) changes nothing.
    let outcomes = apply_all(&log, vec![replicated(5, entry("3 a:b:c 0"))]).await;
    assert_eq!(outcomes, vec![AppendOutcome::Duplicate(5)]);
    assert_eq!(log.added_of("3 a:b:c 0").expect("read"), None);
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(log.head(), 9, "the applied sequence survives a reopen");
    log.close().await.expect("close");
}

#[tokio::test]
async fn a_replicated_answer_is_kept_only_if_its_action_was_stored_at_the_named_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path());
    let mut answer = entry("10 server:x 0");
    answer.meta.fresh_id = true;
    let first_answer = Replicated {
        answers: Some(("1 a:b:c 0".to_owned(), 1)),
        ..replicated(2, answer.clone())
    };
    apply_all(&log, vec![replicated(1, entry("1 a:b:c 0")), first_answer]).await;
    // A re-send beyond the window: the action is a duplicate at 3, so its answer naming 3 is too.
    let mut second = answer.clone();
    second.meta.id = "11 server:y 0".to_owned();
    let outcomes = apply_all(
        &log,
        vec![
            replicated(3, entry("1 a:b:c 0")),
            Replicated {
                answers: Some(("1 a:b:c 0".to_owned(), 3)),
                ..replicated(4, second)
            },
        ],
    )
    .await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Duplicate(1), AppendOutcome::Duplicate(1)]
    );
    assert!(
        log.entry_at(2).expect("read").is_some(),
        "the first answer is stored"
    );
    assert!(
        log.entry_at(4).expect("read").is_none(),
        "the second is not"
    );
    log.close().await.expect("close");
}

#[tokio::test]
async fn a_task_created_by_a_replicated_message_is_finished_once_even_when_answered_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (log, _) = open(dir.path());
    let task = Replicated {
        task: Some(("q".to_owned(), b"{}".to_vec())),
        ..replicated(1, entry("1 a:b:c 0"))
    };
    apply_all(&log, vec![task]).await;
    assert_eq!(log.task_count("q").expect("count"), 1);
    let result = |seq: u64, id: &str| Replicated {
        requires: Some(("q".to_owned(), 1)),
        done: vec![("q".to_owned(), 1)],
        ..replicated(seq, entry(id))
    };
    // Two nodes answered the same task; the stream holds both results.
    let outcomes = apply_all(
        &log,
        vec![result(2, "2 server:a 0"), result(3, "3 server:b 0")],
    )
    .await;
    assert_eq!(
        outcomes,
        vec![AppendOutcome::Appended(2), AppendOutcome::Duplicate(3)]
    );
    assert_eq!(log.task_count("q").expect("count"), 0);
    assert_eq!(
        log.added_of("3 server:b 0").expect("read"),
        None,
        "the second result is dropped"
    );
    log.close().await.expect("close");
}

/// A client's `sync`: `count` actions in `room`, each followed by its `logux/processed`
/// answer targeted at the client, as the pipeline stores them.
fn client_sync(client: usize, room: usize, count: usize) -> Vec<Entry> {
    let mut entries = Vec::new();
    for n in 0..count {
        let mut action = in_channels(&format!("{n} {client}:c 0"), &[&format!("room/{room}")]);
        action.meta.users = vec![client.to_string()];
        let mut answer = targeted(
            &format!("{n} server:{client} 0"),
            &[],
            &[&format!("{client}:c")],
            &[],
        );
        answer.meta.fresh_id = true;
        answer.meta.answers_previous = true;
        entries.push(action);
        entries.push(answer);
    }
    entries
}

#[tokio::test]
async fn client_actions_with_answers_cost_at_most_one_and_a_half_records_each() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, recorder) = open(dir.path());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    set_flush_gate(&log, &gate);
    // A first group on its own, then 50 clients' syncs of 20 actions in 10 rooms queued
    // behind it, so that they share group commits as under load.
    let first = log
        .submit(client_sync(0, 0, 20), Vec::new(), None)
        .await
        .expect("submit");
    let mut pending = Vec::new();
    for client in 1..=50 {
        let sync = client_sync(client, client % 10, 20);
        pending.push(log.submit(sync, Vec::new(), None).await.expect("submit"));
    }
    gate.add_permits(1_000);
    first.outcomes().await.expect("first sync");
    for sync in pending {
        sync.outcomes().await.expect("sync");
    }
    let actions = 51 * 20;
    let records = recorder.written.lock().expect("written lock").records;
    assert!(
        records as f64 <= 1.5 * actions as f64,
        "{records} records for {actions} client actions"
    );
    // Everything is still readable through every index, and de-duplicated across blocks.
    assert_eq!(log.head(), 2 * actions as u64);
    let room = log
        .channel_since("room/3", 0, u64::MAX, 1_000)
        .expect("read");
    assert_eq!(room.len(), 5 * 20);
    let answers = log
        .targeted_since(None, "7:c", "7:c:1", 0, u64::MAX, 1_000)
        .expect("read");
    assert_eq!(answers.len(), 20);
    let again = log
        .append(client_sync(7, 7, 20), None)
        .await
        .expect("resend");
    assert!(again
        .iter()
        .all(|outcome| matches!(outcome, AppendOutcome::Duplicate(_))));
}

/// Lets the test hold the flusher (see `Shared::flush_gate`).
fn set_flush_gate(log: &Log, gate: &Arc<tokio::sync::Semaphore>) {
    *log.inner.shared.flush_gate.lock().expect("gate lock") = Some(Arc::clone(gate));
}

#[tokio::test]
async fn a_data_directory_of_log_format_1_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        // What Ferry before format 2 left: one record per entry and `last_added`.
        let db = sled::open(dir.path()).expect("sled opens");
        let mut key = vec![b'a'];
        key.extend_from_slice(&1u64.to_be_bytes());
        db.insert(key, &b"{}"[..]).expect("insert");
        db.insert(keys::last_added_key(), &1u64.to_be_bytes()[..])
            .expect("insert");
        db.flush().expect("flush");
    }
    let opened = Log::open(
        dir.path(),
        LogOptions::default(),
        Arc::new(Recorder::default()),
    );
    match opened {
        Err(LogError::UnsupportedFormat(message)) => {
            assert!(message.contains("format 1"), "{message}");
            assert!(message.contains("new --data-dir"), "{message}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a format 1 directory was opened"),
    }
    // A new directory is marked with the current format and opens again.
    let fresh = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(fresh.path());
    append_all(&log, vec![entry("1 a 0")]).await;
    let (log, _) = reopen(log, fresh.path()).await;
    assert_eq!(log.head(), 1);
}

#[tokio::test]
async fn a_data_directory_of_log_format_2_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        // Format 2 kept one `i` record per id, which format 3 does not read for Logux ids.
        let db = sled::open(dir.path()).expect("sled opens");
        db.insert(keys::format_key(), &2u32.to_be_bytes()[..])
            .expect("insert");
        db.flush().expect("flush");
    }
    let opened = Log::open(
        dir.path(),
        LogOptions::default(),
        Arc::new(Recorder::default()),
    );
    match opened {
        Err(LogError::UnsupportedFormat(message)) => {
            assert!(message.contains("format 2"), "{message}");
            assert!(message.contains("new --data-dir"), "{message}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a format 2 directory was opened"),
    }
}

#[tokio::test]
async fn an_action_resent_after_its_clock_stepped_back_is_still_a_duplicate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, _) = open(dir.path());
    // One node's ids: a run, then a clock step back into that run's range, in later groups.
    append_all(
        &log,
        (10..30).map(|time| entry(&format!("{time} a 0"))).collect(),
    )
    .await;
    append_all(
        &log,
        (15..25).map(|time| entry(&format!("{time} a 1"))).collect(),
    )
    .await;
    // The third group: two duplicates inside both runs, and one new id below them.
    let third = append_all(&log, vec![entry("20 a 0"), entry("20 a 1"), entry("5 a 0")]).await;
    assert_eq!(
        third,
        vec![
            AppendOutcome::Duplicate(11),
            AppendOutcome::Duplicate(26),
            AppendOutcome::Appended(31),
        ]
    );
    let outcomes = log
        .append(
            vec![
                entry("20 a 0"),
                entry("17 a 1"),
                entry("5 a 0"),
                entry("31 a 0"),
            ],
            None,
        )
        .await
        .expect("append");
    assert_eq!(
        outcomes,
        vec![
            AppendOutcome::Duplicate(11),
            AppendOutcome::Duplicate(23),
            AppendOutcome::Duplicate(31),
            AppendOutcome::Appended(32),
        ]
    );
    let (log, _) = reopen(log, dir.path()).await;
    assert_eq!(log.added_of("24 a 1").expect("read"), Some(30));
    assert_eq!(log.added_of("20 a 1").expect("read"), Some(26));
    assert_eq!(log.added_of("25 a 1").expect("read"), None);
}

#[tokio::test]
async fn retention_and_reads_work_across_many_small_blocks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = LogOptions {
        block_entries_max: 3,
        ..LogOptions::default()
    };
    let (log, _) = open_with(dir.path(), options.clone());
    // Two groups of 10 entries: blocks of 3, 3, 3 and 1 entries each.
    for group in 0..2 {
        let entries = (0..10)
            .map(|n| in_channels(&format!("{n} g{group} 0"), &["a", &format!("g{group}")]))
            .collect();
        append_all(&log, entries).await;
    }
    assert_eq!(log.inner.shared.db.scan_prefix([b'b']).count(), 8);
    // Inside the second block of the first group, then inside a block of the second.
    assert_eq!(log.remove_before(5).await.expect("retention"), 4);
    assert_eq!(log.remove_before(15).await.expect("retention"), 10);
    let (log, _) = {
        log.close().await.expect("close");
        drop(log);
        open_with(dir.path(), options)
    };
    let all = log.channel_since("a", 0, u64::MAX, 100).expect("read");
    assert_eq!(positions(&all), (15..=20).collect::<Vec<_>>());
    assert_eq!(log.channel_tail("a", u64::MAX, 2).expect("tail").len(), 2);
    assert!(log
        .channel_since("g0", 0, u64::MAX, 100)
        .expect("read")
        .is_empty());
    let after = log.entries_after(0, 100).expect("read");
    assert_eq!(positions(&after), (15..=20).collect::<Vec<_>>());
    assert_eq!(log.entry_at(14).expect("read"), None);
    assert_eq!(log.added_of("4 g1 0").expect("read"), Some(15));
    assert_eq!(log.added_of("3 g1 0").expect("read"), None);
    // De-duplication across blocks still holds for what is kept.
    let again = log
        .append(vec![in_channels("9 g1 0", &["a"])], None)
        .await
        .expect("append");
    assert_eq!(again, vec![AppendOutcome::Duplicate(20)]);
    // The removed postings are gone, not just skipped: only the second group's remain.
    let postings = log.inner.shared.db.scan_prefix([b'c']).count();
    assert_eq!(postings, 2, "one posting of `a` and one of `g1` remain");
}
