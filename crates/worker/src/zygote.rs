//! A zygote template: a worker process whose engine is set up ([`Engine::warm`]) and
//! that holds no plugin. It forks one worker for each request the supervisor sends
//! on its control socket, reaps its children and reports how each ended; it ends
//! when the supervisor closes the socket and its last child has been reaped.
//!
//! A forked child leaves the loop: it restores the signal mask, applies the same
//! [`ChildSetup`] as a worker the supervisor forks itself (cgroup first, the
//! level's namespaces, its own descriptors and no others, rlimits), takes the
//! environment the supervisor sent, and goes on like any worker: isolation,
//! Landlock and seccomp, the handshake. The template runs no plugin code and never
//! answers a worker: the control socket is gone from every child before it runs
//! anything else.

use crate::Engine;
use corral_confine::Level;
use corral_confine::child::ChildSetup;
use corral_protocol::template::{ForkRequest, FromTemplate, MAX_TEMPLATE_DATAGRAM};
use corral_protocol::{WORKER_SOCKET_FD, frame};
use sendfd::{RecvWithFd, SendWithFd};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;

/// Serve fork requests. `Ok` in a forked worker (set up, environment replaced);
/// `Err(code)` when the template itself ends.
pub(crate) fn serve_template(engine: &mut impl Engine) -> Result<(), ExitCode> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_GETFD) } < 0 {
        eprintln!("corral template: no control socket at fd {WORKER_SOCKET_FD}");
        return Err(ExitCode::from(crate::EXIT_PROTOCOL));
    }
    // SAFETY: the supervisor placed the socket at fd 3 for this process, and it is
    // taken exactly once, here.
    let ctl = UnixDatagram::from(unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) });
    let signals = match Signals::block_children() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corral template: cannot watch its children: {e}");
            return Err(ExitCode::from(crate::EXIT_PROTOCOL));
        }
    };
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let mut children = 0usize;
    let mut open = true;
    let mut buf = vec![0u8; MAX_TEMPLATE_DATAGRAM];
    loop {
        reap(&ctl, &mut children);
        if !open && children == 0 {
            return Err(ExitCode::SUCCESS);
        }
        let mut polled = [
            libc::pollfd {
                fd: signals.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if open { ctl.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll on two pollfds this function owns.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if polled[0].revents != 0 {
            signals.drain();
        }
        if !open || polled[1].revents == 0 {
            continue;
        }
        let mut fds = [-1 as RawFd; 3];
        let (n, k) = match ctl.recv_with_fd(&mut buf, &mut fds) {
            Ok((0, _)) => {
                open = false;
                continue;
            }
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                open = false;
                continue;
            }
        };
        // SAFETY: the kernel just made these descriptors for this process.
        let fds: Vec<OwnedFd> = fds[..k]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let request = match decode(&buf[..n], fds.len()) {
            Ok(r) => r,
            Err(why) => {
                answer(
                    &ctl,
                    &FromTemplate::ForkFailed {
                        errno: libc::EINVAL,
                        message: why,
                    },
                    None,
                );
                continue;
            }
        };
        if let Some(n) = threads().filter(|&n| n != 1) {
            // fork() copies only the calling thread: whatever another one holds
            // would stay locked in the child.
            let message = format!("the template has {n} threads; it forks only with one");
            answer(
                &ctl,
                &FromTemplate::ForkFailed {
                    errno: libc::EDEADLK,
                    message,
                },
                None,
            );
            continue;
        }
        engine.before_fork();
        // SAFETY: the process is single-threaded (checked above); the child goes on
        // with a copy of this one and sets itself up before anything else.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            engine.after_fork(true);
            become_worker(engine, &request, &fds, me, &signals.old);
            // The set-up closed what these held (and fd 3 is now the worker's
            // socket): dropping them would close numbers that are no longer theirs.
            std::mem::forget(fds);
            std::mem::forget(signals);
            std::mem::forget(ctl);
            return Ok(());
        }
        engine.after_fork(false);
        drop(fds);
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            let errno = e.raw_os_error().unwrap_or(libc::EAGAIN);
            answer(
                &ctl,
                &FromTemplate::ForkFailed {
                    errno,
                    message: e.to_string(),
                },
                None,
            );
            continue;
        }
        children += 1;
        // SAFETY: pidfd_open on a child this process has not reaped: it names that
        // child and no other.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: not reaped yet, so the pid is still this child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let errno = e.raw_os_error().unwrap_or(libc::ENOSYS);
            let message = format!("pidfd_open: {e}");
            answer(&ctl, &FromTemplate::ForkFailed { errno, message }, None);
            continue;
        }
        // SAFETY: just made, owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        answer(
            &ctl,
            &FromTemplate::Forked { pid: pid as u32 },
            Some(&pidfd),
        );
    }
}

/// The request in a datagram that came with `fds` descriptors.
fn decode(datagram: &[u8], fds: usize) -> Result<ForkRequest, String> {
    if fds != 3 {
        return Err(format!("a fork request carries 3 descriptors, not {fds}"));
    }
    let payload = datagram
        .get(4..)
        .filter(|p| datagram[..4] == (p.len() as u32).to_le_bytes())
        .ok_or("a fork request is one whole frame")?;
    frame::decode(payload).map_err(|e| format!("a bad fork request: {e}"))
}

fn answer(ctl: &UnixDatagram, msg: &FromTemplate, fd: Option<&OwnedFd>) {
    let Ok(bytes) = frame::encode(msg) else {
        return;
    };
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    // A supervisor that stopped listening closes the socket, which ends the loop.
    let _ = ctl.send_with_fd(&bytes, &fds);
}

/// Reap every child that has ended and say how.
fn reap(ctl: &UnixDatagram, children: &mut usize) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status it is given.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        *children = children.saturating_sub(1);
        answer(
            ctl,
            &FromTemplate::Exited {
                pid: pid as u32,
                status,
            },
            None,
        );
    }
}

/// Threads of this process, from `/proc/self/stat`.
fn threads() -> Option<usize> {
    let stat = std::fs::read("/proc/self/stat").ok()?;
    let stat = String::from_utf8_lossy(&stat);
    // Fields after the command (which may hold spaces) in parentheses; the 20th
    // field of the line is the 18th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(17)?.parse().ok()
}

/// SIGCHLD as a readable descriptor, and the mask the template started with.
struct Signals {
    fd: OwnedFd,
    old: libc::sigset_t,
}

impl Signals {
    fn block_children() -> std::io::Result<Signals> {
        // SAFETY: sigset operations on local sets; sigprocmask and signalfd on this
        // single-threaded process.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            if libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
                old,
            })
        }
    }

    fn drain(&self) {
        let mut info = [0u8; 128];
        // SAFETY: reads into a local buffer from a non-blocking signalfd.
        while unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) } > 0 {
        }
    }
}

/// In the child: set up as the request says, or end with why on the worker's
/// stderr. Returns only when the child is ready to go on as a worker.
fn become_worker(
    engine: &impl Engine,
    request: &ForkRequest,
    fds: &[OwnedFd],
    template: libc::pid_t,
    mask: &libc::sigset_t,
) {
    // SAFETY: restores the mask this process started with (workers see SIGCHLD).
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) };
    let fail = |why: String| -> ! {
        eprintln!("corral worker: set-up after fork failed: {why}");
        // SAFETY: _exit ends this process without running the template's exit
        // handlers (nothing of the template is the worker's to finish).
        unsafe { libc::_exit(i32::from(crate::EXIT_CONFINE_FAILED)) }
    };
    let level: Level = request
        .level
        .parse()
        .unwrap_or_else(|e| fail(format!("{e}")));
    let procs: Vec<CString> = request
        .cgroup_join
        .iter()
        .map(|p| CString::new(p.as_bytes()).unwrap_or_else(|_| fail(format!("bad path {p:?}"))))
        .collect();
    let mut keep = engine.kept_fds();
    keep.sort_unstable();
    let setup = ChildSetup {
        socket: fds[0].as_raw_fd(),
        stdio: Some([fds[1].as_raw_fd(), fds[2].as_raw_fd()]),
        parent: template,
        level,
        cgroup_join: &procs,
        artifact: None,
        zygote_keep: Some(&keep),
    };
    // SAFETY: a freshly forked, single-threaded child; every descriptor named is open.
    if let Err(e) = unsafe { setup.apply() } {
        fail(e.to_string());
    }
    let old: Vec<std::ffi::OsString> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in old {
        // SAFETY: single-threaded (a fresh child), so no other thread reads the
        // environment while it changes.
        unsafe { std::env::remove_var(k) };
    }
    for (k, v) in &request.env {
        // SAFETY: as above.
        unsafe { std::env::set_var(k, v) };
    }
}
