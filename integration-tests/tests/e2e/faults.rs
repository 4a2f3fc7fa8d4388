//! Calls that go wrong: traps, deadlines, limits, crashes, bad workers.

use crate::support::{testkit, wait_gone, with_module, worker_pid};
use corral::Supervisor;
use corral_integration_tests::{options, wat_plugin};
use corral_protocol::{CallError, ExitReason};
use std::time::{Duration, Instant};

#[tokio::test]
async fn trap_is_typed_and_carries_the_trap_message() {
    let f = testkit("");
    match f.sup.call(&f.id, "trap", vec![], None).await {
        Err(CallError::Trap { message }) => {
            assert!(
                message.starts_with("wasm trap: wasm `unreachable` instruction executed"),
                "{message}"
            );
            assert!(
                message.contains("testkit.wat!trap"),
                "backtrace names the function: {message}"
            );
        }
        other => panic!("expected trap, got {other:?}"),
    }
    // Same worker, fresh instance: the count starts again.
    let pid = worker_pid(&f.sup, &f.id).await;
    assert_eq!(
        f.sup.call(&f.id, "count", vec![], None).await.unwrap(),
        1u32.to_le_bytes()
    );
    assert_eq!(
        f.sup.call(&f.id, "count", vec![], None).await.unwrap(),
        2u32.to_le_bytes()
    );
    f.sup.call(&f.id, "trap", vec![], None).await.unwrap_err();
    assert_eq!(
        f.sup.call(&f.id, "count", vec![], None).await.unwrap(),
        1u32.to_le_bytes()
    );
    assert_eq!(
        worker_pid(&f.sup, &f.id).await,
        pid,
        "a trap does not cost the process"
    );
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn infinite_loop_stops_at_the_deadline_then_the_plugin_works() {
    let f = testkit("timeout = \"300ms\"");
    f.sup.call(&f.id, "ok", vec![], None).await.unwrap(); // warm: exclude start-up
    let pid = worker_pid(&f.sup, &f.id).await;
    let t = Instant::now();
    let r = f.sup.call(&f.id, "spin", vec![], None).await;
    let took = t.elapsed();
    assert_eq!(r, Err(CallError::Timeout { deadline_ms: 300 }));
    assert!(
        took >= Duration::from_millis(300),
        "stopped early: {took:?}"
    );
    // Stopped by the engine, before the supervisor's backstop (the deadline plus
    // the kill grace) would have; the same worker answers next.
    let grace = corral::Options::new().kill_grace;
    assert!(
        took < Duration::from_millis(300) + grace,
        "deadline overshot: {took:?}"
    );
    // Interrupted inside the engine: same worker, and it answers at once.
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    assert_eq!(worker_pid(&f.sup, &f.id).await, pid);

    // A caller's own shorter deadline wins.
    let t = Instant::now();
    let r = f
        .sup
        .call(&f.id, "spin", vec![], Some(Duration::from_millis(100)))
        .await;
    assert_eq!(r, Err(CallError::Timeout { deadline_ms: 100 }));
    assert!(
        t.elapsed() < Duration::from_millis(100) + grace,
        "{:?}",
        t.elapsed()
    );
    assert_eq!(worker_pid(&f.sup, &f.id).await, pid);
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn memory_bomb_hits_the_store_limit() {
    let f = testkit("memory = \"8MiB\"");
    assert_eq!(
        f.sup.call(&f.id, "grow", vec![], None).await,
        Err(CallError::MemoryLimit {
            limit_bytes: 8 << 20
        })
    );
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    // An input that cannot fit in the limit is refused the same way.
    assert_eq!(
        f.sup.call(&f.id, "echo", vec![1; 9 << 20], None).await,
        Err(CallError::MemoryLimit {
            limit_bytes: 8 << 20
        })
    );
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn output_limit_is_enforced() {
    let f = testkit("max_output = \"64KiB\"");
    match f.sup.call(&f.id, "big", vec![], None).await {
        Err(CallError::OutputTooLarge { size, limit }) => {
            assert_eq!((size, limit), (2 * 65536, 65536));
        }
        other => panic!("expected output limit, got {other:?}"),
    }
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn worker_killed_mid_call_fails_that_call_and_the_queued_call_runs_on_the_next_worker() {
    let f = testkit("timeout = \"20s\"");
    f.sup.call(&f.id, "ok", vec![], None).await.unwrap();
    let pid = worker_pid(&f.sup, &f.id).await;
    let sup = std::sync::Arc::new(f.sup);
    let (s, id) = (sup.clone(), f.id.clone());
    let in_flight = tokio::spawn(async move { s.call(&id, "spin", vec![], None).await });
    let (s, id) = (sup.clone(), f.id.clone());
    let queued = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.call(&id, "ok", vec![], None).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: plain kill(2) of the worker this test's supervisor started and that is
    // still running (it is spinning on our call).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let killed = ExitReason::Signal {
        signo: 9,
        name: "SIGKILL".into(),
    };
    let t = Instant::now();
    assert_eq!(
        in_flight.await.unwrap(),
        Err(CallError::WorkerCrashed(killed))
    );
    // The queued call was never sent to the killed worker: it runs on the next.
    assert_eq!(queued.await.unwrap(), Ok(b"ok".to_vec()));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "crash noticed late: {:?}",
        t.elapsed()
    );

    // The worker that took the queued call serves the next.
    assert_eq!(sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    let info = sup.list().await.into_iter().find(|p| p.id == f.id).unwrap();
    assert_ne!(info.pid, Some(pid));
    assert_eq!(info.restarts, 1);
    assert_eq!(info.state, "running");
    assert!(info.last_error.unwrap().contains("SIGKILL"));
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unresponsive_worker_is_killed_by_the_supervisor_backstop() {
    // SIGSTOP the real worker so it cannot answer at all, not even at its
    // in-engine deadline: only the supervisor's backstop can end the call.
    let cache = corral_integration_tests::open_tempdir();
    let mut opts = options(cache.path());
    opts.kill_grace = Duration::from_millis(200);
    let plugin = wat_plugin("stopped", "testkit.wat", "timeout = \"200ms\"");
    let mut sup = Supervisor::new(opts);
    let id = sup.add_plugin_dir(plugin.path()).unwrap();
    sup.call(&id, "ok", vec![], None).await.unwrap();
    let pid = worker_pid(&sup, &id).await;
    // SAFETY: signals the worker this supervisor started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    assert_eq!(
        sup.call(&id, "ok", vec![], None).await,
        Err(CallError::Timeout { deadline_ms: 200 })
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(wait_gone(pid).await, "hung worker killed");
    // A killed-by-us worker is a restart, not a crash.
    assert_eq!(sup.call(&id, "ok", vec![], None).await.unwrap(), b"ok");
    let info = sup.list().await.into_iter().find(|p| p.id == id).unwrap();
    assert_eq!(info.state, "running");
    assert!(
        info.last_error
            .unwrap()
            .contains("killed by the supervisor")
    );
    sup.shutdown(Duration::from_secs(1)).await;
}

/// A worker directory whose `corral-worker-wasm` is `script`.
fn fake_worker(script: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = corral_integration_tests::open_tempdir();
    let path = dir.path().join("corral-worker-wasm");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn fake_supervisor(
    workers: &tempfile::TempDir,
    cache: &tempfile::TempDir,
) -> (Supervisor, tempfile::TempDir) {
    let plugin = wat_plugin("fake", "testkit.wat", "");
    let mut opts = options(cache.path());
    opts.worker_dir = workers.path().to_owned();
    opts.handshake_timeout = Duration::from_millis(500);
    opts.restart.base_backoff = Duration::from_millis(10);
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(plugin.path()).unwrap();
    (sup, plugin)
}

#[tokio::test]
async fn repeated_crashes_mark_the_plugin_failed_visibly() {
    let workers = fake_worker("#!/bin/sh\necho 'cannot start: no engine here' >&2\nexit 3\n");
    let cache = corral_integration_tests::open_tempdir();
    let (sup, _p) = fake_supervisor(&workers, &cache);
    for n in 1..=5 {
        match sup.call("fake", "ok", vec![], None).await {
            Err(CallError::StartFailed { plugin, reason }) => {
                assert_eq!(plugin, "fake");
                assert!(reason.contains("exited with code 3"), "{reason}");
                assert!(
                    reason.contains("cannot start: no engine here"),
                    "stderr quoted: {reason}"
                );
            }
            other => panic!("start {n}: expected start failure, got {other:?}"),
        }
    }
    match sup.call("fake", "ok", vec![], None).await {
        Err(CallError::PluginFailed {
            plugin,
            crashes,
            last,
        }) => {
            assert_eq!((plugin.as_str(), crashes), ("fake", 5));
            assert!(last.contains("exited with code 3"), "{last}");
        }
        other => panic!("expected plugin failed, got {other:?}"),
    }
    let info = sup
        .list()
        .await
        .into_iter()
        .find(|p| p.id == "fake")
        .unwrap();
    assert_eq!(info.state, "failed");
    assert!(info.last_error.unwrap().contains("exited with code 3"));
}

#[tokio::test]
async fn restarts_back_off() {
    let workers = fake_worker("#!/bin/sh\nexit 1\n");
    let cache = corral_integration_tests::open_tempdir();
    let (sup, _p) = fake_supervisor(&workers, &cache);
    let t = Instant::now();
    for _ in 0..4 {
        sup.call("fake", "ok", vec![], None).await.unwrap_err();
    }
    // Backoff before starts 2, 3, 4: 0, 10, 20 ms after each crash (base 10 ms).
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn protocol_violations_in_the_handshake_are_typed() {
    let mismatch = format!(
        "protocol version mismatch: peer speaks 99, we speak {}",
        corral_protocol::PROTOCOL_VERSION
    );
    let cases = [
        (
            "printf '\\006\\000\\000\\000CRRL\\143\\000' >&3; sleep 5",
            mismatch.as_str(),
        ),
        (
            "printf '\\006\\000\\000\\000HTTP/1' >&3; sleep 5",
            "magic bytes",
        ),
        (
            "printf '\\377\\377\\377\\177' >&3; sleep 5",
            "exceeds the limit",
        ),
        ("sleep 5", "no handshake within"),
        (
            "printf '\\010\\000' >&3; exit 0",
            "exited with code 0 before its handshake",
        ),
    ];
    for (body, expected) in cases {
        let workers = fake_worker(&format!("#!/bin/sh\n{body}\n"));
        let cache = corral_integration_tests::open_tempdir();
        let (sup, _p) = fake_supervisor(&workers, &cache);
        match sup.call("fake", "ok", vec![], None).await {
            Err(CallError::StartFailed { reason, .. }) => {
                assert!(reason.contains(expected), "{body}: {reason}")
            }
            other => panic!("{body}: expected start failure, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn init_hook_runs_under_the_deadline_and_can_refuse() {
    let f = with_module("spin-init", "init-spin.wat", "timeout = \"200ms\"");
    let t = Instant::now();
    match f.sup.call(&f.id, "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(
                reason.contains("exceeded its deadline of 200 ms"),
                "{reason}"
            )
        }
        other => panic!("expected start failure, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(3));

    let f = with_module("fail-init", "init-fail.wat", "");
    match f.sup.call(&f.id, "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(
                reason.contains("init failed: missing configuration"),
                "{reason}"
            )
        }
        other => panic!("expected start failure, got {other:?}"),
    }
}

/// An export named as a plugin function with another signature is refused at load,
/// by name, not answered as an unknown function (nor a trap) at every call.
#[tokio::test]
async fn an_export_with_the_wrong_signature_is_a_start_failure_naming_it() {
    let plugin = wat_plugin("wrong-abi", "testkit.wat", "");
    std::fs::write(
        plugin.path().join("testkit.wat"),
        r#"(module
             (memory (export "memory") 1)
             (func (export "corral_alloc") (param i32) (result i32) i32.const 0)
             (func (export "corral_fn_ok") (param i32 i32) (result i32) i32.const 0)
             (func (export "corral_fn_bad") (param i32) (result i32) i32.const 0))"#,
    )
    .unwrap();
    let cache = corral_integration_tests::open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    sup.add_plugin_dir(plugin.path()).unwrap();
    match sup.call("wrong-abi", "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains("invalid module"), "{reason}");
            assert!(
                reason.contains("`corral_fn_bad` must be a function (i32, i32) -> i32"),
                "{reason}"
            );
        }
        other => panic!("expected start failure, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_module_is_a_start_failure_naming_the_file() {
    let plugin = wat_plugin("broken", "testkit.wat", "");
    std::fs::write(
        plugin.path().join("testkit.wat"),
        "(module (func $x (result i32)))",
    )
    .unwrap();
    let cache = corral_integration_tests::open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    sup.add_plugin_dir(plugin.path()).unwrap();
    match sup.call("broken", "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(reason.contains("invalid module"), "{reason}");
            assert!(reason.contains("testkit.wat"), "{reason}");
        }
        other => panic!("expected start failure, got {other:?}"),
    }
}

/// Tables count against the engine's memory limit like linear memory: a table bomb
/// ends in `MemoryLimit` from the same worker (not the cgroup's OOM kill), and a
/// module declaring a table past the limit does not load, saying why.
#[tokio::test]
async fn tables_count_against_the_memory_limit() {
    let f = with_module("tables", "table-bomb.wat", "memory = \"16MiB\"");
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    let pid = worker_pid(&f.sup, &f.id).await;
    assert_eq!(
        f.sup.call(&f.id, "table_bomb", vec![], None).await,
        Err(CallError::MemoryLimit {
            limit_bytes: 16 << 20
        })
    );
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    assert_eq!(
        worker_pid(&f.sup, &f.id).await,
        pid,
        "no OOM kill, no restart"
    );
    f.sup.shutdown(Duration::from_secs(1)).await;

    let f = with_module("huge-table", "table-huge.wat", "");
    match f.sup.call(&f.id, "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => assert!(
            reason.contains("exceeded its memory limit of 67108864 bytes"),
            "{reason}"
        ),
        other => panic!("a 800 MB table was accepted: {other:?}"),
    }
    f.sup.shutdown(Duration::from_secs(1)).await;
}
