//! Cluster mode against real processes: a 3-node NATS JetStream cluster (Debian's
//! nats-server, started by the test) and Ferry children sharing one stream.

mod support;

use serde_json::json;
use std::time::Duration;
use support::cluster::{http_get, start_nodes, Client, RULES};
use support::nats::NatsCluster;

const WAIT: Duration = Duration::from_secs(20);

fn message(room: &str, n: u64) -> serde_json::Value {
    json!({"type": "room/message", "room": room, "n": n})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_different_nodes_see_each_others_actions_once_in_order() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let mut a = Client::connect(nodes[0].port(), "a:a:t", 0)
        .await
        .expect("a");
    let mut b = Client::connect(nodes[1].port(), "b:b:t", 0)
        .await
        .expect("b");
    assert!(a.subscribe(1, "room/1", None).await);
    assert!(b.subscribe(1, "room/1", None).await);
    for n in 2..=41 {
        let (client, room) = if n % 2 == 0 {
            (&mut a, "1")
        } else {
            (&mut b, "1")
        };
        assert!(client.send_action(n, message(room, n)).await);
    }
    assert!(
        a.wait_received("room/message", 20, WAIT).await,
        "a: {:?}",
        a.numbers()
    );
    assert!(
        b.wait_received("room/message", 20, WAIT).await,
        "b: {:?}",
        b.numbers()
    );
    // Let any duplicate arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while a.next_frame(deadline).await.is_some() {}
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while b.next_frame(deadline).await.is_some() {}
    let odd: Vec<i64> = (2..=41).filter(|n| n % 2 == 1).collect();
    let even: Vec<i64> = (2..=41).filter(|n| n % 2 == 0).collect();
    assert_eq!(a.numbers(), odd, "a gets b's actions once, in order");
    assert_eq!(b.numbers(), even, "b gets a's actions once, in order");
    assert!(a.errors.is_empty() && b.errors.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_from_one_node_to_another_gets_exactly_what_it_missed() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let mut writer = Client::connect(nodes[0].port(), "w:w:t", 0)
        .await
        .expect("writer");
    let mut mover = Client::connect(nodes[1].port(), "m:m:t", 0)
        .await
        .expect("mover");
    assert!(mover.subscribe(1, "room/2", None).await);
    for n in 1..=10 {
        assert!(writer.send_action(n, message("2", n)).await);
    }
    assert!(writer.wait_acked(10, WAIT).await);
    assert!(mover.wait_received("room/message", 10, WAIT).await);
    let synced = mover.synced;
    drop(mover);
    // Written while the mover is offline, then it comes back through the other node.
    for n in 11..=25 {
        assert!(writer.send_action(n, message("2", n)).await);
    }
    assert!(writer.wait_acked(25, WAIT).await);
    let mut back = Client::connect(nodes[0].port(), "m:m:t", synced)
        .await
        .expect("back");
    assert!(back.subscribe(2, "room/2", Some(synced)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while back.next_frame(deadline).await.is_some() {}
    assert_eq!(back.numbers(), (11..=25).collect::<Vec<i64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connecting_to_another_node_closes_its_older_connection() {
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let mut old = Client::connect(nodes[0].port(), "z:z:t", 0)
        .await
        .expect("old");
    let _new = Client::connect(nodes[1].port(), "z:z:t", 0)
        .await
        .expect("new");
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut closed = false;
    while tokio::time::Instant::now() < deadline {
        if old.next_frame(deadline).await.is_none() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the zombie on the first node was closed");
    assert!(
        old.errors.is_empty(),
        "closed without an error: {:?}",
        old.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_ready_while_nats_is_gone_and_clients_get_no_error() {
    let mut nats = NatsCluster::start(1).await;
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 1, RULES, &nats, "append_deadline_ms = 3000").await;
    let port = nodes[0].port();
    let mut client = Client::connect(port, "r:r:t", 0).await.expect("client");
    assert!(client.send_action(1, message("3", 1)).await);
    assert!(client.wait_acked(1, WAIT).await);
    nats.kill(0);
    assert!(client.send_action(2, message("3", 2)).await);
    let mut unready = false;
    for _ in 0..200 {
        if http_get(port, "/ready")
            .await
            .is_some_and(|(status, _)| status == 503)
        {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(unready, "/ready answers 503 without NATS");
    let (status, _) = http_get(port, "/health").await.expect("health");
    assert_eq!(status, 200, "/health stays a liveness check");
    // Past the append deadline the connection closes without an error and without `synced`.
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.next_frame(deadline).await.is_some() {}
    assert!(
        !client.acked.contains(&2),
        "nothing acknowledged without NATS"
    );
    assert!(
        client.errors.is_empty(),
        "no error frame: {:?}",
        client.errors
    );
    nats.restart(0).await;
    for _ in 0..200 {
        if http_get(port, "/ready")
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http_get(port, "/ready").await;
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Some(200),
        "ready again: {ready:?}\n{}",
        nodes[0].log_tail()
    );
    let mut again = Client::connect(port, "r:r:t", 0).await.expect("reconnect");
    assert!(again.send_action(2, message("3", 2)).await);
    assert!(
        again.wait_acked(2, WAIT).await,
        "the re-sent action is acknowledged\n{}",
        nodes[0].log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_authenticates_to_nats_with_the_configured_password_file_and_refuses_to_start_without(
) {
    let nats =
        NatsCluster::start_with(1, "authorization { user: ferry, password: \"s3cret\" }\n").await;
    let root = tempfile::tempdir().expect("tempdir");
    let password = root.path().join("nats-user");
    std::fs::write(&password, "ferry:s3cret\n").expect("password file");
    let extra = format!("user_password_file = {:?}", password.display().to_string());
    let nodes = start_nodes(root.path(), 1, RULES, &nats, &extra).await;
    let mut client = Client::connect(nodes[0].port(), "p:p:t", 0)
        .await
        .expect("client");
    assert!(client.send_action(1, message("4", 1)).await);
    assert!(
        client.wait_acked(1, WAIT).await,
        "appends go through with the password"
    );

    let config = root.path().join("no-password.toml");
    support::cluster::write_config(&config, RULES, &nats, "ferry", "");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.path().join("refused"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run ferry");
    assert!(
        !output.status.success(),
        "without credentials ferry does not start"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("cannot connect to NATS"), "{text}");
}

/// A POST to the server API on `port`: status and JSON body.
async fn api_post(port: u16, path: &str, body: &str, secret: &str) -> (u16, serde_json::Value) {
    let headers = format!("Authorization: Bearer {secret}\r\n");
    let (status, body) = support::cluster::http_request(port, "POST", path, &headers, body)
        .await
        .expect("the API answers");
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_added_through_the_server_api_of_one_node_reaches_subscribers_of_another_once() {
    const SECRET: &str = "cluster-api-secret-of-at-least-32-bytes!";
    let nats = NatsCluster::start(3).await;
    let root = tempfile::tempdir().expect("tempdir");
    // No hook is configured, so the back-end URL is never called.
    let rules = format!(
        "{RULES}\n[backend]\nurl = \"http://127.0.0.1:9/\"\nsecret = \"{SECRET}\"\n[[types]]\ntype = \"order/status\"\naccess = \"anyone\"\n"
    );
    let nodes = start_nodes(root.path(), 2, &rules, &nats, "").await;
    let mut reader = Client::connect(nodes[0].port(), "o:o:t", 0)
        .await
        .expect("reader");
    assert!(reader.subscribe(1, "room/9", None).await);
    let body = r#"{"actions":[{"id":"order-9-paid","action":{"type":"order/status","order":9},"channels":["room/9"]}]}"#;
    let (status, first) = api_post(nodes[1].port(), "/api/v1/actions", body, SECRET).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["results"][0]["duplicate"], false);
    // The same id through the other node is a duplicate at the same position.
    let (status, again) = api_post(nodes[0].port(), "/api/v1/actions", body, SECRET).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["results"][0]["duplicate"], true, "{again}");
    assert_eq!(again["results"][0]["added"], first["results"][0]["added"]);
    assert!(reader.wait_received("order/status", 1, WAIT).await);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while reader.next_frame(deadline).await.is_some() {}
    assert_eq!(reader.count("order/status"), 1, "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_re_sent_to_another_node_after_the_duplicate_window_is_stored_and_delivered_once()
{
    let nats = NatsCluster::start(3).await;
    // The stream exists before Ferry starts, with a 1 s duplicate window, so the re-send
    // below is beyond it and only the views' id index can catch it.
    let client = async_nats::connect(nats.urls()).await.expect("nats");
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ferry".to_owned(),
            subjects: vec!["ferry.log".to_owned()],
            num_replicas: 3,
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("stream");
    let root = tempfile::tempdir().expect("tempdir");
    let nodes = start_nodes(root.path(), 2, RULES, &nats, "").await;
    let mut reader = Client::connect(nodes[1].port(), "d:d:t", 0)
        .await
        .expect("reader");
    assert!(reader.subscribe(1, "room/5", None).await);
    let mut first = Client::connect(nodes[0].port(), "w:w:t", 0)
        .await
        .expect("writer");
    assert!(first.send_action(7, message("5", 7)).await);
    assert!(first.wait_acked(7, WAIT).await);
    drop(first);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut again = Client::connect(nodes[1].port(), "w:w:t", 0)
        .await
        .expect("writer again");
    assert!(again.send_action(7, message("5", 7)).await);
    assert!(
        again.wait_acked(7, WAIT).await,
        "the re-send is acknowledged"
    );
    assert!(reader.wait_received("room/message", 1, WAIT).await);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(700);
    while reader.next_frame(deadline).await.is_some() {}
    assert_eq!(reader.numbers(), vec![7], "delivered once");
    // And a late reader on either node finds it once (each its own client id: a second
    // subscribe with the same action id would be a re-send, not a new subscription).
    for (i, node) in nodes.iter().enumerate() {
        let mut late = Client::connect(node.port(), &format!("l{i}:l{i}:t"), 0)
            .await
            .expect("late");
        assert!(late.subscribe(1, "room/5", None).await);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while late.next_frame(deadline).await.is_some() {}
        assert_eq!(late.numbers(), vec![7], "stored once on node {i}");
    }
}
