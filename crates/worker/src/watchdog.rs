//! One deadline thread for the engines that need one (wasmtime's epoch, V8's
//! `terminate_execution`): it sleeps until the armed deadline and then runs the
//! engine's interrupt. Engines that check the clock themselves (QuickJS's interrupt
//! handler) or take a signal (CPython's SIGALRM) need none.
//!
//! Arming bumps a generation number, so a deadline that fires late can never hit a
//! later call; dropping the [`Armed`] guard disarms it and says whether it fired.
//! Dropping the [`Watchdog`] tells the thread to end (it is not joined; it holds
//! nothing but the interrupt).
//!
//! Arming and disarming do not wake the thread: a call costs an uncontended lock
//! and no context switch. The thread sleeps until the earliest deadline it knows
//! of; when it wakes and the deadline has moved later (a later call armed it), it
//! sleeps again until the new one. It is woken only when a deadline is armed
//! earlier than the time it sleeps until, or while it sleeps with no deadline at
//! all: about once per deadline period under a steady stream of calls, where a
//! wake per arm and per disarm cost two context switches per call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct State {
    generation: u64,
    deadline: Option<(u64, Instant)>,
    /// When the thread will wake by itself (`None`: it waits to be woken).
    sleeping_until: Option<Instant>,
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
        // A thread that wakes by itself before `at` will find this deadline then.
        if state.sleeping_until.is_none_or(|t| at < t) {
            self.shared.wake.notify_one();
        }
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
        // The thread is not woken: when it wakes by itself it finds no deadline.
        if state.generation == self.generation {
            state.generation += 1;
            state.deadline = None;
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
            None => {
                state.sleeping_until = None;
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            Some((generation, at)) => {
                let now = Instant::now();
                if now >= at {
                    if state.generation == generation {
                        shared.fired.store(true, Ordering::SeqCst);
                        interrupt();
                    }
                    state.deadline = None;
                } else {
                    state.sleeping_until = Some(at);
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
    fn an_earlier_deadline_armed_while_the_thread_sleeps_until_a_later_one_fires_on_time() {
        let (w, count) = counting();
        let long = w.arm(Duration::from_secs(60));
        // Let the thread go to sleep until the long deadline.
        std::thread::sleep(Duration::from_millis(50));
        drop(long);
        let t = Instant::now();
        let short = w.arm(Duration::from_millis(20));
        until_fired(&count);
        assert!(short.fired());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_later_deadline_armed_after_an_earlier_one_was_disarmed_fires_at_its_own_time() {
        let (w, count) = counting();
        drop(w.arm(Duration::from_millis(30)));
        // The thread wakes at 30 ms by itself, finds this one and sleeps again.
        let later = w.arm(Duration::from_millis(150));
        let t = Instant::now();
        until_fired(&count);
        assert!(later.fired());
        assert!(
            t.elapsed() >= Duration::from_millis(140),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
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
