//! Host calls: what the supervisor does on a plugin's behalf, checked against the
//! plugin's grants (`corral_policy::Services`, the live policy), performed, and
//! audited when denied. Also the security events of workers (seccomp, OOM, deadline
//! kills) and health checks, which end in the audit log too.
//!
//! # Messaging semantics
//!
//! - **Publish** (`corral.publish(topic, payload)`) is allowed by the publisher's
//!   `publish` grants. Subscribers are plugins whose `plugin.toml` lists the topic in
//!   `[permissions] subscribe` (`"topic"` calls their `on_message`,
//!   `"topic=function"` that function) and whose `subscribe` grants allow it; a
//!   subscription the policy does not allow is audited and skipped.
//! - Delivery is **asynchronous and at most once**: the message is queued for every
//!   allowed subscriber, and `publish` answers how many. Each subscriber has one
//!   bounded queue (`Options::max_queue` messages) served in order, one call at a
//!   time, so a subscriber sees a publisher's messages in publish order. If any
//!   subscriber's queue is full, the publish is refused with `overloaded` and queued
//!   for nobody (all or nothing): the publisher decides whether to retry. A delivery
//!   whose call fails is logged with the error (not retried).
//! - **Calls** (`corral.call(plugin, function, input)`) are allowed by the caller's
//!   `call` grants, run within the caller's remaining deadline, and count against the
//!   callee's bounded queue (`overloaded` when full). A call to a plugin that is
//!   already waiting in the chain (A calls B calls A) is answered at once with a
//!   `cycle` error naming the chain: its worker is busy with the outer call and would
//!   never answer.

use crate::audit::AuditEvent;
use crate::store::Store;
use crate::supervisor::{Core, HEALTH_EXPORT, Plugin};
use crate::worker::{CallCtx, WorkerHandle};
use corral_confine::Level;
use corral_policy::Services;
use corral_protocol::{ExitReason, HostError, HostOp, HostReply};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Longest topic name, in bytes.
pub const MAX_TOPIC: usize = 256;
/// The function a subscription calls unless it names one (`"topic=function"`).
pub const DEFAULT_HANDLER: &str = "on_message";

/// A message queued for one subscriber.
#[derive(Debug)]
pub struct Delivery {
    from: String,
    topic: String,
    function: String,
    payload: Vec<u8>,
}

/// A plugin's subscriptions from `plugin.toml`: (topic, function).
pub fn subscriptions(p: &corral_manifest::Manifest) -> Vec<(String, String)> {
    p.permissions
        .subscribe
        .iter()
        .map(|s| match s.split_once('=') {
            Some((t, f)) => (t.trim().to_owned(), f.trim().to_owned()),
            None => (s.trim().to_owned(), DEFAULT_HANDLER.to_owned()),
        })
        .collect()
}

fn denied(rule: String) -> HostError {
    HostError::Denied { rule }
}

impl Core {
    /// Perform `op` for `plugin` within `ctx`; denials are audited.
    pub(crate) async fn host_call(
        &self,
        plugin: &str,
        ctx: CallCtx,
        op: HostOp,
    ) -> Result<HostReply, HostError> {
        let operation = op.name();
        let target = op.target();
        tracing::trace!(plugin, operation, target, "host call");
        let result = self.perform(plugin, &ctx, op).await;
        if let Err(HostError::Denied { rule }) = &result {
            self.audit.record(AuditEvent {
                plugin,
                operation,
                target: &target,
                decision: "denied",
                rule,
            });
        }
        result
    }

    /// The plugin's grants under the policy in force.
    fn services(&self, plugin: &str) -> Result<Services, HostError> {
        let p = self
            .plugin(plugin)
            .ok_or_else(|| HostError::Failed(format!("unknown plugin {plugin}")))?;
        Ok(self
            .policy()
            .resolve(&p.manifest, p.publisher.as_deref())
            .services)
    }

    /// The store, opened at the first use.
    fn store(&self) -> Result<Arc<Store>, HostError> {
        self.store
            .get_or_init(|| {
                let path: PathBuf = self.options().state_dir.join("kv.redb");
                Store::open(&path).map(Arc::new)
            })
            .clone()
            .map_err(HostError::Failed)
    }

    async fn perform(
        &self,
        plugin: &str,
        ctx: &CallCtx,
        op: HostOp,
    ) -> Result<HostReply, HostError> {
        if let HostOp::Now = op {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| HostError::Failed(format!("system clock before 1970: {e}")))?
                .as_millis() as i64;
            return Ok(HostReply::Time(ms));
        }
        let services = self.services(plugin)?;
        match op {
            HostOp::Now => unreachable!("answered above"),
            HostOp::KvGet { .. }
            | HostOp::KvPut { .. }
            | HostOp::KvDelete { .. }
            | HostOp::KvKeys { .. } => {
                services.check_kv().map_err(denied)?;
                let store = self.store()?;
                let quota = services.kv_quota.value;
                let plugin = plugin.to_owned();
                tokio::task::spawn_blocking(move || match op {
                    HostOp::KvGet { key } => store.get(&plugin, &key).map(HostReply::Value),
                    HostOp::KvPut { key, value } => store
                        .put(&plugin, &key, &value, quota)
                        .map(|()| HostReply::Unit),
                    HostOp::KvDelete { key } => store.delete(&plugin, &key).map(HostReply::Existed),
                    HostOp::KvKeys { prefix } => store.keys(&plugin, &prefix).map(HostReply::Keys),
                    _ => Err(HostError::Failed("not a store operation".into())),
                })
                .await
                .map_err(|e| HostError::Failed(format!("store task: {e}")))?
            }
            HostOp::Fetch(req) => self
                .fetcher
                .fetch(&services, req, ctx.deadline)
                .await
                .map(HostReply::Fetched),
            HostOp::Publish { topic, payload } => self.publish(plugin, &services, topic, payload),
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
                // Boxed: a call may start a worker whose init makes host calls.
                Box::pin(self.call_from(&target, &function, input, Some(left), &ctx.chain))
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

    fn publish(
        &self,
        from: &str,
        services: &Services,
        topic: String,
        payload: Vec<u8>,
    ) -> Result<HostReply, HostError> {
        if topic.is_empty() || topic.len() > MAX_TOPIC || topic.chars().any(char::is_whitespace) {
            return Err(HostError::Invalid(format!(
                "topic {topic:?}: 1 to {MAX_TOPIC} bytes, no spaces"
            )));
        }
        services.check_publish(&topic).map_err(denied)?;
        let policy = self.policy();
        let mut permits = Vec::new();
        for p in self.all_plugins() {
            for (t, function) in subscriptions(&p.manifest) {
                if t != topic {
                    continue;
                }
                let sub = policy.resolve(&p.manifest, p.publisher.as_deref()).services;
                if let Err(rule) = sub.check_subscribe(&topic) {
                    self.audit.record(AuditEvent {
                        plugin: &p.manifest.id,
                        operation: "subscribe",
                        target: &topic,
                        decision: "denied",
                        rule: &rule,
                    });
                    continue;
                }
                let queue = self.delivery_queue(&p);
                match queue.try_reserve_owned() {
                    Ok(permit) => permits.push((permit, function)),
                    Err(_) => {
                        return Err(HostError::Overloaded(format!(
                            "subscriber {} has {} messages queued; nothing was published",
                            p.manifest.id,
                            self.options().max_queue
                        )));
                    }
                }
            }
        }
        let n = permits.len() as u32;
        for (permit, function) in permits {
            permit.send(Delivery {
                from: from.to_owned(),
                topic: topic.clone(),
                function,
                payload: payload.clone(),
            });
        }
        Ok(HostReply::Delivered(n))
    }

    /// The plugin's delivery queue, with its task started at the first message.
    fn delivery_queue(&self, p: &Arc<Plugin>) -> tokio::sync::mpsc::Sender<Delivery> {
        p.deliveries
            .get_or_init(|| {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Delivery>(self.options().max_queue);
                let core = self.me.clone();
                let id = p.manifest.id.clone();
                tokio::spawn(async move {
                    while let Some(d) = rx.recv().await {
                        let Some(core) = core.upgrade() else { break };
                        let r = core.call_from(&id, &d.function, d.payload, None, &[]).await;
                        if let Err(e) = r {
                            tracing::warn!(
                                plugin = %id,
                                "message on {:?} from {} not delivered to {}: {e}",
                                d.topic,
                                d.from,
                                d.function
                            );
                        }
                    }
                });
                tx
            })
            .clone()
    }

    /// A worker ended without being asked to: audit the security events.
    pub(crate) fn worker_exited(
        &self,
        plugin: &str,
        level: Level,
        reason: &ExitReason,
        by_supervisor: bool,
        why: Option<&str>,
    ) {
        let (operation, target, rule) = match reason {
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
            _ if by_supervisor && why.is_none() => (
                "deadline",
                String::new(),
                "no answer within the call's deadline plus the kill grace".to_owned(),
            ),
            _ => return,
        };
        self.audit.record(AuditEvent {
            plugin,
            operation,
            target: &target,
            decision: "killed",
            rule: &rule,
        });
    }

    /// Call the worker's `health` export every `health_interval`; a failing check
    /// kills the worker (audited, shown in `corral status`) and starts a new one.
    pub(crate) fn watch_health(&self, plugin: &str, worker: &Arc<WorkerHandle>) {
        let interval = self.options().health_interval;
        let core: Weak<Core> = self.me.clone();
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
                let Ok(result) = w.try_call(HEALTH_EXPORT, Vec::new(), deadline, chain).await
                else {
                    break; // Retired: a new version took over.
                };
                let Err(e) = result else { continue };
                if !w.is_alive() && !w.killed_by_supervisor() {
                    break; // It crashed: counted and restarted as a crash.
                }
                let why = format!("unhealthy: health check failed: {e}; worker restarted");
                let Some(core) = core.upgrade() else { break };
                core.audit.record(AuditEvent {
                    plugin: &plugin,
                    operation: "health",
                    target: HEALTH_EXPORT,
                    decision: "restarted",
                    rule: &why,
                });
                w.kill_because(why);
                drop(w);
                // Start the replacement now rather than at the next call.
                if let Err(e) = core.restart(&plugin).await {
                    tracing::warn!(plugin, "restart after a failed health check: {e}");
                }
                break;
            }
        });
    }
}
