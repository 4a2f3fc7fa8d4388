//! The V8 engine for JavaScript plugins (deno_core), behind the cargo feature `v8`:
//! the same contract as the QuickJS engine ([`crate::JsEngine`]).
//!
//! - Modules resolve as on QuickJS ([`crate::modules`]): files and `node_modules`
//!   packages inside the plugin directory only, ES modules and CommonJS (the
//!   shared `commonjs.js` over two ops); anything else fails the load with an error
//!   naming the import.
//! - The frozen global `corral` has the same names (`log`, `now_ms`, `text`,
//!   `bytes`, `json`, `json_bytes`), built on a few ops (`corral.js`).
//! - Deadline: the shared [`corral_worker::Watchdog`] calls `terminate_execution`
//!   on the isolate;
//!   memory: V8's heap limit, with a near-heap-limit callback that terminates the
//!   call instead of letting V8 abort the process.
//! - Errors: the plugin's own `Error`s are `CallError::Plugin`, V8's own error classes
//!   `CallError::Trap`, both with the stack; after a trap, timeout or memory limit
//!   the runtime is discarded and the next call gets a fresh one.
//!
//! Linking needs V8's prebuilt static library (rusty_v8 downloads it at build time,
//! or `RUSTY_V8_ARCHIVE` names a local copy); see README.md.

use crate::loader::commonjs_facade;
use crate::modules::{Format, Mode, PluginFiles};
use corral_protocol::{CallError, LoadSpec, LogLevel, Runtime};
use corral_worker::{EngineInfo, Host, LoadError, Watchdog};
use deno_core::{
    JsRuntime, ModuleLoadOptions, ModuleLoadReferrer, ModuleLoadResponse, ModuleLoader,
    ModuleResolveResponse, ModuleSource, ModuleSourceCode, ModuleSpecifier, ModuleType, OpState,
    PollEventLoopOptions, ResolutionKind, RuntimeOptions, op2, v8,
};
use deno_error::JsErrorBox;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The host connection, kept in the op state.
struct HostHandle(Host);

/// One call's input and output, and the module's export names, in the op state.
#[derive(Default)]
struct CallIo {
    input: Vec<u8>,
    output: Option<Vec<u8>>,
    exports: Vec<String>,
}

#[op2(fast)]
fn op_corral_log(
    state: &mut OpState,
    #[string] level: &str,
    #[string] message: &str,
) -> Result<(), JsErrorBox> {
    let level = LogLevel::from_name(level).ok_or_else(|| {
        JsErrorBox::type_error(format!(
            "corral.log: unknown level {level:?} (error, warn, info, debug, trace)"
        ))
    })?;
    state
        .borrow::<HostHandle>()
        .0
        .log(level, message.to_owned());
    Ok(())
}

#[op2(fast)]
fn op_corral_now_ms(state: &mut OpState) -> Result<f64, JsErrorBox> {
    let ms = state
        .borrow::<HostHandle>()
        .0
        .now_ms()
        .map_err(|e| JsErrorBox::generic(format!("host call now_ms failed: {e}")))?;
    Ok(ms as f64)
}

#[op2]
#[string]
fn op_corral_text(#[buffer] bytes: &[u8]) -> Result<String, JsErrorBox> {
    String::from_utf8(bytes.to_vec())
        .map_err(|e| JsErrorBox::type_error(format!("corral.text: not UTF-8: {e}")))
}

#[op2]
#[buffer]
fn op_corral_bytes(#[string] text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

#[op2]
#[buffer]
fn op_corral_input(state: &mut OpState) -> Vec<u8> {
    std::mem::take(&mut state.borrow_mut::<CallIo>().input)
}

#[op2(fast)]
fn op_corral_output(state: &mut OpState, #[buffer] bytes: &[u8]) {
    state.borrow_mut::<CallIo>().output = Some(bytes.to_vec());
}

#[op2]
fn op_corral_exports(state: &mut OpState, #[serde] names: Vec<String>) {
    state.borrow_mut::<CallIo>().exports = names;
}

/// The native half of the host services: a byte-string list in, a tag byte (0 ok, 1
/// error) and a byte-string list or `kind\nmessage` out.
#[op2]
#[buffer]
fn op_corral_host(state: &mut OpState, #[string] name: String, #[buffer] args: &[u8]) -> Vec<u8> {
    let host = state.borrow::<HostHandle>().0.clone();
    let answer = corral_worker::services::decode_list(args)
        .map_err(corral_protocol::HostError::Invalid)
        .and_then(|args| corral_worker::services::request(&host, &name, args));
    match answer {
        Ok(items) => [vec![0], corral_worker::services::encode_list(&items)].concat(),
        Err(e) => [vec![1], format!("{}\n{e}", e.kind()).into_bytes()].concat(),
    }
}

/// `require` from module `from` (CommonJS, shared with QuickJS: `commonjs.js`).
#[op2]
#[string]
fn op_corral_cjs_resolve(
    state: &mut OpState,
    #[string] from: String,
    #[string] spec: String,
) -> Result<String, JsErrorBox> {
    state
        .borrow::<PluginFiles>()
        .resolve(&from, &spec, Mode::Require)
        .map_err(|why| JsErrorBox::generic(format!("require({spec:?}) in {from}: {why}")))
}

/// The format and text of CommonJS module `name`, read inside the plugin only.
#[op2]
#[serde]
fn op_corral_cjs_source(
    state: &mut OpState,
    #[string] name: String,
) -> Result<Vec<String>, JsErrorBox> {
    let files = state.borrow::<PluginFiles>();
    let bytes = files.read(&name).map_err(JsErrorBox::generic)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| JsErrorBox::generic(format!("{name}: not UTF-8: {e}")))?;
    Ok(vec![files.format(&name).name().to_owned(), text])
}

/// The CommonJS runtime (shared with QuickJS), evaluated by `corral.js`.
#[op2]
#[string]
fn op_corral_commonjs_js() -> String {
    include_str!("../commonjs.js").to_owned()
}

/// The typed host services (shared with QuickJS), evaluated by `corral.js`.
#[op2]
#[string]
fn op_corral_services_js() -> String {
    include_str!("../services.js").to_owned()
}

deno_core::extension!(
    corral_v8,
    ops = [
        op_corral_log,
        op_corral_now_ms,
        op_corral_text,
        op_corral_bytes,
        op_corral_input,
        op_corral_output,
        op_corral_exports,
        op_corral_host,
        op_corral_services_js,
        op_corral_cjs_resolve,
        op_corral_cjs_source,
        op_corral_commonjs_js
    ],
    esm_entry_point = "ext:corral_v8/corral.js",
    esm = [dir "src/v8", "corral.js"],
);

/// Resolves and loads modules inside the plugin directory only, as
/// [`PluginFiles`] says (the same rules as on QuickJS).
struct PluginLoader {
    root: PathBuf,
    files: PluginFiles,
}

impl PluginLoader {
    /// The logical name of a module URL inside the plugin root.
    fn logical(&self, url: &ModuleSpecifier) -> Result<String, JsErrorBox> {
        let path = url
            .to_file_path()
            .map_err(|()| JsErrorBox::generic(format!("import {url}: not a file")))?;
        let rel = path.strip_prefix(&self.root).map_err(|_| {
            JsErrorBox::generic(format!("import {url}: outside the plugin directory"))
        })?;
        crate::modules::logical_name(&rel.to_string_lossy()).ok_or_else(|| {
            JsErrorBox::generic(format!("import {url}: outside the plugin directory"))
        })
    }
}

impl ModuleLoader for PluginLoader {
    fn resolve(
        &self,
        specifier: &str,
        referrer: &str,
        _kind: ResolutionKind,
    ) -> ModuleResolveResponse {
        let referrer = ModuleSpecifier::parse(referrer)
            .map_err(|e| JsErrorBox::generic(format!("import {specifier:?}: {e}")))?;
        let base = self.logical(&referrer)?;
        let name = self
            .files
            .resolve(&base, specifier, Mode::Import)
            .map_err(|why| JsErrorBox::generic(format!("import {specifier:?} in {base}: {why}")))?;
        ModuleSpecifier::from_file_path(self.root.join(name))
            .map_err(|()| JsErrorBox::generic(format!("import {specifier:?}: not a path")))
    }

    fn load(
        &self,
        specifier: &ModuleSpecifier,
        _referrer: Option<&ModuleLoadReferrer>,
        _options: ModuleLoadOptions,
    ) -> ModuleLoadResponse {
        let load = || -> Result<ModuleSource, JsErrorBox> {
            let name = self.logical(specifier)?;
            let code = match self.files.format(&name) {
                Format::CommonJs | Format::Json => commonjs_facade(&name),
                Format::EsModule => self.text(&name)?,
                Format::CommonJsUnlessModuleSyntax => {
                    let text = self.text(&name)?;
                    if crate::modules::has_module_syntax(&text) {
                        text
                    } else {
                        commonjs_facade(&name)
                    }
                }
            };
            Ok(ModuleSource::new(
                ModuleType::JavaScript,
                ModuleSourceCode::String(code.into()),
                specifier,
                None,
            ))
        };
        ModuleLoadResponse::Sync(load())
    }
}

impl PluginLoader {
    fn text(&self, name: &str) -> Result<String, JsErrorBox> {
        let bytes = self
            .files
            .read(name)
            .map_err(|why| JsErrorBox::generic(format!("import {name}: {why}")))?;
        String::from_utf8(bytes)
            .map_err(|e| JsErrorBox::generic(format!("import {name}: not UTF-8: {e}")))
    }
}

/// One instance of the plugin: a V8 isolate with the module evaluated.
pub struct V8Instance {
    // Field order: the watchdog (which holds the isolate's handle) ends first.
    watchdog: Watchdog,
    runtime: JsRuntime,
    out_of_memory: Arc<AtomicBool>,
    exports: Vec<String>,
    memory_limit: u64,
    tokio: Rc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for V8Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V8Instance")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

/// The V8 engine.
pub struct V8Engine {
    tokio: Rc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for V8Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V8Engine").finish_non_exhaustive()
    }
}

impl Default for V8Engine {
    fn default() -> Self {
        V8Engine::new()
    }
}

/// V8's own error classes: throwing one of these is a fault, not the plugin's error.
const ENGINE_ERRORS: [&str; 7] = [
    "TypeError",
    "ReferenceError",
    "RangeError",
    "SyntaxError",
    "EvalError",
    "URIError",
    "WebAssembly.RuntimeError",
];

impl V8Engine {
    pub fn new() -> V8Engine {
        V8Engine {
            tokio: Rc::new(
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("a current-thread runtime needs no resources"),
            ),
        }
    }
}

/// Create an isolate, run the module and its `init` within the load deadline.
fn instantiate(
    tokio: &Rc<tokio::runtime::Runtime>,
    spec: &LoadSpec,
    host: &Host,
) -> Result<V8Instance, LoadError> {
    let root = PathBuf::from(&spec.plugin_dir)
        .canonicalize()
        .map_err(|source| LoadError::Read {
            path: format!("plugin directory {}", spec.plugin_dir),
            source,
        })?;
    let entry = crate::modules::logical_name(&spec.entry).ok_or_else(|| LoadError::Entry {
        entry: spec.entry.clone(),
    })?;
    let memory = usize::try_from(spec.limits.memory_bytes).unwrap_or(usize::MAX);
    let files = PluginFiles::new(root.clone());
    // A CommonJS entry's functions are its module.exports, the facade's default.
    let commonjs_entry = matches!(files.format(&entry), Format::CommonJs | Format::Json);
    let mut runtime = JsRuntime::new(RuntimeOptions {
        module_loader: Some(Rc::new(PluginLoader {
            root: root.clone(),
            files: files.clone(),
        })),
        extensions: vec![corral_v8::init()],
        create_params: Some(v8::CreateParams::default().heap_limits(0, memory)),
        ..Default::default()
    });
    {
        let state = runtime.op_state();
        let mut state = state.borrow_mut();
        state.put(HostHandle(host.clone()));
        state.put(files.clone());
        state.put(CallIo::default());
    }
    let handle = runtime.v8_isolate().thread_safe_handle();
    let out_of_memory = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&out_of_memory);
        let handle = handle.clone();
        runtime.add_near_heap_limit_callback(move |current, _initial| {
            flag.store(true, Ordering::SeqCst);
            handle.terminate_execution();
            // Room to unwind; the runtime is discarded afterwards.
            current + current / 2
        });
    }
    let watchdog = Watchdog::start(move || {
        handle.terminate_execution();
    })
    .map_err(|e| LoadError::Engine(format!("cannot start the deadline thread: {e}")))?;
    let init_deadline = Duration::from_millis(spec.limits.init_deadline_ms.max(1));
    let main = ModuleSpecifier::from_file_path(root.join("__corral_main__.js"))
        .map_err(|()| LoadError::Engine("the plugin directory is not an absolute path".into()))?;
    let import = if commonjs_entry {
        "import plugin from"
    } else {
        "import * as plugin from"
    };
    let code = format!(
        "{import} {:?};\nawait globalThis.__corral.bind(plugin);\n",
        format!("./{entry}")
    );
    let armed = watchdog.arm(init_deadline);
    let result = tokio.block_on(async {
        let id = runtime.load_main_es_module_from_code(&main, code).await?;
        let evaluated = runtime.mod_evaluate(id);
        runtime
            .run_event_loop(PollEventLoopOptions::default())
            .await?;
        evaluated.await
    });
    let timed_out = armed.fired();
    drop(armed);
    if timed_out && result.is_ok() {
        // The deadline fired as the load ended: no termination may be left pending.
        runtime.v8_isolate().cancel_terminate_execution();
    }
    if let Err(e) = result {
        let message = if timed_out {
            "interrupted".to_owned()
        } else {
            e.to_string()
        };
        return Err(LoadError::plugin_code(
            "loading the module",
            message,
            timed_out,
            init_deadline,
        ));
    }
    let exports = std::mem::take(
        &mut runtime
            .op_state()
            .borrow_mut()
            .borrow_mut::<CallIo>()
            .exports,
    );
    Ok(V8Instance {
        watchdog,
        runtime,
        out_of_memory,
        exports,
        memory_limit: spec.limits.memory_bytes,
        tokio: Rc::clone(tokio),
    })
}

/// The typed error for a failed call.
fn classify(
    e: &deno_core::error::CoreError,
    deadline_ms: u64,
    timed_out: bool,
    oom: bool,
    limit: u64,
) -> CallError {
    if oom {
        return CallError::MemoryLimit { limit_bytes: limit };
    }
    if timed_out {
        return CallError::Timeout { deadline_ms };
    }
    match &*e.0 {
        deno_core::error::CoreErrorKind::Js(js) => {
            let name = js.name.clone().unwrap_or_else(|| "Error".into());
            let mut text = js.message.clone().unwrap_or_default();
            if let Some(stack) = &js.stack {
                text.push('\n');
                text.push_str(stack.trim_end());
            }
            if ENGINE_ERRORS.contains(&name.as_str()) {
                CallError::Trap {
                    message: format!("{name}: {text}"),
                }
            } else {
                CallError::Plugin { message: text }
            }
        }
        other => CallError::Trap {
            message: other.to_string(),
        },
    }
}

impl corral_worker::Engine for V8Engine {
    type Instance = V8Instance;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: Runtime::Js,
            version: format!("V8 {} (deno_core)", v8::VERSION_STRING),
        }
    }

    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<V8Instance, LoadError> {
        instantiate(&self.tokio, spec, host)
    }
}

impl corral_worker::Instance for V8Instance {
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
        {
            let state = self.runtime.op_state();
            let mut state = state.borrow_mut();
            let io = state.borrow_mut::<CallIo>();
            io.input = input.to_vec();
            io.output = None;
        }
        let deadline_ms = deadline.as_millis() as u64;
        let script = format!(
            "globalThis.__corral.call({})",
            serde_json::to_string(function).expect("a string serialises")
        );
        let armed = self.watchdog.arm(deadline);
        let runtime = &mut self.runtime;
        let result = self.tokio.block_on(async {
            let promise = runtime.execute_script("<corral>", script)?;
            let settled = runtime.resolve(promise);
            runtime
                .with_event_loop_promise(settled, PollEventLoopOptions::default())
                .await
        });
        let timed_out = armed.fired();
        drop(armed);
        if timed_out && result.is_ok() {
            // The deadline fired as the call settled: the answer stands, and no
            // termination is left pending for the next call.
            self.runtime.v8_isolate().cancel_terminate_execution();
        }
        let oom = self.out_of_memory.load(Ordering::SeqCst);
        match result {
            Ok(_) => {
                let state = self.runtime.op_state();
                let output = state.borrow_mut().borrow_mut::<CallIo>().output.take();
                output.ok_or_else(|| CallError::Trap {
                    message: "the call settled without an output".into(),
                })
            }
            Err(e) => Err(classify(&e, deadline_ms, timed_out, oom, self.memory_limit)),
        }
    }

    fn shutdown(&mut self, grace: Duration, _host: &Host) {
        let _armed = self.watchdog.arm(grace);
        let runtime = &mut self.runtime;
        let _ = self.tokio.block_on(async {
            let promise = runtime.execute_script("<corral>", "globalThis.__corral.shutdown()")?;
            let settled = runtime.resolve(promise);
            runtime
                .with_event_loop_promise(settled, PollEventLoopOptions::default())
                .await
        });
    }
}
