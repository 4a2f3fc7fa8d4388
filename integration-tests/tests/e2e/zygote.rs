//! Zygote templates: Python workers forked from a template with the interpreter
//! already started. Each is confined exactly as one started by exec, draws its own
//! random numbers, cannot reach the template, and a template that dies takes only
//! its own workers (which come back from a new one).

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::{
    assert_confined_at, fixture_plugin, open_tempdir, options, test_policy, wait_gone,
};
use corral_protocol::{CallError, ExitReason, Runtime};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

struct Kit {
    sup: Supervisor,
    _plugins: Vec<TempDir>,
    cache: TempDir,
}

/// A supervisor at `level` with the plugins `ids` (copies of `py-zygote`).
fn kit(level: Level, ids: &[&str], zygotes: bool) -> Kit {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = Arc::new(test_policy().with_level(level, "test"));
    opts.zygotes = if zygotes {
        vec![Runtime::Python]
    } else {
        Vec::new()
    };
    let mut sup = Supervisor::new(opts);
    let plugins: Vec<TempDir> = ids
        .iter()
        .map(|id| fixture_plugin("py-zygote", id, "python", "plugin.py", ""))
        .collect();
    for p in &plugins {
        sup.add_plugin_dir(p.path()).unwrap();
    }
    Kit {
        sup,
        _plugins: plugins,
        cache,
    }
}

impl Kit {
    async fn text(&self, id: &str, f: &str) -> String {
        let out = self.sup.call(id, f, Vec::new(), None).await;
        String::from_utf8(out.unwrap_or_else(|e| panic!("{id}.{f}: {e:?}"))).unwrap()
    }

    async fn info(&self, id: &str) -> corral_protocol::PluginInfo {
        let list = self.sup.list().await;
        list.into_iter().find(|p| p.id == id).expect("listed")
    }

    async fn pid(&self, id: &str) -> u32 {
        self.info(id).await.pid.expect("a running worker")
    }
}

/// `PPid` of `pid`, as this process's PID namespace numbers it.
fn parent_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A Landlock report with the supervisor's cache and the version's snapshot
/// (named afresh by every supervisor) written as placeholders.
fn rules(report: &corral_protocol::Enforcement, cache: &Path) -> String {
    let text = report
        .to_string()
        .replace(&*cache.to_string_lossy(), "<cache>");
    text.split(' ')
        .map(|w| match w.strip_prefix("<cache>/versions/") {
            Some(rest) if rest.ends_with(',') => "<version>,",
            Some(_) => "<version>",
            None => w,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn python_workers_fork_from_one_template_per_level_and_are_confined_like_exec_started_ones() {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        let forked = kit(level, &["zy-a", "zy-b"], true);
        let exec = kit(level, &["zy-a"], false);
        for id in ["zy-a", "zy-b"] {
            assert_eq!(forked.text(id, "ok").await, "ok", "{level}");
        }
        assert_eq!(exec.text("zy-a", "ok").await, "ok", "{level}");
        let w = forked.sup.workers();
        assert_eq!((w.templates_started, w.workers_forked), (1, 2), "{level}");
        let w = exec.sup.workers();
        assert_eq!((w.templates_started, w.workers_forked), (0, 0), "{level}");

        // Both forked workers are children of one template, which is the
        // supervisor's child; the exec'd one is the supervisor's own.
        let (a, b) = (forked.pid("zy-a").await, forked.pid("zy-b").await);
        let template = parent_of(a);
        assert_eq!(parent_of(b), template, "{level}");
        assert_eq!(parent_of(template), std::process::id(), "{level}");
        assert_eq!(parent_of(exec.pid("zy-a").await), std::process::id());

        // Confined exactly as before, and reported the same way.
        let (fa, ea) = (forked.info("zy-a").await, exec.info("zy-a").await);
        assert_confined_at(&fa, level, "python");
        assert_confined_at(&ea, level, "python");
        let (fr, er) = (fa.enforcement.unwrap(), ea.enforcement.unwrap());
        assert_eq!(
            (
                rules(&fr.landlock, forked.cache.path()),
                &fr.seccomp,
                &fr.namespaces,
                fr.no_new_privs
            ),
            (
                rules(&er.landlock, exec.cache.path()),
                &er.seccomp,
                &er.namespaces,
                er.no_new_privs
            ),
            "{level}"
        );
        assert_eq!((fr.uid, fr.cap_effective), (er.uid, er.cap_effective));

        forked.sup.shutdown(Duration::from_secs(1)).await;
        exec.sup.shutdown(Duration::from_secs(1)).await;
        // Nothing is left: the workers, and the template once its last child ended.
        for pid in [a, b, template] {
            assert!(
                wait_gone(pid, Duration::from_secs(5)),
                "{level}: {pid} left"
            );
        }
    }
}

#[tokio::test]
async fn forked_workers_draw_their_own_random_numbers() {
    let k = kit(Level::Standard, &["zy-a", "zy-b", "zy-c"], true);
    let mut seen = Vec::new();
    for id in ["zy-a", "zy-b", "zy-c"] {
        let d = k.text(id, "draws").await;
        let (mt, urandom) = d.split_once(' ').unwrap();
        seen.push((mt.to_owned(), urandom.to_owned()));
    }
    for (i, x) in seen.iter().enumerate() {
        for y in &seen[i + 1..] {
            assert_ne!(x.0, y.0, "random's state is shared: {seen:?}");
            assert_ne!(x.1, y.1, "{seen:?}");
        }
    }
    assert_eq!(k.sup.workers().workers_forked, 3);
    k.sup.shutdown(Duration::from_secs(1)).await;
}

/// A supervisor forking `runtime`'s workers from a template, with the plugins
/// `plugin` makes for `ids`.
fn forked(
    runtime: Runtime,
    ids: &[&str],
    plugin: impl Fn(&str) -> TempDir,
) -> (Supervisor, Vec<TempDir>, TempDir) {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.zygotes = vec![runtime];
    let mut sup = Supervisor::new(opts);
    let plugins: Vec<TempDir> = ids.iter().map(|id| plugin(id)).collect();
    for p in &plugins {
        sup.add_plugin_dir(p.path()).unwrap();
    }
    (sup, plugins, cache)
}

/// WASI's generators are seeded from the worker thread's `rand::rng()`, which is
/// seeded at its first use and never again at a fork: made in the template, it
/// would give every child the same stream.
#[tokio::test]
async fn forked_wasm_workers_draw_their_own_random_numbers() {
    let ids = ["zw-a", "zw-b", "zw-c"];
    let (sup, _plugins, _cache) = forked(Runtime::Wasm, &ids, |id| {
        corral_integration_tests::wat_plugin(id, "random.wat", "")
    });
    let mut seen = Vec::new();
    for id in ids {
        let drawn = sup.call(id, "draw", Vec::new(), None).await.unwrap();
        assert_eq!(drawn.len(), 16);
        seen.push(drawn);
    }
    for (i, x) in seen.iter().enumerate() {
        for y in &seen[i + 1..] {
            assert_ne!(x, y, "WASI's random stream is shared: {seen:?}");
        }
    }
    assert_eq!(sup.workers().workers_forked, 3);
    sup.shutdown(Duration::from_secs(1)).await;
}

/// QuickJS seeds `Math.random` and sets `performance`'s time origin when a context is
/// made, and has no call to do either again: a context made in the template (tried
/// and dropped, ARCHITECTURE.md "Zygotes") would give every child one stream and the
/// template's clock. Each forked worker makes its own.
#[tokio::test]
async fn forked_js_workers_draw_their_own_random_numbers_and_count_time_from_their_start() {
    let ids = ["zj-a", "zj-b", "zj-c"];
    let (sup, _plugins, _cache) = forked(Runtime::Js, &ids, |id| {
        fixture_plugin("js-zygote", id, "js", "main.js", "")
    });
    let text = async |id: &str, f: &str| {
        let out = sup.call(id, f, Vec::new(), None).await;
        String::from_utf8(out.unwrap_or_else(|e| panic!("{id}.{f}: {e:?}"))).unwrap()
    };
    let mut seen = Vec::new();
    for id in &ids[..2] {
        seen.push(text(id, "draws").await);
    }
    // The template is older than a second when the third worker forks from it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    seen.push(text(ids[2], "draws").await);
    for (i, x) in seen.iter().enumerate() {
        for y in &seen[i + 1..] {
            assert_ne!(x, y, "Math.random's state is shared: {seen:?}");
        }
    }
    let since: f64 = text(ids[2], "clock").await.parse().unwrap();
    assert!(
        (0.0..1000.0).contains(&since),
        "performance.now() counts from the template's start: {since} ms"
    );
    let w = sup.workers();
    assert_eq!((w.templates_started, w.workers_forked), (1, 3));
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_forked_plugin_cannot_signal_read_or_trace_its_template() {
    let expected = [
        // Another user's process: signals and /proc refused by the kernel.
        (Level::Standard, "kill:EPERM mem:EACCES environ:EACCES"),
        // Landlock's signal scope and its file rules refuse first.
        (Level::High, "kill:EPERM mem:EACCES environ:EACCES"),
        // Its own PID namespace: the template has no number in it.
        (Level::Maximum, "no parent in sight"),
    ];
    for (level, outcome) in expected {
        let k = kit(level, &["zy-a", "zy-b"], true);
        assert_eq!(k.text("zy-a", "reach_template").await, outcome, "{level}");
        let template = parent_of(k.pid("zy-a").await);
        // ptrace is in no level's filter: the worker is killed for trying.
        assert_eq!(
            k.sup.call("zy-a", "trace_template", Vec::new(), None).await,
            Err(CallError::WorkerCrashed(ExitReason::Seccomp {
                syscall: "ptrace".into()
            })),
            "{level}"
        );
        // The template is unharmed: the next workers fork from it.
        assert_eq!(k.text("zy-b", "ok").await, "ok", "{level}");
        assert_eq!(k.text("zy-a", "ok").await, "ok", "{level}");
        let w = k.sup.workers();
        assert_eq!((w.templates_started, w.workers_forked), (1, 3), "{level}");
        for id in ["zy-a", "zy-b"] {
            assert_eq!(parent_of(k.pid(id).await), template, "{level}");
        }
        k.sup.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn a_template_that_dies_takes_its_workers_and_the_next_start_forks_from_a_new_one() {
    let k = kit(Level::Standard, &["zy-a"], true);
    assert_eq!(k.text("zy-a", "ok").await, "ok");
    let worker = k.pid("zy-a").await;
    let template = parent_of(worker);
    assert_eq!(parent_of(template), std::process::id());
    // SAFETY: kill(2) on the template this test's supervisor started.
    assert_eq!(unsafe { libc::kill(template as i32, libc::SIGKILL) }, 0);
    assert!(
        wait_gone(worker, Duration::from_secs(5)),
        "the worker outlived its template"
    );
    // The next call starts the plugin again, from a new template.
    let mut answered = None;
    for _ in 0..50 {
        if let Ok(out) = k.sup.call("zy-a", "ok", Vec::new(), None).await {
            answered = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answered.as_deref(), Some(&b"ok"[..]));
    let again = k.pid("zy-a").await;
    assert_ne!(parent_of(again), template);
    assert_eq!(parent_of(parent_of(again)), std::process::id());
    assert_eq!(k.sup.workers().templates_started, 2);
    k.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_template_that_cannot_start_leaves_its_workers_started_by_exec() {
    // A Python worker binary that dies when started as a template, and is the real
    // worker otherwise.
    let bin = open_tempdir();
    let real = corral_integration_tests::built()
        .bin_dir
        .join("corral-worker-python");
    let script = bin.path().join("corral-worker-python");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$CORRAL_ZYGOTE\" = 1 ] && {{ echo 'no template today' >&2; exit 3; }}\nexec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.worker_dir = bin.path().to_owned();
    opts.policy = Arc::new(test_policy().with_level(Level::Standard, "test"));
    opts.zygotes = vec![Runtime::Python];
    let mut sup = Supervisor::new(opts);
    let plugins: Vec<TempDir> = ["zy-a", "zy-b"]
        .iter()
        .map(|id| fixture_plugin("py-zygote", id, "python", "plugin.py", ""))
        .collect();
    for p in &plugins {
        sup.add_plugin_dir(p.path()).unwrap();
    }
    let k = Kit {
        sup,
        _plugins: plugins,
        cache,
    };
    for id in ["zy-a", "zy-b"] {
        assert_eq!(k.text(id, "ok").await, "ok");
        assert_eq!(parent_of(k.pid(id).await), std::process::id(), "{id}");
    }
    let w = k.sup.workers();
    // One template tried, none used again after it failed.
    assert_eq!((w.templates_started, w.workers_forked), (1, 0));
    assert_confined_at(&k.info("zy-a").await, Level::Standard, "python");
    k.sup.shutdown(Duration::from_secs(1)).await;
}
