//! Raw system calls for confinement, in one place.

use corral_protocol::Enforcement;
use std::io;

/// Prefix of the line the SIGSYS reporter writes to stderr.
pub const SIGSYS_PREFIX: &str = "corral-seccomp: ";

pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments; PR_SET_NO_NEW_PRIVS only affects this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn no_new_privs() -> bool {
    // SAFETY: read-only prctl query.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// The Landlock ABI version the kernel offers (`None` without Landlock).
pub fn landlock_kernel_abi() -> Option<i64> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only
    // returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v)
}

/// Become `uid`/`gid` for good: empty the capability bounding set (needs
/// CAP_SETPCAP, so first), clear supplementary groups, set real/effective/saved gid
/// and uid (leaving uid 0 clears the other capability sets), then restore the
/// parent-death signal and the dumpable flag, which a credential change clears, and
/// make sure the parent did not die meanwhile.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    for cap in 0..=last_capability() {
        // SAFETY: prctl with plain integers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: plain integer arguments; a null list with length 0 clears the groups.
    let dropped = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(gid, gid, gid) == 0
            && libc::setresuid(uid, uid, uid) == 0
            && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == 0
            // The uid change made the process non-dumpable, which hands its /proc
            // files to root; an exec as this user would have left it dumpable, and
            // level maximum must write its own uid_map. Core dumps stay off
            // (RLIMIT_CORE 0) and ptrace is denied by seccomp.
            && libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) == 0
    };
    if !dropped {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::other("the supervisor exited during start-up"));
    }
    Ok(())
}

/// The highest capability number this kernel knows.
pub fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// `capget`/`capset` argument layout, version 3 (two 32-bit halves per set).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// This process's effective capability set, from `capget` (no /proc needed); all
/// bits set if it cannot be read (assume the worst).
pub fn effective_capabilities() -> u64 {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills a version-3 header and two data structs, laid out above.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return u64::MAX;
    }
    u64::from(data[0].effective) | (u64::from(data[1].effective) << 32)
}

/// Empty this process's effective, permitted and inheritable capability sets.
pub fn clear_capabilities() -> io::Result<()> {
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, laid out above.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// This process's capability bounding set, from `PR_CAPBSET_READ`.
pub fn bounding_capabilities() -> u64 {
    (0..=last_capability().min(63))
        .filter(|&cap| {
            // SAFETY: prctl with plain integers.
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) != 0 }
        })
        .fold(0, |acc, cap| acc | (1 << cap))
}

pub fn gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}

/// Which namespaces this process does not share with its parent (the supervisor).
/// Read before Landlock restricts `/proc`.
pub fn namespaces_report() -> Enforcement {
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    namespaces_between("self", &parent.to_string())
}

/// The namespace files compared, by the name a report gives them. The PID
/// namespace is the one the process's children get (a worker at maximum is the
/// parent of the namespace's pid 1).
const NAMESPACES: [(&str, &str); 6] = [
    ("net", "net"),
    ("ipc", "ipc"),
    ("uts", "uts"),
    ("pid", "pid_for_children"),
    ("mnt", "mnt"),
    ("user", "user"),
];

type Links = [Option<std::path::PathBuf>; 6];

/// What process `p`'s namespace files name (`None`: unreadable).
fn namespace_links(p: &str) -> Links {
    NAMESPACES.map(|(_, file)| std::fs::read_link(format!("/proc/{p}/ns/{file}")).ok())
}

/// Which namespaces process `a` does not share with process `b` (`/proc/<x>/ns`
/// entries; a process running as another user can only see its own).
pub fn namespaces_between(a: &str, b: &str) -> Enforcement {
    apart(&namespace_links(a), &namespace_links(b))
}

/// Which namespaces process `pid` does not share with this one, whose own are
/// read once they could all be read: a supervisor never changes its namespaces
/// (a link that could not be read is read again next time, not kept).
pub fn namespaces_apart_from_self(pid: u32) -> Enforcement {
    static MINE: std::sync::OnceLock<Links> = std::sync::OnceLock::new();
    let theirs = namespace_links(&pid.to_string());
    if let Some(mine) = MINE.get() {
        return apart(&theirs, mine);
    }
    let mine = namespace_links("self");
    if mine.iter().all(Option::is_some) {
        let _ = MINE.set(mine.clone());
    }
    apart(&theirs, &mine)
}

fn apart(a: &Links, b: &Links) -> Enforcement {
    let own: Vec<&str> = NAMESPACES
        .iter()
        .zip(a.iter().zip(b))
        .filter(|(_, (mine, theirs))| mine.is_some() && theirs.is_some() && mine != theirs)
        .map(|((name, _), _)| *name)
        .collect();
    if own.is_empty() {
        Enforcement::None("shares all namespaces with the supervisor".into())
    } else {
        Enforcement::Full(format!("own {}", own.join(", ")))
    }
}

/// On SIGSYS (a seccomp trap), write `corral-seccomp: <syscall number>` to stderr and
/// die by SIGSYS, so the supervisor can name the syscall.
pub fn install_sigsys_reporter() -> io::Result<()> {
    // SAFETY: `sigaction` is given a zeroed struct with a valid handler address and
    // SA_SIGINFO; the handler below only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS. Its layout on 64-bit Linux:
    // three ints (signo, errno, code) padded to 16 bytes, then `_sigsys`: a pointer
    // (call address, 8 bytes) followed by the int `_syscall` at offset 24.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let mut buf = [0u8; 48];
    let prefix = SIGSYS_PREFIX.as_bytes();
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut len = prefix.len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut d = 0;
    loop {
        digits[d] = b'0' + (n % 10) as u8;
        d += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[len] = digits[d];
        len += 1;
    }
    buf[len] = b'\n';
    len += 1;
    // SAFETY: write(2), syscall(2) and raise(3) are async-signal-safe; `buf` is valid
    // for `len` bytes. SA_RESETHAND restored the default action. Making the same
    // forbidden call again (without arguments, so it cannot do anything) traps again,
    // and the kernel forces that SIGSYS with its default action: the process dies by
    // it even as pid 1 of its own PID namespace (level maximum), which ignores
    // signals it merely raises at itself. A call the filter only traps for some
    // arguments (ioctl TIOCSTI) may pass without them: `ptrace`, which every level's
    // filter traps whatever its arguments (an invalid request, should it run), then
    // forces the SIGSYS all the same. `raise` is the last resort.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::c_long::from(nr), 0, 0, 0, 0, 0, 0);
        libc::syscall(libc::SYS_ptrace, -1 as libc::c_long, 0, 0, 0);
        libc::raise(libc::SIGSYS);
    }
}
