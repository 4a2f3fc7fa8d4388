//! What a plugin's words may not show: its secrets (replaced by `[secret NAME]`) and
//! the path of the version copy its worker reads (replaced by the plugin directory).

use crate::plugins::versions::Snapshot;
use corral_protocol::CallError;
use std::path::PathBuf;
use std::sync::Arc;

/// The copy of a plugin version's files that a worker reads, and the plugin
/// directory it was copied from, which messages name instead of the copy.
#[derive(Debug, Clone)]
pub struct PluginFiles {
    pub snapshot: Arc<Snapshot>,
    pub dir: PathBuf,
}

impl PluginFiles {
    /// `text` with the copy's path replaced by the plugin directory's.
    pub(crate) fn shown(&self, text: String) -> String {
        let copy = self.snapshot.path().to_string_lossy();
        if text.contains(copy.as_ref()) {
            text.replace(copy.as_ref(), &self.dir.to_string_lossy())
        } else {
            text
        }
    }

    /// Error messages (tracebacks, traps) with the plugin directory's path.
    pub(crate) fn shown_error(&self, e: CallError) -> CallError {
        match e {
            CallError::Trap { message } => CallError::Trap {
                message: self.shown(message),
            },
            CallError::Plugin { message } => CallError::Plugin {
                message: self.shown(message),
            },
            other => other,
        }
    }
}

/// Replaces a plugin's secret values in text with `[secret NAME]`. Its `Debug`
/// shows only how many secrets it holds.
#[derive(Clone, Default)]
pub struct Redactor(Arc<Vec<(String, String)>>);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.0.len())
    }
}

impl Redactor {
    /// From `(name, value)` pairs; empty values are ignored.
    pub fn new(secrets: impl IntoIterator<Item = (String, String)>) -> Redactor {
        let mut v: Vec<(String, String)> =
            secrets.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        // Longest first, so a secret that contains another is replaced whole.
        v.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        Redactor(Arc::new(v))
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (name, value) in self.0.iter() {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), &format!("[secret {name}]"));
            }
        }
        out
    }
}
