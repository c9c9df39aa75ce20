//! Leases in a JetStream key-value bucket: one node at a time holds a named lease (a
//! client's `process` queue, the events hook). A lease is taken by creating its key, kept by
//! updating it with the revision it holds, and lost when the holder stops renewing: the
//! bucket's `max_age` removes the key after `lease_ms`, and another node takes it.

use crate::config::ClusterConfig;
use async_nats::jetstream::{self, kv};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A lease is renewed this many times per `lease_ms`, so one lost renewal does not lose it.
const LEASE_RENEWALS_PER_TERM: u32 = 3;

/// A lease this node holds, renewed in the background until it is released or dropped.
#[derive(Debug)]
pub struct Lease {
    leases: Leases,
    held: Arc<tokio::sync::Mutex<Held>>,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// True once a renewal failed: another node may hold it now.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Gives the lease up now (another node need not wait for it to expire).
    pub async fn release(self) {
        self.renewer.abort();
        let held = self.held.lock().await.clone();
        self.leases.release(held).await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// A held lease: the key and the revision that proves it.
#[derive(Debug, Clone)]
pub struct Held {
    key: String,
    revision: u64,
}

/// The lease bucket of one node, and the bucket of settings every node shares.
#[derive(Clone)]
pub struct Leases {
    store: kv::Store,
    settings: kv::Store,
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
        let store = open_bucket(jetstream, &bucket, lease, config.replicas).await?;
        let settings_bucket = format!("{}_settings", config.stream);
        let settings =
            open_bucket(jetstream, &settings_bucket, Duration::ZERO, config.replicas).await?;
        Ok(Leases {
            store,
            settings,
            node_uid,
            lease,
        })
    }

    /// A setting shared by every node (the events cursor); `Err` when NATS cannot say.
    pub async fn shared_setting(&self, key: &str) -> Result<Option<String>, String> {
        match self.settings.get(lease_key(key)).await {
            Ok(value) => Ok(value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned())),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Saves a shared setting.
    pub async fn put_shared_setting(&self, key: &str, value: &str) -> Result<(), String> {
        self.settings
            .put(lease_key(key), value.to_owned().into_bytes().into())
            .await
            .map(drop)
            .map_err(|error| error.to_string())
    }

    /// Takes the lease `name` if nobody holds it, and keeps renewing it.
    pub async fn acquire(&self, name: &str) -> Option<Lease> {
        let key = lease_key(name);
        let revision = self
            .store
            .create(&key, self.node_uid.clone().into_bytes().into())
            .await
            .ok()?;
        let held = Arc::new(tokio::sync::Mutex::new(Held { key, revision }));
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn({
            let (leases, held, lost) = (self.clone(), held.clone(), lost.clone());
            async move {
                loop {
                    tokio::time::sleep(leases.lease / LEASE_RENEWALS_PER_TERM).await;
                    let mut held = held.lock().await;
                    if !leases.renew(&mut held).await {
                        lost.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        });
        Some(Lease {
            leases: self.clone(),
            held,
            lost,
            renewer,
        })
    }

    /// Renews a held lease; `false` when it was lost (expired and taken, or NATS is down).
    async fn renew(&self, held: &mut Held) -> bool {
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
    async fn release(&self, held: Held) {
        if let Err(error) = self
            .store
            .purge_expect_revision(&held.key, Some(held.revision))
            .await
        {
            tracing::debug!(%error, "releasing a lease failed; it expires by itself");
        }
    }
}

/// Opens a key-value bucket, creating its stream as `create_key_value` would: async-nats
/// 0.51 first reads the account info there, whose nats-server 2.9 answer it cannot decode.
/// `max_age` zero keeps values forever.
async fn open_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, String> {
    jetstream
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: false,
            discard: jetstream::stream::DiscardPolicy::New,
            ..jetstream::stream::Config::default()
        })
        .await
        .map_err(|error| error.to_string())?;
    jetstream
        .get_key_value(bucket)
        .await
        .map_err(|error| error.to_string())
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
