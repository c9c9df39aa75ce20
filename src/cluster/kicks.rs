//! The Logux zombie rule across nodes: a client id that connects to one node closes its
//! older connection on every other node. Core NATS (no persistence): a node that misses a
//! kick only keeps a connection that the client itself has already given up.

use crate::metrics::ClusterMetrics;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Closes this node's connection of a client id; true when there was one.
pub type OnKick = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Kick {
    client: String,
    from: String,
}

/// Announces this node's new connections to the others.
#[derive(Clone)]
pub struct Kicks {
    client: async_nats::Client,
    subject: String,
    node_uid: String,
    metrics: ClusterMetrics,
}

impl std::fmt::Debug for Kicks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kicks")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl Kicks {
    /// Subscribes to the other nodes' kicks.
    pub(super) async fn start(
        client: async_nats::Client,
        stream: &str,
        node_uid: String,
        metrics: ClusterMetrics,
        on_kick: OnKick,
    ) -> Result<Kicks, String> {
        let subject = format!("{stream}.kick");
        let mut subscription = client
            .subscribe(subject.clone())
            .await
            .map_err(|error| error.to_string())?;
        let own = node_uid.clone();
        let received = metrics.kicks.with_label_values(&["received"]);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Ok(kick) = serde_json::from_slice::<Kick>(&message.payload) else {
                    tracing::warn!("ignoring an undecodable kick message");
                    continue;
                };
                if kick.from != own && on_kick(&kick.client) {
                    received.inc();
                    tracing::info!(client = %kick.client, "closing a connection: the client connected to another node");
                }
            }
        });
        Ok(Kicks {
            client,
            subject,
            node_uid,
            metrics,
        })
    }

    /// Tells the other nodes that `client_id` connected here.
    pub fn announce(&self, client_id: &str) {
        let kick = Kick {
            client: client_id.to_owned(),
            from: self.node_uid.clone(),
        };
        let Ok(payload) = serde_json::to_vec(&kick) else {
            return;
        };
        let client = self.client.clone();
        let subject = self.subject.clone();
        let sent = self.metrics.kicks.with_label_values(&["sent"]);
        tokio::spawn(async move {
            match client.publish(subject, payload.into()).await {
                Ok(()) => sent.inc(),
                Err(error) => tracing::debug!(%error, "sending a kick failed"),
            }
        });
    }
}
