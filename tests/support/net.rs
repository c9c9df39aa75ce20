//! A real server on a loopback port, for tests that need sockets.

#![allow(dead_code)]

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::server::Server;
use ferry::transports::http::{serve_with, ServeOptions};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub const WAIT: Duration = Duration::from_secs(5);

pub struct Running {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    pub async fn start(frame_bytes_max: usize) -> Running {
        let mut config = Config::demo();
        config.limits.frame_bytes_max = frame_bytes_max;
        Running::start_with(config, ServeOptions::default()).await
    }

    /// A server with `config` (its `data_dir` is replaced by a temporary one), served the
    /// way `ferry::run::serve_until` does but with `options` (a peer observer).
    pub async fn start_with(mut config: Config, options: ServeOptions) -> Running {
        let dir = tempfile::tempdir().expect("temp dir");
        config.data_dir = dir.path().to_path_buf();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Server::open(config, Arc::new(SystemClock), None).expect("server");
        let shared = server.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if options.peer_observer.is_none() {
                ferry::run::serve_until(listener, server, shutdown)
                    .await
                    .expect("clean shutdown");
                return;
            }
            // The same steps as `serve_until`, with the options.
            let accept = tokio::spawn(serve_with(listener, server.clone(), options));
            shutdown.await;
            server.begin_shutdown();
            let _ = accept.await;
            let deadline = tokio::time::Instant::now() + WAIT;
            while server.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.log.close().await.expect("clean shutdown");
        });
        Running {
            server: shared,
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("server stops in time")
            .expect("server task");
    }

    pub async fn ws(&self, path: &str) -> WebSocketStream<TcpStream> {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let url = format!("ws://{}{}", self.addr, path);
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("websocket handshake");
        socket
    }

    /// One HTTP/1.1 request on a new connection (`Connection: close`).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        HttpResponse::parse(&String::from_utf8_lossy(&raw))
    }

    pub async fn http_get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
            .await
            .expect("response in time")
            .expect("read");
        response
    }
}

pub async fn next_text(socket: &mut WebSocketStream<TcpStream>) -> Option<String> {
    loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("frame in time")
        {
            Some(Ok(Message::Text(text))) => return Some(text.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

pub async fn connect_client(socket: &mut WebSocketStream<TcpStream>, node: &str) {
    let connect = format!(r#"["connect",5,"{node}",0,{{"token":"t","subprotocol":1}}]"#);
    socket.send(Message::text(connect)).await.expect("send");
    assert_eq!(
        next_text(socket).await.as_deref(),
        Some(r#"["headers",{"env":"development"}]"#)
    );
    let connected = next_text(socket).await.expect("connected");
    assert!(
        connected.starts_with(r#"["connected",5,"server:"#),
        "{connected}"
    );
}

/// A parsed HTTP/1.1 response (identity or chunked body).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    fn parse(raw: &str) -> HttpResponse {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("a complete response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status code");
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
        let body = if chunked {
            let mut out = String::new();
            let mut rest = body;
            while let Some((size, after)) = rest.split_once("\r\n") {
                let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
                if size == 0 {
                    break;
                }
                out.push_str(&after[..size]);
                rest = &after[size + 2..];
            }
            out
        } else {
            body.to_owned()
        };
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("a JSON body ({error}): {self:?}"))
    }
}
