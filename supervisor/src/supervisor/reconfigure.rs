//! The settings of the daemon's configuration that apply without a restart, and
//! switching to a reloaded configuration (`corral serve` on SIGHUP):
//!
//! - `max_queue`: every plugin's queue takes the new size at once (a smaller one
//!   refuses new calls until the calls past it have finished; none is cut off);
//! - `[plugin.ID.config]` and `[plugin.ID.secrets]`: a plugin whose settings
//!   changed gets a new version with a fresh worker, which takes over once it has
//!   loaded; the old worker finishes its calls in flight first (as a hot reload);
//! - `[publishers]`: plugins whose signature now verifies as another publisher
//!   (or no longer verifies) are read again, as if their files had changed;
//! - `[restart]` and `health_interval`: from the next crash and the next worker;
//! - `audit`: the audit log is closed and opened again (logrotate's `postrotate`
//!   sends SIGHUP for that), at the place the configuration now names.
//!
//! The plugin directories (`plugins`, `plugins_dir`) are the daemon's watchers'
//! ([`crate::daemon::serve`]); every other setting is read at start only, and a
//! change to one is reported as waiting for a restart.

use super::{Inner, Options, PluginConfig, RestartPolicy, error_chain};
use crate::plugins::signing;
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The settings a reload changes while the daemon runs.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub(crate) max_queue: usize,
    pub(crate) plugin_config: BTreeMap<String, PluginConfig>,
    pub(crate) publishers: BTreeMap<String, String>,
    pub(crate) restart: RestartPolicy,
    pub(crate) health_interval: Duration,
}

impl Live {
    pub(crate) fn of(o: &Options) -> Live {
        Live {
            max_queue: o.max_queue,
            plugin_config: o.plugin_config.clone(),
            publishers: o.publishers.clone(),
            restart: o.restart.clone(),
            health_interval: o.health_interval,
        }
    }
}

/// Give `queue` (a plugin's call slots) `to` slots instead of `from`. Slots held by
/// calls are never taken back: a smaller queue forgets free slots now and the rest
/// as those calls end.
fn resize(queue: &Arc<tokio::sync::Semaphore>, from: usize, to: usize) {
    if to >= from {
        queue.add_permits(to - from);
        return;
    }
    let short = from - to;
    let rest = short - queue.forget_permits(short);
    if rest > 0 {
        let queue = Arc::clone(queue);
        tokio::spawn(async move {
            // First in line (the semaphore is fair): freed slots come here first.
            if let Ok(p) = queue.acquire_many_owned(rest as u32).await {
                p.forget();
            }
        });
    }
}

impl Inner {
    /// The settings in force.
    pub(crate) fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Switch to the reloadable settings of `options` (a validated configuration);
    /// returns one line per change.
    pub(crate) async fn reconfigure(&self, options: &Options) -> Vec<String> {
        let lc = self.lifecycle.lock().await;
        let old = self.live();
        let new = Live::of(options);
        let mut changes = Vec::new();
        self.broker.audit.reopen(options.audit.clone());
        if new.max_queue != old.max_queue {
            for p in self.all_plugins() {
                resize(&p.inflight, old.max_queue, new.max_queue);
            }
            changes.push(format!(
                "max_queue now {} (was {})",
                new.max_queue, old.max_queue
            ));
        }
        if new.restart.max_crashes != old.restart.max_crashes
            || new.restart.window != old.restart.window
        {
            changes.push(format!(
                "restart now {} crashes in {:?}",
                new.restart.max_crashes, new.restart.window
            ));
        }
        if new.health_interval != old.health_interval {
            changes.push(format!(
                "health_interval now {:?} (for workers started from now on)",
                new.health_interval
            ));
        }
        let publishers_changed = new.publishers != old.publishers;
        if publishers_changed {
            changes.push(format!(
                "publishers now {}",
                if new.publishers.is_empty() {
                    "none".to_owned()
                } else {
                    new.publishers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new.clone());
        // Loads run the plugins' own code: not under the lifecycle lock, and side
        // by side (one plugin's slow `init` holds up no other's new settings).
        drop(lc);
        let mut loads = Vec::new();
        for p in self.all_plugins() {
            loads.push(self.apply_settings(p.manifest.id.clone(), publishers_changed));
        }
        let renewed: Vec<Option<String>> = futures_util::stream::iter(loads)
            .buffered(super::lifecycle::PARALLEL_LOADS)
            .collect()
            .await;
        changes.extend(renewed.into_iter().flatten());
        for c in &changes {
            tracing::info!("configuration: {c}");
        }
        changes
    }

    /// Give plugin `id` the settings in force (and check it against the
    /// publishers in force if they changed): a new version in a new worker if
    /// anything about it changed, in its turn (after a reload under way). Returns
    /// the change, if any.
    async fn apply_settings(&self, id: String, publishers_changed: bool) -> Option<String> {
        // Nothing changed for it: no need to wait for a load of it under way.
        let p = self.plugin(&id)?;
        if !publishers_changed
            && *p.settings
                == self
                    .live()
                    .plugin_config
                    .get(&id)
                    .cloned()
                    .unwrap_or_default()
        {
            return None;
        }
        let Some(turn) = self.try_load_turn(&id) else {
            // A load of it is under way (its `init` may take its whole deadline):
            // applied after it, in the background; nobody waits.
            let me = self.me.upgrade()?;
            let later = id.clone();
            tokio::spawn(async move {
                let turn = me.load_turn(&later).await;
                if let Some(change) = me.settings_in_turn(&later, publishers_changed, turn).await {
                    tracing::info!("configuration: {change}");
                }
            });
            return Some(format!(
                "{id}: its settings or publishers changed; applied once the load under way ends"
            ));
        };
        self.settings_in_turn(&id, publishers_changed, turn).await
    }

    /// [`Inner::apply_settings`] in `id`'s turn, from what the turn before installed.
    async fn settings_in_turn(
        &self,
        id: &str,
        publishers_changed: bool,
        _turn: super::lifecycle::LoadTurn<'_>,
    ) -> Option<String> {
        let p = self.plugin(id)?;
        let live = self.live();
        let settings = live.plugin_config.get(id).cloned().unwrap_or_default();
        let signer_changed = publishers_changed
            && signing::verify(p.files.path(), &live.publishers)
                .ok()
                .as_ref()
                != Some(&p.publisher);
        let version = if signer_changed {
            // Read again, checked against the publishers trusted now.
            match self
                .read_plugin_blocking(&p.dir, Some(Arc::clone(&p)))
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    let why = format!(
                        "{id}: not read again under the new publishers: {}; the running \
                         version keeps serving until its worker stops",
                        error_chain(&e)
                    );
                    p.state.lock().await.note_error(why.clone());
                    return Some(why);
                }
            }
        } else if *p.settings != settings {
            Inner::same_version_with(&p, Arc::new(settings))
        } else {
            return None;
        };
        let what = if signer_changed {
            "its publisher"
        } else {
            "its config or secrets"
        };
        match self
            .load_version(version, Some(Arc::clone(&p)), false)
            .await
        {
            Ok(_) => Some(format!(
                "{id}: {what} changed: a new worker serves it; the old one retires after its \
                 calls"
            )),
            Err(why) => {
                let why = format!(
                    "{id}: {what} changed but no worker could start with them ({why}); the \
                     running version keeps serving"
                );
                p.state.lock().await.note_error(why.clone());
                Some(why)
            }
        }
    }
}
