//! One worker process: spawning it, the handshake, and the connection task that
//! routes its answers.
//!
//! # Spawn path
//!
//! 1. A `socketpair` is created; the worker's end is placed at fd 3 in the child, so
//!    there is no address anyone else could dial and no token to steal.
//! 2. The child gets a cleared environment (an allow-list), stdin from `/dev/null`,
//!    stdout/stderr piped to the supervisor's log, its own process group, and a
//!    parent-death signal (SIGKILL); every other inherited fd is marked close-on-exec.
//!    Kernel confinement that must be applied before `exec` (cgroup placement,
//!    namespaces, uid/gid, rlimits) belongs in [`child_setup`], after these steps.
//! 3. The worker initialises its engine, confines itself, and sends its handshake;
//!    the supervisor checks magic, version and worker kind, then sends `Load`.
//!
//! Once loaded, one task per worker owns the child and the read half: it routes
//! `CallResult`s to waiting callers, answers host calls, forwards logs, and when the
//! worker goes away fails every call still in flight with
//! [`CallError::WorkerCrashed`] carrying the exit code or signal.

use crate::supervisor::Core;
use corral_confine::cgroup::PluginCgroup;
use corral_confine::{CONFINE_ENV, Level, SelfConfinement};
use corral_protocol::{
    CallError, ExitReason, FromWorker, Hello, HostError, LoadSpec, LogLevel, RequestId, ToWorker,
    WORKER_SOCKET_ENV, WORKER_SOCKET_FD, WorkerKind,
    frame::{self, FrameError},
};
use std::collections::HashMap;
use std::ffi::CString;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc, oneshot};

/// Everything needed to start one worker.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: PathBuf,
    pub kind: WorkerKind,
    pub plugin_id: String,
    /// Variables passed through; the rest of the environment is cleared.
    pub env: Vec<(OsString, OsString)>,
    pub handshake_timeout: Duration,
    /// How long past a call's deadline the supervisor waits before killing the worker.
    pub kill_grace: Duration,
    /// What the worker must apply to itself before it accepts plugin code.
    pub confine: SelfConfinement,
    /// The worker's cgroup, joined between fork and exec.
    pub cgroup: Option<Arc<PluginCgroup>>,
    /// Why there is no cgroup (reported in the handshake's enforcement).
    pub cgroup_unavailable: Option<String>,
    /// Performs the worker's host calls and hears how it ended.
    pub broker: Weak<Core>,
    /// The plugin's secrets, cut out of everything it logs.
    pub redactor: Redactor,
    /// The version's files, kept while the worker lives.
    pub files: Option<PluginFiles>,
}

/// The copy of a plugin version's files that a worker reads, and the plugin
/// directory it was copied from, which messages name instead of the copy.
#[derive(Debug, Clone)]
pub struct PluginFiles {
    pub snapshot: Arc<crate::versions::Snapshot>,
    pub dir: PathBuf,
}

impl PluginFiles {
    /// `text` with the copy's path replaced by the plugin directory's.
    fn shown(&self, text: String) -> String {
        let copy = self.snapshot.path().to_string_lossy();
        if text.contains(copy.as_ref()) {
            text.replace(copy.as_ref(), &self.dir.to_string_lossy())
        } else {
            text
        }
    }

    /// Error messages (tracebacks, traps) with the plugin directory's path.
    fn shown_error(&self, e: CallError) -> CallError {
        match e {
            CallError::Trap { message } => CallError::Trap {
                message: self.shown(message),
            },
            CallError::Plugin { message } => CallError::Plugin {
                message: self.shown(message),
            },
            other => other,
        }
    }
}

/// Replaces a plugin's secret values in text with `[secret NAME]`. Its `Debug`
/// shows only how many secrets it holds.
#[derive(Clone, Default)]
pub struct Redactor(Arc<Vec<(String, String)>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.0.len())
    }
}

impl Redactor {
    /// From `(name, value)` pairs; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = (String, String)>) -> Redactor {
        let mut v: Vec<(String, String)> =
            secrets.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        // Longest first, so a secret that contains another is replaced whole.
        v.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        Redactor(Arc::new(v))
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (name, value) in self.0.iter() {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("[secret {name}]"));
            }
        }
        out
    }
}

/// What a call is part of: the plugins waiting on it (outermost first, this plugin
/// last) and when it must be done.
#[derive(Debug, Clone)]
pub struct CallCtx {
    pub chain: Arc<[String]>,
    pub deadline: Instant,
}

/// A uid/gid pair a worker runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start worker {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the worker socket")]
    Socket(#[source] std::io::Error),
    #[error("worker {exit} before its handshake{}", stderr_tail(.stderr))]
    DiedEarly { exit: ExitReason, stderr: String },
    #[error("worker sent no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("bad handshake")]
    Handshake(#[source] FrameError),
    #[error("worker is a {got} worker, expected {expected}")]
    WrongKind {
        expected: WorkerKind,
        got: WorkerKind,
    },
    #[error("plugin failed to load: {0}")]
    LoadFailed(String),
    /// The isolation level cannot be enforced here; nothing was started.
    #[error("refused: {0}")]
    Refused(String),
}

fn stderr_tail(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

type Reply = oneshot::Sender<Result<Vec<u8>, CallError>>;

#[derive(Debug, Default)]
struct Pending {
    calls: HashMap<RequestId, Reply>,
    /// The context of each call in `calls`, for the host calls it makes.
    contexts: HashMap<RequestId, CallCtx>,
    /// Set once the worker is gone; new calls fail at once with it.
    closed: Option<ExitReason>,
    /// Set when the worker is being retired (a new version took over): it finishes
    /// the calls it has and takes no more.
    retiring: bool,
}

/// A running worker. Cheap to share; dropping the last handle kills the process.
#[derive(Debug)]
pub struct WorkerHandle {
    pub pid: u32,
    pub hello: Hello,
    pub exports: Vec<String>,
    plugin_id: String,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    kill: Arc<Notify>,
    killed_by_supervisor: Arc<AtomicBool>,
    /// Why the supervisor killed it, when not for a missed deadline.
    kill_reason: Arc<Mutex<Option<String>>>,
    shutting_down: Arc<AtomicBool>,
    exited: Arc<Notify>,
    kill_grace: Duration,
    /// Kept (not read) while the worker lives: its version's files.
    files: Option<PluginFiles>,
}

fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn lock_reason(r: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerHandle {
    /// Start a worker, complete the handshake and load the plugin.
    pub async fn start(spec: &SpawnSpec, load: LoadSpec) -> Result<Arc<WorkerHandle>, StartError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Socket)?;
        let mut cmd = Command::new(&spec.program);
        cmd.env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env(WORKER_SOCKET_ENV, WORKER_SOCKET_FD.to_string())
            .env(CONFINE_ENV, spec.confine.to_env_value())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let fd = theirs.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let level = spec.confine.level;
        let procs: Vec<CString> = spec.cgroup.iter().flat_map(|g| g.procs_files()).collect();
        // SAFETY: `child_setup` only makes async-signal-safe system calls (prctl,
        // getppid, dup2, fcntl, close_range, open, write, close, setrlimit, unshare)
        // and allocates nothing (`procs` was built before the fork).
        unsafe {
            cmd.pre_exec(move || child_setup(fd, parent, level, &procs));
        }
        let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        drop(theirs);
        let pid = child.id().unwrap_or(0);
        ours.set_nonblocking(true).map_err(StartError::Socket)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(StartError::Socket)?;
        let (mut rd, mut wr) = stream.into_split();

        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let tail = Arc::new(StderrTail::default());
        if let Some(s) = stdout {
            tokio::spawn(forward_output(s, spec.plugin_id.clone(), "stdout", None));
        }
        if let Some(s) = stderr {
            let keep = Some(Arc::clone(&tail));
            tokio::spawn(forward_output(s, spec.plugin_id.clone(), "stderr", keep));
        }

        let hello = match handshake(&mut rd, &mut child, spec.handshake_timeout).await {
            Ok(h) => h,
            Err(HandshakeFailure::Died(exit)) => {
                let stderr = tail.wait_closed().await;
                let exit = explain_exit(exit, &stderr);
                if let Some(g) = &spec.cgroup {
                    remove_when_empty(Arc::clone(g));
                }
                return Err(StartError::DiedEarly { exit, stderr });
            }
            Err(HandshakeFailure::Other(e)) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(e);
            }
        };
        let mut hello = hello;
        // Namespaces and credentials are checked from outside: an unprivileged worker
        // cannot read the supervisor's /proc entries to compare, and a worker that
        // did not drop root gets no plugin.
        hello.enforcement.namespaces = corral_confine::worker_namespaces(pid);
        // `confine.run_as`: the unprivileged uid/gid the worker was told to become
        // first thing (when the supervisor is root).
        if let Some([uid, gid]) = spec.confine.run_as
            && let Err(why) = check_credentials(pid, Credentials { uid, gid })
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(StartError::Refused(why));
        }
        if let Some(g) = &spec.cgroup {
            hello.enforcement.cgroup = g.report();
        } else if let Some(why) = &spec.cgroup_unavailable {
            hello.enforcement.cgroup = corral_protocol::Enforcement::None(why.clone());
        }
        if hello.kind != spec.kind {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(StartError::WrongKind {
                expected: spec.kind,
                got: hello.kind,
            });
        }

        // Load: the worker answers Loaded or LoadFailed (and exits).
        let init_deadline = Duration::from_millis(load.limits.init_deadline_ms);
        let load_frame = frame::encode(&ToWorker::Load(load)).map_err(StartError::Handshake)?;
        let loaded = async {
            wr.write_all(&load_frame).await.map_err(FrameError::Io)?;
            loop {
                match read_frame::<FromWorker>(&mut rd).await? {
                    FromWorker::Loaded { exports } => return Ok(Ok(exports)),
                    FromWorker::LoadFailed { error } => return Ok(Err(error)),
                    FromWorker::Log { level, message } => {
                        log_line(&spec.plugin_id, level, &spec.redactor.redact(&message))
                    }
                    // Host calls from `init`: answered in line.
                    FromWorker::HostCall { id, op, .. } => {
                        let ctx = CallCtx {
                            chain: Arc::from(vec![spec.plugin_id.clone()]),
                            deadline: Instant::now() + init_deadline,
                        };
                        let result = match spec.broker.upgrade() {
                            Some(core) => core.host_call(&spec.plugin_id, ctx, op).await,
                            None => Err(HostError::Failed("the supervisor is gone".into())),
                        };
                        let f = frame::encode(&ToWorker::HostResult { id, result })?;
                        wr.write_all(&f).await.map_err(FrameError::Io)?;
                    }
                    other => {
                        return Err(FrameError::Decode(format!(
                            "unexpected {other:?} while loading"
                        )));
                    }
                }
            }
        };
        let exports = match loaded.await {
            Ok(Ok(exports)) => exports,
            Ok(Err(error)) => {
                let _ = child.wait().await;
                return Err(StartError::LoadFailed(match &spec.files {
                    Some(f) => f.shown(error),
                    None => error,
                }));
            }
            Err(e) => {
                let status = match child.try_wait() {
                    Ok(Some(s)) => Some(s),
                    _ if matches!(e, FrameError::Decode(_)) => None,
                    // The socket broke: the worker is probably dying; see how.
                    _ => tokio::time::timeout(Duration::from_millis(500), child.wait())
                        .await
                        .ok()
                        .and_then(Result::ok),
                };
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(match status {
                    Some(s) => {
                        let stderr = tail.wait_closed().await;
                        StartError::DiedEarly {
                            exit: explain_exit(exit_reason(s), &stderr),
                            stderr,
                        }
                    }
                    None => StartError::Handshake(e),
                });
            }
        };

        let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let handle = Arc::new(WorkerHandle {
            pid,
            hello,
            exports,
            plugin_id: spec.plugin_id.clone(),
            tx: tx.clone(),
            pending: Arc::new(Mutex::new(Pending::default())),
            next_id: AtomicU64::new(1),
            kill: Arc::new(Notify::new()),
            killed_by_supervisor: Arc::new(AtomicBool::new(false)),
            kill_reason: Arc::new(Mutex::new(None)),
            shutting_down: Arc::new(AtomicBool::new(false)),
            exited: Arc::new(Notify::new()),
            kill_grace: spec.kill_grace,
            files: spec.files.clone(),
        });
        tokio::spawn(write_frames(wr, rx));
        tokio::spawn(
            Connection {
                broker: spec.broker.clone(),
                redactor: spec.redactor.clone(),
                level: spec.confine.level,
                killed_by_supervisor: Arc::clone(&handle.killed_by_supervisor),
                kill_reason: Arc::clone(&handle.kill_reason),
                plugin_id: spec.plugin_id.clone(),
                cgroup: spec.cgroup.clone(),
                tail,
                pending: Arc::clone(&handle.pending),
                kill: Arc::clone(&handle.kill),
                shutting_down: Arc::clone(&handle.shutting_down),
                exited: Arc::clone(&handle.exited),
                tx,
            }
            .run(rd, child),
        );
        Ok(handle)
    }

    /// Whether the worker process is still serving.
    pub fn is_alive(&self) -> bool {
        lock(&self.pending).closed.is_none()
    }

    /// How the worker ended, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        lock(&self.pending).closed.clone()
    }

    /// Whether the supervisor killed this worker itself (deadline backstop), as
    /// opposed to the worker crashing.
    pub fn killed_by_supervisor(&self) -> bool {
        self.killed_by_supervisor.load(Ordering::SeqCst)
    }

    /// Run `function`. Ends in a result or a typed error, always: if the worker does
    /// not answer by `deadline` plus the kill grace, it is killed and the call gets
    /// [`CallError::Timeout`].
    pub async fn call(
        &self,
        function: &str,
        input: Vec<u8>,
        deadline: Duration,
        chain: Arc<[String]>,
    ) -> Result<Vec<u8>, CallError> {
        self.try_call(function, input, deadline, chain)
            .await
            .unwrap_or(Err(CallError::ShuttingDown))
    }

    /// [`WorkerHandle::call`], or the input back, with nothing sent, when the worker
    /// is being retired (the caller routes the call to the plugin's new worker).
    pub async fn try_call(
        &self,
        function: &str,
        input: Vec<u8>,
        deadline: Duration,
        chain: Arc<[String]>,
    ) -> Result<Result<Vec<u8>, CallError>, Vec<u8>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline_ms = deadline.as_millis() as u64;
        let (reply, answer) = oneshot::channel();
        {
            // Registered before it is sent: `retire` waits for every registered call.
            let mut p = lock(&self.pending);
            if p.retiring {
                return Err(input);
            }
            if let Some(reason) = &p.closed {
                return Ok(Err(CallError::WorkerCrashed(reason.clone())));
            }
            p.calls.insert(id, reply);
            p.contexts.insert(
                id,
                CallCtx {
                    chain,
                    deadline: Instant::now() + deadline,
                },
            );
        }
        let msg = ToWorker::Call {
            id,
            function: function.to_owned(),
            input,
            deadline_ms,
        };
        let frame = match frame::encode(&msg) {
            Ok(f) => f,
            Err(e) => {
                let mut p = lock(&self.pending);
                p.calls.remove(&id);
                p.contexts.remove(&id);
                return Ok(Err(CallError::BadInput {
                    reason: e.to_string(),
                }));
            }
        };
        // If the writer is gone the connection task fails the pending call for us.
        let _ = self.tx.send(frame);
        Ok(
            match tokio::time::timeout(deadline + self.kill_grace, answer).await {
                Ok(Ok(result)) => match &self.files {
                    Some(f) => result.map_err(|e| f.shown_error(e)),
                    None => result,
                },
                Ok(Err(_)) => Err(CallError::WorkerCrashed(ExitReason::Unknown)),
                Err(_) => {
                    let mut p = lock(&self.pending);
                    p.calls.remove(&id);
                    p.contexts.remove(&id);
                    drop(p);
                    tracing::warn!(
                        plugin = %self.plugin_id,
                        pid = self.pid,
                        "worker did not answer within its deadline; killing it"
                    );
                    self.killed_by_supervisor.store(true, Ordering::SeqCst);
                    self.kill.notify_one();
                    Err(CallError::Timeout { deadline_ms })
                }
            },
        )
    }

    /// Whether the worker is being retired.
    pub fn is_retiring(&self) -> bool {
        lock(&self.pending).retiring
    }

    /// Retire the worker: take no new calls, let every call it has finish (each is
    /// bounded by its own deadline and the kill backstop), then shut it down with
    /// `grace` for its shutdown hook.
    pub async fn retire(&self, grace: Duration) {
        lock(&self.pending).retiring = true;
        loop {
            {
                let p = lock(&self.pending);
                if p.calls.is_empty() || p.closed.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown(grace).await;
    }

    /// Ask the worker to run its shutdown hook and exit, after the calls already
    /// queued; kill it if it has not exited within `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let exited = self.exited.notified();
        tokio::pin!(exited);
        exited.as_mut().enable();
        if !self.is_alive() {
            return;
        }
        let grace_ms = grace.as_millis() as u64;
        if let Ok(f) = frame::encode(&ToWorker::Shutdown { grace_ms }) {
            let _ = self.tx.send(f);
        }
        if tokio::time::timeout(grace, &mut exited).await.is_err() {
            tracing::warn!(plugin = %self.plugin_id, pid = self.pid, "worker ignored shutdown; killing it");
            self.kill.notify_one();
            exited.await;
        }
    }

    /// Kill the worker now, saying why (shown by `corral status`).
    pub fn kill_because(&self, why: String) {
        *lock_reason(&self.kill_reason) = Some(why);
        self.kill();
    }

    /// Why the supervisor killed the worker, if it said.
    pub fn kill_reason(&self) -> Option<String> {
        lock_reason(&self.kill_reason).clone()
    }

    /// Kill the worker now (SIGKILL to the child the supervisor started).
    pub fn kill(&self) {
        self.killed_by_supervisor.store(true, Ordering::SeqCst);
        self.kill.notify_one();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.kill.notify_one();
    }
}

/// Runs in the forked child between `fork` and `exec`.
fn child_setup(
    fd: RawFd,
    parent: libc::pid_t,
    level: Level,
    cgroup_procs: &[CString],
) -> std::io::Result<()> {
    // SAFETY: each call below is an async-signal-safe system call with plain integer
    // arguments or NUL-terminated paths built before the fork; none touches memory the
    // parent shares.
    unsafe {
        // Join the plugin's cgroup first: nothing after this runs unlimited.
        for path in cgroup_procs {
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
        // namespaces. (Needs CAP_SYS_ADMIN, so before the privileges go.)
        if level >= Level::High
            && libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) != 0
        {
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
        // The supervisor may have died before prctl took effect.
        if libc::getppid() != parent {
            return Err(std::io::Error::other("supervisor exited during spawn"));
        }
        if fd == WORKER_SOCKET_FD {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
        } else if libc::dup2(fd, WORKER_SOCKET_FD) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Everything above fd 3 closes at exec (marking rather than closing keeps the
        // pipe std uses to report exec errors working).
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        if libc::syscall(
            libc::SYS_close_range,
            (WORKER_SOCKET_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // No core dumps: a plugin's memory may hold other tenants' data.
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // A bounded descriptor table (an engine needs a few dozen).
        let files = libc::rlimit {
            rlim_cur: WORKER_MAX_FILES,
            rlim_max: WORKER_MAX_FILES,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &files) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `RLIMIT_NOFILE` of a worker (soft and hard).
pub const WORKER_MAX_FILES: libc::rlim_t = 256;

/// The worker's real, effective, saved and filesystem ids and its capability sets,
/// as the kernel reports them, against what it was told to become.
fn check_credentials(pid: u32, cred: Credentials) -> Result<(), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read the worker's credentials: {e}"))?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let (uid, gid) = (cred.uid.to_string(), cred.gid.to_string());
    let ok = field("Uid:") == [&uid; 4]
        && field("Gid:") == [&gid; 4]
        && field("CapEff:") == ["0000000000000000"]
        && field("CapPrm:") == ["0000000000000000"];
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the worker did not drop to uid {uid} gid {gid} with no capabilities (Uid {:?}, \
             Gid {:?}, CapEff {:?})",
            field("Uid:"),
            field("Gid:"),
            field("CapEff:")
        ))
    }
}

/// Remove a worker's group once the processes in it are gone (children it forked
/// die with it by their parent-death signal, a moment later).
fn remove_when_empty(group: Arc<PluginCgroup>) {
    tokio::spawn(async move {
        for _ in 0..50 {
            if group.try_remove() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(?group, "cgroup still busy after 1 s; left in place");
    });
}

/// The last few KiB a worker wrote to stderr, kept for its whole life so its last
/// words can explain its death.
#[derive(Debug, Default)]
struct StderrTail {
    text: Mutex<String>,
    closed: Notify,
    is_closed: AtomicBool,
}

impl StderrTail {
    const KEEP: usize = 8 * 1024;

    fn push(&self, line: &str) {
        let mut t = self.text.lock().unwrap_or_else(|e| e.into_inner());
        t.push_str(line);
        t.push('\n');
        if t.len() > Self::KEEP {
            let cut = t.len() - Self::KEEP;
            let cut = (cut..t.len())
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(t.len());
            t.drain(..cut);
        }
    }

    fn close(&self) {
        self.is_closed.store(true, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    /// The tail once the worker's stderr has closed (or after 200 ms).
    async fn wait_closed(&self) -> String {
        let closed = self.closed.notified();
        if !self.is_closed.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(Duration::from_millis(200), closed).await;
        }
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What a seccomp death says when the worker's reporter could not run: the kernel
/// kills outright when SIGSYS is blocked, as it is while glibc spawns a process.
pub const UNREPORTED_SYSCALL: &str =
    "unreported syscall (SIGSYS arrived while signals were blocked, as around process spawning)";

/// A death by SIGSYS is a seccomp violation; the worker's reporter named the syscall.
fn explain_exit(exit: ExitReason, stderr: &str) -> ExitReason {
    match exit {
        ExitReason::Signal { signo, .. } if signo == libc::SIGSYS => ExitReason::Seccomp {
            syscall: corral_confine::violation_from_stderr(stderr)
                .unwrap_or_else(|| UNREPORTED_SYSCALL.into()),
        },
        other => other,
    }
}

enum HandshakeFailure {
    Died(ExitReason),
    Other(StartError),
}

async fn handshake(
    rd: &mut OwnedReadHalf,
    child: &mut Child,
    timeout: Duration,
) -> Result<Hello, HandshakeFailure> {
    let read = async {
        let payload = read_payload(rd).await?;
        frame::decode_hello(&payload)
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, read) => match r {
            Ok(Ok(hello)) => Ok(hello),
            Ok(Err(FrameError::Closed | FrameError::Io(_) | FrameError::Truncated { .. })) => {
                let status = child.wait().await.map(exit_reason).unwrap_or(ExitReason::Unknown);
                Err(HandshakeFailure::Died(status))
            }
            Ok(Err(e)) => Err(HandshakeFailure::Other(StartError::Handshake(e))),
            Err(_) => Err(HandshakeFailure::Other(StartError::HandshakeTimeout(timeout))),
        },
    }
}

/// Read one frame payload, bounded by [`frame::MAX_FRAME`].
pub(crate) async fn read_payload(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated { expected: 4, got }),
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = frame::check_len(u32::from_le_bytes(len), frame::MAX_FRAME)?;
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match r.read(&mut payload[got..]).await {
            Ok(0) => return Err(FrameError::Truncated { expected: len, got }),
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(payload)
}

pub(crate) async fn read_frame<T: serde::de::DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    frame::decode(&read_payload(r).await?)
}

async fn write_frames(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(buf) = rx.recv().await {
        if wr.write_all(&buf).await.is_err() {
            break;
        }
    }
}

async fn forward_output(
    out: impl AsyncRead + Unpin,
    plugin: String,
    stream: &'static str,
    keep: Option<Arc<StderrTail>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(plugin = %plugin, stream, "{line}");
        if let Some(k) = &keep {
            k.push(&line);
        }
    }
    if let Some(k) = &keep {
        k.close();
    }
}

pub(crate) fn log_line(plugin: &str, level: LogLevel, message: &str) {
    match level {
        LogLevel::Error => tracing::error!(plugin = %plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(plugin = %plugin, "{message}"),
        LogLevel::Info => tracing::info!(plugin = %plugin, "{message}"),
        LogLevel::Debug => tracing::debug!(plugin = %plugin, "{message}"),
        LogLevel::Trace => tracing::trace!(plugin = %plugin, "{message}"),
    }
}

/// Describe how a process ended.
pub fn exit_reason(status: ExitStatus) -> ExitReason {
    if let Some(code) = status.code() {
        ExitReason::Code(code)
    } else if let Some(signo) = status.signal() {
        ExitReason::Signal {
            signo,
            name: signal_name(signo),
        }
    } else {
        ExitReason::Unknown
    }
}

fn signal_name(signo: i32) -> String {
    let name = match signo {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {signo}"),
    };
    name.to_owned()
}

/// The task that owns a loaded worker's child process and read half.
struct Connection {
    broker: Weak<Core>,
    redactor: Redactor,
    level: Level,
    killed_by_supervisor: Arc<AtomicBool>,
    kill_reason: Arc<Mutex<Option<String>>>,
    plugin_id: String,
    cgroup: Option<Arc<PluginCgroup>>,
    tail: Arc<StderrTail>,
    pending: Arc<Mutex<Pending>>,
    kill: Arc<Notify>,
    shutting_down: Arc<AtomicBool>,
    exited: Arc<Notify>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl Connection {
    async fn run(self, mut rd: OwnedReadHalf, mut child: Child) {
        let mut protocol_error = None;
        let mut status = None;
        loop {
            tokio::select! {
                msg = read_frame::<FromWorker>(&mut rd) => match msg {
                    Ok(msg) => {
                        if let Err(why) = self.handle(msg) {
                            protocol_error = Some(why);
                            break;
                        }
                    }
                    Err(FrameError::Closed | FrameError::Io(_)) => break,
                    Err(e) => {
                        protocol_error = Some(e.to_string());
                        break;
                    }
                },
                s = child.wait(), if status.is_none() => {
                    status = s.ok();
                    // Read what the worker sent before it exited, briefly.
                    while let Ok(Ok(msg)) =
                        tokio::time::timeout(Duration::from_millis(50), read_frame::<FromWorker>(&mut rd)).await
                    {
                        let _ = self.handle(msg);
                    }
                    break;
                }
                () = self.kill.notified() => {
                    let _ = child.start_kill();
                }
            }
        }
        if protocol_error.is_some() {
            let _ = child.start_kill();
        }
        let status = match status {
            Some(s) => Some(s),
            None => child.wait().await.ok(),
        };
        let reason = match (&protocol_error, status) {
            (Some(why), _) => ExitReason::Protocol(why.clone()),
            (None, Some(s)) => explain_exit(exit_reason(s), &self.tail.wait_closed().await),
            (None, None) => ExitReason::Unknown,
        };
        let reason = match (&self.cgroup, reason) {
            (Some(g), ExitReason::Signal { signo, .. })
                if signo == libc::SIGKILL && g.oom_kills() > 0 =>
            {
                ExitReason::OomKilled {
                    limit_bytes: g.limits().memory_bytes,
                }
            }
            (_, r) => r,
        };
        if let Some(g) = &self.cgroup {
            remove_when_empty(Arc::clone(g));
        }
        let orderly = self.shutting_down.load(Ordering::SeqCst);
        if orderly {
            tracing::debug!(plugin = %self.plugin_id, "worker {reason}");
        } else {
            tracing::warn!(plugin = %self.plugin_id, "worker {reason}");
        }
        let calls: Vec<Reply> = {
            let mut p = lock(&self.pending);
            p.closed = Some(reason.clone());
            p.contexts.clear();
            p.calls.drain().map(|(_, r)| r).collect()
        };
        if !orderly && let Some(core) = self.broker.upgrade() {
            let by_us = self.killed_by_supervisor.load(Ordering::SeqCst);
            let why = lock_reason(&self.kill_reason).clone();
            core.worker_exited(&self.plugin_id, self.level, &reason, by_us, why.as_deref());
        }
        for reply in calls {
            let err = if orderly {
                CallError::ShuttingDown
            } else {
                CallError::WorkerCrashed(reason.clone())
            };
            let _ = reply.send(Err(err));
        }
        self.exited.notify_waiters();
    }

    /// Route one message. An error means the worker broke the protocol.
    fn handle(&self, msg: FromWorker) -> Result<(), String> {
        match msg {
            FromWorker::CallResult { id, result } => {
                // A missing entry is a call the supervisor already gave up on.
                let mut p = lock(&self.pending);
                p.contexts.remove(&id);
                if let Some(reply) = p.calls.remove(&id) {
                    let _ = reply.send(result);
                }
                Ok(())
            }
            FromWorker::HostCall { id, call, op } => {
                let ctx = lock(&self.pending).contexts.get(&call).cloned();
                let Some(ctx) = ctx else {
                    return Err(format!(
                        "host call {id} names call {call}, which is not running"
                    ));
                };
                let broker = self.broker.clone();
                let plugin = self.plugin_id.clone();
                let tx = self.tx.clone();
                // Performed on its own task: a fetch or another plugin's call may take
                // a while, and the connection keeps reading meanwhile.
                tokio::spawn(async move {
                    let result = match broker.upgrade() {
                        Some(core) => core.host_call(&plugin, ctx, op).await,
                        None => Err(HostError::Failed("the supervisor is gone".into())),
                    };
                    match frame::encode(&ToWorker::HostResult { id, result }) {
                        Ok(f) => {
                            let _ = tx.send(f);
                        }
                        Err(e) => tracing::error!(plugin, "host call answer not sent: {e}"),
                    }
                });
                Ok(())
            }
            FromWorker::Log { level, message } => {
                log_line(&self.plugin_id, level, &self.redactor.redact(&message));
                Ok(())
            }
            FromWorker::Stats(stats) => {
                tracing::debug!(plugin = %self.plugin_id, ?stats, "worker stats");
                Ok(())
            }
            FromWorker::Loaded { .. } | FromWorker::LoadFailed { .. } => {
                Err("load answer after the plugin was loaded".into())
            }
        }
    }
}
