//! `[auth]`: how clients authenticate. The checked value, [`AuthConfig`], belongs to
//! `rules::auth`, which uses it; this file reads and checks it.

use super::{invalid, ConfigError};
use crate::rules::auth::{AuthConfig, SERVER_USER_ID};
use serde::Deserialize;
use std::collections::HashMap;

/// `[auth]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    tokens: HashMap<String, String>,
    any_user_token: Option<String>,
    jwt_hs256_secret: Option<String>,
}

impl RawAuth {
    /// Refuses the reserved user id, empty user ids and empty secrets.
    pub(super) fn into_auth(self) -> Result<AuthConfig, ConfigError> {
        let mut users: Vec<&String> = self.tokens.keys().collect();
        users.sort();
        for user in users {
            if user.as_str() == SERVER_USER_ID {
                return Err(invalid(
                    "auth.tokens: the user id \"server\" is reserved and can never authenticate",
                ));
            }
            if user.is_empty() {
                return Err(invalid("auth.tokens: a user id must not be empty"));
            }
            if self.tokens.get(user).is_some_and(|t| t.is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "auth.tokens: the token of user {user:?} must not be empty"
                )));
            }
        }
        if self.any_user_token.as_deref() == Some("") {
            return Err(invalid("auth.any_user_token: must not be empty"));
        }
        if self.jwt_hs256_secret.as_deref() == Some("") {
            return Err(invalid("auth.jwt_hs256_secret: must not be empty"));
        }
        Ok(AuthConfig {
            tokens: self.tokens,
            any_user_token: self.any_user_token,
            jwt_hs256_secret: self.jwt_hs256_secret,
            allow_anyone: false,
        })
    }
}
