//! The Python worker (CPython): the contract's Python specifics, the isolated
//! interpreter, deadlines (interrupt, then the kill backstop), every isolation
//! level, and a hostile Python plugin at each level.

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::{
    assert_confined_at, fixture_plugin, open_tempdir, options, py_plugin, test_policy,
};
use corral_protocol::{CallError, ExitReason};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

struct Py {
    id: &'static str,
    sup: Supervisor,
    plugin: TempDir,
    _cache: TempDir,
}

fn py_at(id: &'static str, plugin: TempDir, level: Level) -> Py {
    py_at_with(id, plugin, level, |_| {})
}

fn py_at_with(
    id: &'static str,
    plugin: TempDir,
    level: Level,
    tweak: impl FnOnce(&mut corral::Options),
) -> Py {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = Arc::new(test_policy().with_level(level, "test"));
    // Seccomp and OOM kills cost a restart each: no backoff between them here.
    opts.restart.max_crashes = 1000;
    opts.restart.base_backoff = Duration::from_millis(1);
    opts.restart.max_backoff = Duration::from_millis(1);
    tweak(&mut opts);
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(plugin.path()).unwrap();
    Py {
        id,
        sup,
        plugin,
        _cache: cache,
    }
}

fn py(limits: &str, level: Level) -> Py {
    py_at("kit", py_plugin("kit", limits), level)
}

impl Py {
    async fn call(&self, f: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        self.sup.call(self.id, f, input.to_vec(), None).await
    }

    async fn text(&self, f: &str, input: &str) -> String {
        String::from_utf8(self.call(f, input.as_bytes()).await.unwrap()).unwrap()
    }

    async fn info(&self) -> corral_protocol::PluginInfo {
        self.sup.list().await.remove(0)
    }

    async fn stop(self) {
        self.sup.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn the_contract_in_python() {
    let k = py("", Level::Standard);
    assert_eq!(k.text("ready", "").await, "ready", "init ran first");
    assert_eq!(
        k.text("greet", "ada").await,
        "Hello, ADA!",
        "a package of the plugin imports"
    );
    assert_eq!(
        k.text("json", r#"{"a":[1,2],"b":"é"}"#).await,
        r#"{"a": [1, 2], "b": "é", "seen": true}"#
    );
    assert_eq!(
        k.call("log", b"").await.unwrap(),
        b"",
        "None is empty output"
    );
    assert_eq!(
        k.text("log_levels", "").await,
        "ValueError: corral.log: unknown level \"loud\" (error, warn, info, debug, trace)"
    );
    let now: i64 = k.text("now", "").await.parse().unwrap();
    let ours = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((ours - now).abs() < 5_000, "host clock {now} vs {ours}");
    match k.call("wrong_type", b"").await {
        Err(CallError::Plugin { message }) => {
            assert!(message.contains("a value of type dict"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    match k.call("bug", b"").await {
        Err(CallError::Plugin { message }) => {
            assert!(
                message.starts_with("NameError: name 'undefined_variable' is not defined"),
                "{message}"
            );
            let file = k.plugin.path().join("plugin.py");
            assert!(
                message.contains(&format!("File \"{}\", line ", file.display())),
                "the traceback names the plugin's file: {message}"
            );
        }
        other => panic!("{other:?}"),
    }
    match k.call("greet", b"").await {
        Err(CallError::Plugin { message }) => {
            assert!(
                message.starts_with("ValueError: give a name to greet"),
                "{message}"
            );
            assert!(message.contains("in greet"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match k.call("deep", b"").await {
        Err(CallError::Trap { message }) => {
            assert!(message.starts_with("RecursionError"), "{message}");
            assert!(
                message.contains("Previous line repeated"),
                "Python folds the repeated frames: {message}"
            );
            assert!(message.len() < 16 << 10, "{} bytes", message.len());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(k.info().await.restarts, 0);
    k.stop().await;
}

#[tokio::test]
async fn the_interpreter_is_isolated_and_the_intended_one() {
    let k = py("", Level::Standard);
    let env: serde_json::Value = serde_json::from_str(&k.text("environment", "").await).unwrap();
    let path: Vec<&str> = env["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(path.len(), 3, "plugin dir, stdlib, lib-dynload: {path:?}");
    // The plugin's files: the copy of its version the supervisor made.
    let copy = corral_integration_tests::version_copy(k._cache.path(), k.plugin.path());
    assert_eq!(path[0], copy.to_str().unwrap());
    assert_eq!(
        std::fs::read(copy.join("plugin.py")).unwrap(),
        std::fs::read(k.plugin.path().join("plugin.py")).unwrap()
    );
    assert!(path[2].ends_with("/lib-dynload"), "{path:?}");
    for flag in ["isolated", "no_site", "no_user_site", "ignore_environment"] {
        assert_eq!(env["flags"][flag], 1, "{flag}");
    }
    assert_eq!(env["site_loaded"], false);
    for var in env["env"].as_array().unwrap() {
        let var = var.as_str().unwrap();
        assert!(
            var.starts_with("CORRAL_") || var == "RUST_BACKTRACE",
            "the worker's environment holds {var}"
        );
    }
    // The standard library imports (pure Python, and C extensions with their
    // shared libraries); what pip installed beside this interpreter does not.
    for module in ["csv", "decimal", "ctypes", "sqlite3", "zlib", "hashlib"] {
        assert_eq!(k.text("import_probe", module).await, "ok", "{module}");
    }
    for module in ["yaml", "pip", "IPython"] {
        assert_eq!(
            k.text("import_probe", module).await,
            format!("ModuleNotFoundError: No module named '{module}'")
        );
    }

    // The worker mapped the libpython it was built against (RUNPATH), not another
    // 3.11 such as Debian's.
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sysconfig, sys; print(sysconfig.get_config_var('LIBDIR')); print(sys.version.split()[0])",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let (libdir, version) = (lines.next().unwrap(), lines.next().unwrap());
    assert_eq!(env["version"], version);
    let pid = k.info().await.pid.unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let libpython: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains("libpython"))
        .collect();
    assert!(!libpython.is_empty(), "no libpython mapped");
    for p in libpython {
        assert!(p.starts_with(libdir), "{p} is not under {libdir}");
    }
    k.stop().await;
}

#[tokio::test]
async fn deadlines_interrupt_the_code_and_the_supervisor_kills_what_ignores_them() {
    // A deadline long enough that re-importing the module after an interrupt (which
    // runs under the same deadline) fits on a slow, shared machine.
    let k = py("timeout = \"1s\"", Level::Standard);
    let backstop = Duration::from_millis(1000) + corral::Options::new().kill_grace;
    k.call("ok", b"").await.unwrap();
    let pid = k.info().await.pid;
    for f in ["spin", "sleepy"] {
        let t = Instant::now();
        assert_eq!(
            k.call(f, b"").await,
            Err(CallError::Timeout { deadline_ms: 1000 }),
            "{f}"
        );
        // Ended by the engine, before the supervisor's backstop would have.
        assert!(t.elapsed() < backstop, "{f}: {:?}", t.elapsed());
        assert_eq!(k.info().await.pid, pid, "{f}: interrupted, not killed");
    }
    // Code that swallows the interrupt meets the backstop: the worker is killed at
    // the deadline plus the kill grace, the call times out, and a new worker serves.
    assert_eq!(
        k.call("stubborn", b"").await,
        Err(CallError::Timeout { deadline_ms: 1000 })
    );
    assert_eq!(k.text("count", "").await, "1");
    let info = k.info().await;
    assert_ne!(info.pid, pid, "the stubborn worker was replaced");
    k.stop().await;
}

#[tokio::test]
async fn python_runs_confined_at_every_level() {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        // A deadline far enough that the memory limit, not the clock, stops `hog`
        // on a slow machine; and the engine, not the supervisor's backstop, must
        // stop `spin` and `hog` (on a loaded machine its answer may take a while).
        let k = py_at_with(
            "kit",
            py_plugin("kit", "timeout = \"10s\"\nmemory = \"32MiB\""),
            level,
            |o| o.kill_grace = Duration::from_secs(10),
        );
        assert_eq!(k.text("greet", "ada").await, "Hello, ADA!", "{level}");
        assert_eq!(
            k.sup
                .call(k.id, "spin", vec![], Some(Duration::from_millis(300)))
                .await,
            Err(CallError::Timeout { deadline_ms: 300 }),
            "{level}"
        );
        assert_eq!(
            k.call("hog", b"").await,
            Err(CallError::MemoryLimit {
                limit_bytes: 32 << 20
            }),
            "{level}"
        );
        assert_eq!(k.text("count", "").await, "1", "{level}");
        for module in ["csv", "ctypes", "sqlite3"] {
            assert_eq!(
                k.text("import_probe", module).await,
                "ok",
                "{level}: {module}"
            );
        }
        let info = k.info().await;
        assert_confined_at(&info, level, "python");
        let landlock = info.enforcement.as_ref().unwrap().landlock.to_string();
        assert!(
            landlock.contains(corral_worker_python_stdlib()),
            "{level}: {landlock}"
        );
        k.stop().await;
    }
}

/// The standard library the worker reads (as Python itself reports it).
fn corral_worker_python_stdlib() -> &'static str {
    static STDLIB: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STDLIB.get_or_init(|| sysconfig_path("stdlib"))
}

/// A `sysconfig` path of the `python3` the worker was built against.
fn sysconfig_path(name: &str) -> String {
    let script = format!("import sysconfig; print(sysconfig.get_path('{name}'))");
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What each attack gets, by level.
struct Expected {
    level: Level,
    shadow: &'static str,
    write_etc: &'static str,
    control_socket: Result<&'static str, &'static str>,
    system: Result<&'static str, &'static str>,
    subprocess: Result<&'static str, &'static str>,
    fork_bomb: Result<&'static str, &'static str>,
    kill: Result<&'static str, &'static str>,
}

#[tokio::test]
async fn a_hostile_python_plugin_is_contained_at_every_level() {
    let unreported = corral::UNREPORTED_SYSCALL;
    let table = [
        Expected {
            level: Level::Standard,
            shadow: "EACCES",
            write_etc: "EACCES",
            control_socket: Ok("EAFNOSUPPORT"),
            system: Ok("exit 127"),
            subprocess: Ok("EACCES"),
            fork_bomb: Ok("EAGAIN after"),
            kill: Ok("EPERM"),
        },
        Expected {
            level: Level::High,
            shadow: "EACCES",
            write_etc: "EACCES",
            control_socket: Ok("EAFNOSUPPORT"),
            system: Ok("killed by SIGSYS"),
            subprocess: Ok("killed by SIGSYS"),
            fork_bomb: Ok("EAGAIN after"),
            kill: Ok("EPERM"),
        },
        Expected {
            level: Level::Maximum,
            shadow: "ENOENT",
            write_etc: "ENOENT",
            control_socket: Err("connect"),
            system: Err(unreported),
            subprocess: Err(unreported),
            fork_bomb: Err("clone"),
            kill: Err("kill"),
        },
    ];
    let control_dir = open_tempdir();
    let control = control_dir.path().join("run/control.sock");
    let _server = corral::control::ControlServer::bind(&control)
        .await
        .unwrap();
    // A socket anyone may connect to, as D-Bus's or a container runtime's.
    let world = control_dir.path().join("world.sock");
    let world_listener = std::os::unix::net::UnixListener::bind(&world).unwrap();
    world_listener.set_nonblocking(true).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&world, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = listener.local_addr().unwrap().to_string();
    let me = std::process::id().to_string();

    for e in table {
        let level = e.level;
        let mut a = py_at(
            "attacker",
            fixture_plugin("py-hostile", "attacker", "python", "plugin.py", ""),
            level,
        );
        let neighbour_plugin = py_plugin("neighbour", "");
        let neighbour_file = neighbour_plugin.path().join("plugin.py");
        a.sup.add_plugin_dir(neighbour_plugin.path()).unwrap();
        let attack = |f: &'static str, arg: String| {
            let sup = &a.sup;
            async move {
                sup.call("attacker", f, arg.into_bytes(), None)
                    .await
                    .map(|b| String::from_utf8(b).unwrap())
            }
        };
        let check = |what: &str, got: Result<String, CallError>, want: Result<&str, &str>| match (
            want, &got,
        ) {
            (Ok(prefix), Ok(out)) if out.starts_with(prefix) => {}
            (Err(syscall), Err(CallError::WorkerCrashed(ExitReason::Seccomp { syscall: s })))
                if s == syscall => {}
            _ => panic!("{level}: {what}: got {got:?}, expected {want:?}"),
        };
        assert_eq!(
            a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
            b"ok"
        );
        let neighbour_pid = a
            .sup
            .list()
            .await
            .into_iter()
            .find(|p| p.id == "neighbour")
            .unwrap()
            .pid;

        check(
            "read /etc/shadow",
            attack("read", "/etc/shadow".into()).await,
            Ok(e.shadow),
        );
        check(
            "read the neighbour's code",
            attack("read", neighbour_file.display().to_string()).await,
            Ok(e.shadow),
        );
        check(
            "write /etc",
            attack("write", "/etc/corral-pwned".into()).await,
            Ok(e.write_etc),
        );
        // Beside the standard library: what pip installed, and the interpreter's
        // own binaries, are not readable either.
        if let Some(readme) = site_packages_file() {
            check(
                "read site-packages",
                attack("read", readme).await,
                Ok(e.shadow),
            );
        }
        let stdlib = std::path::Path::new(corral_worker_python_stdlib());
        let bin = stdlib
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("bin/python3");
        check(
            "read the interpreter's bin/",
            attack("read", bin.display().to_string()).await,
            Ok(e.shadow),
        );
        assert!(!std::path::Path::new("/etc/corral-pwned").exists());
        check("list /", attack("listdir", "/".into()).await, Ok("EACCES"));
        check(
            "TCP connect",
            attack("tcp_connect", tcp.clone()).await,
            Ok("EAFNOSUPPORT"),
        );
        check(
            "dial the control socket",
            attack("unix_connect", control.display().to_string()).await,
            e.control_socket,
        );
        check(
            "dial a world-writable socket",
            attack("unix_connect", world.display().to_string()).await,
            e.control_socket,
        );
        assert!(
            world_listener
                .accept()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "{level}: a connection arrived"
        );
        check("os.system", attack("system", String::new()).await, e.system);
        check(
            "subprocess.run",
            attack("subprocess_run", String::new()).await,
            e.subprocess,
        );
        for (f, syscall) in [
            ("ctypes_ptrace", "ptrace"),
            ("ctypes_mount", "mount"),
            ("ctypes_unshare", "unshare"),
        ] {
            check(f, attack(f, String::new()).await, Err(syscall));
        }
        check(
            "fork bomb",
            attack("fork_bomb", String::new()).await,
            e.fork_bomb,
        );
        check(
            "kill the supervisor",
            attack("kill", me.clone()).await,
            e.kill,
        );
        // Memory: the interpreter's own limit first, for Python objects and C
        // malloc alike (ctypes calls the worker's counted malloc); memory no
        // allocator sees (anonymous mappings) meets the cgroup, which kills the
        // worker.
        assert_eq!(
            attack("hog", String::new()).await,
            Err(CallError::MemoryLimit {
                limit_bytes: 64 << 20
            }),
            "{level}"
        );
        let limit = a.sup.explain("attacker").unwrap().worker_memory.value;
        let got = attack("ctypes_alloc", ((limit >> 20) * 2).to_string()).await;
        let failed_at = got
            .as_deref()
            .ok()
            .and_then(|t| t.strip_prefix("malloc failed after "))
            .and_then(|t| t.strip_suffix(" MiB"))
            .and_then(|n| n.parse::<u64>().ok());
        assert!(
            failed_at.is_some_and(|n| n <= 64),
            "{level}: C malloc past the plugin's 64 MiB: {got:?}"
        );
        assert_eq!(
            attack("ctypes_mmap", ((limit >> 20) * 2).to_string()).await,
            Err(CallError::WorkerCrashed(ExitReason::OomKilled {
                limit_bytes: limit
            })),
            "{level}: memory bomb through ctypes mmap"
        );
        assert_eq!(
            attack("ok", String::new()).await,
            Ok("ok".into()),
            "{level}"
        );

        // The supervisor (this process) and the neighbour never noticed.
        let info = a.sup.list().await;
        let neighbour = info.iter().find(|p| p.id == "neighbour").unwrap();
        assert_eq!(neighbour.pid, neighbour_pid, "{level}");
        assert_eq!(neighbour.restarts, 0, "{level}");
        assert_eq!(
            a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
            b"ok"
        );
        let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
        assert_eq!(attacker.level, level.as_str());
        a.stop().await;
    }
}

/// A file in the interpreter's site-packages, when that lies inside the standard
/// library (pyenv's layout), which the worker must hide.
fn site_packages_file() -> Option<String> {
    let site = std::path::PathBuf::from(sysconfig_path("purelib"));
    if site.parent()? != std::path::Path::new(corral_worker_python_stdlib()) {
        return None;
    }
    std::fs::read_dir(&site)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path().display().to_string())
}
