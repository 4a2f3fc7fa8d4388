//! The task that owns a loaded worker: it reads the worker's frames, routes call
//! results to their callers, has host calls performed by the [`Broker`], forwards
//! logs, and when the worker ends fails every call still in flight with how it
//! ended and reports the exit to the broker.
//!
//! Every frame is hostile input. A worker that breaks the protocol (an answer to
//! a call that is not running, output past its `max_output`, a host call for a
//! call that is not running or past the policy's `host_calls`, a message it
//! was not asked for, a frame that does not decode) is killed; its callers get
//! [`ExitReason::Protocol`] naming the violation, the broker audits it, and the
//! supervisor restarts the plugin as after a crash (with backoff). What it may
//! send without breaking the protocol is bounded too: its log lines are cut and
//! rate-limited ([`PluginLog`]), and the answers queued for it are at most one
//! per call admitted and one per host call in flight.

use super::exit::{exit_reason, explain_exit};
use super::output::{PluginLog, StderrTail};
use super::process::{Process, remove_when_empty};
use super::{Broker, Exited, Outbox, Outcome, Pending, Reply, Sent, lock, lock_reason, not_sent};
use corral_confine::Level;
use corral_confine::cgroup::PluginCgroup;
use corral_protocol::{
    CallError, ExitReason, FromWorker, FromWorkerKind, HostError, HostReply, RequestId, ToWorker,
    frame::{self, FrameError},
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

/// An answer to a host call on its way to the worker, with the permit it holds
/// until it is written (see [`Connection::unwritten`]).
pub(crate) type Answer = (Vec<u8>, OwnedSemaphorePermit);

/// The write half of a worker's socket: calls are written by their callers,
/// everything else by [`write_frames`], one whole frame at a time.
pub(crate) type Writer = Arc<tokio::sync::Mutex<OwnedWriteHalf>>;

/// How long a worker has to read the answer to one of its host calls: a worker
/// waits for each (the worker library blocks on it), so one not read by then is
/// a worker that stopped reading, and is killed, saying so. Without it an idle
/// worker would have kept its unread answers (up to `host_calls` + 1 frames of up
/// to 16 MiB each) for as long as nobody called it.
pub(crate) const ANSWER_WRITE_TIME: Duration = if cfg!(test) {
    Duration::from_millis(500)
} else {
    Duration::from_secs(10)
};

/// What kills a worker for a violation found by a task that writes to it.
#[derive(Clone)]
pub(crate) struct Killer {
    pub(crate) pending: Arc<Mutex<Pending>>,
    pub(crate) kill: Arc<Notify>,
    /// The worker's turns: calls waiting for one go to the next worker.
    pub(crate) dispatch: Arc<Semaphore>,
}

impl Killer {
    /// The connection kills the worker and reports `why` as it does the
    /// violations it reads.
    fn violation(&self, why: Violation) {
        lock(&self.pending).violation.get_or_insert(why);
        self.dispatch.close();
        self.kill.notify_one();
    }
}

/// Write `frame` (or what is left of it), the answer to a host call, within
/// [`ANSWER_WRITE_TIME`]; false if it was not written (the worker is gone, or is
/// killed for not reading).
async fn write_answer(wr: &mut OwnedWriteHalf, frame: &[u8], killer: &Killer) -> bool {
    match tokio::time::timeout(ANSWER_WRITE_TIME, wr.write_all(frame)).await {
        Ok(written) => written.is_ok(),
        Err(_) => {
            killer.violation(Violation::AnswerUnread(ANSWER_WRITE_TIME));
            false
        }
    }
}

/// The task that writes to a worker what its callers do not: the calls sent
/// behind others (the [`Outbox`]), the supervisor's `Shutdown` and the answers
/// to its host calls, each answer's permit given back once written.
pub(crate) async fn write_frames(
    wr: Writer,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut answers: mpsc::Receiver<Answer>,
    (outbox, killer): (Arc<Outbox>, Killer),
) {
    let (pending, kill) = (&killer.pending, &killer.kill);
    loop {
        let (buf, permit) = tokio::select! {
            // Calls queued first: a `Shutdown` sent after them comes after them.
            biased;
            () = outbox.ready.notified() => {
                if let Err(ids) = outbox.flush(&wr).await {
                    not_sent(pending, kill, ids);
                    break;
                }
                continue;
            }
            Some(buf) = rx.recv() => (buf, None),
            Some((buf, permit)) = answers.recv() => (buf, Some(permit)),
            else => break,
        };
        let mut w = wr.lock().await;
        let written = match permit {
            Some(_) => write_answer(&mut w, &buf, &killer).await,
            None => w.write_all(&buf).await.is_ok(),
        };
        if !written {
            break;
        }
        drop(w);
        drop(permit);
    }
}

/// Room in a frame beyond `max_output`: a result's encoding, a failed call's
/// message, a host call's own fields.
pub(crate) const FRAME_SLACK: u64 = 1 << 20;

/// Largest `Log` frame: the worker library cuts a message at 64 KiB.
pub(crate) const MAX_LOG_FRAME: u32 = 80 << 10;

/// Largest `Loaded` or `LoadFailed` frame (the exports, a load error).
pub(crate) const MAX_LOAD_FRAME: u32 = 1 << 20;

/// Largest frame of a message the supervisor did not ask for (`Stats`): it is a
/// violation whatever its size, and is not read whole to find that out.
pub(crate) const MAX_SMALL_FRAME: u32 = 4 << 10;

/// How long a worker that closed its socket, or said its load failed, has to exit
/// before it is killed: a worker without its socket serves nothing, and one that
/// stays would hold its slot, its start and the supervisor's shutdown.
pub(crate) const EXIT_GRACE: Duration = Duration::from_secs(1);

/// The most a worker that has exited may still be read for (what it sent just
/// before; a process it left behind with its socket would otherwise keep the read
/// going), and the most frames read then.
const DRAIN_TIME: Duration = Duration::from_millis(250);
const DRAIN_FRAMES: usize = 256;

/// Wait for `child` to end within `grace`, else kill it and wait; `true` if it had
/// to be killed.
pub(crate) async fn wait_or_kill(
    child: &mut dyn Process,
    grace: Duration,
) -> (Option<std::process::ExitStatus>, bool) {
    if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
        return (status, false);
    }
    child.start_kill();
    (child.wait().await, true)
}

/// The size limit of each kind of frame from a worker whose calls may answer
/// `max_output` bytes: a call's result and a host call (what the plugin sends out
/// through the host) at most `max_output` and [`FRAME_SLACK`], a log line
/// [`MAX_LOG_FRAME`]. Checked from a frame's length and first byte, before the
/// rest is read: a worker can make the supervisor hold no more than this.
pub(crate) fn frame_limit(max_output: u64, tag: u8) -> Option<(&'static str, u32)> {
    let kind = FromWorkerKind::from_tag(tag)?;
    let max = match kind {
        FromWorkerKind::CallResult | FromWorkerKind::HostCall => max_output
            .saturating_add(FRAME_SLACK)
            .min(u64::from(frame::MAX_FRAME))
            as u32,
        FromWorkerKind::Log => MAX_LOG_FRAME,
        FromWorkerKind::Loaded | FromWorkerKind::LoadFailed => MAX_LOAD_FRAME,
        FromWorkerKind::Stats => MAX_SMALL_FRAME,
    };
    Some((kind.name(), max))
}

/// A worker socket's read half, buffered: a small frame (a call's result, a host
/// call) is one `recv`, not one for its length, one for its kind and one for the
/// rest. What the buffer holds ahead is bounded by its size.
pub(crate) type WorkerReader = tokio::io::BufReader<OwnedReadHalf>;

/// Bytes read from a worker's socket at once: a small frame whole, kept small
/// since every live worker has one.
const READ_BUFFER: usize = 2 << 10;

/// [`WorkerReader`] over `rd`.
pub(crate) fn buffered(rd: OwnedReadHalf) -> WorkerReader {
    tokio::io::BufReader::with_capacity(READ_BUFFER, rd)
}

/// Read one message from a worker, each kind held to its [`frame_limit`].
pub(crate) async fn read_from_worker(
    rd: &mut WorkerReader,
    max_output: u64,
) -> Result<FromWorker, FrameError> {
    let payload = frame::read_payload_async_limited(rd, |tag| frame_limit(max_output, tag)).await?;
    frame::decode(&payload)
}

/// [`read_from_worker`] owning the read half, so the read can be kept across the
/// other branches of a `select!` (a partly read frame is never dropped).
async fn read_owned(
    mut rd: WorkerReader,
    max_output: u64,
) -> (WorkerReader, Result<FromWorker, FrameError>) {
    let r = read_from_worker(&mut rd, max_output).await;
    (rd, r)
}

/// The most bytes of each text in a worker's error that are kept: its message or
/// trap, the names in it. The rest is cut, saying how long it was: what a worker
/// says is stored as the plugin's last error, shown in `status`, logged, and
/// repeated in every answer of a failed plugin.
pub(crate) const MAX_ERROR_TEXT: usize = 16 << 10;

/// `e`, a worker's error, with every text in it cut to [`MAX_ERROR_TEXT`].
pub(crate) fn cut_error(e: CallError) -> CallError {
    let cut = |text: String| crate::supervisor::cut(text, MAX_ERROR_TEXT);
    match e {
        CallError::Plugin { message } => CallError::Plugin {
            message: cut(message),
        },
        CallError::Trap { message } => CallError::Trap {
            message: cut(message),
        },
        CallError::UnknownFunction {
            plugin,
            function,
            exports,
        } => CallError::UnknownFunction {
            plugin: cut(plugin),
            function: cut(function),
            exports: cut(exports),
        },
        CallError::BadInput { reason } => CallError::BadInput {
            reason: cut(reason),
        },
        e => e,
    }
}

/// A rule of the protocol a worker broke. The supervisor kills the worker and names
/// the rule in the exit reason, in every call in flight and in one audit line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Violation {
    #[error("an answer to call {0}, which is not running")]
    AnswerNotRunning(RequestId),
    #[error("an answer to call {id} while call {running} runs (answers come in order)")]
    AnswerOutOfOrder { id: RequestId, running: RequestId },
    #[error("call {id} answered {size} bytes, past its max_output of {limit} bytes")]
    OutputTooLarge {
        id: RequestId,
        size: usize,
        limit: u64,
    },
    #[error("host call {id} names call {call}, which is not running")]
    HostCallNotRunning { id: RequestId, call: RequestId },
    #[error("more than {0} host calls in flight (host_calls)")]
    HostCallsInFlight(usize),
    #[error("host call id {0} is already in flight")]
    HostCallIdInFlight(RequestId),
    #[error("{} answers to its host calls not read (host_calls {host_calls})", host_calls + 1)]
    AnswersNotRead { host_calls: usize },
    #[error("a {0} message nobody asked for")]
    Unasked(&'static str),
    #[error("call {id} answered with a {kind} error, which only the supervisor gives")]
    SupervisorsError { id: RequestId, kind: &'static str },
    #[error("its socket closed and it did not exit within {0:?}")]
    ClosedButAlive(Duration),
    #[error("it did not read the answer to its host call within {0:?}")]
    AnswerUnread(Duration),
    /// A frame past its kind's limit, or one that does not decode.
    #[error(transparent)]
    Frame(FrameError),
}

/// A message's name, for errors (never its contents, which may be megabytes).
pub(crate) fn message_name(msg: &FromWorker) -> &'static str {
    msg.kind().name()
}

/// The task that owns a loaded worker's child process and read half.
pub(crate) struct Connection {
    pub(crate) broker: Weak<dyn Broker>,
    pub(crate) log: PluginLog,
    /// The plugin's `max_output`: a larger result breaks the protocol (the engine
    /// answers `OutputTooLarge` instead).
    pub(crate) max_output: u64,
    /// The policy's `host_calls`: more in flight breaks the protocol.
    pub(crate) host_calls: usize,
    pub(crate) level: Level,
    pub(crate) runtime: corral_protocol::Runtime,
    pub(crate) killed_by_supervisor: Arc<AtomicBool>,
    pub(crate) kill_reason: Arc<Mutex<Option<String>>>,
    pub(crate) plugin_id: String,
    pub(crate) cgroup: Option<Arc<PluginCgroup>>,
    pub(crate) tail: Arc<StderrTail>,
    /// Dropped with the connection: the output forwarders stop reading soon after.
    pub(crate) _connected: tokio::sync::watch::Sender<()>,
    pub(crate) pending: Arc<Mutex<Pending>>,
    pub(crate) kill: Arc<Notify>,
    pub(crate) shutting_down: Arc<AtomicBool>,
    pub(crate) exited: Arc<Notify>,
    /// Where host call answers go to be written: a channel of `host_calls` + 1,
    /// the number of permits of `unwritten`, so a send never waits (an answer
    /// holds its permit until written, after it has left the channel).
    pub(crate) answers: mpsc::Sender<Answer>,
    /// Host calls admitted whose answers are not yet written to the worker:
    /// `host_calls` + 1 permits, one taken when a host call is admitted and given
    /// back when its answer is written. A worker that makes host calls and does not
    /// read their answers runs out of them and is killed: what the supervisor holds
    /// for it stays bounded (one more than `host_calls`, so a worker that reads each
    /// answer before its next call never races the writer).
    pub(crate) unwritten: Arc<Semaphore>,
    /// The socket's write half, for answers written where they are made.
    pub(crate) writer: Writer,
    /// The worker's turns, closed when this task kills it.
    pub(crate) dispatch: Arc<Semaphore>,
    /// How long past its deadline a running call may take before the worker is
    /// killed.
    pub(crate) kill_grace: Duration,
    /// The running call this task holds the backstop of (one that began when the
    /// answer before it was read), and when it fires.
    pub(crate) backstop: Option<(Sent, Instant)>,
    /// The host calls being performed (at most `host_calls`): ended with the
    /// connection, so a worker that exits does not leave them running (holding
    /// their places and the calls they made) for a fresh worker to add to.
    pub(crate) host_tasks: tokio::task::JoinSet<()>,
}

impl Connection {
    fn killer(&self) -> Killer {
        Killer {
            pending: Arc::clone(&self.pending),
            kill: Arc::clone(&self.kill),
            dispatch: Arc::clone(&self.dispatch),
        }
    }

    /// Write the answer to host call `id` now, when the socket takes it whole and
    /// no caller is writing; else its rest is written by a task holding the write
    /// half (so no other frame comes between), or the whole answer goes to
    /// [`write_frames`]. `permit` is held until it is written, as for any answer.
    fn answer_in_place(
        &self,
        id: RequestId,
        result: Result<HostReply, HostError>,
        permit: OwnedSemaphorePermit,
    ) {
        let frame = match frame::encode(&ToWorker::HostResult { id, result }) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(plugin = %self.plugin_id, "host call answer not sent: {e}");
                return;
            }
        };
        let Ok(mut wr) = Arc::clone(&self.writer).try_lock_owned() else {
            // Room is certain: the channel holds as many answers as there are permits.
            let _ = self.answers.try_send((frame, permit));
            return;
        };
        let written = match wr.try_write(&frame) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            // The worker's end is gone: the reader sees it.
            Err(_) => return,
        };
        if written < frame.len() {
            let killer = self.killer();
            tokio::spawn(async move {
                write_answer(&mut wr, &frame[written..], &killer).await;
                drop(permit);
            });
        }
    }

    pub(crate) async fn run(mut self, rd: WorkerReader, mut child: Box<dyn Process>) {
        let mut protocol_error = None;
        let mut status = None;
        let max_output = self.max_output;
        // Both halves share it; shut at the end (below), while both are open.
        let socket = {
            use std::os::fd::AsRawFd;
            let half: &tokio::net::UnixStream = rd.get_ref().as_ref();
            half.as_raw_fd()
        };
        let read = read_owned(rd, max_output);
        tokio::pin!(read);
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        let mut armed = None;
        loop {
            if armed != self.backstop.map(|(s, at)| (s.id, at)) {
                armed = self.backstop.map(|(s, at)| (s.id, at));
                timer
                    .as_mut()
                    .reset(self.backstop.map_or_else(far, |(_, at)| at.into()));
            }
            tokio::select! {
                (rd, msg) = &mut read => {
                    match msg {
                        Ok(msg) => {
                            if let Err(why) = self.handle(msg) {
                                protocol_error = Some(why);
                                break;
                            }
                            // Frames read from the buffer and host calls answered
                            // in place cost no I/O budget: a worker writing them
                            // as fast as it can would hold this runtime thread
                            // (and every task queued on it) for tens of ms.
                            tokio::task::coop::consume_budget().await;
                        }
                        Err(FrameError::Closed | FrameError::Io(_)) => break,
                        Err(e) => {
                            protocol_error = Some(Violation::Frame(e));
                            break;
                        }
                    }
                    read.set(read_owned(rd, max_output));
                }
                s = child.wait(), if status.is_none() => {
                    status = s;
                    lock(&self.pending).gone = true;
                    // Read what the worker sent before it exited, briefly (the
                    // frame under way first), and for DRAIN_TIME and DRAIN_FRAMES
                    // at most: a process left with its socket does not keep this
                    // going.
                    let drain = async {
                        if let Ok((mut rd, Ok(msg))) =
                            tokio::time::timeout(Duration::from_millis(50), &mut read).await
                        {
                            let _ = self.handle(msg);
                            for _ in 1..DRAIN_FRAMES {
                                let Ok(Ok(msg)) = tokio::time::timeout(
                                    Duration::from_millis(50),
                                    read_from_worker(&mut rd, max_output),
                                )
                                .await
                                else {
                                    break;
                                };
                                let _ = self.handle(msg);
                            }
                        }
                    };
                    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
                    break;
                }
                () = self.kill.notified() => {
                    child.start_kill();
                }
                () = &mut timer, if self.backstop.is_some() => {
                    self.overran();
                    child.start_kill();
                }
            }
        }
        // Its host calls end with it.
        self.host_tasks.abort_all();
        // Nothing sent from now on reaches a worker. The socket is shut both
        // ways: a write still waiting for a process left holding the other end
        // (one that never reads) fails now instead of holding its frame forever.
        lock(&self.pending).gone = true;
        // SAFETY: `socket` is the descriptor of the stream whose halves `read`
        // and `self.writer` own, both alive here; shutdown does not close it.
        unsafe { libc::shutdown(socket, libc::SHUT_RDWR) };
        if status.is_none() && protocol_error.is_none() {
            // Its socket closed (or broke): a worker ending, or one that means to
            // stay without it. It has EXIT_GRACE to exit.
            match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                Ok(s) => status = s,
                Err(_) => protocol_error = Some(Violation::ClosedButAlive(EXIT_GRACE)),
            }
        }
        if protocol_error.is_none() {
            protocol_error = lock(&self.pending).violation.take();
        }
        if let Some(why) = &protocol_error {
            tracing::warn!(plugin = %self.plugin_id, "protocol violation, killing the worker: {why}");
            child.start_kill();
        }
        self.log.finish();
        let status = match status {
            Some(s) => Some(s),
            None => child.wait().await,
        };
        let reason = match (&protocol_error, status) {
            (Some(why), _) => ExitReason::Protocol(why.to_string()),
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
        let calls: Vec<(bool, Reply)> = {
            let mut p = lock(&self.pending);
            p.closed = Some(reason.clone());
            p.contexts.clear();
            let running = p
                .order
                .front()
                .map(|s| s.id)
                .filter(|id| !p.unsent.contains(id));
            p.order.clear();
            p.calls
                .drain()
                .map(|(id, r)| (Some(id) == running, r))
                .collect()
        };
        if !orderly && let Some(broker) = self.broker.upgrade() {
            let why = lock_reason(&self.kill_reason).clone();
            broker.worker_exited(Exited {
                plugin: &self.plugin_id,
                level: self.level,
                runtime: self.runtime,
                reason: &reason,
                by_supervisor: self.killed_by_supervisor.load(Ordering::SeqCst),
                why: why.as_deref(),
            });
        }
        for (running, reply) in calls {
            let outcome = if orderly {
                Outcome::Done(Err(CallError::ShuttingDown))
            } else if running {
                Outcome::Done(Err(CallError::WorkerCrashed(reason.clone())))
            } else {
                // Waiting behind the call that ended the worker: never begun.
                Outcome::NotRun
            };
            let _ = reply.send(outcome);
        }
        self.exited.notify_waiters();
    }

    /// The running call whose backstop this task holds missed its deadline and
    /// grace: its caller gets `Timeout`, and the worker is killed (the caller
    /// kills it).
    fn overran(&mut self) {
        let Some((sent, _)) = self.backstop.take() else {
            return;
        };
        let mut p = lock(&self.pending);
        if !p.running(sent.id) {
            return;
        }
        if let Some(reply) = p.calls.remove(&sent.id) {
            p.contexts.remove(&sent.id);
            p.given_up.insert(sent.id);
            let deadline_ms = sent.deadline.as_millis() as u64;
            let _ = reply.send(Outcome::Done(Err(CallError::Timeout { deadline_ms })));
        }
        drop(p);
        tracing::warn!(
            plugin = %self.plugin_id,
            "worker did not answer within its deadline; killing it"
        );
        self.killed_by_supervisor.store(true, Ordering::SeqCst);
        self.dispatch.close();
    }

    /// Route one message. An error means the worker broke the protocol.
    fn handle(&mut self, msg: FromWorker) -> Result<(), Violation> {
        match msg {
            FromWorker::CallResult { id, result } => {
                let mut p = lock(&self.pending);
                // Answers come in the order the calls were sent.
                if !p.running(id) {
                    return Err(match p.order.front() {
                        Some(r) if p.order.iter().any(|s| s.id == id) => {
                            Violation::AnswerOutOfOrder { id, running: r.id }
                        }
                        _ => Violation::AnswerNotRunning(id),
                    });
                }
                if let Err(e) = &result
                    && !e.is_a_workers()
                {
                    return Err(Violation::SupervisorsError { id, kind: e.kind() });
                }
                let result = result.map_err(cut_error);
                if let Ok(out) = &result
                    && out.len() as u64 > self.max_output
                {
                    // Failed with the violation, like every call in flight.
                    return Err(Violation::OutputTooLarge {
                        id,
                        size: out.len(),
                        limit: self.max_output,
                    });
                }
                let now = Instant::now();
                // The next call begins: its backstop is this task's.
                self.backstop = p
                    .advance(now)
                    .map(|next| (next, now + next.deadline + self.kill_grace));
                // The supervisor gave up on it (and is killing the worker, or it
                // was never begun).
                if p.given_up.remove(&id) {
                    return Ok(());
                }
                let Some(reply) = p.calls.remove(&id) else {
                    return Err(Violation::AnswerNotRunning(id));
                };
                p.contexts.remove(&id);
                let _ = reply.send(Outcome::Done(result));
                Ok(())
            }
            FromWorker::HostCall { id, call, op } => {
                let ctx = {
                    let p = lock(&self.pending);
                    let Some(ctx) = p.contexts.get(&call).filter(|_| p.running(call)).cloned()
                    else {
                        return Err(Violation::HostCallNotRunning { id, call });
                    };
                    if p.host_calls.len() >= self.host_calls {
                        return Err(Violation::HostCallsInFlight(self.host_calls));
                    }
                    if p.host_calls.contains(&id) {
                        return Err(Violation::HostCallIdInFlight(id));
                    }
                    ctx
                };
                let Ok(permit) = Arc::clone(&self.unwritten).try_acquire_owned() else {
                    return Err(Violation::AnswersNotRead {
                        host_calls: self.host_calls,
                    });
                };
                // The clock and a local store read are answered here, before the
                // next frame is read: no task, no hop to the writer.
                let op = match self.broker.upgrade() {
                    Some(broker) => match broker.host_call_in_place(&self.plugin_id, op) {
                        Ok(result) => {
                            self.answer_in_place(id, result, permit);
                            return Ok(());
                        }
                        Err(op) => op,
                    },
                    None => op,
                };
                lock(&self.pending).host_calls.insert(id);
                let broker = self.broker.clone();
                let plugin = self.plugin_id.clone();
                let tx = self.answers.clone();
                let pending = Arc::clone(&self.pending);
                // Performed on its own task: a fetch or another plugin's call may take
                // a while, and the connection keeps reading meanwhile.
                while self.host_tasks.try_join_next().is_some() {}
                self.host_tasks.spawn(async move {
                    let result = match broker.upgrade() {
                        Some(broker) => broker.host_call(&plugin, ctx, op).await,
                        None => Err(HostError::Failed("the supervisor is gone".into())),
                    };
                    // Out of flight before the answer leaves: the worker may reuse the id.
                    lock(&pending).host_calls.remove(&id);
                    match frame::encode(&ToWorker::HostResult { id, result }) {
                        Ok(f) => {
                            let _ = tx.send((f, permit)).await;
                        }
                        Err(e) => tracing::error!(plugin, "host call answer not sent: {e}"),
                    }
                });
                Ok(())
            }
            FromWorker::Log { level, message } => {
                self.log.line(level, message);
                Ok(())
            }
            // The supervisor never asks for stats yet; unasked, they are a flood.
            other @ (FromWorker::Stats(_)
            | FromWorker::Loaded { .. }
            | FromWorker::LoadFailed { .. }) => Err(Violation::Unasked(message_name(&other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_protocol::LogLevel;

    /// A reader, and the worker's end to write to it.
    fn pair() -> (WorkerReader, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (buffered(a.into_split().0), b)
    }

    async fn read(rd: &mut WorkerReader) -> Result<FromWorker, FrameError> {
        tokio::time::timeout(Duration::from_secs(5), read_from_worker(rd, 1 << 20))
            .await
            .expect("refused from the header, without waiting for the rest")
    }

    #[tokio::test]
    async fn a_frame_past_its_kinds_limit_is_refused_before_it_is_read() {
        // Headers alone, claiming large frames of each kind (kind = first byte).
        for (tag, len, why) in [
            (
                4u8,
                60u32 << 20,
                "a Log frame of 62914560 bytes exceeds its limit of 81920 bytes",
            ),
            (
                2,
                (2 << 20) + 1,
                "a CallResult frame of 2097153 bytes exceeds its limit of 2097152 bytes",
            ),
            (
                3,
                3 << 20,
                "a HostCall frame of 3145728 bytes exceeds its limit of 2097152 bytes",
            ),
            (
                5,
                5000,
                "a Stats frame of 5000 bytes exceeds its limit of 4096 bytes",
            ),
            (
                0,
                2 << 20,
                "a Loaded frame of 2097152 bytes exceeds its limit of 1048576 bytes",
            ),
            (9, 10, "a frame of unknown kind (first byte 9)"),
            (
                2,
                u32::MAX,
                "frame of 4294967295 bytes exceeds the limit of 67108864 bytes",
            ),
        ] {
            let (mut rd, mut w) = pair();
            let mut head = len.to_le_bytes().to_vec();
            head.push(tag);
            w.write_all(&head).await.unwrap();
            assert_eq!(read(&mut rd).await.unwrap_err().to_string(), why);
        }
        let (mut rd, mut w) = pair();
        w.write_all(&0u32.to_le_bytes()).await.unwrap();
        assert_eq!(
            read(&mut rd).await.unwrap_err().to_string(),
            "malformed message: an empty frame"
        );
    }

    #[tokio::test]
    async fn frames_within_their_limits_are_read_whole() {
        let (mut rd, mut w) = pair();
        let msgs = [
            FromWorker::CallResult {
                id: 1,
                result: Ok(vec![7; 1 << 20]),
            },
            FromWorker::Log {
                level: LogLevel::Info,
                message: "x".repeat(64 << 10),
            },
        ];
        let writer = {
            let frames: Vec<Vec<u8>> = msgs.iter().map(|m| frame::encode(m).unwrap()).collect();
            tokio::spawn(async move {
                for f in frames {
                    // In small pieces, as a slow worker writes.
                    for piece in f.chunks(1000) {
                        w.write_all(piece).await.unwrap();
                    }
                }
                w
            })
        };
        for m in &msgs {
            assert_eq!(&read(&mut rd).await.unwrap(), m);
        }
        drop(writer.await.unwrap());
        assert!(matches!(read(&mut rd).await, Err(FrameError::Closed)));
    }
}
