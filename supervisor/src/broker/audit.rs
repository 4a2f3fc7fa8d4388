//! The audit log: one JSON object per line for every denied host call and every
//! security event (policy denial, seccomp violation, OOM kill, deadline kill,
//! unhealthy restart).
//!
//! ```json
//! {"time":"2026-11-22T18:40:01.123Z","plugin":"hello-js","operation":"fetch",
//!  "target":"GET http://10.0.0.1/","decision":"denied",
//!  "rule":"default deny: no [[grant]] fetch rule allows ..."}
//! ```
//!
//! Where it goes is the daemon's `audit` setting: a file (appended, created 0600),
//! `stderr`, or `off`. Every event is also logged through `tracing` at warn level.
//! Lines never carry values (store values, payloads, secrets): only names.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuditSink {
    /// Appended to this file.
    File(PathBuf),
    /// The supervisor's standard error.
    #[default]
    Stderr,
    Off,
}

impl AuditSink {
    /// `off`, `stderr`, or a path.
    pub fn parse(s: &str) -> AuditSink {
        match s {
            "off" => AuditSink::Off,
            "stderr" => AuditSink::Stderr,
            path => AuditSink::File(PathBuf::from(path)),
        }
    }
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent<'a> {
    pub plugin: &'a str,
    /// `kv.put`, `fetch`, `publish`, `subscribe`, `call`, `seccomp`, `oom`,
    /// `deadline`, `health`, ...
    pub operation: &'a str,
    /// What it was about: a key, URL, topic, plugin.function, syscall.
    pub target: &'a str,
    /// `denied`, `killed`, `restarted`.
    pub decision: &'a str,
    /// The rule or mechanism that decided.
    pub rule: &'a str,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    event: &'a AuditEvent<'a>,
}

/// The most bytes of an audit line's target (a key, URL, topic, plugin.function)
/// and of its rule written; the rest is cut, with the length said.
pub const MAX_AUDIT_TARGET: usize = 1024;
pub const MAX_AUDIT_RULE: usize = 4096;

/// Lines a second one plugin may have written, after a burst of four seconds'
/// worth, unless the policy's `audit_rate` says otherwise. A plugin that makes denied host calls in a loop would
/// otherwise write megabytes a second, drowning the other plugins' lines (and the
/// disk). Beyond the budget its events are counted, not written, and one summary
/// line per window says how many there were, by operation and decision.
pub const AUDIT_RATE: u32 = 50;

#[cfg(test)]
const AUDIT_BURST: u32 = 4 * AUDIT_RATE;

/// The audit log writer.
#[derive(Debug)]
pub struct Audit {
    shared: std::sync::Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Where lines go, and the file open for them (opened at the first line after
    /// a start or a [`Audit::reopen`]).
    sink: Mutex<AuditSink>,
    file: Mutex<Option<std::fs::File>>,
    /// Every event is counted here, written or held back.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    budgets: Mutex<HashMap<String, Budget>>,
    /// Each plugin's `audit_rate` (the policy's; [`AUDIT_RATE`] when not set).
    rates: Mutex<HashMap<String, u32>>,
}

/// One plugin's budget: a token bucket, and what it suppressed since it ran dry.
#[derive(Debug)]
struct Budget {
    /// Events a second, and at once (four seconds' worth).
    rate: u32,
    tokens: f64,
    last: Instant,
    suppressed: BTreeMap<(String, String), u64>,
    since: Option<SystemTime>,
}

impl Budget {
    fn full(now: Instant, rate: u32) -> Budget {
        Budget {
            rate,
            tokens: f64::from(rate.saturating_mul(4)),
            last: now,
            suppressed: BTreeMap::new(),
            since: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + secs * f64::from(self.rate)).min(self.burst());
        self.last = now;
    }

    fn burst(&self) -> f64 {
        f64::from(self.rate.saturating_mul(4))
    }

    /// The summary of what was suppressed, if anything was; the count starts over.
    fn take_summary(&mut self) -> Option<String> {
        if self.suppressed.is_empty() {
            return None;
        }
        let total: u64 = self.suppressed.values().sum();
        let by: Vec<String> = self
            .suppressed
            .iter()
            .map(|((op, decision), n)| format!("{op} {decision} {n}"))
            .collect();
        let since = self
            .since
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_default();
        self.suppressed.clear();
        self.since = None;
        Some(format!(
            "{total} events over the audit budget ({} at once, {} a second) not written \
             since {since}: {}",
            self.rate.saturating_mul(4),
            self.rate,
            by.join(", ")
        ))
    }
}

/// The summary line for `plugin`.
fn summary_event<'a>(plugin: &'a str, rule: &'a str) -> AuditEvent<'a> {
    AuditEvent {
        plugin,
        operation: "audit",
        target: "",
        decision: "suppressed",
        rule,
    }
}

impl Audit {
    #[cfg(test)]
    pub fn new(sink: AuditSink) -> Audit {
        Audit::counted(sink, None)
    }

    /// A writer to `sink` that counts every event in `metrics`. Inside a Tokio
    /// runtime a ticker writes the summaries of plugins that went quiet after
    /// running over their budget, within a second.
    pub(crate) fn counted(
        sink: AuditSink,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Audit {
        let shared = std::sync::Arc::new(Shared {
            sink: Mutex::new(sink),
            file: Mutex::new(None),
            metrics,
            budgets: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = std::sync::Arc::downgrade(&shared);
            rt.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(shared) = weak.upgrade() else { break };
                    shared.flush(Instant::now(), false);
                }
            });
        }
        Audit { shared }
    }

    /// Write one event, within its plugin's budget (see [`AUDIT_RATE`]). A failure
    /// to write is logged, never fatal.
    pub fn record(&self, event: AuditEvent<'_>) {
        self.shared.record(event, None, Instant::now());
    }

    /// Write an event about one plugin that another caused, within the budget of
    /// the one that caused it (`payer`): a publisher whose messages a subscriber may
    /// not receive must not use up that subscriber's budget, which its own denials
    /// and kills need.
    pub fn record_charged_to(&self, payer: &str, event: AuditEvent<'_>) {
        self.shared.record(event, Some(payer), Instant::now());
    }

    /// Close the audit file and open `sink` at the next line: after logrotate
    /// renamed the file (SIGHUP), new lines go to a new file of the same name; a
    /// reloaded configuration may name another place.
    pub fn reopen(&self, sink: AuditSink) {
        let mut file = self.shared.file.lock().unwrap_or_else(|e| e.into_inner());
        *self.shared.sink.lock().unwrap_or_else(|e| e.into_inner()) = sink;
        *file = None;
    }

    /// `plugin`'s budget from now on: `rate` events a second after a burst of four
    /// seconds' worth (the policy's `audit_rate`, set when a worker starts).
    pub fn set_rate(&self, plugin: &str, rate: u32) {
        let rate = rate.max(1);
        self.shared
            .rates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(plugin.to_owned(), rate);
        if let Some(b) = self
            .shared
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(plugin)
        {
            b.rate = rate;
            b.tokens = b.tokens.min(b.burst());
        }
    }
}

impl Shared {
    fn record(&self, event: AuditEvent<'_>, payer: Option<&str>, now: Instant) {
        if let Some(m) = &self.metrics {
            m.audit(event.plugin, event.operation, event.decision);
        }
        let payer = payer.unwrap_or(event.plugin);
        let summary = {
            let rate = self
                .rates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(payer)
                .copied()
                .unwrap_or(AUDIT_RATE);
            let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
            let b = budgets
                .entry(payer.to_owned())
                .or_insert_with(|| Budget::full(now, rate));
            b.refill(now);
            if b.tokens < 1.0 {
                *b.suppressed
                    .entry((event.operation.to_owned(), event.decision.to_owned()))
                    .or_default() += 1;
                b.since.get_or_insert_with(SystemTime::now);
                return;
            }
            b.tokens -= 1.0;
            b.take_summary()
        };
        if let Some(rule) = summary {
            self.write(&summary_event(payer, &rule));
        }
        self.write(&event);
    }

    /// Write the summaries that are due: of plugins with budget again, or (`all`)
    /// of every plugin. Plugins with a full budget and nothing pending are forgotten.
    fn flush(&self, now: Instant, all: bool) {
        let due: Vec<(String, String)> = {
            let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
            let mut due = Vec::new();
            budgets.retain(|plugin, b| {
                b.refill(now);
                if (all || b.tokens >= 1.0)
                    && let Some(rule) = b.take_summary()
                {
                    due.push((plugin.clone(), rule));
                }
                b.tokens < b.burst() || !b.suppressed.is_empty()
            });
            due
        };
        for (plugin, rule) in due {
            self.write(&summary_event(&plugin, &rule));
        }
    }

    fn write(&self, event: &AuditEvent<'_>) {
        // A worker chooses its host calls' keys, URLs and names (up to a frame's
        // size): what an audit line keeps of them is bounded.
        let target = crate::supervisor::cut(event.target.to_owned(), MAX_AUDIT_TARGET);
        let rule = crate::supervisor::cut(event.rule.to_owned(), MAX_AUDIT_RULE);
        let event = &AuditEvent {
            target: &target,
            rule: &rule,
            ..event.clone()
        };
        tracing::warn!(
            plugin = event.plugin,
            operation = event.operation,
            target = event.target,
            decision = event.decision,
            "audit: {}",
            event.rule
        );
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let sink = self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let written = match &sink {
            AuditSink::Off => Ok(()),
            AuditSink::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
            AuditSink::File(path) => {
                if file.is_none() {
                    use std::os::unix::fs::OpenOptionsExt;
                    if let Some(dir) = path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    match std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                    {
                        Ok(f) => *file = Some(f),
                        Err(e) => {
                            tracing::error!("cannot open the audit log {}: {e}", path.display());
                            return;
                        }
                    }
                }
                file.as_mut()
                    .map_or(Ok(()), |f| f.write_all(text.as_bytes()))
            }
        };
        if let Err(e) = written {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}

/// Nothing suppressed goes unsaid: the last summaries are written when the
/// supervisor's broker goes away.
impl Drop for Shared {
    fn drop(&mut self) {
        self.flush(Instant::now(), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn event<'a>(plugin: &'a str, operation: &'a str) -> AuditEvent<'a> {
        AuditEvent {
            plugin,
            operation,
            target: "k",
            decision: "denied",
            rule: "default deny",
        }
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn of<'a>(lines: &'a [serde_json::Value], plugin: &str) -> Vec<&'a serde_json::Value> {
        lines.iter().filter(|l| l["plugin"] == plugin).collect()
    }

    /// A plugin's own `audit_rate` sets its budget: a burst of four seconds' worth,
    /// then that many a second; other plugins keep the default.
    #[test]
    fn a_plugins_audit_rate_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(AuditSink::File(path.clone()));
        audit.set_rate("quiet", 5);
        let a = &audit.shared;
        let t0 = Instant::now();
        for _ in 0..100 {
            a.record(event("quiet", "kv.get"), None, t0);
            a.record(event("other", "kv.get"), None, t0);
        }
        let l = lines(&path);
        assert_eq!(of(&l, "quiet").len(), 20);
        assert_eq!(of(&l, "other").len(), 100);
        // A second later: five more, after the summary of the 80 held back.
        for _ in 0..10 {
            a.record(event("quiet", "kv.get"), None, t0 + Duration::from_secs(1));
        }
        let l = lines(&path);
        let quiet = of(&l, "quiet");
        assert_eq!(quiet.len(), 20 + 1 + 5, "{quiet:#?}");
        assert!(
            quiet[20]["rule"]
                .as_str()
                .unwrap()
                .starts_with("80 events over the audit budget (20 at once, 5 a second)"),
            "{}",
            quiet[20]
        );
    }

    /// A plugin looping over denied calls gets its budget's worth of lines and then
    /// summaries with exact counts; another plugin's lines are written as ever.
    #[test]
    fn a_flood_is_cut_to_the_budget_summarised_and_blinds_no_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // Outside a runtime: no ticker, the test drives time.
        let audit = Audit::new(AuditSink::File(path.clone()));
        let a = &audit.shared;
        let t0 = Instant::now();
        for _ in 0..10_000 {
            a.record(event("flood", "kv.get"), None, t0);
        }
        a.record(event("neighbour", "fetch"), None, t0);
        let got = lines(&path);
        assert_eq!(of(&got, "flood").len(), AUDIT_BURST as usize);
        assert_eq!(of(&got, "neighbour").len(), 1, "not blinded by the flood");

        // Half a second on: 25 lines of budget; the next one brings the summary.
        let t1 = t0 + Duration::from_millis(500);
        a.record(event("flood", "fetch"), None, t1);
        let got = lines(&path);
        let flood = of(&got, "flood");
        assert_eq!(flood.len(), AUDIT_BURST as usize + 2);
        let summary = flood[AUDIT_BURST as usize];
        assert_eq!(summary["operation"], "audit");
        assert_eq!(summary["decision"], "suppressed");
        let rule = summary["rule"].as_str().unwrap();
        assert!(
            rule.starts_with(
                "9800 events over the audit budget (200 at once, 50 a second) not written since "
            ) && rule.ends_with(": kv.get denied 9800"),
            "{rule}"
        );
        assert_eq!(flood[AUDIT_BURST as usize + 1]["operation"], "fetch");

        // Another burst, then quiet: the ticker's flush says what was left unsaid,
        // once there is budget again.
        for i in 0..100 {
            a.record(
                event("flood", if i % 2 == 0 { "kv.get" } else { "call" }),
                None,
                t1,
            );
        }
        let before = lines(&path).len();
        assert_eq!(before, AUDIT_BURST as usize + 2 + 24 + 1);
        a.flush(t1, false);
        assert_eq!(lines(&path).len(), before, "no budget yet");
        a.flush(t1 + Duration::from_millis(100), false);
        let got = lines(&path);
        assert_eq!(got.len(), before + 1);
        let rule = got[before]["rule"].as_str().unwrap();
        assert!(
            rule.ends_with(": call denied 38, kv.get denied 38"),
            "{rule}"
        );
        drop(audit);
        assert_eq!(lines(&path).len(), before + 1, "nothing left to say");
    }

    /// What is still suppressed when the broker goes away is written then.
    #[test]
    fn events_another_plugin_caused_use_its_budget_not_the_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(AuditSink::File(path.clone()));
        for _ in 0..10_000 {
            audit.record_charged_to("publisher", event("subscriber", "subscribe"));
        }
        // The subscriber's own kill is still written in full.
        audit.record(event("subscriber", "seccomp"));
        let got = lines(&path);
        let mine: Vec<_> = of(&got, "subscriber");
        assert_eq!(mine.len(), AUDIT_BURST as usize + 1);
        assert_eq!(mine.last().unwrap()["operation"], "seccomp");
    }

    #[test]
    fn what_a_worker_names_is_cut_in_the_audit_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(AuditSink::File(path.clone()));
        let key = "k\u{1}".repeat(1 << 19);
        let rule = format!("default deny: no grant allows call on {key}");
        audit.shared.record(
            AuditEvent {
                plugin: "p",
                operation: "kv.get",
                target: &key,
                decision: "denied",
                rule: &rule,
            },
            None,
            Instant::now(),
        );
        drop(audit);
        let text = std::fs::read_to_string(&path).unwrap();
        // Escaped, a control character is six bytes: still far below the 1 MiB key.
        assert!(text.len() < 64 << 10, "{} bytes", text.len());
        let got = lines(&path);
        let target = got[0]["target"].as_str().unwrap();
        assert!(
            target.ends_with(" [cut: 1048576 bytes in all]"),
            "{target:.80}"
        );
        assert!(target.len() <= MAX_AUDIT_TARGET + 40);
        let r = got[0]["rule"].as_str().unwrap();
        assert!(r.starts_with("default deny: no grant allows call on k"));
        assert!(r.len() <= MAX_AUDIT_RULE + 40);
    }

    #[test]
    fn pending_summaries_are_written_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(AuditSink::File(path.clone()));
        let t0 = Instant::now();
        for _ in 0..AUDIT_BURST + 7 {
            audit.shared.record(event("flood", "publish"), None, t0);
        }
        drop(audit);
        let got = lines(&path);
        assert_eq!(got.len(), AUDIT_BURST as usize + 1);
        let rule = got.last().unwrap()["rule"].as_str().unwrap();
        assert!(rule.ends_with(": publish denied 7"), "{rule}");
    }
}
