//! A real `ferry` child process and a raw protocol client, for crash and fault tests.

#![allow(dead_code)]

use ferry::log::CommitListener;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub struct NoListener;
impl CommitListener for NoListener {
    fn committed(&self, _: &[Arc<ferry::action::Entry>]) {}
}

/// Production rules for one `room/:id` channel and the `room/message` type, with a shared
/// token and history replay large enough for the crash test's verification.
pub const ROOM_CONFIG: &str = r#"
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
[limits]
subscribe_history_max = 1000000
"#;

pub struct Ferry {
    /// The process.
    pub child: Child,
    pub port: u16,
}

impl Ferry {
    pub async fn start(dir: &Path, config: &Path) -> Ferry {
        Ferry::start_logging(dir, config, None).await
    }

    /// Starts ferry on a port it picks itself (`--listen 127.0.0.1:0`, read back from its
    /// "ferry listening" line), so that no other test's listener can take the port between
    /// choosing it and binding it. With `log`, its output goes to that file at `warn` level
    /// and above.
    pub async fn start_logging(dir: &Path, config: &Path, log: Option<&Path>) -> Ferry {
        let file = log.and_then(|path| std::fs::File::create(path).ok());
        let stderr = match file.as_ref().and_then(|file| file.try_clone().ok()) {
            Some(copy) => Stdio::from(copy),
            None => Stdio::null(),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .env("FERRY_LOG", "warn,ferry::run=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn ferry");
        let stdout = child.stdout.take().expect("ferry stdout");
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || forward_output(stdout, file, port_tx));
        let mut ferry = Ferry { child, port: 0 };
        // 30 s: a cluster node may wait for JetStream leaders while a loaded machine starts.
        for _ in 0..1200 {
            match port_rx.try_recv() {
                Ok(port) => {
                    ferry.port = port;
                    return ferry;
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("ferry did not start listening");
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for ferry")
    }
}

/// Reads ferry's stdout: sends the port of the "ferry listening" line, and copies every
/// line to `file` when there is one (otherwise drops it), until ferry exits.
fn forward_output(
    stdout: std::process::ChildStdout,
    mut file: Option<std::fs::File>,
    port: std::sync::mpsc::Sender<u16>,
) {
    use std::io::{BufRead, Write};
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { return };
        if line.contains("ferry listening") {
            if let Some(found) = listening_port(&line) {
                let _ = port.send(found);
            }
        }
        if let Some(file) = file.as_mut() {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// The port in `addr=127.0.0.1:<port>` of a log line.
fn listening_port(line: &str) -> Option<u16> {
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// A test that fails (panics) before `kill` or `terminate` must not leave the server running.
impl Drop for Ferry {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn connect(port: u16, node: &str) -> Option<(WebSocketStream<TcpStream>, i64)> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut socket, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/"), stream)
            .await
            .ok()?;
    let connect = json!(["connect", 5, node, 0, {"token": "secret", "subprotocol": 1}]);
    socket.send(Message::text(connect.to_string())).await.ok()?;
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).ok()?;
            if value[0] == "connected" {
                return Some((socket, value[3][1].as_i64()?));
            }
        }
    }
    None
}
