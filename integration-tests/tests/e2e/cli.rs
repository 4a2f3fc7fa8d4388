//! The `corral` binary: one-shot runs, the daemon, exit codes, and no orphans.

use crate::support::{text, wait_for};
use corral_integration_tests::{built, fixture, wait_gone, wat_plugin};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn corral(cache: &Path) -> Command {
    let mut c = Command::new(built().corral());
    c.env("CORRAL_CACHE_DIR", cache)
        .env("CORRAL_POLICY", fixture("policy/test.toml"))
        .env_remove("CORRAL_SOCKET");
    c
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run corral")
}

#[test]
/// Output goes out byte for byte when piped (a newline is added only on a terminal).
fn run_prints_the_plugin_output() {
    let cache = corral_integration_tests::open_tempdir();
    let out = run(corral(cache.path())
        .args(["run"])
        .arg(&built().hello_wasm)
        .args(["greet", "--input", "Ada"]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, Ada!");

    // --input-file, including standard input.
    let file = cache.path().join("in.txt");
    std::fs::write(&file, "one two\nthree").unwrap();
    let out = run(corral(cache.path())
        .arg("run")
        .arg(&built().hello_wasm)
        .args(["wc", "--input-file"])
        .arg(&file));
    assert_eq!(text(&out.stdout), "{\"lines\":2,\"words\":3,\"bytes\":13}");
    let mut child = corral(cache.path())
        .arg("run")
        .arg(&built().hello_wasm)
        .args(["reverse", "--input-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"stressed").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "desserts");
}

#[test]
fn exit_codes_and_json_output() {
    let cache = corral_integration_tests::open_tempdir();
    let hello = &built().hello_wasm;

    let out = run(corral(cache.path())
        .arg("run")
        .arg(hello)
        .args(["greet", "--input", "Ada", "--json"]));
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!({"ok": true, "output": "Hello, Ada!"}));

    let out = run(corral(cache.path())
        .arg("run")
        .arg(hello)
        .args(["greet", "--input", " "]));
    assert_eq!(out.status.code(), Some(3), "plugin error");
    assert_eq!(
        text(&out.stderr).trim(),
        "error: plugin returned an error: give a name to greet"
    );

    let out = run(corral(cache.path())
        .arg("run")
        .arg(hello)
        .args(["nope", "--json"]));
    assert_eq!(out.status.code(), Some(6), "unknown function");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["kind"], "unknown_function");

    let kit = wat_plugin("kit", "testkit.wat", "");
    let out =
        run(corral(cache.path())
            .arg("run")
            .arg(kit.path())
            .args(["spin", "--timeout", "200ms"]));
    assert_eq!(out.status.code(), Some(4), "deadline");
    assert!(text(&out.stderr).contains("exceeded its deadline of 200 ms"));
    let out = run(corral(cache.path())
        .arg("run")
        .arg(kit.path())
        .args(["trap"]));
    assert_eq!(out.status.code(), Some(4), "trap");

    let out = run(corral(cache.path()).args(["run", "/nonexistent/plugin", "f"]));
    assert_eq!(out.status.code(), Some(7));
    assert!(text(&out.stderr).contains("cannot resolve plugin directory /nonexistent/plugin"));

    let out =
        run(corral(cache.path()).args(["run", "x", "f", "--input", "a", "--input-file", "b"]));
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn malformed_manifest_names_file_line_and_column() {
    let cache = corral_integration_tests::open_tempdir();
    let kit = wat_plugin("kit", "testkit.wat", "timout = \"1s\"");
    let out = run(corral(cache.path()).arg("run").arg(kit.path()).arg("ok"));
    assert_eq!(out.status.code(), Some(7));
    let err = text(&out.stderr);
    let manifest = kit.path().canonicalize().unwrap().join("plugin.toml");
    let expected = format!("error: {}:7:1: unknown field `timout`", manifest.display());
    assert!(err.starts_with(&expected), "{err}");
    assert!(
        err.contains("expected one of `memory`, `timeout`, `max_output`"),
        "{err}"
    );
}

struct Daemon {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with_policy(&fixture("policy/test.toml"))
    }

    /// A daemon with the example plugin and the WAT test kit, under `policy`.
    fn start_with_policy(policy: &Path) -> Daemon {
        Daemon::start_with(policy, "testkit.wat")
    }

    /// A daemon with the example plugin and `module` as the plugin `kit`.
    fn start_with(policy: &Path, module: &str) -> Daemon {
        Daemon::start_with_manifest(policy, module, "")
    }

    /// [`Daemon::start_with`], `extra` appended to the kit's plugin.toml.
    fn start_with_manifest(policy: &Path, module: &str, extra: &str) -> Daemon {
        let dir = corral_integration_tests::open_tempdir();
        let kit = dir.path().join("kit");
        std::fs::create_dir(&kit).unwrap();
        std::fs::copy(fixture(module), kit.join(module)).unwrap();
        std::fs::write(
            kit.join("plugin.toml"),
            format!(
                "id = \"kit\"\nversion = \"1.0.0\"\nruntime = \"wasm\"\nentry = \"{module}\"\n{extra}"
            ),
        )
        .unwrap();
        let socket = dir.path().join("run/control.sock");
        let config = dir.path().join("corral.toml");
        std::fs::write(
            &config,
            format!(
                "plugins = [{:?}, \"kit\"]\nsocket = \"run/control.sock\"\ncache_dir = \"cache\"\n\
                 policy = {:?}\n",
                built().hello_wasm.to_str().unwrap(),
                policy.to_str().unwrap()
            ),
        )
        .unwrap();
        let child = Command::new(built().corral())
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < until, "daemon did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Plugin `id` as `corral <command> --json` (`list` or `status`) shows it.
    fn plugin_json(&self, command: &str, id: &str) -> Option<serde_json::Value> {
        let out = self.cli(&[command, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let v = if command == "status" {
            &v["plugins"]
        } else {
            &v
        };
        v.as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(built().corral())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn worker_pids(&self) -> Vec<u32> {
        let out = self.cli(&["list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_call_list_stop() {
    let mut d = Daemon::start();
    let out = d.cli(&["call", "hello-wasm", "greet", "--input", "Cy"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, Cy!");
    let out = d.cli(&["call", "kit", "fail", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["error"]["message"],
        "plugin returned an error: boom requested"
    );
    let out = d.cli(&["call", "ghost", "f"]);
    assert_eq!(out.status.code(), Some(6));

    let out = d.cli(&["list"]);
    let table = text(&out.stdout);
    assert!(table.starts_with("PLUGIN"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("hello-wasm") && l.contains("running")),
        "{table}"
    );
    let kit = d.plugin_json("list", "kit").unwrap();
    assert_eq!(kit["state"], "running");
    assert_eq!(kit["calls"], 1);
    assert!(
        kit["exports"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("spin"))
    );

    // `status` says what each worker really enforces.
    let out = d.cli(&["status"]);
    let status = text(&out.stdout);
    assert!(
        status.contains("hello-wasm 0.1.0 (wasm) running as pid"),
        "{status}"
    );
    assert!(status.contains("level standard"), "{status}");
    assert!(
        status.contains("  landlock    enforced (ABI 6 rules, kernel ABI ")
            && status.contains(": filesystem, TCP bind/connect denied"),
        "{status}"
    );
    assert!(
        status.contains("  seccomp     enforced (standard deny-list")
            && status.contains(
                "no new sockets (socket answers EAFNOSUPPORT: no network, no host unix \
                 socket), stream socketpairs only; no inotify or fanotify (EPERM); no renicing, \
                 rescheduling, pinning or limiting another process (EPERM))"
            ),
        "{status}"
    );
    assert!(status.contains("own ipc"), "{status}");
    assert!(status.contains("  process     no_new_privs on"), "{status}");
    // And what the supervisor itself enforces, each rule with its enforcer.
    for rule in [
        "  supervisor  frames: a result or host call at most ",
        "  supervisor  protocol: answers only to running calls, at most 4 host calls",
        "  supervisor  output: stdout, stderr and log lines cut at 4 KiB, any bytes, 64 KiB/s",
        "  supervisor  audit: 50 events/s per plugin after a burst of 200",
        "  supervisor  deadlines: load and init within ",
        "  supervisor  process tree: everything in the worker's cgroup dies with it",
        "  supervisor  fetch: every hop's addresses judged and the connection pinned",
    ] {
        assert!(status.contains(rule), "{rule}: {status}");
    }
    assert!(
        status.contains(
            "counted from when it is sent, then SIGKILL; one call at a time per worker, up to \
             1 worker; a call waiting longer than its deadline for one fails unsent, killing \
             nothing; a call sent behind a fast worker's running call counts from when it \
             begins, and one not begun within its deadline fails unrun"
        ),
        "{status}"
    );
    let out = d.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["policy_error"], serde_json::Value::Null, "{v}");
    assert_eq!(v["daemon"]["workers"]["live"], 2, "{v}");
    let v = &v["plugins"];
    assert_eq!(v[0]["enforcement"]["landlock"]["status"], "full", "{v}");
    assert_eq!(v[0]["enforcement"]["no_new_privs"], true);
    assert_eq!(v[0]["supervision"].as_array().map(Vec::len), Some(7), "{v}");

    let workers = d.worker_pids();
    assert_eq!(workers.len(), 2);
    let out = d.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0));
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!d.socket.exists(), "socket removed");
    for pid in workers {
        assert!(
            wait_gone(pid, Duration::from_secs(2)),
            "worker {pid} stopped"
        );
    }
    let out = d.cli(&["list"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "daemon gone: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("is `corral serve` running?"));
}

/// `corral call` is answered by the front (`corral`, crates/client) without the
/// full binary: a copy of the front alone answers the daemon; everything else it
/// hands to `corral-supervisor` beside it, and says so when that is missing. Both
/// binaries answer every kind of call with the same bytes and the same code.
#[test]
fn the_front_answers_calls_alone_and_the_same_as_the_full_binary() {
    let d = Daemon::start();
    let missing = d._dir.path().join("no-daemon.sock");
    let missing = missing.to_str().unwrap();
    let input = d._dir.path().join("input.txt");
    std::fs::write(&input, "Di").unwrap();
    let input = input.to_str().unwrap();
    // (arguments, the exit code both must end with)
    let cases: &[(&[&str], i32)] = &[
        (&["call", "hello-wasm", "greet", "--input", "Cy"], 0),
        (
            &["call", "hello-wasm", "greet", "--input", "Cy", "--json"],
            0,
        ),
        (&["call", "hello-wasm", "greet", "--input-file", input], 0),
        (&["call", "kit", "fail"], 3),
        (&["call", "kit", "fail", "--json"], 3),
        (&["call", "kit", "spin", "--timeout", "50ms"], 4),
        (&["call", "ghost", "f"], 6),
        (&["call", "ghost", "f", "--json"], 6),
        (&["call", "hello-wasm", "nope", "--json"], 6),
        (
            &[
                "call",
                "hello-wasm",
                "greet",
                "--input-file",
                "/nonexistent/x",
            ],
            1,
        ),
        (&["call", "hello-wasm", "greet", "--timeout", "soon"], 2),
        (
            &[
                "call",
                "hello-wasm",
                "greet",
                "--input",
                "a",
                "--input-file",
                input,
            ],
            2,
        ),
        (&["call", "hello-wasm"], 2),
        (&["call", "hello-wasm", "greet", "--socket", missing], 8),
        (
            &["call", "hello-wasm", "greet", "--json", "--socket", missing],
            8,
        ),
    ];
    let run = |bin: &Path, args: &[&str]| {
        let mut c = Command::new(bin);
        c.args(args).env_remove("CORRAL_SOCKET");
        if !args.contains(&"--socket") {
            c.arg("--socket").arg(&d.socket);
        }
        c.output().unwrap()
    };
    for (args, code) in cases {
        let front = run(&built().corral(), args);
        let full = run(&built().corral_supervisor(), args);
        assert_eq!(
            front.status.code(),
            Some(*code),
            "{args:?}: {}",
            text(&front.stderr)
        );
        assert_eq!(front.status.code(), full.status.code(), "{args:?}");
        assert_eq!(text(&front.stdout), text(&full.stdout), "{args:?}");
        assert_eq!(text(&front.stderr), text(&full.stderr), "{args:?}");
    }
    let out = run(
        &built().corral(),
        &["call", "hello-wasm", "greet", "--input", "Cy", "--json"],
    );
    assert_eq!(
        text(&out.stdout),
        "{\"ok\":true,\"output\":\"Hello, Cy!\"}\n"
    );
    let out = run(
        &built().corral(),
        &["call", "hello-wasm", "greet", "--socket", missing],
    );
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: cannot connect to the corral daemon at {missing} (is `corral serve` \
             running?): No such file or directory (os error 2)\n"
        )
    );

    // The front alone, without corral-supervisor beside it.
    let alone = d._dir.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(built().corral(), alone.join("corral")).unwrap();
    let out = run(
        &alone.join("corral"),
        &["call", "hello-wasm", "greet", "--input", "Cy"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, Cy!");
    let out = Command::new(alone.join("corral"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: cannot run {}: No such file or directory (os error 2) (every command but \
             `call` is in that binary, installed beside `corral`)\n",
            alone.join("corral-supervisor").display()
        )
    );

    // Everything else is the full binary's, in the same process: its version, its
    // help (under the name `corral`), its other commands.
    let version = |bin: &Path| Command::new(bin).arg("--version").output().unwrap();
    let (front, full) = (
        version(&built().corral()),
        version(&built().corral_supervisor()),
    );
    assert_eq!(front.status.code(), Some(0));
    assert_eq!(text(&front.stdout), text(&full.stdout));
    assert!(
        text(&front.stdout).starts_with("corral "),
        "{}",
        text(&front.stdout)
    );
    let help = Command::new(built().corral())
        .args(["call", "--help"])
        .output()
        .unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(
        text(&help.stdout).contains("Usage: corral call [OPTIONS] <PLUGIN> <FUNCTION>"),
        "{}",
        text(&help.stdout)
    );
    let out = d.cli(&["list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(d.plugin_json("list", "hello-wasm").is_some());
}

#[test]
fn sigterm_stops_the_daemon_and_its_workers() {
    let mut d = Daemon::start();
    d.cli(&["call", "kit", "ok"]);
    let workers = d.worker_pids();
    assert_eq!(workers.len(), 1);
    // SAFETY: signals the daemon this test started.
    assert_eq!(unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) }, 0);
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(wait_gone(workers[0], Duration::from_secs(2)));
}

/// A plugin whose `init` never returns (within the test policy's 60 s deadline)
/// holds nothing up in a daemon: its caller waits, but `list` answers at once and
/// shows it starting, and SIGTERM stops the daemon within its grace, killing the
/// half-started worker; the caller is told.
#[test]
fn an_init_that_never_returns_holds_up_neither_list_nor_sigterm() {
    let mut d = Daemon::start_with(&fixture("policy/test.toml"), "init-spin.wat");
    let caller = Command::new(built().corral())
        .args(["call", "kit", "ok", "--socket"])
        .arg(&d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state = |d: &Daemon| {
        d.plugin_json("list", "kit")
            .map(|p| p["state"].as_str().unwrap().to_owned())
    };
    let until = Instant::now() + Duration::from_secs(20);
    while state(&d).as_deref() != Some("starting") {
        assert!(Instant::now() < until, "kit never showed as starting");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    assert_eq!(state(&d).as_deref(), Some("starting"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "list took {:?}",
        t.elapsed()
    );
    // The daemon's descendants: the spinning worker, forked from its zygote
    // template (the module's compile helper comes and goes before it).
    let pid = d.child.id();
    let until = Instant::now() + Duration::from_secs(20);
    let workers = loop {
        let all = corral_integration_tests::descendants(pid);
        let forked = all.iter().any(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .is_some_and(|pp| pp.trim() != pid.to_string())
        });
        if forked {
            break all;
        }
        assert!(Instant::now() < until, "no worker is loading: {all:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let t = Instant::now();
    // SAFETY: signals the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    for w in workers {
        assert!(
            wait_gone(w, Duration::from_secs(2)),
            "worker {w} outlived the daemon"
        );
    }
    let out = caller.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(!text(&out.stderr).is_empty(), "the caller was told");
}

#[test]
fn no_orphan_workers_when_the_supervisor_is_sigkilled() {
    let mut d = Daemon::start();
    d.cli(&["call", "kit", "ok"]);
    d.cli(&["call", "hello-wasm", "noop"]);
    let workers = d.worker_pids();
    assert_eq!(workers.len(), 2);
    d.child.kill().unwrap(); // SIGKILL: no chance to clean up
    d.child.wait().unwrap();
    for pid in workers {
        assert!(
            wait_gone(pid, Duration::from_secs(2)),
            "worker {pid} outlived its supervisor"
        );
    }
}

#[test]
fn policy_check_accepts_the_shipped_policy_and_names_every_error() {
    let shipped = corral_integration_tests::repo_root().join("policies");
    let out = run(Command::new(built().corral())
        .args(["policy", "check"])
        .arg(&shipped));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.starts_with("policy OK: "), "{report}");
    assert!(
        report.contains("levels.toml") && report.contains("routes.toml"),
        "{report}"
    );
    assert!(
        report.contains("route \"shipped examples\" -> standard ("),
        "{report}"
    );
    assert!(report.contains("unmatched plugins -> maximum"), "{report}");
    // Without a path: the built-in copy of the same files.
    let out = run(Command::new(built().corral()).args(["policy", "check"]));
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("(built in)"));

    // A broken policy directory: every file's errors, exit code 7 (invalid).
    let dir = corral_integration_tests::open_tempdir();
    std::fs::write(
        dir.path().join("10-levels.toml"),
        "[level.standard]\nmemory = \"lots\"\ncpus = 2\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("20-routes.toml"),
        "[[route]]\nid = \"billing-*\"\nlevel = \"hihg\"\n",
    )
    .unwrap();
    let out = run(Command::new(built().corral())
        .args(["policy", "check"])
        .arg(dir.path()));
    assert_eq!(out.status.code(), Some(7));
    let err = text(&out.stderr);
    let levels = dir.path().join("10-levels.toml");
    let routes = dir.path().join("20-routes.toml");
    assert!(
        err.contains(&format!(
            "{}:3:1: unknown field `cpus`, expected one of `memory`, `worker_memory`, `cpu`",
            levels.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}:3:9: unknown level `hihg`; expected one of: standard, high, maximum",
            routes.display()
        )),
        "{err}"
    );
    assert!(err.contains("policy check failed: 2 error(s)"), "{err}");
}

#[test]
fn policy_explain_names_the_file_and_line_of_every_value() {
    let shipped = corral_integration_tests::repo_root().join("policies");
    let out = run(Command::new(built().corral())
        .args(["policy", "explain"])
        .arg(corral_integration_tests::repo_root().join("examples/hello-wasm"))
        .arg("--policy")
        .arg(&shipped));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let e = text(&out.stdout);
    let routes = shipped.join("routes.toml");
    let levels = shipped.join("levels.toml");
    let line = |key: &str| {
        e.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {e}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("route "), "route shipped examples");
    assert!(
        line("level ").starts_with(&format!("level standard {}:", routes.display())),
        "{e}"
    );
    assert!(line("memory ").starts_with("memory 32 MiB "), "{e}");
    assert!(
        line("memory ").ends_with("examples/hello-wasm/plugin.toml:12:10 (the plugin's request)"),
        "{e}"
    );
    assert_eq!(line("cpu "), format!("cpu 1 {}:13:7", levels.display()));
    assert_eq!(line("pids "), format!("pids 64 {}:15:8", levels.display()));
    assert!(
        line("worker_memory ").starts_with("worker_memory 320 MiB derived: 2 × memory"),
        "{e}"
    );

    // An unknown plugin directory is routed to maximum.
    let kit = wat_plugin("stranger", "testkit.wat", "");
    let out = run(Command::new(built().corral())
        .args(["policy", "explain"])
        .arg(kit.path()));
    let e = text(&out.stdout);
    assert!(
        e.contains("no route matched: unmatched plugins get maximum"),
        "{e}"
    );
    assert!(e.contains("tmpfs"), "{e}");

    let out = run(Command::new(built().corral()).args(["policy", "explain", "nothing-here"]));
    assert_eq!(out.status.code(), Some(6));
}

#[test]
fn policy_edits_apply_live_and_a_bad_edit_keeps_the_last_good_policy() {
    let pol = corral_integration_tests::open_tempdir();
    let file = pol.path().join("10-test.toml");
    let base = std::fs::read_to_string(fixture("policy/test.toml")).unwrap();
    std::fs::write(&file, &base).unwrap();
    let d = Daemon::start_with_policy(pol.path());
    let call_ok = || {
        let out = d.cli(&["call", "kit", "ok"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    };
    call_ok();
    let kit_pid = || {
        let kit = d.plugin_json("list", "kit").unwrap();
        (
            kit["pid"].as_u64().map(|p| p as u32),
            kit["level"].as_str().unwrap().to_owned(),
        )
    };
    let (pid, level) = kit_pid();
    let pid = pid.unwrap();
    assert_eq!(level, "standard");
    let pids_max = corral_integration_tests::v1_cgroup(&pid.to_string(), "pids").join("pids.max");
    let quota =
        corral_integration_tests::v1_cgroup(&pid.to_string(), "cpu").join("cpu.cfs_quota_us");
    assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "64");

    // Tighter CPU and pids for the route: written into the running worker's group.
    let tighter = base.replace(
        "level = \"standard\"",
        "level = \"standard\"\nlimits = { pids = 20, cpu = 0.5 }",
    );
    assert_ne!(tighter, base);
    let route_line = 1 + tighter
        .lines()
        .position(|l| l.starts_with("limits = { pids = 20"))
        .unwrap();
    std::fs::write(&file, &tighter).unwrap();
    wait_for("pids.max = 20", Duration::from_secs(10), || {
        std::fs::read_to_string(&pids_max).is_ok_and(|s| s.trim() == "20")
    });
    assert_eq!(std::fs::read_to_string(&quota).unwrap().trim(), "50000");
    // Against the kernel's default period, which the supervisor does not write.
    let period = quota.with_file_name("cpu.cfs_period_us");
    assert_eq!(std::fs::read_to_string(&period).unwrap().trim(), "100000");
    assert_eq!(kit_pid().0, Some(pid), "same worker, limits changed live");
    call_ok();

    // The daemon explains its live policy.
    let out = d.cli(&["policy", "explain", "kit"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let e = text(&out.stdout);
    assert!(
        e.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["pids", "20", &format!("{}:{route_line}:19", file.display())]),
        "{e}"
    );
    let out = d.cli(&["policy", "explain", "ghost"]);
    assert_eq!(out.status.code(), Some(6));

    // A bad edit: rejected with file, line and column; the last good policy stays.
    std::fs::write(&file, tighter.replace("pids = 20", "pids = 2")).unwrap();
    wait_for("the rejection in status", Duration::from_secs(10), || {
        text(&d.cli(&["status"]).stdout).contains("policy reload REJECTED")
    });
    let status = text(&d.cli(&["status"]).stdout);
    assert!(
        status.contains(&format!("{}:", file.display()))
            && status.contains("pids must be between 4 and 65536"),
        "{status}"
    );
    assert!(status.contains("resources   memory "), "{status}");
    assert_eq!(std::fs::read_to_string(&pids_max).unwrap().trim(), "20");
    call_ok();
    assert_eq!(kit_pid().0, Some(pid));

    // A new level needs a new worker: it is started at the new level before the
    // old one is retired (after its calls).
    std::fs::write(
        &file,
        tighter.replace("level = \"standard\"", "level = \"high\""),
    )
    .unwrap();
    wait_for(
        "a new worker at the new level",
        Duration::from_secs(10),
        || {
            let (p, level) = kit_pid();
            p.is_some() && p != Some(pid) && level == "high"
        },
    );
    assert!(!text(&d.cli(&["status"]).stdout).contains("REJECTED"));
    call_ok();
    let out = d.cli(&["status"]);
    let status = text(&out.stdout);
    assert!(
        status.contains("namespaces  enforced (own net, ipc, uts)"),
        "{status}"
    );
    assert!(corral_integration_tests::wait_gone(
        pid,
        Duration::from_secs(5)
    ));
}

/// Processes named `name` (their `comm`) that still run.
fn running_named(name: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
                && !corral_integration_tests::process_gone(*pid)
        })
        .collect()
}

/// An unprivileged `corral run` (no cgroups: nobody may create them here) still
/// takes the plugin's whole process tree down with its worker: the worker is pid 1
/// of a PID namespace in a user namespace of its own. A grandchild that leaves for
/// a session of its own is gone once the run has ended, and nothing the hostile
/// worker started is left behind.
#[test]
fn an_unprivileged_run_without_cgroups_leaves_no_process_behind() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the suite runs as root (README)");
    let open = |p: &Path| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let workers = corral_integration_tests::hostile_worker_dir();
    open(workers.path());
    let plugin = wat_plugin("attacker", "testkit.wat", "");
    open(plugin.path());
    for f in std::fs::read_dir(plugin.path()).unwrap().flatten() {
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let home = corral_integration_tests::open_tempdir();
    std::os::unix::fs::chown(home.path(), Some(65534), Some(65534)).unwrap();
    let name = format!("corral-o{}", std::process::id() % 100_000);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(built().corral())
        .arg("run")
        .arg(plugin.path())
        .args(["orphan", "--level", "standard", "--input", &name])
        .env("HOME", home.path())
        .env("CORRAL_CACHE_DIR", home.path().join("cache"))
        .env("CORRAL_WORKER_DIR", workers.path())
        .env("CORRAL_POLICY", fixture("policy/test.toml"))
        .env_remove("CORRAL_SOCKET")
        .output()
        .expect("setpriv (util-linux) runs corral as nobody");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("starting without cgroup limits"),
        "nobody cannot make cgroups here, so this is the case under test: {}",
        text(&out.stderr)
    );
    let inner: u32 = text(&out.stdout).trim().parse().expect("the orphan's pid");
    assert!(inner > 1, "the orphan is not the namespace's pid 1");
    let until = Instant::now() + Duration::from_secs(10);
    while !running_named(&name).is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = running_named(&name);
    for pid in &left {
        // SAFETY: kill(2) of the orphan this test made the hostile worker start.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    assert_eq!(left, Vec::<u32>::new(), "the orphan outlived the run");
}

#[test]
fn status_lists_each_instance_of_a_plugin_that_runs_several() {
    let d = Daemon::start_with_manifest(
        &fixture("policy/test.toml"),
        "testkit.wat",
        "\n[limits]\ninstances = 2\n",
    );
    // Two calls at once, each running to its deadline: two workers.
    let spin = || {
        let socket = d.socket.clone();
        std::thread::spawn(move || {
            Command::new(built().corral())
                .args(["call", "kit", "spin", "--timeout", "500ms", "--socket"])
                .arg(&socket)
                .output()
                .unwrap()
        })
    };
    let spins = [spin(), spin()];
    for s in spins {
        let out = s.join().unwrap();
        assert!(
            text(&out.stderr).contains("deadline"),
            "{}",
            text(&out.stderr)
        );
    }
    let status = text(&d.cli(&["status"]).stdout);
    assert!(
        status.contains("  instances   2 running of 2 allowed"),
        "{status}"
    );
    let lines: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("  instance    pid "))
        .collect();
    assert_eq!(lines.len(), 2, "{status}");
    assert!(
        lines.iter().all(|l| l.contains(" idle: memory ")),
        "{status}"
    );
    let kit = d.plugin_json("status", "kit").unwrap();
    assert_eq!(kit["instances_allowed"], 2, "{kit}");
    let pids: Vec<u64> = kit["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    assert_ne!(pids[0], pids[1]);
}
