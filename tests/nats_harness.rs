//! Self-tests of the NATS JetStream cluster harness (`tests/support/nats.rs`) against the
//! real `nats-server`, with the async-nats calls the cluster mode relies on: an R3 stream
//! with message-id deduplication that survives the loss of its leader, and a KV bucket
//! with create-if-absent and update-at-revision.

mod support;

use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, stream};
use futures_util::StreamExt;
use std::time::Duration;
use support::nats::NatsCluster;
use tokio::time::Instant;

const STREAM: &str = "probe";
const LEADER_WAIT: Duration = Duration::from_secs(30);
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// A client given every node's URL (it reconnects to another one when its node dies).
async fn connect(cluster: &NatsCluster) -> async_nats::Client {
    async_nats::connect(cluster.urls())
        .await
        .expect("connect to the NATS cluster")
}

/// Publishes message `n` with message id `m-<n>`, retrying the same id with a short
/// backoff until `deadline` (publishes fail while a stream elects a leader; async-nats
/// does not retry). Returns the ack.
async fn publish_retrying(
    js: &jetstream::Context,
    n: u64,
    deadline: Instant,
) -> jetstream::publish::PublishAck {
    let mut backoff = Duration::from_millis(50);
    let mut failures = Vec::new();
    loop {
        let attempt = async {
            js.send_publish(
                format!("{STREAM}.{n}"),
                PublishMessage::build()
                    .message_id(format!("m-{n}"))
                    .payload(format!("message {n}").into()),
            )
            .await?
            .await
        };
        match attempt.await {
            Ok(ack) => {
                if !failures.is_empty() {
                    eprintln!(
                        "publish m-{n}: {} failed attempts ({failures:?})",
                        failures.len()
                    );
                }
                return ack;
            }
            Err(err) if Instant::now() < deadline => {
                failures.push(err.kind());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(err) => {
                panic!("publish m-{n} still failing at the deadline: {err} (before: {failures:?})")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_keeps_every_acknowledged_message_when_its_leader_is_killed() {
    let mut cluster = NatsCluster::start(3).await;
    let client = connect(&cluster).await;
    // Short request/ack timeout, so that a publish to a dead leader fails fast and is retried.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let created = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{STREAM}.>")],
            storage: stream::StorageType::File,
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create an R3 file stream on nats-server 2.9.10");
    assert_eq!(created.cached_info().config.num_replicas, 3);

    let deadline = Instant::now() + FAILOVER_DEADLINE;
    let mut acked = Vec::new();
    for n in 1..=100 {
        let ack = publish_retrying(&js, n, deadline).await;
        assert!(!ack.duplicate, "m-{n} is new");
        acked.push((n, ack.sequence));
    }
    let sequences: Vec<u64> = acked.iter().map(|&(_, seq)| seq).collect();
    assert_eq!(sequences, (1..=100).collect::<Vec<u64>>());
    let again = publish_retrying(&js, 42, deadline).await;
    assert!(again.duplicate, "re-publishing m-42 is a duplicate");
    assert_eq!(
        again.sequence, 42,
        "a duplicate answers the original sequence"
    );

    let leader = cluster.wait_for_stream_leader(STREAM, LEADER_WAIT).await;
    let mut info = js.get_stream(STREAM).await.expect("get stream");
    let reported = info
        .info()
        .await
        .expect("stream info")
        .cluster
        .clone()
        .and_then(|cluster| cluster.leader);
    assert_eq!(
        reported.as_deref(),
        Some(cluster.name(leader)),
        "/jsz and stream info agree on the leader"
    );

    let meta_leader = cluster.meta_leader().await;
    cluster.kill(leader);
    let killed_at = Instant::now();
    let deadline = killed_at + FAILOVER_DEADLINE;
    let first = publish_retrying(&js, 101, deadline).await;
    let failover = killed_at.elapsed();
    eprintln!(
        "failover: stream leader {} killed (meta leader: {:?}) -> next acknowledged publish \
         in {failover:?}",
        cluster.name(leader),
        meta_leader.map(|i| cluster.name(i))
    );
    acked.push((101, first.sequence));
    for n in 102..=200 {
        acked.push((n, publish_retrying(&js, n, deadline).await.sequence));
    }
    let new_leader = cluster.wait_for_stream_leader(STREAM, LEADER_WAIT).await;
    assert_ne!(new_leader, leader, "another node leads after the kill");

    // Every acknowledged message is in the stream exactly once, in publish order, at the
    // sequence its ack named.
    let stream = js.get_stream(STREAM).await.expect("get stream");
    // Creating the (R1, ephemeral) consumer can time out for a while after the kill: the
    // meta leader may still place it on the dead node. Retry until the deadline.
    let created_from = Instant::now();
    let ordered = loop {
        let attempt = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await;
        match attempt {
            Ok(ordered) => break ordered,
            Err(err) if Instant::now() < deadline => {
                eprintln!(
                    "create ordered consumer failed ({:?}: {err}); retrying",
                    err.kind()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("create an ordered consumer: {err}"),
        }
    };
    eprintln!(
        "ordered consumer created after {:?}",
        created_from.elapsed()
    );
    let mut messages = ordered.messages().await.expect("ordered messages");
    let mut seen = Vec::new();
    while seen.len() < acked.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the next message within 10 s")
            .expect("the ordered consumer goes on")
            .expect("a message");
        let info = message.info().expect("JetStream message info");
        let id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|id| id.as_str().to_owned())
            .expect("a Nats-Msg-Id header");
        seen.push((id, info.stream_sequence));
    }
    let expected: Vec<(String, u64)> = acked
        .iter()
        .map(|&(n, seq)| (format!("m-{n}"), seq))
        .collect();
    assert_eq!(seen, expected);
    let state = js
        .get_stream(STREAM)
        .await
        .expect("get stream")
        .cached_info()
        .state
        .clone();
    assert_eq!(state.messages, 200, "no message stored twice");

    cluster.restart(leader).await;
    let caught_up = Instant::now() + LEADER_WAIT;
    loop {
        let detail = cluster.stream_detail(leader, STREAM).await;
        let messages = detail
            .as_ref()
            .and_then(|detail| detail["state"]["messages"].as_u64());
        if messages == Some(200) {
            break;
        }
        assert!(
            Instant::now() < caught_up,
            "the restarted node caught up with the stream (its view: {detail:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stream behind a KV bucket, as async-nats 0.51's `create_key_value` builds it
/// (`kv_to_stream_config` in its `jetstream/context.rs`, without the 2.10+ fields).
fn kv_stream_config(config: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", config.bucket),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        storage: config.storage,
        num_replicas: config.num_replicas.max(1),
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_bucket_creates_only_when_absent_and_updates_only_at_the_current_revision() {
    let cluster = NatsCluster::start(3).await;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(connect(&cluster).await);
    let bucket = kv::Config {
        bucket: "leases".into(),
        history: 1,
        max_age: Duration::from_secs(3),
        storage: stream::StorageType::File,
        num_replicas: 3,
        ..Default::default()
    };
    let version = js.client().server_info().version;
    match js.create_key_value(bucket.clone()).await {
        // async-nats 0.51 first asks for the account info ($JS.API.INFO) and cannot parse
        // 2.9's answer (no `reserved_memory`/`reserved_storage`, which it requires).
        Err(err) if version.starts_with("2.9.") => {
            assert_eq!(
                err.kind(),
                jetstream::context::CreateKeyValueErrorKind::JetStream,
                "{err}"
            );
        }
        Err(err) => panic!("create_key_value on nats-server {version}: {err}"),
        Ok(_) => assert!(
            !version.starts_with("2.9."),
            "create_key_value works on {version}: the stream workaround is not needed"
        ),
    }
    js.create_stream(kv_stream_config(&bucket))
        .await
        .expect("create the KV stream of an R3 bucket with max_age");
    let leases = js
        .get_key_value(&bucket.bucket)
        .await
        .expect("open the KV bucket");
    let config = &leases.stream.cached_info().config;
    assert_eq!(config.max_age, Duration::from_secs(3));
    assert_eq!(config.num_replicas, 3);

    // Create if absent.
    let first = leases
        .create("room.1", "owner-a".into())
        .await
        .expect("create an absent key");
    let taken = leases
        .create("room.1", "owner-b".into())
        .await
        .expect_err("create of an existing key fails");
    assert_eq!(taken.kind(), kv::CreateErrorKind::AlreadyExists);

    // Update at a revision: only the current one wins.
    let second = leases
        .update("room.1", "owner-a renewed".into(), first)
        .await
        .expect("update at the current revision");
    assert!(second > first);
    let stale = leases
        .update("room.1", "owner-b".into(), first)
        .await
        .expect_err("update at a stale revision fails");
    assert_eq!(stale.kind(), kv::UpdateErrorKind::WrongLastRevision);
    let entry = leases
        .entry("room.1")
        .await
        .expect("read the entry")
        .expect("the key exists");
    assert_eq!(
        (entry.revision, &entry.value[..]),
        (second, &b"owner-a renewed"[..])
    );

    // Delete at a revision (a lease released only by its holder); a deleted key can be
    // created again (async-nats: the update at revision 0 fails, then it finds the delete
    // marker and updates at the marker's revision).
    leases
        .delete_expect_revision("room.1", Some(first))
        .await
        .expect_err("delete at a stale revision fails");
    assert!(leases.get("room.1").await.expect("get").is_some());
    leases
        .delete_expect_revision("room.1", Some(second))
        .await
        .expect("delete at the current revision");
    assert_eq!(leases.get("room.1").await.expect("get"), None);
    let third = leases
        .create("room.1", "owner-b".into())
        .await
        .expect("create after delete");
    assert!(third > second);

    // max_age expires a lease that is not renewed.
    let written = Instant::now();
    let expired = written + Duration::from_secs(15);
    while leases.get("room.1").await.expect("get").is_some() {
        assert!(Instant::now() < expired, "the key expired with max_age");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "kv: a key with max_age 3 s was gone after {:?}",
        written.elapsed()
    );
    leases
        .create("room.1", "owner-c".into())
        .await
        .expect("create after expiry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_serves_jetstream_and_comes_back_with_its_messages_after_a_kill() {
    let mut cluster = NatsCluster::start(1).await;
    let js = jetstream::new(connect(&cluster).await);
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{STREAM}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create an R1 stream");
    let deadline = Instant::now() + FAILOVER_DEADLINE;
    for n in 1..=10 {
        assert_eq!(publish_retrying(&js, n, deadline).await.sequence, n);
    }
    assert_eq!(cluster.stream_leader(STREAM).await, Some(0));
    cluster.kill(0);
    assert!(!cluster.is_running(0));
    cluster.restart(0).await;
    assert!(cluster.is_running(0));
    let detail = cluster
        .stream_detail(0, STREAM)
        .await
        .expect("the stream after a restart");
    assert_eq!(detail["state"]["messages"], 10);
}
