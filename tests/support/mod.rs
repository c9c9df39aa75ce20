//! Test support: a real server on an in-memory transport with a manual clock.

#![allow(dead_code)]

pub mod backend;
pub mod child;
pub mod cluster;
pub mod nats;
pub mod net;

use ferry::clock::ManualClock;
use ferry::config::Config;
use ferry::peer::Peer;
use ferry::server::connection::{self, Inbound};
use ferry::server::Server;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Rules used by most tests (the compat suite uses the same shapes).
pub const TEST_CONFIG: &str = r#"
env = "development"
subprotocol = 1
min_subprotocol = 1

[auth]
tokens = { "10" = "good-10", "20" = "good-20" }
any_user_token = "secret"

[[channels]]
pattern = "users/:id"
access = "param:id"

[[channels]]
pattern = "room/:id"
access = "anyone"

[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]

[[types]]
type = "room/denied"
access = "nobody"

[[types]]
type = "user/rename"
access = "field:userId"
resend = ["users/{userId}"]
"#;

/// How long a test waits for an expected frame.
pub const FRAME_WAIT: Duration = Duration::from_secs(5);

/// A server on a temporary data directory.
pub struct TestServer {
    pub server: Arc<Server>,
    pub clock: ManualClock,
    pub dir: tempfile::TempDir,
    config: Config,
}

impl TestServer {
    pub fn start(toml: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::from_toml_str(toml).expect("test config");
        config.data_dir = dir.path().to_path_buf();
        let clock = ManualClock::new(1_000_000);
        let server = Server::open(
            config.clone(),
            Arc::new(clock.clone()),
            Some("server:test".into()),
        )
        .expect("server");
        TestServer {
            server,
            clock,
            dir,
            config,
        }
    }

    /// Closes the log and opens a new server on the same directory (a clean restart).
    pub async fn restart(self) -> TestServer {
        let TestServer {
            server,
            clock,
            dir,
            config,
        } = self;
        server.begin_shutdown();
        server.log.close().await.expect("close log");
        // sled releases its directory lock only when the last handle is gone: wait until the
        // connection tasks have noticed the shutdown and dropped theirs.
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        while Arc::strong_count(&server) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(server);
        let server = Server::open(
            config.clone(),
            Arc::new(clock.clone()),
            Some("server:test".into()),
        )
        .expect("server after restart");
        TestServer {
            server,
            clock,
            dir,
            config,
        }
    }

    /// Opens an in-memory connection.
    pub fn connect(&self) -> TestClient {
        let (in_tx, in_rx) = mpsc::channel::<Inbound>(64);
        let (out_tx, out_rx) = mpsc::channel::<String>(1024);
        let incoming = Box::pin(futures_util::stream::unfold(in_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let outgoing = Box::pin(futures_util::sink::unfold(
            out_tx,
            |tx, frame: String| async move {
                tx.send(frame).await.map_err(|_| "closed")?;
                Ok::<_, &'static str>(tx)
            },
        ));
        let peer = Peer::new(IpAddr::V4(Ipv4Addr::LOCALHOST), "test");
        let task = tokio::spawn(connection::run(
            self.server.clone(),
            incoming,
            outgoing,
            peer,
        ));
        TestClient {
            input: Some(in_tx),
            output: out_rx,
            task,
        }
    }
}

/// One in-memory client connection.
pub struct TestClient {
    input: Option<mpsc::Sender<Inbound>>,
    output: mpsc::Receiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl TestClient {
    pub async fn send(&self, frame: &str) {
        if let Some(input) = &self.input {
            input
                .send(Inbound::Text(frame.to_owned()))
                .await
                .expect("connection is open");
        }
    }

    pub async fn send_inbound(&self, inbound: Inbound) {
        if let Some(input) = &self.input {
            input.send(inbound).await.expect("connection is open");
        }
    }

    /// The next frame, or `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<String> {
        tokio::time::timeout(FRAME_WAIT, self.output.recv())
            .await
            .expect("timed out waiting for a frame")
    }

    /// A frame that arrives within `wait`, if any.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<String> {
        tokio::time::timeout(wait, self.output.recv())
            .await
            .ok()
            .flatten()
    }

    /// Ends the client side (like a closed socket).
    pub async fn disconnect(mut self) {
        self.input.take();
        let _ = tokio::time::timeout(FRAME_WAIT, &mut self.task).await;
    }

    /// True when the server closed the connection.
    pub async fn is_closed_by_server(&mut self) -> bool {
        matches!(
            tokio::time::timeout(FRAME_WAIT, self.output.recv()).await,
            Ok(None)
        )
    }
}
