//! [`PluginState`]: one plugin version's worker and its history, and every
//! transition of it. Each method is one transition; nothing outside this file
//! writes a field, so the rules (a crash is counted once, a failed plugin stays
//! failed, a retired worker is tracked until it exits) live in one place and are
//! unit-tested without a process.

use super::capacity::Slot;
use super::{Inner, RestartPolicy};
use crate::worker::{Turn, WorkerHandle};
use corral_confine::cgroup::PluginCgroup;
use corral_policy::Effective;
use corral_protocol::{ExitReason, ResourceStats};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deadlines used before a worker has an effective policy.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(5);

/// A plugin version's workers (its instances), its policy and its history.
#[derive(Debug, Default)]
pub(crate) struct PluginState {
    /// The running workers, oldest first; each has its cgroup and its place
    /// under `max_workers`.
    instances: Vec<Instance>,
    /// Crash times within the restart window.
    crashes: VecDeque<Instant>,
    restarts: u32,
    /// Instances that ended without being stopped (a crash, a kill) and have not
    /// been replaced: the next start of one is a restart.
    lost: u32,
    failed: Option<String>,
    last_error: Option<String>,
    shutting_down: bool,
    /// A worker is being started (shown as `starting` while none runs).
    pub(crate) starting: bool,
    /// The policy the running workers were started with (live changes applied).
    effective: Option<Effective>,
    /// The last worker was stopped for being idle (shown as `idle`).
    idle: bool,
}

/// One running worker of a plugin.
#[derive(Debug)]
pub(crate) struct Instance {
    pub(crate) worker: Arc<WorkerHandle>,
    pub(crate) group: Option<Arc<PluginCgroup>>,
    slot: Slot,
}

/// A worker taken out of service, with its cgroup (kept until it has exited).
#[derive(Debug)]
pub(crate) struct Retiring {
    pub(crate) worker: Arc<WorkerHandle>,
    pub(crate) group: Option<Arc<PluginCgroup>>,
    /// How long its calls may still take, plus a second for its shutdown hook.
    pub(crate) grace: Duration,
    /// Given back once the worker has exited.
    pub(crate) slot: Option<Slot>,
}

impl PluginState {
    /// The first running worker, if any (what `corral list` shows as the pid).
    pub(crate) fn worker(&self) -> Option<&Arc<WorkerHandle>> {
        self.instances.first().map(|i| &i.worker)
    }

    /// Every running worker with its cgroup.
    pub(crate) fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// The first running worker's cgroup, if any.
    pub(crate) fn group(&self) -> Option<&Arc<PluginCgroup>> {
        self.instances.first().and_then(|i| i.group.as_ref())
    }

    /// A running worker with no call, and the turn that holds it for one call.
    pub(crate) fn idle_instance(
        &self,
        freed: &Arc<tokio::sync::Notify>,
        alone: bool,
    ) -> Option<(Arc<WorkerHandle>, Turn)> {
        self.instances.iter().find_map(|i| {
            i.worker
                .take_idle_turn(freed, alone)
                .map(|t| (Arc::clone(&i.worker), t))
        })
    }

    /// A turn behind the calls of the instance with the fewest in flight, among
    /// those whose calls are fast (see [`WorkerHandle::take_pipelined_turn`]).
    pub(crate) fn pipelined_instance(
        &self,
        freed: &Arc<tokio::sync::Notify>,
    ) -> Option<(Arc<WorkerHandle>, Turn)> {
        let mut by_load: Vec<_> = self.instances.iter().map(|i| &i.worker).collect();
        by_load.sort_by_key(|w| w.in_flight());
        by_load
            .into_iter()
            .find_map(|w| w.take_pipelined_turn(freed).map(|t| (Arc::clone(w), t)))
    }

    /// How many workers the policy lets this plugin run.
    pub(crate) fn instances_allowed(&self) -> usize {
        self.effective
            .as_ref()
            .map_or(1, |e| e.instances.value as usize)
    }

    /// The policy the running worker was started with (live changes applied).
    pub(crate) fn effective(&self) -> Option<&Effective> {
        self.effective.as_ref()
    }

    pub(crate) fn restarts(&self) -> u32 {
        self.restarts
    }

    pub(crate) fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Why the plugin was given up on, if it was.
    pub(crate) fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    pub(crate) fn crashes_in_window(&self) -> u32 {
        self.crashes.len() as u32
    }

    /// The call deadline and its cap under the worker's policy.
    pub(crate) fn deadlines(&self) -> (Duration, Duration) {
        self.effective
            .as_ref()
            .map_or((DEFAULT_DEADLINE, DEFAULT_DEADLINE), |e| {
                (e.timeout.value, e.timeout_cap)
            })
    }

    /// A new worker is ready under `effective`; true if it is a restart.
    pub(crate) fn ready(&mut self, started: super::start::Started) -> bool {
        // Replacing one that crashed or was killed is a restart; a first start, a
        // start after an idle stop, or one more instance is not.
        let restart = self.lost > 0;
        if restart {
            self.lost -= 1;
            self.restarts += 1;
        }
        self.idle = false;
        self.instances.push(Instance {
            worker: started.worker,
            group: started.group,
            slot: started.slot,
        });
        self.effective = Some(started.effective);
        restart
    }

    /// Say why the plugin is not serving as it should (shown by `corral status`).
    pub(crate) fn note_error(&mut self, why: String) {
        self.last_error = Some(why);
    }

    /// A live policy change that the running worker takes as it is.
    pub(crate) fn policy_applied(&mut self, effective: Effective) {
        self.effective = Some(effective);
    }

    /// How long to wait before the next start: the backoff of the crashes in the
    /// window, counted from the last one.
    pub(crate) fn restart_wait(&self, policy: &RestartPolicy, now: Instant) -> Duration {
        let delay = policy.backoff(self.crashes.len() as u32);
        match self.crashes.back() {
            Some(&last) => (last + delay).saturating_duration_since(now),
            None => Duration::ZERO,
        }
    }

    /// Count a crash (or a failed start) at `now`; crashes older than the window
    /// are forgotten, and `max_crashes` in the window mark the plugin failed.
    pub(crate) fn record_crash(
        &mut self,
        plugin: &str,
        policy: &RestartPolicy,
        reason: String,
        now: Instant,
    ) {
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|&t| now.duration_since(t) > policy.window)
        {
            self.crashes.pop_front();
        }
        self.last_error = Some(reason.clone());
        if self.crashes.len() as u32 >= policy.max_crashes {
            tracing::error!(
                plugin,
                crashes = self.crashes.len(),
                "plugin failed: {reason}; not restarting"
            );
            self.failed = Some(reason);
        } else {
            tracing::warn!(plugin, "{reason}");
        }
    }

    /// Notice workers that have gone away: forget them, and count each as a crash
    /// unless the supervisor killed it.
    pub(crate) fn reap(&mut self, plugin: &str, policy: &RestartPolicy, now: Instant) {
        let mut i = 0;
        while i < self.instances.len() {
            let w = &self.instances[i].worker;
            let by_us = w.killed_by_supervisor();
            // A worker the supervisor has killed is gone even if it has not been
            // reaped yet: the next call must not be routed to it.
            let reason = match w.exit_reason() {
                Some(reason) => reason,
                None if by_us => ExitReason::Signal {
                    signo: libc::SIGKILL,
                    name: "SIGKILL".into(),
                },
                None => {
                    i += 1;
                    continue;
                }
            };
            let kill_reason = w.kill_reason();
            self.instances.remove(i);
            self.lost += 1;
            if by_us {
                self.last_error = Some(kill_reason.unwrap_or_else(|| {
                    format!("worker killed by the supervisor after it missed a deadline: {reason}")
                }));
            } else {
                self.record_crash(plugin, policy, format!("worker crashed: {reason}"), now);
            }
        }
    }

    /// How long a retired worker's shutdown hook may run once its calls have
    /// finished (they are waited for first, each within its own deadline): as
    /// long as one call of the plugin, its `timeout`. Past it the worker is killed.
    fn retire_grace(&self) -> Duration {
        self.effective
            .as_ref()
            .map_or(DEFAULT_DEADLINE, |e| e.timeout.value)
    }

    fn retiring(&self, i: Instance) -> Retiring {
        Retiring {
            worker: i.worker,
            group: i.group,
            grace: self.retire_grace(),
            slot: Some(i.slot),
        }
    }

    /// Take every worker out of service (a new version or policy took over, or the
    /// plugin was removed); each finishes its calls elsewhere.
    pub(crate) fn retire(&mut self) -> Vec<Retiring> {
        let all = std::mem::take(&mut self.instances);
        all.into_iter().map(|i| self.retiring(i)).collect()
    }

    /// Take out of service the workers past `keep` (the newest first), after a
    /// policy lowered `instances`.
    pub(crate) fn retire_past(&mut self, keep: usize) -> Vec<Retiring> {
        let extra = self.instances.split_off(keep.min(self.instances.len()));
        extra.into_iter().map(|i| self.retiring(i)).collect()
    }

    /// Stop the workers `stop` picks for being idle (or to make room for another
    /// plugin's): each is retired like a replaced one; once none is left the
    /// plugin shows `idle`, and the next call starts one.
    pub(crate) fn idle_stop(
        &mut self,
        mut stop: impl FnMut(&WorkerHandle) -> bool,
    ) -> Vec<Retiring> {
        let (gone, kept) = std::mem::take(&mut self.instances)
            .into_iter()
            .partition::<Vec<_>, _>(|i| stop(&i.worker));
        self.instances = kept;
        if !gone.is_empty() && self.instances.is_empty() {
            self.idle = true;
        }
        gone.into_iter().map(|i| self.retiring(i)).collect()
    }

    /// The supervisor is stopping: no more starts; returns the workers to stop.
    pub(crate) fn shut_down(&mut self) -> Vec<(Arc<WorkerHandle>, Duration)> {
        self.shutting_down = true;
        let grace = self.retire_grace();
        std::mem::take(&mut self.instances)
            .into_iter()
            .map(|i| (i.worker, grace))
            .collect()
    }

    /// The word `corral list` shows; `blocked` when a dependency keeps it from
    /// starting.
    pub(crate) fn status_word(&self, blocked: bool) -> &'static str {
        if self.failed.is_some() {
            "failed"
        } else if !self.instances.is_empty() {
            "running"
        } else if self.starting {
            "starting"
        } else if blocked {
            "blocked"
        } else if self.idle {
            "idle"
        } else if !self.crashes.is_empty() {
            "crashed"
        } else {
            "stopped"
        }
    }

    /// What the first running worker uses, from its cgroup and `/proc`.
    pub(crate) fn resources(&self) -> Option<ResourceStats> {
        self.instances.first().map(Instance::resources)
    }
}

impl Instance {
    /// What this worker uses, from its cgroup and `/proc`.
    pub(crate) fn resources(&self) -> ResourceStats {
        let base = self.group.as_ref().map(|g| g.stats()).unwrap_or_default();
        crate::plugins::access::worker_stats(base, self.worker.pid)
    }
}

impl Inner {
    /// Let a retired worker finish its calls, run its shutdown hook and exit, in the
    /// background; it is shut down with the rest if the supervisor stops first.
    pub(crate) fn drain(&self, r: Retiring) {
        {
            let mut d = self.draining.lock().unwrap_or_else(|e| e.into_inner());
            d.retain(|w| w.upgrade().is_some_and(|w| w.is_alive()));
            d.push(Arc::downgrade(&r.worker));
        }
        tokio::spawn(async move {
            r.worker.retire(r.grace).await;
            drop(r.group);
            drop(r.slot);
        });
    }

    /// The retired workers still draining.
    pub(crate) fn take_draining(&self) -> Vec<Arc<WorkerHandle>> {
        std::mem::take(&mut *self.draining.lock().unwrap_or_else(|e| e.into_inner()))
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            max_crashes: 4,
            window: Duration::from_secs(60),
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RestartPolicy::default();
        assert_eq!(p.backoff(0), Duration::ZERO);
        assert_eq!(p.backoff(1), Duration::ZERO);
        assert_eq!(p.backoff(2), Duration::from_millis(100));
        assert_eq!(p.backoff(3), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(400));
        assert_eq!(p.backoff(7), Duration::from_millis(3200));
        assert_eq!(p.backoff(8), Duration::from_secs(5));
        assert_eq!(p.backoff(40), Duration::from_secs(5));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn the_wait_before_a_restart_counts_from_the_last_crash() {
        let p = policy();
        let mut st = PluginState::default();
        let t0 = Instant::now();
        assert_eq!(st.restart_wait(&p, t0), Duration::ZERO, "no crash, no wait");
        st.record_crash("x", &p, "one".into(), t0);
        assert_eq!(
            st.restart_wait(&p, t0),
            Duration::ZERO,
            "first restart at once"
        );
        st.record_crash("x", &p, "two".into(), t0);
        assert_eq!(st.restart_wait(&p, t0), Duration::from_millis(100));
        assert_eq!(
            st.restart_wait(&p, t0 + Duration::from_millis(30)),
            Duration::from_millis(70),
            "time since the crash counts"
        );
        st.record_crash("x", &p, "three".into(), t0);
        assert_eq!(st.restart_wait(&p, t0), Duration::from_millis(200));
        assert_eq!(
            st.restart_wait(&p, t0 + Duration::from_secs(1)),
            Duration::ZERO
        );
    }

    #[test]
    fn crashes_in_the_window_fail_the_plugin_and_old_ones_are_forgotten() {
        let p = policy();
        let mut st = PluginState::default();
        let t0 = Instant::now();
        for i in 0..3 {
            st.record_crash("x", &p, format!("crash {i}"), t0 + Duration::from_secs(i));
        }
        assert_eq!(st.failed(), None);
        assert_eq!(st.status_word(false), "crashed");
        // Past the window the first three are forgotten: one crash in the window.
        st.record_crash("x", &p, "late".into(), t0 + Duration::from_secs(200));
        assert_eq!(st.crashes_in_window(), 1);
        assert_eq!(st.failed(), None);
        let t1 = t0 + Duration::from_secs(200);
        for i in 1..4 {
            st.record_crash("x", &p, format!("again {i}"), t1 + Duration::from_secs(i));
        }
        assert_eq!(st.crashes_in_window(), 4);
        assert_eq!(st.failed(), Some("again 3"));
        assert_eq!(st.last_error(), Some("again 3"));
        assert_eq!(st.status_word(false), "failed");
        assert_eq!(st.status_word(true), "failed", "failed outranks blocked");
    }

    #[test]
    fn a_stopped_plugin_is_blocked_only_when_a_dependency_keeps_it() {
        let st = PluginState::default();
        assert_eq!(st.status_word(false), "stopped");
        assert_eq!(st.status_word(true), "blocked");
        assert_eq!(st.deadlines(), (DEFAULT_DEADLINE, DEFAULT_DEADLINE));
    }
}
