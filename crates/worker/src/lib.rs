//! The worker side of Corral: the loop every worker binary runs, the [`Engine`] and
//! [`Instance`] traits each runtime implements once, the [`Host`] client through
//! which plugin code reaches the supervisor, and the [`Watchdog`] deadline thread.
//!
//! An engine sets itself up and makes instances of a plugin; the loop owns the rest:
//! the protocol, confinement before any plugin code, the export check, the output
//! limit, and recycling an instance after a trap, timeout or memory limit (the next
//! call gets a fresh one). A worker binary is a few lines:
//!
//! ```no_run
//! # use corral_worker::{Engine, EngineInfo, Host, Instance, LoadError};
//! # use corral_protocol::{CallError, LoadSpec, Runtime};
//! # use std::time::Duration;
//! # struct MyEngine;
//! # struct Mine(Vec<String>);
//! # impl Instance for Mine {
//! #   fn exports(&self) -> &[String] { &self.0 }
//! #   fn call(&mut self, _: &str, _: &[u8], _: Duration, _: &Host) -> Result<Vec<u8>, CallError> { Ok(vec![]) }
//! # }
//! # impl Engine for MyEngine {
//! #   type Instance = Mine;
//! #   fn info(&self) -> EngineInfo { EngineInfo { runtime: Runtime::Wasm, version: "x".into() } }
//! #   fn instantiate(&mut self, _: &LoadSpec, _: &Host) -> Result<Mine, LoadError> { Ok(Mine(vec![])) }
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

mod errors;
mod host;
mod serve;
pub mod services;
mod watchdog;
mod zygote;

pub use errors::{LoadError, SetupError};
pub use host::{Host, MAX_LOG};
pub use watchdog::{Armed, Watchdog};

use corral_confine::ConfineError;
use corral_protocol::{
    CallError, EnforcementReport, LoadSpec, Runtime, WORKER_SOCKET_ENV, WORKER_SOCKET_FD,
    error_chain,
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
    pub runtime: Runtime,
    /// e.g. `wasmtime 48.0.8`.
    pub version: String,
}

/// One runtime. Implemented once per engine; the loop, framing, confinement and the
/// rules every call follows are shared.
pub trait Engine {
    /// A loaded plugin, ready for calls.
    type Instance: Instance;

    fn info(&self) -> EngineInfo;

    /// Trees of runtime files the engine reads while it serves (an interpreter's
    /// standard library), to be readable under confinement and shown in the
    /// `maximum` view. Runs first of all, with the privileges the worker started
    /// with (before it drops root), so it may also open handles on them that stay
    /// usable after the drop.
    fn runtime_files(&mut self) -> Result<RuntimeFiles, SetupError> {
        Ok(RuntimeFiles::default())
    }

    /// Engine set-up that must happen before confinement (loading shared libraries,
    /// opening runtime files). Runs no plugin code. In a worker forked from a
    /// template it runs a second time, after [`Confinement::isolate`]: an engine
    /// finishes there what depends on the worker (paths its user can reach).
    fn prepare(&mut self) -> Result<(), SetupError> {
        Ok(())
    }

    /// Set-up in a zygote template, before it forks workers: [`Engine::prepare`],
    /// and whatever else every worker may share (imports, frozen heaps). Runs as
    /// the supervisor's user, unconfined, and runs no plugin code.
    fn warm(&mut self) -> Result<(), SetupError> {
        self.prepare()
    }

    /// Descriptors the engine holds that a forked worker keeps (above fd 3).
    fn kept_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Just before a template forks (an interpreter takes its locks).
    fn before_fork(&mut self) {}

    /// Just after a template forked, in the template (`child` false) or in the new
    /// worker (`child` true: reseed what must differ between workers).
    fn after_fork(&mut self, child: bool) {
        let _ = child;
    }

    /// Load the plugin `spec` names and run its top-level code and `init` hook
    /// within `spec.limits.init_deadline_ms`. Called at `Load`, and again at the
    /// next call after the loop discarded an instance; an engine may keep what does
    /// not change between the two (a compiled module).
    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<Self::Instance, LoadError>;

    /// Compile the plugin `spec` names into `out` and run none of it: the worker is
    /// a compile helper (`Code::CompileOnly`), whose artefact the supervisor shares
    /// between every worker of a module with the same bytes. Only engines with
    /// precompiled code have one.
    fn precompile(&mut self, spec: &LoadSpec, out: &mut std::fs::File) -> Result<(), LoadError> {
        let _ = (spec, out);
        Err(LoadError::Engine(
            "this engine has no precompiled code".into(),
        ))
    }
}

/// The file a compile helper writes its artefact into ([`corral_protocol::ARTIFACT_FD`]),
/// taken once.
pub(crate) fn artifact_file() -> Result<std::fs::File, LoadError> {
    use corral_protocol::ARTIFACT_FD;
    // SAFETY: `fcntl(F_GETFD)` only queries the descriptor table.
    let flags = unsafe { libc::fcntl(ARTIFACT_FD, libc::F_GETFD) };
    if flags < 0 {
        return Err(LoadError::Engine(format!(
            "a compile helper needs its artefact file at fd {ARTIFACT_FD}, which is not open"
        )));
    }
    // SAFETY: the fd is open (checked above); the supervisor placed it for this
    // helper and it is taken exactly once, at its only `Load`.
    Ok(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(ARTIFACT_FD)
    }))
}

/// A loaded plugin. The loop checks a call's function against [`Instance::exports`]
/// before it calls, checks the output against the plugin's `max_output`, and drops
/// the instance after a `Trap`, `Timeout` or `MemoryLimit` (its state is suspect).
pub trait Instance {
    /// The plugin's callable functions, sorted; lifecycle hooks are not among them.
    fn exports(&self) -> &[String];

    /// Run `function` (one of [`Instance::exports`]) on `input` within `deadline`.
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
    fn isolate(&self, _runtime: &RuntimeFiles) -> Result<(), ConfineError> {
        Ok(())
    }
    fn apply(self, runtime: &RuntimeFiles) -> Result<EnforcementReport, ConfineError>;
}

/// No self-confinement; the report says why.
#[derive(Debug)]
pub struct NoConfinement;

impl Confinement for NoConfinement {
    fn apply(self, _runtime: &RuntimeFiles) -> Result<EnforcementReport, ConfineError> {
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
    fn spec(
        runtime: &RuntimeFiles,
    ) -> Result<Option<corral_confine::SelfConfinement>, ConfineError> {
        let mut spec = corral_confine::SelfConfinement::from_env()?;
        if let Some(spec) = spec.as_mut() {
            spec.read.extend(runtime.read.iter().cloned());
            spec.hide.extend(runtime.hide.iter().cloned());
        }
        Ok(spec)
    }
}

impl Confinement for SupervisorConfinement {
    fn isolate(&self, runtime: &RuntimeFiles) -> Result<(), ConfineError> {
        match Self::spec(runtime)? {
            Some(spec) => spec.isolate(),
            None => Ok(()),
        }
    }

    fn apply(self, runtime: &RuntimeFiles) -> Result<EnforcementReport, ConfineError> {
        match Self::spec(runtime)? {
            Some(spec) => spec.apply(),
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
        Err(e) => return fail("engine set-up failed", &e, EXIT_LOAD_FAILED),
    };
    if std::env::var_os(corral_protocol::template::TEMPLATE_ENV).is_some_and(|v| v == "1") {
        if let Err(e) = engine.warm() {
            return fail("template set-up failed", &e, EXIT_LOAD_FAILED);
        }
        // Every worker of this runtime installs the same programs: compiled once,
        // here, they are only installed after each fork.
        if let Err(e) = corral_confine::precompile_seccomp(engine.info().runtime) {
            return fail("template set-up failed", &e, EXIT_CONFINE_FAILED);
        }
        // Returns only in a forked worker, set up as the supervisor asked; the
        // template itself ends there when the supervisor closes its socket.
        if let Err(code) = zygote::serve_template(&mut engine) {
            return code;
        }
    }
    if let Err(e) = confinement.isolate(&runtime) {
        return fail("confinement failed", &e, EXIT_CONFINE_FAILED);
    }
    let stream = match inherited_socket() {
        Ok(s) => s,
        Err(e) => return fail("no supervisor socket", &e, EXIT_PROTOCOL),
    };
    if let Err(e) = engine.prepare() {
        return fail("engine set-up failed", &e, EXIT_LOAD_FAILED);
    }
    let enforcement = match confinement.apply(&runtime) {
        Ok(r) => r,
        Err(e) => return fail("confinement failed", &e, EXIT_CONFINE_FAILED),
    };
    let host = Host::new(stream);
    let info = engine.info();
    let hello = corral_protocol::Hello {
        runtime: info.runtime,
        engine_version: info.version,
        pid: std::process::id(),
        enforcement,
        runtime_files: runtime
            .read
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
    };
    if let Err(e) = host.send_hello(&hello) {
        return fail("handshake failed", &e, EXIT_PROTOCOL);
    }
    ExitCode::from(serve::serve(&mut engine, &host))
}

/// Say on stderr (which the supervisor reads) why the worker stops, and exit.
fn fail(what: &str, e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprintln!("corral worker: {what}: {}", error_chain(e));
    ExitCode::from(code)
}

/// Why the inherited socket cannot be used.
#[derive(Debug, thiserror::Error)]
enum SocketError {
    #[error(
        "workers are started by the corral supervisor ({WORKER_SOCKET_ENV}={WORKER_SOCKET_FD} \
         and a socket at fd {WORKER_SOCKET_FD})"
    )]
    Missing,
    #[error("fd {WORKER_SOCKET_FD} is not open")]
    Closed,
    #[error("fd {WORKER_SOCKET_FD} is not a unix socket")]
    Other(#[source] std::io::Error),
}

/// Take ownership of the socket the supervisor left at [`WORKER_SOCKET_FD`].
fn inherited_socket() -> Result<UnixStream, SocketError> {
    if std::env::var(WORKER_SOCKET_ENV).ok() != Some(WORKER_SOCKET_FD.to_string()) {
        return Err(SocketError::Missing);
    }
    // SAFETY: `fcntl(F_GETFD)` only queries the descriptor table; any fd value is fine.
    let flags = unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_GETFD) };
    if flags < 0 {
        return Err(SocketError::Closed);
    }
    // SAFETY: the fd is open (checked above) and nothing else in this process owns it:
    // the supervisor placed it there for us and we take it exactly once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) };
    // Make sure it is a Unix stream socket before trusting it.
    let stream = UnixStream::from(fd);
    stream.local_addr().map_err(SocketError::Other)?;
    // SAFETY: plain fcntl on a descriptor we own; sets close-on-exec so that nothing
    // the engine might exec inherits the supervisor channel.
    unsafe { libc::fcntl(WORKER_SOCKET_FD, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    Ok(stream)
}
