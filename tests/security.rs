//! Security basics: TLS from a certificate in the configuration, the origin allow-list, the
//! connection limits (overall and per address), and secrets kept out of logs and metrics.

mod support;

use ferry::config::{Config, TlsConfig};
use ferry::transports::http::ServeOptions;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use support::net::{connect_client, next_text, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A self-signed certificate for `localhost`, written to `dir`.
fn self_signed(dir: &std::path::Path) -> (TlsConfig, CertificateDer<'static>) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    (TlsConfig { cert, key }, certified.cert.der().clone())
}

fn connector(trusted: CertificateDer<'static>) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(trusted).expect("trust the test certificate");
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn wss_and_https_are_served_from_a_configured_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (tls, der) = self_signed(dir.path());
    let mut config = Config::demo();
    config.tls = Some(tls);
    let server = Running::start_with(config, ServeOptions::default()).await;
    let name = ServerName::try_from("localhost").expect("server name");

    // https:// GET /health
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let mut https = connector(der.clone())
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    https
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), https.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // wss:// with a Logux handshake
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let tls_stream = connector(der)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let request = format!("wss://localhost:{}/", server.addr.port())
        .into_client_request()
        .expect("request");
    let (mut socket, _) = tokio_tungstenite::client_async(request, tls_stream)
        .await
        .expect("websocket over TLS");
    socket
        .send(Message::text(
            r#"["connect",5,"10:abc:tab",0,{"token":"t","subprotocol":1}]"#,
        ))
        .await
        .expect("send");
    let mut got_connected = false;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(5), socket.next()).await
    {
        if let Message::Text(text) = message {
            if text.starts_with("[\"connected\"") {
                got_connected = true;
                break;
            }
        }
    }
    assert!(got_connected);

    // Plain text on the TLS port is not served.
    let mut plain = TcpStream::connect(server.addr).await.expect("connect");
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buffer)).await;
    let text = match read {
        Ok(Ok(n)) => String::from_utf8_lossy(&buffer[..n]).into_owned(),
        _ => String::new(),
    };
    assert!(!text.starts_with("HTTP/1.1 200"), "{text}");
    server.stop().await;
}

#[test]
fn an_unusable_certificate_stops_the_server_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").expect("write");
    let error = ferry::transports::tls::acceptor(&cert, &cert)
        .err()
        .expect("an error");
    assert!(
        error.to_string().contains("holds no PEM certificate"),
        "{error}"
    );
}

async fn upgrade_status(server: &Running, origin: Option<&str>) -> String {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{origin}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&buffer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn browsers_from_origins_not_on_the_allow_list_are_refused() {
    let mut config = Config::demo();
    config.allowed_origins = vec!["https://app.example".to_owned()];
    let server = Running::start_with(config, ServeOptions::default()).await;
    assert_eq!(
        upgrade_status(&server, Some("https://evil.example")).await,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        upgrade_status(&server, Some("https://app.example")).await,
        "HTTP/1.1 101 Switching Protocols"
    );
    // Native clients send no Origin.
    assert_eq!(
        upgrade_status(&server, None).await,
        "HTTP/1.1 101 Switching Protocols"
    );
    server.stop().await;
}

#[tokio::test]
async fn open_websockets_count_against_the_connection_limits() {
    let mut config = Config::demo();
    config.limits.connections_per_address_max = 3;
    let server = Running::start_with(config, ServeOptions::default()).await;
    let mut open = Vec::new();
    for n in 0..3 {
        let mut socket = server.ws("/").await;
        connect_client(&mut socket, &format!("{n}:c:t")).await;
        open.push(socket);
    }
    // The upgraded sockets still hold their slots: a fourth is refused with 503.
    let refused = upgrade_status(&server, None).await;
    assert_eq!(refused, "HTTP/1.1 503 Service Unavailable");
    // Closing one frees its slot.
    let mut first = open.remove(0);
    first.close(None).await.expect("close");
    drop(first);
    let mut freed = false;
    for _ in 0..50 {
        if upgrade_status(&server, None).await == "HTTP/1.1 101 Switching Protocols" {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "a closed connection gives its slot back");
    server.stop().await;
}

#[tokio::test]
async fn secrets_never_appear_in_metrics_or_debug_output() {
    let secret_token = "very-secret-token-6f1e";
    let jwt_secret = "very-secret-jwt-key-93ab";
    let toml = format!(
        "[auth]\nany_user_token = \"{secret_token}\"\njwt_hs256_secret = \"{jwt_secret}\"\n\
         [[channels]]\npattern = \"*\"\naccess = \"anyone\"\n"
    );
    let config = Config::from_toml_str(&toml).expect("config");
    let debug = format!("{config:?}");
    assert!(
        !debug.contains(secret_token) && !debug.contains(jwt_secret),
        "{debug}"
    );
    let server = Running::start_with(config, ServeOptions::default()).await;
    let mut socket = server.ws("/").await;
    socket
        .send(Message::text(format!(
            r#"["connect",5,"10:a:b",0,{{"token":"{secret_token}","subprotocol":1}}]"#
        )))
        .await
        .expect("send");
    assert!(next_text(&mut socket).await.is_some());
    let metrics = server.http_get("/metrics").await;
    assert!(!metrics.contains(secret_token) && !metrics.contains(jwt_secret));
    let server_debug = format!("{:?}", server.server.auth);
    assert!(!server_debug.contains(secret_token) && !server_debug.contains(jwt_secret));
    server.stop().await;
}
