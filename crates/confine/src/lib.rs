//! Confinement of Corral workers, and an honest report of what is in force.
//!
//! Principal types:
//!
//! - [`Level`]: `standard`, `high`, `maximum`, as operators name them.
//! - [`SelfConfinement`]: what a worker applies to itself after its engine is
//!   prepared and before any plugin code runs: `no_new_privs`, Landlock filesystem
//!   rules (read: the plugin directory and the engine's runtime files; write: the
//!   plugin's data and cache directories; nothing else), TCP bind/connect denial and
//!   abstract-socket/signal scoping (best effort at `standard`, required from
//!   `high`), and a seccomp filter compiled from a data file with one reason per
//!   rule: deny-lists at `standard` and `high` (`seccomp/<level>.json`), the
//!   engine's allow-list at `maximum` (`seccomp/maximum-<engine>.json`).
//! - [`SelfConfinement::isolate`]: at `maximum`, first of all, own user, mount and
//!   PID namespaces and a minimal read-only view with a small tmpfs at `/tmp`.
//! - [`SelfConfinement::apply`] returns the [`EnforcementReport`] the worker puts in
//!   its handshake: each mechanism fully, partly or not enforced, with why.
//!
//! A seccomp violation sends SIGSYS; the handler installed here writes
//! `corral-seccomp: <number>` to stderr and lets the signal kill the worker, so the
//! supervisor can report "seccomp violation: <syscall>" ([`violation_from_stderr`]).
//!
//! Refusal rule: a mechanism the level requires that the kernel lacks is an error at
//! `high` and `maximum`; at `standard` the worker starts and the report says what is
//! missing.
//!
//! ```no_run
//! use corral_confine::{Level, SelfConfinement};
//! use corral_protocol::Runtime;
//! let c = SelfConfinement {
//!     level: Level::Standard,
//!     read: vec!["/srv/plugins/hello".into()],
//!     write: vec!["/var/lib/corral/hello".into()],
//!     tmpfs_bytes: 16 << 20,
//!     runtime: Runtime::Wasm,
//!     run_as: None,
//!     hide: vec![],
//!     own_pids: false,
//! };
//! c.isolate().expect("namespaces"); // a no-op below maximum
//! let report = c.apply().expect("confined");
//! println!("landlock: {}", report.landlock);
//! ```

pub mod cgroup;
pub mod child;
mod maximum;
mod seccomp;
mod sys;

/// Capabilities (linux/capability.h) the supervisor's work needs.
pub mod caps {
    pub const CAP_KILL: u32 = 5;
    pub const CAP_SETGID: u32 = 6;
    pub const CAP_SETUID: u32 = 7;
    pub const CAP_SETPCAP: u32 = 8;
    pub const CAP_SYS_ADMIN: u32 = 21;
}

/// Whether `cap` is in this process's effective set.
pub fn has_capability(cap: u32) -> bool {
    sys::effective_capabilities() & (1u64 << cap) != 0
}

/// Whether this process may create network, IPC and UTS namespaces itself
/// (`CAP_SYS_ADMIN` in its effective set), as workers from level high need.
pub fn can_create_namespaces() -> bool {
    has_capability(caps::CAP_SYS_ADMIN)
}

/// What a supervisor running as root lacks to run workers as another user: to
/// make them that user (`CAP_SETUID`, `CAP_SETGID`), to let them empty their
/// bounding set (`CAP_SETPCAP`), and to end them (`CAP_KILL`: without it neither
/// its kills nor the workers' parent-death signal reach another uid, and a worker
/// past its deadline would run on). Empty when nothing is missing.
pub fn missing_for_other_user() -> Vec<&'static str> {
    [
        (caps::CAP_SETUID, "CAP_SETUID"),
        (caps::CAP_SETGID, "CAP_SETGID"),
        (caps::CAP_SETPCAP, "CAP_SETPCAP"),
        (caps::CAP_KILL, "CAP_KILL"),
    ]
    .into_iter()
    .filter(|(cap, _)| !has_capability(*cap))
    .map(|(_, name)| name)
    .collect()
}

pub use seccomp::{
    filter_source, precompile as precompile_seccomp, syscall_name, violation_from_stderr,
};

/// Which namespaces the worker `pid` does not share with the calling process (the
/// supervisor checks from outside what the worker cannot see once it is unprivileged).
pub fn worker_namespaces(pid: u32) -> corral_protocol::Enforcement {
    sys::namespaces_apart_from_self(pid)
}

use corral_protocol::{Enforcement, EnforcementReport, Runtime};
use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// Environment variable through which the supervisor hands a worker its
/// [`SelfConfinement`] (JSON). Present in every confined worker's environment.
pub const CONFINE_ENV: &str = "CORRAL_CONFINE";

/// The Landlock ABI whose rights Corral asks for (best effort below it at `standard`).
const LANDLOCK_ABI: ABI = ABI::V6;

/// Isolation levels, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Standard,
    High,
    Maximum,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Standard => "standard",
            Level::High => "high",
            Level::Maximum => "maximum",
        }
    }
}

/// A level name that is none of `standard`, `high`, `maximum`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown isolation level {0:?} (expected standard, high or maximum)")]
pub struct UnknownLevel(pub String);

impl std::str::FromStr for Level {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Level, UnknownLevel> {
        match s {
            "standard" => Ok(Level::Standard),
            "high" => Ok(Level::High),
            "maximum" => Ok(Level::Maximum),
            other => Err(UnknownLevel(other.to_owned())),
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a worker applies to itself before it accepts plugin code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfConfinement {
    pub level: Level,
    /// Readable trees (plugin directory, engine runtime files).
    pub read: Vec<PathBuf>,
    /// Readable and writable trees (data directory, compiled-code cache). At
    /// `maximum` these are visible read-only; the tmpfs at `/tmp` is the only
    /// writable place.
    pub write: Vec<PathBuf>,
    /// Size of the writable tmpfs at `maximum`.
    #[serde(default)]
    pub tmpfs_bytes: u64,
    /// The runtime the worker embeds: `maximum` installs its engine's own seccomp
    /// allow-list.
    pub runtime: Runtime,
    /// `[uid, gid]` to switch to first of all (the supervisor is root and starts the
    /// worker as root, so the worker binary's path needs no permissions for this
    /// user); every capability goes with it.
    #[serde(default)]
    pub run_as: Option<[u32; 2]>,
    /// Directories directly inside a readable tree that stay unreadable (an
    /// interpreter's `site-packages` inside its standard library): Landlock grants
    /// the tree's other entries one by one (the tree itself may only be listed),
    /// and at `maximum` an empty read-only tmpfs covers them.
    #[serde(default)]
    pub hide: Vec<PathBuf>,
    /// Below `maximum` (which has one anyway): serve as pid 1 of a PID namespace of
    /// its own, so that everything the plugin starts dies with the worker. The
    /// supervisor asks for it when the worker has no cgroup to kill; a user
    /// namespace comes with it when the worker is not started as root.
    #[serde(default)]
    pub own_pids: bool,
}

/// Why confinement could not be applied (or not to the level's requirement).
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("malformed {CONFINE_ENV}: {0}")]
    Spec(String),
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("landlock ruleset could not be built")]
    Landlock(#[from] landlock::RulesetError),
    #[error("level {level} requires landlock, but {why}")]
    LandlockMissing { level: Level, why: String },
    #[error("seccomp filter for level {level} is invalid: {why}")]
    SeccompFilter { level: Level, why: String },
    #[error("seccomp filter could not be installed")]
    SeccompInstall(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS reporter")]
    Signal(#[source] std::io::Error),
    #[error("cannot drop root")]
    Privileges(#[source] std::io::Error),
    #[error("cannot enter the namespaces of level maximum")]
    Namespaces(#[source] std::io::Error),
}

impl SelfConfinement {
    /// The spec the supervisor left in [`CONFINE_ENV`], if any.
    pub fn from_env() -> Result<Option<SelfConfinement>, ConfineError> {
        match std::env::var(CONFINE_ENV) {
            Ok(v) => serde_json::from_str(&v)
                .map(Some)
                .map_err(|e| ConfineError::Spec(e.to_string())),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(e) => Err(ConfineError::Spec(e.to_string())),
        }
    }

    /// The value to put in [`CONFINE_ENV`].
    pub fn to_env_value(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }

    /// Confine the calling process. Call it before any thread that could run plugin
    /// code exists: Landlock applies to the calling thread and its future children.
    /// The seccomp filter is synchronised to all threads.
    pub fn apply(&self) -> Result<EnforcementReport, ConfineError> {
        // Read before Landlock hides the supervisor's /proc entries. A worker that
        // dropped root cannot read them at all (its parent's are root's): the
        // supervisor checks from outside instead (it always does).
        let namespaces = match self.run_as {
            None => sys::namespaces_report(),
            Some(_) => Enforcement::None(
                "checked from outside by the supervisor (unreadable after the drop)".into(),
            ),
        };
        if self.level != Level::Maximum
            && maximum::OWN_USER_NAMESPACE.load(std::sync::atomic::Ordering::SeqCst)
        {
            // The capabilities of the user namespace that came with the PID one.
            maximum::drop_capabilities().map_err(ConfineError::Namespaces)?;
        }
        let (read, write) = if self.level == Level::Maximum {
            // The capabilities of the worker's own user namespace go first.
            maximum::drop_capabilities().map_err(ConfineError::Namespaces)?;
            let mut read = self.read.clone();
            read.extend(self.write.iter().cloned());
            (read, vec![PathBuf::from("/tmp")])
        } else {
            (self.read.clone(), self.write.clone())
        };
        sys::set_no_new_privs().map_err(ConfineError::NoNewPrivs)?;
        let landlock = self.apply_landlock(&read, &write)?;
        // Read while the syscalls are still allowed (an allow-list has no capget).
        let (cap_effective, cap_bounding) =
            (sys::effective_capabilities(), sys::bounding_capabilities());
        let (uid, gid, no_new_privs) = (sys::uid(), sys::gid(), sys::no_new_privs());
        sys::install_sigsys_reporter().map_err(ConfineError::Signal)?;
        let seccomp = seccomp::install(self.level, self.runtime)?;
        Ok(EnforcementReport {
            cgroup: Enforcement::None("not set up by the worker".into()),
            landlock,
            seccomp,
            namespaces,
            no_new_privs,
            uid,
            gid,
            cap_effective,
            cap_bounding,
        })
    }

    /// First of all: drop root if told to (`run_as`); then, at level `maximum`, enter
    /// own user, mount and PID namespaces with a minimal
    /// read-only view of the filesystem (see the `maximum` module). Call it first,
    /// while the process is single-threaded; it forks, and returns in the child.
    pub fn isolate(&self) -> Result<(), ConfineError> {
        let maximum = self.level == Level::Maximum;
        let mut visible = self.read.clone();
        visible.extend(self.write.iter().cloned());
        visible.retain(|p| p.exists());
        // One mount per path, none inside another: making a mount point inside a
        // bound host tree would create it on the host.
        let visible = maximum::distinct_mounts(visible);
        let tmpfs_bytes = self.tmpfs_bytes.max(1 << 20);
        let view = match self.run_as {
            // Still root: stage the whole view while every path is reachable.
            Some(owner) if maximum => maximum::prestage(&visible, &self.hide, tmpfs_bytes, owner)
                .map_err(ConfineError::Namespaces)?,
            _ => maximum::View::Paths {
                visible: visible.clone(),
                hide: self.hide.clone(),
                tmpfs_bytes,
            },
        };
        let mut own_pids = self.own_pids && !maximum;
        // Below maximum the namespace is best effort, as every mechanism at standard:
        // a kernel that refuses it (user namespaces turned off for unprivileged
        // users) starts the worker without, says so on stderr (the supervisor logs
        // it), and `corral status` shows the process tree as not enforced.
        let unshare = |with_user: bool| -> Result<bool, ConfineError> {
            match maximum::unshare_pids(with_user) {
                Ok(None) => Ok(true),
                Ok(Some(e)) => {
                    eprintln!(
                        "corral worker: no PID namespace of its own ({e}): processes the \
                         plugin detaches may outlive the worker"
                    );
                    Ok(false)
                }
                Err(e) => Err(ConfineError::Namespaces(e)),
            }
        };
        if let Some([uid, gid]) = self.run_as {
            // Handles for the Landlock rules, while every path is reachable.
            let mut early = EARLY_HANDLES.lock().unwrap_or_else(|e| e.into_inner());
            for p in &visible {
                if let Ok(fd) = PathFd::new(p) {
                    early.push((p.clone(), fd));
                }
            }
            drop(early);
            if own_pids {
                // While still root: a PID namespace needs CAP_SYS_ADMIN.
                own_pids = unshare(false)?;
            }
            sys::drop_privileges(uid, gid).map_err(ConfineError::Privileges)?;
        } else if own_pids {
            own_pids = unshare(true)?;
        }
        if own_pids {
            return maximum::fork_into_pid_namespace().map_err(ConfineError::Namespaces);
        }
        if !maximum {
            return Ok(());
        }
        maximum::enter(&view).map_err(ConfineError::Namespaces)
    }

    fn apply_landlock(
        &self,
        read: &[PathBuf],
        write: &[PathBuf],
    ) -> Result<Enforcement, ConfineError> {
        let required = self.level >= Level::High;
        let abi = LANDLOCK_ABI;
        let mut ruleset = Ruleset::default();
        if required {
            ruleset = ruleset.set_compatibility(CompatLevel::HardRequirement);
        }
        let ruleset = ruleset.handle_access(AccessFs::from_all(abi));
        let ruleset = match ruleset {
            Ok(r) => r,
            Err(e) if required => {
                return Err(ConfineError::LandlockMissing {
                    level: self.level,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        // Network (TCP bind/connect, ABI 4) and scoping of abstract unix sockets and
        // signals (ABI 6): best effort at `standard`, required from `high`.
        let extra = ruleset
            .handle_access(AccessNet::from_all(abi))
            .and_then(|r| r.scope(Scope::AbstractUnixSocket | Scope::Signal));
        let mut ruleset = match extra {
            Ok(r) => r.create()?,
            Err(e) if required => {
                return Err(ConfineError::LandlockMissing {
                    level: self.level,
                    why: e.to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        // Handles taken before the worker dropped root, else opened now; paths that
        // do not exist (or cannot be reached) are skipped: nothing there to grant.
        let mut early =
            std::mem::take(&mut *EARLY_HANDLES.lock().unwrap_or_else(|e| e.into_inner()));
        let mut handle = |p: &PathBuf| match early.iter().position(|(q, _)| q == p) {
            Some(i) => Some(early.swap_remove(i).1),
            None => PathFd::new(p).ok(),
        };
        for (paths, access) in [
            (read, AccessFs::from_read(abi)),
            (write, AccessFs::from_all(abi)),
        ] {
            for p in paths {
                let Some(fd) = handle(p) else { continue };
                let hidden: Vec<&PathBuf> = self
                    .hide
                    .iter()
                    .filter(|h| h.parent() == Some(p.as_path()))
                    .collect();
                if !hidden.is_empty() {
                    // List the tree; read every entry but the hidden ones.
                    for entry in entries_except(&fd, &hidden) {
                        let access = if is_dir(&entry) {
                            access
                        } else {
                            access & AccessFs::from_file(abi)
                        };
                        ruleset = ruleset.add_rule(PathBeneath::new(entry, access))?;
                    }
                    ruleset = ruleset.add_rule(PathBeneath::new(fd, AccessFs::ReadDir))?;
                    continue;
                }
                let access = if is_dir(&fd) {
                    access
                } else {
                    access & AccessFs::from_file(abi)
                };
                ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?;
            }
        }
        // Any handle left over goes now: none stays open for plugin code.
        drop(early);
        let status = ruleset.restrict_self()?;
        let what = "filesystem, TCP bind/connect denied, abstract unix sockets and signals scoped";
        let rules = format!(
            "ABI {} rules, kernel ABI {}: {what}; read: {}; write: {}",
            abi as i32,
            sys::landlock_kernel_abi().map_or("unknown".into(), |v| v.to_string()),
            paths(read),
            paths(write)
        );
        Ok(match status {
            RestrictionStatus {
                ruleset: RulesetStatus::FullyEnforced,
                ..
            } => Enforcement::Full(rules),
            RestrictionStatus {
                ruleset: RulesetStatus::PartiallyEnforced,
                ..
            } => Enforcement::Partial(format!("kernel lacks some rights of ABI {abi:?}; {rules}")),
            RestrictionStatus { landlock, .. } => {
                if required {
                    return Err(ConfineError::LandlockMissing {
                        level: self.level,
                        why: format!("it is not enforced ({landlock:?})"),
                    });
                }
                Enforcement::None(format!("landlock not available ({landlock:?})"))
            }
        })
    }
}

/// `O_PATH` handles on the readable and writable trees, taken by
/// [`SelfConfinement::isolate`] before the worker drops root (its new user may not
/// reach a path, such as a standard library under a 0700 `/root`) and consumed by
/// the Landlock rules in [`SelfConfinement::apply`].
static EARLY_HANDLES: std::sync::Mutex<Vec<(PathBuf, PathFd)>> = std::sync::Mutex::new(Vec::new());

/// Handles on the entries of the directory `dir`, but those in `hidden`. Read
/// through the handle (`openat`), so it works whether or not the path is reachable
/// from here: a standard library under a 0700 `/root`, or a view without `/proc`.
fn entries_except(dir: &PathFd, hidden: &[&PathBuf]) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let base = dir.as_fd().as_raw_fd();
    let mut out = Vec::new();
    // SAFETY: openat/fdopendir/readdir/closedir on descriptors this function owns;
    // each `d_name` is a NUL-terminated string valid until the next readdir.
    unsafe {
        let listing = libc::openat(
            base,
            c".".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if listing < 0 {
            return out;
        }
        let stream = libc::fdopendir(listing);
        if stream.is_null() {
            libc::close(listing);
            return out;
        }
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*entry).d_name.as_ptr());
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            if hidden
                .iter()
                .any(|h| h.file_name().map(|n| n.as_bytes()) == Some(bytes))
            {
                continue;
            }
            let fd = libc::openat(base, name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
            if fd >= 0 {
                out.push(OwnedFd::from_raw_fd(fd));
            }
        }
        libc::closedir(stream);
    }
    out
}

fn is_dir(fd: &impl std::os::fd::AsFd) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat on a descriptor we hold, into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd.as_fd().as_raw_fd(), &mut st) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// The paths for a report; more than three files in one directory (an engine's
/// shared libraries) are summed up as `<dir>/ (N files)`. One `stat` per path.
fn paths(v: &[PathBuf]) -> String {
    if v.is_empty() {
        return "nothing".into();
    }
    let dirs: Vec<Option<&std::path::Path>> = v
        .iter()
        .map(|p| p.parent().filter(|_| !p.is_dir()))
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut grouped: Vec<&std::path::Path> = Vec::new();
    for (p, dir) in v.iter().zip(&dirs) {
        let siblings = dir.map_or(0, |d| dirs.iter().filter(|q| **q == Some(d)).count());
        match dir {
            Some(d) if siblings > 3 => {
                if !grouped.contains(d) {
                    grouped.push(d);
                    out.push(format!("{}/ ({siblings} files)", d.display()));
                }
            }
            _ => out.push(p.display().to_string()),
        }
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_the_environment_value() {
        let c = SelfConfinement {
            level: Level::High,
            read: vec!["/a".into()],
            write: vec!["/b".into()],
            tmpfs_bytes: 1 << 20,
            runtime: Runtime::Wasm,
            run_as: Some([65534, 65534]),
            hide: vec!["/a/site-packages".into()],
            own_pids: true,
        };
        let back: SelfConfinement = serde_json::from_str(&c.to_env_value()).unwrap();
        assert_eq!(back, c);
        assert!(
            serde_json::from_str::<SelfConfinement>(r#"{"level":"low","read":[],"write":[]}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown variant `low`")
        );
    }

    #[test]
    fn levels_are_ordered() {
        assert!(Level::Standard < Level::High && Level::High < Level::Maximum);
    }
}
