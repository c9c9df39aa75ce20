//! Authentication: static tokens, a shared token and HS256 JWTs. The brute-force guard is in
//! `bruteforce.rs` (re-exported here).
//!
//! Tokens are never logged. Configured tokens are kept only as SHA-256 digests and compared
//! in constant time, so neither the timing nor the length of a guess reveals anything.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;

/// Longest token checked as a JWT: real ones are a few hundred bytes, and refusing huge
/// ones early keeps a hostile `connect` from making the server decode and hash megabytes.
pub const JWT_BYTES_MAX: usize = 16 * 1024;
pub use super::bruteforce::{
    BruteForceGuard, BRUTEFORCE_ADDRESSES_MAX, BRUTEFORCE_DELAY_MS_BASE, BRUTEFORCE_DELAY_MS_MAX,
    BRUTEFORCE_FAILURES_FREE, BRUTEFORCE_FAILURE_WINDOW_MS,
};

type HmacSha256 = Hmac<Sha256>;

/// The user id of the server's own node, which no client may authenticate as (Logux rule).
pub const SERVER_USER_ID: &str = "server";

/// The `[auth]` section: what [`Authenticator`] accepts. Holds secrets, so its `Debug`
/// output masks them as `"***"`. `config` reads and checks it (and re-exports it).
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// A static token per user id, for small deployments and tests.
    pub tokens: HashMap<String, String>,
    /// One token accepted for every user id, for trusted environments (demo, internal tools).
    pub any_user_token: Option<String>,
    /// The shared secret of HS256 JWTs issued by the application's own backend.
    pub jwt_hs256_secret: Option<String>,
    /// Accept every user with any token or none: only the built-in demo rules set this; it
    /// cannot be written in a configuration file.
    pub allow_anyone: bool,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&String> = self.tokens.keys().collect();
        users.sort();
        let tokens: Vec<(&String, &str)> = users.into_iter().map(|u| (u, "***")).collect();
        f.debug_struct("AuthConfig")
            .field("tokens", &tokens)
            .field(
                "any_user_token",
                &self.any_user_token.as_ref().map(|_| "***"),
            )
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// Checks credentials from `connect`. Holds secrets, so its `Debug` output masks them.
#[derive(Clone)]
pub struct Authenticator {
    /// SHA-256 of each user's static token.
    tokens: HashMap<String, [u8; 32]>,
    /// SHA-256 of the token accepted for every user.
    any_user_token: Option<[u8; 32]>,
    /// The HS256 key.
    jwt_secret: Option<Vec<u8>>,
    /// Demo mode: every user is accepted.
    allow_anyone: bool,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut users: Vec<&String> = self.tokens.keys().collect();
        users.sort();
        let tokens: Vec<(&String, &str)> = users.into_iter().map(|u| (u, "***")).collect();
        f.debug_struct("Authenticator")
            .field("tokens", &tokens)
            .field("any_user_token", &self.any_user_token.map(|_| "***"))
            .field("jwt_hs256_secret", &self.jwt_secret.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Authenticator {
    /// Builds an authenticator from the `[auth]` section.
    pub fn new(config: &AuthConfig) -> Authenticator {
        Authenticator {
            tokens: config
                .tokens
                .iter()
                .filter(|(_, token)| !token.is_empty())
                .map(|(user, token)| (user.clone(), digest(token)))
                .collect(),
            any_user_token: config
                .any_user_token
                .as_deref()
                .filter(|token| !token.is_empty())
                .map(digest),
            jwt_secret: config
                .jwt_hs256_secret
                .as_deref()
                .filter(|secret| !secret.is_empty())
                .map(|secret| secret.as_bytes().to_vec()),
            allow_anyone: config.allow_anyone,
        }
    }

    /// True when `token` proves `user_id` at `now_ms` (ms since the epoch).
    ///
    /// Accepted: the user's static token, the shared `any_user_token` (the only way in
    /// without a user id), or an HS256 JWT whose `sub` is the user id. The user id
    /// `"server"` never authenticates.
    pub fn check(&self, user_id: Option<&str>, token: Option<&str>, now_ms: i64) -> bool {
        if self.allow_anyone {
            return user_id != Some(SERVER_USER_ID);
        }
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return false;
        };
        if user_id == Some(SERVER_USER_ID) {
            return false;
        }
        let guess = digest(token);
        let mut ok = self
            .any_user_token
            .is_some_and(|expected| constant_time_eq(&expected, &guess));
        if let Some(user_id) = user_id {
            if let Some(expected) = self.tokens.get(user_id) {
                ok |= constant_time_eq(expected, &guess);
            }
            if !ok {
                if let Some(secret) = &self.jwt_secret {
                    ok = jwt_proves(secret, token, user_id, now_ms);
                }
            }
        }
        ok
    }
}

/// SHA-256, so tokens of any length compare in the same time.
fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// Compares without stopping at the first difference.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// True for a compact HS256 JWT signed with `secret`, whose `sub` is `user_id`, that is
/// not expired (`exp`) and already valid (`nbf`) at `now_ms`.
fn jwt_proves(secret: &[u8], token: &str, user_id: &str, now_ms: i64) -> bool {
    if token.len() > JWT_BYTES_MAX {
        return false;
    }
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return false;
    };
    let Some((header, payload)) = signed.split_once('.') else {
        return false;
    };
    if payload.contains('.') {
        return false;
    }
    let Some(header) = decode_json(header) else {
        return false;
    };
    // Only HS256: "none" and every other algorithm are refused, whatever the header says.
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return false;
    }
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
        return false;
    };
    mac.update(signed.as_bytes());
    if mac.verify_slice(&signature).is_err() {
        return false;
    }
    let Some(claims) = decode_json(payload) else {
        return false;
    };
    if claims.get("sub").and_then(Value::as_str) != Some(user_id) {
        return false;
    }
    // JWT times are seconds since the epoch; fractional values are allowed by RFC 7519.
    let now_s = now_ms as f64 / 1000.0;
    if let Some(exp) = claims.get("exp") {
        if !exp.as_f64().is_some_and(|exp| exp > now_s) {
            return false;
        }
    }
    if let Some(nbf) = claims.get("nbf") {
        if !nbf.as_f64().is_some_and(|nbf| nbf <= now_s) {
            return false;
        }
    }
    true
}

/// A base64url (no padding) JSON object.
fn decode_json(part: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW_MS: i64 = 1_700_000_000_000;
    const SECRET: &str = "change-me";

    fn config() -> AuthConfig {
        AuthConfig {
            tokens: HashMap::from([("10".to_owned(), "good-10".to_owned())]),
            any_user_token: Some("shared-secret".to_owned()),
            jwt_hs256_secret: Some(SECRET.to_owned()),
            allow_anyone: false,
        }
    }

    fn b64(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    fn sign(secret: &str, header: &Value, claims: &Value) -> String {
        let signed = format!("{}.{}", b64(header), b64(claims));
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(signed.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    fn hs256(claims: &Value) -> String {
        sign(SECRET, &json!({"alg": "HS256", "typ": "JWT"}), claims)
    }

    #[test]
    fn static_token_proves_only_its_user() {
        let auth = Authenticator::new(&config());
        assert!(auth.check(Some("10"), Some("good-10"), NOW_MS));
        assert!(!auth.check(Some("11"), Some("good-10"), NOW_MS));
        assert!(!auth.check(Some("10"), Some("good-1"), NOW_MS));
        assert!(!auth.check(Some("10"), Some("good-10 "), NOW_MS));
        assert!(!auth.check(None, Some("good-10"), NOW_MS));
        assert!(!auth.check(Some("10"), None, NOW_MS));
    }

    #[test]
    fn shared_token_proves_any_user_and_no_user() {
        let auth = Authenticator::new(&config());
        assert!(auth.check(Some("10"), Some("shared-secret"), NOW_MS));
        assert!(auth.check(Some("anyone"), Some("shared-secret"), NOW_MS));
        assert!(auth.check(None, Some("shared-secret"), NOW_MS));
        assert!(!auth.check(None, Some("shared"), NOW_MS));
    }

    #[test]
    fn server_user_is_never_authenticated() {
        let mut with_server = config();
        with_server
            .tokens
            .insert("server".to_owned(), "srv".to_owned());
        let auth = Authenticator::new(&with_server);
        assert!(!auth.check(Some("server"), Some("srv"), NOW_MS));
        assert!(!auth.check(Some("server"), Some("shared-secret"), NOW_MS));
        let jwt = hs256(&json!({"sub": "server"}));
        assert!(!auth.check(Some("server"), Some(&jwt), NOW_MS));
    }

    #[test]
    fn demo_mode_accepts_every_user_but_server() {
        let auth = Authenticator::new(&AuthConfig {
            allow_anyone: true,
            ..AuthConfig::default()
        });
        assert!(auth.check(Some("10"), None, NOW_MS));
        assert!(auth.check(None, Some("anything"), NOW_MS));
        assert!(!auth.check(Some("server"), None, NOW_MS));
    }

    #[test]
    fn empty_credentials_never_match() {
        let auth = Authenticator::new(&AuthConfig {
            tokens: HashMap::from([("1".to_owned(), String::new())]),
            any_user_token: Some(String::new()),
            jwt_hs256_secret: Some(String::new()),
            allow_anyone: false,
        });
        assert!(!auth.check(Some("1"), Some(""), NOW_MS));
        assert!(!auth.check(None, Some(""), NOW_MS));
        let unsigned = sign("", &json!({"alg": "HS256"}), &json!({"sub": "1"}));
        assert!(!auth.check(Some("1"), Some(&unsigned), NOW_MS));
        let nothing = Authenticator::new(&AuthConfig::default());
        assert!(!nothing.check(Some("1"), Some("x"), NOW_MS));
    }

    #[test]
    fn jwt_valid_for_its_subject() {
        let auth = Authenticator::new(&config());
        let exp = NOW_MS / 1000 + 60;
        let jwt = hs256(&json!({"sub": "42", "exp": exp, "nbf": NOW_MS / 1000 - 1}));
        assert!(auth.check(Some("42"), Some(&jwt), NOW_MS));
        let without_times = hs256(&json!({"sub": "42"}));
        assert!(auth.check(Some("42"), Some(&without_times), NOW_MS));
    }

    #[test]
    fn jwt_with_wrong_signature_is_refused() {
        let auth = Authenticator::new(&config());
        let forged = sign("other", &json!({"alg": "HS256"}), &json!({"sub": "42"}));
        assert!(!auth.check(Some("42"), Some(&forged), NOW_MS));
        // A valid signature moved onto another payload.
        let genuine = hs256(&json!({"sub": "42"}));
        let signature = genuine.rsplit('.').next().unwrap();
        let tampered = format!(
            "{}.{}.{signature}",
            b64(&json!({"alg": "HS256", "typ": "JWT"})),
            b64(&json!({"sub": "43"}))
        );
        assert!(!auth.check(Some("43"), Some(&tampered), NOW_MS));
    }

    #[test]
    fn jwt_expired_or_not_yet_valid_is_refused() {
        let auth = Authenticator::new(&config());
        let now_s = NOW_MS / 1000;
        let expired = hs256(&json!({"sub": "42", "exp": now_s}));
        assert!(!auth.check(Some("42"), Some(&expired), NOW_MS));
        assert!(auth.check(Some("42"), Some(&expired), NOW_MS - 1));
        let early = hs256(&json!({"sub": "42", "nbf": now_s + 1}));
        assert!(!auth.check(Some("42"), Some(&early), NOW_MS));
        assert!(auth.check(Some("42"), Some(&early), NOW_MS + 1000));
        let bad_exp = hs256(&json!({"sub": "42", "exp": "tomorrow"}));
        assert!(!auth.check(Some("42"), Some(&bad_exp), NOW_MS));
    }

    #[test]
    fn jwt_alg_none_is_refused() {
        let auth = Authenticator::new(&config());
        let claims = json!({"sub": "42"});
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&claims));
        assert!(!auth.check(Some("42"), Some(&none), NOW_MS));
        // Even with a correct HMAC, only the header's alg "HS256" is accepted.
        for header in [json!({"alg": "none"}), json!({"alg": "HS512"}), json!({})] {
            let jwt = sign(SECRET, &header, &claims);
            assert!(!auth.check(Some("42"), Some(&jwt), NOW_MS), "{header}");
        }
    }

    #[test]
    fn jwt_with_wrong_sub_is_refused() {
        let auth = Authenticator::new(&config());
        for claims in [
            json!({"sub": "43"}),
            json!({"sub": 42}),
            json!({}),
            json!({"user": "42"}),
        ] {
            let jwt = hs256(&claims);
            assert!(!auth.check(Some("42"), Some(&jwt), NOW_MS), "{claims}");
        }
        let jwt = hs256(&json!({"sub": "42"}));
        assert!(!auth.check(None, Some(&jwt), NOW_MS));
    }

    #[test]
    fn garbage_tokens_are_refused() {
        let auth = Authenticator::new(&config());
        let valid = hs256(&json!({"sub": "42"}));
        let padded = format!("{valid}=");
        let huge = format!("{valid}{}", "A".repeat(JWT_BYTES_MAX));
        for token in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "!!!.???.***",
            "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",
            padded.as_str(),
            huge.as_str(),
            "\u{0}\u{ffff}",
        ] {
            assert!(!auth.check(Some("42"), Some(token), NOW_MS), "{token:?}");
        }
        let not_object = sign(SECRET, &json!({"alg": "HS256"}), &json!(["sub", "42"]));
        assert!(!auth.check(Some("42"), Some(&not_object), NOW_MS));
        let extra_part = format!("{valid}.x");
        assert!(!auth.check(Some("42"), Some(&extra_part), NOW_MS));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let auth = Authenticator::new(&config());
        let text = format!("{auth:?}");
        for secret in ["good-10", "shared-secret", SECRET] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("***") && text.contains("\"10\""), "{text}");
        let text = format!("{:?}", config());
        for secret in ["good-10", "shared-secret", SECRET] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}
