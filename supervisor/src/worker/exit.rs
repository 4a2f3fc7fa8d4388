//! How a worker ended, in words a person can act on: exit code, signal name, and a
//! death by SIGSYS turned into the seccomp violation it was.

use corral_protocol::ExitReason;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// What a seccomp death says when the worker's reporter could not run: the kernel
/// kills outright when SIGSYS is blocked, as it is while glibc spawns a process.
pub const UNREPORTED_SYSCALL: &str =
    "unreported syscall (SIGSYS arrived while signals were blocked, as around process spawning)";

/// A death by SIGSYS is a seccomp violation; the worker's reporter named the syscall.
pub(crate) fn explain_exit(exit: ExitReason, stderr: &str) -> ExitReason {
    match exit {
        ExitReason::Signal { signo, .. } if signo == libc::SIGSYS => ExitReason::Seccomp {
            syscall: corral_confine::violation_from_stderr(stderr)
                .unwrap_or_else(|| UNREPORTED_SYSCALL.into()),
        },
        other => other,
    }
}

/// Describe how a process ended.
pub fn exit_reason(status: ExitStatus) -> ExitReason {
    if let Some(code) = status.code() {
        ExitReason::Code(code)
    } else if let Some(signo) = status.signal() {
        ExitReason::Signal {
            signo,
            name: signal_name(signo),
        }
    } else {
        ExitReason::Unknown
    }
}

fn signal_name(signo: i32) -> String {
    let name = match signo {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {signo}"),
    };
    name.to_owned()
}
