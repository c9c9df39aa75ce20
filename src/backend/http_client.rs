//! The HTTP/1.1 client Ferry uses to call the back-end (hooks): `http://` and `https://`
//! (rustls, with the roots of `[backend] ca_file` or the compiled-in Mozilla roots), pooled
//! connections, a deadline per request and a cap on the answer's size.
//!
//! It lives with the hook client rather than in `transports/` because it is the only code
//! that talks HTTP as a client; transports serve clients and never call out.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// Idle pooled connections kept per back-end host.
const POOL_IDLE_PER_HOST_MAX: usize = 32;
/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT_MS: u64 = 30_000;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL or a header could not be used.
    #[error("bad request: {0}")]
    Request(String),
    /// Connecting, sending or receiving failed.
    #[error("network error: {0}")]
    Network(String),
    /// No complete answer within the deadline.
    #[error("timed out")]
    Timeout,
    /// The answer was larger than allowed.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
}

/// A pooled HTTP/1.1 client; cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient").finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client with its own connection pool; `tls` is used for `https://` URLs.
    pub fn new(tls: ClientConfig) -> HttpClient {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
            .pool_idle_timeout(Duration::from_millis(POOL_IDLE_TIMEOUT_MS))
            .build(connector);
        HttpClient { client }
    }

    /// POSTs `body` as JSON to `url` with extra `headers`; the status and body of the answer
    /// within `timeout`, reading at most `body_max` bytes.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        timeout: Duration,
        body_max: usize,
    ) -> Result<(u16, Bytes), ClientError> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|error| ClientError::Request(error.to_string()))?;
            let value = HeaderValue::from_str(value)
                .map_err(|error| ClientError::Request(error.to_string()))?;
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|error| ClientError::Request(error.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| ClientError::Network(error.to_string()))?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), body_max)
                .collect()
                .await
                .map_err(|error| {
                    if error.is::<http_body_util::LengthLimitError>() {
                        ClientError::TooLarge(body_max)
                    } else {
                        ClientError::Network(error.to_string())
                    }
                })?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// Why the client's TLS settings could not be built from `[backend] ca_file`.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    /// The PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    /// rustls refused a certificate or the settings.
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

/// The PEM certificates in `path`; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClientTlsError> {
    let read_error = |source| ClientTlsError::Read {
        path: path.display().to_string(),
        source,
    };
    let pem = std::fs::read(path).map_err(read_error)?;
    let certificates: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    if certificates.is_empty() {
        return Err(ClientTlsError::NoCertificate(path.display().to_string()));
    }
    Ok(certificates)
}

/// The TLS settings of the hook client: the roots in the PEM file `ca_file` only, or the
/// Mozilla roots compiled in (webpki-roots) without one.
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, ClientTlsError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for certificate in read_certificates(path)? {
                roots
                    .add(certificate)
                    .map_err(|error| ClientTlsError::Invalid(error.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientTlsError::Invalid(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
