//! Access control from the outside: what a client may subscribe to, read, write and claim to
//! be, under declarative rules (`users/:id` by `param:id`, `room/:id` for anyone, `admin/*`
//! for nobody; types by `field:userId`, `anyone` and `nobody`) and HS256 JWTs.
//!
//! Every test drives the whole server (session, pipeline, log, hub) over the in-memory
//! transport with the manual clock, and checks both the answer the client gets and that
//! nothing reached a client the rules keep out.

mod support;

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ferry::action::{Entry, Meta};
use ferry::rules::auth::{BRUTEFORCE_DELAY_MS_MAX, BRUTEFORCE_FAILURE_WINDOW_MS};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::time::Duration;
use support::{TestClient, TestServer};

const SECRET: &str = "access-control-test-secret";

const CONFIG: &str = r#"
env = "development"
subprotocol = 1

[auth]
tokens = { "10" = "good-10", "20" = "good-20" }
any_user_token = "shared-token"
jwt_hs256_secret = "access-control-test-secret"

[[channels]]
pattern = "users/:id"
access = "param:id"

[[channels]]
pattern = "room/:id"
access = "anyone"

[[channels]]
pattern = "admin/*"
access = "nobody"

[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]

[[types]]
type = "user/rename"
access = "field:userId"
resend = ["users/{userId}"]

[[types]]
type = "admin/announce"
access = "nobody"
resend = ["admin/{topic}"]
"#;

/// How long "nothing arrives" is watched.
const QUIET: Duration = Duration::from_millis(200);

/// A correct token may wait for the brute-force delay, but for no longer (plus slack).
const SLOW_AUTH_WAIT: Duration = Duration::from_millis(BRUTEFORCE_DELAY_MS_MAX + 3_000);

fn connect_frame(node: &str, token: Option<&str>) -> String {
    let mut options = json!({"subprotocol": 1});
    if let Some(token) = token {
        options["token"] = json!(token);
    }
    json!(["connect", 5, node, 0, options]).to_string()
}

async fn next_json(client: &mut TestClient) -> Value {
    let frame = client.recv().await.expect("connection stays open");
    serde_json::from_str(&frame).expect("the server sends JSON")
}

/// Connects and expects `headers` and `connected`.
async fn connect(server: &TestServer, node: &str, token: &str) -> TestClient {
    let mut client = server.connect();
    client.send(&connect_frame(node, Some(token))).await;
    expect_connected(&mut client, node).await;
    client
}

async fn expect_connected(client: &mut TestClient, node: &str) {
    assert_eq!(
        next_json(client).await,
        json!(["headers", {"env": "development"}]),
        "{node}: development headers"
    );
    let connected = next_json(client).await;
    assert_eq!(connected[0], "connected", "{node}: {connected}");
}

/// Connects with a token that must be refused.
async fn expect_refused(server: &TestServer, node: &str, token: Option<&str>) {
    let mut client = server.connect();
    client.send(&connect_frame(node, token)).await;
    let answer = client.try_recv(SLOW_AUTH_WAIT).await;
    assert_eq!(
        answer.as_deref(),
        Some(r#"["error","wrong-credentials"]"#),
        "{node} with {token:?}"
    );
    assert!(client.is_closed_by_server().await, "{node}: closed");
}

/// Sends one action with `meta` (relative id/time) in its own `sync` numbered `n`, and
/// returns the `logux/processed` or `logux/undo` answering it, after checking that the
/// frames before it are only `synced` and `debug` (no channel history).
async fn sync_one(client: &mut TestClient, n: u64, action: Value, meta: Value) -> Value {
    client
        .send(&json!(["sync", n, action, meta]).to_string())
        .await;
    answer(client, n).await
}

async fn answer(client: &mut TestClient, n: u64) -> Value {
    let mut synced = false;
    loop {
        let frame = next_json(client).await;
        match frame[0].as_str() {
            Some("synced") => {
                assert_eq!(frame[1], json!(n), "synced echoes the sync's added");
                synced = true;
            }
            Some("debug") => {}
            Some("sync") => {
                let items = frame.as_array().expect("array");
                assert_eq!(items.len(), 4, "one answer, no other action: {frame}");
                let action = items[2].clone();
                let kind = action["type"].as_str().unwrap_or_default().to_owned();
                assert!(
                    kind == "logux/processed" || kind == "logux/undo",
                    "only the answer to the client's own action arrives, got {frame}"
                );
                assert!(synced, "synced comes before the answer");
                return action;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

fn assert_undone(answer: &Value, reason: &str, what: &str) {
    assert_eq!(answer["type"], "logux/undo", "{what}: {answer}");
    assert_eq!(answer["reason"], reason, "{what}: {answer}");
}

fn assert_processed(answer: &Value, what: &str) {
    assert_eq!(answer["type"], "logux/processed", "{what}: {answer}");
}

async fn assert_quiet(client: &mut TestClient, who: &str) {
    let extra = client.try_recv(QUIET).await;
    assert_eq!(extra, None, "{who} must receive nothing");
}

/// Stores a server action in `channel`, as a back-end would.
async fn append_server_action(server: &TestServer, action: Value, channel: &str) {
    let (id, time) = server.server.next_action_id();
    server
        .server
        .log
        .append(
            vec![Entry::new(
                action,
                Meta {
                    id,
                    time,
                    channels: vec![channel.to_owned()],
                    ..Meta::default()
                },
            )],
            None,
        )
        .await
        .expect("append a server action");
}

fn subscribe(channel: &str) -> Value {
    json!({"type": "logux/subscribe", "channel": channel})
}

/// A compact HS256 JWT, signed with `secret`.
fn jwt(secret: &str, header: &Value, claims: &Value) -> String {
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(hmac(secret, &signed)))
}

fn hmac(secret: &str, signed: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signed.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hs256(claims: &Value) -> String {
    jwt(SECRET, &json!({"alg": "HS256", "typ": "JWT"}), claims)
}

/// Seconds since the epoch on the server's (manual) clock.
fn now_s(server: &TestServer) -> i64 {
    use ferry::clock::Clock as _;
    server.clock.now_ms() / 1000
}

/// Lets earlier failures from the test address expire, so the next check is not delayed.
fn forget_failures(server: &TestServer) {
    server.clock.advance(BRUTEFORCE_FAILURE_WINDOW_MS);
}

#[tokio::test]
async fn a_user_cannot_subscribe_to_another_users_channel_but_can_to_its_own() {
    let server = TestServer::start(CONFIG);
    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    let own = sync_one(
        &mut ten,
        1,
        subscribe("users/10"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&own, "users/10 for user 10");
    let mut n = 1;
    for channel in ["users/20", "users/1", "users/100", "users/server"] {
        n += 1;
        let other = sync_one(&mut ten, n, subscribe(channel), json!({"id": n, "time": n})).await;
        assert_undone(&other, "denied", channel);
    }
    for channel in ["users/10/x", "users/", "users", "users//10"] {
        n += 1;
        let odd = sync_one(&mut ten, n, subscribe(channel), json!({"id": n, "time": n})).await;
        assert_undone(&odd, "wrongChannel", channel);
    }
    for channel in ["admin/", "admin/x", "admin/x/y"] {
        n += 1;
        let admin = sync_one(&mut ten, n, subscribe(channel), json!({"id": n, "time": n})).await;
        assert_undone(&admin, "denied", channel);
    }
    assert_quiet(&mut ten, "user 10").await;
}

#[tokio::test]
async fn a_client_without_a_user_id_is_refused_by_param_and_field_rules() {
    let server = TestServer::start(CONFIG);
    let mut anonymous = connect(&server, "anonymous", "shared-token").await;
    let param = sync_one(
        &mut anonymous,
        1,
        subscribe("users/anonymous"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_undone(&param, "denied", "users/anonymous without a user id");
    let field = sync_one(
        &mut anonymous,
        2,
        json!({"type": "user/rename", "userId": "anonymous"}),
        json!({"id": 2, "time": 2}),
    )
    .await;
    assert_undone(&field, "denied", "field:userId without a user id");
    let room = sync_one(
        &mut anonymous,
        3,
        subscribe("room/1"),
        json!({"id": 3, "time": 3}),
    )
    .await;
    assert_processed(&room, "room/1 is for anyone");
}

#[tokio::test]
async fn a_denied_subscription_gets_neither_history_nor_live_actions() {
    let server = TestServer::start(CONFIG);
    let mut twenty = connect(&server, "20:bbb:tab", "good-20").await;
    let history = sync_one(
        &mut twenty,
        1,
        json!({"type": "user/rename", "userId": "20", "name": "history"}),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&history, "user 20 writes to users/20");
    // A server-side action in a channel nobody may subscribe to.
    append_server_action(
        &server,
        json!({"type": "admin/announce", "topic": "secret"}),
        "admin/secret",
    )
    .await;

    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    let users = sync_one(
        &mut ten,
        1,
        subscribe("users/20"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_undone(&users, "denied", "users/20 for user 10");
    let with_since = sync_one(
        &mut ten,
        2,
        json!({"type": "logux/subscribe", "channel": "users/20", "since": {"id": "0 x 0", "time": 0}}),
        json!({"id": 2, "time": 2}),
    )
    .await;
    assert_undone(&with_since, "denied", "users/20 with since");
    let admin = sync_one(
        &mut ten,
        3,
        subscribe("admin/secret"),
        json!({"id": 3, "time": 3}),
    )
    .await;
    assert_undone(&admin, "denied", "admin/secret");

    // Live actions in those channels do not reach user 10 either.
    let live = sync_one(
        &mut twenty,
        2,
        json!({"type": "user/rename", "userId": "20", "name": "live"}),
        json!({"id": 2, "time": 2}),
    )
    .await;
    assert_processed(&live, "user 20 writes again");
    append_server_action(
        &server,
        json!({"type": "admin/announce", "topic": "secret", "n": 2}),
        "admin/secret",
    )
    .await;
    assert_quiet(&mut ten, "user 10 after denied subscriptions").await;
    assert_quiet(&mut twenty, "user 20").await;
}

#[tokio::test]
async fn a_user_cannot_write_actions_its_type_rules_deny() {
    let server = TestServer::start(CONFIG);
    let mut twenty = connect(&server, "20:bbb:tab", "good-20").await;
    let own = sync_one(
        &mut twenty,
        1,
        subscribe("users/20"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&own, "user 20 subscribes to its own channel");
    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    let denied = [
        json!({"type": "user/rename", "userId": "20"}),
        json!({"type": "user/rename", "userId": 20}),
        json!({"type": "user/rename", "userId": "20", "extra": "10"}),
        json!({"type": "user/rename", "userId": " 10"}),
        json!({"type": "user/rename", "userId": "10 "}),
        json!({"type": "user/rename", "userId": 10.5}),
        json!({"type": "user/rename", "userId": "010"}),
        json!({"type": "user/rename"}),
        json!({"type": "user/rename", "userId": null}),
        json!({"type": "user/rename", "userId": true}),
        json!({"type": "user/rename", "userId": ["10"]}),
        json!({"type": "user/rename", "userId": {"id": "10"}}),
        json!({"type": "admin/announce", "topic": "secret"}),
        json!({"type": "admin/announce", "topic": "x", "userId": "10"}),
    ];
    let mut n = 0;
    for action in denied {
        n += 1;
        let answer = sync_one(&mut ten, n, action.clone(), json!({"id": n, "time": n})).await;
        assert_undone(&answer, "denied", &action.to_string());
        assert_eq!(answer["action"], action, "the undo carries the action");
    }
    for action in [
        json!({"type": "admin/other"}),
        json!({"type": "users/rename", "userId": "10"}),
        json!({"type": "User/rename", "userId": "10"}),
    ] {
        n += 1;
        let answer = sync_one(&mut ten, n, action.clone(), json!({"id": n, "time": n})).await;
        assert_undone(&answer, "unknownType", &action.to_string());
    }
    // The same rules allow user 10 its own: a string or a number equal to its id.
    for action in [
        json!({"type": "user/rename", "userId": "10"}),
        json!({"type": "user/rename", "userId": 10}),
    ] {
        n += 1;
        let answer = sync_one(&mut ten, n, action.clone(), json!({"id": n, "time": n})).await;
        assert_processed(&answer, &action.to_string());
    }
    assert_quiet(
        &mut twenty,
        "user 20's channel after user 10's denied writes",
    )
    .await;
}

#[tokio::test]
async fn a_client_cannot_act_under_another_client_or_user_id_but_its_other_tabs_can() {
    let server = TestServer::start(CONFIG);
    let mut reader = connect(&server, "20:bbb:tab", "good-20").await;
    let joined = sync_one(
        &mut reader,
        1,
        subscribe("room/1"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&joined, "reader joins room/1");
    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    let message = json!({"type": "room/message", "room": "1"});
    let mut n = 0;
    for foreign in [
        "20:bbb:tab",
        "20:bbb:other",
        "10:other:tab",
        "20:aaa:tab",
        "10",
        "10:aaaa:tab",
        "10:aa:tab",
        "server:test",
        "server:x",
        "aaa:tab",
    ] {
        n += 1;
        // Ids no action in the log has (see the ignored test below for one that does).
        let shift = 100 + n;
        let answer = sync_one(
            &mut ten,
            n,
            message.clone(),
            json!({"id": [shift, foreign, 0], "time": n}),
        )
        .await;
        assert_undone(&answer, "denied", foreign);
        assert_eq!(
            answer["id"],
            json!(format!("{} {foreign} 0", 1_000_000 + shift)),
            "the undo names the claimed id"
        );
    }
    // A subscription is an action too: not under someone else's id either.
    n += 1;
    let subscription = sync_one(
        &mut ten,
        n,
        subscribe("room/2"),
        json!({"id": [100 + n, "20:bbb:tab", 0], "time": n}),
    )
    .await;
    assert_undone(&subscription, "denied", "subscribe under another id");
    assert_quiet(&mut reader, "the room after forged ids").await;

    // Another tab of the same client (`10:aaa`) may add actions, and they are delivered.
    for tab in ["10:aaa:tab2", "10:aaa", "10:aaa:tab:with:colons"] {
        n += 1;
        let answer = sync_one(
            &mut ten,
            n,
            message.clone(),
            json!({"id": [n, tab, 0], "time": n}),
        )
        .await;
        assert_processed(&answer, tab);
        let delivered = next_json(&mut reader).await;
        assert_eq!(delivered[0], "sync", "{delivered}");
        assert_eq!(delivered[3]["id"], json!([n, tab, 0]), "{delivered}");
    }
}

/// Regression (found by this file): `Worker::process` (src/server/pipeline.rs) took any
/// action whose id was already in the log for a re-sent duplicate before checking that the
/// id is the connection's own. An action under another client's stored id got only `synced`
/// (no `logux/undo`), one under an unknown id got `denied`: the difference told any client
/// which action ids other clients had stored (ids carry ms timestamps, so when another user
/// acted). Both must be denied.
#[tokio::test]
async fn a_forged_id_of_a_stored_action_is_denied_not_acknowledged_as_a_duplicate() {
    let server = TestServer::start(CONFIG);
    let mut twenty = connect(&server, "20:bbb:tab", "good-20").await;
    let own = sync_one(
        &mut twenty,
        1,
        json!({"type": "room/message", "room": "1"}),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&own, "user 20's own action");
    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    // "1000001 20:bbb:tab 0" is stored; "1000002 20:bbb:tab 0" is not.
    for (n, shift) in [(1, 2), (2, 1)] {
        let sync = json!(["sync", n, {"type": "room/message", "room": "1"},
            {"id": [shift, "20:bbb:tab", 0], "time": 1}]);
        ten.send(&sync.to_string()).await;
        assert_eq!(next_json(&mut ten).await, json!(["synced", n]));
        let mut undone = false;
        while let Some(frame) = ten.try_recv(Duration::from_secs(1)).await {
            undone |= frame.contains(r#""reason":"denied""#);
        }
        assert!(undone, "a forged id at shift {shift} gets no logux/undo");
    }
}

#[tokio::test]
async fn server_meta_from_a_client_is_denied_and_nothing_is_delivered() {
    let server = TestServer::start(CONFIG);
    let mut twenty = connect(&server, "20:bbb:tab", "good-20").await;
    for (n, channel) in [(1, "room/1"), (2, "room/2"), (3, "users/20")] {
        let answer = sync_one(
            &mut twenty,
            n,
            subscribe(channel),
            json!({"id": n, "time": n}),
        )
        .await;
        assert_processed(&answer, channel);
    }
    let mut ten = connect(&server, "10:aaa:tab", "good-10").await;
    let injected = [
        ("channels", json!(["room/2", "users/20"])),
        ("users", json!(["20"])),
        ("clients", json!(["20:bbb"])),
        ("nodes", json!(["20:bbb:tab"])),
        ("reasons", json!(["keep"])),
        ("added", json!(1)),
        ("status", json!("processed")),
        ("excludeClients", json!(["20:bbb"])),
        ("exclude_clients", json!(["20:bbb"])),
        ("channel", json!("room/2")),
        ("server", json!("server:test")),
    ];
    let mut n = 0;
    for (key, value) in injected {
        for action in [
            json!({"type": "room/message", "room": "1"}),
            json!({"type": "user/rename", "userId": "10"}),
            subscribe("room/3"),
        ] {
            n += 1;
            let mut meta = json!({"id": n, "time": n});
            meta[key] = value.clone();
            let answer = sync_one(&mut ten, n, action.clone(), meta).await;
            assert_undone(&answer, "denied", &format!("meta.{key} on {action}"));
        }
    }
    assert_quiet(&mut twenty, "user 20 after injected meta").await;
    // The denied subscription did not subscribe: room/3 traffic does not reach user 10.
    let mut writer = connect(&server, "30:ccc:tab", "shared-token").await;
    let posted = sync_one(
        &mut writer,
        1,
        json!({"type": "room/message", "room": "3"}),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&posted, "a message in room/3");
    assert_quiet(&mut ten, "user 10 after a denied subscription").await;
}

#[tokio::test]
async fn expired_not_yet_valid_or_wrongly_signed_jwts_are_refused() {
    let server = TestServer::start(CONFIG);
    let header = json!({"alg": "HS256", "typ": "JWT"});
    let now = now_s(&server);
    let valid = hs256(&json!({"sub": "42", "exp": now + 60}));
    let (signed, _) = valid.rsplit_once('.').expect("three parts");
    let valid_signature = valid.rsplit('.').next().expect("a signature");
    let tampered_payload = format!(
        "{}.{}.{valid_signature}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(json!({"sub": "43", "exp": now + 60}).to_string())
    );
    // 20 bytes of JSON: its base64 ends with padding, as does the 32-byte signature's.
    let padded_claims = json!({"sub": "42", "x": "y"});
    assert_ne!(padded_claims.to_string().len() % 3, 0);
    let padded = format!(
        "{}.{}.{}",
        URL_SAFE.encode(header.to_string()),
        URL_SAFE.encode(padded_claims.to_string()),
        URL_SAFE.encode(hmac(
            SECRET,
            &format!(
                "{}.{}",
                URL_SAFE.encode(header.to_string()),
                URL_SAFE.encode(padded_claims.to_string())
            )
        ))
    );
    let refused: Vec<(&str, String)> = vec![
        (
            "expired a minute ago",
            hs256(&json!({"sub": "42", "exp": now - 60})),
        ),
        (
            "expiring this second",
            hs256(&json!({"sub": "42", "exp": now})),
        ),
        (
            "not valid before later",
            hs256(&json!({"sub": "42", "nbf": now + 60})),
        ),
        (
            "exp that is a string",
            hs256(&json!({"sub": "42", "exp": "99999999999"})),
        ),
        (
            "exp that is null",
            hs256(&json!({"sub": "42", "exp": null})),
        ),
        (
            "signed with another secret",
            jwt("other-secret", &header, &json!({"sub": "42"})),
        ),
        (
            "signed with the secret plus a byte",
            jwt(&format!("{SECRET}x"), &header, &json!({"sub": "42"})),
        ),
        ("payload swapped under a valid signature", tampered_payload),
        ("signature cut", valid[..valid.len() - 2].to_owned()),
        (
            "signature of another token part",
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])),
        ),
        (
            "alg none without signature",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
                URL_SAFE_NO_PAD.encode(json!({"sub": "42"}).to_string())
            ),
        ),
        (
            "alg none with an HS256 signature",
            jwt(SECRET, &json!({"alg": "none"}), &json!({"sub": "42"})),
        ),
        (
            "alg HS512",
            jwt(SECRET, &json!({"alg": "HS512"}), &json!({"sub": "42"})),
        ),
        (
            "alg hs256 in lowercase",
            jwt(SECRET, &json!({"alg": "hs256"}), &json!({"sub": "42"})),
        ),
        (
            "no alg",
            jwt(SECRET, &json!({"typ": "JWT"}), &json!({"sub": "42"})),
        ),
        ("subject of another user", hs256(&json!({"sub": "43"}))),
        ("numeric subject", hs256(&json!({"sub": 42}))),
        ("no subject", hs256(&json!({"name": "42"}))),
        (
            "payload that is not an object",
            jwt(SECRET, &header, &json!(["42"])),
        ),
        ("padded base64", padded),
        ("four parts", format!("{valid}.x")),
        ("two parts", signed.to_owned()),
        (
            "over 16 KiB",
            hs256(&json!({"sub": "42", "pad": "x".repeat(17 * 1024)})),
        ),
    ];
    let tried = refused.len();
    for (what, token) in refused {
        // Each failure counts against the address; move past it so no delay builds up.
        forget_failures(&server);
        let mut client = server.connect();
        client
            .send(&connect_frame("42:jwt:tab", Some(&token)))
            .await;
        assert_eq!(
            client.recv().await.as_deref(),
            Some(r#"["error","wrong-credentials"]"#),
            "a JWT {what} must be refused"
        );
        assert!(client.is_closed_by_server().await, "{what}: closed");
    }
    // The same shapes, correct, are accepted (so the refusals above are about the defect).
    forget_failures(&server);
    let now = now_s(&server);
    for (node, token) in [
        ("42:jwt:a", hs256(&json!({"sub": "42", "exp": now + 1}))),
        (
            "42:jwt:b",
            hs256(&json!({"sub": "42", "nbf": now, "exp": now + 60})),
        ),
        ("42:jwt2:c", hs256(&json!({"sub": "42"}))),
    ] {
        let mut client = server.connect();
        client.send(&connect_frame(node, Some(&token))).await;
        expect_connected(&mut client, node).await;
    }
    println!("access_control: {tried} refused JWTs tried");
}

#[tokio::test]
async fn a_correct_token_is_never_refused_because_of_other_clients_failures() {
    let server = TestServer::start(CONFIG);
    // Many failures from the same address at once: wrong tokens, forged JWTs, the server user.
    let mut failing = Vec::new();
    for n in 0..24 {
        let client = server.connect();
        let (node, token) = match n % 4 {
            0 => (format!("20:bad{n}:tab"), "wrong".to_owned()),
            1 => (
                format!("30:bad{n}:tab"),
                jwt("guess", &json!({"alg": "HS256"}), &json!({"sub": "30"})),
            ),
            2 => (format!("server:bad{n}"), "shared-token".to_owned()),
            _ => (format!("10:bad{n}:tab"), "good-20".to_owned()),
        };
        client.send(&connect_frame(&node, Some(&token))).await;
        failing.push(client);
    }
    for mut client in failing {
        assert_eq!(
            client.try_recv(SLOW_AUTH_WAIT * 4).await.as_deref(),
            Some(r#"["error","wrong-credentials"]"#)
        );
    }
    // The failures are recent (the manual clock stands still): the answer may be delayed, but
    // every correct credential is accepted. They connect at once, so the delays overlap.
    let now = now_s(&server);
    let correct = [
        ("10:aaa:tab", "good-10".to_owned()),
        ("42:jwt:tab", hs256(&json!({"sub": "42", "exp": now + 60}))),
        ("77:any:tab", "shared-token".to_owned()),
    ];
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for (node, token) in &correct {
        let client = server.connect();
        client.send(&connect_frame(node, Some(token))).await;
        clients.push((node, client));
    }
    for (node, mut client) in clients {
        let headers = client.try_recv(SLOW_AUTH_WAIT).await;
        assert_eq!(
            headers.as_deref(),
            Some(r#"["headers",{"env":"development"}]"#),
            "{node}: a correct token is accepted after others' failures"
        );
        let connected = next_json(&mut client).await;
        assert_eq!(connected[0], "connected", "{node}");
    }
    let waited = started.elapsed();
    println!("access_control: correct tokens accepted after {waited:?} despite 24 failures");
    assert!(
        waited <= SLOW_AUTH_WAIT,
        "delayed by at most the brute-force maximum, not {waited:?}"
    );
}

#[tokio::test]
async fn the_reserved_user_server_gets_wrong_credentials_whatever_its_token() {
    let server = TestServer::start(CONFIG);
    let now = now_s(&server);
    let server_jwt = hs256(&json!({"sub": "server", "exp": now + 60}));
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("server:abc", Some("shared-token")),
        ("server:abc:tab", Some("shared-token")),
        ("server:test", Some("shared-token")),
        ("server", Some("shared-token")),
        ("server:abc", Some(&server_jwt)),
        ("server:abc", Some("good-10")),
        ("server:abc", None),
        ("1 server:abc 0", Some("shared-token")),
    ];
    for (node, token) in cases {
        forget_failures(&server);
        expect_refused(&server, node, token).await;
    }
    // Names that only contain "server" are ordinary users.
    forget_failures(&server);
    connect(&server, "servers:abc:tab", "shared-token").await;
    connect(&server, "10:server:tab", "good-10").await;
}

#[tokio::test]
async fn wrong_tokens_for_real_users_get_wrong_credentials() {
    let server = TestServer::start(CONFIG);
    let cases: Vec<(&str, Option<&str>)> = vec![
        ("10:aaa:tab", Some("good-20")),
        ("10:aaa:tab", Some("good-10 ")),
        ("10:aaa:tab", Some("GOOD-10")),
        ("10:aaa:tab", Some("")),
        ("10:aaa:tab", None),
        ("20:bbb:tab", Some("good-10")),
        ("anonymous", Some("good-10")),
        ("anonymous", None),
    ];
    for (node, token) in cases {
        forget_failures(&server);
        expect_refused(&server, node, token).await;
    }
}

/// Regression (found by this file): a `*` (or `logux/*`) type rule also accepted client
/// actions of the protocol's own `logux/` types, so a client could forge a `logux/undo` or
/// `logux/processed` naming another client's action and have it re-sent to that client
/// through a channel (the demo rules do exactly that): Logux clients then revert (undo) or
/// settle (processed) their own action. Only `logux/subscribe` and `logux/unsubscribe` are
/// accepted from clients; other `logux/` types are `unknownType`, whatever the rules.
#[tokio::test]
async fn a_client_cannot_forge_server_answers_for_another_clients_action() {
    let config = r#"
env = "development"
[auth]
tokens = { "10" = "good-10", "20" = "good-20" }
[[channels]]
pattern = "room/:id"
access = "anyone"
[[types]]
type = "*"
access = "anyone"
resend = ["{channel}"]
"#;
    let server = TestServer::start(config);
    let mut victim = connect(&server, "20:bbb:tab", "good-20").await;
    let joined = sync_one(
        &mut victim,
        1,
        subscribe("room/1"),
        json!({"id": 1, "time": 1}),
    )
    .await;
    assert_processed(&joined, "the victim joins room/1");
    let mut forger = connect(&server, "10:aaa:tab", "good-10").await;
    let forged = [
        json!({"type": "logux/undo", "id": "1000002 20:bbb:tab 0", "reason": "denied",
            "action": {"type": "room/message"}, "channel": "room/1"}),
        json!({"type": "logux/processed", "id": "1000003 20:bbb:tab 0", "channel": "room/1"}),
    ];
    for (n, action) in (1..).zip(forged) {
        let answer = sync_one(&mut forger, n, action.clone(), json!({"id": n, "time": n})).await;
        assert_undone(&answer, "unknownType", &action.to_string());
    }
    assert_quiet(&mut victim, "the victim").await;
}
