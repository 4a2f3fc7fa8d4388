//! One deadline thread for the engines that need one (wasmtime's epoch, V8's
//! `terminate_execution`): it sleeps until the armed deadline and then runs the
//! engine's interrupt. Engines that check the clock themselves (QuickJS's interrupt
//! handler) or take a signal (CPython's SIGALRM) need none.
//!
//! Arming bumps a generation number, so a deadline that fires late can never hit a
//! later call; dropping the [`Armed`] guard disarms it and says whether it fired.
//! Dropping the [`Watchdog`] tells the thread to end (it is not joined; it holds
//! nothing but the interrupt).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    generation: u64,
    deadline: Option<(u64, Instant)>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Whether the last armed deadline fired.
    fired: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds
        // consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The deadline thread of one engine (or one instance of it).
#[derive(Debug)]
pub struct Watchdog {
    shared: Arc<Shared>,
}

/// A deadline in force until dropped.
#[derive(Debug)]
pub struct Armed<'a> {
    watchdog: &'a Watchdog,
    generation: u64,
}

impl Watchdog {
    /// Start the thread that calls `interrupt` at armed deadlines. It must be
    /// started after confinement (Landlock confines the calling thread and its
    /// future children only, so no thread may exist before it is applied).
    pub fn start(interrupt: impl Fn() + Send + 'static) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let thread = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("corral-deadline".into())
            .spawn(move || run(&thread, interrupt))?;
        Ok(Watchdog { shared })
    }

    /// Interrupt the engine `after` from now unless the guard is dropped first.
    pub fn arm(&self, after: Duration) -> Armed<'_> {
        let mut state = self.shared.lock();
        state.generation += 1;
        let generation = state.generation;
        // A deadline too far to represent is as good as none.
        let at = Instant::now()
            .checked_add(after)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        state.deadline = Some((generation, at));
        self.shared.fired.store(false, Ordering::SeqCst);
        self.shared.wake.notify_one();
        Armed {
            watchdog: self,
            generation,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

impl Armed<'_> {
    /// Whether the deadline has fired (the engine was interrupted).
    pub fn fired(&self) -> bool {
        self.watchdog.shared.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let shared = &self.watchdog.shared;
        let mut state = shared.lock();
        if state.generation == self.generation {
            state.generation += 1;
            state.deadline = None;
            shared.wake.notify_one();
        }
    }
}

fn run(shared: &Shared, interrupt: impl Fn()) {
    let mut state = shared.lock();
    loop {
        if state.stop {
            return;
        }
        match state.deadline {
            None => state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some((generation, at)) => {
                let now = Instant::now();
                if now >= at {
                    if state.generation == generation {
                        shared.fired.store(true, Ordering::SeqCst);
                        interrupt();
                    }
                    state.deadline = None;
                } else {
                    state = shared
                        .wake
                        .wait_timeout(state, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counting() -> (Watchdog, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&count);
        let w = Watchdog::start(move || {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        (w, count)
    }

    /// Wait (boundedly) until `count` reaches one.
    fn until_fired(count: &AtomicU32) {
        let until = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_armed_deadline_fires_once_and_says_so() {
        let (w, count) = counting();
        let armed = w.arm(Duration::from_millis(20));
        until_fired(&count);
        std::thread::sleep(Duration::from_millis(50));
        assert!(armed.fired());
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_disarmed_deadline_never_fires_not_even_for_a_later_call() {
        let (w, count) = counting();
        drop(w.arm(Duration::from_millis(30)));
        let later = w.arm(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!later.fired());
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn arming_again_replaces_the_deadline() {
        let (w, count) = counting();
        let first = w.arm(Duration::from_secs(60));
        drop(first);
        let second = w.arm(Duration::from_millis(10));
        until_fired(&count);
        assert!(second.fired());
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
