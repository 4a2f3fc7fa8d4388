//! The `corral` command line. `main` parses [`Cli`] and calls [`run`].

use crate::control::{ControlClient, ControlServer, default_socket_path};
use crate::{Config, Options, Supervisor};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use corral_protocol::{CallError, ControlRequest, ControlResponse, PluginInfo};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Documented exit codes of `corral`.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (I/O, internal error).
    pub const FAILURE: u8 = 1;
    /// Command-line usage error (from clap).
    pub const USAGE: u8 = 2;
    /// The plugin function ran and returned an error of its own.
    pub const PLUGIN_ERROR: u8 = 3;
    /// The call was stopped: trap, deadline, memory limit or output limit.
    pub const CALL_STOPPED: u8 = 4;
    /// The worker crashed, could not start, or the plugin is marked failed.
    pub const WORKER_FAILED: u8 = 5;
    /// Unknown plugin or function.
    pub const NOT_FOUND: u8 = 6;
    /// Invalid input, manifest or configuration.
    pub const INVALID: u8 = 7;
    /// The daemon could not be reached.
    pub const UNREACHABLE: u8 = 8;
    /// The plugin is overloaded or the supervisor is shutting down; retry later.
    pub const UNAVAILABLE: u8 = 9;
}

/// Map a call error to its exit code.
pub fn exit_code_for(e: &CallError) -> u8 {
    match e {
        CallError::Plugin { .. } => exit::PLUGIN_ERROR,
        CallError::Trap { .. }
        | CallError::Timeout { .. }
        | CallError::MemoryLimit { .. }
        | CallError::OutputTooLarge { .. } => exit::CALL_STOPPED,
        CallError::WorkerCrashed(_)
        | CallError::PluginFailed { .. }
        | CallError::StartFailed { .. } => exit::WORKER_FAILED,
        CallError::UnknownPlugin { .. } | CallError::UnknownFunction { .. } => exit::NOT_FOUND,
        CallError::BadInput { .. } => exit::INVALID,
        CallError::Overloaded { .. } | CallError::ShuttingDown => exit::UNAVAILABLE,
    }
}

/// Short machine-readable name of a call error (the `kind` in `--json` output).
pub fn error_kind(e: &CallError) -> &'static str {
    match e {
        CallError::Plugin { .. } => "plugin_error",
        CallError::Trap { .. } => "trap",
        CallError::Timeout { .. } => "timeout",
        CallError::MemoryLimit { .. } => "memory_limit",
        CallError::OutputTooLarge { .. } => "output_too_large",
        CallError::WorkerCrashed(_) => "worker_crashed",
        CallError::PluginFailed { .. } => "plugin_failed",
        CallError::StartFailed { .. } => "start_failed",
        CallError::UnknownPlugin { .. } => "unknown_plugin",
        CallError::UnknownFunction { .. } => "unknown_function",
        CallError::BadInput { .. } => "bad_input",
        CallError::Overloaded { .. } => "overloaded",
        CallError::ShuttingDown => "shutting_down",
    }
}

/// Corral runs untrusted WebAssembly, JavaScript and Python plugins in confined
/// worker processes.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `corral=debug`.
    #[arg(long, global = true, env = "CORRAL_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one function of the plugin in a directory, without a daemon.
    Run {
        /// Directory holding plugin.toml.
        plugin_dir: PathBuf,
        function: String,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        out: OutputArgs,
        /// Directory of the worker binaries (default: beside `corral`).
        #[arg(long, env = "CORRAL_WORKER_DIR")]
        worker_dir: Option<PathBuf>,
        /// Module cache directory (default: ~/.cache/corral).
        #[arg(long, env = "CORRAL_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Isolation level: standard or high (maximum is not built yet).
        #[arg(long, default_value = "standard", value_parser = parse_level)]
        level: corral_confine::Level,
    },
    /// Run the daemon: load the configured plugins and serve the control socket.
    Serve {
        /// Daemon configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Control socket (overrides the configuration).
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Call a function of a plugin in the running daemon.
    Call {
        plugin: String,
        function: String,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        out: OutputArgs,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Show each plugin's state and what its worker really enforces.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// List the daemon's plugins and their state.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Ask the daemon to shut down gracefully.
    Stop {
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
}

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
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        match (&self.input, &self.input_file) {
            (Some(s), _) => Ok(s.clone().into_bytes()),
            (None, Some(p)) if p == Path::new("-") => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .context("failed to read standard input")?;
                Ok(buf)
            }
            (None, Some(p)) => {
                std::fs::read(p).with_context(|| format!("failed to read {}", p.display()))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print a JSON object (`{"ok":true,"output":...}` or `{"ok":false,"error":...}`).
    #[arg(long)]
    json: bool,
    /// Per-call deadline, e.g. `500ms` or `10s` (default: the plugin's own).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

fn parse_level(s: &str) -> Result<corral_confine::Level, String> {
    let level: corral_confine::Level = s.parse()?;
    level.available()?;
    Ok(level)
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    corral_manifest::parse_duration(s)
}

/// Run the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                plugin_dir,
                function,
                input,
                out,
                worker_dir,
                cache_dir,
                level,
            } => {
                let mut options = Options::new();
                options.level = level;
                if let Some(d) = worker_dir {
                    options.worker_dir = d;
                }
                if let Some(d) = cache_dir {
                    options.cache_dir = Some(d);
                }
                let mut sup = Supervisor::new(options);
                let id = match sup.add_plugin_dir(&plugin_dir) {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("error: {}", crate::supervisor::error_chain(&e));
                        return Ok(exit::INVALID);
                    }
                };
                let bytes = input.read()?;
                let result = sup.call(&id, &function, bytes, out.timeout).await;
                sup.shutdown(Duration::from_secs(2)).await;
                print_result(result, out.json)
            }
            Command::Serve { config, socket } => serve(&config, socket).await,
            Command::Call {
                plugin,
                function,
                input,
                out,
                socket,
            } => {
                let bytes = input.read()?;
                let req = ControlRequest::Call {
                    plugin,
                    function,
                    input: bytes,
                    timeout_ms: out.timeout.map(|t| t.as_millis() as u64),
                };
                match request(socket, &req).await? {
                    Err(code) => Ok(code),
                    Ok(ControlResponse::Called(result)) => print_result(result, out.json),
                    Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
                }
            }
            Command::List { json, socket } => match request(socket, &ControlRequest::List).await? {
                Err(code) => Ok(code),
                Ok(ControlResponse::Plugins(plugins)) => {
                    print_plugins(&plugins, json)?;
                    Ok(exit::OK)
                }
                Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
            },
            Command::Status { json, socket } => match request(socket, &ControlRequest::List).await?
            {
                Err(code) => Ok(code),
                Ok(ControlResponse::Plugins(plugins)) if json => {
                    print_plugins(&plugins, true)?;
                    Ok(exit::OK)
                }
                Ok(ControlResponse::Plugins(plugins)) => {
                    print_status(&plugins)?;
                    Ok(exit::OK)
                }
                Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
            },
            Command::Stop { socket } => match request(socket, &ControlRequest::Shutdown).await? {
                Err(code) => Ok(code),
                Ok(_) => Ok(exit::OK),
            },
        }
    })
}

async fn serve(config_path: &Path, socket: Option<PathBuf>) -> anyhow::Result<u8> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", crate::supervisor::error_chain(&e));
            return Ok(exit::INVALID);
        }
    };
    let mut sup = Supervisor::new(config.options.clone());
    for dir in &config.plugins {
        match sup.add_plugin_dir(dir) {
            Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin added"),
            Err(e) => {
                eprintln!("error: {}", crate::supervisor::error_chain(&e));
                return Ok(exit::INVALID);
            }
        }
    }
    let socket = socket
        .or(config.socket.clone())
        .unwrap_or_else(default_socket_path);
    let server = ControlServer::bind(&socket)
        .await
        .with_context(|| format!("failed to serve {}", socket.display()))?;
    let sup = Arc::new(sup);
    let stop = Arc::new(Notify::new());
    let signals = Arc::clone(&stop);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        signals.notify_one();
    });
    eprintln!(
        "corral: serving {} plugin(s) on {}",
        config.plugins.len(),
        server.path().display()
    );
    server.serve(Arc::clone(&sup), stop).await;
    eprintln!("corral: shutting down");
    sup.shutdown(Duration::from_secs(5)).await;
    Ok(exit::OK)
}

/// Send one request to the daemon; `Err(code)` when it cannot be reached.
async fn request(
    socket: Option<PathBuf>,
    req: &ControlRequest,
) -> anyhow::Result<Result<ControlResponse, u8>> {
    let path = socket.unwrap_or_else(default_socket_path);
    let mut client = match ControlClient::connect(&path).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", crate::supervisor::error_chain(&e));
            return Ok(Err(exit::UNREACHABLE));
        }
    };
    match client
        .request(req)
        .await
        .context("the daemon did not answer")?
    {
        ControlResponse::Rejected(why) => bail!("the daemon rejected the request: {why}"),
        resp => Ok(Ok(resp)),
    }
}

fn print_result(result: Result<Vec<u8>, CallError>, json: bool) -> anyhow::Result<u8> {
    let mut stdout = std::io::stdout().lock();
    match (result, json) {
        (Ok(out), false) => {
            stdout.write_all(&out)?;
            if !out.ends_with(b"\n") && !out.is_empty() {
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

fn print_plugins(plugins: &[PluginInfo], json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let v: Vec<_> = plugins
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "version": p.version, "runtime": p.runtime.as_str(),
                    "dir": p.dir, "level": p.level, "state": p.state, "pid": p.pid,
                    "restarts": p.restarts, "calls": p.calls, "last_error": p.last_error,
                    "exports": p.exports,
                    "enforcement": p.enforcement.as_ref().map(enforcement_json),
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
        "uid": r.uid, "gid": r.gid,
    })
}

fn print_status(plugins: &[PluginInfo]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
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
        match &p.enforcement {
            Some(r) => {
                writeln!(out, "  landlock    {}", r.landlock)?;
                writeln!(out, "  seccomp     {}", r.seccomp)?;
                writeln!(out, "  namespaces  {}", r.namespaces)?;
                writeln!(out, "  cgroup      {}", r.cgroup)?;
                writeln!(
                    out,
                    "  process     no_new_privs {}, uid {}, gid {}",
                    if r.no_new_privs { "on" } else { "off" },
                    r.uid,
                    r.gid
                )?;
            }
            None => writeln!(
                out,
                "  (no worker running: enforcement is reported at start)"
            )?,
        }
        if let Some(e) = &p.last_error {
            writeln!(out, "  last error  {e}")?;
        }
    }
    Ok(())
}
