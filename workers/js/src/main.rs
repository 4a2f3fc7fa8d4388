//! `corral-worker-js`: the worker process for JavaScript plugins (QuickJS). Started by
//! the supervisor only; see `corral_worker` for the protocol and exit codes.

use std::process::ExitCode;

#[cfg(not(feature = "v8"))]
fn main() -> ExitCode {
    corral_worker::run(corral_worker_js::JsEngine::new())
}

/// Built with the `v8` feature: V8 (deno_core) serves instead of QuickJS.
#[cfg(feature = "v8")]
fn main() -> ExitCode {
    corral_worker::run(corral_worker_js::V8Engine::new())
}
