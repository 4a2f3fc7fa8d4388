//! Publish and subscribe between plugins.
//!
//! # Semantics
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
//! - **Across nodes** (the PostgreSQL store backend): a publish is also written to
//!   the database and announced to every other daemon on it (`broker::bus`), after
//!   this node's queues are reserved and before its deliveries are sent, so a
//!   publish the database refuses reaches nobody. Another node queues it for its
//!   own allowed subscribers in the order it was published; a subscriber there
//!   whose queue is full misses it (logged and audited as `dropped`: the
//!   publisher was answered already). The publish's answer counts this node's
//!   subscribers.
//! - **Calls** (`corral.call(plugin, function, input)`) are allowed by the caller's
//!   `call` grants, run within the caller's remaining deadline, and count against the
//!   callee's bounded queue (`overloaded` when full). A call to a plugin that is
//!   already waiting in the chain (A calls B calls A) is answered at once with a
//!   `cycle` error naming the chain: its worker is busy with the outer call and would
//!   never answer.

use super::audit::AuditEvent;
use super::{HostBroker, denied};
use corral_policy::Services;
use corral_protocol::{HostError, HostReply};
use std::sync::Arc;

/// Longest topic name, in bytes.
pub const MAX_TOPIC: usize = 256;
/// The function a subscription calls unless it names one (`"topic=function"`).
pub const DEFAULT_HANDLER: &str = "on_message";

/// A message queued for one subscriber.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) from: String,
    pub(crate) topic: String,
    pub(crate) function: String,
    pub(crate) payload: Vec<u8>,
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

/// A plugin that subscribes to a topic, with its grants under the policy in force.
#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub(crate) plugin: String,
    pub(crate) function: String,
    pub(crate) services: Arc<Services>,
}

impl HostBroker {
    /// Queue `payload` for every allowed subscriber of `topic`, or for none; with
    /// the PostgreSQL backend, also for the subscribers on every other node.
    pub(crate) async fn publish(
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
        let permits = self.reserve(from, &topic, Reserve::AllOrNothing)?;
        // The other nodes' copy first: if it cannot be sent, nobody gets the
        // message (the publisher may retry without anyone seeing it twice).
        if let Some(store) = self.bus_store()? {
            store.publish(&self.node, from, &topic, &payload).await?;
        }
        let n = permits.len() as u32;
        Self::deliver(permits, from, &topic, &payload);
        Ok(HostReply::Delivered(n))
    }

    /// A message another node published: queued for this node's allowed
    /// subscribers; one whose queue is full misses it, logged and audited (the
    /// publisher, elsewhere, cannot be refused any more).
    pub(crate) fn deliver_remote(&self, from: &str, topic: &str, payload: &[u8]) {
        match self.reserve(from, topic, Reserve::SkipFull) {
            Ok(permits) => Self::deliver(permits, from, topic, payload),
            Err(e) => tracing::warn!(topic, from, "a message from another node: {e}"),
        }
    }

    fn deliver(
        permits: Vec<(tokio::sync::mpsc::OwnedPermit<Delivery>, String)>,
        from: &str,
        topic: &str,
        payload: &[u8],
    ) {
        for (permit, function) in permits {
            permit.send(Delivery {
                from: from.to_owned(),
                topic: topic.to_owned(),
                function,
                payload: payload.to_vec(),
            });
        }
    }

    /// Audit what became of `subscriber`'s delivery of a message on `topic`,
    /// charged to the publisher `from`, whose message caused it.
    fn audit_subscriber(
        &self,
        from: &str,
        subscriber: &str,
        topic: &str,
        decision: &str,
        rule: &str,
    ) {
        let event = AuditEvent {
            plugin: subscriber,
            operation: "subscribe",
            target: topic,
            decision,
            rule,
        };
        self.audit.record_charged_to(from, event);
    }

    /// A place in the queue of every allowed subscriber of `topic`; subscriptions
    /// the policy does not allow are audited and skipped. What is audited about a
    /// subscriber here is charged to the publisher `from`, whose message caused it.
    fn reserve(
        &self,
        from: &str,
        topic: &str,
        mode: Reserve,
    ) -> Result<Vec<(tokio::sync::mpsc::OwnedPermit<Delivery>, String)>, HostError> {
        let directory = self.directory()?;
        let mut permits = Vec::new();
        for sub in directory.subscribers(topic) {
            if let Err(rule) = sub.services.check_subscribe(topic) {
                self.audit_subscriber(from, &sub.plugin, topic, "denied", &rule);
                continue;
            }
            let Some(queue) = directory.delivery_queue(&sub.plugin) else {
                continue; // Removed meanwhile.
            };
            match queue.try_reserve_owned() {
                Ok(permit) => permits.push((permit, sub.function)),
                Err(_) if mode == Reserve::SkipFull => {
                    let rule = format!(
                        "max_queue: {} messages already queued for it (a message from another node)",
                        self.max_queue
                    );
                    tracing::warn!(plugin = %sub.plugin, topic, "message dropped: {rule}");
                    self.audit_subscriber(from, &sub.plugin, topic, "dropped", &rule);
                }
                Err(_) => {
                    return Err(HostError::Overloaded(format!(
                        "subscriber {} has {} messages queued; nothing was published",
                        sub.plugin, self.max_queue
                    )));
                }
            }
        }
        Ok(permits)
    }
}

/// What a full subscriber queue does to a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reserve {
    /// Refuse the publish (it is this node's).
    AllOrNothing,
    /// Skip that subscriber (the message is another node's).
    SkipFull,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Directory;
    use crate::broker::audit::AuditSink;
    use crate::worker::BoxFuture;
    use corral_protocol::CallError;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Weak};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Subscribers of `news` with queues the test holds the other end of.
    struct Plugins {
        grants: Arc<Services>,
        subscribers: Vec<Subscriber>,
        queues: BTreeMap<String, mpsc::Sender<Delivery>>,
    }

    impl Directory for Plugins {
        fn services(&self, _: &str) -> Option<Arc<Services>> {
            Some(self.grants.clone())
        }
        fn subscribers(&self, topic: &str) -> Vec<Subscriber> {
            if topic == "news" {
                self.subscribers.clone()
            } else {
                Vec::new()
            }
        }
        fn delivery_queue(&self, plugin: &str) -> Option<mpsc::Sender<Delivery>> {
            self.queues.get(plugin).cloned()
        }
        fn call<'a>(
            &'a self,
            plugin: &'a str,
            _: &'a str,
            _: Vec<u8>,
            _: Option<Duration>,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
            Box::pin(async move {
                Err(CallError::UnknownPlugin {
                    plugin: plugin.to_owned(),
                })
            })
        }
    }

    fn grants(toml: &str) -> Arc<Services> {
        let policy = corral_policy::Policy::parse(&[(
            "grants.toml".into(),
            format!("[[grant]]\nid = \"*\"\n{toml}"),
        )])
        .unwrap();
        let m = corral_manifest::Manifest::parse(
            "id = \"x\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
            "plugin.toml".as_ref(),
        )
        .unwrap();
        Arc::new(policy.resolve(&m, None).services)
    }

    #[tokio::test]
    async fn a_publish_is_queued_for_every_subscriber_or_for_none() {
        let allowed = grants("publish = [\"news\"]\nsubscribe = [\"news\"]");
        let (a_tx, mut a_rx) = mpsc::channel(1);
        let (b_tx, mut b_rx) = mpsc::channel(1);
        let sub = |plugin: &str| Subscriber {
            plugin: plugin.to_owned(),
            function: "on_message".to_owned(),
            services: allowed.clone(),
        };
        let plugins: Arc<dyn Directory> = Arc::new(Plugins {
            grants: allowed.clone(),
            subscribers: vec![sub("a"), sub("b")],
            queues: [("a".to_owned(), a_tx), ("b".to_owned(), b_tx.clone())].into(),
        });
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditSink::File(dir.path().join("audit.jsonl"));
        let broker = HostBroker::new(
            audit,
            Default::default(),
            dir.path().into(),
            1,
            Arc::downgrade(&plugins),
        );
        // b's queue is full: nothing is queued for a either.
        b_tx.try_send(Delivery {
            from: "earlier".into(),
            topic: "news".into(),
            function: "on_message".into(),
            payload: Vec::new(),
        })
        .unwrap();
        match broker
            .publish("p", &allowed, "news".into(), b"one".to_vec())
            .await
        {
            Err(HostError::Overloaded(why)) => assert!(why.contains("subscriber b"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(a_rx.try_recv().is_err(), "a got a message that b could not");
        // A message from another node cannot be refused any more: a gets it, b
        // (full) misses it, visibly.
        broker.deliver_remote("far", "news", b"remote");
        assert_eq!(a_rx.try_recv().unwrap().payload, b"remote");
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(
            audit.contains("\"decision\":\"dropped\"") && audit.contains("\"plugin\":\"b\""),
            "{audit}"
        );
        assert_eq!(b_rx.try_recv().unwrap().from, "earlier");
        assert!(b_rx.try_recv().is_err());
        // Room for both: both get it.
        match broker
            .publish("p", &allowed, "news".into(), b"two".to_vec())
            .await
        {
            Ok(HostReply::Delivered(2)) => {}
            other => panic!("{other:?}"),
        }
        for rx in [&mut a_rx, &mut b_rx] {
            let d = rx.try_recv().unwrap();
            assert_eq!((d.from.as_str(), d.payload.as_slice()), ("p", &b"two"[..]));
        }
        drop(plugins);
        let gone: Weak<dyn Directory> = Weak::<Plugins>::new();
        let orphan = HostBroker::new(
            AuditSink::Stderr,
            Default::default(),
            dir.path().into(),
            1,
            gone,
        );
        assert!(matches!(
            orphan
                .publish("p", &allowed, "news".into(), Vec::new())
                .await,
            Err(HostError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn a_subscriber_without_the_grant_is_audited_and_skipped() {
        let publisher = grants("publish = [\"news\"]");
        let (a_tx, mut a_rx) = mpsc::channel(4);
        let plugins: Arc<dyn Directory> = Arc::new(Plugins {
            grants: publisher.clone(),
            subscribers: vec![Subscriber {
                plugin: "a".into(),
                function: "on_message".into(),
                services: grants(""),
            }],
            queues: [("a".to_owned(), a_tx)].into(),
        });
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let broker = HostBroker::new(
            AuditSink::File(log.clone()),
            Default::default(),
            dir.path().into(),
            4,
            Arc::downgrade(&plugins),
        );
        match broker
            .publish("p", &publisher, "news".into(), Vec::new())
            .await
        {
            Ok(HostReply::Delivered(0)) => {}
            other => panic!("{other:?}"),
        }
        assert!(a_rx.try_recv().is_err());
        let audit = std::fs::read_to_string(&log).unwrap();
        assert!(
            audit.contains("\"operation\":\"subscribe\"") && audit.contains("\"plugin\":\"a\""),
            "{audit}"
        );
    }
}
