//! Starting a worker: the spawn ([`WorkerHandle::start`]), then, over any
//! [`Process`] and socket, the handshake, the load and the connection task
//! ([`WorkerHandle::connect`]).

use super::connection::{
    Connection, WorkerReader, buffered, message_name, read_from_worker, write_frames,
};
use super::exit::{exit_reason, explain_exit};
use super::output::{Output, PluginLog, forward_output};
use super::process::{Process, Spawned, VerifyError, remove_when_empty};
use super::zygote::{self, ForkError, Templates};
use super::{Broker, CallCtx, Pending, PluginFiles, Redactor, WorkerHandle};
use crate::plugins::access::Credentials;
use corral_confine::cgroup::PluginCgroup;
use corral_confine::child::ChildSetup;
use corral_confine::{CONFINE_ENV, SelfConfinement};
use corral_protocol::{
    ExitReason, FromWorker, Hello, HostError, LoadSpec, Overload, Runtime, ToWorker,
    WORKER_SOCKET_ENV, WORKER_SOCKET_FD,
    frame::{self, FrameError},
};
use std::ffi::{CString, OsString};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::{Notify, Semaphore, mpsc};

/// Everything needed to start one worker.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub(crate) program: PathBuf,
    pub(crate) runtime: Runtime,
    pub(crate) plugin_id: String,
    /// Variables passed through; the rest of the environment is cleared.
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) handshake_timeout: Duration,
    /// How long past a call's deadline the supervisor waits before killing the worker.
    pub(crate) kill_grace: Duration,
    /// What the worker must apply to itself before it accepts plugin code.
    pub(crate) confine: SelfConfinement,
    /// The worker's cgroup, joined between fork and exec.
    pub(crate) cgroup: Option<Arc<PluginCgroup>>,
    /// Why there is no cgroup (reported in the handshake's enforcement).
    pub(crate) cgroup_unavailable: Option<String>,
    /// Performs the worker's host calls and hears how it ended.
    pub(crate) broker: Weak<dyn Broker>,
    /// The plugin's secrets, cut out of everything it logs.
    pub(crate) redactor: Redactor,
    /// The version's files, kept while the worker lives.
    pub(crate) files: Option<PluginFiles>,
    /// What the worker may send: the policy's `log_rate` and `host_calls`.
    pub(crate) budgets: Budgets,
    /// For a compile helper: the file it writes the compiled module into, placed at
    /// `ARTIFACT_FD`, and how large it may grow (`RLIMIT_FSIZE`).
    pub(crate) artifact: Option<ArtifactOut>,
    /// Zygote templates to fork a serving worker from (none: started by exec).
    pub(crate) templates: Option<Arc<Templates>>,
}

/// The file a compile helper writes into (made and owned by the supervisor).
#[derive(Debug, Clone)]
pub(crate) struct ArtifactOut {
    pub(crate) file: Arc<std::fs::File>,
    pub(crate) max_bytes: u64,
}

/// The policy's budgets for one worker's streams, enforced by the supervisor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budgets {
    /// Bytes per second of each output stream passed on (burst: four seconds' worth).
    pub(crate) log_rate: u64,
    /// Host calls in flight.
    pub(crate) host_calls: usize,
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
    /// Loading the plugin (its top-level code and `init`) did not end in time.
    #[error(
        "the plugin did not finish loading (top-level code and init) within {0:?}; worker killed"
    )]
    LoadTimeout(Duration),
    #[error("bad handshake")]
    Handshake(#[source] FrameError),
    #[error("worker is a {got} worker, expected {expected}")]
    WrongRuntime { expected: Runtime, got: Runtime },
    #[error("plugin failed to load: {0}")]
    LoadFailed(String),
    /// What the worker claimed in its handshake is not what the outside sees.
    #[error("refused: {0}")]
    Unverified(VerifyError),
    /// The isolation level cannot be enforced here; nothing was started.
    #[error("refused: {0}")]
    Refused(String),
    /// The supervisor has no room for the worker (`max_workers`), or ran out of a
    /// resource of its own starting it: not the plugin's fault, nothing is left.
    #[error("{0}")]
    Overloaded(Overload),
}

/// The supervisor's own resource that `e` says ran out, if it says so: a start
/// that fails this way is the supervisor's limit, never the plugin's crash.
pub(crate) fn exhausted(e: &std::io::Error) -> Option<Overload> {
    let why = match e.raw_os_error()? {
        libc::EMFILE => {
            let (open, limit) = super::process::open_files();
            let open = open.map_or_else(|| "all".to_owned(), |n| n.to_string());
            format!(
                "the supervisor is out of file descriptors (EMFILE: {open} open, its \
                 RLIMIT_NOFILE is {limit}; raise LimitNOFILE or lower max_workers)"
            )
        }
        libc::ENFILE => "the system's file table is full (ENFILE)".to_owned(),
        libc::EAGAIN => "the supervisor cannot create a process (EAGAIN: its RLIMIT_NPROC, \
                         its cgroup's pids.max or the system's pid limit)"
            .to_owned(),
        libc::ENOMEM => "the kernel refused the supervisor memory (ENOMEM)".to_owned(),
        libc::ENOSPC => "no room for another cgroup (ENOSPC: cgroup.max.descendants or \
                         the kernel's limit)"
            .to_owned(),
        _ => return None,
    };
    Some(Overload::Supervisor(why))
}

impl StartError {
    /// `Socket`, classified: the supervisor's own limit, or a socket failure.
    fn socket(e: std::io::Error) -> StartError {
        match exhausted(&e) {
            Some(o) => StartError::Overloaded(o),
            None => StartError::Socket(e),
        }
    }
}

fn stderr_tail(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// A close-on-exec duplicate of `file` numbered above `ARTIFACT_FD`.
fn above_artifact_fd(file: &std::fs::File) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor `file` keeps open; the new one is ours.
    let fd = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            corral_protocol::ARTIFACT_FD + 1,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just made and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl WorkerHandle {
    /// Spawn the worker process of `spec`, complete the handshake and load the
    /// plugin.
    pub(crate) async fn start(
        spec: &SpawnSpec,
        load: LoadSpec,
    ) -> Result<Arc<WorkerHandle>, StartError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::socket)?;
        let level = spec.confine.level;
        let procs: Vec<CString> = spec.cgroup.iter().flat_map(|g| g.join_files()).collect();
        if let (Some(templates), None) = (&spec.templates, &spec.artifact)
            && let Some(forked) = fork_worker(spec, templates, &theirs, &procs).await?
        {
            let (process, out, err) = forked;
            drop(theirs);
            let output = forward_both(spec, out, err);
            return WorkerHandle::connect(spec, load, process, stream(ours)?, output).await;
        }
        let mut cmd = worker_command(&spec.program, &worker_env(spec));
        let fd = theirs.as_raw_fd();
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // Above fd 4, so that placing the socket at 3 cannot close it first.
        let artifact_fd = match &spec.artifact {
            Some(a) => Some(above_artifact_fd(&a.file).map_err(StartError::socket)?),
            None => None,
        };
        let artifact = artifact_fd
            .as_ref()
            .zip(spec.artifact.as_ref())
            .map(|(fd, a)| (fd.as_raw_fd(), a.max_bytes));
        // SAFETY: `ChildSetup::apply` only makes async-signal-safe system calls
        // (prctl, getppid, dup2, fcntl, close_range, open, write, close, getrlimit,
        // setrlimit, unshare, signal) and allocates nothing (`procs` was built before
        // the fork).
        unsafe {
            cmd.pre_exec(move || {
                ChildSetup {
                    socket: fd,
                    stdio: None,
                    parent,
                    level,
                    cgroup_join: &procs,
                    artifact,
                    zygote_keep: None,
                }
                .apply()
            });
        }
        let mut child = cmd.spawn().map_err(|source| match exhausted(&source) {
            Some(o) => StartError::Overloaded(o),
            None => StartError::Spawn {
                program: spec.program.clone(),
                source,
            },
        })?;
        drop(theirs);
        drop(artifact_fd);
        let pid = child.id().unwrap_or(0);
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(StartError::Socket(std::io::Error::other("no output pipes")));
        };
        let output = forward_both(spec, out, err);
        let process = Box::new(Spawned {
            child,
            pid,
            run_as: run_as(spec),
        });
        WorkerHandle::connect(spec, load, process, stream(ours)?, output).await
    }

    /// The handshake and the load over `stream`, then the connection task that
    /// serves the worker until it ends. `output` has the worker's stderr as far as
    /// it is read, and the budget its log lines share with its output.
    pub(crate) async fn connect(
        spec: &SpawnSpec,
        load: LoadSpec,
        mut child: Box<dyn Process>,
        stream: tokio::net::UnixStream,
        output: Output,
    ) -> Result<Arc<WorkerHandle>, StartError> {
        let Output {
            tail,
            budget,
            connected,
        } = output;
        let pid = child.pid();
        let (rd, mut wr) = stream.into_split();
        let mut rd = buffered(rd);
        let hello = match handshake(&mut rd, child.as_mut(), spec.handshake_timeout).await {
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
                child.start_kill();
                child.wait().await;
                return Err(e);
            }
        };
        let mut hello = hello;
        if let Err(why) = child.verify(&mut hello) {
            child.start_kill();
            child.wait().await;
            return Err(match &why {
                VerifyError::Credentials(e) => exhausted(e).map(StartError::Overloaded),
                VerifyError::NotDropped { .. } => None,
            }
            .unwrap_or(StartError::Unverified(why)));
        }
        if let Some(g) = &spec.cgroup {
            hello.enforcement.cgroup = g.report();
        } else if let Some(why) = &spec.cgroup_unavailable {
            hello.enforcement.cgroup = corral_protocol::Enforcement::None(why.clone());
        }
        if hello.runtime != spec.runtime {
            child.start_kill();
            child.wait().await;
            return Err(StartError::WrongRuntime {
                expected: spec.runtime,
                got: hello.runtime,
            });
        }

        // Load: the worker answers Loaded or LoadFailed (and exits).
        let init_deadline = Duration::from_millis(load.limits.init_deadline_ms);
        let max_output = load.limits.max_output_bytes;
        let mut log = PluginLog::new(&spec.plugin_id, spec.redactor.clone(), budget);
        let load_frame = frame::encode(&ToWorker::Load(load)).map_err(StartError::Handshake)?;
        let loaded = async {
            wr.write_all(&load_frame).await.map_err(FrameError::Io)?;
            loop {
                match read_from_worker(&mut rd, max_output).await? {
                    FromWorker::Loaded { exports } => return Ok(Ok(exports)),
                    FromWorker::LoadFailed { error } => {
                        return Ok(Err(crate::supervisor::cut(
                            error,
                            super::connection::MAX_ERROR_TEXT,
                        )));
                    }
                    FromWorker::Log { level, message } => log.line(level, message),
                    // Host calls from `init`: answered in line.
                    FromWorker::HostCall { id, op, .. } => {
                        let ctx = CallCtx {
                            chain: Arc::from(vec![spec.plugin_id.clone()]),
                            deadline: Instant::now() + init_deadline,
                        };
                        let result = match spec.broker.upgrade() {
                            Some(broker) => broker.host_call(&spec.plugin_id, ctx, op).await,
                            None => Err(HostError::Failed("the supervisor is gone".into())),
                        };
                        let f = frame::encode(&ToWorker::HostResult { id, result })?;
                        wr.write_all(&f).await.map_err(FrameError::Io)?;
                    }
                    other => {
                        return Err(FrameError::Decode(format!(
                            "unexpected {} while loading",
                            message_name(&other)
                        )));
                    }
                }
            }
        };
        // The engine enforces `init`'s deadline itself; this is the backstop for a
        // worker that does not (or cannot): it is killed, and the start fails. It
        // allows the handshake's time again for what comes before `init` (compiling
        // a module, importing the plugin's code).
        let backstop = init_deadline + spec.handshake_timeout;
        let Ok(loaded) = tokio::time::timeout(backstop, loaded).await else {
            child.start_kill();
            child.wait().await;
            if let Some(g) = &spec.cgroup {
                remove_when_empty(Arc::clone(g));
            }
            return Err(StartError::LoadTimeout(backstop));
        };
        let exports = match loaded {
            Ok(Ok(exports)) => exports,
            Ok(Err(error)) => {
                // It ends after saying so; one that stays is killed, so that its
                // start (which holds the plugin's other starts) ends.
                super::connection::wait_or_kill(child.as_mut(), super::connection::EXIT_GRACE)
                    .await;
                return Err(StartError::LoadFailed(match &spec.files {
                    Some(f) => f.shown(error),
                    None => error,
                }));
            }
            Err(e) => {
                let status = match child.try_wait() {
                    Some(s) => Some(s),
                    None if matches!(e, FrameError::Decode(_)) => None,
                    // The socket broke: the worker is probably dying; see how.
                    None => tokio::time::timeout(Duration::from_millis(500), child.wait())
                        .await
                        .ok()
                        .flatten(),
                };
                child.start_kill();
                child.wait().await;
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
        let writer = Arc::new(tokio::sync::Mutex::new(wr));
        let handle = Arc::new(WorkerHandle {
            writer: Arc::clone(&writer),
            pid,
            hello,
            exports,
            plugin_id: spec.plugin_id.clone(),
            tx,
            pending: Arc::new(Mutex::new(Pending::default())),
            next_id: AtomicU64::new(1),
            kill: Arc::new(Notify::new()),
            killed_by_supervisor: Arc::new(AtomicBool::new(false)),
            kill_reason: Arc::new(Mutex::new(None)),
            shutting_down: Arc::new(AtomicBool::new(false)),
            exited: Arc::new(Notify::new()),
            kill_grace: spec.kill_grace,
            files: spec.files.clone(),
            last_active: Mutex::new(Instant::now()),
            dispatch: Arc::new(tokio::sync::Semaphore::new(super::PIPELINE as usize)),
            pipeline_fast_us: AtomicU64::new(super::PIPELINE_FAST.as_micros() as u64),
            outbox: Arc::default(),
        });
        // As many answers as there are permits to hold them (`Connection::unwritten`).
        let unwritten = spec.budgets.host_calls + 1;
        let (answers, answers_rx) = mpsc::channel(unwritten);
        tokio::spawn(write_frames(
            Arc::clone(&writer),
            rx,
            answers_rx,
            (
                Arc::clone(&handle.outbox),
                super::connection::Killer {
                    pending: Arc::clone(&handle.pending),
                    kill: Arc::clone(&handle.kill),
                    dispatch: Arc::clone(&handle.dispatch),
                },
            ),
        ));
        tokio::spawn(
            Connection {
                broker: spec.broker.clone(),
                log,
                max_output,
                host_calls: spec.budgets.host_calls,
                level: spec.confine.level,
                runtime: spec.runtime,
                killed_by_supervisor: Arc::clone(&handle.killed_by_supervisor),
                kill_reason: Arc::clone(&handle.kill_reason),
                plugin_id: spec.plugin_id.clone(),
                cgroup: spec.cgroup.clone(),
                tail,
                _connected: connected,
                pending: Arc::clone(&handle.pending),
                kill: Arc::clone(&handle.kill),
                shutting_down: Arc::clone(&handle.shutting_down),
                exited: Arc::clone(&handle.exited),
                answers,
                unwritten: Arc::new(Semaphore::new(unwritten)),
                writer,
                dispatch: Arc::clone(&handle.dispatch),
                kill_grace: spec.kill_grace,
                backstop: None,
                host_tasks: Default::default(),
            }
            .run(rd, child),
        );
        Ok(handle)
    }
}

/// A worker binary's command: only `env`, stdin from /dev/null, stdout and stderr
/// piped, its own process group, killed if dropped.
pub(crate) fn worker_command(program: &std::path::Path, env: &[(OsString, OsString)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// The worker's environment: the allow-listed variables, its socket's number and
/// its confinement.
fn worker_env(spec: &SpawnSpec) -> Vec<(OsString, OsString)> {
    let mut env = spec.env.clone();
    env.push((
        WORKER_SOCKET_ENV.into(),
        WORKER_SOCKET_FD.to_string().into(),
    ));
    env.push((CONFINE_ENV.into(), spec.confine.to_env_value().into()));
    env
}

fn run_as(spec: &SpawnSpec) -> Option<Credentials> {
    spec.confine
        .run_as
        .map(|[uid, gid]| Credentials { uid, gid })
}

/// The supervisor's end of a worker's socket, for tokio.
fn stream(ours: std::os::unix::net::UnixStream) -> Result<tokio::net::UnixStream, StartError> {
    ours.set_nonblocking(true).map_err(StartError::socket)?;
    tokio::net::UnixStream::from_std(ours).map_err(StartError::socket)
}

/// Pass a worker's stdout and stderr to the log; the tail of stderr is kept.
/// One budget covers both streams and the worker's `Log` frames.
fn forward_both(
    spec: &SpawnSpec,
    out: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    err: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> Output {
    let output = Output::new(spec.budgets.log_rate);
    tokio::spawn(forward_output(
        out,
        spec.plugin_id.clone(),
        "stdout",
        None,
        Arc::clone(&output.budget),
        output.gone(),
    ));
    let keep = Some(Arc::clone(&output.tail));
    tokio::spawn(forward_output(
        err,
        spec.plugin_id.clone(),
        "stderr",
        keep,
        Arc::clone(&output.budget),
        output.gone(),
    ));
    output
}

/// A forked worker, its stdout and its stderr.
type ForkedWorker = (
    Box<dyn Process>,
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Receiver,
);

/// Fork the worker of `spec` from its template; `None` when there is no template
/// to fork from (the worker is then started by exec).
async fn fork_worker(
    spec: &SpawnSpec,
    templates: &Templates,
    theirs: &std::os::unix::net::UnixStream,
    procs: &[CString],
) -> Result<Option<ForkedWorker>, StartError> {
    let Some(request) = zygote::request(&worker_env(spec), spec.confine.level, procs) else {
        return Ok(None);
    };
    let (out, out_w) = zygote::output_pipe().map_err(StartError::socket)?;
    let (err, err_w) = zygote::output_pipe().map_err(StartError::socket)?;
    let socket = std::os::fd::OwnedFd::from(theirs.try_clone().map_err(StartError::socket)?);
    let forked = templates
        .fork(
            &spec.program,
            spec.confine.level,
            &spec.env,
            &request,
            &socket,
            [&out_w, &err_w],
        )
        .await;
    match forked {
        Ok(f) => Ok(Some((Box::new(f.with_run_as(run_as(spec))), out, err))),
        Err(ForkError::Unavailable(_)) => Ok(None),
        Err(ForkError::Failed(e)) => Err(zygote::fork_failed(&spec.program, e)),
    }
}

/// Largest `Hello` a worker may send (its engine version and enforcement report).
const MAX_HELLO_FRAME: u32 = 64 << 10;

enum HandshakeFailure {
    Died(ExitReason),
    Other(StartError),
}

async fn handshake(
    rd: &mut WorkerReader,
    child: &mut dyn Process,
    timeout: Duration,
) -> Result<Hello, HandshakeFailure> {
    let read = async {
        let payload = frame::read_payload_async(rd, MAX_HELLO_FRAME).await?;
        frame::decode_hello(&payload)
    };
    tokio::select! {
        r = tokio::time::timeout(timeout, read) => match r {
            Ok(Ok(hello)) => Ok(hello),
            Ok(Err(FrameError::Closed | FrameError::Io(_) | FrameError::Truncated { .. })) => {
                let (status, _) =
                    super::connection::wait_or_kill(child, super::connection::EXIT_GRACE).await;
                Err(HandshakeFailure::Died(status.map(exit_reason).unwrap_or(ExitReason::Unknown)))
            }
            Ok(Err(e)) => Err(HandshakeFailure::Other(StartError::Handshake(e))),
            Err(_) => Err(HandshakeFailure::Other(StartError::HandshakeTimeout(timeout))),
        },
    }
}
