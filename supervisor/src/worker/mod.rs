//! One worker process: its handle ([`WorkerHandle`]), how it is started
//! ([`spawn`]), the task that serves its socket ([`connection`]), how it ended
//! ([`exit`]), its output ([`output`]) and what its words may not show
//! ([`redact`]).
//!
//! This module is the executor of the supervisor: it runs one worker and reports
//! to a [`Broker`] (host calls and exits), never to the supervisor's tables. It
//! imports nothing from `crate::supervisor` or `crate::broker`.
//!
//! # Spawn path
//!
//! 1. A `socketpair` is created; the worker's end is placed at fd 3 in the child, so
//!    there is no address anyone else could dial and no token to steal.
//! 2. The child gets a cleared environment (an allow-list), stdin from `/dev/null`,
//!    stdout/stderr piped to the supervisor's log, its own process group, and a
//!    parent-death signal (SIGKILL); every other inherited fd is marked close-on-exec.
//!    Kernel confinement that must be applied before `exec` (cgroup placement,
//!    namespaces, uid/gid, rlimits) happens in `process::child_setup`.
//! 3. The worker initialises its engine, confines itself, and sends its handshake;
//!    the supervisor checks magic, version and worker kind, then sends `Load`.
//!
//! Once loaded, one task per worker owns the child and the read half: it routes
//! `CallResult`s to waiting callers, answers host calls, forwards logs, and when the
//! worker goes away fails every call still in flight with
//! [`CallError::WorkerCrashed`] carrying the exit code or signal.

pub(crate) mod connection;
pub(crate) mod exit;
pub(crate) mod output;
pub(crate) mod process;
pub(crate) mod redact;
pub(crate) mod spawn;
pub(crate) mod zygote;

pub use exit::UNREPORTED_SYSCALL;
pub(crate) use process::open_files;
pub use process::{VerifyError, WORKER_MAX_FILES, raise_open_files_limit};
pub use redact::{PluginFiles, Redactor};
pub use spawn::StartError;
pub(crate) use spawn::{ArtifactOut, Budgets, SpawnSpec, exhausted};

use corral_confine::Level;
use corral_protocol::{
    CallError, ExitReason, Hello, HostError, HostOp, HostReply, RequestId, ToWorker, frame,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};

/// A boxed future, for the object-safe traits at the module's seams.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a worker reports to: the host calls its plugin makes and how it ended.
/// A worker holds its broker weakly; a broker that is gone answers host calls with
/// "the supervisor is gone".
pub(crate) trait Broker: Send + Sync + std::fmt::Debug {
    /// Perform `op` for `plugin` within `ctx`.
    fn host_call<'a>(
        &'a self,
        plugin: &'a str,
        ctx: CallCtx,
        op: HostOp,
    ) -> BoxFuture<'a, Result<HostReply, HostError>>;

    /// `op` answered at once, where the worker's frame was read, when it waits on
    /// nothing (the clock, a local store read); `Err(op)` to have it performed by
    /// [`Broker::host_call`] on a task of its own.
    fn host_call_in_place(
        &self,
        _plugin: &str,
        op: HostOp,
    ) -> Result<Result<HostReply, HostError>, HostOp> {
        Err(op)
    }

    /// A worker ended without being asked to.
    fn worker_exited(&self, exit: Exited<'_>);
}

/// How a worker ended, as reported to its [`Broker`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exited<'a> {
    pub(crate) plugin: &'a str,
    pub(crate) level: Level,
    pub(crate) runtime: corral_protocol::Runtime,
    pub(crate) reason: &'a ExitReason,
    /// The supervisor killed it (a missed deadline, or `why`).
    pub(crate) by_supervisor: bool,
    pub(crate) why: Option<&'a str>,
}

/// What a call is part of: the plugins waiting on it (outermost first, this plugin
/// last) and when it must be done.
#[derive(Debug, Clone)]
pub(crate) struct CallCtx {
    pub(crate) chain: Arc<[String]>,
    pub(crate) deadline: Instant,
}

/// How a call sent to a worker ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Its answer, or why it has none (the worker crashed running it, it missed
    /// its deadline).
    Done(Result<Vec<u8>, CallError>),
    /// The worker ended before it began the call (it was waiting behind the one
    /// running): the caller sends it to the plugin's next worker.
    NotRun,
}

pub(crate) type Reply = oneshot::Sender<Outcome>;

/// Calls one worker may have in flight: one running, the rest waiting in its
/// socket in the order sent (a worker serves one call at a time, in order). A
/// call is sent behind others only to a worker whose calls are fast (see
/// [`WorkerHandle::take_pipelined_turn`]): it saves the worker a wake-up per call
/// and the supervisor a round trip between calls.
pub(crate) const PIPELINE: u32 = 32;

/// A call is sent behind others only to a worker that has answered this many...
const PIPELINE_AFTER: u32 = 16;

/// ...whose calls ran under this on average, and whose running call began less
/// than this ago: a slow call never has calls queued behind it that another
/// instance could serve.
pub(crate) const PIPELINE_FAST: Duration = Duration::from_millis(1);

/// A call whose input is larger waits for an idle worker (and takes all of it):
/// what waits in a worker's socket stays small.
pub(crate) const PIPELINE_INPUT: usize = 64 << 10;

/// Call frames on their way to a worker, in the order their calls joined
/// `Pending::order` (a frame is queued under that lock): whoever takes the write
/// half next writes them all in one `send`. A call sent to an idle worker writes
/// at once; one sent behind others leaves it to the connection's writer task,
/// which by then has usually more to send with it.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queued: Mutex<(Vec<u8>, Vec<RequestId>)>,
    /// Tells the writer task there is something to write.
    pub(crate) ready: Notify,
}

impl Outbox {
    fn push(&self, frame: &[u8], id: RequestId) {
        let mut q = self.queued.lock().unwrap_or_else(|e| e.into_inner());
        q.0.extend_from_slice(frame);
        q.1.push(id);
    }

    /// Write what is queued. On failure (the worker's end is gone), the calls
    /// whose frames did not go out.
    pub(crate) async fn flush(&self, wr: &connection::Writer) -> Result<(), Vec<RequestId>> {
        use tokio::io::AsyncWriteExt;
        let mut w = wr.lock().await;
        let (buf, ids) =
            std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
        if buf.is_empty() {
            return Ok(());
        }
        w.write_all(&buf).await.map_err(|_| ids)
    }
}

/// Calls whose frames could not be written: none of them began, and the worker,
/// whose socket no longer takes frames, is killed (each call then goes to the
/// plugin's next worker).
pub(crate) fn not_sent(pending: &Mutex<Pending>, kill: &Notify, ids: Vec<RequestId>) {
    let mut p = lock(pending);
    p.gone = true;
    p.unsent.extend(ids);
    drop(p);
    kill.notify_one();
}

/// A call sent to a worker and not yet answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) id: RequestId,
    pub(crate) deadline: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct Pending {
    calls: HashMap<RequestId, Reply>,
    /// The context of each call in `calls`, for the host calls it makes.
    contexts: HashMap<RequestId, CallCtx>,
    /// Calls the supervisor stopped waiting for (and killed the worker over): a
    /// late answer to one is not a violation.
    given_up: HashSet<RequestId>,
    /// The worker's host calls being performed.
    host_calls: HashSet<RequestId>,
    /// Set once the worker is gone; new calls fail at once with it.
    closed: Option<ExitReason>,
    /// Set the moment the worker is seen to end (its socket closed, its exit
    /// observed), before `closed`: a call registered from then on was never
    /// delivered, and goes to another worker unsent.
    gone: bool,
    /// Set when the worker is being retired (a new version took over): it finishes
    /// the calls it has and takes no more.
    retiring: bool,
    /// Every call sent and not yet answered (those given up on too), in the order
    /// sent: the first is the one running, and answers must come in this order.
    order: VecDeque<Sent>,
    /// When the first of `order` began, as far as the supervisor can tell: when
    /// it was sent to an idle worker, or when the answer before it was read.
    head_since: Option<Instant>,
    /// Calls answered (saturating), and how long they ran, a moving average.
    answered: u32,
    recent: Duration,
    /// Calls whose frames were never written (see [`not_sent`]).
    unsent: HashSet<RequestId>,
    /// Set by a task writing to the worker that found it breaking the protocol
    /// (it does not read what it asked for); the worker is killed for it.
    pub(crate) violation: Option<connection::Violation>,
}

impl Pending {
    /// Take `id` out of `order`, where it was sent (its write failed).
    fn unsend(&mut self, id: RequestId) {
        self.order.retain(|s| s.id != id);
        if self.order.is_empty() {
            self.head_since = None;
        }
    }

    /// Whether `id` is the call the worker is running.
    pub(crate) fn running(&self, id: RequestId) -> bool {
        self.order.front().is_some_and(|s| s.id == id) && !self.unsent.contains(&id)
    }

    /// The answer to the running call was read at `now`: the next one begins.
    /// Returns it, if there is one.
    pub(crate) fn advance(&mut self, now: Instant) -> Option<Sent> {
        self.order.pop_front();
        if let Some(since) = self.head_since {
            let ran = now.saturating_duration_since(since);
            self.recent = (self.recent * 7 + ran) / 8;
        }
        self.answered = self.answered.saturating_add(1);
        let next = self.order.front().copied();
        self.head_since = next.map(|_| now);
        if let Some(n) = next
            && let Some(ctx) = self.contexts.get_mut(&n.id)
        {
            // Its host calls' deadline counts from when it began.
            ctx.deadline = now + n.deadline;
        }
        next
    }
}

/// The right to send one call to a worker: its slot (or, for a call that must run
/// alone, every slot). Dropping it (the call answered, failed or given up) frees
/// the slot and tells the plugin's waiting callers.
#[derive(Debug)]
pub(crate) struct Turn {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        // The worker is free before anyone is told (`notify_one` also keeps the
        // wake-up for a waiter that registers just after).
        drop(self.permit.take());
        self.freed.notify_one();
    }
}

/// A running worker. Cheap to share; dropping the last handle kills the process.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub pid: u32,
    pub hello: Hello,
    pub exports: Vec<String>,
    plugin_id: String,
    /// Where a call's frame is written, by its caller (no task in between): a
    /// write that fails means the worker is gone and never got the call.
    writer: connection::Writer,
    /// The supervisor's own frames other than calls: a `Shutdown` (bounded: one). Answers to host
    /// calls go on the connection's bounded channel instead.
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
    /// When a call last began or ended (health checks do not count).
    last_active: Mutex<Instant>,
    /// [`PIPELINE`] slots: each call sent to the worker holds one (its
    /// [`Turn`]). A call is sent only once it has one; its deadline and the kill
    /// backstop count from when the worker begins it; a call waiting for a turn
    /// times out where it waits, unsent, and nobody is killed. Closed once the
    /// worker is killed, retired or stopping: it takes no more calls.
    pub(crate) dispatch: Arc<tokio::sync::Semaphore>,
    /// [`PIPELINE_FAST`], in microseconds (tests widen it to send calls behind a
    /// held one at will).
    pub(crate) pipeline_fast_us: AtomicU64,
    pub(crate) outbox: Arc<Outbox>,
}

pub(crate) fn lock(p: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock_reason(r: &Mutex<Option<String>>) -> MutexGuard<'_, Option<String>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

impl WorkerHandle {
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

    /// Whether the worker is serving and has no call in flight (nor a host call).
    pub fn is_idle(&self) -> bool {
        let p = lock(&self.pending);
        p.closed.is_none()
            && !p.gone
            && !p.retiring
            && p.calls.is_empty()
            && p.host_calls.is_empty()
    }

    /// When a call last began or ended on this worker (its start, before any).
    pub fn last_active(&self) -> Instant {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// A turn to run one call now, if the worker is serving and has no call.
    /// `alone`: nothing is sent behind it while it runs (a call with a large
    /// input, a health check). `freed` is told when the turn ends (the plugin's
    /// callers waiting for a worker look again).
    pub fn take_idle_turn(&self, freed: &Arc<Notify>, alone: bool) -> Option<Turn> {
        {
            let p = lock(&self.pending);
            if p.gone || p.closed.is_some() || p.retiring || !p.order.is_empty() {
                return None;
            }
        }
        // Every slot at once, so no call holds one: the worker is idle.
        let mut permit = Arc::clone(&self.dispatch)
            .try_acquire_many_owned(PIPELINE)
            .ok()?;
        if !alone {
            drop(permit.split(PIPELINE as usize - 1));
        }
        Some(Turn {
            permit: Some(permit),
            freed: Arc::clone(freed),
        })
    }

    /// A turn to send one call behind the calls this worker has, if its calls are
    /// fast: it has answered [`PIPELINE_AFTER`] calls, under [`PIPELINE_FAST`] on
    /// average, and its running call began less than that ago; and it has fewer
    /// than [`PIPELINE`] in flight. The call's deadline counts from when the worker
    /// begins it; if it has not begun by its `start_by`, its caller stops waiting
    /// (a `Timeout`, nobody killed) and the worker does not run it.
    pub fn take_pipelined_turn(&self, freed: &Arc<Notify>) -> Option<Turn> {
        {
            let p = lock(&self.pending);
            let fast_us = self.pipeline_fast_us.load(Ordering::Relaxed);
            let fast = Duration::from_micros(fast_us);
            let fast = p.answered >= PIPELINE_AFTER
                && p.recent < fast
                && p.head_since.is_some_and(|t| t.elapsed() < fast);
            if p.gone || p.closed.is_some() || p.retiring || !fast {
                return None;
            }
        }
        let permit = Arc::clone(&self.dispatch).try_acquire_owned().ok()?;
        Some(Turn {
            permit: Some(permit),
            freed: Arc::clone(freed),
        })
    }

    /// Calls sent to the worker and not yet answered.
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).order.len()
    }

    /// Run `function` in the `turn` taken on this worker. Ends in a result or a
    /// typed error, always: if the worker does not answer by `deadline` plus the
    /// kill grace (counted from when it begins the call), it is killed and the
    /// call gets [`CallError::Timeout`]; a call sent behind others that has not
    /// begun by `start_by` gets [`CallError::Timeout`] and kills nobody.
    /// `Err(input)`, with nothing run, when the worker is being retired or is
    /// gone, or ended before it began the call (the caller routes the call to the
    /// plugin's current worker).
    pub async fn try_call(
        &self,
        turn: Turn,
        function: &str,
        input: Vec<u8>,
        (deadline, start_by): (Duration, Instant),
        chain: Arc<[String]>,
    ) -> Result<Result<Vec<u8>, CallError>, Vec<u8>> {
        self.touch();
        let r = self
            .dispatched(turn, function, input, (deadline, start_by), chain)
            .await;
        self.touch();
        r
    }

    /// A health check: the call if the worker is idle now (it does not count as
    /// activity for `idle_timeout`), `None` (nothing sent) if a call is running.
    /// A busy worker is not unhealthy; a running call that hangs is killed at its
    /// own deadline.
    pub async fn call_if_idle(
        &self,
        freed: &Arc<Notify>,
        function: &str,
        deadline: Duration,
        chain: Arc<[String]>,
    ) -> Option<Result<Result<Vec<u8>, CallError>, Vec<u8>>> {
        let turn = self.take_idle_turn(freed, true)?;
        let start_by = Instant::now() + deadline;
        Some(
            self.dispatched(turn, function, Vec::new(), (deadline, start_by), chain)
                .await,
        )
    }

    /// Send a call that holds a turn on the worker, and wait for its answer. The
    /// deadline the worker is told counts from when it begins the call; so does
    /// the kill backstop: here, for a call sent to an idle worker (it begins now),
    /// in the connection's task for one sent behind others (it begins when the
    /// answer before it is read).
    async fn dispatched(
        &self,
        _turn: Turn,
        function: &str,
        input: Vec<u8>,
        (deadline, start_by): (Duration, Instant),
        chain: Arc<[String]>,
    ) -> Result<Result<Vec<u8>, CallError>, Vec<u8>> {
        let deadline_ms = deadline.as_millis() as u64;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let now = Instant::now();
        {
            // Registered before it is sent: `retire` waits for every registered call.
            let mut p = lock(&self.pending);
            // Retired, or gone while the call waited (nothing was sent to it):
            // the caller routes the call to the plugin's current worker.
            if p.retiring || p.gone || p.closed.is_some() {
                return Err(input);
            }
            p.calls.insert(id, reply);
            p.contexts.insert(
                id,
                CallCtx {
                    chain,
                    deadline: now + deadline,
                },
            );
        }
        // It has until `start_by` to begin (the worker checks too): a call sent
        // behind others may wait in the worker's socket until then.
        let left = start_by.saturating_duration_since(now).as_micros() as u64;
        let msg = ToWorker::Call {
            id,
            function: function.to_owned(),
            input,
            deadline_ms,
            start_by_us: corral_protocol::monotonic_us().saturating_add(left).max(1),
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
        let give_back = |msg: ToWorker| {
            let ToWorker::Call { input, .. } = msg else {
                unreachable!("a call was built above")
            };
            input
        };
        // Sent to an idle worker, written here, not by a task: one hop less, and
        // a write that fails says the worker is gone and never got the call. The
        // worker runs calls in the order they reach it: a call joins `order` as
        // its frame joins the outbox. The write is bounded by the deadline too (a
        // worker that stops reading cannot hold the caller).
        let write = async {
            let first = {
                let mut p = lock(&self.pending);
                p.order.push_back(Sent { id, deadline });
                let first = p.order.len() == 1;
                if first {
                    p.head_since = Some(Instant::now());
                }
                self.outbox.push(&frame, id);
                first
            };
            if !first {
                self.outbox.ready.notify_one();
                return (false, true);
            }
            match self.outbox.flush(&self.writer).await {
                Ok(()) => (true, true),
                Err(ids) => {
                    let mine = ids.contains(&id);
                    not_sent(&self.pending, &self.kill, ids);
                    (true, !mine)
                }
            }
        };
        let overdue = now + deadline + self.kill_grace;
        let outcome = match tokio::time::timeout_at(overdue.into(), write).await {
            Ok((_, false)) => None,
            // Sent to an idle worker, it begins now: the backstop is here.
            Ok((true, true)) => match tokio::time::timeout_at(overdue.into(), answer).await {
                Ok(a) => Some(a),
                Err(_) => return Ok(self.overdue(id, deadline_ms)),
            },
            // Sent behind others, it is waited for only until `start_by`; once
            // it has begun, the connection's task holds its backstop.
            Ok((false, true)) => {
                tokio::pin!(answer);
                match tokio::time::timeout_at(start_by.into(), &mut answer).await {
                    Ok(a) => Some(a),
                    Err(_) => {
                        let begun = {
                            let mut p = lock(&self.pending);
                            let begun = p.running(id) || !p.calls.contains_key(&id);
                            if !begun {
                                // Stays in `order`: the worker answers it, unrun.
                                p.calls.remove(&id);
                                p.contexts.remove(&id);
                                p.given_up.insert(id);
                            }
                            begun
                        };
                        if !begun {
                            return Ok(Err(CallError::Timeout { deadline_ms }));
                        }
                        Some(answer.await)
                    }
                }
            }
            // The write itself did not finish: what the worker got is unknown.
            Err(_) => return Ok(self.overdue(id, deadline_ms)),
        };
        Ok(match outcome {
            None => {
                let mut p = lock(&self.pending);
                p.calls.remove(&id);
                p.contexts.remove(&id);
                p.unsend(id);
                p.gone = true;
                drop(p);
                return Err(give_back(msg));
            }
            Some(Ok(Outcome::Done(result))) => match &self.files {
                Some(f) => result.map_err(|e| f.shown_error(e)),
                None => result,
            },
            Some(Ok(Outcome::NotRun)) => return Err(give_back(msg)),
            Some(Err(_)) => Err(CallError::WorkerCrashed(ExitReason::Unknown)),
        })
    }

    /// Call `id` missed its deadline and grace: given up, and the worker killed.
    fn overdue(&self, id: RequestId, deadline_ms: u64) -> Result<Vec<u8>, CallError> {
        let mut p = lock(&self.pending);
        p.calls.remove(&id);
        p.contexts.remove(&id);
        p.given_up.insert(id);
        drop(p);
        tracing::warn!(
            plugin = %self.plugin_id,
            pid = self.pid,
            "worker did not answer within its deadline; killing it"
        );
        self.kill();
        Err(CallError::Timeout { deadline_ms })
    }

    /// Whether the worker is being retired.
    #[cfg(test)]
    pub fn is_retiring(&self) -> bool {
        lock(&self.pending).retiring
    }

    /// Retire the worker: take no new calls, let every call it has finish (each is
    /// bounded by its own deadline and the kill backstop), then shut it down with
    /// `grace` for its shutdown hook.
    pub async fn retire(&self, grace: Duration) {
        lock(&self.pending).retiring = true;
        // Calls waiting for their turn go to the plugin's new worker, unsent.
        self.dispatch.close();
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
        // Calls waiting for their turn are not sent to a worker that is stopping.
        self.dispatch.close();
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
        // Calls waiting for their turn were not sent: they go to the next worker.
        self.dispatch.close();
        self.kill.notify_one();
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.kill.notify_one();
    }
}

/// What kills a worker's processes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TreeKill {
    Cgroup,
    PidNamespace,
    Nothing,
}

impl TreeKill {
    /// What a running worker has: its cgroup, else the PID namespace its
    /// handshake's namespaces (read by the supervisor from /proc) show.
    pub(crate) fn of(worker: &WorkerHandle, in_cgroup: bool) -> TreeKill {
        let own_pid = matches!(
            &worker.hello.enforcement.namespaces,
            corral_protocol::Enforcement::Full(s) if s.split(", ").any(|n| n.trim_start_matches("own ") == "pid")
        );
        match (in_cgroup, own_pid) {
            (true, _) => TreeKill::Cgroup,
            (false, true) => TreeKill::PidNamespace,
            (false, false) => TreeKill::Nothing,
        }
    }
}

/// The rules the supervisor enforces on a worker under `effective` (the policy's
/// budgets and limits), each saying what enforces it (`corral status` shows them).
/// `tree`: what kills the running worker's processes with it (`None`: no worker is
/// running; one will have a cgroup, or a PID namespace where it cannot).
pub(crate) fn supervision(
    effective: &corral_policy::Effective,
    handshake: Duration,
    kill_grace: Duration,
    tree: Option<TreeKill>,
) -> Vec<String> {
    use corral_policy::size;
    let frame = effective
        .max_output
        .value
        .saturating_add(connection::FRAME_SLACK);
    vec![
        format!(
            "frames: a result or host call at most {}, a log message {}, anything else 1 MiB, \
             refused from the header before it is read (the supervisor's reader)",
            size(frame.min(u64::from(corral_protocol::frame::MAX_FRAME))),
            size(u64::from(connection::MAX_LOG_FRAME)),
        ),
        format!(
            "protocol: answers only to running calls, at most {} host calls in flight, each \
             for a running call; a worker breaking a rule is killed, audited and restarted \
             with backoff (the supervisor's reader)",
            effective.host_calls.value
        ),
        format!(
            "output: stdout, stderr and log lines cut at {}, any bytes, {}/s for the three \
             together after a burst of {} (a line counts {} bytes more than its own), the rest \
             counted as suppressed (the supervisor's log)",
            size(output::MAX_LINE as u64),
            size(effective.log_rate.value),
            size(
                effective
                    .log_rate
                    .value
                    .saturating_mul(4)
                    .max((output::MAX_LINE + output::LINE_COST) as u64)
            ),
            output::LINE_COST,
        ),
        format!(
            "audit: {} events/s per plugin after a burst of {}, the rest summarized (the \
             supervisor's audit log)",
            effective.audit_rate.value,
            effective.audit_rate.value.saturating_mul(4)
        ),
        format!(
            "deadlines: load and init within {}, a call within its deadline and {} of grace \
             counted from when it is sent, then SIGKILL; one call at a time per worker, up to \
             {} worker{}; a call waiting longer than its deadline for one fails unsent, \
             killing nothing; a call sent behind a fast worker's running call counts from \
             when it begins, and one not begun within its deadline fails unrun, killing \
             nothing (the supervisor's timers; no lock is held while waiting)",
            humantime::format_duration(effective.init_timeout.value + handshake),
            humantime::format_duration(kill_grace),
            effective.instances.value,
            if effective.instances.value == 1 {
                ""
            } else {
                "s"
            },
        ),
        match tree {
            None | Some(TreeKill::Cgroup) => {
                "process tree: everything in the worker's cgroup dies with it (cgroup.kill on \
                 v2, each member killed until none is left on v1), and the group is removed"
            }
            Some(TreeKill::PidNamespace) => {
                "process tree: no cgroup, so the worker is pid 1 of a PID namespace of its \
                 own: when it dies the kernel kills everything the plugin started, and it \
                 dies with the process the supervisor started (a parent-death signal the \
                 plugin cannot reset)"
            }
            Some(TreeKill::Nothing) => {
                "process tree: not enforced, this worker has neither a cgroup nor a PID \
                 namespace: what the plugin detaches from it may outlive it"
            }
        }
        .to_owned(),
        "fetch: every hop's addresses judged and the connection pinned to them; loopback, \
         private and link-local only where a rule names the address (the broker)"
            .to_owned(),
    ]
}
