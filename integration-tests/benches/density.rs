//! What a plugin costs to keep and to bring in, beside baselines from the same run.
//!
//! Run with `cargo bench --workspace --bench density` (release; `-- --quick` for
//! fewer samples). Prints:
//!
//! - idle memory (PSS, from `/proc/<pid>/smaps_rollup`, summed over each worker's
//!   process tree, plus the zygote template's own PSS shared among its children)
//!   per worker, for N idle workers of each example plugin (Wasm modules
//!   byte-identical, as with many instances of one plugin): forked from a template
//!   and started by exec, and for Wasm with the store of compiled modules refused,
//!   so every worker compiles for itself (what Corral did before the store);
//! - registering a plugin vendoring 5,000 files (40 MB) beside a tiny one
//!   (`Supervisor::add_plugin_dir`: fingerprint, manifest, snapshot), in a new
//!   supervisor each time, with the store of file objects empty and with it
//!   holding the files already and their digests in its index;
//! - a one-shot `corral run` of the big plugin beside the tiny one, through the
//!   CLI;
//! - a one-shot `corral run` of the Python example beside the same imports in
//!   bubblewrap (`bwrap`, installed with apt if missing).
//!
//! Medians and p99 over the samples; the machines are shared: read the ratios.

use corral::Supervisor;
use corral_integration_tests::bench::{Stats, stats};
use corral_integration_tests::{built, example_plugin, open_tempdir, options, plugin_copy};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(name: &str, s: Stats, base: Option<Stats>) {
    let ratio = base.map_or(String::new(), |b| {
        format!(
            "{:>7.2}x  {:+.1} ms",
            s.p50.as_secs_f64() / b.p50.as_secs_f64(),
            ms(s.p50) - ms(b.p50)
        )
    });
    println!(
        "  {name:<58} p50 {:>8.2} ms   p99 {:>8.2} ms {ratio}",
        ms(s.p50),
        ms(s.p99)
    );
}

/// PSS in KiB of `pid` alone.
fn pss_own(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `PPid` of `pid`.
fn parent_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// PSS in KiB of `pid` and its descendants.
fn pss_tree(pid: u32) -> u64 {
    let own = pss_own(pid);
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    own + children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(pss_tree)
        .sum::<u64>()
}

/// Idle PSS per worker (KiB) of `n` copies of the plugin in `dir`, each called once.
fn idle_pss(rt: &tokio::runtime::Runtime, opts: &corral::Options, dir: &Path, n: usize) -> f64 {
    let copies: Vec<_> = (0..n).map(|i| plugin_copy(dir, &format!("p{i}"))).collect();
    let mut sup = Supervisor::new(opts.clone());
    for c in &copies {
        sup.add_plugin_dir(c.path()).unwrap();
    }
    rt.block_on(async {
        for i in 0..n {
            let out = sup.call(&format!("p{i}"), "noop", Vec::new(), None).await;
            assert_eq!(out.unwrap(), b"");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let list = sup.list().await;
        let pids: Vec<u32> = list.iter().filter_map(|p| p.pid).collect();
        assert_eq!(pids.len(), n);
        // Workers forked from a zygote template are its children: its own memory
        // (not its children's) is theirs to share.
        let templates: std::collections::BTreeSet<u32> = pids
            .iter()
            .map(|&p| parent_of(p))
            .filter(|&p| p != std::process::id())
            .collect();
        let total: u64 = pids.iter().map(|&p| pss_tree(p)).sum::<u64>()
            + templates.iter().map(|&t| pss_own(t)).sum::<u64>();
        sup.shutdown(Duration::from_secs(2)).await;
        total as f64 / n as f64
    })
}

/// A JavaScript plugin vendoring `files` files of 8 KB under `node_modules`.
fn big_plugin(files: usize) -> tempfile::TempDir {
    let dir = open_tempdir();
    std::fs::write(
        dir.path().join("plugin.toml"),
        "id = \"big\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("main.js"),
        "export function noop(input) { return input; }\n",
    )
    .unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..files {
        let d = dir.path().join(format!("node_modules/pkg{}/lib", i / 100));
        std::fs::create_dir_all(&d).unwrap();
        let bytes: Vec<u8> = (0..8000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed & 0x7f) as u8
            })
            .collect();
        std::fs::write(d.join(format!("f{i}.js")), bytes).unwrap();
    }
    dir
}

/// Time to register the plugin in `dir` in a new supervisor over `cache` (a fresh
/// cache per sample when `fresh`).
fn registration(dir: &Path, cache: &Path, fresh: bool, iters: usize) -> Stats {
    let mut samples = Vec::new();
    for _ in 0..iters {
        let own = open_tempdir();
        let c = if fresh { own.path() } else { cache };
        let mut sup = Supervisor::new(options(c));
        let t = Instant::now();
        sup.add_plugin_dir(dir).unwrap();
        samples.push(t.elapsed());
        drop(sup);
    }
    stats(samples)
}

/// One-shot `corral run <dir> noop` through the CLI, with a kept cache.
fn one_shot(dir: &Path, cache: &Path, iters: usize) -> Stats {
    let mut samples = Vec::new();
    for i in 0..=iters {
        let t = Instant::now();
        let out = Command::new(built().corral())
            .arg("run")
            .arg(dir)
            .arg("noop")
            .arg("--cache-dir")
            .arg(cache)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if i > 0 {
            samples.push(t.elapsed());
        }
    }
    stats(samples)
}

fn python() -> String {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn bwrap() -> PathBuf {
    let found = |p: &str| Path::new(p).is_file().then(|| PathBuf::from(p));
    if let Some(b) = found("/usr/bin/bwrap") {
        return b;
    }
    eprintln!("density: installing bubblewrap with apt for the baseline");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "bubblewrap"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "apt-get install bubblewrap failed");
    found("/usr/bin/bwrap").expect("bwrap installed")
}

/// The example's imports in bubblewrap: the host's files read-only, every namespace
/// of its own, dies with its parent.
fn bwrap_python(iters: usize) -> Stats {
    let (bwrap, python) = (bwrap(), python());
    let mut samples = Vec::new();
    for i in 0..=iters {
        let t = Instant::now();
        let status = Command::new(&bwrap)
            .args([
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/tmp",
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
            ])
            .arg(&python)
            .args(["-I", "-S", "-c", "import collections, json, re"])
            .status()
            .unwrap();
        assert!(status.success());
        if i > 0 {
            samples.push(t.elapsed());
        }
    }
    stats(samples)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (workers, reg, runs) = if quick { (5, 3, 5) } else { (20, 7, 20) };
    built();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let js = example_plugin("hello-js");
    let py = example_plugin("hello-python");
    // `--registration`: only the registration rows.
    let only_registration = std::env::args().any(|a| a == "--registration");
    let runs = if only_registration { 0 } else { runs };

    if !only_registration {
        idle_memory(&rt, workers, &js, &py);
    }
    registration_and_runs(reg, runs, &js, &py);
}

fn idle_memory(
    rt: &tokio::runtime::Runtime,
    workers: usize,
    js: &tempfile::TempDir,
    py: &tempfile::TempDir,
) {
    println!("idle memory per worker (PSS, {workers} idle workers of each example):");
    let cache = open_tempdir();
    // The defaults (every engine forked from zygote templates), and every worker
    // started by exec.
    let opts = options(cache.path());
    let mut exec = opts.clone();
    exec.zygotes = Vec::new();
    let wasm = idle_pss(rt, &opts, &built().hello_wasm, workers);
    let wasm_exec = idle_pss(rt, &exec, &built().hello_wasm, workers);
    // A store others can write is refused: every worker compiles its own module.
    let refused = open_tempdir();
    std::fs::create_dir(refused.path().join("wasm")).unwrap();
    std::fs::set_permissions(
        refused.path().join("wasm"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut compiling_opts = options(refused.path());
    compiling_opts.zygotes = Vec::new();
    let compiling = idle_pss(rt, &compiling_opts, &built().hello_wasm, workers);
    let js_pss = idle_pss(rt, &opts, js.path(), workers);
    let js_exec = idle_pss(rt, &exec, js.path(), workers);
    let py_pss = idle_pss(rt, &opts, py.path(), workers);
    let py_exec = idle_pss(rt, &exec, py.path(), workers);
    for (name, kib, target) in [
        ("Wasm (forked from its template: the default)", wasm, 1024.0),
        (
            "Wasm, started by exec, mapping the shared module",
            wasm_exec,
            1024.0,
        ),
        (
            "Wasm, started by exec, compiling its own (store refused)",
            compiling,
            1024.0,
        ),
        (
            "JavaScript (forked from its template: the default)",
            js_pss,
            1024.0,
        ),
        (
            "JavaScript, started by exec (zygotes = [])",
            js_exec,
            1024.0,
        ),
        (
            "Python (forked from its template: the default)",
            py_pss,
            2048.0,
        ),
        ("Python, started by exec (zygotes = [])", py_exec, 2048.0),
    ] {
        println!(
            "  {name:<58} {:>7.2} MiB   target {:.0} MiB: {}",
            kib / 1024.0,
            target / 1024.0,
            if kib <= target { "met" } else { "missed" }
        );
    }
}

fn registration_and_runs(reg: usize, runs: usize, js: &tempfile::TempDir, py: &tempfile::TempDir) {
    println!("registering a plugin (fingerprint, manifest, snapshot), {reg} samples:");
    let big = big_plugin(5000);
    let tiny = js.path();
    let shared = open_tempdir();
    let tiny_cold = registration(tiny, shared.path(), true, reg);
    let big_cold = registration(big.path(), shared.path(), true, reg);
    // Once into the shared cache, then measured with its objects there.
    registration(big.path(), shared.path(), false, 1);
    let tiny_warm = registration(tiny, shared.path(), false, reg);
    let big_warm = registration(big.path(), shared.path(), false, reg);
    row(
        "baseline: tiny plugin (hello-js), empty store",
        tiny_cold,
        None,
    );
    row(
        "5,000 files / 40 MB, empty store (every file copied)",
        big_cold,
        Some(tiny_cold),
    );
    row(
        "baseline: tiny plugin, objects and index stored",
        tiny_warm,
        None,
    );
    row(
        "5,000 files / 40 MB, objects and index stored (linked)",
        big_warm,
        Some(tiny_warm),
    );

    if runs == 0 {
        return;
    }
    println!("one-shot `corral run ... noop` through the CLI, {runs} samples:");
    let run_cache = open_tempdir();
    let tiny_run = one_shot(tiny, run_cache.path(), runs);
    let big_run = one_shot(big.path(), run_cache.path(), runs);
    row("baseline: tiny plugin (hello-js)", tiny_run, None);
    row("5,000 files / 40 MB", big_run, Some(tiny_run));
    let bw = bwrap_python(runs);
    let py_run = one_shot(py.path(), run_cache.path(), runs);
    row(
        "baseline: bwrap python3 -I -S (the example's imports)",
        bw,
        None,
    );
    row("corral run hello-python noop", py_run, Some(bw));
}
