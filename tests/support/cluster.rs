//! Ferry cluster nodes (real `ferry` children) on a real NATS JetStream cluster, and a raw
//! protocol client with the helpers the cluster tests share.

#![allow(dead_code)]

use super::child::Ferry;
use super::nats::NatsCluster;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Rules of the cluster tests: a `room/:id` channel, the `room/message` type, a SyncMap.
pub const RULES: &str = r#"
env = "production"
subprotocol = 1
[auth]
any_user_token = "secret"
[[channels]]
pattern = "room/:id"
access = "anyone"
[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]
[[sync_maps]]
plural = "notes"
access = "anyone"
[limits]
subscribe_history_max = 1000000
"#;

/// One Ferry node: its data directory, config file and (while running) process.
pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ferry: Option<Ferry>,
}

impl Node {
    pub fn port(&self) -> u16 {
        self.ferry.as_ref().map_or(0, |ferry| ferry.port)
    }

    /// Starts (or restarts) the node on its data directory, logging to `node.log`.
    pub async fn start(&mut self) {
        let log = self.dir.with_extension("log");
        let ferry = Ferry::start_logging(&self.dir, &self.config, Some(&log)).await;
        wait_ready(ferry.port).await;
        self.ferry = Some(ferry);
    }

    pub fn kill(&mut self) {
        if let Some(ferry) = self.ferry.take() {
            ferry.kill();
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Writes the config of a node: `rules` plus `[cluster]` on `nats` with `stream`.
pub fn write_config(path: &Path, rules: &str, nats: &NatsCluster, stream: &str, extra: &str) {
    let urls: Vec<String> = nats.urls().iter().map(|url| format!("{url:?}")).collect();
    let replicas = nats.urls().len().min(3);
    let text = format!(
        "{rules}\n[cluster]\nnats_urls = [{}]\nstream = \"{stream}\"\nreplicas = {replicas}\n{extra}\n",
        urls.join(", ")
    );
    std::fs::write(path, text).expect("write config");
}

/// `count` nodes in `root`, all on `nats`, started.
pub async fn start_nodes(
    root: &Path,
    count: usize,
    rules: &str,
    nats: &NatsCluster,
    extra: &str,
) -> Vec<Node> {
    start_nodes_each(root, count, |_| rules.to_owned(), nats, extra).await
}

/// Waits until `/ready` answers 200 (the node connected and applies the stream).
pub async fn wait_ready(port: u16) {
    for _ in 0..400 {
        if http_get(port, "/ready")
            .await
            .is_some_and(|(status, _)| status == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("node on port {port} never became ready");
}

/// A plain HTTP GET on loopback: status and body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_request(port, "GET", path, "", "").await
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (`headers`: extra lines, each ending in
/// `\r\n`), answered within 5 s: status and body.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((status, body))
}

/// The value of metric `name` (no labels) in a node's `/metrics`.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics").await?;
    body.lines()
        .find(|line| line.split_whitespace().next() == Some(name))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A raw Logux protocol 5 client.
pub struct Client {
    pub socket: WebSocketStream<TcpStream>,
    /// The server's time offset from `connected`, to write absolute ids.
    pub base: i64,
    pub node: String,
    /// Highest `added` received in `sync` frames.
    pub synced: u64,
    /// Every action received in `sync` frames, in order.
    pub received: Vec<(u64, Value, Value)>,
    /// `synced` answers received.
    pub acked: Vec<u64>,
    /// Error frames received.
    pub errors: Vec<Value>,
}

impl Client {
    /// Connects as `node` (`user:client:tab`), sending `synced` as the last position seen.
    pub async fn connect(port: u16, node: &str, synced: u64) -> Option<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let (mut socket, _) =
            tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/"), stream)
                .await
                .ok()?;
        let connect = json!(["connect", 5, node, synced, {"token": "secret", "subprotocol": 1}]);
        socket.send(Message::text(connect.to_string())).await.ok()?;
        let mut client = Client {
            socket,
            base: 0,
            node: node.to_owned(),
            synced,
            received: Vec::new(),
            acked: Vec::new(),
            errors: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let frame = client.next_frame(deadline).await?;
            if frame[0] == "connected" {
                client.base = frame[3][1].as_i64()?;
                return Some(client);
            }
        }
    }

    /// The next frame before `deadline`, recording syncs, synced answers and errors.
    pub async fn next_frame(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()??
                .ok()?;
            let Message::Text(text) = message else {
                if let Message::Close(_) = message {
                    return None;
                }
                continue;
            };
            let frame: Value = serde_json::from_str(&text).ok()?;
            match frame[0].as_str() {
                Some("sync") => {
                    let added = frame[1].as_u64().unwrap_or(0);
                    self.synced = self.synced.max(added);
                    let pairs = frame
                        .as_array()
                        .map(|items| items[2..].to_vec())
                        .unwrap_or_default();
                    for pair in pairs.chunks(2) {
                        if let [action, meta] = pair {
                            self.received.push((added, action.clone(), meta.clone()));
                        }
                    }
                }
                Some("synced") => self.acked.push(frame[1].as_u64().unwrap_or(0)),
                Some("error") => self.errors.push(frame.clone()),
                Some("ping") => {
                    let pong = json!(["pong", frame[1]]);
                    let _ = self.socket.send(Message::text(pong.to_string())).await;
                }
                _ => {}
            }
            return Some(frame);
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Value) -> bool {
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .is_ok()
    }

    /// Sends an action with local position `n` and an id made of `n` (unique per client).
    pub async fn send_action(&mut self, n: u64, action: Value) -> bool {
        let ms = 1_700_000_000_000_i64 + i64::try_from(n).unwrap_or(0);
        let frame = json!(["sync", n, action, {"id": ms - self.base, "time": ms - self.base}]);
        self.send(frame).await
    }

    /// The absolute id of the action sent with `n`.
    pub fn id_of(&self, n: u64) -> String {
        format!(
            "{} {} 0",
            1_700_000_000_000_i64 + i64::try_from(n).unwrap_or(0),
            self.node
        )
    }

    /// Subscribes to `channel` (optionally `since`) and waits for its `synced`.
    pub async fn subscribe(&mut self, n: u64, channel: &str, since: Option<u64>) -> bool {
        let mut action = json!({"type": "logux/subscribe", "channel": channel});
        if let Some(since) = since {
            action["since"] = json!({"id": "0 0 0", "time": 0, "added": since});
        }
        self.send_action(n, action).await && self.wait_acked(n, Duration::from_secs(15)).await
    }

    /// Reads frames until `synced` `n` arrived or `wait` passed.
    pub async fn wait_acked(&mut self, n: u64, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while !self.acked.contains(&n) {
            if self.next_frame(deadline).await.is_none() {
                return false;
            }
        }
        true
    }

    /// Reads frames until `count` actions of `kind` arrived or `wait` passed.
    pub async fn wait_received(&mut self, kind: &str, count: usize, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        while self.count(kind) < count {
            if self.next_frame(deadline).await.is_none() {
                return false;
            }
        }
        true
    }

    /// Actions of `kind` received so far.
    pub fn count(&self, kind: &str) -> usize {
        self.received
            .iter()
            .filter(|(_, action, _)| action["type"] == kind)
            .count()
    }

    /// The `n` fields of received `room/message` actions, in arrival order.
    pub fn numbers(&self) -> Vec<i64> {
        self.received
            .iter()
            .filter(|(_, action, _)| action["type"] == "room/message")
            .filter_map(|(_, action, _)| action["n"].as_i64())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers of tests/cluster_hooks.rs (back-end hooks, SyncMaps, data-directory identity).
// ---------------------------------------------------------------------------------------

/// `count` nodes in `root` on `nats`, started, node `i` with the rules `rules(i)` (so that
/// each node can have its own back-end URL).
pub async fn start_nodes_each(
    root: &Path,
    count: usize,
    rules: impl Fn(usize) -> String,
    nats: &NatsCluster,
    extra: &str,
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 0..count {
        let dir = root.join(format!("node{i}"));
        let config = root.join(format!("node{i}.toml"));
        write_config(&config, &rules(i), nats, "ferry", extra);
        let mut node = Node {
            dir,
            config,
            ferry: None,
        };
        node.start().await;
        nodes.push(node);
    }
    nodes
}

impl Node {
    /// Stops the node with SIGTERM (a clean shutdown) and waits for it.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.ferry.take().map(Ferry::terminate)
    }
}

/// What a `ferry serve` that was expected to refuse to start did.
#[derive(Debug)]
pub struct Exited {
    /// Its exit status; `None` when it was still running at the deadline (then killed).
    pub status: Option<std::process::ExitStatus>,
    /// Everything it wrote to stdout and stderr.
    pub output: String,
}

/// Runs `ferry serve --config <config> --data-dir <dir>` until it exits or `wait` passes
/// (then kills it), capturing its output.
pub async fn run_to_exit(dir: &Path, config: &Path, wait: Duration) -> Exited {
    use std::process::{Command, Stdio};
    let out_path = dir.with_extension("run.out");
    let err_path = dir.with_extension("run.err");
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("FERRY_LOG", "warn,ferry::run=info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn ferry");
    let deadline = tokio::time::Instant::now() + wait;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let output = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    Exited { status, output }
}

impl Node {
    /// Starts (or restarts) the node without waiting for `/ready`: a node whose view is far
    /// behind the stream is not ready until it caught up, which a test may want to watch.
    pub async fn start_unready(&mut self) {
        let log = self.dir.with_extension("log");
        let ferry = Ferry::start_logging(&self.dir, &self.config, Some(&log)).await;
        self.ferry = Some(ferry);
    }

    /// Keeps a copy of the node's log as `<node dir>.<tag>.log` (a restart truncates it).
    pub fn keep_log(&self, tag: &str) {
        let log = self.dir.with_extension("log");
        let _ = std::fs::copy(&log, self.dir.with_extension(format!("{tag}.log")));
    }

    /// The node's whole log, kept copies (`keep_log`) first, for failure messages.
    pub fn full_log(&self) -> String {
        let mut text = String::new();
        if let (Some(parent), Some(name)) = (self.dir.parent(), self.dir.file_name()) {
            let prefix = format!("{}.", name.to_string_lossy());
            let mut kept: Vec<PathBuf> = std::fs::read_dir(parent)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| {
                    path.file_name().is_some_and(|file| {
                        let file = file.to_string_lossy();
                        file.starts_with(&prefix)
                            && file.ends_with(".log")
                            && file.matches('.').count() == 2
                    })
                })
                .collect();
            kept.sort();
            for path in kept {
                text.push_str(&format!("--- {} ---\n", path.display()));
                text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        text.push_str(&format!("--- {} (current) ---\n", self.dir.display()));
        text.push_str(&std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default());
        text
    }
}
