//! What a new worker process does to itself first, before its engine runs: join the
//! plugin's cgroup, enter the namespaces the level gives every worker (network, IPC,
//! UTS), die with its parent, take its descriptors at the numbers the protocol fixes
//! and nothing else, and take the rlimits every worker has.
//!
//! Two kinds of process run it: a child the supervisor forked and is about to exec
//! (from `pre_exec`, so it makes only async-signal-safe system calls and allocates
//! nothing), and a child a zygote template forked, which is not followed by an exec
//! and so closes, rather than marks, every descriptor it does not keep.

use crate::Level;
use corral_protocol::{ARTIFACT_FD, WORKER_SOCKET_FD};
use std::ffi::CString;
use std::os::fd::RawFd;

/// `RLIMIT_NOFILE` of a worker (soft and hard).
pub const WORKER_MAX_FILES: libc::rlim_t = 256;

/// One child's set-up.
#[derive(Debug, Clone, Copy)]
pub struct ChildSetup<'a> {
    /// The supervisor's socket, placed at [`WORKER_SOCKET_FD`].
    pub socket: RawFd,
    /// Stdout and stderr to place at 1 and 2 (a zygote child; an exec'd child has
    /// them from its spawner).
    pub stdio: Option<[RawFd; 2]>,
    /// The process that forked it: it dies with that one (`PR_SET_PDEATHSIG`).
    pub parent: libc::pid_t,
    pub level: Level,
    /// The files that join the plugin's group, one per hierarchy (`PluginCgroup::join_files`).
    pub cgroup_join: &'a [CString],
    /// A compile helper's artefact file and its largest size.
    pub artifact: Option<(RawFd, u64)>,
    /// A zygote child: close every other descriptor now except these (sorted; the
    /// engine's own, opened in the template), and lead a process group of its own.
    pub zygote_keep: Option<&'a [RawFd]>,
}

impl ChildSetup<'_> {
    /// Apply it to this process.
    ///
    /// # Safety
    /// Call it in a freshly forked child, single-threaded, with every descriptor named
    /// open. It makes only async-signal-safe system calls and does not allocate.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        // SAFETY: each call below is an async-signal-safe system call with plain
        // integer arguments or NUL-terminated paths built before the fork; none
        // touches memory the parent shares.
        unsafe {
            // Stdout and stderr first, so that what fails below is seen.
            if let Some([out, err]) = self.stdio {
                for (from, to) in [(out, 1), (err, 2)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            // Join the plugin's cgroup: nothing after this runs unlimited.
            for path in self.cgroup_join {
                let f = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if f < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(f, b"0".as_ptr().cast(), 1) == 1;
                let err = std::io::Error::last_os_error();
                libc::close(f);
                if !ok {
                    return Err(err);
                }
            }
            // From `high`: own network (no interfaces but a down loopback), IPC and UTS
            // namespaces. At `standard`, its own IPC namespace when the supervisor is
            // root: SysV shared memory, semaphores and message queues (and POSIX ones)
            // would otherwise be shared with every other plugin and outlive the worker.
            // (Needs CAP_SYS_ADMIN, so before the privileges go. A root without it, as
            // in a container that was not given it, starts standard workers without,
            // like an unprivileged supervisor; `status` shows the namespaces each has.)
            let namespaces = if self.level >= Level::High {
                libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS
            } else if libc::geteuid() == 0
                && crate::sys::effective_capabilities() & (1 << crate::caps::CAP_SYS_ADMIN) != 0
            {
                libc::CLONE_NEWIPC
            } else {
                0
            };
            if namespaces != 0 && libc::unshare(namespaces) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != self.parent {
                return Err(std::io::Error::other("the parent exited during spawn"));
            }
            let fd = self.socket;
            if fd == WORKER_SOCKET_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, WORKER_SOCKET_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A compile helper's artefact file at fd 4, and no file of its own larger
            // than the artefact may be (a write past it fails with EFBIG rather than
            // killing it with SIGXFSZ, so the helper can say what happened).
            let mut keep = WORKER_SOCKET_FD;
            if let Some((file, max_bytes)) = self.artifact {
                if libc::dup2(file, ARTIFACT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let size = libc::rlimit {
                    rlim_cur: max_bytes,
                    rlim_max: max_bytes,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &size) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                keep = ARTIFACT_FD;
            }
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            let close_range = |from: RawFd, to: libc::c_uint, flags: libc::c_uint| {
                libc::syscall(libc::SYS_close_range, from as libc::c_uint, to, flags) == 0
            };
            match self.zygote_keep {
                // Everything above closes at exec (marking rather than closing keeps
                // the pipe std uses to report exec errors working).
                None => {
                    if !close_range(keep + 1, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // No exec follows: what the template held (its control socket went
                // with the dup2 onto fd 3) is closed now, but for the engine's own.
                Some(engine) => {
                    let mut from = keep + 1;
                    for &k in engine.iter().filter(|&&k| k > keep) {
                        if k > from && !close_range(from, (k - 1) as libc::c_uint, 0) {
                            return Err(std::io::Error::last_os_error());
                        }
                        from = from.max(k + 1);
                    }
                    if !close_range(from, libc::c_uint::MAX, 0) {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::setpgid(0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            // No core dumps: a plugin's memory may hold other tenants' data.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A bounded descriptor table (an engine needs a few dozen), never above
            // the parent's own hard limit (raising it takes CAP_SYS_RESOURCE).
            let mut own = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let files = libc::rlimit {
                rlim_cur: WORKER_MAX_FILES.min(own.rlim_max),
                rlim_max: WORKER_MAX_FILES.min(own.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &files) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
