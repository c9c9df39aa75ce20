//! Starting and stopping a whole server: bind, serve, and shut down in one path.

use crate::clock::SystemClock;
use crate::config::Config;
use crate::server::{Server, ServerError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long shutdown waits for connections to close before flushing the log anyway.
pub const SHUTDOWN_DRAIN_MS: u64 = 5_000;

/// Errors of a whole run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] crate::transports::tls::TlsError),
    /// The log could not be flushed at shutdown.
    #[error("flushing the log at shutdown failed: {0}")]
    Flush(#[from] crate::log::LogError),
}

/// Serves `config` until `shutdown` resolves, then closes clients, drains and flushes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let addr = config.listen;
    if let Some(tls) = &config.tls {
        crate::transports::tls::acceptor(&tls.cert, &tls.key)?;
    }
    let listener =
        crate::transports::http::bind(addr).map_err(|source| RunError::Bind { addr, source })?;
    let server = Server::open(config, Arc::new(SystemClock), None)?;
    let local = listener.local_addr().unwrap_or(addr);
    if server.config.demo {
        tracing::warn!("running with the built-in DEMO rules: any user may use any channel and any action type. Pass --config ferry.toml for real rules");
    }
    tracing::info!(addr = %local, node = server.node_id(), data_dir = %server.config.data_dir.display(), "ferry listening");
    serve_until(listener, server, shutdown).await
}

/// Serves on an already bound listener until `shutdown` resolves (tests use port 0).
pub async fn serve_until(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    server.spawn_retention();
    crate::backend::start(&server);
    let accept = tokio::spawn(crate::transports::http::serve(listener, server.clone()));
    shutdown.await;
    tracing::info!("shutting down: closing connections");
    server.begin_shutdown();
    let _ = accept.await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while server.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.log.close().await?;
    tracing::info!("log flushed, bye");
    Ok(())
}
