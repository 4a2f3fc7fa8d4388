//! The daemon's control socket: `corral call`, `corral list` and `corral stop` talk to
//! a running `corral serve` through it.
//!
//! The socket is a filesystem local socket (interprocess) created with mode 0600 in
//! a directory the supervisor creates with mode 0700 (or checks is not writable by
//! group or others), so only the supervisor's own user can dial it. Requests and
//! responses are the length-prefixed bincode frames of `corral-protocol`.

use crate::Supervisor;

use corral_protocol::{ControlRequest, ControlResponse, frame};
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::{Listener as _, Stream as _};
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// Why the control socket could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create control socket directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "control socket directory {} is writable by other users (mode {mode:o}); use a private directory",
        path.display()
    )]
    UnsafeDir { path: PathBuf, mode: u32 },
    #[error("another corral daemon is already listening on {}", path.display())]
    InUse { path: PathBuf },
    #[error("cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the corral daemon at {} (is `corral serve` running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control connection failed")]
    Frame(#[from] frame::FrameError),
}

pub use corral_client::default_socket_path;

/// Create (or check) the private directory that holds the socket.
fn private_dir(dir: &Path) -> Result<(), ControlError> {
    let err = |source| ControlError::Dir {
        path: dir.to_owned(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            let mode = meta.permissions().mode() & 0o7777;
            if meta.uid() != uid || mode & 0o022 != 0 {
                return Err(ControlError::UnsafeDir {
                    path: dir.to_owned(),
                    mode,
                });
            }
            Ok(())
        }
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(err),
    }
}

/// A bound control socket; removed from the filesystem when dropped.
#[derive(Debug)]
pub struct ControlServer {
    listener: Listener,
    path: PathBuf,
}

impl ControlServer {
    /// Bind the control socket at `path`. A stale socket left by a dead daemon is
    /// replaced; a live one is an error.
    pub async fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        private_dir(dir_of(path))?;
        remove_dead_staging(path);
        if path.exists() {
            if connect(path).await.is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_owned(),
                });
            }
            let _ = std::fs::remove_file(path);
        }
        let listen_err = |source| ControlError::Listen {
            path: path.to_owned(),
            source,
        };
        // Bound under a private name and renamed into place once it listens: a
        // client that finds the socket's file can connect to it. Never over a
        // socket that appeared meanwhile (another daemon starting at the same
        // time): that one stays, and this bind fails as `InUse`.
        let mut staging = path.as_os_str().to_owned();
        static BINDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BINDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        staging.push(format!(".{}.{n}.binding", std::process::id()));
        let staging = PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        let name = staging
            .as_path()
            .to_fs_name::<GenericFilePath>()
            .map_err(listen_err)?;
        let listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            .reclaim_name(false)
            .create_tokio()
            .map_err(listen_err)?;
        if let Err(e) = crate::plugins::versions::rename_new(&staging, path) {
            let _ = std::fs::remove_file(&staging);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => ControlError::InUse {
                    path: path.to_owned(),
                },
                _ => listen_err(e),
            });
        }
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serve requests until `stop` is notified or a client asks for shutdown; then
    /// return (the caller shuts the supervisor down).
    pub async fn serve(self, supervisor: Arc<Supervisor>, stop: Arc<Notify>) {
        // Failures (EMFILE while every descriptor is taken) are logged once per
        // ten seconds with a count, not every 50 ms.
        let mut failed_since_warning = 0u64;
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                conn = self.listener.accept() => match conn {
                    Ok(conn) => {
                        let sup = Arc::clone(&supervisor);
                        let stop = Arc::clone(&stop);
                        tokio::spawn(async move { handle_client(conn, sup, stop).await });
                    }
                    Err(e) => {
                        failed_since_warning += 1;
                        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(
                                "control socket accept failed ({failed_since_warning} times since \
                                 the last warning): {e}"
                            );
                            failed_since_warning = 0;
                            last_warning = Some(std::time::Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = stop.notified() => break,
            }
        }
    }
}

/// The directory `path` is in (`.` for a bare name such as `control.sock`).
fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Remove the staging names (`<path>.<pid>.<n>.binding`) of binds whose process
/// is gone: a daemon that died between binding and renaming left them. Only
/// sockets, and only of a pid that no longer exists.
fn remove_dead_staging(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let (dir, Some(name)) = (dir_of(path), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{name}.");
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|r| r.strip_suffix(".binding"))
            .and_then(|r| r.split('.').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        if !e.file_type().is_ok_and(|t| t.is_socket()) {
            continue;
        }
        // SAFETY: signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Requests one connection may have in flight. A client may send requests without
/// waiting for their answers (pipelining): they are served concurrently and answered
/// in the order they came, so a client that waits for each answer sees no change.
const PIPELINED: usize = 64;

/// What the requests in flight on one connection may hold of the daemon's memory
/// (their inputs): past it nothing more is read from the connection until some are
/// answered. A larger request (up to the frame limit) is still read, alone.
const PIPELINED_BYTES: usize = 16 << 20;

/// Bytes read from a client at once: a burst of pipelined small requests in one
/// `recv`, a single one whole.
const READ_BUFFER: usize = 8 << 10;

/// Answers past this size are not kept as the connection's write buffer.
const KEEP_BUFFER: usize = 1 << 20;

type ClientReader<'a> = tokio::io::BufReader<&'a Stream>;

/// What a client sent: a request, or a frame that is not one (answered with why,
/// after every earlier request, and then the connection is closed).
enum Asked {
    Request(ControlRequest),
    Bad(String),
}

/// Read one request, owning the reader, so the read can be kept across the other
/// branch of a `select!` (a partly read frame is never dropped).
async fn read_request(
    mut rd: ClientReader<'_>,
) -> (ClientReader<'_>, Result<ControlRequest, frame::FrameError>) {
    let r = frame::read_msg_async(&mut rd, frame::MAX_FRAME).await;
    (rd, r)
}

/// Bytes a request holds while it is in flight (its input).
fn held_by(req: &ControlRequest) -> usize {
    match req {
        ControlRequest::Call {
            plugin,
            function,
            input,
            ..
        } => input.len() + plugin.len() + function.len(),
        ControlRequest::Explain { plugin, .. } => plugin.len(),
        ControlRequest::List | ControlRequest::Shutdown | ControlRequest::Policy => 0,
    }
}

/// The requests in flight on one connection, answered in the order they came.
///
/// A request alone in flight is polled directly with the connection's own waker:
/// `FuturesOrdered` wakes its task again whenever every future in it was polled
/// and is still pending (to let other tasks run), which for the usual single
/// request sent the connection's task through the runtime's queue, and to the
/// other thread, at every call. As soon as a second one comes, the first joins
/// the queue at its front: every request in flight is polled (and so dispatched)
/// while the older ones run.
struct InOrder<F: Future> {
    head: Option<std::pin::Pin<Box<F>>>,
    rest: futures_util::stream::FuturesOrdered<std::pin::Pin<Box<F>>>,
}

impl<F: Future> InOrder<F> {
    fn new() -> Self {
        InOrder {
            head: None,
            rest: futures_util::stream::FuturesOrdered::new(),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    fn push(&mut self, fut: F) {
        let fut = Box::pin(fut);
        if self.rest.is_empty() {
            match self.head.take() {
                None => self.head = Some(fut),
                Some(head) => {
                    self.rest.push_back(head);
                    self.rest.push_back(fut);
                }
            }
        } else {
            self.rest.push_back(fut);
        }
    }

    /// The oldest answer, when it is ready (pending while none is in flight).
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        use futures_util::StreamExt;
        use std::task::Poll;
        if let Some(head) = &mut self.head {
            // Only when `rest` is empty: a head is never left behind others.
            let out = std::task::ready!(head.as_mut().poll(cx));
            self.head = None;
            return Poll::Ready(out);
        }
        match self.rest.poll_next_unpin(cx) {
            Poll::Ready(Some(out)) => Poll::Ready(out),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    async fn next(&mut self) -> F::Output {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

async fn handle_client(conn: Stream, supervisor: Arc<Supervisor>, stop: Arc<Notify>) {
    use futures_util::FutureExt;
    let conn = &conn;
    let read = read_request(tokio::io::BufReader::with_capacity(READ_BUFFER, conn));
    tokio::pin!(read);
    let mut answers = InOrder::new();
    // Input bytes of the requests in flight.
    let mut held = 0usize;
    let mut reading = true;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            (rd, req) = &mut read,
                if reading && answers.len() < PIPELINED && held < PIPELINED_BYTES =>
            {
                let asked = match req {
                    Ok(req) => Asked::Request(req),
                    Err(frame::FrameError::Closed) => {
                        reading = false;
                        continue;
                    }
                    // Say why, then hang up: the stream position is unknown.
                    Err(e) => {
                        reading = false;
                        Asked::Bad(e.to_string())
                    }
                };
                let size = match &asked {
                    Asked::Request(req) => held_by(req),
                    Asked::Bad(_) => 0,
                };
                held += size;
                answers.push(answer(asked, &supervisor, &stop, size));
                if reading {
                    read.set(read_request(rd));
                }
            }
            first = answers.next(), if answers.len() > 0 => {
                let mut ready = Some(first);
                // Answers already there leave in the same write.
                while let Some((resp, size)) = ready {
                    held -= size;
                    let buf = frame::encode(&resp).or_else(|e| {
                        frame::encode(&ControlResponse::Rejected(format!(
                            "the answer cannot be sent: {e}"
                        )))
                    });
                    let Ok(buf) = buf else { return };
                    out.extend_from_slice(&buf);
                    ready = answers.next().now_or_never();
                }
                let mut wr = conn;
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
                if out.capacity() > KEEP_BUFFER {
                    out = Vec::new();
                }
            }
            else => return,
        }
    }
}

/// The answer to one request, with the bytes it held.
async fn answer(
    asked: Asked,
    supervisor: &Supervisor,
    stop: &Notify,
    held: usize,
) -> (ControlResponse, usize) {
    let req = match asked {
        Asked::Request(req) => req,
        Asked::Bad(why) => return (ControlResponse::Rejected(why), held),
    };
    let resp = match req {
        ControlRequest::Call {
            plugin,
            function,
            input,
            timeout_ms,
        } => {
            let timeout = timeout_ms.map(Duration::from_millis);
            ControlResponse::Called(supervisor.call(&plugin, &function, input, timeout).await)
        }
        ControlRequest::List => ControlResponse::Plugins(supervisor.list().await),
        ControlRequest::Policy => ControlResponse::Policy(corral_protocol::PolicyStatus {
            sources: supervisor
                .policy()
                .sources
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            reload_error: supervisor.policy_error(),
            plugin_errors: supervisor.lifecycle_errors().await,
            config_error: supervisor.config_error().0,
            config_pending: supervisor.config_error().1,
            workers: supervisor.workers(),
        }),
        ControlRequest::Explain { plugin, json } => ControlResponse::Explained(
            supervisor
                .explain(&plugin)
                .map(|e| {
                    if json {
                        crate::cli::output::effective_json(&e).to_string()
                    } else {
                        e.to_string()
                    }
                })
                .ok_or_else(|| format!("no plugin {plugin:?} in this daemon")),
        ),
        ControlRequest::Shutdown => {
            stop.notify_one();
            ControlResponse::ShuttingDown
        }
    };
    (resp, held)
}

async fn connect(path: &Path) -> Result<Stream, ControlError> {
    let conn_err = |source| ControlError::Connect {
        path: path.to_owned(),
        source,
    };
    let name = path.to_fs_name::<GenericFilePath>().map_err(conn_err)?;
    Stream::connect(name).await.map_err(conn_err)
}

/// A client of a running daemon.
#[derive(Debug)]
pub struct ControlClient {
    conn: Stream,
}

impl ControlClient {
    pub async fn connect(path: &Path) -> Result<ControlClient, ControlError> {
        Ok(ControlClient {
            conn: connect(path).await?,
        })
    }

    /// Send one request and wait for its response.
    pub async fn request(&mut self, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
        let buf = frame::encode(req)?;
        self.conn
            .write_all(&buf)
            .await
            .map_err(frame::FrameError::Io)?;
        Ok(frame::read_msg_async(&mut self.conn, frame::MAX_FRAME).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::InOrder;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Wake, Waker};
    use tokio::sync::oneshot;

    /// A waker that counts how often it was woken.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker, and how often it was woken.
    fn counting_waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&count), Waker::from(count))
    }

    async fn answer(rx: oneshot::Receiver<u32>) -> u32 {
        rx.await.unwrap()
    }

    /// Two daemons binding one path at once: exactly one listens there, the other
    /// is told it is in use (never a socket silently replaced), every time.
    #[test]
    fn of_two_binds_at_once_one_listens_and_the_other_is_refused() {
        use super::{ControlError, ControlServer};
        let dir = tempfile::tempdir().unwrap();
        for round in 0..40 {
            let path = dir.path().join(format!("run/control-{round}.sock"));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let binds: Vec<_> = (0..2)
                .map(|_| {
                    let (path, barrier) = (path.clone(), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        barrier.wait();
                        rt.block_on(ControlServer::bind(&path))
                            .map(|server| (server, rt))
                    })
                })
                .collect();
            let results: Vec<_> = binds.into_iter().map(|t| t.join().unwrap()).collect();
            let bound = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(bound, 1, "round {round}: {results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert!(
                        matches!(e, ControlError::InUse { .. }),
                        "round {round}: {e}"
                    );
                }
            }
            // What is left in the directory: the socket, and no staging name.
            let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.starts_with(&format!("control-{round}.")))
                .collect();
            assert_eq!(names, [format!("control-{round}.sock")], "round {round}");
        }
    }

    /// The staging name a dead daemon left is removed by the next bind; a live
    /// one's (a bind under way) is not.
    #[test]
    fn a_bind_removes_the_staging_names_of_dead_binders_only() {
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("control.sock");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_name = dir.path().join(format!("control.sock.{dead}.0.binding"));
        let live_name = dir
            .path()
            .join(format!("control.sock.{}.99.binding", std::process::id()));
        let not_socket = dir.path().join(format!("control.sock.{dead}.1.binding"));
        drop(std::os::unix::net::UnixListener::bind(&dead_name).unwrap());
        drop(std::os::unix::net::UnixListener::bind(&live_name).unwrap());
        std::fs::write(&not_socket, b"not ours").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(super::ControlServer::bind(&path)).unwrap();
        assert!(!dead_name.exists(), "the dead binder's name is left");
        assert!(live_name.exists(), "a live binder's name was removed");
        assert!(not_socket.exists(), "a file that is no socket was removed");
        assert!(path.exists());
        drop(server);
    }

    #[test]
    fn answers_leave_in_the_order_they_came_whichever_finishes_first() {
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut q = InOrder::new();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..4).map(|_| oneshot::channel::<u32>()).unzip();
        for rx in rxs {
            q.push(answer(rx));
        }
        assert_eq!(q.len(), 4);
        let mut txs: Vec<_> = txs.into_iter().map(Some).collect();
        // The last three finish first: nothing may leave before the first.
        for (i, tx) in txs.iter_mut().enumerate().skip(1) {
            tx.take().unwrap().send(i as u32 * 10).unwrap();
        }
        assert!(q.poll_next(&mut cx).is_pending());
        txs[0].take().unwrap().send(0).unwrap();
        let mut out = Vec::new();
        while let Poll::Ready(v) = q.poll_next(&mut cx) {
            out.push(v);
        }
        assert_eq!(out, [0, 10, 20, 30]);
        assert_eq!(q.len(), 0);
        // Empty: pending, not finished.
        assert!(q.poll_next(&mut cx).is_pending());
    }

    #[test]
    fn a_request_pushed_behind_others_stays_behind_them() {
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut q = InOrder::new();
        let (a_tx, a) = oneshot::channel();
        let (b_tx, b) = oneshot::channel();
        q.push(answer(a));
        q.push(answer(b));
        b_tx.send(2).unwrap();
        assert!(q.poll_next(&mut cx).is_pending());
        // The oldest leaves; one pushed now goes behind `b`, the oldest left.
        a_tx.send(1).unwrap();
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(1));
        let (c_tx, c) = oneshot::channel();
        q.push(answer(c));
        c_tx.send(3).unwrap();
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(2));
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(3));
    }

    #[test]
    fn every_request_in_flight_is_polled_while_the_oldest_waits() {
        let (_, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut q = InOrder::new();
        let polled = Arc::new(AtomicUsize::new(0));
        let (a_tx, a) = oneshot::channel();
        let (b_tx, b) = oneshot::channel();
        let (c_tx, c) = oneshot::channel();
        for rx in [a, b, c] {
            let polled = Arc::clone(&polled);
            q.push(async move {
                // What a request does when first polled (its call dispatched).
                polled.fetch_add(1, Ordering::SeqCst);
                rx.await.unwrap()
            });
        }
        assert!(q.poll_next(&mut cx).is_pending());
        // All three were started, not only the oldest.
        assert_eq!(polled.load(Ordering::SeqCst), 3);
        c_tx.send(3).unwrap();
        b_tx.send(2).unwrap();
        assert!(q.poll_next(&mut cx).is_pending());
        a_tx.send(1).unwrap();
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(1));
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(2));
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(3));
    }

    #[test]
    fn a_lone_pending_request_does_not_wake_its_task_again() {
        let (count, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut q = InOrder::new();
        let (tx, rx) = oneshot::channel();
        q.push(answer(rx));
        for _ in 0..3 {
            assert!(q.poll_next(&mut cx).is_pending());
        }
        // Only the answer itself wakes the connection's task.
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        tx.send(7).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_next(&mut cx), Poll::Ready(7));
    }
}
