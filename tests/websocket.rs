//! The real listener: HTTP routes and WebSocket frames that only a socket can produce.

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
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(frame_bytes_max: usize) -> Running {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::demo();
        config.data_dir = dir.path().to_path_buf();
        config.limits.frame_bytes_max = frame_bytes_max;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = Server::open(config, Arc::new(SystemClock), None).expect("server");
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
            addr,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("server stops in time")
            .expect("server task");
    }

    async fn ws(&self, path: &str) -> WebSocketStream<TcpStream> {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        let url = format!("ws://{}{}", self.addr, path);
        let (socket, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("websocket handshake");
        socket
    }

    async fn http_get(&self, path: &str) -> String {
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

async fn next_text(socket: &mut WebSocketStream<TcpStream>) -> Option<String> {
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

async fn connect_client(socket: &mut WebSocketStream<TcpStream>, node: &str) {
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

#[tokio::test]
async fn health_and_unknown_paths_answer_over_http() {
    let server = Running::start(1 << 20).await;
    let health = server.http_get("/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("Ferry: OK\n"), "{health}");
    let missing = server.http_get("/nope").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    server.stop().await;
}

#[tokio::test]
async fn websocket_upgrade_works_on_any_path_and_answers_ping() {
    let server = Running::start(1 << 20).await;
    let mut socket = server.ws("/any/path?x=1").await;
    connect_client(&mut socket, "10:abc:tab").await;
    socket
        .send(Message::text(r#"["ping",0]"#))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut socket).await.as_deref(),
        Some(r#"["pong",0]"#)
    );
    server.stop().await;
}

#[tokio::test]
async fn a_frame_over_the_limit_gets_wrong_format_and_a_close() {
    let server = Running::start(64 * 1024).await;
    let mut socket = server.ws("/").await;
    connect_client(&mut socket, "10:abc:tab").await;
    let huge = format!(r#"["ping",{}]"#, "1".repeat(100 * 1024));
    // The server may close while the frame is still being written.
    let _ = socket.send(Message::text(huge)).await;
    let error = next_text(&mut socket).await.expect("an error message");
    assert!(
        error.starts_with(r#"["error","wrong-format","frame of "#),
        "{error}"
    );
    assert_eq!(next_text(&mut socket).await, None);
    let mut bystander = server.ws("/").await;
    connect_client(&mut bystander, "20:def:tab").await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_gets_wrong_format() {
    let server = Running::start(1 << 20).await;
    let mut socket = server.ws("/").await;
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    };
    let frame = Frame::from_payload(header, vec![0xff, 0xfe, 0x5b].into());
    socket
        .send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    let error = next_text(&mut socket).await.expect("an error message");
    assert_eq!(
        error,
        r#"["error","wrong-format","text frame is not UTF-8"]"#
    );
    server.stop().await;
}

#[tokio::test]
async fn binary_frames_holding_json_are_accepted() {
    let server = Running::start(1 << 20).await;
    let mut socket = server.ws("/").await;
    connect_client(&mut socket, "10:abc:tab").await;
    socket
        .send(Message::binary(br#"["ping",0]"#.to_vec()))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut socket).await.as_deref(),
        Some(r#"["pong",0]"#)
    );
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connected_clients() {
    let server = Running::start(1 << 20).await;
    let mut socket = server.ws("/").await;
    connect_client(&mut socket, "10:abc:tab").await;
    server.stop().await;
    assert_eq!(next_text(&mut socket).await, None);
}
