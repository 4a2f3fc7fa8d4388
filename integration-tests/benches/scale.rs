//! A daemon with many plugins of mixed runtimes, measured from outside: not part of
//! the test suite (it takes minutes and most of the machine).
//!
//! `cargo bench --workspace --bench scale -- [--plugins N] [--max-workers M]
//! [--idle-timeout 30s] [--rounds R] [--callers K]`
//!
//! Writes N plugins (a third each copies of the Wasm, JavaScript and Python
//! examples, under ids the shipped policy does not route, so at `maximum`), starts
//! `corral serve` with a soft `RLIMIT_NOFILE` of 1,024 (the usual default; the daemon
//! lifts it to the hard limit), calls every plugin once through the control socket
//! with K callers (time to all-started), then R rounds of round-robin calls (p50,
//! p99), and prints the workers' total PSS, the supervisor's RSS and descriptors per
//! plugin, and the status line. Then `corral stop`, and checks that no worker
//! process and no cgroup of the daemon is left.

use corral::control::ControlClient;
use corral_integration_tests::bench::stats;
use corral_integration_tests::{built, example_plugin, open_tempdir, plugin_copy};
use corral_protocol::{ControlRequest, ControlResponse};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn kib(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn tree(pid: u32, out: &mut Vec<u32>) {
    out.push(pid);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        tree(c, out);
    }
}

/// Directories named `corral-<pid>` anywhere in the first levels of the cgroup tree.
fn groups_of(pid: u32) -> Vec<PathBuf> {
    fn walk(d: &Path, name: &str, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        &format!("corral-{pid}"),
        5,
        &mut out,
    );
    out
}

async fn call(client: &mut ControlClient, id: &str) -> Result<(), String> {
    let r = client
        .request(&ControlRequest::Call {
            plugin: id.to_owned(),
            function: "noop".into(),
            input: Vec::new(),
            timeout_ms: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    match r {
        ControlResponse::Called(Ok(_)) => Ok(()),
        other => Err(format!("{id}: {other:?}")),
    }
}

/// Every id once (or `rounds` times round-robin) with `callers` connections; the
/// latency of each call and the errors.
async fn drive(
    socket: &Path,
    ids: Arc<Vec<String>>,
    rounds: usize,
    callers: usize,
) -> (Vec<Duration>, Vec<String>) {
    let mut tasks = Vec::new();
    for c in 0..callers {
        let ids = Arc::clone(&ids);
        let socket = socket.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = ControlClient::connect(&socket).await.unwrap();
            let (mut lat, mut errs) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                for id in ids.iter().skip(c).step_by(callers) {
                    let t = Instant::now();
                    match call(&mut client, id).await {
                        Ok(()) => lat.push(t.elapsed()),
                        Err(e) => errs.push(e),
                    }
                }
            }
            (lat, errs)
        }));
    }
    let (mut lat, mut errs) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errs.extend(e);
    }
    (lat, errs)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = arg("--plugins").map_or(1000, |v| v.parse().unwrap());
    let rounds: usize = arg("--rounds").map_or(3, |v| v.parse().unwrap());
    let callers: usize = arg("--callers").map_or(8, |v| v.parse().unwrap());
    let max_workers = arg("--max-workers");
    let idle_timeout = arg("--idle-timeout");
    built();
    let work = open_tempdir();
    let plugins_dir = work.path().join("plugins");
    std::fs::create_dir(&plugins_dir).unwrap();
    let t = Instant::now();
    let examples = [
        ("wasm", built().hello_wasm.clone(), None),
        ("js", PathBuf::new(), Some(example_plugin("hello-js"))),
        ("py", PathBuf::new(), Some(example_plugin("hello-python"))),
    ];
    let mut ids = Vec::new();
    for i in 0..n {
        let (kind, dir, tmp) = &examples[i % 3];
        let src = tmp.as_ref().map_or(dir.as_path(), |t| t.path());
        let id = format!("{kind}-{i:05}");
        let copy = plugin_copy(src, &id);
        std::fs::rename(copy.path(), plugins_dir.join(&id)).unwrap();
        std::mem::forget(copy);
        ids.push(id);
    }
    eprintln!(
        "scale: wrote {n} plugins in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut config = String::from(
        "plugins_dir = \"plugins\"\nsocket = \"control.sock\"\ncache_dir = \"cache\"\n\
         state_dir = \"state\"\naudit = \"audit.jsonl\"\n",
    );
    if let Some(m) = &max_workers {
        config.push_str(&format!("max_workers = {m}\n"));
    }
    if let Some(d) = &idle_timeout {
        config.push_str(&format!("idle_timeout = \"{d}\"\n"));
    }
    let config_path = work.path().join("corral.toml");
    std::fs::write(&config_path, config).unwrap();
    let socket = work.path().join("control.sock");

    let mut cmd = Command::new(built().corral());
    cmd.args(["serve", "--config"])
        .arg(&config_path)
        .env("CORRAL_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: getrlimit and setrlimit are async-signal-safe and touch the child only.
    unsafe {
        cmd.pre_exec(|| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
            r.rlim_cur = 1024.min(r.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut daemon = cmd.spawn().unwrap();
    let pid = daemon.id();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(300), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let registered = start.elapsed();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ids = Arc::new(ids);
    let (first, errs) = rt.block_on(drive(&socket, Arc::clone(&ids), 1, callers));
    let all_started = start.elapsed();
    let first = stats(first);
    println!("scale: {n} plugins (wasm, js, python in turn), {callers} callers");
    println!(
        "  daemon up (socket bound): {:.2} s; every plugin answered once: {:.2} s from the \
         daemon's start (target 5 s); first calls p50 {:.1} ms p99 {:.1} ms; {} errors",
        registered.as_secs_f64(),
        all_started.as_secs_f64(),
        first.p50.as_secs_f64() * 1e3,
        first.p99.as_secs_f64() * 1e3,
        errs.len()
    );
    for e in errs.iter().take(5) {
        println!("    {e}");
    }
    let (lat, errs) = rt.block_on(drive(&socket, Arc::clone(&ids), rounds, callers));
    let s = stats(lat);
    println!(
        "  round-robin, {rounds} rounds: p50 {:.1} us, p99 {:.1} us; {} errors",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        errs.len()
    );
    for e in errs.iter().take(5) {
        println!("    {e}");
    }
    let list = rt.block_on(async {
        let mut c = ControlClient::connect(&socket).await.unwrap();
        match c.request(&ControlRequest::List).await.unwrap() {
            ControlResponse::Plugins(p) => p,
            other => panic!("{other:?}"),
        }
    });
    let mut workers = Vec::new();
    for p in &list {
        if let Some(w) = p.pid {
            tree(w, &mut workers);
        }
    }
    let live = list.iter().filter(|p| p.pid.is_some()).count();
    // The zygote templates the workers were forked from (their parent, when it is
    // not the daemon) share their memory with them: counted once each.
    let templates: std::collections::BTreeSet<u32> = list
        .iter()
        .filter_map(|p| p.pid)
        .map(|w| kib(w, "status", "PPid:") as u32)
        .filter(|&t| t != pid)
        .collect();
    let pss: u64 = workers
        .iter()
        .chain(templates.iter())
        .map(|&w| kib(w, "smaps_rollup", "Pss:"))
        .sum();
    let rss = kib(pid, "status", "VmRSS:");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    println!(
        "  live workers {live}: total PSS {:.1} MiB ({:.2} MiB each); supervisor RSS {:.1} MiB \
         ({:.1} KiB per plugin), {fds} descriptors ({:.2} per live worker)",
        pss as f64 / 1024.0,
        pss as f64 / 1024.0 / live.max(1) as f64,
        rss as f64 / 1024.0,
        rss as f64 / n as f64,
        fds as f64 / live.max(1) as f64
    );
    let status = Command::new(built().corral())
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    for l in String::from_utf8_lossy(&status.stdout)
        .lines()
        .filter(|l| l.contains("workers:"))
    {
        println!("  {}", l.trim());
    }
    let t = Instant::now();
    let stop = Command::new(built().corral())
        .args(["stop", "--socket"])
        .arg(&socket)
        .status()
        .unwrap();
    assert!(stop.success());
    daemon.wait().unwrap();
    let left: Vec<u32> = workers
        .iter()
        .copied()
        .filter(|&w| !corral_integration_tests::process_gone(w))
        .collect();
    let groups = groups_of(pid);
    println!(
        "  stopped in {:.2} s; worker processes left: {}; cgroups left: {}",
        t.elapsed().as_secs_f64(),
        left.len(),
        groups.len()
    );
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(groups.is_empty(), "cgroups left: {groups:?}");
}
