//! A real server on a loopback port, for tests that need sockets.

#![allow(dead_code)]

use ferry::clock::SystemClock;
use ferry::config::Config;
use ferry::server::Server;
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
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::demo();
        config.data_dir = dir.path().to_path_buf();
        config.limits.frame_bytes_max = frame_bytes_max;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Server::open(config, Arc::new(SystemClock), None).expect("server");
        let shared = server.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            ferry::run::serve_until(listener, server, shutdown)
                .await
                .expect("clean shutdown");
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
