//! `corral run`: one call without a daemon.

use super::exit::{self, Failure, Outcome};
use super::{parse_level, policy_from};
use crate::{Options, Supervisor};
use clap::Args;
use corral_client::{InputArgs, OutputArgs, print_result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The arguments of `corral run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory holding plugin.toml.
    pub(super) plugin_dir: PathBuf,
    pub(super) function: String,
    #[command(flatten)]
    pub(super) input: InputArgs,
    #[command(flatten)]
    pub(super) out: OutputArgs,
    /// Directory of the worker binaries (default: beside `corral`).
    #[arg(long, env = "CORRAL_WORKER_DIR")]
    pub(super) worker_dir: Option<PathBuf>,
    /// Module cache directory (default: ~/.cache/corral).
    #[arg(long, env = "CORRAL_CACHE_DIR")]
    pub(super) cache_dir: Option<PathBuf>,
    /// Policy files (directory or file) routing the plugin to its level. Default:
    /// the shipped policy, compiled in.
    #[arg(long, env = "CORRAL_POLICY")]
    pub(super) policy: Option<PathBuf>,
    /// Run at this level whatever the policy routes (the level's limits still
    /// come from the policy).
    #[arg(long, value_parser = parse_level)]
    pub(super) level: Option<corral_confine::Level>,
}

impl RunArgs {
    /// Whether `--json` was given.
    pub(super) fn json(&self) -> bool {
        self.out.json
    }
}

pub(super) async fn run_once(args: RunArgs) -> Outcome {
    let RunArgs {
        plugin_dir,
        function,
        input,
        out,
        worker_dir,
        cache_dir,
        policy,
        level,
    } = args;

    let mut options = Options::new();
    // One worker: a zygote template would only be one more process to start.
    options.zygotes = Vec::new();
    match policy_from(policy.as_deref(), level) {
        Ok(p) => options.policy = Arc::new(p),
        Err(e) => {
            return Err(Failure::new(exit::INVALID, format!("invalid policy:\n{e}")).into());
        }
    }
    if let Some(d) = worker_dir {
        options.worker_dir = d;
    }
    if let Some(d) = cache_dir {
        options.cache_dir = Some(d);
    }
    let mut sup = Supervisor::new(options);
    let id = match sup.add_plugin_dir(&plugin_dir) {
        Ok(id) => id,
        Err(e) => {
            return Err(Failure::new(exit::INVALID, corral_protocol::error_chain(&e)).into());
        }
    };
    let bytes = input.read()?;
    let result = sup.call(&id, &function, bytes, out.timeout).await;
    sup.shutdown(Duration::from_secs(2)).await;
    print_result(result, out.json)
}
