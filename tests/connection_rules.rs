//! Connection-level behaviour that transcripts cannot express compactly: large backlogs,
//! timeouts, the zombie rule, and the pre-authentication queue limit.

mod support;

use ferry::protocol::session::PREAUTH_QUEUE_MESSAGES_MAX;
use serde_json::Value;
use std::time::Duration;
use support::{TestServer, TEST_CONFIG};

const CONNECT_10: &str = r#"["connect",5,"10:aaa:tab",0,{"token":"good-10","subprotocol":1}]"#;

async fn handshake(client: &mut support::TestClient) {
    assert_eq!(
        client.recv().await.as_deref(),
        Some(r#"["headers",{"env":"development"}]"#)
    );
    let connected = client.recv().await.expect("connected");
    assert!(
        connected.starts_with(r#"["connected",5,"server:test""#),
        "{connected}"
    );
}

#[tokio::test]
async fn a_sync_with_100000_actions_is_stored_and_every_action_is_processed() {
    let server = TestServer::start(TEST_CONFIG);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    const ACTIONS: usize = 100_000;
    let mut frame = String::from(r#"["sync",100000"#);
    for n in 1..=ACTIONS {
        frame.push_str(&format!(
            r#",{{"type":"room/message","room":"1","n":{n}}},{{"id":{n},"time":{n}}}"#
        ));
    }
    frame.push(']');
    client.send(&frame).await;
    let mut synced = false;
    let mut processed = 0;
    while processed < ACTIONS || !synced {
        let frame = client.recv().await.expect("connection stays open");
        let message: Value = serde_json::from_str(&frame).expect("json");
        match message[0].as_str() {
            Some("synced") => {
                assert_eq!(message[1], 100_000);
                synced = true;
            }
            Some("sync") => {
                let pairs = message.as_array().map_or(0, |m| (m.len() - 2) / 2);
                for pair in 0..pairs {
                    assert_eq!(message[2 + pair * 2]["type"], "logux/processed");
                }
                processed += pairs;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(server.server.log.head(), 2 * ACTIONS as u64);
}

/// Sends `sync` number `n` with one `room/message`.
async fn send_message(client: &support::TestClient, n: u64) {
    client
        .send(&format!(
            r#"["sync",{n},{{"type":"room/message","room":"1","n":{n}}},{{"id":{n},"time":{n}}}]"#
        ))
        .await;
}

/// Reads until `count` `synced` answers and `count` processed actions arrived; the `synced`
/// positions, in the order received.
async fn synced_and_processed(client: &mut support::TestClient, count: usize) -> Vec<u64> {
    let mut synced = Vec::new();
    let mut processed = 0;
    while processed < count || synced.len() < count {
        let frame = client.recv().await.expect("connection stays open");
        let message: Value = serde_json::from_str(&frame).expect("json");
        match message[0].as_str() {
            Some("synced") => synced.push(message[1].as_u64().expect("added")),
            Some("sync") => processed += (message.as_array().map_or(0, Vec::len) - 2) / 2,
            other => panic!("unexpected {other:?}"),
        }
    }
    synced
}

#[tokio::test]
async fn back_to_back_syncs_share_group_commits_and_are_acknowledged_in_order() {
    let server = TestServer::start(TEST_CONFIG);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    let commits_before = server.server.log.group_commits();
    const SYNCS: u64 = 200;
    for n in 1..=SYNCS {
        send_message(&client, n).await;
    }
    let synced = synced_and_processed(&mut client, SYNCS as usize).await;
    assert_eq!(synced, (1..=SYNCS).collect::<Vec<_>>(), "in the order sent");
    assert_eq!(server.server.log.head(), 2 * SYNCS);
    let commits = server.server.log.group_commits() - commits_before;
    assert!(
        commits < SYNCS / 2,
        "{commits} group commits for {SYNCS} syncs: the worker waited for each one"
    );
}

/// Waits until no pipeline worker runs (they retire once they have nothing to do).
async fn workers_retired(server: &TestServer) -> bool {
    let deadline = tokio::time::Instant::now() + support::FRAME_WAIT;
    while server.server.metrics.pipeline_workers.get() != 0 {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

#[tokio::test]
async fn an_idle_connection_holds_no_worker_and_its_later_syncs_are_answered_in_order() {
    let server = TestServer::start(TEST_CONFIG);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    assert!(
        workers_retired(&server).await,
        "the worker stays after the catch-up"
    );
    let mut next = 1;
    for _round in 0..3 {
        let first = next;
        for _ in 0..20 {
            send_message(&client, next).await;
            next += 1;
        }
        let synced = synced_and_processed(&mut client, 20).await;
        assert_eq!(
            synced,
            (first..next).collect::<Vec<_>>(),
            "in the order sent"
        );
        assert!(
            workers_retired(&server).await,
            "the worker stays after its syncs"
        );
    }
    assert_eq!(server.server.log.head(), 2 * (next - 1));
}

#[tokio::test]
async fn a_socket_that_never_sends_connect_is_closed_after_the_handshake_timeout() {
    let config = format!("{TEST_CONFIG}\n[limits]\nhandshake_timeout_ms = 200\n");
    let server = TestServer::start(&config);
    let mut client = server.connect();
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn a_new_connection_of_the_same_client_closes_the_old_one() {
    let server = TestServer::start(TEST_CONFIG);
    let mut old = server.connect();
    old.send(r#"["connect",5,"10:aaa:tab1",0,{"token":"good-10","subprotocol":1}]"#)
        .await;
    handshake(&mut old).await;
    let mut new = server.connect();
    new.send(r#"["connect",5,"10:aaa:tab2",0,{"token":"good-10","subprotocol":1}]"#)
        .await;
    handshake(&mut new).await;
    assert!(old.is_closed_by_server().await, "zombie connection closed");
    new.send(r#"["ping",0]"#).await;
    assert_eq!(new.recv().await.as_deref(), Some(r#"["pong",0]"#));
}

#[tokio::test]
async fn too_many_messages_before_connect_close_the_connection() {
    let server = TestServer::start(TEST_CONFIG);
    let mut client = server.connect();
    for _ in 0..=PREAUTH_QUEUE_MESSAGES_MAX {
        client.send(r#"["ping",0]"#).await;
    }
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let config = format!("{TEST_CONFIG}\n[limits]\nidle_timeout_ms = 300\n");
    let server = TestServer::start(&config);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.send(r#"["ping",0]"#).await;
    assert_eq!(client.recv().await.as_deref(), Some(r#"["pong",0]"#));
    assert!(client.is_closed_by_server().await);
}

#[tokio::test]
async fn retention_keeps_only_the_newest_actions_and_subscribers_get_what_is_left() {
    let config = TEST_CONFIG.replace(
        "min_subprotocol = 1",
        "min_subprotocol = 1\nretention_actions_max = 4",
    );
    let server = TestServer::start(&config);
    let mut writer = server.connect();
    writer
        .send(r#"["connect",5,"20:bbb:tab",0,{"token":"good-20","subprotocol":1}]"#)
        .await;
    handshake(&mut writer).await;
    for n in 1..=5 {
        writer
            .send(&format!(
                r#"["sync",{n},{{"type":"room/message","room":"1","n":{n}}},{{"id":{n},"time":{n}}}]"#
            ))
            .await;
        assert_eq!(writer.recv().await, Some(format!(r#"["synced",{n}]"#)));
        writer.recv().await.expect("processed");
    }
    // Ten entries: five messages and five `logux/processed`; keep the newest four.
    assert_eq!(server.server.apply_retention().await.expect("retention"), 6);
    let mut reader = server.connect();
    reader.send(CONNECT_10).await;
    handshake(&mut reader).await;
    reader
        .send(r#"["sync",1,{"type":"logux/subscribe","channel":"room/1"},{"id":1,"time":1}]"#)
        .await;
    let history: Value =
        serde_json::from_str(&reader.recv().await.expect("history")).expect("json");
    let numbers: Vec<_> = history.as_array().expect("array")[2..]
        .iter()
        .step_by(2)
        .map(|action| action["n"].clone())
        .collect();
    assert_eq!(numbers, vec![serde_json::json!(4), serde_json::json!(5)]);
}

#[tokio::test]
async fn a_sync_with_4000_subscriptions_then_more_syncs_and_a_ping_is_answered_in_full() {
    // A client with thousands of SyncMap objects re-subscribes after a reconnect, then goes on
    // sending: more answers than the outbox holds, and more `sync`s than the worker's queue.
    let server = TestServer::start(TEST_CONFIG);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    const SUBSCRIPTIONS: usize = 4_000;
    let mut frame = String::from(r#"["sync",4000"#);
    for n in 1..=SUBSCRIPTIONS {
        frame.push_str(&format!(
            r#",{{"type":"logux/subscribe","channel":"room/{n}"}},{{"id":{n},"time":{n}}}"#
        ));
    }
    frame.push(']');
    client.send(&frame).await;
    const SMALL_SYNCS: u64 = 17;
    for n in 1..=SMALL_SYNCS {
        let id = SUBSCRIPTIONS as u64 + n;
        client
            .send(&format!(
                r#"["sync",{id},{{"type":"room/message","room":"x","n":{n}}},{{"id":{id},"time":{id}}}]"#
            ))
            .await;
    }
    client.send(r#"["ping",7]"#).await;
    let mut synced = Vec::new();
    let mut pong = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pong || synced.len() < 1 + SMALL_SYNCS as usize {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting: {} synced, pong {pong}",
            synced.len()
        );
        let Some(frame) = client.try_recv(Duration::from_secs(10)).await else {
            panic!(
                "no answer for 10 s (or closed): {} synced, pong {pong}",
                synced.len()
            );
        };
        let message: Value = serde_json::from_str(&frame).expect("json");
        match message[0].as_str() {
            Some("synced") => synced.push(message[1].as_u64().expect("added")),
            Some("pong") => pong = true,
            Some("sync") => {}
            other => panic!("unexpected {other:?}: {frame}"),
        }
    }
    let expected: Vec<u64> = std::iter::once(SUBSCRIPTIONS as u64)
        .chain((1..=SMALL_SYNCS).map(|n| SUBSCRIPTIONS as u64 + n))
        .collect();
    assert_eq!(synced, expected, "every sync answered, in order");
}

#[tokio::test]
async fn deliveries_queued_for_one_client_go_out_in_one_sync_frame() {
    use ferry::peer::Peer;
    use ferry::server::connection::{self, Inbound};
    use std::sync::Arc;
    use tokio::sync::{mpsc, Semaphore};

    let server = TestServer::start(TEST_CONFIG);
    // A reader whose socket takes a frame only when the test lets it.
    let gate = Arc::new(Semaphore::new(Semaphore::MAX_PERMITS / 2));
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<String>(1024);
    let incoming = Box::pin(futures_util::stream::unfold(in_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let outgoing = Box::pin(futures_util::sink::unfold(
        (out_tx, Arc::clone(&gate)),
        |(tx, gate), frame: String| async move {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            tx.send(frame).await.map_err(|_| "closed")?;
            Ok::<_, &'static str>((tx, gate))
        },
    ));
    let peer = Peer::new(std::net::Ipv4Addr::LOCALHOST.into(), "test");
    let reader = tokio::spawn(connection::run(
        server.server.clone(),
        incoming,
        outgoing,
        peer,
    ));
    let send = |frame: &str| Inbound::Text(frame.to_owned());
    in_tx
        .send(send(
            r#"["connect",5,"20:bbb:tab",0,{"token":"good-20","subprotocol":1}]"#,
        ))
        .await
        .expect("open");
    in_tx
        .send(send(
            r#"["sync",1,{"type":"logux/subscribe","channel":"room/1"},{"id":1,"time":1}]"#,
        ))
        .await
        .expect("open");
    while !next_frame(&mut out_rx).await.starts_with(r#"["synced",1]"#) {}
    next_frame(&mut out_rx).await; // the subscription's logux/processed
    gate.forget_permits(Semaphore::MAX_PERMITS);

    let mut writer = server.connect();
    writer.send(CONNECT_10).await;
    handshake(&mut writer).await;
    const MESSAGES: u64 = 5;
    for n in 1..=MESSAGES {
        send_message(&writer, n).await;
        synced_and_processed(&mut writer, 1).await;
    }
    // Every message reached the reader's outbox while its socket took nothing: at most the
    // first went out alone, the rest in one frame.
    gate.add_permits(Semaphore::MAX_PERMITS / 2);
    let mut frames = 0;
    let mut numbers = Vec::new();
    while numbers.len() < MESSAGES as usize {
        let frame: Value = serde_json::from_str(&next_frame(&mut out_rx).await).expect("json");
        assert_eq!(frame[0], "sync", "{frame}");
        frames += 1;
        let pairs = frame.as_array().expect("array")[2..].to_vec();
        numbers.extend(pairs.iter().step_by(2).map(|action| action["n"].clone()));
    }
    assert_eq!(numbers, (1..=MESSAGES).map(Value::from).collect::<Vec<_>>());
    assert!(
        frames <= 2,
        "{frames} frames for {MESSAGES} queued deliveries"
    );
    drop(in_tx);
    let _ = tokio::time::timeout(support::FRAME_WAIT, reader).await;
}

/// The next frame a connection wrote to `rx`.
async fn next_frame(rx: &mut tokio::sync::mpsc::Receiver<String>) -> String {
    tokio::time::timeout(support::FRAME_WAIT, rx.recv())
        .await
        .expect("a frame in time")
        .expect("open")
}

/// A `sync` of `actions` `room/message`s, numbered from `first`, as sync number `added`.
fn sync_of(added: u64, first: u64, actions: u64) -> String {
    let mut frame = format!(r#"["sync",{added}"#);
    for n in first..first + actions {
        frame.push_str(&format!(
            r#",{{"type":"room/message","room":"1","n":{n}}},{{"id":{n},"time":{n}}}"#
        ));
    }
    frame.push(']');
    frame
}

/// The server's pipeline backlog, all of it: nothing more fits until the permit is dropped.
async fn take_whole_backlog(server: &TestServer) -> tokio::sync::OwnedSemaphorePermit {
    let whole = u32::try_from(server.server.config.limits.pipeline_backlog_bytes).expect("u32");
    std::sync::Arc::clone(&server.server.backlog)
        .acquire_many_owned(whole)
        .await
        .expect("backlog")
}

#[tokio::test]
async fn a_sync_that_does_not_fit_in_the_pipeline_backlog_waits_and_its_connection_reads_nothing_more(
) {
    let config = format!("{TEST_CONFIG}\n[limits]\npipeline_backlog_bytes = 65536\n");
    let server = TestServer::start(&config);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    let head = server.server.log.head();
    let backlog = take_whole_backlog(&server).await;
    let sync = sync_of(1, 1, 30);
    assert!(sync.len() > ferry::server::connection::BACKLOG_FREE_FRAME_BYTES_MAX);
    client.send(&sync).await;
    client.send(r#"["ping",0]"#).await;
    assert_eq!(
        client.try_recv(Duration::from_millis(300)).await,
        None,
        "neither synced nor the ping's pong while the sync waits"
    );
    assert_eq!(server.server.log.head(), head, "nothing stored");
    drop(backlog);
    let (mut synced, mut pong, mut processed) = (false, false, 0);
    while !(synced && pong && processed == 30) {
        let frame = client.recv().await.expect("connection stays open");
        let message: Value = serde_json::from_str(&frame).expect("json");
        match message[0].as_str() {
            Some("synced") => synced = true,
            Some("pong") => pong = true,
            Some("sync") => processed += (message.as_array().map_or(0, Vec::len) - 2) / 2,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(server.server.log.head(), head + 60);
    assert_eq!(
        server.server.backlog.available_permits(),
        65536,
        "all returned"
    );
}

#[tokio::test]
async fn a_small_sync_such_as_a_subscription_does_not_wait_for_a_full_pipeline_backlog() {
    let config = format!("{TEST_CONFIG}\n[limits]\npipeline_backlog_bytes = 65536\n");
    let server = TestServer::start(&config);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    let _backlog = take_whole_backlog(&server).await;
    let subscribe = r#"["sync",1,{"type":"logux/subscribe","channel":"room/1"},{"id":1,"time":1}]"#;
    client.send(subscribe).await;
    client.send(&sync_of(2, 2, 1)).await;
    let (mut synced, mut processed) = (0, 0);
    while synced < 2 || processed < 2 {
        let frame = client
            .recv()
            .await
            .expect("answered while the backlog is full");
        let message: Value = serde_json::from_str(&frame).expect("json");
        match message[0].as_str() {
            Some("synced") => synced += 1,
            Some("sync") => processed += frame.matches("logux/processed").count(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_connection_whose_sync_waits_for_the_pipeline_backlog_is_not_closed_as_idle() {
    let config =
        format!("{TEST_CONFIG}\n[limits]\npipeline_backlog_bytes = 65536\nidle_timeout_ms = 300\n");
    let server = TestServer::start(&config);
    let mut client = server.connect();
    client.send(CONNECT_10).await;
    handshake(&mut client).await;
    let backlog = take_whole_backlog(&server).await;
    client.send(&sync_of(1, 1, 30)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(backlog);
    let mut synced = false;
    while !synced {
        let frame = client.recv().await.expect("still open after the wait");
        synced = frame.starts_with(r#"["synced",1]"#);
    }
}
