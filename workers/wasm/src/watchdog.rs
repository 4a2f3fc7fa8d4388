//! Per-call deadlines through wasmtime epoch interruption.
//!
//! Each store runs with an epoch deadline of one tick. A single watchdog thread
//! sleeps until the armed deadline and then increments the engine's epoch, which
//! traps the running guest with [`wasmtime::Trap::Interrupt`]. Arming bumps a
//! generation number, so a deadline that fires late can never hit a later call.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Armed {
    generation: u64,
    deadline: Option<(u64, Instant)>,
}

/// Owns the watchdog thread. Dropping it does not stop the thread; workers live
/// for the process.
#[derive(Debug, Clone)]
pub struct Watchdog {
    shared: Arc<(Mutex<Armed>, Condvar)>,
}

/// Disarms the watchdog when dropped (the call finished in time).
#[derive(Debug)]
pub struct Guard<'a> {
    watchdog: &'a Watchdog,
    generation: u64,
}

impl Watchdog {
    /// Start the thread that interrupts `engine` at armed deadlines.
    pub fn start(engine: wasmtime::Engine) -> Watchdog {
        let shared = Arc::new((Mutex::new(Armed::default()), Condvar::new()));
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("corral-deadline".into())
            .spawn(move || {
                let (lock, cv) = &*thread_shared;
                let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    match armed.deadline {
                        None => armed = cv.wait(armed).unwrap_or_else(|e| e.into_inner()),
                        Some((generation, at)) => {
                            let now = Instant::now();
                            if now >= at {
                                if armed.generation == generation {
                                    engine.increment_epoch();
                                }
                                armed.deadline = None;
                            } else {
                                armed = cv
                                    .wait_timeout(armed, at - now)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                    }
                }
            })
            .expect("spawning the deadline thread");
        Watchdog { shared }
    }

    /// Interrupt the engine `after` from now unless the returned guard is dropped first.
    pub fn arm(&self, after: Duration) -> Guard<'_> {
        let (lock, cv) = &*self.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        armed.generation += 1;
        let generation = armed.generation;
        let at = Instant::now()
            .checked_add(after)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365));
        armed.deadline = Some((generation, at));
        cv.notify_one();
        Guard {
            watchdog: self,
            generation,
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.watchdog.shared;
        let mut armed = lock.lock().unwrap_or_else(|e| e.into_inner());
        if armed.generation == self.generation {
            armed.generation += 1;
            armed.deadline = None;
            cv.notify_one();
        }
    }
}
