//! Plugins on a live supervisor: discovery of a plugins directory, hot reload of a
//! plugin's code and manifest, and removal.
//!
//! # Reload without lost calls
//!
//! A changed plugin (its files' [`fingerprint`] differs from the loaded version's) is
//! read, checked (manifest, signature, dependencies: no plugin that resolves now may
//! be blocked by the new version) and loaded in a fresh worker **while the old
//! version keeps serving**. Only once the new worker is ready does it take the
//! plugin's place in the table; then the old version is retired:
//!
//! - calls already sent to the old worker finish there (each within its deadline);
//! - calls that had looked the old version up but not yet reached its worker are
//!   passed to the new one (the worker refuses them without sending anything, see
//!   `WorkerHandle::try_call`);
//! - once the old worker has no call left it runs its `shutdown` hook and exits.
//!
//! The call count, the bounded queue and the subscription queue carry over, so a
//! reload is invisible to callers. A version that cannot be read or loaded is
//! rejected: the old one keeps serving, the reason is logged and shown by
//! `corral status`, and the same files are not tried again until they change.
//!
//! Workers run a copy of their version's files ([`crate::versions`]), so a version
//! keeps running as it was checked through worker restarts, whatever its directory
//! holds meanwhile (a rejected edit, a file being written).
//!
//! A plugin whose directory disappears (or loses its `plugin.toml`) is taken out of
//! the table at once (new calls get "unknown plugin") and its worker retired the same
//! way: calls in flight finish first.

use super::{AddPluginError, HEALTH_EXPORT, Inner, Plugin, error_chain};
use crate::plugins::files::{FileHashes, QUIET, fingerprint, fingerprint_with, last_change};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What the lifecycle remembers between passes.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    hashes: FileHashes,
}

/// Plugin directories whose current files were rejected: their fingerprint (not tried
/// again until it changes; `None` if it could not be computed) and why. Kept under a
/// lock of its own (`Inner::rejected`) so that `corral status` never waits for a pass.
pub(crate) type Rejected = BTreeMap<PathBuf, (Option<String>, String)>;

/// What one [`Supervisor::sync_plugins`](super::Supervisor::sync_plugins) pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Plugins loaded for the first time (ids).
    pub added: Vec<String>,
    /// Plugins now serving a new version: `id old-version -> new-version`.
    pub reloaded: Vec<String>,
    /// Plugins removed (ids); their workers are draining.
    pub removed: Vec<String>,
    /// Directories whose files were rejected, with why; the old version (if any)
    /// keeps serving.
    pub rejected: Vec<String>,
    /// Directories whose files are still changing (written within [`QUIET`], or
    /// changed while their new version loaded): the caller should pass again after
    /// [`QUIET`].
    pub unsettled: Vec<PathBuf>,
}

/// Why a version of a plugin is not loaded (kept as its directory's rejection, or
/// as the plugin's last error when a policy change needs a new worker).
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotLoaded {
    #[error("{}", error_chain(.0))]
    Duplicate(AddPluginError),
    #[error("no plugin {0:?}")]
    Gone(String),
    /// Dependency resolution blocks it.
    #[error("not loaded: {0}")]
    Blocked(crate::plugins::deps::Blocked),
    #[error("not loaded: version {version} would block plugin {other}: {why}")]
    WouldBlock {
        version: String,
        other: String,
        why: crate::plugins::deps::Blocked,
    },
    #[error("not loaded: dependency {dep} cannot start: {error}")]
    Dependency {
        dep: String,
        error: corral_protocol::CallError,
    },
    #[error("the new version does not load: {}", error_chain(.0))]
    Start(crate::worker::StartError),
}

impl SyncReport {
    pub fn is_empty(&self) -> bool {
        *self == SyncReport::default()
    }
}

impl Inner {
    /// Bring the supervisor's plugins in line with `dirs` (plugin directories): add
    /// the new ones, reload the changed ones, remove the ones no longer there. Every
    /// new or changed version is loaded in a worker before it serves; see the module
    /// documentation for how calls are kept.
    pub(crate) async fn sync_plugins(&self, dirs: &[PathBuf]) -> SyncReport {
        let mut lc = self.lifecycle.lock().await;
        let mut report = SyncReport::default();
        let wanted: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
            v.sort();
            v.dedup();
            v
        };
        self.rejected().retain(|d, _| wanted.contains(d));
        lc.hashes.retain_under(&wanted);

        for p in self.all_plugins() {
            if !wanted.contains(&p.dir) {
                self.unload(&p).await;
                tracing::info!(plugin = %p.manifest.id, dir = %p.dir.display(), "plugin removed; its worker drains");
                report.removed.push(p.manifest.id.clone());
            }
        }

        // A version rejected because of other plugins (a dependency not there yet)
        // may load once they change: after a pass that changed anything, the
        // rejected directories are tried again.
        let mut retry_rejected = false;
        for _round in 0..=wanted.len() {
            let changed_before = report.added.len() + report.reloaded.len();
            let skipped = self
                .sync_round(&mut lc, &mut report, &wanted, retry_rejected)
                .await;
            let changed = report.added.len() + report.reloaded.len() > changed_before;
            if !(changed && skipped) {
                break;
            }
            retry_rejected = true;
        }
        report
    }

    /// One round of [`Inner::sync_plugins`] over the wanted directories; returns
    /// whether a rejected, unchanged directory was skipped (or retried).
    async fn sync_round(
        &self,
        lc: &mut Lifecycle,
        report: &mut SyncReport,
        wanted: &[PathBuf],
        retry_rejected: bool,
    ) -> bool {
        let mut skipped = false;
        // Read every new or changed version first, so that new plugins can be loaded
        // after the new plugins they depend on.
        let mut pending: Vec<(Plugin, Option<Arc<Plugin>>)> = Vec::new();
        for dir in wanted {
            let old = self.all_plugins().into_iter().find(|p| &p.dir == dir);
            let fp = fingerprint_with(dir, &mut lc.hashes).ok();
            if old
                .as_ref()
                .is_some_and(|o| Some(&o.fingerprint) == fp.as_ref())
            {
                self.rejected().remove(dir);
                continue;
            }
            let settled = last_change(dir).is_ok_and(|t| {
                std::time::SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age >= QUIET)
            }) && self.writes.writing_under(dir).is_none();
            if !settled {
                report.unsettled.push(dir.clone());
                continue;
            }
            if fp.is_some() && self.rejected().get(dir).is_some_and(|(f, _)| f == &fp) {
                skipped = true;
                if !retry_rejected {
                    continue; // Rejected before and unchanged since.
                }
            }
            match self.read_plugin(dir, old.as_deref()) {
                Ok(new) => pending.push((new, old)),
                // Caught changing: read again once the files settle.
                Err(AddPluginError::Changed { .. }) => report.unsettled.push(dir.clone()),
                Err(e) => {
                    let why = error_chain(&e);
                    self.reject(report, dir, fp, why, old.as_deref());
                }
            }
        }
        let order = {
            let mut map: BTreeMap<String, &corral_manifest::Manifest> = BTreeMap::new();
            let all = self.all_plugins();
            for p in &all {
                map.insert(p.manifest.id.clone(), &p.manifest);
            }
            for (new, _) in &pending {
                map.insert(new.manifest.id.clone(), &new.manifest);
            }
            crate::plugins::deps::resolve(&map).order
        };
        pending.sort_by_key(|(new, _)| {
            order
                .iter()
                .position(|id| id == &new.manifest.id)
                .unwrap_or(usize::MAX)
        });
        for (new, old) in pending {
            let dir = new.dir.clone();
            let fp = Some(new.fingerprint.clone());
            let (id, version) = (new.manifest.id.clone(), new.manifest.version.to_string());
            match self.load_version(new, old.clone()).await {
                Ok(()) => {
                    self.rejected().remove(&dir);
                    match old {
                        Some(o) if o.manifest.id == id => {
                            let line = format!("{id} {} -> {version}", o.manifest.version);
                            tracing::info!(plugin = %id, "plugin reloaded: {line}");
                            report.reloaded.push(line);
                        }
                        other => {
                            if let Some(o) = other {
                                report.removed.push(o.manifest.id.clone());
                            }
                            tracing::info!(plugin = %id, %version, dir = %dir.display(), "plugin added");
                            report.added.push(id);
                        }
                    }
                }
                // No room for its worker now: tried again at the next pass,
                // not remembered against its files.
                Err(NotLoaded::Start(crate::worker::StartError::Overloaded(why))) => {
                    tracing::warn!(dir = %dir.display(), "plugin not loaded yet: {why}");
                    if let Some(o) = &old {
                        o.state
                            .lock()
                            .await
                            .note_error(format!("new version not loaded yet: {why}"));
                    }
                    report.unsettled.push(dir);
                }
                Err(why) => self.reject(report, &dir, fp, why.to_string(), old.as_deref()),
            }
        }
        skipped
    }

    /// Remember that the plugin in `dir` could not be added (at start), so that `corral
    /// status` shows it and it is retried when its files change.
    pub(crate) async fn record_rejection(&self, dir: &Path, why: String) {
        let _lc = self.lifecycle.lock().await;
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        let mut report = SyncReport::default();
        self.reject(&mut report, &dir, fingerprint(&dir).ok(), why, None);
    }

    /// Why the current files of plugin directories were rejected (`dir: why`).
    pub(crate) async fn lifecycle_errors(&self) -> Vec<String> {
        self.rejected()
            .iter()
            .map(|(d, (_, why))| format!("{}: {why}", d.display()))
            .collect()
    }

    /// Check `new`, start it in a worker, and put it in the table in place of `old`
    /// (which is retired after its calls).
    pub(super) async fn load_version(
        &self,
        new: Plugin,
        old: Option<Arc<Plugin>>,
    ) -> Result<(), NotLoaded> {
        let id = new.manifest.id.clone();
        if let Some(other) = self.plugin(&id)
            && old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, &other))
        {
            return Err(NotLoaded::Duplicate(AddPluginError::Duplicate {
                id,
                dir: new.dir,
                other: other.dir.clone(),
            }));
        }
        // Dependencies: the new version must resolve, and must not block a plugin
        // that resolves now.
        {
            let all = self.all_plugins();
            let mut map: BTreeMap<String, &corral_manifest::Manifest> = all
                .iter()
                .filter(|p| old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, p)))
                .map(|p| (p.manifest.id.clone(), &p.manifest))
                .collect();
            map.insert(id.clone(), &new.manifest);
            let after = crate::plugins::deps::resolve(&map);
            if let Some(why) = after.blocked.get(&id) {
                return Err(NotLoaded::Blocked(why.clone()));
            }
            let before = self.dependencies();
            if let Some((other, why)) = after
                .blocked
                .iter()
                .find(|(other, _)| !before.blocked.contains_key(*other))
            {
                return Err(NotLoaded::WouldBlock {
                    version: new.manifest.version.to_string(),
                    other: other.clone(),
                    why: why.clone(),
                });
            }
        }
        for dep in new.manifest.dependencies.keys() {
            if let Some(d) = self.plugin(dep) {
                Box::pin(self.restart(&d.manifest.id))
                    .await
                    .map_err(|error| NotLoaded::Dependency {
                        dep: dep.clone(),
                        error,
                    })?;
            }
        }
        let started = self.start_worker(&new).await.map_err(NotLoaded::Start)?;
        let worker = Arc::clone(&started.worker);
        tracing::info!(plugin = %id, pid = worker.pid, version = %new.manifest.version, "new version ready");
        new.state.lock().await.ready(started);
        if worker.exports.iter().any(|e| e == HEALTH_EXPORT) {
            self.watch_health(&id, &worker, &new.freed);
        }
        let new = Arc::new(new);
        let replaced = self.install(Arc::clone(&new));
        if let Some(o) = &old {
            if o.manifest.id != id {
                self.uninstall(o);
            }
            self.retire(o).await;
        }
        if let Some(r) = replaced
            && old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, &r))
        {
            self.retire(&r).await;
        }
        Ok(())
    }

    /// Take `p` out of the table and retire its worker after its calls.
    pub(crate) async fn unload(&self, p: &Arc<Plugin>) {
        self.uninstall(p);
        self.retire(p).await;
    }

    /// Mark `p` retired (calls that still hold it go to the current version) and let
    /// its worker finish its calls, run its shutdown hook and exit, in the background.
    pub(crate) async fn retire(&self, p: &Plugin) {
        let mut st = p.state.lock().await;
        p.retired.store(true, Ordering::SeqCst);
        for r in st.retire() {
            self.drain(r);
        }
        drop(st);
        // Calls waiting for one of its workers go to the current version.
        p.freed.notify_waiters();
    }

    /// Start a fresh worker for `plugin` from its directory (after a policy change
    /// that a running worker cannot take), and retire the old one after its calls.
    pub(crate) async fn renew(&self, plugin: &str) -> Result<(), NotLoaded> {
        let _lc = self.lifecycle.lock().await;
        let old = self
            .plugin(plugin)
            .ok_or_else(|| NotLoaded::Gone(plugin.to_owned()))?;
        // The same version in a new worker: file changes are the watcher's business.
        let new = Inner::same_version(&old);
        self.load_version(new, Some(old)).await
    }
}

impl Inner {
    fn rejected(&self) -> std::sync::MutexGuard<'_, Rejected> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remember that `dir`'s files were rejected, and report it (logged once for the
    /// same files and reason, however many rounds try them).
    fn reject(
        &self,
        report: &mut SyncReport,
        dir: &Path,
        fingerprint: Option<String>,
        why: String,
        old: Option<&Plugin>,
    ) {
        report.rejected.push(format!("{}: {why}", dir.display()));
        let entry = (fingerprint, why);
        let mut rejected = self.rejected();
        if rejected.get(dir) == Some(&entry) {
            return;
        }
        let why = &entry.1;
        match old {
            Some(o) => tracing::error!(
                plugin = %o.manifest.id,
                dir = %dir.display(),
                "new version rejected; version {} keeps serving: {why}",
                o.manifest.version
            ),
            None => tracing::error!(dir = %dir.display(), "plugin rejected: {why}"),
        }
        rejected.insert(dir.to_owned(), entry);
    }
}
