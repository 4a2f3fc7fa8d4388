//! A hostile worker flooding the supervisor at full speed, beside the quiet figures
//! of the same run: the supervisor's peak resident memory (VmHWM) and a neighbour
//! plugin's call latency (median, p99).
//!
//! Run with `cargo bench --workspace --bench flood` (`-- --quick` for a smoke run).
//! The supervisor runs in this process on a multi-thread runtime, as `corral serve`
//! does; both plugins run `corral-worker-hostile` (a real worker, confined at
//! `standard`), the attacker writing its own frames and output past the worker
//! library, the neighbour answering `ok`. Phases, each measured against the quiet
//! one:
//!
//! - log frames: 64 KiB `Log` frames (the largest allowed) without pause;
//! - empty log frames, 64 KiB of them to a write, from one attacker and then from
//!   two at once (as many as the runtime has threads): frames the supervisor
//!   reads from its buffer without I/O of its own;
//! - stdout and stderr: megabytes without a newline, not UTF-8, on both streams;
//! - violations: frames claiming 60 MiB, frames that do not decode, answers to
//!   calls that are not running: each gets the worker killed, audited and
//!   restarted.

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::bench::{Stats, stats};
use corral_integration_tests::{built, hostile_options, hostile_worker_dir, vm_hwm, wat_plugin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A flood: its name, the attacks (function, argument) made in turn, and how
/// many attackers make them at once.
type Phase = (&'static str, &'static [(&'static str, &'static str)], usize);

fn row(name: &str, s: &Stats, quiet: &Stats) {
    println!(
        "  {name:<40} p50 {:>8.1} us   p99 {:>8.1} us   ({} calls)  p50 {:.2}x, p99 {:.2}x quiet",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.n,
        s.p50.as_secs_f64() / quiet.p50.as_secs_f64(),
        s.p99.as_secs_f64() / quiet.p99.as_secs_f64(),
    );
}

/// Neighbour calls, one after another, until `stop` (or `count` calls).
async fn neighbour(sup: &Supervisor, stop: &AtomicBool, count: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && out.len() < count {
        let t = Instant::now();
        let r = sup.call("neighbour", "ok", Vec::new(), None).await;
        out.push(t.elapsed());
        assert_eq!(r.unwrap(), b"ok", "the neighbour must answer");
    }
    out
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (quiet_calls, phase) = if quick {
        (2_000, Duration::from_secs(3))
    } else {
        (20_000, Duration::from_secs(15))
    };
    built();
    let workers = hostile_worker_dir();
    let cache = corral_integration_tests::open_tempdir();
    let mut opts = hostile_options(cache.path(), workers.path(), Level::Standard);
    // Violations for as long as the phase lasts: each is a crash.
    opts.restart.max_crashes = u32::MAX;
    let attacker = wat_plugin("attacker", "testkit.wat", "max_output = \"1MiB\"");
    let second = wat_plugin("attacker-2", "testkit.wat", "max_output = \"1MiB\"");
    let neighbour_dir = wat_plugin("neighbour", "testkit.wat", "");
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(attacker.path()).unwrap();
    sup.add_plugin_dir(second.path()).unwrap();
    sup.add_plugin_dir(neighbour_dir.path()).unwrap();
    let sup = Arc::new(sup);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for attacker in ["attacker", "attacker-2"] {
            assert_eq!(
                sup.call(attacker, "ok", Vec::new(), None).await.unwrap(),
                b"ok"
            );
        }
        let never = AtomicBool::new(false);
        // Warm up, then the quiet figures.
        neighbour(&sup, &never, 200).await;
        let quiet = stats(neighbour(&sup, &never, quiet_calls).await);
        let hwm_quiet = vm_hwm();
        println!("flood: supervisor and two confined workers, multi-thread runtime");
        println!(
            "  {:<40} p50 {:>8.1} us   p99 {:>8.1} us   ({} calls)",
            "neighbour call, quiet",
            quiet.p50.as_secs_f64() * 1e6,
            quiet.p99.as_secs_f64() * 1e6,
            quiet.n
        );
        let phases: [Phase; 6] = [
            ("log frames (64 KiB each)", &[("log_flood", "16")], 1),
            (
                "empty log frames, 64 KiB to a write",
                &[("log_spin", "16")],
                1,
            ),
            (
                "empty log frames from two attackers at once",
                &[("log_spin", "16")],
                2,
            ),
            (
                "host calls, 4,096 at once, never read (kill, audit, restart)",
                &[("host_flood", "")],
                1,
            ),
            (
                "stdout + stderr, no newline, not UTF-8",
                &[("output_flood", "16")],
                1,
            ),
            (
                "violations (kill, audit, restart)",
                &[
                    ("huge_frame", ""),
                    ("garbage_frame", ""),
                    ("forge_answer", ""),
                ],
                1,
            ),
        ];
        for (name, attacks, attackers) in phases {
            let stop = Arc::new(AtomicBool::new(false));
            let sent = Arc::new(AtomicU64::new(0));
            let answered = Arc::new(AtomicU64::new(0));
            let floods: Vec<_> = ["attacker", "attacker-2"][..attackers]
                .iter()
                .map(|plugin| {
                    let (sup, stop, sent) =
                        (Arc::clone(&sup), Arc::clone(&stop), Arc::clone(&sent));
                    let answered = Arc::clone(&answered);
                    let attacks: Vec<(String, String)> = attacks
                        .iter()
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .collect();
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            for (attack, arg) in &attacks {
                                let r = sup
                                    .call(plugin, attack, arg.as_bytes().to_vec(), None)
                                    .await;
                                sent.fetch_add(1, Ordering::Relaxed);
                                if r.as_deref() == Ok(b"ok") {
                                    answered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                })
                .collect();
            let stopper = {
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    tokio::time::sleep(phase).await;
                    stop.store(true, Ordering::Relaxed);
                })
            };
            let during = stats(neighbour(&sup, &stop, usize::MAX).await);
            stopper.await.unwrap();
            for flood in floods {
                flood.await.unwrap();
            }
            row(&format!("neighbour call, {name}"), &during, &quiet);
            println!(
                "  {:<40} {} attacker calls in {:?} ({} answered \"ok\")",
                "",
                sent.load(Ordering::Relaxed),
                phase,
                answered.load(Ordering::Relaxed)
            );
        }
        let hwm = vm_hwm();
        println!(
            "  {:<40} {:>6.1} MiB quiet, {:>6.1} MiB after every flood (+{:.1} MiB)",
            "supervisor peak memory (VmHWM)",
            hwm_quiet as f64 / (1 << 20) as f64,
            hwm as f64 / (1 << 20) as f64,
            hwm.saturating_sub(hwm_quiet) as f64 / (1 << 20) as f64
        );
        let restarts = sup
            .list()
            .await
            .into_iter()
            .find(|p| p.id == "attacker")
            .unwrap()
            .restarts;
        println!("  {:<40} {restarts}", "attacker restarts (violations)");
        sup.shutdown(Duration::from_secs(2)).await;
    });
}
