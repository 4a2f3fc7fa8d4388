//! Starting a plugin version's worker under its effective policy. The supervisor
//! checks the version (its signature, again) and resolves the policy; a
//! [`Launcher`] does the rest. [`ProcessLauncher`] builds the spawn spec (the
//! user, the module cache, the cgroup, the confinement) and spawns the worker
//! process; the unit tests launch an in-process fake instead.

use super::modules::{Kind, Modules, max_artifact_bytes};
use super::{CGROUP_PREFIX, Inner, Options, Plugin, error_chain};
use crate::plugins::{access, signing};
use crate::worker::process::remove_when_empty;
use crate::worker::zygote::Templates;
use crate::worker::{
    ArtifactOut, BoxFuture, Broker, Budgets, PluginFiles, SpawnSpec, StartError, WorkerHandle,
};
use corral_confine::cgroup::{CgroupBase, CgroupError, CgroupLimits, PluginCgroup};
use corral_confine::{Level, SelfConfinement};
use corral_manifest::Manifest;
use corral_policy::Effective;
use corral_protocol::{Code, EngineLimits, LoadSpec};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Numbers worker groups (`<plugin>-<n>`) uniquely in this process: supervisors in
/// one process share a base group, and a group's clean-up (which kills what is left
/// in it) must never meet a newer worker under a reused name.
static WORKER_SEQ: AtomicU64 = AtomicU64::new(1);
use std::sync::{Arc, OnceLock, Weak};

/// What a launcher is asked to start.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    pub(crate) plugin: &'a Plugin,
    pub(crate) effective: &'a Effective,
    /// Where the worker reports its host calls and its exit.
    pub(crate) broker: Weak<dyn Broker>,
}

/// A started worker and the cgroup it runs in.
pub(crate) type Launched = (Arc<WorkerHandle>, Option<Arc<PluginCgroup>>);

/// Starts workers: the seam between the supervisor and the processes it runs.
pub(crate) trait Launcher: Send + Sync + std::fmt::Debug {
    /// Start the worker of `req.plugin` under `req.effective`, up to `Loaded`.
    fn launch<'a>(&'a self, req: Launch<'a>) -> BoxFuture<'a, Result<Launched, StartError>>;

    /// Remove what the launcher made for every worker (the base cgroup) once it is
    /// empty; returns whether nothing is left.
    fn clean_up(&self) -> bool {
        true
    }

    /// Wasm modules and JavaScript module graphs compiled so far (for `status`).
    fn modules_compiled(&self) -> u64 {
        0
    }

    /// Zygote templates started and workers forked from them (for `status`).
    fn templates(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// A worker started for a plugin: the policy it runs under, its cgroup, its slot.
#[derive(Debug)]
pub(crate) struct Started {
    pub(crate) worker: Arc<WorkerHandle>,
    pub(crate) effective: Effective,
    pub(crate) group: Option<Arc<PluginCgroup>>,
    pub(crate) slot: super::capacity::Slot,
}

impl Inner {
    /// Start a worker for `p` under the policy in force, in a slot of
    /// `max_workers` (taken first: a start that finds none refuses, nothing spawned).
    pub(crate) async fn start_worker(&self, p: &Plugin) -> Result<Started, StartError> {
        let files = p.files.path();
        // Checked again at every start: nothing but the supervisor may touch the copy.
        if p.publisher.is_some() || files.join(signing::SIG_FILE).exists() {
            let now = signing::verify(files, &self.live().publishers)
                .map_err(|e| StartError::Refused(format!("signature: {e}")))?;
            if now != p.publisher {
                return Err(StartError::Refused(format!(
                    "signature: the plugin was added as {:?} and is now {:?}; add it again",
                    p.publisher, now
                )));
            }
        }
        let effective = self.policy().resolve(&p.manifest, p.publisher.as_deref());
        for note in &effective.clamped {
            tracing::warn!(plugin = %p.manifest.id, "{note}");
        }
        self.broker
            .audit
            .set_rate(&p.manifest.id, effective.audit_rate.value as u32);
        let slot = self.take_slot(p).await.map_err(StartError::Overloaded)?;
        let (worker, group) = self
            .launcher
            .launch(Launch {
                plugin: p,
                effective: &effective,
                broker: self.broker_handle(),
            })
            .await?;
        Ok(Started {
            worker,
            effective,
            group,
            slot,
        })
    }
}

/// Spawns worker processes as the supervisor's options say.
#[derive(Debug)]
pub(crate) struct ProcessLauncher {
    options: Options,
    /// Created at the first worker start.
    cgroup_base: OnceLock<Result<CgroupBase, String>>,
    /// Compiled Wasm modules; made at the first Wasm start.
    modules: OnceLock<Option<Modules>>,
    /// QuickJS bytecode; made at the first JavaScript start.
    scripts: OnceLock<Option<Modules>>,
    /// Zygote templates, for the runtimes in `options.zygotes`.
    templates: Arc<Templates>,
}

/// What every process started for one worker start shares.
struct Worker<'a> {
    req: &'a Launch<'a>,
    program: PathBuf,
    run_as: Option<access::Credentials>,
    /// The system libraries its extensions need (read-only).
    libraries: Vec<PathBuf>,
    /// The plugin's own writable directory (`<cache>/modules/<plugin>`).
    scratch: Option<PathBuf>,
}

/// The SHA-256 of the module at `path` and its size, read within the limit of a
/// module.
fn module_digest(path: &Path) -> Result<(String, u64), corral_files::ReadError> {
    use sha2::{Digest, Sha256};
    let (file, meta) = corral_files::open_regular_here(path)?;
    let mut h = Sha256::new();
    if meta.len() > MAX_MODULE_BYTES {
        return Err(corral_files::ReadError::TooLarge {
            len: meta.len(),
            max: MAX_MODULE_BYTES,
        });
    }
    let size = std::io::copy(&mut std::io::Read::take(file, MAX_MODULE_BYTES + 1), &mut h)?;
    if size > MAX_MODULE_BYTES {
        return Err(corral_files::ReadError::Grew {
            max: MAX_MODULE_BYTES,
        });
    }
    Ok((crate::plugins::signing::hex(&h.finalize()), size))
}

/// The largest Wasm module loaded (1 GiB): past it, the start is refused before any
/// compile.
const MAX_MODULE_BYTES: u64 = 1 << 30;

impl ProcessLauncher {
    pub(crate) fn new(options: Options) -> ProcessLauncher {
        ProcessLauncher {
            options,
            cgroup_base: OnceLock::new(),
            modules: OnceLock::new(),
            scripts: OnceLock::new(),
            templates: Arc::default(),
        }
    }

    async fn start(&self, req: Launch<'_>) -> Result<Launched, StartError> {
        let p = req.plugin;
        let effective = req.effective;
        let m = &p.manifest;
        // The worker reads the version's copy, not the plugin directory.
        let files = p.files.path();
        let run_as = access::credentials(&effective.user.value).map_err(|why| {
            StartError::Refused(format!(
                "cannot run the worker as user {} (set by {}): {why}",
                effective.user.value, effective.user.origin
            ))
        })?;
        if let Some(cred) = run_as
            && cred.uid != 0
        {
            let missing = corral_confine::missing_for_other_user();
            if !missing.is_empty() {
                return Err(StartError::Refused(format!(
                    "the worker runs as uid {} (user {}), and this supervisor lacks {}: it could \
                     not drop the worker to that user or end it (its deadline, its stop); run \
                     it as root with these capabilities (in a container, add them: \
                     docs/fleet.md)",
                    cred.uid,
                    effective.user.value,
                    missing.join(", ")
                )));
            }
        }
        if let Some(cred) = run_as {
            access::check_readable(files, cred).map_err(|why| {
                StartError::Refused(format!(
                    "the worker runs as uid {} gid {} and cannot read the copy of the plugin: \
                     {why}",
                    cred.uid, cred.gid
                ))
            })?;
        }
        let libraries = match p.libraries.as_ref() {
            Ok(libs) => libs.iter().map(|l| l.path.clone()).collect(),
            Err(why) => return Err(StartError::LoadFailed(why.to_string())),
        };
        let program = self
            .options
            .worker_dir
            .join(format!("corral-worker-{}", m.runtime));
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
        let worker = Worker {
            req: &req,
            program,
            run_as,
            libraries,
            scratch: cache_dir,
        };
        let code = match m.runtime {
            corral_protocol::Runtime::Wasm => self.precompiled(&worker).await?,
            corral_protocol::Runtime::Js => self.precompiled_js(&worker).await,
            _ => Code::Compile,
        };
        self.spawn(&worker, code, None).await
    }

    /// The code a Wasm worker of `w` maps: from the store of compiled modules, made
    /// first by a compile helper if the store has none for the entry's bytes.
    /// `Code::Compile` (the worker compiles) only when there is no store.
    async fn precompiled(&self, w: &Worker<'_>) -> Result<Code, StartError> {
        let Some(modules) = self.modules(&w.program) else {
            return Ok(Code::Compile);
        };
        let p = w.req.plugin;
        let entry = p.files.path().join(&p.manifest.entry);
        let unreadable =
            |e: &dyn std::fmt::Display| StartError::LoadFailed(format!("{}: {e}", entry.display()));
        // The snapshot knows the digest of its files (and they never change).
        let (digest, size) = match p.files.digest(&p.manifest.entry) {
            Some(d) => {
                let size = std::fs::symlink_metadata(&entry)
                    .map_err(|e| unreadable(&e))?
                    .len();
                if size > MAX_MODULE_BYTES {
                    return Err(unreadable(&corral_files::ReadError::TooLarge {
                        len: size,
                        max: MAX_MODULE_BYTES,
                    }));
                }
                (d.to_owned(), size)
            }
            None => module_digest(&entry).map_err(|e| unreadable(&e))?,
        };
        let path = modules
            .get_or_compile(&digest, max_artifact_bytes(size), |out| async move {
                let (helper, group) = self.spawn(w, Code::CompileOnly, Some(out)).await?;
                // It exits on its own once it has answered.
                helper.shutdown(self.options.kill_grace).await;
                if let Some(g) = group {
                    remove_when_empty(g);
                }
                Ok(())
            })
            .await?;
        Ok(Code::Precompiled(path.to_string_lossy().into_owned()))
    }

    /// The bytecode a JavaScript worker of `w` loads: from the store, made first by
    /// a compile helper if the store has none for these files. `Code::Compile` (the
    /// worker parses its modules) when there is no store, or when a helper for
    /// these files failed: the worker then reports the fault itself, as it would
    /// without a store. Without a cache directory there is no store: a helper
    /// would cost one-shot runs more than it saves.
    async fn precompiled_js(&self, w: &Worker<'_>) -> Code {
        if self.options.cache_dir.is_none() {
            return Code::Compile;
        }
        let Some(scripts) = self.store(&self.scripts, Kind::QuickJs, &w.program) else {
            return Code::Compile;
        };
        let p = w.req.plugin;
        let key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(p.files.code_key());
            h.update(b"\0");
            h.update(p.manifest.entry.as_os_str().as_encoded_bytes());
            crate::plugins::signing::hex(&h.finalize())
        };
        if scripts.failed_before(&key) {
            return Code::Compile;
        }
        let made = scripts
            .get_or_compile(
                &key,
                corral_protocol::MAX_BYTECODE_BYTES,
                |out| async move {
                    let (helper, group) = self.spawn(w, Code::CompileOnly, Some(out)).await?;
                    helper.shutdown(self.options.kill_grace).await;
                    if let Some(g) = group {
                        remove_when_empty(g);
                    }
                    Ok(())
                },
            )
            .await;
        match made {
            Ok(path) => Code::Precompiled(path.to_string_lossy().into_owned()),
            Err(e) => {
                tracing::info!(
                    plugin = %p.manifest.id,
                    "its modules are not precompiled (the worker parses them): {}",
                    error_chain(&e)
                );
                // What the files themselves caused is not tried again; the
                // supervisor's own troubles (no room, a slow start) may pass.
                if matches!(
                    e,
                    StartError::LoadFailed(_)
                        | StartError::DiedEarly { .. }
                        | StartError::LoadTimeout(_)
                ) {
                    scripts.note_failed(&key);
                }
                Code::Compile
            }
        }
    }

    /// The store of compiled modules for the worker binary `program`, made at the
    /// first Wasm start; `None` (with a warning, once) if it cannot be.
    fn modules(&self, program: &Path) -> Option<&Modules> {
        self.store(&self.modules, Kind::Wasm, program)
    }

    /// The store of `kind` in `cell`, made at its first use; `None` (with a
    /// warning, once) if it cannot be.
    fn store<'s>(
        &self,
        cell: &'s OnceLock<Option<Modules>>,
        kind: Kind,
        program: &Path,
    ) -> Option<&'s Modules> {
        cell.get_or_init(|| {
            Modules::open(self.options.cache_dir.as_deref(), program, kind)
                .inspect_err(|e| {
                    tracing::warn!(
                        "{kind:?} workers compile their own modules (nothing shared): {e}"
                    )
                })
                .ok()
        })
        .as_ref()
    }

    /// Spawn the worker of `w` with `code`: a serving worker, or with `artifact` a
    /// compile helper (nothing writable but that file).
    async fn spawn(
        &self,
        w: &Worker<'_>,
        code: Code,
        artifact: Option<ArtifactOut>,
    ) -> Result<Launched, StartError> {
        let (p, effective) = (w.req.plugin, w.req.effective);
        let m = &p.manifest;
        let files = p.files.path();
        let level = effective.level.value;
        if level >= Level::High && !corral_confine::can_create_namespaces() {
            return Err(StartError::Refused(format!(
                "level {level} requires its own network, IPC and UTS namespaces, which take \
                 CAP_SYS_ADMIN, and this supervisor does not have it (run it as root with \
                 CAP_SYS_ADMIN; in a container, add the capability: docs/fleet.md)"
            )));
        }
        let (cgroup, cgroup_unavailable) = match self.plugin_cgroup(m, effective) {
            Ok(g) => (Some(Arc::new(g)), None),
            // The supervisor's own limit: not a reason to start without a group.
            Err(GroupError::Exhausted(o)) => return Err(StartError::Overloaded(o)),
            Err(GroupError::Other(why)) if level >= Level::High => {
                return Err(StartError::Refused(format!(
                    "level {level} requires cgroup limits: {why}"
                )));
            }
            Err(GroupError::Other(why)) => {
                tracing::warn!(plugin = %m.id, "starting without cgroup limits: {why}");
                (None, Some(why))
            }
        };
        let mut read: Vec<PathBuf> = std::iter::once(files.to_owned())
            .chain(w.libraries.iter().cloned())
            .collect();
        if let Code::Precompiled(path) = &code {
            read.push(path.into());
        }
        let write = match artifact {
            Some(_) => Vec::new(),
            None => w.scratch.iter().cloned().collect(),
        };
        let spec = SpawnSpec {
            cgroup: cgroup.clone(),
            cgroup_unavailable,
            program: w.program.clone(),
            runtime: m.runtime,
            broker: w.req.broker.clone(),
            redactor: p.redactor.clone(),
            files: Some(PluginFiles {
                snapshot: Arc::clone(&p.files),
                dir: p.dir.clone(),
            }),
            plugin_id: m.id.clone(),
            env: worker_env(),
            handshake_timeout: self.options.handshake_timeout,
            kill_grace: self.options.kill_grace,
            budgets: Budgets {
                log_rate: effective.log_rate.value,
                host_calls: effective.host_calls.value as usize,
            },
            confine: SelfConfinement {
                level,
                read,
                write,
                tmpfs_bytes: effective.tmpfs.value,
                runtime: m.runtime,
                run_as: w.run_as.map(|c| [c.uid, c.gid]),
                hide: Vec::new(),
                // No group to kill the plugin's processes with: a PID namespace.
                own_pids: cgroup.is_none(),
            },
            templates: (artifact.is_none() && self.options.zygotes.contains(&m.runtime))
                .then(|| Arc::clone(&self.templates)),
            artifact,
        };
        let settings = &p.settings;
        let load = LoadSpec {
            plugin_id: m.id.clone(),
            plugin_dir: files.to_string_lossy().into_owned(),
            entry: m.entry.to_string_lossy().into_owned(),
            limits: EngineLimits {
                memory_bytes: effective.memory.value,
                max_output_bytes: effective.max_output.value,
                init_deadline_ms: effective.init_timeout.value.as_millis() as u64,
            },
            code,
            config: settings.config.clone(),
            secrets: settings.secrets.clone(),
        };
        match WorkerHandle::start(&spec, load).await {
            Ok(w) => Ok((w, cgroup)),
            Err(e) => {
                // Whatever failed, the group made for this start goes with it.
                if let Some(g) = cgroup {
                    remove_when_empty(g);
                }
                Err(e)
            }
        }
    }

    fn plugin_cgroup(&self, m: &Manifest, e: &Effective) -> Result<PluginCgroup, GroupError> {
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
            .map_err(|why| GroupError::Other(why.clone()))?;
        let name = format!("{}-{}", m.id, WORKER_SEQ.fetch_add(1, Ordering::Relaxed));
        base.create(&name, &cgroup_limits(e)).map_err(|e| {
            let io = match &e {
                CgroupError::Read { source, .. } | CgroupError::Write { source, .. } => {
                    crate::worker::exhausted(source)
                }
                CgroupError::Unavailable { .. } => None,
            };
            match io {
                Some(o) => GroupError::Exhausted(o),
                None => GroupError::Other(error_chain(&e)),
            }
        })
    }
}

impl Launcher for ProcessLauncher {
    fn launch<'a>(&'a self, req: Launch<'a>) -> BoxFuture<'a, Result<Launched, StartError>> {
        Box::pin(self.start(req))
    }

    fn modules_compiled(&self) -> u64 {
        [&self.modules, &self.scripts]
            .into_iter()
            .filter_map(|s| s.get().and_then(Option::as_ref))
            .map(Modules::compiles)
            .sum()
    }

    fn templates(&self) -> (u64, u64) {
        self.templates.counts()
    }

    fn clean_up(&self) -> bool {
        self.templates.close();
        match self.cgroup_base.get() {
            Some(Ok(base)) => base.try_remove(),
            _ => true,
        }
    }
}

impl Drop for ProcessLauncher {
    /// Best effort without `shutdown`: workers are killed as their handles drop, and
    /// empty groups go now; anything still busy is cleaned by the next supervisor.
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// Why a worker's cgroup could not be made.
enum GroupError {
    /// The supervisor's own limit (descriptors, memory, cgroup count).
    Exhausted(corral_protocol::Overload),
    Other(String),
}

/// The cgroup limits of an effective policy.
pub(crate) fn cgroup_limits(e: &Effective) -> CgroupLimits {
    CgroupLimits {
        memory_bytes: e.worker_memory.value,
        pids_max: e.pids.value,
        cpu_micros_per_sec: (e.cpu.value * 1e6).round() as u64,
    }
}

/// The environment a worker gets: nothing but a sanitised locale and log filter.
fn worker_env() -> Vec<(OsString, OsString)> {
    ["RUST_BACKTRACE", "CORRAL_WORKER_LOG"]
        .into_iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (OsString::from(k), v)))
        .collect()
}
