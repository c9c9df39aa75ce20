//! The typed rules: one `[[channels]]`, `[[types]]`, `[[sync_maps]]` or `[[reducers]]` entry
//! each, parsed once from its text.
//!
//! `config` reads the file and calls these parsers; every error here explains what is wrong
//! without naming the rule, and `config` prefixes the rule's position and name. A value of
//! these types is valid by construction (a `param:NAME` access already knows which segment
//! of its pattern it compares), so [`super::Rules`] never re-checks one.

use super::hooks::RuleHooks;
use super::pattern::{ChannelPattern, Template, TypeSelector};
use super::SubscribeDecision;
use crate::crdt::ReducerKind;
use serde_json::Value;
use std::sync::Arc;

/// Who may subscribe to the channels of one pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelAccess {
    /// Every user, authenticated or not.
    Anyone,
    /// Nobody.
    Nobody,
    /// The pattern parameter `:name` must equal the user id.
    Param {
        /// The parameter's name, as written after `param:`.
        name: String,
        /// Its segment index in the pattern, where matching captures its value.
        segment: usize,
    },
}

impl ChannelAccess {
    /// Parses `anyone`, `nobody` or `param:NAME`, where `:NAME` must be a parameter of
    /// `pattern`.
    pub fn parse(text: &str, pattern: &ChannelPattern) -> Result<ChannelAccess, String> {
        match text {
            "anyone" => Ok(ChannelAccess::Anyone),
            "nobody" => Ok(ChannelAccess::Nobody),
            _ => match text.strip_prefix("param:") {
                Some("") => Err(format!(
                    "access {text:?} needs a parameter name, as in \"param:id\""
                )),
                Some(name) => match pattern.param_index(name) {
                    Some(segment) => Ok(ChannelAccess::Param {
                        name: name.to_owned(),
                        segment,
                    }),
                    None => Err(format!(
                        "access \"param:{name}\" names no \":{name}\" parameter of the pattern"
                    )),
                },
                None if text.starts_with("field:") => Err(format!(
                    "access {text:?} is only for [[types]]; channels use \"param:NAME\""
                )),
                None => Err(format!(
                    "access {text:?} must be \"anyone\", \"nobody\" or \"param:NAME\""
                )),
            },
        }
    }
}

/// Who may add actions of one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeAccess {
    /// Every user, authenticated or not.
    Anyone,
    /// Nobody.
    Nobody,
    /// This action field must equal the user id.
    Field(String),
}

impl TypeAccess {
    /// Parses `anyone`, `nobody` or `field:NAME`.
    pub fn parse(text: &str) -> Result<TypeAccess, String> {
        match text {
            "anyone" => Ok(TypeAccess::Anyone),
            "nobody" => Ok(TypeAccess::Nobody),
            _ => match text.strip_prefix("field:") {
                Some("") => Err(format!(
                    "access {text:?} needs a field name, as in \"field:userId\""
                )),
                Some(name) => Ok(TypeAccess::Field(name.to_owned())),
                None if text.starts_with("param:") => Err(format!(
                    "access {text:?} is only for [[channels]]; types use \"field:NAME\""
                )),
                None => Err(format!(
                    "access {text:?} must be \"anyone\", \"nobody\" or \"field:NAME\""
                )),
            },
        }
    }

    /// True when this rule lets `user_id` add `action`.
    pub(super) fn allows(&self, action: &Value, user_id: Option<&str>) -> bool {
        match self {
            TypeAccess::Anyone => true,
            TypeAccess::Nobody => false,
            TypeAccess::Field(field) => match user_id {
                Some(user_id) => field_equals_user(action.get(field), user_id),
                None => false,
            },
        }
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

/// One `[[channels]]` rule.
#[derive(Debug, Clone)]
pub struct ChannelRule {
    /// Which channels the rule covers.
    pattern: ChannelPattern,
    /// Who may subscribe to a matching channel.
    access: ChannelAccess,
    /// Back-end hooks (`access`, `load`, `events`), shared with the tasks that call them.
    hooks: Arc<RuleHooks>,
}

impl ChannelRule {
    /// Parses a rule's `pattern` and `access`.
    pub fn parse(pattern: &str, access: &str, hooks: RuleHooks) -> Result<ChannelRule, String> {
        let pattern = ChannelPattern::parse(pattern)?;
        let access = ChannelAccess::parse(access, &pattern)?;
        Ok(ChannelRule {
            pattern,
            access,
            hooks: Arc::new(hooks),
        })
    }

    /// `*` open to anyone, without hooks (the demo rules).
    pub(super) fn open_to_everything() -> ChannelRule {
        ChannelRule {
            pattern: ChannelPattern::everything(),
            access: ChannelAccess::Anyone,
            hooks: Arc::default(),
        }
    }

    /// Which channels the rule covers.
    pub fn pattern(&self) -> &ChannelPattern {
        &self.pattern
    }

    /// Who may subscribe to a matching channel.
    pub fn access(&self) -> &ChannelAccess {
        &self.access
    }

    /// The rule's back-end hooks.
    pub fn hooks(&self) -> &Arc<RuleHooks> {
        &self.hooks
    }

    /// `None` when `channel` does not match; otherwise whether `user_id` may subscribe.
    pub(super) fn decide(&self, channel: &str, user_id: Option<&str>) -> Option<SubscribeDecision> {
        let capture = match &self.access {
            ChannelAccess::Param { segment, .. } => Some(*segment),
            ChannelAccess::Anyone | ChannelAccess::Nobody => None,
        };
        let captured = self.pattern.matches(channel, capture)?;
        let allowed = match self.access {
            ChannelAccess::Anyone => true,
            ChannelAccess::Nobody => false,
            ChannelAccess::Param { .. } => user_id.is_some() && captured == user_id,
        };
        Some(if allowed {
            SubscribeDecision::Allowed
        } else {
            SubscribeDecision::Denied
        })
    }
}

/// One `[[types]]` rule.
#[derive(Debug, Clone)]
pub struct TypeRule {
    /// The action types it covers: exact, `prefix/*` or `*`.
    selector: TypeSelector,
    /// Who may add actions of these types.
    access: TypeAccess,
    /// Channel templates filled from the action's fields; the action is re-sent to each.
    resend: Vec<Template>,
    /// Back-end hooks (`access`, `resend`, `process`), shared with the tasks that call them.
    hooks: Arc<RuleHooks>,
}

impl TypeRule {
    /// Parses a rule's `type`, `access` and `resend` templates.
    pub fn parse(
        action_type: &str,
        access: &str,
        resend: &[String],
        hooks: RuleHooks,
    ) -> Result<TypeRule, String> {
        let access = TypeAccess::parse(access)?;
        let selector = TypeSelector::parse(action_type)?;
        let resend = resend
            .iter()
            .map(|text| Template::parse(text).map_err(|e| format!("resend template {text:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TypeRule {
            selector,
            access,
            resend,
            hooks: Arc::new(hooks),
        })
    }

    /// `*` open to anyone, re-sent to the channel named by the action's `channel` field
    /// (the demo rules).
    pub(super) fn open_to_everything() -> TypeRule {
        TypeRule {
            selector: TypeSelector::Fallback,
            access: TypeAccess::Anyone,
            resend: vec![Template::field("channel")],
            hooks: Arc::default(),
        }
    }

    /// The action types it covers.
    pub fn selector(&self) -> &TypeSelector {
        &self.selector
    }

    /// Who may add actions of these types.
    pub fn access(&self) -> &TypeAccess {
        &self.access
    }

    /// Where the actions are re-sent.
    pub fn resend(&self) -> &[Template] {
        &self.resend
    }

    /// The rule's back-end hooks.
    pub fn hooks(&self) -> &Arc<RuleHooks> {
        &self.hooks
    }
}

/// One `[[sync_maps]]` rule: a Logux SyncMap (`syncMapTemplate` on the client) served from
/// the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncMapRule {
    /// The plural name: types `<plural>/create|change|delete`, channels `<plural>/<id>` and
    /// the filter channel `<plural>`.
    plural: String,
    /// True when anyone may read and write these objects (`access = "anyone"`); false for
    /// `"nobody"`.
    anyone: bool,
}

impl SyncMapRule {
    /// Parses a rule's `plural` and `access` (`anyone` or `nobody`).
    pub fn parse(plural: &str, access: &str) -> Result<SyncMapRule, String> {
        if plural.is_empty() || plural.contains(['/', '*', ':', '{', '}', '\0']) {
            return Err("plural must be a non-empty name without / * : { }".to_owned());
        }
        let anyone = match access {
            "anyone" => true,
            "nobody" => false,
            other => return Err(format!("access {other:?} must be \"anyone\" or \"nobody\"")),
        };
        Ok(SyncMapRule {
            plural: plural.to_owned(),
            anyone,
        })
    }

    /// The plural name.
    pub fn plural(&self) -> &str {
        &self.plural
    }

    /// True when anyone may read and write these objects.
    pub fn anyone(&self) -> bool {
        self.anyone
    }
}

/// One `[[reducers]]` rule: a CRDT reducer attached to one action type.
#[derive(Debug, Clone)]
pub struct ReducerRule {
    /// The exact action type this reducer consumes.
    action_type: String,
    /// Which CRDT: counter, set, list or LWW map.
    kind: ReducerKind,
    /// Template of the object key, which is also the channel the action is re-sent to and
    /// that clients subscribe to (`"counter/{id}"`).
    object: Template,
    /// Counter only: the field holding the delta (default `"delta"`).
    field: Option<String>,
    /// Who may add actions of this type.
    access: TypeAccess,
}

/// The text of a `[[reducers]]` entry, as [`ReducerRule::parse`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct ReducerText<'a> {
    /// `type`.
    pub action_type: &'a str,
    /// `kind`: `counter`, `set`, `list` or `lww-map`.
    pub kind: &'a str,
    /// `object`: the key template.
    pub object: &'a str,
    /// `field`: the counter's delta field.
    pub field: Option<&'a str>,
    /// `access`.
    pub access: &'a str,
}

impl ReducerRule {
    /// Parses one `[[reducers]]` entry.
    pub fn parse(text: ReducerText<'_>) -> Result<ReducerRule, String> {
        let kind = ReducerKind::from_name(text.kind).ok_or_else(|| {
            format!(
                "kind {:?} must be \"counter\", \"set\", \"list\" or \"lww-map\"",
                text.kind
            )
        })?;
        if text.action_type.is_empty() || text.action_type.contains('*') {
            return Err("type must be one exact action type".to_owned());
        }
        if text.field.is_some() && kind != ReducerKind::Counter {
            return Err("field is only for counters".to_owned());
        }
        let access = TypeAccess::parse(text.access)?;
        let object =
            Template::parse(text.object).map_err(|e| format!("object {:?}: {e}", text.object))?;
        Ok(ReducerRule {
            action_type: text.action_type.to_owned(),
            kind,
            object,
            field: text.field.map(str::to_owned),
            access,
        })
    }

    /// The exact action type this reducer consumes.
    pub fn action_type(&self) -> &str {
        &self.action_type
    }

    /// Which CRDT holds the objects' state.
    pub fn kind(&self) -> ReducerKind {
        self.kind
    }

    /// The object key template.
    pub fn object(&self) -> &Template {
        &self.object
    }

    /// Counter only: the delta field, when not the default.
    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    /// Who may add actions of this type.
    pub fn access(&self) -> &TypeAccess {
        &self.access
    }
}
