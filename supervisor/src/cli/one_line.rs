//! The daemon's text log, one event per line whatever the event holds.
//!
//! Much of what the supervisor logs comes from workers: a plugin's log lines and
//! output, the errors its calls and its load end in. A newline in any of them
//! would start a line of the worker's choosing in the daemon's log (a forged
//! "plugin neighbour crashed", a forged audit summary), and a carriage return
//! would hide the start of a line on a terminal. [`OneLine`] writes each event with
//! every newline and carriage return but the last written as `\n` and `\r`, so a
//! line of the log is always one event the supervisor made. (tracing-subscriber
//! escapes terminal escape sequences itself, and the JSON format escapes both.)

use std::io::{self, Write};
use tracing_subscriber::fmt::MakeWriter;

/// A writer for the text format whose events each stay on one line.
#[derive(Debug, Clone, Copy, Default)]
pub struct OneLine<M>(pub M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for OneLine<M> {
    type Writer = Escaping<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        Escaping(self.0.make_writer())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        Escaping(self.0.make_writer_for(meta))
    }
}

/// One event's writer: the formatter writes the whole event in one `write_all`.
#[derive(Debug)]
pub struct Escaping<W>(W);

impl<W: Write> Write for Escaping<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
            return self.0.write_all(buf);
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a test's subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A plugin's log line carrying a newline and a carriage return, as a hostile
    /// worker sends it, and a worker's error quoted in a supervisor's warning: each
    /// is one line of the daemon's log, the forged line's text inside it.
    #[test]
    fn a_workers_newlines_cannot_start_a_line_of_the_log() {
        let captured = Captured::default();
        let writer = {
            let c = captured.clone();
            move || c.clone()
        };
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(OneLine(writer))
            .finish();
        let forged = "done\n2026-12-07T23:00:00.000000Z  WARN corral: plugin neighbour crashed\r";
        tracing::subscriber::with_default(subscriber, || {
            crate::worker::output::log_line("attacker", corral_protocol::LogLevel::Info, forged);
            tracing::warn!(plugin = "attacker", "call failed: {forged}");
            tracing::info!("plain");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        for line in &lines[..2] {
            assert!(
                line.contains(
                    "done\\n2026-12-07T23:00:00.000000Z  WARN corral: plugin neighbour crashed\\r"
                ),
                "{line}"
            );
            assert!(line.contains("attacker"), "{line}");
        }
        assert!(lines[2].ends_with("plain"), "{}", lines[2]);
        assert!(!text.contains('\r'));
    }
}
