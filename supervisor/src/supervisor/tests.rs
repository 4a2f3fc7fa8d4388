//! The supervisor's core with fake workers: an in-process [`Launcher`] whose
//! workers speak the real protocol over a socketpair, so the handshake, the load,
//! the connection task and every call path run for real, without a process.
//! Each test fails if the logic it names breaks.

use super::start::{Launch, Launched, Launcher};
use super::*;
use crate::worker::connection::MAX_ERROR_TEXT;
use crate::worker::output::Output;
use crate::worker::process::Process;
use crate::worker::{BoxFuture, SpawnSpec, StartError};
use corral_confine::SelfConfinement;
use corral_protocol::{
    CallError, EnforcementReport, ExitReason, FromWorker, Hello, Runtime, ToWorker, frame,
};
use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, watch};

/// How one fake worker behaves.
#[derive(Debug, Clone)]
struct Script {
    /// What `version` answers.
    tag: &'static str,
    /// `Some`: the load fails with this error.
    load_error: Option<&'static str>,
    /// The load never answers (an `init` that never returns).
    load_hangs: bool,
    /// After its `LoadFailed` the worker does not exit (hostile code in `init`).
    stays_after_load_error: bool,
    /// A kill takes effect half a second late (the worker keeps sending).
    dies_slowly: bool,
    /// The load's deadline (the plugin's `init`).
    init_deadline_ms: u64,
    /// The load answers only once [`FakeLauncher::open_loads`] is called.
    load_held: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            tag: "v1",
            load_error: None,
            load_hangs: false,
            stays_after_load_error: false,
            dies_slowly: false,
            init_deadline_ms: 1000,
            load_held: false,
        }
    }
}

const EXPORTS: [&str; 24] = [
    "echo",
    "version",
    "hold",
    "crash",
    "hang",
    "forge",
    "oversize",
    "host_flood",
    "host_dup",
    "stats",
    "late",
    "log_flood",
    "log_huge",
    "oversize_frame",
    "host_unread",
    "ahead",
    "deaf",
    "close_and_stay",
    "orphan_logs",
    "forge_error",
    "long_error",
    "answer_unread",
    "long_names",
    "call_then_crash",
];

/// What one fake worker received, in order.
#[derive(Debug, Default)]
struct Journal(StdMutex<Vec<String>>, AtomicBool);

impl Journal {
    fn push(&self, what: String) {
        self.0.lock().unwrap().push(what);
    }
    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    /// Whether the worker was killed.
    fn killed(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }
}

/// Starts fake workers: `version` answers the script's tag, `echo` its input,
/// `hold` waits for [`FakeLauncher::release`], `crash` exits with code 3, `hang`
/// never answers.
#[derive(Debug, Default)]
struct FakeLauncher {
    scripts: StdMutex<VecDeque<Script>>,
    launches: AtomicU32,
    release: Arc<Notify>,
    /// One journal per worker started, in start order.
    journals: StdMutex<Vec<Arc<Journal>>>,
    /// Scripts for the workers of one plugin, before `scripts`.
    by_plugin: StdMutex<HashMap<String, VecDeque<Script>>>,
    /// Set by [`FakeLauncher::open_loads`]: held loads answer.
    loads_open: Arc<watch::Sender<bool>>,
}

impl FakeLauncher {
    fn next(&self, script: Script) {
        self.scripts.lock().unwrap().push_back(script);
    }
    /// Whether worker `n` was told to shut down (its last frame).
    fn shut_down(&self, n: usize) -> bool {
        self.journal(n).last().is_some_and(|e| e == "shutdown")
    }
    /// The script of the next worker started for `plugin`.
    fn next_for(&self, plugin: &str, script: Script) {
        self.by_plugin
            .lock()
            .unwrap()
            .entry(plugin.to_owned())
            .or_default()
            .push_back(script);
    }
    /// Let every held load (and every one to come) answer.
    fn open_loads(&self) {
        self.loads_open.send_replace(true);
    }
    fn journal(&self, n: usize) -> Vec<String> {
        self.journals.lock().unwrap()[n].entries()
    }
    fn launches(&self) -> u32 {
        self.launches.load(Ordering::SeqCst)
    }
    /// Let every held call answer.
    fn release(&self) {
        self.release.notify_waiters();
    }
}

/// The fake worker's process: it "exits" when its task ends or is killed.
struct FakeProcess {
    pid: u32,
    status: watch::Receiver<Option<ExitStatus>>,
    kill: Arc<Notify>,
}

/// As a real worker's `Child` (`kill_on_drop`): a process whose handle is dropped
/// is killed.
impl Drop for FakeProcess {
    fn drop(&mut self) {
        self.kill.notify_one();
    }
}

impl Process for FakeProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn verify(&self, _hello: &mut Hello) -> Result<(), crate::VerifyError> {
        Ok(())
    }
    fn start_kill(&mut self) {
        self.kill.notify_one();
    }
    fn try_wait(&mut self) -> Option<ExitStatus> {
        *self.status.borrow()
    }
    fn wait(&mut self) -> BoxFuture<'_, Option<ExitStatus>> {
        Box::pin(async move {
            let s = self.status.wait_for(Option::is_some).await.ok()?;
            *s
        })
    }
}

impl Launcher for FakeLauncher {
    fn launch<'a>(&'a self, req: Launch<'a>) -> BoxFuture<'a, Result<Launched, StartError>> {
        Box::pin(async move {
            let n = self.launches.fetch_add(1, Ordering::SeqCst);
            let id = &req.plugin.manifest.id;
            let own = self
                .by_plugin
                .lock()
                .unwrap()
                .get_mut(id)
                .and_then(|q| q.pop_front());
            let script = own
                .or_else(|| self.scripts.lock().unwrap().pop_front())
                .unwrap_or_default();
            let journal = Arc::new(Journal::default());
            self.journals.lock().unwrap().push(Arc::clone(&journal));
            let (ours, theirs) = tokio::net::UnixStream::pair().map_err(StartError::Socket)?;
            let (status_tx, status) = watch::channel(None);
            let kill = Arc::new(Notify::new());
            let init_deadline_ms = script.init_deadline_ms;
            tokio::spawn(fake_worker(
                theirs,
                script,
                journal,
                Arc::clone(&self.release),
                self.loads_open.subscribe(),
                Arc::clone(&kill),
                status_tx,
            ));
            let spec = SpawnSpec {
                program: "fake".into(),
                runtime: Runtime::Js,
                plugin_id: req.plugin.manifest.id.clone(),
                env: Vec::new(),
                handshake_timeout: Duration::from_millis(500),
                kill_grace: Duration::from_millis(200),
                confine: SelfConfinement {
                    level: req.effective.level.value,
                    read: Vec::new(),
                    write: Vec::new(),
                    tmpfs_bytes: 0,
                    runtime: Runtime::Js,
                    run_as: None,
                    hide: Vec::new(),
                    own_pids: false,
                },
                cgroup: None,
                cgroup_unavailable: Some("fake worker".into()),
                broker: req.broker,
                redactor: req.plugin.redactor.clone(),
                files: None,
                budgets: crate::worker::Budgets {
                    log_rate: req.effective.log_rate.value,
                    host_calls: req.effective.host_calls.value as usize,
                },
                artifact: None,
                templates: None,
            };
            let load = corral_protocol::LoadSpec {
                plugin_id: req.plugin.manifest.id.clone(),
                plugin_dir: String::new(),
                entry: String::new(),
                limits: corral_protocol::EngineLimits {
                    memory_bytes: 0,
                    max_output_bytes: 1 << 20,
                    init_deadline_ms,
                },
                code: corral_protocol::Code::Compile,
                config: Default::default(),
                secrets: Default::default(),
            };
            let process = Box::new(FakeProcess {
                pid: 4_000_000 + n,
                status,
                kill,
            });
            let output = Output::new(spec.budgets.log_rate);
            output.tail.close();
            let w = WorkerHandle::connect(&spec, load, process, ours, output).await?;
            Ok((w, None))
        })
    }
}

async fn fake_worker(
    stream: tokio::net::UnixStream,
    script: Script,
    journal: Arc<Journal>,
    release: Arc<Notify>,
    loads_open: watch::Receiver<bool>,
    kill: Arc<Notify>,
    status: watch::Sender<Option<ExitStatus>>,
) {
    let dies_slowly = script.dies_slowly;
    let killed = Arc::clone(&journal);
    let serving = serve(stream, script, journal, release, loads_open);
    tokio::pin!(serving);
    let code = tokio::select! {
        code = &mut serving => code,
        () = kill.notified() => {
            killed.1.store(true, Ordering::SeqCst);
            if dies_slowly {
                let _ = tokio::time::timeout(Duration::from_millis(500), &mut serving).await;
            }
            libc::SIGKILL
        }
    };
    // A code below 256 is an exit code; SIGKILL is sent as a raw wait status.
    let raw = if code == libc::SIGKILL {
        code
    } else {
        code << 8
    };
    let _ = status.send(Some(ExitStatus::from_raw(raw)));
}

/// The worker side of the protocol; returns the exit code (or SIGKILL).
async fn serve(
    stream: tokio::net::UnixStream,
    script: Script,
    journal: Arc<Journal>,
    release: Arc<Notify>,
    mut loads_open: watch::Receiver<bool>,
) -> i32 {
    let (mut rd, mut wr) = stream.into_split();
    let hello = Hello {
        runtime: Runtime::Js,
        engine_version: "fake 1".into(),
        pid: 1,
        enforcement: EnforcementReport::unconfined("fake worker"),
        runtime_files: Vec::new(),
    };
    if wr
        .write_all(&frame::encode_hello(&hello).unwrap())
        .await
        .is_err()
    {
        return 1;
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<FromWorker>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if wr.write_all(&frame::encode(&m).unwrap()).await.is_err() {
                break;
            }
        }
    });
    // Answers leave in the order the calls came, as from a real worker (which
    // runs one call at a time): a call sent behind a held one is answered after it.
    let (atx, mut arx) = mpsc::unbounded_channel::<(u64, FromWorker)>();
    let in_order = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let (mut next, mut parked) = (0u64, std::collections::BTreeMap::new());
            while let Some((n, m)) = arx.recv().await {
                parked.insert(n, m);
                while let Some(m) = parked.remove(&next) {
                    let _ = tx.send(m);
                    next += 1;
                }
            }
        })
    };
    let mut seq = 0u64;
    // Set by `ahead`: the next call is answered at once, before `ahead` (which
    // never is): answers out of order.
    let mut ahead = false;
    let mut holds = tokio::task::JoinSet::new();
    let code = loop {
        let msg: ToWorker = match frame::read_msg_async(&mut rd, frame::MAX_FRAME).await {
            Ok(m) => m,
            Err(_) => break 0,
        };
        match msg {
            ToWorker::Load(_) => {
                journal.push("load".into());
                if script.load_hangs {
                    std::future::pending::<()>().await;
                }
                if script.load_held {
                    let _ = loads_open.wait_for(|open| *open).await;
                }
                if let Some(e) = script.load_error {
                    let _ = tx.send(FromWorker::LoadFailed { error: e.into() });
                    if script.stays_after_load_error {
                        std::future::pending::<()>().await;
                    }
                    break 1;
                }
                let exports = EXPORTS.iter().map(|e| e.to_string()).collect();
                let _ = tx.send(FromWorker::Loaded { exports });
            }
            ToWorker::Call {
                id,
                function,
                input,
                ..
            } => {
                journal.push(format!("call {function}"));
                if input.starts_with(b"order-") {
                    journal.push(String::from_utf8_lossy(&input).into_owned());
                }
                if std::mem::take(&mut ahead) {
                    journal.push(format!("answered {function} ahead"));
                    let _ = tx.send(FromWorker::CallResult {
                        id,
                        result: Ok(input),
                    });
                    continue;
                }
                let n = seq;
                seq += 1;
                let answer = move |result| (n, FromWorker::CallResult { id, result });
                match function.as_str() {
                    "echo" => drop(atx.send(answer(Ok(input)))),
                    "version" => drop(atx.send(answer(Ok(script.tag.as_bytes().to_vec())))),
                    "hold" => {
                        let (tx, release, journal) =
                            (atx.clone(), Arc::clone(&release), Arc::clone(&journal));
                        let released = release.notified_owned();
                        holds.spawn(async move {
                            released.await;
                            journal.push("released".into());
                            let _ = tx.send(answer(Ok(b"held".to_vec())));
                        });
                    }
                    "crash" => break 3,
                    // Calls `other`'s `hold` through the host, then exits.
                    "call_then_crash" => {
                        let op = corral_protocol::HostOp::Call {
                            plugin: "other".into(),
                            function: "hold".into(),
                            input: Vec::new(),
                        };
                        let _ = tx.send(FromWorker::HostCall {
                            id: 1,
                            call: id,
                            op,
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        break 3;
                    }
                    "ahead" => ahead = true,
                    // Takes no more frames (writes to it fail), and never answers.
                    "deaf" => {
                        use std::os::fd::AsRawFd;
                        // SAFETY: shutdown takes the socket's descriptor, which `rd`
                        // keeps open.
                        unsafe { libc::shutdown(rd.as_ref().as_raw_fd(), libc::SHUT_RD) };
                    }
                    // Closes its socket (as `close(3)` would, for the supervisor)
                    // and stays, answering nothing, until killed.
                    "close_and_stay" => {
                        use std::os::fd::AsRawFd;
                        // SAFETY: shutdown takes the socket's descriptor, which `rd`
                        // keeps open.
                        unsafe { libc::shutdown(rd.as_ref().as_raw_fd(), libc::SHUT_RDWR) };
                        std::future::pending::<()>().await;
                    }
                    // Exits (code 3) and leaves behind something that holds its
                    // socket and sends a log line every 10 ms for as long as it can
                    // (a process it forked, at a level without a PID namespace).
                    "orphan_logs" => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            loop {
                                let level = corral_protocol::LogLevel::Info;
                                let message = "still here".to_owned();
                                if tx.send(FromWorker::Log { level, message }).is_err() {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        });
                        // Not the orderly end below, which waits for the writer.
                        return 3;
                    }
                    // Hostile: what a worker running someone else's code may send.
                    "forge" => drop(tx.send(FromWorker::CallResult {
                        id: id + 1000,
                        result: Ok(b"forged".to_vec()),
                    })),
                    "oversize" => drop(atx.send(answer(Ok(vec![0; (1 << 20) + 1])))),
                    "forge_error" => drop(atx.send(answer(Err(CallError::ShuttingDown)))),
                    "long_error" => drop(atx.send(answer(Err(CallError::Plugin {
                        message: "é".repeat(1 << 19),
                    })))),
                    "host_flood" => {
                        // Host calls performed on tasks of their own (`now` and
                        // `kv.get` are answered as they are read, never in flight).
                        for n in 0..64 {
                            let op = corral_protocol::HostOp::KvKeys { prefix: "".into() };
                            let _ = tx.send(FromWorker::HostCall {
                                id: n,
                                call: id,
                                op,
                            });
                        }
                    }
                    "host_unread" => {
                        // Host calls one at a time, never reading an answer: once the
                        // socket's buffer is full, the answers wait in the supervisor.
                        // Three at a time (within the four in flight), as fast as that.
                        for n in 0..100_000 {
                            let op = corral_protocol::HostOp::Now;
                            let host_call = FromWorker::HostCall {
                                id: n,
                                call: id,
                                op,
                            };
                            if tx.send(host_call).is_err() {
                                break;
                            }
                            if n % 3 == 2 {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                    }
                    "long_names" => {
                        // A topic of 1.5 MiB of DEL (six bytes each, escaped) and a
                        // call to a plugin of 1.5 MiB of name; then the answer.
                        let topic = "\u{7f}".repeat(3 << 19);
                        let ops = [
                            corral_protocol::HostOp::Publish {
                                topic,
                                payload: Vec::new(),
                            },
                            corral_protocol::HostOp::Call {
                                plugin: "p".repeat(3 << 19),
                                function: "f".into(),
                                input: Vec::new(),
                            },
                        ];
                        for (n, op) in ops.into_iter().enumerate() {
                            let _ = tx.send(FromWorker::HostCall {
                                id: n as u64 + 1,
                                call: id,
                                op,
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = atx.send(answer(Ok(b"asked".to_vec())));
                    }
                    "answer_unread" => {
                        // 1 MiB stored, asked back, and then nothing read, ever:
                        // the answer waits in the supervisor, the call never ends.
                        let put = corral_protocol::HostOp::KvPut {
                            key: "big".into(),
                            value: vec![7; 1 << 20],
                        };
                        let _ = tx.send(FromWorker::HostCall {
                            id: 1,
                            call: id,
                            op: put,
                        });
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let get = corral_protocol::HostOp::KvGet { key: "big".into() };
                        let _ = tx.send(FromWorker::HostCall {
                            id: 2,
                            call: id,
                            op: get,
                        });
                        std::future::pending::<()>().await;
                    }
                    "host_dup" => {
                        for _ in 0..2 {
                            let op = corral_protocol::HostOp::KvKeys { prefix: "".into() };
                            let _ = tx.send(FromWorker::HostCall {
                                id: 7,
                                call: id,
                                op,
                            });
                        }
                    }
                    "stats" => drop(tx.send(FromWorker::Stats(Default::default()))),
                    "log_huge" => {
                        let message = "x".repeat(1 << 20);
                        let level = corral_protocol::LogLevel::Info;
                        let _ = tx.send(FromWorker::Log { level, message });
                    }
                    "oversize_frame" => drop(atx.send(answer(Ok(vec![0; 3 << 20])))),
                    "log_flood" => {
                        // 16 MiB of log lines of 64 KiB each (the most a line may
                        // be), then an answer.
                        for _ in 0..256 {
                            let message = "x".repeat(64 << 10);
                            let level = corral_protocol::LogLevel::Info;
                            let _ = tx.send(FromWorker::Log { level, message });
                        }
                        let _ = atx.send(answer(Ok(b"logged".to_vec())));
                    }
                    _ => {} // "hang", and "late": answered after the deadline
                }
                if function == "late" {
                    let tx = atx.clone();
                    holds.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = tx.send(answer(Ok(b"late".to_vec())));
                    });
                }
            }
            ToWorker::Shutdown { .. } => {
                journal.push("shutdown".into());
                break 0;
            }
            other => journal.push(format!("unexpected {other:?}")),
        }
    };
    if code == 0 {
        // An orderly exit answers what it holds first.
        while holds.join_next().await.is_some() {}
    } else {
        // A crashed worker answers nothing more.
        holds.abort_all();
    }
    drop((tx, atx));
    let _ = in_order.await;
    let _ = writer.await;
    code
}

struct Fixture {
    sup: Supervisor,
    launcher: Arc<FakeLauncher>,
    id: String,
    _dir: tempfile::TempDir,
}

/// A JavaScript plugin `id` in `dir` (the fake launcher never runs its code).
fn write_plugin(dir: &std::path::Path, id: &str) {
    std::fs::write(
        dir.join("plugin.toml"),
        format!("id = \"{id}\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("main.js"),
        "export function echo(x) { return x }\n",
    )
    .unwrap();
}

fn fixture(tweak: impl FnOnce(&mut Options)) -> Fixture {
    fixture_with("", tweak)
}

/// [`fixture`] with `extra` appended to the plugin's `plugin.toml`.
fn fixture_with(extra: &str, tweak: impl FnOnce(&mut Options)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("fake");
    std::fs::create_dir(&plugin).unwrap();
    write_plugin(&plugin, "fake");
    let toml = plugin.join("plugin.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(&toml, text + extra).unwrap();
    let mut options = Options::new();
    options.cache_dir = Some(dir.path().join("cache"));
    options.state_dir = dir.path().join("state");
    options.cgroups = None;
    options.health_interval = Duration::from_secs(3600);
    tweak(&mut options);
    let launcher = Arc::new(FakeLauncher::default());
    let mut sup = Supervisor::with_launcher(options, Arc::clone(&launcher) as Arc<dyn Launcher>);
    let id = sup.add_plugin_dir(&plugin).unwrap();
    Fixture {
        sup,
        launcher,
        id,
        _dir: dir,
    }
}

impl Fixture {
    async fn call(&self, function: &str) -> Result<Vec<u8>, CallError> {
        self.sup
            .call(
                &self.id,
                function,
                b"in".to_vec(),
                Some(Duration::from_secs(2)),
            )
            .await
    }

    async fn state(&self) -> String {
        self.sup.list().await[0].state.clone()
    }

    /// A new version of the plugin (the same files) in a new worker, as a reload
    /// does; the old one is retired after its calls.
    async fn reload(&self, script: Script) {
        self.launcher.next(script);
        self.sup.inner().renew(&self.id).await.unwrap();
    }
}

/// That what began at `started` ended within `limit` (not a speed figure: what
/// would otherwise wait forever, or until a deadline, ended at once).
fn within(started: Instant, limit: Duration) {
    let took = started.elapsed();
    assert!(took < limit, "took {took:?}, more than {limit:?}");
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}

#[tokio::test]
async fn one_worker_serves_every_call_and_unknown_functions_are_named() {
    let f = fixture(|_| {});
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.call("version").await.unwrap(), b"v1");
    assert_eq!(f.launcher.launches(), 1);
    match f.call("missing").await {
        Err(CallError::UnknownFunction {
            function, exports, ..
        }) => {
            assert_eq!(function, "missing");
            assert_eq!(exports, EXPORTS.join(", "));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.launcher.journal(0), ["load", "call echo", "call version"]);
    f.sup.shutdown(Duration::from_secs(1)).await;
    assert_eq!(f.launcher.journal(0).last().unwrap(), "shutdown");
}

/// A worker's error of 1 MiB reaches the caller cut to 16 KiB, saying how long it
/// was; a worker exporting many functions is named
/// in an unknown function's error by as many as fit in 1 KiB, then a count.
#[tokio::test]
async fn what_a_worker_says_in_an_error_is_cut() {
    let f = fixture(|_| {});
    let cut = format!(
        "{} [cut: {} bytes in all]",
        "é".repeat(MAX_ERROR_TEXT / 2),
        1 << 20
    );
    match f.call("long_error").await {
        Err(CallError::Plugin { message }) => assert!(message == cut, "{}", message.len()),
        other => panic!("{other:?}"),
    }
    let many: Vec<String> = (0..10_000).map(|i| format!("function_{i:05}")).collect();
    let named = super::call::exports_named(&many);
    assert!(named.len() <= 1024 + 16, "{}", named.len());
    assert!(
        named.starts_with("function_00000, function_00001, "),
        "{named}"
    );
    assert!(named.ends_with(" and 9936 more"), "{named}");
    assert_eq!(
        super::call::exports_named(&many[..2]),
        "function_00000, function_00001"
    );
    f.sup.shutdown(Duration::from_secs(1)).await;
}

/// `status` says the process tree is not enforced for a worker without a cgroup (the
/// fake launcher makes none), and that it is for a plugin whose worker will have one.
#[tokio::test]
async fn the_process_tree_rule_says_when_a_worker_has_no_cgroup() {
    let f = fixture(|_| {});
    let tree = |info: &corral_protocol::PluginInfo| {
        info.supervision
            .iter()
            .find(|l| l.starts_with("process tree: "))
            .cloned()
            .unwrap()
    };
    let idle = tree(&f.sup.list().await[0]);
    assert!(
        idle.starts_with("process tree: everything in the worker's cgroup"),
        "{idle}"
    );
    f.call("echo").await.unwrap();
    let running = tree(&f.sup.list().await[0]);
    assert!(
        running.starts_with("process tree: not enforced, this worker has neither a cgroup"),
        "{running}"
    );
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_call_holding_a_retired_version_goes_to_the_new_one_unsent() {
    let f = fixture(|_| {});
    assert_eq!(f.call("version").await.unwrap(), b"v1");
    let old = f.sup.inner().plugin(&f.id).unwrap();
    f.reload(Script {
        tag: "v2",
        ..Script::default()
    })
    .await;
    assert!(old.retired.load(Ordering::SeqCst));
    // A call that looked the old version up before the reload.
    let out = f
        .sup
        .inner()
        .call_version(old, "version", Vec::new(), None, &[])
        .await
        .unwrap();
    assert_eq!(out, b"v2");
    assert_eq!(f.launcher.launches(), 2);
    // The old worker never saw the call: it answered one call and shut down.
    eventually("the old worker shuts down", || {
        f.launcher.journal(0).len() == 3
    })
    .await;
    assert_eq!(f.launcher.journal(0), ["load", "call version", "shutdown"]);
    assert_eq!(f.launcher.journal(1), ["load", "call version"]);
}

#[tokio::test]
async fn a_retired_worker_finishes_its_calls_before_it_shuts_down() {
    let f = fixture(|_| {});
    let sup = f.sup.clone();
    let id = f.id.clone();
    let held = tokio::spawn(async move { sup.call(&id, "hold", Vec::new(), None).await });
    eventually("the call is held", || {
        f.launcher.launches() == 1 && f.launcher.journal(0).contains(&"call hold".to_owned())
    })
    .await;
    let old = f.sup.inner().plugin(&f.id).unwrap();
    let old_worker = Arc::clone(old.state.lock().await.worker().unwrap());
    f.reload(Script {
        tag: "v2",
        ..Script::default()
    })
    .await;
    // New calls go to the new version while the old one drains.
    assert_eq!(f.call("version").await.unwrap(), b"v2");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(old_worker.is_alive(), "retired before its call finished");
    assert!(old_worker.is_retiring());
    assert_eq!(f.launcher.journal(0), ["load", "call hold"]);
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    eventually("the old worker exits", || !old_worker.is_alive()).await;
    assert_eq!(
        f.launcher.journal(0),
        ["load", "call hold", "released", "shutdown"]
    );
}

#[tokio::test]
async fn crashes_are_counted_and_the_plugin_fails_at_the_limit() {
    let f = fixture(|o| {
        o.restart = RestartPolicy {
            max_crashes: 3,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        }
    });
    for n in 1..=3u32 {
        match f.call("crash").await {
            Err(CallError::WorkerCrashed(ExitReason::Code(3))) => {}
            other => panic!("crash {n}: {other:?}"),
        }
        assert_eq!(f.launcher.launches(), n);
    }
    // The third crash is noticed at the next call: the plugin has failed, and
    // nothing more is started.
    match f.call("echo").await {
        Err(CallError::PluginFailed { crashes, last, .. }) => {
            assert_eq!(crashes, 3);
            assert!(last.contains("exited with code 3"), "{last}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.launcher.launches(), 3);
    assert_eq!(f.state().await, "failed");
    assert_eq!(f.sup.list().await[0].restarts, 2);
}

#[tokio::test]
async fn restarts_wait_the_backoff_of_the_crashes_before() {
    let f = fixture(|o| {
        o.restart = RestartPolicy {
            max_crashes: 10,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(300),
            max_backoff: Duration::from_millis(450),
        }
    });
    // The worker that crashes is started by the call; time the next start.
    let mut waits = Vec::new();
    for _ in 0..4 {
        assert!(f.call("crash").await.is_err());
        let t = Instant::now();
        assert_eq!(f.call("echo").await.unwrap(), b"in");
        waits.push(t.elapsed());
    }
    // Crashes 1, 2, 3, 4 in the window: no wait, 300 ms, 450 ms (600 capped), 450 ms.
    assert!(waits[0] < Duration::from_millis(250), "{waits:?}");
    assert!(waits[1] >= Duration::from_millis(300), "{waits:?}");
    assert!(waits[2] >= Duration::from_millis(450), "{waits:?}");
    assert!(waits[3] >= Duration::from_millis(450), "{waits:?}");
    assert_eq!(f.state().await, "running");
}

#[tokio::test]
async fn a_full_queue_answers_overloaded_and_frees_its_slots() {
    let f = fixture(|o| o.max_queue = 2);
    let mut held = Vec::new();
    for _ in 0..2 {
        let (sup, id) = (f.sup.clone(), f.id.clone());
        held.push(tokio::spawn(async move {
            sup.call(&id, "hold", Vec::new(), None).await
        }));
    }
    // One call runs in the worker; the other waits in the supervisor for it.
    eventually("both calls are admitted, one of them sent", || {
        f.launcher.launches() == 1
            && f.launcher
                .journal(0)
                .iter()
                .filter(|e| *e == "call hold")
                .count()
                == 1
            && f.sup.0.plugin(&f.id).unwrap().inflight.available_permits() == 0
    })
    .await;
    match f.call("echo").await {
        Err(CallError::Overloaded {
            reason: corral_protocol::Overload::Queue { queued },
            ..
        }) => assert_eq!(queued, 2),
        other => panic!("{other:?}"),
    }
    // The first answers; only then is the second sent.
    f.launcher.release();
    eventually("the second call is sent", || {
        f.launcher
            .journal(0)
            .iter()
            .filter(|e| *e == "call hold")
            .count()
            == 2
    })
    .await;
    f.launcher.release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"held");
    }
    assert_eq!(f.call("echo").await.unwrap(), b"in");
}

#[tokio::test]
async fn a_worker_that_misses_its_deadline_is_killed_and_not_counted_as_a_crash() {
    let f = fixture(|_| {});
    let t = f
        .sup
        .call(&f.id, "hang", Vec::new(), Some(Duration::from_millis(100)))
        .await;
    assert!(
        matches!(t, Err(CallError::Timeout { deadline_ms: 100 })),
        "{t:?}"
    );
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2, "a new worker after the kill");
    let info = &f.sup.list().await[0];
    assert_eq!(info.state, "running");
    assert!(
        info.last_error
            .as_deref()
            .is_some_and(|e| e.contains("missed a deadline")),
        "{info:?}"
    );
}

#[tokio::test]
async fn a_version_that_does_not_load_is_a_failed_start() {
    let f = fixture(|_| {});
    f.launcher.next(Script {
        load_error: Some("SyntaxError: nope"),
        ..Script::default()
    });
    match f.call("echo").await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains("SyntaxError: nope"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.state().await, "crashed");
    assert_eq!(f.call("echo").await.unwrap(), b"in");
}

/// A worker whose load failed and which does not exit is killed: its start ends,
/// and the plugin's next start is not held behind it.
#[tokio::test]
async fn a_worker_that_stays_after_its_load_failed_is_killed_and_the_next_start_goes_on() {
    let f = fixture(|o| o.restart.base_backoff = Duration::from_millis(1));
    f.launcher.next(Script {
        load_error: Some("Error: thrown from init"),
        stays_after_load_error: true,
        ..Script::default()
    });
    let started = Instant::now();
    let start = tokio::time::timeout(Duration::from_secs(10), f.call("echo")).await;
    match start.expect("the start ends") {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains("thrown from init"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(f.launcher.journals.lock().unwrap()[0].killed());
    within(started, Duration::from_secs(2));
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);
}

/// A worker that closes its socket and stays serves nothing: it is killed after
/// the grace, audited, and replaced; nothing waits for it, shutdown included.
#[tokio::test]
async fn a_worker_that_closes_its_socket_and_stays_is_killed_audited_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let f = fixture(|o| {
        o.audit = AuditSink::File(audit.clone());
        o.restart.base_backoff = Duration::from_millis(1);
    });
    let why = "its socket closed and it did not exit within 1s";
    match f.call("close_and_stay").await {
        Err(CallError::WorkerCrashed(ExitReason::Protocol(got))) => assert_eq!(got, why),
        other => panic!("{other:?}"),
    }
    assert!(f.launcher.journals.lock().unwrap()[0].killed());
    eventually("the violation is audited", || {
        audit_lines(&audit).iter().any(|l| {
            l["operation"] == "protocol" && l["rule"] == format!("protocol violation: {why}")
        })
    })
    .await;
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);

    // Shut down while a worker has just closed its socket and stays.
    let closing = f.sup.call(&f.id, "close_and_stay", Vec::new(), None);
    let _ = tokio::time::timeout(Duration::from_millis(100), closing).await;
    let stopped = tokio::time::timeout(
        Duration::from_secs(5),
        f.sup.shutdown(Duration::from_millis(200)),
    )
    .await;
    assert!(
        stopped.is_ok(),
        "shutdown waits for a worker without its socket"
    );
    assert!(f.launcher.journals.lock().unwrap()[1].killed());
}

/// What a worker sent just before it exited is read, but a process it left with
/// its socket does not keep the supervisor reading: the crash is seen and the
/// plugin restarts.
#[tokio::test]
async fn a_process_left_holding_an_exited_workers_socket_does_not_hold_its_end() {
    let f = fixture(|o| o.restart.base_backoff = Duration::from_millis(1));
    let started = Instant::now();
    match f.call("orphan_logs").await {
        Err(CallError::WorkerCrashed(ExitReason::Code(3))) => {}
        other => panic!("{other:?}"),
    }
    within(started, Duration::from_secs(1));
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);
    assert_eq!(f.sup.list().await[0].restarts, 1);
}

#[tokio::test]
async fn an_init_that_never_returns_is_killed_at_its_deadline() {
    let f = fixture(|_| {});
    f.launcher.next(Script {
        load_hangs: true,
        ..Script::default()
    });
    let t = Instant::now();
    match f.call("echo").await {
        Err(CallError::StartFailed { reason, .. }) => assert!(
            reason.contains("did not finish loading (top-level code and init) within 1.5s"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // The fake's init deadline (1 s) plus its handshake time (500 ms), not forever.
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(f.launcher.journal(0), ["load"]);
    // The next call starts a worker that loads.
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);
}

/// A worker whose `init` never returns holds nobody up: `list` answers at once and
/// shows the plugin starting, and a shutdown ends the start (its caller is told)
/// and kills the worker, long before the plugin's 30 s load deadline.
#[tokio::test]
async fn a_start_under_way_blocks_neither_list_nor_shutdown() {
    let f = fixture(|_| {});
    f.launcher.next(Script {
        load_hangs: true,
        init_deadline_ms: 30_000,
        ..Script::default()
    });
    let call = f.call("echo");
    let probe = async {
        eventually("the worker is loading", || {
            f.launcher.launches() == 1 && f.launcher.journal(0) == ["load"]
        })
        .await;
        let t = Instant::now();
        let list = f.sup.list().await;
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert_eq!(list[0].state, "starting");
        assert_eq!(list[0].pid, None);
        let t = Instant::now();
        f.sup.shutdown(Duration::from_secs(1)).await;
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    };
    let (answer, ()) = tokio::join!(call, probe);
    assert_eq!(answer, Err(CallError::ShuttingDown));
    eventually("the half-started worker is killed", || {
        f.launcher.journals.lock().unwrap()[0].killed()
    })
    .await;
    // And nothing starts after the stop.
    assert_eq!(f.call("echo").await, Err(CallError::ShuttingDown));
    assert_eq!(f.launcher.launches(), 1);
}

/// A worker that breaks the protocol is killed: its caller gets the violation by
/// name, the audit log says so, and the next call is served by a new worker.
#[tokio::test]
async fn a_worker_that_breaks_the_protocol_is_killed_audited_and_replaced() {
    let cases = [
        ("forge", "an answer to call 1001, which is not running"),
        (
            "oversize",
            "call 1 answered 1048577 bytes, past its max_output of 1048576 bytes",
        ),
        (
            "host_flood",
            "more than 4 host calls in flight (host_calls)",
        ),
        ("host_dup", "host call id 7 is already in flight"),
        (
            "forge_error",
            "call 1 answered with a shutting_down error, which only the supervisor gives",
        ),
        (
            "host_unread",
            "5 answers to its host calls not read (host_calls 4)",
        ),
        ("stats", "a Stats message nobody asked for"),
        // Refused from the frame's length and kind, before the rest is read.
        (
            "log_huge",
            "a Log frame of 1048583 bytes exceeds its limit of 81920 bytes",
        ),
        (
            "oversize_frame",
            "a CallResult frame of 3145736 bytes exceeds its limit of 2097152 bytes",
        ),
    ];
    for (function, why) in cases {
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.log");
        let f = fixture(|o| {
            o.audit = AuditSink::File(audit.clone());
            o.restart.base_backoff = Duration::from_millis(1);
        });
        let deadline = Some(Duration::from_secs(20));
        match f.sup.call(&f.id, function, b"in".to_vec(), deadline).await {
            Err(CallError::WorkerCrashed(ExitReason::Protocol(got))) => {
                assert_eq!(got, why, "{function}")
            }
            other => panic!("{function}: {other:?}"),
        }
        eventually("the violation is audited", || {
            audit_lines(&audit)
                .iter()
                .any(|l| l["operation"] == "protocol")
        })
        .await;
        let lines: Vec<serde_json::Value> = audit_lines(&audit)
            .into_iter()
            .filter(|l| l["operation"] == "protocol")
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "{function}: one line per violation: {lines:?}"
        );
        let line = &lines[0];
        assert_eq!(line["decision"], "killed", "{function}");
        assert_eq!(
            line["rule"],
            format!("protocol violation: {why}"),
            "{function}"
        );
        // A new worker serves; the plugin counts a crash.
        assert_eq!(f.call("echo").await.unwrap(), b"in", "{function}");
        assert_eq!(f.launcher.launches(), 2, "{function}");
        assert_eq!(f.sup.list().await[0].restarts, 1, "{function}");
        f.sup.shutdown(Duration::from_secs(1)).await;
    }
}

/// A worker's host calls end with it: a worker that calls another plugin through
/// the host and exits leaves no call behind holding the other plugin's queue (a
/// fresh worker would have added its own to it).
#[tokio::test]
async fn a_workers_host_calls_end_with_it() {
    let f = fixture(|o| {
        o.policy = standard_granting_fake("call = [\"other\"]");
    });
    let (other, _dir) = add_other(&f);
    // A long deadline: the host call would have held other's queue until then.
    let deadline = Some(Duration::from_secs(30));
    match f
        .sup
        .call(&f.id, "call_then_crash", Vec::new(), deadline)
        .await
    {
        Err(CallError::WorkerCrashed(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.launcher.journal(1),
        ["load", "call hold"],
        "other got the call"
    );
    let mut queued = u32::MAX;
    for _ in 0..100 {
        queued = state_of(&f.sup, &other).await.queued;
        if queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        queued, 0,
        "the dead worker's call to other still holds its queue"
    );
    f.launcher.release();
}

/// What a worker names in a host call comes back in an error cut: a topic of
/// 1.5 MiB that escapes to 9 MiB is quoted in 128 bytes and its length, a
/// plugin name of 1.5 MiB in a denial's rule in 16 KiB.
#[tokio::test]
async fn what_a_worker_names_in_a_host_call_comes_back_cut() {
    let f = fixture(|_| {});
    assert_eq!(f.call("long_names").await.unwrap(), b"asked");
    let answers: Vec<String> = f
        .launcher
        .journal(0)
        .into_iter()
        .filter(|e| e.starts_with("unexpected HostResult"))
        .collect();
    assert_eq!(answers.len(), 2, "{:.200?}", answers);
    assert!(
        answers[0].contains(r#"Invalid("topic \"\\u{7f}"#)
            && answers[0].contains("... (1572864 bytes): 1 to 256 bytes"),
        "{:.300}",
        answers[0]
    );
    assert!(answers[0].len() < 2 << 10, "{} bytes", answers[0].len());
    assert!(
        answers[1].contains("Denied") && answers[1].contains("[cut: "),
        "{:.300}",
        answers[1]
    );
    assert!(answers[1].len() < 17 << 10, "{} bytes", answers[1].len());
}

/// A worker that asks for 1 MiB and does not read the answer is killed once the
/// answer has waited [`crate::worker::connection::ANSWER_WRITE_TIME`], as a
/// protocol violation, audited; the next call gets a new worker. (Without it, an
/// idle worker kept its unread answers for as long as nobody called it.)
#[tokio::test]
async fn a_worker_that_does_not_read_an_answer_it_asked_for_is_killed_audited_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let f = fixture(|o| {
        o.policy = standard_granting_fake("kv_quota = \"4MiB\"");
        o.audit = AuditSink::File(audit.clone());
        o.restart.base_backoff = Duration::from_millis(1);
    });
    let why = "it did not read the answer to its host call within 500ms";
    let t = Instant::now();
    match f.call("answer_unread").await {
        Err(CallError::WorkerCrashed(ExitReason::Protocol(got))) => assert_eq!(got, why),
        other => panic!("{other:?}"),
    }
    within(t, Duration::from_secs(2));
    assert!(f.launcher.journals.lock().unwrap()[0].killed());
    eventually("the violation is audited", || {
        audit_lines(&audit).iter().any(|l| {
            l["operation"] == "protocol"
                && l["decision"] == "killed"
                && l["rule"] == format!("protocol violation: {why}")
        })
    })
    .await;
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);
}

/// The policy's `host_calls` is the bound the supervisor holds a worker to.
#[tokio::test]
async fn the_policys_host_calls_bound_the_host_calls_in_flight() {
    let f = fixture(|o| {
        let p = corral_policy::Policy::parse(&[(
            "levels.toml".into(),
            "[level.standard]\nhost_calls = 2\n[[route]]\nlevel = \"standard\"\n".into(),
        )])
        .unwrap();
        o.policy = Arc::new(p);
    });
    match f.call("host_flood").await {
        Err(CallError::WorkerCrashed(ExitReason::Protocol(why))) => {
            assert_eq!(why, "more than 2 host calls in flight (host_calls)")
        }
        other => panic!("{other:?}"),
    }
    f.sup.shutdown(Duration::from_secs(1)).await;
}

/// The complete JSON lines of the audit log at `path` so far (none if it is not
/// there yet; a line still being written is left for the next look).
fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// An answer that arrives after the supervisor gave up on the call is not a
/// violation: the worker is killed for the missed deadline, and said so.
#[tokio::test]
async fn a_late_answer_is_a_missed_deadline_not_a_violation() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let f = fixture(|o| o.audit = AuditSink::File(audit.clone()));
    f.launcher.next(Script {
        dies_slowly: true,
        ..Script::default()
    });
    let out = f
        .sup
        .call(&f.id, "late", Vec::new(), Some(Duration::from_millis(10)))
        .await;
    assert_eq!(out, Err(CallError::Timeout { deadline_ms: 10 }));
    // The answer came (at 300 ms, the supervisor gave up at 210 ms), then the kill.
    eventually("the kill is audited", || !audit_lines(&audit).is_empty()).await;
    assert!(f.launcher.journal(0).contains(&"call late".to_owned()));
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["operation"], "deadline", "{lines:?}");
    f.sup.shutdown(Duration::from_secs(1)).await;
}

/// A worker may log as much as it likes: its lines are cut and rate-limited, the
/// connection keeps up, and the call is answered by the same worker.
#[tokio::test]
async fn a_log_flood_is_bounded_and_breaks_nothing() {
    let f = fixture(|_| {});
    // Each megabyte is made, framed and read: on a machine with slow page faults
    // that takes a while, so more than the fixture's usual 2 s.
    let logged = f
        .sup
        .call(&f.id, "log_flood", Vec::new(), Some(Duration::from_secs(5)))
        .await;
    assert_eq!(logged.unwrap(), b"logged");
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 1);
    assert_eq!(f.sup.list().await[0].restarts, 0);
    f.sup.shutdown(Duration::from_secs(1)).await;
}

/// A second plugin (`other`) beside the fixture's, in the same supervisor.
fn add_other(f: &Fixture) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    write_plugin(dir.path(), "other");
    let mut sup = f.sup.clone();
    (sup.add_plugin_dir(dir.path()).unwrap(), dir)
}

async fn state_of(sup: &Supervisor, id: &str) -> corral_protocol::PluginInfo {
    sup.list().await.into_iter().find(|p| p.id == id).unwrap()
}

#[tokio::test]
async fn max_workers_stops_the_least_recently_used_idle_worker_and_refuses_when_all_are_busy() {
    let f = fixture(|o| o.max_workers = Some(1));
    let (other, _dir) = add_other(&f);
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.sup.workers().live, 1);
    // The one slot is taken by an idle worker: it is stopped (its shutdown hook
    // runs) to make room, and its plugin is idle, not crashed.
    let out = f
        .sup
        .call(&other, "echo", b"x".to_vec(), Some(Duration::from_secs(2)))
        .await;
    assert_eq!(out.unwrap(), b"x");
    assert_eq!(f.launcher.journal(0), ["load", "call echo", "shutdown"]);
    let fake = state_of(&f.sup, &f.id).await;
    assert_eq!(fake.state, "idle");
    assert_eq!((fake.restarts, fake.last_error), (0, None));
    let w = f.sup.workers();
    assert_eq!((w.live, w.max_workers, w.evictions), (1, Some(1), 1));

    // Now the only worker is busy: no room, and the reason says so; nothing is
    // counted against the plugin that could not start.
    let (sup, o) = (f.sup.clone(), other.clone());
    let held = tokio::spawn(async move { sup.call(&o, "hold", Vec::new(), None).await });
    eventually("the call is held", || {
        f.launcher.journal(1).iter().any(|e| e == "call hold")
    })
    .await;
    match f.call("echo").await {
        Err(CallError::Overloaded {
            plugin,
            reason: corral_protocol::Overload::Workers { live: 1, max: 1 },
        }) => assert_eq!(plugin, f.id),
        other => panic!("{other:?}"),
    }
    let fake = state_of(&f.sup, &f.id).await;
    assert_eq!(fake.state, "idle", "{fake:?}");
    assert!(
        fake.last_error
            .as_deref()
            .is_some_and(|e| e.contains("max_workers 1")),
        "{fake:?}"
    );
    assert_eq!(f.launcher.launches(), 2, "nothing was started past the cap");
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    // Free again: the first plugin starts, the second makes room.
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(state_of(&f.sup, &f.id).await.state, "running");
    assert_eq!(state_of(&f.sup, &other).await.state, "idle");
    assert_eq!(f.sup.workers().live, 1);
}

#[tokio::test]
async fn idle_timeout_stops_a_worker_without_calls_and_the_next_call_starts_one() {
    let f = fixture(|o| o.idle_timeout = Some(Duration::from_millis(200)));
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    // Calls keep it: five calls 100 ms apart outlast the timeout together.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(f.call("echo").await.unwrap(), b"in");
    }
    assert_eq!(f.launcher.launches(), 1, "a busy worker is not idle");
    // A call running past the timeout is not cut off either.
    let (sup, id) = (f.sup.clone(), f.id.clone());
    let held = tokio::spawn(async move { sup.call(&id, "hold", Vec::new(), None).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.state().await, "running");
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    // Its slot is given back once the worker has exited, just after it was told
    // to shut down.
    eventually("the idle worker is stopped and its slot free", || {
        f.launcher.shut_down(0) && f.sup.workers().live == 0
    })
    .await;
    assert_eq!(f.state().await, "idle");
    let w = f.sup.workers();
    assert_eq!((w.live, w.idle_stops, w.idle_timeout_ms), (0, 1, Some(200)));
    assert_eq!(f.call("version").await.unwrap(), b"v1");
    assert_eq!(f.launcher.launches(), 2);
    let p = state_of(&f.sup, &f.id).await;
    assert_eq!(
        (p.state.as_str(), p.restarts),
        ("running", 0),
        "not a restart"
    );
}

/// Every plugin at level standard (whose `instances` allow four).
/// Every plugin at `standard`, and the fake plugin granted `grant` (one line of
/// a `[[grant]]`).
fn standard_granting_fake(grant: &str) -> Arc<corral_policy::Policy> {
    let grants = format!("[[grant]]\nid = \"fake\"\n{grant}\n");
    let routes = "[[route]]\nlevel = \"standard\"\n";
    let files = [
        ("levels.toml".into(), routes.to_owned()),
        ("grants.toml".into(), grants),
    ];
    Arc::new(corral_policy::Policy::parse(&files).unwrap())
}

fn standard_policy() -> Arc<corral_policy::Policy> {
    let routes = "[[route]]\nname = \"all\"\nid = \"*\"\nlevel = \"standard\"\n";
    Arc::new(corral_policy::Policy::parse(&[("routes.toml".into(), routes.to_owned())]).unwrap())
}

fn holds_sent(f: &Fixture, worker: usize) -> usize {
    if f.launcher.journals.lock().unwrap().len() <= worker {
        return 0; // Not started yet.
    }
    f.launcher
        .journal(worker)
        .iter()
        .filter(|e| *e == "call hold")
        .count()
}

#[tokio::test]
async fn calls_run_in_parallel_on_instances_and_a_crashed_instance_leaves_the_others_serving() {
    let f = fixture_with("\n[limits]\ninstances = 2\n", |o| {
        o.policy = standard_policy()
    });
    let call = |function: &'static str| {
        let (sup, id) = (f.sup.clone(), f.id.clone());
        tokio::spawn(async move { sup.call(&id, function, b"in".to_vec(), None).await })
    };
    let held: Vec<_> = (0..2).map(|_| call("hold")).collect();
    // Two workers, one call running in each at the same time.
    eventually("a hold running in each of two workers", || {
        f.launcher.launches() == 2 && holds_sent(&f, 0) == 1 && holds_sent(&f, 1) == 1
    })
    .await;
    // A third call waits for one of them: the policy allows no third worker.
    let third = call("echo");
    eventually("the third call admitted", || {
        f.sup.0.plugin(&f.id).unwrap().inflight.available_permits() == f.sup.0.options.max_queue - 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.launcher.launches(), 2);
    assert!(!third.is_finished());
    let info = state_of(&f.sup, &f.id).await;
    assert_eq!(info.instances_allowed, 2);
    assert_eq!(info.instances.len(), 2);
    assert!(
        info.instances.iter().all(|i| i.busy),
        "{:?}",
        info.instances
    );
    assert_ne!(info.instances[0].pid, info.instances[1].pid);
    f.launcher.release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"held");
    }
    assert_eq!(third.await.unwrap().unwrap(), b"in");

    // One instance crashes; the other serves on, and the next burst starts a
    // replacement (a restart, as after any crash).
    match f.call("crash").await {
        Err(CallError::WorkerCrashed(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    let info = state_of(&f.sup, &f.id).await;
    assert_eq!((info.state.as_str(), info.instances.len()), ("running", 1));
    let held: Vec<_> = (0..2).map(|_| call("hold")).collect();
    eventually("a replacement worker", || f.launcher.launches() == 3).await;
    eventually("both holds running", || {
        (0..3).map(|w| holds_sent(&f, w)).sum::<usize>() == 4
    })
    .await;
    f.launcher.release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"held");
    }
    let info = state_of(&f.sup, &f.id).await;
    assert_eq!((info.instances.len(), info.restarts), (2, 1));
    f.sup.shutdown(Duration::from_secs(1)).await;
    for w in 0..3 {
        assert!(
            f.launcher
                .journal(w)
                .iter()
                .all(|e| !e.starts_with("unexpected"))
        );
    }
}

#[tokio::test]
async fn a_policy_that_lowers_instances_retires_the_extra_workers_after_their_calls() {
    let f = fixture_with("\n[limits]\ninstances = 2\n", |o| {
        o.policy = standard_policy()
    });
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (sup, id) = (f.sup.clone(), f.id.clone());
            tokio::spawn(async move { sup.call(&id, "hold", Vec::new(), None).await })
        })
        .collect();
    eventually("two workers busy", || {
        f.launcher.launches() == 2 && holds_sent(&f, 0) == 1 && holds_sent(&f, 1) == 1
    })
    .await;
    let one =
        "[[route]]\nname = \"all\"\nid = \"*\"\nlevel = \"standard\"\nlimits = { instances = 1 }\n";
    let changes = f
        .sup
        .set_policy(
            corral_policy::Policy::parse(&[("routes.toml".into(), one.to_owned())]).unwrap(),
        )
        .await;
    assert!(
        changes
            .iter()
            .any(|c| c == "fake: instances now 1; 1 retire after their calls"),
        "{changes:?}"
    );
    // The retired one finishes its call first.
    f.launcher.release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"held");
    }
    eventually("the retired worker shut down", || f.launcher.shut_down(1)).await;
    let info = state_of(&f.sup, &f.id).await;
    assert_eq!((info.instances.len(), info.instances_allowed), (1, 1));
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_a_worker_are_served_first_come_first_served_and_none_starves() {
    let f = fixture(|_| {});
    let call = |function: &'static str, input: &'static [u8]| {
        let (sup, id) = (f.sup.clone(), f.id.clone());
        tokio::spawn(async move { sup.call(&id, function, input.to_vec(), None).await })
    };
    let held = call("hold", b"");
    eventually("the hold running", || holds_sent(&f, 0) == 1).await;
    let max_queue = f.sup.0.options.max_queue;
    let plugin = f.sup.0.plugin(&f.id).unwrap();
    let admitted = |n: usize| {
        let plugin = Arc::clone(&plugin);
        move || plugin.inflight.available_permits() == max_queue - n
    };
    // Three calls queue behind it, one after the other.
    let mut waiting = Vec::new();
    for (n, input) in [b"order-b", b"order-c", b"order-d"].iter().enumerate() {
        waiting.push(call("echo", *input));
        eventually("the call admitted", admitted(n + 2)).await;
    }
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    // In the order they came (the worker runs them one at a time, as sent).
    let journal = f.launcher.journal(0);
    let sent: Vec<&str> = journal
        .iter()
        .filter(|e| e.starts_with("order-"))
        .map(String::as_str)
        .collect();
    assert_eq!(sent, ["order-b", "order-c", "order-d"], "{journal:?}");

    // Sixteen callers in tight loops do not starve one more call that arrives
    // among them: it waits its turn behind those already waiting.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hot: Vec<_> = (0..16)
        .map(|_| {
            let (sup, id, stop) = (f.sup.clone(), f.id.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    sup.call(&id, "echo", b"hot".to_vec(), None).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let t = Instant::now();
        let r = f
            .sup
            .call(
                &f.id,
                "echo",
                b"x".to_vec(),
                Some(Duration::from_millis(500)),
            )
            .await;
        assert_eq!(
            r,
            Ok(b"x".to_vec()),
            "after {:?}, {} launches",
            t.elapsed(),
            f.launcher.launches()
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for h in hot {
        h.await.unwrap();
    }
    f.sup.shutdown(Duration::from_secs(1)).await;
}

/// A reloaded `max_queue` applies at once: a larger queue admits more calls; a
/// smaller one takes back no slot a call holds (every held call is answered) and
/// refuses new calls until the calls past it have finished.
#[tokio::test]
async fn a_reloaded_max_queue_grows_at_once_and_shrinks_without_cutting_off_a_call() {
    let f = fixture(|o| o.max_queue = 2);
    let free = || f.sup.0.plugin(&f.id).unwrap().inflight.available_permits();
    let hold = || {
        let (sup, id) = (f.sup.clone(), f.id.clone());
        tokio::spawn(async move { sup.call(&id, "hold", Vec::new(), None).await })
    };
    let mut options = f.sup.options().clone();
    options.max_queue = 4;
    let changes = f.sup.reconfigure(&options, Vec::new()).await;
    assert_eq!(changes, ["max_queue now 4 (was 2)"]);
    let held: Vec<_> = (0..4).map(|_| hold()).collect();
    eventually("four calls admitted", || free() == 0).await;
    let overloaded = |r: Result<Vec<u8>, CallError>| matches!(r, Err(CallError::Overloaded { reason: corral_protocol::Overload::Queue { queued }, .. }) if queued == 1);
    // Down to one while four are held: none is cut off.
    options.max_queue = 1;
    f.sup.reconfigure(&options, Vec::new()).await;
    assert!(
        overloaded(f.call("echo").await),
        "the queue is past its new size"
    );
    let sent = || {
        f.launcher
            .journal(0)
            .iter()
            .filter(|e| *e == "call hold")
            .count()
    };
    for n in 2..=4 {
        eventually("the call before answered", || sent() == n - 1).await;
        f.launcher.release();
        eventually("the next call sent", || sent() == n).await;
    }
    eventually("three held calls answered", || {
        held.iter().filter(|h| h.is_finished()).count() == 3
    })
    .await;
    // One call still holds the one slot left: still full.
    assert_eq!(free(), 0);
    assert!(overloaded(f.call("echo").await));
    f.launcher.release();
    for h in held {
        assert_eq!(h.await.unwrap().unwrap(), b"held");
    }
    eventually("one slot free", || free() == 1).await;
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.sup.list().await[0].queued, 0);
}

/// A reload that changes a plugin's config or secrets brings a new version in a
/// fresh worker with them; the old worker is retired; a reload that changes
/// nothing about a plugin leaves its worker alone.
#[tokio::test]
async fn reloaded_plugin_settings_start_a_fresh_worker_and_unchanged_ones_keep_theirs() {
    let f = fixture(|_| {});
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 1);
    let mut options = f.sup.options().clone();
    options.max_queue = 8;
    f.sup.reconfigure(&options, Vec::new()).await;
    assert_eq!(f.launcher.launches(), 1, "nothing about the plugin changed");
    let mut settings = crate::PluginConfig::default();
    settings.config.insert("greeting".into(), "hi".into());
    settings
        .secrets
        .insert("token".into(), corral_protocol::Secret("s3cr3t".into()));
    options.plugin_config.insert(f.id.clone(), settings.clone());
    let changes = f.sup.reconfigure(&options, Vec::new()).await;
    assert_eq!(
        changes,
        [
            "fake: its config or secrets changed: a new worker serves it; the old one retires after its calls"
        ]
    );
    assert_eq!(f.launcher.launches(), 2);
    let p = f.sup.0.plugin(&f.id).unwrap();
    assert_eq!(*p.settings, settings);
    assert_eq!(p.redactor.redact("the s3cr3t"), "the [secret token]");
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    f.sup.reconfigure(&options, Vec::new()).await;
    assert_eq!(
        f.launcher.launches(),
        2,
        "the same settings again: no new worker"
    );
}

/// The first worker of the fixture's plugin.
async fn first_worker(f: &Fixture) -> Arc<crate::worker::WorkerHandle> {
    let p = f.sup.0.plugin(&f.id).unwrap();
    let st = p.state.lock().await;
    Arc::clone(&st.instances()[0].worker)
}

/// A worker that has answered enough fast calls to take calls behind its running
/// one, with "fast" widened so that a held call counts as just begun.
async fn pipelining(f: &Fixture) -> Arc<crate::worker::WorkerHandle> {
    for _ in 0..20 {
        assert_eq!(f.call("echo").await.unwrap(), b"in");
    }
    let w = first_worker(f).await;
    w.pipeline_fast_us.store(60_000_000, Ordering::Relaxed);
    w
}

fn spawn_call(
    f: &Fixture,
    function: &'static str,
    input: &'static [u8],
    timeout_ms: u64,
) -> tokio::task::JoinHandle<Result<Vec<u8>, CallError>> {
    let (sup, id) = (f.sup.clone(), f.id.clone());
    let timeout = Some(Duration::from_millis(timeout_ms));
    tokio::spawn(async move { sup.call(&id, function, input.to_vec(), timeout).await })
}

fn sent(f: &Fixture, worker: usize, entry: &str) -> bool {
    f.launcher.journal(worker).iter().any(|e| e == entry)
}

fn killed(f: &Fixture, worker: usize) -> bool {
    f.launcher.journals.lock().unwrap()[worker].killed()
}

#[tokio::test]
async fn calls_behind_a_running_one_are_answered_in_order_and_one_not_begun_in_time_times_out_killing_nobody()
 {
    let f = fixture(|_| {});
    // A fresh worker takes one call at a time.
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    let w = first_worker(&f).await;
    let held = spawn_call(&f, "hold", b"", 10_000);
    eventually("the hold running", || holds_sent(&f, 0) == 1).await;
    let waiting = spawn_call(&f, "echo", b"order-0", 10_000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sent(&f, 0, "order-0"), "{:?}", f.launcher.journal(0));
    assert_eq!(w.in_flight(), 1);
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    assert_eq!(waiting.await.unwrap().unwrap(), b"order-0");

    // One whose calls are fast takes calls behind the one it runs.
    let w = pipelining(&f).await;
    let held = spawn_call(&f, "hold", b"", 10_000);
    eventually("the hold running", || holds_sent(&f, 0) == 2).await;
    let mut behind = Vec::new();
    for input in [b"order-a", b"order-b", b"order-c"] {
        behind.push((input, spawn_call(&f, "echo", input, 10_000)));
        let entry = String::from_utf8_lossy(input).into_owned();
        eventually("sent behind the hold", || sent(&f, 0, &entry)).await;
    }
    assert_eq!(w.in_flight(), 4);
    // One more with a short deadline is sent too, and times out where it waits:
    // nobody is killed, and its answer (after the hold's) is no violation.
    let late = f
        .sup
        .call(
            &f.id,
            "echo",
            b"order-late".to_vec(),
            Some(Duration::from_millis(100)),
        )
        .await;
    assert_eq!(late, Err(CallError::Timeout { deadline_ms: 100 }));
    assert!(sent(&f, 0, "order-late"));
    assert!(!killed(&f, 0));
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    for (input, b) in behind {
        assert_eq!(b.await.unwrap().unwrap(), input);
    }
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!((f.launcher.launches(), killed(&f, 0)), (1, false));
    assert_eq!(w.in_flight(), 0);
    let order: Vec<String> = f
        .launcher
        .journal(0)
        .into_iter()
        .filter(|e| e.starts_with("order-"))
        .collect();
    assert_eq!(
        order,
        ["order-0", "order-a", "order-b", "order-c", "order-late"]
    );
    let info = &f.sup.list().await[0];
    assert_eq!(info.state, "running");
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_call_sent_behind_another_is_killed_at_its_deadline_counted_from_when_it_began() {
    let f = fixture(|_| {});
    pipelining(&f).await;
    let held = spawn_call(&f, "hold", b"", 10_000);
    eventually("the hold running", || holds_sent(&f, 0) == 1).await;
    let hang = spawn_call(&f, "hang", b"", 300);
    eventually("the hang sent behind it", || sent(&f, 0, "call hang")).await;
    // The hold answers: the hang begins, with its whole deadline ahead of it.
    let began = Instant::now();
    f.launcher.release();
    assert_eq!(held.await.unwrap().unwrap(), b"held");
    assert_eq!(
        hang.await.unwrap(),
        Err(CallError::Timeout { deadline_ms: 300 })
    );
    // Killed by the supervisor at its deadline and grace (200 ms), not before.
    assert!(
        began.elapsed() >= Duration::from_millis(500),
        "{:?}",
        began.elapsed()
    );
    eventually("the worker killed", || killed(&f, 0)).await;
    assert_eq!(f.call("echo").await.unwrap(), b"in");
    assert_eq!(f.launcher.launches(), 2);
    let info = &f.sup.list().await[0];
    assert!(
        info.last_error
            .as_deref()
            .is_some_and(|e| e.contains("missed a deadline")),
        "{info:?}"
    );
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn calls_waiting_behind_the_running_one_when_the_worker_ends_go_to_the_next_worker() {
    let f = fixture(|_| {});
    let w = pipelining(&f).await;
    let held = spawn_call(&f, "hold", b"", 10_000);
    eventually("the hold running", || holds_sent(&f, 0) == 1).await;
    let behind = spawn_call(&f, "echo", b"order-x", 10_000);
    eventually("sent behind the hold", || sent(&f, 0, "order-x")).await;
    w.kill();
    // The running call ended with the worker; the one behind it never began
    // there, and runs on the next worker.
    assert!(
        matches!(held.await.unwrap(), Err(CallError::WorkerCrashed(_))),
        "the held call"
    );
    assert_eq!(behind.await.unwrap().unwrap(), b"order-x");
    assert_eq!(f.launcher.launches(), 2);
    assert!(sent(&f, 1, "order-x"), "{:?}", f.launcher.journal(1));

    // A worker answering a call behind the running one first breaks the
    // protocol: it is killed, the running call fails naming the rule, and the
    // call it answered early runs again on the next worker.
    let w = pipelining(&f).await;
    let _ = w;
    let ahead = spawn_call(&f, "ahead", b"", 10_000);
    eventually("ahead running", || sent(&f, 1, "call ahead")).await;
    let early = spawn_call(&f, "echo", b"order-y", 10_000);
    match ahead.await.unwrap() {
        Err(CallError::WorkerCrashed(ExitReason::Protocol(why))) => {
            assert!(why.contains("(answers come in order)"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(early.await.unwrap().unwrap(), b"order-y");
    assert!(sent(&f, 1, "answered echo ahead"));
    assert_eq!(f.launcher.launches(), 3);

    // A worker that stops taking frames: the calls whose frames could not be
    // written never began there, and run on the next worker.
    let w = pipelining(&f).await;
    let _ = w;
    let deaf = spawn_call(&f, "deaf", b"", 10_000);
    eventually("deaf running", || sent(&f, 2, "call deaf")).await;
    let unsendable = spawn_call(&f, "echo", b"order-z", 10_000);
    assert!(
        matches!(deaf.await.unwrap(), Err(CallError::WorkerCrashed(_))),
        "the deaf call"
    );
    assert_eq!(unsendable.await.unwrap().unwrap(), b"order-z");
    assert!(!sent(&f, 2, "order-z"));
    assert!(sent(&f, 3, "order-z"));
    assert_eq!(f.launcher.launches(), 4);
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn plugins_read_side_by_side_are_added_in_order_with_each_refusal_in_its_place() {
    let f = fixture(|_| {});
    let root = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for (name, id) in [("a", "x"), ("b", ""), ("c", "x"), ("d", "y")] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        if id.is_empty() {
            std::fs::write(dir.join("plugin.toml"), "id = \n").unwrap();
        } else {
            write_plugin(&dir, id);
        }
        dirs.push(dir);
    }
    // More directories than threads: every one is read once, on whichever thread.
    for i in 0..12 {
        let dir = root.path().join(format!("many-{i:02}"));
        std::fs::create_dir(&dir).unwrap();
        write_plugin(&dir, &format!("many-{i:02}"));
        dirs.push(dir);
    }
    let mut sup = f.sup.clone();
    let added = sup.add_plugin_dirs(&dirs);
    assert_eq!(added.len(), dirs.len());
    assert_eq!(added[0].as_deref().unwrap(), "x");
    assert!(
        matches!(&added[1], Err(AddPluginError::Manifest(_))),
        "{:?}",
        added[1]
    );
    // Two with one id: the first given is added, the second refused naming it.
    match &added[2] {
        Err(AddPluginError::Duplicate { id, other, .. }) => {
            assert_eq!(id, "x");
            assert_eq!(other, &dirs[0].canonicalize().unwrap());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(added[3].as_deref().unwrap(), "y");
    for (i, a) in added[4..].iter().enumerate() {
        assert_eq!(a.as_deref().unwrap(), format!("many-{i:02}"));
    }
    let listed: Vec<String> = sup.list().await.into_iter().map(|p| p.id).collect();
    assert_eq!(listed.len(), 1 + 2 + 12, "{listed:?}");
    // Each copy holds its own files.
    let x = sup.inner().plugin("x").unwrap();
    assert_eq!(x.dir, dirs[0].canonicalize().unwrap());
    assert!(x.files.path().join("main.js").is_file());
}

/// Plugins `ids`, each in its own directory, added by a pass (each loaded in a
/// fake worker); the directories in the order of `ids`.
async fn passed(
    ids: &[&str],
) -> (
    Supervisor,
    Arc<FakeLauncher>,
    Vec<PathBuf>,
    tempfile::TempDir,
) {
    let tmp = tempfile::tempdir().unwrap();
    let mut options = Options::new();
    options.cache_dir = Some(tmp.path().join("cache"));
    options.state_dir = tmp.path().join("state");
    options.cgroups = None;
    options.health_interval = Duration::from_secs(3600);
    let launcher = Arc::new(FakeLauncher::default());
    let sup = Supervisor::with_launcher(options, Arc::clone(&launcher) as Arc<dyn Launcher>);
    let dirs: Vec<PathBuf> = ids
        .iter()
        .map(|id| {
            let d = tmp.path().join(id);
            std::fs::create_dir(&d).unwrap();
            write_plugin(&d, id);
            d
        })
        .collect();
    settle().await;
    let report = sup.sync_plugins(&dirs).await;
    assert_eq!(report.added, ids, "{report:?}");
    (sup, launcher, dirs, tmp)
}

/// A change to the plugin in `dir` (a new version of its files).
fn edit(dir: &std::path::Path, n: u32) {
    std::fs::write(
        dir.join("main.js"),
        format!("export function echo(x) {{ return x }} // edit {n}\n"),
    )
    .unwrap();
}

/// Long enough for files just written to count as settled.
async fn settle() {
    tokio::time::sleep(crate::plugins::files::QUIET + Duration::from_millis(50)).await;
}

/// What `plugin`'s `version` answers, once it answers `want` (within 5 s).
async fn answers(sup: &Supervisor, plugin: &str, want: &str) {
    let mut last = None;
    for _ in 0..500 {
        let got = sup
            .call(plugin, "version", Vec::new(), Some(Duration::from_secs(2)))
            .await;
        if got.as_deref() == Ok(want.as_bytes()) {
            return;
        }
        last = Some(got);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{plugin} does not answer {want:?} within 5 s: {last:?}");
}

/// What bounds a wait that must not wait for a plugin's `init`.
async fn at_once<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what} waited for another plugin's init"))
}

/// A plugin whose new version's `init` takes as long as its deadline allows
/// holds up no other plugin: in the same pass the others' new versions serve at
/// once, and meanwhile the slow plugin's old version serves, a later pass reloads
/// another plugin, and a policy change renews the other plugins' workers and
/// leaves the slow one's to after its load. Once that load ends, the new version
/// serves and is renewed under the policy that changed while it loaded, once.
#[tokio::test]
async fn a_slow_init_holds_up_no_other_plugins_load_no_pass_and_no_policy_change() {
    let (sup, launcher, dirs, _tmp) = passed(&["a-slow", "b-quick", "c-later"]).await;
    let level = async |id: &str| {
        let list = sup.list().await;
        list.iter().find(|p| p.id == id).unwrap().level.clone()
    };
    let before = level("a-slow").await;
    assert_ne!(before, "standard");
    launcher.next_for(
        "a-slow",
        Script {
            tag: "v2",
            load_held: true,
            init_deadline_ms: 60_000,
            ..Script::default()
        },
    );
    launcher.next_for(
        "b-quick",
        Script {
            tag: "v2",
            ..Script::default()
        },
    );
    edit(&dirs[0], 1);
    edit(&dirs[1], 1);
    settle().await;
    let pass = tokio::spawn({
        let (sup, dirs) = (sup.clone(), dirs.clone());
        async move { sup.sync_plugins(&dirs).await }
    });
    // The same pass: b-quick's new version serves while a-slow's loads.
    answers(&sup, "b-quick", "v2").await;
    answers(&sup, "a-slow", "v1").await;
    assert_eq!(launcher.launches(), 5);

    // A later pass: b-quick (loaded by the first pass) and c-later reloaded;
    // a-slow, being loaded, left alone.
    for (id, tag) in [("b-quick", "v3"), ("c-later", "v2")] {
        launcher.next_for(
            id,
            Script {
                tag,
                ..Script::default()
            },
        );
    }
    edit(&dirs[1], 2);
    edit(&dirs[2], 1);
    settle().await;
    let report = at_once("a later pass", sup.sync_plugins(&dirs)).await;
    assert_eq!(
        report.reloaded,
        ["b-quick 1.0.0 -> 1.0.0", "c-later 1.0.0 -> 1.0.0"],
        "{report:?}"
    );
    assert!(
        report.rejected.is_empty() && report.added.is_empty(),
        "{report:?}"
    );
    answers(&sup, "b-quick", "v3").await;
    answers(&sup, "c-later", "v2").await;
    assert_eq!(launcher.launches(), 7);

    // A policy change that needs new workers: b-quick's and c-later's at once,
    // a-slow's after its load.
    launcher.next_for(
        "a-slow",
        Script {
            tag: "v3",
            ..Script::default()
        },
    );
    let changes = at_once(
        "a policy change",
        sup.set_policy(Arc::unwrap_or_clone(standard_policy())),
    )
    .await;
    let of = |id: &str| {
        changes
            .iter()
            .filter(|c| c.starts_with(&format!("{id}: ")))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("a-slow").len(), 1, "{changes:?}");
    assert!(
        of("a-slow")[0].contains("once the load under way ends"),
        "{changes:?}"
    );
    for id in ["b-quick", "c-later"] {
        assert!(
            of(id).len() == 1 && of(id)[0].starts_with(&format!("{id}: new worker at ")),
            "{changes:?}"
        );
        assert_eq!(level(id).await, "standard");
    }
    assert_eq!(launcher.launches(), 9);
    assert_eq!(level("a-slow").await, before, "still its old worker");

    // New settings for b-quick and a-slow: b-quick's at once, a-slow's after its
    // load; the configuration reload does not wait for it.
    let mut options = sup.options().clone();
    let mut settings = crate::PluginConfig::default();
    settings.config.insert("greeting".into(), "hi".into());
    for id in ["a-slow", "b-quick"] {
        options.plugin_config.insert(id.into(), settings.clone());
    }
    let changes = at_once(
        "a configuration reload",
        sup.reconfigure(&options, Vec::new()),
    )
    .await;
    assert_eq!(
        changes,
        [
            "a-slow: its settings or publishers changed; applied once the load under way ends",
            "b-quick: its config or secrets changed: a new worker serves it; the old one retires \
             after its calls"
        ]
    );
    assert_eq!(launcher.launches(), 10);
    assert!(!pass.is_finished(), "the first pass still loads a-slow");

    // a-slow's load ends: its new version serves, then is renewed under the
    // policy and with the settings in force, once.
    launcher.open_loads();
    let report = at_once("the first pass", pass).await.unwrap();
    assert_eq!(
        report.reloaded,
        ["a-slow 1.0.0 -> 1.0.0", "b-quick 1.0.0 -> 1.0.0"],
        "{report:?}"
    );
    answers(&sup, "a-slow", "v3").await;
    assert_eq!(level("a-slow").await, "standard");
    assert_eq!(*sup.inner().plugin("a-slow").unwrap().settings, settings);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(launcher.launches(), 11, "a-slow renewed once");
}

/// A directory edited while its version loads, whose load then fails, is passed
/// again: the later files load (the pass that found it loading left it alone).
#[tokio::test]
async fn files_changed_while_a_version_loaded_are_loaded_after_it_whatever_became_of_it() {
    let (sup, launcher, dirs, _tmp) = passed(&["edited"]).await;
    launcher.next_for(
        "edited",
        Script {
            load_held: true,
            load_error: Some("v2 does not load"),
            ..Script::default()
        },
    );
    edit(&dirs[0], 1);
    settle().await;
    let pass = tokio::spawn({
        let (sup, dirs) = (sup.clone(), dirs.clone());
        async move { sup.sync_plugins(&dirs).await }
    });
    eventually("v2 is loading", || launcher.launches() == 2).await;
    edit(&dirs[0], 2);
    settle().await;
    let report = at_once("a pass", sup.sync_plugins(&dirs)).await;
    assert!(
        report.is_empty(),
        "the loading directory is left alone: {report:?}"
    );
    launcher.open_loads();
    let report = at_once("the first pass", pass).await.unwrap();
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert!(
        report.rejected[0].contains("v2 does not load"),
        "{report:?}"
    );
    assert_eq!(
        report.unsettled,
        [dirs[0].canonicalize().unwrap()],
        "{report:?}"
    );
    launcher.next_for(
        "edited",
        Script {
            tag: "v3",
            ..Script::default()
        },
    );
    settle().await;
    let report = sup.sync_plugins(&dirs).await;
    assert_eq!(report.reloaded, ["edited 1.0.0 -> 1.0.0"], "{report:?}");
    answers(&sup, "edited", "v3").await;
}

/// A policy change that lands while a worker starts (its start resolved the
/// policy before the change; the change looked at the plugin before the worker
/// was there) applies to that worker once it is ready: a change that needs a new
/// worker renews it, one that applies live is applied. No worker serves under a
/// policy that is no longer in force.
#[tokio::test]
async fn a_policy_change_during_a_start_applies_to_the_worker_it_started() {
    let f = fixture(|_| {});
    let before = f.sup.list().await[0].level.clone();
    assert_ne!(before, "standard");
    let call = first_start_held(&f).await;
    let changes = f
        .sup
        .set_policy(Arc::unwrap_or_clone(standard_policy()))
        .await;
    assert!(changes.is_empty(), "no worker to change yet: {changes:?}");
    f.launcher.next(Script {
        tag: "v2",
        ..Script::default()
    });
    f.launcher.open_loads();
    assert_eq!(call.await.unwrap().unwrap(), b"v1");
    answers(&f.sup, "fake", "v2").await;
    assert_eq!(f.sup.list().await[0].level, "standard");
    assert_eq!(f.launcher.launches(), 2);
    eventually("the worker started under the old policy is retired", || {
        f.launcher.shut_down(0)
    })
    .await;
}

/// A call to the fixture's plugin whose first worker is loading, held until
/// [`FakeLauncher::open_loads`].
async fn first_start_held(f: &Fixture) -> tokio::task::JoinHandle<Result<Vec<u8>, CallError>> {
    f.launcher.next(Script {
        load_held: true,
        ..Script::default()
    });
    let call = tokio::spawn({
        let sup = f.sup.clone();
        async move { sup.call("fake", "version", Vec::new(), None).await }
    });
    eventually("the first worker is loading", || {
        f.launcher.launches() == 1 && f.launcher.journal(0) == ["load"]
    })
    .await;
    call
}

/// [`a_policy_change_during_a_start_applies_to_the_worker_it_started`], for a
/// change that applies live (the call deadline): the worker takes it as it is.
#[tokio::test]
async fn a_live_policy_change_during_a_start_applies_to_the_worker_it_started() {
    let f = fixture(|o| o.policy = standard_policy());
    let call = first_start_held(&f).await;
    let routes = "[[route]]\nlevel = \"standard\"\nlimits = { timeout = \"7s\" }\n";
    let policy = corral_policy::Policy::parse(&[("routes.toml".into(), routes.to_owned())]);
    let changes = f.sup.set_policy(policy.unwrap()).await;
    assert!(changes.is_empty(), "no worker to change yet: {changes:?}");
    f.launcher.open_loads();
    assert_eq!(call.await.unwrap().unwrap(), b"v1");
    let p = f.sup.inner().plugin("fake").unwrap();
    assert_eq!(p.state.lock().await.deadlines().0, Duration::from_secs(7));
    assert_eq!(f.launcher.launches(), 1);
}
