//! The process behind a worker, as the rest of this module sees it: a [`Process`]
//! that can be verified, killed and waited for. [`Spawned`] is a child the
//! supervisor started with [`super::spawn`]; the supervisor's unit tests put an
//! in-process fake behind the same trait, so the handshake, the load, the
//! connection task and every call path run for real without a process.

use super::BoxFuture;
use crate::plugins::access::Credentials;
use corral_confine::cgroup::PluginCgroup;
use corral_protocol::Hello;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Child;

/// A worker's process: what the connection needs of it.
pub(crate) trait Process: Send + 'static {
    /// Its pid (shown by `corral status`).
    fn pid(&self) -> u32;
    /// Check from outside what the worker claimed in its handshake, and fill in what
    /// only the outside can see (its namespaces). An error refuses the worker.
    fn verify(&self, hello: &mut Hello) -> Result<(), VerifyError>;
    /// Send SIGKILL (or its equivalent); returns at once.
    fn start_kill(&mut self);
    /// How it ended, if it has.
    fn try_wait(&mut self) -> Option<ExitStatus>;
    /// Wait until it has ended; `None` if that cannot be known.
    fn wait(&mut self) -> BoxFuture<'_, Option<ExitStatus>>;
}

/// Why a worker is refused after its handshake: what it claimed is not what the
/// outside sees.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read the worker's credentials: {0}")]
    Credentials(std::io::Error),
    #[error(
        "the worker did not drop to uid {uid} gid {gid} with no capabilities (Uid {uids:?}, \
         Gid {gids:?}, CapEff {caps:?})"
    )]
    NotDropped {
        uid: u32,
        gid: u32,
        uids: Vec<String>,
        gids: Vec<String>,
        caps: Vec<String>,
    },
}

/// A worker process the supervisor spawned.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    /// The unprivileged ids it was told to become (when the supervisor is root).
    pub(crate) run_as: Option<Credentials>,
}

impl Process for Spawned {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn verify(&self, hello: &mut Hello) -> Result<(), VerifyError> {
        verify_worker(self.pid, self.run_as, hello)
    }

    fn start_kill(&mut self) {
        let _ = self.child.start_kill();
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn wait(&mut self) -> BoxFuture<'_, Option<ExitStatus>> {
        Box::pin(async move { self.child.wait().await.ok() })
    }
}

pub use corral_confine::child::WORKER_MAX_FILES;

/// Check from outside what worker `pid` claimed in `hello`. Namespaces and
/// credentials are checked from outside: an unprivileged worker cannot read the
/// supervisor's /proc entries to compare, and a worker that did not drop root gets
/// no plugin.
pub(crate) fn verify_worker(
    pid: u32,
    run_as: Option<Credentials>,
    hello: &mut Hello,
) -> Result<(), VerifyError> {
    hello.enforcement.namespaces = corral_confine::worker_namespaces(pid);
    match run_as {
        Some(cred) => check_credentials(pid, cred),
        None => Ok(()),
    }
}

/// The worker's real, effective, saved and filesystem ids and its capability sets,
/// as the kernel reports them, against what it was told to become.
fn check_credentials(pid: u32, cred: Credentials) -> Result<(), VerifyError> {
    let status =
        // Bounded: a field cut off is missing, and missing is refused.
        crate::plugins::access::read_proc(std::path::Path::new(&format!("/proc/{pid}/status")))
            .map_err(VerifyError::Credentials)?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let (uids, gids, caps) = (field("Uid:"), field("Gid:"), field("CapEff:"));
    let (uid, gid) = (cred.uid.to_string(), cred.gid.to_string());
    let ok = uids == [uid.as_str(); 4]
        && gids == [gid.as_str(); 4]
        && caps == ["0000000000000000"]
        && field("CapPrm:") == ["0000000000000000"];
    if ok {
        Ok(())
    } else {
        Err(VerifyError::NotDropped {
            uid: cred.uid,
            gid: cred.gid,
            uids,
            gids,
            caps,
        })
    }
}

/// After its worker has exited, kill whatever is left in a worker's group (what
/// the plugin started, however it detached: a new session, a double fork) and
/// remove the group once it is empty.
pub(crate) fn remove_when_empty(group: Arc<PluginCgroup>) {
    tokio::spawn(async move {
        let removed = poll_until(Duration::from_secs(2), || {
            group.kill_all();
            group.try_remove()
        })
        .await;
        if !removed {
            tracing::warn!(
                ?group,
                "cgroup still busy after 2 s of kills; left in place"
            );
        }
    });
}

/// Call `done` until it says so or `limit` has passed; whether it did. The waits
/// between calls start at 1 ms and double up to 20 ms: what usually takes a moment
/// (the kernel letting go of an exited process's group) is seen a moment after,
/// not a whole period later.
pub(crate) async fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut wait = Duration::from_millis(1);
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(20));
    }
}

/// Descriptors this process has open (`None` when counting them takes one more
/// than it has) and its soft `RLIMIT_NOFILE`.
pub(crate) fn open_files() -> (Option<u32>, u64) {
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u32);
    (open, nofile().0)
}

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (r.rlim_cur, r.rlim_max)
}

/// Raise this process's soft `RLIMIT_NOFILE` to its hard limit (each worker takes
/// a few descriptors of the supervisor's; the usual soft limit of 1,024 would stop
/// at a few hundred workers). Returns the limit now in force. `corral serve` and
/// `corral run` call it at start; a program embedding the supervisor may too.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let (soft, hard) = nofile();
    if soft >= hard {
        return Ok(soft);
    }
    let r = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(hard)
}
