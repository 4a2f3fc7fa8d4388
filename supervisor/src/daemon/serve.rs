//! `corral serve`: the daemon. Its configuration, its plugins (listed, and found in
//! its plugins directory), the control socket, the metrics endpoint, the watchers
//! that apply edits live, a reload of the configuration on SIGHUP, and an orderly
//! stop on `corral stop`, SIGTERM or SIGINT.

use crate::control::{ControlServer, default_socket_path};
use crate::reload::{PluginSources, PluginWatcher};
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
    for (dir, added) in config
        .plugins
        .iter()
        .zip(sup.add_plugin_dirs(&config.plugins))
    {
        match added {
            Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin added"),
            Err(e) => {
                return Err(ServeError::Invalid(corral_protocol::error_chain(&e)));
            }
        }
    }
    // Before any plugin can ask for it (a repair after an unclean stop takes a
    // while, and would have stalled the runtime thread of the first host call).
    if let Err(e) = sup.open_store().await {
        tracing::error!("the plugins' store cannot be opened; store host calls fail: {e}");
    }
    let sources = sources_of(&config);
    if let Some(d) = &config.plugins_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create the plugins directory {}", d.display()))?;
        // A broken plugin in the directory is reported and skipped; the others run.
        let found = crate::plugins::files::discover(d)
            .with_context(|| format!("cannot read the plugins directory {}", d.display()))?;
        let added = sup.add_plugin_dirs(&found);
        for (dir, added) in found.into_iter().zip(added) {
            match added {
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
    let metrics = match config.metrics {
        Some(addr) => Some(
            crate::daemon::metrics::MetricsServer::bind(addr)
                .await
                .with_context(|| format!("cannot serve the metrics on {addr}"))?,
        ),
        None => None,
    };
    let remote = match &config.remote {
        Some(r) => Some(
            crate::daemon::remote::RemoteServer::bind(r)
                .await
                .map_err(|e| ServeError::Invalid(format!("remote: {e}")))?,
        ),
        None => None,
    };
    let sup = Arc::new(sup);
    let plugins_watcher = watch_sources(&config, &sources, &sup)?;
    let _watcher = match config.policy_path.as_ref().filter(|_| config.watch) {
        Some(p) => Some(
            crate::reload::watch_policy(p, Arc::clone(&sup))
                .with_context(|| format!("cannot watch the policy {}", p.display()))?,
        ),
        None => None,
    };
    let metrics = match metrics {
        Some(m) => {
            let addr = m.local_addr().context("the metrics listener")?;
            crate::cli::announce(&format!("metrics on http://{addr}/metrics"));
            Some(tokio::spawn(m.serve(Arc::clone(&sup))))
        }
        None => None,
    };
    let (remote, remote_reloader) = match remote {
        Some(r) => {
            let addr = r.local_addr().context("the remote listener")?;
            let scheme = if r.tls() { "https" } else { "http" };
            crate::cli::announce(&format!("remote calls on {scheme}://{addr}/v1/call/"));
            let reloader = config.remote.as_ref().map(|c| r.reloader(c.listen));
            (Some(tokio::spawn(r.serve(Arc::clone(&sup)))), reloader)
        }
        None => (None, None),
    };
    let stop = Arc::new(Notify::new());
    let mut daemon = Daemon {
        remote: remote_reloader,
        path: config_path.to_owned(),
        first: config.clone(),
        running: config,
        sources,
        plugins_watcher,
        sup: Arc::clone(&sup),
    };
    let signals = Arc::clone(&stop);
    let sup_for_signals = Arc::clone(&sup);
    let signal_task = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot handle signals; stop the daemon with `corral stop`");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    // A reload loads plugins (their `init` up to its deadline): a
                    // stop ends those loads (their workers killed) and the reload
                    // with them, rather than waiting, or leaving a version half
                    // put in the table.
                    let reload = daemon.reload();
                    tokio::pin!(reload);
                    let stop = tokio::select! {
                        () = &mut reload => false,
                        _ = term.recv() => true,
                        _ = int.recv() => true,
                    };
                    if stop {
                        sup_for_signals.begin_shutdown();
                        reload.await;
                        break;
                    }
                }
            }
        }
        signals.notify_one();
    });
    crate::cli::announce(&format!(
        "serving {} plugin(s) on {}",
        sup.list().await.len(),
        server.path().display()
    ));
    server.serve(Arc::clone(&sup), stop).await;
    crate::cli::announce("shutting down");
    // No reload and no scrape while the workers stop.
    signal_task.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    // No new remote call; the ones in flight end with the workers' stop.
    if let Some(r) = remote {
        r.abort();
    }
    sup.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

fn sources_of(config: &Config) -> PluginSources {
    PluginSources {
        dirs: config.plugins.clone(),
        plugins_dir: config.plugins_dir.clone(),
    }
}

fn watch_sources(
    config: &Config,
    sources: &PluginSources,
    sup: &Arc<Supervisor>,
) -> anyhow::Result<Option<PluginWatcher>> {
    if !config.watch {
        return Ok(None);
    }
    crate::reload::watch_plugins(sources.clone(), Arc::clone(sup))
        .map(Some)
        .context("cannot watch the plugin directories")
}

/// What a reload needs: the configuration the daemon started with (for the
/// settings that wait for a restart) and the one in force.
struct Daemon {
    /// The remote listener's configuration slot, when it serves.
    remote: Option<crate::daemon::remote::RemoteReloader>,
    path: PathBuf,
    first: Config,
    running: Config,
    sources: PluginSources,
    plugins_watcher: Option<PluginWatcher>,
    sup: Arc<Supervisor>,
}

impl Daemon {
    /// SIGHUP: read the configuration again and apply it if it is valid (else keep
    /// the one in force and say why, in the log and in `corral status`); open the
    /// audit log again either way.
    async fn reload(&mut self) {
        let path = self.path.display().to_string();
        let new = match self.validate().await {
            Ok(c) => c,
            Err(why) => {
                self.sup.reopen_audit(self.running.options.audit.clone());
                self.sup.reject_config(why);
                return;
            }
        };
        let mut pending = waiting_for_restart(&self.first, &new);
        // Callers, tokens, limits and certificates apply to the next connection;
        // if one cannot be read, nothing of the new configuration is applied.
        if let (Some(r), Some(c)) = (&self.remote, &new.remote) {
            match r.apply(c) {
                Ok(p) => pending.extend(p),
                Err(why) => {
                    self.sup.reopen_audit(self.running.options.audit.clone());
                    self.sup.reject_config(format!("remote: {why}"));
                    return;
                }
            }
        }
        for p in &pending {
            tracing::warn!("configuration: {p}");
        }
        let mut changes = self.sup.reconfigure(&new.options, pending).await;
        if let (Some(_), Some(c)) = (&self.remote, &new.remote) {
            changes.push(format!(
                "remote: {} caller(s) and the certificates read again",
                c.callers.len()
            ));
        }
        if let Some(p) = new
            .policy_path
            .as_ref()
            .filter(|_| new.policy_path == self.first.policy_path)
        {
            // The policy is read again with the configuration (SIGHUP also serves
            // daemons that do not watch their files).
            crate::reload::reload(p, &self.sup).await;
        }
        let sources = sources_of(&new);
        if sources.dirs != self.sources.dirs || sources.plugins_dir != self.sources.plugins_dir {
            if let Some(d) = &sources.plugins_dir
                && let Err(e) = std::fs::create_dir_all(d)
            {
                tracing::error!("cannot create the plugins directory {}: {e}", d.display());
            }
            // The old watcher stops before the new one starts watching.
            self.plugins_watcher = None;
            match watch_sources(&self.first, &sources, &self.sup) {
                Ok(w) => self.plugins_watcher = w,
                Err(e) => tracing::error!("{e:#}"),
            }
            self.sources = sources;
            changes.push("plugin directories changed".into());
        }
        // The listed plugins, the plugins directory and the new publishers:
        // added, reloaded and removed as a watcher's pass would.
        let report = crate::reload::sync(&self.sources, &self.sup).await;
        for id in &report.added {
            changes.push(format!("{id}: added"));
        }
        for id in &report.removed {
            changes.push(format!("{id}: removed; its worker drains"));
        }
        tracing::info!(
            "configuration reloaded from {path} ({} change(s)): {}",
            changes.len(),
            changes.join("; ")
        );
        self.running = new;
    }

    /// The configuration at `path`, its policy and the plugins it lists, all read
    /// and checked; or why not.
    async fn validate(&self) -> Result<Config, String> {
        let mut new = Config::load(&self.path).map_err(|e| corral_protocol::error_chain(&e))?;
        new.load_policy()
            .map_err(|e| format!("invalid policy:\n{e}"))?;
        for dir in &new.plugins {
            corral_manifest::Manifest::load_dir(dir).map_err(|e| {
                format!(
                    "plugin {}: {}",
                    dir.display(),
                    corral_protocol::error_chain(&e)
                )
            })?;
        }
        Ok(new)
    }
}

/// The settings that differ between `first` (what the daemon started with) and
/// `new`, and that only a restart applies: one line each.
fn waiting_for_restart(first: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&first.options, &new.options);
    let mut out = Vec::new();
    let mut check = |changed: bool, key: &str| {
        if changed {
            out.push(format!(
                "{key} changed: it takes effect when the daemon restarts"
            ));
        }
    };
    check(first.socket != new.socket, "socket");
    check(first.metrics != new.metrics, "metrics");
    check(
        first.remote.is_some() != new.remote.is_some(),
        "remote (turning the listener on or off)",
    );
    check(first.log_format != new.log_format, "log_format");
    check(first.watch != new.watch, "watch");
    check(first.policy_path != new.policy_path, "policy");
    check(a.cache_dir != b.cache_dir, "cache_dir");
    check(a.worker_dir != b.worker_dir, "worker_dir");
    check(a.state_dir != b.state_dir, "state_dir");
    check(a.store != b.store, "store");
    check(a.max_workers != b.max_workers, "max_workers");
    check(a.idle_timeout != b.idle_timeout, "idle_timeout");
    check(a.zygotes != b.zygotes, "zygotes");
    out
}
