//! `GET /metrics`: the exposition is valid for Prometheus and counts what happened.

mod support;

use futures_util::SinkExt;
use std::io::Write;
use std::process::{Command, Stdio};
use support::net::{connect_client, next_text, Running};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// `promtool check metrics` on `text`; scripts/test.sh installs promtool when it is missing.
fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            format!("promtool not runnable ({error}); install Debian's prometheus package")
        })?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())
        .map_err(|error| error.to_string())?;
    let output = child
        .wait_with_output()
        .map_err(|error| error.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
}

/// Connects a client as `node` and has it send one chat message to `room/1`, stored.
async fn client_sending_a_message(server: &Running, node: &str) -> WebSocketStream<TcpStream> {
    let mut socket = server.ws("/").await;
    connect_client(&mut socket, node).await;
    socket
        .send(Message::text(
            r#"["sync",1,{"type":"chat/message","channel":"room/1"},{"id":1,"time":1}]"#,
        ))
        .await
        .expect("send");
    assert_eq!(
        next_text(&mut socket).await.as_deref(),
        Some(r#"["synced",1]"#)
    );
    socket
}

/// The body of `GET /metrics`.
async fn scrape(server: &Running) -> String {
    let response = server.http_get("/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response[response.find("\r\n\r\n").map_or(0, |at| at + 4)..].to_owned()
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_connections_and_actions() {
    let server = Running::start(1 << 20).await;
    let _socket = client_sending_a_message(&server, "10:abc:tab").await;
    let mut bad = server.ws("/").await;
    bad.send(Message::text("hello")).await.expect("send");
    assert!(next_text(&mut bad).await.is_some());

    let text = &scrape(&server).await;
    assert_eq!(
        value(
            text,
            r#"ferry_connections{state="admitted",transport="ws"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(text, r#"ferry_handshakes_total{result="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(text, r#"ferry_actions_received_total{outcome="processed"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(text, r#"ferry_protocol_errors_total{kind="wrong-format"}"#),
        Some(1.0)
    );
    assert_eq!(value(text, "ferry_log_head"), Some(2.0));
    // The node id setting of a new data directory, then one client action alone in its group:
    // one block with the action and its answer, the action's id, the channel's and the
    // client's postings, and the group's `last_added`.
    assert_eq!(value(text, "ferry_log_records_written_total"), Some(6.0));
    assert!(value(text, "ferry_log_written_bytes_total").unwrap_or(0.0) > 0.0);
    assert_eq!(value(text, "ferry_sync_seconds_count"), Some(1.0));
    assert!(value(text, "ferry_log_group_commits_total").unwrap_or(0.0) >= 1.0);
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    promtool_check(text).unwrap_or_else(|problems| panic!("promtool: {problems}\n{text}"));
    server.stop().await;
}

#[tokio::test]
async fn reading_recent_history_counts_as_a_hit_of_the_recent_window() {
    let server = Running::start(1 << 20).await;
    let _author = client_sending_a_message(&server, "10:abc:tab").await;
    let mut reader = server.ws("/").await;
    connect_client(&mut reader, "20:def:tab").await;
    reader
        .send(Message::text(
            r#"["sync",1,{"type":"logux/subscribe","channel":"room/1"},{"id":1,"time":1}]"#,
        ))
        .await
        .expect("send");
    let mut frames = Vec::new();
    while !frames
        .iter()
        .any(|frame: &String| frame.contains(r#""type":"chat/message""#))
    {
        assert!(frames.len() < 5, "no history among {frames:?}");
        frames.push(next_text(&mut reader).await.expect("a frame"));
    }

    let text = &scrape(&server).await;
    let hits = value(text, r#"ferry_log_recent_reads_total{result="hit"}"#);
    assert!(hits.unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(
        value(text, r#"ferry_log_recent_reads_total{result="miss"}"#),
        Some(0.0),
        "{text}"
    );
    server.stop().await;
}
