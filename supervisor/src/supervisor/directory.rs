//! What the broker may ask of the supervisor ([`Directory`]): a plugin's grants,
//! the subscribers of a topic, their delivery queues, and calls to other plugins.

use super::Inner;
use crate::broker::Directory;
use crate::broker::messaging::{Delivery, Subscriber, subscriptions};
use crate::worker::BoxFuture;
use corral_policy::Services;
use corral_protocol::CallError;
use std::sync::Arc;
use std::time::Duration;

impl Directory for Inner {
    fn services(&self, plugin: &str) -> Option<Arc<Services>> {
        let p = self.plugin(plugin)?;
        Some(self.grants(&p))
    }

    fn subscribers(&self, topic: &str) -> Vec<Subscriber> {
        let mut out = Vec::new();
        for p in self.all_plugins() {
            for (t, function) in subscriptions(&p.manifest) {
                if t == topic {
                    out.push(Subscriber {
                        plugin: p.manifest.id.clone(),
                        function,
                        services: self.grants(&p),
                    });
                }
            }
        }
        out
    }

    fn delivery_queue(&self, plugin: &str) -> Option<tokio::sync::mpsc::Sender<Delivery>> {
        self.plugin(plugin).map(|p| self.deliveries(&p))
    }

    fn call<'a>(
        &'a self,
        plugin: &'a str,
        function: &'a str,
        input: Vec<u8>,
        timeout: Option<Duration>,
        chain: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u8>, CallError>> {
        // Boxed: a call may start a worker whose init makes host calls.
        Box::pin(self.call_from(plugin, function, input, timeout, chain))
    }
}
