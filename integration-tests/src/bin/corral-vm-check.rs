//! Real cgroup v2 enforcement, checked from inside a throwaway VM (`.ci/vm-cgroup-v2.sh`
//! boots it; this binary is the only program its init runs). The development hosts are
//! hybrid (memory, cpu and pids are v1 controllers), so the e2e suite proves the v1
//! path and this proves the v2 one: cgroup2 mounted at `/sys/fs/cgroup` with
//! `+cpu +memory +pids` in the root's `cgroup.subtree_control`.
//!
//! Usage: `corral-vm-check WORKER_DIR` (the directory holding `corral-worker-wasm` and
//! `corral-worker-hostile`). Each check prints `PASS <name>: <detail>` or
//! `FAIL <name>: <detail>` on stdout; progress goes to stderr. Exit status 0 only if
//! every check passed.
//!
//! Two supervisors run one after the other, as the e2e tests run them: one with the
//! Wasm worker and the `testkit.wat` fixture (group files, CPU quota), one with the
//! hostile native worker in its place (memory and pids bombs).

use corral::{Options, Policy, Supervisor};
use corral_protocol::{CallError, Enforcement, ExitReason, PluginInfo};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The fixture every plugin here loads (the hostile worker only reads it).
const TESTKIT: &str = include_str!("../../fixtures/testkit.wat");

/// The page size of the VM (x86-64).
const PAGE_SIZE: u64 = 4096;

/// Where the checks expect the unified hierarchy.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The spinner gets a fifth of a CPU and a deadline long enough for its load (the
/// module compiles under an emulated CPU, TCG, at a fifth of it: the load runs under
/// the plugin's deadline); its spin asks for 1 s per call. The attacker gets a whole
/// CPU and a deadline long enough for TCG, because the bombs must meet the cgroup,
/// not the deadline.
const POLICY: &str = r#"
[[route]]
name = "spinner"
id = "spinner"
level = "standard"
limits = { cpu = 0.2, timeout = "600s", memory = "64MiB", pids = 16 }

[[route]]
name = "everything else"
level = "standard"
limits = { cpu = 1, timeout = "120s", memory = "64MiB", pids = 16 }
"#;

type Check = Result<String, String>;

/// Every check, in the order they run; one that could not run fails.
const CHECKS: [&str; 7] = [
    "cgroup2-mounted",
    "cgroup-v2-group",
    "delegated-subtree",
    "cpu-max-throttles",
    "pids-max-stops-forks",
    "memory-max-oom-kill",
    "groups-removed",
];

/// Collects and prints outcomes.
#[derive(Debug, Default)]
struct Report {
    done: Vec<&'static str>,
    failed: usize,
}

impl Report {
    fn record(&mut self, name: &'static str, outcome: Check) {
        self.done.push(name);
        match outcome {
            Ok(detail) => println!("PASS {name}: {detail}"),
            Err(detail) => {
                self.failed += 1;
                println!("FAIL {name}: {detail}");
            }
        }
    }

    /// Fail those of `names` that never ran, with the reason.
    fn not_run(&mut self, names: &[&'static str], why: &str) {
        for &name in names {
            if !self.done.contains(&name) {
                self.record(name, Err(format!("not run: {why}")));
            }
        }
    }
}

fn progress(what: &str) {
    eprintln!("corral-vm-check: {what}");
}

fn policy() -> Arc<Policy> {
    let policy = Policy::parse(&[(PathBuf::from("vm.toml"), POLICY.to_owned())])
        .unwrap_or_else(|e| panic!("the built-in check policy is invalid: {e:?}"));
    Arc::new(policy)
}

fn options(worker_dir: &Path) -> Options {
    let mut o = Options::new();
    o.worker_dir = worker_dir.to_owned();
    o.cache_dir = None;
    o.cgroups = Some(corral_confine::cgroup::CgroupHost::default());
    o.policy = policy();
    // TCG is one to two orders of magnitude slower than the host, and the debug Wasm
    // worker compiles its module before the handshake. The policy's deadlines apply
    // to plugin calls only; the engine, not this grace, must stop the spin.
    o.handshake_timeout = Duration::from_secs(120);
    o.kill_grace = Duration::from_secs(30);
    o.restart.max_crashes = 100;
    o
}

/// A plugin directory (0755: workers run as `nobody`) with `testkit.wat` as entry.
fn plugin(id: &str) -> Result<TempDir, String> {
    let dir = corral_integration_tests::open_tempdir();
    std::fs::write(dir.path().join("testkit.wat"), TESTKIT)
        .map_err(|e| format!("write testkit.wat: {e}"))?;
    std::fs::write(
        dir.path().join("plugin.toml"),
        format!(
            "id = \"{id}\"\nversion = \"1.0.0\"\nruntime = \"wasm\"\nentry = \"testkit.wat\"\n"
        ),
    )
    .map_err(|e| format!("write plugin.toml: {e}"))?;
    Ok(dir)
}

/// This process's group in the unified hierarchy (`0::/path`).
fn unified_group(pid: &str) -> Result<PathBuf, String> {
    let file = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| format!("{file} has no unified (0::) line: {text:?}"))?;
    Ok(Path::new(CGROUP_ROOT).join(path.trim_start_matches('/')))
}

/// The supervisor's base group: `corral-<pid>` below its own group (read before the
/// supervisor starts: in a delegated subtree it moves itself into a leaf).
fn base_group() -> Result<PathBuf, String> {
    Ok(unified_group("self")?.join(format!("{}{}", corral::CGROUP_PREFIX, std::process::id())))
}

fn read_trimmed(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn info<'a>(list: &'a [PluginInfo], id: &str) -> Result<&'a PluginInfo, String> {
    list.iter()
        .find(|p| p.id == id)
        .ok_or_else(|| format!("{id} missing from the supervisor's list"))
}

/// The environment the VM's init promises.
fn precondition() -> Check {
    let root = Path::new(CGROUP_ROOT);
    let controllers = read_trimmed(&root.join("cgroup.controllers"))?;
    let subtree = read_trimmed(&root.join("cgroup.subtree_control"))?;
    for c in ["cpu", "memory", "pids"] {
        if !subtree.split_whitespace().any(|x| x == c) {
            return Err(format!(
                "{c} not enabled in {CGROUP_ROOT}/cgroup.subtree_control ({subtree:?}; \
                 available: {controllers:?})"
            ));
        }
    }
    Ok(format!(
        "cgroup2 at {CGROUP_ROOT}, controllers {controllers:?}, subtree_control {subtree:?}"
    ))
}

/// (a) The worker's group is a v2 group below `base` with every limit the policy
/// sets.
async fn group_files(sup: &Supervisor, base: &Path) -> Check {
    let list = sup.list().await;
    let p = info(&list, "spinner")?;
    let report = p.enforcement.as_ref().ok_or("no enforcement report")?;
    let summary = match &report.cgroup {
        Enforcement::Full(s) if s.starts_with("cgroup v2") => s.clone(),
        other => return Err(format!("cgroup enforcement: {other}")),
    };
    let pid = p.pid.ok_or("no worker pid")?;
    let dir = unified_group(&pid.to_string())?;
    if dir.parent() != Some(base) {
        return Err(format!(
            "worker {pid} sits in {}, not below {}",
            dir.display(),
            base.display()
        ));
    }
    let e = sup.explain("spinner").ok_or("no effective policy")?;
    let mem = e.worker_memory.value;
    // The kernel keeps memory limits in pages and shows them rounded down.
    let pages = |bytes: u64| (bytes / PAGE_SIZE * PAGE_SIZE).to_string();
    let quota = ((e.cpu.value * 100_000.0).round() as u64).max(1_000);
    let expected = [
        ("memory.max", pages(mem)),
        ("memory.high", pages(mem)),
        ("memory.swap.max", "0".to_owned()),
        ("memory.oom.group", "1".to_owned()),
        ("cpu.max", format!("{quota} 100000")),
        ("pids.max", e.pids.value.to_string()),
    ];
    let mut seen = Vec::new();
    let mut wrong = Vec::new();
    for (file, want) in &expected {
        let got = read_trimmed(&dir.join(file))?;
        if &got != want {
            wrong.push(format!("{file} = {got:?}, expected {want:?}"));
        }
        seen.push(format!("{file}={got}"));
    }
    if !wrong.is_empty() {
        return Err(format!("{}: {}", dir.display(), wrong.join("; ")));
    }
    Ok(format!(
        "worker {pid} in {}: {}; reported {summary:?}",
        dir.display(),
        seen.join(" ")
    ))
}

/// (c) A spinning Wasm call is throttled by `cpu.max` and stopped by the engine at
/// its deadline; the same worker answers afterwards.
async fn cpu_throttle(sup: &Supervisor) -> Check {
    let stats = |list: &[PluginInfo]| -> Result<(u64, u64, Option<u32>), String> {
        let p = info(list, "spinner")?;
        let r = p.resources.as_ref().ok_or("no resource stats")?;
        Ok((
            r.cpu_usage_usec.ok_or("no cpu usage_usec")?,
            r.cpu_throttled_periods.ok_or("no nr_throttled")?,
            p.pid,
        ))
    };
    let (cpu0, thr0, pid0) = stats(&sup.list().await)?;
    let started = Instant::now();
    let outcome = sup
        .call("spinner", "spin", vec![], Some(Duration::from_secs(1)))
        .await;
    let wall = started.elapsed();
    let (cpu1, thr1, pid1) = stats(&sup.list().await)?;
    let cpu = cpu1.saturating_sub(cpu0);
    let throttled = thr1.saturating_sub(thr0);
    let wall_us = wall.as_micros() as u64;
    let measured = format!(
        "spin used {} ms of CPU in {} ms wall, {throttled} throttled periods",
        cpu / 1000,
        wall_us / 1000
    );
    match outcome {
        Err(CallError::Timeout { deadline_ms: 1000 }) => {}
        other => {
            return Err(format!(
                "expected a 1 s Timeout, got {other:?} ({measured})"
            ));
        }
    }
    if wall < Duration::from_secs(1) {
        return Err(format!("returned before the deadline ({measured})"));
    }
    // A fifth of a CPU: about 200 ms per second. Unthrottled it would be all of it.
    if cpu * 100 > wall_us * 45 {
        return Err(format!("not throttled: {measured}"));
    }
    if throttled == 0 {
        return Err(format!("cpu.stat nr_throttled did not move: {measured}"));
    }
    if pid1 != pid0 {
        return Err(format!(
            "the worker was replaced ({pid0:?} -> {pid1:?}): the supervisor killed it, \
             the engine did not stop the spin ({measured})"
        ));
    }
    let again = sup.call("spinner", "ok", vec![], None).await;
    if again.as_deref() != Ok(b"ok".as_slice()) {
        return Err(format!(
            "the worker did not answer after the spin: {again:?}"
        ));
    }
    Ok(format!(
        "Timeout at 1000 ms; {measured}; same worker answers after"
    ))
}

/// Calls the hostile worker's `attack`.
async fn attack(sup: &Supervisor, what: &str, arg: &str) -> Result<String, CallError> {
    sup.call("attacker", what, arg.as_bytes().to_vec(), None)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// (d) `pids.max` stops a fork bomb.
async fn fork_bomb(sup: &Supervisor) -> Check {
    let pids = sup
        .explain("attacker")
        .ok_or("no effective policy")?
        .pids
        .value;
    let out = attack(sup, "fork_bomb", "")
        .await
        .map_err(|e| format!("fork_bomb call failed: {e:?}"))?;
    let n: u64 = out
        .strip_prefix("EAGAIN after ")
        .and_then(|r| r.strip_suffix(" forks"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("not stopped by EAGAIN: {out:?}"))?;
    if n == 0 || n >= pids {
        return Err(format!("{out:?}: expected 0 < forks < pids.max {pids}"));
    }
    Ok(format!("{out:?} with pids.max {pids}"))
}

/// (b) A memory bomb is OOM-killed at the group's limit and reported as such (the
/// supervisor reads `oom_kill` from `memory.events`).
async fn memory_bomb(sup: &Supervisor) -> Check {
    let limit = sup
        .explain("attacker")
        .ok_or("no effective policy")?
        .worker_memory
        .value;
    let mib = (limit >> 20) * 2;
    let started = Instant::now();
    let outcome = attack(sup, "alloc", &mib.to_string()).await;
    let took = started.elapsed();
    let expected = Err(CallError::WorkerCrashed(ExitReason::OomKilled {
        limit_bytes: limit,
    }));
    if outcome != expected {
        return Err(format!(
            "alloc {mib} MiB: got {outcome:?}, expected {expected:?} (after {took:?})"
        ));
    }
    let list = sup.list().await;
    let last = info(&list, "attacker")?
        .last_error
        .clone()
        .unwrap_or_default();
    Ok(format!(
        "alloc {mib} MiB -> OomKilled {{ limit_bytes: {limit} }} after {} ms; last_error {last:?}",
        took.as_millis()
    ))
}

/// Shut `sup` down and say whether the base group went with it.
async fn shutdown(sup: Supervisor, base: &Path) -> Result<(), String> {
    sup.shutdown(Duration::from_secs(5)).await;
    drop(sup);
    if base.exists() {
        let left: Vec<String> = std::fs::read_dir(base)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        return Err(format!(
            "{} still exists after shutdown (groups left: {left:?})",
            base.display()
        ));
    }
    Ok(())
}

/// The Wasm worker: checks a and c.
async fn wasm_checks(worker_dir: &Path, report: &mut Report, base: &Path) -> Check {
    let spinner = plugin("spinner")?;
    let mut sup = Supervisor::new(options(worker_dir));
    sup.add_plugin_dir(spinner.path())
        .map_err(|e| format!("add spinner: {e}"))?;
    progress("starting the Wasm worker (compiles under TCG; may take a while)");
    let started = Instant::now();
    let first = sup.call("spinner", "ok", vec![], None).await;
    match &first {
        Ok(out) if out == b"ok" => {
            progress(&format!("Wasm worker ready in {:?}", started.elapsed()));
            report.record("cgroup-v2-group", group_files(&sup, base).await);
            report.record("delegated-subtree", delegation(base));
            progress("spinning under cpu.max");
            report.record("cpu-max-throttles", cpu_throttle(&sup).await);
        }
        other => {
            let why = format!("the Wasm worker did not answer `ok`: {other:?}");
            report.record("cgroup-v2-group", Err(why.clone()));
            report.record("delegated-subtree", Err(why.clone()));
            report.record("cpu-max-throttles", Err(why));
        }
    }
    shut_down_and_removed(sup, base, "Wasm").await
}

/// Shut `sup` down and say whether its base group existed and went with it.
async fn shut_down_and_removed(sup: Supervisor, base: &Path, who: &str) -> Check {
    if !base.exists() {
        return Err(format!(
            "{} did not exist while the worker ran",
            base.display()
        ));
    }
    shutdown(sup, base).await?;
    Ok(format!(
        "{} removed after the {who} supervisor's shutdown",
        base.display()
    ))
}

/// The VM's init put this process in a group of its own that holds it (as systemd's
/// `Delegate=yes` does): the supervisor must have moved itself into the leaf
/// `<own>/corral-supervisor` and offered memory, cpu and pids to its children.
fn delegation(base: &Path) -> Check {
    let own = base.parent().ok_or("the base group has no parent")?;
    if own == Path::new(CGROUP_ROOT) {
        return Err("the checks run in the root group: the VM's init did not delegate".into());
    }
    let now = unified_group("self")?;
    if now != own.join(corral_confine::cgroup::SUPERVISOR_LEAF) {
        return Err(format!(
            "the supervisor is in {}, not in the leaf {}",
            now.display(),
            own.join(corral_confine::cgroup::SUPERVISOR_LEAF).display()
        ));
    }
    let subtree = read_trimmed(&own.join("cgroup.subtree_control"))?;
    for c in ["cpu", "memory", "pids"] {
        if !subtree.split_whitespace().any(|x| x == c) {
            return Err(format!(
                "{c} not offered by {} ({subtree:?})",
                own.display()
            ));
        }
    }
    Ok(format!(
        "supervisor moved into {}; {} offers {subtree:?} to the worker groups",
        now.display(),
        own.display()
    ))
}

/// The hostile worker in place of the Wasm one: checks d and b.
async fn hostile_checks(worker_dir: &Path, report: &mut Report, base: &Path) -> Check {
    let workers = corral_integration_tests::open_tempdir();
    std::os::unix::fs::symlink(
        worker_dir.join("corral-worker-hostile"),
        workers.path().join("corral-worker-wasm"),
    )
    .map_err(|e| format!("symlink the hostile worker: {e}"))?;
    let attacker = plugin("attacker")?;
    let mut sup = Supervisor::new(options(workers.path()));
    sup.add_plugin_dir(attacker.path())
        .map_err(|e| format!("add attacker: {e}"))?;
    progress("starting the hostile worker");
    match attack(&sup, "ok", "").await {
        Ok(out) if out == "ok" => {
            progress("fork bomb");
            report.record("pids-max-stops-forks", fork_bomb(&sup).await);
            progress("memory bomb");
            report.record("memory-max-oom-kill", memory_bomb(&sup).await);
        }
        other => {
            let why = format!("the hostile worker did not answer `ok`: {other:?}");
            report.record("pids-max-stops-forks", Err(why.clone()));
            report.record("memory-max-oom-kill", Err(why));
        }
    }
    shut_down_and_removed(sup, base, "hostile").await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let Some(worker_dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: corral-vm-check WORKER_DIR");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    let mut report = Report::default();
    let pre = precondition().and_then(|detail| Ok((detail, base_group()?)));
    match pre {
        Ok((detail, base)) => {
            report.record("cgroup2-mounted", Ok(detail));
            let wasm = wasm_checks(&worker_dir, &mut report, &base).await;
            report.not_run(
                &CHECKS[1..4],
                &format!("the Wasm supervisor failed: {wasm:?}"),
            );
            let hostile = hostile_checks(&worker_dir, &mut report, &base).await;
            report.not_run(
                &CHECKS[4..6],
                &format!("the hostile supervisor failed: {hostile:?}"),
            );
            let cleanup = match (wasm, hostile) {
                (Ok(a), Ok(b)) => Ok(format!("{a}; {b}")),
                (a, b) => Err(format!(
                    "Wasm supervisor: {}; hostile supervisor: {}",
                    a.unwrap_or_else(|e| e),
                    b.unwrap_or_else(|e| e)
                )),
            };
            report.record("groups-removed", cleanup);
        }
        Err(e) => {
            report.record("cgroup2-mounted", Err(e));
            report.not_run(&CHECKS, "no usable cgroup2 hierarchy");
        }
    }
    progress(&format!(
        "{} of {} checks failed, {:.1} s",
        report.failed,
        report.done.len(),
        started.elapsed().as_secs_f64()
    ));
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
