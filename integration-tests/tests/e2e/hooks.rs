//! Lifecycle hooks in every runtime through a real daemon: `init` when a worker
//! loads; `shutdown` when the daemon stops, when a hot reload retires the old
//! worker and when an idle worker is stopped; a hook that never returns is cut at
//! its grace (the plugin's `timeout`) and its worker killed.

use crate::operators::Daemon;
use corral_integration_tests::{fixture_plugin, native_plugin, wat_plugin};
use std::path::Path;
use std::time::{Duration, Instant};

/// The hook kits (`fixtures/js-hooks`, `py-hooks`, `hooks.wat` or, with `spin`,
/// `hooks-spin.wat`, and the C `native-hooks`), as `hooks-js`, `hooks-py`,
/// `hooks-wasm`, `hooks-native`; each with a 1 s
/// `timeout`, which is also its shutdown hook's grace. The entry file of each.
fn kits(spin: bool) -> Vec<(&'static str, tempfile::TempDir, &'static str)> {
    let limits = "timeout = \"1s\"";
    let wat = if spin { "hooks-spin.wat" } else { "hooks.wat" };
    vec![
        (
            "hooks-js",
            fixture_plugin("js-hooks", "hooks-js", "js", "main.js", limits),
            "main.js",
        ),
        (
            "hooks-py",
            fixture_plugin("py-hooks", "hooks-py", "python", "plugin.py", limits),
            "plugin.py",
        ),
        ("hooks-wasm", wat_plugin("hooks-wasm", wat, limits), wat),
        (
            "hooks-native",
            native_plugin("native-hooks", "hooks-native", limits),
            "plugin.so",
        ),
    ]
}

/// A daemon of the four kits, logging JSON at info, with `extra` settings.
fn daemon(
    kits: Vec<(&'static str, tempfile::TempDir, &'static str)>,
    extra: &str,
) -> (Daemon, Vec<(&'static str, std::path::PathBuf)>) {
    let entries: Vec<_> = kits
        .iter()
        .map(|(id, dir, entry)| (*id, dir.path().join(entry)))
        .collect();
    let list: Vec<String> = kits
        .iter()
        .map(|(_, d, _)| format!("{:?}", d.path().to_str().unwrap()))
        .collect();
    let body = format!(
        "plugins = [{}]\nlog_format = \"json\"\n{extra}",
        list.join(", ")
    );
    let d = Daemon::start(&body, kits.into_iter().map(|(_, d, _)| d).collect());
    (d, entries)
}

/// How many log lines of `plugin` say `message`.
fn said(log: &str, plugin: &str, message: &str) -> usize {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["plugin"] == plugin && l["message"] == message)
        .count()
}

fn wait_for(what: &str, d: &Daemon, timeout: Duration, done: impl Fn(&str) -> bool) {
    let until = Instant::now() + timeout;
    while !done(&d.log()) {
        assert!(Instant::now() < until, "{what}:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

const KITS: [&str; 4] = ["hooks-js", "hooks-py", "hooks-wasm", "hooks-native"];
const INIT: &str = "hooks: init ran";
const QUICK: &str = "hooks: shutdown ran (quick)";
const SPIN: &str = "hooks: shutdown ran (spin)";

/// Append a comment to a plugin's entry (to a library: bytes): a new version,
/// hot-reloaded.
fn touch(entry: &Path) {
    let comment = if entry.extension().is_some_and(|e| e == "wat") {
        "\n;; edited\n"
    } else if entry.extension().is_some_and(|e| e == "py") {
        "\n# edited\n"
    } else {
        "\n// edited\n"
    };
    // (Bytes after a shared library's last section are ignored by the loader.)
    let mut bytes = std::fs::read(entry).unwrap();
    bytes.extend_from_slice(comment.as_bytes());
    std::fs::write(entry, bytes).unwrap();
}

/// A call to each kit (starting its worker), then an edit of each: a new
/// version that retires the old worker. The old workers' pids.
fn serve_then_edit(d: &Daemon, entries: &[(&str, std::path::PathBuf)]) -> Vec<u64> {
    let old = entries
        .iter()
        .map(|(id, _)| {
            assert_eq!(d.call(id, "ok"), "ok");
            d.pid_of(id).unwrap()
        })
        .collect();
    for (_, entry) in entries {
        touch(entry);
    }
    old
}

#[test]
fn shutdown_hooks_run_at_stop_in_every_runtime() {
    let (mut d, _) = daemon(kits(false), "");
    for id in KITS {
        assert_eq!(d.call(id, "ok"), "ok");
        assert_eq!(said(&d.log(), id, INIT), 1, "{id}");
        assert_eq!(said(&d.log(), id, QUICK), 0, "{id}");
    }
    let out = d.cli(&["stop"]);
    assert_eq!(out.status.code(), Some(0));
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = d.log();
    for id in KITS {
        assert_eq!(said(&log, id, QUICK), 1, "{id}:\n{log}");
    }
}

#[test]
fn shutdown_hooks_run_when_a_hot_reload_retires_the_old_worker_in_every_runtime() {
    let (d, entries) = daemon(kits(false), "");
    let old = serve_then_edit(&d, &entries);
    for ((id, _), pid) in entries.iter().zip(old) {
        wait_for(
            &format!("{id}: the old worker's hook"),
            &d,
            Duration::from_secs(20),
            |log| said(log, id, QUICK) == 1 && said(log, id, INIT) == 2,
        );
        assert!(corral_integration_tests::wait_gone(
            pid as u32,
            Duration::from_secs(5)
        ));
        assert_eq!(d.call(id, "ok"), "ok", "{id}: the new version serves");
        assert_ne!(d.pid_of(id).unwrap(), pid);
    }
}

#[test]
fn shutdown_hooks_run_when_an_idle_worker_is_stopped_in_every_runtime() {
    let (d, _) = daemon(kits(false), "idle_timeout = \"1s\"\n");
    for id in KITS {
        assert_eq!(d.call(id, "ok"), "ok");
    }
    for id in KITS {
        wait_for(
            &format!("{id}: stopped idle"),
            &d,
            Duration::from_secs(15),
            |log| said(log, id, QUICK) == 1,
        );
    }
    for id in KITS {
        assert_eq!(d.pid_of(id), None, "{id} has no worker");
        assert_eq!(d.call(id, "ok"), "ok", "{id}: the next call starts one");
        assert_eq!(said(&d.log(), id, INIT), 2);
    }
}

/// A shutdown hook that never returns has the plugin's `timeout` (1 s here), then
/// its worker is gone: at a reload (the new version serves meanwhile) and at stop.
#[test]
fn a_shutdown_hook_that_never_returns_is_cut_at_its_grace_in_every_runtime() {
    let config = ["hooks-js", "hooks-py", "hooks-native"]
        .map(|id| format!("[plugin.{id}.config]\nmode = \"spin\"\n"))
        .concat();
    let (mut d, entries) = daemon(kits(true), &config);
    let old = serve_then_edit(&d, &entries);
    for ((id, _), pid) in entries.iter().zip(old) {
        wait_for(
            &format!("{id}: the old worker's hook began"),
            &d,
            Duration::from_secs(20),
            |log| said(log, id, SPIN) == 1,
        );
        let began = Instant::now();
        assert!(
            corral_integration_tests::wait_gone(pid as u32, Duration::from_secs(4)),
            "{id}: the spinning hook outlived its grace"
        );
        assert_eq!(
            d.call(id, "ok"),
            "ok",
            "{id}: the new version serves meanwhile"
        );
        // Seen gone no later than about its grace after its line was read.
        assert!(began.elapsed() < Duration::from_secs(4), "{id}");
    }
    let stopping = Instant::now();
    assert_eq!(d.cli(&["stop"]).status.code(), Some(0));
    let status = d.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "stop took {took:?} with four spinning hooks of 1 s grace"
    );
    let log = d.log();
    for (id, _) in &entries {
        assert_eq!(
            said(&log, id, SPIN),
            2,
            "{id}: both workers ran the hook:\n{log}"
        );
    }
}
