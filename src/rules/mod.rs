//! Declarative rules from the configuration file.
//!
//! Pure decisions (no IO): who may subscribe to which channel, which action types are known,
//! who may add them, and where they are re-sent.
//!
//! Channel patterns are tried in definition order and the first match decides. Type rules
//! are looked up by exact type first (a `HashMap`), then by the longest matching `prefix/*`,
//! then the `*` fallback.

pub mod auth;
mod pattern;

use crate::config::{Access, Config, ConfigError, Hook, RuleHooks};
use crate::crdt::ReducerKind;
use pattern::{ChannelPattern, Template, TypeSelector};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// Outcome of a `logux/subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeDecision {
    /// The user may subscribe.
    Allowed,
    /// No channel pattern matches (`logux/undo` reason `wrongChannel`).
    WrongChannel,
    /// A pattern matches but its access rule refuses this user (`denied`).
    Denied,
}

/// Outcome of checking a client's action against the type rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionDecision {
    /// Allowed; the action is re-sent to these channels (templates filled, de-duplicated).
    Allowed {
        /// Channels to re-send the action to, in template order, without duplicates.
        channels: Vec<String>,
    },
    /// No rule for this type (`unknownType`).
    UnknownType,
    /// A rule matches but refuses this user (`denied`).
    Denied,
    /// A SyncMap operation on the object `<plural>/<id>`.
    SyncMap {
        /// The SyncMap's plural name.
        plural: String,
        /// The object id.
        id: String,
        /// What the client asked for.
        op: SyncMapOp,
    },
}

/// The three SyncMap operations clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMapOp {
    /// `<plural>/create`: becomes `<plural>/created`.
    Create,
    /// `<plural>/change`: becomes `<plural>/changed`.
    Change,
    /// `<plural>/delete`: becomes `<plural>/deleted`.
    Delete,
}

impl SyncMapOp {
    /// The type of the action the server re-sends for this operation.
    pub fn finished_type(self, plural: &str) -> String {
        match self {
            SyncMapOp::Create => format!("{plural}/created"),
            SyncMapOp::Change => format!("{plural}/changed"),
            SyncMapOp::Delete => format!("{plural}/deleted"),
        }
    }
}

/// The object state a stored action updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    /// The object key, which is also its channel (`tasks/7`, `counter/5`).
    pub key: String,
    /// Which CRDT holds its state.
    pub kind: ReducerKind,
    /// Counter only: the delta field.
    pub field: Option<String>,
}

/// A channel that belongs to a SyncMap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMapChannel {
    /// `<plural>/<id>`: one object.
    Object {
        /// The plural name.
        plural: String,
        /// The object id.
        id: String,
    },
    /// `<plural>`: the filter channel listing every object.
    Filter {
        /// The plural name.
        plural: String,
    },
}

/// One compiled `[[reducers]]` rule.
#[derive(Debug, Clone)]
struct ReducerCheck {
    kind: ReducerKind,
    object: Template,
    field: Option<String>,
    access: TypeAccess,
}

/// Compiled channel and type rules.
#[derive(Debug, Clone)]
pub struct Rules {
    /// In definition order; the first match decides.
    channels: Vec<ChannelCheck>,
    /// Rules for one exact type.
    exact_types: HashMap<String, TypeCheck>,
    /// `prefix/*` rules, longest prefix first.
    prefix_types: Vec<(String, TypeCheck)>,
    /// The `*` rule.
    fallback_type: Option<TypeCheck>,
    /// SyncMaps by plural: true when anyone may use them.
    sync_maps: HashMap<String, bool>,
    /// Reducers by exact action type.
    reducers: HashMap<String, ReducerCheck>,
}

/// Who may subscribe to the channels of one pattern.
#[derive(Debug, Clone)]
enum ChannelAccess {
    Anyone,
    Nobody,
    /// The parameter at this segment index must equal the user id.
    Param(usize),
}

/// One compiled `[[channels]]` rule.
#[derive(Debug, Clone)]
struct ChannelCheck {
    pattern: ChannelPattern,
    access: ChannelAccess,
    hooks: Arc<RuleHooks>,
}

/// Who may add actions of one type.
#[derive(Debug, Clone)]
enum TypeAccess {
    Anyone,
    Nobody,
    /// This action field must equal the user id.
    Field(String),
}

/// One compiled `[[types]]` rule.
#[derive(Debug, Clone)]
struct TypeCheck {
    access: TypeAccess,
    resend: Vec<Template>,
    hooks: Arc<RuleHooks>,
}

impl Rules {
    /// Compiles the rules of a configuration.
    pub fn new(config: &Config) -> Result<Rules, ConfigError> {
        let mut channels = Vec::with_capacity(config.channels.len());
        for (index, rule) in config.channels.iter().enumerate() {
            let name = format!("channels[{index}] (pattern {:?})", rule.pattern);
            let pattern = ChannelPattern::parse(&rule.pattern)
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            let access = match &rule.access {
                Access::Anyone => ChannelAccess::Anyone,
                Access::Nobody => ChannelAccess::Nobody,
                Access::Param(param) => match pattern.param_index(param) {
                    Some(position) => ChannelAccess::Param(position),
                    None => {
                        return Err(ConfigError::Invalid(format!(
                            "{name}: access \"param:{param}\" names no \":{param}\" parameter \
                             of the pattern"
                        )))
                    }
                },
                Access::Field(field) => {
                    return Err(ConfigError::Invalid(format!(
                        "{name}: access \"field:{field}\" is only for [[types]]; channels use \
                         \"param:NAME\""
                    )))
                }
            };
            channels.push(ChannelCheck {
                pattern,
                access,
                hooks: Arc::new(rule.hooks.clone()),
            });
        }

        let mut exact_types = HashMap::new();
        let mut prefix_types: Vec<(String, TypeCheck)> = Vec::new();
        let mut fallback_type = None;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, rule) in config.types.iter().enumerate() {
            let name = format!("types[{index}] (type {:?})", rule.action_type);
            if let Some(first) = seen.insert(rule.action_type.as_str(), index) {
                return Err(ConfigError::Invalid(format!(
                    "{name}: the type is already defined by types[{first}]"
                )));
            }
            let selector = TypeSelector::parse(&rule.action_type)
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            let access = match &rule.access {
                Access::Anyone => TypeAccess::Anyone,
                Access::Nobody => TypeAccess::Nobody,
                Access::Field(field) if field.is_empty() => {
                    return Err(ConfigError::Invalid(format!(
                        "{name}: access \"field:\" needs a field name"
                    )))
                }
                Access::Field(field) => TypeAccess::Field(field.clone()),
                Access::Param(param) => {
                    return Err(ConfigError::Invalid(format!(
                        "{name}: access \"param:{param}\" is only for [[channels]]; types use \
                         \"field:NAME\""
                    )))
                }
            };
            let resend = rule
                .resend
                .iter()
                .map(|text| {
                    Template::parse(text).map_err(|e| {
                        ConfigError::Invalid(format!("{name}: resend template {text:?}: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let check = TypeCheck {
                access,
                resend,
                hooks: Arc::new(rule.hooks.clone()),
            };
            match selector {
                TypeSelector::Exact(action_type) => {
                    exact_types.insert(action_type, check);
                }
                TypeSelector::Prefix(prefix) => prefix_types.push((prefix, check)),
                TypeSelector::Fallback => fallback_type = Some(check),
            }
        }
        // Longest first, so "room/private/*" wins over "room/*" (stable for equal lengths,
        // which cannot overlap since duplicates were refused).
        prefix_types.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));

        let sync_maps = config
            .sync_maps
            .iter()
            .map(|rule| (rule.plural.clone(), rule.access == Access::Anyone))
            .collect();
        let mut reducers = HashMap::new();
        for (index, rule) in config.reducers.iter().enumerate() {
            let name = format!("reducers[{index}] (type {:?})", rule.action_type);
            let object = Template::parse(&rule.object).map_err(|e| {
                ConfigError::Invalid(format!("{name}: object {:?}: {e}", rule.object))
            })?;
            let access = match &rule.access {
                Access::Anyone => TypeAccess::Anyone,
                Access::Nobody => TypeAccess::Nobody,
                Access::Field(field) => TypeAccess::Field(field.clone()),
                Access::Param(_) => {
                    return Err(ConfigError::Invalid(format!(
                        "{name}: access \"param:\" is only for [[channels]]"
                    )))
                }
            };
            let check = ReducerCheck {
                kind: rule.kind,
                object,
                field: rule.field.clone(),
                access,
            };
            if reducers.insert(rule.action_type.clone(), check).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{name}: the type has two reducers"
                )));
            }
        }

        Ok(Rules {
            channels,
            exact_types,
            prefix_types,
            fallback_type,
            sync_maps,
            reducers,
        })
    }

    /// The SyncMap a channel belongs to, if any.
    pub fn sync_map_channel(&self, channel: &str) -> Option<SyncMapChannel> {
        if self.sync_maps.contains_key(channel) {
            return Some(SyncMapChannel::Filter {
                plural: channel.to_owned(),
            });
        }
        let (plural, id) = channel.split_once('/')?;
        (self.sync_maps.contains_key(plural) && !id.is_empty() && !id.contains('/')).then(|| {
            SyncMapChannel::Object {
                plural: plural.to_owned(),
                id: id.to_owned(),
            }
        })
    }

    /// The object state a stored action updates: the `<plural>/created|changed|deleted`
    /// actions of SyncMaps, and the actions of `[[reducers]]` types.
    pub fn object_of(&self, action: &Value) -> Option<ObjectRef> {
        let action_type = action.get("type").and_then(Value::as_str)?;
        if let Some(rule) = self.reducers.get(action_type) {
            return Some(ObjectRef {
                key: rule.object.fill(action)?,
                kind: rule.kind,
                field: rule.field.clone(),
            });
        }
        let (plural, suffix) = action_type.rsplit_once('/')?;
        if !matches!(suffix, "created" | "changed" | "deleted")
            || !self.sync_maps.contains_key(plural)
        {
            return None;
        }
        Some(ObjectRef {
            key: format!("{plural}/{}", object_id(action)?),
            kind: ReducerKind::LwwMap,
            field: None,
        })
    }

    /// Checks a SyncMap or reducer action; `None` when the type is neither.
    fn check_object_action(&self, action: &Value, user_id: Option<&str>) -> Option<ActionDecision> {
        let action_type = action.get("type").and_then(Value::as_str)?;
        if let Some(rule) = self.reducers.get(action_type) {
            if !type_access_allows(&rule.access, action, user_id) {
                return Some(ActionDecision::Denied);
            }
            let valid = match rule.kind {
                ReducerKind::Counter => {
                    let field = rule
                        .field
                        .as_deref()
                        .unwrap_or(crate::crdt::DEFAULT_DELTA_FIELD);
                    crate::crdt::CounterOp::parse(action, field).is_ok()
                }
                ReducerKind::Set => crate::crdt::SetOp::parse(action).is_ok(),
                ReducerKind::List => crate::crdt::ListOp::parse(action).is_ok(),
                ReducerKind::LwwMap => crate::crdt::LwwOp::parse(action).is_ok(),
            };
            return Some(match (valid, rule.object.fill(action)) {
                (true, Some(object)) => ActionDecision::Allowed {
                    channels: vec![object],
                },
                _ => ActionDecision::Denied,
            });
        }
        let (plural, suffix) = action_type.rsplit_once('/')?;
        let anyone = *self.sync_maps.get(plural)?;
        let op = match suffix {
            "create" => SyncMapOp::Create,
            "change" => SyncMapOp::Change,
            "delete" => SyncMapOp::Delete,
            _ => return None,
        };
        let fields_ok =
            op == SyncMapOp::Delete || action.get("fields").is_some_and(Value::is_object);
        Some(match object_id(action) {
            Some(id) if anyone && fields_ok && !id.contains('/') => ActionDecision::SyncMap {
                plural: plural.to_owned(),
                id,
                op,
            },
            _ => ActionDecision::Denied,
        })
    }

    /// May `user_id` subscribe to `channel`?
    pub fn check_subscribe(&self, channel: &str, user_id: Option<&str>) -> SubscribeDecision {
        if let Some(map) = self.sync_map_channel(channel) {
            let plural = match &map {
                SyncMapChannel::Object { plural, .. } | SyncMapChannel::Filter { plural } => plural,
            };
            return if self.sync_maps.get(plural).copied().unwrap_or(false) {
                SubscribeDecision::Allowed
            } else {
                SubscribeDecision::Denied
            };
        }
        for rule in &self.channels {
            let capture = match rule.access {
                ChannelAccess::Param(position) => Some(position),
                ChannelAccess::Anyone | ChannelAccess::Nobody => None,
            };
            let Some(captured) = rule.pattern.matches(channel, capture) else {
                continue;
            };
            let allowed = match rule.access {
                ChannelAccess::Anyone => true,
                ChannelAccess::Nobody => false,
                ChannelAccess::Param(_) => user_id.is_some() && captured == user_id,
            };
            return if allowed {
                SubscribeDecision::Allowed
            } else {
                SubscribeDecision::Denied
            };
        }
        SubscribeDecision::WrongChannel
    }

    /// May `user_id` add `action`, and where is it re-sent?
    pub fn check_action(&self, action: &Value, user_id: Option<&str>) -> ActionDecision {
        if let Some(decision) = self.check_object_action(action, user_id) {
            return decision;
        }
        let Some(rule) = action
            .get("type")
            .and_then(Value::as_str)
            .and_then(|action_type| self.type_rule(action_type))
        else {
            return ActionDecision::UnknownType;
        };
        if !type_access_allows(&rule.access, action, user_id) {
            return ActionDecision::Denied;
        }
        let mut channels: Vec<String> = Vec::with_capacity(rule.resend.len());
        for template in &rule.resend {
            if let Some(channel) = template.fill(action) {
                if !channels.contains(&channel) {
                    channels.push(channel);
                }
            }
        }
        ActionDecision::Allowed { channels }
    }

    /// The back-end hooks of the type rule that decides `action_type`, when it has any.
    pub fn type_hooks(&self, action_type: &str) -> Option<Arc<RuleHooks>> {
        self.type_rule(action_type)
            .map(|rule| &rule.hooks)
            .filter(|hooks| !hooks.hooks.is_empty())
            .cloned()
    }

    /// The back-end hooks of the channel rule that decides `channel`, when it has any.
    pub fn channel_hooks(&self, channel: &str) -> Option<Arc<RuleHooks>> {
        self.channels
            .iter()
            .find(|rule| rule.pattern.matches(channel, None).is_some())
            .map(|rule| &rule.hooks)
            .filter(|hooks| !hooks.hooks.is_empty())
            .cloned()
    }

    /// True when some channel rule has the `events` hook.
    pub fn has_event_hooks(&self) -> bool {
        self.channels
            .iter()
            .any(|rule| rule.hooks.has(Hook::Events))
    }

    /// The rule for `action_type`: exact, else the longest prefix, else the fallback.
    fn type_rule(&self, action_type: &str) -> Option<&TypeCheck> {
        if let Some(rule) = self.exact_types.get(action_type) {
            return Some(rule);
        }
        self.prefix_types
            .iter()
            .find(|(prefix, _)| action_type.starts_with(prefix.as_str()))
            .map(|(_, rule)| rule)
            .or(self.fallback_type.as_ref())
    }
}

/// A string equal to the user id, or a number whose JSON text equals it (`{"userId": 10}`
/// for user `"10"`).
fn field_equals_user(value: Option<&Value>, user_id: &str) -> bool {
    match value {
        Some(Value::String(text)) => text == user_id,
        Some(Value::Number(number)) => number.to_string() == user_id,
        _ => false,
    }
}

/// True when the type access rule lets `user_id` add `action`.
fn type_access_allows(access: &TypeAccess, action: &Value, user_id: Option<&str>) -> bool {
    match access {
        TypeAccess::Anyone => true,
        TypeAccess::Nobody => false,
        TypeAccess::Field(field) => match user_id {
            Some(user_id) => field_equals_user(action.get(field), user_id),
            None => false,
        },
    }
}

/// A SyncMap action's `id`: a string, or a number as its JSON text.
fn object_id(action: &Value) -> Option<String> {
    match action.get("id")? {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{ChannelRule, TypeRule};
    use proptest::prelude::*;
    use serde_json::json;

    fn rules(toml: &str) -> Rules {
        Rules::new(&Config::from_toml_str(toml).unwrap()).unwrap()
    }

    fn allowed(channels: &[&str]) -> ActionDecision {
        ActionDecision::Allowed {
            channels: channels.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    const CHANNELS: &str = r#"
[[channels]]
pattern = "users/:id"
access = "param:id"

[[channels]]
pattern = "users/:id/secret"
access = "nobody"

[[channels]]
pattern = "admin/*"
access = "nobody"

[[channels]]
pattern = "admin/public"
access = "anyone"

[[channels]]
pattern = "news"
access = "anyone"
"#;

    #[test]
    fn unmatched_channel_is_wrong_channel() {
        let r = rules(CHANNELS);
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
        let empty = rules("");
        assert_eq!(
            empty.check_subscribe("news", Some("1")),
            SubscribeDecision::WrongChannel
        );
    }

    #[test]
    fn anyone_channel_is_allowed_even_without_user() {
        let r = rules(CHANNELS);
        assert_eq!(
            r.check_subscribe("news", Some("1")),
            SubscribeDecision::Allowed
        );
        assert_eq!(r.check_subscribe("news", None), SubscribeDecision::Allowed);
    }

    #[test]
    fn param_channel_allows_only_that_user() {
        let r = rules(CHANNELS);
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
        let r = rules(CHANNELS);
        assert_eq!(
            r.check_subscribe("users/10/secret", Some("10")),
            SubscribeDecision::Denied
        );
    }

    #[test]
    fn first_matching_channel_pattern_decides() {
        let r = rules(CHANNELS);
        // "admin/*" comes before "admin/public", so the later rule is never reached.
        assert_eq!(
            r.check_subscribe("admin/public", Some("1")),
            SubscribeDecision::Denied
        );
        let reversed = rules(
            "[[channels]]\npattern = \"admin/public\"\naccess = \"anyone\"\n\
             [[channels]]\npattern = \"admin/*\"\naccess = \"nobody\"",
        );
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
        let r = rules(CHANNELS);
        assert_eq!(
            r.check_subscribe("admin/a/b/c", Some("1")),
            SubscribeDecision::Denied
        );
        let demo = Rules::new(&Config::demo()).unwrap();
        for channel in ["a", "a/b/c", "users/1", ""] {
            assert_eq!(
                demo.check_subscribe(channel, None),
                SubscribeDecision::Allowed
            );
        }
    }

    const TYPES: &str = r#"
[[types]]
type = "*"
access = "nobody"

[[types]]
type = "room/*"
access = "anyone"
resend = ["room/{room}"]

[[types]]
type = "room/private/*"
access = "field:userId"

[[types]]
type = "room/close"
access = "field:userId"
resend = ["room/{room}", "users/{userId}"]
"#;

    #[test]
    fn unknown_type_without_rule() {
        let r = rules("[[types]]\ntype = \"a\"\naccess = \"anyone\"");
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
        let r = rules(TYPES);
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
        let r = rules("[[types]]\ntype = \"t\"\naccess = \"field:userId\"");
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
            r#"
[[types]]
type = "t"
access = "anyone"
resend = ["room/{room}", "n/{n}", "b/{b}", "room/{room}", "{channel}", "gone/{missing}", "news"]
"#,
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
        let demo = Rules::new(&Config::demo()).unwrap();
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
    fn new_rejects_mismatched_access_and_duplicate_types() {
        let mut config = Config::demo();
        config.channels = vec![ChannelRule {
            pattern: "users/:id".into(),
            access: Access::Field("id".into()),
            hooks: Default::default(),
        }];
        assert!(Rules::new(&config).is_err());
        config.channels[0].access = Access::Param("user".into());
        let e = Rules::new(&config).unwrap_err().to_string();
        assert!(e.contains("users/:id") && e.contains(":user"), "{e}");
        config.channels.clear();
        config.types = vec![TypeRule {
            action_type: "t".into(),
            access: Access::Param("id".into()),
            resend: vec![],
            hooks: Default::default(),
        }];
        assert!(Rules::new(&config).is_err());
        config.types[0].access = Access::Anyone;
        config.types.push(config.types[0].clone());
        let e = Rules::new(&config).unwrap_err().to_string();
        assert!(e.contains("already defined by types[0]"), "{e}");
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
            let demo = Rules::new(&Config::demo()).unwrap();
            let config = Config::from_toml_str(&format!("{CHANNELS}{TYPES}")).unwrap();
            let full = Rules::new(&config).unwrap();
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
}
