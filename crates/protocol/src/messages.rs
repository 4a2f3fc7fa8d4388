//! Message types. Every change here bumps [`crate::PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Identifies a call (supervisor-assigned) or a host call (worker-assigned).
pub type RequestId = u64;

/// The worker's first message, sent after the handshake preamble.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Which runtime this worker embeds.
    pub runtime: Runtime,
    /// The engine's own version, e.g. `wasmtime 48.0.8`.
    pub engine_version: String,
    /// The worker's process id as it sees itself.
    pub pid: u32,
    /// What confinement the worker has verified is in force.
    pub enforcement: EnforcementReport,
    /// Files outside the plugin the engine reads (an interpreter's standard
    /// library and the shared libraries its own modules load), made readable by
    /// the worker's confinement.
    pub runtime_files: Vec<String>,
}

/// The runtime a plugin is written for, and so the engine its worker embeds: the
/// one name for that concept in manifests, policy files, the handshake, seccomp
/// allow-lists and status. Spelled in files as `wasm`, `js`, `python` or `native`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Wasm,
    Js,
    Python,
    /// A shared library of machine code, loaded into a confined worker: no engine
    /// sandbox, so the operating system's confinement is the whole wall.
    Native,
}

impl Runtime {
    /// Every runtime, in the order files list them.
    pub const ALL: [Runtime; 4] = [Runtime::Wasm, Runtime::Js, Runtime::Python, Runtime::Native];

    /// The name used in manifests and policy files.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Js => "js",
            Runtime::Python => "python",
            Runtime::Native => "native",
        }
    }

    /// The runtime a file calls `name`, if any.
    pub fn from_name(name: &str) -> Option<Runtime> {
        Runtime::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How fully a confinement mechanism is in force, as the worker observed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Enforcement {
    /// Fully enforced, with a short description (e.g. `ABI 6`).
    Full(String),
    /// Partly enforced; the string says what is missing.
    Partial(String),
    /// Not enforced; the string says why (not requested, or unsupported).
    None(String),
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Enforcement::Full(s) => write!(f, "enforced ({s})"),
            Enforcement::Partial(s) => write!(f, "partly enforced ({s})"),
            Enforcement::None(s) => write!(f, "not enforced ({s})"),
        }
    }
}

/// What a worker reports as actually enforced on itself, per mechanism.
///
/// The supervisor decides whether that is enough for the plugin's level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementReport {
    pub cgroup: Enforcement,
    pub landlock: Enforcement,
    pub seccomp: Enforcement,
    pub namespaces: Enforcement,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    /// Capability sets after confinement (`CapEff`, `CapBnd` of /proc/self/status).
    pub cap_effective: u64,
    pub cap_bounding: u64,
}

impl EnforcementReport {
    /// A report for a worker that applied no confinement, with the reason.
    pub fn unconfined(reason: &str) -> Self {
        EnforcementReport {
            cgroup: Enforcement::None(reason.to_owned()),
            landlock: Enforcement::None(reason.to_owned()),
            seccomp: Enforcement::None(reason.to_owned()),
            namespaces: Enforcement::None(reason.to_owned()),
            no_new_privs: false,
            uid: 0,
            gid: 0,
            cap_effective: 0,
            cap_bounding: 0,
        }
    }
}

/// Limits the supervisor hands a worker with [`ToWorker::Load`]; the engine enforces
/// them in addition to the kernel's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineLimits {
    /// Maximum linear memory / heap in bytes.
    pub memory_bytes: u64,
    /// Maximum size of one call's output in bytes.
    pub max_output_bytes: u64,
    /// Budget for instantiation and the `init` hook, in milliseconds.
    pub init_deadline_ms: u64,
}

/// How a worker gets the plugin's compiled code: a Wasm module, or the bytecode of
/// a QuickJS module graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Code {
    /// Compile (or parse) the entry itself: no shared store of compiled code, and
    /// every engine but Wasm and QuickJS.
    Compile,
    /// Load the precompiled code at this path (read-only to the worker; made by a
    /// compile helper from exactly the entry's bytes, or for JavaScript the
    /// plugin's files, and named by their digest).
    Precompiled(String),
    /// Be a compile helper: compile the entry, write the artefact to
    /// [`crate::ARTIFACT_FD`], answer `Loaded` with no exports and exit. No plugin
    /// code runs (no instance is made, no `init`).
    CompileOnly,
}

/// What a worker is to load: the plugin, its limits and configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSpec {
    pub plugin_id: String,
    /// Absolute path of the plugin directory.
    pub plugin_dir: String,
    /// Entry file, relative to `plugin_dir` (validated by the manifest crate).
    pub entry: String,
    pub limits: EngineLimits,
    /// Where compiled code comes from (Wasm, QuickJS).
    pub code: Code,
    /// The operator's configuration for the plugin (`[plugin.<id>.config]` in the
    /// daemon's configuration), readable by the plugin from `init` on.
    pub config: BTreeMap<String, String>,
    /// Secrets for the plugin; never logged (their `Debug` is redacted).
    pub secrets: BTreeMap<String, Secret>,
}

/// A secret value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Messages from the supervisor to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Load the plugin and run its `init` hook. Answered by `Loaded` or `LoadFailed`.
    Load(LoadSpec),
    /// Run one exported function. Answered by `CallResult` with the same id.
    Call {
        id: RequestId,
        function: String,
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        /// Wall-clock budget for the call, enforced inside the engine, counted
        /// from when the worker begins it.
        deadline_ms: u64,
        /// The latest time the worker may begin the call, in microseconds of
        /// `CLOCK_MONOTONIC` ([`crate::monotonic_us`]; 0: no limit). A call the
        /// supervisor sent behind others (pipelined) that is still waiting then is
        /// answered `Timeout` without being run: its caller has stopped waiting.
        start_by_us: u64,
    },
    /// The answer to a `FromWorker::HostCall`.
    HostResult {
        id: RequestId,
        result: Result<HostReply, HostError>,
    },
    /// Ask for a `Stats` message.
    Stats,
    /// Run the `shutdown` hook (within `grace_ms`) and exit.
    Shutdown { grace_ms: u64 },
}

/// Messages from a worker to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The plugin is loaded and initialised; it exports these functions (at most
    /// [`crate::MAX_EXPORTS`]).
    Loaded {
        #[serde(deserialize_with = "crate::bounded::exports")]
        exports: Vec<String>,
    },
    /// Loading failed; the worker exits after sending this.
    LoadFailed { error: String },
    /// The outcome of `ToWorker::Call` with the same id.
    CallResult {
        id: RequestId,
        #[serde(with = "crate::payload::result")]
        result: Result<Vec<u8>, CallError>,
    },
    /// The plugin asks the supervisor to do something on its behalf, during call
    /// `call` (or during `init`, where `call` is 0).
    HostCall {
        id: RequestId,
        call: RequestId,
        op: HostOp,
    },
    /// A log line from the plugin (or the worker itself).
    Log { level: LogLevel, message: String },
    /// Answer to `ToWorker::Stats`.
    Stats(WorkerStats),
}

/// The kind of a [`FromWorker`] message, known from a frame's first byte before
/// the rest is read (bincode writes an enum's variant index first, one byte for
/// indices below 251), so a reader can hold each kind to its own size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FromWorkerKind {
    Loaded,
    LoadFailed,
    CallResult,
    HostCall,
    Log,
    Stats,
}

impl FromWorkerKind {
    /// Every kind, in the order of [`FromWorker`]'s variants.
    pub const ALL: [FromWorkerKind; 6] = [
        FromWorkerKind::Loaded,
        FromWorkerKind::LoadFailed,
        FromWorkerKind::CallResult,
        FromWorkerKind::HostCall,
        FromWorkerKind::Log,
        FromWorkerKind::Stats,
    ];

    /// The kind whose frames start with `tag`, if any.
    pub fn from_tag(tag: u8) -> Option<FromWorkerKind> {
        Self::ALL.get(usize::from(tag)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            FromWorkerKind::Loaded => "Loaded",
            FromWorkerKind::LoadFailed => "LoadFailed",
            FromWorkerKind::CallResult => "CallResult",
            FromWorkerKind::HostCall => "HostCall",
            FromWorkerKind::Log => "Log",
            FromWorkerKind::Stats => "Stats",
        }
    }
}

impl FromWorker {
    pub fn kind(&self) -> FromWorkerKind {
        match self {
            FromWorker::Loaded { .. } => FromWorkerKind::Loaded,
            FromWorker::LoadFailed { .. } => FromWorkerKind::LoadFailed,
            FromWorker::CallResult { .. } => FromWorkerKind::CallResult,
            FromWorker::HostCall { .. } => FromWorkerKind::HostCall,
            FromWorker::Log { .. } => FromWorkerKind::Log,
            FromWorker::Stats(_) => FromWorkerKind::Stats,
        }
    }
}

/// Operations a plugin may ask the supervisor to perform. Each is checked against
/// the plugin's effective policy, performed by the supervisor, and (when denied)
/// written to the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostOp {
    /// Wall-clock time in milliseconds since the Unix epoch, from the supervisor.
    Now,
    /// Read a key of the plugin's own store. `HostReply::Value`.
    KvGet { key: String },
    /// Write a key (durable once answered). `HostReply::Unit`.
    KvPut {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Delete a key. `HostReply::Existed`.
    KvDelete { key: String },
    /// Keys starting with `prefix`, in order. `HostReply::Keys`.
    KvKeys { prefix: String },
    /// An HTTP request performed by the supervisor. `HostReply::Fetched`.
    Fetch(FetchRequest),
    /// Publish on a topic. `HostReply::Delivered` (subscribers it was queued for).
    Publish {
        topic: String,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Call another plugin's function. `HostReply::Output`.
    Call {
        plugin: String,
        function: String,
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
    },
}

impl HostOp {
    /// The operation's name in the host APIs and the audit log (`kv.put`).
    pub fn name(&self) -> &'static str {
        match self {
            HostOp::Now => "now",
            HostOp::KvGet { .. } => "kv.get",
            HostOp::KvPut { .. } => "kv.put",
            HostOp::KvDelete { .. } => "kv.delete",
            HostOp::KvKeys { .. } => "kv.keys",
            HostOp::Fetch(_) => "fetch",
            HostOp::Publish { .. } => "publish",
            HostOp::Call { .. } => "call",
        }
    }

    /// What the operation is about, for logs and the audit log (never values).
    ///
    /// At most [`MAX_TARGET`] bytes of each of the worker's strings in it (then
    /// how long it was): it is computed for every host call, before anything is
    /// checked.
    pub fn target(&self) -> String {
        match self {
            HostOp::Now => String::new(),
            HostOp::KvGet { key } | HostOp::KvPut { key, .. } | HostOp::KvDelete { key } => {
                head(key)
            }
            HostOp::KvKeys { prefix } => head(prefix),
            HostOp::Fetch(r) => format!("{} {}", head(&r.method), head(&r.url)),
            HostOp::Publish { topic, .. } => head(topic),
            HostOp::Call {
                plugin, function, ..
            } => format!("{}.{}", head(plugin), head(function)),
        }
    }
}

/// The most of one of a worker's strings that [`HostOp::target`] keeps: with
/// what it says when it cuts, within the 1 KiB an audit line keeps of a target.
pub const MAX_TARGET: usize = 960;

/// `s` up to [`MAX_TARGET`] bytes (on a character boundary), then how long it
/// was if cut.
fn head(s: &str) -> String {
    if s.len() <= MAX_TARGET {
        return s.to_owned();
    }
    let mut at = MAX_TARGET;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    format!("{} [cut: {} bytes in all]", &s[..at], s.len())
}

/// An HTTP request a plugin asks the supervisor to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub method: String,
    pub url: String,
    /// At most [`crate::MAX_FETCH_HEADERS`].
    #[serde(deserialize_with = "crate::bounded::headers")]
    pub headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// The answer to a [`FetchRequest`] (after any allowed redirects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchResponse {
    pub status: u16,
    /// The URL that answered (differs from the request's after redirects).
    pub url: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A host call's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostReply {
    Unit,
    Time(i64),
    /// A stored value, or `None` for a missing key.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    Existed(bool),
    Keys(Vec<String>),
    Fetched(FetchResponse),
    /// How many subscribers a message was queued for.
    Delivered(u32),
    /// Another plugin's answer.
    Output(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// Why a host call was not performed. Each has a short `kind` that the host APIs
/// expose (`err.kind` in JS, `HostError.kind` in Python and Rust).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum HostError {
    /// The plugin's policy does not allow it; `rule` says which rule decided.
    #[error("denied by policy: {rule}")]
    Denied { rule: String },
    /// The arguments are not acceptable (bad key, bad URL, unknown method).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store write would take the plugin past its quota.
    #[error("store quota exceeded: {used} of {limit} bytes used, this write needs {needed} more")]
    Quota { used: u64, limit: u64, needed: u64 },
    /// A bounded queue is full; try again later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A plugin call would wait on a plugin that is already waiting in the chain.
    #[error("call cycle: {chain}")]
    Cycle { chain: String },
    /// The called plugin answered with an error.
    #[error("{plugin}.{function} failed: {error}")]
    Call {
        plugin: String,
        function: String,
        error: CallError,
    },
    /// The operation was allowed but failed (network error, size or time limit).
    #[error("host call failed: {0}")]
    Failed(String),
}

impl HostError {
    /// The short name of the error's kind (`denied`, `invalid`, `quota`,
    /// `overloaded`, `cycle`, `call`, `failed`).
    pub fn kind(&self) -> &'static str {
        match self {
            HostError::Denied { .. } => "denied",
            HostError::Invalid(_) => "invalid",
            HostError::Quota { .. } => "quota",
            HostError::Overloaded(_) => "overloaded",
            HostError::Cycle { .. } => "cycle",
            HostError::Call { .. } => "call",
            HostError::Failed(_) => "failed",
        }
    }
}

/// Log severity, shared by plugins in every runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// Decode the numeric level used by the Wasm ABI (0 = error .. 4 = trace).
    pub fn from_u32(n: u32) -> Option<Self> {
        Some(match n {
            0 => LogLevel::Error,
            1 => LogLevel::Warn,
            2 => LogLevel::Info,
            3 => LogLevel::Debug,
            4 => LogLevel::Trace,
            _ => return None,
        })
    }

    /// Decode the level names of the JavaScript and Python host APIs.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// Counters a worker keeps about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub calls: u64,
    pub errors: u64,
    pub memory_bytes: u64,
}

/// Every way a call can fail. Produced by the worker (engine errors) or by the
/// supervisor (everything about the process and routing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CallError {
    /// The plugin function ran and returned an error of its own.
    #[error("plugin returned an error: {message}")]
    Plugin { message: String },
    /// The engine trapped (Wasm trap, uncaught exception); `message` carries the
    /// trap message or stack.
    #[error("plugin trapped: {message}")]
    Trap { message: String },
    /// The call ran past its deadline and was interrupted.
    #[error("call exceeded its deadline of {deadline_ms} ms")]
    Timeout { deadline_ms: u64 },
    /// The plugin tried to use more memory than its limit allows.
    #[error("plugin exceeded its memory limit of {limit_bytes} bytes")]
    MemoryLimit { limit_bytes: u64 },
    /// The worker process died while the call was in flight.
    #[error("worker crashed: {0}")]
    WorkerCrashed(ExitReason),
    /// The plugin has crashed too often and is not restarted until reset.
    #[error("plugin {plugin} is failed after {crashes} crashes (last: {last})")]
    PluginFailed {
        plugin: String,
        crashes: u32,
        last: String,
    },
    /// The plugin could not be started or loaded.
    #[error("plugin {plugin} could not be started: {reason}")]
    StartFailed { plugin: String, reason: String },
    #[error("unknown plugin {plugin:?}")]
    UnknownPlugin { plugin: String },
    #[error("plugin {plugin:?} has no function {function:?} (it exports: {exports})")]
    UnknownFunction {
        plugin: String,
        function: String,
        /// Comma-separated exported names.
        exports: String,
    },
    #[error("bad input: {reason}")]
    BadInput { reason: String },
    /// The plugin's output was larger than its limit.
    #[error("plugin output of {size} bytes exceeds the limit of {limit} bytes")]
    OutputTooLarge { size: u64, limit: u64 },
    /// The call cannot be served now, and it is not the plugin's fault: its
    /// queue is full, every worker the supervisor may run is busy, or the
    /// supervisor itself is out of a resource. Worth retrying later.
    #[error("plugin {plugin} is overloaded: {reason}")]
    Overloaded { plugin: String, reason: Overload },
    /// The supervisor is shutting down.
    #[error("supervisor is shutting down")]
    ShuttingDown,
}

impl CallError {
    /// Whether a worker may answer a call with this error (what its engine or
    /// worker loop decides); the others are the supervisor's own, and a worker
    /// that sends one breaks the protocol.
    pub fn is_a_workers(&self) -> bool {
        match self {
            CallError::Plugin { .. }
            | CallError::Trap { .. }
            | CallError::Timeout { .. }
            | CallError::MemoryLimit { .. }
            | CallError::OutputTooLarge { .. }
            | CallError::UnknownFunction { .. }
            | CallError::BadInput { .. } => true,
            CallError::WorkerCrashed(_)
            | CallError::PluginFailed { .. }
            | CallError::StartFailed { .. }
            | CallError::UnknownPlugin { .. }
            | CallError::Overloaded { .. }
            | CallError::ShuttingDown => false,
        }
    }

    /// Short machine-readable name of the error's kind (the `kind` in `--json`
    /// output, the `outcome` label of the daemon's call metrics).
    pub fn kind(&self) -> &'static str {
        match self {
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

    /// Every kind [`CallError::kind`] names.
    pub const KINDS: &'static [&'static str] = &[
        "plugin_error",
        "trap",
        "timeout",
        "memory_limit",
        "output_too_large",
        "worker_crashed",
        "plugin_failed",
        "start_failed",
        "unknown_plugin",
        "unknown_function",
        "bad_input",
        "overloaded",
        "shutting_down",
    ];
}

impl ExitReason {
    /// Short machine-readable name of how a worker ended (the `reason` label of
    /// the daemon's crash metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            ExitReason::Code(_) => "exit_code",
            ExitReason::Signal { .. } => "signal",
            ExitReason::Seccomp { .. } => "seccomp",
            ExitReason::OomKilled { .. } => "oom",
            ExitReason::Unknown => "unknown",
            ExitReason::Protocol(_) => "protocol",
        }
    }
}

/// Why a call was refused as [`CallError::Overloaded`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Overload {
    /// The plugin has `queued` calls queued or running (its `max_queue`).
    #[error("{queued} calls queued (max_queue)")]
    Queue { queued: u32 },
    /// `live` workers run, the supervisor's `max_workers`, and none of them is
    /// idle to make room.
    #[error("{live} workers are running (max_workers {max}) and none is idle to make room")]
    Workers { live: u32, max: u32 },
    /// The supervisor could not start a worker for want of a resource of its own
    /// (file descriptors, processes, memory): not the plugin's crash.
    #[error("the supervisor cannot start a worker now: {0}")]
    Supervisor(String),
}

/// How a worker process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal (number and name).
    Signal { signo: i32, name: String },
    /// Killed by its seccomp filter for calling `syscall`.
    Seccomp { syscall: String },
    /// Killed by the kernel's OOM killer at its cgroup memory limit.
    OomKilled { limit_bytes: u64 },
    /// The process ended but its status could not be read (already reaped).
    Unknown,
    /// The connection broke for a protocol reason; the worker was killed.
    Protocol(String),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Code(c) => write!(f, "exited with code {c}"),
            ExitReason::Signal { signo, name } => write!(f, "killed by signal {signo} ({name})"),
            ExitReason::Seccomp { syscall } => write!(f, "seccomp violation: {syscall}"),
            ExitReason::OomKilled { limit_bytes } => write!(
                f,
                "OOM-killed at its memory limit of {} MiB",
                limit_bytes >> 20
            ),
            ExitReason::Unknown => f.write_str("exited with unknown status"),
            ExitReason::Protocol(why) => write!(f, "protocol violation: {why}"),
        }
    }
}

/// A request on the daemon's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Call a function; the answer is `ControlResponse::Called`.
    Call {
        plugin: String,
        function: String,
        #[serde(with = "serde_bytes")]
        input: Vec<u8>,
        /// Overrides the plugin's deadline when set.
        timeout_ms: Option<u64>,
    },
    /// List plugins and their state.
    List,
    /// Stop all workers and exit.
    Shutdown,
    /// Which policy is in force, and why the last reload was rejected (if it was).
    Policy,
    /// The effective policy of one plugin, with the origin of every value.
    /// `json`: the answer is the JSON document `corral policy explain --json`
    /// prints, else its text.
    Explain { plugin: String, json: bool },
}

/// The answer to a [`ControlRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Called(#[serde(with = "crate::payload::result")] Result<Vec<u8>, CallError>),
    Plugins(Vec<PluginInfo>),
    ShuttingDown,
    /// The request could not be decoded or is not allowed.
    Rejected(String),
    Policy(PolicyStatus),
    /// `Err` names an unknown plugin.
    Explained(Result<String, String>),
}

/// The daemon's policy, as `corral status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Files the policy in force was read from (`policies/*.toml (built in)` if none).
    pub sources: Vec<String>,
    /// Why the last edit was rejected; the policy in force is the last good one.
    pub reload_error: Option<String>,
    /// Plugin versions the daemon rejected (`dir: why`); the running version, if
    /// any, keeps serving.
    pub plugin_errors: Vec<String>,
    /// Why the last configuration reload (SIGHUP) was rejected; the configuration
    /// in force is the one before it.
    pub config_error: Option<String>,
    /// Settings a reload changed that take effect when the daemon restarts.
    pub config_pending: Vec<String>,
    /// The daemon's workers and its own descriptors.
    pub workers: WorkersStatus,
}

/// How many workers run against the daemon's caps, and its own file descriptors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersStatus {
    /// Worker processes alive (serving, or finishing their calls after a reload).
    pub live: u32,
    /// `max_workers`: the cap on live workers, if any.
    pub max_workers: Option<u32>,
    /// `idle_timeout`: a worker without a call for this long is stopped.
    pub idle_timeout_ms: Option<u64>,
    /// Workers stopped for being idle since the daemon started.
    pub idle_stops: u64,
    /// Workers stopped to make room under `max_workers`.
    pub evictions: u64,
    /// Descriptors the supervisor has open (`None`: it has none left to count
    /// them with), and its `RLIMIT_NOFILE` (soft).
    pub open_files: Option<u32>,
    pub max_files: u64,
    /// Wasm modules compiled (by compile helpers) since the daemon started; every
    /// other start mapped one already compiled.
    pub modules_compiled: u64,
    /// Zygote templates started, and workers forked from one, since the daemon
    /// started (every other worker was started by exec).
    pub templates_started: u64,
    pub workers_forked: u64,
}

/// One plugin as `corral list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub id: String,
    pub version: String,
    pub runtime: Runtime,
    pub dir: String,
    /// Isolation level (`standard`, `high`, `maximum`).
    pub level: String,
    /// What the running worker reported as enforced.
    pub enforcement: Option<EnforcementReport>,
    /// `stopped`, `running`, `crashed`, `blocked` (a dependency), `failed`.
    pub state: String,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub calls: u64,
    /// Calls queued or running now, of every version (at most `max_queue`).
    pub queued: u32,
    pub last_error: Option<String>,
    pub exports: Vec<String>,
    /// What its `plugin.toml` `[permissions]` ask for, each with what the grants
    /// say of it (`http x: granted by ...`, `kv: not granted: ...`).
    pub requested: Vec<String>,
    /// The route that set the level and the resolved limits (`corral policy explain`
    /// shows every value's origin).
    pub policy: String,
    /// The rules the supervisor itself enforces on this plugin's worker (what it may
    /// send, write, ask for and leave behind), each saying what enforces it.
    pub supervision: Vec<String>,
    /// Live resource use of the running worker (the first, with several).
    pub resources: Option<ResourceStats>,
    /// Every running worker of the plugin (`instances`), oldest first.
    pub instances: Vec<InstanceInfo>,
    /// Most workers the policy lets it run at once.
    pub instances_allowed: u32,
    /// What its worker may read besides the plugin's files, each saying why: the
    /// engine's runtime files (reported by a running worker) and the system
    /// libraries the plugin's compiled extensions need.
    pub reads: Vec<String>,
}

/// One running worker of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub pid: u32,
    /// Whether a call is running in it now.
    pub busy: bool,
    pub resources: ResourceStats,
}

/// A worker's resource use, from its cgroup (and `/proc` where cgroup v1 has no
/// usage counter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub memory_limit: Option<u64>,
    /// CPU time used, in microseconds.
    pub cpu_usage_usec: Option<u64>,
    /// Periods in which the CPU quota throttled the worker, and for how long.
    pub cpu_throttled_periods: Option<u64>,
    pub cpu_throttled_usec: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    pub oom_kills: u64,
}
