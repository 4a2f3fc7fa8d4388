//! Live reload: the daemon watches its policy files and switches to an edited policy
//! once it validates (a bad edit keeps the last good policy and is reported by the log
//! and `corral status`), and watches its plugins (the configured directories and the
//! plugins directory) and adds, reloads and removes them as their files change (see
//! [`crate::supervisor::lifecycle`]).

use crate::Supervisor;
use corral_policy::Policy;
use notify::Watcher;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer, notify};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long edits must be quiet before the policy is reloaded (editors write files in
/// several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// Watches the policy; dropping it stops watching.
pub struct PolicyWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for PolicyWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyWatcher")
    }
}

/// Watch `path` (a policy directory or file) and apply every valid edit to `sup`.
pub fn watch_policy(path: &Path, sup: Arc<Supervisor>) -> notify::Result<PolicyWatcher> {
    let path = path.to_owned();
    // A single file is watched through its directory: editors replace files by rename.
    let (watched, only): (PathBuf, Option<PathBuf>) = if path.is_dir() {
        (path.clone(), None)
    } else {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (parent.to_owned(), Some(path.clone()))
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut debouncer = new_debouncer(DEBOUNCE, move |res: DebounceEventResult| match res {
        Ok(events) => {
            let relevant = events.iter().any(|e| {
                only.as_ref().is_none_or(|f| &e.path == f)
                    && (only.is_some() || e.path.extension().is_some_and(|x| x == "toml"))
            });
            if relevant {
                let _ = tx.send(());
            }
        }
        Err(e) => tracing::warn!("watching the policy: {e}"),
    })?;
    debouncer
        .watcher()
        .watch(&watched, notify::RecursiveMode::NonRecursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            reload(&path, &sup).await;
        }
    });
    Ok(PolicyWatcher {
        _debouncer: debouncer,
    })
}

/// Load the policy at `path` and switch `sup` to it, or keep the current one.
pub async fn reload(path: &Path, sup: &Supervisor) {
    match Policy::load(path) {
        Ok(p) => {
            let changes = sup.set_policy(p).await;
            tracing::info!(
                "policy reloaded from {} ({} change(s) to running workers)",
                path.display(),
                changes.len()
            );
        }
        Err(e) => sup.reject_policy(e.to_string()),
    }
}

/// Watches plugin directories; dropping it stops watching.
pub struct PluginWatcher {
    _watcher: Arc<std::sync::Mutex<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for PluginWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginWatcher")
    }
}

/// The plugins the daemon should run: the listed directories and every plugin
/// directory in `plugins_dir`.
#[derive(Debug, Clone, Default)]
pub struct PluginSources {
    pub dirs: Vec<PathBuf>,
    pub plugins_dir: Option<PathBuf>,
}

impl PluginSources {
    /// Every plugin directory now; an unreadable plugins directory is an error (the
    /// caller keeps the plugins it has rather than removing them all).
    pub fn scan(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut dirs = self.dirs.clone();
        if let Some(d) = &self.plugins_dir {
            dirs.extend(crate::plugins::files::discover(d)?);
        }
        Ok(dirs)
    }
}

/// Watch the plugins of `sources` and bring `sup` in line after every burst of
/// changes (debounced): new plugins are added, changed ones reloaded, removed ones
/// drained and unloaded.
pub fn watch_plugins(
    sources: PluginSources,
    sup: Arc<Supervisor>,
) -> notify::Result<PluginWatcher> {
    let roots: Vec<PathBuf> = sources
        .dirs
        .iter()
        .chain(&sources.plugins_dir)
        .map(|d| d.canonicalize().unwrap_or_else(|_| d.clone()))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The loop below keeps no sender: it ends when the watcher (and its callback,
    // which has the only one) is gone.
    let again = tx.downgrade();
    let filter = roots.clone();
    let writes = Arc::clone(&sup.inner().writes);
    // Roots that were created, removed or renamed (seen through their parent's
    // watch): watched again after the next pass. (Their inode alone cannot tell: a
    // directory removed and made again often gets the same inode number.)
    let touched: Arc<std::sync::Mutex<Vec<PathBuf>>> = Default::default();
    let touch = Arc::clone(&touched);
    // Raw events, debounced below: which files are open for writing is known only from
    // the kind of each event (see `Writes`).
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode};
        match res {
            Ok(event) => {
                if !event
                    .paths
                    .iter()
                    .any(|p| filter.iter().any(|r| p.starts_with(r)))
                    && !event.need_rescan()
                {
                    return;
                }
                // Workers reading the files change nothing.
                if matches!(
                    event.kind,
                    EventKind::Access(
                        AccessKind::Open(_)
                            | AccessKind::Read
                            | AccessKind::Close(AccessMode::Read)
                    )
                ) {
                    return;
                }
                writes.note(&event);
                if !matches!(event.kind, EventKind::Access(_)) {
                    let mut t = touch.lock().unwrap_or_else(|e| e.into_inner());
                    for r in filter.iter().filter(|r| event.paths.contains(r)) {
                        if !t.contains(r) {
                            t.push(r.clone());
                        }
                    }
                }
                let _ = tx.send(());
            }
            Err(e) => tracing::warn!("watching the plugins: {e}"),
        }
    })?;
    let mut watched = Vec::new();
    for root in &roots {
        watcher.watch(root, notify::RecursiveMode::Recursive)?;
        watched.push(inode(root));
        // Through the parent too, to see the directory itself removed or replaced.
        if let Some(parent) = root.parent().filter(|p| p.is_dir()) {
            watcher.watch(parent, notify::RecursiveMode::NonRecursive)?;
        }
    }
    let watcher = Arc::new(std::sync::Mutex::new(watcher));
    let rewatch = Arc::new(Rewatch {
        watcher: Arc::downgrade(&watcher),
        roots,
        watched: std::sync::Mutex::new(watched),
        touched,
    });
    let sources = Arc::new(sources);
    tokio::spawn(async move {
        while rx.recv().await.is_some() && quiet(&mut rx).await {
            while rx.try_recv().is_ok() {}
            // Each pass on its own: a pass waiting for a plugin's `init` (up to
            // its deadline) holds up no later pass over the other plugins.
            let (sources, sup, rewatch, again) = (
                Arc::clone(&sources),
                Arc::clone(&sup),
                Arc::clone(&rewatch),
                again.clone(),
            );
            tokio::spawn(async move {
                // A watcher replaced (the configuration named other directories)
                // passes no more: its sources are not the plugins any more.
                if rewatch.watcher.strong_count() == 0 {
                    return;
                }
                let unsettled = !sync(&sources, &sup).await.unsettled.is_empty();
                let rewatched = rewatch.roots_made_again();
                // After a pass that found files still changing, pass again once
                // they have had time to settle, events or not.
                if unsettled || rewatched {
                    tokio::time::sleep(crate::plugins::files::QUIET).await;
                    if let Some(tx) = again.upgrade() {
                        let _ = tx.send(());
                    }
                }
            });
        }
    });
    Ok(PluginWatcher { _watcher: watcher })
}

/// Wait until the events pause for [`DEBOUNCE`] (but no longer than four times that,
/// so that a steady stream of changes still gets passes); false once the watcher is
/// gone.
async fn quiet(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < 4 * DEBOUNCE {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => break,
        }
    }
    true
}

/// The watched roots, to watch again when one is removed and made again.
struct Rewatch {
    watcher: std::sync::Weak<std::sync::Mutex<notify::RecommendedWatcher>>,
    roots: Vec<PathBuf>,
    /// Each root's inode when its watch began.
    watched: std::sync::Mutex<Vec<Option<u64>>>,
    /// Roots that were created, removed or renamed (seen through their parent's
    /// watch) since the last look.
    touched: Arc<std::sync::Mutex<Vec<PathBuf>>>,
}

impl Rewatch {
    /// Watch again each root removed and made again (or renamed in); true if one
    /// was: what was written before its watch began has no events, so one more
    /// pass must see it.
    fn roots_made_again(&self) -> bool {
        let Some(w) = self.watcher.upgrade() else {
            return false;
        };
        let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
        let again_roots: Vec<PathBuf> =
            std::mem::take(&mut *self.touched.lock().unwrap_or_else(|e| e.into_inner()));
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let mut again = false;
        for (root, seen) in self.roots.iter().zip(watched.iter_mut()) {
            let now = inode(root);
            if now.is_some() && (now != *seen || again_roots.contains(root)) {
                match w.watch(root, notify::RecursiveMode::Recursive) {
                    Ok(()) => {
                        *seen = now;
                        again = true;
                    }
                    Err(e) => tracing::warn!("cannot watch {}: {e}", root.display()),
                }
            }
        }
        again
    }
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// One pass: scan `sources` and apply the differences to `sup`.
pub async fn sync(sources: &PluginSources, sup: &Supervisor) -> crate::SyncReport {
    match sources.scan() {
        Ok(dirs) => sup.sync_plugins(&dirs).await,
        Err(e) => {
            tracing::error!(
                "cannot read the plugins directory {}; keeping the plugins as they are: {e}",
                sources
                    .plugins_dir
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display()
            );
            Default::default()
        }
    }
}
