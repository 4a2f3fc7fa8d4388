//! Places per plugin: how many operations of one kind (name lookups, store
//! operations) a plugin may have running at once. A plugin past its places
//! waits for one of its own to end; another plugin does not wait behind it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Each plugin's places, made at its first use.
#[derive(Debug)]
pub(crate) struct Places {
    per_plugin: usize,
    plugins: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Places {
    pub(crate) fn new(per_plugin: usize) -> Places {
        Places {
            per_plugin,
            plugins: Mutex::default(),
        }
    }

    /// A place of `plugin`'s, once one is free; held until the permit drops.
    pub(crate) async fn take(&self, plugin: &str) -> OwnedSemaphorePermit {
        let mine = {
            let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
            if plugins.len() > 64 {
                // Forget plugins with nothing running or waiting (each of those
                // holds its semaphore).
                plugins.retain(|_, s| Arc::strong_count(s) > 1);
            }
            Arc::clone(
                plugins
                    .entry(plugin.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_plugin))),
            )
        };
        // Never closed.
        mine.acquire_owned().await.expect("places are never closed")
    }

    /// How many of `plugin`'s places are free now.
    #[cfg(test)]
    pub(crate) fn free(&self, plugin: &str) -> usize {
        let plugins = self.plugins.lock().unwrap();
        plugins
            .get(plugin)
            .map_or(self.per_plugin, |s| s.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A plugin holding all its places waits for one of its own to end; another
    /// plugin takes one at once; a place comes back when its permit drops.
    #[tokio::test]
    async fn a_plugin_past_its_places_waits_for_its_own_and_nobody_else_does() {
        let places = Places::new(2);
        let held = [places.take("a").await, places.take("a").await];
        assert_eq!(places.free("a"), 0);
        let third = tokio::time::timeout(Duration::from_millis(50), places.take("a")).await;
        assert!(third.is_err(), "a third place for a");
        let other = tokio::time::timeout(Duration::from_millis(50), places.take("b")).await;
        assert!(other.is_ok(), "b waited behind a");
        drop(held);
        assert_eq!(places.free("a"), 2);
        // Many plugins come and go: only the ones holding places are remembered.
        for i in 0..200 {
            drop(places.take(&format!("p{i}")).await);
        }
        assert!(places.plugins.lock().unwrap().len() <= 66);
    }
}
