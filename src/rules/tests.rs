//! Unit tests of the compiled rules, built from typed rules (no configuration file).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;
use serde_json::json;

/// A type rule as written: `type`, `access` and the `resend` templates.
type TypeText<'a> = (&'a str, &'a str, &'a [&'a str]);

/// Rules from `(pattern, access)` channel rules and type rules, in definition order.
fn rules(channels: &[(&str, &str)], types: &[TypeText<'_>]) -> Rules {
    let mut rules = Rules::default();
    for (pattern, access) in channels {
        rules.add_channel(ChannelRule::parse(pattern, access, RuleHooks::default()).unwrap());
    }
    for (action_type, access, resend) in types {
        let resend: Vec<String> = resend.iter().map(|t| (*t).to_owned()).collect();
        let rule = TypeRule::parse(action_type, access, &resend, RuleHooks::default());
        rules.add_type(rule.unwrap()).unwrap();
    }
    rules
}

fn allowed(channels: &[&str]) -> ActionDecision {
    ActionDecision::Allowed {
        channels: channels.iter().map(|c| (*c).to_owned()).collect(),
    }
}

const CHANNELS: &[(&str, &str)] = &[
    ("users/:id", "param:id"),
    ("users/:id/secret", "nobody"),
    ("admin/*", "nobody"),
    ("admin/public", "anyone"),
    ("news", "anyone"),
];

#[test]
fn unmatched_channel_is_wrong_channel() {
    let r = rules(CHANNELS, &[]);
    assert_eq!(
        r.check_subscribe("nope", Some("1")),
        SubscribeDecision::WrongChannel
    );
    assert_eq!(
        r.check_subscribe("users", Some("1")),
        SubscribeDecision::WrongChannel
    );
    assert_eq!(
        r.check_subscribe("", Some("1")),
        SubscribeDecision::WrongChannel
    );
    let empty = rules(&[], &[]);
    assert_eq!(
        empty.check_subscribe("news", Some("1")),
        SubscribeDecision::WrongChannel
    );
}

#[test]
fn anyone_channel_is_allowed_even_without_user() {
    let r = rules(CHANNELS, &[]);
    assert_eq!(
        r.check_subscribe("news", Some("1")),
        SubscribeDecision::Allowed
    );
    assert_eq!(r.check_subscribe("news", None), SubscribeDecision::Allowed);
}

#[test]
fn param_channel_allows_only_that_user() {
    let r = rules(CHANNELS, &[]);
    assert_eq!(
        r.check_subscribe("users/10", Some("10")),
        SubscribeDecision::Allowed
    );
    assert_eq!(
        r.check_subscribe("users/10", Some("11")),
        SubscribeDecision::Denied
    );
    assert_eq!(
        r.check_subscribe("users/10", None),
        SubscribeDecision::Denied
    );
    assert_eq!(
        r.check_subscribe("users/10", Some("")),
        SubscribeDecision::Denied
    );
}

#[test]
fn nobody_channel_is_denied() {
    let r = rules(CHANNELS, &[]);
    assert_eq!(
        r.check_subscribe("users/10/secret", Some("10")),
        SubscribeDecision::Denied
    );
}

#[test]
fn first_matching_channel_pattern_decides() {
    let r = rules(CHANNELS, &[]);
    // "admin/*" comes before "admin/public", so the later rule is never reached.
    assert_eq!(
        r.check_subscribe("admin/public", Some("1")),
        SubscribeDecision::Denied
    );
    let reversed = rules(&[("admin/public", "anyone"), ("admin/*", "nobody")], &[]);
    assert_eq!(
        reversed.check_subscribe("admin/public", Some("1")),
        SubscribeDecision::Allowed
    );
    assert_eq!(
        reversed.check_subscribe("admin/other", Some("1")),
        SubscribeDecision::Denied
    );
}

#[test]
fn star_tail_channel_matches_nested_channels() {
    let r = rules(CHANNELS, &[]);
    assert_eq!(
        r.check_subscribe("admin/a/b/c", Some("1")),
        SubscribeDecision::Denied
    );
    let demo = Rules::demo();
    for channel in ["a", "a/b/c", "users/1", ""] {
        assert_eq!(
            demo.check_subscribe(channel, None),
            SubscribeDecision::Allowed
        );
    }
}

const TYPES: &[TypeText<'static>] = &[
    ("*", "nobody", &[]),
    ("room/*", "anyone", &["room/{room}"]),
    ("room/private/*", "field:userId", &[]),
    (
        "room/close",
        "field:userId",
        &["room/{room}", "users/{userId}"],
    ),
];

#[test]
fn unknown_type_without_rule() {
    let r = rules(&[], &[("a", "anyone", &[])]);
    assert_eq!(
        r.check_action(&json!({"type": "b"}), Some("1")),
        ActionDecision::UnknownType
    );
    for action in [json!({}), json!({"type": 1}), json!("a"), json!(null)] {
        assert_eq!(
            r.check_action(&action, Some("1")),
            ActionDecision::UnknownType
        );
    }
}

#[test]
fn type_exact_beats_prefix_beats_star() {
    let r = rules(&[], TYPES);
    let user = Some("7");
    // Exact: field access, so a different user is denied even though "room/*" is open.
    assert_eq!(
        r.check_action(
            &json!({"type": "room/close", "room": "r", "userId": "8"}),
            user
        ),
        ActionDecision::Denied
    );
    assert_eq!(
        r.check_action(
            &json!({"type": "room/close", "room": "r", "userId": "7"}),
            user
        ),
        allowed(&["room/r", "users/7"])
    );
    // Prefix.
    assert_eq!(
        r.check_action(&json!({"type": "room/add", "room": "r"}), user),
        allowed(&["room/r"])
    );
    // Longest prefix wins.
    assert_eq!(
        r.check_action(&json!({"type": "room/private/add", "userId": "8"}), user),
        ActionDecision::Denied
    );
    // Fallback.
    assert_eq!(
        r.check_action(&json!({"type": "other"}), user),
        ActionDecision::Denied
    );
    assert_eq!(
        r.check_action(&json!({"type": "room"}), user),
        ActionDecision::Denied
    );
}

#[test]
fn field_access_accepts_string_and_number() {
    let r = rules(&[], &[("t", "field:userId", &[])]);
    let ok = allowed(&[]);
    assert_eq!(
        r.check_action(&json!({"type": "t", "userId": "10"}), Some("10")),
        ok
    );
    assert_eq!(
        r.check_action(&json!({"type": "t", "userId": 10}), Some("10")),
        ok
    );
    for (value, user) in [
        (json!("10"), Some("11")),
        (json!(10), Some("10.0")),
        (json!(10.5), Some("10")),
        (json!(true), Some("true")),
        (json!(null), Some("null")),
        (json!(["10"]), Some("10")),
        (json!("10"), None),
    ] {
        assert_eq!(
            r.check_action(&json!({"type": "t", "userId": value}), user),
            ActionDecision::Denied,
            "{value} {user:?}"
        );
    }
    assert_eq!(
        r.check_action(&json!({"type": "t"}), Some("10")),
        ActionDecision::Denied
    );
}

#[test]
fn resend_templates_fill_skip_and_deduplicate() {
    let r = rules(
        &[],
        &[(
            "t",
            "anyone",
            &[
                "room/{room}",
                "n/{n}",
                "b/{b}",
                "room/{room}",
                "{channel}",
                "gone/{missing}",
                "news",
            ],
        )],
    );
    let action = json!({"type": "t", "room": "r", "n": 3, "b": false, "channel": "room/r"});
    assert_eq!(
        r.check_action(&action, None),
        allowed(&["room/r", "n/3", "b/false", "news"])
    );
    let sparse = json!({"type": "t", "room": null, "n": {}, "b": [], "channel": ""});
    assert_eq!(r.check_action(&sparse, None), allowed(&["news"]));
}

#[test]
fn demo_resends_to_the_channel_field() {
    let demo = Rules::demo();
    assert_eq!(
        demo.check_action(&json!({"type": "x", "channel": "chat/1"}), None),
        allowed(&["chat/1"])
    );
    assert_eq!(demo.check_action(&json!({"type": "x"}), None), allowed(&[]));
    assert_eq!(
        demo.check_action(&json!({"type": "x", "channel": 5}), None),
        allowed(&["5"])
    );
}

#[test]
fn mismatched_access_and_duplicate_types_are_refused() {
    let channel = |access| ChannelRule::parse("users/:id", access, RuleHooks::default());
    assert!(channel("field:id").is_err());
    let e = channel("param:user").unwrap_err();
    assert!(e.contains(":user"), "{e}");
    let typed = |access| TypeRule::parse("t", access, &[], RuleHooks::default());
    assert!(typed("param:id").is_err());
    let mut rules = Rules::default();
    for selector in ["t", "room/*", "*"] {
        let rule = || TypeRule::parse(selector, "anyone", &[], RuleHooks::default()).unwrap();
        let first = rules.types().len();
        assert_eq!(rules.add_type(rule()), Ok(()), "{selector}");
        assert_eq!(rules.add_type(rule()), Err(first), "{selector}");
    }
    assert_eq!(rules.types().len(), 3);
}

#[test]
fn a_second_reducer_for_a_type_is_refused() {
    let reducer = |object| {
        ReducerRule::parse(ReducerText {
            action_type: "counter/add",
            kind: "counter",
            object,
            field: None,
            access: "anyone",
        })
        .unwrap()
    };
    let mut rules = Rules::default();
    assert_eq!(rules.add_reducer(reducer("counter/{id}")), Ok(()));
    assert_eq!(rules.add_reducer(reducer("other/{id}")), Err(0));
    assert_eq!(rules.reducers().len(), 1);
}

#[test]
fn prefix_rules_are_tried_longest_first_whatever_their_order() {
    let short_first = rules(&[], &[("a/*", "anyone", &[]), ("a/b/*", "nobody", &[])]);
    let long_first = rules(&[], &[("a/b/*", "nobody", &[]), ("a/*", "anyone", &[])]);
    for r in [short_first, long_first] {
        assert_eq!(
            r.check_action(&json!({"type": "a/b/c"}), None),
            ActionDecision::Denied
        );
        assert_eq!(r.check_action(&json!({"type": "a/c"}), None), allowed(&[]));
    }
}

#[test]
fn demo_rules_equal_their_written_form() {
    let demo = Rules::demo();
    assert_eq!(demo.channels()[0].pattern().as_str(), "*");
    assert_eq!(demo.channels()[0].access(), &ChannelAccess::Anyone);
    assert_eq!(demo.types()[0].selector(), &TypeSelector::Fallback);
    assert_eq!(demo.types()[0].resend()[0].as_str(), "{channel}");
    let written = rules(&[("*", "anyone")], &[("*", "anyone", &["{channel}"])]);
    for action in [
        json!({"type": "x", "channel": "chat/1"}),
        json!({"type": "x"}),
    ] {
        assert_eq!(
            demo.check_action(&action, None),
            written.check_action(&action, None)
        );
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        "[a-z/{}:*\\x00]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("type".to_owned()),
                    Just("room".to_owned()),
                    Just("userId".to_owned()),
                    Just("channel".to_owned()),
                    "[a-z]{1,3}"
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn checks_never_panic(
        channel in "[a-z0-9/:*]{0,16}|\\PC{0,16}",
        user in proptest::option::of("[0-9a-z]{0,3}"),
        action in any_json(),
        action_type in "(room/|room/private/)?[a-z]{0,3}",
    ) {
        let demo = Rules::demo();
        let full = rules(CHANNELS, TYPES);
        for r in [&demo, &full] {
            r.check_subscribe(&channel, user.as_deref());
            r.check_action(&action, user.as_deref());
            let mut typed = action.clone();
            if let Some(object) = typed.as_object_mut() {
                object.insert("type".into(), Value::String(action_type.clone()));
            }
            r.check_action(&typed, user.as_deref());
        }
    }

    #[test]
    fn pattern_and_template_parsing_never_panics(text in "\\PC{0,12}|[a-z/:*{}]{0,12}") {
        let _ = ChannelPattern::parse(&text);
        let _ = TypeSelector::parse(&text);
        let _ = Template::parse(&text);
    }
}

#[test]
fn rules_know_nothing_about_the_configuration_file() {
    // Architecture invariant: `config` imports `rules`, never the other way round.
    let needle = concat!("crate::", "config");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/rules");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(needle), "{} uses {needle}", path.display());
    }
}
