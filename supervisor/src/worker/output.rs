//! A worker's stdout and stderr, forwarded to the supervisor's log, and the tail of
//! its stderr kept to explain its death, and the plugin's own log lines.

use super::Redactor;
use corral_protocol::LogLevel;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
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

    /// Keep `line`. The text is cut back to [`Self::KEEP`] only once it holds twice
    /// that: cutting at every line moved the whole tail per line, so a worker
    /// writing bare newlines cost the supervisor KEEP bytes of copying per byte.
    pub(crate) fn push(&self, line: &str) {
        let mut t = self.text.lock().unwrap_or_else(|e| e.into_inner());
        t.push_str(line);
        t.push('\n');
        if t.len() > 2 * Self::KEEP {
            let cut = Self::start_of_last(&t, Self::KEEP);
            t.drain(..cut);
        }
    }

    /// Where the last `keep` bytes of `t` begin (on a character boundary).
    fn start_of_last(t: &str, keep: usize) -> usize {
        let cut = t.len().saturating_sub(keep);
        (cut..t.len())
            .find(|&i| t.is_char_boundary(i))
            .unwrap_or(t.len())
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
        let t = self.text.lock().unwrap_or_else(|e| e.into_inner());
        t[Self::start_of_last(&t, Self::KEEP)..].to_owned()
    }
}

/// How long a worker's stdout and stderr are still read after its connection
/// ended.
pub(crate) const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Longest line forwarded from a worker's stdout or stderr, in bytes; the rest of a
/// longer line is dropped and counted in a marker. A worker that writes without
/// newlines costs the supervisor this much, not what it wrote.
pub(crate) const MAX_LINE: usize = 4096;

/// The built-in `log_rate` (the tests' budget): bytes per second of each of a
/// worker's streams that reach the supervisor's log, after a burst of four seconds'
/// worth; the lines past it are counted and summarised, never queued.
#[cfg(test)]
pub(crate) const LOG_RATE: u64 = 64 * 1024;

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, whatever the
/// bytes are: invalid UTF-8 is replaced, never a reason to stop reading.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    line: Vec<u8>,
    /// Bytes of the current line past [`MAX_LINE`].
    cut: u64,
}

impl Lines {
    /// Take `bytes`; complete lines are appended to `out`.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) {
        while !bytes.is_empty() {
            let (part, rest, end) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            let room = MAX_LINE - self.line.len();
            let keep = part.len().min(room);
            self.line.extend_from_slice(&part[..keep]);
            self.cut += (part.len() - keep) as u64;
            if end {
                out.push(self.take());
            }
            bytes = rest;
        }
    }

    /// The last line, if the stream ended without a newline.
    pub(crate) fn finish(&mut self, out: &mut Vec<String>) {
        if !self.line.is_empty() || self.cut > 0 {
            out.push(self.take());
        }
    }

    fn take(&mut self) -> String {
        let mut s = String::from_utf8_lossy(&self.line).into_owned();
        if self.cut > 0 {
            s.push_str(&format!(" [line cut: {} more bytes]", self.cut));
        }
        self.line.clear();
        self.cut = 0;
        s
    }
}

/// A token bucket over the bytes one stream may log.
/// What a line costs a log budget besides its bytes: about what the daemon's log
/// adds to it (time, level, target, plugin, stream). Without it a stream of bare
/// newlines passed `rate` lines a second, each a full line of the daemon's log.
pub(crate) const LINE_COST: usize = 128;

/// What a worker's output leaves with the supervisor: the tail of its stderr,
/// and the budget its log lines, stdout and stderr share.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) tail: Arc<StderrTail>,
    pub(crate) budget: SharedBudget,
    /// Held by the worker's connection: dropped when it ends, which tells the
    /// forwarders to stop reading soon after.
    pub(crate) connected: tokio::sync::watch::Sender<()>,
}

impl Output {
    pub(crate) fn new(rate: u64) -> Output {
        Output {
            tail: Arc::new(StderrTail::default()),
            budget: shared_budget(rate),
            connected: tokio::sync::watch::Sender::new(()),
        }
    }

    /// What a forwarder watches to know the connection has ended.
    pub(crate) fn gone(&self) -> Option<tokio::sync::watch::Receiver<()>> {
        Some(self.connected.subscribe())
    }
}

/// One budget for all of a worker's lines: its `Log` frames, stdout and stderr
/// together (each had its own, three times the rate).
pub(crate) type SharedBudget = Arc<std::sync::Mutex<LogBudget>>;

/// A budget of `rate` bytes a second after a burst of four seconds' worth (and
/// never less than a longest line), for every stream of one worker.
pub(crate) fn shared_budget(rate: u64) -> SharedBudget {
    let burst = rate.saturating_mul(4).max((MAX_LINE + LINE_COST) as u64);
    Arc::new(std::sync::Mutex::new(LogBudget::new(
        rate,
        burst,
        std::time::Instant::now(),
    )))
}

fn lock(b: &SharedBudget) -> std::sync::MutexGuard<'_, LogBudget> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
pub(crate) struct LogBudget {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: std::time::Instant,
    /// Lines dropped since the last one logged.
    suppressed: u64,
}

impl LogBudget {
    pub(crate) fn new(rate: u64, burst: u64, now: std::time::Instant) -> LogBudget {
        LogBudget {
            rate,
            burst,
            tokens: burst as f64,
            last: now,
            suppressed: 0,
        }
    }

    /// Whether a line of `len` bytes may be logged at `now`; `Some(n)` in the
    /// answer's second half: `n` lines were suppressed before this one (to be said
    /// first).
    pub(crate) fn admit(&mut self, len: usize, now: std::time::Instant) -> (bool, Option<u64>) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        let cost = (len + LINE_COST) as f64;
        if self.tokens >= cost {
            self.tokens -= cost;
            let before = std::mem::take(&mut self.suppressed);
            (true, (before > 0).then_some(before))
        } else {
            self.suppressed += 1;
            (false, None)
        }
    }

    /// Lines suppressed and not yet summarised.
    pub(crate) fn pending(&mut self) -> Option<u64> {
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then_some(n)
    }
}

/// Forward a worker's stdout or stderr to the log, line by line: lines bounded
/// ([`MAX_LINE`]), any bytes (lossy), at `rate` bytes a second (the policy's
/// `log_rate`); every line
/// also goes to `keep` (the stderr tail that explains a death), so a flood cannot
/// hide the worker's last words.
///
/// Once `gone` says the worker's connection has ended (its sender dropped), the
/// stream is read for [`OUTPUT_GRACE`] more and then left: a process the worker
/// left behind holding the pipe (where no cgroup or PID namespace ends the tree)
/// gets no reader, not one forwarding for ever.
pub(crate) async fn forward_output(
    mut out: impl AsyncRead + Unpin,
    plugin: String,
    stream: &'static str,
    keep: Option<Arc<StderrTail>>,
    budget: SharedBudget,
    mut gone: Option<tokio::sync::watch::Receiver<()>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut lines = Lines::default();
    let rate = lock(&budget).rate;
    let mut ready = Vec::new();
    let suppressed = |n: u64| {
        tracing::warn!(
            plugin = %plugin,
            stream,
            "{n} lines suppressed (over {rate} bytes/s of its log, stdout and stderr)"
        );
    };
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let left = tokio::time::sleep_until(far());
    tokio::pin!(left);
    loop {
        let n = tokio::select! {
            r = out.read(&mut buf) => match r {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            },
            _ = async { gone.as_mut().expect("checked").changed().await }, if gone.is_some() => {
                // Any change, or the sender gone: the connection has ended.
                gone = None;
                left.as_mut().reset(tokio::time::Instant::now() + OUTPUT_GRACE);
                continue;
            }
            () = &mut left => 0,
        };
        if n == 0 {
            lines.finish(&mut ready);
        } else {
            lines.feed(&buf[..n], &mut ready);
        }
        for line in ready.drain(..) {
            if let Some(k) = &keep {
                k.push(&line);
            }
            let (log, before) = lock(&budget).admit(line.len(), std::time::Instant::now());
            if let Some(n) = before {
                suppressed(n);
            }
            if log {
                tracing::info!(plugin = %plugin, stream, "{line}");
            }
        }
        if n == 0 {
            break;
        }
    }
    let pending = lock(&budget).pending();
    if let Some(n) = pending {
        suppressed(n);
    }
    if let Some(k) = &keep {
        k.close();
    }
}

/// The plugin's own log lines (`Log` frames, during the load and after it): each
/// cut to [`MAX_LINE`] bytes and redacted, at the same bounded rate as its output
/// streams, with the same summary of what was suppressed.
#[derive(Debug)]
pub(crate) struct PluginLog {
    plugin: String,
    redactor: Redactor,
    budget: SharedBudget,
    rate: u64,
}

impl PluginLog {
    /// The log of `plugin`, within `budget` (shared with its output streams).
    pub(crate) fn new(plugin: &str, redactor: Redactor, budget: SharedBudget) -> PluginLog {
        let rate = lock(&budget).rate;
        PluginLog {
            plugin: plugin.to_owned(),
            redactor,
            budget,
            rate,
        }
    }

    pub(crate) fn line(&mut self, level: LogLevel, mut message: String) {
        if message.len() > MAX_LINE {
            let total = message.len();
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(&format!(" [line cut: {} more bytes]", total - cut));
        }
        let (log, before) = lock(&self.budget).admit(message.len(), std::time::Instant::now());
        if let Some(n) = before {
            self.suppressed(n);
        }
        if log {
            log_line(&self.plugin, level, &self.redactor.redact(&message));
        }
    }

    /// Say how many lines were suppressed since the last one logged (at the end).
    pub(crate) fn finish(&mut self) {
        let pending = lock(&self.budget).pending();
        if let Some(n) = pending {
            self.suppressed(n);
        }
    }

    fn suppressed(&self, n: u64) {
        tracing::warn!(
            plugin = %self.plugin,
            stream = "log",
            "{n} lines suppressed (over {} bytes/s of its log, stdout and stderr)",
            self.rate
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut l = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            l.feed(c, &mut out);
        }
        l.finish(&mut out);
        out
    }

    #[test]
    fn lines_are_split_across_chunks_and_the_last_one_is_kept() {
        assert_eq!(
            split(&[b"one\ntw", b"o\n", b"\nthree"]),
            ["one", "two", "", "three"]
        );
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn a_line_without_end_costs_at_most_max_line() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        let mib = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            l.feed(&mib, &mut out);
            assert!(out.is_empty());
            assert_eq!(l.line.len(), MAX_LINE, "the buffer stays bounded");
        }
        l.feed(b"\nnext\n", &mut out);
        assert_eq!(out.len(), 2);
        let cut = (64 << 20) - MAX_LINE;
        assert_eq!(
            out[0],
            format!("{} [line cut: {cut} more bytes]", "x".repeat(MAX_LINE))
        );
        assert_eq!(out[1], "next");
    }

    #[test]
    fn invalid_utf8_is_replaced_and_reading_goes_on() {
        assert_eq!(
            split(&[b"bad \xff\xfe bytes\n", b"SECCOMP after\n"]),
            ["bad \u{fffd}\u{fffd} bytes", "SECCOMP after"]
        );
    }

    #[test]
    fn the_budget_refills_at_its_rate_and_counts_what_it_drops() {
        let t = Instant::now();
        // Each line costs LINE_COST (128) more than its bytes.
        let mut b = LogBudget::new(1000, 3000, t);
        assert_eq!(b.admit(1872, t), (true, None));
        assert_eq!(b.admit(1872, t), (false, None), "1000 left of the burst");
        assert_eq!(b.admit(1372, t), (false, None));
        // A line that fits says first how many were dropped before it.
        assert_eq!(b.admit(872, t), (true, Some(2)));
        assert_eq!(b.admit(0, t), (false, None), "an empty line costs its line");
        // One second refills 1000.
        assert_eq!(b.admit(872, t + Duration::from_secs(1)), (true, Some(1)));
        assert_eq!(b.pending(), None);
        // Never above the burst, however long the wait.
        assert_eq!(b.admit(2873, t + Duration::from_secs(3600)), (false, None));
        assert_eq!(b.pending(), Some(1));
        // Bare newlines: a burst of 3000 passes 23 of them, not 3000.
        let later = t + Duration::from_secs(7200);
        let passed = (0..3000).filter(|_| b.admit(0, later).0).count();
        assert_eq!(passed, 3000 / LINE_COST);
    }

    /// A process left holding a dead worker's stderr (the write end open, never
    /// closed) gets a reader for OUTPUT_GRACE after the worker's connection ends,
    /// not for ever: what it wrote until then is kept, and the forwarder ends.
    #[tokio::test]
    async fn a_pipe_held_open_after_the_connection_ends_is_left_soon_after() {
        use tokio::io::AsyncWriteExt;
        let output = Output::new(LOG_RATE);
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(forward_output(
            r,
            "p".into(),
            "stderr",
            Some(Arc::clone(&output.tail)),
            Arc::clone(&output.budget),
            output.gone(),
        ));
        w.write_all(b"before\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !task.is_finished(),
            "the worker's connection is still there"
        );
        let Output {
            tail, connected, ..
        } = output;
        drop(connected);
        w.write_all(b"during the grace\n").await.unwrap();
        let ended = Instant::now();
        tokio::time::timeout(OUTPUT_GRACE + Duration::from_secs(4), task)
            .await
            .expect("the forwarder ended although the pipe is still open")
            .unwrap();
        assert!(ended.elapsed() >= OUTPUT_GRACE - Duration::from_millis(100));
        assert_eq!(tail.wait_closed().await, "before\nduring the grace\n");
        drop(w);
    }

    /// A worker's stdout, stderr and log lines draw on one budget: a flood on
    /// stdout leaves no room for its log lines, instead of each stream having the
    /// whole rate.
    #[tokio::test]
    async fn a_workers_streams_and_log_share_one_budget() {
        use tokio::io::AsyncWriteExt;
        // A burst of 400: room for one line of 200 bytes (328 with its cost).
        let line = || "y".repeat(200);
        let fresh = Output::new(100);
        PluginLog::new("p", Redactor::default(), Arc::clone(&fresh.budget))
            .line(LogLevel::Info, line());
        assert_eq!(
            lock(&fresh.budget).pending(),
            None,
            "a fresh budget takes it"
        );
        let output = Output::new(100);
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let out = tokio::spawn(forward_output(
            r,
            "p".into(),
            "stdout",
            None,
            Arc::clone(&output.budget),
            None,
        ));
        for _ in 0..100 {
            w.write_all(&[b'x'; 99]).await.unwrap();
            w.write_all(b"\n").await.unwrap();
        }
        drop(w);
        out.await.unwrap();
        // The burst took one line of 99 bytes (227 with its cost); the rest were
        // summarised at the end.
        assert_eq!(lock(&output.budget).pending(), None, "summarised");
        let mut log = PluginLog::new("p", Redactor::default(), Arc::clone(&output.budget));
        log.line(LogLevel::Info, line());
        assert_eq!(
            lock(&output.budget).pending(),
            Some(1),
            "the log line found the budget spent"
        );
    }

    #[tokio::test]
    async fn a_flood_of_garbage_never_hides_the_last_words_on_stderr() {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let tail = Arc::new(StderrTail::default());
        let task = tokio::spawn(forward_output(
            r,
            "p".into(),
            "stderr",
            Some(Arc::clone(&tail)),
            shared_budget(LOG_RATE),
            None,
        ));
        use tokio::io::AsyncWriteExt;
        for _ in 0..256 {
            w.write_all(&[0xff; 16 * 1024]).await.unwrap();
        }
        w.write_all(b"\ncorral-seccomp: 101\n").await.unwrap();
        drop(w);
        task.await.unwrap();
        let text = tail.wait_closed().await;
        assert_eq!(
            corral_confine::violation_from_stderr(&text).as_deref(),
            Some("ptrace"),
            "{}",
            &text[text.len().saturating_sub(200)..]
        );
        assert!(text.len() <= StderrTail::KEEP + MAX_LINE, "{}", text.len());
    }

    #[tokio::test]
    async fn the_tail_is_the_last_words_whatever_came_before() {
        let tail = StderrTail::default();
        for i in 0..100_000 {
            tail.push(if i % 7 == 0 { "é" } else { "" });
            let kept = tail.text.lock().unwrap().len();
            assert!(kept <= 2 * StderrTail::KEEP + 3, "{kept}");
        }
        tail.push("corral-seccomp: 101");
        tail.close();
        let text = tail.wait_closed().await;
        assert!(text.len() <= StderrTail::KEEP, "{}", text.len());
        assert!(text.len() >= StderrTail::KEEP - 3, "{}", text.len());
        assert!(text.ends_with("\ncorral-seccomp: 101\n"));
        assert_eq!(
            corral_confine::violation_from_stderr(&text).as_deref(),
            Some("ptrace")
        );
    }
}
