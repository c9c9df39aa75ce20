//! Compiled channel patterns, action type selectors and resend templates.
//!
//! Everything is parsed once when the rules are built, so matching is a walk over a few
//! pre-split segments with no allocation (templates allocate only the filled channel).

use serde_json::Value;
use std::fmt::{self, Write as _};

/// One `/`-separated piece of a channel pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Must equal the channel's segment.
    Literal(String),
    /// Matches any non-empty segment (no `/`) and captures it under this name.
    Param(String),
    /// The final `*`: matches the rest of the channel, `/` included (possibly empty).
    Tail,
}

/// A compiled `[[channels]]` pattern such as `users/:id` or `files/*`.
#[derive(Debug, Clone)]
pub struct ChannelPattern {
    /// The pattern as written, for messages and the configuration's `Debug` output.
    text: String,
    /// The compiled segments, matched in order.
    segments: Vec<Segment>,
}

impl ChannelPattern {
    /// `*`: every channel (the demo rules).
    pub fn everything() -> ChannelPattern {
        ChannelPattern {
            text: "*".to_owned(),
            segments: vec![Segment::Tail],
        }
    }

    /// Compiles a pattern; the error explains what is wrong without naming the rule.
    pub fn parse(pattern: &str) -> Result<ChannelPattern, String> {
        if pattern.is_empty() {
            return Err("the pattern must not be empty".to_owned());
        }
        let parts: Vec<&str> = pattern.split('/').collect();
        let last = parts.len() - 1;
        let mut segments = Vec::with_capacity(parts.len());
        for (index, part) in parts.into_iter().enumerate() {
            let segment = if part == "*" {
                if index != last {
                    return Err("\"*\" is only allowed as the last segment".to_owned());
                }
                Segment::Tail
            } else if let Some(name) = part.strip_prefix(':') {
                if !is_param_name(name) {
                    return Err(format!(
                        "parameter {part:?} needs a name of letters, digits, '_' or '-'"
                    ));
                }
                if segments.contains(&Segment::Param(name.to_owned())) {
                    return Err(format!("parameter \":{name}\" appears twice"));
                }
                Segment::Param(name.to_owned())
            } else if part.is_empty() {
                return Err("empty segment (a leading, trailing or doubled '/')".to_owned());
            } else if part.contains('*') {
                return Err(format!(
                    "segment {part:?}: '*' must be a whole final segment, as in \"files/*\""
                ));
            } else {
                Segment::Literal(part.to_owned())
            };
            segments.push(segment);
        }
        Ok(ChannelPattern {
            text: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The position of the `:name` parameter, used to find its value when matching.
    pub fn param_index(&self, name: &str) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| matches!(s, Segment::Param(p) if p == name))
    }

    /// `None` if `channel` does not match; otherwise the value of the parameter at
    /// `capture` (a [`Self::param_index`] result), if one was asked for.
    pub(super) fn matches<'a>(
        &self,
        channel: &'a str,
        capture: Option<usize>,
    ) -> Option<Option<&'a str>> {
        let mut captured = None;
        let mut rest = channel;
        let count = self.segments.len();
        for (index, segment) in self.segments.iter().enumerate() {
            let (part, after) = match segment {
                Segment::Tail => return Some(captured),
                _ => match rest.split_once('/') {
                    Some((part, after)) => (part, Some(after)),
                    None => (rest, None),
                },
            };
            match segment {
                Segment::Literal(literal) if literal != part => return None,
                Segment::Param(_) if part.is_empty() => return None,
                Segment::Param(_) if capture == Some(index) => captured = Some(part),
                _ => {}
            }
            match after {
                // The channel is used up: only a match if the pattern is too.
                None => return (index + 1 == count).then_some(captured),
                Some(after) => rest = after,
            }
        }
        // The pattern is used up but the channel has more segments.
        None
    }
}

/// Parameter names are identifiers, so `param:NAME` is unambiguous.
fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// What a `[[types]]` `type` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeSelector {
    /// Exactly this type.
    Exact(String),
    /// Every type starting with this prefix (written `prefix*`, the prefix ending in `/`).
    Prefix(String),
    /// Every type no other rule selects (written `*`).
    Fallback,
}

impl TypeSelector {
    /// Classifies a `type` value; the error explains what is wrong.
    pub fn parse(action_type: &str) -> Result<TypeSelector, String> {
        if action_type.is_empty() {
            return Err("the type must not be empty".to_owned());
        }
        if action_type == "*" {
            return Ok(TypeSelector::Fallback);
        }
        if let Some(prefix) = action_type.strip_suffix('*') {
            if prefix.ends_with('/') && !prefix.contains('*') {
                return Ok(TypeSelector::Prefix(prefix.to_owned()));
            }
        }
        if action_type.contains('*') {
            return Err(
                "'*' is only allowed as the whole type (\"*\") or after a final '/' (\"room/*\")"
                    .to_owned(),
            );
        }
        Ok(TypeSelector::Exact(action_type.to_owned()))
    }
}

/// The `type` as written.
impl fmt::Display for TypeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypeSelector::Exact(action_type) => f.write_str(action_type),
            TypeSelector::Prefix(prefix) => write!(f, "{prefix}*"),
            TypeSelector::Fallback => f.write_str("*"),
        }
    }
}

/// One piece of a resend template.
#[derive(Debug, Clone)]
enum Piece {
    /// Copied as is.
    Literal(String),
    /// Replaced by the action's field of this name.
    Field(String),
}

/// A compiled resend template such as `room/{room}`.
#[derive(Debug, Clone)]
pub struct Template {
    /// The template as written, for messages and the configuration's `Debug` output.
    text: String,
    /// The compiled pieces, filled in order.
    pieces: Vec<Piece>,
}

impl Template {
    /// `{name}`: the value of one action field (the demo rules use `{channel}`).
    pub fn field(name: &str) -> Template {
        Template {
            text: format!("{{{name}}}"),
            pieces: vec![Piece::Field(name.to_owned())],
        }
    }

    /// Compiles a template; the error explains what is wrong without naming the rule.
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.is_empty() {
            return Err("a resend template must not be empty".to_owned());
        }
        if text.contains('\0') {
            return Err("a resend template must not contain NUL".to_owned());
        }
        let mut pieces = Vec::new();
        let mut rest = text;
        loop {
            let Some(open) = rest.find(['{', '}']) else {
                if !rest.is_empty() {
                    pieces.push(Piece::Literal(rest.to_owned()));
                }
                break;
            };
            if rest[open..].starts_with('}') {
                return Err("'}' without a matching '{'".to_owned());
            }
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            match after.find(['{', '}']) {
                Some(close) if after[close..].starts_with('}') => {
                    let name = &after[..close];
                    if name.is_empty() {
                        return Err("\"{}\" needs a field name, as in \"{room}\"".to_owned());
                    }
                    pieces.push(Piece::Field(name.to_owned()));
                    rest = &after[close + 1..];
                }
                _ => return Err("'{' without a matching '}'".to_owned()),
            }
        }
        Ok(Template {
            text: text.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The channel for `action`, or `None` when a field is missing, null, an object or an
    /// array, or the result is empty or contains NUL.
    pub(super) fn fill(&self, action: &Value) -> Option<String> {
        let mut channel = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => channel.push_str(text),
                Piece::Field(name) => match action.get(name)? {
                    Value::String(text) => channel.push_str(text),
                    Value::Number(number) => write!(channel, "{number}").ok()?,
                    Value::Bool(flag) => write!(channel, "{flag}").ok()?,
                    Value::Null | Value::Array(_) | Value::Object(_) => return None,
                },
            }
        }
        (!channel.is_empty() && !channel.contains('\0')).then_some(channel)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn matches(pattern: &str, channel: &str) -> bool {
        ChannelPattern::parse(pattern)
            .unwrap()
            .matches(channel, None)
            .is_some()
    }

    #[test]
    fn literal_and_param_segments_match_whole_segments() {
        assert!(matches("users", "users"));
        assert!(!matches("users", "users/1"));
        assert!(!matches("users", "user"));
        assert!(matches("users/:id", "users/1"));
        assert!(!matches("users/:id", "users/"));
        assert!(!matches("users/:id", "users"));
        assert!(!matches("users/:id", "users/1/2"));
        assert!(matches("a/:x/b/:y", "a/1/b/2"));
        assert!(!matches("a/:x/b/:y", "a/1/c/2"));
    }

    #[test]
    fn param_value_is_captured() {
        let p = ChannelPattern::parse("rooms/:room/users/:id").unwrap();
        let id = p.param_index("id");
        assert_eq!(id, Some(3));
        assert_eq!(p.param_index("nope"), None);
        assert_eq!(p.matches("rooms/r/users/10", id), Some(Some("10")));
        assert_eq!(p.matches("rooms/r/users/10", None), Some(None));
    }

    #[test]
    fn star_tail_matches_the_rest_including_slashes() {
        assert!(matches("*", "anything/at/all"));
        assert!(matches("*", ""));
        assert!(matches("files/*", "files/a/b/c"));
        assert!(matches("files/*", "files/"));
        assert!(!matches("files/*", "files"));
        assert!(!matches("files/*", "filesx/a"));
        assert!(matches("users/:id/*", "users/1/a/b"));
    }

    #[test]
    fn invalid_patterns_are_rejected() {
        for bad in [
            "", "a/*/b", "a*", "a/b*c", "a//b", "/a", "a/", ":", "a/:", "a/:x/:x", "a/:x y",
        ] {
            assert!(ChannelPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn type_selectors_are_classified() {
        assert_eq!(TypeSelector::parse("*"), Ok(TypeSelector::Fallback));
        assert_eq!(
            TypeSelector::parse("room/*"),
            Ok(TypeSelector::Prefix("room/".into()))
        );
        assert_eq!(
            TypeSelector::parse("room/add"),
            Ok(TypeSelector::Exact("room/add".into()))
        );
        for bad in ["", "room*", "ro*m/x", "*/*", "a/*/*"] {
            assert!(TypeSelector::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn templates_fill_strings_numbers_and_bools() {
        let t = Template::parse("room/{room}/{n}/{flag}").unwrap();
        let action = json!({ "room": "r1", "n": 5, "flag": true });
        assert_eq!(t.fill(&action).as_deref(), Some("room/r1/5/true"));
        let constant = Template::parse("news").unwrap();
        assert_eq!(constant.fill(&json!({})).as_deref(), Some("news"));
    }

    #[test]
    fn templates_skip_missing_null_object_array_empty_and_nul() {
        let t = Template::parse("room/{room}").unwrap();
        for action in [
            json!({}),
            json!({ "room": null }),
            json!({ "room": {} }),
            json!({ "room": [] }),
            json!({ "room": "a\u{0}b" }),
            json!("not an object"),
        ] {
            assert_eq!(t.fill(&action), None, "{action}");
        }
        let bare = Template::parse("{room}").unwrap();
        assert_eq!(bare.fill(&json!({ "room": "" })), None);
    }

    #[test]
    fn built_in_values_equal_their_written_form() {
        let everything = ChannelPattern::everything();
        let written = ChannelPattern::parse("*").unwrap();
        assert_eq!(everything.as_str(), written.as_str());
        for channel in ["", "a", "a/b/c"] {
            assert_eq!(
                everything.matches(channel, None),
                written.matches(channel, None)
            );
        }
        let field = Template::field("channel");
        assert_eq!(field.as_str(), "{channel}");
        let action = json!({ "channel": "chat/1" });
        assert_eq!(
            field.fill(&action),
            Template::parse("{channel}").unwrap().fill(&action)
        );
    }

    #[test]
    fn type_selectors_display_as_written() {
        for text in ["*", "room/*", "room/add"] {
            assert_eq!(TypeSelector::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn invalid_templates_are_rejected() {
        for bad in ["", "{", "}", "a{b", "a}b", "{}", "{a{b}}", "x\0"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }
}
