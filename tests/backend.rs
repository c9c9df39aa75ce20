//! Back-end hooks and the server API against a real `ferry` process and a test back-end
//! (an HTTP server in this test process): reliable `process` (retries, restart, deadline,
//! failure), `access`/`resend`/`load`/`auth`, event hooks with their cursor, and the API.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::backend::{backend_section, Call, Handler, TestBackend, SECRET};
use support::child::{connect, Ferry};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<TcpStream>;

const RULES: &str = r#"
env = "production"
[auth]
any_user_token = "secret"
[[channels]]
pattern = "orders/:id"
access = "anyone"
hooks = ["access", "events"]
[[channels]]
pattern = "catalog"
access = "anyone"
hooks = ["load"]
[[types]]
type = "order/buy"
access = "anyone"
resend = ["orders/{order}"]
hooks = ["process"]
headers = ["x-device"]
[[types]]
type = "order/note"
access = "anyone"
hooks = ["access", "resend"]
[[types]]
type = "order/status"
access = "nobody"
"#;

fn write_config(dir: &Path, backend_url: &str, extra_backend: &str) -> std::path::PathBuf {
    let path = dir.join("ferry.toml");
    let text = format!("{RULES}\n{}", backend_section(backend_url, extra_backend));
    std::fs::write(&path, text).expect("write config");
    path
}

/// A test back-end with `handler` and a Ferry using it (`extra` goes into `[backend]`).
async fn start(handler: Handler, extra: &str) -> (TestBackend, tempfile::TempDir, Ferry) {
    let backend = TestBackend::start(handler).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &backend.url(), extra);
    let ferry = Ferry::start(&dir.path().join("data"), &config).await;
    (backend, dir, ferry)
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

/// Frames until `done` says so (or `wait` passes); every frame seen, in order.
async fn read_until(
    socket: &mut Socket,
    wait: Duration,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while !done(&frames) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                frames.push(serde_json::from_str(&text).expect("json frame"));
            }
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    frames
}

/// The actions in `sync` frames.
fn actions(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|frame| frame[0] == "sync")
        .flat_map(|frame| {
            frame.as_array().expect("array")[2..]
                .chunks(2)
                .map(|pair| pair[0].clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The `logux/undo` actions in `sync` frames.
fn undos(frames: &[Value]) -> Vec<Value> {
    actions(frames)
        .into_iter()
        .filter(|a| is_type(a, "logux/undo"))
        .collect()
}

fn has_action(frames: &[Value], predicate: impl Fn(&Value) -> bool) -> bool {
    actions(frames).iter().any(predicate)
}

fn is_type(action: &Value, action_type: &str) -> bool {
    action["type"] == action_type
}

fn buy(order: u64, id: i64) -> Value {
    json!(["sync", id, {"type": "order/buy", "order": order}, {"id": id, "time": id}])
}

fn ok() -> (u16, Value) {
    (200, json!({"result": "allowed"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_is_retried_until_the_backend_answers_and_its_actions_reach_the_client() {
    let failures = Arc::new(AtomicUsize::new(0));
    let failures_seen = failures.clone();
    let handler: Handler = Arc::new(move |call: &Call| match call.hook.as_str() {
        "process" => {
            if failures_seen.fetch_add(1, Ordering::SeqCst) < 2 {
                return (500, json!({"error": "payment API down"}));
            }
            let order = call.body["action"]["order"].as_u64().unwrap_or(0);
            let client = call.body["client_id"].as_str().unwrap_or("").to_owned();
            (
                200,
                json!({"result": "processed", "actions": [{
                    "id": format!("order-{order}-paid"),
                    "action": {"type": "order/status", "order": order, "status": "paid"},
                    "channels": [format!("orders/{order}")], "clients": [client]
                }]}),
            )
        }
        _ => ok(),
    });
    let (backend, _dir, ferry) = start(handler, "").await;
    let (mut socket, _) = connect(ferry.port, "10:buyer:1").await.expect("connect");
    send(&mut socket, buy(1, 1)).await;
    let frames = read_until(&mut socket, Duration::from_secs(10), |frames| {
        has_action(frames, |a| is_type(a, "logux/processed"))
    })
    .await;
    let synced_at = frames.iter().position(|f| f[0] == "synced");
    let status_at = frames.iter().position(|f| {
        f[0] == "sync"
            && actions(std::slice::from_ref(f))
                .iter()
                .any(|a| a["status"] == "paid")
    });
    let processed_at = frames.iter().position(|f| {
        f[0] == "sync"
            && actions(std::slice::from_ref(f))
                .iter()
                .any(|a| is_type(a, "logux/processed"))
    });
    assert!(synced_at.is_some(), "synced before processing: {frames:?}");
    assert!(
        status_at.is_some() && processed_at.is_some() && status_at <= processed_at,
        "the status arrives, then processed: {frames:?}"
    );
    let calls = backend.calls_of("process");
    assert_eq!(calls.len(), 3, "two failures, then success");
    let key = calls[0].idempotency_key.clone().expect("idempotency key");
    assert!(calls
        .iter()
        .all(|c| c.idempotency_key.as_deref() == Some(key.as_str())));
    assert!(calls.iter().all(|c| c.signature_ok));
    assert_eq!(calls[0].body["meta"]["id"], key);
    assert_eq!(calls[0].body["user_id"], "10");
    assert_eq!(calls[0].body["meta"]["channels"], json!(["orders/1"]));
    // Nothing left to retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(backend.calls_of("process").len(), 3);
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_tasks_survive_a_kill_and_run_after_restart() {
    let up = Arc::new(AtomicBool::new(false));
    let charged = Arc::new(AtomicUsize::new(0));
    let keys = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let (up_seen, charged_seen, keys_seen) = (up.clone(), charged.clone(), keys.clone());
    let handler: Handler = Arc::new(move |call: &Call| {
        if call.hook != "process" {
            return ok();
        }
        if !up_seen.load(Ordering::SeqCst) {
            return (503, json!({"error": "down"}));
        }
        let key = call.idempotency_key.clone().unwrap_or_default();
        if keys_seen.lock().expect("keys").insert(key) {
            charged_seen.fetch_add(1, Ordering::SeqCst);
        }
        (200, json!({"result": "processed"}))
    });
    let backend = TestBackend::start(handler).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &backend.url(), "");
    let ferry = Ferry::start(&data, &config).await;
    let (mut socket, _) = connect(ferry.port, "10:buyer:1").await.expect("connect");
    send(&mut socket, buy(2, 1)).await;
    let frames = read_until(&mut socket, Duration::from_secs(5), |frames| {
        frames.iter().any(|f| f[0] == "synced")
    })
    .await;
    assert!(frames.iter().any(|f| f[0] == "synced"), "{frames:?}");
    // Killed while the back-end fails and Ferry retries.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while backend.calls_of("process").len() < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        backend.calls_of("process").len() >= 2,
        "retrying before the kill"
    );
    ferry.kill();
    drop(socket);
    up.store(true, Ordering::SeqCst);
    let ferry = Ferry::start(&data, &config).await;
    // The client comes back and gets its processed from the connect catch-up.
    let (mut socket, _) = connect(ferry.port, "10:buyer:1").await.expect("reconnect");
    let frames = read_until(&mut socket, Duration::from_secs(10), |frames| {
        has_action(frames, |a| is_type(a, "logux/processed"))
    })
    .await;
    assert!(
        has_action(&frames, |a| is_type(a, "logux/processed")),
        "{frames:?}"
    );
    assert_eq!(charged.load(Ordering::SeqCst), 1, "charged once");
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_process_and_a_passed_deadline_become_undo() {
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "process" if call.body["action"]["order"] == 3 => {
            (200, json!({"result": "failed", "reason": "outOfStock"}))
        }
        "process" => (500, json!({})),
        _ => ok(),
    });
    let (backend, _dir, ferry) = start(handler, "process_deadline_ms = 600").await;
    let (mut socket, _) = connect(ferry.port, "10:buyer:1").await.expect("connect");
    send(&mut socket, buy(3, 1)).await;
    send(&mut socket, buy(4, 2)).await;
    let frames = read_until(&mut socket, Duration::from_secs(10), |frames| {
        undos(frames).len() >= 2
    })
    .await;
    let undos = undos(&frames);
    assert_eq!(undos.len(), 2, "{frames:?}");
    assert_eq!(undos[0]["reason"], "outOfStock");
    assert_eq!(undos[0]["action"]["order"], 3);
    assert_eq!(undos[1]["reason"], "error", "deadline");
    assert_eq!(undos[1]["action"]["order"], 4);
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_resend_and_load_hooks_decide_for_the_rules_that_name_them() {
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "access" if call.body["action"]["channel"] == "orders/666" => {
            (200, json!({"result": "denied"}))
        }
        "access" if call.body["action"]["channel"] == "orders/404" => {
            (200, json!({"result": "not_found"}))
        }
        "access"
            if call.body["action"]["type"] == "order/note"
                && call.body["action"]["broken"] == true =>
        {
            (500, json!({}))
        }
        "resend" => (200, json!({"channels": ["orders/9"]})),
        "load" => (
            200,
            json!({"actions": [{"action": {"type": "catalog/item", "sku": "a"}}]}),
        ),
        _ => ok(),
    });
    let (backend, _dir, ferry) = start(handler, "").await;
    let (mut reader, _) = connect(ferry.port, "20:reader:1").await.expect("connect");
    let subscribe = |channel: &str, id: i64| json!(["sync", id, {"type": "logux/subscribe", "channel": channel}, {"id": id, "time": id}]);
    send(&mut reader, subscribe("orders/666", 1)).await;
    send(&mut reader, subscribe("orders/404", 2)).await;
    send(&mut reader, subscribe("orders/9", 3)).await;
    send(&mut reader, subscribe("catalog", 4)).await;
    let frames = read_until(&mut reader, Duration::from_secs(10), |frames| {
        frames.iter().filter(|f| f[0] == "synced").count() >= 4
    })
    .await;
    let answers = actions(&frames);
    let reasons: Vec<&Value> = answers
        .iter()
        .filter(|a| is_type(a, "logux/undo"))
        .map(|a| &a["reason"])
        .collect();
    assert_eq!(reasons, vec!["denied", "notFound"], "{frames:?}");
    assert!(
        answers.iter().any(|a| a["type"] == "catalog/item"),
        "load: {frames:?}"
    );
    // `order/note` goes where the resend hook says; a back-end error undoes it.
    let (mut writer, _) = connect(ferry.port, "30:writer:1").await.expect("connect");
    send(
        &mut writer,
        json!(["sync", 1, {"type": "order/note", "text": "hi"}, {"id": 1, "time": 1}]),
    )
    .await;
    send(
        &mut writer,
        json!(["sync", 2, {"type": "order/note", "broken": true}, {"id": 2, "time": 2}]),
    )
    .await;
    let frames = read_until(&mut reader, Duration::from_secs(10), |frames| {
        has_action(frames, |a| is_type(a, "order/note"))
    })
    .await;
    assert!(has_action(&frames, |a| a["text"] == "hi"), "{frames:?}");
    let frames = read_until(&mut writer, Duration::from_secs(10), |frames| {
        has_action(frames, |a| is_type(a, "logux/undo"))
    })
    .await;
    let undo = actions(&frames)
        .into_iter()
        .find(|a| is_type(a, "logux/undo"))
        .expect("undo");
    assert_eq!(undo["reason"], "error");
    assert_eq!(undo["action"]["broken"], true);
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_hook_decides_who_connects() {
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "auth" if call.body["token"] == "good" => (200, json!({"result": "allowed"})),
        "auth" if call.body["token"] == "old-app" => (200, json!({"result": "wrong_subprotocol"})),
        "auth" if call.body["token"] == "flaky" => (500, json!({})),
        _ => (200, json!({"result": "denied"})),
    });
    let (backend, _dir, ferry) = start(handler, "auth = true").await;
    let answer = |token: &'static str| async move {
        let stream = TcpStream::connect(("127.0.0.1", ferry.port))
            .await
            .expect("tcp");
        let (mut socket, _) =
            tokio_tungstenite::client_async(format!("ws://127.0.0.1:{}/", ferry.port), stream)
                .await
                .expect("upgrade");
        send(
            &mut socket,
            json!(["connect", 5, "10:a:1", 0, {"token": token}]),
        )
        .await;
        read_until(&mut socket, Duration::from_secs(5), |frames| {
            !frames.is_empty()
        })
        .await
    };
    assert_eq!(answer("good").await[0][0], "connected");
    assert_eq!(
        answer("bad").await[0],
        json!(["error", "wrong-credentials"])
    );
    assert_eq!(answer("old-app").await[0][1], "wrong-subprotocol");
    // No answer from the back-end: the socket closes without a fatal error.
    assert!(answer("flaky").await.is_empty());
    let auth_calls = backend.calls_of("auth");
    assert_eq!(auth_calls.len(), 4);
    assert_eq!(auth_calls[0].body["user_id"], "10");
    ferry.kill();
    backend.stop();
}

async fn api(port: u16, method: &str, path: &str, body: &str, auth: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    let status = text[9..12].parse().expect("status");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn signed(body: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    format!(
        "Ferry-Timestamp: {now}\r\nFerry-Signature: {}\r\n",
        ferry::backend::sign::sign(SECRET, now, body.as_bytes())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_adds_actions_once_per_id_reads_channels_and_refuses_wrong_credentials() {
    let (backend, _dir, ferry) = start(Arc::new(|_: &Call| ok()), "").await;
    let (mut reader, _) = connect(ferry.port, "10:buyer:1").await.expect("connect");
    send(
        &mut reader,
        json!(["sync", 1, {"type": "logux/subscribe", "channel": "orders/7"}, {"id": 1, "time": 1}]),
    )
    .await;
    read_until(&mut reader, Duration::from_secs(5), |f| {
        f.iter().any(|f| f[0] == "synced")
    })
    .await;
    let body = r#"{"actions":[{"id":"order-7-paid","action":{"type":"order/status","order":7,"status":"paid"},"channels":["orders/7"]}]}"#;
    let bearer = format!("Authorization: Bearer {SECRET}\r\n");
    let (status, first) = api(ferry.port, "POST", "/api/v1/actions", body, &bearer).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["results"][0]["duplicate"], false);
    let (status, again) = api(ferry.port, "POST", "/api/v1/actions", body, &signed(body)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["results"][0]["duplicate"], true);
    assert_eq!(again["results"][0]["added"], first["results"][0]["added"]);
    // Wrong credentials store nothing.
    let wrong =
        r#"{"actions":[{"id":"forged","action":{"type":"order/status"},"channels":["orders/7"]}]}"#;
    let (status, _) = api(
        ferry.port,
        "POST",
        "/api/v1/actions",
        wrong,
        "Authorization: Bearer nope\r\n",
    )
    .await;
    assert_eq!(status, 401);
    let mut tampered = signed(body);
    tampered.push_str("X-Ignore: 1\r\n");
    let (status, _) = api(ferry.port, "POST", "/api/v1/actions", wrong, &tampered).await;
    assert_eq!(status, 401, "a signature of another body");
    let (status, error) = api(
        ferry.port,
        "POST",
        "/api/v1/actions",
        r#"{"actions":[{"action":{}}]}"#,
        &bearer,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error["error"].as_str().is_some_and(|e| e.contains("id")),
        "{error}"
    );
    // The subscriber got it once.
    let frames = read_until(&mut reader, Duration::from_millis(800), |_| false).await;
    let statuses = actions(&frames)
        .into_iter()
        .filter(|a| is_type(a, "order/status"))
        .count();
    assert_eq!(statuses, 1, "{frames:?}");
    let (status, page) = api(
        ferry.port,
        "GET",
        "/api/v1/channel?name=orders%2F7&since=0",
        "",
        &bearer,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(page["actions"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["actions"][0]["action"]["status"], "paid");
    assert_eq!(
        page["actions"][0]["meta"]["id"],
        "0 server:api:order-7-paid 0"
    );
    let (status, _) = api(
        ferry.port,
        "GET",
        "/api/v1/state?key=counter%2F1",
        "",
        &bearer,
    )
    .await;
    assert_eq!(status, 404);
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_backend_in_order_at_least_once_and_resume_after_restart() {
    let accepting = Arc::new(AtomicBool::new(true));
    let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (accepting_seen, accepted_seen) = (accepting.clone(), accepted.clone());
    let handler: Handler = Arc::new(move |call: &Call| {
        if call.hook != "events" {
            return ok();
        }
        if !accepting_seen.load(Ordering::SeqCst) {
            return (500, json!({}));
        }
        let events = call.body["events"].as_array().cloned().unwrap_or_default();
        accepted_seen.lock().expect("accepted").push(
            events
                .iter()
                .map(|event| event["action"]["n"].as_u64().unwrap_or(99))
                .collect::<Vec<_>>(),
        );
        ok()
    });
    let backend = TestBackend::start(handler).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = write_config(dir.path(), &backend.url(), "events_batch_max = 3");
    let ferry = Ferry::start(&data, &config).await;
    let bearer = format!("Authorization: Bearer {SECRET}\r\n");
    let add = |n: u64| {
        format!(
            r#"{{"actions":[{{"id":"e-{n}","action":{{"type":"order/status","n":{n}}},"channels":["orders/{}"]}}]}}"#,
            n % 2
        )
    };
    for n in 0..5 {
        assert_eq!(
            api(ferry.port, "POST", "/api/v1/actions", &add(n), &bearer)
                .await
                .0,
            200
        );
    }
    let delivered = |_: &TestBackend| -> Vec<u64> {
        accepted
            .lock()
            .expect("accepted")
            .iter()
            .flatten()
            .copied()
            .collect()
    };
    let wait_for = |count: usize| {
        let backend = &backend;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while delivered(backend).len() < count && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(5).await;
    assert_eq!(delivered(&backend), vec![0, 1, 2, 3, 4]);
    assert!(accepted
        .lock()
        .expect("accepted")
        .iter()
        .all(|batch| batch.len() <= 3));
    assert!(backend
        .calls_of("events")
        .iter()
        .all(|call| call.signature_ok));
    // The back-end fails: Ferry is killed while retrying, and resumes after the cursor.
    accepting.store(false, Ordering::SeqCst);
    for n in 5..7 {
        assert_eq!(
            api(ferry.port, "POST", "/api/v1/actions", &add(n), &bearer)
                .await
                .0,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        backend.calls_of("events").len() > accepted.lock().expect("accepted").len(),
        "failed deliveries were retried"
    );
    ferry.kill();
    accepting.store(true, Ordering::SeqCst);
    let ferry = Ferry::start(&data, &config).await;
    wait_for(7).await;
    let seen = delivered(&backend);
    assert_eq!(
        seen,
        vec![0, 1, 2, 3, 4, 5, 6],
        "no loss, no repeat of delivered batches"
    );
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_process_call_holds_up_only_that_action() {
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "process" if call.body["action"]["order"] == 10 => {
            (200, json!({"result": "processed", "delay_ms": 1500}))
        }
        "process" => (200, json!({"result": "processed"})),
        _ => ok(),
    });
    let (backend, _dir, ferry) = start(handler, "").await;
    let (mut slow, _) = connect(ferry.port, "10:slow:1").await.expect("connect");
    let (mut other, _) = connect(ferry.port, "11:other:1").await.expect("connect");
    send(&mut slow, buy(10, 1)).await;
    read_until(&mut slow, Duration::from_secs(5), |f| {
        f.iter().any(|f| f[0] == "synced")
    })
    .await;
    // While the back-end sits on order 10: the same client's pings, another client's
    // hooked and plain actions are all answered.
    send(&mut slow, json!(["ping", 1])).await;
    let frames = read_until(&mut slow, Duration::from_secs(2), |f| {
        f.iter().any(|f| f[0] == "pong")
    })
    .await;
    assert!(frames.iter().any(|f| f[0] == "pong"), "{frames:?}");
    send(&mut other, buy(11, 1)).await;
    send(
        &mut other,
        json!(["sync", 2, {"type": "order/note", "text": "x"}, {"id": 2, "time": 2}]),
    )
    .await;
    let frames = read_until(&mut other, Duration::from_secs(2), |f| {
        actions(f)
            .iter()
            .filter(|a| is_type(a, "logux/processed"))
            .count()
            >= 2
    })
    .await;
    assert_eq!(
        actions(&frames)
            .iter()
            .filter(|a| is_type(a, "logux/processed"))
            .count(),
        2,
        "{frames:?}"
    );
    assert!(
        !has_action(
            &read_until(&mut slow, Duration::from_millis(10), |_| false).await,
            |a| { is_type(a, "logux/processed") }
        ),
        "order 10 is still with the back-end"
    );
    let frames = read_until(&mut slow, Duration::from_secs(10), |f| {
        has_action(f, |a| is_type(a, "logux/processed"))
    })
    .await;
    assert!(
        has_action(&frames, |a| is_type(a, "logux/processed")),
        "{frames:?}"
    );
    ferry.kill();
    backend.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_is_called_when_its_certificate_is_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert = dir.path().join("backend-cert.pem");
    let key = dir.path().join("backend-key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    let acceptor = ferry::transports::tls::acceptor(&cert, &key).expect("acceptor");
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "process" => (200, json!({"result": "processed"})),
        _ => ok(),
    });
    let backend = TestBackend::start_tls(handler, acceptor).await;
    let url = format!("https://localhost:{}/ferry", backend.addr.port());
    for (trusted, name) in [(true, "trusted"), (false, "untrusted")] {
        let extra = if trusted {
            format!("ca_file = \"{}\"", cert.display())
        } else {
            String::new()
        };
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).expect("dir");
        let config = write_config(&sub, &url, &extra);
        let ferry = Ferry::start(&sub.join("data"), &config).await;
        let (mut socket, _) = connect(ferry.port, "10:buyer:1").await.expect("connect");
        send(&mut socket, buy(1, 1)).await;
        let frames = read_until(&mut socket, Duration::from_secs(3), |frames| {
            has_action(frames, |a| is_type(a, "logux/processed"))
        })
        .await;
        // A self-signed back-end is refused without `ca_file`: the task waits, nothing is
        // sent to an unverified server.
        assert_eq!(
            has_action(&frames, |a| is_type(a, "logux/processed")),
            trusted,
            "{name}: {frames:?}"
        );
        ferry.kill();
    }
    assert_eq!(
        backend.calls_of("process").len(),
        1,
        "only the trusting Ferry got through"
    );
    backend.stop();
}

/// The value of one sample of `/metrics`, e.g. `ferry_actions_received_total{outcome="error"}`.
async fn metric(port: u16, sample: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).await.expect("read");
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_undone_by_its_hooks_stays_unsubscribed_and_is_counted_by_reason() {
    let handler: Handler = Arc::new(|call: &Call| match call.hook.as_str() {
        "access" if call.body["action"]["channel"] == "orders/666" => {
            (200, json!({"result": "denied"}))
        }
        "load" => (500, json!({})),
        _ => ok(),
    });
    let (backend, _dir, ferry) = start(handler, "").await;
    let (mut reader, _) = connect(ferry.port, "20:reader:1").await.expect("connect");
    let subscribe = |channel: &str, id: i64| json!(["sync", id, {"type": "logux/subscribe", "channel": channel}, {"id": id, "time": id}]);
    send(&mut reader, subscribe("orders/666", 1)).await;
    send(&mut reader, subscribe("catalog", 2)).await;
    let frames = read_until(&mut reader, Duration::from_secs(10), |frames| {
        undos(frames).len() >= 2
    })
    .await;
    let reasons: Vec<Value> = undos(&frames).iter().map(|a| a["reason"].clone()).collect();
    assert_eq!(reasons, vec![json!("denied"), json!("error")], "{frames:?}");
    // An action for the undone channel must not reach the client.
    let body =
        r#"{"actions":[{"id":"item-1","action":{"type":"catalog/item"},"channels":["catalog"]}]}"#;
    let (status, _) = api(ferry.port, "POST", "/api/v1/actions", body, &signed(body)).await;
    assert_eq!(status, 200);
    send(&mut reader, json!(["ping", 1])).await;
    let frames = read_until(&mut reader, Duration::from_secs(10), |frames| {
        frames.iter().any(|f| f[0] == "pong")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = read_until(&mut reader, Duration::from_millis(300), |_| false).await;
    assert!(
        !has_action(&frames, |a| is_type(a, "catalog/item"))
            && !has_action(&late, |a| is_type(a, "catalog/item")),
        "an undone subscription still receives its channel: {frames:?} {late:?}"
    );
    let outcome = |name: &str| format!("ferry_actions_received_total{{outcome=\"{name}\"}}");
    assert_eq!(metric(ferry.port, &outcome("denied")).await, 1.0);
    assert_eq!(metric(ferry.port, &outcome("error")).await, 1.0);
    assert_eq!(metric(ferry.port, &outcome("not_found")).await, 0.0);
    ferry.kill();
    backend.stop();
}

/// A settings value Ferry can never have written as the events cursor.
const CORRUPT_CURSOR: &str = "not-a-position";

// Regression: a cursor that existed but did not parse was read as 0, so a restart silently
// sent the whole history to the `events` hook again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_events_cursor_fails_start_up_and_names_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    {
        let log = ferry::log::Log::open(
            &data,
            ferry::log::LogOptions::default(),
            Arc::new(support::child::NoListener),
        )
        .expect("log");
        log.put_setting("events_cursor", CORRUPT_CURSOR)
            .await
            .expect("setting");
        log.close().await.expect("close");
    }
    // Nothing listens on the back-end's port: start-up must fail before any hook call.
    let text = format!("{RULES}\n{}", backend_section("http://127.0.0.1:9", ""));
    let mut config = ferry::config::Config::from_toml_str(&text).expect("config");
    config.data_dir = data;
    let server = ferry::server::Server::open(
        config,
        Arc::new(ferry::clock::SystemClock),
        Some("server:test".into()),
    )
    .expect("server");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        ferry::run::serve_until(
            listener,
            server,
            tokio::time::sleep(Duration::from_millis(500)),
        ),
    )
    .await
    .expect("serve_until returns");
    let error = served.expect_err("a corrupt events cursor must stop start-up");
    let text = error.to_string();
    assert!(
        text.contains("events_cursor") && text.contains(CORRUPT_CURSOR),
        "the error names the setting and its value: {text}"
    );
}
