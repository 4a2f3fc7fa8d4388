//! Documented exit codes of `corral`, and the one place every failure is mapped
//! to its code ([`Failure`]): commands return a `Failure` instead of printing an
//! error and returning a code themselves.

use corral_protocol::CallError;

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
/// `corral test`: a test case or a check failed.
pub const TESTS_FAILED: u8 = 10;

/// Map a call error to its exit code.
pub fn exit_code_for(e: &CallError) -> u8 {
    match e {
        CallError::Plugin { .. } => PLUGIN_ERROR,
        CallError::Trap { .. }
        | CallError::Timeout { .. }
        | CallError::MemoryLimit { .. }
        | CallError::OutputTooLarge { .. } => CALL_STOPPED,
        CallError::WorkerCrashed(_)
        | CallError::PluginFailed { .. }
        | CallError::StartFailed { .. } => WORKER_FAILED,
        CallError::UnknownPlugin { .. } | CallError::UnknownFunction { .. } => NOT_FOUND,
        CallError::BadInput { .. } => INVALID,
        CallError::Overloaded { .. } | CallError::ShuttingDown => UNAVAILABLE,
    }
}

/// Short machine-readable name of a call error (the `kind` in `--json` output).
pub fn error_kind(e: &CallError) -> &'static str {
    e.kind()
}

/// A failure of a command: what `corral` prints after `error: ` and the exit code
/// it ends with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl std::fmt::Display) -> Failure {
        Failure {
            code,
            message: message.to_string(),
        }
    }

    /// Invalid input, manifest, policy or configuration.
    pub fn invalid(message: impl std::fmt::Display) -> Failure {
        Failure::new(INVALID, message)
    }

    /// An error and its causes, as `a: b: c`.
    pub fn chain(code: u8, e: &dyn std::error::Error) -> Failure {
        Failure::new(code, corral_protocol::error_chain(e))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// What a command ends with: its exit code, or an error. A [`Failure`] in the error
/// carries its own code; any other error exits with [`FAILURE`].
pub type Outcome = anyhow::Result<u8>;

static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the command was given `--json`: [`report`] then prints its error as a
/// JSON object on standard output as well.
pub fn set_json(json: bool) {
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
}

/// The `kind` of an exit code in `--json` errors.
pub fn kind_of(code: u8) -> &'static str {
    match code {
        OK => "ok",
        USAGE => "usage",
        PLUGIN_ERROR => "plugin_error",
        CALL_STOPPED => "call_stopped",
        WORKER_FAILED => "worker_failed",
        NOT_FOUND => "not_found",
        INVALID => "invalid",
        UNREACHABLE => "unreachable",
        UNAVAILABLE => "unavailable",
        TESTS_FAILED => "tests_failed",
        _ => "failure",
    }
}

/// The exit code of `outcome`, with its error printed to stderr (and, after
/// `--json`, as `{"ok":false,"error":{"kind","code","message"}}` on stdout).
pub fn report(outcome: Outcome) -> u8 {
    let (code, message) = match outcome {
        Ok(code) => return code,
        Err(e) => match e.downcast::<Failure>() {
            Ok(f) => (f.code, f.message),
            Err(e) => (FAILURE, format!("{e:#}")),
        },
    };
    eprintln!("error: {message}");
    if JSON.load(std::sync::atomic::Ordering::Relaxed) {
        println!(
            "{}",
            serde_json::json!({
                "ok": false,
                "error": { "kind": kind_of(code), "code": code, "message": message },
            })
        );
    }
    code
}
