//! The worker side of Corral: the loop every worker binary runs, the [`Engine`] trait
//! each runtime implements once, and the [`Host`] client through which plugin code
//! reaches the supervisor.
//!
//! A worker binary is a few lines:
//!
//! ```no_run
//! # use corral_worker::{Engine, Host, EngineInfo};
//! # use corral_protocol::{CallError, LoadSpec, WorkerKind};
//! # use std::time::Duration;
//! # struct MyEngine;
//! # impl Engine for MyEngine {
//! #   fn info(&self) -> EngineInfo { EngineInfo { kind: WorkerKind::Wasm, version: "x".into() } }
//! #   fn load(&mut self, _: &LoadSpec, _: &Host) -> Result<Vec<String>, String> { Ok(vec![]) }
//! #   fn call(&mut self, _: &str, _: &[u8], _: Duration, _: &Host) -> Result<Vec<u8>, CallError> { Ok(vec![]) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     corral_worker::run(MyEngine)
//! }
//! ```
//!
//! # Order of start-up
//!
//! [`run`] takes the inherited socket, lets the engine initialise (shared libraries,
//! runtime files), then applies confinement ([`Confinement`]) and only then sends
//! its handshake and accepts a `Load`: no plugin code, not even top-level code, runs
//! before confinement is in force. The handshake carries what confinement reports
//! as enforced; the supervisor decides whether that is enough.
//!
//! # Exit codes
//!
//! 0 after `Shutdown` or when the supervisor closes the socket; 70 when the plugin
//! could not be loaded; 71 when the socket is missing or the supervisor broke the
//! protocol; 72 when confinement could not be applied.

mod host;
pub mod services;

pub use host::{Host, MAX_LOG};

use corral_protocol::{
    CallError, EnforcementReport, FromWorker, LoadSpec, ToWorker, WORKER_SOCKET_ENV,
    WORKER_SOCKET_FD, WorkerKind, WorkerStats, error_chain, frame,
};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code: the plugin could not be loaded.
pub const EXIT_LOAD_FAILED: u8 = 70;
/// Exit code: no usable socket, or the supervisor broke the protocol.
pub const EXIT_PROTOCOL: u8 = 71;
/// Exit code: confinement could not be applied.
pub const EXIT_CONFINE_FAILED: u8 = 72;

/// The runtime files of an engine ([`Engine::runtime_files`]).
#[derive(Debug, Clone, Default)]
pub struct RuntimeFiles {
    /// Trees to be readable (and shown at `maximum`).
    pub read: Vec<PathBuf>,
    /// Directories directly inside those trees that stay unreadable (an
    /// interpreter's `site-packages`).
    pub hide: Vec<PathBuf>,
}

/// What an engine says about itself in the handshake.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    pub kind: WorkerKind,
    /// e.g. `wasmtime 48.0.8`.
    pub version: String,
}

/// One runtime. Implemented once per engine; the loop, framing and confinement are
/// shared.
pub trait Engine {
    fn info(&self) -> EngineInfo;

    /// Trees of runtime files the engine reads while it serves (an interpreter's
    /// standard library), to be readable under confinement and shown in the
    /// `maximum` view. Runs first of all, with the privileges the worker started
    /// with (before it drops root), so it may also open handles on them that stay
    /// usable after the drop.
    fn runtime_files(&mut self) -> Result<RuntimeFiles, String> {
        Ok(RuntimeFiles::default())
    }

    /// Engine set-up that must happen before confinement (loading shared libraries,
    /// opening runtime files). Runs no plugin code.
    fn prepare(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Load the plugin and run its `init` hook; return the exported function names.
    fn load(&mut self, spec: &LoadSpec, host: &Host) -> Result<Vec<String>, String>;

    /// Run `function` on `input` within `deadline`.
    fn call(
        &mut self,
        function: &str,
        input: &[u8],
        deadline: Duration,
        host: &Host,
    ) -> Result<Vec<u8>, CallError>;

    /// Run the plugin's `shutdown` hook, if it has one, within `grace`.
    fn shutdown(&mut self, _grace: Duration, _host: &Host) {}

    /// Memory the engine currently uses for the plugin, in bytes.
    fn memory_bytes(&self) -> u64 {
        0
    }
}

/// Confinement the worker applies to itself after [`Engine::prepare`] and before any
/// plugin code. The default applies nothing and says so in the report.
pub trait Confinement {
    /// Enter namespaces that need a single-threaded process (level `maximum`). Runs
    /// first, before the engine is set up; may fork (see `corral_confine`).
    /// `runtime` are the engine's [`Engine::runtime_files`], readable besides what the
    /// supervisor asked for.
    fn isolate(&self, _runtime: &RuntimeFiles) -> Result<(), String> {
        Ok(())
    }
    fn apply(self, runtime: &RuntimeFiles) -> Result<EnforcementReport, String>;
}

/// No self-confinement; the report says why.
#[derive(Debug)]
pub struct NoConfinement;

impl Confinement for NoConfinement {
    fn apply(self, _runtime: &RuntimeFiles) -> Result<EnforcementReport, String> {
        Ok(EnforcementReport::unconfined(
            "worker confinement not configured",
        ))
    }
}

/// The confinement the supervisor asked for in `CORRAL_CONFINE`
/// ([`corral_confine::SelfConfinement`]); none if the variable is absent (a worker
/// started by a test harness, say), which its report then says.
#[derive(Debug)]
pub struct SupervisorConfinement;

impl SupervisorConfinement {
    /// The supervisor's spec with the engine's runtime files added to what is read.
    fn spec(runtime: &RuntimeFiles) -> Result<Option<corral_confine::SelfConfinement>, String> {
        let mut spec = corral_confine::SelfConfinement::from_env().map_err(|e| error_chain(&e))?;
        if let Some(spec) = spec.as_mut() {
            spec.read.extend(runtime.read.iter().cloned());
            spec.hide.extend(runtime.hide.iter().cloned());
        }
        Ok(spec)
    }
}

impl Confinement for SupervisorConfinement {
    fn isolate(&self, runtime: &RuntimeFiles) -> Result<(), String> {
        match Self::spec(runtime)? {
            Some(spec) => spec.isolate().map_err(|e| error_chain(&e)),
            None => Ok(()),
        }
    }

    fn apply(self, runtime: &RuntimeFiles) -> Result<EnforcementReport, String> {
        match Self::spec(runtime)? {
            Some(spec) => spec.apply().map_err(|e| error_chain(&e)),
            None => NoConfinement.apply(runtime),
        }
    }
}

/// Run a worker confined as the supervisor asked. See [`run_confined`].
pub fn run(engine: impl Engine) -> ExitCode {
    run_confined(engine, SupervisorConfinement)
}

/// Run the worker loop on the inherited socket until shutdown.
pub fn run_confined(mut engine: impl Engine, confinement: impl Confinement) -> ExitCode {
    let runtime = match engine.runtime_files() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corral worker: engine set-up failed: {e}");
            return ExitCode::from(EXIT_LOAD_FAILED);
        }
    };
    if let Err(e) = confinement.isolate(&runtime) {
        eprintln!("corral worker: confinement failed: {e}");
        return ExitCode::from(EXIT_CONFINE_FAILED);
    }
    let stream = match inherited_socket() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corral worker: {e}");
            return ExitCode::from(EXIT_PROTOCOL);
        }
    };
    if let Err(e) = engine.prepare() {
        eprintln!("corral worker: engine set-up failed: {e}");
        return ExitCode::from(EXIT_LOAD_FAILED);
    }
    let enforcement = match confinement.apply(&runtime) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corral worker: confinement failed: {e}");
            return ExitCode::from(EXIT_CONFINE_FAILED);
        }
    };
    let host = Host::new(stream);
    let info = engine.info();
    let hello = corral_protocol::Hello {
        kind: info.kind,
        engine_version: info.version,
        pid: std::process::id(),
        enforcement,
    };
    if let Err(e) = host.send_hello(&hello) {
        eprintln!("corral worker: handshake failed: {e}");
        return ExitCode::from(EXIT_PROTOCOL);
    }
    serve(&mut engine, &host)
}

fn serve(engine: &mut impl Engine, host: &Host) -> ExitCode {
    let mut max_output = u64::MAX;
    let mut stats = WorkerStats::default();
    loop {
        let msg = match host.next_message() {
            Ok(m) => m,
            // The supervisor went away: nothing left to serve.
            Err(frame::FrameError::Closed) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("corral worker: {e}");
                return ExitCode::from(EXIT_PROTOCOL);
            }
        };
        let reply = match msg {
            ToWorker::Load(spec) => {
                host.set_config(spec.config.clone(), spec.secrets.clone());
                max_output = spec.limits.max_output_bytes;
                match engine.load(&spec, host) {
                    Ok(exports) => FromWorker::Loaded { exports },
                    Err(error) => {
                        let _ = host.send(&FromWorker::LoadFailed { error });
                        return ExitCode::from(EXIT_LOAD_FAILED);
                    }
                }
            }
            ToWorker::Call {
                id,
                function,
                input,
                deadline_ms,
            } => {
                host.set_current_call(id);
                let deadline = Duration::from_millis(deadline_ms);
                let result = engine
                    .call(&function, &input, deadline, host)
                    .and_then(|out| check_output(out, max_output));
                host.set_current_call(0);
                stats.calls += 1;
                stats.errors += u64::from(result.is_err());
                FromWorker::CallResult { id, result }
            }
            ToWorker::Stats => {
                stats.memory_bytes = engine.memory_bytes();
                FromWorker::Stats(stats.clone())
            }
            ToWorker::Shutdown { grace_ms } => {
                engine.shutdown(Duration::from_millis(grace_ms), host);
                return ExitCode::SUCCESS;
            }
            ToWorker::HostResult { id, .. } => {
                eprintln!("corral worker: answer to host call {id} that is not pending");
                return ExitCode::from(EXIT_PROTOCOL);
            }
        };
        if let Err(e) = host.send(&reply) {
            eprintln!("corral worker: {e}");
            return ExitCode::from(EXIT_PROTOCOL);
        }
    }
}

/// The spec to load again after an engine discarded its instance (a trap, deadline
/// or memory limit), for engines that start a fresh one at the next call.
pub fn spec_to_reload(spec: &Option<LoadSpec>) -> Result<LoadSpec, CallError> {
    spec.clone().ok_or_else(|| CallError::BadInput {
        reason: "no plugin loaded".into(),
    })
}

/// The error when that fresh instance could not be made.
pub fn reload_failed(message: String) -> CallError {
    CallError::Trap {
        message: format!("reloading after the last failure: {message}"),
    }
}

/// `Ok` if the plugin exports `function`, else the typed error that lists what it
/// does export.
pub fn check_export(
    spec: Option<&LoadSpec>,
    exports: &[String],
    function: &str,
) -> Result<(), CallError> {
    if exports.iter().any(|e| e == function) {
        return Ok(());
    }
    Err(CallError::UnknownFunction {
        plugin: spec.map(|s| s.plugin_id.clone()).unwrap_or_default(),
        function: function.to_owned(),
        exports: exports.join(", "),
    })
}

fn check_output(out: Vec<u8>, limit: u64) -> Result<Vec<u8>, CallError> {
    let size = out.len() as u64;
    if size > limit {
        return Err(CallError::OutputTooLarge { size, limit });
    }
    Ok(out)
}

/// Take ownership of the socket the supervisor left at [`WORKER_SOCKET_FD`].
fn inherited_socket() -> Result<UnixStream, String> {
    let expected = WORKER_SOCKET_FD.to_string();
    match std::env::var(WORKER_SOCKET_ENV) {
        Ok(v) if v == expected => {}
        _ => {
            return Err(format!(
                "no supervisor socket: workers are started by the corral supervisor \
                 ({WORKER_SOCKET_ENV}={expected} and a socket at fd {expected})"
            ));
        }
    }
    // SAFETY: `fcntl(F_GETFD)` only queries the descriptor table; any fd value is fine.
    let flags = unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_GETFD) };
    if flags < 0 {
        return Err(format!("fd {WORKER_SOCKET_FD} is not open"));
    }
    // SAFETY: the fd is open (checked above) and nothing else in this process owns it:
    // the supervisor placed it there for us and we take it exactly once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) };
    // Make sure it is a Unix stream socket before trusting it.
    let stream = UnixStream::from(fd);
    stream
        .local_addr()
        .map_err(|e| format!("fd {WORKER_SOCKET_FD} is not a unix socket: {e}"))?;
    // SAFETY: plain fcntl on a descriptor we own; sets close-on-exec so that nothing
    // the engine might exec inherits the supervisor channel.
    unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(stream)
}
