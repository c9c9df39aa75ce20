//! What a client missed, sent from the log: the connect catch-up (actions targeted at the
//! client, user or node) and a subscription's channel history. Live entries are held by the
//! connection while a catch-up is open (`Outbound::CatchupPending` .. `CatchupDone`), so the
//! client sees everything in order.

use super::hub::Outbound;
use super::pipeline::{PipelineError, Worker};
use crate::action::Entry;
use serde_json::Value;
use std::sync::Arc;

/// Most entries in one catch-up `sync` message sent to a client.
pub const CATCHUP_PAGE_ENTRIES_MAX: usize = 1_000;

impl Worker {
    /// Sends everything targeted at this client, user or node with `added` above the
    /// client's `synced`.
    pub(super) async fn connect_catchup(&self) -> Result<(), PipelineError> {
        let ids = &self.conn.ids;
        let log = &self.server.log;
        // The connection opened this catch-up when it registered in the hub
        // (`Connection::finish_auth`): live entries delivered from then on (also while the
        // cluster wait below runs) are held and merged, never sent before the catch-up and
        // again by it.
        if let Some(cluster) = &self.server.cluster {
            // Read-your-writes across nodes: what the client wrote through another node
            // before it came here is in the stream, and must be in this view first. A
            // failure closes the connection (without an error), and with it the catch-up.
            cluster.caught_up(log, self.connect_synced).await?;
        }
        let head = log.head();
        let mut after = self.connect_synced;
        let limit = self.server.config.limits.connect_catchup_max;
        let mut sent = 0;
        while after < head && sent < limit {
            let page = log.targeted_since(
                ids.user_id.as_deref(),
                &ids.client_id,
                &ids.node_id,
                after,
                head,
                CATCHUP_PAGE_ENTRIES_MAX.min(limit - sent),
            )?;
            let Some(last) = page.last() else { break };
            after = last.meta.added;
            sent += page.len();
            let page: Vec<_> = page
                .into_iter()
                .filter(|entry| self.wants_targeted(entry))
                .collect();
            if !page.is_empty() {
                self.send(Outbound::Catchup(page)).await?;
            }
        }
        self.send(Outbound::CatchupDone).await
    }

    /// Logux's `syncFilter`: direct client/node targets always; user targets unless this
    /// client wrote the action or is excluded.
    fn wants_targeted(&self, entry: &Entry) -> bool {
        let ids = &self.conn.ids;
        let meta = &entry.meta;
        if meta.clients.contains(&ids.client_id) || meta.nodes.contains(&ids.node_id) {
            return true;
        }
        entry.author_client_id() != ids.client_id && !meta.exclude_clients.contains(&ids.client_id)
    }

    /// Subscribes and sends the channel's history: everything after `since` when given,
    /// otherwise the newest `subscribe_history_max` actions.
    pub(super) async fn channel_catchup(
        &self,
        channel: &str,
        since: Option<&Value>,
    ) -> Result<(), PipelineError> {
        let log = &self.server.log;
        self.send(Outbound::CatchupPending).await?;
        self.server.hub.subscribe(&self.conn, channel);
        let head = log.head();
        let since_id = since
            .and_then(|since| since.get("id"))
            .and_then(Value::as_str);
        let since_time = since
            .and_then(|since| since.get("time"))
            .and_then(Value::as_i64);
        if since_id.is_none() && since_time.is_none() {
            let limit = self.server.config.limits.subscribe_history_max;
            let page = log.channel_tail(channel, head, limit)?;
            self.send_channel_page(page, None).await?;
            return self.send(Outbound::CatchupDone).await;
        }
        // The client has everything of this channel up to the `logux/processed` of its
        // previous subscription, and everything sent to it up to the `synced` of its
        // `connect`: only what comes after both is missing.
        let since_added = match since_id {
            Some(id) => log.added_of(id)?,
            None => None,
        };
        let after = match since_added {
            Some(added) => added.max(self.connect_synced),
            None => self.connect_synced,
        };
        let time_floor = if since_added.is_some() {
            None
        } else {
            since_time
        };
        self.send_channel_range(channel, after, head, time_floor)
            .await?;
        self.send(Outbound::CatchupDone).await
    }

    /// Sends the channel's entries with `after < added <= upto`, page by page.
    pub(super) async fn send_channel_range(
        &self,
        channel: &str,
        mut after: u64,
        upto: u64,
        time_floor: Option<i64>,
    ) -> Result<(), PipelineError> {
        while after < upto {
            let page =
                self.server
                    .log
                    .channel_since(channel, after, upto, CATCHUP_PAGE_ENTRIES_MAX)?;
            let Some(last) = page.last() else { break };
            after = last.meta.added;
            self.send_channel_page(page, time_floor).await?;
        }
        Ok(())
    }

    /// Sends one page of channel history, without the client's own actions and those it is
    /// excluded from.
    async fn send_channel_page(
        &self,
        page: Vec<Arc<Entry>>,
        time_floor: Option<i64>,
    ) -> Result<(), PipelineError> {
        let own = &self.conn.ids.client_id;
        let page: Vec<_> = page
            .into_iter()
            .filter(|entry| entry.author_client_id() != own)
            .filter(|entry| !entry.meta.exclude_clients.contains(own))
            .filter(|entry| time_floor.is_none_or(|floor| entry.meta.time > floor))
            .collect();
        if page.is_empty() {
            return Ok(());
        }
        self.send(Outbound::Catchup(page)).await
    }

    /// Sends unstored entries (a `load` hook's actions) as one catch-up of their own.
    pub(super) async fn send_catchup_page(
        &self,
        page: Vec<Arc<Entry>>,
    ) -> Result<(), PipelineError> {
        self.send(Outbound::CatchupPending).await?;
        self.send(Outbound::Catchup(page)).await?;
        self.send(Outbound::CatchupDone).await
    }
}
