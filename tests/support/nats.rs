//! A real NATS JetStream cluster on loopback (`nats-server` child processes), for the
//! cluster-mode tests.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else
//! `/usr/sbin/nats-server` (Debian's package; `scripts/test.sh` installs it). Every node
//! binds 127.0.0.1 only; node `i` is named `n<i>` (its JetStream `server_name`, which is
//! also what stream info reports as a leader), has its own store directory and log file in
//! one temporary directory, and is stopped by pid when the cluster is dropped.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long `start` and `restart` wait for a node's `/healthz` to answer 200.
pub const HEALTH_WAIT: Duration = Duration::from_secs(30);
/// How many times `start` tries a fresh set of ports and directories.
const START_ATTEMPTS: usize = 3;
/// How much of each node's log a failure message shows.
const LOG_TAIL_BYTES: usize = 4_000;
const POLL: Duration = Duration::from_millis(100);
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// The `nats-server` binary the tests run.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nats-server"))
}

struct Node {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    /// `None` once killed (and before the first spawn).
    child: Mutex<Option<Child>>,
}

impl Node {
    fn spawn(&self) -> Result<(), String> {
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|err| format!("open {}: {err}", self.log.display()))?;
        let stderr = output
            .try_clone()
            .map_err(|err| format!("clone log file handle: {err}"))?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .arg("-l")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|err| format!("spawn {}: {err}", nats_server_bin().display()))?;
        *self.lock() = Some(child);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn is_running(&self) -> bool {
        self.lock()
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL and wait for the process to be gone.
    fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn mark_log(&self, line: &str) {
        if let Ok(mut file) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(file, "=== ferry test harness: {line} ===");
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|err| format!("(no log: {err})"));
        let start = text.len().saturating_sub(LOG_TAIL_BYTES);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        format!(
            "--- {} ({}) log tail ---\n{}\n--- end of {} log ---",
            self.name,
            self.log.display(),
            &text[start..],
            self.name
        )
    }
}

/// A running NATS cluster of 1 to n nodes with JetStream enabled.
pub struct NatsCluster {
    nodes: Vec<Node>,
    // Declared after `nodes` so that the processes are gone before the directory is removed.
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `nodes` servers (3 for a real cluster; 1 is a standalone JetStream server
    /// without a `cluster` block) and waits until every one answers `/healthz` with 200,
    /// which in a cluster means a JetStream meta leader has been elected. Tries up to three
    /// times with fresh ports before it panics with the nodes' log tails.
    pub async fn start(nodes: usize) -> NatsCluster {
        NatsCluster::start_with(nodes, "").await
    }

    /// Like `start`, with `extra` appended to every node's configuration (authorization).
    pub async fn start_with(nodes: usize, extra: &str) -> NatsCluster {
        assert!(nodes >= 1, "a NATS cluster needs at least one node");
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match NatsCluster::try_start(nodes, extra).await {
                Ok(cluster) => return cluster,
                Err(failure) => {
                    let summary = failure.lines().next().unwrap_or_default();
                    eprintln!("NATS cluster start attempt {attempt} failed: {summary}");
                    failures.push(failure);
                }
            }
        }
        panic!(
            "a {nodes}-node NATS cluster ({}) did not start in {START_ATTEMPTS} attempts:\n{}",
            nats_server_bin().display(),
            failures.join("\n")
        );
    }

    async fn try_start(count: usize, extra: &str) -> Result<NatsCluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-nats-")
            .tempdir()
            .map_err(|err| format!("temp dir: {err}"))?;
        // Three ports per node: client, monitoring (HTTP), cluster route.
        let ports = free_ports(3 * count).map_err(|err| format!("free ports: {err}"))?;
        let (clients, rest) = ports.split_at(count);
        let (monitors, routes) = rest.split_at(count);
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let name = format!("n{i}");
            let store = dir.path().join(&name);
            let mut text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: {} }}\n",
                clients[i],
                monitors[i],
                quoted(&store)
            );
            if count > 1 {
                let others: Vec<String> = (0..count)
                    .filter(|&other| other != i)
                    .map(|other| format!("nats-route://127.0.0.1:{}", routes[other]))
                    .collect();
                text.push_str(&format!(
                    "cluster {{\n  name: ferry-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                    routes[i],
                    others.join(", ")
                ));
            }
            text.push_str(extra);
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, text)
                .map_err(|err| format!("write {}: {err}", config.display()))?;
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port: clients[i],
                monitor_port: monitors[i],
                config,
                child: Mutex::new(None),
            });
        }
        // From here on, dropping `cluster` (on any error) kills whatever was spawned.
        let cluster = NatsCluster { nodes, dir };
        for node in &cluster.nodes {
            node.spawn()?;
        }
        let all: Vec<usize> = (0..count).collect();
        cluster
            .wait_healthy(&all, Instant::now() + HEALTH_WAIT)
            .await?;
        Ok(cluster)
    }

    /// Waits until every node in `indices` answers `/healthz` with 200; an error (with the
    /// log tails of those nodes) when one exits or `deadline` passes.
    async fn wait_healthy(&self, indices: &[usize], deadline: Instant) -> Result<(), String> {
        let mut pending: Vec<usize> = indices.to_vec();
        loop {
            let mut still = Vec::new();
            for &i in &pending {
                let node = &self.nodes[i];
                if !node.is_running() {
                    return Err(format!(
                        "{} exited before it was healthy (port taken?)\n{}",
                        node.name,
                        self.log_tails(indices)
                    ));
                }
                if !matches!(http_get(node.monitor_port, "/healthz").await, Ok((200, _))) {
                    still.push(i);
                }
            }
            if still.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let names: Vec<&str> = still.iter().map(|&i| self.nodes[i].name.as_str()).collect();
                return Err(format!(
                    "{} did not answer /healthz with 200 in time\n{}",
                    names.join(", "),
                    self.log_tails(indices)
                ));
            }
            pending = still;
            tokio::time::sleep(POLL).await;
        }
    }

    /// The number of nodes (running or not).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The client URL of every node, killed ones included (clients given all of them
    /// reconnect to whichever runs).
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// `nats://127.0.0.1:<client port>` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// The server name of node `i` (`n<i>`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node index of a server name (`n<i>`), as stream info reports leaders.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.name == name)
    }

    /// The monitoring (HTTP) port of node `i`.
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor_port
    }

    /// The temporary directory with the configs, store directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// True while node `i`'s process runs.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].is_running()
    }

    /// Kills node `i` with SIGKILL (a crash: no lame duck mode, no flush) and waits until
    /// the process is gone. Its store directory stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i].mark_log("killed (SIGKILL)");
    }

    /// Starts node `i` again with the same config, ports and store directory (killing it
    /// first if it still runs) and waits for its `/healthz`. Another process could take
    /// one of its ports while it was down; nothing else on a test machine should.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i].mark_log("restart");
        if let Err(err) = self.nodes[i].spawn() {
            panic!("restart {}: {err}", self.nodes[i].name);
        }
        if let Err(err) = self.wait_healthy(&[i], Instant::now() + HEALTH_WAIT).await {
            panic!("restart {}: {err}", self.nodes[i].name);
        }
    }

    /// The node that leads `stream`'s RAFT group, according to that node itself: a
    /// running node whose `/jsz?streams=true` lists the stream with `cluster.leader` equal
    /// to its own name. `None` while there is no leader (an election), when the stream does
    /// not exist, or for a one-node "cluster" (no RAFT group, no leader reported).
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let Ok((200, body)) = http_get(node.monitor_port, "/jsz?streams=true").await else {
                continue;
            };
            if reported_leader(&body, stream).as_deref() == Some(node.name.as_str()) {
                return Some(i);
            }
        }
        None
    }

    /// The node that leads the JetStream meta group (which places streams and consumers),
    /// according to that node itself (`meta_cluster.leader` of its `/jsz`); `None` during
    /// an election or for a single node.
    pub async fn meta_leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.is_running() {
                continue;
            }
            let Ok((200, body)) = http_get(node.monitor_port, "/jsz").await else {
                continue;
            };
            let Ok(jsz) = serde_json::from_str::<serde_json::Value>(&body) else {
                continue;
            };
            if jsz["meta_cluster"]["leader"] == node.name.as_str() {
                return Some(i);
            }
        }
        None
    }

    /// Node `i`'s own view of `stream` (its entry in `/jsz?streams=true`: `state`,
    /// `cluster`, ...), or `None` when the node does not answer or does not host it.
    pub async fn stream_detail(&self, i: usize, stream: &str) -> Option<serde_json::Value> {
        let (status, body) = http_get(self.nodes[i].monitor_port, "/jsz?streams=true")
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        stream_detail(&body, stream)
    }

    /// Waits until `stream` has a leader; panics with the log tails after `timeout`.
    pub async fn wait_for_stream_leader(&self, stream: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.stream_leader(stream).await {
                return leader;
            }
            if Instant::now() >= deadline {
                let all: Vec<usize> = (0..self.nodes.len()).collect();
                panic!(
                    "stream {stream} had no leader within {timeout:?}\n{}",
                    self.log_tails(&all)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The last part of the logs of the nodes in `indices`, for failure messages.
    pub fn log_tails(&self, indices: &[usize]) -> String {
        indices
            .iter()
            .map(|&i| self.nodes[i].log_tail())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Kills every node that still runs (by pid, SIGKILL, then wait), also when a test panics;
/// then, when it did panic, prints the log tails.
impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.kill();
        }
        if std::thread::panicking() {
            let all: Vec<usize> = (0..self.nodes.len()).collect();
            eprintln!("{}", self.log_tails(&all));
        }
    }
}

/// `n` distinct free ports on 127.0.0.1: bound to port 0 all at once (so they differ) and
/// released for nats-server to bind. Between the release and nats-server's bind another
/// process could take one; the node then fails to start and `start` tries again.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

/// A path as a quoted NATS config string.
fn quoted(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The entry of the stream named `stream` in a `/jsz?streams=true` answer
/// (`account_details[].stream_detail[]`).
fn stream_detail(jsz: &str, stream: &str) -> Option<serde_json::Value> {
    let mut value: serde_json::Value = serde_json::from_str(jsz).ok()?;
    value["account_details"]
        .as_array_mut()?
        .iter_mut()
        .filter_map(|account| account["stream_detail"].as_array_mut())
        .flatten()
        .find(|detail| detail["name"] == stream)
        .map(serde_json::Value::take)
}

/// `cluster.leader` of `stream` in a `/jsz?streams=true` answer.
fn reported_leader(jsz: &str, stream: &str) -> Option<String> {
    stream_detail(jsz, stream)?["cluster"]["leader"]
        .as_str()
        .map(str::to_owned)
}

/// A minimal HTTP/1.0 GET to 127.0.0.1:`port` (no chunked encoding: the body is everything
/// after the headers until the server closes): the status code and the body.
async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP GET timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status"))?;
    Ok((status, body.to_owned()))
}
