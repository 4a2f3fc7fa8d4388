//! The native "engine" of Corral: a plugin that is a shared library of machine code
//! (`runtime = "native"`), loaded with libloading into a worker confined exactly like
//! the others.
//!
//! Principal types: [`NativeEngine`] (implements [`corral_worker::Engine`]) and
//! [`NativeInstance`] (the loaded library's functions).
//!
//! There is no engine sandbox: the plugin's code is the worker's code, so it can do
//! anything the process can, including writing frames of its own on the worker's
//! socket. What holds it is what holds every worker: the uid drop, `no_new_privs`,
//! Landlock, seccomp (at `maximum`, the allow-list `seccomp/maximum-native.json`,
//! written for this worker), the namespaces and the cgroup, all in force before the
//! library is opened (its constructors are plugin code), and the supervisor, which
//! trusts nothing the worker sends.
//!
//! # Native ABI (version 1)
//!
//! The library (an ELF shared object for the worker's machine, e.g. a Rust `cdylib`
//! built with `corral-guest`, or C with `sdk/c/corral.h`) exports, as C symbols:
//!
//! | symbol | signature | meaning |
//! |---|---|---|
//! | `corral_set_host` | `int32_t (const struct corral_host *)` | called first, before `corral_init`: keep the host table (it outlives the library); non-zero refuses the table's version |
//! | `corral_alloc` | `uint8_t *(size_t len)` | `len` writable bytes for a call's input |
//! | `corral_fn_<name>` | `int32_t (uint8_t *ptr, size_t len)` | function `<name>`; the input at `ptr..ptr+len` (from `corral_alloc`, now the callee's); 0 for success, 2 when memory ran out, anything else an error |
//! | `corral_init` (optional) | `int32_t (void)` | init hook; non-zero fails the load |
//! | `corral_shutdown` (optional) | `void (void)` | shutdown hook |
//!
//! The host table ([`corral_guest::HostTable`]) has the functions a Wasm plugin
//! imports from `corral`, with the same meaning: `output`, `error`, `log`, `now_ms`,
//! `host_call` and `host_take`.
//!
//! # Limits
//!
//! - **Deadlines**: machine code cannot be interrupted safely, so a call that runs
//!   past its deadline is ended by the supervisor, which kills the worker at the
//!   deadline plus its grace and answers `Timeout`; the next call gets a fresh worker.
//! - **Memory**: `RLIMIT_DATA` at the plugin's `memory` above what the worker held
//!   when it started (plus room for one result and the worker's buffers): past it
//!   `malloc` returns NULL, and a function that returns [`STATUS_NO_MEMORY`] answers
//!   `MemoryLimit` (a Rust plugin aborts, and its worker is replaced). Shared mappings,
//!   which that limit does not count, meet the worker's cgroup, as in every runtime.
//! - **Output**: a result past `max_output` is refused before it is copied.
//! - A crash (a signal, an abort, a panic across the ABI) ends the worker; the
//!   supervisor reports it and starts a fresh one, so no call sees a half-updated
//!   library.

use corral_guest::{HOST_ABI, HostTable};
use corral_protocol::{CallError, LoadSpec, LogLevel, Runtime};
use corral_worker::{Engine, EngineInfo, Host, LoadError, RuntimeFiles, SetupError};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Prefix of exported plugin functions.
pub const EXPORT_PREFIX: &str = "corral_fn_";

/// What a function returns when an allocation failed (`CORRAL_NO_MEMORY`): the
/// call answers `MemoryLimit`.
pub const STATUS_NO_MEMORY: i32 = 2;

/// Room above the plugin's `memory` and one result for the worker's own buffers
/// (the input, frames).
const WORKER_SLACK: u64 = 32 << 20;

/// The longest error or log message copied from the plugin.
const MAX_MESSAGE: usize = 64 * 1024;

type PluginFn = unsafe extern "C" fn(*mut u8, usize) -> i32;
type AllocFn = unsafe extern "C" fn(usize) -> *mut u8;
type InitFn = unsafe extern "C" fn() -> i32;
type ShutdownFn = unsafe extern "C" fn();
type SetHostFn = unsafe extern "C" fn(*const HostTable) -> i32;

/// The running call's state, shared with the host functions (which the plugin may
/// call from any of its threads).
struct CallState {
    host: Option<Host>,
    output: Option<Vec<u8>>,
    /// The size last passed to `output` past `max_output`: not copied.
    too_large: Option<u64>,
    max_output: u64,
    error: Option<String>,
    /// The answer of the last `host_call`, until `host_take` copies it out.
    host_answer: Option<Vec<u8>>,
}

static STATE: Mutex<CallState> = Mutex::new(CallState {
    host: None,
    output: None,
    too_large: None,
    max_output: 0,
    error: None,
    host_answer: None,
});

fn state() -> MutexGuard<'static, CallState> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The table handed to the library; static, so it outlives it.
static TABLE: HostTable = HostTable {
    abi: HOST_ABI,
    output: host_output,
    error: host_error,
    log: host_log,
    now_ms: host_now_ms,
    host_call,
    host_take,
};

/// The plugin's bytes at `ptr..ptr+len`, copied.
///
/// # Safety
///
/// `ptr` is null only with `len` 0, else valid for `len` bytes (the plugin's word:
/// if it lies, it crashes its own worker).
unsafe fn copied(ptr: *const u8, len: usize) -> Vec<u8> {
    if len == 0 || ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
}

/// # Safety
///
/// As [`copied`].
unsafe extern "C" fn host_output(ptr: *const u8, len: usize) {
    let mut s = state();
    // Refused before it is copied (the worker loop checks `max_output` too).
    if len as u64 > s.max_output {
        s.too_large = Some(len as u64);
        s.output = None;
        return;
    }
    // SAFETY: the caller's contract.
    s.output = Some(unsafe { copied(ptr, len) });
}

/// # Safety
///
/// As [`copied`].
unsafe extern "C" fn host_error(ptr: *const u8, len: usize) {
    // SAFETY: the caller's contract, for fewer bytes.
    let bytes = unsafe { copied(ptr, len.min(MAX_MESSAGE)) };
    state().error = Some(String::from_utf8_lossy(&bytes).into_owned());
}

/// # Safety
///
/// As [`copied`].
unsafe extern "C" fn host_log(level: u32, ptr: *const u8, len: usize) {
    let level = LogLevel::from_u32(level).unwrap_or(LogLevel::Info);
    // SAFETY: the caller's contract, for fewer bytes.
    let bytes = unsafe { copied(ptr, len.min(MAX_MESSAGE)) };
    let host = state().host.clone();
    if let Some(host) = host {
        host.log(level, String::from_utf8_lossy(&bytes).into_owned());
    }
}

/// -1 when the supervisor does not answer.
unsafe extern "C" fn host_now_ms() -> i64 {
    let host = state().host.clone();
    host.and_then(|h| h.now_ms().ok()).unwrap_or(-1)
}

/// # Safety
///
/// As [`copied`], for both byte strings.
unsafe extern "C" fn host_call(
    name: *const u8,
    name_len: usize,
    args: *const u8,
    args_len: usize,
) -> i32 {
    // SAFETY: the caller's contract.
    let (name, args) = unsafe { (copied(name, name_len.min(256)), copied(args, args_len)) };
    let name = String::from_utf8_lossy(&name).into_owned();
    // The lock is not held over the request: the plugin's other threads may log.
    let host = state().host.clone();
    let answer = match host {
        None => Err(corral_protocol::HostError::Invalid(
            "host services are available once the plugin loads".into(),
        )),
        Some(host) => corral_worker::services::decode_list(&args)
            .map_err(corral_protocol::HostError::Invalid)
            .and_then(|args| corral_worker::services::request(&host, &name, args)),
    };
    let (code, bytes) = match answer {
        Ok(items) => {
            let bytes = corral_worker::services::encode_list(&items);
            (i32::try_from(bytes.len()), bytes)
        }
        Err(e) => {
            let bytes = format!("{}: {e}", e.kind()).into_bytes();
            (i32::try_from(bytes.len()).map(|n| -n - 1), bytes)
        }
    };
    let Ok(code) = code else {
        let bytes = b"failed: host answer larger than 2 GiB".to_vec();
        let code = -(bytes.len() as i32) - 1;
        state().host_answer = Some(bytes);
        return code;
    };
    state().host_answer = Some(bytes);
    code
}

/// # Safety
///
/// `ptr` is valid for writes of the size the last `host_call` answered.
unsafe extern "C" fn host_take(ptr: *mut u8) {
    let Some(bytes) = state().host_answer.take() else {
        return;
    };
    if !bytes.is_empty() && !ptr.is_null() {
        // SAFETY: per the contract, `ptr` has room for exactly these bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, bytes.len()) };
    }
}

/// The loaded library: opened once per worker and never closed.
struct Loaded {
    source: (String, String),
    _library: libloading::Library,
    instance: NativeInstance,
}

/// The library's functions.
#[derive(Debug, Clone)]
pub struct NativeInstance {
    alloc: AllocFn,
    memory_limit: u64,
    functions: BTreeMap<String, PluginFn>,
    exports: Vec<String>,
    shutdown: Option<ShutdownFn>,
}

/// The engine behind `corral-worker-native`.
#[derive(Default)]
pub struct NativeEngine {
    /// Private writable memory of the worker when it started (`VmData`), the base
    /// of `RLIMIT_DATA`; `None` where it could not be read.
    data_at_start: Option<u64>,
    loaded: Option<Loaded>,
}

impl std::fmt::Debug for NativeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeEngine")
            .field("data_at_start", &self.data_at_start)
            .field("loaded", &self.loaded.as_ref().map(|l| &l.source))
            .finish()
    }
}

impl NativeEngine {
    pub fn new() -> NativeEngine {
        NativeEngine::default()
    }
}

/// `VmData` of this process, in bytes.
fn vm_data() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmData:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Hold private writable memory at `limit` bytes, soft and hard (the plugin, with
/// no capability, cannot raise it again).
fn limit_data(limit: u64) -> Result<(), LoadError> {
    let rlim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: `rlim` outlives the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_DATA, &rlim) } != 0 {
        return Err(LoadError::Engine(format!(
            "cannot set the memory limit (RLIMIT_DATA): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The `corral_fn_` functions a shared object defines, sorted, from its dynamic
/// symbol table; or why it is not a library this worker can load.
pub fn exported_functions(data: &[u8]) -> Result<Vec<String>, String> {
    use object::read::elf::{FileHeader, Sym};
    use object::{Endianness, elf};
    let header = elf::FileHeader64::<Endianness>::parse(data)
        .map_err(|e| format!("not a 64-bit ELF shared library: {e}"))?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    if header.e_type(endian) != elf::ET_DYN {
        return Err("not a shared library (ELF type is not ET_DYN): build a cdylib".into());
    }
    #[cfg(target_arch = "x86_64")]
    const MACHINE: (u16, &str) = (elf::EM_X86_64, "x86_64");
    #[cfg(target_arch = "aarch64")]
    const MACHINE: (u16, &str) = (elf::EM_AARCH64, "aarch64");
    if header.e_machine(endian) != MACHINE.0 {
        return Err(format!(
            "built for ELF machine {}, the worker runs on {}",
            header.e_machine(endian),
            MACHINE.1
        ));
    }
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let symbols = sections
        .symbols(endian, data, elf::SHT_DYNSYM)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for sym in symbols.iter() {
        if sym.st_shndx(endian) == elf::SHN_UNDEF || sym.st_type() != elf::STT_FUNC {
            continue;
        }
        let Ok(name) = symbols.symbol_name(endian, sym) else {
            continue;
        };
        if let Some(f) = name.strip_prefix(EXPORT_PREFIX.as_bytes())
            && !f.is_empty()
        {
            out.push(String::from_utf8_lossy(f).into_owned());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// A symbol of `library`, if it defines one of that name.
///
/// # Safety
///
/// `T` is the symbol's real type (the ABI's word for it).
unsafe fn symbol<T: Copy>(library: &libloading::Library, name: &str) -> Option<T> {
    // SAFETY: per the contract; the value is copied out of the library, which is
    // never closed.
    unsafe { library.get::<T>(name.as_bytes()).ok().map(|s| *s) }
}

impl NativeEngine {
    fn load(&mut self, spec: &LoadSpec, host: &Host) -> Result<NativeInstance, LoadError> {
        let path = Path::new(&spec.plugin_dir).join(&spec.entry);
        let shown = path.display().to_string();
        let invalid = |message: String| LoadError::Invalid {
            path: shown.clone(),
            message,
        };
        let data = std::fs::read(&path).map_err(|source| LoadError::Read {
            path: shown.clone(),
            source,
        })?;
        let exports = exported_functions(&data).map_err(invalid)?;
        drop(data);
        if exports.is_empty() {
            return Err(LoadError::NoExports {
                hint: "symbols named `corral_fn_<name>`",
            });
        }
        {
            let mut s = state();
            s.host = Some(host.clone());
            s.max_output = spec.limits.max_output_bytes;
        }
        // From here the library's memory is the plugin's.
        if let Some(base) = self.data_at_start {
            let limit = base
                .saturating_add(spec.limits.memory_bytes)
                .saturating_add(spec.limits.max_output_bytes)
                .saturating_add(WORKER_SLACK);
            limit_data(limit)?;
        }
        // RTLD_NOW: a missing symbol fails the load, not a call; RTLD_LOCAL: its
        // symbols stay its own.
        // SAFETY: opening the library runs its constructors, which are plugin code;
        // confinement is in force (the loop applies it before any `Load`), and that is
        // the whole point of this worker.
        let library = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
            )
        }
        .map_err(|e| invalid(format!("cannot load the library: {e}")))?;
        let library = libloading::Library::from(library);
        // SAFETY: the type the native ABI gives this symbol.
        let set_host: Option<SetHostFn> = unsafe { symbol(&library, "corral_set_host") };
        // SAFETY: as above.
        let alloc: Option<AllocFn> = unsafe { symbol(&library, "corral_alloc") };
        // SAFETY: as above.
        let init: Option<InitFn> = unsafe { symbol(&library, "corral_init") };
        // SAFETY: as above.
        let shutdown: Option<ShutdownFn> = unsafe { symbol(&library, "corral_shutdown") };
        let (Some(set_host), Some(alloc)) = (set_host, alloc) else {
            return Err(invalid(
                "the native ABI needs `corral_set_host` and `corral_alloc` (build with \
                 corral_guest::plugin!, or see sdk/c/corral.h)"
                    .into(),
            ));
        };
        let mut functions = BTreeMap::new();
        for name in &exports {
            // SAFETY: `corral_fn_` symbols have the ABI's function type.
            let f: Option<PluginFn> =
                unsafe { symbol(&library, &format!("{EXPORT_PREFIX}{name}")) };
            let f = f.ok_or_else(|| invalid(format!("`{EXPORT_PREFIX}{name}` did not resolve")))?;
            functions.insert(name.clone(), f);
        }
        // SAFETY: the ABI's first call; the table is static.
        let refused = unsafe { set_host(&TABLE) };
        if refused != 0 {
            return Err(invalid(format!(
                "the library refused host table version {HOST_ABI} (status {refused}): rebuild \
                 it against this Corral's corral-guest or corral.h"
            )));
        }
        if let Some(init) = init {
            state().error = None;
            // SAFETY: the ABI's init hook, after `corral_set_host`.
            let status = unsafe { init() };
            if status != 0 {
                let message = state()
                    .error
                    .take()
                    .unwrap_or_else(|| format!("init returned status {status}"));
                return Err(LoadError::Plugin {
                    during: "init",
                    message,
                });
            }
        }
        let instance = NativeInstance {
            alloc,
            memory_limit: spec.limits.memory_bytes,
            functions,
            exports,
            shutdown,
        };
        self.loaded = Some(Loaded {
            source: (spec.plugin_dir.clone(), spec.entry.clone()),
            _library: library,
            instance: instance.clone(),
        });
        Ok(instance)
    }
}

impl Engine for NativeEngine {
    type Instance = NativeInstance;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: Runtime::Native,
            version: format!("native ABI {HOST_ABI}"),
        }
    }

    fn runtime_files(&mut self) -> Result<RuntimeFiles, SetupError> {
        // Read first of all, while /proc is in view at every level.
        self.data_at_start = vm_data();
        Ok(RuntimeFiles::default())
    }

    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<NativeInstance, LoadError> {
        // The library stays loaded: a second instance (the loop asks for one after
        // an error of its own) reuses it, without running `init` again.
        match &self.loaded {
            Some(l) if l.source == (spec.plugin_dir.clone(), spec.entry.clone()) => {
                Ok(l.instance.clone())
            }
            Some(l) => Err(LoadError::Engine(format!(
                "this worker has {} loaded and cannot load another library",
                Path::new(&l.source.0).join(&l.source.1).display()
            ))),
            None => self.load(spec, host),
        }
    }
}

impl corral_worker::Instance for NativeInstance {
    fn exports(&self) -> &[String] {
        &self.exports
    }

    fn call(
        &mut self,
        function: &str,
        input: &[u8],
        _deadline: Duration,
        _host: &Host,
    ) -> Result<Vec<u8>, CallError> {
        let f = *self
            .functions
            .get(function)
            .ok_or_else(|| CallError::Plugin {
                message: format!("{function} is not among the library's functions"),
            })?;
        {
            let mut s = state();
            s.output = None;
            s.too_large = None;
            s.error = None;
        }
        // SAFETY: the ABI's allocator.
        let ptr = unsafe { (self.alloc)(input.len()) };
        if ptr.is_null() && !input.is_empty() {
            return Err(CallError::Plugin {
                message: format!(
                    "corral_alloc returned NULL for an input of {} bytes",
                    input.len()
                ),
            });
        }
        if !input.is_empty() {
            // SAFETY: `corral_alloc(len)` gave `len` writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(input.as_ptr(), ptr, input.len()) };
        }
        // SAFETY: the ABI's function type; the input is the callee's from here.
        let status = unsafe { f(ptr, input.len()) };
        let mut s = state();
        if let Some(size) = s.too_large {
            return Err(CallError::OutputTooLarge {
                size,
                limit: s.max_output,
            });
        }
        if status == 0 {
            Ok(s.output.take().unwrap_or_default())
        } else if status == STATUS_NO_MEMORY {
            Err(CallError::MemoryLimit {
                limit_bytes: self.memory_limit,
            })
        } else {
            let message = s
                .error
                .take()
                .unwrap_or_else(|| format!("function returned status {status}"));
            Err(CallError::Plugin { message })
        }
    }

    fn shutdown(&mut self, _grace: Duration, _host: &Host) {
        // Bounded by the supervisor, which kills the worker after the grace.
        if let Some(f) = self.shutdown {
            // SAFETY: the ABI's shutdown hook.
            unsafe { f() };
        }
    }

    fn memory_bytes(&self) -> u64 {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks as u64).saturating_add(info.hblkhd as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sdk/c/corral.h` is the same table, field for field, for C authors.
    #[test]
    fn the_c_header_declares_the_host_table_in_its_order() {
        let header = include_str!("../../../sdk/c/corral.h");
        let body = header
            .split("struct corral_host {")
            .nth(1)
            .and_then(|b| b.split("};").next())
            .expect("struct corral_host in corral.h");
        // Comments out, then one declaration per `;` (a declaration may span lines).
        let mut code = String::new();
        let mut rest = body;
        while let Some((before, after)) = rest.split_once("/*") {
            code.push_str(before);
            rest = after.split_once("*/").map_or("", |(_, a)| a);
        }
        code.push_str(rest);
        let fields: Vec<String> = code
            .split(';')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| match d.split_once("(*") {
                Some((_, r)) => r.split(')').next().unwrap_or("").to_string(),
                None => d.rsplit(' ').next().unwrap_or("").to_string(),
            })
            .collect();
        // The field names of HostTable, in its declaration order.
        let ours = [
            "abi",
            "output",
            "error",
            "log",
            "now_ms",
            "host_call",
            "host_take",
        ];
        assert_eq!(fields, ours);
        assert_eq!(std::mem::size_of::<HostTable>(), 8 + 6 * 8);
        assert!(header.contains(&format!("#define CORRAL_HOST_ABI {HOST_ABI}")));
        assert!(header.contains(&format!("#define CORRAL_NO_MEMORY {STATUS_NO_MEMORY}")));
        // The Wasm ABI's imports, under the same names.
        let wasm = include_str!("../../wasm/src/lib.rs");
        for name in &ours[1..] {
            assert!(wasm.contains(&format!("//! | `{name}` |")), "{name}");
        }
    }

    #[test]
    fn only_a_shared_library_for_this_machine_is_taken() {
        let err = exported_functions(b"#!/bin/sh\necho hi\n").unwrap_err();
        assert!(err.contains("not a 64-bit ELF shared library"), "{err}");
        // This test binary is an ELF (a position-independent executable is ET_DYN
        // too) that exports no plugin functions.
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        match exported_functions(&own) {
            Ok(f) => assert!(f.is_empty(), "{f:?}"),
            Err(e) => assert!(e.contains("ET_DYN"), "{e}"),
        }
        let mut other = own.clone();
        // e_machine (offset 18): not this machine.
        other[18..20].copy_from_slice(&40u16.to_le_bytes());
        other[16..18].copy_from_slice(&3u16.to_le_bytes());
        let err = exported_functions(&other).unwrap_err();
        assert!(err.contains("built for ELF machine 40"), "{err}");
    }
}
