//! The errors at the engine seam: one enum per operation, each naming what failed.

use std::path::PathBuf;

/// Why an engine could not set itself up before confinement
/// ([`crate::Engine::runtime_files`], [`crate::Engine::prepare`]). The worker exits
/// with [`crate::EXIT_LOAD_FAILED`] and the supervisor shows the message.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A runtime file the engine needs (an interpreter's standard library) cannot
    /// be opened.
    #[error("{what} {}", path.display())]
    RuntimeFiles {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The engine itself would not start, in its own words.
    #[error("starting {engine}: {message}")]
    Engine {
        engine: &'static str,
        message: String,
    },
}

/// Why a plugin could not be loaded: its code read and compiled, its top-level code
/// and `init` hook run ([`crate::Engine::instantiate`]). Sent to the supervisor as
/// the `LoadFailed` reason, or, when an instance is made again after a trap, as the
/// call's `Trap`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The plugin directory or its entry cannot be read.
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The entry names something the engine cannot load from the plugin.
    #[error("entry {entry:?} is not a relative path inside the plugin")]
    Entry { entry: String },
    /// The engine refused the plugin's code (a Wasm module that does not validate,
    /// a module that does not follow the ABI).
    #[error("invalid module {path}: {message}")]
    Invalid { path: String, message: String },
    /// The plugin exports nothing callable.
    #[error("the module exports no plugin functions ({hint})")]
    NoExports { hint: &'static str },
    /// The plugin's own code failed while loading (`during` says where: loading
    /// the module, `init`), in the engine's words with its stack.
    #[error("{during}: {message}")]
    Plugin {
        during: &'static str,
        message: String,
    },
    /// Loading ran past the load and init deadline.
    #[error("{during}: {message} (the load and init deadline is {deadline_ms} ms)")]
    Deadline {
        during: &'static str,
        message: String,
        deadline_ms: u64,
    },
    /// The plugin's code failed as a call would: a trap, the memory limit, `init`
    /// returning an error.
    #[error(transparent)]
    Call(#[from] corral_protocol::CallError),
    /// The engine could not make an instance, in its own words.
    #[error("{0}")]
    Engine(String),
}

impl LoadError {
    /// The plugin's own code failed `during` the load: past the load and init
    /// deadline if the engine interrupted it for that, else in its own words.
    pub fn plugin_code(
        during: &'static str,
        message: String,
        interrupted: bool,
        deadline: std::time::Duration,
    ) -> LoadError {
        if interrupted {
            LoadError::Deadline {
                during,
                message,
                deadline_ms: deadline.as_millis() as u64,
            }
        } else {
            LoadError::Plugin { during, message }
        }
    }
}
