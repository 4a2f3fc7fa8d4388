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
//! - **What a publisher can make the supervisor hold** is bounded by the
//!   publisher: a message is kept once however many subscribers it is queued for
//!   (every delivery shares its bytes), and the messages of one publisher not yet
//!   delivered to every subscriber hold at most [`PUBLISHER_QUEUED_BYTES`]. A
//!   publish past that is refused with `overloaded` (nothing queued); a message
//!   from another node past it is dropped for this node's subscribers, audited.
//!   Without it, a publisher of 16 MiB messages to ten slow subscribers would have
//!   had the supervisor hold 64 queued copies per subscriber: 10 GiB.
//! - **No publisher fills a subscriber's queue alone**: one publisher's messages
//!   take at most three quarters of a subscriber's places ([`publisher_places`]:
//!   48 of 64; all of a queue of 3 or fewer), so a publisher flooding a topic
//!   leaves room for the other publishers to that subscriber. Past its share a
//!   publish is refused with `overloaded`, saying so.
//! - **Across nodes** (the PostgreSQL store backend): a publish is also written to
//!   the database and announced to every other daemon on it (`broker::bus`), after
//!   this node's queues are reserved and before its deliveries are sent, so a
//!   publish the database refuses reaches nobody. Another node queues it for its
//!   own allowed subscribers in the order it was published; a subscriber there
//!   whose queue is full misses it (logged and audited as `dropped`: the
//!   publisher was answered already). The publish's answer counts this node's
//!   subscribers.
//! - **What a publisher can make the database hold** is bounded by the publisher
//!   too: a row is kept for every node to read for five minutes
//!   (`MESSAGE_RETENTION`), subscribers or not, so each publisher may write
//!   [`PUBLISHER_BUS_BYTES`] to the other nodes at once and that much again every
//!   five minutes after (a token bucket; each message costs its bytes and
//!   [`BUS_MESSAGE_COST`]). A publish past it is refused with `overloaded`,
//!   saying so, and reaches nobody. Without it, one plugin publishing 16 MiB
//!   messages in a loop would have filled the shared database's disk, every node's
//!   with it. A node reads only the messages of topics it has subscribers for.
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
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Longest topic name, in bytes.
pub const MAX_TOPIC: usize = 256;
/// What one publisher's messages not yet delivered to every subscriber may hold,
/// in bytes (payloads, each counted once).
pub const PUBLISHER_QUEUED_BYTES: usize = 64 << 20;
/// What one publisher may write to the other nodes (the database's message table)
/// at once, and again every five minutes, in bytes.
pub const PUBLISHER_BUS_BYTES: usize = 64 << 20;
/// What a message to the other nodes costs besides its payload (its row, its
/// notification): a publisher of empty messages is bounded too.
pub const BUS_MESSAGE_COST: usize = 256;
/// How long the database keeps a message (`MESSAGE_RETENTION`), which the
/// budget of [`PUBLISHER_BUS_BYTES`] refills over.
const BUS_REFILL: std::time::Duration = std::time::Duration::from_secs(300);

/// Each publisher's budget for messages to the other nodes (see
/// [`PUBLISHER_BUS_BYTES`]): a token bucket per publisher, forgotten once full.
#[derive(Debug, Default)]
pub(crate) struct BusBudgets {
    budgets: Mutex<HashMap<String, (f64, std::time::Instant)>>,
}

impl BusBudgets {
    /// Take `len` bytes (and [`BUS_MESSAGE_COST`]) of `from`'s budget of `bytes`
    /// at `now`, or say what it has left.
    pub(crate) fn admit(
        &self,
        from: &str,
        len: usize,
        bytes: usize,
        now: std::time::Instant,
    ) -> Result<(), String> {
        let burst = bytes as f64;
        let rate = burst / BUS_REFILL.as_secs_f64();
        let cost = (len + BUS_MESSAGE_COST) as f64;
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        // Full buckets are forgotten: what is kept is bounded by the publishers
        // that published in the last five minutes.
        budgets.retain(|_, (left, at)| {
            *left + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
        });
        let (left, at) = budgets.get(from).copied().unwrap_or((burst, now));
        let left = (left + now.saturating_duration_since(at).as_secs_f64() * rate).min(burst);
        if left < cost {
            return Err(format!(
                "{from}'s messages to the other nodes have used its {} for five minutes \
                 ({} left; another {} would pass it); nothing was published",
                mib(bytes),
                mib(left as usize),
                mib(len + BUS_MESSAGE_COST)
            ));
        }
        budgets.insert(from.to_owned(), (left - cost, now));
        Ok(())
    }
}

/// The function a subscription calls unless it names one (`"topic=function"`).
pub const DEFAULT_HANDLER: &str = "on_message";

/// A message queued for one subscriber.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) from: String,
    pub(crate) topic: String,
    pub(crate) function: String,
    pub(crate) payload: Arc<Payload>,
    /// The place this takes of the publisher's share of the subscriber's queue,
    /// until it is taken off the queue.
    pub(crate) _place: Place,
}

/// A place in a subscriber's queue counted against one publisher's share.
#[derive(Debug)]
pub(crate) struct Place {
    _taken: Charge,
}

impl Place {
    /// A place nobody's: for a message queued by hand (tests).
    #[cfg(test)]
    pub(crate) fn uncounted() -> Place {
        Place {
            _taken: Charge {
                held: Arc::default(),
                bytes: 0,
            },
        }
    }
}

/// How many of a subscriber's `max_queue` places one publisher's messages may
/// take: three quarters, and every one of a queue of 3 or fewer.
pub fn publisher_places(max_queue: usize) -> usize {
    max_queue - max_queue / 4
}

/// A published message's bytes, shared by all its deliveries; they count against
/// the publisher's [`PUBLISHER_QUEUED_BYTES`] until the last delivery is done.
#[derive(Debug)]
pub(crate) struct Payload {
    bytes: Vec<u8>,
    _charge: Charge,
}

impl Payload {
    /// Bytes that are nobody's: for a message queued by hand (tests).
    #[cfg(test)]
    pub(crate) fn uncharged(bytes: Vec<u8>) -> Arc<Payload> {
        Arc::new(Payload {
            bytes,
            _charge: Charge {
                held: Arc::default(),
                bytes: 0,
            },
        })
    }

    /// The bytes, for a call's input: taken when this is the last delivery of
    /// the message, else copied. The second value is what keeps them counted
    /// against the publisher: hold it until the call is done.
    pub(crate) fn into_input(this: Arc<Payload>) -> (Vec<u8>, Box<dyn Send>) {
        match Arc::try_unwrap(this) {
            Ok(Payload { bytes, _charge }) => (bytes, Box::new(_charge)),
            Err(shared) => (shared.bytes.clone(), Box::new(shared)),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Bytes counted against a publisher, given back when dropped.
#[derive(Debug)]
struct Charge {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// What every publisher's messages not yet delivered hold.
#[derive(Debug, Default)]
pub(crate) struct Publishers {
    held: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Places each publisher's messages take in each subscriber's queue, by
    /// (subscriber, publisher).
    places: Mutex<HashMap<(String, String), Arc<AtomicUsize>>>,
}

impl Publishers {
    /// `bytes` counted against `publisher`, or what it holds already when that
    /// would pass `limit`.
    fn charge(&self, publisher: &str, bytes: usize, limit: usize) -> Result<Charge, usize> {
        let held = {
            let mut map = self.held.lock().unwrap_or_else(|e| e.into_inner());
            // Forget publishers holding nothing, so the map is as large as the
            // publishers with messages queued, not every name ever seen.
            if map.len() > 64 {
                map.retain(|_, h| h.load(Ordering::Acquire) != 0 || Arc::strong_count(h) > 1);
            }
            Arc::clone(map.entry(publisher.to_owned()).or_default())
        };
        let before = held.fetch_add(bytes, Ordering::AcqRel);
        if before.saturating_add(bytes) > limit {
            held.fetch_sub(bytes, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Charge { held, bytes })
    }

    /// A place for `publisher` in `subscriber`'s queue within its share of
    /// `places`, or how many it takes already.
    fn place(&self, subscriber: &str, publisher: &str, places: usize) -> Result<Place, usize> {
        let taken = {
            let mut map = self.places.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 1024 {
                map.retain(|_, n| Arc::strong_count(n) > 1);
            }
            let key = (subscriber.to_owned(), publisher.to_owned());
            Arc::clone(map.entry(key).or_default())
        };
        let before = taken.fetch_add(1, Ordering::AcqRel);
        if before >= places {
            taken.fetch_sub(1, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Place {
            _taken: Charge {
                held: taken,
                bytes: 1,
            },
        })
    }

    /// What `publisher`'s messages not yet delivered hold now.
    #[cfg(test)]
    fn held(&self, publisher: &str) -> usize {
        let map = self.held.lock().unwrap();
        map.get(publisher).map_or(0, |h| h.load(Ordering::Acquire))
    }
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
                "topic {}: 1 to {MAX_TOPIC} bytes, no spaces",
                super::quoted(&topic)
            )));
        }
        services.check_publish(&topic).map_err(denied)?;
        let charge = self
            .publishers
            .charge(from, payload.len(), self.publisher_bytes)
            .map_err(|held| {
                HostError::Overloaded(format!(
                    "{from}'s messages not yet delivered hold {}; another {} would pass \
                     the {} a publisher may hold; nothing was published",
                    mib(held),
                    mib(payload.len()),
                    mib(self.publisher_bytes)
                ))
            })?;
        let permits = self.reserve(from, &topic, Reserve::AllOrNothing)?;
        // The other nodes' copy first: if it cannot be sent, nobody gets the
        // message (the publisher may retry without anyone seeing it twice).
        if let Some(store) = self.bus_store()? {
            self.bus_budgets
                .admit(
                    from,
                    payload.len(),
                    self.bus_bytes,
                    std::time::Instant::now(),
                )
                .map_err(HostError::Overloaded)?;
            // A database write like any store operation: within the publisher's
            // share of the pool (`STORE_OPS_PER_PLUGIN`).
            let _place = self.store_places.take(from).await;
            store.publish(&self.node, from, &topic, &payload).await?;
        }
        let n = permits.len() as u32;
        Self::deliver(permits, from, &topic, payload, charge);
        Ok(HostReply::Delivered(n))
    }

    /// Whether this node has a plugin subscribed to `topic` (another node's
    /// message on a topic nobody here subscribes to is not even read).
    pub(crate) fn has_subscribers(&self, topic: &str) -> bool {
        self.directory()
            .is_ok_and(|d| !d.subscribers(topic).is_empty())
    }

    /// A message another node published: queued for this node's allowed
    /// subscribers; one whose queue is full misses it, logged and audited (the
    /// publisher, elsewhere, cannot be refused any more).
    pub(crate) fn deliver_remote(&self, from: &str, topic: &str, payload: Vec<u8>) {
        let charge = match self
            .publishers
            .charge(from, payload.len(), self.publisher_bytes)
        {
            Ok(charge) => charge,
            Err(held) => {
                let rule = format!(
                    "its messages not yet delivered hold {}; another {} would pass the {} \
                     a publisher may hold (a message from another node)",
                    mib(held),
                    mib(payload.len()),
                    mib(self.publisher_bytes)
                );
                tracing::warn!(topic, from, "message dropped: {rule}");
                let event = AuditEvent {
                    plugin: from,
                    operation: "publish",
                    target: topic,
                    decision: "dropped",
                    rule: &rule,
                };
                self.audit.record(event);
                return;
            }
        };
        match self.reserve(from, topic, Reserve::SkipFull) {
            Ok(permits) => Self::deliver(permits, from, topic, payload, charge),
            Err(e) => tracing::warn!(topic, from, "a message from another node: {e}"),
        }
    }

    /// Send the message to every subscriber whose place was reserved, its bytes
    /// kept once for all of them.
    fn deliver(permits: Vec<Reserved>, from: &str, topic: &str, bytes: Vec<u8>, charge: Charge) {
        if permits.is_empty() {
            return;
        }
        let payload = Arc::new(Payload {
            bytes,
            _charge: charge,
        });
        for (permit, function, place) in permits {
            permit.send(Delivery {
                from: from.to_owned(),
                topic: topic.to_owned(),
                function,
                payload: Arc::clone(&payload),
                _place: place,
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

    /// Another node's message from `from` dropped for `subscriber` by `rule`:
    /// logged, and audited against the publisher's budget.
    fn dropped_for(&self, from: &str, subscriber: &str, topic: &str, rule: &str) {
        tracing::warn!(plugin = %subscriber, topic, "message dropped: {rule}");
        self.audit_subscriber(from, subscriber, topic, "dropped", rule);
    }

    /// A place in the queue of every allowed subscriber of `topic`; subscriptions
    /// the policy does not allow are audited and skipped. What is audited about a
    /// subscriber here is charged to the publisher `from`, whose message caused it.
    fn reserve(&self, from: &str, topic: &str, mode: Reserve) -> Result<Vec<Reserved>, HostError> {
        let directory = self.directory()?;
        let mut permits = Vec::new();
        let share = publisher_places(self.max_queue);
        for sub in directory.subscribers(topic) {
            if let Err(rule) = sub.services.check_subscribe(topic) {
                self.audit_subscriber(from, &sub.plugin, topic, "denied", &rule);
                continue;
            }
            let Some(queue) = directory.delivery_queue(&sub.plugin) else {
                continue; // Removed meanwhile.
            };
            let permit = match queue.try_reserve_owned() {
                Ok(permit) => permit,
                Err(_) if mode == Reserve::SkipFull => {
                    let rule = format!(
                        "max_queue: {} messages already queued for it (a message from another node)",
                        self.max_queue
                    );
                    self.dropped_for(from, &sub.plugin, topic, &rule);
                    continue;
                }
                Err(_) => {
                    return Err(HostError::Overloaded(format!(
                        "subscriber {} has {} messages queued; nothing was published",
                        sub.plugin, self.max_queue
                    )));
                }
            };
            // Its share, once there is room (a full queue says so first).
            let place = match self.publishers.place(&sub.plugin, from, share) {
                Ok(place) => place,
                Err(taken) if mode == Reserve::SkipFull => {
                    let rule = format!(
                        "{taken} of {from}'s messages already queued for it, its share of \
                         {} places (a message from another node)",
                        self.max_queue
                    );
                    self.dropped_for(from, &sub.plugin, topic, &rule);
                    continue;
                }
                Err(taken) => {
                    return Err(HostError::Overloaded(format!(
                        "subscriber {} has {taken} of {from}'s messages queued, as many as \
                         one publisher may of its {} places; nothing was published",
                        sub.plugin, self.max_queue
                    )));
                }
            };
            permits.push((permit, sub.function, place));
        }
        Ok(permits)
    }
}

/// `bytes` for a person: in MiB past one, else in bytes.
fn mib(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{bytes} bytes")
    }
}

/// A place reserved in a subscriber's queue: its permit, the function the
/// delivery calls, and the place counted against the publisher's share.
type Reserved = (tokio::sync::mpsc::OwnedPermit<Delivery>, String, Place);

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

    /// A publisher's messages to the other nodes take its budget: at once up to
    /// its size, each message costing its bytes and 256 more; past it a publish
    /// is refused saying what is left; the budget refills over five minutes;
    /// another publisher's is its own; and full budgets are forgotten.
    #[test]
    fn a_publishers_messages_to_the_other_nodes_are_bounded_by_its_budget() {
        let budgets = BusBudgets::default();
        let t0 = std::time::Instant::now();
        let size = 64 << 20;
        let msg = 1 << 20;
        for i in 0..63 {
            assert_eq!(budgets.admit("p", msg, size, t0), Ok(()), "message {i}");
        }
        let refused = budgets.admit("p", msg, size, t0).unwrap_err();
        assert_eq!(
            refused,
            "p's messages to the other nodes have used its 64.0 MiB for five minutes \
             (1032448 bytes left; another 1.0 MiB would pass it); nothing was published"
        );
        // Empty messages cost too.
        let small = BusBudgets::default();
        let n = (0..10_000)
            .take_while(|_| small.admit("q", 0, 64 << 10, t0).is_ok())
            .count();
        assert_eq!(n, (64 << 10) / BUS_MESSAGE_COST);
        // Another publisher has its own.
        assert_eq!(budgets.admit("other", msg, size, t0), Ok(()));
        // A fifth of five minutes later, a fifth of the budget is back.
        let later = t0 + Duration::from_secs(60);
        let back = (0..100)
            .take_while(|_| budgets.admit("p", msg, size, later).is_ok())
            .count();
        assert_eq!(back, 13, "1,032,448 bytes left plus 12.8 MiB refilled");
        // Once full again, nothing is kept of either.
        let full = t0 + Duration::from_secs(301);
        assert_eq!(budgets.admit("p", 0, size, full), Ok(()));
        assert_eq!(
            budgets.budgets.lock().unwrap().len(),
            1,
            "only p's, just used"
        );
    }

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

    /// Subscribers of `news` (allowed) with queues of `capacity` the test holds
    /// the other end of, and a broker of `max_queue` whose audit is `audit`.
    struct World {
        allowed: Arc<Services>,
        plugins: Arc<dyn Directory>,
        senders: Vec<mpsc::Sender<Delivery>>,
        queues: Vec<mpsc::Receiver<Delivery>>,
        broker: HostBroker,
        audit: std::path::PathBuf,
        dir: tempfile::TempDir,
    }

    fn world(subscribers: &[&str], capacity: usize, max_queue: usize) -> World {
        let allowed = grants("publish = [\"news\"]\nsubscribe = [\"news\"]");
        let (senders, queues): (Vec<_>, Vec<_>) =
            subscribers.iter().map(|_| mpsc::channel(capacity)).unzip();
        let plugins: Arc<dyn Directory> = Arc::new(Plugins {
            grants: allowed.clone(),
            subscribers: subscribers
                .iter()
                .map(|plugin| Subscriber {
                    plugin: (*plugin).to_owned(),
                    function: "on_message".to_owned(),
                    services: allowed.clone(),
                })
                .collect(),
            queues: subscribers
                .iter()
                .map(|p| (*p).to_owned())
                .zip(senders.iter().cloned())
                .collect(),
        });
        let dir = tempfile::tempdir().unwrap();
        let audit = dir.path().join("audit.jsonl");
        let broker = HostBroker::new(
            AuditSink::File(audit.clone()),
            Default::default(),
            dir.path().into(),
            max_queue,
            Arc::downgrade(&plugins),
        );
        World {
            allowed,
            plugins,
            senders,
            queues,
            broker,
            audit,
            dir,
        }
    }

    #[tokio::test]
    async fn a_publish_is_queued_for_every_subscriber_or_for_none() {
        let World {
            allowed,
            plugins,
            senders,
            mut queues,
            broker,
            audit,
            dir,
        } = world(&["a", "b"], 1, 1);
        let (b_tx, mut b_rx) = (&senders[1], queues.pop().unwrap());
        let mut a_rx = queues.pop().unwrap();
        // b's queue is full: nothing is queued for a either.
        b_tx.try_send(Delivery {
            from: "earlier".into(),
            topic: "news".into(),
            function: "on_message".into(),
            payload: Payload::uncharged(Vec::new()),
            _place: Place::uncounted(),
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
        broker.deliver_remote("far", "news", b"remote".to_vec());
        assert_eq!(&a_rx.try_recv().unwrap().payload[..], b"remote");
        let audit = std::fs::read_to_string(&audit).unwrap();
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
            assert_eq!((d.from.as_str(), &d.payload[..]), ("p", &b"two"[..]));
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

    /// A publisher's messages are kept once for all their subscribers, and what
    /// its messages not yet delivered hold is bounded by the publisher: past it,
    /// its publishes are refused (and another node's message from it dropped,
    /// audited), while another publisher is not affected; the bytes are given
    /// back as the last delivery of each message is done.
    #[tokio::test]
    async fn a_publishers_queued_messages_are_kept_once_and_bounded() {
        let World {
            allowed,
            mut queues,
            mut broker,
            audit: log,
            plugins: _plugins,
            senders: _senders,
            dir: _dir,
        } = world(&["a", "b"], 64, 64);
        let (mut b_rx, mut a_rx) = (queues.pop().unwrap(), queues.pop().unwrap());
        assert_eq!(broker.publisher_bytes, PUBLISHER_QUEUED_BYTES);
        broker.publisher_bytes = 10 << 20;
        let big = || vec![7u8; 4 << 20];
        for _ in 0..2 {
            match broker.publish("p", &allowed, "news".into(), big()).await {
                Ok(HostReply::Delivered(2)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            broker.publishers.held("p"),
            8 << 20,
            "each message counted once"
        );
        match broker.publish("p", &allowed, "news".into(), big()).await {
            Err(HostError::Overloaded(why)) => assert_eq!(
                why,
                "p's messages not yet delivered hold 8.0 MiB; another 4.0 MiB would pass \
                 the 10.0 MiB a publisher may hold; nothing was published"
            ),
            other => panic!("{other:?}"),
        }
        // Another publisher is not held back by p.
        match broker
            .publish("q", &allowed, "news".into(), b"small".to_vec())
            .await
        {
            Ok(HostReply::Delivered(2)) => {}
            other => panic!("{other:?}"),
        }
        // p's message from another node is dropped for everyone, audited.
        broker.deliver_remote("p", "news", big());
        let audit = std::fs::read_to_string(&log).unwrap();
        let dropped: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &serde_json::Value| l["decision"] == "dropped")
            .collect();
        assert_eq!(dropped.len(), 1, "{audit}");
        assert_eq!(dropped[0]["plugin"], "p");
        assert_eq!(dropped[0]["operation"], "publish");
        assert!(
            dropped[0]["rule"]
                .as_str()
                .unwrap()
                .ends_with("(a message from another node)"),
            "{audit}"
        );
        // Both subscribers' queues hold the same bytes: one copy per message.
        let a: Vec<Delivery> = std::iter::from_fn(|| a_rx.try_recv().ok()).collect();
        let b: Vec<Delivery> = std::iter::from_fn(|| b_rx.try_recv().ok()).collect();
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 3);
        for (a, b) in a.iter().zip(&b) {
            assert!(Arc::ptr_eq(&a.payload, &b.payload));
        }
        assert_eq!(&a[2].payload[..], b"small");
        // The bytes are given back when the last delivery of a message is done;
        // that delivery takes them without a copy.
        let mut a = a.into_iter();
        let mut b = b.into_iter();
        drop(a.next());
        assert_eq!(broker.publishers.held("p"), 8 << 20, "b still holds it");
        let last = b.next().unwrap().payload;
        let at = last.as_ptr();
        let (input, held) = Payload::into_input(last);
        assert_eq!(input.as_ptr(), at, "the last delivery copies nothing");
        assert_eq!(
            broker.publishers.held("p"),
            8 << 20,
            "held until the call is done"
        );
        drop(held);
        assert_eq!(broker.publishers.held("p"), 4 << 20);
        match broker.publish("p", &allowed, "news".into(), big()).await {
            Ok(HostReply::Delivered(2)) => {}
            other => panic!("{other:?}"),
        }
        drop((a, b));
        assert_eq!(broker.publishers.held("p"), 4 << 20);
    }

    /// One publisher's messages take at most three quarters of a subscriber's
    /// queue: past its share its publishes are refused (and its messages from
    /// another node dropped, audited), while another publisher still gets its
    /// messages queued; a place comes back when its delivery leaves the queue.
    #[tokio::test]
    async fn no_publisher_fills_a_subscribers_queue_alone() {
        assert_eq!(publisher_places(64), 48);
        assert_eq!(publisher_places(3), 3);
        assert_eq!(publisher_places(1), 1);
        let World {
            allowed,
            mut queues,
            broker,
            audit: log,
            plugins: _plugins,
            senders: _senders,
            dir: _dir,
        } = world(&["a"], 8, 8);
        let mut a_rx = queues.pop().unwrap();
        let publish = |from: &'static str| {
            let broker = &broker;
            let allowed = &allowed;
            async move {
                broker
                    .publish(from, allowed, "news".into(), from.as_bytes().to_vec())
                    .await
            }
        };
        for _ in 0..6 {
            assert!(matches!(publish("p").await, Ok(HostReply::Delivered(1))));
        }
        match publish("p").await {
            Err(HostError::Overloaded(why)) => assert_eq!(
                why,
                "subscriber a has 6 of p's messages queued, as many as one publisher may \
                 of its 8 places; nothing was published"
            ),
            other => panic!("{other:?}"),
        }
        broker.deliver_remote("p", "news", b"far".to_vec());
        let audit = std::fs::read_to_string(&log).unwrap();
        assert!(
            audit.contains("\"decision\":\"dropped\"")
                && audit.contains("6 of p's messages already queued for it, its share of 8 places"),
            "{audit}"
        );
        // The rest of the queue is another publisher's to use.
        for _ in 0..2 {
            assert!(matches!(publish("q").await, Ok(HostReply::Delivered(1))));
        }
        match publish("q").await {
            Err(HostError::Overloaded(why)) => {
                assert!(
                    why.starts_with("subscriber a has 8 messages queued"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A delivery taken off the queue gives its place back to its publisher.
        assert_eq!(a_rx.try_recv().unwrap().from, "p");
        assert!(matches!(publish("p").await, Ok(HostReply::Delivered(1))));
        let queued: Vec<String> = std::iter::from_fn(|| a_rx.try_recv().ok())
            .map(|d| d.from)
            .collect();
        assert_eq!(queued, ["p", "p", "p", "p", "p", "q", "q", "p"]);
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
