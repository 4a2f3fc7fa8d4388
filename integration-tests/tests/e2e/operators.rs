//! What an operator runs the daemon with: the metrics endpoint (scraped from a real
//! `corral serve`, checked by `promtool`), JSON logs, SIGHUP (the configuration
//! reloaded, the audit log opened again), completions, the manual page, the
//! Grafana dashboard and the systemd unit.

use crate::support::text;
use corral_integration_tests::{built, fixture, fixture_plugin, repo_root, wat_plugin};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `corral serve` of a configuration the test writes, its standard error in a
/// file.
pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) socket: PathBuf,
    stderr: PathBuf,
    /// `host:port` of the metrics endpoint, when the configuration has one.
    metrics: Option<String>,
    _plugins: Vec<tempfile::TempDir>,
}

/// The operators' test plugin (`fixtures/js-ops`) as `ops`.
fn ops() -> tempfile::TempDir {
    fixture_plugin("js-ops", "ops", "js", "main.js", "")
}

impl Daemon {
    /// A daemon of `body` (plugins and settings) with its own socket, cache, state
    /// and the test policy; logging at `info`.
    pub(crate) fn start(body: &str, plugins: Vec<tempfile::TempDir>) -> Daemon {
        let dir = corral_integration_tests::open_tempdir();
        let config = dir.path().join("corral.toml");
        std::fs::write(&config, Daemon::config(body)).unwrap();
        let stderr = dir.path().join("stderr.log");
        let child = Command::new(built().corral())
            .args(["--log", "info", "serve", "--config"])
            .arg(&config)
            .env_remove("CORRAL_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket: dir.path().join("run/control.sock"),
            dir,
            stderr,
            metrics: None,
            _plugins: plugins,
        };
        let until = Instant::now() + Duration::from_secs(15);
        while !d.log().contains("serving ") {
            assert!(
                Instant::now() < until,
                "the daemon did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d.metrics = d.log().lines().find_map(|l| {
            let at = l.find("metrics on http://")? + "metrics on http://".len();
            Some(l[at..].split('/').next()?.to_owned())
        });
        d
    }

    /// `body` with the settings every test daemon has.
    fn config(body: &str) -> String {
        format!(
            "socket = \"run/control.sock\"\ncache_dir = \"cache\"\nstate_dir = \"state\"\n\
             policy = {:?}\n{body}\n",
            fixture("policy/test.toml").to_str().unwrap()
        )
    }

    /// Replace the configuration with `body` (the same common settings).
    fn rewrite(&self, body: &str) {
        std::fs::write(self.dir.path().join("corral.toml"), Daemon::config(body)).unwrap();
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        Command::new(built().corral())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    /// `corral call PLUGIN FUNCTION`'s output, asserting success.
    pub(crate) fn call(&self, plugin: &str, function: &str) -> String {
        let out = self.cli(&["call", plugin, function]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    }

    pub(crate) fn pid_of(&self, plugin: &str) -> Option<u64> {
        let out = self.cli(&["list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()?.iter().find(|p| p["id"] == plugin)?["pid"].as_u64()
    }

    /// SIGHUP, then wait until the daemon has dealt with it (the `n`th reload
    /// logged, applied or rejected).
    fn hup(&self, n: usize) {
        // SAFETY: kill sends a signal to the daemon this test started.
        let sent = unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        assert_eq!(sent, 0);
        self.hup_seen(n);
    }

    /// Wait until the `n`th reload is logged, applied or rejected.
    fn hup_seen(&self, n: usize) {
        let until = Instant::now() + Duration::from_secs(20);
        let done = |log: &str| {
            log.matches("configuration reloaded from")
                .chain(log.matches("configuration reload rejected"))
                .count()
        };
        while done(&self.log()) < n {
            assert!(
                Instant::now() < until,
                "reload {n} not done:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET path` with `headers`: the status line, headers and body.
    fn get(&self, path: &str, headers: &str) -> (String, String) {
        let addr = self.metrics.as_deref().expect("metrics served");
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"),
        )
    }

    /// The metrics in the Prometheus text format, asserting a 200.
    fn scrape(&self) -> String {
        let (head, body) = self.get("/metrics", "");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        body
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `request` to `addr`, read to the end: (status line and headers, body).
fn http(addr: &str, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let all = text(&buf);
    match all.split_once("\r\n\r\n") {
        Some((h, b)) => (h.to_owned(), dechunk(h, b)),
        None => (all, String::new()),
    }
}

/// A body as sent with `Transfer-Encoding: chunked`, put together.
fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// The value of the series `series` (name and labels exactly as exposed).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// The labels every series of plugin `id` (a JavaScript or Wasm plugin at
/// standard, as the test policy routes every plugin) carries.
fn labels(id: &str, runtime: &str) -> String {
    format!("plugin=\"{id}\",runtime=\"{runtime}\",level=\"standard\"")
}

fn promtool_check(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{metrics}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Calls, their outcomes and durations, host calls, denials, starts, crashes and
/// restarts, each plugin's workers, memory and pids, and the supervisor's own
/// figures move as they happen in a real daemon; `promtool` finds nothing wrong
/// with the exposition; every family exposed is one the dashboard may name.
#[test]
fn metrics_of_a_real_daemon_move_with_its_calls_and_pass_promtool() {
    let kit = wat_plugin("kit", "testkit.wat", "");
    let ops = ops();
    let d = Daemon::start(
        &format!(
            "plugins = [{:?}, {:?}]\nmetrics = \"127.0.0.1:0\"\naudit = \"audit.jsonl\"\n",
            ops.path().to_str().unwrap(),
            kit.path().to_str().unwrap()
        ),
        vec![ops, kit],
    );
    let before = d.scrape();
    let (ops_l, kit_l) = (labels("ops", "js"), labels("kit", "wasm"));
    let ok = format!("corral_calls_total{{{ops_l},outcome=\"ok\"}}");
    assert_eq!(value(&before, &ok), None, "{before}");
    promtool_check(&before);

    for _ in 0..3 {
        assert_eq!(d.call("ops", "ok"), "ok");
    }
    assert_eq!(d.cli(&["call", "ops", "kv"]).status.code(), Some(3));
    assert_eq!(d.cli(&["call", "kit", "fail"]).status.code(), Some(3));
    assert_eq!(d.cli(&["call", "kit", "nope"]).status.code(), Some(6));
    assert_eq!(d.cli(&["call", "ghost", "f"]).status.code(), Some(6));
    let m = d.scrape();
    let v = |series: String| value(&m, &series).unwrap_or_else(|| panic!("{series}:\n{m}"));
    assert_eq!(v(ok.clone()), 3.0);
    assert_eq!(
        v(format!(
            "corral_calls_total{{{ops_l},outcome=\"plugin_error\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "corral_calls_total{{{kit_l},outcome=\"plugin_error\"}}"
        )),
        1.0
    );
    assert_eq!(
        v(format!(
            "corral_calls_total{{{kit_l},outcome=\"unknown_function\"}}"
        )),
        1.0
    );
    // A caller's made-up plugin name is no label: it cannot grow the series.
    assert_eq!(
        v(
            "corral_calls_total{plugin=\"\",runtime=\"\",level=\"\",outcome=\"unknown_plugin\"}"
                .into()
        ),
        1.0
    );
    assert!(!m.contains("ghost"), "{m}");
    assert_eq!(
        v(format!("corral_call_duration_seconds_count{{{ops_l}}}")),
        4.0
    );
    assert!(v(format!("corral_call_duration_seconds_sum{{{ops_l}}}")) > 0.0);
    assert_eq!(
        v(
            "corral_host_calls_total{plugin=\"ops\",operation=\"kv.get\",decision=\"denied\"}"
                .into()
        ),
        1.0
    );
    assert_eq!(
        v(
            "corral_audit_events_total{plugin=\"ops\",operation=\"kv.get\",decision=\"denied\"}"
                .into()
        ),
        1.0
    );
    assert_eq!(
        v(format!(
            "corral_worker_starts_total{{{ops_l},result=\"ok\"}}"
        )),
        1.0
    );
    assert_eq!(v(format!("corral_plugin_workers{{{ops_l}}}")), 1.0);
    assert_eq!(
        v(format!("corral_plugin_state{{{ops_l},state=\"running\"}}")),
        1.0
    );
    assert_eq!(v(format!("corral_plugin_queue_depth{{{ops_l}}}")), 0.0);
    let memory = v(format!("corral_plugin_memory_bytes{{{ops_l}}}"));
    let peak = v(format!("corral_plugin_memory_peak_bytes{{{ops_l}}}"));
    assert!(memory > 0.0 && peak >= memory, "{memory} {peak}\n{m}");
    let status: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    let ops_status = status["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "ops")
        .unwrap();
    assert_eq!(
        v(format!("corral_plugin_memory_limit_bytes{{{ops_l}}}")),
        ops_status["resources"]["memory_limit"].as_f64().unwrap(),
        "the worker's cgroup limit, as status shows it"
    );
    assert!(v(format!("corral_plugin_pids{{{ops_l}}}")) >= 1.0);
    // Exposed for a running worker (a few milliseconds of CPU may read as zero
    // ticks where the cgroup has no usage counter).
    assert!(v(format!("corral_plugin_cpu_seconds_total{{{ops_l}}}")) >= 0.0);
    assert_eq!(v("corral_workers".into()), 2.0);
    assert!(v("corral_process_resident_memory_bytes".into()) > 1e6);
    assert!(v("corral_process_open_fds".into()) > 3.0);
    assert!(v("corral_uptime_seconds".into()) > 0.0);
    assert_eq!(v("corral_policy_rejected".into()), 0.0);
    promtool_check(&m);

    // A worker killed from outside: a crash by signal, then a restart.
    let pid = d.pid_of("ops").unwrap();
    // SAFETY: the pid is the worker of the daemon this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(corral_integration_tests::wait_gone(
        pid as u32,
        Duration::from_secs(5)
    ));
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let crashes = value(
            &d.scrape(),
            &format!("corral_worker_crashes_total{{{ops_l},reason=\"signal\"}}"),
        );
        if crashes == Some(1.0) {
            break;
        }
        assert!(Instant::now() < until, "{crashes:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(d.call("ops", "ok"), "ok");
    let m = d.scrape();
    assert_eq!(
        value(&m, &format!("corral_worker_restarts_total{{{ops_l}}}")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        value(
            &m,
            &format!("corral_worker_starts_total{{{ops_l},result=\"ok\"}}")
        ),
        Some(2.0)
    );

    // Every family exposed is in the list the dashboard test checks queries
    // against.
    for family in m.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = family.split_once(' ').unwrap();
        let queried = if kind == "histogram" {
            format!("{name}_bucket")
        } else {
            name.to_owned()
        };
        assert!(
            corral::EXPORTED_METRICS.contains(&queried.as_str()),
            "{queried} is exposed but not in corral::EXPORTED_METRICS"
        );
    }

    // OpenMetrics for a scraper that asks for it.
    let (head, body) = d.get(
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0\r\n",
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains(&format!("corral_calls_total{{{ops_l},outcome=\"ok\"}} 4")));
    // Anything else: a clear refusal.
    let (head, body) = d.get("/", "");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_eq!(body, "not found: the metrics are at /metrics\n");
    let addr = d.metrics.clone().unwrap();
    let (head, _) = http(
        &addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
}

/// Scrapers that hold connections open or send endless headers take at most
/// their slots, never the daemon: calls are answered meanwhile, and the endpoint
/// serves again once the idle connections time out.
#[test]
fn hostile_scrapers_cannot_stall_the_daemon_or_its_endpoint() {
    let ops = ops();
    let d = Daemon::start(
        &format!(
            "plugins = [{:?}]\nmetrics = \"127.0.0.1:0\"\n",
            ops.path().to_str().unwrap()
        ),
        vec![ops],
    );
    let addr = d.metrics.clone().unwrap();
    // An endless header: cut off at the head limit (431, or the connection closed).
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Junk: ");
    let junk = vec![b'a'; 256 * 1024];
    let _ = s.write_all(&junk);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let reply = text(&buf);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    // Every slot held by a connection that sends nothing.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(d.call("ops", "ok"), "ok", "calls are answered meanwhile");
    // After the head timeout (5 s) the slots are free again.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (head, _) = http(
            &addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the endpoint did not recover: {head}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(idle);
}

/// SIGHUP reads `corral.toml` again: new config and secrets reach the plugin in a
/// fresh worker, a listed plugin is added, `max_queue` changes; a bad file is
/// refused with its place, the running configuration serves on and `corral
/// status` and the metrics say so; a setting that needs a restart is named.
#[test]
fn sighup_reloads_the_configuration_and_refuses_a_bad_one() {
    let ops = ops();
    let kit = wat_plugin("kit", "testkit.wat", "");
    let ops_dir = ops.path().to_str().unwrap().to_owned();
    let kit_dir = kit.path().to_str().unwrap().to_owned();
    let base = |plugins: &str, extra: &str| {
        format!("plugins = [{plugins}]\nmetrics = \"127.0.0.1:0\"\n{extra}")
    };
    let d = Daemon::start(
        &base(
            &format!("{ops_dir:?}"),
            "[plugin.ops.config]\ngreeting = \"Hello\"\n[plugin.ops.secrets]\ntoken = \"s3cr3t-one\"\n",
        ),
        vec![ops, kit],
    );
    assert_eq!(d.call("ops", "greeting"), "Hello");
    assert_eq!(d.call("ops", "token"), "s3cr3t-one");
    let first = d.pid_of("ops").unwrap();
    assert_eq!(d.cli(&["call", "kit", "ok"]).status.code(), Some(6));

    d.rewrite(&base(
        &format!("{ops_dir:?}, {kit_dir:?}"),
        "max_queue = 3\n[plugin.ops.config]\ngreeting = \"Howdy\"\n[plugin.ops.secrets]\ntoken = \"s3cr3t-two\"\n",
    ));
    d.hup(1);
    assert_eq!(d.call("ops", "greeting"), "Howdy");
    assert_eq!(d.call("ops", "token"), "s3cr3t-two");
    assert_ne!(d.pid_of("ops").unwrap(), first, "a fresh worker");
    assert!(corral_integration_tests::wait_gone(
        first as u32,
        Duration::from_secs(5)
    ));
    assert_eq!(d.call("kit", "ok"), "ok", "the listed plugin was added");
    let log = d.log();
    assert!(log.contains("max_queue now 3 (was 64)"), "{log}");
    assert!(
        log.contains("ops: its config or secrets changed: a new worker serves it"),
        "{log}"
    );
    assert!(!log.contains("s3cr3t"), "no secret in the log:\n{log}");

    // A bad file: refused with its place; the old configuration serves on.
    d.rewrite(&base(&format!("{ops_dir:?}"), "max_queue = 0\n"));
    d.hup(2);
    assert_eq!(d.call("ops", "greeting"), "Howdy");
    assert_eq!(d.call("kit", "ok"), "ok", "not removed by the refused file");
    let status = text(&d.cli(&["status"]).stdout);
    let config = d.dir.path().join("corral.toml");
    assert!(
        status.contains(&format!(
            "configuration reload REJECTED (the running configuration stays in force):\n  {}:7:13: max_queue must be at least 1",
            config.display()
        )),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    assert!(
        json["daemon"]["config_error"]
            .as_str()
            .is_some_and(|e| e.ends_with("max_queue must be at least 1")),
        "{json}"
    );
    let m = d.scrape();
    assert_eq!(
        value(&m, "corral_config_reloads_total{result=\"applied\"}"),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "corral_config_reloads_total{result=\"rejected\"}"),
        Some(1.0)
    );
    assert_eq!(value(&m, "corral_config_rejected"), Some(1.0));

    // Fixed, with a setting only a restart applies: named in status; kit removed.
    d.rewrite(&base(&format!("{ops_dir:?}"), "zygotes = []\n"));
    d.hup(3);
    let status = text(&d.cli(&["status"]).stdout);
    assert!(!status.contains("REJECTED"), "{status}");
    assert!(
        status.contains("configuration: zygotes changed: it takes effect when the daemon restarts"),
        "{status}"
    );
    assert_eq!(
        d.cli(&["call", "kit", "ok"]).status.code(),
        Some(6),
        "kit removed"
    );
    assert_eq!(
        d.call("ops", "greeting"),
        "none",
        "its config is gone with the section"
    );
    assert_eq!(value(&d.scrape(), "corral_config_rejected"), Some(0.0));
}

/// logrotate, with the shipped rule (`dist/logrotate/corral`, its paths pointed
/// here), renames the audit log and sends SIGHUP: later lines go to a new file of
/// the same name, none to the renamed one, none lost.
#[test]
fn sighup_reopens_the_audit_log_after_a_rotation() {
    let ops = ops();
    let body = format!(
        "plugins = [{:?}]\naudit = \"audit.jsonl\"\n",
        ops.path().to_str().unwrap()
    );
    let d = Daemon::start(&body, vec![ops]);
    let audit = d.dir.path().join("audit.jsonl");
    let rotated = d.dir.path().join("audit.jsonl.1");
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert_eq!(d.cli(&["call", "ops", "kv"]).status.code(), Some(3));
    assert_eq!(lines(&audit).len(), 1);
    let rule = std::fs::read_to_string(repo_root().join("dist/logrotate/corral"))
        .unwrap()
        .replace("/var/log/corral/*.jsonl", audit.to_str().unwrap())
        .replace(
            "systemctl reload corral.service",
            &format!("kill -HUP {}", d.child.id()),
        );
    let conf = d.dir.path().join("logrotate.conf");
    std::fs::write(&conf, rule).unwrap();
    let out = Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(d.dir.path().join("logrotate.state"))
        .arg(&conf)
        .output()
        .expect("logrotate (.ci/run installs it)");
    assert!(out.status.success(), "logrotate: {}", text(&out.stderr));
    d.hup_seen(1);
    for _ in 0..2 {
        assert_eq!(d.cli(&["call", "ops", "kv"]).status.code(), Some(3));
    }
    let (old, new) = (lines(&rotated), lines(&audit));
    assert_eq!(old.len(), 1, "{old:?}");
    assert_eq!(new.len(), 2, "{new:?}");
    for l in old.iter().chain(&new) {
        assert_eq!(l["plugin"], "ops");
        assert_eq!(l["operation"], "kv.get");
        assert_eq!(l["decision"], "denied");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&audit).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the new file is as private as the old");
}

/// `log_format = "json"`: every line on standard error is one JSON object with a
/// timestamp, level, target and message; a plugin's lines carry its id as
/// `plugin`; secrets are redacted as in text.
#[test]
fn json_logs_are_one_object_per_line_with_the_plugin_and_no_secret() {
    let ops = ops();
    let body = format!(
        "plugins = [{:?}]\nlog_format = \"json\"\n[plugin.ops.secrets]\ntoken = \"s3cr3t-json\"\n",
        ops.path().to_str().unwrap()
    );
    let d = Daemon::start(&body, vec![ops]);
    assert_eq!(d.call("ops", "log_secret"), "logged");
    let until = Instant::now() + Duration::from_secs(5);
    while !d.log().contains("the token is") {
        assert!(Instant::now() < until, "{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = d.log();
    assert!(!log.contains("s3cr3t-json"), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for l in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l[key].is_string(), "no {key}: {l}");
        }
    }
    let plugin_line = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("the token is"))
        })
        .unwrap();
    assert_eq!(plugin_line["plugin"], "ops", "{plugin_line}");
    assert_eq!(plugin_line["message"], "the token is [secret token]");
    assert!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("serving 1 plugin(s) on "))),
        "{log}"
    );
}

/// `corral completions` and `corral man` come from the same definitions as
/// `--help`: every command is in them, and bash accepts its script.
#[test]
fn completions_and_manual_pages_name_every_command() {
    let corral = |args: &[&str]| {
        let out = Command::new(built().corral()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let commands = [
        "run", "serve", "call", "status", "list", "stop", "policy", "plugin",
    ];
    let bash = corral(&["completions", "bash"]);
    assert!(bash.contains("complete -F _corral"), "{bash}");
    let zsh = corral(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef corral"), "{zsh}");
    let fish = corral(&["completions", "fish"]);
    assert!(fish.contains("complete -c corral"), "{fish}");
    for c in commands {
        assert!(
            bash.contains(&format!("corral__subcmd__{c}\"")),
            "bash: {c}"
        );
        assert!(fish.contains(&format!("-a \"{c}\"")), "fish: {c}");
    }
    let dir = corral_integration_tests::open_tempdir();
    let script = dir.path().join("corral.bash");
    std::fs::write(&script, &bash).unwrap();
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(out.status.success(), "bash -n: {}", text(&out.stderr));
    let out = Command::new(built().corral())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );

    let man = corral(&["man"]);
    assert!(man.contains(".TH corral 1"), "{man}");
    for c in commands {
        assert!(man.contains(&format!("corral\\-{c}")), "man: {c}\n{man}");
    }
    let pages = dir.path().join("man");
    corral(&["man", "--out", pages.to_str().unwrap()]);
    for page in [
        "corral.1",
        "corral-serve.1",
        "corral-plugin-install.1",
        "corral-policy-explain.1",
    ] {
        let p = std::fs::read_to_string(pages.join(page)).unwrap();
        assert!(p.starts_with(".ie"), "{page}: {p}");
    }
}

/// The shipped Grafana dashboard is valid JSON, has the panels the operators'
/// guide lists, and every query names only metrics the daemon exports.
#[test]
fn the_grafana_dashboard_queries_only_exported_metrics() {
    let path = repo_root().join("dist/grafana/corral.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(d["uid"], "corral-overview");
    let panels = d["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for t in [
        "Calls per second by plugin",
        "Errors per second by plugin and outcome",
        "Call latency p50 / p90 / p99",
        "Memory per plugin",
        "CPU per plugin",
        "Worker restarts and crashes",
        "Denials",
    ] {
        assert!(titles.contains(&t), "no panel {t:?}: {titles:?}");
    }
    let mut queries = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id: {p}");
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"].as_str() {
            queries.push(q.to_owned());
        }
    }
    assert!(queries.len() >= 15, "{queries:?}");
    let mut named = 0;
    for q in &queries {
        for name in metric_names(q) {
            named += 1;
            assert!(
                corral::EXPORTED_METRICS.contains(&name.as_str()),
                "{path:?}: query {q:?} names {name}, which the daemon does not export"
            );
        }
    }
    assert!(named >= queries.len() - 1, "{queries:?}");
}

/// The `corral_*` identifiers in a PromQL query.
fn metric_names(query: &str) -> Vec<String> {
    let bytes = query.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = query[i..].find("corral_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if !preceded {
            out.push(query[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The shipped unit passes `systemd-analyze verify` (its binary path pointed at
/// the one built here), and sets the hardening the operators' guide promises.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(repo_root().join("dist/systemd/corral.service")).unwrap();
    for line in [
        "LimitNOFILE=",
        "NoNewPrivileges=",
        "ProtectSystem=strict",
        "ProtectHome=",
        "PrivateTmp=yes",
        "ReadWritePaths=",
        "Delegate=yes",
    ] {
        assert!(
            unit.lines().any(|l| l.starts_with(line)),
            "no {line} in the unit"
        );
    }
    let dir = corral_integration_tests::open_tempdir();
    let local = unit.replace(
        "/usr/libexec/corral/corral-supervisor",
        built().corral_supervisor().to_str().unwrap(),
    );
    let path = dir.path().join("corral.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (systemd; .ci/run installs it)");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("corral.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// `corral ARGS`, its exit code and its standard output parsed as one JSON value.
fn json_of(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(built().corral())
        .args(args)
        .env_remove("CORRAL_POLICY")
        .env_remove("CORRAL_SOCKET")
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "corral {args:?}: not one JSON value ({e}):\n{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

/// Every command that prints something prints one JSON document with `--json`,
/// failures included (`{"ok":false,"error":{kind,code,message}}`, the same exit
/// code as without it); `policy check` gives each error's file, line and column,
/// and `policy explain` every value with its origin, locally and from a daemon.
#[test]
fn every_command_prints_json_with_json_and_keeps_its_exit_codes() {
    let dir = corral_integration_tests::open_tempdir();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    let (code, v) = json_of(&["policy", "check", "--json"]);
    assert_eq!(
        (code, &v["ok"], &v["built_in"]),
        (0, &true.into(), &true.into()),
        "{v}"
    );
    assert!(
        v["levels"]["standard"]["memory"]["origin"]
            .as_str()
            .unwrap()
            .starts_with("policies/levels.toml:")
    );
    std::fs::write(p("bad.toml"), "[level.standard]\nmemory = \"lots\"\n").unwrap();
    let (code, v) = json_of(&["policy", "check", &p("bad.toml"), "--json"]);
    assert_eq!(code, 7, "{v}");
    assert_eq!(v["ok"], false);
    let e = &v["errors"][0];
    assert_eq!(
        (e["file"].as_str(), &e["line"], &e["column"]),
        (Some(p("bad.toml").as_str()), &2.into(), &10.into()),
        "{v}"
    );
    assert!(e["message"].as_str().unwrap().contains("lots"), "{v}");

    let hello = built().hello_wasm.to_str().unwrap().to_owned();
    let (code, v) = json_of(&["policy", "explain", &hello, "--json"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["plugin"], "hello-wasm");
    assert_eq!(v["level"]["value"], "standard");
    for key in [
        "memory",
        "worker_memory",
        "cpu",
        "pids",
        "timeout_ms",
        "max_output",
        "instances",
        "kv_quota",
    ] {
        assert!(v[key]["value"].is_number(), "{key}: {v}");
        assert!(v[key]["origin"].is_string(), "{key}: {v}");
    }
    let (code, v) = json_of(&["policy", "explain", "nope", "--json"]);
    assert_eq!(
        (code, &v["ok"], &v["error"]["kind"]),
        (6, &false.into(), &"not_found".into()),
        "{v}"
    );

    // The plugin files commands, one after the other on one plugin.
    let (code, v) = json_of(&["plugin", "keygen", "--out", &p("key"), "--json"]);
    assert_eq!(code, 0, "{v}");
    let public = v["public_key"].as_str().unwrap().to_owned();
    assert_eq!(public.len(), 64);
    let (code, v) = json_of(&["plugin", "keygen", "--out", &p("key"), "--json"]);
    assert_eq!(
        (code, &v["error"]["kind"]),
        (7, &"invalid".into()),
        "never overwritten: {v}"
    );
    let plugin = corral_integration_tests::plugin_copy(&built().hello_wasm, "hello-wasm");
    let pdir = plugin.path().to_str().unwrap().to_owned();
    let (code, v) = json_of(&[
        "plugin",
        "sign",
        &pdir,
        "--key",
        &p("key"),
        "--publisher",
        "acme",
        "--json",
    ]);
    assert_eq!(
        (code, &v["publisher"], &v["public_key"]),
        (0, &"acme".into(), &public.clone().into()),
        "{v}"
    );
    assert!(v["files"].as_u64().unwrap() >= 2);
    let trust = format!("acme={public}");
    let (code, v) = json_of(&["plugin", "verify", &pdir, "--trust", &trust, "--json"]);
    assert_eq!((code, &v["publisher"]), (0, &"acme".into()), "{v}");
    let (code, v) = json_of(&["plugin", "verify", &pdir, "--json"]);
    assert_eq!((code, &v["ok"]), (7, &false.into()), "untrusted: {v}");
    std::fs::create_dir(p("index")).unwrap();
    let archive = p("index/hello-wasm.tar.gz");
    let (code, v) = json_of(&["plugin", "pack", &pdir, "--out", &archive, "--json"]);
    assert_eq!(code, 0, "{v}");
    let sha = v["sha256"].as_str().unwrap().to_owned();
    let (code, v) = json_of(&["plugin", "index", &p("index"), "--json"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["entries"][0]["id"], "hello-wasm");
    assert_eq!(v["entries"][0]["sha256"], sha.as_str());
    let plugins = p("plugins");
    let place = [
        "--plugins-dir",
        plugins.as_str(),
        "--trust",
        trust.as_str(),
        "--json",
    ];
    let (code, v) = json_of(
        &[
            &["plugin", "install", "hello-wasm", "--index", &p("index")][..],
            &place,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (&v["id"], &v["publisher"], &v["replaced"]),
        (
            &"hello-wasm".into(),
            &"acme".into(),
            &serde_json::Value::Null
        ),
        "{v}"
    );
    let (code, v) = json_of(&[&["plugin", "list"][..], &place].concat());
    assert_eq!(code, 0, "{v}");
    assert_eq!(v[0]["id"], "hello-wasm");
    assert_eq!(v[0]["valid"], true);
    assert!(v[0]["signature"].as_str().unwrap().contains("acme"), "{v}");
    let (code, v) = json_of(&[&["plugin", "remove", "hello-wasm"][..], &place].concat());
    assert_eq!((code, &v["id"]), (0, &"hello-wasm".into()), "{v}");
    let (code, v) = json_of(&[&["plugin", "remove", "hello-wasm"][..], &place].concat());
    assert_eq!((code, &v["error"]["kind"]), (6, &"not_found".into()), "{v}");

    // From a daemon: explain, status, stop; and an unreachable one.
    let ops = ops();
    let d = Daemon::start(
        &format!("plugins = [{:?}]\n", ops.path().to_str().unwrap()),
        vec![ops],
    );
    let socket = d.socket.to_str().unwrap().to_owned();
    let (code, v) = json_of(&["policy", "explain", "ops", "--socket", &socket, "--json"]);
    assert_eq!(
        (code, &v["plugin"], &v["level"]["value"]),
        (0, &"ops".into(), &"standard".into()),
        "{v}"
    );
    let (code, v) = json_of(&["status", "--socket", &socket, "--json"]);
    assert_eq!(code, 0);
    assert_eq!(v["plugins"][0]["id"], "ops", "{v}");
    assert_eq!(v["daemon"]["config_error"], serde_json::Value::Null, "{v}");
    let (code, v) = json_of(&["stop", "--socket", &socket, "--json"]);
    assert_eq!((code, &v["stopping"]), (0, &true.into()), "{v}");
    let (code, v) = json_of(&["status", "--socket", &p("no.sock"), "--json"]);
    assert_eq!(
        (code, &v["error"]["kind"]),
        (8, &"unreachable".into()),
        "{v}"
    );
    drop(d);
}

/// A reload that lists a plugin whose `plugin.toml` (its author's file) makes a
/// huge error, an unknown key of 60 KiB, keeps at most `MAX_CONFIG_ERROR` bytes of
/// it in `corral status` and the log: the reason cannot grow the daemon.
#[test]
fn a_huge_reason_for_a_refused_reload_is_cut() {
    let ops = ops();
    let hostile = corral_integration_tests::open_tempdir();
    // Within the 64 KiB a manifest may have, and quoted by the error.
    let key = "k".repeat(60 * 1024);
    std::fs::write(
        hostile.path().join("plugin.toml"),
        format!(
            "id = \"big\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n{key} = 1\n"
        ),
    )
    .unwrap();
    let ops_dir = ops.path().to_str().unwrap().to_owned();
    let d = Daemon::start(&format!("plugins = [{ops_dir:?}]\n"), vec![ops]);
    d.rewrite(&format!(
        "plugins = [{ops_dir:?}, {:?}]\n",
        hostile.path().to_str().unwrap()
    ));
    d.hup(1);
    assert_eq!(
        d.call("ops", "ok"),
        "ok",
        "the running configuration serves"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&d.cli(&["status", "--json"]).stdout).unwrap();
    let why = json["daemon"]["config_error"].as_str().unwrap();
    assert!(
        why.contains("unknown field `kkkk"),
        "{}",
        &why[..why.len().min(300)]
    );
    assert!(
        why.len() <= corral::MAX_CONFIG_ERROR + 64 && why.ends_with("bytes in all]"),
        "{} bytes",
        why.len()
    );
    assert!(
        d.log().len() < 64 * 1024,
        "the log took {} bytes",
        d.log().len()
    );
}
