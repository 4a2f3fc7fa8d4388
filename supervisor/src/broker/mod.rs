//! Host calls: what the supervisor does on a plugin's behalf, checked against the
//! plugin's grants (`corral_policy::Services`, the live policy), performed, and
//! audited when denied; and the security events of workers (seccomp, OOM, deadline
//! kills), which end in the audit log too.
//!
//! [`HostBroker`] is the [`Broker`] every worker reports to. It owns the services
//! ([`store`], [`fetch`], [`messaging`], [`audit`]) and asks the supervisor for
//! what only the supervisor knows (a plugin's grants, its subscribers, a call to
//! another plugin) through the [`Directory`] trait, so this module imports nothing
//! from `crate::supervisor`.

pub mod audit;
pub mod bus;
pub mod fetch;
pub mod messaging;
mod places;
pub mod store;

use crate::worker::{BoxFuture, Broker, CallCtx, Exited};
use audit::{Audit, AuditEvent, AuditSink};
use corral_policy::Services;
use corral_protocol::{CallError, ExitReason, HostError, HostOp, HostReply};
use fetch::Fetcher;
use messaging::{Delivery, Subscriber};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};
use store::Store;

/// What the broker needs of the supervisor.
pub(crate) trait Directory: Send + Sync {
    /// The grants of `plugin` under the policy in force; `None`: no such plugin.
    fn services(&self, plugin: &str) -> Option<Arc<Services>>;

    /// Every plugin whose manifest subscribes to `topic`, in id order.
    fn subscribers(&self, topic: &str) -> Vec<Subscriber>;

    /// The queue of messages for `plugin`'s subscriptions (its task started at the
    /// first message); `None`: no such plugin.
    fn delivery_queue(&self, plugin: &str) -> Option<tokio::sync::mpsc::Sender<Delivery>>;

    /// Call `function` of `plugin` on behalf of the plugins in `chain`, within
    /// `plugin`'s bounded queue.
    fn call<'a>(
        &'a self,
        plugin: &'a str,
        function: &'a str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>>;
}

/// Store operations one plugin may have running at once (a quarter of the
/// PostgreSQL pool); its others wait for them. redb has one writer, which commits
/// with an fsync: without this, one plugin's instances could keep 16 writes queued
/// ahead of every neighbour's.
pub const STORE_OPS_PER_PLUGIN: usize = 4;

pub(crate) fn denied(rule: String) -> HostError {
    HostError::Denied { rule }
}

/// The host services and the audit log, shared by every worker.
pub(crate) struct HostBroker {
    pub(crate) audit: Audit,
    /// The daemon's counters (host calls, audit events, crashes, and the
    /// supervisor's own).
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    store: OnceLock<Result<Arc<Store>, store::OpenStoreError>>,
    backend: store::StoreBackend,
    /// This daemon among the nodes of a shared store: random at every start.
    pub(crate) node: String,
    /// The task that receives the other nodes' messages (PostgreSQL backend).
    bus: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    state_dir: PathBuf,
    fetcher: Fetcher,
    max_queue: usize,
    /// Each plugin's store operations running (at most [`STORE_OPS_PER_PLUGIN`]).
    store_places: places::Places,
    /// What each publisher's messages not yet delivered hold.
    publishers: messaging::Publishers,
    /// The most that may be (`messaging::PUBLISHER_QUEUED_BYTES`).
    publisher_bytes: usize,
    /// What each publisher may still write to the other nodes.
    bus_budgets: messaging::BusBudgets,
    /// Its size (`messaging::PUBLISHER_BUS_BYTES`).
    bus_bytes: usize,
    directory: Weak<dyn Directory>,
}

impl std::fmt::Debug for HostBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBroker")
            .field("state_dir", &self.state_dir)
            .field("max_queue", &self.max_queue)
            .finish_non_exhaustive()
    }
}

impl HostBroker {
    /// A broker whose store is `backend` (redb: in `state_dir`; opened at the first
    /// use) and whose subscribers queue at most `max_queue` messages each.
    pub(crate) fn new(
        audit: AuditSink,
        backend: store::StoreBackend,
        state_dir: PathBuf,
        max_queue: usize,
        directory: Weak<dyn Directory>,
    ) -> HostBroker {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        HostBroker {
            audit: Audit::counted(audit, Some(Arc::clone(&metrics))),
            metrics,
            store: OnceLock::new(),
            backend,
            node: bus::node_id(),
            bus: Default::default(),
            state_dir,
            fetcher: Fetcher::new(),
            max_queue,
            store_places: places::Places::new(STORE_OPS_PER_PLUGIN),
            publishers: Default::default(),
            publisher_bytes: messaging::PUBLISHER_QUEUED_BYTES,
            bus_budgets: Default::default(),
            bus_bytes: messaging::PUBLISHER_BUS_BYTES,
            directory,
        }
    }

    fn directory(&self) -> Result<Arc<dyn Directory>, HostError> {
        self.directory
            .upgrade()
            .ok_or_else(|| HostError::Failed("the supervisor is gone".into()))
    }

    /// The store, opened at the first use.
    /// Open the store now, on the blocking pool (redb may repair its file after
    /// an unclean stop, which takes a while): the first host call that needs it
    /// then does not open it on a runtime thread, with every other store call
    /// waiting for it. Why it cannot be opened, if it cannot.
    pub(crate) async fn open_store(self: &Arc<Self>) -> Result<(), String> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.store().map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    fn store(&self) -> Result<Arc<Store>, HostError> {
        self.store
            .get_or_init(|| Store::open(&self.backend, &self.state_dir).map(Arc::new))
            .as_ref()
            .map(Arc::clone)
            .map_err(|e| HostError::Failed(e.to_string()))
    }

    /// The store, when it is shared with other nodes (PostgreSQL).
    fn bus_store(&self) -> Result<Option<Arc<Store>>, HostError> {
        match self.backend {
            store::StoreBackend::Redb => Ok(None),
            store::StoreBackend::Postgres(_) => self.store().map(Some),
        }
    }

    /// Start receiving the other nodes' messages (with the PostgreSQL backend, in
    /// a tokio runtime); stopped by [`HostBroker::stop_bus`] or when the broker goes.
    pub(crate) fn start_bus(self: &Arc<Self>) {
        let Ok(Some(store)) = self.bus_store() else {
            if let store::StoreBackend::Postgres(_) = self.backend {
                tracing::warn!("topics: the store cannot be opened; no messages from other nodes");
            }
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("topics: not in a tokio runtime; no messages from other nodes");
            return;
        };
        let task = runtime.spawn(bus::receive(Arc::downgrade(self), store));
        if let Some(old) = self
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    /// Stop receiving the other nodes' messages.
    pub(crate) fn stop_bus(&self) {
        if let Some(task) = self.bus.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    /// Perform `op` for `plugin` within `ctx`; denials are audited, and the error's
    /// texts cut (see [`cut_host_error`]).
    pub(crate) async fn perform_audited(
        &self,
        plugin: &str,
        ctx: CallCtx,
        op: HostOp,
    ) -> Result<HostReply, HostError> {
        let operation = op.name();
        let target = op.target();
        tracing::trace!(plugin, operation, target, "host call");
        let result = self.perform(plugin, &ctx, op).await.map_err(cut_host_error);
        self.account(plugin, operation, &target, &result);
        result
    }

    /// `op` answered where it was read, when it is quick and waits on nothing:
    /// the clock, and a read of a store on this machine. `Err(op)` hands any
    /// other back, to be performed on a task of its own. Counted and audited as
    /// [`HostBroker::perform_audited`] does.
    pub(crate) fn perform_in_place(
        &self,
        plugin: &str,
        op: HostOp,
    ) -> Result<Result<HostReply, HostError>, HostOp> {
        let result = match &op {
            HostOp::Now => now(),
            HostOp::KvGet { key } => {
                // The grant first, as `perform` does: a plugin without one never
                // opens the store, and its denial is audited.
                let services = match self.directory().and_then(|d| {
                    d.services(plugin)
                        .ok_or_else(|| HostError::Failed(format!("unknown plugin {plugin}")))
                }) {
                    Ok(services) => services,
                    Err(e) => return Ok(self.accounted(plugin, &op, Err(e))),
                };
                if let Err(e) = services.check_kv().map_err(denied) {
                    return Ok(self.accounted(plugin, &op, Err(e)));
                }
                let store = match self.store() {
                    Ok(store) => store,
                    Err(e) => return Ok(self.accounted(plugin, &op, Err(e))),
                };
                match store.get_local(plugin, key) {
                    Some(value) => value.map(HostReply::Value),
                    None => return Err(op),
                }
            }
            _ => return Err(op),
        };
        Ok(self.accounted(plugin, &op, result))
    }

    fn accounted(
        &self,
        plugin: &str,
        op: &HostOp,
        result: Result<HostReply, HostError>,
    ) -> Result<HostReply, HostError> {
        let target = op.target();
        tracing::trace!(plugin, operation = op.name(), target, "host call");
        let result = result.map_err(cut_host_error);
        self.account(plugin, op.name(), &target, &result);
        result
    }

    /// A host call's metric, and its audit record when it was denied.
    fn account(
        &self,
        plugin: &str,
        operation: &'static str,
        target: &str,
        result: &Result<HostReply, HostError>,
    ) {
        self.metrics.host_call(
            plugin,
            operation,
            result.as_ref().map_or_else(HostError::kind, |_| "ok"),
        );
        if let Err(HostError::Denied { rule }) = result {
            self.audit.record(AuditEvent {
                plugin,
                operation,
                target,
                decision: "denied",
                rule,
            });
        }
    }

    async fn perform(
        &self,
        plugin: &str,
        ctx: &CallCtx,
        op: HostOp,
    ) -> Result<HostReply, HostError> {
        if let HostOp::Now = op {
            return now();
        }
        let directory = self.directory()?;
        let services = directory
            .services(plugin)
            .ok_or_else(|| HostError::Failed(format!("unknown plugin {plugin}")))?;
        let _place = match &op {
            HostOp::KvGet { .. }
            | HostOp::KvPut { .. }
            | HostOp::KvDelete { .. }
            | HostOp::KvKeys { .. } => Some(self.store_places.take(plugin).await),
            _ => None,
        };
        match op {
            HostOp::Now => unreachable!("answered above"),
            HostOp::KvGet { key } => {
                services.check_kv().map_err(denied)?;
                self.store()?.get(plugin, &key).await.map(HostReply::Value)
            }
            HostOp::KvPut { key, value } => {
                services.check_kv().map_err(denied)?;
                let quota = services.kv_quota.value;
                let store = self.store()?;
                store
                    .put(plugin, key, value, quota)
                    .await
                    .map(|()| HostReply::Unit)
            }
            HostOp::KvDelete { key } => {
                services.check_kv().map_err(denied)?;
                let store = self.store()?;
                store.delete(plugin, key).await.map(HostReply::Existed)
            }
            HostOp::KvKeys { prefix } => {
                services.check_kv().map_err(denied)?;
                let store = self.store()?;
                store.keys(plugin, prefix).await.map(HostReply::Keys)
            }
            HostOp::Fetch(req) => self
                .fetcher
                .fetch(plugin, &services, req, ctx.deadline)
                .await
                .map(HostReply::Fetched),
            HostOp::Publish { topic, payload } => {
                self.publish(plugin, &services, topic, payload).await
            }
            HostOp::Call {
                plugin: target,
                function,
                input,
            } => {
                services.check_call(&target, &function).map_err(denied)?;
                if ctx.chain.contains(&target) {
                    return Err(HostError::Cycle {
                        chain: format!("{} -> {target}", ctx.chain.join(" -> ")),
                    });
                }
                let left = ctx.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HostError::Failed(
                        "the calling plugin's deadline has passed".into(),
                    ));
                }
                directory
                    .call(&target, &function, input, Some(left), &ctx.chain)
                    .await
                    .map(HostReply::Output)
                    .map_err(|error| HostError::Call {
                        plugin: target,
                        function,
                        error,
                    })
            }
        }
    }
}

/// `now`: the supervisor's clock, in milliseconds since 1970.
fn now() -> Result<HostReply, HostError> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| HostError::Failed(format!("system clock before 1970: {e}")))?
        .as_millis() as i64;
    Ok(HostReply::Time(ms))
}

impl Drop for HostBroker {
    fn drop(&mut self) {
        self.stop_bus();
    }
}

impl Broker for HostBroker {
    fn host_call<'a>(
        &'a self,
        plugin: &'a str,
        ctx: CallCtx,
        op: HostOp,
    ) -> BoxFuture<'a, Result<HostReply, HostError>> {
        Box::pin(self.perform_audited(plugin, ctx, op))
    }

    fn host_call_in_place(
        &self,
        plugin: &str,
        op: HostOp,
    ) -> Result<Result<HostReply, HostError>, HostOp> {
        self.perform_in_place(plugin, op)
    }

    /// Audit the security events: seccomp, OOM and deadline kills.
    fn worker_exited(&self, exit: Exited<'_>) {
        let level = exit.level;
        let reason = match exit.reason {
            ExitReason::Seccomp { .. } | ExitReason::OomKilled { .. } | ExitReason::Protocol(_) => {
                exit.reason.kind()
            }
            _ if exit.by_supervisor && exit.why.is_none() => "deadline",
            _ if exit.by_supervisor => "supervisor",
            other => other.kind(),
        };
        self.metrics.worker_crash(
            crate::metrics::PluginLabels::new(exit.plugin, exit.runtime, level),
            reason,
        );
        let (operation, target, rule) = match exit.reason {
            ExitReason::Seccomp { syscall } => (
                "seccomp",
                syscall.clone(),
                format!("seccomp filter of level {level} (seccomp/{level}*.json)"),
            ),
            ExitReason::OomKilled { limit_bytes } => (
                "oom",
                String::new(),
                format!("cgroup memory limit {}", corral_policy::size(*limit_bytes)),
            ),
            ExitReason::Protocol(why) => (
                "protocol",
                String::new(),
                format!("protocol violation: {why}"),
            ),
            _ if exit.by_supervisor && exit.why.is_none() => (
                "deadline",
                String::new(),
                "no answer within the call's deadline plus the kill grace".to_owned(),
            ),
            _ => return,
        };
        self.audit.record(AuditEvent {
            plugin: exit.plugin,
            operation,
            target: &target,
            decision: "killed",
            rule: &rule,
        });
    }
}

/// The most of a string a worker sent that an error quotes (escaped).
const QUOTED: usize = 128;

/// `s`, a string a worker sent, quoted for an error: at most [`QUOTED`] bytes of
/// it, escaped, then how long it was. A worker's string is never escaped whole:
/// escaping makes it up to six times longer (`\u{7f}` for one byte), and a
/// 16 MiB topic would have become a 100 MiB error.
pub(crate) fn quoted(s: &str) -> String {
    if s.len() <= QUOTED {
        return format!("{s:?}");
    }
    let mut at = QUOTED;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    format!("{:?}... ({} bytes)", &s[..at], s.len())
}

/// A host call's error with each text cut to what a worker's own error may say
/// (`MAX_ERROR_TEXT`), and the names in it to 1 KiB: some repeat what the
/// worker sent (a plugin or function it named), and the error is answered,
/// logged and kept.
pub(crate) fn cut_host_error(e: HostError) -> HostError {
    use crate::worker::connection::{MAX_ERROR_TEXT, cut_error};
    let cut = |text: String| crate::supervisor::cut(text, MAX_ERROR_TEXT);
    let name = |text: String| crate::supervisor::cut(text, 1 << 10);
    match e {
        HostError::Denied { rule } => HostError::Denied { rule: cut(rule) },
        HostError::Invalid(why) => HostError::Invalid(cut(why)),
        HostError::Overloaded(why) => HostError::Overloaded(cut(why)),
        HostError::Failed(why) => HostError::Failed(cut(why)),
        HostError::Cycle { chain } => HostError::Cycle { chain: cut(chain) },
        HostError::Call {
            plugin,
            function,
            error,
        } => HostError::Call {
            plugin: name(plugin),
            function: name(function),
            error: cut_error(error),
        },
        e @ HostError::Quota { .. } => e,
    }
}
