//! The back-end hooks a rule can delegate to `[backend] url`.
//!
//! They live here, next to the rules that carry them, so that `rules` needs nothing from
//! `config`; `config` re-exports them for the server and back-end code.

/// A back-end hook a rule can delegate to `[backend] url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Authentication of a `connect` (`[backend] auth = true`).
    Auth,
    /// May this user add this action / subscribe to this channel?
    Access,
    /// Where is this action re-sent?
    Resend,
    /// Actions sent to a new subscriber (not stored).
    Load,
    /// Durable, retried processing of a stored action.
    Process,
    /// Stored actions of a channel, delivered at least once in order.
    Events,
}

impl Hook {
    /// Every hook, in the order the documentation lists them.
    const ALL: [Hook; 6] = [
        Hook::Auth,
        Hook::Access,
        Hook::Resend,
        Hook::Load,
        Hook::Process,
        Hook::Events,
    ];

    /// The hook's name: the last path segment of its URL and the `Ferry-Hook` header.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Auth => "auth",
            Hook::Access => "access",
            Hook::Resend => "resend",
            Hook::Load => "load",
            Hook::Process => "process",
            Hook::Events => "events",
        }
    }

    /// The hook called `name`, as written in a rule's `hooks` list.
    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|hook| hook.name() == name)
    }
}

/// The back-end hooks of one `[[types]]` or `[[channels]]` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleHooks {
    /// The hooks this rule delegates.
    pub hooks: Vec<Hook>,
    /// Connection headers (lowercase names) sent with these hooks.
    pub headers: Vec<String>,
    /// Connection cookies sent with these hooks.
    pub cookies: Vec<String>,
}

impl RuleHooks {
    /// True when this rule delegates `hook`.
    pub fn has(&self, hook: Hook) -> bool {
        self.hooks.contains(&hook)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_is_found_by_its_name() {
        for hook in Hook::ALL {
            assert_eq!(Hook::from_name(hook.name()), Some(hook));
        }
        assert_eq!(Hook::from_name("Access"), None);
    }
}
