//! The daemon's metrics, in the Prometheus exposition formats (`metrics =
//! "127.0.0.1:9464"` in `corral.toml` serves them; see [`crate::daemon::metrics`]).
//!
//! Two kinds:
//!
//! - **Events**, counted where they happen and kept for the daemon's life: calls
//!   (by plugin and outcome, with their duration), host calls (by operation and
//!   decision), audit events, worker starts, restarts and crashes, policy and
//!   configuration reloads. [`Metrics`] holds them.
//! - **State**, read at each scrape from what `corral status` shows: each plugin's
//!   workers, queue, memory, CPU and pids (from its workers' cgroups), and the
//!   supervisor's own workers, descriptors, memory and uptime ([`Snapshot`]).
//!
//! Every label value comes from the operator's side (plugin ids the daemon loaded,
//! the fixed names of runtimes, levels, operations, outcomes and exit reasons),
//! never from what a caller or a worker sends: a call to a plugin that does not
//! exist is counted with an empty `plugin`, so no client can grow the series.

use corral_protocol::{PluginInfo, Runtime, WorkersStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

/// The labels of a plugin's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PluginLabels {
    pub plugin: String,
    pub runtime: String,
    pub level: String,
}

impl PluginLabels {
    pub(crate) fn new(plugin: &str, runtime: Runtime, level: corral_confine::Level) -> Self {
        PluginLabels {
            plugin: plugin.to_owned(),
            runtime: runtime.as_str().to_owned(),
            level: level.to_string(),
        }
    }

    fn of(info: &PluginInfo) -> Self {
        PluginLabels {
            plugin: info.id.clone(),
            runtime: info.runtime.as_str().to_owned(),
            level: info.level.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    #[prometheus(flatten)]
    plugin: PluginLabels,
    /// `ok`, or the error's kind ([`corral_protocol::CallError::kind`]).
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabels {
    plugin: String,
    operation: &'static str,
    /// `ok`, or the error's kind (`denied`, `quota`, `failed`, ...).
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    plugin: String,
    operation: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartLabels {
    #[prometheus(flatten)]
    plugin: PluginLabels,
    /// `ok`, `failed` (counted as a crash), `overloaded` (the supervisor's limit).
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CrashLabels {
    #[prometheus(flatten)]
    plugin: PluginLabels,
    /// [`corral_protocol::ExitReason::kind`], or `deadline` (killed at its call's
    /// deadline plus grace) or `supervisor` (killed for another reason it gives).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `applied` or `rejected`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    #[prometheus(flatten)]
    plugin: PluginLabels,
    state: String,
}

type Seconds = Histogram;

fn call_buckets() -> Histogram {
    // 25 us to about 52 s, doubling: a warm call, a cold start, a deadline.
    Histogram::new(exponential_buckets(25e-6, 2.0, 22))
}

/// The events counted for the daemon's life.
#[derive(Debug)]
pub(crate) struct Metrics {
    started: Instant,
    started_at: SystemTime,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<PluginLabels, Seconds, fn() -> Histogram>,
    host_calls: Family<HostLabels, Counter>,
    audit_events: Family<AuditLabels, Counter>,
    worker_starts: Family<StartLabels, Counter>,
    worker_restarts: Family<PluginLabels, Counter>,
    worker_crashes: Family<CrashLabels, Counter>,
    policy_reloads: Family<ResultLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            started_at: SystemTime::now(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_buckets),
            host_calls: Family::default(),
            audit_events: Family::default(),
            worker_starts: Family::default(),
            worker_restarts: Family::default(),
            worker_crashes: Family::default(),
            policy_reloads: Family::default(),
            config_reloads: Family::default(),
        }
    }
}

/// What a scrape reads of the supervisor's state.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub plugins: Vec<PluginInfo>,
    pub workers: WorkersStatus,
    /// Why the last policy edit, and the last configuration reload, were rejected.
    pub policy_rejected: bool,
    pub config_rejected: bool,
}

/// The supervisor's own resident memory and its peak (`/proc/self/status`).
fn own_memory() -> (Option<u64>, Option<u64>) {
    let status = crate::plugins::access::read_proc(std::path::Path::new("/proc/self/status"))
        .unwrap_or_default();
    let kib = |key: &str| {
        status.lines().find_map(|l| {
            let v = l.strip_prefix(key)?.trim().strip_suffix("kB")?;
            v.trim().parse::<u64>().ok().map(|k| k * 1024)
        })
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn gauge<L>() -> Family<L, Gauge<f64, AtomicU64>>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    Family::default()
}

fn counter<L>() -> Family<L, Counter<f64, AtomicU64>>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    Family::default()
}

fn single() -> Gauge<f64, AtomicU64> {
    Gauge::default()
}

impl Metrics {
    /// A call to a loaded plugin ended with `outcome` after `elapsed`.
    pub(crate) fn call(&self, labels: PluginLabels, outcome: &'static str, elapsed: Duration) {
        self.call_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.calls
            .get_or_create(&CallLabels {
                plugin: labels,
                outcome,
            })
            .inc();
    }

    /// A call named a plugin the daemon does not have (no plugin label: the name
    /// is the caller's).
    pub(crate) fn unknown_plugin(&self) {
        self.calls
            .get_or_create(&CallLabels {
                plugin: PluginLabels {
                    plugin: String::new(),
                    runtime: String::new(),
                    level: String::new(),
                },
                outcome: "unknown_plugin",
            })
            .inc();
    }

    pub(crate) fn host_call(&self, plugin: &str, operation: &'static str, decision: &'static str) {
        self.host_calls
            .get_or_create(&HostLabels {
                plugin: plugin.to_owned(),
                operation,
                decision,
            })
            .inc();
    }

    /// An audit event, written or held back by its plugin's budget alike.
    pub(crate) fn audit(&self, plugin: &str, operation: &str, decision: &str) {
        self.audit_events
            .get_or_create(&AuditLabels {
                plugin: plugin.to_owned(),
                operation: operation.to_owned(),
                decision: decision.to_owned(),
            })
            .inc();
    }

    pub(crate) fn worker_start(&self, plugin: PluginLabels, result: &'static str) {
        self.worker_starts
            .get_or_create(&StartLabels { plugin, result })
            .inc();
    }

    pub(crate) fn worker_restart(&self, plugin: PluginLabels) {
        self.worker_restarts.get_or_create(&plugin).inc();
    }

    pub(crate) fn worker_crash(&self, plugin: PluginLabels, reason: &'static str) {
        self.worker_crashes
            .get_or_create(&CrashLabels { plugin, reason })
            .inc();
    }

    pub(crate) fn policy_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub(crate) fn config_reload(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Every metric, the counted ones and the state of `now`, in the Prometheus
    /// text format (0.0.4), or OpenMetrics when `openmetrics`.
    pub(crate) fn encode(&self, now: &Snapshot, openmetrics: bool) -> String {
        let mut r = Registry::with_prefix("corral");
        r.register(
            "calls",
            "Calls answered, by plugin and outcome (ok, or the error's kind)",
            self.calls.clone(),
        );
        r.register(
            "call_duration_seconds",
            "How long calls took, from admission to answer, by plugin",
            self.call_seconds.clone(),
        );
        r.register(
            "host_calls",
            "Host calls made by plugins, by operation and decision (ok, or the error's kind)",
            self.host_calls.clone(),
        );
        r.register(
            "audit_events",
            "Audit events (denials and security kills), by plugin, operation and decision, written or held back by the audit budget",
            self.audit_events.clone(),
        );
        r.register(
            "worker_starts",
            "Worker starts, by result (ok, failed, overloaded)",
            self.worker_starts.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers started to replace one that crashed or was killed",
            self.worker_restarts.clone(),
        );
        r.register(
            "worker_crashes",
            "Workers that ended without being asked to, by reason",
            self.worker_crashes.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy edits applied or rejected (a rejected edit keeps the policy in force)",
            self.policy_reloads.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) applied or rejected (a rejected file keeps the configuration in force)",
            self.config_reloads.clone(),
        );
        self.register_state(&mut r, now);
        let mut out = String::new();
        let encoded = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &r)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &r)
        };
        // Writing to a String cannot fail; a failure would be the crate's bug.
        if let Err(e) = encoded {
            tracing::error!("cannot encode the metrics: {e}");
        }
        out
    }

    fn register_state(&self, r: &mut Registry, now: &Snapshot) {
        let workers = gauge::<PluginLabels>();
        let allowed = gauge::<PluginLabels>();
        let queued = gauge::<PluginLabels>();
        let state = gauge::<StateLabels>();
        let memory = gauge::<PluginLabels>();
        let memory_peak = gauge::<PluginLabels>();
        let memory_limit = gauge::<PluginLabels>();
        let pids = gauge::<PluginLabels>();
        let cpu = counter::<PluginLabels>();
        let throttled = counter::<PluginLabels>();
        let throttled_periods = counter::<PluginLabels>();
        let oom_kills = counter::<PluginLabels>();
        for p in &now.plugins {
            let l = PluginLabels::of(p);
            workers.get_or_create(&l).set(p.instances.len() as f64);
            allowed
                .get_or_create(&l)
                .set(f64::from(p.instances_allowed));
            queued.get_or_create(&l).set(f64::from(p.queued));
            state
                .get_or_create(&StateLabels {
                    plugin: l.clone(),
                    state: p.state.clone(),
                })
                .set(1.0);
            let sum = |f: fn(&corral_protocol::ResourceStats) -> Option<u64>| {
                p.instances
                    .iter()
                    .filter_map(|i| f(&i.resources))
                    .map(|v| v as f64)
                    .reduce(|a, b| a + b)
            };
            if let Some(v) = sum(|r| r.memory_current) {
                memory.get_or_create(&l).set(v);
            }
            if let Some(v) = sum(|r| r.memory_peak) {
                memory_peak.get_or_create(&l).set(v);
            }
            if let Some(v) = p
                .instances
                .iter()
                .filter_map(|i| i.resources.memory_limit)
                .max()
            {
                memory_limit.get_or_create(&l).set(v as f64);
            }
            if let Some(v) = sum(|r| r.pids_current) {
                pids.get_or_create(&l).set(v);
            }
            if let Some(v) = sum(|r| r.cpu_usage_usec) {
                cpu.get_or_create(&l).inc_by(v / 1e6);
            }
            if let Some(v) = sum(|r| r.cpu_throttled_usec) {
                throttled.get_or_create(&l).inc_by(v / 1e6);
            }
            if let Some(v) = sum(|r| r.cpu_throttled_periods) {
                throttled_periods.get_or_create(&l).inc_by(v);
            }
            if let Some(v) = sum(|r| Some(r.oom_kills)) {
                oom_kills.get_or_create(&l).inc_by(v);
            }
        }
        r.register(
            "plugin_workers",
            "Worker processes of the plugin serving now",
            workers,
        );
        r.register(
            "plugin_workers_allowed",
            "Workers the policy lets the plugin run at once (its instances)",
            allowed,
        );
        r.register(
            "plugin_queue_depth",
            "Calls to the plugin queued or running now (refused as overloaded past max_queue)",
            queued,
        );
        r.register(
            "plugin_state",
            "1 for the plugin's state (stopped, running, crashed, blocked, failed)",
            state,
        );
        r.register(
            "plugin_memory_bytes",
            "Memory its workers use now, from their cgroups (summed over instances)",
            memory,
        );
        r.register(
            "plugin_memory_peak_bytes",
            "The most memory its workers have used, from their cgroups (summed over instances)",
            memory_peak,
        );
        r.register(
            "plugin_memory_limit_bytes",
            "The memory limit of each of its workers' cgroups",
            memory_limit,
        );
        r.register(
            "plugin_pids",
            "Processes and threads in its workers' cgroups now",
            pids,
        );
        r.register(
            "plugin_cpu_seconds",
            "CPU time its running workers have used (starts again with a new worker)",
            cpu,
        );
        r.register(
            "plugin_cpu_throttled_seconds",
            "Time its running workers were held back by their CPU quota",
            throttled,
        );
        r.register(
            "plugin_cpu_throttled_periods",
            "Scheduler periods in which the CPU quota held its running workers back",
            throttled_periods,
        );
        r.register(
            "plugin_oom_kills",
            "OOM kills in its running workers' cgroups",
            oom_kills,
        );
        let w = &now.workers;
        let one = |r: &mut Registry, name: &str, help: &str, v: f64| {
            let g = single();
            g.set(v);
            r.register(name, help, g);
        };
        one(
            r,
            "workers",
            "Worker processes alive (serving, or finishing their calls after a reload)",
            f64::from(w.live),
        );
        if let Some(max) = w.max_workers {
            one(
                r,
                "workers_max",
                "max_workers: the most worker processes alive at once",
                f64::from(max),
            );
        }
        let total = |r: &mut Registry, name: &str, help: &str, v: u64| {
            let c = Counter::<f64, AtomicU64>::default();
            c.inc_by(v as f64);
            r.register(name, help, c);
        };
        total(
            r,
            "worker_idle_stops",
            "Workers stopped for being idle (idle_timeout)",
            w.idle_stops,
        );
        total(
            r,
            "worker_evictions",
            "Idle workers stopped to make room under max_workers",
            w.evictions,
        );
        total(
            r,
            "modules_compiled",
            "Wasm modules and JavaScript module graphs compiled by compile helpers (every other start loaded one compiled before)",
            w.modules_compiled,
        );
        total(
            r,
            "zygote_templates_started",
            "Zygote templates started",
            w.templates_started,
        );
        total(
            r,
            "workers_forked",
            "Workers forked from a zygote template (the others were started by exec)",
            w.workers_forked,
        );
        if let Some(open) = w.open_files {
            one(
                r,
                "process_open_fds",
                "Descriptors the supervisor has open",
                f64::from(open),
            );
        }
        one(
            r,
            "process_max_fds",
            "The supervisor's soft RLIMIT_NOFILE",
            w.max_files as f64,
        );
        let (rss, peak) = own_memory();
        if let Some(v) = rss {
            one(
                r,
                "process_resident_memory_bytes",
                "The supervisor's resident memory",
                v as f64,
            );
        }
        if let Some(v) = peak {
            one(
                r,
                "process_resident_memory_peak_bytes",
                "The supervisor's peak resident memory",
                v as f64,
            );
        }
        one(
            r,
            "uptime_seconds",
            "How long the daemon has run",
            self.started.elapsed().as_secs_f64(),
        );
        one(
            r,
            "process_start_time_seconds",
            "When the daemon started, in seconds since the Unix epoch",
            self.started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        one(
            r,
            "policy_rejected",
            "1 while the last policy edit is rejected (the previous policy is in force)",
            f64::from(u8::from(now.policy_rejected)),
        );
        one(
            r,
            "config_rejected",
            "1 while the last configuration reload is rejected (the previous configuration is in force)",
            f64::from(u8::from(now.config_rejected)),
        );
    }
}

/// The names of every metric family the daemon exports (as a query names them:
/// counters with `_total`, histograms as `_bucket`, `_sum` and `_count`).
pub const EXPORTED: &[&str] = &[
    "corral_calls_total",
    "corral_call_duration_seconds_bucket",
    "corral_call_duration_seconds_sum",
    "corral_call_duration_seconds_count",
    "corral_host_calls_total",
    "corral_audit_events_total",
    "corral_worker_starts_total",
    "corral_worker_restarts_total",
    "corral_worker_crashes_total",
    "corral_policy_reloads_total",
    "corral_config_reloads_total",
    "corral_plugin_workers",
    "corral_plugin_workers_allowed",
    "corral_plugin_queue_depth",
    "corral_plugin_state",
    "corral_plugin_memory_bytes",
    "corral_plugin_memory_peak_bytes",
    "corral_plugin_memory_limit_bytes",
    "corral_plugin_pids",
    "corral_plugin_cpu_seconds_total",
    "corral_plugin_cpu_throttled_seconds_total",
    "corral_plugin_cpu_throttled_periods_total",
    "corral_plugin_oom_kills_total",
    "corral_workers",
    "corral_workers_max",
    "corral_worker_idle_stops_total",
    "corral_worker_evictions_total",
    "corral_modules_compiled_total",
    "corral_zygote_templates_started_total",
    "corral_workers_forked_total",
    "corral_process_open_fds",
    "corral_process_max_fds",
    "corral_process_resident_memory_bytes",
    "corral_process_resident_memory_peak_bytes",
    "corral_uptime_seconds",
    "corral_process_start_time_seconds",
    "corral_policy_rejected",
    "corral_config_rejected",
];
