//! The live policy: which one is in force, why a reload was rejected, what a
//! plugin's effective policy is, and what changes for running workers when the
//! policy does.

use super::start::cgroup_limits;
use super::{Inner, error_chain};
use corral_policy::{Effective, Policy};
use futures_util::StreamExt;
use std::sync::Arc;

impl Inner {
    /// The policy in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Why the last policy reload was rejected, if it was.
    pub(crate) fn policy_error(&self) -> Option<String> {
        self.policy_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keep the current policy and remember why a reload was rejected.
    pub(crate) fn reject_policy(&self, why: String) {
        tracing::error!("policy reload rejected; keeping the last good policy: {why}");
        self.broker.metrics.policy_reload(false);
        *self.policy_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }

    /// The effective policy of `plugin` under the policy in force.
    pub(crate) fn explain(&self, plugin: &str) -> Option<Effective> {
        let p = self.plugin(plugin)?;
        Some(self.policy().resolve(&p.manifest, p.publisher.as_deref()))
    }

    /// Switch to a new policy. Running workers get what can change live: cgroup
    /// limits (memory, CPU, pids) are written to their groups and the call deadline
    /// applies to the next call. A changed level, user or engine limit needs a new
    /// worker: the old one finishes the calls it has and is retired; the next call
    /// starts a worker under the new policy. Returns one line per change.
    pub(crate) async fn set_policy(&self, policy: Policy) -> Vec<String> {
        let policy = Arc::new(policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&policy);
        *self.policy_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.broker.metrics.policy_reload(true);
        let mut changes = Vec::new();
        let mut renew = Vec::new();
        for p in &self.all_plugins() {
            let mut st = p.state.lock().await;
            if let Some(new) = self.apply_policy(p, &mut st, &policy, &mut changes) {
                renew.push((Arc::clone(p), new));
            }
        }
        // A plugin with a load under way (its `init` may take its whole deadline)
        // is renewed in the background once that load ends: nobody waits for it.
        let mut now = Vec::new();
        for (p, new) in renew {
            let id = p.manifest.id.clone();
            match self.try_load_turn(&id) {
                Some(turn) => now.push((id, new, turn)),
                None => {
                    changes.push(format!(
                        "{id}: new worker at {} once the load under way ends; the old one \
                         retires after its calls",
                        new.summary()
                    ));
                    let Some(me) = self.me.upgrade() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let turn = me.load_turn(&id).await;
                        let change = me.renew_under(&id, &new, turn).await;
                        tracing::info!("policy: {change}");
                    });
                }
            }
        }
        let mut renewals = Vec::new();
        for (id, new, turn) in now {
            renewals.push(async move { self.renew_under(&id, &new, turn).await });
        }
        let renewed: Vec<String> = futures_util::stream::iter(renewals)
            .buffered(super::lifecycle::PARALLEL_LOADS)
            .collect()
            .await;
        changes.extend(renewed);
        for c in &changes {
            tracing::info!("policy: {c}");
        }
        changes
    }

    /// What `policy` changes for `p`'s running workers (`st`, its state): cgroup
    /// limits, instances and the deadline are applied at once, each change a line
    /// in `changes`; returns the effective policy to renew the workers under if it
    /// needs a new worker.
    fn apply_policy(
        &self,
        p: &super::Plugin,
        st: &mut super::state::PluginState,
        policy: &Policy,
        changes: &mut Vec<String>,
    ) -> Option<Effective> {
        let new = policy.resolve(&p.manifest, p.publisher.as_deref());
        let old = st.effective().cloned()?;
        if st.worker().is_none() || old == new {
            return None;
        }
        let id = &p.manifest.id;
        let needs_new_worker = old.level.value != new.level.value
            || old.user.value != new.user.value
            || old.memory.value != new.memory.value
            || old.max_output.value != new.max_output.value
            || old.tmpfs.value != new.tmpfs.value;
        if needs_new_worker {
            return Some(new);
        }
        let limits = cgroup_limits(&new);
        let groups: Vec<_> = st
            .instances()
            .iter()
            .filter_map(|i| i.group.clone())
            .filter(|g| g.limits() != limits)
            .collect();
        let failed = groups.iter().find_map(|g| g.set_limits(&limits).err());
        if let Some(e) = failed {
            let why = format!(
                "{id}: new cgroup limits not applied to the running worker: {}",
                error_chain(&e)
            );
            tracing::warn!("{why}");
            st.note_error(why.clone());
            changes.push(why);
            return None;
        }
        if !groups.is_empty() {
            changes.push(format!(
                "{id}: cgroup limits applied live: worker_memory {}, cpu {}, pids {}",
                corral_policy::size(new.worker_memory.value),
                new.cpu.value,
                new.pids.value
            ));
        }
        if old.instances.value != new.instances.value {
            let keep = new.instances.value as usize;
            let extra = st.retire_past(keep);
            changes.push(format!(
                "{id}: instances now {keep}{}",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!("; {} retire after their calls", extra.len())
                }
            ));
            for r in extra {
                self.drain(r);
            }
        }
        if old.timeout != new.timeout {
            changes.push(format!("{id}: call deadline now {:?}", new.timeout.value));
        }
        st.policy_applied(new);
        None
    }

    /// A new worker for `id` under `new` (the policy in force) takes over before
    /// the old one is retired (after its calls). If none can start, the old one is
    /// retired anyway: a policy is never left unenforced, and the next call starts
    /// a worker under it. Returns the change.
    async fn renew_under(
        &self,
        id: &str,
        new: &Effective,
        _turn: super::lifecycle::LoadTurn<'_>,
    ) -> String {
        // A load that ended meanwhile may have started it under this policy; or
        // its workers are gone (stopped idle, crashed): the next start resolves
        // the policy in force.
        if let Some(p) = self.plugin(id) {
            let st = p.state.lock().await;
            let current = self.policy().resolve(&p.manifest, p.publisher.as_deref());
            if st.worker().is_none() {
                return format!(
                    "{id}: no worker to renew; the next one starts at {}",
                    current.summary()
                );
            }
            if st.effective() == Some(&current) {
                return format!("{id}: a worker at {} serves it", current.summary());
            }
        }
        match self.renew_in_turn(id).await {
            Ok(()) => format!(
                "{id}: new worker at {}; the old one retires after its calls",
                new.summary()
            ),
            Err(why) => {
                tracing::warn!(plugin = %id, "no new worker under the new policy: {why}");
                if let Some(current) = self.plugin(id) {
                    let mut st = current.state.lock().await;
                    for r in st.retire() {
                        self.drain(r);
                    }
                    st.note_error(format!("no worker under the new policy: {why}"));
                }
                format!(
                    "{id}: worker retired after its calls (no new worker could start: {why}); \
                     the next call starts one at {}",
                    new.summary()
                )
            }
        }
    }

    /// After a worker of `p` started under `started` (the policy it resolved when
    /// its start began): if the policy changed during the start (a reload that
    /// looked at `p` before the worker was there), apply the policy in force to
    /// it now, as the reload would have. `st` is `p`'s state, locked.
    pub(crate) fn catch_up_policy(
        &self,
        p: &super::Plugin,
        st: &mut super::state::PluginState,
        started: &Effective,
    ) {
        let policy = self.policy();
        if policy.resolve(&p.manifest, p.publisher.as_deref()) == *started {
            return;
        }
        let mut changes = Vec::new();
        let renew = self.apply_policy(p, st, &policy, &mut changes);
        for c in &changes {
            tracing::info!("policy, for a worker that started during its reload: {c}");
        }
        if let Some(new) = renew {
            let id = p.manifest.id.clone();
            let Some(me) = self.me.upgrade() else { return };
            // In its own turn, after the load (if any) that started this worker.
            tokio::spawn(async move {
                let turn = me.load_turn(&id).await;
                let change = me.renew_under(&id, &new, turn).await;
                tracing::info!("policy, for a worker that started during its reload: {change}");
            });
        }
    }
}
