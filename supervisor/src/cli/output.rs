//! How results, plugin lists and status are printed: plain text for people,
//! `--json` for programs. Every command's output goes through here.

use corral_protocol::PluginInfo;
use std::io::Write;

/// `corral status --json`: the daemon's state and every plugin's (docs/json.md).
pub(super) fn print_status_json(
    policy: &corral_protocol::PolicyStatus,
    plugins: &[PluginInfo],
) -> anyhow::Result<()> {
    let w = &policy.workers;
    let v = serde_json::json!({
        "daemon": {
            "policy_sources": policy.sources,
            "policy_error": policy.reload_error,
            "config_error": policy.config_error,
            "config_pending": policy.config_pending,
            "plugin_errors": policy.plugin_errors,
            "workers": {
                "live": w.live, "max_workers": w.max_workers,
                "idle_timeout_ms": w.idle_timeout_ms, "idle_stops": w.idle_stops,
                "evictions": w.evictions, "open_files": w.open_files,
                "max_files": w.max_files, "modules_compiled": w.modules_compiled,
                "templates_started": w.templates_started, "workers_forked": w.workers_forked,
            },
        },
        "plugins": plugins_json(plugins),
    });
    writeln!(std::io::stdout().lock(), "{v}")?;
    Ok(())
}

pub(crate) fn plugins_json(plugins: &[PluginInfo]) -> serde_json::Value {
    serde_json::Value::Array(
        plugins
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
                    "queued": p.queued,
                })
            })
            .collect(),
    )
}

pub(super) fn print_plugins(plugins: &[PluginInfo], json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        writeln!(stdout, "{}", plugins_json(plugins))?;
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
        "{} live ({cap}, {idle}); {} stopped idle, {} stopped for room; {} modules \
         compiled (Wasm, JavaScript); {} forked from {} zygote templates; supervisor files {open} open of {}",
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
    if let Some(e) = &policy.config_error {
        writeln!(
            out,
            "configuration reload REJECTED (the running configuration stays in force):"
        )?;
        for line in e.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for c in &policy.config_pending {
        writeln!(out, "configuration: {c}")?;
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

/// Print one JSON document on standard output.
pub(super) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    writeln!(std::io::stdout().lock(), "{v}")?;
    Ok(())
}

/// A setting and where it came from.
fn setting<T: serde::Serialize>(s: &corral_policy::Setting<T>) -> serde_json::Value {
    serde_json::json!({ "value": s.value, "origin": s.origin.to_string() })
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

/// `corral policy explain --json`: every value of a plugin's effective policy with
/// its origin (sizes in bytes, durations in milliseconds), its grants, what it asks
/// for and how that was judged (docs/json.md).
pub(crate) fn effective_json(e: &corral_policy::Effective) -> serde_json::Value {
    let with_ms = |s: &corral_policy::Setting<std::time::Duration>| serde_json::json!({ "value": ms(s.value), "origin": s.origin.to_string() });
    let sv = &e.services;
    let names = |v: &[corral_policy::NameGlob]| -> Vec<String> {
        v.iter().map(|g| g.pattern.clone()).collect()
    };
    serde_json::json!({
        "plugin": e.plugin,
        "route": e.route,
        "level": { "value": e.level.value.as_str(), "origin": e.level.origin.to_string() },
        "memory": setting(&e.memory),
        "worker_memory": setting(&e.worker_memory),
        "cpu": setting(&e.cpu),
        "pids": setting(&e.pids),
        "timeout_ms": with_ms(&e.timeout),
        "timeout_cap_ms": ms(e.timeout_cap),
        "max_output": setting(&e.max_output),
        "user": { "value": e.user.value.to_string(), "origin": e.user.origin.to_string() },
        "tmpfs": setting(&e.tmpfs),
        "init_timeout_ms": with_ms(&e.init_timeout),
        "log_rate": setting(&e.log_rate),
        "audit_rate": setting(&e.audit_rate),
        "host_calls": setting(&e.host_calls),
        "instances": setting(&e.instances),
        "kv_quota": setting(&sv.kv_quota),
        "fetch_max_response": setting(&sv.fetch_max_response),
        "fetch_timeout_ms": with_ms(&sv.fetch_timeout),
        "grants": sv.grants.iter().map(|g| serde_json::json!({
            "name": g.name,
            "origin": g.origin.to_string(),
            "fetch": g.fetch.iter().map(|r| r.text.clone()).collect::<Vec<_>>(),
            "publish": names(&g.publish),
            "subscribe": names(&g.subscribe),
            "call": g.call.iter().map(|(p, f)| match f {
                Some(f) => format!("{}:{}", p.pattern, f.pattern),
                None => p.pattern.clone(),
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "requested": e.requested.iter().map(|r| match &r.decision {
            Ok(by) => serde_json::json!({ "what": r.what, "granted": true, "by": by }),
            Err(why) => serde_json::json!({ "what": r.what, "granted": false, "why": why }),
        }).collect::<Vec<_>>(),
        "clamped": e.clamped,
    })
}

/// `corral policy check --json` of a valid policy: its files, each level's limits
/// and the routes (docs/json.md).
pub(super) fn policy_json(policy: &corral_policy::Policy, built_in: bool) -> serde_json::Value {
    let levels: serde_json::Map<String, serde_json::Value> = corral_policy::LEVELS
        .iter()
        .map(|&level| {
            let l = policy.level_limits(level);
            let opt = |s: &Option<corral_policy::Setting<u64>>| s.as_ref().map(setting);
            (
                level.as_str().to_owned(),
                serde_json::json!({
                    "memory": opt(&l.memory),
                    "worker_memory": opt(&l.worker_memory),
                    "cpu": l.cpu.as_ref().map(setting),
                    "pids": opt(&l.pids),
                    "timeout_ms": l.timeout.as_ref().map(|t| serde_json::json!({
                        "value": ms(t.value), "origin": t.origin.to_string(),
                    })),
                    "max_output": opt(&l.max_output),
                    "user": l.user.as_ref().map(|u| serde_json::json!({
                        "value": u.value.to_string(), "origin": u.origin.to_string(),
                    })),
                }),
            )
        })
        .collect();
    serde_json::json!({
        "ok": true,
        "sources": policy.sources.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "built_in": built_in,
        "levels": levels,
        "routes": policy.routes.iter().map(|r| serde_json::json!({
            "name": r.name, "level": r.level.as_str(), "origin": r.origin.to_string(),
        })).collect::<Vec<_>>(),
        "unmatched": "maximum",
    })
}

/// `corral policy check --json` of an invalid policy: every error with its place.
pub(super) fn policy_errors_json(e: &corral_policy::PolicyErrors) -> serde_json::Value {
    serde_json::json!({
        "ok": false,
        "errors": e.0.iter().map(|e| serde_json::json!({
            "file": e.path.display().to_string(),
            "line": e.line,
            "column": e.column,
            "message": e.message,
        })).collect::<Vec<_>>(),
    })
}
