//! `corral-worker-python`: the worker process for Python plugins (CPython). Started
//! by the supervisor only; see `corral_worker` for the protocol and exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    corral_worker::run(corral_worker_python::PythonEngine::new())
}
