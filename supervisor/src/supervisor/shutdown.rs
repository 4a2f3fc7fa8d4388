//! Stopping the supervisor: no new starts, every worker (running or draining)
//! asked to shut down and killed after the grace, then the cgroups removed.

use super::Inner;
use std::time::Duration;

impl Inner {
    /// Stop accepting calls, let queued calls finish, run shutdown hooks, and stop
    /// every worker, killing any that takes longer than `grace` or than its own
    /// hook's grace (its plugin's `timeout`), whichever is shorter.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        // Starts under way end now (their workers are killed), and no new one begins.
        self.stopping.send_replace(true);
        // A version being put in the table now is in it (and the one it replaced
        // draining) once this is free; later ones see `stopping` and are not.
        drop(self.lifecycle.lock().await);
        self.broker.stop_bus();
        let mut workers = Vec::new();
        for p in &self.all_plugins() {
            workers.extend(p.state.lock().await.shut_down());
            p.freed.notify_waiters();
        }
        workers.extend(self.take_draining().into_iter().map(|w| (w, grace)));
        let mut stops = tokio::task::JoinSet::new();
        for (w, own) in workers {
            let grace = grace.min(own);
            stops.spawn(async move { w.shutdown(grace).await });
        }
        while stops.join_next().await.is_some() {}
        // Plugin groups go as their last processes exit; then the base.
        crate::worker::process::poll_until(Duration::from_secs(1), || self.launcher.clean_up())
            .await;
    }
}
