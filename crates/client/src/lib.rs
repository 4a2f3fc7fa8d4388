//! What `corral call` is made of, shared by the two binaries that answer it: the
//! front (`corral`, this crate's binary, small so that it starts in a fraction of
//! the full command line's time) and `corral-supervisor` (the daemon and every
//! other command, which answers `call` with the same code when it is run as it).
//!
//! - [`CallArgs`], [`InputArgs`], [`OutputArgs`]: the arguments, one definition for
//!   both binaries' `--help` and parsing.
//! - [`call`]: one request on the control socket, blocking (no async runtime).
//! - [`print_result`]: a call's result on standard output or error, and its exit code.
//! - [`exit`]: the documented exit codes and the one place failures become them.

pub mod exit;

use anyhow::Context;
use clap::Args;
use corral_protocol::{CallError, ControlRequest, ControlResponse, frame};
use exit::{Failure, Outcome};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The arguments of `corral call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    pub plugin: String,
    pub function: String,
    #[command(flatten)]
    pub input: InputArgs,
    #[command(flatten)]
    pub out: OutputArgs,
    #[arg(long, env = "CORRAL_SOCKET")]
    pub socket: Option<PathBuf>,
}

/// Where a call's input comes from (one of the two, or none).
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct InputArgs {
    /// Input as a string.
    #[arg(long)]
    input: Option<String>,
    /// Read the input from a file (`-` for standard input).
    #[arg(long)]
    input_file: Option<PathBuf>,
}

impl InputArgs {
    /// The input's bytes (empty when none was given).
    pub fn read(&self) -> anyhow::Result<Vec<u8>> {
        match (&self.input, &self.input_file) {
            (Some(s), _) => Ok(s.clone().into_bytes()),
            (None, Some(p)) if p == Path::new("-") => {
                read_capped(std::io::stdin(), "standard input")
            }
            (None, Some(p)) => {
                let f = std::fs::File::open(p)
                    .with_context(|| format!("failed to read {}", p.display()))?;
                read_capped(f, &p.display().to_string())
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// Read a call's input, at most one frame's worth: a larger input could never be
/// sent, so it is refused before it fills memory.
fn read_capped(r: impl std::io::Read, what: &str) -> anyhow::Result<Vec<u8>> {
    let max = u64::from(frame::MAX_FRAME);
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(r, max + 1), &mut buf)
        .with_context(|| format!("failed to read {what}"))?;
    if buf.len() as u64 > max {
        anyhow::bail!("{what}: input larger than {max} bytes (one frame)");
    }
    Ok(buf)
}

/// How a call's result is printed, and its deadline.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print a JSON object (`{"ok":true,"output":...}` or `{"ok":false,"error":...}`).
    #[arg(long)]
    pub json: bool,
    /// Per-call deadline, e.g. `500ms` or `10s` (default: the plugin's own).
    #[arg(long, value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

/// A deadline as manifests and policy files write one (`500ms`, `10s`).
pub fn parse_timeout(s: &str) -> Result<Duration, corral_manifest::ValueError> {
    corral_manifest::parse_duration(s)
}

/// The default control socket path: `$XDG_RUNTIME_DIR/corral/control.sock`, else
/// `/run/corral/control.sock` for root, else `/tmp/corral-<uid>/control.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("corral/control.sock");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/corral/control.sock")
    } else {
        PathBuf::from(format!("/tmp/corral-{uid}/control.sock"))
    }
}

/// Why the daemon's control socket could not be dialled (the words are the
/// supervisor's own client's, `ControlError::Connect`).
#[derive(Debug)]
struct Unreachable {
    path: PathBuf,
    source: std::io::Error,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot connect to the corral daemon at {} (is `corral serve` running?)",
            self.path.display()
        )
    }
}

impl std::error::Error for Unreachable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// `corral call`: send the call to the daemon, wait for its answer, print it.
/// Blocking: one connection, one request, one answer.
pub fn call(args: CallArgs) -> Outcome {
    let req = ControlRequest::Call {
        plugin: args.plugin,
        function: args.function,
        input: args.input.read()?,
        timeout_ms: args.out.timeout.map(|t| t.as_millis() as u64),
    };
    let path = args.socket.unwrap_or_else(default_socket_path);
    let mut conn = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(c) => c,
        Err(source) => {
            return Err(Failure::chain(exit::UNREACHABLE, &Unreachable { path, source }).into());
        }
    };
    let answer = (|| {
        conn.write_all(&frame::encode(&req)?)
            .map_err(frame::FrameError::Io)?;
        frame::read_msg::<ControlResponse>(&mut conn, frame::MAX_FRAME)
    })()
    .context("the daemon did not answer")?;
    match answer {
        ControlResponse::Called(result) => print_result(result, args.out.json),
        ControlResponse::Rejected(why) => anyhow::bail!("the daemon rejected the request: {why}"),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// Print a call's result (its output's exact bytes, or `--json`'s object) and
/// return its exit code; a call's own error is an exit code, not a failure.
pub fn print_result(result: Result<Vec<u8>, CallError>, json: bool) -> Outcome {
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
            Ok(exit::exit_code_for(&e))
        }
        (Err(e), true) => {
            let v = serde_json::json!({
                "ok": false,
                "error": { "kind": exit::error_kind(&e), "message": e.to_string() },
            });
            writeln!(stdout, "{v}")?;
            Ok(exit::exit_code_for(&e))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_input_is_refused_at_one_frame() {
        // /dev/zero as --input-file: read up to one frame plus a byte, then refused.
        let e = read_capped(std::io::repeat(0), "/dev/zero").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "/dev/zero: input larger than {} bytes (one frame)",
                frame::MAX_FRAME
            )
        );
        assert_eq!(read_capped(&b"abc"[..], "x").unwrap(), b"abc");
    }

    #[test]
    fn an_unreachable_daemon_is_named_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let args = CallArgs {
            plugin: "p".into(),
            function: "f".into(),
            input: InputArgs {
                input: None,
                input_file: None,
            },
            out: OutputArgs {
                json: false,
                timeout: None,
            },
            socket: Some(socket.clone()),
        };
        let e = call(args).unwrap_err().downcast::<Failure>().unwrap();
        assert_eq!(e.code, exit::UNREACHABLE);
        assert_eq!(
            e.message,
            format!(
                "cannot connect to the corral daemon at {} (is `corral serve` running?): \
                 No such file or directory (os error 2)",
                socket.display()
            )
        );
    }
}
