//! How many workers run at once, and for how long one may sit idle.
//!
//! Every worker start takes a [`Slot`] first (`Inner::take_slot`); the slot is
//! held with the worker in its plugin's state, goes with it when it is retired,
//! and is given back when the worker is gone (or when the start failed). With
//! `max_workers` set, a start that finds every slot taken stops the least recently
//! used idle worker of another plugin (its shutdown hook runs as at a reload) and
//! waits for its slot; when no worker is idle the call is refused as
//! `Overloaded` with the reason, which is not the plugin's crash.
//!
//! With `idle_timeout` set, a sweeper stops every worker that has had no call for
//! that long; its plugin shows `idle` and the next call starts a worker again.
//!
//! The supervisor's own limits are its own: [`crate::raise_open_files_limit`] lifts the
//! soft `RLIMIT_NOFILE` to the hard one at start, and a start that fails because
//! the supervisor ran out of descriptors, processes or memory
//! ([`crate::worker::exhausted`]) answers `Overloaded` too, counts as no crash and
//! marks no plugin failed.

use super::{Inner, Plugin};
use corral_protocol::{Overload, WorkersStatus};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a start waits for the slot of a worker it stopped to make room.
const EVICTION_WAIT: Duration = Duration::from_secs(10);

/// The live workers against the cap, and what the sweeper did.
#[derive(Debug)]
pub(crate) struct Capacity {
    live: AtomicUsize,
    max: Option<usize>,
    idle_timeout: Option<Duration>,
    /// Told whenever a slot is given back.
    freed: Notify,
    idle_stops: AtomicU64,
    evictions: AtomicU64,
    sweeper: OnceLock<()>,
}

/// One live worker's place under `max_workers`; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Capacity>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_waiters();
    }
}

impl Capacity {
    pub(crate) fn new(max: Option<usize>, idle_timeout: Option<Duration>) -> Arc<Capacity> {
        Arc::new(Capacity {
            live: AtomicUsize::new(0),
            max,
            idle_timeout,
            freed: Notify::new(),
            idle_stops: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            sweeper: OnceLock::new(),
        })
    }

    /// A slot if one is free.
    fn try_take(self: &Arc<Capacity>) -> Option<Slot> {
        let max = self.max.unwrap_or(usize::MAX);
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    pub(crate) fn status(&self) -> WorkersStatus {
        let (open_files, max_files) = crate::worker::open_files();
        WorkersStatus {
            live: self.live.load(Ordering::SeqCst) as u32,
            max_workers: self.max.map(|m| m as u32),
            idle_timeout_ms: self.idle_timeout.map(|d| d.as_millis() as u64),
            idle_stops: self.idle_stops.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            open_files,
            max_files,
            modules_compiled: 0,
            templates_started: 0,
            workers_forked: 0,
        }
    }
}

impl Inner {
    /// A slot for a new worker of `p`: at once if the cap allows, else after the
    /// least recently used idle worker of another plugin has stopped.
    pub(crate) async fn take_slot(&self, p: &Plugin) -> Result<Slot, Overload> {
        self.start_sweeper();
        let cap = &self.capacity;
        let give_up = Instant::now() + EVICTION_WAIT;
        loop {
            let freed = cap.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = cap.try_take() {
                return Ok(slot);
            }
            let max = cap.max.unwrap_or(usize::MAX);
            if !self.stop_least_recently_used(&p.manifest.id).await {
                return Err(Overload::Workers {
                    live: cap.live.load(Ordering::SeqCst) as u32,
                    max: max as u32,
                });
            }
            if tokio::time::timeout_at(give_up.into(), freed)
                .await
                .is_err()
            {
                return Err(Overload::Workers {
                    live: cap.live.load(Ordering::SeqCst) as u32,
                    max: max as u32,
                });
            }
        }
    }

    /// Stop the idle worker (no call in flight) that was used least recently,
    /// of any plugin but `except`; false if there is none.
    async fn stop_least_recently_used(&self, except: &str) -> bool {
        // A plugin whose state is busy (a start, a status read) is passed over.
        let candidates: Vec<(Instant, u32, Arc<Plugin>)> = self
            .all_plugins()
            .into_iter()
            .filter(|q| q.manifest.id != except)
            .filter_map(|q| {
                let st = q.state.try_lock().ok()?;
                let (at, pid) = st
                    .instances()
                    .iter()
                    .filter(|i| i.worker.is_idle())
                    .map(|i| (i.worker.last_active(), i.worker.pid))
                    .min()?;
                drop(st);
                Some((at, pid, q))
            })
            .collect();
        let mut candidates = candidates;
        candidates.sort_by_key(|(at, _, _)| *at);
        for (_, pid, q) in candidates {
            let mut st = q.state.lock().await;
            let Some(r) = st
                .idle_stop(|w| w.pid == pid && w.is_idle())
                .into_iter()
                .next()
            else {
                continue; // Busy again since it was looked at.
            };
            drop(st);
            tracing::info!(plugin = %q.manifest.id, pid = r.worker.pid, "stopping the least recently used idle worker to make room (max_workers)");
            self.capacity.evictions.fetch_add(1, Ordering::Relaxed);
            self.drain(r);
            return true;
        }
        false
    }

    /// With `idle_timeout` set, stop workers without a call for that long.
    fn start_sweeper(&self) {
        let Some(timeout) = self.capacity.idle_timeout else {
            return;
        };
        if self.capacity.sweeper.set(()).is_err() {
            return;
        }
        let me = self.me.clone();
        let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(me) = me.upgrade() else { break };
                if *me.stopping.borrow() {
                    break;
                }
                me.stop_idle(timeout).await;
            }
        });
    }

    async fn stop_idle(&self, timeout: Duration) {
        let now = Instant::now();
        for q in self.all_plugins() {
            // Busy state: looked at again at the next sweep.
            let Ok(mut st) = q.state.try_lock() else {
                continue;
            };
            let idle_for = |w: &crate::worker::WorkerHandle| {
                w.is_idle() && now.saturating_duration_since(w.last_active()) >= timeout
            };
            let stopped = st.idle_stop(idle_for);
            drop(st);
            for r in stopped {
                tracing::info!(plugin = %q.manifest.id, pid = r.worker.pid, ?timeout, "stopping an idle worker (idle_timeout)");
                self.capacity.idle_stops.fetch_add(1, Ordering::Relaxed);
                self.drain(r);
            }
        }
    }

    /// The workers against the caps, and the supervisor's descriptors.
    pub(crate) fn workers_status(&self) -> WorkersStatus {
        let (templates_started, workers_forked) = self.launcher.templates();
        WorkersStatus {
            modules_compiled: self.launcher.modules_compiled(),
            templates_started,
            workers_forked,
            ..self.capacity.status()
        }
    }
}
