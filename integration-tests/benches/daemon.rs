//! Calls where users make them, each beside the raw socket round trip of the same
//! run.
//!
//! Run with `cargo bench --workspace --bench daemon` (`-- --quick` for fewer
//! samples). Warm calls of the examples' empty `noop` function:
//!
//! - the library, `Supervisor::call`, on a multi-thread tokio runtime of two
//!   threads (the flavour `corral serve` runs);
//! - a running `corral serve`, through its control socket: one persistent
//!   connection, and a new connection per call;
//! - the `corral call` CLI (the front), beside fork+exec+wait of `/bin/true`, of
//!   `corral --version` and of the full binary answering the same call;
//! - throughput of one plugin with 1, 8 and 64 callers, through the library and
//!   through the daemon (one connection per caller, waiting for each answer;
//!   and pipelining connections, 64 calls in flight on one or on eight), beside
//!   a raw echo socket with 64 frames in flight.
//!
//! Every measurement runs pinned (the bench, the daemon and its workers share CPU
//! 0) and unpinned. Machines here are shared and noisy: compare the ratios.

use corral::Supervisor;
use corral_integration_tests::bench::{
    Stats, pin_to_cpu0, pipelined_writer, raw_socket_pipelined, raw_socket_rtt, row,
    serve_echo_if_asked, spawn_wait, stats, unpin,
};
use corral_integration_tests::{built, example_plugin, open_tempdir, plugin_copy};
use corral_protocol::{ControlRequest, ControlResponse, frame};
use std::ffi::OsStr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const PLUGINS: [&str; 3] = ["hello-wasm", "hello-js", "hello-python"];

/// The same examples with `instances = 2` (one worker per core here).
const PARALLEL: [&str; 3] = ["hello-wasm-x2", "hello-js-x2", "hello-python-x2"];

/// A running `corral serve` with the three examples, stopped when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    fn start(zygotes: &str) -> Daemon {
        let dir = open_tempdir();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let js = example_plugin("hello-js");
        let py = example_plugin("hello-python");
        let sources = [built().hello_wasm.as_path(), js.path(), py.path()];
        for (id, src) in PLUGINS
            .iter()
            .zip(sources)
            .chain(PARALLEL.iter().zip(sources))
        {
            let copy = plugin_copy(src, id);
            if id.ends_with("-x2") {
                let toml = copy.path().join("plugin.toml");
                let text = std::fs::read_to_string(&toml).unwrap();
                assert!(text.contains("\n[limits]\n"), "{id}");
                let text = text.replace("\n[limits]\n", "\n[limits]\ninstances = 2\n");
                std::fs::write(&toml, text).unwrap();
            }
            std::fs::rename(copy.path(), plugins.join(id)).unwrap();
            std::mem::forget(copy);
        }
        let config = dir.path().join("corral.toml");
        std::fs::write(
            &config,
            format!(
                "plugins_dir = \"plugins\"\nsocket = \"run/control.sock\"\ncache_dir = \"cache\"\n\
                 state_dir = \"state\"\naudit = \"audit.jsonl\"\nzygotes = {zygotes}\n"
            ),
        )
        .unwrap();
        let socket = dir.path().join("run/control.sock");
        let child = Command::new(built().corral())
            .args(["serve", "--config"])
            .arg(&config)
            .env("CORRAL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(60), "no control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let d = Daemon {
            child,
            socket,
            _dir: dir,
        };
        // Start every worker before anything is timed.
        let mut c = d.connect();
        for id in PLUGINS.iter().chain(&PARALLEL) {
            c.noop(id);
        }
        d
    }

    fn connect(&self) -> Client {
        Client(UnixStream::connect(&self.socket).unwrap())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.connect().request(&ControlRequest::Shutdown);
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A blocking control-socket client: what any program talking to the daemon
/// does, without an async runtime of its own.
struct Client(UnixStream);

impl Client {
    fn request(&mut self, req: &ControlRequest) -> std::io::Result<ControlResponse> {
        use std::io::Write;
        self.0.write_all(&frame::encode(req).unwrap())?;
        frame::read_msg(&mut self.0, frame::MAX_FRAME).map_err(std::io::Error::other)
    }

    fn noop(&mut self, plugin: &str) {
        assert!(self.call(plugin, "noop").is_empty());
    }

    /// Call `function` with no input; its output.
    fn call(&mut self, plugin: &str, function: &str) -> Vec<u8> {
        let req = ControlRequest::Call {
            plugin: plugin.into(),
            function: function.into(),
            input: Vec::new(),
            timeout_ms: None,
        };
        match self.request(&req).unwrap() {
            ControlResponse::Called(Ok(out)) => out,
            other => panic!("{plugin}.{function}: {other:?}"),
        }
    }
}

/// `iters` timed samples of `f` after a tenth as many untimed ones.
fn sample(iters: usize, mut f: impl FnMut()) -> Stats {
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        f();
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    stats(samples)
}

/// The library on the daemon's runtime flavour, with the examples registered.
fn library() -> (tokio::runtime::Runtime, Supervisor, Vec<TempDir>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = open_tempdir();
    let mut opts = corral_integration_tests::options(cache.path());
    opts.policy = Arc::new(corral::Policy::built_in());
    let js = example_plugin("hello-js");
    let py = example_plugin("hello-python");
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(&built().hello_wasm).unwrap();
    sup.add_plugin_dir(js.path()).unwrap();
    sup.add_plugin_dir(py.path()).unwrap();
    (rt, sup, vec![cache, js, py])
}

/// Calls per second of `plugin` with `callers` concurrent callers for `run`,
/// through the library.
fn library_throughput(
    rt: &tokio::runtime::Runtime,
    sup: &Supervisor,
    plugin: &'static str,
    callers: usize,
    run: Duration,
) -> f64 {
    rt.block_on(async {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + run;
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (sup, done) = (sup.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    while Instant::now() < stop {
                        let out = sup.call(plugin, "noop", Vec::new(), None).await;
                        assert!(out.is_ok(), "{plugin}: {out:?}");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let t = Instant::now();
        for task in tasks {
            task.await.unwrap();
        }
        done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    })
}

/// Calls per second of `plugin` with `callers` threads, each on its own
/// connection to the daemon, for `run`.
fn daemon_throughput(d: &Daemon, plugin: &'static str, callers: usize, run: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let mut c = d.connect();
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    c.noop(plugin);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t = Instant::now();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
}

/// Calls per second of `plugin` with `conns` connections to the daemon, each
/// keeping `window` calls in flight (a writer thread sends while it has credit,
/// the reader gives credit back per answer), for `run`.
fn daemon_pipelined(
    d: &Daemon,
    plugin: &'static str,
    conns: usize,
    window: usize,
    run: Duration,
) -> f64 {
    let req = frame::encode(&ControlRequest::Call {
        plugin: plugin.into(),
        function: "noop".into(),
        input: Vec::new(),
        timeout_ms: None,
    })
    .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let Client(rd) = d.connect();
            let wr = rd.try_clone().unwrap();
            let (credit_tx, credit_rx) = std::sync::mpsc::sync_channel::<()>(window);
            for _ in 0..window {
                credit_tx.send(()).unwrap();
            }
            let req = req.clone();
            let writer = std::thread::spawn(move || pipelined_writer(wr, &req, &credit_rx));
            let mut rd = std::io::BufReader::with_capacity(64 << 10, rd);
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut owed = window;
                loop {
                    match frame::read_msg(&mut rd, frame::MAX_FRAME).unwrap() {
                        ControlResponse::Called(Ok(out)) => assert!(out.is_empty()),
                        other => panic!("{plugin}: {other:?}"),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        owed -= 1;
                        if owed == 0 {
                            break;
                        }
                    } else {
                        let _ = credit_tx.send(());
                    }
                }
                drop(credit_tx);
                writer.join().unwrap();
            })
        })
        .collect();
    std::thread::sleep(run);
    let n = done.load(Ordering::Relaxed);
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for th in threads {
        th.join().unwrap();
    }
    rate
}

fn rate_row(name: &str, rate: f64, base: f64) {
    println!(
        "  {name:<52} {:>9.0} calls/s {:>8.2}x the raw ceiling",
        rate,
        rate / base
    );
}

fn main() {
    serve_echo_if_asked();
    // `cargo bench` passes `--bench`; nextest/`cargo test --benches` lists with
    // `--list`: run nothing then.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `-- --profile <plugin> [--warm [--function <name>]]`: only 64 calls in
    // flight (or one at a time, of `noop` or the function named) on one
    // connection to a running daemon, for 20 s (to watch it with `perf`), and the
    // rate.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let plugin: &'static str = args[i + 1].clone().leak();
        let d = Daemon::start("[\"wasm\", \"python\"]");
        println!("daemon pid {}", d.child.id());
        // `--warm`: one call at a time on a persistent connection instead.
        if args.iter().any(|a| a == "--warm") {
            let function = match args.iter().position(|a| a == "--function") {
                Some(i) => args[i + 1].as_str(),
                None => "noop",
            };
            let mut c = d.connect();
            let t = Instant::now();
            let mut n = 0u64;
            while t.elapsed() < Duration::from_secs(20) {
                c.call(plugin, function);
                n += 1;
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
            println!("{plugin}.{function}: {us:.1} us a call, one at a time on one connection");
            return;
        }
        let r = daemon_pipelined(&d, plugin, 1, 64, Duration::from_secs(20));
        println!("{plugin}: {r:.0} calls/s, 64 in flight on one connection");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (warm, cli_iters, run) = if quick {
        (2_000, 50, Duration::from_millis(500))
    } else {
        (20_000, 300, Duration::from_secs(2))
    };
    built();
    let corral = built().corral();
    for pinned in [true, false] {
        if pinned {
            pin_to_cpu0();
        } else {
            unpin();
        }
        println!(
            "\n== {} ==",
            if pinned {
                "pinned: the bench, the daemon and its workers share CPU 0"
            } else {
                "unpinned: scheduler's choice of CPUs"
            }
        );
        println!("warm call of an empty function ({warm} samples)");
        let raw = raw_socket_rtt(warm);
        row("baseline: raw unix-socket echo round trip", raw, None);
        let (rt, sup, _dirs) = library();
        for id in PLUGINS {
            // From a task on the runtime's threads, as the daemon's own callers.
            let sup = sup.clone();
            let s = rt
                .block_on(rt.spawn(async move {
                    let mut samples = Vec::with_capacity(warm);
                    for i in 0..warm + warm / 10 {
                        let t = Instant::now();
                        let out = sup.call(id, "noop", Vec::new(), None).await;
                        assert_eq!(out.unwrap(), b"");
                        if i >= warm / 10 {
                            samples.push(t.elapsed());
                        }
                    }
                    stats(samples)
                }))
                .unwrap();
            row(
                &format!("library, multi-thread runtime: {id}"),
                s,
                Some(raw),
            );
        }
        let d = Daemon::start("[\"wasm\", \"python\"]");
        for id in PLUGINS {
            let mut c = d.connect();
            let s = sample(warm, || c.noop(id));
            row(
                &format!("daemon, persistent connection: {id}"),
                s,
                Some(raw),
            );
        }
        let s = sample(warm / 4, || d.connect().noop("hello-wasm"));
        row("daemon, a connection per call: hello-wasm", s, Some(raw));
        println!("  (targets: library <= 1.5x raw, persistent connection <= 2.5x raw)");

        println!("the CLI ({cli_iters} samples)");
        let t = spawn_wait(cli_iters, Path::new("/bin/true"), &[]);
        row("baseline: fork+exec+wait /bin/true", t, None);
        let full = built().corral_supervisor();
        let v = spawn_wait(cli_iters, &full, &[OsStr::new("--version")]);
        row("corral-supervisor --version (the full binary)", v, Some(t));
        let v = spawn_wait(cli_iters, &corral, &[OsStr::new("--version")]);
        row(
            "corral --version (the front, then the full binary)",
            v,
            Some(t),
        );
        for id in ["hello-wasm", "hello-python"] {
            let args = [
                OsStr::new("call"),
                OsStr::new("--socket"),
                d.socket.as_os_str(),
                OsStr::new(id),
                OsStr::new("noop"),
            ];
            let c = spawn_wait(cli_iters, &corral, &args);
            row(&format!("corral call {id} noop"), c, Some(t));
            let c = spawn_wait(cli_iters, &full, &args);
            row(
                &format!("corral-supervisor call {id} noop (the full binary)"),
                c,
                Some(t),
            );
        }
        println!("  (ratio: p50 / /bin/true p50; target <= 2x)");

        let ceiling = raw_socket_pipelined(64, run);
        println!(
            "throughput of one plugin ({:.1} s per row); raw echo, 64 frames in flight: {ceiling:.0} round trips/s",
            run.as_secs_f64()
        );
        for id in PLUGINS {
            for callers in [1, 8, 64] {
                let r = library_throughput(&rt, &sup, id, callers, run);
                rate_row(&format!("library: {id}, {callers} callers"), r, ceiling);
            }
            for callers in [1, 8, 64] {
                let r = daemon_throughput(&d, id, callers, run);
                rate_row(&format!("daemon: {id}, {callers} callers"), r, ceiling);
            }
        }
        println!("  the same with instances = 2 (one worker per core)");
        for id in PARALLEL {
            for callers in [1, 8, 64] {
                let r = daemon_throughput(&d, id, callers, run);
                rate_row(&format!("daemon: {id}, {callers} callers"), r, ceiling);
            }
        }
        println!(
            "  64 callers on pipelining connections (calls sent without waiting, \
             answered in order): 1 connection x 64, 8 x 8"
        );
        for id in PLUGINS.iter().chain(&PARALLEL) {
            for (conns, window) in [(1, 64), (8, 8)] {
                let r = daemon_pipelined(&d, id, conns, window, run);
                rate_row(
                    &format!("daemon: {id}, {conns} x {window} in flight"),
                    r,
                    ceiling,
                );
            }
        }
        println!("  (target: instances = 2 through the daemon >= 100,000 calls/s at 64 callers)");
        drop(d);
        rt.block_on(sup.shutdown(Duration::from_secs(2)));
    }
}
