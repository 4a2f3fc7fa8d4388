//! The supervisor: a set of plugins, each with at most one worker process, started on
//! demand and restarted with backoff after crashes. It is the dispatcher: it owns
//! every table and talks to the outside world (callers, the policy, the lifecycle);
//! workers ([`crate::worker`]) run one process each and report back through the
//! broker ([`crate::broker`]).
//!
//! One operation per file, each an `impl Inner` block:
//!
//! - [`table`]: the plugin table and reading a plugin version from its directory;
//! - [`state`]: [`PluginState`] and every transition of it (ready, crash, reap,
//!   retire, shut down);
//! - [`capacity`]: `max_workers` (slots, least recently used idle worker stopped
//!   for room) and `idle_timeout` (the sweeper);
//! - [`call`]: call admission (the bounded queue) and routing, with the retry when
//!   a version was retired on the way; starting a worker on demand, dependencies
//!   first, after any backoff;
//! - [`start`]: the spawn spec of a worker under its effective policy, behind the
//!   [`start::Launcher`] seam (a process, or a fake in the unit tests);
//! - [`policy`]: the live policy and what changes when it does;
//! - [`reconfigure`]: the settings a reloaded configuration changes live;
//! - [`status`]: what `corral list` and `corral status` show;
//! - [`health`]: health checks;
//! - [`lifecycle`]: discovery, hot reload and removal of plugin versions;
//! - [`directory`]: what the broker may ask of the supervisor;
//! - [`shutdown`]: stopping every worker.

mod call;
mod capacity;
mod directory;
mod health;
pub mod lifecycle;
mod modules;
mod policy;
mod reconfigure;
mod shutdown;
mod start;
mod state;
mod status;
mod table;
#[cfg(test)]
mod tests;

pub(crate) use state::PluginState;
pub(crate) use table::Plugin;

use crate::broker::audit::AuditSink;
use crate::broker::store::StoreBackend;
use crate::broker::{Directory, HostBroker};
use crate::plugins::access;
use crate::plugins::versions::Versions;
use crate::worker::{Broker, WorkerHandle};
use corral_confine::cgroup::CgroupHost;
use corral_manifest::ManifestError;
use corral_policy::Policy;
use corral_protocol::{Runtime, Secret};
use start::{Launcher, ProcessLauncher};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
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
    /// Where the supervisor keeps its state: the plugins' key-value stores
    /// (`kv.redb`) when `store` is redb.
    pub state_dir: PathBuf,
    /// The backend of the plugins' key-value stores.
    pub store: StoreBackend,
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
    /// The most worker processes alive at once; a start past it stops the least
    /// recently used idle worker, or answers `Overloaded`. `None`: no cap.
    pub max_workers: Option<usize>,
    /// A worker with no call for this long is stopped (started again at the next
    /// call). `None`: workers stay.
    pub idle_timeout: Option<Duration>,
    /// Runtimes whose workers are forked from a zygote template (the engine set
    /// up once) instead of each started by exec. Default [`DEFAULT_ZYGOTES`].
    pub zygotes: Vec<Runtime>,
}

/// The operator's configuration for one plugin, handed to it at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginConfig {
    pub config: BTreeMap<String, String>,
    /// Never logged: `Secret`'s `Debug` is redacted, and the plugin's log lines and
    /// errors have secret values replaced by `[secret NAME]`.
    pub secrets: BTreeMap<String, Secret>,
}

/// Runtimes forked from a zygote template unless the configuration says otherwise:
/// where it pays (docs/BENCHMARKS.md, "Zygotes"). CPython's start (the interpreter
/// and its imports) is most of a Python worker's start and of its idle memory; a
/// forked Wasm worker starts in about 60% of the time and keeps about half the
/// memory. Since QuickJS workers load their modules' bytecode instead of parsing
/// them, a forked one starts in about 80% of an exec'd one's time (5.7-6.4 against
/// 6.9-8.1 ms in a running supervisor) and keeps 1.19 MiB against 1.34.
pub const DEFAULT_ZYGOTES: &[Runtime] = &[Runtime::Wasm, Runtime::Js, Runtime::Python];

/// The export the supervisor calls for health checks, when a plugin has it.
pub const HEALTH_EXPORT: &str = "health";

/// The most bytes of a rejected reload's reason kept and shown.
pub const MAX_CONFIG_ERROR: usize = 4096;

/// `text` cut to at most `max` bytes (on a character boundary), saying so.
pub(crate) fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push_str(&format!(" [cut: {total} bytes in all]"));
    text
}

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
            store: StoreBackend::Redb,
            audit: AuditSink::Stderr,
            max_queue: 64,
            health_interval: Duration::from_secs(30),
            plugin_config: BTreeMap::new(),
            publishers: BTreeMap::new(),
            max_workers: None,
            idle_timeout: None,
            zygotes: DEFAULT_ZYGOTES.to_vec(),
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
        source: crate::plugins::signing::SignError,
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

/// The supervisor: the one entry point every client (CLI, control socket, Rust API)
/// goes through. Cheap to clone; every clone is the same supervisor.
#[derive(Debug, Clone)]
pub struct Supervisor(Arc<Inner>);

/// The supervisor's state. Workers never hold it: they report to the broker,
/// which asks it what it needs through [`Directory`].
pub(crate) struct Inner {
    pub(crate) me: Weak<Inner>,
    plugins: std::sync::RwLock<BTreeMap<String, Arc<Plugin>>>,
    pub(crate) broker: Arc<HostBroker>,
    launcher: Arc<dyn Launcher>,
    options: Options,
    /// The settings of `options` that a reloaded configuration changes.
    live: std::sync::RwLock<Arc<reconfigure::Live>>,
    /// Why the last configuration reload was rejected, and the changes it made
    /// that wait for a restart.
    config_status: std::sync::Mutex<(Option<String>, Vec<String>)>,
    policy: std::sync::RwLock<Arc<Policy>>,
    /// Why the last policy reload was rejected (the previous policy stays).
    policy_error: std::sync::Mutex<Option<String>>,
    /// Held to plan a pass over the plugin directories and to put a loaded
    /// version in the table (never through a load); remembers file digests.
    pub(crate) lifecycle: Mutex<lifecycle::Lifecycle>,
    /// Loads under way: one at a time per plugin, side by side across plugins.
    pub(crate) loads: lifecycle::Loads,
    /// Retired workers finishing their calls (shut down with the rest at shutdown).
    draining: std::sync::Mutex<Vec<Weak<WorkerHandle>>>,
    /// Plugin files being written, as the plugin watcher sees them.
    pub(crate) writes: Arc<crate::plugins::files::Writes>,
    /// Plugin directories whose files were rejected, and why.
    pub(crate) rejected: std::sync::Mutex<lifecycle::Rejected>,
    /// Where versions' files are copied (made at the first read).
    versions: OnceLock<Result<Versions, crate::plugins::versions::VersionsError>>,
    /// Set when the supervisor stops: starts under way (in a backoff wait or in a
    /// worker's load) are abandoned and their workers killed.
    pub(crate) stopping: tokio::sync::watch::Sender<bool>,
    /// Live workers against `max_workers`; the idle sweeper.
    capacity: Arc<capacity::Capacity>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("plugins", &self.plugins)
            .field("launcher", &self.launcher)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor with no plugins that starts worker processes as `options` say.
    pub fn new(options: Options) -> Supervisor {
        let launcher = Arc::new(ProcessLauncher::new(options.clone()));
        Supervisor::with_launcher(options, launcher)
    }

    /// A supervisor whose workers `launcher` starts.
    pub(crate) fn with_launcher(options: Options, launcher: Arc<dyn Launcher>) -> Supervisor {
        let sup = Supervisor(Arc::new_cyclic(|me: &Weak<Inner>| {
            let directory: Weak<dyn Directory> = me.clone();
            Inner {
                me: me.clone(),
                broker: Arc::new(HostBroker::new(
                    options.audit.clone(),
                    options.store.clone(),
                    options.state_dir.clone(),
                    options.max_queue,
                    directory,
                )),
                launcher,
                plugins: Default::default(),
                policy: std::sync::RwLock::new(Arc::clone(&options.policy)),
                policy_error: std::sync::Mutex::new(None),
                capacity: capacity::Capacity::new(options.max_workers, options.idle_timeout),
                live: std::sync::RwLock::new(Arc::new(reconfigure::Live::of(&options))),
                config_status: Default::default(),
                options,
                lifecycle: Mutex::new(Default::default()),
                loads: Default::default(),
                draining: Default::default(),
                writes: Default::default(),
                versions: OnceLock::new(),
                rejected: Default::default(),
                stopping: tokio::sync::watch::Sender::new(false),
            }
        }));
        // Messages from the other nodes on a shared store.
        sup.0.broker.start_bus();
        sup
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.0
    }

    /// Add the plugin in `dir` (reads and validates its `plugin.toml`); returns its id.
    pub fn add_plugin_dir(&mut self, dir: &Path) -> Result<String, AddPluginError> {
        self.0.add_plugin_dir(dir)
    }

    /// Add the plugins in `dirs`, read side by side on up to one thread per CPU
    /// (their files hashed and snapshotted) and added in the order given, as
    /// [`Supervisor::add_plugin_dir`] one after the other would: each one's id or
    /// why it was refused, in order (of two with one id, the first is added).
    pub fn add_plugin_dirs(&mut self, dirs: &[PathBuf]) -> Vec<Result<String, AddPluginError>> {
        self.0.add_plugin_dirs(dirs)
    }

    /// Open the plugins' store now (off the runtime's threads) rather than at the
    /// first host call that needs it; why it cannot be opened, if it cannot
    /// (store host calls then fail with the reason).
    pub async fn open_store(&self) -> Result<(), String> {
        self.0.broker.open_store().await
    }

    /// Say that the supervisor is stopping, ahead of [`Supervisor::shutdown`]:
    /// starts and loads under way end now (their workers killed) and no new one
    /// begins.
    pub fn begin_shutdown(&self) {
        self.0.stopping.send_replace(true);
    }

    /// Call `function` of `plugin`. `timeout` overrides the plugin's own deadline
    /// (up to the policy's cap).
    pub async fn call(
        &self,
        plugin: &str,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, corral_protocol::CallError> {
        self.0
            .call_from(plugin, function, input, timeout, &[])
            .await
    }

    /// Every plugin and its state (what `corral list` and `corral status` show).
    pub async fn list(&self) -> Vec<corral_protocol::PluginInfo> {
        self.0.list().await
    }

    /// Stop accepting calls, let queued calls finish, run shutdown hooks, and stop
    /// every worker (killing any that takes longer than `grace`).
    pub async fn shutdown(&self, grace: Duration) {
        self.0.shutdown(grace).await
    }

    /// The options the supervisor was made with (a reload changes some of them
    /// live: see [`Supervisor::reconfigure`]).
    pub fn options(&self) -> &Options {
        &self.0.options
    }

    /// Switch to the settings of a reloaded configuration that apply live
    /// (`max_queue`, plugin config and secrets, publishers, restart, health
    /// interval, the audit log's place, which is opened again); `pending` names
    /// the changed settings that wait for a restart. Returns one line per change.
    pub async fn reconfigure(&self, options: &Options, pending: Vec<String>) -> Vec<String> {
        let changes = self.0.reconfigure(options).await;
        *self.config_status() = (None, pending);
        self.0.broker.metrics.config_reload(true);
        changes
    }

    /// A refusal of the remote call API, in the audit log: under `@remote/<caller>`
    /// (each caller its own audit budget) or `@remote` for requests that named no
    /// valid caller, so that a flood of them cannot use up a plugin's budget.
    pub fn audit_remote_denial(
        &self,
        caller: Option<&str>,
        operation: &str,
        target: &str,
        rule: &str,
    ) {
        let who = match caller {
            Some(c) => format!("@remote/{c}"),
            None => "@remote".to_owned(),
        };
        // The target comes from the request line: kept short.
        let mut end = target.len().min(200);
        while !target.is_char_boundary(end) {
            end -= 1;
        }
        self.0
            .broker
            .audit
            .record(crate::broker::audit::AuditEvent {
                plugin: &who,
                operation,
                target: &target[..end],
                decision: "denied",
                rule,
            });
    }

    /// Keep the configuration in force and remember why a reload was rejected.
    /// `why` is cut at [`MAX_CONFIG_ERROR`] bytes: it may quote a listed plugin's
    /// `plugin.toml` (a plugin author's words), and it is kept, shown by `status`
    /// and logged until the next reload.
    pub fn reject_config(&self, why: String) {
        let why = cut(why, MAX_CONFIG_ERROR);
        tracing::error!("configuration reload rejected; keeping the running configuration: {why}");
        self.config_status().0 = Some(why);
        self.0.broker.metrics.config_reload(false);
    }

    /// Why the last configuration reload was rejected, if it was, and the changed
    /// settings that wait for a restart.
    pub fn config_error(&self) -> (Option<String>, Vec<String>) {
        self.config_status().clone()
    }

    fn config_status(&self) -> std::sync::MutexGuard<'_, (Option<String>, Vec<String>)> {
        self.0
            .config_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Close the audit log and open it again at the next line (SIGHUP, after
    /// logrotate renamed it).
    pub fn reopen_audit(&self, sink: AuditSink) {
        self.0.broker.audit.reopen(sink);
    }

    /// Every metric in the Prometheus text format (0.0.4), or OpenMetrics.
    pub async fn metrics(&self, openmetrics: bool) -> String {
        let now = crate::metrics::Snapshot {
            plugins: self.list().await,
            workers: self.workers(),
            policy_rejected: self.policy_error().is_some(),
            config_rejected: self.config_status().0.is_some(),
        };
        self.0.broker.metrics.encode(&now, openmetrics)
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.policy()
    }

    /// Why the last policy reload was rejected, if it was.
    pub fn policy_error(&self) -> Option<String> {
        self.0.policy_error()
    }

    /// Keep the current policy and remember why a reload was rejected.
    pub fn reject_policy(&self, why: String) {
        self.0.reject_policy(why)
    }

    /// Switch to a new policy; returns one line per change (see
    /// [`corral_policy::Policy`] for what applies live and what needs a new worker).
    pub async fn set_policy(&self, policy: Policy) -> Vec<String> {
        self.0.set_policy(policy).await
    }

    /// The effective policy of `plugin` under the policy in force, with the
    /// permissions its manifest requests.
    pub fn explain(&self, plugin: &str) -> Option<corral_policy::Effective> {
        self.0.explain(plugin)
    }

    /// Dependency resolution over every plugin: the start order, and why plugins
    /// are blocked.
    pub fn dependencies(&self) -> crate::plugins::deps::Resolution {
        self.0.dependencies()
    }

    /// Bring the plugins in line with `dirs` (plugin directories): add, reload and
    /// remove; see [`lifecycle`].
    pub async fn sync_plugins(&self, dirs: &[PathBuf]) -> lifecycle::SyncReport {
        self.0.sync_plugins(dirs).await
    }

    /// Remember that the plugin in `dir` could not be added (shown by `corral
    /// status`, retried when its files change).
    pub async fn record_rejection(&self, dir: &Path, why: String) {
        self.0.record_rejection(dir, why).await
    }

    /// Why the current files of plugin directories were rejected (`dir: why`).
    pub async fn lifecycle_errors(&self) -> Vec<String> {
        self.0.lifecycle_errors().await
    }

    /// Live workers against `max_workers` and `idle_timeout`, idle stops and
    /// evictions so far, and the supervisor's own descriptors.
    pub fn workers(&self) -> corral_protocol::WorkersStatus {
        self.0.workers_status()
    }
}

impl Inner {
    /// The broker, as workers hold it.
    pub(crate) fn broker_handle(&self) -> Weak<dyn Broker> {
        let b: Arc<dyn Broker> = self.broker.clone();
        Arc::downgrade(&b)
    }
}

pub(crate) use corral_protocol::error_chain;
