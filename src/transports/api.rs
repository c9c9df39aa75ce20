//! The server API: the back-end adds actions and reads the log over HTTP on the client
//! listener, authenticated by `Authorization: Bearer <secret>` or by the `Ferry-Timestamp` /
//! `Ferry-Signature` pair over the body (see `backend::sign`).
//!
//! - `POST /api/v1/actions`: `{"actions": [{"id", "action", "channels", ...}]}`, idempotent
//!   by the caller's id → `{"results": [{"id", "added", "duplicate"}]}`;
//! - `GET /api/v1/channel?name=&since=&limit=`: a channel's stored actions after `since`;
//! - `GET /api/v1/state?key=`: a reducer's or SyncMap object's current state.

use super::common::{self, ErrorCode, HttpError, Surface};
use crate::backend::{meta_json, sign, ServerAction};
use crate::log::{AppendOutcome, LogError};
use crate::server::Server;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

/// The path prefix of the server API.
pub const API_PREFIX: &str = "/api/";
/// Largest request body accepted.
pub const API_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Actions in a page of `GET /api/v1/channel` without `limit`.
pub const CHANNEL_PAGE_ACTIONS_DEFAULT: usize = 100;
/// Largest `limit` of `GET /api/v1/channel`, in actions.
pub const CHANNEL_PAGE_ACTIONS_MAX: usize = 1_000;

/// True for paths the server API serves.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with(API_PREFIX)
}

/// Serves one API request.
pub async fn handle(request: Request<Incoming>, server: Arc<Server>) -> Response<String> {
    let (response, outcome) = match serve(request, &server).await {
        Ok(body) => (common::json(StatusCode::OK, body.to_string()), "ok"),
        Err(error) => {
            let outcome = outcome(error.code());
            (error.into_response(Surface::Api), outcome)
        }
    };
    server
        .metrics
        .api_requests
        .with_label_values(&[outcome])
        .inc();
    response
}

/// The `outcome` label of `ferry_api_requests_total` for an error.
fn outcome(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Disabled => "disabled",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::NotFound => "not_found",
        // The log failing (503) and a stored state that cannot be decoded (500).
        _ => "unavailable",
    }
}

async fn serve(request: Request<Incoming>, server: &Server) -> ApiResult {
    let Some(backend) = &server.backend else {
        return Err(HttpError::new(
            ErrorCode::Disabled,
            "the server API needs a [backend] section with a secret",
        ));
    };
    let (parts, body) = request.into_parts();
    let body = common::read_body(body, API_BODY_BYTES_MAX).await?;
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
        return Err(HttpError::new(
            ErrorCode::Unauthorized,
            "missing or wrong Authorization bearer secret or Ferry-Signature",
        ));
    }
    let query = parts.uri.query().unwrap_or("");
    match (&parts.method, parts.uri.path()) {
        (&Method::POST, "/api/v1/actions") => add_actions(server, &body).await,
        (&Method::GET, "/api/v1/channel") => read_channel(server, query),
        (&Method::GET, "/api/v1/state") => read_state(server, query).await,
        _ => Err(HttpError::new(ErrorCode::NotFound, "no such API endpoint")),
    }
}

type ApiResult = Result<Value, HttpError>;

fn unavailable(cause: LogError) -> HttpError {
    tracing::error!(error = %cause, "server API: the log failed");
    HttpError::new(
        ErrorCode::Unavailable,
        format!("the log cannot serve this now: {cause}"),
    )
}

async fn add_actions(server: &Server, body: &[u8]) -> ApiResult {
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| HttpError::bad_request(format!("the body is not JSON: {e}")))?;
    let actions =
        ServerAction::parse_list(request.get("actions")).map_err(HttpError::bad_request)?;
    if actions.is_empty() {
        return Err(HttpError::bad_request(
            "\"actions\" must list at least one action",
        ));
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
        .ok_or_else(|| HttpError::bad_request("the query needs name=<channel>"))?;
    let since = match query_param(query, "since") {
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| HttpError::bad_request("since must be a non-negative integer"))?,
        None => 0,
    };
    let limit = match query_param(query, "limit") {
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=CHANNEL_PAGE_ACTIONS_MAX).contains(limit))
            .ok_or_else(|| {
                HttpError::bad_request(format!("limit must be 1 to {CHANNEL_PAGE_ACTIONS_MAX}"))
            })?,
        None => CHANNEL_PAGE_ACTIONS_DEFAULT,
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
            json!({"added": entry.meta.added, "action": entry.action(), "meta": meta_json(&entry.meta)})
        })
        .collect();
    Ok(json!({"actions": actions, "next": next}))
}

async fn read_state(server: &Server, query: &str) -> ApiResult {
    let key = query_param(query, "key")
        .filter(|key| !key.is_empty())
        .ok_or_else(|| HttpError::bad_request("the query needs key=<object>"))?;
    let stored = server
        .log
        .state(&key)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| HttpError::new(ErrorCode::NotFound, format!("no state for {key:?}")))?;
    let state = crate::server::objects::decode(&stored.state)
        .ok_or_else(|| HttpError::new(ErrorCode::Internal, "the stored state cannot be decoded"))?;
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
