//! A hostile native "engine" for the hostile-plugin suite: a real Corral worker (same
//! loop, same confinement from `CORRAL_CONFINE`) whose functions each try one escape
//! with raw system calls and answer with the outcome (`ok` or the errno name). A
//! seccomp violation kills it; the supervisor reports the syscall.
//!
//! The supervisor starts it in place of `corral-worker-wasm` (tests put it in a
//! worker directory under that name), so the OS layer is proven on its own, not only
//! the Wasm sandbox in front of it.

use corral_protocol::{CallError, FromWorker, LoadSpec, LogLevel, Runtime};
use corral_worker::{Engine, EngineInfo, Host, Instance, LoadError};
use std::process::ExitCode;
use std::time::Duration;

const ATTACKS: &[&str] = &[
    "precompiled",
    "read",
    "write",
    "read_own",
    "list",
    "symlink_escape",
    "connect",
    "bind",
    "socket_inet",
    "abstract_connect",
    "kill_parent",
    "kill_pid",
    "ptrace",
    "mount",
    "unshare",
    "bpf",
    "io_uring",
    "tiocsti",
    "clone3",
    "exec",
    "alloc",
    "fork_bomb",
    "thread_bomb",
    "unix_connect",
    "unix_dgram",
    "unix_dgram_pair",
    "shm_create",
    "orphan",
    "inotify",
    "fd_bomb",
    "forge_answer",
    "log_flood",
    "log_spin",
    "output_flood",
    "huge_frame",
    "garbage_frame",
    "unknown_call",
    "host_flood",
    "reset_pdeathsig",
    "x32_prctl",
    "renice_pid",
    "renice_user",
    "prlimit_pid",
    "affinity_pid",
    "sched_pid",
    "ioprio_pid",
    "ok",
];

/// The engine: it "loads" a plugin by checking its entry is readable.
struct HostileEngine;

/// The loaded "plugin": every attack, run in this process.
struct Hostile {
    plugin_dir: String,
    exports: Vec<String>,
    /// The precompiled module it was given, if any.
    precompiled: Option<String>,
}

fn errno_name(e: &std::io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::EAFNOSUPPORT) => "EAFNOSUPPORT",
        Some(libc::ECONNREFUSED) => "ECONNREFUSED",
        Some(libc::ENETUNREACH) => "ENETUNREACH",
        Some(libc::EROFS) => "EROFS",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::EFBIG) => "EFBIG",
        _ => return format!("{e}"),
    };
    name.to_owned()
}

fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => errno_name(&e),
    }
}

impl Hostile {
    fn attack(&self, function: &str, arg: &str, host: &Host) -> String {
        match function {
            "precompiled" => self.precompiled.clone().unwrap_or_else(|| "none".into()),
            "read" => outcome(std::fs::read(arg)),
            "write" => outcome(std::fs::write(arg, b"pwned")),
            "read_own" => outcome(std::fs::read_dir(&self.plugin_dir).map(|d| d.count())),
            "list" => outcome(std::fs::read_dir(arg).map(|d| d.count())),
            "symlink_escape" => {
                // A link inside a writable place pointing outside is still outside.
                let link = format!("{arg}/escape");
                let _ = std::os::unix::fs::symlink("/etc/shadow", &link);
                outcome(std::fs::read(&link))
            }
            "connect" => outcome(std::net::TcpStream::connect_timeout(
                &arg.parse().expect("socket address"),
                Duration::from_secs(2),
            )),
            "bind" => outcome(std::net::TcpListener::bind(arg)),
            "socket_inet" => outcome(sys::socket_inet()),
            "abstract_connect" => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(arg.as_bytes())
                    .expect("abstract name");
                outcome(std::os::unix::net::UnixStream::connect_addr(&addr))
            }
            "kill_parent" => outcome(sys::kill(sys::parent(), libc::SIGTERM)),
            "kill_pid" => outcome(sys::kill(arg.parse().expect("pid"), libc::SIGKILL)),
            // Same-uid calls on another process that no LSM hook of Landlock's sees:
            // each would starve, slow or kill a neighbour running as the same user.
            "renice_pid" => outcome(sys::int_call(
                libc::SYS_setpriority,
                &[libc::PRIO_PROCESS as i64, arg.parse().expect("pid"), 19],
            )),
            "renice_user" => {
                // SAFETY: getuid has no preconditions.
                let uid = unsafe { libc::getuid() };
                outcome(sys::int_call(
                    libc::SYS_setpriority,
                    &[libc::PRIO_USER as i64, i64::from(uid), 19],
                ))
            }
            "prlimit_pid" => outcome(sys::prlimit_cpu(arg.parse().expect("pid"))),
            "affinity_pid" => outcome(sys::affinity(arg.parse().expect("pid"))),
            "sched_pid" => outcome(sys::sched_idle(arg.parse().expect("pid"))),
            "ioprio_pid" => outcome(sys::int_call(
                libc::SYS_ioprio_set,
                // IOPRIO_WHO_PROCESS, the idle class (3 << 13).
                &[1, arg.parse().expect("pid"), 3 << 13],
            )),
            "ptrace" => outcome(sys::ptrace_attach(sys::parent())),
            "mount" => outcome(sys::mount_tmpfs("/tmp")),
            "unshare" => outcome(sys::unshare_user()),
            "bpf" => outcome(sys::raw(libc::SYS_bpf)),
            "io_uring" => outcome(sys::raw(libc::SYS_io_uring_setup)),
            "tiocsti" => outcome(sys::tiocsti()),
            "clone3" => outcome(sys::raw(libc::SYS_clone3)),
            "exec" => outcome(sys::exec(arg)),
            "alloc" => {
                // Touch `arg` MiB, one page at a time, and keep it.
                let mib: usize = arg.parse().expect("MiB");
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                for _ in 0..mib {
                    let mut chunk = vec![0u8; 1 << 20];
                    for page in chunk.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    hoard.push(chunk);
                }
                format!("allocated {} MiB", hoard.len())
            }
            "fork_bomb" => {
                let mut n = 0;
                let err = loop {
                    match sys::fork_sleeper() {
                        Ok(()) => n += 1,
                        Err(e) => break e,
                    }
                    if n >= 10_000 {
                        break std::io::Error::other("no limit");
                    }
                };
                format!("{} after {n} forks", errno_name(&err))
            }
            "thread_bomb" => {
                // Threads that park forever; the pids limit counts threads too.
                let mut n = 0;
                let err = loop {
                    let spawned = std::thread::Builder::new().stack_size(64 << 10).spawn(|| {
                        loop {
                            std::thread::park();
                        }
                    });
                    match spawned {
                        Ok(_) => n += 1,
                        Err(e) => break e,
                    }
                    if n >= 10_000 {
                        break std::io::Error::other("no limit");
                    }
                };
                format!("{} after {n} threads", errno_name(&err))
            }
            "unix_connect" => outcome(std::os::unix::net::UnixStream::connect(arg)),
            // A SysV shared memory segment under key `arg`, which must be new here.
            "shm_create" => outcome(sys::shm_create(arg.parse().expect("key"))),
            // Watch directory `arg` for activity (a side channel past Landlock).
            "inotify" => outcome(sys::inotify_watch(arg)),
            // A grandchild in a session of its own, reparented away from the worker:
            // answers its pid.
            "orphan" => match sys::orphan(arg) {
                Ok(pid) => pid.to_string(),
                Err(e) => errno_name(&e),
            },
            // A datagram to a pathname socket, from a new socket or from one end of a
            // datagram pair (an explicit address overrides the pair's peer).
            "unix_dgram" => outcome(
                std::os::unix::net::UnixDatagram::unbound()
                    .and_then(|s| s.send_to(b"corral", arg).map(drop)),
            ),
            "unix_dgram_pair" => outcome(
                std::os::unix::net::UnixDatagram::pair()
                    .and_then(|(s, _peer)| s.send_to(b"corral", arg).map(drop)),
            ),
            "fd_bomb" => {
                // Unix socket pairs (allowed at every level) until the table is full.
                let mut held = Vec::new();
                let err = loop {
                    match std::os::unix::net::UnixStream::pair() {
                        Ok(p) => held.push(p),
                        Err(e) => break e,
                    }
                    if held.len() >= 100_000 {
                        break std::io::Error::other("no limit");
                    }
                };
                format!("{} after {} descriptors", errno_name(&err), held.len() * 2)
            }
            // Frames written straight to the worker's socket (fd 3), as any plugin
            // with ctypes could: the supervisor must treat them as hostile input.
            "forge_answer" => {
                let forged = FromWorker::CallResult {
                    id: u64::MAX - 1,
                    result: Ok(b"forged".to_vec()),
                };
                let out = sys::write_frame(&forged);
                // The supervisor kills the worker; until then, nothing more is sent.
                std::thread::sleep(Duration::from_secs(30));
                out.map_or_else(|e| errno_name(&e), |()| "not killed".into())
            }
            "log_flood" => {
                // `arg` MiB of log lines of 64 KiB each (the longest a line may be),
                // as fast as the socket takes them.
                let mib: usize = arg.parse().expect("MiB");
                let message = "x".repeat(64 << 10);
                for _ in 0..mib * 16 {
                    let line = FromWorker::Log {
                        level: LogLevel::Info,
                        message: message.clone(),
                    };
                    if let Err(e) = sys::write_frame(&line) {
                        return errno_name(&e);
                    }
                }
                "ok".into()
            }
            "output_flood" => {
                // `arg` MiB to each of stdout and stderr: no newline anywhere, and
                // bytes that are not UTF-8.
                let mib: usize = arg.parse().expect("MiB");
                let chunk: Vec<u8> = (0..1 << 20)
                    .map(|i| [b'x', 0xff, 0xc3, b'y'][i % 4])
                    .collect();
                for _ in 0..mib {
                    for fd in [1, 2] {
                        if let Err(e) = sys::write_all(fd, &chunk) {
                            return errno_name(&e);
                        }
                    }
                }
                "ok".into()
            }
            "huge_frame" => {
                // A header claiming a 60 MiB result, and then a trickle: the
                // supervisor must not wait for (or make room for) the rest.
                let mut head = (60u32 << 20).to_le_bytes().to_vec();
                head.push(2); // CallResult
                let out = sys::write_all(3, &head).and_then(|()| sys::write_all(3, &[0; 100]));
                std::thread::sleep(Duration::from_secs(30));
                out.map_or_else(|e| errno_name(&e), |()| "not killed".into())
            }
            "garbage_frame" => {
                // A frame of a known kind whose body is not a message.
                let mut frame = 16u32.to_le_bytes().to_vec();
                frame.extend_from_slice(&[4, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
                frame.extend_from_slice(&[0xff; 8]);
                let out = sys::write_all(3, &frame);
                std::thread::sleep(Duration::from_secs(30));
                out.map_or_else(|e| errno_name(&e), |()| "not killed".into())
            }
            "unknown_call" => {
                // A host call on behalf of a call that is not running.
                let forged = FromWorker::HostCall {
                    id: 1,
                    call: u64::MAX - 7,
                    op: corral_protocol::HostOp::Now,
                };
                let out = sys::write_frame(&forged);
                std::thread::sleep(Duration::from_secs(30));
                out.map_or_else(|e| errno_name(&e), |()| "not killed".into())
            }
            "host_flood" => {
                // 4,096 host calls for the running call, in one write, never reading
                // an answer. Each `now` is answered at once, where it is read; once
                // the socket's buffer is full, answers wait in the supervisor, and
                // past host_calls + 1 of them the worker is killed.
                let call = host.current_call();
                let mut frames = Vec::new();
                for id in 1..=4096 {
                    let op = corral_protocol::HostOp::Now;
                    let frame = FromWorker::HostCall { id, call, op };
                    frames.extend(corral_protocol::frame::encode(&frame).expect("encodes"));
                }
                let out = sys::write_all(3, &frames);
                std::thread::sleep(Duration::from_secs(30));
                out.map_or_else(|e| errno_name(&e), |()| "not killed".into())
            }
            "log_spin" => {
                // `arg` MiB of empty log lines, a few bytes each, 64 KiB to a
                // write: frames the supervisor takes without I/O of its own (each
                // read from its buffer, most of them suppressed by the budget), as
                // many as the worker can write.
                let mib: usize = arg.parse().expect("MiB");
                let line = FromWorker::Log {
                    level: LogLevel::Trace,
                    message: String::new(),
                };
                let frame = corral_protocol::frame::encode(&line).expect("encodes");
                let chunk: Vec<u8> = frame.repeat((64 << 10) / frame.len());
                for _ in 0..mib * 16 {
                    if let Err(e) = sys::write_all(3, &chunk) {
                        return errno_name(&e);
                    }
                }
                "ok".into()
            }
            "x32_prctl" => {
                // prctl by its x32 number (the same architecture value, bit 30 set),
                // which a filter by name would never see.
                // SAFETY: prctl(PR_SET_PDEATHSIG, 0) with plain integers.
                let rc = unsafe {
                    libc::syscall(0x4000_0000 | libc::SYS_prctl, libc::PR_SET_PDEATHSIG, 0)
                };
                outcome(if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                })
            }
            "reset_pdeathsig" => {
                // Outlive the process the supervisor started: no parent-death signal.
                // SAFETY: prctl with plain integers.
                let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
                outcome(if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                })
            }
            "ok" => "ok".into(),
            other => format!("unknown attack {other}"),
        }
    }
}

/// The raw system calls the attacks make. None endangers memory safety (plain integer
/// arguments, or NUL-terminated strings that outlive the call); their effect on the
/// system is the point, and it is confined to this throwaway process.
mod sys {
    use std::ffi::CString;
    use std::io;

    /// A syscall with up to three integer arguments.
    pub fn int_call(nr: libc::c_long, args: &[i64]) -> io::Result<()> {
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        // SAFETY: every argument is a plain integer; none is a pointer.
        check(unsafe { libc::syscall(nr, a(0), a(1), a(2)) })
    }

    /// RLIMIT_CPU of `pid` to zero seconds (SIGKILL at its next tick).
    pub fn prlimit_cpu(pid: i32) -> io::Result<()> {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `zero` outlives the call; the old-limit pointer is null.
        check(unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                pid,
                libc::RLIMIT_CPU,
                &zero as *const libc::rlimit,
                std::ptr::null_mut::<libc::rlimit>(),
            )
        })
    }

    /// Pin `pid` to CPU 0.
    pub fn affinity(pid: i32) -> io::Result<()> {
        let mask: u64 = 1;
        // SAFETY: `mask` is 8 readable bytes for the length given.
        check(unsafe {
            libc::syscall(
                libc::SYS_sched_setaffinity,
                pid,
                std::mem::size_of::<u64>(),
                &mask as *const u64,
            )
        })
    }

    /// Move `pid` to SCHED_IDLE.
    pub fn sched_idle(pid: i32) -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` outlives the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_sched_setscheduler,
                pid,
                libc::SCHED_IDLE,
                &param as *const libc::sched_param,
            )
        })
    }

    fn check(ret: libc::c_long) -> io::Result<()> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    /// Write one frame to the worker's socket (fd 3), past the worker library.
    pub fn write_frame(msg: &corral_protocol::FromWorker) -> io::Result<()> {
        let frame = corral_protocol::frame::encode(msg).map_err(io::Error::other)?;
        write_all(3, &frame)
    }

    /// Write `bytes` to `fd` (the socket, stdout or stderr), which stays open.
    pub fn write_all(fd: i32, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: fds 1 to 3 are open for the life of the process; the `File` is
        // never dropped, so the descriptor is not closed here.
        let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
        f.write_all(bytes)
    }

    pub fn parent() -> libc::pid_t {
        // SAFETY: getppid cannot fail and takes no arguments.
        unsafe { libc::getppid() }
    }

    pub fn inotify_watch(path: &str) -> io::Result<()> {
        // SAFETY: integer arguments only; the descriptor is leaked on purpose.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        check(fd.into())?;
        let path = c(path);
        // SAFETY: a NUL-terminated path that outlives the call.
        check(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_ALL_EVENTS) }.into())
    }

    pub fn shm_create(key: libc::key_t) -> io::Result<()> {
        // SAFETY: integer arguments only; the segment is left for others to find.
        check(unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o666) }.into())
    }

    pub fn socket_inet() -> io::Result<()> {
        // SAFETY: integer arguments only; a returned fd is leaked on purpose.
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) }.into())
    }

    pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: integer arguments only.
        check(unsafe { libc::kill(pid, sig) }.into())
    }

    pub fn ptrace_attach(pid: libc::pid_t) -> io::Result<()> {
        // SAFETY: PTRACE_ATTACH dereferences nothing (addr and data are 0).
        check(unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) })
    }

    pub fn mount_tmpfs(target: &str) -> io::Result<()> {
        let (src, dst, fs) = (c("none"), c(target), c("tmpfs"));
        // SAFETY: NUL-terminated strings that outlive the call; no data argument.
        let ret =
            unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        check(ret.into())
    }

    pub fn unshare_user() -> io::Result<()> {
        // SAFETY: integer flags only.
        check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into())
    }

    /// A syscall by number with all arguments 0; the kernel validates them.
    pub fn raw(nr: libc::c_long) -> io::Result<()> {
        // SAFETY: all arguments are 0 (NULL pointers are rejected by the kernel).
        check(unsafe { libc::syscall(nr, 0, 0, 0) })
    }

    pub fn tiocsti() -> io::Result<()> {
        let ch = b'x';
        // SAFETY: TIOCSTI reads one byte through a pointer to a live local.
        check(unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) }.into())
    }

    /// Fork a child that sleeps until its parent (this worker) dies.
    /// A grandchild in a session of its own that pauses forever; named `name` (its
    /// `comm`, at most 15 bytes) when that is not empty, so a test can find it.
    pub fn orphan(name: &str) -> io::Result<libc::pid_t> {
        let name = c(name);
        let mut fds = [0; 2];
        // SAFETY: a valid two-element array for pipe(2).
        check(unsafe { libc::pipe(fds.as_mut_ptr()) }.into())?;
        // SAFETY: the worker is single-threaded while serving a call; the children
        // only make async-signal-safe calls (setsid, fork, getpid, write, pause,
        // _exit).
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(io::Error::last_os_error());
        }
        if child == 0 {
            // SAFETY: as above, in the child and the grandchild.
            unsafe {
                libc::setsid();
                if libc::fork() == 0 {
                    if !name.as_bytes().is_empty() {
                        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
                    }
                    let me = libc::getpid().to_ne_bytes();
                    libc::write(fds[1], me.as_ptr().cast(), me.len());
                    loop {
                        libc::pause();
                    }
                }
                libc::_exit(0);
            }
        }
        let mut status = 0;
        let mut pid = [0u8; 4];
        // SAFETY: waiting for our own child; reading 4 bytes into a 4-byte buffer.
        let n = unsafe {
            libc::waitpid(child, &mut status, 0);
            libc::close(fds[1]);
            let n = libc::read(fds[0], pid.as_mut_ptr().cast(), pid.len());
            libc::close(fds[0]);
            n
        };
        if n != 4 {
            return Err(io::Error::other("the grandchild did not report"));
        }
        Ok(libc::pid_t::from_ne_bytes(pid))
    }

    pub fn fork_sleeper() -> io::Result<()> {
        // SAFETY: the worker is single-threaded while serving a call; the child only
        // makes async-signal-safe calls (prctl, pause, _exit) before it dies.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: as above, in the child.
            unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                loop {
                    libc::pause();
                }
            }
        }
        Ok(())
    }

    pub fn exec(program: &str) -> io::Result<()> {
        let prog = c(program);
        let argv = [prog.as_ptr(), std::ptr::null()];
        // SAFETY: `prog` and the NULL-terminated `argv` outlive the call.
        check(unsafe { libc::execv(prog.as_ptr(), argv.as_ptr()) }.into())
    }
}

impl Engine for HostileEngine {
    type Instance = Hostile;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: Runtime::Wasm,
            version: "hostile 1".into(),
        }
    }

    fn instantiate(&mut self, spec: &LoadSpec, _host: &Host) -> Result<Hostile, LoadError> {
        // The plugin directory must stay readable under confinement.
        let entry = std::path::Path::new(&spec.plugin_dir).join(&spec.entry);
        std::fs::read(&entry).map_err(|source| LoadError::Read {
            path: entry.display().to_string(),
            source,
        })?;
        let mut exports: Vec<String> = ATTACKS.iter().map(|s| s.to_string()).collect();
        exports.sort();
        let precompiled = match &spec.code {
            corral_protocol::Code::Precompiled(p) => Some(p.clone()),
            _ => None,
        };
        Ok(Hostile {
            plugin_dir: spec.plugin_dir.clone(),
            exports,
            precompiled,
        })
    }

    /// A compile helper gone bad: it writes `hostile artifact` and the module, or,
    /// for a module saying `hostile-compile: flood`, writes until it is stopped and
    /// says how far it got and why.
    fn precompile(&mut self, spec: &LoadSpec, out: &mut std::fs::File) -> Result<(), LoadError> {
        use std::io::Write;
        let entry = std::path::Path::new(&spec.plugin_dir).join(&spec.entry);
        let bytes = std::fs::read(&entry).map_err(|source| LoadError::Read {
            path: entry.display().to_string(),
            source,
        })?;
        if bytes.windows(22).any(|w| w == b"hostile-compile: flood") {
            let chunk = vec![0x90u8; 1 << 20];
            let mut written = 0u64;
            let err = loop {
                match out.write(&chunk) {
                    Ok(n) => written += n as u64,
                    Err(e) => break e,
                }
                if written > 8 << 30 {
                    break std::io::Error::other("never stopped");
                }
            };
            return Err(LoadError::Engine(format!(
                "flood stopped after {written} bytes: {}",
                errno_name(&err)
            )));
        }
        out.write_all(b"hostile artifact\n")
            .and_then(|()| out.write_all(&bytes))
            .map_err(|e| LoadError::Engine(errno_name(&e)))
    }
}

impl Instance for Hostile {
    fn exports(&self) -> &[String] {
        &self.exports
    }

    fn call(
        &mut self,
        function: &str,
        input: &[u8],
        _: Duration,
        host: &Host,
    ) -> Result<Vec<u8>, CallError> {
        let arg = String::from_utf8_lossy(input);
        Ok(self.attack(function, &arg, host).into_bytes())
    }
}

fn main() -> ExitCode {
    corral_worker::run(HostileEngine)
}
