//! The task that owns a loaded worker: it reads the worker's frames, routes call
//! results to their callers, has host calls performed by the [`Broker`], forwards
//! logs, and when the worker ends fails every call still in flight with how it
//! ended and reports the exit to the broker.
//!
//! Every frame is hostile input. A worker that breaks the protocol (an answer to
//! a call that is not running, output past its `max_output`, a host call for a
//! call that is not running or past [`MAX_HOST_CALLS_IN_FLIGHT`], a message it
//! was not asked for, a frame that does not decode) is killed; its callers get
//! [`ExitReason::Protocol`] naming the violation, the broker audits it, and the
//! supervisor restarts the plugin as after a crash (with backoff). What it may
//! send without breaking the protocol is bounded too: its log lines are cut and
//! rate-limited ([`PluginLog`]), and the answers queued for it are at most one
//! per call admitted and one per host call in flight.

use super::exit::{exit_reason, explain_exit};
use super::output::{PluginLog, StderrTail};
use super::process::{Process, remove_when_empty};
use super::{Broker, Exited, Pending, Reply, lock, lock_reason};
use corral_confine::Level;
use corral_confine::cgroup::PluginCgroup;
use corral_protocol::{
    CallError, ExitReason, FromWorker, HostError, ToWorker,
    frame::{self, FrameError},
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};

pub(crate) async fn write_frames(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(buf) = rx.recv().await {
        if wr.write_all(&buf).await.is_err() {
            break;
        }
    }
}

async fn read_message(rd: &mut OwnedReadHalf) -> Result<FromWorker, FrameError> {
    frame::read_msg_async(rd, frame::MAX_FRAME).await
}

/// Host calls one worker may have in flight. The worker library makes one at a
/// time (it waits for each answer under a lock); more is a worker that no longer
/// runs our code.
pub(crate) const MAX_HOST_CALLS_IN_FLIGHT: usize = 4;

/// A message's name, for errors (never its contents, which may be megabytes).
pub(crate) fn message_name(msg: &FromWorker) -> &'static str {
    match msg {
        FromWorker::Loaded { .. } => "Loaded",
        FromWorker::LoadFailed { .. } => "LoadFailed",
        FromWorker::CallResult { .. } => "CallResult",
        FromWorker::HostCall { .. } => "HostCall",
        FromWorker::Log { .. } => "Log",
        FromWorker::Stats(_) => "Stats",
    }
}

/// The task that owns a loaded worker's child process and read half.
pub(crate) struct Connection {
    pub(crate) broker: Weak<dyn Broker>,
    pub(crate) log: PluginLog,
    /// The plugin's `max_output`: a larger result breaks the protocol (the engine
    /// answers `OutputTooLarge` instead).
    pub(crate) max_output: u64,
    pub(crate) level: Level,
    pub(crate) killed_by_supervisor: Arc<AtomicBool>,
    pub(crate) kill_reason: Arc<Mutex<Option<String>>>,
    pub(crate) plugin_id: String,
    pub(crate) cgroup: Option<Arc<PluginCgroup>>,
    pub(crate) tail: Arc<StderrTail>,
    pub(crate) pending: Arc<Mutex<Pending>>,
    pub(crate) kill: Arc<Notify>,
    pub(crate) shutting_down: Arc<AtomicBool>,
    pub(crate) exited: Arc<Notify>,
    pub(crate) tx: mpsc::UnboundedSender<Vec<u8>>,
}

impl Connection {
    pub(crate) async fn run(mut self, mut rd: OwnedReadHalf, mut child: Box<dyn Process>) {
        let mut protocol_error = None;
        let mut status = None;
        loop {
            tokio::select! {
                msg = read_message(&mut rd) => match msg {
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
                    status = s;
                    // Read what the worker sent before it exited, briefly.
                    while let Ok(Ok(msg)) =
                        tokio::time::timeout(Duration::from_millis(50), read_message(&mut rd)).await
                    {
                        let _ = self.handle(msg);
                    }
                    break;
                }
                () = self.kill.notified() => {
                    child.start_kill();
                }
            }
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
        if !orderly && let Some(broker) = self.broker.upgrade() {
            let why = lock_reason(&self.kill_reason).clone();
            broker.worker_exited(Exited {
                plugin: &self.plugin_id,
                level: self.level,
                reason: &reason,
                by_supervisor: self.killed_by_supervisor.load(Ordering::SeqCst),
                why: why.as_deref(),
            });
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
    fn handle(&mut self, msg: FromWorker) -> Result<(), String> {
        match msg {
            FromWorker::CallResult { id, result } => {
                let mut p = lock(&self.pending);
                // The supervisor gave up on it (and is killing the worker).
                if p.given_up.remove(&id) {
                    return Ok(());
                }
                let Some(reply) = p.calls.remove(&id) else {
                    return Err(format!("an answer to call {id}, which is not running"));
                };
                if let Ok(out) = &result
                    && out.len() as u64 > self.max_output
                {
                    // Failed with the violation, like every call in flight.
                    p.calls.insert(id, reply);
                    return Err(format!(
                        "call {id} answered {} bytes, past its max_output of {} bytes",
                        out.len(),
                        self.max_output
                    ));
                }
                p.contexts.remove(&id);
                let _ = reply.send(result);
                Ok(())
            }
            FromWorker::HostCall { id, call, op } => {
                let ctx = {
                    let mut p = lock(&self.pending);
                    let Some(ctx) = p.contexts.get(&call).cloned() else {
                        return Err(format!(
                            "host call {id} names call {call}, which is not running"
                        ));
                    };
                    if p.host_calls.len() >= MAX_HOST_CALLS_IN_FLIGHT {
                        return Err(format!(
                            "more than {MAX_HOST_CALLS_IN_FLIGHT} host calls in flight"
                        ));
                    }
                    if !p.host_calls.insert(id) {
                        return Err(format!("host call id {id} is already in flight"));
                    }
                    ctx
                };
                let broker = self.broker.clone();
                let plugin = self.plugin_id.clone();
                let tx = self.tx.clone();
                let pending = Arc::clone(&self.pending);
                // Performed on its own task: a fetch or another plugin's call may take
                // a while, and the connection keeps reading meanwhile.
                tokio::spawn(async move {
                    let result = match broker.upgrade() {
                        Some(broker) => broker.host_call(&plugin, ctx, op).await,
                        None => Err(HostError::Failed("the supervisor is gone".into())),
                    };
                    // Out of flight before the answer leaves: the worker may reuse the id.
                    lock(&pending).host_calls.remove(&id);
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
                self.log.line(level, message);
                Ok(())
            }
            // The supervisor never asks for stats yet; unasked, they are a flood.
            other @ (FromWorker::Stats(_)
            | FromWorker::Loaded { .. }
            | FromWorker::LoadFailed { .. }) => Err(format!(
                "a {} message nobody asked for",
                message_name(&other)
            )),
        }
    }
}
