//! Snapshots of plugin versions: the files a version's workers read.
//!
//! When a version is read, its files are put into the supervisor's own `versions`
//! directory (under the cache directory), and every worker of that version loads
//! that snapshot. A version therefore keeps running exactly as it was checked
//! whatever happens to its directory afterwards: an edit the lifecycle rejected, a
//! half-written file, or the directory removed. A worker restarted after a crash,
//! renewed under a new policy, or a Python worker importing again after a trap
//! reads the same files as the first one. The worker's user needs no access to the
//! operator's plugin directory, only to the snapshot (read-only to it).
//!
//! Snapshots are copy-on-write in the way that matters here: a file's contents are
//! stored once, as an object named by their SHA-256 in `objects/` (0444, owned by
//! the supervisor, in a 0700 directory), and every snapshot holding those bytes,
//! of any version or plugin, is a hard link to it. Only files whose metadata
//! (device, inode, size, modification and change times) changed since they were
//! last hashed are read again; the others are linked from what is known, which
//! the supervisors of a cache keep between them in `objects/.index/`, a file per
//! plugin directory (read when the directory is first used, written when what is
//! known of it changed: a `corral run` of a plugin seen before reads none of its
//! files). A file is
//! copied into a new object through the descriptor it was checked on, hashed as it
//! is copied. An object nothing links any more (a link count of one) for ten
//! minutes is removed by the next sweep; the store is shared by the supervisors of
//! one cache directory, and one of them removing an object another is about to
//! link only costs that one a copy.
//!
//! The tree of a snapshot (its directories, links, and a hard link to the object of
//! each file) is itself made once: it is named by the SHA-256 of everything it holds
//! and shared by every version with the same files, of any plugin and any supervisor
//! of the cache. Registering a plugin seen before, or a one-shot `corral run` of it,
//! states its files, finds its tree, and links nothing; a version's end removes one
//! link, its reference to the tree. A tree goes once no supervisor's directory
//! refers to it and it has not been used for ten minutes.
//!
//! Layout: `<cache>/versions/<pid>.<random>/` per supervisor, holding a `.lock` that
//! the supervisor keeps locked while it runs, and one `<dir name>.<random>` per
//! version, a link to `../trees/<key>`; `<cache>/versions/trees/<64 hex>/` (with a
//! `.lock` held shared while a tree is looked up or made and referred to, and
//! exclusively by a sweep); `<cache>/versions/objects/<2 hex>/<64 hex>`. A version's
//! reference is removed when the version and all its workers are gone; a
//! supervisor's directory when it exits, or, if it was killed, by the next
//! supervisor that finds its lock free.

use crate::plugins::files::{FileHashes, stamp};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The snapshot of one plugin version's files: a tree of the store, shared by every
/// version (of any plugin, of any supervisor of the cache) with the same files, and
/// this version's reference to it, removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    /// `trees/<key>`.
    path: PathBuf,
    /// `<supervisor's directory>/<dir name>.<random>`, a link to `../trees/<key>`:
    /// while one is there, no sweep removes the tree.
    _reference: tempfile::NamedTempFile<()>,
    /// The digest of every regular file, by path in the snapshot.
    digests: HashMap<PathBuf, String>,
    /// Its fingerprint, from what it was made of.
    fingerprint: String,
    /// The key of its code ([`code_key`]).
    code_key: String,
}

impl Snapshot {
    /// Where the snapshot is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint of the snapshot (as [`crate::plugins::files::fingerprint`]
    /// gives it), from the entries and digests taken as it was made: nothing is
    /// read or listed again.
    pub(crate) fn fingerprint(&self) -> std::io::Result<String> {
        Ok(self.fingerprint.clone())
    }

    /// The digest of every file, link and directory but the manifest: equal for
    /// two snapshots whose code is the same, whatever plugin they are of.
    pub(crate) fn code_key(&self) -> &str {
        &self.code_key
    }

    /// The digest of the file at `rel` in the snapshot, if it is a regular file.
    pub(crate) fn digest(&self, rel: &Path) -> Option<&str> {
        self.digests.get(&self.path().join(rel)).map(String::as_str)
    }
}

/// One supervisor's directory of snapshots, locked while it lives, and the store of
/// file objects they link.
#[derive(Debug)]
pub(crate) struct Versions {
    dir: tempfile::TempDir,
    _lock: File,
    objects: PathBuf,
    /// `versions/trees/`: the snapshots' trees, by the key of what they hold.
    trees: PathBuf,
    /// Digests of the plugin directories' files, by path and metadata.
    known: Mutex<FileHashes>,
    last_sweep: Mutex<Instant>,
    /// Bytes read from plugin directories into objects (what was not known).
    copied: std::sync::atomic::AtomicU64,
    /// When `known` was last written to the cache's index.
    last_saved: Mutex<Instant>,
    /// The plugin directories whose index was read, each with the SHA-256 of what
    /// its index file holds: it is written again only when that changed.
    indexed: Mutex<HashMap<PathBuf, [u8; 32]>>,
    /// Whether `objects/.index/` is a private directory of this user's: else no
    /// index is read or written.
    use_index: bool,
}

const LOCK: &str = ".lock";
const OBJECTS: &str = "objects";
/// Snapshot trees, `trees/<key>/`: directories of links to objects, named by the
/// SHA-256 of everything they hold ([`tree_key`]), made once and shared by every
/// version with those files, kept while a supervisor's directory refers to one and
/// for [`UNUSED_FOR`] after its last use. A one-shot `corral run` of a plugin run
/// before, or a new supervisor registering it, finds its tree made and links
/// nothing; a run's end removes one link, not the tree.
const TREES: &str = "trees";
/// In `trees/`: held shared while a tree is looked up (or made) and referred to,
/// exclusively while a sweep decides what to remove.
const TREES_LOCK: &str = ".lock";
/// Touched by each sweep of `objects/`: the supervisors of a cache sweep at most
/// once per [`UNUSED_FOR`] between them.
const SWEPT: &str = ".swept";
/// The digests of plugin files by path and metadata, kept between supervisors
/// (`FileHashes::to_index`), one file per plugin directory in `objects/.index/`
/// named by the SHA-256 of the directory's path: a new supervisor, or a `corral
/// run`, links the files it has seen before without reading them. Read when the
/// directory is first fingerprinted or snapshotted; written when what is known of
/// it changed, when the supervisor ends (and by a daemon at most once a minute).
const INDEX: &str = ".index";
/// The largest index read (a million entries of about 100 bytes).
const MAX_INDEX: u64 = 128 << 20;

/// Files up to this size are read into memory, hashed, and written to the store
/// only if it lacks their bytes; larger ones are streamed into it as they are hashed.
const IN_MEMORY: u64 = 1 << 20;

/// How often a daemon that keeps registering plugins writes its index.
const SAVE_EVERY: Duration = Duration::from_secs(60);

/// How long an object nothing links stays (a one-shot `corral run` of the same
/// plugin a moment later links it again instead of copying).
const UNUSED_FOR: Duration = Duration::from_secs(600);

/// Why the directory of version snapshots cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}: {error}")]
pub(crate) struct VersionsError {
    /// What was being done, with its path (`create /var/cache/corral/versions`).
    what: String,
    error: std::io::Error,
}

impl Versions {
    /// A new directory for this supervisor's snapshots in `<root>/versions`; the
    /// directories of supervisors that are gone are removed first.
    pub(crate) fn create(root: &Path) -> Result<Versions, VersionsError> {
        let base = root.join("versions");
        let at = |what: String| move |error| VersionsError { what, error };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&base)
            .map_err(at(format!("create {}", base.display())))?;
        remove_stale(&base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}.", std::process::id()))
            .tempdir_in(&base)
            .map_err(at(format!("create a directory in {}", base.display())))?;
        // Workers running as other users go through it to their version, but may not
        // list it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(at(format!("open {} to workers", dir.path().display())))?;
        // The lock file appears already locked: made under another name, locked,
        // then renamed. Another supervisor's `remove_stale` takes a directory whose
        // lock it can take for one that is gone, so a lock made in place and locked
        // after left a moment in which this new directory was removed under it
        // (seen in CI: "cannot copy the plugin ...: No such file or directory").
        let lock_path = dir.path().join(LOCK);
        let lock = tempfile::Builder::new()
            .prefix(".lock.")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir.path())
            .map_err(at(format!("create {}", lock_path.display())))?;
        lock.as_file()
            .try_lock()
            .map_err(|e| at(format!("lock {}", lock_path.display()))(std::io::Error::from(e)))?;
        let lock = lock
            .persist(&lock_path)
            .map_err(|e| at(format!("create {}", lock_path.display()))(e.error))?;
        let objects = base.join(OBJECTS);
        make_objects(&objects).map_err(at(format!("create {}", objects.display())))?;
        let trees = base.join(TREES);
        make_trees(&trees).map_err(at(format!("create {}", trees.display())))?;
        let index = objects.join(INDEX);
        match std::fs::DirBuilder::new().mode(0o700).create(&index) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(at(format!("create {}", index.display()))(e));
            }
            _ => {}
        }
        // A directory of this user's that nobody else can enter, not a link.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let private = std::fs::symlink_metadata(&index)
            .is_ok_and(|m| m.is_dir() && m.uid() == euid && m.mode() & 0o077 == 0);
        if !private {
            tracing::warn!(
                "{}: not a private directory of this user's; file digests are not kept \
                 between supervisors",
                index.display()
            );
        }
        let versions = Versions {
            dir,
            _lock: lock,
            objects,
            trees,
            known: Mutex::default(),
            last_sweep: Mutex::new(Instant::now()),
            copied: Default::default(),
            last_saved: Mutex::new(Instant::now()),
            indexed: Mutex::default(),
            use_index: private,
        };
        versions.sweep_in_background();
        Ok(versions)
    }

    /// Remove, on a thread of its own, the objects nothing has linked for
    /// [`UNUSED_FOR`], unless a supervisor of this cache did less than that ago
    /// (`objects/.swept`, touched by each sweep): a `corral run` would otherwise
    /// read every shard at each start, beside the worker it starts.
    fn sweep_in_background(&self) {
        let stamp = self.objects.join(SWEPT);
        let recent = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < UNUSED_FOR));
        if recent {
            return;
        }
        if let Err(e) =
            File::create(&stamp).and_then(|f| f.set_modified(std::time::SystemTime::now()))
        {
            tracing::debug!("cannot touch {}: {e}", stamp.display());
        }
        let objects = self.objects.clone();
        let base = self.trees.parent().map(Path::to_owned);
        let _ = std::thread::Builder::new()
            .name("corral-objects-sweep".into())
            .spawn(move || {
                // Trees first: the objects only they linked become unlinked then.
                if let Some(base) = base {
                    sweep_trees(&base, UNUSED_FOR);
                }
                sweep(&objects, UNUSED_FOR)
            });
    }

    /// Snapshot the plugin in `dir` (every file but `__pycache__`, links as links),
    /// readable (not writable) by every user: each regular file's bytes stored as an
    /// object once (read only if not known), then the tree of those files found in
    /// `trees/`, or made there of links to the objects.
    pub(crate) fn snapshot(&self, dir: &Path) -> std::io::Result<Snapshot> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let mut entries = Vec::new();
        let (path, reference) = {
            // What is known of files is locked only to look them up and to remember
            // them: snapshots of other plugins (registration reads them side by side)
            // go on meanwhile. Objects and trees may be made twice at once, as by two
            // supervisors of the cache: the second one made is let go.
            self.read_index(dir);
            self.scan(dir, dir, &mut entries)?;
            let key = tree_key(&entries);
            let path = self.trees.join(&key);
            // No sweep decides while this holds: the tree found (or made) stays, as
            // the reference made here is seen by the next one.
            let lock = File::open(self.trees.join(TREES_LOCK))?;
            lock.lock_shared()?;
            let reference = tempfile::Builder::new()
                .prefix(&format!("{name}."))
                .make_in(self.dir.path(), |at| {
                    std::os::unix::fs::symlink(Path::new("..").join(TREES).join(&key), at)
                })?;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                // Its last use, for the sweeps (a failure only lets it go sooner).
                let _ =
                    File::open(&path).and_then(|d| d.set_modified(std::time::SystemTime::now()));
            } else {
                let made = self.build(dir, &entries)?;
                match rename_new(made.path(), &path) {
                    Ok(()) => {
                        let _ = made.keep();
                    }
                    // Made by another supervisor of the cache meanwhile: the same
                    // files, so that one is taken and this one goes.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            drop(lock);
            (path, reference)
        };
        let fingerprint = fingerprint_of(&entries);
        let code_key = code_key(&entries);
        let digests = entries
            .into_iter()
            .filter_map(|e| match e {
                Entry::File(rel, digest) => Some((path.join(rel), digest)),
                _ => None,
            })
            .collect();
        let mut last = self.last_sweep.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() > UNUSED_FOR {
            *last = Instant::now();
            self.sweep_in_background();
        }
        drop(last);
        let mut saved = self.last_saved.lock().unwrap_or_else(|e| e.into_inner());
        if saved.elapsed() > SAVE_EVERY {
            *saved = Instant::now();
            self.save_index();
        }
        Ok(Snapshot {
            path,
            _reference: reference,
            digests,
            fingerprint,
            code_key,
        })
    }

    /// What the snapshot of `dir` holds, in order, each regular file's bytes in the
    /// store: a file known by its metadata is not read.
    fn scan(&self, root: &Path, dir: &Path, out: &mut Vec<Entry>) -> std::io::Result<()> {
        let mut entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let kind = entry.file_type()?;
            let src = entry.path();
            let rel = src.strip_prefix(root).unwrap_or(&src).to_owned();
            if kind.is_dir() {
                if entry.file_name() == "__pycache__" {
                    continue;
                }
                out.push(Entry::Dir(rel));
                self.scan(root, &src, out)?;
            } else if kind.is_symlink() {
                out.push(Entry::Link(rel, std::fs::read_link(&src)?));
            } else if kind.is_file() {
                let meta = entry.metadata()?;
                out.push(Entry::File(rel, self.store_file(&src, &meta, true)?));
            }
            // Pipes, sockets and devices are not plugin files.
        }
        Ok(())
    }

    /// A new tree in `trees/` (under a temporary name) of `entries`, scanned from
    /// `dir`: directories, links, and each file a link to its object.
    fn build(&self, dir: &Path, entries: &[Entry]) -> std::io::Result<tempfile::TempDir> {
        let made = tempfile::Builder::new()
            .prefix(".new.")
            .tempdir_in(&self.trees)?;
        std::fs::set_permissions(made.path(), std::fs::Permissions::from_mode(0o755))?;
        for entry in entries {
            match entry {
                Entry::Dir(rel) => std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(made.path().join(rel))?,
                Entry::Link(rel, target) => {
                    std::os::unix::fs::symlink(target, made.path().join(rel))?
                }
                Entry::File(rel, digest) => {
                    let dst = made.path().join(rel);
                    if std::fs::hard_link(self.object(digest), &dst).is_ok() {
                        continue;
                    }
                    // Its object was swept since it was known: stored again from
                    // the plugin's file, if that still has these bytes.
                    let src = dir.join(rel);
                    let meta = std::fs::symlink_metadata(&src)?;
                    if self.store_file(&src, &meta, false)? != *digest {
                        return Err(std::io::Error::other(format!(
                            "{}: it changed while the plugin was copied",
                            src.display()
                        )));
                    }
                    std::fs::hard_link(self.object(digest), &dst)?;
                }
            }
        }
        Ok(made)
    }

    /// What an earlier supervisor of this cache knew of the files in `dir`, once
    /// per directory.
    fn read_index(&self, dir: &Path) {
        if !self.use_index {
            return;
        }
        // `known` before `indexed`, as `save_index` takes them.
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut indexed = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
        if indexed.contains_key(dir) {
            return;
        }
        let path = self.index_path(dir);
        let bytes = read_index_file(&path);
        let held = match bytes {
            Some(bytes) if known.merge_index(&bytes) => {
                Sha256::digest(known.to_index(dir, |_| true)).into()
            }
            Some(_) => {
                tracing::warn!(
                    "{}: not an index of file digests (or past the entries kept); ignored",
                    path.display()
                );
                [0; 32]
            }
            None => [0; 32],
        };
        indexed.insert(dir.to_owned(), held);
    }

    /// `objects/.index/<SHA-256 of the directory's path>`.
    fn index_path(&self, dir: &Path) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        let name = crate::plugins::signing::hex(&Sha256::digest(dir.as_os_str().as_bytes()));
        self.objects.join(INDEX).join(name)
    }

    /// Write what is known of each directory whose index was read, where that
    /// changed: only the entries whose object is still stored (what a sweep
    /// removed goes from the index too). Replaced whole (a new file renamed over
    /// it); a failure costs the next supervisor a read of the files, nothing else.
    fn save_index(&self) {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let mut indexed = self.indexed.lock().unwrap_or_else(|e| e.into_inner());
        for (dir, held) in indexed.iter_mut() {
            // `held` is the digest of all that is known of `dir`: unchanged, nothing
            // is written (and no object is looked at).
            let all: [u8; 32] = Sha256::digest(known.to_index(dir, |_| true)).into();
            if all == *held {
                continue;
            }
            let bytes = known.to_index(dir, |digest| self.object(digest).exists());
            if bytes.len() <= 1 {
                // Nothing worth keeping (an empty list): no file for it.
                *held = all;
                continue;
            }
            let path = self.index_path(dir);
            let write = || -> std::io::Result<()> {
                let mut tmp = tempfile::Builder::new()
                    .prefix(".new.")
                    .tempfile_in(self.objects.join(INDEX))?;
                tmp.write_all(&bytes)?;
                tmp.persist(&path).map_err(|e| e.error)?;
                Ok(())
            };
            match write() {
                Ok(()) => *held = all,
                Err(e) => tracing::debug!("cannot write {}: {e}", path.display()),
            }
        }
    }

    /// The fingerprint of the plugin in `dir`, hashing only the files that changed
    /// since they were last hashed here.
    pub(crate) fn fingerprint(&self, dir: &Path) -> std::io::Result<String> {
        self.read_index(dir);
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        crate::plugins::files::fingerprint_with(dir, &mut known)
    }

    /// Make sure the store has the object of the bytes of the file `src`, whose
    /// metadata (not followed) is `m`; their digest. A file known by its metadata
    /// (when `trust_known`) is not read.
    fn store_file(
        &self,
        src: &Path,
        m: &std::fs::Metadata,
        trust_known: bool,
    ) -> std::io::Result<String> {
        let known = || self.known.lock().unwrap_or_else(|e| e.into_inner());
        // Known and unchanged: what is linked is its object, never the author's file.
        if trust_known
            && m.file_type().is_file()
            && let Some(digest) = known().known(src, &stamp(m))
        {
            return Ok(digest);
        }
        // Not `fs::copy`: the author may swap the file for a link (to a file only
        // the supervisor can read) or a FIFO after the listing.
        let (mut file, before) = corral_files::open_regular_here(src)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", src.display())))?;
        let digest = if before.len() <= IN_MEMORY {
            // Small (most files): read, hashed, and written only if no object has
            // these bytes yet.
            let bytes = corral_files::read_at_most(&mut file, IN_MEMORY, before.len())
                .map_err(|e| std::io::Error::other(format!("{}: {e}", src.display())))?;
            self.copied
                .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let digest = crate::plugins::signing::hex(&Sha256::digest(&bytes));
            if !self.object(&digest).is_file() {
                let mut out = self.unnamed()?;
                out.write_all(&bytes)?;
                self.store(&out, &digest)?;
            }
            digest
        } else {
            let mut out = self.unnamed()?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                out.write_all(&buf[..n])?;
                self.copied
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let digest = crate::plugins::signing::hex(&h.finalize());
            self.store(&out, &digest)?;
            digest
        };
        // Remembered only if the file did not change while it was read.
        if file
            .metadata()
            .is_ok_and(|after| stamp(&after) == stamp(&before))
        {
            known().remember(src, stamp(&before), &digest);
        }
        Ok(digest)
    }

    /// A new unnamed file in the store, for an object's bytes.
    fn unnamed(&self) -> std::io::Result<File> {
        unnamed_file(&self.objects)
    }

    /// Make `out` (the bytes with `digest`) the store's object unless one exists.
    fn store(&self, out: &File, digest: &str) -> std::io::Result<()> {
        out.set_permissions(std::fs::Permissions::from_mode(0o444))?;
        let object = self.object(digest);
        let linked = match link_unnamed(out, &object) {
            // Its shard is gone (a cleaner removing empty directories): made again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(shard) = object.parent() {
                    let _ = std::fs::DirBuilder::new().mode(0o700).create(shard);
                }
                link_unnamed(out, &object)
            }
            other => other,
        };
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn object(&self, digest: &str) -> PathBuf {
        self.objects.join(&digest[..2]).join(digest)
    }
}

/// What a snapshot holds, by path relative to its root.
#[derive(Debug)]
enum Entry {
    Dir(PathBuf),
    Link(PathBuf, PathBuf),
    /// A regular file, by the digest of its bytes.
    File(PathBuf, String),
}

/// The name of the tree of `entries` (in the order [`Versions::scan`] lists them):
/// the SHA-256 of every name, kind, link target and file digest in it, each field
/// ended by a NUL (which no name holds).
fn tree_key(entries: &[Entry]) -> String {
    entries_key(b"corral tree 1\0", entries.iter())
}

/// The key of the code in a tree of `entries`: [`tree_key`] of every entry but the
/// manifest (`plugin.toml` at the root), which names the plugin and its policy
/// but is no module. Copies of one plugin under other ids share their code's key.
fn code_key(entries: &[Entry]) -> String {
    let manifest = Path::new(corral_manifest::MANIFEST_FILE);
    entries_key(
        b"corral code 1\0",
        entries
            .iter()
            .filter(|e| !matches!(e, Entry::File(rel, _) if rel == manifest)),
    )
}

/// The SHA-256 of `tag` and of every name, kind, link target and file digest of
/// `entries`.
fn entries_key<'a>(tag: &[u8], entries: impl Iterator<Item = &'a Entry>) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h = Sha256::new();
    h.update(tag);
    for entry in entries {
        let (kind, rel, last): (&[u8], &Path, &[u8]) = match entry {
            Entry::Dir(rel) => (b"d", rel, b""),
            Entry::Link(rel, target) => (b"l", rel, target.as_os_str().as_bytes()),
            Entry::File(rel, digest) => (b"f", rel, digest.as_bytes()),
        };
        for field in [kind, rel.as_os_str().as_bytes(), last] {
            h.update(field);
            h.update(b"\0");
        }
    }
    crate::plugins::signing::hex(&h.finalize())
}

/// The fingerprint of a tree of `entries` (as [`Versions::scan`] lists them, in
/// the order [`crate::plugins::files::fingerprint`] walks): every entry under no
/// name a fingerprint leaves out.
fn fingerprint_of(entries: &[Entry]) -> String {
    use crate::plugins::files::{Listed, fingerprinted, hash_listed};
    let mut h = Sha256::new();
    for entry in entries {
        let (rel, listed) = match entry {
            Entry::Dir(rel) => (rel, Listed::Dir),
            Entry::Link(rel, target) => (rel, Listed::Link(target)),
            Entry::File(rel, digest) => (rel, Listed::File(digest)),
        };
        if rel.iter().all(fingerprinted) {
            hash_listed(&mut h, rel, listed);
        }
    }
    crate::plugins::signing::hex(&h.finalize())
}

/// Rename `from` to `to` unless `to` exists (`AlreadyExists` then).
pub(crate) fn rename_new(from: &Path, to: &Path) -> std::io::Result<()> {
    with_paths(from.as_os_str(), to, |from, to| {
        // SAFETY: both paths are NUL-terminated and live across the call.
        unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from,
                libc::AT_FDCWD,
                to,
                libc::RENAME_NOREPLACE,
            )
        }
    })
}

/// Call `f` (a system call taking two paths) with `from` and `to` as C strings;
/// its error, if it returned anything but 0.
fn with_paths(
    from: &std::ffi::OsStr,
    to: &Path,
    f: impl FnOnce(*const libc::c_char, *const libc::c_char) -> libc::c_int,
) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_bytes()).map_err(std::io::Error::other)?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    if f(from.as_ptr(), to.as_ptr()) == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `trees/` (0711: workers go through it to their tree, but may not list it) and
/// its lock.
fn make_trees(trees: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o711).create(trees) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    std::fs::set_permissions(trees, std::fs::Permissions::from_mode(0o711))?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(trees.join(TREES_LOCK))
        .map(drop)
}

/// Remove the trees in `<base>/trees` that no supervisor's directory in `base`
/// refers to and that were last used at least `unused_for` ago, and what a build or
/// a sweep cut short left there. Decided under the exclusive lock (no tree is
/// being looked up, made or referred to meanwhile); each doomed tree is renamed out
/// of the way then, and removed once the lock is free.
fn sweep_trees(base: &Path, unused_for: Duration) {
    let trees = base.join(TREES);
    let Ok(lock) = File::open(trees.join(TREES_LOCK)) else {
        return;
    };
    if lock.lock().is_err() {
        return;
    }
    let mut used = std::collections::HashSet::new();
    for sup in std::fs::read_dir(base).into_iter().flatten().flatten() {
        if sup.file_name() == OBJECTS
            || sup.file_name() == TREES
            || !sup.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        for r in std::fs::read_dir(sup.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(target) = std::fs::read_link(r.path())
                && let Some(key) = target.file_name()
            {
                used.insert(key.to_owned());
            }
        }
    }
    let mut doomed = Vec::new();
    for tree in std::fs::read_dir(&trees).into_iter().flatten().flatten() {
        let name = tree.file_name();
        let text = name.to_string_lossy();
        if name == TREES_LOCK || !tree.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if text.starts_with(".old.") {
            doomed.push(tree.path());
            continue;
        }
        let unused = !used.contains(&name)
            && tree
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|e| e >= unused_for));
        // No build runs while the lock is held: a `.new.` tree is a dead one's.
        if unused || text.starts_with(".new.") {
            let to = trees.join(format!(".old.{}", text.trim_start_matches('.')));
            if std::fs::rename(tree.path(), &to).is_ok() {
                doomed.push(to);
            }
        }
    }
    drop(lock);
    let removed = doomed
        .iter()
        .filter(|d| std::fs::remove_dir_all(d).is_ok())
        .count();
    if removed > 0 {
        tracing::debug!(removed, "unused plugin snapshot trees removed");
    }
}

/// An index file, if it is there and is what a supervisor wrote: a regular file
/// (not a link) of this user's, writable by nobody else, at most [`MAX_INDEX`]
/// bytes.
fn read_index_file(path: &Path) -> Option<Vec<u8>> {
    let (mut file, meta) = corral_files::open_regular_here(path).ok()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid || meta.mode() & 0o022 != 0 || meta.len() > MAX_INDEX {
        tracing::warn!("{}: not this supervisor's index; ignored", path.display());
        return None;
    }
    // At most one byte past the limit, whatever the file grew to since it was
    // stated: a longer one is refused, not read.
    match corral_files::read_at_most(&mut file, MAX_INDEX, meta.len()) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!("{}: {e}; ignored", path.display());
            None
        }
    }
}

/// `objects/` (0700) and its 256 shards.
fn make_objects(objects: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(objects)?;
    std::fs::set_permissions(objects, std::fs::Permissions::from_mode(0o700))?;
    // Made in order, so the last one there means all are (a supervisor's start,
    // and every `corral run`, skips 255 mkdir calls).
    if objects.join("ff").is_dir() {
        return Ok(());
    }
    for i in 0..=255u8 {
        match std::fs::DirBuilder::new()
            .mode(0o700)
            .create(objects.join(format!("{i:02x}")))
        {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// A file with no name yet in `dir`, readable and writable by this process only.
pub(crate) fn unnamed_file(dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
}

/// Give an `O_TMPFILE` file its name (never replacing one).
pub(crate) fn link_unnamed(file: &File, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = format!("/proc/self/fd/{}", file.as_raw_fd());
    with_paths(from.as_ref(), to, |from, to| {
        // SAFETY: both paths are NUL-terminated and live across the call.
        unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from,
                libc::AT_FDCWD,
                to,
                libc::AT_SYMLINK_FOLLOW,
            )
        }
    })
}

impl Drop for Versions {
    fn drop(&mut self) {
        self.save_index();
    }
}

/// Remove the objects with no link but the store's own whose last link went at
/// least `unused_for` ago (a link count change sets the change time).
fn sweep(objects: &Path, unused_for: Duration) {
    let mut removed = 0u64;
    for shard in std::fs::read_dir(objects).into_iter().flatten().flatten() {
        // The 256 shards only: not `.index/`, whose files are not objects.
        let name = shard.file_name();
        if name.len() != 2
            || name
                .as_encoded_bytes()
                .iter()
                .any(|b| !b.is_ascii_hexdigit())
        {
            continue;
        }
        for entry in std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(m) = entry.metadata() else { continue };
            let unused =
                std::time::UNIX_EPOCH + Duration::new(m.ctime().max(0) as u64, 0) + unused_for;
            if m.nlink() == 1
                && std::time::SystemTime::now() > unused
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::debug!(removed, "unused plugin file objects removed");
    }
}

/// Remove the directories in `base` of supervisors that are gone (their lock is
/// free). A directory with no lock yet is being made, unless it is a minute old.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir())
            || entry.file_name() == OBJECTS
            || entry.file_name() == TREES
        {
            continue;
        }
        let gone = match File::open(path.join(LOCK)) {
            Ok(lock) => match lock.try_lock() {
                Ok(()) => true,
                Err(std::fs::TryLockError::WouldBlock) => false,
                Err(std::fs::TryLockError::Error(_)) => false,
            },
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(60)),
        };
        if gone {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed the plugin copies of a supervisor that is gone")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), "cannot remove the plugin copies of a supervisor that is gone: {e}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_snapshot_copies_the_plugin_and_goes_with_its_last_user() {
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        let p = plugin.path();
        std::fs::create_dir_all(p.join("lib/__pycache__")).unwrap();
        std::fs::create_dir_all(p.join("__pycache__")).unwrap();
        std::fs::write(p.join("plugin.py"), "x = 1\n").unwrap();
        std::fs::write(p.join("lib/util.py"), "y = 2\n").unwrap();
        std::fs::write(p.join("lib/__pycache__/util.pyc"), "junk").unwrap();
        std::fs::set_permissions(p.join("plugin.py"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::os::unix::fs::symlink("lib/util.py", p.join("alias.py")).unwrap();
        // Copied, but left out of fingerprints.
        std::fs::create_dir_all(p.join(".git/refs")).unwrap();
        std::fs::write(p.join(".git/refs/main"), "0123").unwrap();
        std::fs::write(p.join("lib/util.py~"), "old").unwrap();

        let versions = Versions::create(root.path()).unwrap();
        let snap = versions.snapshot(p).unwrap();
        let s = snap.path();
        assert!(s.starts_with(root.path().join("versions")));
        assert_eq!(
            std::fs::read_to_string(s.join("plugin.py")).unwrap(),
            "x = 1\n"
        );
        assert_eq!(
            std::fs::read_to_string(s.join("lib/util.py")).unwrap(),
            "y = 2\n"
        );
        assert_eq!(
            std::fs::read_link(s.join("alias.py")).unwrap(),
            Path::new("lib/util.py")
        );
        assert!(!s.join("__pycache__").exists());
        assert!(!s.join("lib/__pycache__").exists());
        // Readable by every user whatever the original's mode, writable by none.
        assert_eq!(
            std::fs::metadata(s.join("plugin.py")).unwrap().mode() & 0o777,
            0o444
        );
        assert_eq!(std::fs::metadata(s).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            crate::plugins::files::fingerprint(s).unwrap(),
            crate::plugins::files::fingerprint(p).unwrap()
        );
        assert_eq!(
            snap.fingerprint().unwrap(),
            crate::plugins::files::fingerprint(p).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(s.join(".git/refs/main")).unwrap(),
            "0123"
        );
        assert_eq!(
            std::fs::read_to_string(s.join("lib/util.py~")).unwrap(),
            "old"
        );
        // The copy does not follow the original.
        std::fs::write(p.join("plugin.py"), "x = 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.join("plugin.py")).unwrap(),
            "x = 1\n"
        );
        // The version's reference to its tree goes with it; the tree stays for the
        // next use until a sweep finds it unused.
        let kept = s.to_owned();
        let reference = std::fs::read_dir(versions.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|e| e.is_symlink())
            .unwrap();
        assert_eq!(std::fs::canonicalize(&reference).unwrap(), kept);
        assert!(
            reference
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{}.", p.file_name().unwrap().to_string_lossy()))
        );
        drop(snap);
        assert!(!reference.exists() && !reference.is_symlink());
        assert!(kept.exists());
        sweep_trees(&root.path().join("versions"), Duration::ZERO);
        assert!(!kept.exists());
    }

    #[test]
    fn identical_files_are_stored_once_and_only_changed_files_are_read_again() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let shared = vec![7u8; 100_000];
        for d in [a.path(), b.path()] {
            std::fs::create_dir(d.join("lib")).unwrap();
            std::fs::write(d.join("lib/shared.js"), &shared).unwrap();
        }
        std::fs::write(a.path().join("main.js"), "a").unwrap();
        std::fs::write(b.path().join("main.js"), "b").unwrap();
        let versions = Versions::create(root.path()).unwrap();
        let sa = versions.snapshot(a.path()).unwrap();
        let sb = versions.snapshot(b.path()).unwrap();
        let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let ja = sa.path().join("lib/shared.js");
        let jb = sb.path().join("lib/shared.js");
        // One object for the bytes both plugins have: the store's link and two
        // snapshots'.
        assert_eq!(inode(&ja), inode(&jb));
        assert_eq!(std::fs::metadata(&ja).unwrap().nlink(), 3);
        assert_ne!(
            inode(&sa.path().join("main.js")),
            inode(&sb.path().join("main.js"))
        );
        assert_eq!(std::fs::read(&jb).unwrap(), shared);
        // Its fingerprint, from the digests it was made with, is the directory's.
        assert_eq!(
            sa.fingerprint().unwrap(),
            crate::plugins::files::fingerprint(a.path()).unwrap()
        );
        assert_eq!(
            sa.digest(Path::new("lib/shared.js")),
            Some(crate::plugins::signing::sha256_file(&ja).unwrap().as_str())
        );
        // The objects dir is the supervisor's alone.
        assert_eq!(
            std::fs::metadata(root.path().join("versions/objects"))
                .unwrap()
                .mode()
                & 0o777,
            0o700
        );

        // Settled files (changed more than two seconds ago) are known by their
        // metadata: a new version of `a` reads only what changed.
        std::thread::sleep(Duration::from_millis(2100));
        let _ = versions.fingerprint(a.path()).unwrap();
        let before = versions.copied.load(std::sync::atomic::Ordering::Relaxed);
        let again = versions.snapshot(a.path()).unwrap();
        assert_eq!(
            versions.copied.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "unchanged files were read again"
        );
        assert_eq!(inode(&again.path().join("lib/shared.js")), inode(&ja));
        std::fs::write(a.path().join("main.js"), "a2").unwrap();
        let changed = versions.snapshot(a.path()).unwrap();
        assert_eq!(
            versions.copied.load(std::sync::atomic::Ordering::Relaxed),
            before + 2
        );
        assert_eq!(
            std::fs::read_to_string(changed.path().join("main.js")).unwrap(),
            "a2"
        );
        // The old version still has its bytes.
        assert_eq!(
            std::fs::read_to_string(sa.path().join("main.js")).unwrap(),
            "a"
        );

        // A sweep removes only what no snapshot links.
        let objects = root.path().join("versions/objects");
        let count = || {
            std::fs::read_dir(&objects)
                .unwrap()
                .map(|s| s.unwrap().path())
                .filter(|s| s.is_dir() && !s.ends_with(INDEX))
                .map(|s| std::fs::read_dir(s).unwrap().count())
                .sum::<usize>()
        };
        assert_eq!(count(), 4);
        let base = root.path().join("versions");
        drop((sa, again));
        sweep_trees(&base, Duration::ZERO);
        sweep(&objects, Duration::ZERO);
        assert_eq!(count(), 3, "the object of \"a\" is linked by nothing");
        drop((sb, changed));
        sweep_trees(&base, Duration::ZERO);
        sweep(&objects, Duration::ZERO);
        assert_eq!(count(), 0);
    }

    /// The tree of a plugin's files is made once: a second supervisor of the cache,
    /// or a copy of the plugin under another name, finds it and links nothing. It
    /// stays while a supervisor's directory refers to it, and an unused one goes
    /// only once it was unused long enough; what it is named by covers every file,
    /// hidden ones too; a tree whose objects were swept is made again from the files.
    #[test]
    fn a_tree_is_made_once_shared_and_kept_while_referred_to() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("versions");
        let plugin = tempfile::tempdir().unwrap();
        let p = plugin.path();
        std::fs::create_dir(p.join("lib")).unwrap();
        std::fs::write(p.join("main.js"), "export const a = 1;\n").unwrap();
        std::fs::write(p.join("lib/x.js"), "export const x = 2;\n").unwrap();
        std::fs::write(p.join(".hidden"), "h1").unwrap();
        std::os::unix::fs::symlink("lib/x.js", p.join("alias.js")).unwrap();
        // Settled, so known by their metadata once read.
        std::thread::sleep(Duration::from_millis(2100));
        let first = Versions::create(root.path()).unwrap();
        let second = Versions::create(root.path()).unwrap();
        let s1 = first.snapshot(p).unwrap();
        let s2 = second.snapshot(p).unwrap();
        assert_eq!(s1.path(), s2.path(), "one tree for the same files");
        assert!(s1.path().starts_with(base.join(TREES)));
        let nlink = |f: &Path| std::fs::metadata(f).unwrap().nlink();
        assert_eq!(
            nlink(&s1.path().join("main.js")),
            2,
            "the store's link and the tree's"
        );
        assert_eq!(
            s2.digest(Path::new("lib/x.js")),
            s1.digest(Path::new("lib/x.js"))
        );
        assert_eq!(
            s2.fingerprint().unwrap(),
            crate::plugins::files::fingerprint(p).unwrap()
        );
        assert_eq!(
            s2.fingerprint().unwrap(),
            crate::plugins::files::fingerprint(s2.path()).unwrap(),
            "the fingerprint of what it was made of is that of the tree"
        );
        // A copy under another name holds the same files: the same tree.
        let copy = tempfile::tempdir().unwrap();
        for f in ["main.js", ".hidden"] {
            std::fs::copy(p.join(f), copy.path().join(f)).unwrap();
        }
        std::fs::create_dir(copy.path().join("lib")).unwrap();
        std::fs::copy(p.join("lib/x.js"), copy.path().join("lib/x.js")).unwrap();
        std::os::unix::fs::symlink("lib/x.js", copy.path().join("alias.js")).unwrap();
        assert_eq!(first.snapshot(copy.path()).unwrap().path(), s1.path());
        // A hidden file is in the snapshot, so in what names its tree; so is a
        // link's target.
        std::fs::write(p.join(".hidden"), "h2").unwrap();
        let hidden = first.snapshot(p).unwrap();
        assert_ne!(hidden.path(), s1.path());
        assert_eq!(
            std::fs::read_to_string(hidden.path().join(".hidden")).unwrap(),
            "h2"
        );
        std::fs::remove_file(p.join("alias.js")).unwrap();
        std::os::unix::fs::symlink("main.js", p.join("alias.js")).unwrap();
        let relinked = first.snapshot(p).unwrap();
        assert_ne!(relinked.path(), hidden.path());

        // Kept while any supervisor refers to it, however old; an unused one only
        // once it is old enough; a build cut short goes.
        let shared = s1.path().to_owned();
        drop(s1);
        sweep_trees(&base, Duration::ZERO);
        assert!(
            shared.is_dir(),
            "the second supervisor's version still uses it"
        );
        drop(s2);
        let dead_build = base.join(TREES).join(".new.dead");
        std::fs::create_dir(&dead_build).unwrap();
        sweep_trees(&base, Duration::from_secs(3600));
        assert!(shared.is_dir(), "unused for less than the time given");
        assert!(!dead_build.exists());
        sweep_trees(&base, Duration::ZERO);
        assert!(!shared.exists());
        assert!(hidden.path().is_dir() && relinked.path().is_dir());

        // Its objects swept too: made again from the plugin's files, read again.
        std::fs::remove_file(p.join(".hidden")).unwrap();
        std::fs::remove_file(p.join("alias.js")).unwrap();
        sweep(&base.join(OBJECTS), Duration::ZERO);
        let x = object_of(&first, "export const x = 2;\n");
        std::fs::remove_file(&x).unwrap();
        let before = first.copied.load(std::sync::atomic::Ordering::Relaxed);
        let again = first.snapshot(p).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.path().join("lib/x.js")).unwrap(),
            "export const x = 2;\n"
        );
        assert!(x.is_file(), "stored again");
        assert_eq!(
            first.copied.load(std::sync::atomic::Ordering::Relaxed),
            before + 20,
            "only the file whose object was gone was read"
        );
    }

    /// The object of `bytes` in the store of `v`.
    fn object_of(v: &Versions, bytes: &str) -> PathBuf {
        v.object(&crate::plugins::signing::hex(&Sha256::digest(
            bytes.as_bytes(),
        )))
    }

    /// Both ways a file goes in: up to `IN_MEMORY` read whole (bounded by its size,
    /// one byte past the limit at most), above it streamed through a 64 KiB buffer;
    /// both give the same object and the right digest.
    #[test]
    fn files_above_the_in_memory_limit_are_streamed_into_the_store() {
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(IN_MEMORY as usize * 3 + 7))
            .map(|i| (i % 251) as u8)
            .collect();
        let edge = vec![1u8; IN_MEMORY as usize];
        std::fs::write(plugin.path().join("big.bin"), &big).unwrap();
        std::fs::write(plugin.path().join("edge.bin"), &edge).unwrap();
        let versions = Versions::create(root.path()).unwrap();
        let snap = versions.snapshot(plugin.path()).unwrap();
        for (name, bytes) in [("big.bin", &big), ("edge.bin", &edge)] {
            let path = snap.path().join(name);
            assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{name}");
            assert_eq!(
                snap.digest(Path::new(name)),
                Some(crate::plugins::signing::hex(&Sha256::digest(bytes)).as_str())
            );
            assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 2, "{name}");
        }
        assert_eq!(
            versions.copied.load(std::sync::atomic::Ordering::Relaxed),
            (big.len() + edge.len()) as u64
        );
    }

    /// A file whose size lies (a FUSE file an author serves, or here a kernel file
    /// that states 0 bytes and holds megabytes): it is taken as small, read at most
    /// one byte past the in-memory limit, and refused; nothing is stored or counted.
    #[test]
    fn a_file_longer_than_it_says_is_read_one_byte_past_the_limit_and_refused() {
        let liar = Path::new("/proc/kallsyms");
        let meta = std::fs::symlink_metadata(liar).unwrap();
        assert_eq!(meta.len(), 0, "it must state less than it holds");
        let holds = std::fs::File::open(liar)
            .unwrap()
            .take(IN_MEMORY + 1)
            .read_to_end(&mut Vec::new())
            .unwrap() as u64;
        assert!(
            holds > IN_MEMORY,
            "it must hold more than the limit: {holds}"
        );

        let root = tempfile::tempdir().unwrap();
        let versions = Versions::create(root.path()).unwrap();
        let e = versions.store_file(liar, &meta, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/proc/kallsyms: it grew past the 1 MiB it may have while being read"
        );
        assert_eq!(
            versions.copied.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        let stored: usize = std::fs::read_dir(root.path().join("versions/objects"))
            .unwrap()
            .map(|s| s.unwrap().path())
            .filter(|s| s.is_dir() && !s.ends_with(INDEX))
            .map(|s| std::fs::read_dir(s).unwrap().count())
            .sum();
        assert_eq!(stored, 0, "nothing stored");
    }

    #[test]
    fn the_copies_of_a_supervisor_that_is_gone_are_removed_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let live = Versions::create(root.path()).unwrap();
        // A supervisor that was killed: its directory stays, its lock is free.
        let dead = root.path().join("versions/999999.dead");
        std::fs::create_dir_all(dead.join("x.1")).unwrap();
        std::fs::write(dead.join(LOCK), "").unwrap();
        // One being made right now (no lock yet).
        let new = root.path().join("versions/999998.new");
        std::fs::create_dir_all(&new).unwrap();
        let other = Versions::create(root.path()).unwrap();
        assert!(!dead.exists(), "the dead supervisor's copies stay");
        assert!(new.exists());
        assert!(
            live.dir.path().exists(),
            "a live supervisor's copies were removed"
        );
        assert!(other.dir.path().exists());
        let gone = live.dir.path().to_owned();
        drop(live);
        assert!(!gone.exists());
    }

    /// Supervisors of one cache starting at once: each one's `remove_stale` sees the
    /// others' new directories, and none is taken for the directory of one that is
    /// gone (a lock made in place and locked after left that moment open).
    #[test]
    fn supervisors_starting_at_once_keep_each_others_directories() {
        let root = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..40 {
                        let v = Versions::create(root.path()).unwrap();
                        // Work in its directory while the others start and sweep.
                        for i in 0..5 {
                            let f = v.dir.path().join(format!("f{i}"));
                            std::fs::write(&f, "x").unwrap_or_else(|e| {
                                panic!("{} removed under a live supervisor: {e}", f.display())
                            });
                        }
                        assert!(v.dir.path().join(LOCK).exists());
                    }
                });
            }
        });
    }

    /// The supervisors of a cache sweep its objects at most once per `UNUSED_FOR`
    /// between them: a start sweeps (and touches `objects/.swept`) only when the
    /// last sweep is older than that; the 256 shards are made once.
    #[test]
    fn a_start_sweeps_only_when_the_last_sweep_is_old() {
        let root = tempfile::tempdir().unwrap();
        let stamp = root.path().join("versions/objects/.swept");
        let first = Versions::create(root.path()).unwrap();
        let touched = std::fs::metadata(&stamp).unwrap().modified().unwrap();
        assert!(touched.elapsed().unwrap() < Duration::from_secs(60));
        for shard in ["00", "7f", "ff"] {
            assert!(root.path().join("versions/objects").join(shard).is_dir());
        }
        let set = |ago: Duration| {
            let t = std::time::SystemTime::now() - ago;
            File::options()
                .write(true)
                .open(&stamp)
                .unwrap()
                .set_modified(t)
                .unwrap();
            t
        };
        let five_minutes_ago = set(Duration::from_secs(300));
        let second = Versions::create(root.path()).unwrap();
        assert_eq!(
            std::fs::metadata(&stamp).unwrap().modified().unwrap(),
            five_minutes_ago,
            "swept again five minutes after the last sweep"
        );
        set(UNUSED_FOR + Duration::from_secs(1));
        let third = Versions::create(root.path()).unwrap();
        let touched = std::fs::metadata(&stamp).unwrap().modified().unwrap();
        assert!(
            touched.elapsed().unwrap() < Duration::from_secs(60),
            "not swept"
        );
        drop((first, second, third));
    }

    /// The supervisors of a cache share what they hashed (`objects/.index`): a new
    /// one links the files an earlier one read, reading none; a file changed since
    /// is read again; an index another user could have written is not taken.
    #[test]
    fn a_new_supervisor_links_what_an_earlier_one_hashed() {
        use std::sync::atomic::Ordering::Relaxed;
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        std::fs::write(plugin.path().join("a.js"), "aaa").unwrap();
        std::fs::create_dir(plugin.path().join("lib")).unwrap();
        std::fs::write(plugin.path().join("lib/b.js"), "bb").unwrap();
        // Only files settled for two seconds are remembered.
        std::thread::sleep(Duration::from_millis(2100));
        let first = Versions::create(root.path()).unwrap();
        drop(first.snapshot(plugin.path()).unwrap());
        assert_eq!(first.copied.load(Relaxed), 5);
        drop(first);
        let indexes: Vec<PathBuf> = std::fs::read_dir(root.path().join("versions/objects/.index"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(indexes.len(), 1, "one index file per plugin directory");
        let index = indexes[0].clone();
        assert_eq!(
            std::fs::metadata(&index).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let written = std::fs::metadata(&index).unwrap().modified().unwrap();

        let second = Versions::create(root.path()).unwrap();
        let snap = second.snapshot(plugin.path()).unwrap();
        assert_eq!(second.copied.load(Relaxed), 0, "read again");
        // Nothing new was learnt: the index is not written again.
        second.save_index();
        assert_eq!(
            std::fs::metadata(&index).unwrap().modified().unwrap(),
            written
        );
        assert_eq!(
            std::fs::read_to_string(snap.path().join("lib/b.js")).unwrap(),
            "bb"
        );
        std::fs::write(plugin.path().join("lib/b.js"), "b2b2").unwrap();
        let changed = second.snapshot(plugin.path()).unwrap();
        assert_eq!(
            second.copied.load(Relaxed),
            4,
            "only the changed file is read"
        );
        assert_eq!(
            std::fs::read_to_string(changed.path().join("lib/b.js")).unwrap(),
            "b2b2"
        );
        drop((snap, changed, second));

        // Writable by others: ignored, every file read.
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o666)).unwrap();
        let third = Versions::create(root.path()).unwrap();
        drop(third.snapshot(plugin.path()).unwrap());
        assert_eq!(third.copied.load(Relaxed), 7);
        drop(third);
        // Not an index: ignored too (and replaced by the next supervisor's).
        std::fs::write(&index, b"not an index").unwrap();
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o600)).unwrap();
        let fourth = Versions::create(root.path()).unwrap();
        drop(fourth.snapshot(plugin.path()).unwrap());
        assert_eq!(fourth.copied.load(Relaxed), 7);
        drop(fourth);
        // A sweep removes objects, never the indexes beside them.
        sweep(&root.path().join("versions/objects"), Duration::ZERO);
        assert!(index.exists(), "a sweep removed the index");
    }

    /// An index whose digests could name paths outside the store is refused whole.
    #[test]
    fn an_index_naming_anything_but_digests_is_refused() {
        let mut known = FileHashes::default();
        let stamp = (1, 2, 3, 4, 5, 6, 7);
        known.remember(Path::new("/p/a.js"), stamp, &"ab".repeat(32));
        known.remember(Path::new("/pq/b.js"), stamp, &"cd".repeat(32));
        let bytes = known.to_index(Path::new("/p"), |_| true);
        let back = FileHashes::from_index(&bytes).unwrap();
        assert_eq!(
            back.known(Path::new("/p/a.js"), &stamp),
            Some("ab".repeat(32))
        );
        assert_eq!(
            back.known(Path::new("/pq/b.js"), &stamp),
            None,
            "another directory's"
        );
        for (path, digest) in [
            ("/p/a.js", "../../../../etc/passwd".to_owned()),
            ("/p/a.js", "AB".repeat(32)),
            ("/p/a.js", "ab".repeat(31)),
            ("relative/a.js", "ab".repeat(32)),
        ] {
            let entries = vec![(path.as_bytes().to_vec(), stamp, digest.clone())];
            let bytes =
                bincode::serde::encode_to_vec(&entries, bincode::config::standard()).unwrap();
            assert!(FileHashes::from_index(&bytes).is_none(), "{path} {digest}");
        }
        assert!(FileHashes::from_index(&[bytes.as_slice(), b"x"].concat()).is_none());
    }

    /// A shard removed under the store (a cleaner of empty directories) is made
    /// again when an object goes into it.
    #[test]
    fn a_removed_shard_is_made_again() {
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        std::fs::write(plugin.path().join("a.js"), "shard").unwrap();
        let digest = crate::plugins::signing::hex(&Sha256::digest(b"shard"));
        let versions = Versions::create(root.path()).unwrap();
        let shard = root.path().join("versions/objects").join(&digest[..2]);
        std::fs::remove_dir(&shard).unwrap();
        let snap = versions.snapshot(plugin.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(snap.path().join("a.js")).unwrap(),
            "shard"
        );
        assert!(shard.join(&digest).is_file());
    }

    /// An `objects/.index` that is not a private directory (a file, a directory
    /// others may enter) turns the index off; snapshots work as without one.
    #[test]
    fn an_index_directory_that_is_not_private_is_not_used() {
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        std::fs::write(plugin.path().join("a.js"), "x").unwrap();
        drop(Versions::create(root.path()).unwrap());
        let index = root.path().join("versions/objects/.index");
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o755)).unwrap();
        let versions = Versions::create(root.path()).unwrap();
        let snap = versions.snapshot(plugin.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(snap.path().join("a.js")).unwrap(),
            "x"
        );
        drop((snap, versions));
        assert_eq!(
            std::fs::read_dir(&index).unwrap().count(),
            0,
            "an index was written"
        );
    }

    /// An index past `MAX_INDEX` (a sparse file here, so the test writes nothing)
    /// is refused from its size, never read into memory: the plugin's files are
    /// read instead, and the next supervisor's index replaces it.
    #[test]
    fn an_index_past_its_limit_is_refused_unread() {
        use std::sync::atomic::Ordering::Relaxed;
        let root = tempfile::tempdir().unwrap();
        let plugin = tempfile::tempdir().unwrap();
        std::fs::write(plugin.path().join("a.js"), "abc").unwrap();
        let versions = Versions::create(root.path()).unwrap();
        let index = versions.index_path(plugin.path());
        let big = File::create(&index).unwrap();
        big.set_len(MAX_INDEX + 1).unwrap();
        std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_index_file(&index), None);
        let snap = versions.snapshot(plugin.path()).unwrap();
        assert_eq!(versions.copied.load(Relaxed), 3, "the file was not read");
        assert_eq!(
            std::fs::read_to_string(snap.path().join("a.js")).unwrap(),
            "abc"
        );
        // At the limit it is read (and, not being an index, ignored).
        big.set_len(MAX_INDEX).unwrap();
        assert_eq!(
            read_index_file(&index).map(|b| b.len() as u64),
            Some(MAX_INDEX)
        );
        big.set_len(0).unwrap();
    }
}
