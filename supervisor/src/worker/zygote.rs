//! Zygote templates: one worker process per engine binary and isolation level with
//! its engine set up and no plugin, from which workers are forked instead of
//! started from nothing (see `corral_worker`'s `zygote` module for the other side).
//!
//! The supervisor talks to a template over a `SOCK_SEQPACKET` pair that only the two
//! of them hold: a [`ForkRequest`] with the worker's socket, stdout and stderr
//! beside it; the answer is the child's pid with a pidfd beside it, which is how the
//! supervisor signals the child (never by pid: the template reaps it). The template
//! reports each child's wait status ([`FromTemplate::Exited`]); [`Forked`] is the
//! [`Process`] a connection sees, as [`super::process::Spawned`] is for an exec'd one.
//!
//! A template is retired, and a fresh one started for the next fork, after
//! [`MAX_FORKS`] forks or [`MAX_AGE`]: its children share its address-space layout
//! and whatever its engine seeded once (CPython's string hash key), so no layout
//! lives long or is shared by many. A retired template ends once its last child
//! has been reaped. A template that cannot be started or stops answering is not
//! used again for that binary and level: workers are then started as before.

use super::output::{forward_output, shared_budget};
use super::process::{Process, VerifyError, verify_worker};
use super::{BoxFuture, StartError};
use crate::plugins::access::Credentials;
use corral_confine::Level;
use corral_confine::child::ChildSetup;
use corral_protocol::Hello;
use corral_protocol::frame;
use corral_protocol::template::{ForkRequest, FromTemplate, MAX_TEMPLATE_DATAGRAM, TEMPLATE_ENV};
use sendfd::{RecvWithFd, SendWithFd};
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;
use tokio::sync::oneshot;

/// Forks from one template before it is retired.
pub(crate) const MAX_FORKS: u64 = 256;
/// Age at which a template is retired.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(600);
/// How long a template may take to answer a fork (the first one waits for its
/// engine to be set up).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Bytes per second of a template's own output passed to the log.
const TEMPLATE_LOG_RATE: u64 = 16 << 10;

/// The templates of one launcher.
#[derive(Debug, Default)]
pub(crate) struct Templates {
    live: Mutex<HashMap<(PathBuf, Level), Arc<Template>>>,
    /// Binaries and levels whose template failed: started without one.
    broken: Mutex<HashSet<(PathBuf, Level)>>,
    /// Templates started (for `status` and the tests).
    started: AtomicU64,
    /// Workers forked from a template.
    forked: AtomicU64,
}

/// Why a fork from a template did not happen.
#[derive(Debug)]
pub(crate) enum ForkError {
    /// No template to fork from (it could not be started, or broke): start the
    /// worker without one.
    Unavailable(String),
    /// The template's fork failed with this error (a resource ran out).
    Failed(std::io::Error),
}

impl Templates {
    /// Templates started and workers forked so far.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.started.load(Ordering::Relaxed),
            self.forked.load(Ordering::Relaxed),
        )
    }

    /// Fork a worker of `program` at `level` with `request`, its socket `socket` and
    /// its output pipes `stdio`.
    pub(crate) async fn fork(
        &self,
        program: &Path,
        level: Level,
        env: &[(OsString, OsString)],
        request: &ForkRequest,
        socket: &OwnedFd,
        stdio: [&OwnedFd; 2],
    ) -> Result<Forked, ForkError> {
        let key = (program.to_owned(), level);
        if self.lock_broken().contains(&key) {
            return Err(ForkError::Unavailable("its template failed before".into()));
        }
        let template = self.template(&key, env)?;
        let fds = [
            socket.as_raw_fd(),
            stdio[0].as_raw_fd(),
            stdio[1].as_raw_fd(),
        ];
        match template.fork(request, fds).await {
            Ok(f) => {
                self.forked.fetch_add(1, Ordering::Relaxed);
                Ok(f)
            }
            Err(ForkError::Unavailable(why)) => {
                tracing::warn!(
                    program = %program.display(), %level, template = template.pid,
                    "the zygote template stopped answering ({why}); workers of this engine \
                     and level start without one"
                );
                template.retire();
                self.lock_live().remove(&key);
                self.lock_broken().insert(key);
                Err(ForkError::Unavailable(why))
            }
            Err(e) => Err(e),
        }
    }

    /// The live template for `key`, started if there is none or the last one is
    /// due to retire.
    fn template(
        &self,
        key: &(PathBuf, Level),
        env: &[(OsString, OsString)],
    ) -> Result<Arc<Template>, ForkError> {
        let mut live = self.lock_live();
        if let Some(t) = live.get(key) {
            if t.usable() {
                return Ok(Arc::clone(t));
            }
            t.retire();
            live.remove(key);
        }
        let t = Template::start(&key.0, env).map_err(|e| {
            tracing::warn!(
                program = %key.0.display(),
                "cannot start a zygote template ({e}); workers start without one"
            );
            self.lock_broken().insert(key.clone());
            ForkError::Unavailable(e.to_string())
        })?;
        self.started.fetch_add(1, Ordering::Relaxed);
        live.insert(key.clone(), Arc::clone(&t));
        Ok(t)
    }

    /// Retire every template: each ends once its children have.
    pub(crate) fn close(&self) {
        for (_, t) in self.lock_live().drain() {
            t.retire();
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<(PathBuf, Level), Arc<Template>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_broken(&self) -> std::sync::MutexGuard<'_, HashSet<(PathBuf, Level)>> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the reader hands a fork's requester.
enum Answer {
    Forked {
        pid: u32,
        pidfd: OwnedFd,
        exit: oneshot::Receiver<i32>,
    },
    Failed(std::io::Error),
}

#[derive(Debug)]
struct Template {
    pid: u32,
    socket: Arc<UnixDatagram>,
    /// One request at a time: answers come back in order.
    turn: tokio::sync::Mutex<()>,
    state: Arc<Mutex<Shared>>,
    forks: AtomicU64,
    born: Instant,
}

/// What the reader task and the requesters share.
#[derive(Default)]
struct Shared {
    answer: Option<oneshot::Sender<Answer>>,
    exits: HashMap<u32, oneshot::Sender<i32>>,
    retired: bool,
    gone: bool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("children", &self.exits.len())
            .field("retired", &self.retired)
            .field("gone", &self.gone)
            .finish()
    }
}

impl Template {
    fn start(program: &Path, env: &[(OsString, OsString)]) -> std::io::Result<Arc<Template>> {
        let (ours, theirs) = seqpacket_pair()?;
        let mut cmd = super::spawn::worker_command(program, env);
        cmd.env(TEMPLATE_ENV, "1");
        let fd = theirs.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: `ChildSetup::apply` makes only async-signal-safe system calls and
        // allocates nothing (see the worker spawn).
        unsafe {
            cmd.pre_exec(move || {
                ChildSetup {
                    socket: fd,
                    stdio: None,
                    parent,
                    level: Level::Standard,
                    cgroup_join: &[],
                    artifact: None,
                    zygote_keep: None,
                }
                .apply()
            });
        }
        let mut child = cmd.spawn()?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        let name = format!("zygote template {}", program.display());
        let budget = shared_budget(TEMPLATE_LOG_RATE);
        if let Some(s) = child.stdout.take() {
            let budget = Arc::clone(&budget);
            tokio::spawn(forward_output(
                s,
                name.clone(),
                "stdout",
                None,
                budget,
                None,
            ));
        }
        if let Some(s) = child.stderr.take() {
            tokio::spawn(forward_output(s, name, "stderr", None, budget, None));
        }
        let socket = Arc::new(UnixDatagram::from_std(ours)?);
        let state = Arc::new(Mutex::new(Shared::default()));
        tokio::spawn(read_answers(Arc::clone(&socket), Arc::clone(&state), child));
        Ok(Arc::new(Template {
            pid,
            socket,
            turn: tokio::sync::Mutex::new(()),
            state,
            forks: AtomicU64::new(0),
            born: Instant::now(),
        }))
    }

    fn usable(&self) -> bool {
        let s = lock(&self.state);
        !s.gone
            && !s.retired
            && self.forks.load(Ordering::Relaxed) < MAX_FORKS
            && self.born.elapsed() < MAX_AGE
    }

    fn retire(&self) {
        let mut s = lock(&self.state);
        s.retired = true;
        if s.exits.is_empty() {
            // Nothing to wait for: the template sees the end of its socket.
            let _ = self.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    async fn fork(&self, request: &ForkRequest, fds: [RawFd; 3]) -> Result<Forked, ForkError> {
        let unavailable = |why: String| ForkError::Unavailable(why);
        let _turn = self.turn.lock().await;
        self.forks.fetch_add(1, Ordering::Relaxed);
        let bytes = frame::encode(request).map_err(|e| unavailable(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut s = lock(&self.state);
            if s.gone {
                return Err(unavailable("the template has exited".into()));
            }
            s.answer = Some(tx);
        }
        loop {
            self.socket
                .writable()
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            match self.socket.send_with_fd(&bytes, &fds) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(unavailable(format!("sending to the template: {e}"))),
            }
        }
        match tokio::time::timeout(ANSWER_WITHIN, rx).await {
            Ok(Ok(Answer::Forked { pid, pidfd, exit })) => Ok(Forked {
                pid,
                pidfd,
                exit: Some(exit),
                status: None,
                run_as: None,
            }),
            // A resource ran out (the supervisor's limit, as for exec); anything
            // else (no pidfd_open on this kernel, a template that grew a thread)
            // means this template cannot serve: start by exec instead.
            Ok(Ok(Answer::Failed(e))) if super::exhausted(&e).is_some() => {
                Err(ForkError::Failed(e))
            }
            Ok(Ok(Answer::Failed(e))) => Err(unavailable(format!("the template's fork: {e}"))),
            Ok(Err(_)) => Err(unavailable("the template has exited".into())),
            Err(_) => Err(unavailable(format!("no answer within {ANSWER_WITHIN:?}"))),
        }
    }
}

fn lock(s: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec; ours non-blocking).
fn seqpacket_pair() -> std::io::Result<(std::os::unix::net::UnixDatagram, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair fills the two-element array it is given.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just made and are owned by nothing else.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let ours = std::os::unix::net::UnixDatagram::from(ours);
    ours.set_nonblocking(true)?;
    Ok((ours, theirs))
}

/// The template's answers and its children's exits, until it ends (or is retired
/// and its last child has been reaped). Owns the template's process.
async fn read_answers(
    socket: Arc<UnixDatagram>,
    state: Arc<Mutex<Shared>>,
    mut child: tokio::process::Child,
) {
    let mut buf = vec![0u8; MAX_TEMPLATE_DATAGRAM];
    loop {
        let got = tokio::select! {
            r = socket.readable() => r.and_then(|()| {
                let mut fds = [-1 as RawFd; 1];
                socket.recv_with_fd(&mut buf, &mut fds).map(|(n, k)| (n, fds, k))
            }),
            _ = child.wait() => Ok((0, [-1], 0)),
        };
        let (n, fds, k) = match got {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => (0, [-1], 0),
        };
        // SAFETY: the kernel just made it for this process.
        let fd = (k == 1).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
        if let Some(fd) = &fd {
            // SAFETY: plain fcntl on a descriptor this task owns.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        if n == 0 {
            break;
        }
        let msg = buf[..n]
            .get(4..)
            .and_then(|p| frame::decode::<FromTemplate>(p).ok());
        let mut s = lock(&state);
        match (msg, fd) {
            (Some(FromTemplate::Forked { pid }), Some(pidfd)) => {
                let (tx, exit) = oneshot::channel();
                s.exits.insert(pid, tx);
                if let Some(a) = s.answer.take() {
                    let _ = a.send(Answer::Forked { pid, pidfd, exit });
                }
            }
            (Some(FromTemplate::Forked { pid }), None) => {
                // Forked, but the child's pidfd did not reach this process: it is
                // out of descriptors (the kernel drops a passed descriptor it has
                // no room for). The start fails as at any EMFILE, and drops the
                // child's socket: the child, which has run no plugin code, ends
                // at its end of file, and its exit is the template's to reap.
                tracing::warn!(
                    pid,
                    "a forked worker's pidfd did not arrive: this process is out of descriptors"
                );
                if let Some(a) = s.answer.take() {
                    let _ = a.send(Answer::Failed(std::io::Error::from_raw_os_error(
                        libc::EMFILE,
                    )));
                }
            }
            (Some(FromTemplate::ForkFailed { errno, message }), _) => {
                let e = std::io::Error::from_raw_os_error(errno);
                tracing::debug!("zygote template could not fork: {message}");
                if let Some(a) = s.answer.take() {
                    let _ = a.send(Answer::Failed(e));
                }
            }
            (Some(FromTemplate::Exited { pid, status }), _) => {
                if let Some(tx) = s.exits.remove(&pid) {
                    let _ = tx.send(status);
                }
                if s.retired && s.exits.is_empty() {
                    let _ = socket.shutdown(std::net::Shutdown::Both);
                }
            }
            _ => {
                tracing::warn!("zygote template sent a bad answer; it is stopped");
                break;
            }
        }
    }
    {
        let mut s = lock(&state);
        s.gone = true;
        // Requesters and waiters hear that it is gone (their senders drop).
        s.answer = None;
        s.exits.clear();
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A worker forked from a template.
#[derive(Debug)]
pub(crate) struct Forked {
    pid: u32,
    pidfd: OwnedFd,
    exit: Option<oneshot::Receiver<i32>>,
    status: Option<ExitStatus>,
    run_as: Option<Credentials>,
}

impl Forked {
    pub(crate) fn with_run_as(mut self, run_as: Option<Credentials>) -> Forked {
        self.run_as = run_as;
        self
    }

    fn kill(&self) {
        // SAFETY: pidfd_send_signal on the pidfd this value owns: it names this
        // worker even after the template has reaped it (then it fails with ESRCH).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

impl Process for Forked {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn verify(&self, hello: &mut Hello) -> Result<(), VerifyError> {
        verify_worker(self.pid, self.run_as, hello)
    }

    fn start_kill(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(rx) = &mut self.exit
            && let Ok(s) = rx.try_recv()
        {
            self.status = Some(ExitStatus::from_raw(s));
            self.exit = None;
        }
        self.status
    }

    fn wait(&mut self) -> BoxFuture<'_, Option<ExitStatus>> {
        Box::pin(async move {
            // Polled in place: a wait cancelled by a timeout keeps the receiver.
            if let Some(rx) = &mut self.exit {
                self.status = rx.await.ok().map(ExitStatus::from_raw);
                self.exit = None;
            }
            self.status
        })
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        // As `kill_on_drop` for an exec'd worker.
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// What a start through a template needs of the worker's spec, or `None` when it
/// cannot be said in a request (an environment that is not UTF-8).
pub(crate) fn request(
    env: &[(OsString, OsString)],
    level: Level,
    procs: &[std::ffi::CString],
) -> Option<ForkRequest> {
    let env = env
        .iter()
        .map(|(k, v)| Some((k.clone().into_string().ok()?, v.clone().into_string().ok()?)))
        .collect::<Option<Vec<_>>>()?;
    let cgroup_join = procs
        .iter()
        .map(|p| p.clone().into_string().ok())
        .collect::<Option<Vec<_>>>()?;
    Some(ForkRequest {
        env,
        level: level.as_str().to_owned(),
        cgroup_join,
    })
}

/// A pipe for a worker's output: the read end (ours) and the write end (theirs).
pub(crate) fn output_pipe() -> std::io::Result<(tokio::net::unix::pipe::Receiver, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just made and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((tokio::net::unix::pipe::Receiver::from_owned_fd(r)?, w))
}

/// `StartError` for a template's failed fork.
pub(crate) fn fork_failed(program: &Path, e: std::io::Error) -> StartError {
    match super::exhausted(&e) {
        Some(o) => StartError::Overloaded(o),
        None => StartError::Spawn {
            program: program.to_owned(),
            source: e,
        },
    }
}
