//! Native plugins from the attacker's side, at every level: `fixtures/native-hostile`
//! is machine code in the real `corral-worker-native`, with no engine in front of
//! the operating system's confinement. Every attempt has one exact expected outcome
//! (the errno, or the syscall seccomp killed the worker for); afterwards a native
//! neighbour still answers from the same process, and nothing the attacker started
//! is left.

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::native_plugin;
use corral_protocol::{CallError, ExitReason};
use std::time::{Duration, Instant};
use tempfile::TempDir;

struct Arena {
    sup: Supervisor,
    attacker: TempDir,
    neighbour: TempDir,
    _cache: TempDir,
}

fn arena(level: Level) -> Arena {
    let cache = corral_integration_tests::open_tempdir();
    let workers = corral_integration_tests::built().bin_dir.clone();
    let opts = corral_integration_tests::hostile_options(cache.path(), &workers, level);
    let mut sup = Supervisor::new(opts);
    let attacker = native_plugin("native-hostile", "attacker", "timeout = \"2s\"");
    let neighbour = native_plugin("native-kit", "neighbour", "");
    sup.add_plugin_dir(attacker.path()).unwrap();
    sup.add_plugin_dir(neighbour.path()).unwrap();
    Arena {
        sup,
        attacker,
        neighbour,
        _cache: cache,
    }
}

/// What an attack meets: an answer, or the worker killed by seccomp for a syscall.
#[derive(Debug, Clone, Copy)]
enum Meets {
    Errno(&'static str),
    Seccomp(&'static str),
}

impl Arena {
    async fn attack(&self, what: &str, arg: &str) -> Result<String, CallError> {
        self.sup
            .call("attacker", what, arg.as_bytes().to_vec(), None)
            .await
            .map(|b| String::from_utf8(b).unwrap())
    }

    async fn expect(&self, what: &str, arg: &str, meets: Meets) {
        let expected = match meets {
            Meets::Errno(e) => Ok(e.to_owned()),
            Meets::Seccomp(s) => Err(CallError::WorkerCrashed(ExitReason::Seccomp {
                syscall: s.to_owned(),
            })),
        };
        assert_eq!(self.attack(what, arg).await, expected, "{what} {arg}");
    }

    async fn pid(&self, id: &str) -> u32 {
        let list = self.sup.list().await;
        list.iter()
            .find(|p| p.id == id)
            .and_then(|p| p.pid)
            .unwrap()
    }
}

/// The expected outcome at `level`: at standard, at high, at maximum.
fn at(level: Level, outcomes: [Meets; 3]) -> Meets {
    match level {
        Level::Standard => outcomes[0],
        Level::High => outcomes[1],
        Level::Maximum => outcomes[2],
    }
}

async fn attacks(level: Level) {
    use Meets::{Errno, Seccomp};
    let a = arena(level);
    assert_eq!(
        a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    let neighbour_pid = a.pid("neighbour").await;
    a.expect("read_own", "", Errno("ok")).await;
    let info = a.sup.list().await;
    let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
    assert_eq!(attacker.runtime, corral_protocol::Runtime::Native);
    assert_eq!(attacker.level, level.as_str());
    let report = attacker.enforcement.as_ref().unwrap();
    assert_eq!((report.uid, report.gid), (65534, 65534), "runs as nobody");
    assert_eq!((report.cap_effective, report.cap_bounding), (0, 0));
    let seccomp = report.seccomp.to_string();
    let filter = match level {
        Level::Standard => "standard deny-list",
        Level::High => "high deny-list",
        Level::Maximum => "native allow-list",
    };
    assert!(seccomp.contains(filter), "{seccomp}");

    // Files: nothing of the host's, of the neighbour's or of the supervisor's.
    let hidden = at(level, [Errno("EACCES"), Errno("EACCES"), Errno("ENOENT")]);
    a.expect("read", "/etc/shadow", hidden).await;
    a.expect("read", "/proc/1/environ", hidden).await;
    let other = a.neighbour.path().join("plugin.toml");
    a.expect("read", other.to_str().unwrap(), hidden).await;
    a.expect("write", "/etc/corral-pwned", hidden).await;
    let outside = std::env::temp_dir().join(format!("corral-native-{}", std::process::id()));
    a.expect(
        "write",
        outside.to_str().unwrap(),
        // At maximum /tmp is the worker's own tmpfs: the write lands there.
        at(level, [Errno("EACCES"), Errno("EACCES"), Errno("ok")]),
    )
    .await;
    assert!(!outside.exists(), "written outside: {}", outside.display());
    let own = corral_integration_tests::version_copy(a._cache.path(), a.attacker.path());
    a.expect(
        "write",
        own.join("plugin.so").to_str().unwrap(),
        at(level, [Errno("EACCES"), Errno("EACCES"), Errno("EROFS")]),
    )
    .await;

    // Network and the host's sockets.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    a.expect("connect", &addr, Errno("EAFNOSUPPORT")).await;
    let control_dir = corral_integration_tests::open_tempdir();
    let control = control_dir.path().join("control.sock");
    let _server = corral::control::ControlServer::bind(&control)
        .await
        .unwrap();
    a.expect(
        "unix_connect",
        control.to_str().unwrap(),
        at(
            level,
            [
                Errno("EAFNOSUPPORT"),
                Errno("EAFNOSUPPORT"),
                Seccomp("connect"),
            ],
        ),
    )
    .await;

    // Processes and privileges.
    a.expect("ptrace", "", Seccomp("ptrace")).await;
    a.expect("mount", "", Seccomp("mount")).await;
    a.expect(
        "exec",
        "/bin/true",
        at(
            level,
            [Errno("EACCES"), Seccomp("execve"), Seccomp("execve")],
        ),
    )
    .await;
    a.expect(
        "fork",
        "",
        at(level, [Errno("ok"), Errno("ok"), Seccomp("clone")]),
    )
    .await;
    let neighbour = neighbour_pid.to_string();
    let same_user = at(level, [Errno("EPERM"), Errno("EPERM"), Seccomp("kill")]);
    a.expect("kill_pid", &neighbour, same_user).await;
    let renice = at(
        level,
        [Errno("EPERM"), Errno("EPERM"), Seccomp("setpriority")],
    );
    a.expect("renice_pid", &neighbour, renice).await;
    a.expect("prlimit_pid", &neighbour, Errno("EPERM")).await;

    // Memory: private memory stops at the plugin's limit (RLIMIT_DATA), with room
    // for the worker's own buffers; shared memory, which that does not count, at
    // the worker's cgroup.
    let policy = a.sup.explain("attacker").unwrap();
    let (memory, output) = (policy.memory.value >> 20, policy.max_output.value >> 20);
    let out = a.attack("alloc", "").await.unwrap();
    let n: u64 = out
        .strip_prefix("ENOMEM after ")
        .and_then(|r| r.strip_suffix(" MiB"))
        .unwrap_or_else(|| panic!("not stopped: {out}"))
        .parse()
        .unwrap();
    assert!(
        n >= memory / 2 && n <= memory + output + 32,
        "{n} MiB against a limit of {memory} MiB"
    );
    let limit = policy.worker_memory.value;
    assert_eq!(
        a.attack("shm_bomb", &((limit >> 20) * 2).to_string()).await,
        Err(CallError::WorkerCrashed(ExitReason::OomKilled {
            limit_bytes: limit
        })),
        "shared memory bomb"
    );

    // Its own frames on the worker's socket: refused and the worker killed.
    match a.attack("garbage_frame", "").await {
        Err(CallError::WorkerCrashed(ExitReason::Protocol(why))) => {
            assert!(!why.is_empty())
        }
        other => panic!("garbage frame: {other:?}"),
    }

    // A loop no engine interrupts: killed at the deadline plus the grace.
    a.expect("ok", "", Errno("ok")).await;
    let pid = a.pid("attacker").await;
    let t = Instant::now();
    assert_eq!(
        a.sup
            .call("attacker", "spin", vec![], Some(Duration::from_millis(300)))
            .await,
        Err(CallError::Timeout { deadline_ms: 300 })
    );
    assert!(t.elapsed() >= Duration::from_millis(300) + corral::Options::new().kill_grace);
    assert!(
        crate::support::wait_gone(pid).await,
        "the spinning worker {pid} runs"
    );

    // After all of it: the attacker answers from a fresh worker, the neighbour from
    // the same process as before.
    a.expect("ok", "", Errno("ok")).await;
    assert_eq!(
        a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    assert_eq!(a.pid("neighbour").await, neighbour_pid);
    let attacker_pid = a.pid("attacker").await;
    let base = corral_integration_tests::v1_cgroup("self", "pids")
        .join(format!("corral-{}", std::process::id()));
    assert!(base.exists(), "{}", base.display());
    a.sup.shutdown(Duration::from_secs(1)).await;
    for pid in [attacker_pid, neighbour_pid] {
        assert!(
            corral_integration_tests::process_gone(pid),
            "{pid} left running"
        );
    }
    assert!(!base.exists(), "{} left behind", base.display());
}

#[tokio::test]
async fn a_hostile_native_plugin_is_contained_at_standard() {
    attacks(Level::Standard).await;
}

#[tokio::test]
async fn a_hostile_native_plugin_is_contained_at_high() {
    attacks(Level::High).await;
}

#[tokio::test]
async fn a_hostile_native_plugin_is_contained_at_maximum() {
    attacks(Level::Maximum).await;
}
