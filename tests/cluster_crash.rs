//! Crashes in cluster mode, against real processes: Ferry nodes and NATS servers killed with
//! SIGKILL while clients write through them. Whatever a node answered with `synced` must be
//! in the shared log exactly once and readable through every node; clients re-send what was
//! not answered and never see an `error` frame; a node that was down catches up.
//!
//! `FERRY_CLUSTER_CRASH_ROUNDS` sets the number of Ferry kill rounds (default 3).

mod support;

use rand::Rng;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::cluster::{http_get, metric, start_nodes, Client, Node, RULES};
use support::nats::NatsCluster;
use tokio::time::Instant;

/// The tests of this file run one at a time whatever `--test-threads` says: each runs three
/// NATS servers and two Ferry nodes flat out, and on two cores two of them at once turn
/// timeouts into failures and measurements into noise.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Actions one writer keeps unanswered at once.
const IN_FLIGHT_MAX: usize = 16;
/// Writer clients of the streaming tests.
const WRITERS: usize = 4;
/// Longest the writers may take to get every action answered once told to stop.
const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Longest a reader waits for a channel's history.
const READ_WAIT: Duration = Duration::from_secs(30);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the writers and the test share.
#[derive(Default)]
struct Shared {
    /// The port of each Ferry node, 0 while it is down.
    ports: Mutex<Vec<u16>>,
    /// `(writer, n)` of every action answered with `synced`.
    acked: Mutex<HashSet<(usize, u64)>>,
    /// Every `error` frame any writer connection received.
    errors: Mutex<Vec<Value>>,
    /// Writers send nothing new once set, and return when everything they sent is answered.
    stop: AtomicBool,
    /// Actions sent again on a new connection because the old one closed unanswered.
    resent: AtomicUsize,
    /// Connections the writers opened.
    sessions: AtomicUsize,
    /// When the test killed something (for the failover time).
    killed_at: Mutex<Option<Instant>>,
    /// The first `synced` after `killed_at` of an action sent after it.
    first_fresh_synced: Mutex<Option<Instant>>,
    /// The longest any action waited between its send and its `synced`.
    longest_wait: Mutex<Duration>,
}

impl Shared {
    fn new(ports: Vec<u16>) -> Arc<Shared> {
        Arc::new(Shared {
            ports: Mutex::new(ports),
            ..Shared::default()
        })
    }

    fn set_port(&self, node: usize, port: u16) {
        lock(&self.ports)[node] = port;
    }
}

/// Which node a writer connects to, and for how long.
#[derive(Clone, Copy)]
enum Policy {
    /// Node 0 three times out of four while it runs, otherwise any running node; a
    /// connection to another node than 0 ends by itself after 0.2-1 s (its unanswered
    /// actions are re-sent on the next one).
    MostlyFirst,
    /// Always this node (waiting while it is down); connections end only when closed.
    Fixed(usize),
}

/// One writer's numbers: every `n` it sent and has no `synced` for yet.
struct Writer {
    index: usize,
    room: &'static str,
    next: u64,
    unacked: BTreeSet<u64>,
    /// `n`s sent on the current connection, with their send time.
    in_flight: HashMap<u64, Instant>,
}

fn writer_node(index: usize) -> String {
    format!("w{index}:w{index}:t")
}

fn message(room: &str, writer: usize, n: u64) -> Value {
    json!({"type": "room/message", "room": room, "w": writer, "n": n})
}

/// Runs one writer until `stop` is set and all it sent is answered (or the drain takes
/// longer than `DRAIN_WAIT`); returns it with whatever is still unanswered.
async fn run_writer(shared: Arc<Shared>, mut writer: Writer, policy: Policy) -> Writer {
    let mut drain_deadline: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            if writer.unacked.is_empty() {
                return writer;
            }
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_WAIT);
            if Instant::now() >= deadline {
                return writer;
            }
        }
        let Some((node, port)) = pick_node(&shared, policy) else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(mut client) = Client::connect(port, &writer_node(writer.index), 0).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        shared.sessions.fetch_add(1, Ordering::Relaxed);
        let end = match policy {
            Policy::MostlyFirst if node != 0 => Some(
                Instant::now() + Duration::from_millis(rand::thread_rng().gen_range(200..1000)),
            ),
            _ => None,
        };
        session(&shared, &mut writer, &mut client, end).await;
        lock(&shared.errors).extend(client.errors.drain(..));
    }
}

fn pick_node(shared: &Shared, policy: Policy) -> Option<(usize, u16)> {
    let ports = lock(&shared.ports).clone();
    match policy {
        Policy::Fixed(node) => (ports[node] != 0).then(|| (node, ports[node])),
        Policy::MostlyFirst => {
            let mut rng = rand::thread_rng();
            if ports[0] != 0 && rng.gen_range(0..4) != 0 {
                return Some((0, ports[0]));
            }
            let live: Vec<(usize, u16)> = ports
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, port)| port != 0)
                .collect();
            (!live.is_empty()).then(|| live[rng.gen_range(0..live.len())])
        }
    }
}

/// One connection: re-sends the unanswered actions, then new ones (until `stop`), keeping
/// `IN_FLIGHT_MAX` unanswered; returns when the connection closes, `end` passes, or (after
/// `stop`) nothing is left unanswered.
async fn session(shared: &Shared, writer: &mut Writer, client: &mut Client, end: Option<Instant>) {
    let mut resend: Vec<u64> = writer.unacked.iter().rev().copied().collect();
    if !resend.is_empty() {
        shared.resent.fetch_add(resend.len(), Ordering::Relaxed);
    }
    writer.in_flight.clear();
    loop {
        while writer.in_flight.len() < IN_FLIGHT_MAX {
            let n = match resend.pop() {
                Some(n) => n,
                None if !shared.stop.load(Ordering::Acquire) => {
                    writer.next += 1;
                    writer.unacked.insert(writer.next);
                    writer.next
                }
                None => break,
            };
            if !client
                .send_action(n, message(writer.room, writer.index, n))
                .await
            {
                return;
            }
            writer.in_flight.insert(n, Instant::now());
        }
        if writer.in_flight.is_empty() {
            return;
        }
        let far = Instant::now() + Duration::from_secs(90);
        let Some(frame) = client.next_frame(end.unwrap_or(far).min(far)).await else {
            return;
        };
        if frame[0] != "synced" {
            continue;
        }
        let Some(n) = frame[1].as_u64() else { continue };
        let Some(sent) = writer.in_flight.remove(&n) else {
            continue;
        };
        writer.unacked.remove(&n);
        lock(&shared.acked).insert((writer.index, n));
        let now = Instant::now();
        {
            let mut longest = lock(&shared.longest_wait);
            *longest = (*longest).max(now - sent);
        }
        if let Some(killed) = *lock(&shared.killed_at) {
            if sent > killed {
                lock(&shared.first_fresh_synced).get_or_insert(now);
            }
        }
    }
}

/// Starts `WRITERS` writers on `room`.
fn spawn_writers(
    shared: &Arc<Shared>,
    room: &'static str,
    policy: impl Fn(usize) -> Policy,
) -> Vec<tokio::task::JoinHandle<Writer>> {
    (0..WRITERS)
        .map(|index| {
            let writer = Writer {
                index,
                room,
                next: 0,
                unacked: BTreeSet::new(),
                in_flight: HashMap::new(),
            };
            tokio::spawn(run_writer(shared.clone(), writer, policy(index)))
        })
        .collect()
}

/// Tells the writers to stop, waits until they got everything answered, and checks that
/// every action any of them sent was answered: the set of `(writer, n)` in the log.
async fn stop_writers(
    shared: &Shared,
    tasks: Vec<tokio::task::JoinHandle<Writer>>,
    nodes: &[Node],
) -> HashSet<(usize, u64)> {
    shared.stop.store(true, Ordering::Release);
    let mut sent = HashSet::new();
    for task in tasks {
        let writer = task.await.expect("writer task");
        assert!(
            writer.unacked.is_empty(),
            "writer {} still has {} unanswered actions ({:?}...) after {DRAIN_WAIT:?}\n{}",
            writer.index,
            writer.unacked.len(),
            writer.unacked.iter().take(10).collect::<Vec<_>>(),
            logs(nodes)
        );
        sent.extend((1..=writer.next).map(|n| (writer.index, n)));
    }
    let acked = lock(&shared.acked).clone();
    assert_eq!(acked, sent, "every sent action was answered in the end");
    acked
}

fn logs(nodes: &[Node]) -> String {
    nodes
        .iter()
        .map(Node::full_log)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `read_back` checks that each writer's actions are in the log in the order it
/// sent them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    Writers,
    Any,
}

/// A fresh client on `port` subscribes to `room/<room>` from the start and must receive
/// exactly `expected` (by writer and `n`), each once, each writer's in the order it wrote
/// them (with `Order::Writers`).
async fn read_back(
    port: u16,
    reader: &str,
    room: &str,
    expected: &HashSet<(usize, u64)>,
    nodes: &[Node],
    order: Order,
) {
    let mut client = Client::connect(port, reader, 0)
        .await
        .expect("reader connects");
    assert!(
        client
            .send_action(
                1,
                json!({"type": "logux/subscribe", "channel": format!("room/{room}")})
            )
            .await
    );
    let got_all = client
        .wait_received("room/message", expected.len(), READ_WAIT)
        .await;
    assert!(client.wait_acked(1, READ_WAIT).await, "subscribe answered");
    // Anything more (a duplicate) would arrive right behind.
    let deadline = Instant::now() + Duration::from_millis(500);
    while client.next_frame(deadline).await.is_some() {}
    let mut seen: HashMap<(usize, u64), usize> = HashMap::new();
    let mut last_of_writer: HashMap<usize, u64> = HashMap::new();
    let mut out_of_order = Vec::new();
    let mut added_of_last: HashMap<usize, u64> = HashMap::new();
    for (added, action, _) in &client.received {
        if action["type"] != "room/message" {
            continue;
        }
        let key = (
            action["w"].as_u64().unwrap_or(u64::MAX) as usize,
            action["n"].as_u64().unwrap_or(0),
        );
        *seen.entry(key).or_default() += 1;
        let last = last_of_writer.entry(key.0).or_default();
        let last_added = added_of_last.entry(key.0).or_default();
        if key.1 <= *last && out_of_order.len() < 10 {
            out_of_order.push(format!(
                "w{} n{} (sync frame added {added}) after n{} (added {})",
                key.0, key.1, *last, *last_added
            ));
        }
        if key.1 > *last {
            *last = key.1;
            *last_added = *added;
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, &count)| count > 1).collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|key| !seen.contains_key(key))
        .take(20)
        .collect();
    let extra: Vec<_> = seen
        .keys()
        .filter(|key| !expected.contains(key))
        .take(20)
        .collect();
    assert!(
        got_all && duplicates.is_empty() && missing.is_empty() && extra.is_empty(),
        "{reader} on port {port}: {} received for {} expected; duplicates {duplicates:?}; missing {missing:?}; unexpected {extra:?}\n{}",
        client.count("room/message"),
        expected.len(),
        logs(nodes)
    );
    assert!(
        order == Order::Any || out_of_order.is_empty(),
        "{reader}: a writer's actions out of its order: {out_of_order:?}\n{}",
        logs(nodes)
    );
    assert!(client.errors.is_empty(), "{reader}: {:?}", client.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_action_survives_sigkill_of_a_ferry_node_and_is_read_back_once_through_another(
) {
    let _serial = SERIAL.lock().await;
    let rounds: usize = std::env::var("FERRY_CLUSTER_CRASH_ROUNDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(3);
    let started = Instant::now();
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let shared = Shared::new(vec![nodes[0].port(), nodes[1].port()]);
    let tasks = spawn_writers(&shared, "crash", |_| Policy::MostlyFirst);
    for round in 1..=rounds {
        let delay = rand::thread_rng().gen_range(300..1500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let acked = lock(&shared.acked).len();
        shared.set_port(0, 0);
        nodes[0].kill();
        let down = rand::thread_rng().gen_range(0..700);
        tokio::time::sleep(Duration::from_millis(down)).await;
        nodes[0].keep_log(&format!("r{round}"));
        nodes[0].start().await;
        shared.set_port(0, nodes[0].port());
        eprintln!(
            "round {round}: node 0 killed after {delay} ms with {acked} acknowledged, down {down} ms"
        );
    }
    // Some writing through the restarted node before the end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = stop_writers(&shared, tasks, &nodes).await;
    let errors = lock(&shared.errors).clone();
    assert!(errors.is_empty(), "no client got an error: {errors:?}");
    let resent = shared.resent.load(Ordering::Relaxed);
    eprintln!(
        "{} acknowledged by the end, {resent} re-sent on {} connections",
        expected.len(),
        shared.sessions.load(Ordering::Relaxed)
    );
    assert!(resent > 0, "some actions were unanswered when a node died");
    read_back(
        nodes[1].port(),
        "r:r:t",
        "crash",
        &expected,
        &nodes,
        Order::Writers,
    )
    .await;
    read_back(
        nodes[0].port(),
        "q:q:t",
        "crash",
        &expected,
        &nodes,
        Order::Writers,
    )
    .await;
    eprintln!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_mid_stream_loses_nothing_acknowledged_and_no_client_gets_an_error(
) {
    let _serial = SERIAL.lock().await;
    // Long enough for most elections: connections mostly wait it out (some are closed and
    // re-send, which may reorder a writer's actions: see the NATS outage test).
    kill_the_stream_leader_mid_stream(10_000, Order::Any).await;
}

/// Streams through two nodes, kills the NATS stream leader, and checks that everything
/// answered is read back once through each node and no client got an error.
async fn kill_the_stream_leader_mid_stream(append_deadline_ms: u64, order: Order) {
    let started = Instant::now();
    let mut nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let extra = format!("append_deadline_ms = {append_deadline_ms}");
    let nodes = start_nodes(root.path(), 2, RULES, &nats, &extra).await;
    let leader = nats
        .wait_for_stream_leader("ferry", Duration::from_secs(20))
        .await;
    let shared = Shared::new(vec![nodes[0].port(), nodes[1].port()]);
    let tasks = spawn_writers(&shared, "leader", |index| Policy::Fixed(index % 2));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = lock(&shared.acked).len();
    assert!(before > 0, "the writers stream before the kill");
    let killed = Instant::now();
    *lock(&shared.killed_at) = Some(killed);
    nats.kill(leader);
    eprintln!("killed stream leader n{leader} with {before} acknowledged");
    let wait_until = killed + Duration::from_secs(40);
    while lock(&shared.first_fresh_synced).is_none() && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = *lock(&shared.first_fresh_synced);
    let first = first.unwrap_or_else(|| {
        panic!(
            "no action sent after the kill was answered within 40 s\n{}\n{}",
            logs(&nodes),
            nats.log_tails(&[0, 1, 2])
        )
    });
    let new_leader = nats
        .wait_for_stream_leader("ferry", Duration::from_secs(20))
        .await;
    eprintln!(
        "failover: first synced of an action sent after the kill {:?} after it; new stream leader n{new_leader}",
        first - killed
    );
    // Streaming goes on under the new leader: 200 more answers within 10 s.
    let after = lock(&shared.acked).len();
    let resumed = Instant::now();
    while lock(&shared.acked).len() < after + 200 {
        assert!(
            resumed.elapsed() < Duration::from_secs(10),
            "actions are answered under the new leader: {} more in 10 s\n{}\n{}",
            lock(&shared.acked).len() - after,
            logs(&nodes),
            nats.log_tails(&[0, 1, 2])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "200 more answered {:?} after that first one",
        resumed.elapsed()
    );
    let expected = stop_writers(&shared, tasks, &nodes).await;
    let errors = lock(&shared.errors).clone();
    assert!(errors.is_empty(), "no client got an error: {errors:?}");
    eprintln!(
        "{} acknowledged ({before} before the kill), {} re-sent on {} connections, longest wait for synced {:?}",
        expected.len(),
        shared.resent.load(Ordering::Relaxed),
        shared.sessions.load(Ordering::Relaxed),
        *lock(&shared.longest_wait)
    );
    read_back(nodes[0].port(), "r:r:t", "leader", &expected, &nodes, order).await;
    read_back(nodes[1].port(), "q:q:t", "leader", &expected, &nodes, order).await;
    nats.restart(leader).await;
    // The cluster takes appends with all three servers again.
    let mut client = Client::connect(nodes[0].port(), "x:x:t", 0)
        .await
        .expect("client after the restart");
    assert!(client.send_action(1, message("leader", 99, 1)).await);
    assert!(
        client.wait_acked(1, Duration::from_secs(20)).await,
        "an append after the NATS node returned\n{}",
        logs(&nodes)
    );
    eprintln!("took {:?}", started.elapsed());
}

/// Total actions written while node 1 is down.
const CATCH_UP_ACTIONS: u64 = 100_000;
/// Clients writing them.
const BULK_WRITERS: u64 = 4;
/// Action/meta pairs in one of their `sync` frames.
const BULK_FRAME_PAIRS: u64 = 500;
/// `sync` frames one bulk writer keeps unanswered.
const BULK_FRAMES_IN_FLIGHT: usize = 4;

/// Writes `count` actions (`n` = 1..=count) as writer `index` in `sync` frames of
/// `BULK_FRAME_PAIRS`, keeping `BULK_FRAMES_IN_FLIGHT` unanswered.
async fn bulk_write(port: u16, index: usize, count: u64) {
    bulk_write_from(port, index, 0, count).await;
}

/// `bulk_write` of `n` = `after + 1 ..= after + count`.
async fn bulk_write_from(port: u16, index: usize, after: u64, count: u64) {
    let count = after + count;
    let mut client = Client::connect(port, &writer_node(index), 0)
        .await
        .expect("bulk writer connects");
    let mut in_flight: HashSet<u64> = HashSet::new();
    let mut next = after + 1;
    while next <= count || !in_flight.is_empty() {
        while next <= count && in_flight.len() < BULK_FRAMES_IN_FLIGHT {
            let last = (next + BULK_FRAME_PAIRS - 1).min(count);
            let mut frame = vec![json!("sync"), json!(last)];
            for n in next..=last {
                let ms = 1_700_000_000_000_i64 + n as i64;
                frame.push(message("bulk", index, n));
                frame.push(json!({"id": ms - client.base, "time": ms - client.base}));
            }
            assert!(client.send(Value::Array(frame)).await, "bulk send");
            in_flight.insert(last);
            next = last + 1;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let frame = client
            .next_frame(deadline)
            .await
            .expect("bulk writer answer");
        if frame[0] == "synced" {
            if let Some(last) = frame[1].as_u64() {
                in_flight.remove(&last);
            }
        }
    }
    assert!(client.errors.is_empty(), "bulk writer: {:?}", client.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_after_others_wrote_100000_actions_catches_up_and_serves_since() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let a = nodes[0].port();
    // A subscriber on node 1 sees the room's first actions and remembers its position.
    let mut subscriber = Client::connect(nodes[1].port(), "s:s:t", 0)
        .await
        .expect("subscriber");
    assert!(subscriber.subscribe(1, "room/bulk", None).await);
    let mut early = Client::connect(a, "e:e:t", 0).await.expect("early writer");
    for n in 1..=10 {
        assert!(early.send_action(n, message("bulk", 99, n)).await);
    }
    assert!(early.wait_acked(10, Duration::from_secs(20)).await);
    assert!(
        subscriber
            .wait_received("room/message", 10, Duration::from_secs(20))
            .await
    );
    let synced = subscriber.synced;
    assert!(synced > 0, "the subscriber has a position");
    drop(subscriber);
    nodes[1].kill();

    let writing = Instant::now();
    let per_writer = CATCH_UP_ACTIONS / BULK_WRITERS;
    let writers: Vec<_> = (0..BULK_WRITERS as usize)
        .map(|index| tokio::spawn(bulk_write(a, index, per_writer)))
        .collect();
    for writer in writers {
        writer.await.expect("bulk writer");
    }
    let written = writing.elapsed();
    eprintln!(
        "wrote {CATCH_UP_ACTIONS} actions through node 0 in {written:?}: {:.0} actions/s ({BULK_WRITERS} clients, {BULK_FRAME_PAIRS} pairs per sync frame, {BULK_FRAMES_IN_FLIGHT} frames in flight each)",
        CATCH_UP_ACTIONS as f64 / written.as_secs_f64()
    );
    let head = metric(a, "ferry_cluster_applied_sequence")
        .await
        .expect("node 0 applied sequence") as u64;
    assert!(head >= synced + CATCH_UP_ACTIONS, "node 0 applied {head}");

    let restarted = Instant::now();
    nodes[1].start_unready().await;
    let b = nodes[1].port();
    let mut ready_while_behind = Vec::new();
    let caught_up = loop {
        let lag = metric(b, "ferry_cluster_view_lag_messages").await;
        let applied = metric(b, "ferry_cluster_applied_sequence").await;
        let ready = http_get(b, "/ready").await.map(|(status, _)| status);
        if let (Some(applied), Some(200)) = (applied, ready) {
            if (applied as u64) + 10_000 < head {
                ready_while_behind.push(applied as u64);
            }
        }
        if lag == Some(0.0) && applied.is_some_and(|applied| applied as u64 >= head) {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(60),
            "node 1 did not catch up: lag {lag:?}, applied {applied:?} of {head}\n{}",
            nodes[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "node 1 caught up with {} stream messages in {caught_up:?} (restart to lag 0): {:.0} messages/s; /ready 200 while more than 10000 behind at applied {ready_while_behind:?}",
        head - synced,
        (head - synced) as f64 / caught_up.as_secs_f64()
    );

    let mut back = Client::connect(b, "s:s:t", synced)
        .await
        .expect("subscriber comes back");
    let reading = Instant::now();
    let since = json!({"type": "logux/subscribe", "channel": "room/bulk",
        "since": {"id": "0 0 0", "time": 0, "added": synced}});
    assert!(back.send_action(2, since).await);
    let all = back
        .wait_received(
            "room/message",
            CATCH_UP_ACTIONS as usize,
            Duration::from_secs(60),
        )
        .await;
    assert!(back.wait_acked(2, Duration::from_secs(30)).await);
    let deadline = Instant::now() + Duration::from_millis(500);
    while back.next_frame(deadline).await.is_some() {}
    eprintln!(
        "the subscriber got {} actions since {synced} in {:?}",
        back.count("room/message"),
        reading.elapsed()
    );
    assert!(
        all,
        "got {} of {CATCH_UP_ACTIONS}",
        back.count("room/message")
    );
    let keys: Vec<(u64, u64)> = back
        .received
        .iter()
        .filter(|(_, action, _)| action["type"] == "room/message")
        .map(|(_, action, _)| {
            (
                action["w"].as_u64().unwrap_or(u64::MAX),
                action["n"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        keys.len(),
        CATCH_UP_ACTIONS as usize,
        "exactly the missed ones"
    );
    let unique: HashSet<(u64, u64)> = keys.iter().copied().collect();
    assert_eq!(unique.len(), keys.len(), "no duplicates");
    for index in 0..BULK_WRITERS {
        let ns: Vec<u64> = keys
            .iter()
            .filter(|(w, _)| *w == index)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            ns,
            (1..=per_writer).collect::<Vec<_>>(),
            "writer {index}'s actions, all, in its order"
        );
    }
    let added: Vec<u64> = back.received.iter().map(|(added, _, _)| *added).collect();
    assert!(
        added.windows(2).all(|pair| pair[0] <= pair[1]) && added.first() > Some(&synced),
        "delivered in log order, after {synced}"
    );
    assert!(back.errors.is_empty(), "{:?}", back.errors);
    eprintln!("took {:?}", started.elapsed());
}

/// Restarts of node 1 in the readiness test: the wrong answer lasts only until the first
/// applied batch updates the lag (tens of milliseconds), so one restart may miss it.
const READY_RESTARTS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_far_behind_the_stream_is_not_ready_until_its_view_is_close() {
    let _serial = SERIAL.lock().await;
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 2, RULES, &nats, "ready_lag_max = 100").await;
    let a = nodes[0].port();
    let mut wrongly_ready = Vec::new();
    for restart in 0..READY_RESTARTS {
        nodes[1].kill();
        // 2,000 actions (4,000 stream messages with their answers) while node 1 is down.
        let writers: Vec<_> = (0..4)
            .map(|index| tokio::spawn(bulk_write_from(a, index, 500 * restart as u64, 500)))
            .collect();
        for writer in writers {
            writer.await.expect("bulk writer");
        }
        let head = metric(a, "ferry_cluster_applied_sequence")
            .await
            .expect("node 0 applied sequence") as u64;
        nodes[1].start_unready().await;
        let b = nodes[1].port();
        let started = Instant::now();
        loop {
            // `/ready` first: the applied sequence only grows, so one read after a 200
            // that is still far behind was far behind at the time of the 200.
            let ready = http_get(b, "/ready").await.map(|(status, _)| status);
            let applied = metric(b, "ferry_cluster_applied_sequence").await;
            let lag = metric(b, "ferry_cluster_view_lag_messages").await;
            let applied = applied.unwrap_or(0.0) as u64;
            if std::env::var_os("FERRY_TRACE_READY").is_some() {
                eprintln!(
                    "{restart} {:?} ready {ready:?} applied {applied} lag {lag:?}",
                    started.elapsed()
                );
            }
            if ready == Some(200) && applied + 100 < head {
                wrongly_ready.push((restart, started.elapsed(), applied, lag, head));
            }
            if applied >= head {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "node 1 did not catch up: applied {applied} of {head}\n{}",
                nodes[1].log_tail()
            );
        }
        if !wrongly_ready.is_empty() {
            break;
        }
    }
    assert!(
        wrongly_ready.is_empty(),
        "node 1 answered /ready 200 while its view was more than ready_lag_max = 100 behind the stream head (restart, time since it listened, applied metric, lag metric, head): {:?}",
        &wrongly_ready[..wrongly_ready.len().min(10)]
    );
}

/// The append deadline of the NATS outage test.
const OUTAGE_DEADLINE_MS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_behind_one_that_failed_past_the_deadline_are_not_stored_before_it() {
    let _serial = SERIAL.lock().await;
    let mut nats = NatsCluster::start(1).await;
    let root = tempfile::tempdir().expect("tempdir");
    let extra = format!("append_deadline_ms = {OUTAGE_DEADLINE_MS}");
    let nodes = start_nodes(root.path(), 1, RULES, &nats, &extra).await;
    let shared = Shared::new(vec![nodes[0].port()]);
    let tasks = spawn_writers(&shared, "outage", |_| Policy::Fixed(0));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // NATS goes away while groups are in flight and queued. The group being published fails
    // at its deadline and its clients' connections close; the group queued behind it starts
    // then, with a deadline of its own, and NATS is back before that one passes.
    // Outages of 1.2, 1.5 and 1.8 deadlines sweep the moment NATS returns across the
    // second group's deadline (one outage shows the reordering about one time in three).
    for tenths in [12, 15, 18] {
        let before = lock(&shared.acked).len();
        nats.kill(0);
        tokio::time::sleep(Duration::from_millis(OUTAGE_DEADLINE_MS * tenths / 10)).await;
        nats.restart(0).await;
        eprintln!("NATS down {tenths}/10 deadlines and back; {before} acknowledged before");
        let resumed = Instant::now();
        while lock(&shared.acked).len() < before + 200 {
            assert!(
                resumed.elapsed() < Duration::from_secs(20),
                "appends resume after NATS returned\n{}",
                logs(&nodes)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let expected = stop_writers(&shared, tasks, &nodes).await;
    let errors = lock(&shared.errors).clone();
    assert!(errors.is_empty(), "no client got an error: {errors:?}");
    eprintln!(
        "{} acknowledged, {} re-sent on {} connections",
        expected.len(),
        shared.resent.load(Ordering::Relaxed),
        shared.sessions.load(Ordering::Relaxed)
    );
    read_back(
        nodes[0].port(),
        "r:r:t",
        "outage",
        &expected,
        &nodes,
        Order::Writers,
    )
    .await;
}
