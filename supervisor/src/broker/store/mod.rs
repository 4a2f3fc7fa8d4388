//! The plugins' key-value stores, on one of two backends with the same semantics:
//!
//! - [`redb`] (the default): one embedded database in the supervisor's state
//!   directory, for one machine;
//! - [`postgres`]: tables in a PostgreSQL database, so every daemon that names the
//!   same database (a fleet of nodes) sees the same data.
//!
//! Both give each plugin its own namespace chosen by the supervisor from the
//! worker's plugin id (a plugin's requests name only keys, so none can name
//! another's), count each plugin's bytes (keys plus values) against its quota in
//! the same transaction as the write, order keys by bytes, and answer a write
//! only after its transaction has committed durably, so a write the plugin saw
//! acknowledged survives a SIGKILL of the supervisor. Data is keyed by plugin id,
//! not version: it survives restarts and upgrades.

pub mod postgres;
pub mod redb;

use corral_protocol::{HostError, Secret};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest key, in bytes.
pub const MAX_KEY: usize = 1024;
/// Most keys one `keys` answer lists.
pub const MAX_KEYS: usize = 10_000;

pub(crate) fn failed(what: &str, e: impl std::fmt::Display) -> HostError {
    HostError::Failed(format!("store {what}: {e}"))
}

pub(crate) fn check_key(key: &str) -> Result<(), HostError> {
    if key.is_empty() {
        return Err(HostError::Invalid("the key is empty".into()));
    }
    if key.len() > MAX_KEY {
        return Err(HostError::Invalid(format!(
            "the key is {} bytes; keys are at most {MAX_KEY} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// Where the plugins' stores live (`store` in `corral.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreBackend {
    /// `kv.redb` in the state directory.
    #[default]
    Redb,
    /// A PostgreSQL database shared by every node that names it.
    Postgres(PostgresStore),
}

/// How to reach the PostgreSQL database.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresStore {
    /// A libpq connection string: a URL (`postgres://user@host:5432/db?sslmode=require`)
    /// or `key=value` pairs. `sslmode=prefer` (the default) uses TLS when the server
    /// offers it, `require` insists, `disable` never does; with TLS the server's
    /// certificate is verified for its host name.
    pub url: String,
    /// The password, when not in `url` (from a file or the environment, never logged).
    pub password: Option<Secret>,
    /// PEM certificates of the CAs that sign the server's certificate; default: the
    /// web's roots (webpki-roots).
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&postgres::describe(&self.url))
    }
}

impl PostgresStore {
    /// Check the connection string (syntax only; nothing is contacted).
    pub fn validate(&self) -> Result<(), String> {
        postgres::parse(self).map(drop)
    }
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    #[error("cannot create {}: {error}", dir.display())]
    Dir {
        dir: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("cannot open the store {}: {error}", path.display())]
    Database {
        path: std::path::PathBuf,
        error: ::redb::DatabaseError,
    },
    #[error("the PostgreSQL store: {0}")]
    Postgres(String),
}

/// The store in use.
#[derive(Debug)]
pub enum Store {
    Redb(redb::RedbStore),
    Postgres(Box<postgres::PgStore>),
}

impl Store {
    /// Open the backend: the redb file in `state_dir` (created), or a pool of
    /// connections to PostgreSQL (made as they are needed; its tables at the first
    /// use).
    pub fn open(backend: &StoreBackend, state_dir: &Path) -> Result<Store, OpenStoreError> {
        match backend {
            StoreBackend::Redb => {
                redb::RedbStore::open(&state_dir.join("kv.redb")).map(Store::Redb)
            }
            StoreBackend::Postgres(p) => postgres::PgStore::new(p)
                .map(|s| Store::Postgres(Box::new(s)))
                .map_err(OpenStoreError::Postgres),
        }
    }

    /// The value of `key`. A redb read transaction takes no lock a writer holds
    /// and no fsync: it is answered in place, without a hop to the blocking pool.
    pub async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        match self {
            Store::Redb(s) => s.get(plugin, key),
            Store::Postgres(s) => s.get(plugin, key).await,
        }
    }

    /// Read `key` where the caller stands, when the store is on this machine
    /// (redb: a read transaction, no I/O wait worth a task); `None` for a store
    /// across the network.
    pub fn get_local(&self, plugin: &str, key: &str) -> Option<Result<Option<Vec<u8>>, HostError>> {
        match self {
            Store::Redb(s) => Some(s.get(plugin, key)),
            Store::Postgres(_) => None,
        }
    }

    /// Write `key`, refusing growth past `quota` bytes. Durable when it returns.
    pub async fn put(
        self: &Arc<Self>,
        plugin: &str,
        key: String,
        value: Vec<u8>,
        quota: u64,
    ) -> Result<(), HostError> {
        match &**self {
            Store::Redb(_) => {
                let plugin = plugin.to_owned();
                self.blocking(move |s| s.put(&plugin, &key, &value, quota))
                    .await
            }
            Store::Postgres(s) => s.put(plugin, &key, &value, quota).await,
        }
    }

    /// Delete `key`; whether it existed.
    pub async fn delete(self: &Arc<Self>, plugin: &str, key: String) -> Result<bool, HostError> {
        match &**self {
            Store::Redb(_) => {
                let plugin = plugin.to_owned();
                self.blocking(move |s| s.delete(&plugin, &key)).await
            }
            Store::Postgres(s) => s.delete(plugin, &key).await,
        }
    }

    /// Keys starting with `prefix`, in byte order (at most [`MAX_KEYS`]).
    pub async fn keys(
        self: &Arc<Self>,
        plugin: &str,
        prefix: String,
    ) -> Result<Vec<String>, HostError> {
        match &**self {
            Store::Redb(_) => {
                let plugin = plugin.to_owned();
                self.blocking(move |s| s.keys(&plugin, &prefix)).await
            }
            Store::Postgres(s) => s.keys(plugin, &prefix).await,
        }
    }

    /// Announce a message to the other nodes that share this store (nothing to do
    /// for redb, which no other node shares).
    pub async fn publish(
        &self,
        node: &str,
        from: &str,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), HostError> {
        match self {
            Store::Redb(_) => Ok(()),
            Store::Postgres(s) => s.publish(node, from, topic, payload).await,
        }
    }

    /// A redb write waits for its commit's fsync, and a key listing may be long:
    /// both run on the blocking pool.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&redb::RedbStore) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || match &*store {
            Store::Redb(s) => op(s),
            Store::Postgres(_) => Err(HostError::Failed("not the redb store".into())),
        })
        .await
        .map_err(|e| HostError::Failed(format!("store task: {e}")))?
    }
}
