//! `corral serve`: the daemon. Its configuration, its plugins (listed, and found in
//! its plugins directory), the control socket, the watchers that apply edits live,
//! and an orderly stop on `corral stop`, SIGTERM or SIGINT.

use crate::control::{ControlServer, default_socket_path};
use crate::{Config, Supervisor};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Why the daemon could not run.
#[derive(Debug)]
pub enum ServeError {
    /// The configuration, its policy or a plugin it lists is invalid.
    Invalid(String),
    /// Anything else (the plugins directory, the control socket, the watchers).
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for ServeError {
    fn from(e: anyhow::Error) -> ServeError {
        ServeError::Failed(e)
    }
}

/// Run the daemon of the configuration at `config_path` until it is told to stop.
pub async fn serve(config_path: &Path, socket: Option<PathBuf>) -> Result<(), ServeError> {
    let mut config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            return Err(ServeError::Invalid(corral_protocol::error_chain(&e)));
        }
    };
    if let Err(e) = config.load_policy() {
        return Err(ServeError::Invalid(format!("invalid policy:\n{e}")));
    }
    let mut sup = Supervisor::new(config.options.clone());
    for dir in &config.plugins {
        match sup.add_plugin_dir(dir) {
            Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin added"),
            Err(e) => {
                return Err(ServeError::Invalid(corral_protocol::error_chain(&e)));
            }
        }
    }
    let sources = crate::reload::PluginSources {
        dirs: config.plugins.clone(),
        plugins_dir: config.plugins_dir.clone(),
    };
    if let Some(d) = &config.plugins_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create the plugins directory {}", d.display()))?;
        // A broken plugin in the directory is reported and skipped; the others run.
        let found = crate::plugins::files::discover(d)
            .with_context(|| format!("cannot read the plugins directory {}", d.display()))?;
        for dir in found {
            match sup.add_plugin_dir(&dir) {
                Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin found"),
                Err(e) => {
                    sup.record_rejection(&dir, corral_protocol::error_chain(&e))
                        .await
                }
            }
        }
    }
    let socket = socket
        .or(config.socket.clone())
        .unwrap_or_else(default_socket_path);
    let server = ControlServer::bind(&socket)
        .await
        .with_context(|| format!("failed to serve {}", socket.display()))?;
    let sup = Arc::new(sup);
    let _plugins_watcher = if config.watch {
        Some(
            crate::reload::watch_plugins(sources, Arc::clone(&sup))
                .context("cannot watch the plugin directories")?,
        )
    } else {
        None
    };
    let _watcher = match config.policy_path.as_ref().filter(|_| config.watch) {
        Some(p) => Some(
            crate::reload::watch_policy(p, Arc::clone(&sup))
                .with_context(|| format!("cannot watch the policy {}", p.display()))?,
        ),
        None => None,
    };
    let stop = Arc::new(Notify::new());
    let signals = Arc::clone(&stop);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        signals.notify_one();
    });
    eprintln!(
        "corral: serving {} plugin(s) on {}",
        sup.list().await.len(),
        server.path().display()
    );
    server.serve(Arc::clone(&sup), stop).await;
    eprintln!("corral: shutting down");
    sup.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
