//! The worker's connection to the supervisor, shared by the loop and by engine host
//! functions.
//!
//! The worker is single-threaded with respect to plugin code: a host call blocks the
//! calling engine until the supervisor answers. Frames that arrive meanwhile (the
//! supervisor pipelines further calls) are queued and served, in order, afterwards.

use corral_protocol::{
    FromWorker, Hello, HostError, HostOp, HostReply, LogLevel, RequestId, Secret, ToWorker,
    frame::{self, FrameError},
};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

/// Longest log message passed on; longer ones are cut.
pub const MAX_LOG: usize = 64 * 1024;

/// Handle on the supervisor connection. Cheap to clone; engines keep one in their
/// host-function state.
#[derive(Debug, Clone)]
pub struct Host {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// The socket, read through a buffer; writes go to `reader.get_ref()` so the
    /// worker holds exactly one descriptor for it.
    reader: BufReader<UnixStream>,
    queued: VecDeque<ToWorker>,
    next_id: RequestId,
    current_call: RequestId,
    config: Arc<BTreeMap<String, String>>,
    secrets: Arc<BTreeMap<String, Secret>>,
}

impl Host {
    pub(crate) fn new(stream: UnixStream) -> Host {
        Host {
            inner: Arc::new(Mutex::new(Inner {
                reader: BufReader::with_capacity(64 * 1024, stream),
                queued: VecDeque::new(),
                next_id: 1,
                current_call: 0,
                config: Arc::default(),
                secrets: Arc::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-frame; the stream state is unknown, but the
        // worker is about to exit anyway, so carry on with the data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn send_hello(&self, hello: &Hello) -> Result<(), FrameError> {
        self.write_frame(&frame::encode_hello(hello)?)
    }

    /// Send one message to the supervisor.
    pub fn send(&self, msg: &FromWorker) -> Result<(), FrameError> {
        self.write_frame(&frame::encode(msg)?)
    }

    fn write_frame(&self, buf: &[u8]) -> Result<(), FrameError> {
        let inner = self.lock();
        inner
            .reader
            .get_ref()
            .write_all(buf)
            .map_err(FrameError::Io)
    }

    pub(crate) fn next_message(&self) -> Result<ToWorker, FrameError> {
        let mut inner = self.lock();
        if let Some(m) = inner.queued.pop_front() {
            return Ok(m);
        }
        frame::read_msg(&mut inner.reader, frame::MAX_FRAME)
    }

    /// Keep the plugin's configuration and secrets from its `Load` message.
    pub(crate) fn set_config(
        &self,
        config: BTreeMap<String, String>,
        secrets: BTreeMap<String, Secret>,
    ) {
        let mut inner = self.lock();
        inner.config = Arc::new(config);
        inner.secrets = Arc::new(secrets);
    }

    /// The operator's configuration for this plugin.
    pub fn config(&self) -> Arc<BTreeMap<String, String>> {
        Arc::clone(&self.lock().config)
    }

    /// One of the plugin's secrets, if the operator gave it one by that name.
    pub fn secret(&self, name: &str) -> Option<String> {
        self.lock().secrets.get(name).map(|s| s.0.clone())
    }

    /// The id of the call running now (0 between calls). Plugin code with native
    /// access could read it from the worker's memory anyway; the hostile test
    /// worker uses it to forge host calls the supervisor would accept.
    pub fn current_call(&self) -> RequestId {
        self.lock().current_call
    }

    pub(crate) fn set_current_call(&self, id: RequestId) {
        self.lock().current_call = id;
    }

    /// Send a log line to the supervisor, cut to [`MAX_LOG`] bytes (saying so).
    /// Logging never fails the plugin: if the supervisor is gone, the worker notices
    /// on its next read.
    pub fn log(&self, level: LogLevel, mut message: String) {
        if message.len() > MAX_LOG {
            let mut cut = MAX_LOG;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            let total = message.len();
            message.truncate(cut);
            message.push_str(&format!(" [cut: {total} bytes in all]"));
        }
        let _ = self.send(&FromWorker::Log { level, message });
    }

    /// The supervisor's wall clock in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> Result<i64, HostError> {
        match self.call(HostOp::Now)? {
            HostReply::Time(ms) => Ok(ms),
            other => Err(HostError::Failed(format!(
                "supervisor answered `now` with {other:?}"
            ))),
        }
    }

    /// Ask the supervisor to perform `op` and wait for its answer.
    pub fn call(&self, op: HostOp) -> Result<HostReply, HostError> {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let call = inner.current_call;
        let buf = frame::encode(&FromWorker::HostCall { id, call, op })
            .map_err(|e| HostError::Failed(e.to_string()))?;
        inner
            .reader
            .get_ref()
            .write_all(&buf)
            .map_err(|e| HostError::Failed(format!("supervisor connection lost: {e}")))?;
        loop {
            let msg: ToWorker = frame::read_msg(&mut inner.reader, frame::MAX_FRAME)
                .map_err(|e| HostError::Failed(format!("supervisor connection lost: {e}")))?;
            match msg {
                ToWorker::HostResult { id: got, result } if got == id => return result,
                ToWorker::HostResult { id: got, .. } => {
                    return Err(HostError::Failed(format!(
                        "supervisor answered host call {got}, expected {id}"
                    )));
                }
                other => inner.queued.push_back(other),
            }
        }
    }
}
