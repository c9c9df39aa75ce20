//! SyncMaps and reducers: state kept next to the log, answered from state on subscribe, and
//! compact resync after retention removed the history.

mod support;

use ferry::clock::Clock;
use serde_json::{json, Value};
use support::{TestClient, TestServer};

const CONFIG: &str = r#"
env = "production"
subprotocol = 1

[auth]
any_user_token = "secret"

[[channels]]
pattern = "counter/:id"
access = "anyone"

[[sync_maps]]
plural = "tasks"
access = "anyone"

[[reducers]]
type = "counter/add"
kind = "counter"
object = "counter/{id}"
access = "anyone"
"#;

/// A raw protocol client that remembers what it received.
struct Peer {
    client: TestClient,
    base: i64,
    node: String,
    next: i64,
    received: Vec<(Value, Value)>,
}

impl Peer {
    async fn connect(server: &TestServer, node: &str, synced: u64) -> Peer {
        let mut client = server.connect();
        client
            .send(
                &json!(["connect", 5, node, synced, {"token": "secret", "subprotocol": 1}])
                    .to_string(),
            )
            .await;
        let connected: Value =
            serde_json::from_str(&client.recv().await.expect("connected")).expect("json");
        assert_eq!(connected[0], "connected", "{connected}");
        Peer {
            client,
            base: connected[3][1].as_i64().expect("base time"),
            node: node.to_owned(),
            next: 0,
            received: Vec::new(),
        }
    }

    /// Sends one action and waits for its `logux/processed` or `logux/undo`; returns the
    /// action id and the answer's type and reason.
    async fn sync(&mut self, action: Value, time: i64) -> (String, String) {
        self.next += 1;
        let shift = time - self.base;
        let id = format!("{} {} 0", time, self.node);
        let frame = json!(["sync", self.next, action, {"id": [shift, self.next as u64 - 1], "time": shift}]);
        let id = if self.next == 1 {
            id
        } else {
            format!("{} {} {}", time, self.node, self.next - 1)
        };
        self.client.send(&frame.to_string()).await;
        loop {
            let frame: Value =
                serde_json::from_str(&self.client.recv().await.expect("answer")).expect("json");
            if frame[0] != "sync" {
                continue;
            }
            let mut answer = None;
            for pair in frame.as_array().expect("array")[2..].chunks(2) {
                let action = pair[0].clone();
                if action["id"] == json!(id)
                    && matches!(
                        action["type"].as_str(),
                        Some("logux/processed" | "logux/undo")
                    )
                {
                    let reason = action["reason"].as_str().unwrap_or("").to_owned();
                    answer = Some((action["type"].as_str().unwrap_or("").to_owned(), reason));
                } else {
                    self.received.push((action, pair[1].clone()));
                }
            }
            if let Some(answer) = answer {
                return answer;
            }
        }
    }

    /// Collects what arrives within a short while.
    async fn drain(&mut self) {
        while let Some(frame) = self
            .client
            .try_recv(std::time::Duration::from_millis(150))
            .await
        {
            let frame: Value = serde_json::from_str(&frame).expect("json");
            if frame[0] == "sync" {
                for pair in frame.as_array().expect("array")[2..].chunks(2) {
                    self.received.push((pair[0].clone(), pair[1].clone()));
                }
            }
        }
    }

    fn of_type(&self, action_type: &str) -> Vec<&Value> {
        self.received
            .iter()
            .map(|(action, _)| action)
            .filter(|action| action["type"] == action_type)
            .collect()
    }
}

#[tokio::test]
async fn sync_map_fields_merge_per_field_and_subscribers_get_the_state() {
    let server = TestServer::start(CONFIG);
    let now = server.clock.now_ms();
    let mut a = Peer::connect(&server, "1:a:t", 0).await;
    let created = a
        .sync(
            json!({"type": "tasks/create", "id": "7", "fields": {"title": "buy", "done": false}}),
            now,
        )
        .await;
    assert_eq!(created.0, "logux/processed");
    // Two offline edits of different fields, the older one arriving last.
    a.sync(
        json!({"type": "tasks/change", "id": "7", "fields": {"done": true}}),
        now + 20,
    )
    .await;
    a.sync(
        json!({"type": "tasks/change", "id": "7", "fields": {"title": "old"}}),
        now + 5,
    )
    .await;
    a.sync(
        json!({"type": "tasks/change", "id": "7", "fields": {"title": "new"}}),
        now + 10,
    )
    .await;

    let mut b = Peer::connect(&server, "2:b:t", 0).await;
    let answer = b
        .sync(
            json!({"type": "logux/subscribe", "channel": "tasks/7"}),
            now + 30,
        )
        .await;
    assert_eq!(answer.0, "logux/processed");
    let mut fields = serde_json::Map::new();
    for (action, meta) in &b.received {
        assert_eq!(action["type"], "tasks/changed");
        let time = meta["time"].as_i64().expect("time") + b.base;
        for (key, value) in action["fields"].as_object().expect("fields") {
            fields.insert(key.clone(), value.clone());
            // Each field travels with the time of the write that won.
            let expected = if key == "done" { now + 20 } else { now + 10 };
            assert_eq!(time, expected, "{key}");
        }
    }
    assert_eq!(Value::Object(fields), json!({"title": "new", "done": true}));

    // A live change reaches the subscriber as tasks/changed, not its author.
    a.sync(
        json!({"type": "tasks/change", "id": "7", "fields": {"title": "live"}}),
        now + 40,
    )
    .await;
    b.drain().await;
    let live = b.of_type("tasks/changed");
    assert_eq!(
        live.last().map(|action| &action["fields"]),
        Some(&json!({"title": "live"}))
    );
    a.drain().await;
    assert!(a.of_type("tasks/changed").is_empty());
}

#[tokio::test]
async fn a_deleted_sync_map_stays_deleted() {
    let server = TestServer::start(CONFIG);
    let now = server.clock.now_ms();
    let mut a = Peer::connect(&server, "1:a:t", 0).await;
    a.sync(
        json!({"type": "tasks/create", "id": "1", "fields": {"title": "x"}}),
        now,
    )
    .await;
    let deleted = a
        .sync(json!({"type": "tasks/delete", "id": "1"}), now + 5)
        .await;
    assert_eq!(deleted.0, "logux/processed");
    // A change made later (or concurrently offline) does not resurrect it.
    let change = a
        .sync(
            json!({"type": "tasks/change", "id": "1", "fields": {"title": "y"}}),
            now + 10,
        )
        .await;
    assert_eq!(change, ("logux/undo".to_owned(), "notFound".to_owned()));
    let mut b = Peer::connect(&server, "2:b:t", 0).await;
    let subscribe = b
        .sync(
            json!({"type": "logux/subscribe", "channel": "tasks/1"}),
            now + 20,
        )
        .await;
    assert_eq!(subscribe, ("logux/undo".to_owned(), "notFound".to_owned()));
    let missing = b
        .sync(
            json!({"type": "logux/subscribe", "channel": "tasks/404"}),
            now + 21,
        )
        .await;
    assert_eq!(missing, ("logux/undo".to_owned(), "notFound".to_owned()));
    let creating = b
        .sync(
            json!({"type": "logux/subscribe", "channel": "tasks/new", "creating": true}),
            now + 22,
        )
        .await;
    assert_eq!(creating.0, "logux/processed");
}

#[tokio::test]
async fn the_filter_channel_lists_matching_objects() {
    let server = TestServer::start(CONFIG);
    let now = server.clock.now_ms();
    let mut a = Peer::connect(&server, "1:a:t", 0).await;
    for (id, done) in [("1", true), ("2", false), ("3", true)] {
        a.sync(
            json!({"type": "tasks/create", "id": id, "fields": {"done": done}}),
            now,
        )
        .await;
    }
    let mut b = Peer::connect(&server, "2:b:t", 0).await;
    b.sync(
        json!({"type": "logux/subscribe", "channel": "tasks", "filter": {"done": true}}),
        now + 1,
    )
    .await;
    let mut ids: Vec<_> = b
        .of_type("tasks/changed")
        .iter()
        .map(|action| action["id"].clone())
        .collect();
    ids.sort_by_key(|id| id.to_string());
    assert_eq!(ids, vec![json!("1"), json!("3")]);
}

/// The value a client computes from what it received on a counter channel.
fn counter_value(received: &[(Value, Value)]) -> i64 {
    let mut value = 0;
    for (action, _) in received {
        match action["type"].as_str() {
            Some("ferry/state") => value = action["state"].as_i64().expect("counter state"),
            Some("counter/add") => value += action["delta"].as_i64().expect("delta"),
            _ => {}
        }
    }
    value
}

#[tokio::test]
async fn a_client_back_after_compaction_converges_with_one_that_never_left() {
    let config = CONFIG.replace(
        "subprotocol = 1\n",
        "subprotocol = 1\nretention_actions_max = 10\n",
    );
    let server = TestServer::start(&config);
    let now = server.clock.now_ms();
    let mut writer = Peer::connect(&server, "1:w:t", 0).await;
    writer
        .sync(json!({"type": "counter/add", "id": 1, "delta": 5}), now)
        .await;

    let mut online = Peer::connect(&server, "2:on:t", 0).await;
    online
        .sync(
            json!({"type": "logux/subscribe", "channel": "counter/1"}),
            now + 1,
        )
        .await;
    let mut offline = Peer::connect(&server, "3:off:t", 0).await;
    offline
        .sync(
            json!({"type": "logux/subscribe", "channel": "counter/1"}),
            now + 1,
        )
        .await;
    let since_id = format!("{} server:test 1", now);
    offline.client.disconnect().await;
    let offline_received = offline.received.clone();

    for n in 0..100 {
        let delta = if n % 3 == 0 { -2 } else { 3 };
        writer
            .sync(
                json!({"type": "counter/add", "id": 1, "delta": delta}),
                now + 10 + n,
            )
            .await;
    }
    assert!(server.server.apply_retention().await.expect("retention") > 0);
    online.drain().await;

    // Back after "weeks": the subscription's since is long gone from the log.
    let mut back = Peer::connect(&server, "3:off:t", 0).await;
    back.received = offline_received;
    let answer = back
        .sync(
            json!({"type": "logux/subscribe", "channel": "counter/1", "since": {"id": since_id, "time": now}}),
            now + 500,
        )
        .await;
    assert_eq!(answer.0, "logux/processed");
    assert!(
        !back.of_type("ferry/state").is_empty(),
        "compacted history is answered with state"
    );
    let expected = 5
        + (0..100)
            .map(|n| if n % 3 == 0 { -2 } else { 3 })
            .sum::<i64>();
    assert_eq!(counter_value(&online.received), expected);
    assert_eq!(counter_value(&back.received), expected);
    // Sent much less than the history: one snapshot instead of 100 actions.
    assert!(back.received.len() < 20, "{}", back.received.len());
}

#[tokio::test]
async fn a_resubscription_the_log_still_covers_gets_plain_actions_not_state() {
    let server = TestServer::start(CONFIG);
    let now = server.clock.now_ms();
    let mut writer = Peer::connect(&server, "1:w:t", 0).await;
    writer
        .sync(json!({"type": "counter/add", "id": 2, "delta": 1}), now)
        .await;
    let since_id = format!("{now} 1:w:t 0");
    for n in 0..3 {
        writer
            .sync(
                json!({"type": "counter/add", "id": 2, "delta": 10}),
                now + 1 + n,
            )
            .await;
    }
    let mut reader = Peer::connect(&server, "2:r:t", 0).await;
    reader
        .sync(
            json!({"type": "logux/subscribe", "channel": "counter/2", "since": {"id": since_id, "time": now}}),
            now + 10,
        )
        .await;
    assert!(reader.of_type("ferry/state").is_empty());
    assert_eq!(reader.of_type("counter/add").len(), 3);
}

#[tokio::test]
async fn object_state_survives_a_restart() {
    let server = TestServer::start(CONFIG);
    let now = server.clock.now_ms();
    let mut writer = Peer::connect(&server, "1:w:t", 0).await;
    for _ in 0..4 {
        writer
            .sync(json!({"type": "counter/add", "id": 3, "delta": 2}), now)
            .await;
    }
    writer.client.disconnect().await;
    let server = server.restart().await;
    let mut reader = Peer::connect(&server, "2:r:t", 0).await;
    reader
        .sync(
            json!({"type": "logux/subscribe", "channel": "counter/3"}),
            now + 1,
        )
        .await;
    assert_eq!(counter_value(&reader.received), 8);
}

#[tokio::test]
async fn a_change_sent_right_behind_a_delete_without_waiting_is_still_refused() {
    let server = TestServer::start(CONFIG);
    let mut a = Peer::connect(&server, "1:a:t", 0).await;
    // Three `sync`s back to back: the worker must not judge the change before the delete
    // it queued is stored, even though plain actions do not wait for each other.
    let actions = [
        json!({"type": "tasks/create", "id": "1", "fields": {"title": "x"}}),
        json!({"type": "tasks/delete", "id": "1"}),
        json!({"type": "tasks/change", "id": "1", "fields": {"title": "y"}}),
    ];
    for (n, action) in actions.iter().enumerate() {
        let n = n as i64 + 1;
        let frame = json!(["sync", n, action, {"id": [n, 0], "time": n}]);
        a.client.send(&frame.to_string()).await;
    }
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 3 {
        let frame: Value =
            serde_json::from_str(&a.client.recv().await.expect("answer")).expect("json");
        if frame[0] != "sync" {
            continue;
        }
        for pair in frame.as_array().expect("array")[2..].chunks(2) {
            let action = &pair[0];
            if let Some(kind @ ("logux/processed" | "logux/undo")) = action["type"].as_str() {
                let id = action["id"].as_str().expect("id").to_owned();
                let reason = action["reason"].as_str().unwrap_or("").to_owned();
                answers.insert(id, (kind.to_owned(), reason));
            }
        }
    }
    let answer = |n: i64| answers[&format!("{} 1:a:t 0", a.base + n)].clone();
    assert_eq!(answer(1).0, "logux/processed");
    assert_eq!(answer(2).0, "logux/processed");
    assert_eq!(answer(3), ("logux/undo".to_owned(), "notFound".to_owned()));
}
