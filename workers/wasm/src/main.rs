//! `corral-worker-wasm`: the worker process for WebAssembly plugins. Started by the
//! supervisor only; see `corral_worker` for the protocol and exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    match corral_worker_wasm::WasmEngine::new() {
        Ok(engine) => corral_worker::run(engine),
        Err(e) => {
            eprintln!("corral-worker-wasm: {e}");
            ExitCode::from(corral_worker::EXIT_LOAD_FAILED)
        }
    }
}
