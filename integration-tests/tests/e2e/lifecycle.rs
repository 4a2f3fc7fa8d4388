//! Plugin lifecycle on a live supervisor: a watched plugins directory, hot reload
//! under a steady call load (every answer counted), broken versions rejected while the
//! old one serves, removal after draining, and `corral plugin pack | install | remove
//! | list` against a running daemon.

use crate::support::{text, wait_for};
use corral::Supervisor;
use corral::reload::{PluginSources, PluginWatcher, watch_plugins};
use corral_integration_tests::{built, open_tempdir, options, wait_gone};
use corral_protocol::CallError;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// Write version `v` of plugin `id` in `runtime` into `dir`: `version` answers
/// `v<v>`, `slow` answers `v<v> slow` after about 300 ms (not in Wasm).
fn write_plugin(dir: &Path, runtime: &str, id: &str, v: u32, extra_manifest: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let entry = match runtime {
        "js" => {
            std::fs::write(
                dir.join("main.js"),
                format!(
                    "export function version() {{ return \"v{v}\"; }}\n\
                     export function slow() {{\n\
                       const t = corral.now_ms();\n\
                       while (corral.now_ms() - t < 300) {{}}\n\
                       return \"v{v} slow\";\n\
                     }}\n\
                     export function very_slow() {{\n\
                       const t = corral.now_ms();\n\
                       while (corral.now_ms() - t < 1500) {{}}\n\
                       return \"v{v} very slow\";\n\
                     }}\n"
                ),
            )
            .unwrap();
            "main.js"
        }
        "python" => {
            std::fs::write(
                dir.join("plugin.py"),
                format!(
                    "import time\n\n\
                     def version(data):\n    return \"v{v}\"\n\n\
                     def slow(data):\n    time.sleep(0.3)\n    return \"v{v} slow\"\n"
                ),
            )
            .unwrap();
            "plugin.py"
        }
        "wasm" => {
            let text = format!("v{v}");
            std::fs::write(
                dir.join("plugin.wat"),
                format!(
                    "(module\n\
                       (import \"corral\" \"output\" (func $output (param i32 i32)))\n\
                       (memory (export \"memory\") 1)\n\
                       (data (i32.const 0) \"{text}\")\n\
                       (func (export \"corral_alloc\") (param i32) (result i32) (i32.const 1024))\n\
                       (func (export \"corral_fn_version\") (param i32 i32) (result i32)\n\
                         (call $output (i32.const 0) (i32.const {len}))\n\
                         (i32.const 0)))\n",
                    len = text.len()
                ),
            )
            .unwrap();
            "plugin.wat"
        }
        other => panic!("no runtime {other}"),
    };
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "id = \"{id}\"\nversion = \"1.{v}.0\"\nruntime = \"{runtime}\"\nentry = \"{entry}\"\n\
             {extra_manifest}\n"
        ),
    )
    .unwrap();
}

/// A supervisor watching a fresh plugins directory.
struct Live {
    sup: Arc<Supervisor>,
    plugins: TempDir,
    _watcher: PluginWatcher,
    _cache: TempDir,
}

impl Live {
    fn new() -> Live {
        let cache = open_tempdir();
        let plugins = open_tempdir();
        let sup = Arc::new(Supervisor::new(options(cache.path())));
        let watcher = watch_plugins(
            PluginSources {
                dirs: vec![],
                plugins_dir: Some(plugins.path().to_owned()),
            },
            Arc::clone(&sup),
        )
        .unwrap();
        Live {
            sup,
            plugins,
            _watcher: watcher,
            _cache: cache,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.plugins.path().join(name)
    }

    async fn answer(&self, id: &str, function: &str) -> Result<String, CallError> {
        self.sup
            .call(id, function, vec![], None)
            .await
            .map(|b| String::from_utf8(b).unwrap())
    }

    /// Wait until `id` answers `version` with `want`.
    async fn until_version(&self, id: &str, want: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if self.answer(id, "version").await.as_deref() == Ok(want) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{id} never answered {want}; rejected: {:?}",
                self.sup.lifecycle_errors().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Wait until the rejection of the plugin in `dir` mentions `what`; return it.
    async fn until_rejected(&self, dir: &Path, what: &str) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        let dir = dir.canonicalize().unwrap().display().to_string();
        loop {
            let errors = self.sup.lifecycle_errors().await.join("\n");
            if let Some(line) = errors
                .lines()
                .find(|l| l.starts_with(&format!("{dir}: ")) && l.contains(what))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < until,
                "no rejection mentioning {what:?}; have: {errors}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn pid(&self, id: &str) -> Option<u32> {
        self.sup
            .list()
            .await
            .into_iter()
            .find(|p| p.id == id)
            .and_then(|p| p.pid)
    }
}

/// What the load generator saw.
#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    failed: Vec<String>,
    /// Versions in the order one task saw them.
    seen: Vec<Vec<u32>>,
}

/// Reload `rt`'s plugin `reloads` times while `tasks` callers call it without pause
/// (one of them calling `slow` where the runtime has it); every answer is counted.
async fn reload_under_load(rt: &str, reloads: u32) {
    let live = Live::new();
    let id = format!("reload-{rt}");
    let dir = live.dir(&id);
    write_plugin(&dir, rt, &id, 1, "");
    live.until_version(&id, "v1").await;
    let first_pid = live.pid(&id).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let last = reloads + 1;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (sup, stop, tally, id) = (
            Arc::clone(&live.sup),
            Arc::clone(&stop),
            Arc::clone(&tally),
            id.clone(),
        );
        // Task 0 makes every fifth call a slow one, so that calls are in flight
        // when versions change.
        let slow = t == 0 && rt != "wasm";
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0u64;
            // After the last reload, each caller goes on until it has seen the last
            // version (a slow call may span the switch), within a bound.
            let mut until = None;
            loop {
                if stop.load(Ordering::SeqCst) {
                    let until =
                        *until.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
                    if seen.last() == Some(&last) || Instant::now() > until {
                        break;
                    }
                }
                n += 1;
                let function = if slow && n.is_multiple_of(5) {
                    "slow"
                } else {
                    "version"
                };
                let r = sup.call(&id, function, vec![], None).await;
                let mut t = tally.lock().unwrap();
                match r {
                    Ok(b) => {
                        t.ok += 1;
                        let s = String::from_utf8(b).unwrap();
                        let v: u32 = s[1..].split(' ').next().unwrap().parse().unwrap();
                        if seen.last() != Some(&v) {
                            seen.push(v);
                        }
                    }
                    Err(e) => t.failed.push(e.to_string()),
                }
            }
            tally.lock().unwrap().seen.push(seen);
        }));
    }
    let started = Instant::now();
    let mut pids = vec![first_pid];
    for v in 2..=reloads + 1 {
        write_plugin(&dir, rt, &id, v, "");
        live.until_version(&id, &format!("v{v}")).await;
        pids.push(live.pid(&id).await.unwrap());
    }
    // Let the callers run on the last version for a moment too (each one goes on
    // until it has seen it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    eprintln!(
        "reload under load ({rt}): {reloads} reloads in {:.1} s, {} calls answered, {} failed, \
         0 lost (every call returned)",
        elapsed.as_secs_f64(),
        tally.ok,
        tally.failed.len()
    );
    assert!(
        tally.failed.is_empty(),
        "{rt}: failed calls: {:?}",
        tally.failed
    );
    assert!(
        tally.ok > u64::from(reloads) * 4,
        "{rt}: too few calls: {}",
        tally.ok
    );
    for seen in &tally.seen {
        // Each caller saw versions only move forward, ending on the last one.
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{rt}: {seen:?}");
        assert_eq!(seen.last(), Some(&last), "{rt}: {seen:?}");
    }
    // A new worker per version; every old one has exited.
    pids.dedup();
    assert_eq!(pids.len() as u32, reloads + 1, "{rt}: {pids:?}");
    for pid in &pids[..pids.len() - 1] {
        assert!(
            tokio::task::spawn_blocking({
                let pid = *pid;
                move || wait_gone(pid, Duration::from_secs(10))
            })
            .await
            .unwrap(),
            "{rt}: retired worker {pid} still runs"
        );
    }
    let info = live.sup.list().await;
    let info = info.iter().find(|p| p.id == id).unwrap();
    assert_eq!(info.version, format!("1.{}.0", reloads + 1));
    assert!(live.sup.lifecycle_errors().await.is_empty());
    live.sup.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_loses_no_call_js() {
    reload_under_load("js", 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_loses_no_call_python() {
    reload_under_load("python", 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_loses_no_call_wasm() {
    reload_under_load("wasm", 10).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_new_version_is_rejected_and_the_old_one_keeps_serving() {
    let live = Live::new();
    for rt in ["js", "python", "wasm"] {
        let id = format!("steady-{rt}");
        write_plugin(&live.dir(&id), rt, &id, 1, "");
        live.until_version(&id, "v1").await;
    }
    let js = live.dir("steady-js");
    let pid = live.pid("steady-js").await.unwrap();
    let broken: [(&str, &Path, &str, &str); 6] = [
        (
            "a JavaScript syntax error",
            &js,
            "main.js",
            "export function version( { return 'v9' }\n",
        ),
        (
            "an init that throws",
            &js,
            "main.js",
            "export function init() { throw new Error('init refuses'); }\n\
             export function version() { return 'v9'; }\n",
        ),
        (
            "an invalid manifest",
            &js,
            "plugin.toml",
            "id = \"steady-js\"\nversion = \"one\"\nruntime = \"js\"\nentry = \"main.js\"\n",
        ),
        (
            "a Python import error",
            &live.dir("steady-python"),
            "plugin.py",
            "import no_such_module\n\ndef version(data):\n    return 'v9'\n",
        ),
        (
            "invalid WebAssembly",
            &live.dir("steady-wasm"),
            "plugin.wat",
            "(module (func (export \"corral_fn_version\") (result i32) nope))\n",
        ),
        (
            "a missing dependency",
            &js,
            "plugin.toml",
            "id = \"steady-js\"\nversion = \"1.9.0\"\nruntime = \"js\"\nentry = \"main.js\"\n\
             [dependencies]\nghost = { version = \"^1\" }\n",
        ),
    ];
    let wants = [
        "the new version does not load",
        "init refuses",
        "plugin.toml:2:",
        "no_such_module",
        "the new version does not load",
        "not loaded: dependency ghost (^1) is not installed",
    ];
    for ((what, dir, file, text), want) in broken.iter().zip(wants) {
        // Start from a good version 1 each time.
        let id = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let rt = id.trim_start_matches("steady-").to_owned();
        write_plugin(dir, &rt, &id, 1, "");
        live.until_version(&id, "v1").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        std::fs::write(dir.join(file), text).unwrap();
        let errors = live.until_rejected(dir, want).await;
        eprintln!("{what}: rejected: {errors}");
        // The old version still answers, in the same worker.
        assert_eq!(
            live.answer(&id, "version").await.as_deref(),
            Ok("v1"),
            "{what}; rejected: {:?}",
            live.sup.lifecycle_errors().await
        );
        if id == "steady-js" {
            let info = live.sup.list().await.into_iter().find(|p| p.id == id);
            assert_eq!(
                info.as_ref().and_then(|p| p.pid),
                Some(pid),
                "{what}: a new worker: {info:?}"
            );
        }
    }
    // Fixed: the next version loads and the rejection is gone.
    write_plugin(&js, "js", "steady-js", 2, "");
    live.until_version("steady-js", "v2").await;
    let errors = live.sup.lifecycle_errors().await;
    assert!(
        !errors.iter().any(|e| e.contains("steady-js")),
        "{errors:?}"
    );
    live.sup.shutdown(Duration::from_secs(2)).await;
}

/// A writer that pauses in the middle of a rewrite for longer than the quiet period
/// (CI caught this: a test's `fs::write` stalled between its truncate and its write,
/// and the empty file was loaded as a version). While the file is open for writing
/// nothing is read; the version loads once it is closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_paused_mid_write_is_not_read_until_closed() {
    use std::io::Write;
    let live = Live::new();
    let dir = live.dir("paused");
    write_plugin(&dir, "python", "paused", 1, "");
    live.until_version("paused", "v1").await;
    let pid = live.pid("paused").await.unwrap();
    let hold = 4 * corral::QUIET;
    // Still version 1, nothing rejected, the same worker, for the whole pause.
    let unchanged = |during: &'static str| {
        let live = &live;
        async move {
            let until = Instant::now() + hold;
            while Instant::now() < until {
                assert_eq!(
                    live.answer("paused", "version").await.as_deref(),
                    Ok("v1"),
                    "{during}"
                );
                assert_eq!(
                    live.sup.lifecycle_errors().await,
                    Vec::<String>::new(),
                    "{during}"
                );
                assert_eq!(live.pid("paused").await, Some(pid), "{during}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let text = "def version(data):\n    return 'v2'\n";
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join("plugin.py"))
        .unwrap();
    unchanged("truncated, nothing written yet").await;
    f.write_all(&text.as_bytes()[..10]).unwrap();
    unchanged("half written").await;
    f.write_all(&text.as_bytes()[10..]).unwrap();
    drop(f);
    live.until_version("paused", "v2").await;
    assert_ne!(live.pid("paused").await, Some(pid));
    assert!(live.sup.lifecycle_errors().await.is_empty());
    live.sup.shutdown(Duration::from_secs(2)).await;
}

/// A rejected version never runs: the old version's workers read a copy of its own
/// files, so a worker restarted after a crash (or a Python worker importing again
/// after a trap) still runs the old version while the rejected files sit in its
/// directory. Messages name the plugin's directory, not the copy.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_worker_runs_its_own_version_not_the_rejected_files() {
    let live = Live::new();
    for rt in ["js", "python"] {
        let id = format!("kept-{rt}");
        let dir = live.dir(&id);
        std::fs::create_dir_all(&dir).unwrap();
        let (entry, code): (&str, fn(&str) -> String) = match rt {
            "js" => ("main.js", |v: &str| {
                format!(
                    "export function version() {{ return '{v}'; }}\n\
                     export function boom() {{ throw new Error('boom in {v}'); }}\n"
                )
            }),
            _ => ("plugin.py", |v: &str| {
                format!(
                    "def version(data):\n    return '{v}'\n\n\
                     def boom(data):\n    raise RecursionError('boom in {v}')\n"
                )
            }),
        };
        let manifest = |v: &str, extra: &str| {
            format!(
                "id = \"{id}\"\nversion = \"{v}\"\nruntime = \"{rt}\"\nentry = \"{entry}\"\n{extra}"
            )
        };
        std::fs::write(dir.join(entry), code("v1")).unwrap();
        std::fs::write(dir.join("plugin.toml"), manifest("1.0.0", "")).unwrap();
        live.until_version(&id, "v1").await;
        let first = live.pid(&id).await.unwrap();

        // Version 2 would load, but needs a plugin that is not installed: rejected.
        std::fs::write(dir.join(entry), code("v2")).unwrap();
        std::fs::write(
            dir.join("plugin.toml"),
            manifest("2.0.0", "[dependencies]\nghost = { version = \"^1\" }\n"),
        )
        .unwrap();
        live.until_rejected(&dir, "dependency ghost (^1) is not installed")
            .await;

        // An error (in Python a trap, after which the worker imports the plugin
        // again): the message names the file in the plugin's directory.
        match live.answer(&id, "boom").await {
            Err(CallError::Trap { message }) if rt == "python" => {
                assert!(message.contains("boom in v1"), "{rt}: {message}");
                if rt == "python" {
                    let file = dir.canonicalize().unwrap().join(entry);
                    assert!(
                        message.contains(&format!("\"{}\"", file.display())),
                        "{rt}: the traceback does not name {}: {message}",
                        file.display()
                    );
                }
                assert!(!message.contains("/versions/"), "{rt}: {message}");
            }
            Err(CallError::Plugin { message }) if rt == "js" => {
                assert!(message.contains("boom in v1"), "{rt}: {message}");
                assert!(!message.contains("/versions/"), "{rt}: {message}");
            }
            other => panic!("{rt}: boom answered {other:?}"),
        }
        assert_eq!(
            live.answer(&id, "version").await.as_deref(),
            Ok("v1"),
            "{rt}"
        );

        // The worker dies; its replacement runs version 1, not the files on disk.
        // SAFETY: plain kill(2) of a worker this test's supervisor started.
        assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
        assert!(
            wait_gone(first, Duration::from_secs(5)),
            "{rt}: {first} still runs"
        );
        // Once the supervisor has seen it go (a call sent before then gets
        // `WorkerCrashed`, truthfully).
        let until = Instant::now() + Duration::from_secs(10);
        while live.pid(&id).await == Some(first) {
            assert!(
                Instant::now() < until,
                "{rt}: the supervisor never saw {first} go"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(
            live.answer(&id, "version").await.as_deref(),
            Ok("v1"),
            "{rt}"
        );
        let second = live.pid(&id).await.unwrap();
        assert_ne!(second, first, "{rt}");
        let info = live.sup.list().await;
        let info = info.iter().find(|p| p.id == id).unwrap();
        assert_eq!(info.version, "1.0.0", "{rt}");

        // Fixed: version 3 loads.
        std::fs::write(dir.join(entry), code("v3")).unwrap();
        std::fs::write(dir.join("plugin.toml"), manifest("3.0.0", "")).unwrap();
        live.until_version(&id, "v3").await;
        assert!(live.sup.lifecycle_errors().await.is_empty());
    }
    live.sup.shutdown(Duration::from_secs(2)).await;
}

/// `corral status` (the rejections) answers while a pass is busy loading a slow
/// plugin: the rejections have a lock of their own.
#[tokio::test(flavor = "multi_thread")]
async fn rejections_are_readable_while_a_pass_loads() {
    let live = Live::new();
    let bad = live.dir("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("main.js"), "export function version( {\n").unwrap();
    std::fs::write(
        bad.join("plugin.toml"),
        "id = \"bad\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
    )
    .unwrap();
    live.until_rejected(&bad, "SyntaxError").await;

    let slow = live.dir("slow-init");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(
        slow.join("main.js"),
        "export function init() { const t = corral.now_ms(); while (corral.now_ms() - t < 3000) {} }\n\
         export function version() { return 'v1'; }\n",
    )
    .unwrap();
    std::fs::write(
        slow.join("plugin.toml"),
        "id = \"slow-init\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
    )
    .unwrap();
    // The pass has copied the version: it is loading it now, for three seconds.
    let versions = live._cache.path().join("versions");
    wait_for(
        "the pass to read slow-init",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&versions).unwrap().flatten().any(|sup| {
                std::fs::read_dir(sup.path()).is_ok_and(|mut d| {
                    d.any(|v| {
                        v.is_ok_and(|v| v.file_name().to_string_lossy().starts_with("slow-init."))
                    })
                })
            })
        },
    );
    let errors = live.sup.lifecycle_errors().await;
    assert!(
        live.sup.list().await.iter().all(|p| p.id != "slow-init"),
        "the pass ended before the rejections were read: this proves nothing"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("SyntaxError"), "{errors:?}");
    live.until_version("slow-init", "v1").await;
    live.sup.shutdown(Duration::from_secs(2)).await;
}

/// A plugin whose new version's `init` runs for 15 s (its deadline allows 30)
/// holds up no other plugin: while it loads, its old version serves, another
/// plugin's edit is loaded by a later pass of the watcher, and a shutdown does
/// not wait for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_slow_init_holds_up_no_other_plugins_reload_and_no_shutdown() {
    let live = Live::new();
    write_plugin(&live.dir("quick"), "js", "quick", 1, "");
    let slow = live.dir("slow-init");
    write_plugin(&slow, "js", "slow-init", 1, "");
    live.until_version("quick", "v1").await;
    live.until_version("slow-init", "v1").await;
    std::fs::write(
        slow.join("main.js"),
        "export function init() { const t = corral.now_ms(); while (corral.now_ms() - t < 15000) {} }\n\
         export function version() { return 'v2'; }\n",
    )
    .unwrap();
    // Its new version is copied: a pass is loading it now, for 15 s.
    let versions = live._cache.path().join("versions");
    let copies = || {
        std::fs::read_dir(&versions)
            .unwrap()
            .flatten()
            .flat_map(|sup| {
                std::fs::read_dir(sup.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|v| v.file_name().to_string_lossy().starts_with("slow-init."))
            .count()
    };
    wait_for(
        "a pass to read slow-init's new version",
        Duration::from_secs(20),
        || copies() == 2,
    );
    let loading = Instant::now();
    write_plugin(&live.dir("quick"), "js", "quick", 2, "");
    live.until_version("quick", "v2").await;
    assert_eq!(
        live.answer("slow-init", "version").await.as_deref(),
        Ok("v1")
    );
    assert!(
        loading.elapsed() < Duration::from_secs(10),
        "quick's reload waited {:?}, for slow-init's init",
        loading.elapsed()
    );
    let stop = Instant::now();
    live.sup.shutdown(Duration::from_secs(2)).await;
    assert!(
        stop.elapsed() < Duration::from_secs(8),
        "the shutdown waited {:?}, for slow-init's init",
        stop.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_plugin_finishes_its_calls_then_is_unloaded() {
    let live = Live::new();
    write_plugin(&live.dir("leaving"), "js", "leaving", 1, "");
    write_plugin(&live.dir("staying"), "js", "staying", 1, "");
    live.until_version("leaving", "v1").await;
    live.until_version("staying", "v1").await;
    let pid = live.pid("leaving").await.unwrap();
    let sup = Arc::clone(&live.sup);
    let in_flight =
        tokio::spawn(async move { sup.call("leaving", "very_slow", vec![], None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::remove_dir_all(live.dir("leaving")).unwrap();
    // New calls are refused once the removal is seen...
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match live.answer("leaving", "version").await {
            Err(CallError::UnknownPlugin { plugin }) => {
                assert_eq!(plugin, "leaving");
                break;
            }
            other => assert!(Instant::now() < until, "still answering: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // ...the call in flight finishes on the old worker, which then exits.
    assert_eq!(
        in_flight
            .await
            .unwrap()
            .map(|b| String::from_utf8(b).unwrap()),
        Ok("v1 very slow".to_owned())
    );
    assert!(
        tokio::task::spawn_blocking(move || wait_gone(pid, Duration::from_secs(10)))
            .await
            .unwrap()
    );
    assert!(!live.sup.list().await.iter().any(|p| p.id == "leaving"));
    assert_eq!(live.answer("staying", "version").await.as_deref(), Ok("v1"));
    live.sup.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_dropped_into_the_directory_load_dependencies_first() {
    let live = Live::new();
    // Both appear in one burst; `app` needs `lib`, which sorts after it.
    write_plugin(
        &live.dir("a-app"),
        "js",
        "zapp",
        1,
        "[dependencies]\nzlib = { version = \"^1.1\" }",
    );
    write_plugin(&live.dir("b-lib"), "js", "zlib", 1, "");
    live.until_version("zapp", "v1").await;
    assert_eq!(live.answer("zlib", "version").await.as_deref(), Ok("v1"));
    // A second directory with an id already in use is rejected, naming both.
    write_plugin(&live.dir("c-copy"), "js", "zlib", 3, "");
    let errors = live
        .until_rejected(&live.dir("c-copy"), "already used")
        .await;
    assert!(
        errors.contains("plugin id \"zlib\"") && errors.contains("b-lib"),
        "{errors}"
    );
    // A version of zlib that would break zapp's requirement is refused.
    write_plugin(&live.dir("b-lib"), "js", "zlib", 0, "");
    let errors = live
        .until_rejected(&live.dir("b-lib"), "version 1.0.0 would block plugin zapp")
        .await;
    assert!(errors.contains("does not satisfy ^1.1"), "{errors}");
    assert_eq!(live.answer("zlib", "version").await.as_deref(), Ok("v1"));
    live.sup.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_directory_removed_and_made_again_is_watched_again() {
    let live = Live::new();
    write_plugin(&live.dir("again"), "js", "again", 1, "");
    live.until_version("again", "v1").await;
    // Gone: the plugins stay as they are (an unreadable directory removes nothing).
    std::fs::remove_dir_all(live.plugins.path()).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(live.answer("again", "version").await.as_deref(), Ok("v1"));
    // Made again with a new version, then edited: both are seen.
    std::fs::create_dir(live.plugins.path()).unwrap();
    write_plugin(&live.dir("again"), "js", "again", 2, "");
    live.until_version("again", "v2").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    write_plugin(&live.dir("again"), "js", "again", 3, "");
    live.until_version("again", "v3").await;
    live.sup.shutdown(Duration::from_secs(2)).await;
}

// ------------------------------------------------------- install through a daemon

/// A static file server for `root` on 127.0.0.1; returns its port.
fn file_server(root: PathBuf) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let root = root.clone();
            std::thread::spawn(move || serve_file(s, &root));
        }
    });
    port
}

fn serve_file(mut s: TcpStream, root: &Path) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/');
    let (status, body) = match std::fs::read(root.join(path)) {
        Ok(b) if !path.contains("..") => ("200 OK", b),
        _ => ("404 Not Found", Vec::new()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body);
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    config: PathBuf,
}

impl Daemon {
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(built().corral())
            .args(args)
            .env("CORRAL_SOCKET", &self.socket)
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn corral(args: &[&str]) -> Output {
    Command::new(built().corral()).args(args).output().unwrap()
}

/// `corral plugin pack SRC --out ARCHIVE`; returns the SHA-256 it printed.
fn pack(src: &Path, archive: &Path) -> String {
    let out = corral(&[
        "plugin",
        "pack",
        src.to_str().unwrap(),
        "--out",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sum = text(&out.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(sum.len(), 64, "{}", text(&out.stdout));
    sum
}

/// Every name under `dir`, hidden ones included.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn install_from_directory_and_http_indexes_hot_reloads_and_refuses_bad_archives() {
    let work = open_tempdir();
    let w = work.path();
    let plugins = w.join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::set_permissions(
        &plugins,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let key = w.join("acme.key");
    let out = corral(&["plugin", "keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: ").map(str::to_owned))
        .unwrap();
    let config = w.join("corral.toml");
    std::fs::write(
        &config,
        format!(
            "plugins_dir = \"plugins\"\nsocket = \"run/control.sock\"\ncache_dir = \"cache\"\n\
             policy = {:?}\nstate_dir = \"state\"\naudit = \"off\"\n[publishers]\nacme = \"{public}\"\n",
            corral_integration_tests::fixture("policy/test.toml")
        ),
    )
    .unwrap();
    let d = Daemon {
        child: Command::new(built().corral())
            .args(["serve", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        socket: w.join("run/control.sock"),
        config: config.clone(),
    };
    wait_for("the daemon's socket", Duration::from_secs(30), || {
        d.socket.exists()
    });
    let cfg = d.config.to_str().unwrap();

    // An index with two signed versions, one unsigned, one tampered, one mislabelled.
    let index = w.join("index");
    std::fs::create_dir(&index).unwrap();
    let mut sums = BTreeMap::new();
    let mut pack = |name: &str, id: &str, v: u32, sign: bool, tamper: bool| {
        let src = w.join("src").join(name);
        write_plugin(&src, "js", id, v, "");
        if sign {
            let out = corral(&[
                "plugin",
                "sign",
                src.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--publisher",
                "acme",
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        if tamper {
            std::fs::write(
                src.join("main.js"),
                "export function version() { return 'evil'; }\n",
            )
            .unwrap();
        }
        let archive = index.join(format!("{name}.tar.gz"));
        let sum = pack(&src, &archive);
        sums.insert(name.to_owned(), sum);
    };
    pack("shop-1", "shop", 1, true, false);
    pack("shop-2", "shop", 2, true, false);
    pack("shop-unsigned", "unsigned", 3, false, false);
    pack("shop-tampered", "tampered", 4, true, true);
    let entry = |id: &str, version: &str, archive: &str, sum: &str| {
        format!(
            "[[plugin]]\nid = \"{id}\"\nversion = \"{version}\"\narchive = \"{archive}.tar.gz\"\n\
             sha256 = \"{sum}\"\n"
        )
    };
    let index_toml = [
        entry("shop", "1.1.0", "shop-1", &sums["shop-1"]),
        entry("shop", "1.2.0", "shop-2", &sums["shop-2"]),
        entry("unsigned", "1.3.0", "shop-unsigned", &sums["shop-unsigned"]),
        entry("tampered", "1.4.0", "shop-tampered", &sums["shop-tampered"]),
        entry("badsum", "1.1.0", "shop-1", &"0".repeat(64)),
        entry("mislabelled", "1.1.0", "shop-1", &sums["shop-1"]),
    ]
    .join("\n");
    std::fs::write(index.join("index.toml"), index_toml).unwrap();
    let idx = index.to_str().unwrap();

    // Install 1.1 from the directory index: the daemon loads it.
    let out = corral(&[
        "plugin",
        "install",
        "shop@~1.1",
        "--index",
        idx,
        "--config",
        cfg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("installed shop 1.1.0 (signed by acme) in "),
        "{}",
        text(&out.stdout)
    );
    let answer = |d: &Daemon| text(&d.cli(&["call", "shop", "version"]).stdout);
    wait_for("shop v1", Duration::from_secs(30), || answer(&d) == "v1");

    // Upgrade over HTTP while calls keep coming: the newest version, hot-reloaded.
    let port = file_server(index.clone());
    let url = format!("http://127.0.0.1:{port}/");
    let out = corral(&[
        "plugin", "install", "shop", "--index", &url, "--config", cfg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("installed shop 1.2.0 (signed by acme)")
            && text(&out.stdout).contains("replacing 1.1.0"),
        "{}",
        text(&out.stdout)
    );
    wait_for("shop v2", Duration::from_secs(30), || answer(&d) == "v2");
    let out = corral(&["plugin", "list", "--config", cfg]);
    let listed = text(&out.stdout);
    assert!(
        listed.split_whitespace().collect::<Vec<_>>()
            == ["shop", "1.2.0", "js", "signed", "by", "acme"],
        "{listed}"
    );

    // Every failed install says why and leaves the plugins directory as it was.
    let before = tree(&plugins);
    let a1 = index.join("shop-1.tar.gz");
    let wrong_sum = "1".repeat(64);
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["badsum", "--index", idx],
            format!(
                "checksum mismatch: expected sha256 {}, got {}",
                "0".repeat(64),
                sums["shop-1"]
            ),
        ),
        (
            vec!["unsigned", "--index", idx],
            "unsigned (no plugin.sig); refusing it".into(),
        ),
        (
            vec!["tampered", "--index", &url],
            "signature refused: tampered: main.js: changed since signing".into(),
        ),
        (
            vec!["mislabelled", "--index", idx],
            "the index lists mislabelled 1.1.0 but the archive holds shop 1.1.0".into(),
        ),
        (
            vec!["shop@^2", "--index", idx],
            "no version of shop satisfies ^2; it has 1.1.0, 1.2.0".into(),
        ),
        (
            vec![a1.to_str().unwrap(), "--sha256", &wrong_sum],
            "checksum mismatch".into(),
        ),
    ];
    for (args, want) in &cases {
        let mut full = vec!["plugin", "install"];
        full.extend(args);
        full.extend(["--config", cfg]);
        let out = corral(&full);
        let err = text(&out.stderr);
        eprintln!("install {}: {}", args.join(" "), err.trim());
        assert_eq!(out.status.code(), Some(7), "{args:?}: {err}");
        assert!(
            err.contains(want) && err.contains("nothing was installed"),
            "{args:?}: {err}"
        );
        assert_eq!(tree(&plugins), before, "{args:?} left something behind");
    }
    // An untrusted publisher: the same archive without acme's key in the trust.
    let out = corral(&[
        "plugin",
        "install",
        a1.to_str().unwrap(),
        "--plugins-dir",
        plugins.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stderr).contains("publisher \"acme\" is not trusted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(tree(&plugins), before);
    assert_eq!(answer(&d), "v2");

    // A bare archive with its checksum: a downgrade, hot-reloaded.
    let out = corral(&[
        "plugin",
        "install",
        a1.to_str().unwrap(),
        "--sha256",
        &sums["shop-1"],
        "--config",
        cfg,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for("shop v1 again", Duration::from_secs(30), || {
        answer(&d) == "v1"
    });

    // Remove: the daemon unloads it.
    let out = corral(&["plugin", "remove", "shop", "--config", cfg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("removed shop 1.1.0 from {}", plugins.display())
    );
    wait_for("shop to be unloaded", Duration::from_secs(30), || {
        d.cli(&["call", "shop", "version"]).status.code() == Some(6)
    });
    assert!(tree(&plugins).is_empty(), "{:?}", tree(&plugins));
    let out = corral(&["plugin", "remove", "shop", "--config", cfg]);
    assert_eq!(out.status.code(), Some(6));
    assert!(text(&out.stderr).contains("no plugin \"shop\" is installed"));

    // A plugin copied in by hand that does not load is reported by `corral status`.
    let broken = plugins.join("broken");
    write_plugin(&broken, "js", "broken", 1, "");
    std::fs::write(broken.join("main.js"), "export function version( {\n").unwrap();
    wait_for("the rejection in status", Duration::from_secs(30), || {
        text(&d.cli(&["status"]).stdout).contains("plugin REJECTED")
    });
    let status = text(&d.cli(&["status"]).stdout);
    assert!(
        status.contains(&format!(
            "{}: the new version does not load",
            broken.display()
        )) && status.contains("SyntaxError"),
        "{status}"
    );
}

#[test]
fn an_index_is_written_from_a_directory_of_archives_and_never_half_written() {
    let work = open_tempdir();
    let w = work.path();
    let idx = w.join("index");
    let plugins = w.join("plugins");
    std::fs::create_dir_all(&idx).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    let mut sums = BTreeMap::new();
    for v in [1, 2] {
        let src = w.join(format!("src/shop-{v}"));
        write_plugin(&src, "js", "shop", v, "");
        let archive = idx.join(format!("shop-1.{v}.0.tar.gz"));
        let sum = pack(&src, &archive);
        sums.insert(format!("1.{v}.0"), sum);
    }
    // A previous index: an archive elsewhere is kept, one that is gone is dropped.
    std::fs::write(
        idx.join("index.toml"),
        format!(
            "[[plugin]]\nid = \"far\"\nversion = \"1.0.0\"\narchive = \"http://127.0.0.1:9/far.tar.gz\"\nsha256 = \"{0}\"\n\n\
             [[plugin]]\nid = \"gone\"\nversion = \"1.0.0\"\narchive = \"gone-1.0.0.tar.gz\"\nsha256 = \"{0}\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let out = corral(&["plugin", "index", idx.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    eprintln!("{said}");
    for (v, sum) in &sums {
        assert!(
            said.contains(&format!("shop {v}  shop-{v}.tar.gz  sha256 {sum}")),
            "{said}"
        );
    }
    assert!(
        said.contains("far 1.0.0  http://127.0.0.1:9/far.tar.gz  (kept"),
        "{said}"
    );
    assert!(
        said.contains("gone 1.0.0  gone-1.0.0.tar.gz  DROPPED"),
        "{said}"
    );
    assert!(said.contains("(3 entries)"), "{said}");

    // The index it wrote serves installs.
    let out = corral(&[
        "plugin",
        "install",
        "shop@~1.1",
        "--index",
        idx.to_str().unwrap(),
        "--plugins-dir",
        plugins.to_str().unwrap(),
        "--allow-unsigned",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        std::fs::read_to_string(plugins.join("shop/plugin.toml"))
            .unwrap()
            .contains("version = \"1.1.0\"")
    );

    // A bad archive, or two archives of one version: refused, the index unchanged.
    let written = std::fs::read(idx.join("index.toml")).unwrap();
    let refused = |what: &str, want: &str| {
        let out = corral(&["plugin", "index", idx.to_str().unwrap()]);
        assert_ne!(out.status.code(), Some(0), "{what}");
        let err = text(&out.stderr);
        eprintln!("{what}: {err}");
        assert!(err.contains(want), "{what}: {err}");
        assert_eq!(
            std::fs::read(idx.join("index.toml")).unwrap(),
            written,
            "{what}"
        );
    };
    std::fs::write(idx.join("junk.tar.gz"), "not an archive").unwrap();
    refused("junk", "junk.tar.gz: not a gzipped tar archive");
    std::fs::remove_file(idx.join("junk.tar.gz")).unwrap();
    std::fs::copy(idx.join("shop-1.1.0.tar.gz"), idx.join("again.tgz")).unwrap();
    refused(
        "duplicate",
        "again.tgz and shop-1.1.0.tar.gz both hold shop 1.1.0",
    );
    assert_eq!(tree(&idx).iter().filter(|n| n.starts_with('.')).count(), 0);
}
