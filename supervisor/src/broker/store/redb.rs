//! The embedded backend: one redb database in the supervisor's state
//! directory, one table per plugin id (`kv/<id>`), and a usage table with each
//! plugin's bytes (keys plus values) checked against its quota in the same write
//! transaction.
//!
//! A plugin's requests name only keys: the table is chosen by the supervisor from the
//! worker's plugin id, so no plugin can name another's. A write is answered after
//! its transaction commits with redb's immediate durability (fsync), so a write the
//! plugin saw acknowledged survives a SIGKILL of the supervisor. Tables are keyed by
//! plugin id, not version: the store survives restarts and upgrades.

use super::{MAX_KEYS, OpenStoreError, check_key, failed};
use corral_protocol::HostError;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;

const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");

/// The database.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Open (or create) the database at `path`, 0600.
    pub fn open(path: &Path) -> Result<RedbStore, OpenStoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|error| OpenStoreError::Dir {
                dir: dir.to_owned(),
                error,
            })?;
        }
        let db = Database::create(path).map_err(|error| OpenStoreError::Database {
            path: path.to_owned(),
            error,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        Ok(RedbStore { db })
    }

    fn table(plugin: &str) -> String {
        format!("kv/{plugin}")
    }

    pub fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        check_key(key)?;
        let name = Self::table(plugin);
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let tx = self.db.begin_read().map_err(|e| failed("read", e))?;
        let table = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(failed("read", e)),
        };
        let v = table.get(key).map_err(|e| failed("read", e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Bytes the plugin's keys and values take.
    #[cfg(test)]
    pub fn usage(&self, plugin: &str) -> Result<u64, HostError> {
        let tx = self.db.begin_read().map_err(|e| failed("read", e))?;
        let table = match tx.open_table(USAGE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(failed("read", e)),
        };
        Ok(table
            .get(plugin)
            .map_err(|e| failed("read", e))?
            .map_or(0, |v| v.value()))
    }

    /// Write `key`, refusing growth past `quota` bytes. Durable when it returns.
    pub fn put(&self, plugin: &str, key: &str, value: &[u8], quota: u64) -> Result<(), HostError> {
        check_key(key)?;
        let name = Self::table(plugin);
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let tx = self.db.begin_write().map_err(|e| failed("write", e))?;
        {
            let mut table = tx.open_table(def).map_err(|e| failed("write", e))?;
            let mut usage = tx.open_table(USAGE).map_err(|e| failed("write", e))?;
            let used = usage
                .get(plugin)
                .map_err(|e| failed("write", e))?
                .map_or(0, |v| v.value());
            let old = table
                .get(key)
                .map_err(|e| failed("write", e))?
                .map_or(0, |v| (key.len() + v.value().len()) as u64);
            let new = (key.len() + value.len()) as u64;
            let after = used - old.min(used) + new;
            if after > quota && new > old {
                return Err(HostError::Quota {
                    used,
                    limit: quota,
                    needed: new - old,
                });
            }
            table.insert(key, value).map_err(|e| failed("write", e))?;
            usage
                .insert(plugin, after)
                .map_err(|e| failed("write", e))?;
        }
        tx.commit().map_err(|e| failed("commit", e))
    }

    /// Delete `key`; whether it existed. Deleting a key that is not there takes
    /// neither the single writer nor an fsync (a plugin deleting missing keys in
    /// a loop would have queued a commit each ahead of its neighbours' writes).
    pub fn delete(&self, plugin: &str, key: &str) -> Result<bool, HostError> {
        check_key(key)?;
        if self.get(plugin, key)?.is_none() {
            return Ok(false);
        }
        let name = Self::table(plugin);
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let tx = self.db.begin_write().map_err(|e| failed("write", e))?;
        let existed = {
            let mut table = tx.open_table(def).map_err(|e| failed("write", e))?;
            let mut usage = tx.open_table(USAGE).map_err(|e| failed("write", e))?;
            let removed = table
                .remove(key)
                .map_err(|e| failed("write", e))?
                .map(|v| (key.len() + v.value().len()) as u64);
            if let Some(freed) = removed {
                let used = usage
                    .get(plugin)
                    .map_err(|e| failed("write", e))?
                    .map_or(0, |v| v.value());
                usage
                    .insert(plugin, used.saturating_sub(freed))
                    .map_err(|e| failed("write", e))?;
            }
            removed.is_some()
        };
        if !existed {
            // Deleted meanwhile: nothing to write.
            tx.abort().map_err(|e| failed("write", e))?;
            return Ok(false);
        }
        tx.commit().map_err(|e| failed("commit", e))?;
        Ok(true)
    }

    /// Keys starting with `prefix`, in byte order (at most [`MAX_KEYS`]).
    pub fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, HostError> {
        let name = Self::table(plugin);
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&name);
        let tx = self.db.begin_read().map_err(|e| failed("read", e))?;
        let table = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(failed("read", e)),
        };
        let mut out = Vec::new();
        for entry in table.range(prefix..).map_err(|e| failed("read", e))? {
            let (k, _) = entry.map_err(|e| failed("read", e))?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            if out.len() == MAX_KEYS {
                return Err(HostError::Invalid(format!(
                    "more than {MAX_KEYS} keys start with {prefix:?}; use a longer prefix"
                )));
            }
            out.push(k.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_KEY;
    use super::*;

    #[test]
    fn plugins_are_separate_quota_counts_and_data_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put("a", "k", b"12345", 100).unwrap();
            assert_eq!(s.get("a", "k").unwrap().as_deref(), Some(&b"12345"[..]));
            assert_eq!(s.get("b", "k").unwrap(), None);
            assert_eq!(s.keys("b", "").unwrap(), Vec::<String>::new());
            assert_eq!(s.usage("a").unwrap(), 6);
            // Growth past the quota is refused and changes nothing.
            let e = s.put("a", "big", &[0; 100], 100).unwrap_err();
            assert_eq!(
                e,
                HostError::Quota {
                    used: 6,
                    limit: 100,
                    needed: 103
                }
            );
            assert_eq!(s.get("a", "big").unwrap(), None);
            // Overwriting with something smaller is fine even when over quota later.
            s.put("a", "k", b"1", 100).unwrap();
            assert_eq!(s.usage("a").unwrap(), 2);
            s.put("a", "k2", b"x", 100).unwrap();
            assert_eq!(s.keys("a", "k").unwrap(), ["k", "k2"]);
            assert!(s.delete("a", "k").unwrap());
            assert!(!s.delete("a", "k").unwrap());
            assert_eq!(s.usage("a").unwrap(), 3);
            assert!(matches!(s.get("a", ""), Err(HostError::Invalid(_))));
            let long = "x".repeat(MAX_KEY + 1);
            assert!(matches!(
                s.put("a", &long, b"", 1 << 20),
                Err(HostError::Invalid(_))
            ));
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.get("a", "k2").unwrap().as_deref(), Some(&b"x"[..]));
        assert_eq!(s.usage("a").unwrap(), 3);
    }
}
