//! Snapshots of plugin versions: the files a version's workers read.
//!
//! When a version is read, its directory is copied into the supervisor's own
//! `versions` directory (under the cache directory), and every worker of that
//! version loads the copy. A version therefore keeps running exactly as it was
//! checked whatever happens to its directory afterwards: an edit the lifecycle
//! rejected, a half-written file, or the directory removed. A worker restarted after
//! a crash, renewed under a new policy, or a Python worker importing again after a
//! trap reads the same files as the first one. The worker's user needs no access to
//! the operator's plugin directory, only to the copy (read-only to it).
//!
//! Layout: `<cache>/versions/<pid>.<random>/` per supervisor, holding a `.lock` that
//! the supervisor keeps locked while it runs, and one `<dir name>.<random>/` per
//! version. A version's copy is removed when the version and all its workers are gone;
//! a supervisor's directory when it exits, or, if it was killed, by the next supervisor
//! that finds its lock free.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The copy of one plugin version's files; removed when dropped.
#[derive(Debug)]
pub struct Snapshot(tempfile::TempDir);

impl Snapshot {
    /// Where the copy is.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// One supervisor's directory of snapshots, locked while it lives.
#[derive(Debug)]
pub(crate) struct Versions {
    dir: tempfile::TempDir,
    _lock: File,
}

const LOCK: &str = ".lock";

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
        let lock_path = dir.path().join(LOCK);
        let lock =
            File::create(&lock_path).map_err(at(format!("create {}", lock_path.display())))?;
        lock.try_lock()
            .map_err(|e| at(format!("lock {}", lock_path.display()))(std::io::Error::from(e)))?;
        Ok(Versions { dir, _lock: lock })
    }

    /// Copy the plugin in `dir` (every file but `__pycache__`, links as links) into a
    /// new snapshot, readable (not writable) by every user.
    pub(crate) fn snapshot(&self, dir: &Path) -> std::io::Result<Snapshot> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        let copy = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir_in(self.dir.path())?;
        std::fs::set_permissions(copy.path(), std::fs::Permissions::from_mode(0o755))?;
        copy_tree(dir, copy.path())?;
        Ok(Snapshot(copy))
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        if kind.is_dir() {
            if entry.file_name() == "__pycache__" {
                continue;
            }
            std::fs::DirBuilder::new().mode(0o755).create(&dst)?;
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_file() {
            // Not `fs::copy`: the author may swap the file for a link (to a file only
            // the supervisor can read) or a FIFO after the listing.
            let (mut file, _) = corral_files::open_regular_here(&src)
                .map_err(|e| std::io::Error::other(format!("{}: {e}", src.display())))?;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&dst)?;
            std::io::copy(&mut file, &mut out)?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644))?;
        }
        // Pipes, sockets and devices are not plugin files.
    }
    Ok(())
}

/// Remove the directories in `base` of supervisors that are gone (their lock is
/// free). A directory with no lock yet is being made, unless it is a minute old.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
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
        // Readable by every user whatever the original's mode, writable by none but
        // its owner.
        assert_eq!(
            std::fs::metadata(s.join("plugin.py")).unwrap().mode() & 0o777,
            0o644
        );
        assert_eq!(std::fs::metadata(s).unwrap().mode() & 0o777, 0o755);
        assert_eq!(
            crate::plugins::files::fingerprint(s).unwrap(),
            crate::plugins::files::fingerprint(p).unwrap()
        );
        // The copy does not follow the original.
        std::fs::write(p.join("plugin.py"), "x = 2\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(s.join("plugin.py")).unwrap(),
            "x = 1\n"
        );
        let kept = s.to_owned();
        drop(snap);
        assert!(!kept.exists());
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
}
