//! The Python engine of Corral workers: CPython embedded with pyo3, one interpreter
//! per worker, started in an isolated configuration.
//!
//! # The plugin contract
//!
//! `entry` in plugin.toml names a `.py` file in the plugin directory (`plugin.py`,
//! or `pkg/main.py` for a module of a package). Its public functions are the
//! plugin's functions (those it defines, not ones it imports; `__all__` overrides);
//! each takes the input as `bytes` and returns `bytes`, `bytearray`, `str` (sent as
//! UTF-8) or `None` (empty). Optional functions `init()` and `shutdown()` are the
//! lifecycle hooks; they are not callable functions.
//!
//! ```python
//! import corral
//!
//! def greet(data: bytes) -> str:
//!     name = corral.text(data)
//!     if not name:
//!         raise ValueError("give a name to greet")   # a plugin error
//!     corral.log("info", f"greeting {name}")
//!     return f"Hello, {name}!"
//! ```
//!
//! `sys.path` is the plugin directory and the standard library, nothing else: no
//! `site`, no user site, no site-packages, no `PYTHON*` variable honoured. A
//! plugin that needs a library vendors it into its directory.
//!
//! The host API is the module `corral`, under the same names as in Wasm and
//! JavaScript: `log(level, message)`, `now_ms()`, and the byte helpers `text`,
//! `bytes`, `json`, `json_bytes`.
//!
//! # Errors and limits
//!
//! | the plugin | the call gets |
//! |---|---|
//! | raises an exception | `CallError::Plugin` with the exception and its traceback |
//! | recurses past the recursion limit, raises `SystemError` | `CallError::Trap` with the traceback |
//! | runs past the deadline | `CallError::Timeout`: a SIGALRM timer raises `corral.DeadlineExceeded` (a `BaseException`) in the running code, again every 50 ms; code that ignores it or sits in one long C call is killed by the supervisor at the deadline plus its grace |
//! | allocates past its memory limit | `CallError::MemoryLimit`: the interpreter's allocators count every block and refuse past the limit, which raises `MemoryError` |
//! | returns more than `max_output` | `CallError::OutputTooLarge` |
//!
//! After a trap, timeout or memory limit, the worker loop discards the instance:
//! the plugin's modules are forgotten and the next call imports them afresh and
//! runs `init` again, as every engine starts a fresh instance; the interpreter and
//! process stay.
//!
//! # Finding the standard library
//!
//! The worker is linked (RUNPATH) to the libpython it was built against and reads
//! that interpreter's standard library. Before dropping root it opens a handle on
//! the standard library; if the worker's user cannot reach the real path (a pyenv
//! under a 0700 `/root`), the interpreter reads it through `/proc/self/fd/N`, and
//! at `maximum` it is staged into the view by root. Landlock allows reading the
//! standard library and the shared libraries its extension modules link against
//! (libffi, libsqlite3, libz...: found with `ldd` at build time), nothing else
//! besides the plugin.

mod api;
mod interp;

/// Counting the C library's allocations against the plugin's memory limit: the
/// worker program interposes `malloc` and the rest with these (see `main.rs`), and
/// gives its own Rust code an allocator that is not counted.
pub mod malloc {
    pub use crate::interp::{
        c_calloc, c_free, c_malloc, c_memalign, c_realloc, set_malloc_interposed, uncounted_alloc,
        uncounted_free, uncounted_realloc, uncounted_zeroed,
    };
}

use corral_protocol::{CallError, LoadSpec, Runtime};
use corral_worker::{EngineInfo, Host, LoadError, RuntimeFiles, SetupError};
use pyo3::exceptions::{PyMemoryError, PyRecursionError, PySystemError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The CPython the worker was built against.
pub const PYTHON_VERSION: &str = env!("CORRAL_PYTHON_VERSION");
/// Its interpreter program (what `corral plugin vendor` runs pip with, so that
/// wheels match this CPython's version and platform).
pub const PYTHON_EXECUTABLE: &str = env!("CORRAL_PYTHON_EXECUTABLE");
/// Its standard library.
pub const STDLIB: &str = env!("CORRAL_PYTHON_STDLIB");
const DYNLOAD: &str = env!("CORRAL_PYTHON_DYNLOAD");
const PREFIX: &str = env!("CORRAL_PYTHON_PREFIX");
/// Where pip installs for this interpreter (often inside the standard library).
const SITE_PACKAGES: &str = env!("CORRAL_PYTHON_SITE_PACKAGES");
/// Shared libraries the extension modules link against (`:`-separated).
const EXTENSION_LIBS: &str = env!("CORRAL_PYTHON_LIBS");

/// The driver module (see boot.py).
const BOOT: &str = include_str!("boot.py");

/// How often the deadline signal repeats until the call returns.
const DEADLINE_REPEAT: Duration = Duration::from_millis(50);

/// Most traceback lines kept in an error (a recursion error has thousands).
const MAX_TRACEBACK_LINES: usize = 64;

/// One instance of the plugin: its imported module and functions. Dropping it
/// forgets the plugin's modules, so that a fresh instance imports them afresh.
pub struct PythonInstance {
    functions: HashMap<String, Py<PyAny>>,
    /// `None` only while dropping.
    module: Option<Py<PyAny>>,
    exports: Vec<String>,
    boot: Py<PyModule>,
    plugin_dir: String,
    memory_limit: u64,
}

impl std::fmt::Debug for PythonInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonInstance")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

impl Drop for PythonInstance {
    fn drop(&mut self) {
        // Every reference to the plugin's objects goes with the GIL held, so their
        // teardown (a plugin's `__del__`) runs now, not inside the next instance.
        Python::attach(|py| {
            self.functions.clear();
            drop(self.module.take());
            unload(py, &self.boot, &self.plugin_dir);
        });
    }
}

/// Forget the modules imported from `plugin_dir`.
fn unload(py: Python<'_>, boot: &Py<PyModule>, plugin_dir: &str) {
    let _ = boot.bind(py).call_method1("unload", (plugin_dir,));
}

/// The CPython engine.
pub struct PythonEngine {
    /// Handle on the standard library, opened with the worker's first privileges.
    stdlib_fd: Option<OwnedFd>,
    boot: Option<Py<PyModule>>,
    /// Whether the allocators count against the plugin's memory limit yet (from
    /// the first instance on).
    limited: bool,
    /// The GIL taken for a template's fork, between `before_fork` and `after_fork`.
    fork_gil: Option<pyo3::ffi::PyGILState_STATE>,
}

/// Modules a template imports before it forks, so that every worker shares them:
/// what boot.py and the host API use, and JSON in and out. More is not better:
/// with `collections`, `typing`, `dataclasses` and `datetime` as well, an idle
/// worker of the example used 3.4 MiB instead of 2.7 (docs/BENCHMARKS.md).
const TEMPLATE_IMPORTS: &[&str] = &["json", "base64", "random"];

// CPython's fork protocol (not in pyo3's bindings): called around a fork made
// outside `os.fork`, with the GIL held.
unsafe extern "C" {
    fn PyOS_BeforeFork();
    fn PyOS_AfterFork_Parent();
    fn PyOS_AfterFork_Child();
}

impl std::fmt::Debug for PythonEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonEngine")
            .field("running", &self.boot.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for PythonEngine {
    fn default() -> Self {
        PythonEngine::new()
    }
}

impl PythonEngine {
    pub fn new() -> PythonEngine {
        PythonEngine {
            stdlib_fd: None,
            boot: None,
            limited: false,
            fork_gil: None,
        }
    }

    /// Start the interpreter reading the standard library at `paths`, and the
    /// worker's own module.
    fn start(&mut self, paths: &interp::Paths) -> Result<(), SetupError> {
        interp::initialize(paths)?;
        let boot = Python::attach(|py| -> PyResult<Py<PyModule>> {
            let boot = PyModule::from_code(
                py,
                &std::ffi::CString::new(BOOT).expect("no NUL in boot.py"),
                c"<corral-worker>",
                c"_corral_worker",
            )?;
            // The deadline signal's handler (Python-level, so it runs between
            // bytecodes of the main thread).
            let corral = py.import("corral")?;
            // Compiled under a name that tracebacks show.
            let builtins = py.import("builtins")?;
            let code = builtins.getattr("compile")?.call1((
                api::SERVICES_PY,
                "<corral host API>",
                "exec",
            ))?;
            builtins.getattr("exec")?.call1((code, corral.dict()))?;
            // `_signal`, not `signal`: the latter builds enums at import (~5 ms).
            let signal = py.import("_signal")?;
            signal.call_method1("signal", (libc::SIGALRM, corral.getattr("_deadline")?))?;
            Ok(boot.unbind())
        })
        .map_err(|e| SetupError::Engine {
            engine: "CPython",
            message: Python::attach(|py| format_error(py, &e)),
        })?;
        self.boot = Some(boot);
        Ok(())
    }

    /// In a worker forked from a template: read the standard library from `paths`
    /// from now on (the template started the interpreter with the real path, which
    /// the worker's user may not reach), and close the handle if the path will do.
    fn rebase_stdlib(&mut self, paths: &interp::Paths) -> Result<(), SetupError> {
        if paths.stdlib == STDLIB {
            self.stdlib_fd = None;
            return Ok(());
        }
        Python::attach(|py| -> PyResult<()> {
            let boot = self
                .boot
                .as_ref()
                .expect("forked from a template: the interpreter runs");
            boot.bind(py).call_method1(
                "rebase_stdlib",
                (STDLIB, &paths.stdlib, DYNLOAD, &paths.dynload),
            )?;
            Ok(())
        })
        .map_err(|e| SetupError::Engine {
            engine: "CPython",
            message: Python::attach(|py| format_error(py, &e)),
        })
    }

    /// Where the interpreter reads the standard library from: the real path if this
    /// process can read it, else through the handle taken before dropping root.
    fn stdlib_paths(&self) -> interp::Paths {
        let real = interp::Paths {
            prefix: PREFIX.to_owned(),
            stdlib: STDLIB.to_owned(),
            dynload: DYNLOAD.to_owned(),
        };
        let readable = std::fs::metadata(Path::new(STDLIB).join("os.py")).is_ok();
        match &self.stdlib_fd {
            Some(fd) if !readable => {
                let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
                let rebase = |p: &str| match Path::new(p).strip_prefix(STDLIB) {
                    Ok(rest) => Path::new(&via).join(rest).to_string_lossy().into_owned(),
                    Err(_) => p.to_owned(),
                };
                interp::Paths {
                    prefix: via.clone(),
                    stdlib: via.clone(),
                    dynload: rebase(DYNLOAD),
                }
            }
            _ => real,
        }
    }

    /// Import the plugin and run its `init` within the load deadline. A failed
    /// import leaves none of the plugin's modules behind.
    fn import(&self, py: Python<'_>, spec: &LoadSpec) -> Result<PythonInstance, LoadError> {
        let boot = self
            .boot
            .as_ref()
            .ok_or_else(|| LoadError::Engine("the interpreter is not running".into()))?;
        let init_deadline = Duration::from_millis(spec.limits.init_deadline_ms.max(1));
        let failed = |e: PyErr, during: &'static str| {
            let interrupted = e.is_instance_of::<api::DeadlineExceeded>(py);
            LoadError::plugin_code(during, format_error(py, &e), interrupted, init_deadline)
        };
        let imported = || -> Result<(Bound<PyAny>, Vec<String>, HashMap<_, _>), LoadError> {
            let (module, exports, init): (Bound<PyAny>, Vec<String>, Option<Bound<PyAny>>) = boot
                .bind(py)
                .call_method1("load", (&spec.plugin_dir, &spec.entry))
                .and_then(|r| r.extract())
                .map_err(|e| failed(e, "loading the module"))?;
            if let Some(init) = init {
                init.call0().map_err(|e| failed(e, "init"))?;
            }
            let mut functions = HashMap::new();
            for name in &exports {
                let f = module
                    .getattr(name.as_str())
                    .map_err(|e| failed(e, "reading the exports"))?;
                functions.insert(name.clone(), f.unbind());
            }
            Ok((module, exports, functions))
        };
        // The deadline covers the plugin's code, not the clean-up after it.
        let imported = {
            let _armed = Deadline::arm(init_deadline);
            imported()
        };
        match imported {
            Ok((module, exports, functions)) => Ok(PythonInstance {
                functions,
                module: Some(module.unbind()),
                exports,
                boot: boot.clone_ref(py),
                plugin_dir: spec.plugin_dir.clone(),
                memory_limit: spec.limits.memory_bytes,
            }),
            Err(e) => {
                unload(py, boot, &spec.plugin_dir);
                Err(e)
            }
        }
    }
}

/// The SIGALRM timer of one call; disarmed when dropped.
struct Deadline;

impl Deadline {
    fn arm(after: Duration) -> Deadline {
        api::set_deadline(Some(Instant::now() + after));
        set_timer(after, DEADLINE_REPEAT);
        Deadline
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        set_timer(Duration::ZERO, Duration::ZERO);
        api::set_deadline(None);
    }
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    }
}

/// `setitimer(ITIMER_REAL)`: first expiry after `value` (zero disarms), then every
/// `interval`.
fn set_timer(value: Duration, interval: Duration) {
    let value = if value.is_zero() && !interval.is_zero() {
        Duration::from_micros(1)
    } else {
        value
    };
    let t = libc::itimerval {
        it_interval: timeval(interval),
        it_value: timeval(value),
    };
    // SAFETY: setitimer reads `t`; the old value is not wanted.
    unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) };
}

/// `Type: message` and the traceback, cut to [`MAX_TRACEBACK_LINES`].
fn format_error(py: Python<'_>, e: &PyErr) -> String {
    let head = e.value(py).to_string();
    let name = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "Exception".into());
    let mut text = if head.is_empty() {
        name
    } else {
        format!("{name}: {head}")
    };
    let tb = e.traceback(py).and_then(|tb| tb.format().ok());
    if let Some(tb) = tb {
        let lines: Vec<&str> = tb.lines().collect();
        text.push('\n');
        if lines.len() > MAX_TRACEBACK_LINES {
            let keep = MAX_TRACEBACK_LINES / 2;
            text.push_str(&lines[..keep].join("\n"));
            text.push_str(&format!(
                "\n  ... {} more lines ...\n",
                lines.len() - 2 * keep
            ));
            text.push_str(&lines[lines.len() - keep..].join("\n"));
        } else {
            text.push_str(tb.trim_end());
        }
    }
    text
}

/// A function's return value as output bytes.
fn output(ret: &Bound<'_, PyAny>) -> Result<Vec<u8>, CallError> {
    if let Ok(b) = ret.cast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else if let Ok(s) = ret.cast::<PyString>() {
        s.to_str()
            .map(|s| s.as_bytes().to_vec())
            .map_err(|e| CallError::Plugin {
                message: format!("the returned str cannot be encoded as UTF-8: {e}"),
            })
    } else if let Ok(b) = ret.cast::<PyByteArray>() {
        Ok(b.to_vec())
    } else if ret.is_none() {
        Ok(Vec::new())
    } else {
        let ty = ret
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        Err(CallError::Plugin {
            message: format!(
                "the function returned a value of type {ty}; return bytes, bytearray, str \
                 or None (corral.json_bytes(value) for JSON)"
            ),
        })
    }
}

impl corral_worker::Engine for PythonEngine {
    type Instance = PythonInstance;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: Runtime::Python,
            version: format!("CPython {PYTHON_VERSION} (pyo3)"),
        }
    }

    fn runtime_files(&mut self) -> Result<RuntimeFiles, SetupError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(STDLIB)
            .map_err(|source| SetupError::RuntimeFiles {
                what: "the Python standard library",
                path: PathBuf::from(STDLIB),
                source,
            })?;
        self.stdlib_fd = Some(OwnedFd::from(f));
        let mut trees = vec![PathBuf::from(STDLIB)];
        if !Path::new(DYNLOAD).starts_with(STDLIB) {
            trees.push(PathBuf::from(DYNLOAD));
        }
        trees.extend(
            EXTENSION_LIBS
                .split(':')
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        );
        // What pip installed beside this interpreter is not the standard library.
        let hide = [SITE_PACKAGES]
            .into_iter()
            .map(PathBuf::from)
            .filter(|p| p.parent() == Some(Path::new(STDLIB)))
            .collect();
        Ok(RuntimeFiles { read: trees, hide })
    }

    fn prepare(&mut self) -> Result<(), SetupError> {
        let paths = self.stdlib_paths();
        if self.boot.is_some() {
            // Forked from a template: the interpreter runs; only where this worker
            // reads the standard library from is its own.
            return self.rebase_stdlib(&paths);
        }
        if paths.stdlib == STDLIB {
            // Reachable by path: no handle stays open for plugin code.
            self.stdlib_fd = None;
        }
        self.start(&paths)
    }

    fn warm(&mut self) -> Result<(), SetupError> {
        // The handle stays: a worker that drops to a user who cannot reach the
        // standard library by path reads it through the handle.
        self.start(&self.stdlib_paths())?;
        Python::attach(|py| -> PyResult<()> {
            // What every worker imports anyway, then out of the collector's reach:
            // a collection would write to every object and unshare the pages.
            for m in TEMPLATE_IMPORTS {
                py.import(*m)?;
            }
            py.import("gc")?.call_method0("freeze")?;
            Ok(())
        })
        .map_err(|e| SetupError::Engine {
            engine: "CPython",
            message: Python::attach(|py| format_error(py, &e)),
        })
    }

    fn kept_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.stdlib_fd.iter().map(|f| f.as_raw_fd()).collect()
    }

    fn before_fork(&mut self) {
        // SAFETY: the interpreter runs (warm) and this is its main thread; the GIL
        // is taken here and given back in `after_fork`, as CPython's fork protocol
        // asks (PyOS_BeforeFork with the GIL held).
        unsafe {
            self.fork_gil = Some(pyo3::ffi::PyGILState_Ensure());
            PyOS_BeforeFork();
        }
    }

    fn after_fork(&mut self, child: bool) {
        let Some(gil) = self.fork_gil.take() else {
            return;
        };
        // SAFETY: paired with `before_fork` on the same thread, with the GIL held.
        // In the child, PyOS_AfterFork_Child re-initialises the interpreter's locks
        // and runs `os.register_at_fork` hooks (the `random` module reseeds there).
        unsafe {
            if child {
                PyOS_AfterFork_Child();
            } else {
                PyOS_AfterFork_Parent();
            }
            pyo3::ffi::PyGILState_Release(gil);
        }
    }

    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<PythonInstance, LoadError> {
        api::set_host(host);
        Python::attach(|py| {
            if !self.limited {
                // Counted from here: what the interpreter itself holds is not the
                // plugin's.
                interp::limit_from_now(spec.limits.memory_bytes);
                self.limited = true;
            }
            self.import(py, spec)
        })
    }
}

impl corral_worker::Instance for PythonInstance {
    fn exports(&self) -> &[String] {
        &self.exports
    }

    fn call(
        &mut self,
        function: &str,
        input: &[u8],
        deadline: Duration,
        _host: &Host,
    ) -> Result<Vec<u8>, CallError> {
        Python::attach(|py| {
            let f = self
                .functions
                .get(function)
                .ok_or_else(|| CallError::Trap {
                    message: format!("{function} is not among the imported functions"),
                })?;
            let deadline_ms = deadline.as_millis() as u64;
            interp::take_refused();
            let result = {
                let _armed = Deadline::arm(deadline);
                f.bind(py).call1((PyBytes::new(py, input),))
            };
            match result {
                Ok(v) => output(&v),
                Err(e) => Err(self.classify(py, &e, deadline_ms)),
            }
        })
    }

    fn shutdown(&mut self, grace: Duration, _host: &Host) {
        Python::attach(|py| {
            let _armed = Deadline::arm(grace);
            let Some(module) = self.module.as_ref().map(|m| m.bind(py)) else {
                return;
            };
            if let Ok(f) = module.getattr("shutdown")
                && f.is_callable()
            {
                let _ = f.call0();
            }
        });
    }

    fn memory_bytes(&self) -> u64 {
        interp::plugin_bytes(self.memory_limit)
    }
}

impl PythonInstance {
    /// The typed error for a failed call.
    fn classify(&self, py: Python<'_>, e: &PyErr, deadline_ms: u64) -> CallError {
        if e.is_instance_of::<api::DeadlineExceeded>(py) {
            return CallError::Timeout { deadline_ms };
        }
        if e.is_instance_of::<PyMemoryError>(py) && interp::take_refused() {
            return CallError::MemoryLimit {
                limit_bytes: self.memory_limit,
            };
        }
        let message = format_error(py, e);
        if e.is_instance_of::<PyRecursionError>(py) || e.is_instance_of::<PySystemError>(py) {
            CallError::Trap { message }
        } else {
            CallError::Plugin { message }
        }
    }
}
