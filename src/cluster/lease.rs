//! Leases in a JetStream key-value bucket: one node at a time holds a named lease (a
//! client's `process` queue, the events hook). A lease is taken by creating its key, kept by
//! updating it with the revision it holds, and lost when the holder stops renewing: the
//! bucket's `max_age` removes the key after `lease_ms`, and another node takes it.

use crate::config::ClusterConfig;
use async_nats::jetstream::{self, kv};
use std::time::Duration;

/// A held lease: the key and the revision that proves it.
#[derive(Debug, Clone)]
pub struct Held {
    key: String,
    revision: u64,
}

/// The lease bucket of one node.
#[derive(Clone)]
pub struct Leases {
    store: kv::Store,
    node_uid: String,
    /// How long a lease lasts without renewal.
    pub lease: Duration,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").finish_non_exhaustive()
    }
}

impl Leases {
    /// Opens (or creates) the bucket `<stream>_leases`.
    pub(super) async fn open(
        jetstream: &jetstream::Context,
        config: &ClusterConfig,
        node_uid: String,
    ) -> Result<Leases, String> {
        let bucket = format!("{}_leases", config.stream);
        let lease = Duration::from_millis(config.lease_ms);
        // The bucket's stream is created here, as `create_key_value` would: async-nats 0.51
        // first reads the account info, whose nats-server 2.9 answer it cannot decode.
        jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: lease,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: jetstream::stream::DiscardPolicy::New,
                ..jetstream::stream::Config::default()
            })
            .await
            .map_err(|error| error.to_string())?;
        let store = jetstream
            .get_key_value(&bucket)
            .await
            .map_err(|error| error.to_string())?;
        Ok(Leases {
            store,
            node_uid,
            lease,
        })
    }

    /// Takes the lease `name` if nobody holds it.
    pub async fn acquire(&self, name: &str) -> Option<Held> {
        let key = lease_key(name);
        match self
            .store
            .create(&key, self.node_uid.clone().into_bytes().into())
            .await
        {
            Ok(revision) => Some(Held { key, revision }),
            Err(_) => None,
        }
    }

    /// Renews a held lease; `false` when it was lost (expired and taken, or NATS is down).
    pub async fn renew(&self, held: &mut Held) -> bool {
        match self
            .store
            .update(
                &held.key,
                self.node_uid.clone().into_bytes().into(),
                held.revision,
            )
            .await
        {
            Ok(revision) => {
                held.revision = revision;
                true
            }
            Err(_) => false,
        }
    }

    /// Gives a held lease up at once, so another node need not wait for it to expire.
    pub async fn release(&self, held: Held) {
        if let Err(error) = self
            .store
            .purge_expect_revision(&held.key, Some(held.revision))
            .await
        {
            tracing::debug!(%error, "releasing a lease failed; it expires by itself");
        }
    }
}

/// A bucket key for any lease name (client ids hold characters keys may not).
fn lease_key(name: &str) -> String {
    let mut key = String::with_capacity(name.len() * 2 + 2);
    key.push_str("l.");
    for byte in name.bytes() {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}
