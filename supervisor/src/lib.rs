//! The Corral supervisor: starts one worker process per plugin, talks to it over an
//! inherited socket, and answers every call with a result or a typed error.
//!
//! Principal types:
//!
//! - [`Supervisor`]: the plugins and their workers; [`Supervisor::call`] is the one
//!   entry point every client (CLI, control socket, Rust API) goes through.
//! - [`Options`] and [`RestartPolicy`]: where the worker binaries are, the module
//!   cache, the policy ([`Policy`]) that routes plugins to levels, how crashes are
//!   retried.
//! - [`Config`]: the daemon's configuration file.
//! - [`control`]: the daemon's control socket, server and client.
//! - [`reload`]: the daemon's policy and plugin watchers.
//!
//! Inside (see ARCHITECTURE.md for the map): `supervisor` is the dispatcher that
//! owns every table; `worker` runs one worker process and reports to a `Broker`;
//! `broker` performs host calls; `plugins` reads, copies, signs and installs
//! plugin files; `daemon` holds the control socket and the watchers; `cli` is the
//! command line.
//!
//! # Embedding the supervisor
//!
//! The worker binaries (`corral-worker-wasm`, `corral-worker-js`,
//! `corral-worker-python`) must be in [`Options::worker_dir`]: by default the
//! directory of the running executable, which is where cargo puts them beside
//! `corral`. A program that embeds the supervisor sets it to wherever it installs
//! them. Here, the workspace's build directory (`CORRAL_WORKER_DIR` overrides it):
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
//! let mut options = corral::Options::new();
//! options.worker_dir = std::env::var_os("CORRAL_WORKER_DIR")
//!     .map_or_else(|| root.join("target/debug"), Into::into);
//! # let scratch = tempfile::tempdir()?;
//! # options.state_dir = scratch.path().join("state");
//! let mut sup = corral::Supervisor::new(options);
//! let id = sup.add_plugin_dir(&root.join("examples/hello-js"))?;
//! let out = sup.call(&id, "greet", b"Ada".to_vec(), None).await?;
//! assert_eq!(out, b"Hello, Ada!");
//! sup.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) })
//! # }
//! ```

#[cfg(not(target_os = "linux"))]
compile_error!(
    "corral supervises workers with Linux facilities (socketpair fd passing, PR_SET_PDEATHSIG, close_range); other platforms are not supported"
);

mod broker;
#[doc(hidden)]
pub mod cli;
mod config;
mod daemon;
mod metrics;
mod plugins;

/// What the fuzz targets (`crates/fuzz-targets`) drive directly: not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::plugins::install::{IndexEntry, InstallError, parse_index, unpack};
}
mod supervisor;
mod worker;

pub use broker::audit::AuditSink;
pub use broker::store::{PostgresStore, StoreBackend};
pub use config::{Config, ConfigError, LogFormat};
pub use corral_policy::{Effective, Policy};
pub use daemon::{control, reload};
pub use metrics::EXPORTED as EXPORTED_METRICS;
pub use plugins::files::QUIET;
pub use supervisor::lifecycle::SyncReport;
pub use supervisor::{
    AddPluginError, CGROUP_PREFIX, DEFAULT_ZYGOTES, HEALTH_EXPORT, MAX_CONFIG_ERROR, Options,
    PluginConfig, RestartPolicy, Supervisor,
};
pub use worker::{
    StartError, UNREPORTED_SYSCALL, VerifyError, WORKER_MAX_FILES, raise_open_files_limit,
};
