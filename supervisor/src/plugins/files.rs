//! A plugin's files as the lifecycle reads them: discovery of plugin directories,
//! fingerprints of their contents, and which files are still being written.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a plugin's files must be unchanged before a new version is read: a
/// half-written file is never loaded as a version.
pub const QUIET: Duration = Duration::from_millis(250);

/// How long a file may stay open for writing, with no event, before it is taken for
/// finished anyway (a writer that never closes, or a hard link, which is created
/// without being written).
pub const WRITE_STALE: Duration = Duration::from_secs(10);

/// Files in the plugin directories being written: modified (or created) and not
/// closed since, as the plugin watcher's events tell. A version is never read while
/// one of its files is being written, however long the writer pauses between writes
/// (the quiet period alone cannot tell a writer paused for a moment from one that is
/// done: CI once caught a test's `fs::write` stalled between its truncate and its
/// write, and loaded the empty file as a version).
#[derive(Debug, Default)]
pub struct Writes(std::sync::Mutex<BTreeMap<PathBuf, std::time::Instant>>);

impl Writes {
    /// Take one watcher event into account.
    pub fn note(&self, event: &notify::Event) {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match event.kind {
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                for p in &event.paths {
                    open.insert(p.clone(), now);
                }
            }
            // A new file is empty until written (links, made without a write, are
            // left out; so is a hard link, which expires after WRITE_STALE).
            EventKind::Create(CreateKind::File | CreateKind::Any) => {
                for p in event
                    .paths
                    .iter()
                    .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file()))
                {
                    open.insert(p.clone(), now);
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) | EventKind::Remove(_) => {
                for p in &event.paths {
                    open.retain(|f, _| !f.starts_with(p));
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From | RenameMode::Both)) => {
                if let Some(p) = event.paths.first() {
                    open.retain(|f, _| !f.starts_with(p));
                }
            }
            _ => {}
        }
    }

    /// A file under `dir` being written now, if any.
    pub fn writing_under(&self, dir: &Path) -> Option<PathBuf> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|f, at| {
            let fresh = at.elapsed() < WRITE_STALE;
            if !fresh {
                tracing::warn!(
                    file = %f.display(),
                    "still open for writing after {} s with no change; reading it as it is",
                    WRITE_STALE.as_secs()
                );
            }
            fresh
        });
        open.keys().find(|f| f.starts_with(dir)).cloned()
    }
}

/// The latest change (ctime) of the files and directories of the plugin in `dir`,
/// hidden names aside.
pub(crate) fn last_change(dir: &Path) -> std::io::Result<std::time::SystemTime> {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, latest: &mut (i64, i64)) -> std::io::Result<()> {
        let m = std::fs::metadata(dir)?;
        *latest = (*latest).max((m.ctime(), m.ctime_nsec()));
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name.ends_with('~') || name == "__pycache__" {
                continue;
            }
            let kind = e.file_type()?;
            if kind.is_dir() {
                walk(&e.path(), latest)?;
            } else {
                let m = std::fs::symlink_metadata(e.path())?;
                *latest = (*latest).max((m.ctime(), m.ctime_nsec()));
            }
        }
        Ok(())
    }
    let mut latest = (0, 0);
    walk(dir, &mut latest)?;
    Ok(std::time::UNIX_EPOCH
        + Duration::new(
            latest.0.max(0) as u64,
            latest.1.clamp(0, 999_999_999) as u32,
        ))
}

/// The plugin directories in `plugins_dir`: every subdirectory holding a
/// `plugin.toml`, in name order. Hidden entries (`.name`, such as installs being
/// unpacked) are skipped.
pub fn discover(plugins_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(plugins_dir)? {
        let entry = entry?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let path = entry.path();
        if !hidden && path.is_dir() && path.join(corral_manifest::MANIFEST_FILE).is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// A digest of the files of the plugin in `dir` (paths, contents and link targets).
/// Hidden files, editor backups (`name~`) and `__pycache__` are left out: they are not
/// part of a version.
pub fn fingerprint(dir: &Path) -> std::io::Result<String> {
    fingerprint_with(dir, &mut FileHashes::default())
}

/// File digests by path, kept with the metadata they were computed from (size,
/// inode, modification and change times, as git's index does): a watch pass hashes
/// only the files that changed. A file changed within the last two seconds is not
/// remembered (the kernel's coarse timestamps could hide a second write in the same
/// tick, git's "racily clean" entries).
///
/// Keyed by the paths' bytes: compared as bytes, not component by component (a
/// plugin of thousands of files is looked up thousands of times per pass).
#[derive(Debug, Default)]
pub(crate) struct FileHashes(BTreeMap<Vec<u8>, (FileStamp, String)>);

/// The bytes of `path`.
fn key(path: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes()
}

/// `dir`'s bytes ended by one `/`: what every path under it starts with.
fn prefix_of(dir: &Path) -> Vec<u8> {
    let mut p = key(dir).to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p
}

/// Device, inode, size, and modification and change times (seconds, nanoseconds).
pub(crate) type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

/// The stamp of a file's metadata.
pub(crate) fn stamp(m: &std::fs::Metadata) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    (
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// How long after its last change a file's digest may be remembered.
const SETTLED: Duration = Duration::from_secs(2);

/// More entries than this and the memory starts again (a bound on what a plugin
/// directory of millions of files could make the supervisor hold).
const MAX_REMEMBERED: usize = 1 << 20;

impl FileHashes {
    /// Forget the files outside `dirs`.
    pub(crate) fn retain_under(&mut self, dirs: &[PathBuf]) {
        let prefixes: Vec<Vec<u8>> = dirs.iter().map(|d| prefix_of(d)).collect();
        self.0.retain(|f, _| {
            dirs.iter()
                .zip(&prefixes)
                .any(|(d, p)| f.starts_with(p) || f.as_slice() == key(d))
        });
    }

    /// The digest of `path` if it was computed from a file with this stamp.
    pub(crate) fn known(&self, path: &Path, stamp: &FileStamp) -> Option<String> {
        self.0
            .get(key(path))
            .filter(|(k, _)| k == stamp)
            .map(|(_, sum)| sum.clone())
    }

    /// Remember `digest` for `path` at `stamp`, unless the file changed too recently.
    pub(crate) fn remember(&mut self, path: &Path, stamp: FileStamp, digest: &str) {
        let changed = std::time::UNIX_EPOCH
            + Duration::new(stamp.5.max(0) as u64, stamp.6.clamp(0, 999_999_999) as u32);
        let settled = std::time::SystemTime::now()
            .duration_since(changed)
            .is_ok_and(|age| age >= SETTLED);
        if !settled {
            self.0.remove(key(path));
            return;
        }
        if self.0.len() >= MAX_REMEMBERED {
            self.0.clear();
        }
        self.0
            .insert(key(path).to_vec(), (stamp, digest.to_owned()));
    }

    /// What is remembered of the files under `under`, for the cache's index
    /// (`Versions` keeps it between supervisors): every entry whose digest `keep`
    /// accepts.
    pub(crate) fn to_index(&self, under: &Path, keep: impl Fn(&str) -> bool) -> Vec<u8> {
        let prefix = prefix_of(under);
        let entries: Vec<(&[u8], &FileStamp, &str)> = self
            .0
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .filter(|(_, (_, digest))| keep(digest))
            .map(|(path, (stamp, digest))| (path.as_slice(), stamp, digest.as_str()))
            .collect();
        bincode::serde::encode_to_vec(&entries, bincode::config::standard()).unwrap_or_default()
    }

    /// The entries of an index [`FileHashes::to_index`] wrote; `None` for anything
    /// else (an absolute path and a SHA-256 in lowercase hex each, at most
    /// [`MAX_REMEMBERED`] of them): a digest names an object's path, so a bad one
    /// is never taken.
    /// Add the entries of an index (see [`FileHashes::from_index`]); whether it
    /// was one.
    pub(crate) fn merge_index(&mut self, bytes: &[u8]) -> bool {
        match FileHashes::from_index(bytes) {
            Some(index) if self.0.len() + index.0.len() <= MAX_REMEMBERED => {
                self.0.extend(index.0);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn from_index(bytes: &[u8]) -> Option<FileHashes> {
        let (entries, used): (Vec<(Vec<u8>, FileStamp, String)>, usize) =
            bincode::serde::decode_from_slice(bytes, bincode::config::standard()).ok()?;
        if used != bytes.len() || entries.len() > MAX_REMEMBERED {
            return None;
        }
        let mut map = BTreeMap::new();
        for (path, stamp, digest) in entries {
            let hex = digest.len() == 64
                && digest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if path.first() != Some(&b'/') || !hex {
                return None;
            }
            map.insert(path, (stamp, digest));
        }
        Some(FileHashes(map))
    }

    /// The digest of the file at `path`, whose metadata is `meta` (not followed).
    fn digest(&mut self, path: &Path, meta: &std::fs::Metadata) -> std::io::Result<String> {
        let key = stamp(meta);
        if let Some(sum) = self.known(path, &key) {
            return Ok(sum);
        }
        let sum = crate::plugins::signing::sha256_file(path)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        self.remember(path, key, &sum);
        Ok(sum)
    }
}

/// [`fingerprint`], reusing the digests of unchanged files from `cache`.
pub(crate) fn fingerprint_with(dir: &Path, cache: &mut FileHashes) -> std::io::Result<String> {
    fingerprint_by(dir, &mut |p, meta| cache.digest(p, meta))
}

/// Whether an entry named `name` counts in a fingerprint: not hidden, not an
/// editor's backup, not Python's bytecode cache (nor anything under them).
pub(crate) fn fingerprinted(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    !(name.starts_with('.') || name.ends_with('~') || name == "__pycache__")
}

/// An entry of a fingerprint, by what it is.
pub(crate) enum Listed<'a> {
    Dir,
    Link(&'a Path),
    /// A regular file, by its digest.
    File(&'a str),
}

/// Hash the entry at `rel` (relative to the plugin's root) into a fingerprint.
pub(crate) fn hash_listed(h: &mut Sha256, rel: &Path, entry: Listed<'_>) {
    let rel = rel.to_string_lossy();
    match entry {
        Listed::Dir => h.update(format!("dir {rel}\n")),
        Listed::Link(target) => h.update(format!("link {rel} {}\n", target.display())),
        Listed::File(digest) => h.update(format!("file {rel} {digest}\n")),
    }
}

/// What gives [`fingerprint_by`] the digest of a file, from its path and metadata.
pub(crate) type Digester<'a> = dyn FnMut(&Path, &std::fs::Metadata) -> std::io::Result<String> + 'a;

/// [`fingerprint`], with each regular file's digest from `digest`.
///
/// `digest` is given each file's metadata (not followed), taken relative to its
/// directory's descriptor (`DirEntry::metadata`): no path is walked again per file.
pub(crate) fn fingerprint_by(dir: &Path, digest: &mut Digester<'_>) -> std::io::Result<String> {
    fn walk(
        root: &Path,
        dir: &Path,
        h: &mut Sha256,
        digest: &mut Digester<'_>,
    ) -> std::io::Result<()> {
        let mut entries = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if !fingerprinted(&e.file_name()) {
                continue;
            }
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let kind = e.file_type()?;
            if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                hash_listed(h, rel, Listed::Link(&target));
            } else if kind.is_dir() {
                hash_listed(h, rel, Listed::Dir);
                walk(root, &path, h, digest)?;
            } else if kind.is_file() {
                hash_listed(h, rel, Listed::File(&digest(&path, &e.metadata()?)?));
            }
        }
        Ok(())
    }
    let mut h = Sha256::new();
    walk(dir, dir, &mut h, digest)?;
    Ok(crate::plugins::signing::hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_contents_not_hidden_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib")).unwrap();
        std::fs::write(d.path().join("plugin.toml"), "a").unwrap();
        std::fs::write(d.path().join("lib/x.js"), "1").unwrap();
        let first = fingerprint(d.path()).unwrap();
        std::fs::write(d.path().join(".x.js.swp"), "junk").unwrap();
        std::fs::write(d.path().join("main.js~"), "junk").unwrap();
        assert_eq!(fingerprint(d.path()).unwrap(), first);
        std::fs::write(d.path().join("lib/x.js"), "2").unwrap();
        let second = fingerprint(d.path()).unwrap();
        assert_ne!(second, first);
        std::fs::rename(d.path().join("lib/x.js"), d.path().join("lib/y.js")).unwrap();
        assert_ne!(fingerprint(d.path()).unwrap(), second);
        // The cache gives the same answers, and sees a rewrite of the same size.
        let mut cache = FileHashes::default();
        let third = fingerprint_with(d.path(), &mut cache).unwrap();
        assert_eq!(third, fingerprint(d.path()).unwrap());
        assert_eq!(fingerprint_with(d.path(), &mut cache).unwrap(), third);
        std::fs::write(d.path().join("lib/y.js"), "3").unwrap();
        let fourth = fingerprint_with(d.path(), &mut cache).unwrap();
        assert_ne!(fourth, third);
        assert_eq!(fourth, fingerprint(d.path()).unwrap());
    }

    #[test]
    fn discovery_takes_plugin_directories_only() {
        let d = tempfile::tempdir().unwrap();
        for name in ["b", "a", ".install-x", "empty"] {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        for name in ["b", "a", ".install-x"] {
            std::fs::write(d.path().join(name).join("plugin.toml"), "").unwrap();
        }
        std::fs::write(d.path().join("plugin.toml"), "").unwrap();
        assert_eq!(
            discover(d.path()).unwrap(),
            [d.path().join("a"), d.path().join("b")]
        );
    }
}
