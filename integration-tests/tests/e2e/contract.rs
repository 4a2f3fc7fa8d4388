//! The plugin contract, the same in every runtime: one suite run against the same
//! kit written four times (`fixtures/testkit.wat`, `fixtures/js-kit`,
//! `fixtures/py-kit`, and in C, `fixtures/native-kit`), which share these function
//! names:
//!
//! | function | does |
//! |---|---|
//! | `ok` | answers `ok` |
//! | `echo` | answers its input |
//! | `count` | counts calls on this instance (Wasm: 4 bytes LE; else decimal) |
//! | `fail` | the plugin's own error, "boom requested" |
//! | `trap` | an engine fault (Wasm `unreachable`, JS `TypeError`, Python `RecursionError`; native: an illegal instruction) |
//! | `spin` | loops forever |
//! | `grow` | allocates until refused |
//! | `big` | answers more than 64 KiB |
//! | `log` | logs "testkit says hi" |
//!
//! Where native code differs it is because nothing can stop machine code from the
//! inside: a fault ends its worker (the supervisor starts a fresh one) and a loop
//! runs until the supervisor kills the worker at its deadline plus the grace; the
//! caller sees the same error kinds.

use corral::Supervisor;
use corral_integration_tests::{
    js_plugin, native_plugin, open_tempdir, options, py_plugin, test_policy, wat_plugin,
};
use corral_protocol::{CallError, ExitReason};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const RUNTIMES: [&str; 4] = ["wasm", "js", "python", "native"];

/// Whether the runtime's engine stops a plugin itself (at a fault or a deadline),
/// keeping its worker: every one but native code.
fn engine_stops_it(rt: &str) -> bool {
    rt != "native"
}

struct Kit {
    runtime: &'static str,
    sup: Supervisor,
    _plugin: TempDir,
    _cache: TempDir,
}

fn kit(runtime: &'static str, limits: &str) -> Kit {
    let plugin = match runtime {
        "wasm" => wat_plugin("kit", "testkit.wat", limits),
        "js" => js_plugin("kit", limits),
        "python" => py_plugin("kit", limits),
        "native" => native_plugin("native-kit", "kit", limits),
        other => panic!("no kit for {other}"),
    };
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = Arc::new(test_policy());
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(plugin.path()).unwrap();
    Kit {
        runtime,
        sup,
        _plugin: plugin,
        _cache: cache,
    }
}

impl Kit {
    async fn call(&self, f: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
        self.sup.call("kit", f, input.to_vec(), None).await
    }

    async fn count(&self) -> u32 {
        let out = self.call("count", b"").await.unwrap();
        if self.runtime == "wasm" {
            u32::from_le_bytes(out.try_into().unwrap())
        } else {
            String::from_utf8(out).unwrap().parse().unwrap()
        }
    }

    async fn pid(&self) -> u32 {
        self.sup.list().await[0].pid.unwrap()
    }

    async fn restarts(&self) -> u32 {
        self.sup.list().await[0].restarts
    }

    async fn stop(self) {
        self.sup.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn results_echo_and_empty_input_are_the_same_everywhere() {
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    for rt in RUNTIMES {
        let k = kit(rt, "");
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        assert_eq!(k.call("echo", b"").await.unwrap(), b"", "{rt}: empty");
        assert_eq!(
            k.call("echo", &bytes).await.unwrap(),
            bytes,
            "{rt}: 1 MiB byte-exact"
        );
        k.call("log", b"").await.unwrap();
        match k.call("nope", b"").await {
            Err(CallError::UnknownFunction {
                plugin,
                function,
                exports,
            }) => {
                assert_eq!((plugin.as_str(), function.as_str()), ("kit", "nope"));
                for f in ["ok", "echo", "count", "fail", "trap", "spin", "grow", "big"] {
                    assert!(
                        exports.split(", ").any(|e| e == f),
                        "{rt}: {f} in {exports}"
                    );
                }
            }
            other => panic!("{rt}: {other:?}"),
        }
        k.stop().await;
    }
}

#[tokio::test]
async fn a_plugin_error_is_typed_and_keeps_the_instance() {
    for rt in RUNTIMES {
        let k = kit(rt, "");
        assert_eq!(k.count().await, 1, "{rt}");
        match k.call("fail", b"").await {
            Err(CallError::Plugin { message }) => {
                assert!(message.contains("boom requested"), "{rt}: {message}")
            }
            other => panic!("{rt}: {other:?}"),
        }
        assert_eq!(k.count().await, 2, "{rt}: the same instance goes on");
        k.stop().await;
    }
}

#[tokio::test]
async fn a_trap_is_typed_and_the_next_call_gets_a_fresh_instance() {
    for rt in RUNTIMES {
        let k = kit(rt, "");
        assert_eq!(k.count().await, 1, "{rt}");
        assert_eq!(k.count().await, 2, "{rt}");
        let pid = k.pid().await;
        if !engine_stops_it(rt) {
            assert_eq!(
                k.call("trap", b"").await,
                Err(CallError::WorkerCrashed(ExitReason::Signal {
                    signo: libc::SIGILL,
                    name: "SIGILL".into()
                })),
                "{rt}"
            );
            assert_eq!(k.count().await, 1, "{rt}: a fresh worker counts again");
            assert_ne!(k.pid().await, pid, "{rt}: in a fresh process");
            assert_eq!(k.restarts().await, 1, "{rt}");
            k.stop().await;
            continue;
        }
        match k.call("trap", b"").await {
            Err(CallError::Trap { message }) => {
                let expected = match rt {
                    "wasm" => "unreachable",
                    "js" => "TypeError",
                    _ => "RecursionError",
                };
                assert!(message.contains(expected), "{rt}: {message}");
            }
            other => panic!("{rt}: {other:?}"),
        }
        assert_eq!(k.count().await, 1, "{rt}: a fresh instance counts again");
        assert_eq!(k.pid().await, pid, "{rt}: a trap does not cost the process");
        assert_eq!(k.restarts().await, 0, "{rt}");
        k.stop().await;
    }
}

#[tokio::test]
async fn a_loop_stops_at_the_deadline_inside_the_engine() {
    for rt in RUNTIMES {
        // The caller's deadline, shorter than the plugin's (5 s): the fresh instance
        // after the interrupt is loaded under the plugin's own, which a re-import
        // on a slow, shared machine fits in.
        let k = kit(rt, "");
        k.call("ok", b"").await.unwrap();
        let pid = k.pid().await;
        let t = Instant::now();
        assert_eq!(
            k.sup
                .call("kit", "spin", Vec::new(), Some(Duration::from_millis(300)))
                .await,
            Err(CallError::Timeout { deadline_ms: 300 }),
            "{rt}"
        );
        let took = t.elapsed();
        let backstop = Duration::from_millis(300) + corral::Options::new().kill_grace;
        if !engine_stops_it(rt) {
            // Killed at the deadline plus the grace; a fresh worker answers next.
            assert!(took >= backstop, "{rt}: {took:?}");
            assert!(
                crate::support::wait_gone(pid).await,
                "{rt}: {pid} still runs"
            );
            assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
            assert_ne!(k.pid().await, pid, "{rt}");
            k.stop().await;
            continue;
        }
        // The engine stops it itself, before the supervisor's kill backstop (the
        // deadline plus the kill grace); the same worker answers next.
        assert!(
            took >= Duration::from_millis(300) && took < backstop,
            "{rt}: {took:?}"
        );
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        assert_eq!(k.pid().await, pid, "{rt}: the same worker answers");
        assert_eq!(k.restarts().await, 0, "{rt}");
        k.stop().await;
    }
}

#[tokio::test]
async fn memory_and_output_limits_are_typed() {
    for rt in RUNTIMES {
        let k = kit(rt, "memory = \"32MiB\"\nmax_output = \"64KiB\"");
        assert_eq!(
            k.call("grow", b"").await,
            Err(CallError::MemoryLimit {
                limit_bytes: 32 << 20
            }),
            "{rt}"
        );
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        match k.call("big", b"100000").await {
            Err(CallError::OutputTooLarge { size, limit }) => {
                assert_eq!(limit, 64 << 10, "{rt}");
                assert!(size > limit, "{rt}: {size}");
            }
            other => panic!("{rt}: {other:?}"),
        }
        assert_eq!(k.restarts().await, 0, "{rt}");
        k.stop().await;
    }
}

#[tokio::test]
async fn concurrent_callers_each_get_their_own_answer() {
    for rt in RUNTIMES {
        let k = Arc::new(kit(rt, ""));
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..32u32 {
            let k = Arc::clone(&k);
            calls.spawn(async move {
                let input = format!("call {i} ").repeat(i as usize + 1).into_bytes();
                let out = k.call("echo", &input).await.unwrap();
                assert_eq!(out, input);
            });
        }
        while let Some(r) = calls.join_next().await {
            r.unwrap();
        }
        assert_eq!(k.count().await, 1, "{rt}: one instance served them all");
    }
}

#[tokio::test]
async fn a_call_waiting_behind_a_long_one_times_out_in_the_queue_and_no_worker_is_killed() {
    // A worker runs one call at a time. The deadline the worker is told, and the
    // supervisor's kill at deadline plus grace, count from when a call is sent to
    // it; a call waiting for its turn times out where it waits, unsent. (Counted
    // from queueing, the short call's backstop, 200 ms + 1 s of grace, would have
    // killed the worker while it was still within the long call's 1.5 s.)
    for rt in RUNTIMES {
        let k = kit(rt, "");
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        let pid = k.pid().await;
        let sup = k.sup.clone();
        let long = tokio::spawn(async move {
            let t = Instant::now();
            let r = sup
                .call("kit", "spin", Vec::new(), Some(Duration::from_millis(1500)))
                .await;
            (r, t.elapsed())
        });
        // The spin is running before the short call queues behind it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let short = k
            .sup
            .call("kit", "ok", Vec::new(), Some(Duration::from_millis(200)))
            .await;
        let waited = t.elapsed();
        assert_eq!(short, Err(CallError::Timeout { deadline_ms: 200 }), "{rt}");
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(1200),
            "{rt}: the queued call waited {waited:?}"
        );
        let (r, took) = long.await.unwrap();
        // The engine stopped the spin at its own deadline, counted from dispatch
        // (native code: the supervisor, at that deadline plus the grace).
        assert_eq!(r, Err(CallError::Timeout { deadline_ms: 1500 }), "{rt}");
        assert!(took >= Duration::from_millis(1500), "{rt}: {took:?}");
        if !engine_stops_it(rt) {
            assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
            assert_ne!(k.pid().await, pid, "{rt}: the spinning worker was killed");
            k.stop().await;
            continue;
        }
        let info = &k.sup.list().await[0];
        assert_eq!(info.pid, Some(pid), "{rt}: the worker was not replaced");
        assert_eq!(info.restarts, 0, "{rt}");
        assert!(
            !info
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("killed")),
            "{rt}: {info:?}"
        );
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        k.stop().await;
    }
}

#[tokio::test]
async fn instances_run_calls_in_parallel_and_one_killed_leaves_the_other_serving() {
    // Native code has no engine to end a spin at its deadline (it is killed, as
    // above); instances themselves are the supervisor's and the same for it.
    for rt in RUNTIMES.into_iter().filter(|rt| engine_stops_it(rt)) {
        let k = kit(rt, "instances = 2");
        assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        // Two calls that each run until their 400 ms deadline: in parallel on two
        // workers they end together; one worker would take 800 ms.
        let t = Instant::now();
        let spins: Vec<_> = (0..2)
            .map(|_| {
                let sup = k.sup.clone();
                tokio::spawn(async move {
                    sup.call("kit", "spin", Vec::new(), Some(Duration::from_millis(400)))
                        .await
                })
            })
            .collect();
        for s in spins {
            assert_eq!(
                s.await.unwrap(),
                Err(CallError::Timeout { deadline_ms: 400 }),
                "{rt}"
            );
        }
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(750),
            "{rt}: {took:?}, not in parallel"
        );
        let info = &k.sup.list().await[0];
        assert_eq!(
            (info.instances.len(), info.instances_allowed),
            (2, 2),
            "{rt}"
        );
        assert_eq!(info.restarts, 0, "{rt}: the engines stopped the spins");
        let (a, b) = (info.instances[0].pid, info.instances[1].pid);
        assert_ne!(a, b);
        // Each instance is a confined worker of its own.
        for pid in [a, b] {
            assert!(
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap()
                    .lines()
                    .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Seccomp:", "2"]),
                "{rt}: pid {pid} has no seccomp filter"
            );
        }
        // SAFETY: kill(2) of a worker this test's supervisor started, running.
        assert_eq!(unsafe { libc::kill(a as i32, libc::SIGKILL) }, 0);
        assert!(crate::support::wait_gone(a).await, "{rt}");
        // Once the supervisor has seen it go (a call sent in the instant its last
        // thread is exiting may still fail as crashed), the other serves alone.
        let t = Instant::now();
        loop {
            let info = &k.sup.list().await[0];
            let pids: Vec<u32> = info.instances.iter().map(|i| i.pid).collect();
            if pids == [b] {
                assert_eq!(info.state, "running", "{rt}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{rt}: {pids:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..5 {
            assert_eq!(k.call("ok", b"").await.unwrap(), b"ok", "{rt}");
        }
        assert_eq!(k.pid().await, b, "{rt}: served by the instance left");
        k.stop().await;
        assert!(crate::support::wait_gone(b).await, "{rt}");
    }
}
