//! Who workers run as, and whether that user can reach what the worker needs: the
//! plugin directory (read) and its own module-cache directory (read/write).
//!
//! When the supervisor runs as root, workers run as the unprivileged user the
//! policy names (default `nobody`). The checks here turn what would be an obscure
//! `EACCES` deep inside a worker into a refusal that names the directory, its mode
//! and owner, and the fix.

use corral_policy::RunAs;
use corral_protocol::ResourceStats;
use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why the policy's `user` cannot be what workers run as.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("invalid user name {0:?}")]
    Name(String),
    #[error("cannot look up user {name:?}: {error}")]
    Lookup { name: String, error: std::io::Error },
    #[error(
        "no user {0:?} on this machine (set `user` in the policy to an existing user or to \
         numeric \"uid:gid\")"
    )]
    Missing(String),
    #[error("user {0:?} has uid 0; workers never run as root")]
    Root(String),
}

/// Why a worker's user cannot reach or use a path it needs.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("{}: {error}", path.display())]
    Stat {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{} is mode {mode:04o} owned by uid {owner} gid {group}: uid {uid} cannot {what} \
         (make it accessible, e.g. chmod o+rx, or route the plugin to a user that can)",
        path.display()
    )]
    Denied {
        path: PathBuf,
        mode: u32,
        owner: u32,
        group: u32,
        uid: u32,
        what: &'static str,
    },
    #[error("cannot create {}: {error}", path.display())]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot hand {} to uid {uid}: {error}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        error: std::io::Error,
    },
}

/// A uid/gid pair a worker runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

/// Whether this process runs with root's effective uid.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The credentials to switch workers to; `None` when the supervisor is not root
/// (workers then keep the supervisor's own unprivileged uid).
pub fn credentials(user: &RunAs) -> Result<Option<Credentials>, UserError> {
    if !is_root() {
        return Ok(None);
    }
    match user {
        RunAs::Ids { uid, gid } => Ok(Some(Credentials {
            uid: *uid,
            gid: *gid,
        })),
        RunAs::Name(name) => lookup_user(name).map(Some),
    }
}

fn lookup_user(name: &str) -> Result<Credentials, UserError> {
    let c_name = CString::new(name).map_err(|_| UserError::Name(name.to_owned()))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpwnam_r to overwrite.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live, correctly sized storage owned here;
        // `buf.len()` is the buffer's real length.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(UserError::Lookup {
                name: name.to_owned(),
                error: std::io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(UserError::Missing(name.to_owned()));
        }
        if pwd.pw_uid == 0 {
            return Err(UserError::Root(name.to_owned()));
        }
        return Ok(Credentials {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
}

/// Which permission bits of `meta` apply to `cred` (owner, group or other).
fn bits_for(meta: &std::fs::Metadata, cred: Credentials) -> u32 {
    let mode = meta.mode();
    if meta.uid() == cred.uid {
        (mode >> 6) & 7
    } else if meta.gid() == cred.gid {
        (mode >> 3) & 7
    } else {
        mode & 7
    }
}

fn denied(
    path: &Path,
    meta: &std::fs::Metadata,
    cred: Credentials,
    what: &'static str,
) -> AccessError {
    AccessError::Denied {
        path: path.to_owned(),
        mode: meta.mode() & 0o7777,
        owner: meta.uid(),
        group: meta.gid(),
        uid: cred.uid,
        what,
    }
}

fn stat(path: &Path) -> Result<std::fs::Metadata, AccessError> {
    std::fs::metadata(path).map_err(|error| AccessError::Stat {
        path: path.to_owned(),
        error,
    })
}

/// Check that `cred` can reach `path` (search permission on every ancestor) and use
/// it: read (and search) a directory, or read a file; `write` adds write permission.
pub fn check_access(path: &Path, cred: Credentials, write: bool) -> Result<(), AccessError> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for a in ancestors {
        let meta = stat(a)?;
        if bits_for(&meta, cred) & 1 == 0 {
            return Err(denied(a, &meta, cred, "enter it"));
        }
    }
    let meta = stat(path)?;
    let mut need = 4;
    if meta.is_dir() {
        need |= 1;
    }
    if write {
        need |= 2;
    }
    if bits_for(&meta, cred) & need != need {
        let what = if write {
            "read and write it"
        } else {
            "read it"
        };
        return Err(denied(path, &meta, cred, what));
    }
    Ok(())
}

/// The plugin directory must be readable by the worker's user.
pub fn check_readable(dir: &Path, cred: Credentials) -> Result<(), AccessError> {
    check_access(dir, cred, false)
}

/// `<root>/modules/<plugin>`: the plugin's own cache directory (its worker may write
/// only there, so one plugin cannot plant a precompiled module for another), created
/// 0700 and owned by the worker's user. Missing parents are created 0711 (enter, not
/// list).
pub fn plugin_cache_dir(
    root: &Path,
    plugin: &str,
    cred: Option<Credentials>,
) -> Result<PathBuf, AccessError> {
    let modules = root.join("modules");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(&modules)
        .map_err(|error| AccessError::Create {
            path: modules.clone(),
            error,
        })?;
    let dir = modules.join(plugin);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(AccessError::Create { path: dir, error }),
    }
    if let Some(c) = cred {
        std::os::unix::fs::chown(&dir, Some(c.uid), Some(c.gid)).map_err(|error| {
            AccessError::Chown {
                path: dir.clone(),
                uid: c.uid,
                error,
            }
        })?;
        check_access(&dir, c, true)?;
    }
    Ok(dir)
}

/// Complete cgroup statistics with what `/proc/<pid>` knows: CPU time and memory
/// when the worker has no cgroup (or the group's counters cannot be read).
/// Over the worker's whole process tree: a worker without a cgroup serves from the
/// child it forked into its PID namespace, and the plugin may have started more.
/// Memory is the sum of the processes' resident sizes, and the peak the sum of their
/// peaks (at most what the tree held at once).
pub fn worker_stats(mut s: ResourceStats, pid: u32) -> ResourceStats {
    let tree = process_tree(pid);
    if s.cpu_usage_usec.is_none() {
        s.cpu_usage_usec = tree
            .iter()
            .map(|p| corral_confine::cgroup::process_cpu_usec(&p.to_string()))
            .sum();
    }
    if s.memory_current.is_none() || s.memory_peak.is_none() {
        let (mut current, mut peak) = (None::<u64>, None::<u64>);
        for p in &tree {
            let status = read_proc(Path::new(&format!("/proc/{p}/status"))).unwrap_or_default();
            let kib = |key: &str| {
                status.lines().find_map(|l| {
                    let v = l.strip_prefix(key)?.trim().strip_suffix("kB")?;
                    v.trim().parse::<u64>().ok().map(|k| k * 1024)
                })
            };
            if let Some(v) = kib("VmRSS:") {
                current = Some(current.unwrap_or(0) + v);
            }
            if let Some(v) = kib("VmHWM:") {
                peak = Some(peak.unwrap_or(0) + v);
            }
        }
        s.memory_current = s.memory_current.or(current);
        s.memory_peak = s.memory_peak.or(peak);
    }
    s
}

/// Most bytes read of one `/proc` file about a worker's process.
pub(crate) const MAX_PROC_READ: u64 = 64 * 1024;

/// The start of a `/proc` file about a worker's process, at most [`MAX_PROC_READ`]
/// bytes. The kernel writes these files, but a worker decides some of what is in
/// them (its supplementary groups, the number of its children); a field past the
/// cut is absent, and every caller treats absent as unknown or as refused.
pub(crate) fn read_proc(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::fs::File::open(path)?, MAX_PROC_READ),
        &mut text,
    )?;
    Ok(text)
}

/// Most processes [`worker_stats`] looks at: a fork bomb costs `status` no more.
const MAX_TREE: usize = 256;

/// `pid` and its descendants (from `/proc/<pid>/task/<tid>/children`), at most
/// [`MAX_TREE`].
fn process_tree(pid: u32) -> Vec<u32> {
    let mut tree = vec![pid];
    let mut next = 0;
    while next < tree.len() && tree.len() < MAX_TREE {
        let p = tree[next];
        next += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten().take(MAX_TREE) {
            // A plugin decides how many children it has: read what MAX_TREE pids
            // take at most, whole numbers only (the kernel ends each with a space).
            let mut children = String::new();
            let _ = std::fs::File::open(t.path().join("children"))
                .map(|f| std::io::Read::take(f, MAX_TREE as u64 * 12))
                .and_then(|mut f| std::io::Read::read_to_string(&mut f, &mut children));
            let whole = children.rfind(' ').map_or("", |end| &children[..end]);
            tree.extend(
                whole
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    tree.truncate(MAX_TREE);
    tree
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const NOBODY: Credentials = Credentials {
        uid: 65534,
        gid: 65534,
    };

    #[test]
    fn a_closed_ancestor_is_named_with_its_mode_and_owner() {
        let t = tempfile::tempdir().unwrap();
        let inner = t.path().join("plugin");
        std::fs::create_dir(&inner).unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let owner = std::fs::metadata(t.path()).unwrap().uid();
        assert_ne!(
            owner, NOBODY.uid,
            "run the tests as a user other than nobody"
        );
        let e = check_readable(&inner, NOBODY).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "{} is mode 0700 owned by uid {owner}",
                t.path().display()
            )),
            "{e}"
        );
        assert!(e.contains("uid 65534 cannot enter it"), "{e}");
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        check_readable(&inner, NOBODY).unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = check_readable(&inner, NOBODY).unwrap_err().to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }

    #[test]
    fn users_resolve_by_name_and_root_is_refused() {
        if !is_root() {
            assert!(matches!(
                credentials(&RunAs::Name("nobody".into())),
                Ok(None)
            ));
            return;
        }
        let c = credentials(&RunAs::Name("nobody".into())).unwrap().unwrap();
        assert_eq!(c, NOBODY);
        assert!(
            credentials(&RunAs::Name("no-such-user-here".into()))
                .unwrap_err()
                .to_string()
                .starts_with("no user \"no-such-user-here\"")
        );
        assert!(
            lookup_user("root")
                .unwrap_err()
                .to_string()
                .contains("never run as root")
        );
    }

    #[test]
    fn proc_files_are_read_within_their_bound() {
        let t = tempfile::tempdir().unwrap();
        let big = t.path().join("status");
        std::fs::write(&big, "Groups:\t1\n".repeat(100_000)).unwrap();
        assert_eq!(read_proc(&big).unwrap().len() as u64, MAX_PROC_READ);
        let own = read_proc(Path::new("/proc/self/status")).unwrap();
        assert!(own.contains("\nVmRSS:"), "{own}");
    }

    #[test]
    fn stats_without_a_cgroup_cover_the_process_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let own = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line[6..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        let tree = process_tree(me);
        let alone = worker_stats(ResourceStats::default(), child.id());
        let before = own();
        let with = worker_stats(ResourceStats::default(), me);
        let after = own();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(tree.contains(&child.id()), "{tree:?}");
        // This process and the child, summed.
        assert!(
            with.memory_current.unwrap() >= before.min(after) + alone.memory_current.unwrap(),
            "{with:?} {alone:?} {before} {after}"
        );
    }

    #[test]
    fn proc_stats_fill_what_the_cgroup_lacks() {
        let s = worker_stats(ResourceStats::default(), std::process::id());
        assert!(s.cpu_usage_usec.is_some());
        assert!(s.memory_current.unwrap() > 0);
        assert!(s.memory_peak.unwrap() >= s.memory_current.unwrap());
    }
}
