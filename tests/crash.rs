//! Crash safety: a real `ferry` child process is killed with SIGKILL at random moments while
//! clients write; after every kill, every action that was answered with `synced` must be in
//! the log exactly once, `added` must keep growing, and a subscriber must get the actions
//! again. A second run applies retention between restarts at odd positions (cutting through
//! blocks of log format 2): what it removed never comes back, what it kept is still there
//! once, and the writers' re-sends are still de-duplicated against the rewritten blocks. Also: SIGTERM shuts down cleanly and keeps the last acknowledged action.
//!
//! `FERRY_CRASH_ROUNDS` sets the number of kill rounds (default 4; the long run uses 100).

mod support;

use ferry::log::{Log, LogOptions};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::child::{connect, Ferry, NoListener, ROOM_CONFIG as CONFIG};
use tokio_tungstenite::tungstenite::Message;

const WRITERS: usize = 4;
const IN_FLIGHT_MAX: usize = 16;
const ID_EPOCH_MS: i64 = 1_700_000_000_000;
const CHANNEL: &str = "room/crash";

/// One writer: sends numbered actions, re-sends the unacknowledged ones after a restart,
/// and records which were answered with `synced`.
async fn write_until_dead(
    port: u16,
    writer: usize,
    next: &mut i64,
    unacked: &mut Vec<i64>,
    acked: &Arc<Mutex<HashSet<String>>>,
) {
    let node = format!("w{writer}:stable:tab");
    let Some((mut socket, base)) = connect(port, &node).await else {
        return;
    };
    let mut in_flight: HashMap<i64, i64> = HashMap::new();
    let mut resend = std::mem::take(unacked);
    loop {
        while in_flight.len() < IN_FLIGHT_MAX {
            let n = match resend.pop() {
                Some(n) => n,
                None => {
                    *next += 1;
                    *next
                }
            };
            let ms = ID_EPOCH_MS + n;
            let frame = json!(["sync", n, {"type": "room/message", "room": "crash", "n": n, "w": writer},
                {"id": ms - base, "time": ms - base}]);
            if socket.send(Message::text(frame.to_string())).await.is_err() {
                unacked.extend(in_flight.keys());
                unacked.push(n);
                return;
            }
            in_flight.insert(n, ms);
        }
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if value[0] == "synced" {
                    if let Some(n) = value[1].as_i64() {
                        if let Some(ms) = in_flight.remove(&n) {
                            acked
                                .lock()
                                .expect("acked set")
                                .insert(format!("{ms} {node} 0"));
                        }
                    }
                }
            }
            Some(Ok(_)) => {}
            None | Some(Err(_)) => {
                unacked.extend(in_flight.keys());
                return;
            }
        }
    }
}

/// What the checks between rounds know about the log.
#[derive(Default)]
struct Known {
    /// Highest head seen.
    head: u64,
    /// Positions of the acknowledged actions, as last read.
    positions: HashMap<String, u64>,
    /// Retention removed every entry below this position.
    removed_before: u64,
}

/// Opens the log of a stopped server and checks it against what was acknowledged: every
/// acknowledged action is there exactly once unless retention removed its position. With
/// `retain`, then removes all but about the newest `retain` entries, cutting through a block.
async fn check_log(dir: &Path, acked: &HashSet<String>, known: &mut Known, retain: Option<u64>) {
    let log = Log::open(dir, LogOptions::default(), Arc::new(NoListener)).expect("open log");
    let head = log.head();
    let entries = log
        .channel_since(CHANNEL, 0, head, usize::MAX)
        .expect("read channel");
    let mut seen = HashMap::new();
    let mut last_added = 0;
    for entry in &entries {
        assert!(entry.meta.added > last_added, "added grows along the log");
        last_added = entry.meta.added;
        assert!(
            seen.insert(entry.meta.id.clone(), entry.meta.added)
                .is_none(),
            "{} stored twice",
            entry.meta.id
        );
        assert!(
            entry.meta.added >= known.removed_before,
            "{} at {} came back after retention",
            entry.meta.id,
            entry.meta.added
        );
    }
    for id in acked {
        match (seen.get(id), known.positions.get(id)) {
            (Some(&added), _) => {
                known.positions.insert(id.clone(), added);
            }
            (None, Some(&added)) if added < known.removed_before => {}
            (None, _) => panic!("acknowledged action {id} lost"),
        }
    }
    assert!(
        head >= known.head,
        "head went back from {} to {head}",
        known.head
    );
    known.head = head;
    if let Some(keep) = retain.filter(|keep| head > *keep) {
        // An odd position, so the cut rarely falls on a block boundary.
        let before = (head - keep) | 1;
        log.remove_before(before).await.expect("retention");
        known.removed_before = known.removed_before.max(before);
        let first = log
            .channel_since(CHANNEL, 0, head, 1)
            .expect("read after retention");
        assert!(first.iter().all(|entry| entry.meta.added >= before));
    }
    log.close().await.expect("close log");
    drop(log);
}

/// Runs `rounds` of writers against a `ferry` child killed with SIGKILL at a random moment,
/// checking the log after each (see `check_log`); returns the data directory, the config
/// and the acknowledged ids.
async fn crash_rounds(
    rounds: usize,
    retain: Option<u64>,
) -> (tempfile::TempDir, Known, HashSet<String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let mut counters = [0i64; WRITERS];
    let mut unacked: Vec<Vec<i64>> = vec![Vec::new(); WRITERS];
    let mut known = Known::default();
    for round in 0..rounds {
        let ferry = Ferry::start(&data, &config).await;
        let port = ferry.port;
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let mut next = counters[writer];
            let mut pending = std::mem::take(&mut unacked[writer]);
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                write_until_dead(port, writer, &mut next, &mut pending, &acked).await;
                (next, pending)
            }));
        }
        let delay = rand::thread_rng().gen_range(50..400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        ferry.kill();
        for (writer, task) in tasks.into_iter().enumerate() {
            let (next, pending) = task.await.expect("writer task");
            counters[writer] = next;
            unacked[writer] = pending;
        }
        let snapshot = acked.lock().expect("acked set").clone();
        check_log(&data, &snapshot, &mut known, retain).await;
        eprintln!(
            "round {round}: killed after {delay} ms, {} acknowledged, head {}, removed below {}",
            snapshot.len(),
            known.head,
            known.removed_before
        );
    }
    let acked = acked.lock().expect("acked set").clone();
    assert!(!acked.is_empty(), "the writers got acknowledgements");
    (dir, known, acked)
}

/// `FERRY_CRASH_ROUNDS`, or `default`.
fn crash_rounds_count(default: usize) -> usize {
    std::env::var("FERRY_CRASH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_actions_survive_sigkill_and_retention_through_blocks() {
    let (_dir, known, acked) = crash_rounds(crash_rounds_count(4), Some(300)).await;
    assert!(known.removed_before > 1, "retention removed something");
    let kept = acked
        .iter()
        .filter(|id| {
            known
                .positions
                .get(*id)
                .is_some_and(|&added| added >= known.removed_before)
        })
        .count();
    assert!(kept > 0, "some acknowledged actions are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_actions_survive_sigkill_exactly_once() {
    let (dir, _known, acked) = crash_rounds(crash_rounds_count(4), None).await;
    let data = dir.path().join("data");
    let config = dir.path().join("ferry.toml");

    // A subscriber after the last restart gets every acknowledged action once.
    let ferry = Ferry::start(&data, &config).await;
    let (mut reader, base) = connect(ferry.port, "reader:r:t")
        .await
        .expect("reader connects");
    let subscribe =
        json!(["sync", 1, {"type": "logux/subscribe", "channel": CHANNEL}, {"id": 1, "time": 1}]);
    reader
        .send(Message::text(subscribe.to_string()))
        .await
        .expect("subscribe");
    let mut received = HashSet::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(10), reader.next()).await
    {
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text).expect("json");
        if value[0] == "synced" {
            break;
        }
        if value[0] == "sync" {
            for pair in value.as_array().expect("array")[2..].chunks(2) {
                let id = &pair[1]["id"];
                let absolute = format!(
                    "{} {} {}",
                    id[0].as_i64().expect("shift") + base,
                    id[1].as_str().expect("node"),
                    id[2]
                );
                assert!(
                    received.insert(absolute.clone()),
                    "{absolute} delivered twice"
                );
            }
        }
    }
    ferry.kill();
    for id in acked.iter() {
        assert!(
            received.contains(id),
            "acknowledged {id} not delivered on resync"
        );
    }
    eprintln!(
        "{} acknowledged, {} delivered to a new subscriber",
        acked.len(),
        received.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_keeps_the_last_acknowledged_action() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let ferry = Ferry::start(&data, &config).await;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let writer = {
        let acked = acked.clone();
        let port = ferry.port;
        tokio::spawn(async move {
            let mut next = 0;
            let mut pending = Vec::new();
            write_until_dead(port, 0, &mut next, &mut pending, &acked).await;
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = ferry.terminate();
    assert!(
        status.success(),
        "ferry exits with 0 after SIGTERM: {status}"
    );
    writer.await.expect("writer");
    let snapshot = acked.lock().expect("acked set").clone();
    assert!(!snapshot.is_empty());
    check_log(&data, &snapshot, &mut Known::default(), None).await;
}
