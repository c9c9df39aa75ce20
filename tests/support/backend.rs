//! A test back-end: an HTTP server on 127.0.0.1 that answers Ferry's hooks with a closure
//! and records every call (hook, body, idempotency key, whether the signature was right).

#![allow(dead_code)]

use bytes::Bytes;
use ferry::backend::sign;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

pub const SECRET: &str = "test-secret-0123456789";

/// One hook request as the back-end saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub hook: String,
    pub body: Value,
    pub idempotency_key: Option<String>,
    pub signature_ok: bool,
}

/// Answers a hook: `(status, body)`.
pub type Handler = Arc<dyn Fn(&Call) -> (u16, Value) + Send + Sync>;

pub struct TestBackend {
    pub addr: SocketAddr,
    pub calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestBackend {
    /// Starts on a free port; `handler` answers correctly signed calls (wrong signatures get
    /// 401 without reaching it).
    pub async fn start(handler: Handler) -> TestBackend {
        TestBackend::start_on(0, handler).await
    }

    pub async fn start_on(port: u16, handler: Handler) -> TestBackend {
        TestBackend::serve(port, handler, None).await
    }

    /// Like `start`, over TLS with `acceptor`.
    pub async fn start_tls(handler: Handler, acceptor: tokio_rustls::TlsAcceptor) -> TestBackend {
        TestBackend::serve(0, handler, Some(acceptor)).await
    }

    async fn serve(
        port: u16,
        handler: Handler,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestBackend {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind test back-end");
        let addr = listener.local_addr().expect("address");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorded = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let recorded = recorded.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (status, body) = answer(request, &handler, &recorded).await;
                            let mut response =
                                Response::new(Full::new(Bytes::from(body.to_string())));
                            *response.status_mut() =
                                hyper::StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    match tls {
                        None => {
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        TestBackend { addr, calls, task }
    }

    /// `url` for `[backend]`.
    pub fn url(&self) -> String {
        format!("http://{}/ferry", self.addr)
    }

    pub fn calls_of(&self, hook: &str) -> Vec<Call> {
        self.calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|call| call.hook == hook)
            .cloned()
            .collect()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn answer(
    request: Request<Incoming>,
    handler: &Handler,
    recorded: &Mutex<Vec<Call>>,
) -> (u16, Value) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let hook = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let timestamp = header("ferry-timestamp").unwrap_or_default();
    let signature = header("ferry-signature").unwrap_or_default();
    let idempotency_key = header("idempotency-key");
    let bytes = request
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let signature_ok = sign::verify(SECRET, &timestamp, &signature, &bytes, now);
    let call = Call {
        hook,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        idempotency_key,
        signature_ok,
    };
    recorded.lock().expect("calls").push(call.clone());
    if !signature_ok {
        return (401, json!({"error": "wrong signature"}));
    }
    let (status, mut body) = handler(&call);
    // `"delay_ms"` in an answer makes the back-end slow: it waits, then answers without it.
    if let Some(delay) = body
        .as_object_mut()
        .and_then(|body| body.remove("delay_ms"))
    {
        let delay = delay.as_u64().unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    (status, body)
}

/// The `[backend]` section for a back-end at `url`, with fast retries.
pub fn backend_section(url: &str, extra: &str) -> String {
    format!(
        "[backend]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\ntimeout_ms = 2000\n\
         process_retry_initial_ms = 50\nprocess_retry_max_ms = 200\n{extra}\n"
    )
}
