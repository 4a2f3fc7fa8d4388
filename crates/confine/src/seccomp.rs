//! Seccomp filters as data (`seccomp/<level>.json`, seccompiler's JSON format with a
//! `comment` giving the reason for every rule), and the names of the syscalls they
//! deny, for reporting violations.

use crate::{ConfineError, Level};
use corral_protocol::{Enforcement, Runtime};
use seccompiler::TargetArch;
use std::sync::{Arc, Mutex};

const STANDARD: &str = include_str!("../seccomp/standard.json");
const HIGH: &str = include_str!("../seccomp/high.json");
const MAXIMUM_WASM: &str = include_str!("../seccomp/maximum-wasm.json");
const MAXIMUM_JS: &str = include_str!("../seccomp/maximum-js.json");
const MAXIMUM_PYTHON: &str = include_str!("../seccomp/maximum-python.json");
const MAXIMUM_NATIVE: &str = include_str!("../seccomp/maximum-native.json");

/// The filter file for `level` and `runtime`: deny-lists at standard and high (the
/// same for every engine); at maximum, the engine's own allow-list.
pub fn filter_source(level: Level, runtime: Runtime) -> &'static str {
    match (level, runtime) {
        (Level::Standard, _) => STANDARD,
        (Level::High, _) => HIGH,
        (Level::Maximum, Runtime::Wasm) => MAXIMUM_WASM,
        (Level::Maximum, Runtime::Js) => MAXIMUM_JS,
        (Level::Maximum, Runtime::Python) => MAXIMUM_PYTHON,
        (Level::Maximum, Runtime::Native) => MAXIMUM_NATIVE,
    }
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The programs `install` applies for `level` and `runtime`, in order: the x32 trap,
/// then the filter file's filters with the allow-list last (once it is in force,
/// seccomp(2) itself is refused).
type Programs = Vec<seccompiler::BpfProgram>;

/// Programs compiled once per process. A zygote template compiles its runtime's
/// ([`precompile`]) so that its forked workers only install them: compiling the
/// JSON is most of a filter's cost, and it is the same for every worker.
static COMPILED: Mutex<Vec<Compiled>> = Mutex::new(Vec::new());

/// The programs of one level and runtime.
type Compiled = ((Level, Runtime), Arc<Programs>);

/// Compile the filters of every level for `runtime` and keep them for the workers
/// this process forks. The filter files are built in, so an error here is the same
/// error every worker would report at [`install`]; it is returned, not kept.
pub fn precompile(runtime: Runtime) -> Result<(), ConfineError> {
    for level in [Level::Standard, Level::High, Level::Maximum] {
        programs(level, runtime)?;
    }
    Ok(())
}

fn programs(level: Level, runtime: Runtime) -> Result<Arc<Programs>, ConfineError> {
    // A poisoned lock still holds whole entries (each is pushed complete).
    let mut compiled = COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = compiled.iter().find(|(k, _)| *k == (level, runtime)) {
        return Ok(Arc::clone(p));
    }
    let source = filter_source(level, runtime);
    let mut filters = seccompiler::compile_from_json(source.as_bytes(), ARCH).map_err(|e| {
        ConfineError::SeccompFilter {
            level,
            why: e.to_string(),
        }
    })?;
    let mut names: Vec<String> = filters.keys().cloned().collect();
    names.sort_by_key(|n| (n.as_str() == "allow", n.clone()));
    let mut programs = vec![no_x32()];
    programs.extend(names.iter().filter_map(|n| filters.remove(n)));
    let programs = Arc::new(programs);
    compiled.push(((level, runtime), Arc::clone(&programs)));
    Ok(programs)
}

pub(crate) fn install(level: Level, runtime: Runtime) -> Result<Enforcement, ConfineError> {
    let source = filter_source(level, runtime);
    for program in programs(level, runtime)?.iter() {
        seccompiler::apply_filter_all_threads(program).map_err(ConfineError::SeccompInstall)?;
    }
    if level == Level::Maximum {
        return Ok(Enforcement::Full(format!(
            "{runtime} allow-list: {} syscalls, everything else traps with SIGSYS; threads \
             but no processes; clone3 answers ENOSYS; sockets other than AF_UNIX refused; \
             no other process's limits (EPERM)",
            allowed_syscalls(source).len()
        )));
    }
    let denied = denied_syscalls(level).len();
    Ok(Enforcement::Full(format!(
        "{level} deny-list: {denied} syscalls trap with SIGSYS; clone3 answers ENOSYS; \
         no new sockets (socket answers EAFNOSUPPORT: no network, no host unix socket), \
         stream socketpairs only; no inotify or fanotify (EPERM); no renicing, \
         rescheduling, pinning or limiting another process (EPERM){}",
        if level >= Level::High {
            "; no exec"
        } else {
            ""
        }
    )))
}

/// The bit that marks an x32 syscall number on x86_64.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Every x32 call traps, at every level. The x32 ABI shares x86_64's architecture
/// value and marks its numbers with [`X32_SYSCALL_BIT`], so filters by name never
/// match them: on a kernel with x32 enabled, `prctl`, `ptrace` or `unshare` by their
/// x32 numbers would pass every rule.
fn no_x32() -> seccompiler::BpfProgram {
    use seccompiler::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K.
    let (load, jge, ret) = (0x20, 0x35, 0x06);
    vec![
        // A = seccomp_data.nr
        sock_filter {
            code: load,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: jge,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: ret,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_TRAP,
        },
        sock_filter {
            code: ret,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ]
}

/// The syscall names in `level`'s deny-list.
pub(crate) fn denied_syscalls(level: Level) -> Vec<String> {
    match level {
        // An allow-list, not a deny-list.
        Level::Maximum => Vec::new(),
        Level::Standard | Level::High => rule_names(filter_source(level, Runtime::Wasm), "deny"),
    }
}

/// The syscall names an allow-list permits.
pub(crate) fn allowed_syscalls(source: &str) -> Vec<String> {
    rule_names(source, "allow")
}

fn rule_names(source: &str, filter: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(source).expect("valid JSON");
    v[filter]["filter"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .filter_map(|r| r["syscall"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The supervisor's reading of a dead worker's stderr: the syscall named by the last
/// `corral-seccomp: <number>` line, if any.
pub fn violation_from_stderr(stderr: &str) -> Option<String> {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(crate::sys::SIGSYS_PREFIX))?;
    let nr: i64 = line.trim().parse().ok()?;
    if nr & i64::from(X32_SYSCALL_BIT) != 0 {
        let native = nr & !i64::from(X32_SYSCALL_BIT);
        let name = syscalls::Sysno::new(native as usize).map_or("unknown", |s| s.name());
        return Some(format!("x32 {name}"));
    }
    Some(match syscall_name(nr) {
        Some(name) => name.to_owned(),
        None => match syscalls::Sysno::new(nr as usize) {
            Some(s) => s.name().to_owned(),
            None => format!("syscall {nr}"),
        },
    })
}

/// Numbers and names of the syscalls Corral's filters deny (and a few they inspect).
const NAMES: &[(i64, &str)] = &[
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_io_uring_enter, "io_uring_enter"),
    (libc::SYS_io_uring_register, "io_uring_register"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_swapon, "swapon"),
    (libc::SYS_swapoff, "swapoff"),
    (libc::SYS_acct, "acct"),
    (libc::SYS_settimeofday, "settimeofday"),
    (libc::SYS_clock_settime, "clock_settime"),
    (libc::SYS_clock_adjtime, "clock_adjtime"),
    (libc::SYS_adjtimex, "adjtimex"),
    (libc::SYS_sethostname, "sethostname"),
    (libc::SYS_setdomainname, "setdomainname"),
    (libc::SYS_open_by_handle_at, "open_by_handle_at"),
    (libc::SYS_name_to_handle_at, "name_to_handle_at"),
    (libc::SYS_fsopen, "fsopen"),
    (libc::SYS_fsmount, "fsmount"),
    (libc::SYS_fsconfig, "fsconfig"),
    (libc::SYS_move_mount, "move_mount"),
    (libc::SYS_open_tree, "open_tree"),
    (libc::SYS_lookup_dcookie, "lookup_dcookie"),
    (libc::SYS_quotactl, "quotactl"),
    (libc::SYS_vhangup, "vhangup"),
    (libc::SYS_iopl, "iopl"),
    (libc::SYS_ioperm, "ioperm"),
    (libc::SYS_personality, "personality"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_clone3, "clone3"),
];

/// The name of syscall `nr` on this architecture, for the syscalls Corral's filters
/// deny or inspect.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_file_compiles_and_every_rule_has_a_reason() {
        for (level, runtime) in [
            (Level::Standard, Runtime::Wasm),
            (Level::High, Runtime::Wasm),
            (Level::Maximum, Runtime::Wasm),
            (Level::Maximum, Runtime::Js),
            (Level::Maximum, Runtime::Python),
            (Level::Maximum, Runtime::Native),
        ] {
            let source = filter_source(level, runtime);
            seccompiler::compile_from_json(source.as_bytes(), ARCH)
                .unwrap_or_else(|e| panic!("{level}: {e}"));
            let v: serde_json::Value = serde_json::from_str(source).unwrap();
            for (name, filter) in v.as_object().unwrap() {
                for rule in filter["filter"].as_array().unwrap() {
                    let reason = rule["comment"].as_str().unwrap_or("");
                    assert!(
                        reason.len() > 5,
                        "{level}/{name}: rule {rule} has no reason"
                    );
                }
            }
        }
    }

    #[test]
    fn precompiled_programs_are_compiled_once_in_the_order_they_are_installed() {
        for runtime in [Runtime::Wasm, Runtime::Js, Runtime::Python, Runtime::Native] {
            precompile(runtime).unwrap();
            for level in [Level::Standard, Level::High, Level::Maximum] {
                let first = programs(level, runtime).unwrap();
                // Kept: the same programs again, not compiled a second time.
                assert!(Arc::ptr_eq(&first, &programs(level, runtime).unwrap()));
                let source = filter_source(level, runtime);
                let mut filters = seccompiler::compile_from_json(source.as_bytes(), ARCH).unwrap();
                let mut names: Vec<String> = filters.keys().cloned().collect();
                names.sort();
                // The x32 trap first; the allow-list (which refuses seccomp(2)) last.
                if let Some(i) = names.iter().position(|n| n == "allow") {
                    let allow = names.remove(i);
                    names.push(allow);
                }
                let mut expected = vec![no_x32()];
                expected.extend(names.iter().map(|n| filters.remove(n).unwrap()));
                assert_eq!(*first, expected, "{level} {runtime}");
            }
        }
    }

    #[test]
    fn every_denied_syscall_can_be_named_in_a_report() {
        for level in [Level::Standard, Level::High] {
            let denied = denied_syscalls(level);
            assert!(denied.len() > 40, "{level}: {}", denied.len());
            for name in denied {
                assert!(
                    NAMES.iter().any(|(_, n)| *n == name),
                    "{level}: no number for {name}"
                );
            }
        }
    }

    #[test]
    fn the_allow_lists_leave_out_every_dangerous_syscall() {
        for source in [MAXIMUM_WASM, MAXIMUM_JS, MAXIMUM_NATIVE] {
            allow_list_is_safe(source);
        }
    }

    fn allow_list_is_safe(source: &str) {
        let allowed = allowed_syscalls(source);
        assert!(allowed.len() > 50, "{}", allowed.len());
        // socket and clone3 are answered by errno filters; ioctl only for TCGETS.
        for denied in denied_syscalls(Level::High) {
            assert!(
                !allowed.contains(&denied)
                    || ["socket", "clone3", "ioctl"].contains(&denied.as_str()),
                "{denied} allowed"
            );
        }
        let v: serde_json::Value = serde_json::from_str(source).unwrap();
        let ioctl: Vec<_> = v["allow"]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["syscall"] == "ioctl")
            .collect();
        assert_eq!(ioctl.len(), 1);
        assert_eq!(ioctl[0]["args"][0]["val"], 0x5401, "TCGETS only");
        for more in [
            "fork", "vfork", "execve", "kill", "connect", "bind", "listen", "accept",
        ] {
            assert!(!allowed.contains(&more.to_owned()), "{more} allowed");
        }
    }

    #[test]
    fn violations_of_any_syscall_are_named() {
        let err = format!("corral-seccomp: {}\n", libc::SYS_kill);
        assert_eq!(violation_from_stderr(&err).as_deref(), Some("kill"));
    }

    #[test]
    fn high_adds_exec_and_socket_families() {
        let high = denied_syscalls(Level::High);
        assert!(high.contains(&"execve".to_owned()));
        assert!(!denied_syscalls(Level::Standard).contains(&"execve".to_owned()));
        assert!(HIGH.contains("no new unix socket either"));
        assert!(STANDARD.contains("no new unix socket either"));
    }

    #[test]
    fn violations_are_read_from_stderr() {
        let nr = libc::SYS_ptrace;
        let err = format!("some output\ncorral-seccomp: {nr}\n");
        assert_eq!(violation_from_stderr(&err).as_deref(), Some("ptrace"));
        assert_eq!(
            violation_from_stderr("corral-seccomp: 9999\n").as_deref(),
            Some("syscall 9999")
        );
        assert_eq!(violation_from_stderr("nothing here"), None);
    }
}
