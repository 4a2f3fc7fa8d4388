//! Compiled code, shared by every worker whose code has the same bytes: Wasm
//! modules, and the bytecode of QuickJS module graphs.
//!
//! A module is compiled once, by a compile helper: the plugin's own worker binary
//! started with `Code::CompileOnly`, under the plugin's level, user, cgroup and
//! confinement like any worker, given read access to the version's copy and nothing
//! to write but one file the supervisor made and owns (an unnamed `O_TMPFILE` at
//! `ARTIFACT_FD`, bounded by `RLIMIT_FSIZE`). It runs no plugin code (no instance,
//! no `init`) and exits. The supervisor copies what it wrote into a file of its own
//! (so nothing the helper left running can change it later) and links that into the
//! store under the digest of the entry's bytes. Serving workers get
//! `Code::Precompiled(path)`, a read-only rule on that one file, and map it: its code
//! pages are shared, and no worker ever carries a compiler's heap.
//!
//! Why a key of the bytes alone is safe to share: the supervisor names the entry
//! (in the version's copy, which only it can write) and the artefact's place, so
//! whatever a helper writes can only ever be loaded for modules with exactly those
//! bytes, which the helper was given and could itself produce by compiling them. A
//! hostile helper can poison only its own module. Each store is per engine build
//! (the worker binary's path, inode and times), and wasmtime checks an artefact's
//! header against its own version and settings before it maps one.
//!
//! QuickJS's bytecode is shared the same way (`workers/js/src/bytecode.rs`): its
//! helper parses the entry and every module it imports statically, evaluates
//! none, and writes their bytecode. Its key is the digest of every file of the
//! version but its manifest, and of the entry: a helper's output is only ever
//! loaded for exactly the files it parsed, in the order it parsed them. A helper
//! that fails (a syntax error, an engine without precompiled code) is not tried
//! again for those files by this supervisor: their workers parse the source, and
//! report its errors as they always did.
//!
//! Layout: `<cache>/<kind>/<engine>/<key>.<extension>` (`wasm/…/<sha256 of the
//! module>.cwasm`, `js/…/<key>.qjsc`), directories 0711
//! (workers pass through, list nothing), files 0644 and owned by the supervisor.
//! Without a cache directory the store is a private temporary directory that goes
//! with the supervisor. Two starts of one module wait for one compile.

use crate::plugins::versions::{link_unnamed, unnamed_file};
use crate::worker::{ArtifactOut, StartError};
use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// How large a compiled module may be: generous over what wasmtime makes (two to
/// four times the module), small enough that a helper cannot fill the disk.
pub(crate) fn max_artifact_bytes(module_bytes: u64) -> u64 {
    (64 << 20) + module_bytes.saturating_mul(16)
}

/// Most keys whose helper failed that a store remembers.
const MAX_FAILED: usize = 4096;

/// What a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Compiled Wasm modules (`.cwasm`).
    Wasm,
    /// Bundles of QuickJS bytecode (`.qjsc`).
    QuickJs,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Wasm => "wasm",
            Kind::QuickJs => "js",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Kind::Wasm => "cwasm",
            Kind::QuickJs => "qjsc",
        }
    }
}

/// The store of compiled modules of one engine build.
#[derive(Debug)]
pub(crate) struct Modules {
    kind: Kind,
    dir: PathBuf,
    /// Kept for a store in a private temporary directory.
    _private: Option<tempfile::TempDir>,
    /// One compile per module at a time: the starts that meet it wait for it.
    flights: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    /// Keys whose helper failed: not tried again while this store lives.
    failed: Mutex<std::collections::HashSet<String>>,
    compiles: AtomicU64,
}

/// Why the store cannot be used (the worker then compiles for itself).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("cannot {what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{} is not the supervisor's own (owner {owner}, mode {mode:o}): a store others can \
         write could hand workers code",
        path.display()
    )]
    NotOwn {
        path: PathBuf,
        owner: u32,
        mode: u32,
    },
}

impl Modules {
    /// The store of `kind` for the worker binary `worker`, under `cache` (or
    /// private).
    pub(crate) fn open(
        cache: Option<&Path>,
        worker: &Path,
        kind: Kind,
    ) -> Result<Modules, StoreError> {
        let engine = engine_key(worker)?;
        let (base, private) = match cache {
            Some(c) => (c.join(kind.dir()), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix(&format!("corral-{}.", kind.dir()))
                    .tempdir()
                    .map_err(|error| StoreError::Io {
                        what: "create a directory in",
                        path: std::env::temp_dir(),
                        error,
                    })?;
                (t.path().to_owned(), Some(t))
            }
        };
        let dir = base.join(engine);
        for d in [&base, &dir] {
            private_dir(d)?;
        }
        Ok(Modules {
            kind,
            dir,
            _private: private,
            flights: Mutex::default(),
            failed: Mutex::default(),
            compiles: AtomicU64::new(0),
        })
    }

    /// Where the compiled module of the bytes with `digest` is kept.
    pub(crate) fn path_for(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.{}", self.kind.extension()))
    }

    /// Whether a helper for `digest` failed in this store's life.
    pub(crate) fn failed_before(&self, digest: &str) -> bool {
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.contains(digest)
    }

    /// Remember that the helper for `digest` failed. At most [`MAX_FAILED`] are
    /// kept (an operator's edits can make new keys for ever): past it the set
    /// starts again, and a forgotten key only costs one more helper.
    pub(crate) fn note_failed(&self, digest: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.len() >= MAX_FAILED {
            failed.clear();
        }
        failed.insert(digest.to_owned());
    }

    /// How many modules this store compiled.
    pub(crate) fn compiles(&self) -> u64 {
        self.compiles.load(Ordering::Relaxed)
    }

    /// The compiled module of the bytes with `digest`: from the store, or made by
    /// `compile` (which runs a helper writing into the file it is given and returns
    /// once the helper has exited) and stored.
    pub(crate) async fn get_or_compile<F, Fut>(
        &self,
        digest: &str,
        max_bytes: u64,
        compile: F,
    ) -> Result<PathBuf, StartError>
    where
        F: FnOnce(ArtifactOut) -> Fut,
        Fut: std::future::Future<Output = Result<(), StartError>>,
    {
        let path = self.path_for(digest);
        if path.is_file() {
            return Ok(path);
        }
        let flight = self.flight(digest);
        let _turn = flight.lock().await;
        if path.is_file() {
            return Ok(path);
        }
        let io = |what: &'static str| {
            let path = self.dir.clone();
            move |error| {
                StartError::LoadFailed(format!("cannot {what} in {}: {error}", path.display()))
            }
        };
        let out =
            Arc::new(unnamed_file(&self.dir).map_err(io("make a file for the compiled module"))?);
        compile(ArtifactOut {
            file: Arc::clone(&out),
            max_bytes,
        })
        .await?;
        // Copied into a file only this process has had open: what the helper left
        // behind (a process holding its descriptor) cannot change the stored one.
        let mut written = out.as_ref();
        written.rewind().map_err(io("read the compiled module"))?;
        let size = out
            .metadata()
            .map_err(io("read the compiled module"))?
            .len();
        if size == 0 {
            return Err(StartError::LoadFailed(
                "the compile helper answered but wrote no compiled module".into(),
            ));
        }
        if size > max_bytes {
            return Err(StartError::LoadFailed(format!(
                "the compiled module is {size} bytes, over the limit of {max_bytes}"
            )));
        }
        let mut kept =
            unnamed_file(&self.dir).map_err(io("make a file for the compiled module"))?;
        let copied = std::io::copy(&mut written.take(max_bytes), &mut kept)
            .map_err(io("copy the compiled module"))?;
        if copied != size {
            return Err(StartError::LoadFailed(format!(
                "the compiled module changed while it was stored ({copied} of {size} bytes)"
            )));
        }
        kept.flush().map_err(io("write the compiled module"))?;
        kept.sync_data().map_err(io("write the compiled module"))?;
        kept.set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io("open the compiled module to workers"))?;
        match link_unnamed(&kept, &path) {
            Ok(()) => {}
            // Another supervisor sharing the cache stored it first: same bytes, same
            // engine, so the same module.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("store the compiled module")(e)),
        }
        self.compiles.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(module = digest, bytes = size, "compiled module stored");
        Ok(path)
    }

    fn flight(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.retain(|_, f| f.strong_count() > 0);
        if let Some(f) = flights.get(digest).and_then(Weak::upgrade) {
            return f;
        }
        let f = Arc::new(tokio::sync::Mutex::new(()));
        flights.insert(digest.to_owned(), Arc::downgrade(&f));
        f
    }
}

/// Create `d` 0711 if missing, and refuse it unless this process's user owns it and
/// nobody else can write it.
fn private_dir(d: &Path) -> Result<(), StoreError> {
    match std::fs::DirBuilder::new().mode(0o711).create(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => {
            return Err(StoreError::Io {
                what: "create",
                path: d.to_owned(),
                error,
            });
        }
    }
    let m = std::fs::symlink_metadata(d).map_err(|error| StoreError::Io {
        what: "read",
        path: d.to_owned(),
        error,
    })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(StoreError::NotOwn {
            path: d.to_owned(),
            owner: m.uid(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Names one build of the worker binary: its path, device, inode, size and times.
/// A new build (an upgrade) gets a store of its own.
fn engine_key(worker: &Path) -> Result<String, StoreError> {
    use sha2::{Digest, Sha256};
    let real = worker.canonicalize().map_err(|error| StoreError::Io {
        what: "find",
        path: worker.to_owned(),
        error,
    })?;
    let m = std::fs::metadata(&real).map_err(|error| StoreError::Io {
        what: "read",
        path: real.clone(),
        error,
    })?;
    let mut h = Sha256::new();
    h.update(real.as_os_str().as_encoded_bytes());
    for n in [
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        h.update(n.to_le_bytes());
    }
    Ok(crate::plugins::signing::hex(&h.finalize()[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"a worker binary").unwrap();
        f
    }

    #[tokio::test]
    async fn a_module_is_compiled_once_and_stored_read_only_for_workers() {
        let cache = tempfile::tempdir().unwrap();
        let w = worker();
        let store = Arc::new(Modules::open(Some(cache.path()), w.path(), Kind::Wasm).unwrap());
        let runs = Arc::new(AtomicU64::new(0));
        let compile = |runs: Arc<AtomicU64>| {
            move |out: ArtifactOut| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                out.file.as_ref().write_all(b"compiled").unwrap();
                Ok(())
            }
        };
        // Two starts at once: one compile, both get the same file.
        let (a, b) = tokio::join!(
            store.get_or_compile("abc", 100, compile(Arc::clone(&runs))),
            store.get_or_compile("abc", 100, compile(Arc::clone(&runs))),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(store.compiles(), 1);
        assert_eq!(std::fs::read(&a).unwrap(), b"compiled");
        let m = std::fs::metadata(&a).unwrap();
        assert_eq!(m.mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::metadata(a.parent().unwrap()).unwrap().mode() & 0o777,
            0o711
        );
        // Nothing else was left in the store (the helper's file had no name).
        assert_eq!(std::fs::read_dir(a.parent().unwrap()).unwrap().count(), 1);
        // The next start finds it without compiling; a second store over the same
        // cache (another supervisor) does too.
        store
            .get_or_compile("abc", 100, compile(Arc::clone(&runs)))
            .await
            .unwrap();
        let other = Modules::open(Some(cache.path()), w.path(), Kind::Wasm).unwrap();
        assert_eq!(
            other
                .get_or_compile("abc", 100, compile(Arc::clone(&runs)))
                .await
                .unwrap(),
            a
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn nothing_is_stored_from_a_failed_empty_or_oversized_compile() {
        let cache = tempfile::tempdir().unwrap();
        let w = worker();
        let store = Modules::open(Some(cache.path()), w.path(), Kind::Wasm).unwrap();
        let failed = store
            .get_or_compile("f", 100, |_| async {
                Err(StartError::LoadFailed("invalid module".into()))
            })
            .await;
        assert!(matches!(failed, Err(StartError::LoadFailed(m)) if m == "invalid module"));
        let empty = store.get_or_compile("e", 100, |_| async { Ok(()) }).await;
        assert!(
            matches!(&empty, Err(StartError::LoadFailed(m)) if m.contains("wrote no compiled module")),
            "{empty:?}"
        );
        let big = store
            .get_or_compile("b", 4, |out: ArtifactOut| async move {
                out.file.as_ref().write_all(b"too large").unwrap();
                Ok(())
            })
            .await;
        assert!(
            matches!(&big, Err(StartError::LoadFailed(m)) if m.contains("9 bytes, over the limit of 4")),
            "{big:?}"
        );
        let dir = store.path_for("f").parent().unwrap().to_owned();
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0);
    }

    #[test]
    fn failed_keys_are_remembered_within_a_bound() {
        let cache = tempfile::tempdir().unwrap();
        let w = worker();
        let store = Modules::open(Some(cache.path()), w.path(), Kind::QuickJs).unwrap();
        assert!(store.path_for("k").to_str().unwrap().ends_with("/k.qjsc"));
        assert!(!store.failed_before("k"));
        store.note_failed("k");
        assert!(store.failed_before("k"));
        for i in 1..MAX_FAILED {
            store.note_failed(&i.to_string());
        }
        assert!(store.failed_before("k"));
        assert_eq!(store.failed.lock().unwrap().len(), MAX_FAILED);
        // One more: the set starts again, never past its bound.
        store.note_failed("last");
        assert!(!store.failed_before("k") && store.failed_before("last"));
        assert_eq!(store.failed.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_store_others_can_write_is_refused_and_builds_do_not_share() {
        let cache = tempfile::tempdir().unwrap();
        let w = worker();
        std::fs::create_dir(cache.path().join("wasm")).unwrap();
        std::fs::set_permissions(
            cache.path().join("wasm"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let e = Modules::open(Some(cache.path()), w.path(), Kind::Wasm).unwrap_err();
        assert!(matches!(e, StoreError::NotOwn { mode: 0o777, .. }), "{e}");
        std::fs::set_permissions(
            cache.path().join("wasm"),
            std::fs::Permissions::from_mode(0o711),
        )
        .unwrap();
        let a = Modules::open(Some(cache.path()), w.path(), Kind::Wasm).unwrap();
        let v = worker();
        let b = Modules::open(Some(cache.path()), v.path(), Kind::Wasm).unwrap();
        assert_ne!(a.path_for("x"), b.path_for("x"));
        // Without a cache directory: private, and gone with the store.
        let p = Modules::open(None, w.path(), Kind::Wasm).unwrap();
        let dir = p.path_for("x").parent().unwrap().to_owned();
        assert!(dir.is_dir());
        drop(p);
        assert!(!dir.exists());
    }
}
