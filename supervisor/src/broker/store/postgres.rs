//! The PostgreSQL backend: the same store as [`super::redb`], in two tables every
//! node that names the database shares.
//!
//! ```sql
//! corral_kv       (plugin text, key bytea, value bytea, PRIMARY KEY (plugin, key))
//! corral_kv_usage (plugin text PRIMARY KEY, bytes bigint)
//! ```
//!
//! Keys are `bytea`, so they order by bytes as in redb (no collation) and hold any
//! UTF-8. A write (put or delete) is one transaction that first locks the plugin's
//! usage row (`SELECT ... FOR UPDATE`): writes of one plugin are serialised across
//! every node, so its quota holds however many daemons write at once. Every
//! session runs with `synchronous_commit = on`, whatever the server's default, so a
//! write is answered only once its commit is flushed. The tables are created at
//! the first use, under an advisory lock (two nodes starting at once do not race).
//!
//! Topics across nodes: a publish is a row of `corral_messages` and a
//! `pg_notify` on [`CHANNEL`] naming it, in one transaction (so the row is there
//! when the notification arrives, and notifications arrive in commit order); every
//! node LISTENs on its own connection, reads the rows others announced and
//! delivers them (`crate::broker::bus`). Rows older than [`MESSAGE_RETENTION`] are
//! deleted by the nodes as they go.
//!
//! Connections come from a pool (deadpool-postgres, at most [`POOL_SIZE`]); each
//! operation has [`TIMEOUT`], so a database that stops answering fails host calls
//! with the reason instead of holding them.

use super::{MAX_KEYS, PostgresStore, check_key, failed};
use corral_protocol::HostError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Connections one daemon opens at most.
pub const POOL_SIZE: usize = 16;
/// The longest one store operation (a connection, the tables, the statements) may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest CA file read.
const MAX_CA_FILE: u64 = 1 << 20;
/// One simple query, so one implicit transaction: the advisory lock (its key is
/// "corral" in ASCII, 0x636f7272616c) is held until the tables exist.
const SCHEMA: &str = "
    SELECT pg_advisory_xact_lock(109330312618348);
    CREATE TABLE IF NOT EXISTS corral_kv (
        plugin text NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (plugin, key)
    );
    CREATE TABLE IF NOT EXISTS corral_kv_usage (
        plugin text PRIMARY KEY,
        bytes bigint NOT NULL
    );
    CREATE TABLE IF NOT EXISTS corral_messages (
        id bigserial PRIMARY KEY,
        node text NOT NULL,
        publisher text NOT NULL,
        topic text NOT NULL,
        payload bytea NOT NULL,
        at timestamptz NOT NULL DEFAULT now()
    );
";

/// The channel every node LISTENs on; a notification is `<node> <message id>`.
pub const CHANNEL: &str = "corral_topics";

/// How long a published message stays in `corral_messages` for the other nodes
/// to read.
pub const MESSAGE_RETENTION: &str = "5 minutes";

/// The pool, and whether the tables are known to exist.
pub struct PgStore {
    pool: Pool,
    /// For the listening connection, which is not the pool's.
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    schema: OnceCell<()>,
    shown: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.shown)
            .finish_non_exhaustive()
    }
}

/// `user@host:port/dbname`, without the password, for messages and `Debug`.
pub fn describe(url: &str) -> String {
    let Ok(c) = url.parse::<tokio_postgres::Config>() else {
        return "PostgreSQL (an invalid connection string)".into();
    };
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "PostgreSQL {}@{host}:{port}/{}",
        c.get_user().unwrap_or("?"),
        c.get_dbname().unwrap_or("?")
    )
}

/// The connection's configuration, with the password and Corral's session settings.
pub fn parse(store: &PostgresStore) -> Result<tokio_postgres::Config, String> {
    let mut config: tokio_postgres::Config = store
        .url
        .parse()
        .map_err(|e| format!("the connection string: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("the connection string names no host".into());
    }
    if config.get_user().is_none() {
        return Err("the connection string names no user".into());
    }
    if let Some(p) = &store.password {
        config.password(p.0.as_bytes());
    }
    config
        .application_name("corral")
        .options("-c synchronous_commit=on")
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true);
    Ok(config)
}

/// TLS for the connections: the CAs of `ca_file`, else the web's roots.
fn tls(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = corral_files::read_regular(path, MAX_CA_FILE)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "ca_file {}: no PEM certificate in it",
                    path.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn pg_failed(what: &str, e: impl std::fmt::Display) -> HostError {
    failed(&format!("{what} (PostgreSQL)"), e)
}

impl PgStore {
    /// The pool; nothing is contacted until the first operation.
    pub fn new(store: &PostgresStore) -> Result<PgStore, String> {
        let config = parse(store)?;
        let tls = tls(store.ca_file.as_deref())?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(TIMEOUT))
            .create_timeout(Some(TIMEOUT))
            .recycle_timeout(Some(TIMEOUT))
            .build()
            .map_err(|e| format!("the connection pool: {e}"))?;
        Ok(PgStore {
            pool,
            config,
            tls,
            schema: OnceCell::new(),
            shown: describe(&store.url),
        })
    }

    /// A connection, once the tables exist.
    async fn client(&self) -> Result<deadpool_postgres::Object, HostError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| pg_failed(&format!("connection to {}", self.shown), e))?;
        self.schema
            .get_or_try_init(|| async {
                client
                    .batch_execute(SCHEMA)
                    .await
                    .map_err(|e| pg_failed("tables", e))
            })
            .await?;
        Ok(client)
    }

    /// `op` within [`TIMEOUT`].
    async fn timed<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, HostError>>,
    ) -> Result<T, HostError> {
        tokio::time::timeout(TIMEOUT, op).await.unwrap_or_else(|_| {
            Err(HostError::Failed(format!(
                "store: {} did not answer within {}s",
                self.shown,
                TIMEOUT.as_secs()
            )))
        })
    }

    pub async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        check_key(key)?;
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached("SELECT value FROM corral_kv WHERE plugin = $1 AND key = $2")
                .await
                .map_err(|e| pg_failed("read", e))?;
            let row = client
                .query_opt(&st, &[&plugin, &key.as_bytes()])
                .await
                .map_err(|e| pg_failed("read", e))?;
            Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
        })
        .await
    }

    /// The plugin's usage row, locked for this transaction (made at 0 if new).
    async fn lock_usage(
        tx: &deadpool_postgres::Transaction<'_>,
        plugin: &str,
    ) -> Result<u64, HostError> {
        let st = tx
            .prepare_cached(
                "INSERT INTO corral_kv_usage (plugin, bytes) VALUES ($1, 0) \
                 ON CONFLICT (plugin) DO NOTHING",
            )
            .await
            .map_err(|e| pg_failed("write", e))?;
        tx.execute(&st, &[&plugin])
            .await
            .map_err(|e| pg_failed("write", e))?;
        let st = tx
            .prepare_cached("SELECT bytes FROM corral_kv_usage WHERE plugin = $1 FOR UPDATE")
            .await
            .map_err(|e| pg_failed("write", e))?;
        let used: i64 = tx
            .query_one(&st, &[&plugin])
            .await
            .map_err(|e| pg_failed("write", e))?
            .get(0);
        Ok(used.max(0) as u64)
    }

    async fn set_usage(
        tx: &deadpool_postgres::Transaction<'_>,
        plugin: &str,
        bytes: u64,
    ) -> Result<(), HostError> {
        let st = tx
            .prepare_cached("UPDATE corral_kv_usage SET bytes = $2 WHERE plugin = $1")
            .await
            .map_err(|e| pg_failed("write", e))?;
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        tx.execute(&st, &[&plugin, &bytes])
            .await
            .map_err(|e| pg_failed("write", e))?;
        Ok(())
    }

    /// Write `key`, refusing growth past `quota` bytes. Durable when it returns.
    pub async fn put(
        &self,
        plugin: &str,
        key: &str,
        value: &[u8],
        quota: u64,
    ) -> Result<(), HostError> {
        check_key(key)?;
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_failed("write", e))?;
            let used = Self::lock_usage(&tx, plugin).await?;
            let st = tx
                .prepare_cached(
                    "SELECT octet_length(key) + octet_length(value) FROM corral_kv \
                     WHERE plugin = $1 AND key = $2",
                )
                .await
                .map_err(|e| pg_failed("write", e))?;
            let old = tx
                .query_opt(&st, &[&plugin, &key.as_bytes()])
                .await
                .map_err(|e| pg_failed("write", e))?
                .map_or(0, |r| r.get::<_, i32>(0).max(0) as u64);
            let new = (key.len() + value.len()) as u64;
            let after = used - old.min(used) + new;
            if after > quota && new > old {
                // Dropped without commit: rolled back.
                return Err(HostError::Quota {
                    used,
                    limit: quota,
                    needed: new - old,
                });
            }
            let st = tx
                .prepare_cached(
                    "INSERT INTO corral_kv (plugin, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await
                .map_err(|e| pg_failed("write", e))?;
            tx.execute(&st, &[&plugin, &key.as_bytes(), &value])
                .await
                .map_err(|e| pg_failed("write", e))?;
            Self::set_usage(&tx, plugin, after).await?;
            tx.commit().await.map_err(|e| pg_failed("commit", e))
        })
        .await
    }

    /// Delete `key`; whether it existed.
    pub async fn delete(&self, plugin: &str, key: &str) -> Result<bool, HostError> {
        check_key(key)?;
        self.timed(async {
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_failed("write", e))?;
            let used = Self::lock_usage(&tx, plugin).await?;
            let st = tx
                .prepare_cached(
                    "DELETE FROM corral_kv WHERE plugin = $1 AND key = $2 \
                     RETURNING octet_length(key) + octet_length(value)",
                )
                .await
                .map_err(|e| pg_failed("write", e))?;
            let freed = tx
                .query_opt(&st, &[&plugin, &key.as_bytes()])
                .await
                .map_err(|e| pg_failed("write", e))?
                .map(|r| r.get::<_, i32>(0).max(0) as u64);
            if let Some(freed) = freed {
                Self::set_usage(&tx, plugin, used.saturating_sub(freed)).await?;
            }
            tx.commit().await.map_err(|e| pg_failed("commit", e))?;
            Ok(freed.is_some())
        })
        .await
    }

    /// Keys starting with `prefix`, in byte order (at most [`MAX_KEYS`]).
    pub async fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, HostError> {
        self.timed(async {
            let client = self.client().await?;
            // From the prefix on, in order: the matching keys come first, and one
            // more row than the most an answer holds tells a listing too long.
            let st = client
                .prepare_cached(
                    "SELECT key FROM corral_kv WHERE plugin = $1 AND key >= $2 \
                     ORDER BY key LIMIT $3",
                )
                .await
                .map_err(|e| pg_failed("read", e))?;
            let limit = MAX_KEYS as i64 + 1;
            let rows = client
                .query(&st, &[&plugin, &prefix.as_bytes(), &limit])
                .await
                .map_err(|e| pg_failed("read", e))?;
            let mut out = Vec::new();
            for row in rows {
                let key: Vec<u8> = row.get(0);
                if !key.starts_with(prefix.as_bytes()) {
                    break;
                }
                if out.len() == MAX_KEYS {
                    return Err(HostError::Invalid(format!(
                        "more than {MAX_KEYS} keys start with {prefix:?}; use a longer prefix"
                    )));
                }
                out.push(String::from_utf8(key).map_err(|e| pg_failed("read", e))?);
            }
            Ok(out)
        })
        .await
    }

    /// Write a message for the other nodes and announce it; answered after commit.
    pub async fn publish(
        &self,
        node: &str,
        from: &str,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), HostError> {
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached(
                    "WITH m AS (INSERT INTO corral_messages (node, publisher, topic, payload) \
                     VALUES ($1, $2, $3, $4) RETURNING id) \
                     SELECT pg_notify('corral_topics', $1::text || ' ' || m.id || ' ' || $3::text) \
                     FROM m",
                )
                .await
                .map_err(|e| pg_failed("publish", e))?;
            client
                .execute(&st, &[&node, &from, &topic, &payload])
                .await
                .map_err(|e| pg_failed("publish", e))?;
            Ok(())
        })
        .await
    }

    /// A connection that LISTENs on [`CHANNEL`], and its notifications' payloads.
    /// The channel is bounded: while the node is slow to deliver, notifications
    /// wait in the server's queue, not in this process.
    pub async fn listen(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::Receiver<String>), HostError> {
        self.timed(async {
            // The tables, through the pool, before the first message is read.
            drop(self.client().await?);
            let (client, mut connection) = self
                .config
                .connect(self.tls.clone())
                .await
                .map_err(|e| pg_failed(&format!("connection to {}", self.shown), e))?;
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                            if tx.send(n.payload().to_owned()).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!("topics: the listening connection failed: {e}");
                            return;
                        }
                        None => return,
                    }
                }
            });
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| pg_failed("listen", e))?;
            Ok((client, rx))
        })
        .await
    }

    /// The message `id`: (publisher, topic, payload); `None` once it has expired.
    pub async fn message(&self, id: i64) -> Result<Option<(String, String, Vec<u8>)>, HostError> {
        self.timed(async {
            let client = self.client().await?;
            let st = client
                .prepare_cached(
                    "SELECT publisher, topic, payload FROM corral_messages WHERE id = $1",
                )
                .await
                .map_err(|e| pg_failed("read", e))?;
            let row = client
                .query_opt(&st, &[&id])
                .await
                .map_err(|e| pg_failed("read", e))?;
            Ok(row.map(|r| (r.get(0), r.get(1), r.get(2))))
        })
        .await
    }

    /// Delete messages older than [`MESSAGE_RETENTION`]; how many.
    pub async fn expire_messages(&self) -> Result<u64, HostError> {
        self.timed(async {
            let client = self.client().await?;
            client
                .execute(
                    &format!(
                        "DELETE FROM corral_messages WHERE at < now() - interval '{MESSAGE_RETENTION}'"
                    ),
                    &[],
                )
                .await
                .map_err(|e| pg_failed("expire", e))
        })
        .await
    }
}
