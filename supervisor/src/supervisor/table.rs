//! The plugin table, and reading a plugin version from its directory.

use super::{AddPluginError, Inner, PluginState};
use crate::broker::messaging::Delivery;
use crate::plugins::native::{self, Library, NativeError};
use crate::plugins::signing;
use crate::plugins::versions::{Snapshot, Versions};
use crate::worker::Redactor;
use corral_manifest::Manifest;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use tokio::sync::Mutex;

/// A plugin's place in the supervisor.
#[derive(Debug)]
pub(crate) struct Plugin {
    pub(crate) manifest: Manifest,
    /// The plugin's directory (its identity, and what messages name).
    pub(crate) dir: PathBuf,
    /// The copy of this version's files that its workers read.
    pub(crate) files: Arc<Snapshot>,
    pub(crate) state: Mutex<PluginState>,
    /// Held by the one task starting this version's worker: the state lock is not
    /// (a start takes as long as the plugin's `init`, and `list`, `status`, removal
    /// and shutdown must not wait for it).
    pub(crate) starting: Mutex<()>,
    /// Shared by every version of the plugin (a reload carries them over):
    pub(crate) calls: Arc<AtomicU64>,
    /// Slots for calls queued or running (`Options::max_queue`).
    pub(crate) inflight: Arc<tokio::sync::Semaphore>,
    /// Messages queued for this plugin's subscriptions, delivered in order.
    pub(crate) deliveries: Arc<OnceLock<tokio::sync::mpsc::Sender<Delivery>>>,
    pub(crate) redactor: Redactor,
    /// The operator's configuration and secrets for it, as they were when this
    /// version was read (a reload that changes them makes a new version).
    pub(crate) settings: Arc<crate::PluginConfig>,
    /// The publisher whose trusted key verified `plugin.sig`; `None`: unsigned.
    pub(crate) publisher: Option<String>,
    /// Digest of the files this version was loaded from (hot reload compares it).
    pub(crate) fingerprint: String,
    /// The system libraries its compiled extensions need (Python), granted
    /// read-only to its workers; or why they cannot all be found, which fails every
    /// start of this version.
    pub(crate) libraries: Arc<Result<Vec<Library>, NativeError>>,
    /// Set (under the state lock) when a new version replaced this one or the plugin
    /// was removed: calls that still hold it go to the plugin's current version.
    pub(crate) retired: std::sync::atomic::AtomicBool,
    /// This version's grants under the policy they were resolved from: a host call
    /// resolves them again only when the policy in force is another one.
    pub(crate) grants: GrantCache,
    /// Told when one of this version's workers is free or a new one is ready:
    /// the calls waiting for a worker look again.
    pub(crate) freed: Arc<tokio::sync::Notify>,
    /// The calls waiting for a worker, first come first served: its one permit
    /// is held by the head of the line (`Inner::turn_for`).
    pub(crate) line: Arc<tokio::sync::Semaphore>,
}

/// A plugin version's grants, with the policy they were resolved from.
pub(crate) type GrantCache = std::sync::Mutex<Option<Grants>>;

/// What a plugin version's grants were resolved from, and its level under it.
#[derive(Debug)]
pub(crate) struct Grants {
    of: Arc<corral_policy::Policy>,
    services: Arc<corral_policy::Services>,
    level: corral_confine::Level,
}

impl Inner {
    /// `p`'s grants under the policy in force, resolved once per policy: a policy
    /// edit (a new `Arc`) applies from the next host call on.
    pub(crate) fn grants(&self, p: &Plugin) -> Arc<corral_policy::Services> {
        self.resolved(p, |g| Arc::clone(&g.services))
    }

    /// `p`'s level under the policy in force (the `level` label of its metrics).
    pub(crate) fn level_of(&self, p: &Plugin) -> corral_confine::Level {
        self.resolved(p, |g| g.level)
    }

    fn resolved<T>(&self, p: &Plugin, f: impl FnOnce(&Grants) -> T) -> T {
        let policy = self.policy();
        let mut cache = p.grants.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = &*cache
            && Arc::ptr_eq(&g.of, &policy)
        {
            return f(g);
        }
        let effective = policy.resolve(&p.manifest, p.publisher.as_deref());
        let g = cache.insert(Grants {
            of: policy,
            services: Arc::new(effective.services),
            level: effective.level.value,
        });
        f(g)
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
        self.add_read(plugin)
    }

    /// [`Inner::add_plugin_dir`] of each of `dirs`, read on up to one thread per CPU
    /// and added in order.
    pub(crate) fn add_plugin_dirs(&self, dirs: &[PathBuf]) -> Vec<Result<String, AddPluginError>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(dirs.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut read: Vec<Option<Result<Plugin, AddPluginError>>> =
            std::iter::repeat_with(|| None).take(dirs.len()).collect();
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(dir) = dirs.get(i) else { break };
                            done.push((i, self.read_plugin(dir, None)));
                        }
                        done
                    })
                })
                .collect();
            for reader in readers {
                // A panic in a reader is a bug: it goes on up, as on one thread.
                let done = reader
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                for (i, plugin) in done {
                    read[i] = Some(plugin);
                }
            }
        });
        read.into_iter()
            .map(|plugin| {
                plugin
                    .expect("every directory was read")
                    .and_then(|p| self.add_read(p))
            })
            .collect()
    }

    /// Put a plugin just read in the table, unless one with its id is there.
    fn add_read(&self, plugin: Plugin) -> Result<String, AddPluginError> {
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
        let versions = self
            .versions
            .get_or_init(|| {
                let root = self
                    .options
                    .cache_dir
                    .clone()
                    .unwrap_or_else(std::env::temp_dir);
                Versions::create(&root)
            })
            .as_ref()
            .map_err(|why| AddPluginError::Snapshot {
                dir: dir.clone(),
                why: why.to_string(),
            })?;
        let fingerprint = versions
            .fingerprint(&dir)
            .map_err(|source| AddPluginError::Files {
                dir: dir.clone(),
                source,
            })?;
        let manifest = Manifest::load_dir(&dir)?;
        let publisher = signing::verify(&dir, &self.live().publishers).map_err(|source| {
            AddPluginError::Signature {
                dir: dir.clone(),
                source,
            }
        })?;
        // What was checked is what runs: the snapshot must hold the files
        // fingerprinted before the manifest and signature were read (its own
        // fingerprint comes from the digests taken as its files were linked).
        let files = versions
            .snapshot(&dir)
            .map_err(|e| AddPluginError::Snapshot {
                dir: dir.clone(),
                why: e.to_string(),
            })?;
        if files.fingerprint().ok().as_ref() != Some(&fingerprint) {
            return Err(AddPluginError::Changed { dir });
        }
        // A signed plugin's signature is checked again on the snapshot's own bytes:
        // its files may have been linked from digests remembered by their metadata,
        // which an author who controls the file system could forge.
        if publisher.is_some()
            && signing::verify(files.path(), &self.live().publishers)
                .ok()
                .flatten()
                != publisher
        {
            return Err(AddPluginError::Changed { dir });
        }
        let settings = Arc::new(
            self.live()
                .plugin_config
                .get(&manifest.id)
                .cloned()
                .unwrap_or_default(),
        );
        let redactor = redactor_of(&settings);
        let previous = previous.filter(|p| p.manifest.id == manifest.id);
        let libraries = Arc::new(self.native_libraries(&manifest, files.path()));
        Ok(Plugin {
            manifest,
            dir,
            files: Arc::new(files),
            state: Mutex::new(PluginState::default()),
            starting: Mutex::new(()),
            calls: previous.map_or_else(Default::default, |p| Arc::clone(&p.calls)),
            inflight: previous.map_or_else(
                || Arc::new(tokio::sync::Semaphore::new(self.live().max_queue)),
                |p| Arc::clone(&p.inflight),
            ),
            deliveries: previous.map_or_else(Default::default, |p| Arc::clone(&p.deliveries)),
            redactor,
            settings,
            publisher,
            fingerprint,
            libraries,
            retired: Default::default(),
            grants: Default::default(),
            freed: Default::default(),
            line: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// What the compiled extensions in a version's `files` need of the system, as
    /// the worker's loader resolves it: a Python plugin's extensions, or a native
    /// plugin's library and what it links (Wasm and JavaScript load no native code).
    fn native_libraries(
        &self,
        manifest: &Manifest,
        files: &Path,
    ) -> Result<Vec<Library>, NativeError> {
        use corral_protocol::Runtime;
        if !matches!(manifest.runtime, Runtime::Python | Runtime::Native) {
            return Ok(Vec::new());
        }
        let worker = self
            .options
            .worker_dir
            .join(format!("corral-worker-{}", manifest.runtime));
        let linker = native::Linker::system(Some(&worker));
        let mut libraries = linker.libraries(files)?;
        if !libraries.is_empty() && linker.uses_cache() {
            // Where the loader looks names up first (without it, only the default
            // directories are searched).
            libraries.push(Library {
                path: native::LD_SO_CACHE.into(),
                needed_by: "the dynamic loader (its index of libraries)".into(),
            });
        }
        Ok(libraries)
    }

    /// The same version of `p` (the same files and shared queues) as a new table
    /// entry with the operator's `settings` for it, to run in a new worker.
    pub(crate) fn same_version_with(p: &Plugin, settings: Arc<crate::PluginConfig>) -> Plugin {
        Plugin {
            manifest: p.manifest.clone(),
            dir: p.dir.clone(),
            files: Arc::clone(&p.files),
            state: Mutex::new(PluginState::default()),
            starting: Mutex::new(()),
            calls: Arc::clone(&p.calls),
            inflight: Arc::clone(&p.inflight),
            deliveries: Arc::clone(&p.deliveries),
            redactor: redactor_of(&settings),
            settings,
            publisher: p.publisher.clone(),
            fingerprint: p.fingerprint.clone(),
            libraries: Arc::clone(&p.libraries),
            retired: Default::default(),
            grants: Default::default(),
            freed: Default::default(),
            line: Arc::new(tokio::sync::Semaphore::new(1)),
        }
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
}

/// What hides `settings`' secrets in the plugin's log lines and errors.
fn redactor_of(settings: &crate::PluginConfig) -> Redactor {
    Redactor::new(
        settings
            .secrets
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    )
}
