//! Declarative rules from the configuration file.
//!
//! Pure decisions (no IO): who may subscribe to which channel, which action types are known,
//! who may add them, and where they are re-sent.
//!
//! Channel patterns are tried in definition order and the first match decides. Type rules
//! are looked up by exact type first (a `HashMap`), then by the longest matching `prefix/*`,
//! then the `*` fallback.
//!
//! This module knows nothing about the configuration file: `config` parses each rule once
//! into the typed values of `rule.rs` and adds them to a [`Rules`]; the server gets that
//! value from the loaded `Config`.

pub mod auth;
mod bruteforce;
mod hooks;
mod pattern;
mod rule;
#[cfg(test)]
mod tests;

pub use hooks::{Hook, RuleHooks};
pub use pattern::{ChannelPattern, Template, TypeSelector};
pub use rule::{
    ChannelAccess, ChannelRule, ReducerRule, ReducerText, SyncMapRule, TypeAccess, TypeRule,
};

use crate::crdt::ReducerKind;
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

/// The channel and type rules of a configuration, indexed for lookup.
///
/// Built by adding typed rules in definition order ([`Rules::add_channel`] and friends);
/// the only errors left at that point are duplicates, which need the earlier rules to see.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// In definition order; the first match decides.
    channels: Vec<ChannelRule>,
    /// In definition order; the three lookups below index into it.
    types: Vec<TypeRule>,
    /// The rule of one exact type.
    exact_types: HashMap<String, usize>,
    /// `prefix/*` rules, longest prefix first (definition order among equal lengths).
    prefix_types: Vec<(String, usize)>,
    /// The `*` rule.
    fallback_type: Option<usize>,
    /// SyncMaps by plural (a later rule for the same plural replaces an earlier one).
    sync_maps: HashMap<String, SyncMapRule>,
    /// In definition order.
    reducers: Vec<ReducerRule>,
    /// The reducer of each exact action type.
    reducer_types: HashMap<String, usize>,
}

impl Rules {
    /// The embedded demo rules: every channel may be subscribed by anyone, every action type
    /// is accepted from anyone, and an action with a `channel` field is re-sent there.
    pub fn demo() -> Rules {
        Rules {
            channels: vec![ChannelRule::open_to_everything()],
            types: vec![TypeRule::open_to_everything()],
            // The one type rule, at index 0, is the `*` fallback.
            fallback_type: Some(0),
            ..Rules::default()
        }
    }

    /// Adds a channel rule after the ones added before it.
    pub fn add_channel(&mut self, rule: ChannelRule) {
        self.channels.push(rule);
    }

    /// Adds a type rule; `Err` holds the index of the earlier rule with the same `type`.
    pub fn add_type(&mut self, rule: TypeRule) -> Result<(), usize> {
        let index = self.types.len();
        match rule.selector() {
            TypeSelector::Exact(action_type) => {
                if let Some(&first) = self.exact_types.get(action_type) {
                    return Err(first);
                }
                self.exact_types.insert(action_type.clone(), index);
            }
            TypeSelector::Prefix(prefix) => {
                if let Some(&(_, first)) = self.prefix_types.iter().find(|(p, _)| p == prefix) {
                    return Err(first);
                }
                // Longest first, so "room/private/*" wins over "room/*"; equal lengths keep
                // definition order (and cannot overlap, since duplicates are refused).
                let at = self
                    .prefix_types
                    .partition_point(|(p, _)| p.len() >= prefix.len());
                self.prefix_types.insert(at, (prefix.clone(), index));
            }
            TypeSelector::Fallback => {
                if let Some(first) = self.fallback_type {
                    return Err(first);
                }
                self.fallback_type = Some(index);
            }
        }
        self.types.push(rule);
        Ok(())
    }

    /// Adds a SyncMap.
    pub fn add_sync_map(&mut self, rule: SyncMapRule) {
        self.sync_maps.insert(rule.plural().to_owned(), rule);
    }

    /// Adds a reducer; `Err` holds the index of the earlier reducer of the same type.
    pub fn add_reducer(&mut self, rule: ReducerRule) -> Result<(), usize> {
        let index = self.reducers.len();
        if let Some(&first) = self.reducer_types.get(rule.action_type()) {
            return Err(first);
        }
        self.reducer_types
            .insert(rule.action_type().to_owned(), index);
        self.reducers.push(rule);
        Ok(())
    }

    /// The channel rules, in definition order.
    pub fn channels(&self) -> &[ChannelRule] {
        &self.channels
    }

    /// The type rules, in definition order.
    pub fn types(&self) -> &[TypeRule] {
        &self.types
    }

    /// The reducers, in definition order.
    pub fn reducers(&self) -> &[ReducerRule] {
        &self.reducers
    }

    /// True when `plural` is a SyncMap that anyone may use; `None` when it is no SyncMap.
    fn sync_map_open(&self, plural: &str) -> Option<bool> {
        self.sync_maps.get(plural).map(SyncMapRule::anyone)
    }

    /// The reducer of exactly `action_type`.
    fn reducer(&self, action_type: &str) -> Option<&ReducerRule> {
        let index = *self.reducer_types.get(action_type)?;
        self.reducers.get(index)
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
        if let Some(rule) = self.reducer(action_type) {
            return Some(ObjectRef {
                key: rule.object().fill(action)?,
                kind: rule.kind(),
                field: rule.field().map(str::to_owned),
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
        if let Some(rule) = self.reducer(action_type) {
            if !rule.access().allows(action, user_id) {
                return Some(ActionDecision::Denied);
            }
            let valid = match rule.kind() {
                ReducerKind::Counter => {
                    let field = rule.field().unwrap_or(crate::crdt::DEFAULT_DELTA_FIELD);
                    crate::crdt::CounterOp::parse(action, field).is_ok()
                }
                ReducerKind::Set => crate::crdt::SetOp::parse(action).is_ok(),
                ReducerKind::List => crate::crdt::ListOp::parse(action).is_ok(),
                ReducerKind::LwwMap => crate::crdt::LwwOp::parse(action).is_ok(),
            };
            return Some(match (valid, rule.object().fill(action)) {
                (true, Some(object)) => ActionDecision::Allowed {
                    channels: vec![object],
                },
                _ => ActionDecision::Denied,
            });
        }
        let (plural, suffix) = action_type.rsplit_once('/')?;
        let anyone = self.sync_map_open(plural)?;
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
            return if self.sync_map_open(plural).unwrap_or(false) {
                SubscribeDecision::Allowed
            } else {
                SubscribeDecision::Denied
            };
        }
        self.channels
            .iter()
            .find_map(|rule| rule.decide(channel, user_id))
            .unwrap_or(SubscribeDecision::WrongChannel)
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
        if !rule.access().allows(action, user_id) {
            return ActionDecision::Denied;
        }
        let mut channels: Vec<String> = Vec::with_capacity(rule.resend().len());
        for template in rule.resend() {
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
            .map(TypeRule::hooks)
            .filter(|hooks| !hooks.hooks.is_empty())
            .cloned()
    }

    /// The back-end hooks of the channel rule that decides `channel`, when it has any.
    pub fn channel_hooks(&self, channel: &str) -> Option<Arc<RuleHooks>> {
        self.channels
            .iter()
            .find(|rule| rule.pattern().matches(channel, None).is_some())
            .map(ChannelRule::hooks)
            .filter(|hooks| !hooks.hooks.is_empty())
            .cloned()
    }

    /// True when some channel rule has the `events` hook.
    pub fn has_event_hooks(&self) -> bool {
        self.channels
            .iter()
            .any(|rule| rule.hooks().has(Hook::Events))
    }

    /// The rule for `action_type`: exact, else the longest prefix, else the fallback.
    fn type_rule(&self, action_type: &str) -> Option<&TypeRule> {
        let index = self.exact_types.get(action_type).copied().or_else(|| {
            self.prefix_types
                .iter()
                .find(|(prefix, _)| action_type.starts_with(prefix.as_str()))
                .map(|&(_, index)| index)
                .or(self.fallback_type)
        })?;
        self.types.get(index)
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
