//! The WebAssembly engine of Corral: wasmtime running WASI preview-1 core modules.
//!
//! Principal types: [`WasmEngine`] (implements [`corral_worker::Engine`]),
//! [`WasmInstance`] (one instantiated plugin). A serving worker maps the module
//! a compile helper (this same binary, at `Code::CompileOnly`) precompiled for it;
//! it compiles only when the supervisor has no store of compiled modules. Deadlines are epoch interruption, driven by the shared
//! [`corral_worker::Watchdog`]: each store runs with an epoch deadline of one tick,
//! and the watchdog increments the engine's epoch when the armed deadline passes,
//! which traps the running guest with [`wasmtime::Trap::Interrupt`].
//!
//! # Plugin ABI (version 1)
//!
//! A plugin is a core module (`wasm32-wasip1`, or WAT text for tests). It exports:
//!
//! | export | signature | meaning |
//! |---|---|---|
//! | `memory` | memory | the linear memory inputs are written into |
//! | `corral_alloc` | `(len: i32) -> i32` | return a pointer to `len` writable bytes |
//! | `corral_fn_<name>` | `(ptr: i32, len: i32) -> i32` | function `<name>`; input at `ptr..ptr+len` (owned by the callee); returns 0 for success, anything else for an error |
//! | `corral_init` (optional) | `() -> i32` | init hook, run after instantiation; non-zero fails the load |
//! | `corral_shutdown` (optional) | `() -> ()` | shutdown hook |
//! | `_initialize` (optional) | `() -> ()` | WASI reactor initialiser, run first |
//!
//! It may import, from module `corral`:
//!
//! | import | signature | meaning |
//! |---|---|---|
//! | `output` | `(ptr: i32, len: i32)` | set the call's result bytes (copied at once; last call wins) |
//! | `error` | `(ptr: i32, len: i32)` | set the call's error message (UTF-8) |
//! | `log` | `(level: i32, ptr: i32, len: i32)` | log a UTF-8 line; level 0 error .. 4 trace |
//! | `now_ms` | `() -> i64` | wall-clock milliseconds since the Unix epoch, from the supervisor |
//! | `host_call` | `(name_ptr, name_len, args_ptr, args_len: i32) -> i32` | a brokered host service (`corral_worker::services`): `name` UTF-8, `args` a byte-string list (`u32` LE length + bytes, repeated). Returns n >= 0: success, an answer list of n bytes is ready; n < 0: failure, a UTF-8 `kind: message` of -n-1 bytes is ready |
//! | `host_take` | `(ptr: i32)` | copy the ready answer of the last `host_call` to `ptr` (the guest allocates exactly its size) |
//!
//! and the WASI preview-1 functions. The WASI context has no preopened directories,
//! no environment, no arguments and no sockets; stdout and stderr go to the worker's
//! stderr, which the supervisor logs.
//!
//! A trap (including an interrupted deadline) discards the instance: the worker loop
//! asks for a fresh one at the next call, made from the module compiled at load, and
//! `corral_init` runs again.

use corral_protocol::{CallError, Code, LoadSpec, LogLevel, Runtime};
use corral_worker::{Engine, EngineInfo, Host, LoadError, SetupError, Watchdog};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::{
    Caller, Config, Instance, Linker, Memory, Module, ResourceLimiter, Store, StoreLimits,
    StoreLimitsBuilder, Trap, TypedFunc, ValType,
};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

/// The wasmtime version this worker embeds.
pub const WASMTIME_VERSION: &str = "48.0.8";

/// Prefix of exported plugin functions.
pub const EXPORT_PREFIX: &str = "corral_fn_";

/// The wasmtime [`Config`] every Corral worker uses. Precompiled modules are tied to it.
pub fn engine_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config
}

/// Per-store state: WASI, limits, and the current call's result.
struct State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    host: Host,
    output: Option<Vec<u8>>,
    /// The size the plugin last passed to `corral.output` past `max_output`: not
    /// copied, and the call answers `OutputTooLarge`.
    too_large: Option<u64>,
    max_output: u64,
    error: Option<String>,
    /// The answer of the last `host_call`, until `host_take` copies it out.
    host_answer: Option<Vec<u8>>,
}

/// The engine's memory limit, over linear memory and tables together: a table of
/// a hundred million function references is as much memory as a big heap, and must
/// end in `MemoryLimit` like one, not in the cgroup's OOM kill. It records whether
/// the limit was hit, so the error can say "memory limit" rather than a bare trap.
struct Limiter {
    limits: StoreLimits,
    /// The budget, in bytes, for linear memory plus tables.
    budget: u64,
    /// Bytes of linear memory now (the module has one memory).
    memory: u64,
    /// Table elements now, over every table.
    table_elements: u64,
    hit: bool,
}

/// What the engine stores per table element (a pointer to a function reference;
/// GC references are smaller): the cost a table is counted at.
const TABLE_ELEMENT_BYTES: u64 = 8;

impl Limiter {
    fn new(limits: StoreLimits, budget: u64) -> Limiter {
        Limiter {
            limits,
            budget,
            memory: 0,
            table_elements: 0,
            hit: false,
        }
    }

    /// Allow growing to a total of `memory` bytes and `table_elements` elements
    /// within the budget; past it the growth traps (so a bomb cannot carry on after
    /// a failed grow) and `hit` is set.
    fn within_budget(&mut self, memory: u64, table_elements: u64) -> wasmtime::Result<()> {
        let total = memory.saturating_add(table_elements.saturating_mul(TABLE_ELEMENT_BYTES));
        if total > self.budget {
            self.hit = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit: {} bytes of linear memory and tables, past the {} allowed",
                total, self.budget
            )));
        }
        Ok(())
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Beyond the module's own maximum is a failed grow (-1), as wasm says.
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let memory = self.memory - (current as u64).min(self.memory) + desired as u64;
        self.within_budget(memory, self.table_elements)?;
        self.memory = memory;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        let elements =
            self.table_elements - (current as u64).min(self.table_elements) + desired as u64;
        self.within_budget(self.memory, elements)?;
        self.table_elements = elements;
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }
    fn tables(&self) -> usize {
        self.limits.tables()
    }
    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// The plugin's compiled module, kept across instances: a fresh instance after a
/// trap is made from it without compiling again.
struct Compiled {
    /// `plugin_dir` and `entry` of the spec it was compiled for.
    source: (String, String),
    module: Module,
    linker: Linker<State>,
    exports: Vec<String>,
}

/// One instance of the plugin: its store, memory and functions.
pub struct WasmInstance {
    store: Store<State>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    instance: Instance,
    exports: Vec<String>,
    memory_limit: u64,
    watchdog: Arc<Watchdog>,
}

impl std::fmt::Debug for WasmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmInstance")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

/// The wasmtime engine behind `corral-worker-wasm`.
pub struct WasmEngine {
    engine: wasmtime::Engine,
    /// Started at the first instance, after confinement: Landlock confines the
    /// calling thread and its future children only, so no thread may exist before
    /// it is applied.
    watchdog: Option<Arc<Watchdog>>,
    compiled: Option<Compiled>,
    /// WASI and the host API, linked once (in a zygote template, before any fork):
    /// the same for every plugin.
    linker: Option<Linker<State>>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("compiled", &self.compiled.as_ref().map(|c| &c.source))
            .finish()
    }
}

impl WasmEngine {
    pub fn new() -> Result<WasmEngine, SetupError> {
        let engine = wasmtime::Engine::new(&engine_config()).map_err(|e| SetupError::Engine {
            engine: "wasmtime",
            message: format!("{e:#}"),
        })?;
        Ok(WasmEngine {
            engine,
            watchdog: None,
            compiled: None,
            linker: None,
        })
    }

    fn watchdog(&mut self) -> Result<Arc<Watchdog>, LoadError> {
        if let Some(w) = &self.watchdog {
            return Ok(Arc::clone(w));
        }
        let engine = self.engine.clone();
        let w = Watchdog::start(move || engine.increment_epoch())
            .map_err(|e| LoadError::Engine(format!("cannot start the deadline thread: {e}")))?;
        Ok(Arc::clone(self.watchdog.insert(Arc::new(w))))
    }

    /// The compiled module for `spec`: mapped from its precompiled artefact (or,
    /// without one, compiled) once, at load.
    fn compiled(&mut self, spec: &LoadSpec) -> Result<&Compiled, LoadError> {
        let source = (spec.plugin_dir.clone(), spec.entry.clone());
        if self.compiled.as_ref().is_some_and(|c| c.source == source) {
            return Ok(self.compiled.as_ref().expect("checked above"));
        }
        let module = self.compile(spec)?;
        let mut exports = Vec::new();
        for e in module.exports() {
            let Some(name) = e.name().strip_prefix(EXPORT_PREFIX) else {
                continue;
            };
            let abi = e.ty().func().is_some_and(|f| {
                let params: Vec<_> = f.params().collect();
                let results: Vec<_> = f.results().collect();
                matches!(params[..], [ValType::I32, ValType::I32])
                    && matches!(results[..], [ValType::I32])
            });
            if !abi {
                return Err(LoadError::Invalid {
                    path: Path::new(&spec.plugin_dir)
                        .join(&spec.entry)
                        .display()
                        .to_string(),
                    message: format!("`{}` must be a function (i32, i32) -> i32", e.name()),
                });
            }
            exports.push(name.to_owned());
        }
        exports.sort();
        if exports.is_empty() {
            return Err(LoadError::NoExports {
                hint: "exports named `corral_fn_<name>`",
            });
        }
        let linker = self.linker()?;
        Ok(self.compiled.insert(Compiled {
            source,
            module,
            linker,
            exports,
        }))
    }

    fn compile(&self, spec: &LoadSpec) -> Result<Module, LoadError> {
        match &spec.code {
            Code::Precompiled(path) => {
                // SAFETY: the supervisor made this file from a compile helper's output
                // for exactly the entry's bytes, in a directory only it can write, and
                // the worker can only read it; wasmtime still checks its header and
                // refuses an artefact of another version or configuration. It is
                // mapped, not read: its code pages are shared by every worker of the
                // module.
                unsafe { Module::deserialize_file(&self.engine, path) }.map_err(|e| {
                    LoadError::Invalid {
                        path: path.clone(),
                        message: format!(
                            "the precompiled module is refused: {e:#} (remove the file and \
                             the next start compiles it again)"
                        ),
                    }
                })
            }
            Code::Compile | Code::CompileOnly => {
                let (bytes, shown) = entry_bytes(spec)?;
                Module::new(&self.engine, &bytes).map_err(|e| LoadError::Invalid {
                    path: shown,
                    message: format!("{e:#}"),
                })
            }
        }
    }

    fn linker(&mut self) -> Result<Linker<State>, LoadError> {
        if let Some(l) = &self.linker {
            return Ok(l.clone());
        }
        let mut linker: Linker<State> = Linker::new(&self.engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)
            .map_err(|e| LoadError::Engine(format!("cannot link WASI: {e:#}")))?;
        link_host_functions(&mut linker)
            .map_err(|e| LoadError::Engine(format!("cannot link host API: {e:#}")))?;
        Ok(self.linker.insert(linker).clone())
    }
}

fn link_host_functions(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "corral",
        "output",
        |mut caller: Caller<'_, State>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            // Refused before it is copied (the worker loop checks `max_output` for
            // every engine; here a copy of all linear memory would come first).
            let size = u64::from(len as u32);
            if size > caller.data().max_output {
                let state = caller.data_mut();
                state.too_large = Some(size);
                state.output = None;
                return Ok(());
            }
            let bytes = read_guest(&mut caller, ptr, len)?;
            caller.data_mut().output = Some(bytes);
            Ok(())
        },
    )?;
    linker.func_wrap(
        "corral",
        "error",
        |mut caller: Caller<'_, State>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let len = len.min(64 * 1024);
            let bytes = read_guest(&mut caller, ptr, len)?;
            caller.data_mut().error = Some(String::from_utf8_lossy(&bytes).into_owned());
            Ok(())
        },
    )?;
    linker.func_wrap(
        "corral",
        "log",
        |mut caller: Caller<'_, State>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let level = LogLevel::from_u32(level as u32).unwrap_or(LogLevel::Info);
            let len = len.min(64 * 1024);
            let bytes = read_guest(&mut caller, ptr, len)?;
            let message = String::from_utf8_lossy(&bytes).into_owned();
            caller.data().host.log(level, message);
            Ok(())
        },
    )?;
    linker.func_wrap(
        "corral",
        "now_ms",
        |caller: Caller<'_, State>| -> wasmtime::Result<i64> {
            caller
                .data()
                .host
                .now_ms()
                .map_err(|e| wasmtime::Error::msg(format!("host call now_ms failed: {e}")))
        },
    )?;
    linker.func_wrap(
        "corral",
        "host_call",
        |mut caller: Caller<'_, State>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32|
         -> wasmtime::Result<i32> {
            let name = read_guest(&mut caller, name_ptr, name_len.min(256))?;
            let args = read_guest(&mut caller, args_ptr, args_len)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let answer = corral_worker::services::decode_list(&args)
                .map_err(corral_protocol::HostError::Invalid)
                .and_then(|args| {
                    corral_worker::services::request(&caller.data().host, &name, args)
                });
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
            let code = code.map_err(|_| wasmtime::Error::msg("host answer larger than 2 GiB"))?;
            caller.data_mut().host_answer = Some(bytes);
            Ok(code)
        },
    )?;
    linker.func_wrap(
        "corral",
        "host_take",
        |mut caller: Caller<'_, State>, ptr: i32| -> wasmtime::Result<()> {
            let bytes = caller
                .data_mut()
                .host_answer
                .take()
                .ok_or_else(|| wasmtime::Error::msg("host_take without a host_call answer"))?;
            let memory = caller
                .get_export("memory")
                .and_then(|e| e.into_memory())
                .ok_or_else(|| wasmtime::Error::msg("plugin exports no memory"))?;
            memory
                .write(&mut caller, ptr as u32 as usize, &bytes)
                .map_err(|_| wasmtime::Error::msg("host_take: pointer outside the plugin's memory"))
        },
    )?;
    Ok(())
}

fn read_guest(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("plugin exports no memory"))?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    let data = memory.data(&caller);
    let end = start
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| wasmtime::Error::msg("pointer outside the plugin's memory"))?;
    Ok(data[start..end].to_vec())
}

/// Make an instance of `compiled` and run `_initialize` and `corral_init`, all under
/// the load and init deadline.
fn instantiate(
    engine: &wasmtime::Engine,
    compiled: &Compiled,
    spec: &LoadSpec,
    host: &Host,
    watchdog: Arc<Watchdog>,
) -> Result<WasmInstance, CallError> {
    let wasi = WasiCtxBuilder::new()
        .inherit_stdout()
        .inherit_stderr()
        .build_p1();
    // Counts only: sizes are the Limiter's budget over memory and tables.
    let limits = StoreLimitsBuilder::new()
        .instances(1)
        .memories(1)
        .tables(4)
        .build();
    let memory_limit = spec.limits.memory_bytes;
    let state = State {
        wasi,
        limiter: Limiter::new(limits, memory_limit),
        host: host.clone(),
        output: None,
        too_large: None,
        max_output: spec.limits.max_output_bytes,
        error: None,
        host_answer: None,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    let init_ms = spec.limits.init_deadline_ms;
    // The epoch deadline first: a tick between the two must not be lost.
    store.set_epoch_deadline(1);
    let armed = watchdog.arm(Duration::from_millis(init_ms));
    let instance = compiled
        .linker
        .instantiate(&mut store, &compiled.module)
        .map_err(|e| classify(e, &store, memory_limit, init_ms))?;
    let memory = instance
        .get_memory(&mut store, "memory")
        .ok_or_else(|| abi_error("the module exports no `memory`"))?;
    let alloc = instance
        .get_typed_func::<i32, i32>(&mut store, "corral_alloc")
        .map_err(|e| abi_error(&format!("`corral_alloc` must be (i32) -> i32: {e}")))?;
    if let Ok(f) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
        f.call(&mut store, ())
            .map_err(|e| classify(e, &store, memory_limit, init_ms))?;
    }
    if let Some(f) = instance.get_func(&mut store, "corral_init") {
        let f = f
            .typed::<(), i32>(&store)
            .map_err(|e| abi_error(&format!("`corral_init` must be () -> i32: {e}")))?;
        let status = f
            .call(&mut store, ())
            .map_err(|e| classify(e, &store, memory_limit, init_ms))?;
        if status != 0 {
            let message = store
                .data_mut()
                .error
                .take()
                .unwrap_or_else(|| format!("init returned status {status}"));
            return Err(CallError::Plugin {
                message: format!("init failed: {message}"),
            });
        }
    }
    drop(armed);
    Ok(WasmInstance {
        store,
        memory,
        alloc,
        instance,
        exports: compiled.exports.clone(),
        memory_limit,
        watchdog,
    })
}

fn abi_error(what: &str) -> CallError {
    CallError::Trap {
        message: format!("plugin does not follow the Corral Wasm ABI: {what}"),
    }
}

/// Turn a wasmtime error into the call error a user can act on.
fn classify(
    err: wasmtime::Error,
    store: &Store<State>,
    memory_limit: u64,
    deadline_ms: u64,
) -> CallError {
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return CallError::Timeout { deadline_ms };
    }
    if store.data().limiter.hit {
        return CallError::MemoryLimit {
            limit_bytes: memory_limit,
        };
    }
    // The cause first ("wasm trap: ..."), then the wasm backtrace if there is one.
    let mut message = err.root_cause().to_string();
    if let Some(bt) = err.downcast_ref::<wasmtime::WasmBacktrace>() {
        message.push('\n');
        message.push_str(&bt.to_string());
    }
    CallError::Trap { message }
}

impl Engine for WasmEngine {
    type Instance = WasmInstance;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: Runtime::Wasm,
            version: format!("wasmtime {WASMTIME_VERSION}"),
        }
    }

    /// In a zygote template: link WASI and the host API once for every worker. No
    /// WASI context is made here: its generators are seeded from the thread's
    /// `rand::rng()`, which is seeded at its first use and not again at a fork, so
    /// one made in the template would give every child the same random stream.
    fn warm(&mut self) -> Result<(), SetupError> {
        self.linker().map_err(|e| SetupError::Engine {
            engine: "wasmtime",
            message: e.to_string(),
        })?;
        Ok(())
    }

    /// In a forked worker: reseed the thread's generator, which WASI's are drawn
    /// from. The template never uses it (tested: siblings draw different bytes);
    /// this keeps it so should anything in the template ever do.
    fn after_fork(&mut self, child: bool) {
        if child && let Err(e) = rand::rng().reseed() {
            eprintln!("corral worker: cannot reseed the random generator after the fork: {e}");
            std::process::abort();
        }
    }

    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<WasmInstance, LoadError> {
        let watchdog = self.watchdog()?;
        let engine = self.engine.clone();
        let compiled = self.compiled(spec)?;
        Ok(instantiate(&engine, compiled, spec, host, watchdog)?)
    }

    fn precompile(&mut self, spec: &LoadSpec, out: &mut std::fs::File) -> Result<(), LoadError> {
        use std::io::Write;
        let (bytes, shown) = entry_bytes(spec)?;
        let artefact = self
            .engine
            .precompile_module(&bytes)
            .map_err(|e| LoadError::Invalid {
                path: shown,
                message: format!("{e:#}"),
            })?;
        out.write_all(&artefact)
            .map_err(|e| LoadError::Engine(format!("cannot write the compiled module: {e}")))
    }
}

/// The entry's bytes, and its path as shown in errors.
fn entry_bytes(spec: &LoadSpec) -> Result<(Vec<u8>, String), LoadError> {
    let path = Path::new(&spec.plugin_dir).join(&spec.entry);
    let shown = path.display().to_string();
    match std::fs::read(&path) {
        Ok(bytes) => Ok((bytes, shown)),
        Err(source) => Err(LoadError::Read {
            path: shown,
            source,
        }),
    }
}

impl corral_worker::Instance for WasmInstance {
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
        let deadline_ms = deadline.as_millis() as u64;
        self.run(function, input, deadline).map_err(|e| match e {
            RunError::Wasm(e) => classify(e, &self.store, self.memory_limit, deadline_ms),
            RunError::Call(e) => e,
        })
    }

    fn shutdown(&mut self, grace: Duration, host: &Host) {
        if let Ok(f) = self
            .instance
            .get_typed_func::<(), ()>(&mut self.store, "corral_shutdown")
        {
            self.store.set_epoch_deadline(1);
            let _armed = self.watchdog.arm(grace);
            if let Err(e) = f.call(&mut self.store, ()) {
                host.log(LogLevel::Warn, format!("shutdown hook failed: {e}"));
            }
        }
    }

    fn memory_bytes(&self) -> u64 {
        self.memory.data_size(&self.store) as u64
    }
}

enum RunError {
    Wasm(wasmtime::Error),
    Call(CallError),
}

impl WasmInstance {
    fn run(
        &mut self,
        function: &str,
        input: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, RunError> {
        let name = format!("{EXPORT_PREFIX}{function}");
        let func = self
            .instance
            .get_typed_func::<(i32, i32), i32>(&mut self.store, &name)
            .map_err(|e| {
                RunError::Call(abi_error(&format!(
                    "`{name}` must be (i32, i32) -> i32: {e}"
                )))
            })?;
        let len = i32::try_from(input.len()).map_err(|_| {
            RunError::Call(CallError::BadInput {
                reason: format!("input of {} bytes is too large for wasm32", input.len()),
            })
        })?;
        let state = self.store.data_mut();
        state.output = None;
        state.too_large = None;
        state.error = None;
        state.limiter.hit = false;

        self.store.set_epoch_deadline(1);
        let _armed = self.watchdog.arm(deadline);
        let ptr = self
            .alloc
            .call(&mut self.store, len)
            .map_err(RunError::Wasm)?;
        self.memory
            .write(&mut self.store, ptr as u32 as usize, input)
            .map_err(|_| {
                RunError::Wasm(wasmtime::Error::msg(
                    "corral_alloc returned a pointer outside memory",
                ))
            })?;
        let status = func
            .call(&mut self.store, (ptr, len))
            .map_err(RunError::Wasm)?;
        let state = self.store.data_mut();
        if let Some(size) = state.too_large {
            let limit = state.max_output;
            return Err(RunError::Call(CallError::OutputTooLarge { size, limit }));
        }
        if status == 0 {
            Ok(state.output.take().unwrap_or_default())
        } else {
            let message = state
                .error
                .take()
                .unwrap_or_else(|| format!("function returned status {status}"));
            Err(RunError::Call(CallError::Plugin { message }))
        }
    }
}
