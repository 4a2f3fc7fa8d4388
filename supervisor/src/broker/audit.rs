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
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

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

/// The audit log writer.
#[derive(Debug)]
pub struct Audit {
    sink: AuditSink,
    file: Mutex<Option<std::fs::File>>,
}

impl Audit {
    pub fn new(sink: AuditSink) -> Audit {
        Audit {
            sink,
            file: Mutex::new(None),
        }
    }

    /// Write one event. A failure to write is logged, never fatal.
    pub fn record(&self, event: AuditEvent<'_>) {
        tracing::warn!(
            plugin = event.plugin,
            operation = event.operation,
            target = event.target,
            decision = event.decision,
            "audit: {}",
            event.rule
        );
        let line = Line {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            event: &event,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let written = match &self.sink {
            AuditSink::Off => Ok(()),
            AuditSink::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
            AuditSink::File(path) => {
                let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
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
