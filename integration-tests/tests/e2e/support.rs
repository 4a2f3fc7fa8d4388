//! Helpers shared by the test modules.

use corral::Supervisor;
use corral_integration_tests::{built, options, wat_plugin};
use tempfile::TempDir;

/// A supervisor with one WAT fixture plugin; keep the returned dirs alive.
pub struct Fixture {
    pub sup: Supervisor,
    pub id: String,
    _plugin: TempDir,
    _cache: TempDir,
}

pub fn testkit(limits: &str) -> Fixture {
    with_module("testkit", "testkit.wat", limits)
}

pub fn with_module(id: &str, module: &str, limits: &str) -> Fixture {
    let plugin = wat_plugin(id, module, limits);
    let cache = corral_integration_tests::open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    let id = sup.add_plugin_dir(plugin.path()).unwrap();
    Fixture {
        sup,
        id,
        _plugin: plugin,
        _cache: cache,
    }
}

/// A supervisor with the example plugin.
pub fn hello() -> (Supervisor, TempDir) {
    let cache = corral_integration_tests::open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    sup.add_plugin_dir(&built().hello_wasm).unwrap();
    (sup, cache)
}

/// The pid of the plugin's running worker.
pub async fn worker_pid(sup: &Supervisor, id: &str) -> u32 {
    let list = sup.list().await;
    let p = list.iter().find(|p| p.id == id).expect("plugin listed");
    p.pid.expect("worker running")
}

/// Wait (without blocking the runtime that must reap it) for `pid` to be gone.
pub async fn wait_gone(pid: u32) -> bool {
    tokio::task::spawn_blocking(move || {
        corral_integration_tests::wait_gone(pid, std::time::Duration::from_secs(3))
    })
    .await
    .unwrap()
}

/// Bytes as text (lossy), for output of `corral` commands.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Poll `done` every 50 ms; fail the test naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: std::time::Duration, mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + timeout;
    while !done() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
