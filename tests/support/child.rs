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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("free port")
}

pub struct Ferry {
    /// The process.
    pub child: Child,
    pub port: u16,
}

impl Ferry {
    pub async fn start(dir: &Path, config: &Path) -> Ferry {
        Ferry::start_logging(dir, config, None).await
    }

    /// Starts ferry; with `log`, its output goes to that file at `warn` level and above.
    pub async fn start_logging(dir: &Path, config: &Path, log: Option<&Path>) -> Ferry {
        let port = free_port();
        let (stdout, stderr) = match log.and_then(|path| std::fs::File::create(path).ok()) {
            Some(file) => match file.try_clone() {
                Ok(copy) => (Stdio::from(file), Stdio::from(copy)),
                Err(_) => (Stdio::null(), Stdio::null()),
            },
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["serve", "--config"])
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            .env("FERRY_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ferry");
        let ferry = Ferry { child, port };
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return ferry;
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
