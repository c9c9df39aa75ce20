//! The server API: the back-end adds actions and reads the log over HTTP on the client
//! listener, authenticated by `Authorization: Bearer <secret>` or by the `Ferry-Timestamp` /
//! `Ferry-Signature` pair over the body (see `backend::sign`).
//!
//! - `POST /api/v1/actions`: `{"actions": [{"id", "action", "channels", ...}]}`, idempotent
//!   by the caller's id → `{"results": [{"id", "added", "duplicate"}]}`;
//! - `GET /api/v1/channel?name=&since=&limit=`: a channel's stored actions after `since`;
//! - `GET /api/v1/state?key=`: a reducer's or SyncMap object's current state.

use crate::backend::{meta_json, sign, ServerAction};
use crate::log::{AppendOutcome, LogError};
use crate::server::Server;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

/// The path prefix of the server API.
pub const API_PREFIX: &str = "/api/";
/// Largest request body accepted.
pub const API_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Default and largest page of `GET /api/v1/channel`.
pub const CHANNEL_PAGE_DEFAULT: usize = 100;
/// Largest page of `GET /api/v1/channel`.
pub const CHANNEL_PAGE_MAX: usize = 1_000;

/// True for paths the server API serves.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with(API_PREFIX)
}

fn answer(status: StatusCode, body: &Value) -> Response<String> {
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(status: StatusCode, message: &str) -> Response<String> {
    answer(status, &json!({ "error": message }))
}

/// Serves one API request.
pub async fn handle(request: Request<Incoming>, server: Arc<Server>) -> Response<String> {
    let (response, outcome) = serve(request, &server).await;
    server
        .metrics
        .api_requests
        .with_label_values(&[outcome])
        .inc();
    response
}

async fn serve(request: Request<Incoming>, server: &Server) -> (Response<String>, &'static str) {
    let Some(backend) = &server.backend else {
        return (
            error(
                StatusCode::NOT_FOUND,
                "the server API needs a [backend] section with a secret",
            ),
            "disabled",
        );
    };
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, API_BODY_BYTES_MAX).collect().await {
        Ok(body) => body.to_bytes(),
        Err(cause) if cause.is::<LengthLimitError>() => {
            return (
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the body is larger than {API_BODY_BYTES_MAX} bytes"),
                ),
                "too_large",
            )
        }
        Err(_) => {
            return (
                error(StatusCode::BAD_REQUEST, "the body could not be read"),
                "bad_request",
            )
        }
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let secret = &backend.config.secret;
    let bearer = header(AUTHORIZATION.as_str())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| sign::secret_matches(secret, given));
    let signed = match (
        header(sign::TIMESTAMP_HEADER),
        header(sign::SIGNATURE_HEADER),
    ) {
        (Some(timestamp), Some(signature)) => {
            sign::verify(secret, timestamp, signature, &body, server.clock.now_ms())
        }
        _ => false,
    };
    if !bearer && !signed {
        return (
            error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong Authorization bearer secret or Ferry-Signature",
            ),
            "unauthorized",
        );
    }
    let query = parts.uri.query().unwrap_or("");
    let result = match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/api/v1/actions") => add_actions(server, &body).await,
        (&Method::GET, "/api/v1/channel") => read_channel(server, query),
        (&Method::GET, "/api/v1/state") => read_state(server, query).await,
        _ => Err((StatusCode::NOT_FOUND, "no such API endpoint".to_owned())),
    };
    match result {
        Ok(body) => (answer(StatusCode::OK, &body), "ok"),
        Err((status, message)) => {
            let outcome = match status {
                StatusCode::BAD_REQUEST => "bad_request",
                StatusCode::NOT_FOUND => "not_found",
                _ => "unavailable",
            };
            (error(status, &message), outcome)
        }
    }
}

type ApiResult = Result<Value, (StatusCode, String)>;

fn bad(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

fn unavailable(cause: LogError) -> (StatusCode, String) {
    tracing::error!(error = %cause, "server API: the log failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the log cannot serve this now: {cause}"),
    )
}

async fn add_actions(server: &Server, body: &[u8]) -> ApiResult {
    let request: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let actions = ServerAction::parse_list(request.get("actions")).map_err(bad)?;
    if actions.is_empty() {
        return Err(bad("\"actions\" must list at least one action"));
    }
    let ids: Vec<String> = actions.iter().map(|action| action.id.clone()).collect();
    let now = server.clock.now_ms();
    let entries = actions
        .into_iter()
        .map(|action| action.into_entry(now, server.config.subprotocol))
        .collect();
    let outcomes = server
        .log
        .append(entries, None)
        .await
        .map_err(unavailable)?;
    let results: Vec<Value> = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| {
            let (added, duplicate) = match outcome {
                AppendOutcome::Appended(added) => (added, false),
                AppendOutcome::Duplicate(added) => (added, true),
            };
            json!({"id": id, "added": added, "duplicate": duplicate})
        })
        .collect();
    Ok(json!({ "results": results }))
}

fn read_channel(server: &Server, query: &str) -> ApiResult {
    let name = query_param(query, "name")
        .filter(|name| !name.is_empty())
        .ok_or_else(|| bad("the query needs name=<channel>"))?;
    let since = match query_param(query, "since") {
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| bad("since must be a non-negative integer"))?,
        None => 0,
    };
    let limit = match query_param(query, "limit") {
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=CHANNEL_PAGE_MAX).contains(limit))
            .ok_or_else(|| bad(format!("limit must be 1 to {CHANNEL_PAGE_MAX}")))?,
        None => CHANNEL_PAGE_DEFAULT,
    };
    let head = server.log.head();
    let entries = server
        .log
        .channel_since(&name, since, head, limit)
        .map_err(unavailable)?;
    let next = entries.last().map_or(since, |entry| entry.meta.added);
    let actions: Vec<Value> = entries
        .iter()
        .map(|entry| {
            json!({"added": entry.meta.added, "action": entry.action, "meta": meta_json(&entry.meta)})
        })
        .collect();
    Ok(json!({"actions": actions, "next": next}))
}

async fn read_state(server: &Server, query: &str) -> ApiResult {
    let key = query_param(query, "key")
        .filter(|key| !key.is_empty())
        .ok_or_else(|| bad("the query needs key=<object>"))?;
    let stored = server
        .log
        .state(&key)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no state for {key:?}")))?;
    let state = crate::server::objects::decode(&stored.state).ok_or_else(|| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored state cannot be decoded".to_owned(),
        )
    })?;
    Ok(json!({
        "key": key,
        "added": stored.added,
        "kind": state.kind().name(),
        "state": state.snapshot(),
    }))
}

/// The percent-decoded value of `name` in a query string (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key)? == name).then(|| percent_decode(value))?
    })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'%' => {
                let hex = text.get(at + 1..at + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                at += 3;
            }
            b'+' => {
                out.push(b' ');
                at += 1;
            }
            byte => {
                out.push(byte);
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded() {
        let query = "name=orders%2F7&since=5&x=a+b";
        assert_eq!(query_param(query, "name").as_deref(), Some("orders/7"));
        assert_eq!(query_param(query, "since").as_deref(), Some("5"));
        assert_eq!(query_param(query, "x").as_deref(), Some("a b"));
        assert_eq!(query_param(query, "missing"), None);
        assert_eq!(query_param("name=%zz", "name"), None);
        assert_eq!(query_param("name=%e2%82", "name"), None);
    }
}
