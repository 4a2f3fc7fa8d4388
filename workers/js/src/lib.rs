//! The JavaScript engine of Corral workers: QuickJS (quickjs-ng, through rquickjs
//! 0.14), one runtime per instance of the plugin.
//!
//! # The plugin contract
//!
//! `entry` in plugin.toml names an ES module in the plugin directory. Its exported
//! functions are the plugin's functions; each takes the input as a `Uint8Array` and
//! returns a `Uint8Array` or a string (sent as UTF-8), or a promise of one. Optional
//! exports `init()` and `shutdown()` are the lifecycle hooks; they are not callable
//! functions.
//!
//! ```js
//! export function greet(input) {
//!   const name = corral.text(input);
//!   if (!name) throw new Error("give a name to greet");   // a plugin error
//!   corral.log("info", `greeting ${name}`);
//!   return `Hello, ${name}!`;
//! }
//! ```
//!
//! Imports resolve only to files inside the plugin directory, by relative path
//! (`./lib/util.js`); anything else (`"fs"`, `"../x.js"`, absolute paths) fails the
//! load with an error naming the import.
//!
//! The host API is the global `corral`, frozen, under the same names as the Wasm
//! imports: `log(level, message)` (`"error" | "warn" | "info" | "debug" | "trace"`),
//! `now_ms()` (wall clock from the supervisor); plus helpers for bytes: `text(bytes)`
//! (strict UTF-8), `bytes(string)`, `json(bytes)`, `json_bytes(value)`.
//!
//! # Errors and limits
//!
//! | the plugin | the call gets |
//! |---|---|
//! | throws an `Error` (or its own subclass, or any non-error value) | `CallError::Plugin` with the message and JS stack |
//! | throws one of the engine's own errors (`TypeError`, `ReferenceError`, `RangeError`, `SyntaxError`, `InternalError` such as a stack overflow) | `CallError::Trap` with the stack |
//! | runs past the deadline (interrupt handler) | `CallError::Timeout` |
//! | allocates past its memory limit | `CallError::MemoryLimit` |
//! | returns more than `max_output` | `CallError::OutputTooLarge` |
//!
//! After a trap, timeout or memory limit the worker loop discards the instance (its
//! runtime) and the next call gets a fresh one (the module and `init` run again), as
//! in every engine; the process stays.

mod api;
pub mod bytecode;
mod loader;
pub mod modules;
pub use loader::{PluginLoader, PluginResolver};
pub use modules::PluginFiles;
#[cfg(feature = "v8")]
pub mod v8;
#[cfg(feature = "v8")]
pub use v8::V8Engine;

use corral_protocol::{CallError, Code, LoadSpec};
use corral_worker::{EngineInfo, Host, LoadError};
use rquickjs::promise::MaybePromise;
use rquickjs::{
    CatchResultExt, CaughtError, Context, Ctx, FromJs, Function, Module, Object, Persistent,
    Runtime, Value,
};
use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The QuickJS version the worker reports (quickjs-ng, bundled by rquickjs-sys).
pub const QUICKJS_VERSION: &str = "quickjs-ng 0.16 (rquickjs 0.14.0)";

/// Stack QuickJS may use for plugin code (deep recursion is a trap, not a crash).
const MAX_STACK: usize = 1 << 20;

/// Exports that are lifecycle hooks, not callable functions.
const HOOKS: [&str; 2] = ["init", "shutdown"];

/// The engine's own error classes: throwing one of these is a fault, not the plugin's
/// deliberate error.
const ENGINE_ERRORS: [&str; 7] = [
    "TypeError",
    "ReferenceError",
    "RangeError",
    "SyntaxError",
    "InternalError",
    "EvalError",
    "URIError",
];

/// One instance of the plugin: its runtime, context and module namespace.
pub struct JsInstance {
    // Field order: the namespace handle must go before the context and runtime.
    namespace: Persistent<Object<'static>>,
    context: Context,
    runtime: Runtime,
    exports: Vec<String>,
    /// The running call's deadline, read by the interrupt handler.
    deadline: Rc<Cell<Option<Instant>>>,
    memory_limit: u64,
}

impl std::fmt::Debug for JsInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsInstance")
            .field("exports", &self.exports)
            .finish_non_exhaustive()
    }
}

/// The QuickJS engine: one runtime per instance, no state of its own.
#[derive(Debug, Default)]
pub struct JsEngine;

impl JsEngine {
    pub fn new() -> JsEngine {
        JsEngine
    }
}

/// The plugin's root and its entry's logical name.
fn plugin_root(spec: &LoadSpec) -> Result<(PathBuf, String), LoadError> {
    let root = PathBuf::from(&spec.plugin_dir)
        .canonicalize()
        .map_err(|source| LoadError::Read {
            path: format!("plugin directory {}", spec.plugin_dir),
            source,
        })?;
    let entry = modules::logical_name(&spec.entry).ok_or_else(|| LoadError::Entry {
        entry: spec.entry.clone(),
    })?;
    Ok((root, entry))
}

/// A runtime within the plugin's memory limit and QuickJS's stack limit.
fn new_runtime(spec: &LoadSpec) -> Result<Runtime, LoadError> {
    let runtime = Runtime::new()
        .map_err(|e| LoadError::Engine(format!("cannot create a QuickJS runtime: {e}")))?;
    runtime.set_memory_limit(usize::try_from(spec.limits.memory_bytes).unwrap_or(usize::MAX));
    runtime.set_max_stack_size(MAX_STACK);
    Ok(runtime)
}

/// The precompiled modules `spec` names (`Code::Precompiled`), if any.
fn precompiled(spec: &LoadSpec) -> Result<Option<bytecode::Modules>, LoadError> {
    let Code::Precompiled(path) = &spec.code else {
        return Ok(None);
    };
    let refused = |message: String| LoadError::Invalid {
        path: path.clone(),
        message: format!(
            "the precompiled modules are refused: {message} (remove the file and the next \
             start compiles them again)"
        ),
    };
    let modules = bytecode::read(
        std::path::Path::new(path),
        corral_protocol::MAX_BYTECODE_BYTES,
    )
    .map_err(refused)?;
    Ok(Some(std::rc::Rc::new(std::cell::RefCell::new(modules))))
}

/// Create a runtime, run the module and its `init` within the load deadline.
fn instantiate(spec: &LoadSpec, host: &Host) -> Result<JsInstance, LoadError> {
    let (root, entry) = plugin_root(spec)?;
    let bytecode = precompiled(spec)?;
    let runtime = new_runtime(spec)?;
    let deadline = Rc::new(Cell::new(None::<Instant>));
    let watched = Rc::clone(&deadline);
    runtime.set_interrupt_handler(Some(Box::new(move || {
        watched.get().is_some_and(|d| Instant::now() >= d)
    })));
    let files = PluginFiles::new(root.clone());
    let loader = match &bytecode {
        Some(b) => PluginLoader::with_bytecode(files.clone(), std::rc::Rc::clone(b)),
        None => PluginLoader::new(files.clone()),
    };
    runtime.set_loader(PluginResolver::new(files.clone()), loader);
    let context = Context::full(&runtime)
        .map_err(|e| LoadError::Engine(format!("cannot create a QuickJS context: {e}")))?;

    let init_deadline = Duration::from_millis(spec.limits.init_deadline_ms.max(1));
    deadline.set(Some(Instant::now() + init_deadline));
    let engine = |what: &str, e: rquickjs::Error| LoadError::Engine(format!("{what}: {e}"));
    let result = context.with(
        |ctx| -> Result<(Persistent<Object<'static>>, Vec<String>), LoadError> {
            api::install(&ctx, host.clone())
                .map_err(|e| engine("cannot install the host API", e))?;
            loader::install_commonjs(&ctx, files.clone())
                .map_err(|e| engine("cannot install the CommonJS runtime", e))?;
            let commonjs_entry = matches!(
                files.format(&entry),
                modules::Format::CommonJs | modules::Format::Json
            );
            let declared = match bytecode
                .as_ref()
                .filter(|b| b.borrow().contains_key(&entry))
            {
                Some(b) => bytecode::declare(&ctx, &files, Some(b), &entry),
                None => {
                    let source =
                        loader::es_source(&ctx, &files, &entry).map_err(|why| LoadError::Read {
                            path: spec.entry.clone(),
                            source: std::io::Error::other(why),
                        })?;
                    Module::declare(ctx.clone(), entry.clone(), source)
                }
            };
            let evaluated = declared
                .and_then(|m| m.eval())
                .catch(&ctx)
                .map_err(|e| load_failure(&ctx, e, "loading the module", init_deadline))?;
            // The static module graph is loaded: what the bundle holds besides
            // is not needed again (a dynamic import parses its source).
            if let Some(b) = &bytecode {
                b.borrow_mut().clear();
            }
            let (module, promise) = evaluated;
            promise
                .finish::<()>()
                .catch(&ctx)
                .map_err(|e| load_failure(&ctx, e, "loading the module", init_deadline))?;
            let mut namespace = module
                .namespace()
                .map_err(|e| engine("cannot read the module's exports", e))?;
            if commonjs_entry {
                // A CommonJS entry's functions are those of its `module.exports`.
                namespace = namespace
                    .get::<_, Value>("default")
                    .ok()
                    .and_then(|v| v.into_object())
                    .ok_or_else(|| {
                        LoadError::Engine(format!(
                            "the entry {entry} is CommonJS and its module.exports is not an \
                             object of functions"
                        ))
                    })?;
            }
            let mut exports = Vec::new();
            let mut init = None;
            for key in namespace.keys::<String>() {
                let key = key.map_err(|e| engine("cannot read the module's exports", e))?;
                let value: Value = namespace
                    .get(&key)
                    .map_err(|e| engine("cannot read the module's exports", e))?;
                if let Some(f) = value.as_function() {
                    if key == "init" {
                        init = Some(f.clone());
                    } else if !HOOKS.contains(&key.as_str()) {
                        exports.push(key);
                    }
                }
            }
            exports.sort();
            if let Some(init) = init {
                let ret: Value = init
                    .call(())
                    .catch(&ctx)
                    .map_err(|e| load_failure(&ctx, e, "init", init_deadline))?;
                MaybePromise::from_value(ret)
                    .finish::<Value>()
                    .catch(&ctx)
                    .map_err(|e| load_failure(&ctx, e, "init", init_deadline))?;
            }
            Ok((Persistent::save(&ctx, namespace), exports))
        },
    );
    deadline.set(None);
    let (namespace, exports) = result?;
    Ok(JsInstance {
        namespace,
        context,
        runtime,
        exports,
        deadline,
        memory_limit: spec.limits.memory_bytes,
    })
}

/// The load error for plugin code that failed while loading: past the deadline if
/// the engine interrupted it.
fn load_failure<'js>(
    ctx: &Ctx<'js>,
    e: CaughtError<'js>,
    during: &'static str,
    init_deadline: Duration,
) -> LoadError {
    let message = describe(ctx, e);
    let interrupted = message.contains("interrupted");
    LoadError::plugin_code(during, message, interrupted, init_deadline)
}

/// A readable account of a failure while loading: the class, message and stack.
fn describe<'js>(ctx: &Ctx<'js>, e: CaughtError<'js>) -> String {
    let (name, message, stack) = parts(ctx, &e);
    let mut s = format!("{name}: {message}");
    if !stack.trim().is_empty() {
        s.push('\n');
        s.push_str(stack.trim_end());
    }
    s
}

/// Most stack frames kept in an error (a stack overflow has thousands).
const MAX_FRAMES: usize = 32;

/// `stack` cut to [`MAX_FRAMES`] lines, saying how many were left out.
fn trim_stack(stack: String) -> String {
    let lines: Vec<&str> = stack.lines().collect();
    if lines.len() <= MAX_FRAMES {
        return stack;
    }
    format!(
        "{}\n    ... {} more frames",
        lines[..MAX_FRAMES].join("\n"),
        lines.len() - MAX_FRAMES
    )
}

/// (error class, message, stack) of a caught error.
fn parts<'js>(ctx: &Ctx<'js>, e: &CaughtError<'js>) -> (String, String, String) {
    match e {
        CaughtError::Exception(ex) => {
            let name = ex
                .as_object()
                .get::<_, String>("name")
                .unwrap_or_else(|_| "Error".into());
            (
                name,
                ex.message().unwrap_or_default(),
                trim_stack(ex.stack().unwrap_or_default()),
            )
        }
        CaughtError::Value(v) => {
            let text = if v.is_null() {
                "null".to_owned()
            } else if let Some(s) = v.as_string() {
                s.to_string().unwrap_or_default()
            } else {
                rquickjs::Coerced::<String>::from_js(ctx, v.clone())
                    .map(|c| c.0)
                    .unwrap_or_else(|_| v.type_name().to_owned())
            };
            ("thrown value".to_owned(), text, String::new())
        }
        CaughtError::Error(e) => ("engine error".to_owned(), e.to_string(), String::new()),
    }
}

impl corral_worker::Engine for JsEngine {
    type Instance = JsInstance;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            runtime: corral_protocol::Runtime::Js,
            version: QUICKJS_VERSION.to_owned(),
        }
    }

    fn instantiate(&mut self, spec: &LoadSpec, host: &Host) -> Result<JsInstance, LoadError> {
        instantiate(spec, host)
    }

    fn precompile(&mut self, spec: &LoadSpec, out: &mut std::fs::File) -> Result<(), LoadError> {
        use std::io::Write;
        let bundle = precompile(spec)?;
        out.write_all(&bundle)
            .map_err(|e| LoadError::Engine(format!("cannot write the compiled modules: {e}")))
    }
}

/// The bundle of bytecode of the entry of `spec` and every module it imports
/// statically ([`bytecode`]): parsed, never evaluated.
fn precompile(spec: &LoadSpec) -> Result<Vec<u8>, LoadError> {
    let (root, entry) = plugin_root(spec)?;
    let runtime = new_runtime(spec)?;
    let files = PluginFiles::new(root);
    let out = bytecode::Recorded::default();
    runtime.set_loader(
        PluginResolver::new(files.clone()),
        PluginLoader::recording(files.clone(), std::rc::Rc::clone(&out)),
    );
    let context = Context::full(&runtime)
        .map_err(|e| LoadError::Engine(format!("cannot create a QuickJS context: {e}")))?;
    let code = context.with(|ctx| -> Result<Vec<u8>, LoadError> {
        let source = loader::es_source(&ctx, &files, &entry).map_err(|why| LoadError::Read {
            path: spec.entry.clone(),
            source: std::io::Error::other(why),
        })?;
        bytecode::compile_entry(&ctx, &entry, source)
            .catch(&ctx)
            .map_err(|e| LoadError::Engine(format!("compiling the modules: {}", describe(&ctx, e))))
    })?;
    let mut modules = std::mem::take(&mut *out.borrow_mut());
    modules.push((entry, code));
    Ok(bytecode::encode(&modules))
}

impl corral_worker::Instance for JsInstance {
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
        let started = Instant::now();
        self.deadline.set(Some(started + deadline));
        let memory_limit = self.memory_limit;
        let deadline_ms = deadline.as_millis() as u64;
        let result = self.context.with(|ctx| -> Result<Vec<u8>, CallError> {
            let namespace = self
                .namespace
                .clone()
                .restore(&ctx)
                .map_err(|e| CallError::Trap {
                    message: format!("module namespace lost: {e}"),
                })?;
            let f: Function = namespace.get(function).map_err(|e| CallError::Trap {
                message: e.to_string(),
            })?;
            let arg = rquickjs::TypedArray::<u8>::new_copy(ctx.clone(), input)
                .catch(&ctx)
                .map_err(|e| classify(&ctx, e, started, deadline_ms, memory_limit))?;
            let ret: Value = f
                .call((arg,))
                .catch(&ctx)
                .map_err(|e| classify(&ctx, e, started, deadline_ms, memory_limit))?;
            let ret: Value = MaybePromise::from_value(ret)
                .finish()
                .catch(&ctx)
                .map_err(|e| classify(&ctx, e, started, deadline_ms, memory_limit))?;
            api::output(&ret)
        });
        self.deadline.set(None);
        result
    }

    fn shutdown(&mut self, grace: Duration, _host: &Host) {
        self.deadline.set(Some(Instant::now() + grace));
        self.context.with(|ctx| {
            let Ok(namespace) = self.namespace.clone().restore(&ctx) else {
                return;
            };
            if let Ok(f) = namespace.get::<_, Function>("shutdown") {
                let ret: rquickjs::Result<Value> = f.call(());
                if let Ok(v) = ret {
                    let _ = MaybePromise::from_value(v).finish::<Value>();
                }
            }
        });
        self.deadline.set(None);
    }

    fn memory_bytes(&self) -> u64 {
        self.runtime.memory_usage().malloc_size.max(0) as u64
    }
}

/// The typed error for a failed call.
fn classify<'js>(
    ctx: &Ctx<'js>,
    e: CaughtError<'js>,
    started: Instant,
    deadline_ms: u64,
    memory_limit: u64,
) -> CallError {
    let past_deadline = started.elapsed() >= Duration::from_millis(deadline_ms);
    if let CaughtError::Error(rquickjs::Error::WouldBlock) = e {
        // A promise that can never settle: its job was interrupted, or it awaits
        // nothing the engine can run.
        return if past_deadline {
            CallError::Timeout { deadline_ms }
        } else {
            CallError::Trap {
                message: "the function returned a promise that never settles".into(),
            }
        };
    }
    let (name, message, stack) = parts(ctx, &e);
    if name == "InternalError" && message == "interrupted" && past_deadline {
        return CallError::Timeout { deadline_ms };
    }
    let out_of_memory = (name == "InternalError" && message == "out of memory")
        || matches!(&e, CaughtError::Value(v) if v.is_null());
    if out_of_memory {
        return CallError::MemoryLimit {
            limit_bytes: memory_limit,
        };
    }
    let mut text = message;
    if !stack.trim().is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rquickjs::CatchResultExt;

    fn spec(dir: &std::path::Path, entry: &str) -> LoadSpec {
        LoadSpec {
            plugin_id: "p".into(),
            plugin_dir: dir.to_string_lossy().into_owned(),
            entry: entry.into(),
            limits: corral_protocol::EngineLimits {
                memory_bytes: 64 << 20,
                max_output_bytes: 1 << 20,
                init_deadline_ms: 1000,
            },
            code: Code::CompileOnly,
            config: Default::default(),
            secrets: Default::default(),
        }
    }

    fn write(dir: &std::path::Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A plugin of three modules: the entry, a library it imports, and a CommonJS
    /// package (whose facade is an ES module). With `hostile`, the entry's
    /// top-level code never ends and the library's throws.
    fn plugin(hostile: bool) -> tempfile::TempDir {
        let top = |code: &str| {
            if hostile {
                code.to_owned()
            } else {
                String::new()
            }
        };
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "main.js",
            &("import { twice } from './lib/twice.js';\n\
             import pkg from 'pkg';\n\
             export function run(n) { return twice(n) + pkg.one; }\n\
             export function fail() {\n  throw new Error('from main');\n}\n"
                .to_owned()
                + &top("for (;;) {}\n")),
        );
        write(
            d.path(),
            "lib/twice.js",
            &("export const twice = (n) => 2 * n;\n".to_owned()
                + &top("throw new Error('ran');\n")),
        );
        write(
            d.path(),
            "node_modules/pkg/index.js",
            "module.exports = { one: 1 };\n",
        );
        d
    }

    #[test]
    fn a_bundle_holds_the_static_graph_parsed_and_never_run() {
        let d = plugin(true);
        // Were any top-level code run, the compile would never end (or fail).
        let bundle = bytecode::decode(&precompile(&spec(d.path(), "main.js")).unwrap()).unwrap();
        let mut names: Vec<_> = bundle.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            ["lib/twice.js", "main.js", "node_modules/pkg/index.js"]
        );
        // A syntax error in an imported module fails the compile, naming it.
        write(d.path(), "lib/twice.js", "export const twice = (n) => ;\n");
        let e = precompile(&spec(d.path(), "main.js"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SyntaxError") && e.contains("lib/twice.js"),
            "{e}"
        );
        // An import that does not resolve, too.
        write(d.path(), "lib/twice.js", "import './gone.js';\n");
        let e = precompile(&spec(d.path(), "main.js"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone.js"), "{e}");
    }

    /// The same runs from the bytecode as from the source: results, and errors
    /// with their file and line; every module is taken from the bundle.
    #[test]
    fn modules_loaded_from_their_bytecode_run_as_from_source() {
        let d = plugin(false);
        let s = spec(d.path(), "main.js");
        let modules = bytecode::decode(&precompile(&s).unwrap()).unwrap();
        let modules: bytecode::Modules = std::rc::Rc::new(std::cell::RefCell::new(modules));
        let root = d.path().canonicalize().unwrap();
        let files = PluginFiles::new(root);
        let runtime = new_runtime(&s).unwrap();
        runtime.set_loader(
            PluginResolver::new(files.clone()),
            PluginLoader::with_bytecode(files.clone(), std::rc::Rc::clone(&modules)),
        );
        let context = Context::full(&runtime).unwrap();
        context.with(|ctx| {
            loader::install_commonjs(&ctx, files.clone()).unwrap();
            let (module, promise) = bytecode::declare(&ctx, &files, Some(&modules), "main.js")
                .and_then(|m| m.eval())
                .catch(&ctx)
                .unwrap();
            promise.finish::<()>().catch(&ctx).unwrap();
            let ns = module.namespace().unwrap();
            let run: Function = ns.get("run").unwrap();
            assert_eq!(run.call::<_, i32>((20,)).unwrap(), 41);
            let fail: Function = ns.get("fail").unwrap();
            let e = fail.call::<_, ()>(()).catch(&ctx).unwrap_err();
            let text = describe(&ctx, e);
            assert!(
                text.contains("from main") && text.contains("main.js:5"),
                "{text}"
            );
        });
        // Every module came from the bundle (for the CommonJS package, the ES
        // facade standing for it; its body is compiled when it is required).
        assert!(modules.borrow().is_empty(), "{:?}", modules.borrow().keys());
    }
}
