//! Cluster mode with a back-end: `process` tasks and event hooks run once cluster-wide under
//! their leases, SyncMap states converge on every node, and a data directory that belongs to
//! another history (a replaced stream, a single-node log, a cluster view without `[cluster]`)
//! is refused at start. Real processes: a 3-node NATS JetStream cluster, Ferry children and
//! a test back-end in this process (one per node, so a call's node is known).

mod support;

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::backend::{backend_section, Call, Handler, TestBackend, SECRET};
use support::child::Ferry;
use support::cluster::{
    run_to_exit, start_nodes, start_nodes_each, write_config, Client, RULES as PLAIN_RULES,
};
use support::nats::NatsCluster;

const WAIT: Duration = Duration::from_secs(20);

/// Rules with back-end hooks: `room/:id` delivers events, `order/buy` is processed, and the
/// `notes` SyncMap. The `[backend]` section is added per node.
const HOOK_RULES: &str = r#"
env = "production"
subprotocol = 1
[auth]
any_user_token = "secret"
[[channels]]
pattern = "room/:id"
access = "anyone"
hooks = ["events"]
[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]
[[types]]
type = "order/buy"
access = "anyone"
hooks = ["process"]
[[types]]
type = "order/status"
access = "nobody"
[[sync_maps]]
plural = "notes"
access = "anyone"
[limits]
subscribe_history_max = 1000000
"#;

fn rules_with_backend(url: &str) -> String {
    format!("{HOOK_RULES}\n{}", backend_section(url, ""))
}

fn accepted() -> (u16, Value) {
    (200, json!({"result": "allowed"}))
}

/// Reads frames until nothing arrives for `quiet`.
async fn drain(client: &mut Client, quiet: Duration) {
    loop {
        let deadline = tokio::time::Instant::now() + quiet;
        if client.next_frame(deadline).await.is_none() {
            return;
        }
    }
}

/// The received actions of `kind` whose `id` field is `id`.
fn answers_to(client: &Client, kind: &str, id: &str) -> usize {
    client
        .received
        .iter()
        .filter(|(_, action, _)| action["type"] == kind && action["id"] == id)
        .count()
}

async fn wait_until(wait: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_task_whose_node_is_killed_mid_call_finishes_once_on_another_node() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    // The first `process` call (whichever node makes it) is held open, like a back-end that
    // is slow to charge a card, until its node is killed; every later call is answered.
    let victim: Arc<Mutex<Option<usize>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut backends = Vec::new();
    for i in 0..2 {
        let (victim, killed) = (victim.clone(), killed.clone());
        let handler: Handler = Arc::new(move |call: &Call| {
            if call.hook != "process" {
                return accepted();
            }
            let holder = *victim.lock().expect("victim").get_or_insert(i);
            if holder == i && !killed.load(Ordering::SeqCst) {
                return (200, json!({"delay_ms": 600_000}));
            }
            let client = call.body["client_id"].as_str().unwrap_or("").to_owned();
            (
                200,
                json!({"result": "processed", "actions": [{
                    "id": "order-1-paid",
                    "action": {"type": "order/status", "order": 1, "status": "paid"},
                    "clients": [client]
                }]}),
            )
        });
        backends.push(TestBackend::start(handler).await);
    }
    let urls: Vec<String> = backends.iter().map(TestBackend::url).collect();
    let mut nodes = start_nodes_each(
        root.path(),
        2,
        |i| rules_with_backend(&urls[i]),
        &nats,
        "lease_ms = 1000",
    )
    .await;
    let mut buyer = Client::connect(nodes[0].port(), "10:buyer:1", 0)
        .await
        .expect("buyer");
    assert!(
        buyer
            .send_action(1, json!({"type": "order/buy", "order": 1}))
            .await
    );
    assert!(buyer.wait_acked(1, WAIT).await, "the action is stored");
    let key = buyer.id_of(1);
    let called = wait_until(WAIT, || victim.lock().expect("victim").is_some()).await;
    assert!(called, "the back-end was called\n{}", nodes[0].log_tail());
    let held = victim.lock().expect("victim").expect("victim");
    let survivor = 1 - held;
    nodes[held].kill();
    killed.store(true, Ordering::SeqCst);
    let held_calls = backends[held].calls_of("process");
    assert_eq!(held_calls.len(), 1, "one call before the kill");
    assert_eq!(held_calls[0].idempotency_key.as_deref(), Some(key.as_str()));

    // The surviving node takes the queue's lease over once it expires and calls again.
    let retried = wait_until(WAIT, || {
        backends[survivor]
            .calls_of("process")
            .iter()
            .any(|call| call.idempotency_key.as_deref() == Some(key.as_str()))
    })
    .await;
    assert!(
        retried,
        "the survivor (node{survivor}) called the back-end with the same key\n{}",
        nodes[survivor].log_tail()
    );
    assert!(backends[survivor]
        .calls_of("process")
        .iter()
        .all(|call| call.idempotency_key.as_deref() == Some(key.as_str()) && call.signature_ok));

    // The author reconnects from scratch to the survivor: its answer comes on catch-up, once.
    // The answer is appended right after the call: let it settle first, so that this counts
    // what the log holds (a connect racing with the append is the next test's subject).
    drop(buyer);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let back = processed_on(&nodes[survivor], &key, "survivor").await;
    assert_eq!(back.count("order/status"), 1, "{:?}", back.received);
    drop(back);

    // The killed node comes back: its view of the stream holds the same single answer.
    nodes[held].start().await;
    // Let its view catch up and a resumed loop (its task may still be on its disk) call
    // again: the result of such a second call must not be stored.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let there = processed_on(&nodes[held], &key, "restarted node").await;
    assert_eq!(there.count("order/status"), 1, "{:?}", there.received);
    let mut again = Client::connect(nodes[survivor].port(), "10:buyer:1", 0)
        .await
        .expect("reconnect to the survivor");
    drain(&mut again, Duration::from_millis(700)).await;
    assert_eq!(answers_to(&again, "logux/processed", &key), 1);
    assert!(there.errors.is_empty() && again.errors.is_empty());
}

/// POSTs `body` to a node's server API with the back-end secret; its status (0 when the
/// node did not answer).
async fn api_post(port: u16, path: &str, body: &str) -> u16 {
    let headers = format!("Authorization: Bearer {SECRET}\r\nContent-Type: application/json\r\n");
    support::cluster::http_request(port, "POST", path, &headers, body)
        .await
        .map_or(0, |(status, _)| status)
}

// Found by this test: the connect catch-up of a cluster node first waits for its view to
// reach the stream head (`Cluster::caught_up`) and only then opens the catch-up
// (`Outbound::CatchupPending`). The connection is registered in the hub before that wait, so
// an entry targeted at the client that the view applies during the wait is delivered live
// (not held, and not remembered, since no catch-up has run) and then sent again by the
// catch-up, which reads up to the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connecting_while_the_view_catches_up_gets_each_targeted_action_once() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let backend = TestBackend::start(Arc::new(|_: &Call| accepted())).await;
    let url = backend.url();
    let mut nodes = start_nodes_each(root.path(), 2, |_| rules_with_backend(&url), &nats, "").await;
    // The second node is down while the first stores actions for client 9:target.
    assert!(nodes[1].stop().is_some());
    const ACTIONS: usize = 4_000;
    for batch in 0..ACTIONS / 500 {
        let actions: Vec<Value> = (0..500)
            .map(|k| {
                let n = batch * 500 + k;
                json!({"id": format!("for-target-{n}"),
                    "action": {"type": "order/status", "n": n},
                    "clients": ["9:target"]})
            })
            .collect();
        let body = json!({ "actions": actions }).to_string();
        assert_eq!(
            api_post(nodes[0].port(), "/api/v1/actions", &body).await,
            200
        );
    }
    // It comes back and the client connects at once, while its view applies the backlog.
    let log = nodes[1].dir.with_extension("log");
    let ferry = Ferry::start_logging(&nodes[1].dir, &nodes[1].config, Some(&log)).await;
    let port = ferry.port;
    nodes[1].ferry = Some(ferry);
    let mut target = Client::connect(port, "9:target:t", 0)
        .await
        .expect("target");
    let deadline = tokio::time::Instant::now() + WAIT;
    while target.count("order/status") < ACTIONS {
        if target.next_frame(deadline).await.is_none() {
            break;
        }
    }
    drain(&mut target, Duration::from_millis(700)).await;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for (_, action, _) in &target.received {
        if action["type"] == "order/status" {
            *counts
                .entry(action["n"].as_i64().unwrap_or(-1))
                .or_insert(0) += 1;
        }
    }
    let repeated: Vec<(i64, usize)> = counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(n, count)| (*n, *count))
        .collect();
    assert_eq!(counts.len(), ACTIONS, "every action arrived");
    assert!(
        repeated.is_empty(),
        "{} of {ACTIONS} actions arrived more than once, e.g. {:?}",
        repeated.len(),
        &repeated[..repeated.len().min(10)]
    );
}

/// Sends a SyncMap action with explicit id time and time `at` (ms after a fixed base), so
/// that two clients can write the same object at chosen, distinct times.
async fn send_at(client: &mut Client, n: u64, at: i64, action: Value) -> bool {
    let ms = 1_700_000_000_000_i64 + at;
    let frame = json!(["sync", n, action, {"id": ms - client.base, "time": ms - client.base}]);
    client.send(frame).await
}

const FIELDS: [&str; 4] = ["title", "body", "done", "tag"];

/// The fields of `notes/<id>` as a subscriber's SyncMap ends up with them: field -> (value,
/// absolute time), the newest write of each field winning, as in a Logux client. (The state
/// comes first; channel entries newer than the state's position follow it, and those may be
/// older writes that lost.)
fn snapshot(client: &Client) -> BTreeMap<String, (Value, i64)> {
    let mut fields = BTreeMap::new();
    for (_, action, meta) in &client.received {
        if action["type"] != "notes/changed" {
            continue;
        }
        let time = meta["time"].as_i64().unwrap_or(0) + client.base;
        for (name, value) in action["fields"].as_object().into_iter().flatten() {
            let newer = fields
                .get(name)
                .is_none_or(|(_, seen): &(Value, i64)| time > *seen);
            if newer {
                fields.insert(name.clone(), (value.clone(), time));
            }
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_map_edited_concurrently_through_two_nodes_converges_to_the_same_state_on_both() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, PLAIN_RULES, &nats, "").await;
    let mut a = Client::connect(nodes[0].port(), "1:a:t", 0)
        .await
        .expect("a");
    let mut b = Client::connect(nodes[1].port(), "2:b:t", 0)
        .await
        .expect("b");
    let base = 1_700_000_000_000_i64;
    // field -> (value, time) of the write that must win.
    let mut expected: BTreeMap<String, (Value, i64)> = BTreeMap::new();
    let create = json!({"type": "notes/create", "id": "1",
        "fields": {"title": "t0", "body": "b0", "done": false, "tag": "x"}});
    assert!(send_at(&mut a, 1, 1, create).await);
    assert!(a.wait_acked(1, WAIT).await, "created");
    for field in FIELDS {
        let value = match field {
            "title" => json!("t0"),
            "body" => json!("b0"),
            "done" => json!(false),
            _ => json!("x"),
        };
        expected.insert(field.to_owned(), (value, base + 1));
    }
    // a writes even times newest first, b odd times oldest first: the stream order is far
    // from the time order, and every field is written by both.
    let mut record = |who: &str, at: i64| {
        let field = FIELDS[usize::try_from(at).unwrap_or(0) % FIELDS.len()];
        let value = json!(format!("{who}{at}"));
        let wins = expected
            .get(field)
            .is_none_or(|(_, time)| base + at > *time);
        if wins {
            expected.insert(field.to_owned(), (value.clone(), base + at));
        }
        (field, value)
    };
    let a_times: Vec<i64> = (0..20).map(|k| 100 - 2 * k).collect();
    let b_times: Vec<i64> = (0..20).map(|k| 61 + 2 * k).collect();
    let mut a_frames = Vec::new();
    let mut b_frames = Vec::new();
    for &at in &a_times {
        let (field, value) = record("a", at);
        a_frames.push((
            at,
            json!({"type": "notes/change", "id": "1", "fields": {field: value}}),
        ));
    }
    for &at in &b_times {
        let (field, value) = record("b", at);
        b_frames.push((
            at,
            json!({"type": "notes/change", "id": "1", "fields": {field: value}}),
        ));
    }
    let send_a = async {
        for (n, (at, action)) in (2..).zip(a_frames) {
            assert!(send_at(&mut a, n, at, action).await);
        }
        assert!(a.wait_acked(21, WAIT).await, "a's changes acknowledged");
    };
    let send_b = async {
        for (n, (at, action)) in (1..).zip(b_frames) {
            assert!(send_at(&mut b, n, at, action).await);
        }
        assert!(b.wait_acked(20, WAIT).await, "b's changes acknowledged");
    };
    tokio::join!(send_a, send_b);
    assert!(
        a.errors.is_empty() && b.errors.is_empty(),
        "{:?} {:?}",
        a.errors,
        b.errors
    );

    let mut states = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut fresh = Client::connect(node.port(), &format!("{}:fresh{i}:t", 3 + i), 0)
            .await
            .expect("fresh subscriber");
        assert!(
            fresh.subscribe(1, "notes/1", None).await,
            "subscribed on node{i}"
        );
        drain(&mut fresh, Duration::from_millis(300)).await;
        states.push(snapshot(&fresh));
    }
    let undone = |client: &Client| client.count("logux/undo");
    assert_eq!(
        (undone(&a), undone(&b)),
        (0, 0),
        "no change was undone: {:?} {:?}",
        a.received,
        b.received
    );
    assert_eq!(
        states[0], expected,
        "node0's state is the last write of each field (node1: {:?})",
        states[1]
    );
    assert_eq!(states[1], states[0], "both nodes give the same state");
}

/// One accepted `events` call: the node whose back-end got it, and its events.
type Delivery = (usize, Vec<Value>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_hooks_are_delivered_once_per_action_cluster_wide() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    // (node, events of one call) as each back-end accepted them.
    let delivered: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let mut backends = Vec::new();
    for i in 0..2 {
        let delivered = delivered.clone();
        let handler: Handler = Arc::new(move |call: &Call| {
            if call.hook == "events" {
                let events = call.body["events"].as_array().cloned().unwrap_or_default();
                delivered.lock().expect("delivered").push((i, events));
            }
            accepted()
        });
        backends.push(TestBackend::start(handler).await);
    }
    let urls: Vec<String> = backends.iter().map(TestBackend::url).collect();
    let nodes = start_nodes_each(
        root.path(),
        2,
        |i| rules_with_backend(&urls[i]),
        &nats,
        "lease_ms = 1000",
    )
    .await;
    let mut a = Client::connect(nodes[0].port(), "1:a:t", 0)
        .await
        .expect("a");
    let mut b = Client::connect(nodes[1].port(), "2:b:t", 0)
        .await
        .expect("b");
    const PER_CLIENT: u64 = 30;
    tokio::join!(
        send_to_rooms(&mut a, PER_CLIENT),
        send_to_rooms(&mut b, PER_CLIENT)
    );
    let mut ids: Vec<String> = (1..=PER_CLIENT).map(|n| a.id_of(n)).collect();
    ids.extend((1..=PER_CLIENT).map(|n| b.id_of(n)));
    let count_ids = || -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (_, events) in delivered.lock().expect("delivered").iter() {
            for event in events {
                let id = event["meta"]["id"].as_str().unwrap_or("").to_owned();
                *counts.entry(id).or_insert(0) += 1;
            }
        }
        counts
    };
    let all = wait_until(WAIT, || count_ids().len() >= ids.len()).await;
    assert!(
        all,
        "every action reached the events hook: {} of {}\n{}\n{}",
        count_ids().len(),
        ids.len(),
        nodes[0].log_tail(),
        nodes[1].log_tail()
    );
    // A repeat would arrive soon after: both nodes poll at least every second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let counts = count_ids();
    for id in &ids {
        assert_eq!(counts.get(id), Some(&1), "{id} delivered once: {counts:?}");
    }
    assert_eq!(
        counts.len(),
        ids.len(),
        "nothing else delivered: {counts:?}"
    );
    let delivered = delivered.lock().expect("delivered").clone();
    let added: Vec<u64> = delivered
        .iter()
        .flat_map(|(_, events)| {
            events
                .iter()
                .map(|event| event["added"].as_u64().unwrap_or(0))
        })
        .collect();
    assert!(
        added.windows(2).all(|pair| pair[0] < pair[1]),
        "in log order across the cluster: {added:?}"
    );
    let events_calls: usize = backends.iter().map(|b| b.calls_of("events").len()).sum();
    assert_eq!(events_calls, delivered.len(), "no failed or repeated call");
    for (_, events) in &delivered {
        for event in events {
            let channels = &event["meta"]["channels"];
            assert!(
                channels.as_array().is_some_and(|channels| channels
                    .iter()
                    .any(|c| c.as_str().is_some_and(|c| c.starts_with("room/")))),
                "an event of a channel with the hook: {event}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_a_replaced_stream_is_refused_at_start() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let mut nodes = start_nodes(root.path(), 1, PLAIN_RULES, &nats, "").await;
    let mut client = Client::connect(nodes[0].port(), "1:a:t", 0)
        .await
        .expect("client");
    for n in 1..=3 {
        let action = json!({"type": "room/message", "room": "1", "n": n});
        assert!(client.send_action(n, action).await);
    }
    assert!(client.wait_acked(3, WAIT).await);
    drop(client);
    let stopped = nodes[0].stop().expect("stopped");
    assert!(stopped.success(), "a clean stop: {stopped:?}");

    let connection = async_nats::connect(nats.url(0))
        .await
        .expect("connect to NATS");
    let jetstream = async_nats::jetstream::new(connection);
    let deleted = jetstream
        .delete_stream("ferry")
        .await
        .expect("delete stream");
    assert!(deleted.success);

    let exited = run_to_exit(&nodes[0].dir, &nodes[0].config, WAIT).await;
    let status = exited.status.expect("ferry exits instead of serving");
    assert!(!status.success(), "a failure exit: {exited:?}");
    assert!(
        exited.output.contains("stream \"ferry ") && exited.output.contains("deleted"),
        "the error names the stream and says it was replaced: {}",
        exited.output
    );
    assert!(
        !exited.output.contains("ferry listening"),
        "it never served: {}",
        exited.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_data_directory_is_refused_by_a_cluster_node_and_the_reverse() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let plain_config = root.path().join("plain.toml");
    std::fs::write(&plain_config, PLAIN_RULES).expect("write config");
    let cluster_config = root.path().join("cluster.toml");
    write_config(&cluster_config, PLAIN_RULES, &nats, "ferry", "");

    // A single-node log with something in it, then [cluster].
    let single = root.path().join("single");
    let ferry = Ferry::start(&single, &plain_config).await;
    let mut client = Client::connect(ferry.port, "1:a:t", 0)
        .await
        .expect("client");
    let action = json!({"type": "room/message", "room": "1", "n": 1});
    assert!(client.send_action(1, action).await);
    assert!(client.wait_acked(1, WAIT).await);
    drop(client);
    assert!(ferry.terminate().success());
    let exited = run_to_exit(&single, &cluster_config, WAIT).await;
    let status = exited.status.expect("ferry exits instead of serving");
    assert!(!status.success(), "a failure exit: {exited:?}");
    assert!(
        exited.output.contains("single-node log"),
        "the error says why: {}",
        exited.output
    );

    // A cluster node's view, then without [cluster].
    let mut nodes = start_nodes(root.path(), 1, PLAIN_RULES, &nats, "").await;
    let mut client = Client::connect(nodes[0].port(), "2:b:t", 0)
        .await
        .expect("client");
    let action = json!({"type": "room/message", "room": "1", "n": 2});
    assert!(client.send_action(1, action).await);
    assert!(client.wait_acked(1, WAIT).await);
    drop(client);
    assert!(nodes[0].stop().expect("stopped").success());
    let exited = run_to_exit(&nodes[0].dir, &plain_config, WAIT).await;
    let status = exited.status.expect("ferry exits instead of serving");
    assert!(!status.success(), "a failure exit: {exited:?}");
    assert!(
        exited.output.contains("cluster node's view") && exited.output.contains("[cluster]"),
        "the error says why: {}",
        exited.output
    );
    // Both directories still work with their own configuration.
    let ferry = Ferry::start(&single, &plain_config).await;
    drop(ferry);
    nodes[0].start().await;
}

/// The author `10:buyer:1` connects from scratch to `node`: its `logux/processed` for
/// `key` comes on the connect catch-up, exactly once.
async fn processed_on(node: &support::cluster::Node, key: &str, which: &str) -> Client {
    let mut client = Client::connect(node.port(), "10:buyer:1", 0)
        .await
        .expect("connect the author");
    let deadline = tokio::time::Instant::now() + WAIT;
    while answers_to(&client, "logux/processed", key) == 0 {
        if client.next_frame(deadline).await.is_none() {
            break;
        }
    }
    drain(&mut client, Duration::from_millis(700)).await;
    assert_eq!(
        answers_to(&client, "logux/processed", key),
        1,
        "one processed on the {which}: {:?}\n{}",
        client.received,
        node.log_tail()
    );
    client
}

/// Sends `room/message` 1..=`count` over rooms 0-2 and waits until the last is acknowledged.
async fn send_to_rooms(client: &mut Client, count: u64) {
    for n in 1..=count {
        let room = n % 3;
        assert!(
            client
                .send_action(
                    n,
                    json!({"type": "room/message", "room": room.to_string(), "n": n})
                )
                .await
        );
    }
    assert!(client.wait_acked(count, WAIT).await);
}
