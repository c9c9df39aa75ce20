//! Tests of whole configuration files: defaults, every key, and the error of each mistake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::rules::{ChannelAccess, TypeAccess, TypeSelector};

fn err(text: &str) -> String {
    match Config::from_toml_str(text) {
        Ok(_) => panic!("expected an error for {text:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::from_toml_str("").unwrap();
    assert_eq!(c.listen.to_string(), LISTEN_DEFAULT);
    assert_eq!(c.data_dir, PathBuf::from(DATA_DIR_DEFAULT));
    assert_eq!(c.env, Env::Development);
    assert_eq!(c.subprotocol, 1);
    assert_eq!(c.min_subprotocol, 0);
    assert_eq!(c.retention_actions_max, None);
    assert!(!c.demo);
    assert!(c.rules.channels().is_empty() && c.rules.types().is_empty());
    assert!(c.auth.tokens.is_empty());
    assert!(c.auth.any_user_token.is_none() && c.auth.jwt_hs256_secret.is_none());
    let l = c.limits;
    assert_eq!(l.frame_bytes_max, 64 * 1024 * 1024);
    assert_eq!(l.sync_pairs_max, 1_000_000);
    assert_eq!(l.subscribe_history_max, 1000);
    assert_eq!(l.connect_catchup_max, 100_000);
    assert_eq!(l.handshake_timeout_ms, 20_000);
    assert_eq!(l.idle_timeout_ms, 75_000);
    assert_eq!(l.outbox_len, 4096);
    assert_eq!(l.connections_max, 19_000);
}

#[test]
fn default_listen_matches_its_constant() {
    assert_eq!(default_listen().to_string(), LISTEN_DEFAULT);
}

const FULL_EXAMPLE: &str = r#"
listen = "0.0.0.0:8080"
data_dir = "/var/lib/ferry"
env = "production"
subprotocol = 3
min_subprotocol = 2
retention_actions_max = 500

[auth]
tokens = { "10" = "good-10" }
any_user_token = "secret"
jwt_hs256_secret = "change-me"

[[channels]]
pattern = "users/:id"
access = "param:id"

[[types]]
type = "room/message"
access = "anyone"
resend = ["room/{room}"]

[limits]
frame_bytes_max = 1024
sync_pairs_max = 2
subscribe_history_max = 3
connect_catchup_max = 4
handshake_timeout_ms = 5
idle_timeout_ms = 6
outbox_len = 7
connections_max = 8
log_cache_bytes = 9
log_recent_bytes = 10
pipeline_nice = 11
"#;

#[test]
fn every_key_is_read() {
    let c = Config::from_toml_str(FULL_EXAMPLE).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/ferry"));
    assert_eq!(c.env, Env::Production);
    assert_eq!((c.subprotocol, c.min_subprotocol), (3, 2));
    assert_eq!(c.retention_actions_max, Some(500));
    assert_eq!(c.auth.tokens.get("10").map(String::as_str), Some("good-10"));
    assert_eq!(c.auth.any_user_token.as_deref(), Some("secret"));
    assert_eq!(c.auth.jwt_hs256_secret.as_deref(), Some("change-me"));
    let channels = c.rules.channels();
    assert_eq!(channels.len(), 1);
    assert_eq!(channels[0].pattern().as_str(), "users/:id");
    assert_eq!(
        channels[0].access(),
        &ChannelAccess::Param {
            name: "id".into(),
            segment: 1
        }
    );
    let types = c.rules.types();
    assert_eq!(
        types[0].selector(),
        &TypeSelector::Exact("room/message".into())
    );
    assert_eq!(types[0].access(), &TypeAccess::Anyone);
    let resend: Vec<&str> = types[0].resend().iter().map(|t| t.as_str()).collect();
    assert_eq!(resend, ["room/{room}"]);
    let l = c.limits;
    assert_eq!(
        [
            l.frame_bytes_max,
            l.sync_pairs_max,
            l.subscribe_history_max,
            l.connect_catchup_max,
            l.outbox_len,
            l.connections_max
        ],
        [1024, 2, 3, 4, 7, 8]
    );
    assert_eq!((l.handshake_timeout_ms, l.idle_timeout_ms), (5, 6));
    assert_eq!(l.log_cache_bytes, 9);
    assert_eq!(
        Config::from_toml_str("").unwrap().limits.log_cache_bytes,
        LOG_CACHE_BYTES_DEFAULT
    );
    assert!(Config::from_toml_str("[limits]\nlog_cache_bytes = 0").is_err());
    assert_eq!(l.log_recent_bytes, 10);
    assert_eq!(l.pipeline_nice, 11);
    for wrong in ["-1", "20"] {
        let text = format!("[limits]\npipeline_nice = {wrong}");
        assert!(Config::from_toml_str(&text).is_err(), "{wrong}");
    }
    let off = Config::from_toml_str("[limits]\nlog_recent_bytes = 0").unwrap();
    assert_eq!(off.limits.log_recent_bytes, 0);
}

#[test]
fn long_poll_section_has_defaults_and_reads_every_key() {
    let d = Config::from_toml_str("").unwrap().long_poll;
    assert_eq!(d.poll_hold_ms, LONG_POLL_HOLD_MS_DEFAULT);
    assert_eq!(d.session_expiry_ms, LONG_POLL_SESSION_EXPIRY_MS_DEFAULT);
    assert_eq!(d.sessions_max, LONG_POLL_SESSIONS_MAX_DEFAULT);
    assert_eq!(d.body_bytes_max, LONG_POLL_BODY_BYTES_MAX_DEFAULT);
    assert_eq!(d.queue_frames_max, LONG_POLL_QUEUE_FRAMES_MAX_DEFAULT);
    assert!(d.cors_origins.is_empty());
    let c = Config::from_toml_str(
        r#"
[long_poll]
poll_hold_ms = 100
session_expiry_ms = 200
sessions_max = 3
body_bytes_max = 4
queue_frames_max = 5
cors_origins = ["https://app.example", "http://localhost:5173", "*"]
"#,
    )
    .unwrap()
    .long_poll;
    assert_eq!((c.poll_hold_ms, c.session_expiry_ms), (100, 200));
    assert_eq!(
        (c.sessions_max, c.body_bytes_max, c.queue_frames_max),
        (3, 4, 5)
    );
    assert_eq!(c.cors_origins.len(), 3);
}

#[test]
fn long_poll_section_rejects_bad_values_by_name() {
    assert!(err("[long_poll]\nholds = 1").contains("holds"));
    assert!(err("[long_poll]\nsessions_max = 0").contains("long_poll.sessions_max"));
    assert!(
        err("[long_poll]\npoll_hold_ms = 500\nsession_expiry_ms = 500")
            .contains("session_expiry_ms")
    );
    for bad in [
        "https://app.example/",
        "app.example",
        "https://a.example/path",
        "",
    ] {
        let text = format!("[long_poll]\ncors_origins = [{bad:?}]");
        assert!(err(&text).contains("cors_origins"), "{bad}");
    }
}

#[test]
fn retention_zero_keeps_everything() {
    let c = Config::from_toml_str("retention_actions_max = 0").unwrap();
    assert_eq!(c.retention_actions_max, None);
}

#[test]
fn unknown_key_is_rejected_with_its_name() {
    assert!(err("lisen = \"127.0.0.1:1\"").contains("lisen"));
    assert!(err("[limits]\nframe_byte_max = 1").contains("frame_byte_max"));
    assert!(err("[auth]\ntoken = \"x\"").contains("token"));
    assert!(err("[[channels]]\npattern = \"a\"\naccess = \"anyone\"\nacess = 1").contains("acess"));
    assert!(err("[[types]]\ntype = \"a\"\naccess = \"anyone\"\nresnd = []").contains("resnd"));
}

#[test]
fn bad_env_and_listen_are_rejected() {
    assert!(err("env = \"staging\"").contains("staging"));
    assert!(err("listen = \"localhost\"").contains("listen"));
}

#[test]
fn min_subprotocol_above_subprotocol_is_rejected() {
    assert!(err("subprotocol = 2\nmin_subprotocol = 3").contains("min_subprotocol"));
    assert!(Config::from_toml_str("subprotocol = 2\nmin_subprotocol = 2").is_ok());
}

#[test]
fn zero_limits_are_rejected_with_their_name() {
    for key in [
        "frame_bytes_max",
        "sync_pairs_max",
        "subscribe_history_max",
        "connect_catchup_max",
        "handshake_timeout_ms",
        "idle_timeout_ms",
        "outbox_len",
        "connections_max",
    ] {
        assert!(err(&format!("[limits]\n{key} = 0")).contains(key), "{key}");
    }
    assert!(Config::from_toml_str("[limits]\nframe_bytes_max = -1").is_err());
}

#[test]
fn invalid_access_values_name_the_rule_and_value() {
    let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"everyone\"");
    assert!(e.contains("users/:id") && e.contains("everyone"), "{e}");
    let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"field:id\"");
    assert!(
        e.contains("field:id") && e.contains("only for [[types]]"),
        "{e}"
    );
    let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"param:\"");
    assert!(e.contains("param:"), "{e}");
    let e = err("[[types]]\ntype = \"room/add\"\naccess = \"param:id\"");
    assert!(
        e.contains("room/add") && e.contains("only for [[channels]]"),
        "{e}"
    );
    let e = err("[[types]]\ntype = \"room/add\"\naccess = \"Anyone\"");
    assert!(e.contains("room/add") && e.contains("Anyone"), "{e}");
    let e = err("[[types]]\ntype = \"room/add\"\naccess = \"field:\"");
    assert!(e.contains("field:"), "{e}");
}

#[test]
fn param_access_must_name_a_pattern_parameter() {
    let e = err("[[channels]]\npattern = \"users/:id\"\naccess = \"param:user\"");
    assert!(e.contains("users/:id") && e.contains(":user"), "{e}");
    assert!(Config::from_toml_str(
        "[[channels]]\npattern = \"users/:user\"\naccess = \"param:user\""
    )
    .is_ok());
}

#[test]
fn bad_patterns_and_templates_are_rejected_at_load() {
    let e = err("[[channels]]\npattern = \"a/*/b\"\naccess = \"anyone\"");
    assert!(e.contains("a/*/b"), "{e}");
    let e = err("[[types]]\ntype = \"a\"\naccess = \"anyone\"\nresend = [\"room/{room\"]");
    assert!(e.contains("room/{room"), "{e}");
}

#[test]
fn reserved_and_empty_credentials_are_rejected() {
    assert!(err("[auth]\ntokens = { server = \"x\" }").contains("server"));
    assert!(err("[auth]\ntokens = { \"1\" = \"\" }").contains("auth.tokens"));
    assert!(err("[auth]\nany_user_token = \"\"").contains("any_user_token"));
    assert!(err("[auth]\njwt_hs256_secret = \"\"").contains("jwt_hs256_secret"));
}

#[test]
fn demo_is_open_development_config() {
    let c = Config::demo();
    assert!(c.demo);
    assert_eq!(c.env, Env::Development);
    assert_eq!(c.listen.to_string(), LISTEN_DEFAULT);
    assert_eq!(c.rules.channels()[0].pattern().as_str(), "*");
    assert_eq!(c.rules.channels()[0].access(), &ChannelAccess::Anyone);
    assert_eq!(c.rules.types()[0].selector().to_string(), "*");
    assert_eq!(c.rules.types()[0].resend()[0].as_str(), "{channel}");
}

#[test]
fn debug_output_hides_secrets() {
    let c = Config::from_toml_str(FULL_EXAMPLE).unwrap();
    let text = format!("{c:?}");
    assert!(!text.contains("good-10"), "{text}");
    assert!(!text.contains("\"secret\""), "{text}");
    assert!(!text.contains("change-me"), "{text}");
    assert!(text.contains("***"), "{text}");
    assert!(text.contains("\"10\""), "user ids stay visible: {text}");
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.toml");
    std::fs::write(&path, "subprotocol = 7").unwrap();
    assert_eq!(Config::load(&path).unwrap().subprotocol, 7);
    std::fs::write(&path, "bogus = 1").unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("ferry.toml") && e.contains("bogus"), "{e}");
    let missing = dir.path().join("missing.toml");
    assert!(matches!(
        Config::load(&missing),
        Err(ConfigError::Read { .. })
    ));
}

#[test]
fn backend_hooks_are_checked_and_the_secret_is_masked() {
    let backend =
        "[backend]\nurl = \"http://127.0.0.1:4000/ferry/\"\nsecret = \"0123456789abcdef\"\n";
    let rule = "[[types]]\ntype = \"order/buy\"\naccess = \"anyone\"\nhooks = [\"process\", \"access\"]\nheaders = [\"X-Device\"]\n";
    let config = Config::from_toml_str(&format!("{backend}{rule}")).expect("valid");
    let parsed = config.backend.as_ref().expect("backend");
    assert_eq!(parsed.url, "http://127.0.0.1:4000/ferry");
    assert_eq!(
        parsed.process_deadline_ms,
        BACKEND_PROCESS_DEADLINE_MS_DEFAULT
    );
    assert!(!format!("{parsed:?}").contains("0123456789abcdef"));
    let hooks = config.rules.types()[0].hooks();
    assert!(hooks.has(Hook::Process) && hooks.has(Hook::Access) && !hooks.has(Hook::Resend));
    assert_eq!(hooks.headers, vec!["x-device"]);

    let e = err(rule);
    assert!(e.contains("[backend]"), "{e}");
    let e = err(&format!(
        "{backend}{}",
        rule.replace("\"access\"]", "\"load\"]")
    ));
    assert!(e.contains("\"load\"") && e.contains("order/buy"), "{e}");
    let e = err(&backend.replace("0123456789abcdef", "short"));
    assert!(e.contains("backend.secret"), "{e}");
    let e = err(&backend.replace("http://", "ftp://"));
    assert!(e.contains("backend.url"), "{e}");
    let e = err(&format!("{backend}timeout_ms = 0\n"));
    assert!(e.contains("timeout_ms"), "{e}");
}

#[test]
fn rule_errors_name_their_section_and_index() {
    let e = err("[[types]]\ntype = \"t\"\naccess = \"anyone\"\n\
                 [[types]]\ntype = \"t\"\naccess = \"nobody\"");
    assert!(
        e.contains("types[1] (type \"t\"): the type is already defined by types[0]"),
        "{e}"
    );
    let reducer =
        "[[reducers]]\ntype = \"counter/add\"\nkind = \"counter\"\nobject = \"counter/{id}\"\n";
    // The reducer names itself (this message used to be a type rule's, "types[" rewritten).
    let e = err(&format!("{reducer}access = \"param:id\""));
    assert!(
        e.contains("reducers[0] (type \"counter/add\"): access \"param:id\" is only for"),
        "{e}"
    );
    let e = err(&format!(
        "{reducer}access = \"anyone\"\n{reducer}access = \"anyone\""
    ));
    assert!(
        e.contains("reducers[1]") && e.contains("two reducers"),
        "{e}"
    );
    let broken = reducer.replace("counter/{id}", "counter/{id");
    let e = err(&format!("{broken}access = \"anyone\""));
    assert!(e.contains("reducers[0]") && e.contains("object"), "{e}");
    let e = err("[[sync_maps]]\nplural = \"a/b\"\naccess = \"anyone\"");
    assert!(e.contains("sync_maps[0]") && e.contains("plural"), "{e}");
    let e = err("[[sync_maps]]\nplural = \"tasks\"\naccess = \"field:x\"");
    assert!(e.contains("sync_maps[0]") && e.contains("field:x"), "{e}");
}

#[test]
fn sync_maps_and_reducers_are_read_into_the_rules() {
    let c = Config::from_toml_str(
        "[[sync_maps]]\nplural = \"tasks\"\naccess = \"anyone\"\n\
         [[reducers]]\ntype = \"counter/add\"\nkind = \"counter\"\nobject = \"counter/{id}\"\n\
         field = \"by\"\naccess = \"field:userId\"",
    )
    .unwrap();
    assert!(c.rules.sync_map_channel("tasks/1").is_some());
    let reducer = &c.rules.reducers()[0];
    assert_eq!(reducer.action_type(), "counter/add");
    assert_eq!(reducer.kind(), crate::crdt::ReducerKind::Counter);
    assert_eq!(reducer.object().as_str(), "counter/{id}");
    assert_eq!(reducer.field(), Some("by"));
    assert_eq!(reducer.access(), &TypeAccess::Field("userId".into()));
}

#[test]
fn cluster_section_has_defaults_and_reads_every_key() {
    let c = Config::from_toml_str("[cluster]\nnats_urls = [\"nats://10.0.0.1:4222\"]\n").unwrap();
    let cluster = c.cluster.expect("cluster");
    assert_eq!(cluster.nats_urls, vec!["nats://10.0.0.1:4222".to_owned()]);
    assert_eq!(cluster.stream, CLUSTER_STREAM_DEFAULT);
    assert_eq!(cluster.replicas, CLUSTER_REPLICAS_DEFAULT);
    assert_eq!(
        cluster.append_deadline_ms,
        CLUSTER_APPEND_DEADLINE_MS_DEFAULT
    );
    assert_eq!(cluster.ready_lag_max, CLUSTER_READY_LAG_MAX_DEFAULT);
    assert_eq!(cluster.catch_up_wait_ms, CLUSTER_CATCH_UP_WAIT_MS_DEFAULT);
    assert_eq!(cluster.lease_ms, CLUSTER_LEASE_MS_DEFAULT);
    assert!(Config::from_toml_str("").unwrap().cluster.is_none());
    let c = Config::from_toml_str(
        r#"[cluster]
nats_urls = ["nats://a:4222", "nats://b:4222"]
stream = "app-log_1"
replicas = 5
user_password_file = "/etc/ferry/nats-user"
ca_file = "/etc/ferry/nats-ca.pem"
append_deadline_ms = 5000
ready_lag_max = 10
catch_up_wait_ms = 100
lease_ms = 2000
"#,
    )
    .unwrap();
    let cluster = c.cluster.expect("cluster");
    assert_eq!(cluster.stream, "app-log_1");
    assert_eq!(cluster.replicas, 5);
    assert_eq!(
        cluster.user_password_file,
        Some(PathBuf::from("/etc/ferry/nats-user"))
    );
    assert_eq!(
        cluster.ca_file,
        Some(PathBuf::from("/etc/ferry/nats-ca.pem"))
    );
    assert_eq!(
        (cluster.append_deadline_ms, cluster.ready_lag_max),
        (5000, 10)
    );
    assert_eq!((cluster.catch_up_wait_ms, cluster.lease_ms), (100, 2000));
}

#[test]
fn cluster_mistakes_are_errors_naming_the_key() {
    assert!(err("[cluster]\nnats_urls = []\n").contains("cluster.nats_urls"));
    assert!(err("[cluster]\nstream = \"x\"\n").contains("nats_urls"));
    assert!(
        err("[cluster]\nnats_urls = [\"nats://a\"]\nstream = \"a.b\"\n").contains("cluster.stream")
    );
    assert!(
        err("[cluster]\nnats_urls = [\"nats://a\"]\nreplicas = 6\n").contains("cluster.replicas")
    );
    assert!(
        err("[cluster]\nnats_urls = [\"nats://a\"]\nlease_ms = 10\n").contains("cluster.lease_ms")
    );
    assert!(err("[cluster]\nnats_urls = [\"nats://a\"]\nreplica = 3\n").contains("replica"));
    let both = "[cluster]\nnats_urls = [\"nats://a\"]\nuser_password_file = \"u\"\nnkey_seed_file = \"k\"\n";
    assert!(err(both).contains("not both"));
}
