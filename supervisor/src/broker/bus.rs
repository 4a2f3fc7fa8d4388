//! Topics across nodes: the task that receives what the other daemons on the same
//! PostgreSQL database publish, and hands it to this node's subscribers
//! ([`HostBroker::deliver_remote`]). The sending half is the publish path
//! (`messaging.rs`, then [`super::store::postgres::PgStore::publish`]).
//!
//! The task LISTENs on its own connection and serves notifications one at a
//! time, in the order the database delivers them (commit order), so a publisher's
//! messages reach a subscriber here in publish order. It skips its own node's
//! notifications (this node delivered those locally), and those of topics no
//! plugin here subscribes to (the notification names the topic: their payloads
//! are never read). When the connection is lost
//! it logs it, waits (1 s, doubling to 30 s) and listens again: messages published
//! meanwhile are missed (delivery is at most once), and the log says so. Every
//! minute it deletes expired messages.

use super::HostBroker;
use super::store::Store;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often expired messages are deleted.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// A random name for this node among those sharing the database.
pub(crate) fn node_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No randomness: the pid and the time still tell nodes apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (t ^ u64::from(std::process::id()) << 40).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Receive the other nodes' messages until the broker is gone.
pub(crate) async fn receive(broker: Weak<HostBroker>, store: Arc<Store>) {
    let Store::Postgres(pg) = &*store else {
        return;
    };
    let node = match broker.upgrade() {
        Some(b) => b.node.clone(),
        None => return,
    };
    let mut backoff = Duration::from_secs(1);
    let mut lost = false;
    loop {
        match pg.listen().await {
            Ok((_client, mut notifications)) => {
                if lost {
                    tracing::warn!(
                        "topics: listening to the other nodes again; what they published \
                         meanwhile was missed"
                    );
                } else {
                    tracing::info!(node, "topics: listening to the other nodes");
                }
                backoff = Duration::from_secs(1);
                let mut expire = tokio::time::interval(EXPIRE_EVERY);
                loop {
                    tokio::select! {
                        n = notifications.recv() => {
                            let Some(n) = n else { break };
                            let Some(broker) = broker.upgrade() else { return };
                            serve(&broker, pg, &node, &n).await;
                        }
                        _ = expire.tick() => {
                            if let Err(e) = pg.expire_messages().await {
                                tracing::warn!("topics: deleting expired messages: {e}");
                            }
                        }
                    }
                }
                tracing::warn!("topics: the connection to the other nodes was lost");
            }
            Err(e) => tracing::warn!("topics: cannot listen to the other nodes: {e}"),
        }
        lost = true;
        if broker.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One notification: `<node> <id> <topic>` (`<node> <id>` from a node before
/// topics were named).
async fn serve(
    broker: &HostBroker,
    pg: &super::store::postgres::PgStore,
    node: &str,
    notification: &str,
) {
    let mut parts = notification.splitn(3, ' ');
    let (Some(from_node), Some(id), topic) = (parts.next(), parts.next(), parts.next()) else {
        tracing::warn!(notification, "topics: a notification not from Corral");
        return;
    };
    if from_node == node {
        return;
    }
    // Nobody here subscribes to it: not read at all.
    if topic.is_some_and(|t| !broker.has_subscribers(t)) {
        return;
    }
    let Ok(id) = id.parse::<i64>() else {
        tracing::warn!(notification, "topics: a notification not from Corral");
        return;
    };
    match pg.message(id).await {
        Ok(Some((publisher, topic, payload))) => {
            broker.deliver_remote(&publisher, &topic, payload);
        }
        Ok(None) => tracing::warn!(
            id,
            from_node,
            "topics: a message expired before it was read"
        ),
        Err(e) => tracing::warn!(id, from_node, "topics: a message could not be read: {e}"),
    }
}
