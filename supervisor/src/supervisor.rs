//! The supervisor: a set of plugins, each with at most one worker process, started on
//! demand and restarted with backoff after crashes.

use crate::access;
use crate::audit::{Audit, AuditSink};
use crate::fetch::Fetcher;
use crate::store::Store;
use crate::worker::Redactor;
use crate::worker::{SpawnSpec, StartError, WorkerHandle};
use corral_confine::cgroup::{CgroupBase, CgroupHost, CgroupLimits, PluginCgroup};
use corral_confine::{Level, SelfConfinement};
use corral_manifest::{Manifest, ManifestError, Runtime};
use corral_policy::{Effective, Policy};
use corral_protocol::Secret;
use corral_protocol::{
    CallError, EngineLimits, ExitReason, LoadSpec, PluginInfo, ResourceStats, WorkerKind,
};
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// When a crashed plugin is restarted, and when it is given up on.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// This many crashes within `window` mark the plugin failed.
    pub max_crashes: u32,
    pub window: Duration,
    /// Delay before the second restart in a window; doubles each time after.
    /// The first restart after a crash is immediate.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_crashes: 5,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RestartPolicy {
    /// Delay before restarting after `crashes` crashes in the window.
    pub fn backoff(&self, crashes: u32) -> Duration {
        match crashes {
            0 | 1 => Duration::ZERO,
            n => self
                .base_backoff
                .saturating_mul(1u32 << (n - 2).min(20))
                .min(self.max_backoff),
        }
    }
}

/// How the supervisor finds and runs workers.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory holding `corral-worker-wasm` (and later the JS and Python workers).
    pub worker_dir: PathBuf,
    /// Where workers keep compiled modules; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    pub restart: RestartPolicy,
    pub handshake_timeout: Duration,
    /// How long past a call's deadline to wait before killing an unresponsive worker.
    pub kill_grace: Duration,
    /// Routes each plugin to an isolation level and its limits. Default: the shipped
    /// policy (`policies/`), compiled in.
    pub policy: Arc<Policy>,
    /// Where to create per-plugin cgroups; `None` disables them (refused at `high`).
    pub cgroups: Option<CgroupHost>,
    /// Where the supervisor keeps the plugins' key-value stores (`kv.redb`).
    pub state_dir: PathBuf,
    /// Where audit lines go.
    pub audit: AuditSink,
    /// Calls one plugin may have queued or running (and messages queued for one
    /// subscriber); past it, callers get "overloaded".
    pub max_queue: usize,
    /// How often a plugin's `health` export, if it has one, is called.
    pub health_interval: Duration,
    /// The operator's configuration and secrets for each plugin, by id.
    pub plugin_config: BTreeMap<String, PluginConfig>,
    /// Trusted publishers: name -> ed25519 public key (hex). A plugin whose
    /// `plugin.sig` verifies with its publisher's key has that publisher (policy
    /// routes can match it); one whose signature does not verify is refused.
    pub publishers: BTreeMap<String, String>,
}

/// The operator's configuration for one plugin, handed to it at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginConfig {
    pub config: BTreeMap<String, String>,
    /// Never logged: `Secret`'s `Debug` is redacted, and the plugin's log lines and
    /// errors have secret values replaced by `[secret NAME]`.
    pub secrets: BTreeMap<String, Secret>,
}

/// The export the supervisor calls for health checks, when a plugin has it.
pub const HEALTH_EXPORT: &str = "health";

/// Prefix of the supervisor's base cgroup (`corral-<pid>`).
pub const CGROUP_PREFIX: &str = "corral-";

impl Options {
    /// Defaults: workers beside the running executable, cache under the user's
    /// cache directory.
    pub fn new() -> Options {
        let worker_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("."));
        Options {
            worker_dir,
            cache_dir: default_cache_dir(),
            restart: RestartPolicy::default(),
            handshake_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(1),
            policy: Arc::new(Policy::built_in()),
            cgroups: Some(CgroupHost::default()),
            state_dir: default_state_dir(),
            audit: AuditSink::Stderr,
            max_queue: 64,
            health_interval: Duration::from_secs(30),
            plugin_config: BTreeMap::new(),
            publishers: BTreeMap::new(),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// `/var/lib/corral` for root, else `$XDG_STATE_HOME/corral` or
/// `~/.local/state/corral`.
fn default_state_dir() -> PathBuf {
    if access::is_root() {
        return PathBuf::from("/var/lib/corral");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("corral");
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(std::env::temp_dir, |h| {
            PathBuf::from(h).join(".local/state")
        })
        .join("corral")
}

fn default_cache_dir() -> Option<PathBuf> {
    // Root's home is closed to the unprivileged users workers run as.
    if access::is_root() {
        return Some(PathBuf::from("/var/cache/corral"));
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("corral"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache/corral"))
}

/// Why a plugin could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddPluginError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot resolve plugin directory {}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin id {id:?} in {} is already used by {}", dir.display(), other.display())]
    Duplicate {
        id: String,
        dir: PathBuf,
        other: PathBuf,
    },
    /// `plugin.sig` is there and does not verify.
    #[error("refusing the plugin in {}: its signature does not verify: {source}", dir.display())]
    Signature {
        dir: PathBuf,
        #[source]
        source: crate::signing::SignError,
    },
    #[error("cannot read the plugin files in {}", dir.display())]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot copy the plugin in {}: {why}", dir.display())]
    Snapshot { dir: PathBuf, why: String },
    /// The files changed while they were read (the lifecycle reads them again once
    /// they settle).
    #[error("the files in {} changed while they were read", dir.display())]
    Changed { dir: PathBuf },
}

/// A plugin's place in the supervisor.
#[derive(Debug)]
pub(crate) struct Plugin {
    pub(crate) manifest: Manifest,
    /// The plugin's directory (its identity, and what messages name).
    pub(crate) dir: PathBuf,
    /// The copy of this version's files that its workers read.
    pub(crate) files: Arc<crate::versions::Snapshot>,
    pub(crate) state: Mutex<PluginState>,
    /// Shared by every version of the plugin (a reload carries them over):
    calls: Arc<AtomicU64>,
    /// Slots for calls queued or running (`Options::max_queue`).
    inflight: Arc<tokio::sync::Semaphore>,
    /// Messages queued for this plugin's subscriptions, delivered in order.
    pub(crate) deliveries: Arc<OnceLock<tokio::sync::mpsc::Sender<crate::host::Delivery>>>,
    pub(crate) redactor: Redactor,
    /// The publisher whose trusted key verified `plugin.sig`; `None`: unsigned.
    pub(crate) publisher: Option<String>,
    /// Digest of the files this version was loaded from (hot reload compares it).
    pub(crate) fingerprint: String,
    /// Set (under the state lock) when a new version replaced this one or the plugin
    /// was removed: calls that still hold it go to the plugin's current version.
    pub(crate) retired: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
pub(crate) struct PluginState {
    pub(crate) worker: Option<Arc<WorkerHandle>>,
    /// Crash times within the restart window.
    crashes: VecDeque<Instant>,
    restarts: u32,
    pub(crate) starts: u32,
    failed: Option<String>,
    last_error: Option<String>,
    shutting_down: bool,
    /// The policy the running worker was started with (live changes applied).
    pub(crate) effective: Option<Effective>,
    pub(crate) group: Option<Arc<PluginCgroup>>,
}

/// The supervisor. Share it behind an `Arc`; all methods take `&self` (through
/// [`Core`], which it dereferences to) except adding plugins.
#[derive(Debug)]
pub struct Supervisor {
    core: Arc<Core>,
}

impl Supervisor {
    pub fn new(options: Options) -> Supervisor {
        Supervisor {
            core: Arc::new_cyclic(|me| Core::new(options, me.clone())),
        }
    }

    /// Add the plugin in `dir` (reads and validates its `plugin.toml`); returns its id.
    pub fn add_plugin_dir(&mut self, dir: &Path) -> Result<String, AddPluginError> {
        self.core.add_plugin_dir(dir)
    }
}

impl std::ops::Deref for Supervisor {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// The supervisor's state, shared with its workers' connections (which perform host
/// calls through it).
#[derive(Debug)]
pub struct Core {
    pub(crate) me: Weak<Core>,
    plugins: std::sync::RwLock<BTreeMap<String, Arc<Plugin>>>,
    pub(crate) audit: Audit,
    pub(crate) store: OnceLock<Result<Arc<Store>, String>>,
    pub(crate) fetcher: Fetcher,
    options: Options,
    policy: std::sync::RwLock<Arc<Policy>>,
    /// Why the last policy reload was rejected (the previous policy stays).
    policy_error: std::sync::Mutex<Option<String>>,
    /// Created at the first worker start.
    cgroup_base: OnceLock<Result<CgroupBase, String>>,
    worker_seq: AtomicU64,
    /// Serialises adds, reloads and removals; remembers rejected versions.
    pub(crate) lifecycle: Mutex<crate::lifecycle::Lifecycle>,
    /// Retired workers finishing their calls (shut down with the rest at shutdown).
    pub(crate) draining: std::sync::Mutex<Vec<Weak<WorkerHandle>>>,
    /// Plugin files being written, as the plugin watcher sees them.
    pub(crate) writes: Arc<crate::lifecycle::Writes>,
    /// Plugin directories whose files were rejected, and why.
    pub(crate) rejected: std::sync::Mutex<crate::lifecycle::Rejected>,
    /// Where versions' files are copied (made at the first read).
    versions: OnceLock<Result<crate::versions::Versions, String>>,
}

impl Core {
    fn new(options: Options, me: Weak<Core>) -> Core {
        Core {
            me,
            audit: Audit::new(options.audit.clone()),
            store: OnceLock::new(),
            fetcher: Fetcher::new(),
            plugins: Default::default(),
            policy: std::sync::RwLock::new(Arc::clone(&options.policy)),
            policy_error: std::sync::Mutex::new(None),
            options,
            cgroup_base: OnceLock::new(),
            worker_seq: AtomicU64::new(1),
            lifecycle: Mutex::new(Default::default()),
            draining: Default::default(),
            writes: Default::default(),
            versions: OnceLock::new(),
            rejected: Default::default(),
        }
    }

    /// The plugin `id`.
    pub(crate) fn plugin(&self, id: &str) -> Option<Arc<Plugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every plugin, in id order.
    pub(crate) fn all_plugins(&self) -> Vec<Arc<Plugin>> {
        self.plugins
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(crate) fn add_plugin_dir(&self, dir: &Path) -> Result<String, AddPluginError> {
        let plugin = self.read_plugin(dir, None)?;
        let mut plugins = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = plugins.get(&plugin.manifest.id) {
            return Err(AddPluginError::Duplicate {
                id: plugin.manifest.id,
                dir: plugin.dir,
                other: other.dir.clone(),
            });
        }
        let id = plugin.manifest.id.clone();
        plugins.insert(id.clone(), Arc::new(plugin));
        Ok(id)
    }

    /// Read the plugin in `dir`: its manifest, signature and fingerprint. A new
    /// version of `previous` shares its call count, queue and subscriptions.
    pub(crate) fn read_plugin(
        &self,
        dir: &Path,
        previous: Option<&Plugin>,
    ) -> Result<Plugin, AddPluginError> {
        let dir = dir.canonicalize().map_err(|source| AddPluginError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        let fingerprint =
            crate::lifecycle::fingerprint(&dir).map_err(|source| AddPluginError::Files {
                dir: dir.clone(),
                source,
            })?;
        let manifest = Manifest::load_dir(&dir)?;
        let publisher =
            crate::signing::verify(&dir, &self.options.publishers).map_err(|source| {
                AddPluginError::Signature {
                    dir: dir.clone(),
                    source,
                }
            })?;
        // What was checked is what runs: the copy must hold the files fingerprinted
        // before the manifest and signature were read.
        let files = self
            .versions
            .get_or_init(|| {
                let root = self
                    .options
                    .cache_dir
                    .clone()
                    .unwrap_or_else(std::env::temp_dir);
                crate::versions::Versions::create(&root)
            })
            .as_ref()
            .map_err(|why| AddPluginError::Snapshot {
                dir: dir.clone(),
                why: why.clone(),
            })?
            .snapshot(&dir)
            .map_err(|e| AddPluginError::Snapshot {
                dir: dir.clone(),
                why: e.to_string(),
            })?;
        if crate::lifecycle::fingerprint(files.path()).ok().as_ref() != Some(&fingerprint) {
            return Err(AddPluginError::Changed { dir });
        }
        let settings = self.options.plugin_config.get(&manifest.id);
        let redactor = Redactor::new(
            settings
                .iter()
                .flat_map(|c| c.secrets.iter())
                .map(|(k, v)| (k.clone(), v.0.clone())),
        );
        let previous = previous.filter(|p| p.manifest.id == manifest.id);
        Ok(Plugin {
            manifest,
            dir,
            files: Arc::new(files),
            state: Mutex::new(PluginState::default()),
            calls: previous.map_or_else(Default::default, |p| Arc::clone(&p.calls)),
            inflight: previous.map_or_else(
                || Arc::new(tokio::sync::Semaphore::new(self.options.max_queue)),
                |p| Arc::clone(&p.inflight),
            ),
            deliveries: previous.map_or_else(Default::default, |p| Arc::clone(&p.deliveries)),
            redactor,
            publisher,
            fingerprint,
            retired: Default::default(),
        })
    }

    /// The same version of `p` (the same files and shared queues) as a new table
    /// entry, to run in a new worker.
    pub(crate) fn same_version(p: &Plugin) -> Plugin {
        Plugin {
            manifest: p.manifest.clone(),
            dir: p.dir.clone(),
            files: Arc::clone(&p.files),
            state: Mutex::new(PluginState::default()),
            calls: Arc::clone(&p.calls),
            inflight: Arc::clone(&p.inflight),
            deliveries: Arc::clone(&p.deliveries),
            redactor: p.redactor.clone(),
            publisher: p.publisher.clone(),
            fingerprint: p.fingerprint.clone(),
            retired: Default::default(),
        }
    }

    /// Remember a retired worker until it has exited.
    pub(crate) fn track_draining(&self, w: &Arc<WorkerHandle>) {
        let mut d = self.draining.lock().unwrap_or_else(|e| e.into_inner());
        d.retain(|w| w.upgrade().is_some_and(|w| w.is_alive()));
        d.push(Arc::downgrade(w));
    }

    /// Put `plugin` in the table (replacing any plugin with its id); returns the one
    /// it replaced.
    pub(crate) fn install(&self, plugin: Arc<Plugin>) -> Option<Arc<Plugin>> {
        self.plugins
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(plugin.manifest.id.clone(), plugin)
    }

    /// Take `id` out of the table if it is still `plugin`.
    pub(crate) fn uninstall(&self, plugin: &Arc<Plugin>) -> bool {
        let mut plugins = self.plugins.write().unwrap_or_else(|e| e.into_inner());
        if plugins
            .get(&plugin.manifest.id)
            .is_some_and(|p| Arc::ptr_eq(p, plugin))
        {
            plugins.remove(&plugin.manifest.id);
            return true;
        }
        false
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Call `function` of `plugin`. `timeout` overrides the plugin's own deadline.
    pub async fn call(
        &self,
        plugin: &str,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        self.call_from(plugin, function, input, timeout, &[]).await
    }

    /// [`Core::call`] on behalf of the plugins in `chain` (a plugin-to-plugin call),
    /// within the plugin's bounded queue.
    pub(crate) async fn call_from(
        &self,
        plugin: &str,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &[String],
    ) -> Result<Vec<u8>, CallError> {
        let unknown = || CallError::UnknownPlugin {
            plugin: plugin.to_owned(),
        };
        let mut p = self.plugin(plugin).ok_or_else(unknown)?;
        // The queue slot is shared by every version of the plugin.
        let _slot =
            Arc::clone(&p.inflight)
                .try_acquire_owned()
                .map_err(|_| CallError::Overloaded {
                    plugin: plugin.to_owned(),
                    queued: self.options.max_queue as u32,
                })?;
        p.calls.fetch_add(1, Ordering::Relaxed);
        let chain: Arc<[String]> = chain
            .iter()
            .cloned()
            .chain([plugin.to_owned()])
            .collect::<Vec<_>>()
            .into();
        // A version retired while this call was on its way (hot reload, removal)
        // passes the call to the plugin's current version; nothing was sent to it.
        let mut input = Some(input);
        for _ in 0..16 {
            let (worker, limits) = match self.worker_for(&p).await {
                Err(CallError::ShuttingDown) if p.retired.load(Ordering::SeqCst) => {
                    p = self.plugin(plugin).ok_or_else(unknown)?;
                    continue;
                }
                other => other?,
            };
            if !worker.exports.iter().any(|e| e == function) {
                return Err(CallError::UnknownFunction {
                    plugin: plugin.to_owned(),
                    function: function.to_owned(),
                    exports: worker.exports.join(", "),
                });
            }
            // A caller may shorten the deadline, or lengthen it up to the policy's cap.
            let deadline = timeout.map_or(limits.0, |t| t.min(limits.1));
            let bytes = input.take().unwrap_or_default();
            let result = match worker
                .try_call(function, bytes, deadline, Arc::clone(&chain))
                .await
            {
                Ok(result) => result,
                Err(bytes) => {
                    input = Some(bytes);
                    p = self.plugin(plugin).ok_or_else(unknown)?;
                    continue;
                }
            };
            if let Err(e @ (CallError::WorkerCrashed(_) | CallError::Timeout { .. })) = &result {
                p.state.lock().await.last_error = Some(e.to_string());
            }
            return result;
        }
        Err(CallError::StartFailed {
            plugin: plugin.to_owned(),
            reason: "the plugin was replaced 16 times while this call waited".into(),
        })
    }

    /// Dependency resolution over every plugin: the start order, and why plugins are
    /// blocked.
    pub fn dependencies(&self) -> crate::deps::Resolution {
        let all = self.all_plugins();
        let map = all
            .iter()
            .map(|p| (p.manifest.id.clone(), &p.manifest))
            .collect();
        crate::deps::resolve(&map)
    }

    /// Start `p`'s dependencies (each after its own), or say why `p` cannot start.
    async fn start_dependencies(&self, p: &Plugin) -> Result<(), String> {
        if p.manifest.dependencies.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.dependencies().blocked.get(&p.manifest.id) {
            return Err(format!("not started: {why}"));
        }
        for dep in p.manifest.dependencies.keys() {
            // Absent: an optional dependency (resolution refused missing required ones).
            let Some(d) = self.plugin(dep) else { continue };
            if let Err(e) = Box::pin(self.worker_for(&d)).await {
                return Err(format!("not started: dependency {dep} cannot start: {e}"));
            }
        }
        Ok(())
    }

    /// Start `plugin`'s worker if it has none (after a health-check kill).
    pub(crate) async fn restart(&self, plugin: &str) -> Result<(), CallError> {
        let p = self
            .plugin(plugin)
            .ok_or_else(|| CallError::UnknownPlugin {
                plugin: plugin.to_owned(),
            })?;
        self.worker_for(&p).await.map(drop)
    }

    /// The running worker of `p`, started (after any backoff) if needed, with the
    /// call deadline and its cap from the plugin's effective policy.
    async fn worker_for(
        &self,
        p: &Plugin,
    ) -> Result<(Arc<WorkerHandle>, (Duration, Duration)), CallError> {
        let mut st = p.state.lock().await;
        if st.shutting_down || p.retired.load(Ordering::SeqCst) {
            return Err(CallError::ShuttingDown);
        }
        self.reap(p, &mut st);
        let deadlines = |e: &Option<Effective>| {
            e.as_ref()
                .map_or((Duration::from_secs(5), Duration::from_secs(5)), |e| {
                    (e.timeout.value, e.timeout_cap)
                })
        };
        if let Some(w) = &st.worker {
            return Ok((Arc::clone(w), deadlines(&st.effective)));
        }
        if let Some(last) = &st.failed {
            return Err(CallError::PluginFailed {
                plugin: p.manifest.id.clone(),
                crashes: st.crashes.len() as u32,
                last: last.clone(),
            });
        }
        // Dependencies first: a plugin whose dependency is missing, incompatible, in
        // a cycle or cannot start is not started, and says why.
        if let Err(why) = self.start_dependencies(p).await {
            st.last_error = Some(why.clone());
            return Err(CallError::StartFailed {
                plugin: p.manifest.id.clone(),
                reason: why,
            });
        }
        let delay = self.options.restart.backoff(st.crashes.len() as u32);
        if let Some(&last) = st.crashes.back() {
            let wait = (last + delay).saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                tracing::info!(plugin = %p.manifest.id, ?wait, "restart backoff");
                tokio::time::sleep(wait).await;
            }
        }
        match self.start_worker(p).await {
            Ok((w, effective, group)) => {
                if st.starts > 0 {
                    st.restarts += 1;
                }
                st.starts += 1;
                tracing::info!(plugin = %p.manifest.id, pid = w.pid, level = %effective.level.value, "worker ready");
                st.worker = Some(Arc::clone(&w));
                st.effective = Some(effective);
                st.group = group;
                if w.exports.iter().any(|e| e == HEALTH_EXPORT) {
                    self.watch_health(&p.manifest.id, &w);
                }
                Ok((w, deadlines(&st.effective)))
            }
            Err(e) => {
                let reason = error_chain(&e);
                self.record_crash(p, &mut st, reason.clone());
                Err(CallError::StartFailed {
                    plugin: p.manifest.id.clone(),
                    reason,
                })
            }
        }
    }

    /// Notice a worker that has gone away and count it.
    fn reap(&self, p: &Plugin, st: &mut PluginState) {
        let Some(w) = &st.worker else { return };
        let by_us = w.killed_by_supervisor();
        let kill_reason = w.kill_reason();
        // A worker the supervisor has killed is gone even if it has not been reaped yet:
        // the next call must not be routed to it.
        let reason = match w.exit_reason() {
            Some(reason) => reason,
            None if by_us => ExitReason::Signal {
                signo: libc::SIGKILL,
                name: "SIGKILL".into(),
            },
            None => return,
        };
        st.worker = None;
        st.group = None;
        if by_us {
            st.last_error = Some(kill_reason.unwrap_or_else(|| {
                format!("worker killed by the supervisor after it missed a deadline: {reason}")
            }));
        } else {
            self.record_crash(p, st, format!("worker crashed: {reason}"));
        }
    }

    fn record_crash(&self, p: &Plugin, st: &mut PluginState, reason: String) {
        let now = Instant::now();
        let policy = &self.options.restart;
        st.crashes.push_back(now);
        while st
            .crashes
            .front()
            .is_some_and(|&t| now.duration_since(t) > policy.window)
        {
            st.crashes.pop_front();
        }
        st.last_error = Some(reason.clone());
        if st.crashes.len() as u32 >= policy.max_crashes {
            tracing::error!(
                plugin = %p.manifest.id,
                crashes = st.crashes.len(),
                "plugin failed: {reason}; not restarting"
            );
            st.failed = Some(reason);
        } else {
            tracing::warn!(plugin = %p.manifest.id, "{reason}");
        }
    }

    pub(crate) async fn start_worker(
        &self,
        p: &Plugin,
    ) -> Result<(Arc<WorkerHandle>, Effective, Option<Arc<PluginCgroup>>), StartError> {
        let m = &p.manifest;
        // The worker reads the version's copy, not the plugin directory.
        let files = p.files.path();
        // Checked again at every start: nothing but the supervisor may touch the copy.
        if p.publisher.is_some() || files.join(crate::signing::SIG_FILE).exists() {
            let now = crate::signing::verify(files, &self.options.publishers)
                .map_err(|e| StartError::Refused(format!("signature: {e}")))?;
            if now != p.publisher {
                return Err(StartError::Refused(format!(
                    "signature: the plugin was added as {:?} and is now {:?}; add it again",
                    p.publisher, now
                )));
            }
        }
        let effective = self.policy().resolve(m, p.publisher.as_deref());
        let level = effective.level.value;
        for note in &effective.clamped {
            tracing::warn!(plugin = %m.id, "{note}");
        }
        let run_as = access::credentials(&effective.user.value).map_err(|why| {
            StartError::Refused(format!(
                "cannot run the worker as user {} (set by {}): {why}",
                effective.user.value, effective.user.origin
            ))
        })?;
        if let Some(cred) = run_as {
            access::check_readable(files, cred).map_err(|why| {
                StartError::Refused(format!(
                    "the worker runs as uid {} gid {} and cannot read the copy of the plugin: \
                     {why}",
                    cred.uid, cred.gid
                ))
            })?;
        }
        let kind = worker_kind(m.runtime);
        let program = self
            .options
            .worker_dir
            .join(format!("corral-worker-{}", kind.as_str()));
        let cache_dir =
            self.options.cache_dir.as_ref().and_then(|d| {
                match access::plugin_cache_dir(d, &m.id, run_as) {
                    Ok(dir) => Some(dir),
                    Err(why) => {
                        tracing::warn!(plugin = %m.id, "starting without the module cache: {why}");
                        None
                    }
                }
            });
        let (cgroup, cgroup_unavailable) = match self.plugin_cgroup(m, &effective) {
            Ok(g) => (Some(Arc::new(g)), None),
            Err(why) if level >= Level::High => {
                return Err(StartError::Refused(format!(
                    "level {level} requires cgroup limits: {why}"
                )));
            }
            Err(why) => {
                tracing::warn!(plugin = %m.id, "starting without cgroup limits: {why}");
                (None, Some(why))
            }
        };
        let spec = SpawnSpec {
            cgroup: cgroup.clone(),
            cgroup_unavailable,
            program,
            kind,
            broker: self.me.clone(),
            redactor: p.redactor.clone(),
            files: Some(crate::worker::PluginFiles {
                snapshot: Arc::clone(&p.files),
                dir: p.dir.clone(),
            }),
            plugin_id: m.id.clone(),
            env: worker_env(),
            handshake_timeout: self.options.handshake_timeout,
            kill_grace: self.options.kill_grace,
            confine: SelfConfinement {
                level,
                read: vec![files.to_owned()],
                write: cache_dir.iter().cloned().collect(),
                tmpfs_bytes: effective.tmpfs.value,
                engine: kind.as_str().to_owned(),
                run_as: run_as.map(|c| [c.uid, c.gid]),
                hide: Vec::new(),
            },
        };
        let load = LoadSpec {
            plugin_id: m.id.clone(),
            plugin_dir: files.to_string_lossy().into_owned(),
            entry: m.entry.to_string_lossy().into_owned(),
            limits: EngineLimits {
                memory_bytes: effective.memory.value,
                max_output_bytes: effective.max_output.value,
                init_deadline_ms: effective.timeout.value.as_millis() as u64,
            },
            cache_dir: cache_dir.map(|d| d.to_string_lossy().into_owned()),
            config: self
                .options
                .plugin_config
                .get(&m.id)
                .map(|c| c.config.clone())
                .unwrap_or_default(),
            secrets: self
                .options
                .plugin_config
                .get(&m.id)
                .map(|c| c.secrets.clone())
                .unwrap_or_default(),
        };
        let w = WorkerHandle::start(&spec, load).await?;
        Ok((w, effective, cgroup))
    }

    fn plugin_cgroup(&self, m: &Manifest, e: &Effective) -> Result<PluginCgroup, String> {
        let base = self
            .cgroup_base
            .get_or_init(|| {
                let host = self
                    .options
                    .cgroups
                    .as_ref()
                    .ok_or_else(|| "disabled in the supervisor's options".to_owned())?;
                let name = format!("{CGROUP_PREFIX}{}", std::process::id());
                let base = host.base(&name).map_err(|e| error_chain(&e))?;
                base.clean_leftovers(CGROUP_PREFIX);
                Ok(base)
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let name = format!(
            "{}-{}",
            m.id,
            self.worker_seq.fetch_add(1, Ordering::Relaxed)
        );
        base.create(&name, &cgroup_limits(e))
            .map_err(|e| error_chain(&e))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why the last policy reload was rejected, if it was.
    pub fn policy_error(&self) -> Option<String> {
        self.policy_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keep the current policy and remember why a reload was rejected.
    pub fn reject_policy(&self, why: String) {
        tracing::error!("policy reload rejected; keeping the last good policy: {why}");
        *self.policy_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// The effective policy of `plugin` under the policy in force.
    pub fn explain(&self, plugin: &str) -> Option<Effective> {
        let p = self.plugin(plugin)?;
        Some(self.policy().resolve(&p.manifest, p.publisher.as_deref()))
    }

    /// Switch to a new policy. Running workers get what can change live: cgroup
    /// limits (memory, CPU, pids) are written to their groups and the call deadline
    /// applies to the next call. A changed level, user or engine limit needs a new
    /// worker: the old one finishes the calls it has and is retired; the next call
    /// starts a worker under the new policy. Returns one line per change.
    pub async fn set_policy(&self, policy: Policy) -> Vec<String> {
        let policy = Arc::new(policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&policy);
        *self.policy_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut changes = Vec::new();
        let mut renew = Vec::new();
        for p in &self.all_plugins() {
            let mut st = p.state.lock().await;
            let new = policy.resolve(&p.manifest, p.publisher.as_deref());
            let Some(old) = st.effective.clone() else {
                continue;
            };
            if st.worker.is_none() || old == new {
                continue;
            }
            let id = &p.manifest.id;
            let needs_new_worker = old.level.value != new.level.value
                || old.user.value != new.user.value
                || old.memory.value != new.memory.value
                || old.max_output.value != new.max_output.value
                || old.tmpfs.value != new.tmpfs.value;
            if needs_new_worker {
                renew.push((Arc::clone(p), new));
                continue;
            }
            let limits = cgroup_limits(&new);
            match &st.group {
                Some(g) if g.limits() != limits => match g.set_limits(&limits) {
                    Ok(()) => changes.push(format!(
                        "{id}: cgroup limits applied live: worker_memory {}, cpu {}, pids {}",
                        corral_policy::size(new.worker_memory.value),
                        new.cpu.value,
                        new.pids.value
                    )),
                    Err(e) => {
                        let why = format!(
                            "{id}: new cgroup limits not applied to the running worker: {}",
                            error_chain(&e)
                        );
                        tracing::warn!("{why}");
                        st.last_error = Some(why.clone());
                        changes.push(why);
                        continue;
                    }
                },
                _ => {}
            }
            if old.timeout != new.timeout {
                changes.push(format!("{id}: call deadline now {:?}", new.timeout.value));
            }
            st.effective = Some(new);
        }
        // A new worker under the new policy takes over before the old one is retired
        // (after its calls). If none can start, the old one is retired anyway: a
        // policy is never left unenforced, and the next call starts a worker under it.
        for (p, new) in renew {
            let id = &p.manifest.id;
            match self.renew(id).await {
                Ok(()) => changes.push(format!(
                    "{id}: new worker at {}; the old one retires after its calls",
                    new.summary()
                )),
                Err(why) => {
                    tracing::warn!(plugin = %id, "no new worker under the new policy: {why}");
                    if let Some(current) = self.plugin(id) {
                        let mut st = current.state.lock().await;
                        if let Some(w) = st.worker.take() {
                            self.track_draining(&w);
                            let group = st.group.take();
                            let grace = new.timeout_cap + Duration::from_secs(1);
                            tokio::spawn(async move {
                                w.retire(grace).await;
                                drop(group);
                            });
                        }
                        st.last_error = Some(format!("no worker under the new policy: {why}"));
                    }
                    changes.push(format!(
                        "{id}: worker retired after its calls (no new worker could start: \
                         {why}); the next call starts one at {}",
                        new.summary()
                    ));
                }
            }
        }
        for c in &changes {
            tracing::info!("policy: {c}");
        }
        changes
    }

    /// Every plugin and its state.
    pub async fn list(&self) -> Vec<PluginInfo> {
        let mut out = Vec::new();
        let blocked = self.dependencies().blocked;
        for p in &self.all_plugins() {
            let mut st = p.state.lock().await;
            self.reap(p, &mut st);
            let why_blocked = blocked.get(&p.manifest.id).filter(|_| st.worker.is_none());
            if let Some(why) = why_blocked {
                st.last_error = Some(format!("not started: {why}"));
            }
            let state = if st.failed.is_some() {
                "failed"
            } else if st.worker.is_some() {
                "running"
            } else if why_blocked.is_some() {
                "blocked"
            } else if !st.crashes.is_empty() {
                "crashed"
            } else {
                "stopped"
            };
            let effective = st
                .effective
                .clone()
                .filter(|_| st.worker.is_some())
                .unwrap_or_else(|| self.policy().resolve(&p.manifest, p.publisher.as_deref()));
            let resources = match (&st.worker, &st.group) {
                (Some(w), Some(g)) => Some(access::worker_stats(g.stats(), w.pid)),
                (Some(w), None) => Some(access::worker_stats(ResourceStats::default(), w.pid)),
                _ => None,
            };
            out.push(PluginInfo {
                policy: effective.summary(),
                resources,
                id: p.manifest.id.clone(),
                version: p.manifest.version.to_string(),
                runtime: worker_kind(p.manifest.runtime),
                dir: p.dir.to_string_lossy().into_owned(),
                level: effective.level.value.to_string(),
                enforcement: st.worker.as_ref().map(|w| w.hello.enforcement.clone()),
                state: state.to_owned(),
                pid: st.worker.as_ref().map(|w| w.pid),
                restarts: st.restarts,
                calls: p.calls.load(Ordering::Relaxed),
                last_error: st.last_error.as_deref().map(|e| p.redactor.redact(e)),
                exports: st
                    .worker
                    .as_ref()
                    .map(|w| w.exports.clone())
                    .unwrap_or_default(),
            });
        }
        out
    }

    /// Stop accepting calls, let queued calls finish, run shutdown hooks, and stop
    /// every worker (killing any that takes longer than `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        let mut workers = Vec::new();
        for p in &self.all_plugins() {
            let mut st = p.state.lock().await;
            st.shutting_down = true;
            st.group = None;
            if let Some(w) = st.worker.take() {
                workers.push(w);
            }
        }
        let draining =
            std::mem::take(&mut *self.draining.lock().unwrap_or_else(|e| e.into_inner()));
        workers.extend(draining.iter().filter_map(Weak::upgrade));
        let mut stops = tokio::task::JoinSet::new();
        for w in workers {
            stops.spawn(async move { w.shutdown(grace).await });
        }
        while stops.join_next().await.is_some() {}
        if let Some(Ok(base)) = self.cgroup_base.get() {
            // Plugin groups go as their last processes exit; then the base.
            for _ in 0..50 {
                if base.try_remove() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for Core {
    /// Best effort without `shutdown`: workers are killed as their handles drop, and
    /// empty groups go now; anything still busy is cleaned by the next supervisor.
    fn drop(&mut self) {
        if let Some(Ok(base)) = self.cgroup_base.get() {
            base.try_remove();
        }
    }
}

pub(crate) use corral_protocol::error_chain;

/// The cgroup limits of an effective policy.
fn cgroup_limits(e: &Effective) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: e.worker_memory.value,
        pids_max: e.pids.value,
        cpu_micros_per_sec: (e.cpu.value * 1e6).round() as u64,
    }
}

fn worker_kind(r: Runtime) -> WorkerKind {
    match r {
        Runtime::Wasm => WorkerKind::Wasm,
        Runtime::Js => WorkerKind::Js,
        Runtime::Python => WorkerKind::Python,
    }
}

/// The environment a worker gets: nothing but a sanitised locale and log filter.
fn worker_env() -> Vec<(OsString, OsString)> {
    ["RUST_BACKTRACE", "CORRAL_WORKER_LOG"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RestartPolicy::default();
        assert_eq!(p.backoff(1), Duration::ZERO);
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(200));
        assert_eq!(p.backoff(40), Duration::from_secs(5));
    }
}
