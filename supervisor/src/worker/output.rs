//! A worker's stdout and stderr, forwarded to the supervisor's log, and the tail of
//! its stderr kept to explain its death.

use corral_protocol::LogLevel;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Notify;

/// The last few KiB a worker wrote to stderr, kept for its whole life so its last
/// words can explain its death.
#[derive(Debug, Default)]
pub(crate) struct StderrTail {
    text: Mutex<String>,
    closed: Notify,
    is_closed: AtomicBool,
}

impl StderrTail {
    const KEEP: usize = 8 * 1024;

    pub(crate) fn push(&self, line: &str) {
        let mut t = self.text.lock().unwrap_or_else(|e| e.into_inner());
        t.push_str(line);
        t.push('\n');
        if t.len() > Self::KEEP {
            let cut = t.len() - Self::KEEP;
            let cut = (cut..t.len())
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(t.len());
            t.drain(..cut);
        }
    }

    pub(crate) fn close(&self) {
        self.is_closed.store(true, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    /// The tail once the worker's stderr has closed (or after 200 ms).
    pub(crate) async fn wait_closed(&self) -> String {
        let closed = self.closed.notified();
        if !self.is_closed.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(Duration::from_millis(200), closed).await;
        }
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub(crate) async fn forward_output(
    out: impl AsyncRead + Unpin,
    plugin: String,
    stream: &'static str,
    keep: Option<Arc<StderrTail>>,
) {
    let mut lines = BufReader::new(out).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(plugin = %plugin, stream, "{line}");
        if let Some(k) = &keep {
            k.push(&line);
        }
    }
    if let Some(k) = &keep {
        k.close();
    }
}

pub(crate) fn log_line(plugin: &str, level: LogLevel, message: &str) {
    match level {
        LogLevel::Error => tracing::error!(plugin = %plugin, "{message}"),
        LogLevel::Warn => tracing::warn!(plugin = %plugin, "{message}"),
        LogLevel::Info => tracing::info!(plugin = %plugin, "{message}"),
        LogLevel::Debug => tracing::debug!(plugin = %plugin, "{message}"),
        LogLevel::Trace => tracing::trace!(plugin = %plugin, "{message}"),
    }
}
