//! A full disk: Ferry stops acknowledging, says why in its log and metrics, and keeps what
//! it acknowledged readable. Runs on a small tmpfs, so it needs root (as CI has); without
//! root it says so and checks nothing.

mod support;

use ferry::log::{Log, LogOptions};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::child::{connect, Ferry, NoListener, ROOM_CONFIG as CONFIG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const TMPFS_SIZE: &str = "size=3m";
const PAYLOAD_BYTES: usize = 16 * 1024;
const ACTIONS_MAX: i64 = 2_000;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

async fn metrics(port: u16) -> String {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut text)).await;
    text
}

/// Sends big actions one at a time until the server stops answering with `synced`.
async fn fill(port: u16) -> (HashSet<String>, i64) {
    let mut acked = HashSet::new();
    let node = "1:filler:t";
    let mut n = 0;
    'connections: for _attempt in 0..5 {
        let Some((mut socket, base)) = connect(port, node).await else {
            break;
        };
        while n < ACTIONS_MAX {
            n += 1;
            let ms = base + n;
            let frame = json!(["sync", n, {"type": "room/message", "room": "full", "n": n, "blob": "x".repeat(PAYLOAD_BYTES)},
                {"id": n, "time": n}]);
            if socket.send(Message::text(frame.to_string())).await.is_err() {
                continue 'connections;
            }
            loop {
                match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        if value[0] == "synced" {
                            acked.insert(format!("{ms} {node} 0"));
                            break;
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    // Closed without `synced`: the server refused to acknowledge.
                    _ => continue 'connections,
                }
            }
        }
    }
    (acked, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_acknowledging_and_keeps_what_was_acknowledged() {
    if !is_root() {
        eprintln!("disk_full: not root, cannot mount a tmpfs; nothing checked");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "tmpfs"])
        .arg(&mount)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mounting a tmpfs failed");
    let data = mount.join("data");
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let log_file = dir.path().join("ferry.log");

    let ferry = Ferry::start_logging(&data, &config, Some(&log_file)).await;
    let (acked, sent) = fill(ferry.port).await;
    let text = metrics(ferry.port).await;
    ferry.kill();

    // Copy what is on the full disk elsewhere and unmount before checking anything.
    let copy = dir.path().join("copy");
    let copied = Command::new("cp").arg("-a").arg(&data).arg(&copy).status();
    let _ = Command::new("umount").arg(&mount).status();
    assert!(
        copied.map(|s| s.success()).unwrap_or(false),
        "copying the data failed"
    );

    assert!(
        !acked.is_empty(),
        "some actions were acknowledged before the disk filled"
    );
    assert!(
        (acked.len() as i64) < sent,
        "the server stopped acknowledging when the disk was full ({} of {sent})",
        acked.len()
    );
    let server_log = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(
        // sled reports ENOSPC from `apply_batch` or from the flush, depending on timing.
        server_log.contains("log write failed") || server_log.contains("log flush failed"),
        "the server log says why:\n{server_log}"
    );
    assert!(text.contains("ferry_log_poisoned 1"), "metrics:\n{text}");

    let log = Log::open(&copy, LogOptions::default(), Arc::new(NoListener)).expect("open the copy");
    let stored: HashSet<String> = log
        .channel_since("room/full", 0, log.head(), usize::MAX)
        .expect("read")
        .iter()
        .map(|entry| entry.meta.id.clone())
        .collect();
    for id in &acked {
        assert!(
            stored.contains(id),
            "acknowledged {id} is readable after the disk filled"
        );
    }
    eprintln!(
        "disk_full: {} acknowledged of {sent} sent, all readable",
        acked.len()
    );
    log.close().await.expect("close");
}
