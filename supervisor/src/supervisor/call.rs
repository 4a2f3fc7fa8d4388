//! Call admission and routing: the bounded queue every call takes a slot of, the
//! retry when the version a call looked up was retired on its way, and starting a
//! plugin's worker on demand (dependencies first, after any backoff).

use super::{HEALTH_EXPORT, Inner, Plugin, error_chain};
use crate::broker::messaging::{Delivery, Payload};
use crate::worker::output::LogBudget;

/// Bytes a second of a subscriber's failed deliveries that are logged (after a
/// burst of four seconds' worth); the rest are counted and summarised.
const DELIVERY_LOG_RATE: u64 = 8 << 10;
use crate::worker::{PIPELINE_INPUT, Turn, WorkerHandle};
use corral_protocol::{CallError, Overload};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::start::Started;

/// A worker whose turn a call holds, with the call deadline and its cap, and when
/// the call stops waiting to begin.
type Ready = (Arc<WorkerHandle>, Turn, (Duration, Duration), Instant);

/// How often a call waiting for a worker looks again without being told (a
/// safety net: a freed worker or a new one tells the waiters).
const LOOK_AGAIN: Duration = Duration::from_millis(100);

/// Why a start produced no worker.
enum Start {
    /// The supervisor is stopping.
    Stopped,
    /// A dependency is missing or did not start (not a crash of this plugin).
    Dependencies(NotStarted),
    /// The worker did not start or load (counted as a crash).
    Failed(String),
    /// No room under `max_workers`, or the supervisor ran out of a resource of
    /// its own: not counted against the plugin.
    Overloaded(Overload),
}

/// Why a plugin's dependencies keep it from starting.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotStarted {
    /// Dependency resolution blocks it (missing, incompatible, a cycle).
    #[error("not started: {0}")]
    Blocked(crate::plugins::deps::Blocked),
    #[error("not started: dependency {dep} cannot start: {error}")]
    Dependency { dep: String, error: CallError },
}

/// How often a call follows a plugin's new version before it gives up.
const MAX_REROUTES: usize = 16;

impl Inner {
    /// Call `function` of `plugin` on behalf of the plugins in `chain` (empty for a
    /// client's call), within the plugin's bounded queue. `timeout` overrides the
    /// plugin's own deadline, up to the policy's cap.
    pub(crate) async fn call_from(
        &self,
        plugin: &str,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &[String],
    ) -> Result<Vec<u8>, CallError> {
        let unknown = || CallError::UnknownPlugin {
            plugin: plugin.to_owned(),
        };
        let Some(p) = self.plugin(plugin) else {
            self.broker.metrics.unknown_plugin();
            return Err(unknown());
        };
        self.call_version(p, function, input, timeout, chain).await
    }

    /// [`Inner::call_version`], counted in the daemon's metrics by outcome and
    /// duration (from admission to answer).
    pub(crate) async fn call_version(
        &self,
        p: Arc<Plugin>,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &[String],
    ) -> Result<Vec<u8>, CallError> {
        let started = Instant::now();
        let labels = crate::metrics::PluginLabels::new(
            &p.manifest.id,
            p.manifest.runtime,
            self.level_of(&p),
        );
        let result = self.route(p, function, input, timeout, chain).await;
        let outcome = result.as_ref().map_or_else(CallError::kind, |_| "ok");
        self.broker.metrics.call(labels, outcome, started.elapsed());
        result
    }

    /// [`Inner::call_from`] starting at version `p` of the plugin (which may have
    /// been retired since it was looked up: the call then follows to the current
    /// version, unsent).
    async fn route(
        &self,
        mut p: Arc<Plugin>,
        function: &str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &[String],
    ) -> Result<Vec<u8>, CallError> {
        let plugin = p.manifest.id.clone();
        let plugin = plugin.as_str();
        let unknown = || CallError::UnknownPlugin {
            plugin: plugin.to_owned(),
        };
        // The queue slot is shared by every version of the plugin.
        let _slot =
            Arc::clone(&p.inflight)
                .try_acquire_owned()
                .map_err(|_| CallError::Overloaded {
                    plugin: plugin.to_owned(),
                    reason: Overload::Queue {
                        queued: self.live().max_queue as u32,
                    },
                })?;
        p.calls.fetch_add(1, Ordering::Relaxed);
        let chain: Arc<[String]> = chain
            .iter()
            .cloned()
            .chain([plugin.to_owned()])
            .collect::<Vec<_>>()
            .into();
        // A version retired while this call was on its way (hot reload, removal)
        // passes the call to the plugin's current version; nothing was sent to it.
        let mut input = Some(input);
        for _ in 0..MAX_REROUTES {
            let alone = input.as_ref().is_some_and(|i| i.len() > PIPELINE_INPUT);
            let (worker, turn, limits, start_by) = match self.turn_for(&p, timeout, alone).await {
                Err(CallError::ShuttingDown) if p.retired.load(Ordering::SeqCst) => {
                    p = self.plugin(plugin).ok_or_else(unknown)?;
                    continue;
                }
                other => other?,
            };
            if !worker.exports.iter().any(|e| e == function) {
                return Err(CallError::UnknownFunction {
                    plugin: plugin.to_owned(),
                    function: function.to_owned(),
                    exports: exports_named(&worker.exports),
                });
            }
            let deadline = deadline_of(timeout, limits);
            let bytes = input.take().unwrap_or_default();
            let result = match worker
                .try_call(
                    turn,
                    function,
                    bytes,
                    (deadline, start_by),
                    Arc::clone(&chain),
                )
                .await
            {
                Ok(result) => result,
                Err(bytes) => {
                    input = Some(bytes);
                    p = self.plugin(plugin).ok_or_else(unknown)?;
                    continue;
                }
            };
            if let Err(e @ (CallError::WorkerCrashed(_) | CallError::Timeout { .. })) = &result {
                p.state.lock().await.note_error(e.to_string());
            }
            return result;
        }
        Err(CallError::StartFailed {
            plugin: plugin.to_owned(),
            reason: format!("the plugin was replaced {MAX_REROUTES} times while this call waited"),
        })
    }

    /// Dependency resolution over every plugin: the start order, and why plugins are
    /// blocked.
    pub(crate) fn dependencies(&self) -> crate::plugins::deps::Resolution {
        let all = self.all_plugins();
        let map = all
            .iter()
            .map(|p| (p.manifest.id.clone(), &p.manifest))
            .collect();
        crate::plugins::deps::resolve(&map)
    }

    /// Start `p`'s dependencies (each after its own), or say why `p` cannot start.
    async fn start_dependencies(&self, p: &Plugin) -> Result<(), NotStarted> {
        if p.manifest.dependencies.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.dependencies().blocked.get(&p.manifest.id) {
            return Err(NotStarted::Blocked(why.clone()));
        }
        for dep in p.manifest.dependencies.keys() {
            // Absent: an optional dependency (resolution refused missing required ones).
            let Some(d) = self.plugin(dep) else { continue };
            if let Err(error) = Box::pin(self.worker_for(&d)).await {
                let dep = dep.clone();
                return Err(NotStarted::Dependency { dep, error });
            }
        }
        Ok(())
    }

    /// Start `plugin`'s worker if it has none (after a health-check kill).
    pub(crate) async fn restart(&self, plugin: &str) -> Result<(), CallError> {
        let p = self
            .plugin(plugin)
            .ok_or_else(|| CallError::UnknownPlugin {
                plugin: plugin.to_owned(),
            })?;
        self.worker_for(&p).await
    }

    /// A turn on one of `p`'s workers for a call: an idle one at once; else one
    /// more worker is started if the policy's `instances` allow it, and the call
    /// waits for whichever is free first. A call that waits longer than its
    /// deadline fails with [`CallError::Timeout`] without being sent (the
    /// deadline of a call sent counts from then).
    ///
    /// Waiting calls are served first come, first served: they queue on
    /// `Plugin::line` (a fair semaphore of one permit), and only its holder, the
    /// head of the line, waits for a worker to be freed and may take one; a call
    /// arriving while others wait takes its place behind them.
    async fn turn_for(
        &self,
        p: &Arc<Plugin>,
        timeout: Option<Duration>,
        alone: bool,
    ) -> Result<Ready, CallError> {
        let mut until: Option<Instant> = None;
        let mut head = None;
        loop {
            // Only the head of the line listens: a wake-up is never spent on a
            // call that then goes to wait in line.
            let freed = p.freed.notified();
            tokio::pin!(freed);
            if head.is_some() {
                freed.as_mut().enable();
            }
            let (more, limits, behind) = {
                let mut st = p.state.lock().await;
                let serving = self.running_in(p, &mut st)?;
                let mine = head.is_some() || p.line.available_permits() > 0;
                let start_by =
                    |limits| until.unwrap_or_else(|| Instant::now() + deadline_of(timeout, limits));
                if mine && let Some((w, turn)) = st.idle_instance(&p.freed, alone) {
                    let limits = st.deadlines();
                    return Ok((w, turn, limits, start_by(limits)));
                }
                let more = mine
                    && serving
                    && !st.starting
                    && st.instances().len() < st.instances_allowed()
                    && st
                        .restart_wait(&self.live().restart, Instant::now())
                        .is_zero();
                if more {
                    // Claimed now, so concurrent callers start one, not many.
                    st.starting = true;
                }
                // Every worker is busy: behind the calls of one whose calls are
                // fast, if there is one (while another instance starts).
                let behind = if mine && !alone {
                    st.pipelined_instance(&p.freed)
                } else {
                    None
                };
                let limits = st.deadlines();
                let behind = behind.map(|(w, turn)| (w, turn, limits, start_by(limits)));
                (serving.then_some(more), limits, behind)
            };
            match more {
                // No worker yet: this call starts the first (and waits for it).
                None => {
                    self.worker_for(p).await?;
                    continue;
                }
                Some(true) => {
                    if let Some(me) = self.me.upgrade() {
                        let p = Arc::clone(p);
                        tokio::spawn(async move { me.add_instance(&p).await });
                    }
                }
                Some(false) => {}
            }
            if let Some(ready) = behind {
                return Ok(ready);
            }
            let deadline = deadline_of(timeout, limits);
            let until = *until.get_or_insert_with(|| Instant::now() + deadline);
            let now = Instant::now();
            let timed_out = || CallError::Timeout {
                deadline_ms: deadline.as_millis() as u64,
            };
            if now >= until {
                return Err(timed_out());
            }
            if head.is_none() {
                // Into the line (first come, first served), then look again.
                let line = Arc::clone(&p.line);
                match tokio::time::timeout_at(until.into(), line.acquire_owned()).await {
                    Ok(Ok(permit)) => head = Some(permit),
                    Ok(Err(_)) => return Err(CallError::ShuttingDown),
                    Err(_) => return Err(timed_out()),
                }
                continue;
            }
            let _ = tokio::time::timeout_at(until.min(now + LOOK_AGAIN).into(), freed).await;
        }
    }

    /// One more worker for `p`, whose callers are all busy (the caller set
    /// `starting`). A start that fails is counted and shown like any; the callers
    /// keep the workers they have.
    async fn add_instance(&self, p: &Plugin) {
        let _starting = p.starting.lock().await;
        let started = self.start_abandoned_at_stop(p, Duration::ZERO).await;
        let mut st = p.state.lock().await;
        st.starting = false;
        if let Err(e) = self.finish_start(p, &mut st, started) {
            tracing::info!(plugin = %p.manifest.id, "no more instances: {e}");
        }
        drop(st);
        // Waiters look again: at the new worker, or at why there is none.
        p.freed.notify_waiters();
    }

    /// Make sure `p` has a running worker, starting one (after any backoff) if it
    /// has none.
    ///
    /// The state lock is held only to look and to record: a start (dependencies,
    /// backoff, the worker's load and `init`) runs under `p.starting`, so `list`,
    /// removal and shutdown never wait for a plugin's `init`, and a shutdown
    /// abandons a start under way (its worker is killed).
    pub(crate) async fn worker_for(&self, p: &Plugin) -> Result<(), CallError> {
        if self.running_worker(p).await? {
            return Ok(());
        }
        // One start at a time; whoever waited here finds the worker it started.
        let _starting = p.starting.lock().await;
        let wait = {
            let mut st = p.state.lock().await;
            if self.running_in(p, &mut st)? {
                return Ok(());
            }
            st.starting = true;
            st.restart_wait(&self.live().restart, Instant::now())
        };
        let started = self.start_abandoned_at_stop(p, wait).await;
        let mut st = p.state.lock().await;
        st.starting = false;
        let r = self.finish_start(p, &mut st, started);
        drop(st);
        p.freed.notify_waiters();
        r
    }

    /// Record how a start of `p`'s worker ended.
    fn finish_start(
        &self,
        p: &Plugin,
        st: &mut super::state::PluginState,
        started: Result<Started, Start>,
    ) -> Result<(), CallError> {
        let id = &p.manifest.id;
        let level = match &started {
            Ok(s) => s.effective.level.value,
            Err(_) => self.level_of(p),
        };
        let labels = || crate::metrics::PluginLabels::new(id, p.manifest.runtime, level);
        let metrics = &self.broker.metrics;
        match &started {
            Ok(_) => metrics.worker_start(labels(), "ok"),
            Err(Start::Failed(_)) => metrics.worker_start(labels(), "failed"),
            Err(Start::Overloaded(_)) => metrics.worker_start(labels(), "overloaded"),
            Err(Start::Stopped | Start::Dependencies(_)) => {}
        }
        match started {
            Err(Start::Stopped) => Err(CallError::ShuttingDown),
            Err(Start::Dependencies(why)) => {
                let why = why.to_string();
                st.note_error(why.clone());
                Err(CallError::StartFailed {
                    plugin: id.clone(),
                    reason: why,
                })
            }
            Err(Start::Failed(reason)) => {
                st.record_crash(id, &self.live().restart, reason.clone(), Instant::now());
                Err(CallError::StartFailed {
                    plugin: id.clone(),
                    reason,
                })
            }
            Err(Start::Overloaded(reason)) => {
                tracing::warn!(plugin = %id, "worker not started: {reason}");
                st.note_error(format!("not started: {reason}"));
                Err(CallError::Overloaded {
                    plugin: id.clone(),
                    reason,
                })
            }
            Ok(started) => {
                let w = Arc::clone(&started.worker);
                if st.is_shutting_down() || p.retired.load(Ordering::SeqCst) {
                    // Stopped or replaced while it loaded: nobody may use it.
                    w.kill_because("started for a version that is gone".into());
                    return Err(CallError::ShuttingDown);
                }
                tracing::info!(plugin = %id, pid = w.pid, level = %started.effective.level.value, "worker ready");
                let effective = started.effective.clone();
                if st.ready(started) {
                    metrics.worker_restart(labels());
                }
                self.catch_up_policy(p, st, &effective);
                if w.exports.iter().any(|e| e == HEALTH_EXPORT) {
                    self.watch_health(id, &w, &p.freed);
                }
                Ok(())
            }
        }
    }

    /// Whether `p` has a running worker; an error if it may not start one.
    async fn running_worker(&self, p: &Plugin) -> Result<bool, CallError> {
        let mut st = p.state.lock().await;
        self.running_in(p, &mut st)
    }

    fn running_in(
        &self,
        p: &Plugin,
        st: &mut super::state::PluginState,
    ) -> Result<bool, CallError> {
        let id = &p.manifest.id;
        if st.is_shutting_down() || p.retired.load(Ordering::SeqCst) || *self.stopping.borrow() {
            return Err(CallError::ShuttingDown);
        }
        st.reap(id, &self.live().restart, Instant::now());
        if !st.instances().is_empty() {
            return Ok(true);
        }
        if let Some(last) = st.failed() {
            return Err(CallError::PluginFailed {
                plugin: id.clone(),
                crashes: st.crashes_in_window(),
                last: last.to_owned(),
            });
        }
        Ok(false)
    }

    /// Start `p`'s worker: its dependencies first (a plugin whose dependency is
    /// missing, incompatible, in a cycle or cannot start is not started, and says
    /// why), then the backoff `wait`, then the worker. All of it ends the moment the
    /// supervisor stops; a worker half-started then is killed as its handle drops.
    async fn start_abandoned_at_stop(&self, p: &Plugin, wait: Duration) -> Result<Started, Start> {
        let mut stopping = self.stopping.subscribe();
        let start = async {
            self.start_dependencies(p)
                .await
                .map_err(Start::Dependencies)?;
            if !wait.is_zero() {
                tracing::info!(plugin = %p.manifest.id, ?wait, "restart backoff");
                tokio::time::sleep(wait).await;
            }
            self.start_worker(p).await.map_err(|e| match e {
                crate::worker::StartError::Overloaded(o) => Start::Overloaded(o),
                e => Start::Failed(error_chain(&e)),
            })
        };
        tokio::select! {
            started = start => started,
            _ = stopping.wait_for(|stop| *stop) => Err(Start::Stopped),
        }
    }
    /// `p`'s queue of messages for its subscriptions, with its task started at the
    /// first message: one delivery at a time, in order.
    pub(crate) fn deliveries(&self, p: &Arc<Plugin>) -> tokio::sync::mpsc::Sender<Delivery> {
        p.deliveries
            .get_or_init(|| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Delivery>(self.live().max_queue);
                let me = self.me.clone();
                let id = p.manifest.id.clone();
                tokio::spawn(async move {
                    // A delivery's failure is the publisher's doing as much as the
                    // subscriber's (a failed subscriber fails each at once): its
                    // log lines are bounded like a worker's.
                    let mut budget =
                        LogBudget::new(DELIVERY_LOG_RATE, DELIVERY_LOG_RATE * 4, Instant::now());
                    let suppressed = |n: u64| {
                        tracing::warn!(
                            plugin = %id,
                            "{n} more failed deliveries not logged (over {DELIVERY_LOG_RATE} bytes/s)"
                        );
                    };
                    while let Some(d) = rx.recv().await {
                        let Some(me) = me.upgrade() else { break };
                        // Out of the queue: its place in the publisher's share
                        // is free. The message's bytes stay counted against its
                        // publisher until this delivery is done.
                        drop(d._place);
                        let (input, _held) = Payload::into_input(d.payload);
                        let r = me.call_from(&id, &d.function, input, None, &[]).await;
                        if let Err(e) = r {
                            let line = format!(
                                "message on {:?} from {} not delivered to {}: {e}",
                                d.topic, d.from, d.function
                            );
                            let (log, before) = budget.admit(line.len(), Instant::now());
                            if let Some(n) = before {
                                suppressed(n);
                            }
                            if log {
                                tracing::warn!(plugin = %id, "{line}");
                            }
                        }
                    }
                    if let Some(n) = budget.pending() {
                        suppressed(n);
                    }
                });
                tx
            })
            .clone()
    }
}

/// The exports named in an unknown function's error: as many as fit in 1 KiB
/// (a worker may export 10,000), then how many more.
pub(super) fn exports_named(exports: &[String]) -> String {
    let mut named = String::new();
    for (i, e) in exports.iter().enumerate() {
        if named.len() + e.len() > 1024 {
            named.push_str(&format!(" and {} more", exports.len() - i));
            break;
        }
        if i > 0 {
            named.push_str(", ");
        }
        named.push_str(e);
    }
    named
}

/// A call's deadline: the caller's, up to the policy's cap; else the plugin's.
fn deadline_of(timeout: Option<Duration>, (default, cap): (Duration, Duration)) -> Duration {
    timeout.map_or(default, |t| t.min(cap))
}
