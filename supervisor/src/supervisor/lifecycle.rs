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
//!
//! # One plugin's load holds up no other
//!
//! Loading a version runs the plugin's own code (its top level and `init`, up to
//! the policy's `init_timeout`), so a load must never hold what other plugins wait
//! for. Loads of one plugin take turns ([`Inner::load_turn`]): a reload, a renewal
//! under a new policy and a change of its settings each start from the version
//! the one before installed. Loads of different plugins run side by side: the
//! versions of one pass load together (up to [`PARALLEL_LOADS`] at once, each
//! after the ones it depends on), and the lifecycle lock is held only to plan a
//! pass and to put a loaded version in the table, never through a load. A pass
//! leaves alone a directory whose version another pass is still loading (that
//! pass reads it again if its files changed meanwhile).

use super::{AddPluginError, HEALTH_EXPORT, Inner, Plugin, error_chain};
use crate::plugins::files::{FileHashes, QUIET, fingerprint, fingerprint_with, last_change};
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// How many versions one pass (or one policy or configuration change) loads at
/// once. Each load is a worker start with the plugin's `init`: a few plugins
/// whose `init` takes its whole deadline hold only their own places.
pub(crate) const PARALLEL_LOADS: usize = 16;

/// What the lifecycle remembers between passes.
#[derive(Debug, Default)]
pub(crate) struct Lifecycle {
    hashes: FileHashes,
    /// The plugin directories of the latest pass: a version loaded for a
    /// directory no longer among them is not put in the table.
    wanted: BTreeSet<PathBuf>,
}

/// Loads under way: plugin directories a pass is loading a version of, and one
/// turn per plugin id (see [`Inner::load_turn`]).
#[derive(Debug, Default)]
pub(crate) struct Loads {
    /// Each with whether a pass left it alone since (its files may have changed).
    dirs: std::sync::Mutex<BTreeMap<PathBuf, bool>>,
    turns: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A plugin's turn to load a version (see [`Inner::load_turn`]); its place in
/// [`Loads`] goes when nobody holds or waits for it.
pub(crate) struct LoadTurn<'a> {
    loads: &'a Loads,
    id: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LoadTurn<'_> {
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else {
            return;
        };
        let lock = Arc::clone(tokio::sync::OwnedMutexGuard::mutex(&guard));
        drop(guard);
        let mut turns = self.loads.turns.lock().unwrap_or_else(|e| e.into_inner());
        // The table's and ours: nobody waits for it (waiters take theirs under
        // this lock).
        if Arc::strong_count(&lock) == 2 {
            turns.remove(&self.id);
        }
    }
}

/// A directory a pass is loading a version of; other passes leave it alone
/// until this is dropped.
struct Loading<'a> {
    loads: &'a Loads,
    dir: PathBuf,
}

impl Loading<'_> {
    /// The load is over: whether a pass left the directory alone meanwhile.
    fn finish(self) -> bool {
        let skipped = self
            .loads
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&self.dir)
            .copied();
        skipped == Some(true)
    }
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        self.loads
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.dir);
    }
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
    #[error("not loaded: the supervisor is stopping")]
    Stopped,
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
        let mut report = SyncReport::default();
        let wanted: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
            v.sort();
            v.dedup();
            v
        };
        {
            let mut lc = self.lifecycle.lock().await;
            lc.wanted = wanted.iter().cloned().collect();
            self.rejected().retain(|d, _| wanted.contains(d));
            lc.hashes.retain_under(&wanted);
            for p in self.all_plugins() {
                if !wanted.contains(&p.dir) {
                    self.unload(&p).await;
                    tracing::info!(plugin = %p.manifest.id, dir = %p.dir.display(), "plugin removed; its worker drains");
                    report.removed.push(p.manifest.id.clone());
                }
            }
        }

        // A version rejected because of other plugins (a dependency not there yet)
        // may load once they change: after a pass that changed anything, the
        // rejected directories are tried again.
        let mut retry_rejected = false;
        for _round in 0..=wanted.len() {
            let changed_before = report.added.len() + report.reloaded.len();
            let skipped = self.sync_round(&mut report, &wanted, retry_rejected).await;
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
        report: &mut SyncReport,
        wanted: &[PathBuf],
        retry_rejected: bool,
    ) -> bool {
        let mut skipped = false;
        // Read every new or changed version first, so that new plugins can be loaded
        // after the new plugins they depend on.
        let mut pending: Vec<(Plugin, Option<Arc<Plugin>>)> = Vec::new();
        let mut changed = Vec::new();
        let mut loading: BTreeMap<PathBuf, Loading<'_>> = BTreeMap::new();
        {
            let mut lc = self.lifecycle.lock().await;
            for dir in wanted {
                if let Some(skipped) = self
                    .loads
                    .dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(dir)
                {
                    // Another pass is loading its version, and passes again
                    // when that load ends.
                    *skipped = true;
                    continue;
                }
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
                self.loads
                    .dirs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(dir.clone(), false);
                loading.insert(
                    dir.clone(),
                    Loading {
                        loads: &self.loads,
                        dir: dir.clone(),
                    },
                );
                changed.push((dir.clone(), fp, old));
            }
        }
        // Read (hashed and copied: a large plugin takes a while) off the lock and
        // off the runtime's threads.
        for (dir, fp, old) in changed {
            match self.read_plugin_blocking(&dir, old.clone()).await {
                Ok(new) => pending.push((new, old)),
                // Caught changing: read again once the files settle.
                Err(AddPluginError::Changed { .. }) => report.unsettled.push(dir),
                Err(e) => {
                    let why = error_chain(&e);
                    self.reject(report, &dir, fp, why, old.as_deref());
                }
            }
        }
        loading.retain(|dir, _| pending.iter().any(|(new, _)| &new.dir == dir));
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
        // Side by side, each after the versions of this pass it depends on (only
        // ones earlier in the order: a cycle cannot wait for itself).
        let ids: Vec<String> = pending.iter().map(|(n, _)| n.manifest.id.clone()).collect();
        let done: Vec<tokio::sync::watch::Sender<bool>> = ids
            .iter()
            .map(|_| tokio::sync::watch::Sender::new(false))
            .collect();
        let mut loads = Vec::new();
        for (i, (new, old)) in pending.into_iter().enumerate() {
            let before: Vec<tokio::sync::watch::Receiver<bool>> = new
                .manifest
                .dependencies
                .keys()
                .filter_map(|dep| ids[..i].iter().position(|id| id == dep))
                .map(|j| done[j].subscribe())
                .collect();
            let done = &done[i];
            let guard = loading.remove(&new.dir);
            loads.push(async move {
                for mut dep in before {
                    let _ = dep.wait_for(|loaded| *loaded).await;
                }
                let dir = new.dir.clone();
                let fp = new.fingerprint.clone();
                let (id, version) = (new.manifest.id.clone(), new.manifest.version.to_string());
                let loaded = self.load_from_pass(new, old).await;
                done.send_replace(true);
                // Pass again once the files settle if they changed while it
                // loaded, if another pass left the directory alone meanwhile, or
                // if it was removed and made again.
                let skipped = guard.is_some_and(Loading::finish);
                let again = !matches!(loaded, Err(NotLoaded::Stopped)) && {
                    let mut lc = self.lifecycle.lock().await;
                    lc.wanted.contains(&dir)
                        && (skipped
                            || matches!(loaded, Err(NotLoaded::Gone(_)))
                            || fingerprint_with(&dir, &mut lc.hashes).ok().as_ref() != Some(&fp))
                };
                (i, dir, fp, id, version, loaded, again)
            });
        }
        let mut loaded: Vec<_> = futures_util::stream::iter(loads)
            .buffer_unordered(PARALLEL_LOADS)
            .collect()
            .await;
        // Reported in the order they were loaded in (dependencies first).
        loaded.sort_by_key(|l| l.0);
        for (_, dir, fp, id, version, result, again) in loaded {
            if again && !report.unsettled.contains(&dir) {
                report.unsettled.push(dir.clone());
            }
            match result {
                Ok(old) => {
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
                    if let Some(o) = self.all_plugins().into_iter().find(|p| p.dir == dir) {
                        o.state
                            .lock()
                            .await
                            .note_error(format!("new version not loaded yet: {why}"));
                    }
                    if !report.unsettled.contains(&dir) {
                        report.unsettled.push(dir);
                    }
                }
                // Removed while it loaded, or the supervisor is stopping.
                Err(NotLoaded::Gone(_) | NotLoaded::Stopped) => {}
                Err(why) => {
                    let old = self.all_plugins().into_iter().find(|p| p.dir == dir);
                    self.reject(report, &dir, Some(fp), why.to_string(), old.as_deref());
                }
            }
        }
        skipped
    }

    /// Load `new`, a version a pass read, in place of the version now in its
    /// directory (`old` when the pass read it, or what a turn since installed).
    async fn load_from_pass(
        &self,
        mut new: Plugin,
        old: Option<Arc<Plugin>>,
    ) -> Result<Option<Arc<Plugin>>, NotLoaded> {
        let id = new.manifest.id.clone();
        let _turn = self.load_turn(&id).await;
        let old = match old {
            Some(o) if o.manifest.id == id => {
                Some(self.plugin(&id).filter(|now| now.dir == o.dir).unwrap_or(o))
            }
            other => other,
        };
        // The operator's settings now (a configuration reload while it waited).
        let settings = self
            .live()
            .plugin_config
            .get(&id)
            .cloned()
            .unwrap_or_default();
        if *new.settings != settings {
            new = Inner::same_version_with(&new, Arc::new(settings));
        }
        self.load_version(new, old, true).await
    }

    /// [`Inner::read_plugin`] on the blocking pool: it hashes and copies the
    /// plugin's files.
    pub(crate) async fn read_plugin_blocking(
        &self,
        dir: &Path,
        old: Option<Arc<Plugin>>,
    ) -> Result<Plugin, AddPluginError> {
        let Some(me) = self.me.upgrade() else {
            return self.read_plugin(dir, old.as_deref());
        };
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || me.read_plugin(&dir, old.as_deref()))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// `id`'s turn to load a version: loads of one plugin (a reload, a renewal
    /// under a new policy, new settings) one at a time, each from what the one
    /// before installed; loads of other plugins do not wait for it.
    pub(crate) async fn load_turn(&self, id: &str) -> LoadTurn<'_> {
        let lock = self.turn_lock(id);
        LoadTurn {
            loads: &self.loads,
            id: id.to_owned(),
            guard: Some(lock.lock_owned().await),
        }
    }

    /// `id`'s turn if no load of it is under way or waiting.
    pub(crate) fn try_load_turn(&self, id: &str) -> Option<LoadTurn<'_>> {
        let guard = self.turn_lock(id).try_lock_owned().ok();
        Some(LoadTurn {
            loads: &self.loads,
            id: id.to_owned(),
            guard: Some(guard?),
        })
    }

    fn turn_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            self.loads
                .turns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id.to_owned())
                .or_default(),
        )
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
    /// (which is retired after its calls); returns the version it replaced. The
    /// caller holds the plugin's [`Inner::load_turn`]; `from_pass`: a directory's
    /// version, put in the table only if a pass still wants its directory.
    pub(super) async fn load_version(
        &self,
        new: Plugin,
        old: Option<Arc<Plugin>>,
        from_pass: bool,
    ) -> Result<Option<Arc<Plugin>>, NotLoaded> {
        let id = new.manifest.id.clone();
        self.may_install(&new, old.as_ref())?;
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
        // The plugin's own code runs here (up to its `init_timeout`), with no lock
        // held that another plugin's load, a pass or a policy change waits for.
        let mut stopping = self.stopping.subscribe();
        let started = tokio::select! {
            started = self.start_worker(&new) => started.map_err(NotLoaded::Start)?,
            _ = stopping.wait_for(|stop| *stop) => return Err(NotLoaded::Stopped),
        };
        let worker = Arc::clone(&started.worker);
        // Checked again: other plugins were added, reloaded and removed meanwhile.
        let lc = self.lifecycle.lock().await;
        // Its directory left the plugins, or the version it replaces was removed.
        let gone = (from_pass && !lc.wanted.contains(&new.dir))
            || old
                .as_ref()
                .is_some_and(|o| o.retired.load(Ordering::SeqCst));
        let still = if *self.stopping.borrow() {
            // A shutdown takes this lock after it says so: what it stops is in
            // the table and the draining list by then, and nothing after.
            Err(NotLoaded::Stopped)
        } else if gone {
            Err(NotLoaded::Gone(id.clone()))
        } else {
            self.may_install(&new, old.as_ref())
        };
        if let Err(why) = still {
            worker.kill_because(format!("started for a version that cannot serve: {why}"));
            return Err(why);
        }
        tracing::info!(plugin = %id, pid = worker.pid, version = %new.manifest.version, "new version ready");
        let effective = started.effective.clone();
        new.state.lock().await.ready(started);
        if worker.exports.iter().any(|e| e == HEALTH_EXPORT) {
            self.watch_health(&id, &worker, &new.freed);
        }
        let new = Arc::new(new);
        let replaced = self.install(Arc::clone(&new));
        // After it is in the table: a policy edit stored from now on finds it
        // there, and one stored before is seen here.
        self.catch_up_policy(&new, &mut *new.state.lock().await, &effective);
        if let Some(o) = &old {
            if o.manifest.id != id {
                self.uninstall(o);
            }
            self.retire(o).await;
        }
        if let Some(r) = &replaced
            && old.as_ref().is_none_or(|o| !Arc::ptr_eq(o, r))
        {
            self.retire(r).await;
        }
        drop(lc);
        Ok(old)
    }

    /// Whether `new` may take `old`'s place in the table now: its id free, its
    /// dependencies resolved, and no plugin that resolves now blocked by it.
    fn may_install(&self, new: &Plugin, old: Option<&Arc<Plugin>>) -> Result<(), NotLoaded> {
        let id = &new.manifest.id;
        if let Some(other) = self.plugin(id)
            && old.is_none_or(|o| !Arc::ptr_eq(o, &other))
        {
            return Err(NotLoaded::Duplicate(AddPluginError::Duplicate {
                id: id.clone(),
                dir: new.dir.clone(),
                other: other.dir.clone(),
            }));
        }
        let all = self.all_plugins();
        let mut map: BTreeMap<String, &corral_manifest::Manifest> = all
            .iter()
            .filter(|p| old.is_none_or(|o| !Arc::ptr_eq(o, p)))
            .map(|p| (p.manifest.id.clone(), &p.manifest))
            .collect();
        map.insert(id.clone(), &new.manifest);
        let after = crate::plugins::deps::resolve(&map);
        if let Some(why) = after.blocked.get(id) {
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
    #[cfg(test)]
    pub(crate) async fn renew(&self, plugin: &str) -> Result<(), NotLoaded> {
        let _turn = self.load_turn(plugin).await;
        self.renew_in_turn(plugin).await
    }

    /// [`Inner::renew`] by the holder of `plugin`'s [`Inner::load_turn`].
    pub(crate) async fn renew_in_turn(&self, plugin: &str) -> Result<(), NotLoaded> {
        let old = self
            .plugin(plugin)
            .ok_or_else(|| NotLoaded::Gone(plugin.to_owned()))?;
        // The same version in a new worker, with the operator's settings in
        // force: file changes are the watcher's business.
        let settings = self
            .live()
            .plugin_config
            .get(plugin)
            .cloned()
            .unwrap_or_default();
        let new = Inner::same_version_with(&old, Arc::new(settings));
        self.load_version(new, Some(old), false).await.map(|_| ())
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
