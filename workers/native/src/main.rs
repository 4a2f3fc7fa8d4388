//! `corral-worker-native`: the worker process for native plugins. Started by the
//! supervisor only; see `corral_worker` for the protocol and exit codes.

fn main() -> std::process::ExitCode {
    corral_worker::run(corral_worker_native::NativeEngine::new())
}
