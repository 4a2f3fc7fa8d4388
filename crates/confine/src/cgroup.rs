//! Per-plugin cgroups: memory, CPU and pids limits, OOM-kill accounting, clean-up.
//!
//! The supervisor creates one group per worker start under a base group of its own
//! (`corral-<supervisor pid>`), nested below the group it runs in, and never touches
//! groups it did not create. The worker joins its group between `fork` and `exec`
//! (it writes `0` to each `cgroup.procs`, or on v1 to each `tasks`), so it never
//! runs unlimited.
//!
//! Hybrid and legacy (v1) hosts get the `memory`, `cpu` and `pids` controllers'
//! files; unified (v2) hosts get `memory.max`, `memory.swap.max`, `memory.oom.group`,
//! `cpu.max` and `pids.max` in one directory. The cgroupfs root and `/proc/self/cgroup`
//! are parameters ([`CgroupHost`]) so unit tests run on a temporary directory.

use corral_protocol::{Enforcement, ResourceStats};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Limits written into a plugin's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids_max: u64,
    /// CPU bandwidth in millionths of a CPU per period (1_000_000 = one CPU).
    pub cpu_micros_per_sec: u64,
}

/// Which cgroup hierarchy is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// Why a group could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup controllers for memory, cpu and pids under {}", root.display())]
    Unavailable { root: PathBuf },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create or configure {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where the cgroup filesystem is and where this process sits in it.
#[derive(Debug, Clone)]
pub struct CgroupHost {
    /// Usually `/sys/fs/cgroup`.
    pub root: PathBuf,
    /// Usually `/proc/self/cgroup`.
    pub self_cgroup: PathBuf,
}

impl Default for CgroupHost {
    fn default() -> Self {
        CgroupHost {
            root: "/sys/fs/cgroup".into(),
            self_cgroup: "/proc/self/cgroup".into(),
        }
    }
}

/// The supervisor's own base group, one directory per controller.
#[derive(Debug, Clone)]
pub struct CgroupBase {
    pub version: CgroupVersion,
    /// v1: the base directory in the memory, cpu and pids hierarchies; v2: one.
    dirs: Vec<PathBuf>,
}

const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Most bytes of a v1 group's `cpu.cfs_period_us` read: the kernel writes at most
/// seven digits and a newline; anything longer is not a period.
const MAX_PERIOD_FILE: u64 = 32;

/// A v1 group's CFS period in microseconds; the kernel's default (100 ms) where the
/// file is missing. At most [`MAX_PERIOD_FILE`] bytes are read, whatever the file
/// holds.
fn v1_period(path: &Path) -> Result<u64, CgroupError> {
    use std::io::Read;
    let read_error = |source| CgroupError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(100_000),
        Err(e) => return Err(read_error(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_PERIOD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    let text = String::from_utf8_lossy(&bytes);
    (bytes.len() as u64 <= MAX_PERIOD_FILE)
        .then(|| text.trim().parse::<u64>().ok())
        .flatten()
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            read_error(io::Error::new(
                io::ErrorKind::InvalidData,
                // `text` is at most MAX_PERIOD_FILE + 1 bytes.
                format!("not a CFS period: {:?}", text.trim()),
            ))
        })
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

impl CgroupHost {
    /// Where this process sits in hierarchy `controller` (v1) or the unified one
    /// (`controller` = "").
    fn own_path(&self, controller: &str) -> Result<PathBuf, CgroupError> {
        let text = fs::read_to_string(&self.self_cgroup).map_err(|source| CgroupError::Read {
            path: self.self_cgroup.clone(),
            source,
        })?;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, list, path) = (parts.next(), parts.next(), parts.next());
            let (Some(list), Some(path)) = (list, path) else {
                continue;
            };
            let matches = if controller.is_empty() {
                list.is_empty()
            } else {
                list.split(',').any(|c| c == controller)
            };
            if matches {
                return Ok(PathBuf::from(path.trim_start_matches('/')));
            }
        }
        Ok(PathBuf::new())
    }

    /// Find usable controllers and create the supervisor's base group `name` in each.
    /// Prefers v2 when the unified hierarchy has memory, cpu and pids.
    pub fn base(&self, name: &str) -> Result<CgroupBase, CgroupError> {
        // Unified: either the root is cgroup2 itself or it has a `unified` mount.
        for unified in [self.root.clone(), self.root.join("unified")] {
            let ctl = fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
            let has = |c| ctl.split_whitespace().any(|x| x == c);
            if has("memory") && has("cpu") && has("pids") {
                let mut own = unified.join(self.own_path("")?);
                // Already moved into the leaf by an earlier base (another Supervisor
                // in this process): the delegated group is its parent.
                if own.file_name().is_some_and(|n| n == SUPERVISOR_LEAF)
                    && let Some(parent) = own.parent()
                    && offers_controllers(parent)
                {
                    own = parent.to_owned();
                }
                delegate_controllers(&own)?;
                let dir = own.join(name);
                mkdir(&dir)?;
                // Enable the controllers for the plugin groups below the base.
                write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
                return Ok(CgroupBase {
                    version: CgroupVersion::V2,
                    dirs: vec![dir],
                });
            }
        }
        let mut dirs = Vec::new();
        for c in V1_CONTROLLERS {
            let hier = self.root.join(c);
            if !hier.join("cgroup.procs").exists() {
                return Err(CgroupError::Unavailable {
                    root: self.root.clone(),
                });
            }
            let dir = hier.join(self.own_path(c)?).join(name);
            mkdir(&dir)?;
            dirs.push(dir);
        }
        Ok(CgroupBase {
            version: CgroupVersion::V1,
            dirs,
        })
    }
}

/// Make memory, cpu and pids available to the groups below `own` (this process's
/// cgroup v2 group). A delegated subtree (systemd `Delegate=yes`) starts with this
/// process inside `own`, and "no internal processes" forbids enabling controllers
/// for children of a group that has processes: the process first moves itself into a
/// leaf `own/corral-supervisor`. (The root group is exempt from the rule.)
fn delegate_controllers(own: &Path) -> Result<(), CgroupError> {
    if offers_controllers(own) {
        return Ok(());
    }
    let control = own.join("cgroup.subtree_control");
    match write(&control, "+memory +cpu +pids") {
        Ok(()) => Ok(()),
        Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            let leaf = own.join(SUPERVISOR_LEAF);
            mkdir(&leaf)?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            write(&control, "+memory +cpu +pids")
        }
        Err(e) => Err(e),
    }
}

/// CPU time (user + system) of process `pid` so far, in microseconds.
pub fn process_cpu_usec(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000 / hz)
}

/// The leaf a supervisor moves itself into inside a delegated v2 group.
pub const SUPERVISOR_LEAF: &str = "corral-supervisor";

/// Whether v2 group `dir` offers memory, cpu and pids to its children.
fn offers_controllers(dir: &Path) -> bool {
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    ["memory", "cpu", "pids"]
        .iter()
        .all(|c| enabled.split_whitespace().any(|x| x == *c))
}

/// One worker's group.
#[derive(Debug)]
pub struct PluginCgroup {
    pub version: CgroupVersion,
    dirs: Vec<PathBuf>,
    limits: std::sync::Mutex<CgroupLimits>,
}

impl CgroupBase {
    /// Remove the base groups of supervisors that are gone (`<prefix><pid>` whose pid
    /// no longer exists) and their plugin groups, killing what their plugins left
    /// running. Live supervisors' groups and anything not named by us are left alone.
    pub fn clean_leftovers(&self, prefix: &str) {
        for base in &self.dirs {
            let Some(parent) = base.parent() else {
                continue;
            };
            let Ok(entries) = fs::read_dir(parent) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix(prefix)
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                if let Ok(groups) = fs::read_dir(e.path()) {
                    for g in groups.flatten().filter(|g| g.path().is_dir()) {
                        // Processes its plugins left when it died: ours to end.
                        for pid in members(&g.path()) {
                            // SAFETY: kill(2) with integer arguments, of a member of
                            // a group a supervisor of ours made for a worker.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                        let _ = fs::remove_dir(g.path());
                    }
                }
                let _ = fs::remove_dir(e.path());
            }
        }
    }

    /// Remove the base itself; false while a plugin group is still in it.
    pub fn try_remove(&self) -> bool {
        self.dirs
            .iter()
            .all(|d| fs::remove_dir(d).is_ok() || !d.exists())
    }

    /// Create the group `name` with `limits`.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<PluginCgroup, CgroupError> {
        let dirs: Vec<PathBuf> = self.dirs.iter().map(|d| d.join(name)).collect();
        for d in &dirs {
            mkdir(d)?;
        }
        let group = PluginCgroup {
            version: self.version,
            dirs,
            limits: std::sync::Mutex::new(limits.clone()),
        };
        if let Err(e) = group.write_limits(limits) {
            group.try_remove();
            return Err(e);
        }
        Ok(group)
    }
}

impl PluginCgroup {
    fn dir(&self, controller: &str) -> &Path {
        match self.version {
            CgroupVersion::V2 => &self.dirs[0],
            CgroupVersion::V1 => {
                let i = V1_CONTROLLERS
                    .iter()
                    .position(|c| *c == controller)
                    .unwrap_or(0);
                &self.dirs[i]
            }
        }
    }

    fn write_limits(&self, l: &CgroupLimits) -> Result<(), CgroupError> {
        let quota_for = |period: u64| (l.cpu_micros_per_sec * period / 1_000_000).max(1_000);
        match self.version {
            CgroupVersion::V2 => {
                let period: u64 = 100_000;
                let quota = quota_for(period);
                let d = &self.dirs[0];
                write(&d.join("memory.max"), &l.memory_bytes.to_string())?;
                // memory.high at the hard limit: a throttling zone below it turns a
                // memory bomb into a wall-clock crawl (the kernel sleeps every
                // allocation) that ends as a deadline kill instead of an OOM kill.
                write(&d.join("memory.high"), &l.memory_bytes.to_string())?;
                write(&d.join("memory.swap.max"), "0")?;
                write(&d.join("memory.oom.group"), "1")?;
                write(&d.join("cpu.max"), &format!("{quota} {period}"))?;
                write(&d.join("pids.max"), &l.pids_max.to_string())?;
            }
            CgroupVersion::V1 => {
                let m = self.dir("memory");
                write(
                    &m.join("memory.limit_in_bytes"),
                    &l.memory_bytes.to_string(),
                )?;
                // No swap either, where the kernel accounts it.
                let memsw = m.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &l.memory_bytes.to_string())?;
                }
                // The period is the kernel's default for every new group (100 ms)
                // and is not written (each write re-applies the bandwidth on every
                // CPU): the quota is computed against the group's own period, read,
                // so that a group found already there (a leftover of an earlier
                // supervisor with this pid) whose period someone changed still gets
                // the policy's share of a CPU.
                let cpu = self.dir("cpu");
                let quota = quota_for(v1_period(&cpu.join("cpu.cfs_period_us"))?);
                write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&self.dir("pids").join("pids.max"), &l.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    /// The files the child writes `0` into before `exec`, one per hierarchy, to join
    /// the group.
    ///
    /// On v1 that is `tasks`, not `cgroup.procs`: `0` there moves the writing thread
    /// alone, which the kernel does without taking its global threadgroup lock for
    /// writing, and so without waiting for an RCU grace period (7 to 15 ms on these
    /// hosts after an idle moment, against 0.25 ms). The child is a freshly forked,
    /// single-threaded process, so its one thread is all of it, and every thread it
    /// makes later is born in the group. v2 has no such file for a process (its
    /// `cgroup.threads` is for threaded groups), so there it is `cgroup.procs`.
    pub fn join_files(&self) -> Vec<CString> {
        let file = match self.version {
            CgroupVersion::V1 => "tasks",
            CgroupVersion::V2 => "cgroup.procs",
        };
        self.dirs
            .iter()
            .map(|d| CString::new(d.join(file).as_os_str().as_bytes()).expect("no NUL in path"))
            .collect()
    }

    /// How many processes the kernel's OOM killer has killed in this group.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V2 => (self.dirs[0].join("memory.events"), "oom_kill"),
            CgroupVersion::V1 => (self.dir("memory").join("memory.oom_control"), "oom_kill"),
        };
        fs::read_to_string(file)
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
                })
            })
            .unwrap_or(0)
    }

    pub fn limits(&self) -> CgroupLimits {
        self.limits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Change the limits of a live group (a policy reload). The kernel refuses a
    /// memory limit below what the group uses now (v1: EBUSY); then nothing changes
    /// from the memory limit on and the error says which file refused.
    pub fn set_limits(&self, new: &CgroupLimits) -> Result<(), CgroupError> {
        let mut cur = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.write_limits(new);
        if result.is_ok() {
            *cur = new.clone();
        }
        result
    }

    /// Resource use now. Counters a hierarchy lacks are `None`.
    pub fn stats(&self) -> ResourceStats {
        let num = |p: PathBuf| -> Option<u64> { fs::read_to_string(p).ok()?.trim().parse().ok() };
        let key = |p: PathBuf, k: &str| -> Option<u64> {
            fs::read_to_string(p).ok()?.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(k)).then(|| it.next()?.parse().ok())?
            })
        };
        let l = self.limits();
        let mut s = ResourceStats {
            memory_limit: Some(l.memory_bytes),
            pids_max: Some(l.pids_max),
            oom_kills: self.oom_kills(),
            ..ResourceStats::default()
        };
        match self.version {
            CgroupVersion::V2 => {
                let d = &self.dirs[0];
                s.memory_current = num(d.join("memory.current"));
                s.memory_peak = num(d.join("memory.peak"));
                s.cpu_usage_usec = key(d.join("cpu.stat"), "usage_usec");
                s.cpu_throttled_periods = key(d.join("cpu.stat"), "nr_throttled");
                s.cpu_throttled_usec = key(d.join("cpu.stat"), "throttled_usec");
                s.pids_current = num(d.join("pids.current"));
            }
            CgroupVersion::V1 => {
                let m = self.dir("memory");
                s.memory_current = num(m.join("memory.usage_in_bytes"));
                s.memory_peak = num(m.join("memory.max_usage_in_bytes"));
                let c = self.dir("cpu");
                s.cpu_throttled_periods = key(c.join("cpu.stat"), "nr_throttled");
                s.cpu_throttled_usec =
                    key(c.join("cpu.stat"), "throttled_time").map(|ns| ns / 1000);
                s.pids_current = num(self.dir("pids").join("pids.current"));
                // v1 has no usage counter in these hierarchies (cpuacct is not
                // joined): the CPU time of every process in the group.
                // Bounded like every read of the list (`members`).
                let procs = self.dir("pids");
                s.cpu_usage_usec = procs.join("cgroup.procs").exists().then(|| {
                    members(procs)
                        .into_iter()
                        .filter_map(|pid| process_cpu_usec(&pid.to_string()))
                        .sum()
                });
            }
        }
        s
    }

    /// What this group enforces, for the handshake report.
    pub fn report(&self) -> Enforcement {
        let l = self.limits();
        Enforcement::Full(format!(
            "cgroup {}: memory {} MiB, pids {}, cpu {:.2}",
            match self.version {
                CgroupVersion::V1 => "v1",
                CgroupVersion::V2 => "v2",
            },
            l.memory_bytes >> 20,
            l.pids_max,
            l.cpu_micros_per_sec as f64 / 1e6
        ))
    }

    /// Remove the group; false while a process is still in it.
    pub fn try_remove(&self) -> bool {
        self.dirs
            .iter()
            .all(|d| fs::remove_dir(d).is_ok() || !d.exists())
    }

    /// SIGKILL every process still in the group: once its worker has exited, what
    /// is left is what the plugin started (a grandchild in a session of its own
    /// outlives its parent's death signal). v2 kills the whole group at once
    /// (`cgroup.kill`); v1 signals each member, and a member that forked meanwhile
    /// put its child in the group too, for the next call to find. Returns how many
    /// processes were signalled (v2: 1 when the group was told to die).
    pub fn kill_all(&self) -> usize {
        if self.version == CgroupVersion::V2 {
            let kill = self.dirs[0].join("cgroup.kill");
            if kill.exists() && fs::write(&kill, "1").is_ok() {
                return usize::from(!members(&self.dirs[0]).is_empty());
            }
        }
        let mut signalled = 0;
        for d in &self.dirs {
            for pid in members(d) {
                // SAFETY: kill(2) with integer arguments; the pid is a member of a
                // group only our workers and their descendants ever join.
                if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    signalled += 1;
                }
            }
        }
        signalled
    }
}

/// The most of a group's `cgroup.procs` read at once. The kernel writes the file,
/// and the group's `pids.max` bounds it, but a leftover group of another supervisor
/// may have had any limit: a prefix is enough, as kills repeat until the group is
/// empty.
const MAX_PROCS_READ: u64 = 64 << 10;

/// The processes in group directory `dir` (none if it cannot be read), at most
/// [`MAX_PROCS_READ`] bytes' worth; a pid cut at the end is left for the next look.
fn members(dir: &Path) -> Vec<libc::pid_t> {
    use std::io::Read;
    let mut text = String::new();
    let read = fs::File::open(dir.join("cgroup.procs"))
        .and_then(|f| f.take(MAX_PROCS_READ).read_to_string(&mut text));
    if read.is_err() {
        return Vec::new();
    }
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p: &libc::pid_t| p > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_v1() -> (tempfile::TempDir, CgroupHost) {
        let t = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            fs::create_dir_all(t.path().join(c).join("outer")).unwrap();
            fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        fs::write(
            t.path().join("self_cgroup"),
            "4:memory:/outer\n1:cpu:/\n8:pids:/\n0::/\n",
        )
        .unwrap();
        let host = CgroupHost {
            root: t.path().to_owned(),
            self_cgroup: t.path().join("self_cgroup"),
        };
        (t, host)
    }

    /// However large a group's process list, one look reads a bounded prefix of
    /// whole lines. (The pids are above any `pid_max`, so nothing can be killed.)
    #[test]
    fn a_huge_process_list_is_read_in_bounded_pieces() {
        let t = tempfile::tempdir().unwrap();
        let line = "2000000000\n";
        fs::write(t.path().join("cgroup.procs"), line.repeat(1 << 20)).unwrap();
        let got = members(t.path());
        assert_eq!(got.len() as u64, MAX_PROCS_READ / line.len() as u64);
        assert!(got.iter().all(|&p| p == 2_000_000_000));
        fs::write(t.path().join("cgroup.procs"), "12\n34").unwrap();
        assert_eq!(
            members(t.path()),
            [12],
            "a cut last line waits for the next look"
        );
    }

    #[test]
    fn v1_groups_nest_below_our_own_and_get_limits() {
        let (t, host) = fake_v1();
        let base = host.base("corral-1").unwrap();
        assert_eq!(base.version, CgroupVersion::V1);
        let limits = CgroupLimits {
            memory_bytes: 64 << 20,
            pids_max: 32,
            cpu_micros_per_sec: 500_000,
        };
        let g = base.create("hello-1", &limits).unwrap();
        let mem = t.path().join("memory/outer/corral-1/hello-1");
        assert_eq!(
            fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            "67108864"
        );
        assert_eq!(
            fs::read_to_string(t.path().join("pids/corral-1/hello-1/pids.max")).unwrap(),
            "32"
        );
        let cpu = t.path().join("cpu/corral-1/hello-1");
        assert_eq!(
            fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        // Left to the kernel, whose default for every new group is the 100 ms the
        // quota is computed against (the e2e tests read it from a real group).
        assert!(!cpu.join("cpu.cfs_period_us").exists());

        // A group found already there with another period: the quota is the same
        // share of a CPU, against its period, which is left as it is.
        let old = t.path().join("cpu/corral-1/hello-2");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("cpu.cfs_period_us"), "10000\n").unwrap();
        base.create("hello-2", &limits).unwrap();
        assert_eq!(
            fs::read_to_string(old.join("cpu.cfs_quota_us")).unwrap(),
            "5000"
        );
        assert_eq!(
            fs::read_to_string(old.join("cpu.cfs_period_us")).unwrap(),
            "10000\n"
        );

        // A period file that is not one (too long, not a number, zero) refuses
        // the group with the file named, after reading at most 33 bytes of it.
        for bad in ["9".repeat(1 << 20), "abc\n".into(), "0\n".into()] {
            let g = t.path().join("cpu/corral-1/hello-3");
            fs::create_dir_all(&g).unwrap();
            fs::write(g.join("cpu.cfs_period_us"), &bad).unwrap();
            let e = base.create("hello-3", &limits).unwrap_err();
            let e = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(
                e.contains("cpu.cfs_period_us") && e.contains("not a CFS period"),
                "{e:.200}"
            );
            assert!(e.len() < 400, "{} bytes", e.len());
        }
        let join: Vec<String> = g
            .join_files()
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert_eq!(join.len(), 3);
        assert!(join[0].ends_with("memory/outer/corral-1/hello-1/tasks"));
        assert!(join[2].ends_with("pids/corral-1/hello-1/tasks"));

        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(g.oom_kills(), 2);
        assert!(matches!(g.report(), Enforcement::Full(s) if s.contains("memory 64 MiB")));
    }

    #[test]
    fn v2_is_preferred_when_the_unified_hierarchy_has_the_controllers() {
        let t = tempfile::tempdir().unwrap();
        fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        fs::write(t.path().join("self"), "0::/svc\n").unwrap();
        fs::create_dir_all(t.path().join("svc")).unwrap();
        let host = CgroupHost {
            root: t.path().to_owned(),
            self_cgroup: t.path().join("self"),
        };
        let base = host.base("corral-9").unwrap();
        assert_eq!(base.version, CgroupVersion::V2);
        assert_eq!(
            fs::read_to_string(t.path().join("svc/corral-9/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        // The delegated group itself offers the controllers to its children.
        assert_eq!(
            fs::read_to_string(t.path().join("svc/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        let limits = CgroupLimits {
            memory_bytes: 32 << 20,
            pids_max: 16,
            cpu_micros_per_sec: 1_000_000,
        };
        let g = base.create("p", &limits).unwrap();
        let d = t.path().join("svc/corral-9/p");
        assert_eq!(
            fs::read_to_string(d.join("memory.max")).unwrap(),
            "33554432"
        );
        assert_eq!(fs::read_to_string(d.join("memory.oom.group")).unwrap(), "1");
        assert_eq!(
            fs::read_to_string(d.join("memory.high")).unwrap(),
            "33554432"
        );
        assert_eq!(fs::read_to_string(d.join("memory.swap.max")).unwrap(), "0");
        assert_eq!(
            fs::read_to_string(d.join("cpu.max")).unwrap(),
            "100000 100000"
        );
        assert_eq!(
            g.join_files(),
            [CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).unwrap()]
        );
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 3\nmax 5\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(g.oom_kills(), 1);

        for (f, v) in [
            ("memory.current", "1048576\n"),
            ("memory.peak", "2097152\n"),
            ("pids.current", "3\n"),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 9\nnr_throttled 4\nthrottled_usec 7000\n",
            ),
        ] {
            fs::write(d.join(f), v).unwrap();
        }
        let s = g.stats();
        assert_eq!(
            s,
            ResourceStats {
                memory_current: Some(1 << 20),
                memory_peak: Some(2 << 20),
                memory_limit: Some(32 << 20),
                cpu_usage_usec: Some(1500),
                cpu_throttled_periods: Some(4),
                cpu_throttled_usec: Some(7000),
                pids_current: Some(3),
                pids_max: Some(16),
                oom_kills: 1,
            }
        );

        // A policy reload changes the live group.
        let tighter = CgroupLimits {
            memory_bytes: 16 << 20,
            pids_max: 8,
            cpu_micros_per_sec: 250_000,
        };
        g.set_limits(&tighter).unwrap();
        assert_eq!(
            fs::read_to_string(d.join("memory.max")).unwrap(),
            "16777216"
        );
        assert_eq!(fs::read_to_string(d.join("pids.max")).unwrap(), "8");
        assert_eq!(
            fs::read_to_string(d.join("cpu.max")).unwrap(),
            "25000 100000"
        );
        assert_eq!(g.limits(), tighter);
    }

    #[test]
    fn a_refused_live_update_keeps_the_old_limits() {
        let (t, host) = fake_v1();
        let base = host.base("corral-2").unwrap();
        let limits = CgroupLimits {
            memory_bytes: 64 << 20,
            pids_max: 32,
            cpu_micros_per_sec: 1_000_000,
        };
        let g = base.create("p-1", &limits).unwrap();
        // Stand-in for the kernel refusing the write: the file cannot be opened.
        let mem = t
            .path()
            .join("memory/outer/corral-2/p-1/memory.limit_in_bytes");
        fs::remove_file(&mem).unwrap();
        fs::create_dir(&mem).unwrap();
        let e = g
            .set_limits(&CgroupLimits {
                memory_bytes: 1 << 20,
                ..limits.clone()
            })
            .unwrap_err();
        assert!(e.to_string().contains("memory.limit_in_bytes"), "{e}");
        assert_eq!(g.limits(), limits);
    }

    #[test]
    fn no_controllers_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("self"), "0::/\n").unwrap();
        let host = CgroupHost {
            root: t.path().to_owned(),
            self_cgroup: t.path().join("self"),
        };
        let e = host.base("x").unwrap_err();
        assert!(
            e.to_string().starts_with("no usable cgroup controllers"),
            "{e}"
        );
    }
}
