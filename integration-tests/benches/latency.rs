//! Latency of Corral calls beside baselines measured in the same run.
//!
//! Run with `cargo bench --workspace --bench latency`. Prints median,
//! p99 and mean for:
//!
//! - warm call: `Supervisor::call` of the example plugin's empty `noop` function on
//!   a running worker, beside a raw Unix-socket echo round trip with a second
//!   process (same 4-byte length + payload framing) and an in-process wasmtime call
//!   of the same function;
//! - cold start: from a new supervisor to the first result (its zygote template
//!   started, the worker forked, handshake, load from the module cache, call), and
//!   in a running supervisor the first call of a plugin not started yet, with the
//!   worker started by exec and forked from the running template; beside
//!   fork+exec+wait of `/bin/true` and a bare in-process engine start (deserialize
//!   the precompiled module, instantiate, call).
//! - the same warm call and cold start for the JavaScript and Python examples,
//!   beside QuickJS's own start in process (runtime, context, the example's module
//!   and its vendored library, a call) and CPython's own start (`python3 -I -S`
//!   importing what the example imports, as a process).
//! - host call round trip (plugin -> supervisor -> plugin) in each runtime: the
//!   example's `now` (one host call) and `news` (one `kv.get`: grant check and a
//!   redb read transaction) beside its `noop`; the difference of medians is the
//!   host call, quoted against the raw socket round trip.
//!
//! Every measurement runs twice: with the whole process tree pinned to one CPU
//! (both ends of the socket share it: the floor) and unpinned. Machines here are
//! noisy: compare the ratios, not the absolute numbers.

use corral::Supervisor;
use corral_integration_tests::bench::{
    Stats, pin_to_cpu0, raw_socket_rtt, row, serve_echo_if_asked, spawn_wait, stats, unpin, us,
};
use corral_integration_tests::{built, options};
use std::process::Command;
use std::time::{Duration, Instant};

const WARM_ITERS: usize = 20_000;
const COLD_ITERS: usize = 60;

fn wasm_path() -> std::path::PathBuf {
    built()
        .hello_wasm
        .join("target/wasm32-wasip1/release/hello_wasm.wasm")
}

struct BenchState {
    wasi: wasmtime_wasi::p1::WasiP1Ctx,
    output: Vec<u8>,
}

struct InProcess {
    store: wasmtime::Store<BenchState>,
    alloc: wasmtime::TypedFunc<i32, i32>,
    noop: wasmtime::TypedFunc<(i32, i32), i32>,
}

fn in_process_instance(engine: &wasmtime::Engine, module: &wasmtime::Module) -> InProcess {
    let mut linker: wasmtime::Linker<BenchState> = wasmtime::Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut BenchState| &mut s.wasi).unwrap();
    // The same copy-out work as the worker's `corral.output`.
    linker
        .func_wrap(
            "corral",
            "output",
            |mut caller: wasmtime::Caller<'_, BenchState>, ptr: i32, len: i32| {
                let mem = caller.get_export("memory").unwrap().into_memory().unwrap();
                let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
                let bytes = mem.data(&caller)[ptr..ptr + len].to_vec();
                caller.data_mut().output = bytes;
            },
        )
        .unwrap();
    linker.define_unknown_imports_as_traps(module).unwrap();
    let state = BenchState {
        wasi: wasmtime_wasi::WasiCtxBuilder::new().build_p1(),
        output: Vec::new(),
    };
    let mut store = wasmtime::Store::new(engine, state);
    store.set_epoch_deadline(u64::MAX / 2);
    let instance = linker.instantiate(&mut store, module).unwrap();
    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
        init.call(&mut store, ()).unwrap();
    }
    let alloc = instance
        .get_typed_func::<i32, i32>(&mut store, "corral_alloc")
        .unwrap();
    let noop = instance
        .get_typed_func::<(i32, i32), i32>(&mut store, "corral_fn_noop")
        .unwrap();
    InProcess { store, alloc, noop }
}

fn in_process_call(iters: usize) -> Stats {
    let engine = wasmtime::Engine::new(&corral_worker_wasm::engine_config()).unwrap();
    let module = wasmtime::Module::from_file(&engine, wasm_path()).unwrap();
    let mut p = in_process_instance(&engine, &module);
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        let ptr = p.alloc.call(&mut p.store, 0).unwrap();
        assert_eq!(p.noop.call(&mut p.store, (ptr, 0)).unwrap(), 0);
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    stats(samples)
}

fn bare_engine_start(iters: usize, cache: &std::path::Path) -> Stats {
    let engine = wasmtime::Engine::new(&corral_worker_wasm::engine_config()).unwrap();
    let bytes = std::fs::read(wasm_path()).unwrap();
    let cwasm = cache.join("bare.cwasm");
    std::fs::write(&cwasm, engine.precompile_module(&bytes).unwrap()).unwrap();
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let engine = wasmtime::Engine::new(&corral_worker_wasm::engine_config()).unwrap();
        // SAFETY: the file was just written by `precompile_module` of this config.
        let module = unsafe { wasmtime::Module::deserialize_file(&engine, &cwasm) }.unwrap();
        let mut p = in_process_instance(&engine, &module);
        let ptr = p.alloc.call(&mut p.store, 0).unwrap();
        p.noop.call(&mut p.store, (ptr, 0)).unwrap();
        samples.push(t.elapsed());
    }
    stats(samples)
}

/// QuickJS's own start, in process: runtime, context, the example's module (with
/// the library it imports), one call of `noop`.
fn bare_quickjs_start(iters: usize, dir: &std::path::Path) -> Stats {
    bare_quickjs(iters, dir, None)
}

/// [`bare_quickjs_start`], each module from `bundle` if given (and all of them
/// taken from it), else parsed from its source as the worker's loader does.
fn bare_quickjs(
    iters: usize,
    dir: &std::path::Path,
    bundle: Option<&std::collections::HashMap<String, Vec<u8>>>,
) -> Stats {
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let modules = bundle.map(|b| std::rc::Rc::new(std::cell::RefCell::new(b.clone())));
        let runtime = rquickjs::Runtime::new().unwrap();
        // The worker's own resolver and loader (inside the plugin directory).
        let files = corral_worker_js::PluginFiles::new(dir.canonicalize().unwrap());
        let loader = match &modules {
            Some(m) => corral_worker_js::PluginLoader::with_bytecode(files.clone(), m.clone()),
            None => corral_worker_js::PluginLoader::new(files.clone()),
        };
        runtime.set_loader(corral_worker_js::PluginResolver::new(files.clone()), loader);
        let context = rquickjs::Context::full(&runtime).unwrap();
        context.with(|ctx| {
            use rquickjs::CatchResultExt;
            // Named by its logical name, as the worker does.
            let (module, promise) =
                corral_worker_js::bytecode::declare(&ctx, &files, modules.as_ref(), "main.js")
                    .and_then(|m| m.eval())
                    .catch(&ctx)
                    .unwrap_or_else(|e| panic!("bare QuickJS: {e}"));
            promise
                .finish::<()>()
                .catch(&ctx)
                .unwrap_or_else(|e| panic!("bare QuickJS: {e}"));
            let f: rquickjs::Function = module.namespace().unwrap().get("noop").unwrap();
            f.call::<_, ()>(()).unwrap();
        });
        if let Some(m) = &modules {
            assert!(m.borrow().is_empty(), "every module from its bytecode");
        }
        samples.push(t.elapsed());
    }
    stats(samples)
}

/// The bundle a compile helper makes for the example in `dir`: every module's
/// bytecode, by name.
fn quickjs_bundle(dir: &std::path::Path) -> std::collections::HashMap<String, Vec<u8>> {
    use corral_worker_js::bytecode;
    let root = dir.canonicalize().unwrap();
    let files = corral_worker_js::PluginFiles::new(root);
    let runtime = rquickjs::Runtime::new().unwrap();
    let out = bytecode::Recorded::default();
    runtime.set_loader(
        corral_worker_js::PluginResolver::new(files.clone()),
        corral_worker_js::PluginLoader::recording(files.clone(), std::rc::Rc::clone(&out)),
    );
    let context = rquickjs::Context::full(&runtime).unwrap();
    let source = std::fs::read(dir.join("main.js")).unwrap();
    let code = context
        .with(|ctx| bytecode::compile_entry(&ctx, "main.js", source))
        .unwrap();
    let mut modules = std::mem::take(&mut *out.borrow_mut());
    modules.push(("main.js".to_owned(), code));
    modules.into_iter().collect()
}

/// [`bare_quickjs_start`] from the bytecode the worker loads instead of the
/// source: what in-process QuickJS costs with the same cache.
fn bare_quickjs_from_bytecode(iters: usize, dir: &std::path::Path) -> Stats {
    bare_quickjs(iters, dir, Some(&quickjs_bundle(dir)))
}

/// From a new supervisor over a new cache to the first result: the compile
/// helper first, then the worker (what the first start of new code costs).
fn first_start_of_new_code(rt: &tokio::runtime::Runtime, iters: usize, ex: Example) -> Stats {
    rt.block_on(async {
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let cache = corral_integration_tests::open_tempdir();
            let sup = hello_supervisor(&bench_options(Some(cache.path()), true), ex);
            let t = Instant::now();
            noop(&sup, ex).await;
            samples.push(t.elapsed());
            sup.shutdown(Duration::from_secs(1)).await;
        }
        stats(samples)
    })
}

/// CPython's own start, as a process: `python3 -I -S` (isolated, no `site`, as the
/// worker runs it) importing what the example imports.
fn bare_python_start(iters: usize) -> Stats {
    // The interpreter itself, not pyenv's shim script in front of it.
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let status = Command::new(&python)
            .args(["-I", "-S", "-c", "import collections, json, re"])
            .status()
            .unwrap();
        assert!(status.success());
        samples.push(t.elapsed());
    }
    stats(samples)
}

/// A row for a cold start beside its bare engine: the ratio and the difference of
/// the medians (the target is a difference).
/// A host call's cost: the difference of medians, beside the raw socket round trip.
fn host_row(name: &str, with: Stats, without: Stats, raw: Stats) {
    let d = us(with.p50).max(0.0) - us(without.p50);
    println!(
        "{name:<58} +{d:>8.1} us over the empty call = {:.2}x the raw socket round trip",
        d / us(raw.p50)
    );
}

fn cold_row(name: &str, s: Stats, bare: Stats) {
    row(name, s, Some(bare));
    println!(
        "      p50 difference from the bare engine: {:+.2} ms",
        (us(s.p50) - us(bare.p50)) / 1000.0
    );
}

/// Options for a measured supervisor: its own cache (or none) and cgroups on or off.
fn bench_options(cache: Option<&std::path::Path>, cgroups: bool) -> corral::Options {
    let mut o = options(cache.unwrap_or(std::path::Path::new("/nonexistent")));
    if cache.is_none() {
        o.cache_dir = None;
    }
    if !cgroups {
        o.cgroups = None;
    }
    o
}

/// An example plugin: its id and directory.
#[derive(Clone, Copy)]
struct Example<'a> {
    id: &'static str,
    dir: &'a std::path::Path,
}

/// A supervisor with the example plugin under `opts`.
fn hello_supervisor(opts: &corral::Options, ex: Example) -> Supervisor {
    let mut sup = Supervisor::new(opts.clone());
    sup.add_plugin_dir(ex.dir).unwrap();
    sup
}

/// One call of the empty function; asserts it answered.
async fn noop(sup: &Supervisor, ex: Example<'_>) {
    let out = sup.call(ex.id, "noop", Vec::new(), None).await;
    assert_eq!(out.unwrap(), b"");
}

fn warm_call(
    rt: &tokio::runtime::Runtime,
    iters: usize,
    opts: &corral::Options,
    ex: Example,
) -> Stats {
    warm_fn(rt, iters, opts, ex, "noop")
}

/// Warm calls of `function` (which must succeed).
fn warm_fn(
    rt: &tokio::runtime::Runtime,
    iters: usize,
    opts: &corral::Options,
    ex: Example,
    function: &str,
) -> Stats {
    rt.block_on(async {
        let sup = hello_supervisor(opts, ex);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            let out = sup.call(ex.id, function, Vec::new(), None).await;
            assert!(out.is_ok(), "{function}: {out:?}");
            if i >= iters / 10 {
                samples.push(t.elapsed());
            }
        }
        sup.shutdown(Duration::from_secs(1)).await;
        stats(samples)
    })
}

/// From an idle supervisor to the first result. One extra start comes first and is
/// not counted (it fills the module cache, when there is one).
fn cold_start(
    rt: &tokio::runtime::Runtime,
    iters: usize,
    opts: &corral::Options,
    ex: Example,
) -> Stats {
    rt.block_on(async {
        let mut samples = Vec::with_capacity(iters);
        for i in 0..=iters {
            let sup = hello_supervisor(opts, ex);
            let t = Instant::now();
            noop(&sup, ex).await;
            if i > 0 {
                samples.push(t.elapsed());
            }
            sup.shutdown(Duration::from_secs(1)).await;
        }
        stats(samples)
    })
}

/// From a running supervisor to the first result of a plugin it has not started
/// yet (what a daemon does at a plugin's first call): `iters` copies of the
/// example registered in one supervisor, the first call of each timed. One copy
/// goes first and is not counted (it fills the module cache and starts the
/// zygote template, when there is one).
fn cold_start_in_running(
    rt: &tokio::runtime::Runtime,
    iters: usize,
    opts: &corral::Options,
    ex: Example,
) -> Stats {
    let copies: Vec<_> = (0..=iters)
        .map(|i| corral_integration_tests::plugin_copy(ex.dir, &format!("c{i}")))
        .collect();
    let mut sup = Supervisor::new(opts.clone());
    for c in &copies {
        sup.add_plugin_dir(c.path()).unwrap();
    }
    rt.block_on(async {
        let mut samples = Vec::with_capacity(iters);
        for i in 0..=iters {
            let t = Instant::now();
            let out = sup.call(&format!("c{i}"), "noop", Vec::new(), None).await;
            assert_eq!(out.unwrap(), b"");
            if i > 0 {
                samples.push(t.elapsed());
            }
        }
        sup.shutdown(Duration::from_secs(2)).await;
        stats(samples)
    })
}

fn main() {
    serve_echo_if_asked();
    // `cargo bench` passes `--bench`; nextest/`cargo test --benches` lists with
    // `--list`: run nothing then.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (warm, cold) = if quick {
        (2_000, 10)
    } else {
        (WARM_ITERS, COLD_ITERS)
    };
    built();
    let cache = corral_integration_tests::open_tempdir();
    let js_dir = corral_integration_tests::example_plugin("hello-js");
    let py_dir = corral_integration_tests::example_plugin("hello-python");
    let wasm = Example {
        id: "hello-wasm",
        dir: &built().hello_wasm,
    };
    let js = Example {
        id: "hello-js",
        dir: js_dir.path(),
    };
    let python = Example {
        id: "hello-python",
        dir: py_dir.path(),
    };

    for pinned in [true, false] {
        if pinned {
            pin_to_cpu0();
        } else {
            unpin();
        }
        // Current-thread runtime: the supervisor's tasks for one call run on one
        // thread, as in a latency-sensitive embedding.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        println!(
            "\n== {} ==",
            if pinned {
                "pinned: supervisor and worker share CPU 0"
            } else {
                "unpinned: scheduler's choice of CPUs"
            }
        );
        println!("warm call of an empty function ({warm} samples)");
        let raw = raw_socket_rtt(warm);
        row("baseline: raw unix-socket echo round trip", raw, None);
        let inproc = in_process_call(warm);
        row("baseline: in-process wasmtime call", inproc, None);
        let cached = Some(cache.path());
        let w = warm_call(&rt, warm, &bench_options(cached, true), wasm);
        row("corral: Supervisor::call -> worker -> result", w, Some(raw));
        let w = warm_call(&rt, warm, &bench_options(cached, false), wasm);
        row("corral: same, worker without its cgroup", w, Some(raw));
        let w = warm_call(&rt, warm, &bench_options(cached, true), js);
        row("corral: same, JavaScript (QuickJS) worker", w, Some(raw));
        let w = warm_call(&rt, warm, &bench_options(cached, true), python);
        row("corral: same, Python (CPython) worker", w, Some(raw));
        println!("  (ratio: corral p50 / raw socket p50; target <= 2x)");

        println!("host call round trip: plugin -> supervisor -> plugin ({warm} samples)");
        println!("  (a call that makes one host call, beside the same call's empty twin;");
        println!("   the difference of the medians is the host call)");
        let mut shipped = bench_options(cached, true);
        shipped.policy = std::sync::Arc::new(corral::Policy::built_in());
        for ex in [wasm, js, python] {
            let base = warm_fn(&rt, warm, &shipped, ex, "noop");
            let now = warm_fn(&rt, warm, &shipped, ex, "now");
            let kv = warm_fn(&rt, warm, &shipped, ex, "news");
            row(&format!("{}: noop (no host call)", ex.id), base, Some(raw));
            row(&format!("{}: now (one host call)", ex.id), now, Some(raw));
            row(
                &format!("{}: news (one kv.get: grant check + redb read)", ex.id),
                kv,
                Some(raw),
            );
            host_row("  host call `now`", now, base, raw);
            host_row("  host call `kv.get`", kv, base, raw);
        }

        println!("cold start to first result ({cold} samples)");
        let fe = spawn_wait(cold, std::path::Path::new("/bin/true"), &[]);
        row("baseline: fork+exec+wait /bin/true", fe, None);
        let bare = bare_engine_start(cold, cache.path());
        row("baseline: bare engine start (cached module)", bare, None);
        let c = cold_start(&rt, cold, &bench_options(cached, true), wasm);
        row(
            "corral: new supervisor: template, fork, load (cached), call",
            c,
            Some(bare),
        );
        let c = cold_start(&rt, cold, &bench_options(cached, false), wasm);
        row("corral: same, worker without its cgroup", c, Some(bare));
        let u = cold_start(&rt, cold.min(10), &bench_options(None, true), wasm);
        row("corral: same, module compiled (no cache)", u, Some(bare));
        let mut exec = bench_options(cached, true);
        exec.zygotes = Vec::new();
        let c = cold_start_in_running(&rt, cold, &exec, wasm);
        row("corral: running supervisor, exec'd worker", c, Some(bare));
        let c = cold_start_in_running(&rt, cold, &bench_options(cached, true), wasm);
        row(
            "corral: running supervisor, forked (the default)",
            c,
            Some(bare),
        );
        println!(
            "  (ratio: corral p50 / bare engine start p50; target: cached p50 at most 0.5 ms (issue 16; 5 ms before it))"
        );

        println!("cold start, JavaScript ({cold} samples)");
        let bare = bare_quickjs_start(cold, js.dir);
        row(
            "baseline: bare QuickJS start in process (module, call)",
            bare,
            None,
        );
        let from_bytecode = bare_quickjs_from_bytecode(cold, js.dir);
        cold_row(
            "baseline: the same from the module graph's bytecode",
            from_bytecode,
            bare,
        );
        let mut exec = bench_options(cached, true);
        exec.zygotes = Vec::new();
        let c = cold_start(&rt, cold, &bench_options(cached, true), js);
        cold_row(
            "corral: new supervisor, template, fork, load, call",
            c,
            bare,
        );
        let c = cold_start(&rt, cold, &exec, js);
        cold_row(
            "corral: new supervisor, exec'd worker (zygotes off)",
            c,
            bare,
        );
        let c = first_start_of_new_code(&rt, cold, js);
        cold_row(
            "corral: the same over a new cache (compile helper first)",
            c,
            bare,
        );
        let c = cold_start_in_running(&rt, cold, &exec, js);
        cold_row(
            "corral: running supervisor, exec'd worker (zygotes off)",
            c,
            bare,
        );
        let c = cold_start_in_running(&rt, cold, &bench_options(cached, true), js);
        cold_row("corral: running supervisor, forked (the default)", c, bare);
        println!(
            "  (ratio: corral p50 / bare QuickJS start from source p50; the worker loads \
             bytecode: beside the bytecode baseline, divide by its ratio)"
        );
        println!("cold start, Python ({cold} samples)");
        let bare = bare_python_start(cold);
        row("baseline: python3 -I -S process, same imports", bare, None);
        let c = cold_start(&rt, cold, &bench_options(cached, true), python);
        cold_row(
            "corral: new supervisor, template, fork, load, call",
            c,
            bare,
        );
        let mut exec = bench_options(cached, true);
        exec.zygotes = Vec::new();
        let c = cold_start_in_running(&rt, cold, &exec, python);
        cold_row(
            "corral: running supervisor, exec'd worker (zygotes off)",
            c,
            bare,
        );
        let c = cold_start_in_running(&rt, cold, &bench_options(cached, true), python);
        cold_row(
            "corral: running supervisor, forked from its template",
            c,
            bare,
        );
        println!("  (target: at most half the bare python3 start)");
    }
}
