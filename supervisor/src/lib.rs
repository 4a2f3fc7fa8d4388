//! The Corral supervisor: starts one worker process per plugin, talks to it over an
//! inherited socket, and answers every call with a result or a typed error.
//!
//! Principal types:
//!
//! - [`Supervisor`]: the plugins and their workers; [`Supervisor::call`] is the one
//!   entry point every client (CLI, control socket, Rust API) goes through.
//! - [`WorkerHandle`]: one running worker process and its in-flight calls.
//! - [`Options`] and [`RestartPolicy`]: where workers live, the module cache, the
//!   policy ([`corral_policy::Policy`]) that routes plugins to levels, how crashes
//!   are retried.
//! - [`Config`]: the daemon's configuration file.
//! - [`control`]: the daemon's control socket, server and client.
//!
//! Embedding the supervisor:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut sup = corral::Supervisor::new(corral::Options::new());
//! let id = sup.add_plugin_dir("examples/hello-wasm".as_ref())?;
//! let out = sup.call(&id, "greet", b"Ada".to_vec(), None).await?;
//! assert_eq!(out, b"Hello, Ada!");
//! sup.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```

#[cfg(not(target_os = "linux"))]
compile_error!(
    "corral supervises workers with Linux facilities (socketpair fd passing, PR_SET_PDEATHSIG, close_range); other platforms are not supported"
);

pub mod access;
pub mod audit;
pub mod cli;
mod config;
pub mod control;
pub mod deps;
pub mod fetch;
pub mod host;
pub mod install;
pub mod lifecycle;
pub mod reload;
pub mod signing;
pub mod store;
pub(crate) mod supervisor;
pub mod versions;
mod worker;

pub use audit::AuditSink;
pub use config::{Config, ConfigError};
pub use corral_policy::{Effective, Policy};
pub use supervisor::{
    AddPluginError, CGROUP_PREFIX, Core, HEALTH_EXPORT, Options, PluginConfig, RestartPolicy,
    Supervisor,
};
pub use worker::{
    CallCtx, Credentials, Redactor, SpawnSpec, StartError, UNREPORTED_SYSCALL, WORKER_MAX_FILES,
    WorkerHandle, exit_reason,
};
