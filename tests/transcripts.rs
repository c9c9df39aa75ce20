//! Golden wire transcripts: real JSON frames, `C>` from a client and `S<` from the server,
//! driven through the whole server (protocol core, pipeline, log, hub) on an in-memory
//! transport with a manual clock.
//!
//! Format, one directive per line:
//! - `# text`: a comment.
//! - `A C> [...]`: client `A` sends the frame (the label is optional; default `A`).
//! - `A S< [...]`: the next frame client `A` receives must equal this JSON.
//! - `A closed`: the server closed `A`'s connection.
//! - `A quiet`: `A` receives nothing more for a short while.
//! - `A disconnect`: `A` closes its side.
//! - `clock N`: the server clock reads `N` ms from now on.
//! - `restart`: the server restarts on the same data directory.
//! - `config production`: (first line only) production mode.
//!
//! Set `UPDATE_TRANSCRIPTS=1` to rewrite the `S<` lines with the frames the server actually
//! sent instead of failing; review the diff before committing it.

mod support;

use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use support::{TestClient, TestServer, TEST_CONFIG};

const QUIET_WAIT: Duration = Duration::from_millis(150);

async fn check(path: &Path) {
    let text = std::fs::read_to_string(path).expect("transcript file");
    let config = if text.starts_with("config production") {
        TEST_CONFIG.replace("env = \"development\"", "env = \"production\"")
    } else {
        TEST_CONFIG.to_owned()
    };
    let mut server = TestServer::start(&config);
    let mut clients: HashMap<String, TestClient> = HashMap::new();
    let update = std::env::var_os("UPDATE_TRANSCRIPTS").is_some();
    let mut rewritten = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        rewritten.push(raw.to_owned());
        let line = raw.trim();
        let at = format!("{}:{}", path.display(), number + 1);
        if line.is_empty() || line.starts_with('#') || line.starts_with("config ") {
            continue;
        }
        if let Some(ms) = line.strip_prefix("clock ") {
            server.clock.set(ms.trim().parse().expect("clock value"));
            continue;
        }
        if line == "restart" {
            clients.clear();
            server = server.restart().await;
            continue;
        }
        let (label, rest) = match line.split_once(' ') {
            Some((label, rest)) if !label.contains('>') && !label.contains('<') => {
                (label.to_owned(), rest.trim())
            }
            _ => ("A".to_owned(), line),
        };
        if let Some(frame) = rest.strip_prefix("C>") {
            let client = clients
                .entry(label.clone())
                .or_insert_with(|| server.connect());
            client.send(frame.trim()).await;
        } else if let Some(expected) = rest.strip_prefix("S<") {
            let client = clients
                .get_mut(&label)
                .unwrap_or_else(|| panic!("{at}: no client {label}"));
            let expected: Value = serde_json::from_str(expected.trim())
                .unwrap_or_else(|e| panic!("{at}: bad expected JSON: {e}"));
            let actual = client.recv().await;
            let actual_value = actual
                .as_deref()
                .map(|frame| serde_json::from_str::<Value>(frame).expect("server sent JSON"));
            if update {
                if let (Some(last), Some(frame)) = (rewritten.last_mut(), &actual) {
                    let prefix = &raw[..raw.find("S<").unwrap_or(0) + 2];
                    *last = format!("{prefix} {frame}");
                }
                continue;
            }
            assert_eq!(
                actual_value.as_ref(),
                Some(&expected),
                "{at}: expected {expected}, got {actual:?}"
            );
        } else if rest == "closed" {
            let client = clients
                .get_mut(&label)
                .unwrap_or_else(|| panic!("{at}: no client {label}"));
            assert!(
                client.is_closed_by_server().await,
                "{at}: connection still open"
            );
        } else if rest == "quiet" {
            let client = clients
                .get_mut(&label)
                .unwrap_or_else(|| panic!("{at}: no client {label}"));
            let extra = client.try_recv(QUIET_WAIT).await;
            assert_eq!(extra, None, "{at}: unexpected frame");
        } else if rest == "disconnect" {
            if let Some(client) = clients.remove(&label) {
                client.disconnect().await;
            }
        } else {
            panic!("{at}: unknown directive {line:?}");
        }
    }
    if update {
        std::fs::write(path, rewritten.join("\n") + "\n").expect("rewrite transcript");
    }
}

macro_rules! transcripts {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            check(&Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/transcripts")
                .join(concat!(stringify!($name), ".txt")))
            .await;
        }
    )*};
}

transcripts!(
    handshake_in_development,
    handshake_in_production,
    protocol_errors,
    auth_errors,
    actions_processed_and_undone,
    channel_delivery_between_clients,
    messages_before_auth_are_queued,
    resync_after_reconnect_with_since,
    history_on_subscribe,
    duplicate_actions_are_stored_once,
    targeted_catchup_on_connect,
    restart_keeps_actions,
);
