//! The store of compiled Wasm modules through the real engine: one compile per
//! module's bytes whatever the number of plugins, every worker mapping the same
//! file, the store kept across supervisors, and a module that does not compile or
//! an artefact that is corrupt refused by name.

use corral::Supervisor;
use corral_integration_tests::{open_tempdir, options, wat_plugin};
use corral_protocol::CallError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The compiled modules in `cache`'s store.
fn stored(cache: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(cache.join("wasm"))
        .map(|d| {
            d.flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
                .map(|f| f.unwrap().path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The files `pid` has mapped from `dir`.
fn mapped_from(pid: u32, dir: &Path) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut out: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    out.dedup();
    out
}

async fn pid_of(sup: &Supervisor, id: &str) -> u32 {
    crate::support::worker_pid(sup, id).await
}

#[tokio::test]
async fn byte_identical_modules_are_compiled_once_and_every_worker_maps_the_one_file() {
    let cache = open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    let same: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|id| wat_plugin(id, "testkit.wat", ""))
        .collect();
    // The same functions, other bytes (a comment): a module of its own.
    let other = wat_plugin("d", "testkit.wat", "");
    let wat = other.path().join("testkit.wat");
    let mut text = std::fs::read_to_string(&wat).unwrap();
    text.push_str("\n;; another module\n");
    std::fs::write(&wat, text).unwrap();
    for p in same.iter().chain([&other]) {
        sup.add_plugin_dir(p.path()).unwrap();
    }
    // All at once: the three starts of one module wait for one compile.
    let (a, b, c, d) = tokio::join!(
        sup.call("a", "ok", vec![], None),
        sup.call("b", "ok", vec![], None),
        sup.call("c", "ok", vec![], None),
        sup.call("d", "ok", vec![], None),
    );
    for r in [a, b, c, d] {
        assert_eq!(r.unwrap(), b"ok");
    }
    assert_eq!(sup.workers().modules_compiled, 2);
    let files = stored(cache.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let store = files[0].parent().unwrap().to_owned();
    for f in &files {
        let m = std::fs::metadata(f).unwrap();
        assert_eq!(m.mode() & 0o777, 0o644, "{}", f.display());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(m.uid(), unsafe { libc::geteuid() });
    }
    assert_eq!(
        std::fs::metadata(&store).unwrap().mode() & 0o777,
        0o711,
        "workers may pass through the store, not list it"
    );
    // Each worker maps its module's file (the code pages are the page cache's,
    // shared); the three of one module map the same one.
    let mut maps = Vec::new();
    for id in ["a", "b", "c", "d"] {
        let m = mapped_from(pid_of(&sup, id).await, &store);
        assert_eq!(m.len(), 1, "{id}: {m:?}");
        maps.push(m[0].clone());
    }
    assert!(maps[0] == maps[1] && maps[1] == maps[2], "{maps:?}");
    assert_ne!(maps[0], maps[3]);
    sup.shutdown(Duration::from_secs(1)).await;

    // Another supervisor over the same cache compiles nothing.
    let mut again = Supervisor::new(options(cache.path()));
    for p in same.iter().chain([&other]) {
        again.add_plugin_dir(p.path()).unwrap();
    }
    for id in ["a", "d"] {
        assert_eq!(again.call(id, "ok", vec![], None).await.unwrap(), b"ok");
    }
    assert_eq!(again.workers().modules_compiled, 0);
    assert_eq!(stored(cache.path()), files);
    again.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_module_that_does_not_compile_fails_its_start_and_stores_nothing() {
    let cache = open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    let bad = wat_plugin("bad", "testkit.wat", "");
    std::fs::write(
        bad.path().join("testkit.wat"),
        "(module (func $f (result i32)))",
    )
    .unwrap();
    sup.add_plugin_dir(bad.path()).unwrap();
    match sup.call("bad", "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains("testkit.wat"), "{reason}");
            assert!(reason.contains("type mismatch"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sup.workers().modules_compiled, 0);
    assert_eq!(stored(cache.path()), Vec::<PathBuf>::new());
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_corrupt_compiled_module_is_refused_by_name_and_compiled_again_once_removed() {
    let cache = open_tempdir();
    let plugin = wat_plugin("p", "testkit.wat", "");
    let start = || {
        let mut sup = Supervisor::new(options(cache.path()));
        sup.add_plugin_dir(plugin.path()).unwrap();
        sup
    };
    let sup = start();
    sup.call("p", "ok", vec![], None).await.unwrap();
    sup.shutdown(Duration::from_secs(1)).await;
    let file = stored(cache.path()).pop().unwrap();
    std::fs::write(&file, b"\x7fELF not a module").unwrap();

    let sup = start();
    match sup.call("p", "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains(file.to_str().unwrap()), "{reason}");
            assert!(
                reason.contains("the precompiled module is refused"),
                "{reason}"
            );
            assert!(reason.contains("remove the file"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    sup.shutdown(Duration::from_secs(1)).await;
    std::fs::remove_file(&file).unwrap();
    let sup = start();
    assert_eq!(sup.call("p", "ok", vec![], None).await.unwrap(), b"ok");
    assert_eq!(sup.workers().modules_compiled, 1);
    sup.shutdown(Duration::from_secs(1)).await;
}
