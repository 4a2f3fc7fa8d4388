//! What `corral list` and `corral status` show of each plugin: its state, the
//! policy and confinement in force, what its worker uses, and why it is not
//! serving when it is not.

use super::Inner;
use corral_protocol::PluginInfo;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl Inner {
    /// Every plugin and its state.
    pub(crate) async fn list(&self) -> Vec<PluginInfo> {
        let mut out = Vec::new();
        let blocked = self.dependencies().blocked;
        for p in &self.all_plugins() {
            let mut st = p.state.lock().await;
            st.reap(&p.manifest.id, &self.live().restart, Instant::now());
            let why_blocked = blocked
                .get(&p.manifest.id)
                .filter(|_| st.worker().is_none());
            if let Some(why) = why_blocked {
                st.note_error(format!("not started: {why}"));
            }
            let worker = st.worker();
            let effective = st
                .effective()
                .filter(|_| worker.is_some())
                .cloned()
                .unwrap_or_else(|| self.policy().resolve(&p.manifest, p.publisher.as_deref()));
            out.push(PluginInfo {
                supervision: crate::worker::supervision(
                    &effective,
                    self.options.handshake_timeout,
                    self.options.kill_grace,
                    worker.map(|w| crate::worker::TreeKill::of(w, st.group().is_some())),
                ),
                policy: effective.summary(),
                resources: st.resources(),
                instances: st
                    .instances()
                    .iter()
                    .map(|i| corral_protocol::InstanceInfo {
                        pid: i.worker.pid,
                        busy: !i.worker.is_idle(),
                        resources: i.resources(),
                    })
                    .collect(),
                instances_allowed: effective.instances.value as u32,
                id: p.manifest.id.clone(),
                version: p.manifest.version.to_string(),
                runtime: p.manifest.runtime,
                dir: p.dir.to_string_lossy().into_owned(),
                level: effective.level.value.to_string(),
                enforcement: worker.map(|w| w.hello.enforcement.clone()),
                state: st.status_word(why_blocked.is_some()).to_owned(),
                pid: worker.map(|w| w.pid),
                restarts: st.restarts(),
                calls: p.calls.load(Ordering::Relaxed),
                queued: self
                    .live()
                    .max_queue
                    .saturating_sub(p.inflight.available_permits()) as u32,
                last_error: st.last_error().map(|e| p.redactor.redact(e)),
                exports: worker.map(|w| w.exports.clone()).unwrap_or_default(),
                requested: effective.requested_lines(),
                reads: reads(p, worker),
            });
        }
        out
    }
}

/// Most engine files listed (a worker reports them in its handshake).
const MAX_ENGINE_FILES: usize = 256;

/// What `p`'s worker may read besides its files, one line each.
fn reads(p: &super::Plugin, worker: Option<&Arc<crate::worker::WorkerHandle>>) -> Vec<String> {
    let mut out: Vec<String> = worker
        .iter()
        .flat_map(|w| w.hello.runtime_files.iter())
        // What the worker said of itself: bounded, and no control characters
        // reach an operator's terminal.
        .take(MAX_ENGINE_FILES)
        .map(|f| {
            let f: String = f.chars().filter(|c| !c.is_control()).take(4096).collect();
            format!("{f} (the {} engine)", p.manifest.runtime.as_str())
        })
        .collect();
    match p.libraries.as_ref() {
        Ok(libs) => out.extend(
            libs.iter()
                .map(|l| format!("{} (needed by {})", l.path.display(), l.needed_by)),
        ),
        Err(why) => out.push(format!("(none: {why})")),
    }
    out
}
