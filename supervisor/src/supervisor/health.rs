//! Health checks: a plugin that exports `health` has it called every
//! `Options::health_interval`; a failing check kills the worker (audited, shown in
//! `corral status`) and starts a new one.

use super::{HEALTH_EXPORT, Inner};
use crate::broker::audit::AuditEvent;
use crate::worker::WorkerHandle;
use std::sync::{Arc, Weak};
use std::time::Duration;

impl Inner {
    pub(crate) fn watch_health(
        &self,
        plugin: &str,
        worker: &Arc<WorkerHandle>,
        freed: &Arc<tokio::sync::Notify>,
    ) {
        let freed = Arc::clone(freed);
        let interval = self.live().health_interval;
        let me: Weak<Inner> = self.me.clone();
        let worker = Arc::downgrade(worker);
        let plugin = plugin.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(w) = worker.upgrade() else { break };
                if !w.is_alive() {
                    break;
                }
                let deadline = interval.min(Duration::from_secs(5));
                let chain: Arc<[String]> = Arc::from(vec![plugin.clone()]);
                let Some(sent) = w.call_if_idle(&freed, HEALTH_EXPORT, deadline, chain).await
                else {
                    continue; // Busy serving a call: checked at the next interval.
                };
                let Ok(result) = sent else {
                    break; // Retired or gone: a new worker took over.
                };
                let Err(e) = result else { continue };
                if !w.is_alive() && !w.killed_by_supervisor() {
                    break; // It crashed: counted and restarted as a crash.
                }
                let why = format!("unhealthy: health check failed: {e}; worker restarted");
                let Some(me) = me.upgrade() else { break };
                me.broker.audit.record(AuditEvent {
                    plugin: &plugin,
                    operation: "health",
                    target: HEALTH_EXPORT,
                    decision: "restarted",
                    rule: &why,
                });
                w.kill_because(why);
                drop(w);
                // Start the replacement now rather than at the next call.
                if let Err(e) = me.restart(&plugin).await {
                    tracing::warn!(plugin, "restart after a failed health check: {e}");
                }
                break;
            }
        });
    }
}
