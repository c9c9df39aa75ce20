//! `[[channels]]`, `[[types]]`, `[[sync_maps]]` and `[[reducers]]`: each entry is parsed once
//! into the typed rules of `crate::rules` and added to one [`Rules`]. The parsers there
//! explain what is wrong; this file prefixes which entry it is (`types[2] (type "a/b")`).

use super::{lowercase, ConfigError};
use crate::rules::{
    ChannelRule, Hook, ReducerRule, ReducerText, RuleHooks, Rules, SyncMapRule, TypeRule,
};
use serde::Deserialize;

/// The hooks a `[[channels]]` rule may delegate.
const CHANNEL_HOOKS: [Hook; 3] = [Hook::Access, Hook::Load, Hook::Events];
/// The hooks a `[[types]]` rule may delegate.
const TYPE_HOOKS: [Hook; 3] = [Hook::Access, Hook::Resend, Hook::Process];

/// One `[[channels]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChannel {
    pattern: String,
    access: String,
    #[serde(default)]
    hooks: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    cookies: Vec<String>,
}

/// One `[[types]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawType {
    #[serde(rename = "type")]
    action_type: String,
    access: String,
    #[serde(default)]
    resend: Vec<String>,
    #[serde(default)]
    hooks: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    cookies: Vec<String>,
}

/// One `[[sync_maps]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyncMap {
    plural: String,
    access: String,
}

/// One `[[reducers]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReducer {
    #[serde(rename = "type")]
    action_type: String,
    kind: String,
    object: String,
    field: Option<String>,
    access: String,
}

/// The four rule sections of one file, in definition order.
pub(super) struct RawRules {
    /// `[[channels]]`.
    pub(super) channels: Vec<RawChannel>,
    /// `[[types]]`.
    pub(super) types: Vec<RawType>,
    /// `[[sync_maps]]`.
    pub(super) sync_maps: Vec<RawSyncMap>,
    /// `[[reducers]]`.
    pub(super) reducers: Vec<RawReducer>,
}

impl RawRules {
    /// Parses every rule and adds it to the [`Rules`]; `backend` says whether `[backend]` is
    /// configured, which rules with hooks need.
    pub(super) fn into_rules(self, backend: bool) -> Result<Rules, ConfigError> {
        let mut rules = Rules::default();
        for (index, raw) in self.channels.into_iter().enumerate() {
            let name = format!("channels[{index}] (pattern {:?})", raw.pattern);
            let hooks = parse_hooks(&name, raw.hooks, &CHANNEL_HOOKS, backend)?;
            let hooks = with_context(hooks, raw.headers, raw.cookies);
            let rule = ChannelRule::parse(&raw.pattern, &raw.access, hooks);
            rules.add_channel(rule.map_err(named(&name))?);
        }
        for (index, raw) in self.types.into_iter().enumerate() {
            let name = format!("types[{index}] (type {:?})", raw.action_type);
            let hooks = parse_hooks(&name, raw.hooks, &TYPE_HOOKS, backend)?;
            let hooks = with_context(hooks, raw.headers, raw.cookies);
            let rule = TypeRule::parse(&raw.action_type, &raw.access, &raw.resend, hooks);
            rules
                .add_type(rule.map_err(named(&name))?)
                .map_err(|first| {
                    ConfigError::Invalid(format!(
                        "{name}: the type is already defined by types[{first}]"
                    ))
                })?;
        }
        for (index, raw) in self.sync_maps.into_iter().enumerate() {
            let name = format!("sync_maps[{index}] (plural {:?})", raw.plural);
            let rule = SyncMapRule::parse(&raw.plural, &raw.access);
            rules.add_sync_map(rule.map_err(named(&name))?);
        }
        for (index, raw) in self.reducers.into_iter().enumerate() {
            let name = format!("reducers[{index}] (type {:?})", raw.action_type);
            let rule = ReducerRule::parse(ReducerText {
                action_type: &raw.action_type,
                kind: &raw.kind,
                object: &raw.object,
                field: raw.field.as_deref(),
                access: &raw.access,
            });
            rules
                .add_reducer(rule.map_err(named(&name))?)
                .map_err(|_| ConfigError::Invalid(format!("{name}: the type has two reducers")))?;
        }
        Ok(rules)
    }
}

/// Turns a parser's explanation into an error naming the rule.
fn named(rule: &str) -> impl Fn(String) -> ConfigError + '_ {
    move |explanation| ConfigError::Invalid(format!("{rule}: {explanation}"))
}

/// Parses a rule's `hooks` list, allowing only the hooks in `allowed`, and only when a
/// `[backend]` receives them.
fn parse_hooks(
    rule: &str,
    names: Vec<String>,
    allowed: &[Hook],
    backend: bool,
) -> Result<Vec<Hook>, ConfigError> {
    let mut hooks = Vec::with_capacity(names.len());
    for name in names {
        match Hook::from_name(&name).filter(|hook| allowed.contains(hook)) {
            Some(hook) if !hooks.contains(&hook) => hooks.push(hook),
            Some(_) => {
                return Err(ConfigError::Invalid(format!(
                    "{rule}: hook {name:?} is listed twice"
                )))
            }
            None => {
                let allowed: Vec<&str> = allowed.iter().map(|hook| hook.name()).collect();
                return Err(ConfigError::Invalid(format!(
                    "{rule}: hook {name:?} must be one of {allowed:?}"
                )));
            }
        }
    }
    if !hooks.is_empty() && !backend {
        return Err(ConfigError::Invalid(format!(
            "{rule}: hooks need a [backend] section with url and secret"
        )));
    }
    Ok(hooks)
}

/// A rule's hooks with the connection headers (names lowercased, as HTTP compares them) and
/// cookies sent along.
fn with_context(hooks: Vec<Hook>, headers: Vec<String>, cookies: Vec<String>) -> RuleHooks {
    RuleHooks {
        hooks,
        headers: lowercase(headers),
        cookies,
    }
}
