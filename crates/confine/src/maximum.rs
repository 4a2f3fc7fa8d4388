//! Level `maximum`: the worker enters its own user, mount and PID namespaces and
//! sees a minimal read-only filesystem: the plugin's directory and module cache
//! (read-only, at their usual paths), four device nodes, and a small tmpfs at `/tmp`
//! as the only writable place. Nothing else of the host exists in its view.
//!
//! Runs first thing in the worker, while it is single-threaded (a multi-threaded
//! process cannot create a user namespace), before the engine is set up. The worker
//! is already unprivileged (the supervisor switched uid before exec); the new user
//! namespace maps that one uid and gid to themselves, which an unprivileged process
//! may do, and gives it the capabilities to build the view inside its own namespaces
//! only. Those capabilities are dropped before any plugin code runs.
//!
//! The PID namespace applies to children, so the worker forks once: the child is
//! pid 1 of the new namespace and goes on to serve; the parent (outside) only waits
//! and exits the same way the child did, so the supervisor sees one process whose
//! exit status (code, SIGSYS, OOM SIGKILL) is the real one.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

/// `/proc/sys/kernel/cap_last_cap`, read while /proc is still visible.
static LAST_CAP: OnceLock<u32> = OnceLock::new();
use std::path::{Path, PathBuf};

/// The device nodes bound into the view.
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// Where the new root is assembled (a private mount in the worker's own namespace).
const STAGING: &str = "/tmp";

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in path"))
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("no NUL"));
    let data = data.map(|d| CString::new(d).expect("no NUL"));
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    check(rc, &format!("mount {}", target.display()))
}

/// The mount flags the kernel locks on a mount inherited into a user namespace
/// (a read-only remount must keep them).
fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let c = cstr(path)?;
    // SAFETY: statvfs writes into the zeroed struct; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, "statvfs")?;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

fn write_file(path: &str, text: &str) -> io::Result<()> {
    std::fs::write(path, text).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// Bind `fd` (an `O_PATH` handle on a host path) read-only at `target`.
fn bind_readonly(fd: &OwnedFd, target: &Path) -> io::Result<()> {
    let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount(Some(&via), target, None, libc::MS_BIND | libc::MS_REC, None)?;
    let keep = locked_flags(&via)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | keep,
        None,
    )
}

/// Where [`enter`] builds the worker's view from.
#[derive(Debug, Clone)]
pub enum View {
    /// [`prestage`] assembled the whole view at the staging directory, as root.
    Staged,
    /// Host paths to bind from the worker itself (a supervisor that is not root,
    /// so nothing was prestaged), the directories to hide in them and the size of
    /// the writable `/tmp`.
    Paths {
        visible: Vec<PathBuf>,
        hide: Vec<PathBuf>,
        tmpfs_bytes: u64,
    },
}

/// Run as root, before dropping privileges: in a mount namespace of its own
/// (owned by the host's user namespace, so the worker can never change it),
/// assemble the worker's whole view at `/tmp`, whose parents are world-traversable:
/// each of `visible` bound read-only at `/tmp/<path>`, the device nodes, the
/// writable tmpfs (`tmpfs_bytes`, owned by `owner`, the uid and gid the worker
/// drops to) and an empty tmpfs on each of `hide`. The unprivileged worker can then
/// show a tree its user cannot reach on the host, such as an interpreter's standard
/// library under a 0700 `/root`, and nothing else of what lies on that path; and
/// [`enter`] takes the view with one recursive bind instead of a mount per path.
pub fn prestage(
    visible: &[PathBuf],
    hide: &[PathBuf],
    tmpfs_bytes: u64,
    owner: [u32; 2],
) -> io::Result<View> {
    // SAFETY: unshare takes plain flags.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(rc, "unshare(mount) as root")?;
    make_mounts_private()?;
    // Handles on everything to show, before the staging tmpfs hides any.
    let mut sources = Vec::new();
    for p in visible {
        sources.push((p.clone(), open_path(p)?, p.is_dir()));
    }
    let mut devices = Vec::new();
    for d in DEVICES {
        devices.push((Path::new(d), open_path(Path::new(d))?));
    }
    let root = Path::new(STAGING);
    mount(
        Some(Path::new("corral-prestage")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=1m,mode=0755"),
    )?;
    let tmp = writable_tmp(root, tmpfs_bytes, Some(owner))?;
    let [uid, gid] = owner;
    for (host, fd, is_dir) in &sources {
        let target = root.join(host.strip_prefix("/").unwrap_or(host));
        if let Some(parent) = target.parent().filter(|p| p.starts_with(&tmp)) {
            // The directories made in the worker's own /tmp are its own, as if it
            // had made them itself: made with its ids as the filesystem's (which
            // needs CAP_SETUID, as the drop to them does, and not CAP_CHOWN).
            as_filesystem_user(uid, gid, || std::fs::create_dir_all(parent))?;
        }
        make_mount_point(&target, *is_dir)?;
        // Read-only at once: nothing done as root below may write through it.
        bind_readonly(fd, &target)?;
    }
    for (dev, fd) in &devices {
        let target = root.join(dev.strip_prefix("/").unwrap_or(dev));
        make_mount_point(&target, false)?;
        // Device nodes stay usable (no MS_NODEV on these binds).
        let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(Some(&via), &target, None, libc::MS_BIND, None)?;
    }
    hide_under(root, hide)?;
    Ok(View::Staged)
}

/// The writable tmpfs at `<root>/tmp` (`owner`: the uid and gid its root directory
/// belongs to, else the caller's), made first: shown paths under /tmp are bound on
/// top of it. Its path.
fn writable_tmp(root: &Path, tmpfs_bytes: u64, owner: Option<[u32; 2]>) -> io::Result<PathBuf> {
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    let mut data = format!("size={tmpfs_bytes},mode=0700");
    if let Some([uid, gid]) = owner {
        data.push_str(&format!(",uid={uid},gid={gid}"));
    }
    mount(
        Some(Path::new("corral-tmp")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(&data),
    )?;
    Ok(tmp)
}

/// Run `f` with `uid` and `gid` as the filesystem ids of this (single-threaded)
/// process, then as its effective ids again.
fn as_filesystem_user<T>(uid: u32, gid: u32, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    // SAFETY: geteuid/getegid cannot fail; setfsgid/setfsuid change this thread's
    // filesystem ids only.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: as above.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    let r = f();
    // SAFETY: as above; back to the effective ids, which did not change.
    unsafe {
        libc::setfsuid(euid);
        libc::setfsgid(egid);
    }
    r
}

/// Hidden directories inside shown trees: an empty read-only tmpfs on each, in the
/// view assembled at `root`.
fn hide_under(root: &Path, hide: &[PathBuf]) -> io::Result<()> {
    for h in hide {
        let target = root.join(h.strip_prefix("/").unwrap_or(h));
        if target.is_dir() {
            mount(
                Some(Path::new("corral-hidden")),
                &target,
                Some("tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some("size=4k,mode=0555"),
            )?;
        }
    }
    Ok(())
}

/// In a new mount namespace: make every mount private, so nothing done here
/// propagates back to the host.
fn make_mounts_private() -> io::Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
}

/// An `O_PATH` handle on `p`.
fn open_path(p: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
    Ok(OwnedFd::from(f))
}

/// A directory, or an empty file, to mount on.
/// The paths to show, each once, leaving out those inside a directory shown
/// anyway (the same library can be the plugin's and the engine's; the engine's
/// extension modules lie inside its standard library). Order is kept otherwise.
pub fn distinct_mounts(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = paths.iter().filter(|p| p.is_dir()).cloned().collect();
    let mut seen = std::collections::HashSet::new();
    paths
        .into_iter()
        .filter(|p| !dirs.iter().any(|d| p != d && p.starts_with(d)))
        .filter(|p| seen.insert(p.clone()))
        .collect()
}

/// Make an empty mount point at `target` in the staging tmpfs. A file is created
/// only if nothing is there: `target` must never be opened for writing if it is
/// already a bound host file (as root, truncating it would truncate the host's).
fn make_mount_point(target: &Path, is_dir: bool) -> io::Result<()> {
    if is_dir {
        return std::fs::create_dir_all(target);
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("mount point {}: {e}", target.display())))
}

/// Enter the maximum-level namespaces and filesystem view; returns in the child
/// (pid 1 of the new PID namespace) with `view` as its filesystem.
pub fn enter(view: &View) -> io::Result<()> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    LAST_CAP.get_or_init(crate::sys::last_capability);
    // Both the waiting parent and the serving child: no privilege gain by exec.
    crate::sys::set_no_new_privs()?;
    // The mount namespace `prestage` made goes when its last reference does, and the
    // kernel then waits for an (expedited) RCU grace period, which starts made side
    // by side take turns for. Held here, it is let go by the waiting parent when the
    // worker ends, not by the `unshare` below on the way to serving. The serving
    // child closes its copy first thing (`fork_into_pid_namespace_holding`).
    let prestaged = std::fs::File::open("/proc/self/ns/mnt")
        .map(OwnedFd::from)
        .map_err(|e| io::Error::new(e.kind(), format!("/proc/self/ns/mnt: {e}")))?;
    // SAFETY: unshare takes plain flags.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID) };
    check(rc, "unshare(user, mount, pid)")?;
    write_file("/proc/self/setgroups", "deny")?;
    write_file("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
    write_file("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;

    make_mounts_private()?;
    let root = Path::new(STAGING);
    match view {
        // The prestaged tree came into this namespace locked (its mounts cannot be
        // taken apart from here). A recursive bind of it is a mount of this
        // namespace, which `pivot_root` takes as the new root.
        View::Staged => mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)?,
        View::Paths {
            visible,
            hide,
            tmpfs_bytes,
        } => build_view(root, visible, hide, *tmpfs_bytes)?,
    }
    // Make the staging tree the root and drop the host's.
    std::env::set_current_dir(root)?;
    let dot = CString::new(".").expect("no NUL");
    // SAFETY: pivot_root with two NUL-terminated paths.
    let rc =
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int };
    check(rc, "pivot_root")?;
    // SAFETY: umount2 with a NUL-terminated path.
    let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
    check(rc, "detach the host root")?;
    std::env::set_current_dir("/")?;
    let keep = locked_flags(Path::new("/"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | keep,
        None,
    )?;

    fork_into_pid_namespace_holding(Some(prestaged))
}

/// The view of a worker nothing was prestaged for, at `root` in its own mount
/// namespace: a tmpfs, the writable tmpfs at `tmp`, each of `visible` bound
/// read-only, the device nodes and the hidden directories.
fn build_view(
    root: &Path,
    visible: &[PathBuf],
    hide: &[PathBuf],
    tmpfs_bytes: u64,
) -> io::Result<()> {
    // Handles on everything to show: taken in the new mount namespace (a bind source
    // must be a mount of the caller's namespace), before the staging tmpfs hides any.
    let mut sources = Vec::new();
    let devices = DEVICES.iter().map(Path::new);
    for p in visible.iter().map(PathBuf::as_path).chain(devices) {
        sources.push((p.to_owned(), open_path(p)?, p.is_dir()));
    }
    mount(
        Some(Path::new("corral-root")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("size=1m,mode=0755"),
    )?;
    writable_tmp(root, tmpfs_bytes, None)?;
    for (host, fd, is_dir) in &sources {
        let target = root.join(host.strip_prefix("/").unwrap_or(host));
        make_mount_point(&target, *is_dir)?;
        if host.starts_with("/dev") {
            // Device nodes stay usable (no MS_NODEV on these binds).
            let via = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            mount(Some(&via), &target, None, libc::MS_BIND, None)?;
        } else {
            bind_readonly(fd, &target)?;
        }
    }
    drop(sources);
    hide_under(root, hide)
}

/// A PID namespace for the children of this process (`with_user`: inside a user
/// namespace of its own, which an unprivileged process needs; its uid and gid map
/// to themselves). [`fork_into_pid_namespace`] follows. `Ok(Some(why))`: the kernel
/// refuses the namespace here (user namespaces turned off, say), and nothing changed.
pub fn unshare_pids(with_user: bool) -> io::Result<Option<io::Error>> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    LAST_CAP.get_or_init(crate::sys::last_capability);
    crate::sys::set_no_new_privs()?;
    let flags = if with_user {
        libc::CLONE_NEWUSER | libc::CLONE_NEWPID
    } else {
        libc::CLONE_NEWPID
    };
    // SAFETY: unshare takes plain flags.
    if unsafe { libc::unshare(flags) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS | libc::ENOSYS) => {
                Ok(Some(e))
            }
            _ => Err(io::Error::new(e.kind(), format!("unshare(pid): {e}"))),
        };
    }
    if with_user {
        OWN_USER_NAMESPACE.store(true, std::sync::atomic::Ordering::SeqCst);
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_file("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    Ok(None)
}

/// Whether [`unshare_pids`] made a user namespace, whose capabilities
/// `SelfConfinement::apply` then drops.
pub static OWN_USER_NAMESPACE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Fork; the child (pid 1 of the new namespace) returns, the parent waits for it and
/// exits the same way. The child dies with the parent (`PR_SET_PDEATHSIG`, which the
/// seccomp filters keep the plugin from resetting), and every process in the
/// namespace dies with the child.
pub fn fork_into_pid_namespace() -> io::Result<()> {
    fork_into_pid_namespace_holding(None)
}

/// [`fork_into_pid_namespace`]; `held` stays open in the waiting parent only (the
/// child closes it before anything else) until the worker has ended.
fn fork_into_pid_namespace_holding(held: Option<OwnedFd>) -> io::Result<()> {
    let held = held.map(std::os::fd::IntoRawFd::into_raw_fd);
    // The child goes on only once the parent has given up its capabilities (the
    // supervisor checks the parent's from /proc at the handshake) and only while
    // the parent lives: its end of the pipe closes when it exits.
    let mut ready = [0; 2];
    // SAFETY: a valid two-element array for pipe2(2).
    let rc = unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "pipe2")?;
    // SAFETY: the process is single-threaded here (see the module docs), so the child
    // may continue with any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let mut byte = [0u8; 1];
        // SAFETY: prctl with plain integers; close and read on the pipe's own ends
        // into a one-byte buffer.
        let n = unsafe {
            if let Some(fd) = held {
                libc::close(fd);
            }
            libc::close(ready[1]);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            let n = loop {
                let n = libc::read(ready[0], byte.as_mut_ptr().cast(), 1);
                if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break n;
                }
            };
            libc::close(ready[0]);
            n
        };
        if n != 1 {
            // The parent is gone (before the death signal was set, perhaps).
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(71) };
        }
        return Ok(());
    }
    // The parent only waits: it gives up the capabilities of the new user namespace
    // (best effort: it runs no untrusted code) and keeps nothing open: the socket
    // and pipes belong to the child.
    let _ = drop_capabilities();
    // SAFETY: write one byte from a live buffer to the pipe's write end.
    unsafe { libc::write(ready[1], [1u8].as_ptr().cast(), 1) };
    // SAFETY: close_range with plain integers; nothing below uses a descriptor but
    // `held`, which only stays open.
    unsafe {
        match held.map(|fd| fd as u32) {
            Some(fd) => {
                if fd > 0 {
                    libc::syscall(libc::SYS_close_range, 0u32, fd - 1, 0u32);
                }
                libc::syscall(libc::SYS_close_range, fd + 1, u32::MAX, 0u32);
            }
            None => {
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            }
        }
    };
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(71) };
        }
    }
    // SAFETY: plain libc calls on this process; `_exit` does not return.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status));
    }
}

/// Drop every capability the user namespace gave (bounding set, then the
/// effective, permitted and inheritable sets).
pub fn drop_capabilities() -> io::Result<()> {
    let last = *LAST_CAP.get_or_init(crate::sys::last_capability);
    for cap in 0..=last {
        // SAFETY: prctl with plain integers.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        check(rc, "drop the capability bounding set")?;
    }
    crate::sys::clear_capabilities().map_err(|e| io::Error::new(e.kind(), format!("capset: {e}")))
}
