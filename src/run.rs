//! Starting and stopping a whole server: bind, serve, and shut down in one path.

use crate::clock::SystemClock;
use crate::config::{Config, PIPELINE_NICE_MAX};
use crate::server::{Server, ServerError};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long shutdown waits for connections to close before flushing the log anyway.
pub const SHUTDOWN_DRAIN_MS: u64 = 5_000;
/// How often the shutdown drain checks whether every connection has closed.
pub const SHUTDOWN_DRAIN_POLL_MS: u64 = 20;

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
    /// The pipeline runtime could not start.
    #[error("cannot start the pipeline runtime: {0}")]
    Runtime(std::io::Error),
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
    let pipeline = match config.limits.pipeline_threads {
        0 => None,
        threads => Some(
            PipelineRuntime::start(threads, config.limits.pipeline_nice)
                .map_err(RunError::Runtime)?,
        ),
    };
    let handle = pipeline.as_ref().map(|runtime| runtime.handle.clone());
    let server = if config.cluster.is_some() {
        Server::open_clustered(config, Arc::new(SystemClock), handle).await?
    } else {
        Server::open_with_pipeline(config, Arc::new(SystemClock), None, handle)?
    };
    let local = listener.local_addr().unwrap_or(addr);
    if server.config.demo {
        tracing::warn!("running with the built-in DEMO rules: any user may use any channel and any action type. Pass --config ferry.toml for real rules");
    }
    tracing::info!(addr = %local, node = server.node_id(), data_dir = %server.config.data_dir.display(), "ferry listening");
    let result = serve_until(listener, server, shutdown).await;
    if let Some(pipeline) = pipeline {
        pipeline.stop();
    }
    result
}

/// The separate runtime of the action pipeline and the log writer (`limits.pipeline_threads`).
/// It lives on a thread of its own, so that it is never dropped inside async code.
struct PipelineRuntime {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// Lowers the calling thread's priority by `steps` of `nice` (`limits.pipeline_nice`; on
/// Linux `nice` is per thread, and `None` means the calling one).
fn lower_thread_priority(steps: i32) {
    if steps == 0 {
        return;
    }
    let lowered = rustix::process::getpriority_process(None)
        .map(|nice| (nice + steps).min(PIPELINE_NICE_MAX))
        .and_then(|nice| rustix::process::setpriority_process(None, nice));
    if let Err(error) = lowered {
        tracing::debug!(%error, "could not lower the pipeline thread's priority");
    }
}

impl PipelineRuntime {
    fn start(threads: usize, nice: i32) -> std::io::Result<PipelineRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ferry-pipeline")
            .on_thread_start(move || lower_thread_priority(nice))
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ferry-pipeline-owner".to_owned())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
                runtime.shutdown_timeout(Duration::from_millis(SHUTDOWN_DRAIN_MS));
            })?;
        Ok(PipelineRuntime { handle, stop })
    }

    /// Stops the runtime after the log was closed (its tasks are done by then).
    fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// Serves on an already bound listener until `shutdown` resolves (tests use port 0).
pub async fn serve_until(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // First, so that a refusal to start (a corrupt events cursor) leaves nothing running.
    server.start_hooks()?;
    server.spawn_retention();
    let accept = tokio::spawn(crate::transports::http::serve(listener, server.clone()));
    shutdown.await;
    tracing::info!("shutting down: closing connections");
    server.begin_shutdown();
    let _ = accept.await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(SHUTDOWN_DRAIN_MS);
    while server.hub.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(SHUTDOWN_DRAIN_POLL_MS)).await;
    }
    server.log.close().await?;
    tracing::info!("log flushed, bye");
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::config::PIPELINE_NICE_DEFAULT;

    #[test]
    fn pipeline_threads_run_at_a_lower_priority_than_the_rest() {
        let (before, after) = std::thread::spawn(|| {
            let before = rustix::process::getpriority_process(None).expect("nice");
            lower_thread_priority(PIPELINE_NICE_DEFAULT);
            (
                before,
                rustix::process::getpriority_process(None).expect("nice"),
            )
        })
        .join()
        .expect("thread");
        // `nice` stops at 19.
        assert_eq!(
            after,
            (before + PIPELINE_NICE_DEFAULT).min(PIPELINE_NICE_MAX)
        );
        assert_eq!(
            rustix::process::getpriority_process(None).expect("nice"),
            before,
            "only the calling thread is lowered"
        );
    }
}
