//! `ferry-resync-bench`: what it costs to bring back a client that is N actions behind on a
//! channel of 1,000 objects, with compaction (state + tail) and without (replay of the log).
//!
//! For each N it builds a fresh data directory in-process (appending N actions straight to
//! the log in large batches, which is much faster than sending them over sockets), serves
//! it on a loopback port, connects one raw protocol-5 client, subscribes it with a `since`
//! from before the first action, and measures the bytes of every frame the server sends
//! until the subscription's `logux/processed`, and the time that took.
//!
//! - `log` mode (compaction off): `item/set {id, value}` actions re-sent to channel `items`
//!   (a plain type rule, no reducer). The resync replays the N actions.
//! - `state` mode (compaction on): SyncMap `tasks/changed {id, fields}` actions on 1,000
//!   tasks, with retention keeping only the newest 1,000 log entries. The resync sends the
//!   current fields of the 1,000 tasks from the state.
//!
//! Usage: `ferry-resync-bench [--sizes 1000,100000,1000000] [--objects 1000]`; prints one
//! JSON line per (mode, N). Loopback only; every server it starts is stopped.

use ferry::action::{Entry, Meta};
use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::server::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Entries per append while building the data set.
const BUILD_BATCH_ENTRIES: usize = 20_000;
/// Longest time one resync may take before the bench gives up.
const RESYNC_TIMEOUT_S: u64 = 300;

const CONFIG: &str = r#"
env = "production"
subprotocol = 1
[auth]
any_user_token = "secret"
[[channels]]
pattern = "items"
access = "anyone"
[[types]]
type = "item/set"
access = "anyone"
resend = ["items"]
[[sync_maps]]
plural = "tasks"
access = "anyone"
[limits]
subscribe_history_max = 10000000
"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Log,
    State,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Log => "log (compaction off)",
            Mode::State => "state (compaction on)",
        }
    }
}

fn args() -> (Vec<u64>, u64) {
    let mut sizes = vec![1_000, 100_000, 1_000_000];
    let mut objects = 1_000;
    let argv: Vec<String> = std::env::args().collect();
    let mut index = 1;
    while index < argv.len() {
        match (argv[index].as_str(), argv.get(index + 1)) {
            ("--sizes", Some(list)) => {
                sizes = list
                    .split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect();
                index += 2;
            }
            ("--objects", Some(n)) => {
                objects = n.parse().unwrap_or(objects);
                index += 2;
            }
            _ => {
                eprintln!(
                    "usage: ferry-resync-bench [--sizes 1000,100000,1000000] [--objects 1000]"
                );
                std::process::exit(2);
            }
        }
    }
    (sizes, objects)
}

/// One generated action: the N-th write, to object `n % objects`.
fn entry(mode: Mode, n: u64, objects: u64, base_ms: i64) -> Entry {
    let object = n % objects;
    let ms = base_ms + i64::try_from(n).unwrap_or(i64::MAX);
    let node = format!("{}:writer:t", n % 50);
    let (action, channels) = match mode {
        Mode::Log => (
            json!({"type": "item/set", "id": object.to_string(), "value": n}),
            vec!["items".to_owned()],
        ),
        Mode::State => (
            json!({"type": "tasks/changed", "id": object.to_string(), "fields": {"value": n, "title": format!("task {object}")}}),
            vec!["tasks".to_owned(), format!("tasks/{object}")],
        ),
    };
    Entry::new(
        action,
        Meta {
            id: format!("{ms} {node} 0"),
            time: ms,
            subprotocol: 1,
            channels,
            ..Meta::default()
        },
    )
}

async fn run_one(mode: Mode, size: u64, objects: u64) -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut config = Config::from_toml_str(CONFIG).map_err(|e| e.to_string())?;
    config.data_dir = dir.path().to_path_buf();
    if mode == Mode::State {
        config.retention_actions_max = Some(objects);
    }
    let server = Server::open(config, Arc::new(SystemClock), None).map_err(|e| e.to_string())?;
    let base_ms = 1_700_000_000_000;
    let build_started = Instant::now();
    let mut n = 0;
    while n < size {
        let upto = (n + BUILD_BATCH_ENTRIES as u64).min(size);
        let batch: Vec<Entry> = (n..upto)
            .map(|k| entry(mode, k, objects, base_ms))
            .collect();
        server
            .log
            .append(batch, None)
            .await
            .map_err(|e| e.to_string())?;
        n = upto;
    }
    let removed = server.apply_retention().await.map_err(|e| e.to_string())?;
    let build_s = build_started.elapsed().as_secs_f64();

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(ferry::run::serve_until(listener, server.clone(), async {
        let _ = stopped.await;
    }));

    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut socket, _) = tokio_tungstenite::client_async(format!("ws://{addr}/"), stream)
        .await
        .map_err(|e| e.to_string())?;
    let connect = json!(["connect", 5, "reader:r:t", 0, {"token": "secret", "subprotocol": 1}]);
    socket
        .send(Message::text(connect.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.starts_with("[\"connected\"") => break,
            Some(Ok(_)) => {}
            _ => return Err("no connected".into()),
        }
    }
    let channel = match mode {
        Mode::Log => "items",
        Mode::State => "tasks",
    };
    // A `since` from before the first action: the client is N actions behind.
    let since = json!({"id": format!("{} 0:writer:t 0", base_ms - 1), "time": base_ms - 1});
    let subscribe = json!(["sync", 1, {"type": "logux/subscribe", "channel": channel, "since": since}, {"id": 1, "time": 1}]);
    let started = Instant::now();
    socket
        .send(Message::text(subscribe.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let mut bytes = 0usize;
    let mut actions = 0usize;
    let deadline = Duration::from_secs(RESYNC_TIMEOUT_S);
    loop {
        let frame = tokio::time::timeout(deadline, socket.next())
            .await
            .map_err(|_| "resync timed out".to_string())?;
        let Some(Ok(Message::Text(text))) = frame else {
            return Err("connection closed during the resync".into());
        };
        bytes += text.len();
        if text.starts_with("[\"sync\"") {
            let value: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let pairs = value.as_array().map_or(0, |m| (m.len() - 2) / 2);
            actions += pairs;
            if text.contains("\"logux/processed\"") {
                actions -= 1;
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(());
    let _ = serving.await;
    Ok(json!({
        "mode": mode.name(),
        "behind_actions": size,
        "objects": objects,
        "log_entries_removed_by_retention": removed,
        "resync_actions_sent": actions,
        "resync_bytes": bytes,
        "resync_seconds": (seconds * 1000.0).round() / 1000.0,
        "build_seconds": (build_s * 10.0).round() / 10.0,
    }))
}

fn main() {
    let (sizes, objects) = args();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    let mut failed = false;
    for size in sizes {
        for mode in [Mode::Log, Mode::State] {
            match runtime.block_on(run_one(mode, size, objects)) {
                Ok(result) => println!("{result}"),
                Err(error) => {
                    eprintln!("{} N={size}: {error}", mode.name());
                    failed = true;
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
