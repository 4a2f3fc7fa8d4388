//! `corral-worker-js`: the worker process for JavaScript plugins (QuickJS). Started by
//! the supervisor only; see `corral_worker` for the protocol and exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    corral_worker::run(corral_worker_js::JsEngine::new())
}
