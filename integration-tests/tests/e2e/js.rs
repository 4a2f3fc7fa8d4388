//! The JavaScript worker (QuickJS): the plugin contract, its errors and limits, the
//! host API's integrity, import confinement, and every isolation level.

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::{assert_confined_at, js_plugin, open_tempdir, options, test_policy};
use corral_protocol::CallError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

struct Js {
    sup: Supervisor,
    _plugin: TempDir,
    _cache: TempDir,
}

fn js(limits: &str, level: Level) -> Js {
    js_with(limits, level, |_| {})
}

/// [`js`] with the plugin's files changed by `prepare` before it is added.
fn js_with(limits: &str, level: Level, prepare: impl FnOnce(&std::path::Path)) -> Js {
    let plugin = js_plugin("kit", limits);
    prepare(plugin.path());
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = Arc::new(test_policy().with_level(level, "test"));
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(plugin.path()).unwrap();
    Js {
        sup,
        _plugin: plugin,
        _cache: cache,
    }
}

impl Js {
    async fn call(&self, f: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        self.sup.call("kit", f, input.to_vec(), None).await
    }

    async fn text(&self, f: &str, input: &str) -> String {
        String::from_utf8(self.call(f, input.as_bytes()).await.unwrap()).unwrap()
    }
}

#[tokio::test]
async fn the_contract_bytes_strings_json_promises_and_init() {
    let k = js("", Level::Standard);
    assert_eq!(
        k.text("ready", "").await,
        "ready",
        "init ran before the first call"
    );
    assert_eq!(
        k.text("greet", "ada").await,
        "Hello, ADA!",
        "a relative import works"
    );
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(
        k.call("echo", &bytes).await.unwrap(),
        bytes,
        "1 MiB, byte-exact"
    );
    assert_eq!(k.call("echo", b"").await.unwrap(), b"");
    assert_eq!(
        k.text("json", r#"{"a":[1,2]}"#).await,
        r#"{"a":[1,2],"seen":true}"#
    );
    assert_eq!(k.text("later", "async").await, "async");
    assert_eq!(k.text("count", "").await, "1");
    assert_eq!(k.text("count", "").await, "2", "state lives across calls");
    assert_eq!(
        k.text("log_levels", "").await,
        "TypeError: corral.log: unknown level \"loud\" (error, warn, info, debug, trace)"
    );
    let now: i64 = k.text("now", "").await.parse().unwrap();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((now - wall).abs() < 5_000, "now_ms {now} vs {wall}");
    let list = k.sup.list().await;
    assert_eq!(list[0].runtime.as_str(), "js");
    assert!(list[0].exports.contains(&"greet".to_owned()));
    assert!(
        !list[0].exports.contains(&"init".to_owned()),
        "hooks are not functions"
    );
    match k.call("nope", b"").await {
        Err(CallError::UnknownFunction { exports, .. }) => assert!(exports.contains("greet")),
        other => panic!("{other:?}"),
    }
    k.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn exceptions_are_typed_errors_with_the_js_stack() {
    let k = js("", Level::Standard);
    match k.call("greet", b"").await {
        Err(CallError::Plugin { message }) => {
            assert!(message.starts_with("give a name to greet\n"), "{message}");
            assert!(message.contains("at greet (main.js:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        k.call("throw_value", b"").await,
        Err(CallError::Plugin {
            message: "a bare string".into()
        })
    );
    match k.call("bug", b"").await {
        Err(CallError::Trap { message }) => {
            assert!(
                message.starts_with("ReferenceError: undefined_variable is not defined"),
                "{message}"
            );
            assert!(message.contains("at bug (main.js:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match k.call("wrong_type", b"").await {
        Err(CallError::Plugin { message }) => assert!(
            message.contains("return a Uint8Array or a string"),
            "{message}"
        ),
        other => panic!("{other:?}"),
    }
    k.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn deadlines_memory_stack_and_output_limits() {
    let k = js(
        "timeout = \"300ms\"\nmemory = \"32MiB\"\nmax_output = \"1MiB\"",
        Level::Standard,
    );
    assert_eq!(k.text("count", "").await, "1");
    let pid = k.sup.list().await[0].pid;
    let t = Instant::now();
    assert_eq!(
        k.call("spin", b"").await,
        Err(CallError::Timeout { deadline_ms: 300 })
    );
    // The engine stopped it, before the supervisor's backstop (the deadline plus the
    // kill grace) would have: same process, a fresh runtime (init again).
    let backstop = Duration::from_millis(300) + corral::Options::new().kill_grace;
    assert!(t.elapsed() < backstop, "{:?}", t.elapsed());
    assert_eq!(k.text("count", "").await, "1");
    assert_eq!(k.text("ready", "").await, "ready");
    assert_eq!(k.sup.list().await[0].pid, pid);
    // Its own deadline: filling 32 MiB takes a while where page faults are slow.
    assert_eq!(
        k.sup
            .call("kit", "hog", Vec::new(), Some(Duration::from_secs(10)))
            .await,
        Err(CallError::MemoryLimit {
            limit_bytes: 32 << 20
        })
    );
    match k.call("deep", b"").await {
        Err(CallError::Trap { message }) => {
            assert!(
                message.starts_with("RangeError: Maximum call stack size exceeded"),
                "{message}"
            );
            assert!(message.lines().count() <= 34, "the stack is cut: {message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        k.call("big", b"2097152").await,
        Err(CallError::OutputTooLarge {
            size: 2 << 20,
            limit: 1 << 20
        })
    );
    assert_eq!(k.call("big", b"1048576").await.unwrap().len(), 1 << 20);
    assert_eq!(k.sup.list().await[0].pid, pid, "no crash along the way");
    k.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_host_api_cannot_be_tampered_with() {
    let k = js("", Level::Standard);
    assert_eq!(
        k.text("tamper", "").await,
        "TypeError,TypeError,TypeError,TypeError;api intact"
    );
    // Its own prototypes are its own business, and they do not reach the host.
    assert_eq!(k.text("polluted", "").await, "yes");
    assert_eq!(k.text("greet", "x").await, "Hello, X!");
    assert_eq!(k.call("echo", b"bytes").await.unwrap(), b"bytes");
    k.sup.shutdown(Duration::from_secs(1)).await;
}

/// A plugin whose main module imports `import_line`.
async fn load_failure(import_line: &str, extra: impl FnOnce(&std::path::Path)) -> String {
    let k = js_with("", Level::Standard, |dir| {
        std::fs::write(
            dir.join("main.js"),
            format!("{import_line}\nexport function ok() {{ return \"ok\"; }}\n"),
        )
        .unwrap();
        extra(dir);
    });
    match k.call("ok", b"").await {
        Err(CallError::StartFailed { reason, .. }) => reason,
        other => panic!("{import_line}: expected a load failure, got {other:?}"),
    }
}

#[tokio::test]
async fn imports_stay_inside_the_plugin_directory() {
    let r = load_failure("import x from \"../outside.js\";", |_| {}).await;
    assert!(
        r.contains("\"../outside.js\" leaves the plugin directory"),
        "{r}"
    );
    let r = load_failure("import fs from \"fs\";", |_| {}).await;
    assert!(
        r.contains("\"fs\" is a Node.js built-in module, which Corral plugins do not have"),
        "{r}"
    );
    let r = load_failure("import x from \"/etc/passwd\";", |_| {}).await;
    assert!(r.contains("absolute paths and URLs are not allowed"), "{r}");
    let r = load_failure("import x from \"left-pad\";", |_| {}).await;
    assert!(r.contains("there is no node_modules/left-pad"), "{r}");
    let r = load_failure("import { x } from \"./lib/escape.js\";", |dir| {
        std::os::unix::fs::symlink("/etc/passwd", dir.join("lib/escape.js")).unwrap();
    })
    .await;
    assert!(r.contains("outside the plugin directory"), "{r}");
    let r = load_failure("import { x } from \"./lib/missing.js\";", |_| {}).await;
    assert!(r.contains("lib/missing.js"), "{r}");
}

#[tokio::test]
async fn javascript_runs_confined_at_every_level() {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        let k = js(
            "timeout = \"300ms\"\nmemory = \"32MiB\"\nmax_output = \"1MiB\"",
            level,
        );
        assert_eq!(k.text("greet", "ada").await, "Hello, ADA!", "{level}");
        // The JS attacks of the hostile suite, here at every level: a stack bomb, an
        // oversized result, tampering with the host API and prototypes.
        assert!(
            matches!(k.call("deep", b"").await, Err(CallError::Trap { message }) if message.starts_with("RangeError: Maximum call stack size exceeded")),
            "{level}"
        );
        assert_eq!(
            k.call("big", b"2097152").await,
            Err(CallError::OutputTooLarge {
                size: 2 << 20,
                limit: 1 << 20
            }),
            "{level}"
        );
        assert_eq!(
            k.text("tamper", "").await,
            "TypeError,TypeError,TypeError,TypeError;api intact",
            "{level}"
        );
        assert_eq!(
            k.call("spin", b"").await,
            Err(CallError::Timeout { deadline_ms: 300 }),
            "{level}"
        );
        // Its own deadline: filling 32 MiB takes a while where page faults are slow
        // (tens of microseconds each on the CI's virtual machines, at half a CPU).
        assert_eq!(
            k.sup
                .call("kit", "hog", Vec::new(), Some(Duration::from_secs(10)))
                .await,
            Err(CallError::MemoryLimit {
                limit_bytes: 32 << 20
            }),
            "{level}"
        );
        assert_eq!(k.text("count", "").await, "1", "{level}");
        assert_confined_at(&k.sup.list().await[0], level, "js");
        k.sup.shutdown(Duration::from_secs(1)).await;
    }
}

/// The bundles of bytecode in the cache's store.
fn stored_bundles(cache: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(engines) = std::fs::read_dir(cache.join("js")) else {
        return Vec::new();
    };
    engines
        .flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .collect()
}

async fn worker_pid(sup: &Supervisor, id: &str) -> u32 {
    let list = sup.list().await;
    list.iter()
        .find(|p| p.id == id)
        .and_then(|p| p.pid)
        .unwrap()
}

/// A plugin's modules are parsed once, by a compile helper, into one bundle of
/// bytecode that every worker of the same files loads (a copy under another id,
/// another supervisor of the cache); the workers really load it (a damaged one is
/// refused, naming it), keep nothing open on it, and their errors still name the
/// file and line. Code that does not parse is reported by the worker as before,
/// and nothing is stored for it.
#[tokio::test]
async fn modules_are_precompiled_once_for_every_copy_and_every_supervisor() {
    use std::os::unix::fs::MetadataExt;
    let cache = open_tempdir();
    let (a, b) = (
        corral_integration_tests::js_plugin("kit", ""),
        corral_integration_tests::js_plugin("kit2", ""),
    );
    let sup_with = |dirs: &[&std::path::Path]| {
        let mut sup = Supervisor::new(options(cache.path()));
        for d in dirs {
            sup.add_plugin_dir(d).unwrap();
        }
        sup
    };
    let sup = sup_with(&[a.path(), b.path()]);
    for id in ["kit", "kit2"] {
        let out = sup.call(id, "greet", b"ada".to_vec(), None).await;
        assert_eq!(out.unwrap(), b"Hello, ADA!", "{id}");
    }
    assert_eq!(sup.workers().modules_compiled, 1);
    let stored = stored_bundles(cache.path());
    assert_eq!(stored.len(), 1, "{stored:?}");
    let bundle = &stored[0];
    assert_eq!(bundle.extension().unwrap(), "qjsc");
    let m = std::fs::metadata(bundle).unwrap();
    // SAFETY: geteuid has no preconditions.
    assert_eq!(m.uid(), unsafe { libc::geteuid() });
    assert_eq!(m.mode() & 0o777, 0o644);
    assert_eq!(
        std::fs::metadata(bundle.parent().unwrap()).unwrap().mode() & 0o777,
        0o711
    );
    for id in ["kit", "kit2"] {
        let pid = worker_pid(&sup, id).await;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let target = std::fs::read_link(fd.unwrap().path()).unwrap();
            assert!(
                !target.starts_with(cache.path().join("js")),
                "{id} holds {}",
                target.display()
            );
        }
    }
    match sup.call("kit", "greet", Vec::new(), None).await {
        Err(CallError::Plugin { message }) => {
            assert!(message.contains("at greet (main.js:"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    sup.shutdown(Duration::from_secs(1)).await;

    // Another supervisor of the cache finds it.
    let other = sup_with(&[a.path()]);
    let out = other.call("kit", "greet", b"bo".to_vec(), None).await;
    assert_eq!(out.unwrap(), b"Hello, BO!");
    assert_eq!(other.workers().modules_compiled, 0);
    other.shutdown(Duration::from_secs(1)).await;

    // What the workers load is that file.
    std::fs::write(bundle, b"damaged").unwrap();
    let damaged = sup_with(&[a.path()]);
    match damaged.call("kit", "greet", b"bo".to_vec(), None).await {
        Err(CallError::StartFailed { reason, .. }) => assert!(
            reason
                .contains("the precompiled modules are refused: not a bundle of QuickJS bytecode")
                && reason.contains(bundle.to_str().unwrap()),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    damaged.shutdown(Duration::from_secs(1)).await;
    std::fs::remove_file(bundle).unwrap();
    let again = sup_with(&[a.path()]);
    let out = again.call("kit", "greet", b"bo".to_vec(), None).await;
    assert_eq!(out.unwrap(), b"Hello, BO!");
    assert_eq!(again.workers().modules_compiled, 1);
    again.shutdown(Duration::from_secs(1)).await;

    // A syntax error: the worker's own report, nothing stored.
    std::fs::write(
        b.path().join("main.js"),
        "export function ok() {\n  return ;;) \"ok\";\n}\n",
    )
    .unwrap();
    let broken = sup_with(&[b.path()]);
    match broken.call("kit2", "ok", Vec::new(), None).await {
        Err(CallError::StartFailed { reason, .. }) => assert!(
            reason.contains("SyntaxError") && reason.contains("main.js:2"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(broken.workers().modules_compiled, 0);
    assert_eq!(stored_bundles(cache.path()).len(), 1);
    broken.shutdown(Duration::from_secs(1)).await;
}
