//! How results, plugin lists and status are printed: plain text for people,
//! `--json` for programs. Every command's output goes through here.

use super::exit::{self, error_kind, exit_code_for};
use corral_protocol::{CallError, PluginInfo};
use std::io::Write;

pub(super) fn print_result(result: Result<Vec<u8>, CallError>, json: bool) -> anyhow::Result<u8> {
    let mut stdout = std::io::stdout().lock();
    match (result, json) {
        (Ok(out), false) => {
            stdout.write_all(&out)?;
            // Exact bytes into pipes and files; a final newline only for a terminal.
            use std::io::IsTerminal;
            if stdout.is_terminal() && !out.ends_with(b"\n") && !out.is_empty() {
                stdout.write_all(b"\n")?;
            }
            Ok(exit::OK)
        }
        (Ok(out), true) => {
            let v = match String::from_utf8(out) {
                Ok(s) => serde_json::json!({ "ok": true, "output": s }),
                Err(e) => serde_json::json!({ "ok": true, "output_hex": hex(e.as_bytes()) }),
            };
            writeln!(stdout, "{v}")?;
            Ok(exit::OK)
        }
        (Err(e), false) => {
            eprintln!("error: {e}");
            Ok(exit_code_for(&e))
        }
        (Err(e), true) => {
            let v = serde_json::json!({
                "ok": false,
                "error": { "kind": error_kind(&e), "message": e.to_string() },
            });
            writeln!(stdout, "{v}")?;
            Ok(exit_code_for(&e))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn print_plugins(plugins: &[PluginInfo], json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let v: Vec<_> = plugins
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "version": p.version, "runtime": p.runtime.as_str(),
                    "dir": p.dir, "level": p.level, "state": p.state, "pid": p.pid,
                    "restarts": p.restarts, "calls": p.calls, "last_error": p.last_error,
                    "exports": p.exports, "policy": p.policy, "requested": p.requested,
                    "resources": p.resources.as_ref().map(resources_json),
                    "instances": p.instances.iter().map(|i| serde_json::json!({
                        "pid": i.pid, "busy": i.busy, "resources": resources_json(&i.resources),
                    })).collect::<Vec<_>>(),
                    "instances_allowed": p.instances_allowed,
                    "enforcement": p.enforcement.as_ref().map(enforcement_json),
                    "supervision": p.supervision,
                    "reads": p.reads,
                })
            })
            .collect();
        writeln!(stdout, "{}", serde_json::Value::Array(v))?;
        return Ok(());
    }
    writeln!(
        stdout,
        "{:<20} {:<9} {:<7} {:<8} {:<8} {:>7} {:>8} {:>6}  LAST ERROR",
        "PLUGIN", "VERSION", "RUNTIME", "LEVEL", "STATE", "PID", "RESTARTS", "CALLS"
    )?;
    for p in plugins {
        writeln!(
            stdout,
            "{:<20} {:<9} {:<7} {:<8} {:<8} {:>7} {:>8} {:>6}  {}",
            p.id,
            p.version,
            p.runtime.as_str(),
            p.level,
            p.state,
            p.pid.map_or("-".to_owned(), |p| p.to_string()),
            p.restarts,
            p.calls,
            p.last_error.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

fn resources_line(r: &corral_protocol::ResourceStats) -> String {
    let mib = |b: Option<u64>| b.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let mut s = format!(
        "memory {} (peak {}, limit {}), cpu {}, pids {}/{}",
        mib(r.memory_current),
        mib(r.memory_peak),
        mib(r.memory_limit),
        r.cpu_usage_usec
            .map_or("?".into(), |u| format!("{:.3}s", u as f64 / 1e6)),
        r.pids_current.map_or("?".into(), |p| p.to_string()),
        r.pids_max.map_or("-".into(), |p| p.to_string()),
    );
    if let (Some(n), Some(t)) = (r.cpu_throttled_periods, r.cpu_throttled_usec) {
        s.push_str(&format!(", throttled {n} times ({:.3}s)", t as f64 / 1e6));
    }
    if r.oom_kills > 0 {
        s.push_str(&format!(", OOM kills {}", r.oom_kills));
    }
    s
}

fn resources_json(r: &corral_protocol::ResourceStats) -> serde_json::Value {
    serde_json::json!({
        "memory_current": r.memory_current, "memory_peak": r.memory_peak,
        "memory_limit": r.memory_limit, "cpu_usage_usec": r.cpu_usage_usec,
        "cpu_throttled_periods": r.cpu_throttled_periods,
        "cpu_throttled_usec": r.cpu_throttled_usec, "pids_current": r.pids_current,
        "pids_max": r.pids_max, "oom_kills": r.oom_kills,
    })
}

fn enforcement_json(r: &corral_protocol::EnforcementReport) -> serde_json::Value {
    use corral_protocol::Enforcement;
    let one = |e: &Enforcement| match e {
        Enforcement::Full(s) => serde_json::json!({"status": "full", "detail": s}),
        Enforcement::Partial(s) => serde_json::json!({"status": "partial", "detail": s}),
        Enforcement::None(s) => serde_json::json!({"status": "none", "detail": s}),
    };
    serde_json::json!({
        "cgroup": one(&r.cgroup), "landlock": one(&r.landlock), "seccomp": one(&r.seccomp),
        "namespaces": one(&r.namespaces), "no_new_privs": r.no_new_privs,
        "uid": r.uid, "gid": r.gid, "cap_effective": r.cap_effective,
        "cap_bounding": r.cap_bounding,
    })
}

/// The daemon's workers against its caps, and its own descriptors.
fn workers_line(w: &corral_protocol::WorkersStatus) -> String {
    let cap = w.max_workers.map_or_else(
        || "no max_workers".to_owned(),
        |m| format!("max_workers {m}"),
    );
    let idle = w.idle_timeout_ms.map_or_else(
        || "no idle_timeout".to_owned(),
        |ms| {
            format!(
                "idle_timeout {}",
                humantime::format_duration(std::time::Duration::from_millis(ms))
            )
        },
    );
    let open = w
        .open_files
        .map_or_else(|| "all".to_owned(), |n| n.to_string());
    format!(
        "{} live ({cap}, {idle}); {} stopped idle, {} stopped for room; {} Wasm modules \
         compiled; {} forked from {} zygote templates; supervisor files {open} open of {}",
        w.live,
        w.idle_stops,
        w.evictions,
        w.modules_compiled,
        w.workers_forked,
        w.templates_started,
        w.max_files
    )
}

pub(super) fn print_status(
    policy: &corral_protocol::PolicyStatus,
    plugins: &[PluginInfo],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "policy: {}", policy.sources.join(", "))?;
    writeln!(out, "workers: {}", workers_line(&policy.workers))?;
    if let Some(e) = &policy.reload_error {
        writeln!(
            out,
            "policy reload REJECTED (the last good policy stays in force):"
        )?;
        for line in e.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for e in &policy.plugin_errors {
        writeln!(
            out,
            "plugin REJECTED (a running version keeps serving; fix the files to retry):"
        )?;
        for line in e.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for p in plugins {
        writeln!(
            out,
            "{} {} ({}) {}{}, level {}, restarts {}, calls {}",
            p.id,
            p.version,
            p.runtime.as_str(),
            p.state,
            p.pid.map_or(String::new(), |pid| format!(" as pid {pid}")),
            p.level,
            p.restarts,
            p.calls,
        )?;
        writeln!(out, "  policy      {}", p.policy)?;
        match &p.enforcement {
            Some(r) => {
                writeln!(out, "  landlock    {}", r.landlock)?;
                writeln!(out, "  seccomp     {}", r.seccomp)?;
                writeln!(out, "  namespaces  {}", r.namespaces)?;
                writeln!(out, "  cgroup      {}", r.cgroup)?;
                let caps = |c: u64| {
                    if c == 0 {
                        "none".to_owned()
                    } else {
                        format!("{c:#x}")
                    }
                };
                writeln!(
                    out,
                    "  process     no_new_privs {}, uid {}, gid {}, capabilities {} (bounding set {})",
                    if r.no_new_privs { "on" } else { "off" },
                    r.uid,
                    r.gid,
                    caps(r.cap_effective),
                    caps(r.cap_bounding),
                )?;
            }
            None => writeln!(
                out,
                "  (no worker running: enforcement is reported at start)"
            )?,
        }
        for s in &p.supervision {
            writeln!(out, "  supervisor  {s}")?;
        }
        if p.instances.len() > 1 || p.instances_allowed > 1 {
            writeln!(
                out,
                "  instances   {} running of {} allowed",
                p.instances.len(),
                p.instances_allowed
            )?;
            for i in &p.instances {
                writeln!(
                    out,
                    "  instance    pid {} {}: {}",
                    i.pid,
                    if i.busy { "busy" } else { "idle" },
                    resources_line(&i.resources)
                )?;
            }
        } else if let Some(r) = &p.resources {
            writeln!(out, "  resources   {}", resources_line(r))?;
        }
        for r in &p.requested {
            writeln!(out, "  requested   {r}")?;
        }
        // The engine's own files in one line (every one of them in --json); what
        // the plugin's dependencies made readable, one line each.
        let (engine, dependencies): (Vec<&String>, Vec<&String>) =
            p.reads.iter().partition(|r| r.ends_with(" engine)"));
        if let Some((first, rest)) = engine.split_first() {
            let first = first
                .rsplit_once(" (")
                .map_or(first.as_str(), |(path, _)| path);
            let more = if rest.is_empty() {
                String::new()
            } else {
                format!(" and {} files beside it (--json lists them)", rest.len())
            };
            writeln!(
                out,
                "  reads       the {} engine: {first}{more}",
                p.runtime.as_str()
            )?;
        }
        for r in dependencies {
            writeln!(out, "  reads       {r}")?;
        }
        if let Some(e) = &p.last_error {
            writeln!(out, "  last error  {e}")?;
        }
    }
    Ok(())
}
