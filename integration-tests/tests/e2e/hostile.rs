//! Hostile plugins, from the attacker's side, at each level.
//!
//! `corral-worker-hostile` is a real worker (same loop, same `CORRAL_CONFINE`
//! confinement) that runs native attacks instead of plugin code, so these tests prove
//! the OS layer itself, behind any engine sandbox. Every attempt has one exact
//! expected outcome; after the attacks, a neighbour plugin still answers from the
//! same worker process and the supervisor (this test process) is untouched.
//!
//! Also here: CPU throttling at every level, the namespaces and read-only view of
//! `maximum`, the uid drop, and WASI escapes through the real Wasm engine. The
//! JavaScript and Python engines have their own hostile tests (`js.rs`,
//! `python.rs`), at every level too.

use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::{options, wat_plugin};
use corral_protocol::{CallError, Enforcement, ExitReason};
use std::path::PathBuf;
use tempfile::TempDir;

struct Arena {
    sup: Supervisor,
    cache: TempDir,
    neighbour: TempDir,
    _attacker: TempDir,
    _workers: TempDir,
}

fn arena(level: Level) -> Arena {
    let workers = corral_integration_tests::hostile_worker_dir();
    let cache = corral_integration_tests::open_tempdir();
    let opts = corral_integration_tests::hostile_options(cache.path(), workers.path(), level);
    let mut sup = Supervisor::new(opts);
    // Its answers are short: a small max_output holds its frames to little.
    let attacker = wat_plugin("attacker", "testkit.wat", "max_output = \"1MiB\"");
    let neighbour = wat_plugin("neighbour", "testkit.wat", "");
    sup.add_plugin_dir(attacker.path()).unwrap();
    sup.add_plugin_dir(neighbour.path()).unwrap();
    Arena {
        sup,
        cache,
        neighbour,
        _attacker: attacker,
        _workers: workers,
    }
}

impl Arena {
    async fn attack(&self, what: &str, arg: &str) -> Result<String, CallError> {
        self.sup
            .call("attacker", what, arg.as_bytes().to_vec(), None)
            .await
            .map(|b| String::from_utf8(b).unwrap())
    }

    async fn expect(&self, what: &str, arg: &str, expected: &str) {
        assert_eq!(
            self.attack(what, arg).await,
            Ok(expected.to_owned()),
            "{what} {arg}"
        );
    }

    async fn expect_seccomp(&self, what: &str, syscall: &str) {
        assert_eq!(
            self.attack(what, "").await,
            Err(CallError::WorkerCrashed(ExitReason::Seccomp {
                syscall: syscall.to_owned()
            })),
            "{what}"
        );
    }

    async fn pid(&self, id: &str) -> u32 {
        let list = self.sup.list().await;
        list.iter()
            .find(|p| p.id == id)
            .and_then(|p| p.pid)
            .unwrap()
    }

    /// The attacker's own cache directory: the only place it may write.
    fn writable(&self) -> PathBuf {
        self.cache.path().join("modules/attacker")
    }
}

/// Descriptors until the kernel refuses: RLIMIT_NOFILE stops it below the limit.
async fn fd_bomb(a: &Arena) {
    let out = a.attack("fd_bomb", "").await.unwrap();
    let n: u64 = out
        .strip_prefix("EMFILE after ")
        .and_then(|r| r.strip_suffix(" descriptors"))
        .unwrap_or_else(|| panic!("fd bomb not stopped: {out}"))
        .parse()
        .unwrap();
    assert!(n > 0 && n <= corral::WORKER_MAX_FILES, "{n} descriptors");
}

/// The store of compiled modules, from a worker that maps one: it reads its own
/// module, which is what its compile helper wrote from its bytes, and can change
/// neither that file (`write_own`: EACCES, or EROFS in the read-only view of
/// `maximum`) nor anything else in the store, nor plant a module of its own there
/// (`plant`: EACCES; at `maximum`, with these tests' cache under `/tmp`, the path
/// is in the worker's own tmpfs, so the write succeeds there and the host's store
/// is untouched).
async fn module_store_attacks(a: &Arena, write_own: &str, plant: &str) {
    let own = a.attack("precompiled", "").await.unwrap();
    let own = PathBuf::from(own);
    assert!(
        own.starts_with(a.cache.path().join("wasm")) && own.extension().unwrap() == "cwasm",
        "{}",
        own.display()
    );
    a.expect("read", own.to_str().unwrap(), "ok").await;
    let module = std::fs::read(a._attacker.path().join("testkit.wat")).unwrap();
    let mut wrote = b"hostile artifact\n".to_vec();
    wrote.extend_from_slice(&module);
    a.expect("write", own.to_str().unwrap(), write_own).await;
    assert_eq!(
        std::fs::read(&own).unwrap(),
        wrote,
        "the stored module changed"
    );
    let store = own.parent().unwrap();
    let planted = store.join("0000.cwasm");
    a.expect("write", planted.to_str().unwrap(), plant).await;
    a.expect("list", store.to_str().unwrap(), plant).await;
    assert!(!planted.exists(), "a module planted in the host's store");
    assert_eq!(std::fs::read_dir(store).unwrap().count(), 1);
    // The neighbour's module has the same bytes: the same file, written once.
    assert_eq!(a.sup.workers().modules_compiled, 1);
}

/// The attacks whose outcome is the same at every level.
/// A stream and a datagram unix socket anyone may connect or send to, as D-Bus,
/// journald or a container runtime's are.
struct WorldSockets {
    dir: TempDir,
    stream: std::os::unix::net::UnixListener,
    dgram: std::os::unix::net::UnixDatagram,
}

impl WorldSockets {
    fn new() -> WorldSockets {
        use std::os::unix::fs::PermissionsExt;
        let dir = corral_integration_tests::open_tempdir();
        let stream =
            std::os::unix::net::UnixListener::bind(dir.path().join("stream.sock")).unwrap();
        let dgram = std::os::unix::net::UnixDatagram::bind(dir.path().join("dgram.sock")).unwrap();
        for name in ["stream.sock", "dgram.sock"] {
            std::fs::set_permissions(
                dir.path().join(name),
                std::fs::Permissions::from_mode(0o777),
            )
            .unwrap();
        }
        stream.set_nonblocking(true).unwrap();
        dgram.set_nonblocking(true).unwrap();
        WorldSockets { dir, stream, dgram }
    }

    fn stream_path(&self) -> String {
        self.dir.path().join("stream.sock").display().to_string()
    }

    fn dgram_path(&self) -> String {
        self.dir.path().join("dgram.sock").display().to_string()
    }

    fn assert_untouched(&self) {
        let would_block = |e: std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        assert!(
            self.stream.accept().is_err_and(would_block),
            "a connection arrived"
        );
        assert!(
            self.dgram.recv(&mut [0; 64]).is_err_and(would_block),
            "a datagram arrived"
        );
    }
}

async fn common_attacks(a: &Arena) {
    let neighbour_pid = {
        assert_eq!(
            a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
            b"ok"
        );
        a.pid("neighbour").await
    };
    // Its own plugin directory and its writable directory work.
    a.expect("read_own", "", "ok").await;
    let probe = a.writable().join("probe");
    a.expect("write", probe.to_str().unwrap(), "ok").await;
    module_store_attacks(a, "EACCES", "EACCES").await;

    // Filesystem: nothing else, whoever owns it.
    a.expect("read", "/etc/shadow", "EACCES").await;
    a.expect("read", "/proc/1/environ", "EACCES").await;
    a.expect(
        "read",
        &format!("/proc/{}/environ", std::process::id()),
        "EACCES",
    )
    .await;
    let other = a.neighbour.path().join("plugin.toml");
    a.expect("read", other.to_str().unwrap(), "EACCES").await;
    // ...nor plant a precompiled module in the neighbour's cache.
    let planted = a.cache.path().join("modules/neighbour/planted.cwasm");
    a.expect("write", planted.to_str().unwrap(), "EACCES").await;
    assert!(!planted.exists());
    a.expect("list", "/", "EACCES").await;
    let outside = std::env::temp_dir().join(format!("corral-escape-{}", std::process::id()));
    a.expect("write", outside.to_str().unwrap(), "EACCES").await;
    assert!(!outside.exists(), "file written outside the data dir");
    a.expect("write", "/etc/corral-pwned", "EACCES").await;
    a.expect("symlink_escape", a.writable().to_str().unwrap(), "EACCES")
        .await;
    a.expect("write", "/sys/fs/cgroup/cgroup.procs", "EACCES")
        .await;

    // Network: no sockets but AF_UNIX, so no TCP to the host.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    a.expect("connect", &addr, "EAFNOSUPPORT").await;
    a.expect("bind", "127.0.0.1:0", "EAFNOSUPPORT").await;
    a.expect("socket_inet", "", "EAFNOSUPPORT").await;

    // Abstract unix sockets: no unix socket can be made to reach one (behind that,
    // Landlock's scoping refuses one outside the worker's domain, and at `high` the
    // worker's own network namespace hides the name altogether).
    let name = format!("corral-test-{}", std::process::id());
    let abs = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    a.expect("abstract_connect", &name, "EAFNOSUPPORT").await;
    drop(abs);

    // Pathname unix sockets: no new socket at all (Landlock does not govern
    // connecting to one), so neither the supervisor's control socket nor a
    // world-writable stream or datagram socket of the host's is reachable, and
    // nothing arrives at them.
    let control_dir = corral_integration_tests::open_tempdir();
    let control = control_dir.path().join("run/control.sock");
    let _server = corral::control::ControlServer::bind(&control)
        .await
        .unwrap();
    a.expect("unix_connect", control.to_str().unwrap(), "EAFNOSUPPORT")
        .await;
    let world = WorldSockets::new();
    a.expect("unix_connect", &world.stream_path(), "EAFNOSUPPORT")
        .await;
    a.expect("unix_dgram", &world.dgram_path(), "EAFNOSUPPORT")
        .await;
    a.expect("unix_dgram_pair", &world.dgram_path(), "EAFNOSUPPORT")
        .await;
    world.assert_untouched();

    // IPC: a SysV segment one plugin makes is neither in the host's namespace nor
    // in a neighbour's (each worker has its own), and it goes with its worker.
    let key = 0x4000_0000 | (std::process::id() as libc::key_t & 0xffff);
    a.expect("shm_create", &key.to_string(), "ok").await;
    assert_eq!(
        a.sup
            .call(
                "neighbour",
                "shm_create",
                key.to_string().into_bytes(),
                None
            )
            .await
            .map(|b| String::from_utf8(b).unwrap()),
        Ok("ok".to_owned()),
        "the neighbour's IPC namespace is its own"
    );
    // SAFETY: shmget with integer arguments only (a lookup, nothing is created).
    let host = unsafe { libc::shmget(key, 0, 0) };
    assert_eq!(
        (host, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::ENOENT)),
        "not in the host's IPC namespace"
    );

    // No watching host directories (Landlock does not govern inotify).
    a.expect("inotify", "/etc", "EPERM").await;

    // Processes: a grandchild that leaves for a session of its own does not outlive
    // its worker, and the worker's group goes with them.
    let orphan: u32 = a
        .attack("orphan", "")
        .await
        .unwrap()
        .parse()
        .expect("the orphan's pid");
    assert!(
        !corral_integration_tests::process_gone(orphan),
        "the orphan runs"
    );
    let worker = a.pid("attacker").await;
    let group = corral_integration_tests::v1_cgroup(&worker.to_string(), "pids");
    assert!(group.exists(), "{}", group.display());
    // SAFETY: kill(2) of the worker this test's supervisor started, by pid.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    // (Polled without blocking: the supervisor's tasks run on this thread.)
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (group.exists() || !corral_integration_tests::process_gone(orphan))
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        corral_integration_tests::process_gone(orphan),
        "the orphan {orphan} outlived its worker"
    );
    assert!(!group.exists(), "{} left behind", group.display());
    a.expect("ok", "", "ok").await;

    // Signals: neither the supervisor nor a neighbour.
    a.expect("kill_parent", "", "EPERM").await;
    a.expect("kill_pid", &neighbour_pid.to_string(), "EPERM")
        .await;
    // Nor anything else a process may do to another of its own user: renice it (or
    // every process of the user), take its CPU limit to zero, pin it, idle it.
    for attack in [
        "renice_pid",
        "prlimit_pid",
        "affinity_pid",
        "sched_pid",
        "ioprio_pid",
    ] {
        a.expect(attack, &neighbour_pid.to_string(), "EPERM").await;
    }
    a.expect("renice_user", "", "EPERM").await;
    assert_untouched_by_neighbour(neighbour_pid);

    // Dangerous syscalls: the worker dies by SIGSYS and the call names the syscall.
    a.expect_seccomp("ptrace", "ptrace").await;
    a.expect_seccomp("mount", "mount").await;
    a.expect_seccomp("unshare", "unshare").await;
    a.expect_seccomp("bpf", "bpf").await;
    a.expect_seccomp("io_uring", "io_uring_setup").await;
    a.expect_seccomp("tiocsti", "ioctl").await;
    // x32 numbers trap too (on a kernel without x32 they would only be ENOSYS).
    a.expect_seccomp("x32_prctl", "x32 prctl").await;
    // clone3 is answered, not punished: runtimes fall back to clone.
    a.expect("clone3", "", "ENOSYS").await;

    // Resource bombs meet the plugin's cgroup (each worker gets a fresh group).
    let policy = a.sup.explain("attacker").unwrap();
    let limit = policy.worker_memory.value;
    assert_eq!(
        limit,
        (64 << 20) * 2 + (256 << 20),
        "derived from the test policy"
    );
    let pids = policy.pids.value;
    let bomb = |what: &'static str, unit: &'static str| async move {
        let out = a.attack(what, "").await.unwrap();
        let n: u64 = out
            .strip_prefix("EAGAIN after ")
            .and_then(|r| r.strip_suffix(unit))
            .unwrap_or_else(|| panic!("{what} not stopped: {out}"))
            .parse()
            .unwrap();
        assert!(n < pids, "{n}{unit}");
        assert!(n > 0, "{what}: the worker could not start a single one");
    };
    bomb("fork_bomb", " forks").await;
    assert_eq!(
        a.attack("alloc", &((limit >> 20) * 2).to_string()).await,
        Err(CallError::WorkerCrashed(ExitReason::OomKilled {
            limit_bytes: limit
        })),
        "memory bomb"
    );
    bomb("thread_bomb", " threads").await;
    fd_bomb(a).await;
    a.expect("ok", "", "ok").await;

    // The neighbour never noticed: same process, still answering.
    assert_eq!(
        a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    assert_eq!(a.pid("neighbour").await, neighbour_pid);
    let info = a.sup.list().await;
    let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
    assert_eq!(
        attacker.restarts, 9,
        "one restart per seccomp or OOM kill (x32 prctl among them), and the kill of \
         the orphan's worker"
    );
    assert_eq!(
        attacker.last_error.as_deref(),
        Some("worker crashed: OOM-killed at its memory limit of 384 MiB")
    );
}

/// The neighbour's scheduling and limits, from outside: what the attacks above tried
/// to change.
fn assert_untouched_by_neighbour(pid: u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name: state is field 3, nice field 19, policy field 41.
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[19 - 3], "0", "nice of {pid}");
    assert_eq!(fields[41 - 3], "0", "SCHED_OTHER for {pid}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let cpu = limits
        .lines()
        .find(|l| l.starts_with("Max cpu time"))
        .unwrap();
    assert!(cpu.contains("unlimited"), "{cpu}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned();
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    let ours = ours
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert_eq!(allowed, ours, "CPUs of {pid}");
}

/// The engine memory limit of a plugin whose manifest names none.
fn assert_enforced(report: &corral_protocol::EnforcementReport) {
    assert!(report.no_new_privs);
    match &report.cgroup {
        Enforcement::Full(what) => assert!(what.contains("memory 384 MiB, pids 64"), "{what}"),
        other => panic!("cgroup: {other}"),
    }
    match &report.landlock {
        Enforcement::Full(what) => assert!(what.contains("TCP bind/connect denied"), "{what}"),
        other => panic!("landlock: {other}"),
    }
    assert!(
        matches!(report.seccomp, Enforcement::Full(_)),
        "{}",
        report.seccomp
    );
    // The supervisor runs as root here; the worker does not, and holds no capability,
    // not even in its bounding set.
    assert_eq!((report.uid, report.gid), (65534, 65534), "runs as nobody");
    assert_eq!(report.cap_effective, 0);
    assert_eq!(report.cap_bounding, 0);
}

/// What the kernel says about the worker, from outside.
fn assert_unprivileged_from_outside(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        field("Uid:"),
        "65534 65534 65534 65534",
        "real, effective, saved, fs uid"
    );
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "", "no supplementary groups");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(field(set), "0000000000000000", "{set}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
}

#[tokio::test]
async fn standard_level_contains_a_hostile_native_worker() {
    let a = arena(Level::Standard);
    common_attacks(&a).await;
    assert_unprivileged_from_outside(a.pid("attacker").await);
    // At standard, exec of another program is refused by Landlock (nothing to execute).
    a.expect("exec", "/bin/true", "EACCES").await;
    let info = a.sup.list().await;
    let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
    assert_eq!(attacker.level, "standard");
    let report = attacker.enforcement.as_ref().unwrap();
    assert_enforced(report);
    assert_eq!(report.namespaces, Enforcement::Full("own ipc".into()));
    let base = corral_integration_tests::v1_cgroup("self", "pids")
        .join(format!("corral-{}", std::process::id()));
    assert!(base.exists(), "{} while plugins run", base.display());
    a.sup.shutdown(std::time::Duration::from_secs(1)).await;
    assert!(!base.exists(), "{} removed after shutdown", base.display());
}

#[tokio::test]
async fn high_level_adds_exec_denial_and_namespaces() {
    let a = arena(Level::High);
    common_attacks(&a).await;
    a.expect_seccomp("exec", "execve").await;
    a.sup.call("attacker", "ok", vec![], None).await.unwrap();
    let pid = a.pid("attacker").await;
    assert_unprivileged_from_outside(pid);
    let info = a.sup.list().await;
    let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
    assert_eq!(attacker.level, "high");
    let report = attacker.enforcement.as_ref().unwrap();
    assert_enforced(report);
    assert_eq!(
        report.namespaces,
        Enforcement::Full("own net, ipc, uts".into())
    );
    // Checked from outside too: the worker's network namespace is not ours.
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_ne!(ns(&pid.to_string()), ns("self"));
    a.sup.shutdown(std::time::Duration::from_secs(1)).await;
}

#[tokio::test]
async fn maximum_level_shows_a_minimal_read_only_world() {
    let a = arena(Level::Maximum);
    let neighbour_pid = {
        a.sup.call("neighbour", "ok", vec![], None).await.unwrap();
        a.pid("neighbour").await
    };
    // Its own files (the copy of its version) are there, read-only; /tmp is its own
    // small tmpfs, the only writable place; its module cache is visible but
    // read-only. The plugin directory the copy was made from is not there at all.
    a.expect("read_own", "", "ok").await;
    a.expect("write", "/tmp/scratch", "ok").await;
    let own_copy = corral_integration_tests::version_copy(a.cache.path(), a._attacker.path());
    a.expect(
        "write",
        own_copy.join("plugin.toml").to_str().unwrap(),
        "EROFS",
    )
    .await;
    let own_dir = a.sup.list().await;
    let own_dir = &own_dir.iter().find(|p| p.id == "attacker").unwrap().dir;
    a.expect("write", &format!("{own_dir}/plugin.toml"), "ENOENT")
        .await;
    a.expect(
        "write",
        a.writable().join("probe").to_str().unwrap(),
        "EROFS",
    )
    .await;
    module_store_attacks(&a, "EROFS", "ok").await;
    // Nothing else of the host exists in its view.
    a.expect("read", "/etc/shadow", "ENOENT").await;
    a.expect("read", "/proc/1/environ", "ENOENT").await;
    let other = a.neighbour.path().join("plugin.toml");
    a.expect("read", other.to_str().unwrap(), "ENOENT").await;
    let planted = a.cache.path().join("modules/neighbour/planted.cwasm");
    a.expect("write", planted.to_str().unwrap(), "ENOENT").await;
    a.expect("list", "/", "EACCES").await;
    a.expect("write", "/etc/corral-pwned", "ENOENT").await;
    a.expect("write", "/sys/fs/cgroup/cgroup.procs", "ENOENT")
        .await;
    let control_dir = corral_integration_tests::open_tempdir();
    let control = control_dir.path().join("run/control.sock");
    let _server = corral::control::ControlServer::bind(&control)
        .await
        .unwrap();
    // The Wasm engine never connects anywhere: connect(2) is not on its allow-list.
    assert_eq!(
        a.attack("unix_connect", control.to_str().unwrap()).await,
        Err(CallError::WorkerCrashed(ExitReason::Seccomp {
            syscall: "connect".into()
        }))
    );
    a.expect_seccomp("inotify", "inotify_init1").await;
    // Datagrams: a new unix socket finds no host socket in this view, and a
    // datagram pair (whose sendto may name any address) is refused.
    let world = WorldSockets::new();
    a.expect("unix_dgram", &world.dgram_path(), "ENOENT").await;
    a.expect("unix_dgram_pair", &world.dgram_path(), "EAFNOSUPPORT")
        .await;
    world.assert_untouched();
    // Network: no sockets but AF_UNIX, and its own network namespace.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    a.expect("connect", &addr, "EAFNOSUPPORT").await;
    a.expect("socket_inet", "", "EAFNOSUPPORT").await;
    let name = format!("corral-max-{}", std::process::id());
    let _abs = {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        std::os::unix::net::UnixListener::bind_addr(&addr).unwrap()
    };
    a.expect_seccomp("abstract_connect", "connect").await;
    // The engine's allow-list: anything it does not need kills the worker, and the
    // report names the syscall (signals, processes and exec included).
    for (attack, syscall) in [
        ("kill_parent", "kill"),
        ("ptrace", "ptrace"),
        ("mount", "mount"),
        ("unshare", "unshare"),
        ("bpf", "bpf"),
        ("io_uring", "io_uring_setup"),
        ("tiocsti", "ioctl"),
        ("exec", "execve"),
        ("fork_bomb", "clone"),
    ] {
        a.expect_seccomp(attack, syscall).await;
    }
    for (attack, syscall) in [
        ("kill_pid", "kill"),
        ("renice_pid", "setpriority"),
        ("renice_user", "setpriority"),
        ("affinity_pid", "sched_setaffinity"),
        ("sched_pid", "sched_setscheduler"),
        ("ioprio_pid", "ioprio_set"),
    ] {
        assert_eq!(
            a.attack(attack, &neighbour_pid.to_string()).await,
            Err(CallError::WorkerCrashed(ExitReason::Seccomp {
                syscall: syscall.into()
            })),
            "{attack}"
        );
    }
    // prlimit64 is on the list (for its own limits), another pid's are refused.
    a.expect("prlimit_pid", &neighbour_pid.to_string(), "EPERM")
        .await;
    assert_untouched_by_neighbour(neighbour_pid);
    a.expect("clone3", "", "ENOSYS").await;
    // Threads are allowed, up to the level's pids limit.
    let policy = a.sup.explain("attacker").unwrap();
    assert_eq!(policy.pids.value, 16, "the built-in maximum");
    let out = a.attack("thread_bomb", "").await.unwrap();
    let n: u64 = out
        .strip_prefix("EAGAIN after ")
        .and_then(|r| r.strip_suffix(" threads"))
        .unwrap_or_else(|| panic!("thread bomb not stopped: {out}"))
        .parse()
        .unwrap();
    assert!(n > 0 && n < 16, "{n} threads");
    fd_bomb(&a).await;
    let limit = policy.worker_memory.value;
    assert_eq!(
        a.attack("alloc", &((limit >> 20) * 2).to_string()).await,
        Err(CallError::WorkerCrashed(ExitReason::OomKilled {
            limit_bytes: limit
        })),
        "memory bomb"
    );

    a.expect("ok", "", "ok").await;
    let pid = a.pid("attacker").await;
    assert_unprivileged_from_outside(pid);
    let info = a.sup.list().await;
    let attacker = info.iter().find(|p| p.id == "attacker").unwrap();
    assert_eq!(attacker.level, "maximum");
    let report = attacker.enforcement.as_ref().unwrap();
    assert_eq!(
        report.namespaces,
        Enforcement::Full("own net, ipc, uts, pid, mnt, user".into())
    );
    assert!(
        matches!(&report.seccomp, Enforcement::Full(s) if s.starts_with("wasm allow-list: ")),
        "{}",
        report.seccomp
    );
    assert!(
        matches!(&report.landlock, Enforcement::Full(s) if s.ends_with("write: /tmp")),
        "{}",
        report.landlock
    );
    assert_eq!(
        (
            report.uid,
            report.gid,
            report.cap_effective,
            report.cap_bounding
        ),
        (65534, 65534, 0, 0)
    );
    // The neighbour never noticed.
    assert_eq!(
        a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    assert_eq!(a.pid("neighbour").await, neighbour_pid);
    a.sup.shutdown(std::time::Duration::from_secs(1)).await;
}

/// The real Wasm engine at maximum, under the shipped policy (which sends every
/// plugin it does not route to maximum): calls, traps and deadlines work in the
/// minimal view with the engine's allow-list.
#[tokio::test]
async fn unmatched_plugins_run_at_maximum_with_the_wasm_engine() {
    let cache = corral_integration_tests::open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = std::sync::Arc::new(corral::Policy::built_in());
    let mut sup = Supervisor::new(opts);
    let plugin = wat_plugin("stranger", "testkit.wat", "timeout = \"300ms\"");
    sup.add_plugin_dir(plugin.path()).unwrap();
    assert_eq!(sup.list().await[0].level, "maximum");
    assert_eq!(
        sup.call("stranger", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    let big = vec![7u8; 1 << 20];
    assert_eq!(
        sup.call("stranger", "echo", big.clone(), None)
            .await
            .unwrap(),
        big
    );
    assert!(matches!(
        sup.call("stranger", "trap", vec![], None).await,
        Err(CallError::Trap { .. })
    ));
    assert!(matches!(
        sup.call("stranger", "spin", vec![], None).await,
        Err(CallError::Timeout { .. })
    ));
    assert!(matches!(
        sup.call("stranger", "grow", vec![], None).await,
        Err(CallError::MemoryLimit { .. })
    ));
    assert_eq!(
        sup.call("stranger", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    let info = &sup.list().await[0];
    assert_eq!(info.restarts, 0, "{:?}", info.last_error);
    let report = info.enforcement.as_ref().unwrap();
    assert_eq!(
        report.namespaces,
        Enforcement::Full("own net, ipc, uts, pid, mnt, user".into())
    );
    sup.shutdown(std::time::Duration::from_secs(1)).await;
}

/// A Wasm plugin spinning on the CPU, with a fifth of a CPU and a 1 s deadline, at
/// every level: the cgroup quota throttles it (the kernel's own counters say so) and
/// the engine stops it at the deadline; the worker stays up and answers the next call.
#[tokio::test]
async fn cpu_spin_is_throttled_by_the_quota_and_stopped_at_the_deadline() {
    for level in ["standard", "high", "maximum"] {
        spin_at(level).await;
    }
}

async fn spin_at(level: &str) {
    let policy = corral::Policy::parse(&[(
        PathBuf::from("spin.toml"),
        format!("[[route]]\nlevel = \"{level}\"\nlimits = {{ cpu = 0.2, timeout = \"1s\" }}\n"),
    )])
    .unwrap();
    let cache = corral_integration_tests::open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = std::sync::Arc::new(policy);
    // The engine, not the supervisor's backstop, must stop the spin. With a fifth of
    // a CPU on a busy machine its watchdog thread waits its turn behind the spinning
    // one, so the backstop gets room enough never to be what ends the call.
    opts.kill_grace = std::time::Duration::from_secs(20);
    let mut sup = Supervisor::new(opts);
    let plugin = wat_plugin("spinner", "testkit.wat", "");
    sup.add_plugin_dir(plugin.path()).unwrap();
    assert_eq!(
        sup.call("spinner", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    let before = sup.list().await[0].resources.clone().unwrap();
    let started = std::time::Instant::now();
    match sup.call("spinner", "spin", vec![], None).await {
        Err(CallError::Timeout { .. }) => {}
        other => panic!("{level}: expected the deadline to stop the spin, got {other:?}"),
    }
    let wall = started.elapsed();
    assert!(
        wall >= std::time::Duration::from_secs(1),
        "{level}: {wall:?}"
    );
    let info = &sup.list().await[0];
    assert_eq!(info.level, level);
    let after = info
        .resources
        .clone()
        .unwrap_or_else(|| panic!("{level}: no worker after the deadline: {info:?}"));
    let cpu = after.cpu_usage_usec.unwrap() - before.cpu_usage_usec.unwrap();
    let throttled = after.cpu_throttled_periods.unwrap() - before.cpu_throttled_periods.unwrap();
    // 0.2 CPU for the call's wall time (about 1 s), give or take a 100 ms period;
    // unthrottled it would be all of it.
    let allowed = (wall.as_micros() as f64 * 0.2 * 1.5) as u64 + 100_000;
    assert!(
        cpu < allowed,
        "{level}: the spin used {cpu} us of CPU in {wall:?}: not throttled"
    );
    assert!(
        throttled >= 4,
        "{level}: only {throttled} throttled periods"
    );
    assert_eq!(
        sup.call("spinner", "ok", vec![], None).await.unwrap(),
        b"ok",
        "same worker answers after the deadline"
    );
    assert_eq!(sup.list().await[0].pid, info.pid);
    sup.shutdown(std::time::Duration::from_secs(1)).await;
}

/// WASI from the attacker's side, at every level: the engine gives a plugin no
/// preopened directory and no descriptor but the output pipes, so traversal,
/// absolute paths and symlinks all end in EBADF (8) before the kernel is asked. (The
/// native helper above proves the OS layer behind this.)
#[tokio::test]
async fn wasi_path_traversal_and_symlinks_find_no_directory() {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        let cache = corral_integration_tests::open_tempdir();
        let mut opts = options(cache.path());
        opts.policy =
            std::sync::Arc::new(corral_integration_tests::test_policy().with_level(level, "test"));
        let mut sup = Supervisor::new(opts);
        let plugin = wat_plugin("escapee", "wasi-escape.wat", "");
        sup.add_plugin_dir(plugin.path()).unwrap();
        for function in ["preopens", "traverse", "symlink"] {
            let out = sup.call("escapee", function, vec![], None).await;
            assert_eq!(out, Ok(b"8".to_vec()), "{level} {function}: errno");
        }
        // fd 3 of the process (the supervisor socket) is not a WASI descriptor, nor
        // is anything else above stdio: reading finds nothing but EBADF.
        assert_eq!(
            sup.call("escapee", "read_fds", vec![], None).await,
            Ok(b"8".to_vec()),
            "{level} read_fds"
        );
        assert_eq!(sup.list().await[0].level, level.as_str());
        sup.shutdown(std::time::Duration::from_secs(1)).await;
    }
}

/// The audit log's `protocol` lines so far.
fn protocol_lines(a: &Arena) -> Vec<serde_json::Value> {
    std::fs::read_to_string(a.cache.path().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["operation"] == "protocol")
        .collect()
}

/// A supervisor that cannot make cgroups (not root, no delegated subtree) still
/// takes the plugin's whole process tree down with the worker: the worker is pid 1
/// of a PID namespace of its own, and dies with the process the supervisor started.
/// A grandchild in a session of its own dies when that process is killed, the
/// plugin cannot reset its parent-death signal, and status names what enforces it.
#[tokio::test]
async fn without_a_cgroup_the_process_tree_still_dies_with_the_worker() {
    let workers = corral_integration_tests::hostile_worker_dir();
    let cache = corral_integration_tests::open_tempdir();
    let mut opts =
        corral_integration_tests::hostile_options(cache.path(), workers.path(), Level::Standard);
    opts.cgroups = None;
    let mut sup = Supervisor::new(opts);
    let attacker = wat_plugin("attacker", "testkit.wat", "");
    sup.add_plugin_dir(attacker.path()).unwrap();
    let call = |what: &'static str, arg: &'static str| {
        let sup = &sup;
        async move {
            sup.call("attacker", what, arg.as_bytes().to_vec(), None)
                .await
                .map(|b| String::from_utf8(b).unwrap())
        }
    };
    assert_eq!(call("ok", "").await, Ok("ok".into()));
    let info = sup.list().await.remove(0);
    let worker = info.pid.unwrap();
    let namespaces = info.enforcement.as_ref().unwrap().namespaces.to_string();
    assert!(namespaces.contains("pid"), "{namespaces}");
    assert!(
        info.supervision.iter().any(|l| l.starts_with(
            "process tree: no cgroup, so the worker is pid 1 of a PID namespace of its own"
        )),
        "{:#?}",
        info.supervision
    );
    let inner: u32 = call("orphan", "")
        .await
        .unwrap()
        .parse()
        .expect("the orphan's pid in its namespace");
    let tree = corral_integration_tests::descendants(worker);
    let orphan = *tree
        .iter()
        .find(|p| corral_integration_tests::ns_pids(**p).last() == Some(&inner))
        .unwrap_or_else(|| panic!("no descendant of {worker} is pid {inner} inside: {tree:?}"));
    assert_eq!(
        corral_integration_tests::ns_pids(orphan).len(),
        2,
        "the orphan is in a PID namespace below this one"
    );
    // prctl(PR_SET_PDEATHSIG, 0): refused by the seccomp filter.
    assert_eq!(call("reset_pdeathsig", "").await, Ok("EPERM".into()));
    // SAFETY: kill(2) of the worker this test's supervisor started, by pid.
    assert_eq!(unsafe { libc::kill(worker as i32, libc::SIGKILL) }, 0);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !tree
        .iter()
        .all(|p| corral_integration_tests::process_gone(*p))
        && std::time::Instant::now() < until
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let left: Vec<u32> = tree
        .iter()
        .copied()
        .filter(|p| !corral_integration_tests::process_gone(*p))
        .collect();
    assert!(left.is_empty(), "outlived their worker {worker}: {left:?}");
    // Once the supervisor has seen the worker go, a new one serves.
    while sup.list().await[0].pid == Some(worker) && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(call("ok", "").await, Ok("ok".into()));
    assert_ne!(sup.list().await[0].pid, Some(worker));
    // As pid 1 the worker ignores a SIGSYS it raises at itself: a call the filter
    // traps only for some arguments kills it all the same.
    assert_eq!(
        call("tiocsti", "").await,
        Err(CallError::WorkerCrashed(ExitReason::Seccomp {
            syscall: "ioctl".into()
        }))
    );
    sup.shutdown(std::time::Duration::from_secs(1)).await;
}

/// A worker that writes its own frames and output (any Python plugin with ctypes
/// can): floods of log frames (large, and tiny ones 64 KiB to a write) and of
/// stdout and stderr without newlines or UTF-8 cost the supervisor a few frames'
/// memory, not the flood's, and break nothing; a
/// forged answer, a frame claiming 60 MiB, a frame that does not decode and a host
/// call for a call that is not running and a flood of host calls that never reads
/// an answer each get the worker killed, audited as a
/// protocol violation naming the rule, and replaced; the neighbour answers
/// throughout, and the supervisor's peak memory stays within 16 MiB of where it
/// started.
#[tokio::test]
async fn a_worker_writing_its_own_frames_is_bounded_killed_and_replaced() {
    let a = arena(Level::Standard);
    a.expect("ok", "", "ok").await;
    let neighbour_ok = || async {
        assert_eq!(
            a.sup.call("neighbour", "ok", vec![], None).await.unwrap(),
            b"ok"
        );
    };
    neighbour_ok().await;
    let before = corral_integration_tests::vm_hwm();
    let grown = || {
        let g = corral_integration_tests::vm_hwm().saturating_sub(before);
        println!(
            "peak memory: {} MiB before, grew by {} KiB",
            before >> 20,
            g >> 10
        );
        g
    };
    a.expect("log_flood", "256", "ok").await;
    a.expect("output_flood", "64", "ok").await;
    // Tiny log frames as fast as it can write them: within the protocol, so
    // nothing is killed.
    a.expect("log_spin", "4", "ok").await;
    assert!(
        grown() < 16 << 20,
        "the supervisor's peak memory grew by {} MiB over a 256 MiB log flood and \
         64 MiB floods of stdout and stderr",
        grown() >> 20
    );
    neighbour_ok().await;
    let attacker = || async {
        let info = a.sup.list().await;
        info.into_iter().find(|p| p.id == "attacker").unwrap()
    };
    assert_eq!(attacker().await.restarts, 0);

    let violations = [
        (
            "forge_answer",
            format!("an answer to call {}, which is not running", u64::MAX - 1),
        ),
        (
            "huge_frame",
            "a CallResult frame of 62914560 bytes exceeds its limit of 2097152 bytes".into(),
        ),
        (
            "garbage_frame",
            "malformed message: invalid value: integer `9`, expected variant index 0 <= i < 5"
                .into(),
        ),
        (
            "unknown_call",
            format!(
                "host call 1 names call {}, which is not running",
                u64::MAX - 7
            ),
        ),
        (
            "host_flood",
            "5 answers to its host calls not read (host_calls 4)".into(),
        ),
    ];
    for (n, (attack, why)) in violations.iter().enumerate() {
        let pid = a.pid("attacker").await;
        assert_eq!(
            a.attack(attack, "").await,
            Err(CallError::WorkerCrashed(ExitReason::Protocol(why.clone()))),
            "{attack}"
        );
        assert!(
            corral_integration_tests::wait_gone(pid, std::time::Duration::from_secs(5)),
            "{attack}: the worker {pid} is still running"
        );
        neighbour_ok().await;
        a.expect("ok", "", "ok").await;
        assert_ne!(
            a.pid("attacker").await,
            pid,
            "{attack}: a new worker serves"
        );
        let info = attacker().await;
        assert_eq!(info.restarts, n as u32 + 1, "{attack}");
        assert_eq!(
            info.last_error.as_deref(),
            Some(format!("worker crashed: protocol violation: {why}").as_str()),
            "{attack}"
        );
        let lines = protocol_lines(&a);
        assert_eq!(lines.len(), n + 1, "{attack}: {lines:#?}");
        assert_eq!(lines[n]["decision"], "killed", "{attack}");
        assert_eq!(
            lines[n]["rule"],
            format!("protocol violation: {why}"),
            "{attack}"
        );
    }
    assert!(
        grown() < 16 << 20,
        "the supervisor's peak memory grew by {} MiB",
        grown() >> 20
    );
    a.sup.shutdown(std::time::Duration::from_secs(1)).await;
}

/// A compile helper that writes without end is stopped at the artefact's limit
/// (`RLIMIT_FSIZE`: EFBIG, at every level); the start fails saying so, nothing is
/// stored, and the neighbour still answers.
#[tokio::test]
async fn a_compile_helper_flooding_its_artefact_is_stopped_at_the_limit() {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        let a = arena(level);
        let flood = corral_integration_tests::open_tempdir();
        let module = ";; hostile-compile: flood\n(module)\n";
        std::fs::write(flood.path().join("flood.wat"), module).unwrap();
        std::fs::write(
            flood.path().join("plugin.toml"),
            "id = \"flood\"\nversion = \"1.0.0\"\nruntime = \"wasm\"\nentry = \"flood.wat\"\n",
        )
        .unwrap();
        let mut sup = a.sup;
        sup.add_plugin_dir(flood.path()).unwrap();
        let limit = (64u64 << 20) + 16 * module.len() as u64;
        match sup.call("flood", "ok", vec![], None).await {
            Err(CallError::StartFailed { reason, .. }) => assert!(
                reason.contains(&format!("flood stopped after {limit} bytes: EFBIG")),
                "{level}: {reason}"
            ),
            other => panic!("{level}: {other:?}"),
        }
        let stored: Vec<_> = std::fs::read_dir(a.cache.path().join("wasm"))
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .map(|f| f.unwrap().file_name())
            .collect();
        assert!(stored.is_empty(), "{level}: {stored:?}");
        assert_eq!(sup.workers().modules_compiled, 0);
        assert_eq!(
            sup.call("neighbour", "ok", vec![], None).await.unwrap(),
            b"ok"
        );
        assert_eq!(sup.workers().modules_compiled, 1, "{level}");
        sup.shutdown(std::time::Duration::from_secs(1)).await;
    }
}
