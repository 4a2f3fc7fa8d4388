//! Support for Corral's end-to-end tests and benchmarks: building the real binaries
//! and example plugins, making fixture plugins, and starting supervisors.
//!
//! Tests go through real worker processes. [`built`] runs `cargo build` for the
//! `corral` and worker binaries (in the same profile as the test) and for the
//! example Wasm plugin (`wasm32-wasip1`, installed with rustup if missing) and the
//! example native plugin, once per
//! test process; cargo makes that a no-op when nothing changed, and it guarantees a
//! test never runs against a stale worker binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Paths of the built artefacts.
#[derive(Debug)]
pub struct Built {
    /// Directory holding `corral`, `corral-worker-wasm` and `corral-worker-hostile`.
    pub bin_dir: PathBuf,
    /// The example Wasm plugin (its module built), staged where the workers' user can
    /// read it (see `stage_plugin`).
    pub hello_wasm: PathBuf,
    /// The example native plugin (its library built), staged likewise.
    pub hello_native: PathBuf,
}

impl Built {
    pub fn corral(&self) -> PathBuf {
        self.bin_dir.join("corral")
    }

    /// `corral-supervisor`: the daemon and the whole command line, which the
    /// `corral` front runs for every command but `call`.
    pub fn corral_supervisor(&self) -> PathBuf {
        self.bin_dir.join("corral-supervisor")
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests lives in the repository root")
        .to_owned()
}

/// A test fixture file.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

fn cargo() -> Command {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(repo_root());
    // The test runner sets the test crate's own package variables
    // (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Some build scripts track them (ring
    // tracks `CARGO_MANIFEST_DIR`), so passing them on would make this build differ
    // from the one that built the test and rebuild the TLS stack and everything above
    // it, twice per run. The build sees the environment a shell would give it.
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && (key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || matches!(
                    key,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                ))
        {
            c.env_remove(key);
        }
    }
    c
}

fn run(mut cmd: Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to run cargo to {what}: {e}"));
    assert!(status.success(), "cargo failed to {what} ({status})");
}

/// Build everything the tests need, once per process.
pub fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = !cfg!(debug_assertions);
        // Select the same packages and target kinds as the run that built this test
        // (`cargo nextest run --workspace`, or `cargo bench --workspace`): a narrower
        // selection unifies dependency features differently (dev-dependencies change
        // rustix's, which wasmtime sits on) and would rebuild the whole engine here.
        let mut cmd = cargo();
        cmd.args(["build", "--quiet", "--workspace", "--bins"]);
        if release {
            cmd.args(["--release", "--benches"]);
        } else {
            cmd.arg("--tests");
        }
        run(cmd, "build the corral and worker binaries");

        ensure_wasm_target();
        let example = repo_root().join("examples/hello-wasm");
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip1",
            "--manifest-path",
        ])
        .arg(example.join("Cargo.toml"))
        // The example has its own workspace and target directory.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
        run(cmd, "build the example Wasm plugin");
        let native = repo_root().join("examples/hello-native");
        let mut cmd = cargo();
        cmd.args(["build", "--quiet", "--release", "--manifest-path"])
            .arg(native.join("Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        run(cmd, "build the example native plugin");

        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        Built {
            bin_dir: target.join(if release { "release" } else { "debug" }),
            hello_wasm: stage_plugin(&example, HELLO_WASM_ENTRY),
            hello_native: stage_plugin(&native, HELLO_NATIVE_ENTRY),
        }
    })
}

/// The example's entry, relative to its directory.
const HELLO_WASM_ENTRY: &str = "target/wasm32-wasip1/release/hello_wasm.wasm";
/// The native example's entry, relative to its directory.
const HELLO_NATIVE_ENTRY: &str = "target/release/libhello_native.so";

/// A copy of plugin `dir` (its `plugin.toml` and `entry`) where the workers'
/// unprivileged user can read it, whatever the permissions of the checkout's parent
/// directories: `<tmp>/corral-tests/<name>-<size>-<mtime>`, made once and reused.
fn stage_plugin(dir: &Path, entry: &str) -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let name = dir
        .file_name()
        .expect("plugin dir name")
        .to_string_lossy()
        .into_owned();
    let meta = std::fs::metadata(dir.join(entry)).expect("the built plugin");
    let stamp = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let parent = tests_dir();
    let staged = parent.join(format!("{name}-{}-{stamp}", meta.len()));
    if staged.join("plugin.toml").exists() {
        return staged;
    }
    let tmp = open_tempdir_in(&parent);
    let to = tmp.path().join(entry);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(to.parent().expect("entry parent"))
        .expect("staging directory");
    std::fs::copy(dir.join("plugin.toml"), tmp.path().join("plugin.toml")).expect("copy");
    std::fs::copy(dir.join(entry), &to).expect("copy");
    // Another test process may have won the race; either copy is the same.
    if std::fs::rename(tmp.path(), &staged).is_ok() {
        std::mem::forget(tmp);
    }
    staged
}

/// Install the `wasm32-wasip1` standard library if rustup lacks it. Loud, because it
/// changes the toolchain.
fn ensure_wasm_target() {
    // One test process at a time: two `rustup target add` at once race on rustup's
    // own files, and the loser fails.
    let lock = std::env::temp_dir().join("corral-tests-wasm-target.lock");
    let lock = std::fs::File::create(&lock).expect("the rustup lock file");
    lock.lock().expect("lock the rustup lock file");
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == "wasm32-wasip1") => {}
        Ok(_) => {
            eprintln!("corral tests: installing the wasm32-wasip1 target with rustup");
            let status = Command::new("rustup")
                .args(["target", "add", "wasm32-wasip1"])
                .status()
                .expect("failed to run rustup");
            assert!(status.success(), "rustup target add wasm32-wasip1 failed");
        }
        Err(e) => panic!(
            "rustup is needed to install the wasm32-wasip1 target for the example plugin: {e}"
        ),
    }
}

/// Make a plugin directory in a fresh temporary directory: `plugin.toml` with `id`,
/// the given `[limits]` lines, and `module` (a fixture file name) copied as entry.
pub fn wat_plugin(id: &str, module: &str, limits: &str) -> tempfile::TempDir {
    let dir = open_tempdir();
    std::fs::copy(fixture(module), dir.path().join(module)).expect("copy fixture");
    write_manifest(dir.path(), id, "wasm", module, limits);
    dir
}

/// `<dir>/plugin.toml` for a test plugin.
fn write_manifest(dir: &Path, id: &str, runtime: &str, entry: &str, limits: &str) {
    std::fs::write(
        dir.join("plugin.toml"),
        format!(
            "id = \"{id}\"\nversion = \"1.0.0\"\nruntime = \"{runtime}\"\nentry = \"{entry}\"\n\n[limits]\n{limits}\n"
        ),
    )
    .expect("write manifest");
}

/// A JavaScript plugin: a copy of `fixtures/js-kit` (an ES module and a library it
/// imports) with `plugin.toml` for `id` and the given `[limits]` lines.
pub fn js_plugin(id: &str, limits: &str) -> tempfile::TempDir {
    fixture_plugin("js-kit", id, "js", "main.js", limits)
}

/// A Python plugin: a copy of `fixtures/py-kit` (a module and a package it imports).
pub fn py_plugin(id: &str, limits: &str) -> tempfile::TempDir {
    fixture_plugin("py-kit", id, "python", "plugin.py", limits)
}

/// A native plugin: the C sources of `fixtures/<name>` compiled by the system's C
/// compiler (`$CC`, else `cc`) against `sdk/c/corral.h` alone into `plugin.so`,
/// with `plugin.toml` for `id` and the given `[limits]` lines.
pub fn native_plugin(name: &str, id: &str, limits: &str) -> tempfile::TempDir {
    let dir = open_tempdir();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(fixture(name))
        .expect("the fixture's sources")
        .map(|e| e.expect("a fixture entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O1", "-std=gnu11", "-Wall", "-Werror"])
        .arg("-I")
        .arg(repo_root().join("sdk/c"))
        .args(&sources)
        .arg("-o")
        .arg(dir.path().join("plugin.so"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(
        out.status.success(),
        "{cc:?} failed on {sources:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_manifest(dir.path(), id, "native", "plugin.so", limits);
    dir
}

/// A copy of the fixture directory `name` with `plugin.toml` for `id`, `runtime`,
/// `entry` and the given `[limits]` lines, readable by the workers' user.
pub fn fixture_plugin(
    name: &str,
    id: &str,
    runtime: &str,
    entry: &str,
    limits: &str,
) -> tempfile::TempDir {
    let dir = open_tempdir();
    copy_tree(&fixture(name), dir.path());
    write_manifest(dir.path(), id, runtime, entry, limits);
    dir
}

/// Fixture `name` (a plugin with `requirements.txt` or `package.json`) with its
/// dependencies vendored by `corral plugin vendor` from the registries: made once
/// per fixture content under `<tmp>/corral-tests/` (test processes take turns with
/// a file lock) and reused by later runs, as pip's and npm's own caches are. The
/// plugin's id is `name`.
pub fn vendored_fixture(name: &str, runtime: &str, entry: &str) -> PathBuf {
    use sha2::Digest;
    let src = fixture(name);
    let mut files = Vec::new();
    list_files(&src, &src, &mut files);
    files.sort();
    let mut h = sha2::Sha256::new();
    for rel in &files {
        h.update(rel.as_bytes());
        h.update(std::fs::read(src.join(rel)).expect("fixture file"));
    }
    let key: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let parent = tests_dir();
    let staged = parent.join(format!("vendored-{name}-{key}"));
    let lock = std::fs::File::create(parent.join(format!("vendored-{name}.lock")))
        .expect("vendor lock file");
    lock.lock().expect("lock the vendored fixture");
    if staged.join("vendor.lock").exists() {
        return staged;
    }
    let tmp = open_tempdir_in(&parent);
    copy_tree(&src, tmp.path());
    write_manifest(tmp.path(), name, runtime, entry, "");
    let out = Command::new(built().corral())
        .args(["plugin", "vendor"])
        .arg(tmp.path())
        .env("CORRAL_WORKER_DIR", &built().bin_dir)
        .output()
        .expect("run corral plugin vendor");
    assert!(
        out.status.success(),
        "corral plugin vendor {name} failed (the registries must be reachable):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(tmp.path(), &staged).expect("keep the vendored fixture");
    std::mem::forget(tmp);
    staged
}

/// `<tmp>/corral-tests`, where staged and vendored plugins are kept between runs
/// (0755: the workers' user reads them).
fn tests_dir() -> PathBuf {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join("corral-tests");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .expect("staging directory");
    dir
}

/// A temporary directory in `parent` that the workers' user may read.
fn open_tempdir_in(parent: &Path) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir_in(parent)
        .expect("staging directory")
}

/// The files under `dir`, relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("fixture directory") {
        let entry = entry.expect("fixture entry");
        if entry.file_type().expect("file type").is_dir() {
            list_files(root, &entry.path(), out);
        } else {
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push(rel);
        }
    }
}

/// A copy of `examples/<name>` (a JavaScript or Python example) where the workers'
/// user can read it.
pub fn example_plugin(name: &str) -> tempfile::TempDir {
    let dir = open_tempdir();
    copy_tree(&repo_root().join("examples").join(name), dir.path());
    dir
}

/// A copy of the plugin in `dir` whose `plugin.toml` names it `id` (for many plugins
/// of one example), readable by the workers' user.
pub fn plugin_copy(dir: &Path, id: &str) -> tempfile::TempDir {
    let copy = open_tempdir();
    copy_files(dir, copy.path(), &[]);
    let manifest = copy.path().join("plugin.toml");
    let text = std::fs::read_to_string(&manifest).expect("plugin.toml");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("id = ") {
                format!("id = \"{id}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&manifest, text).expect("write plugin.toml");
    copy
}

/// Copy the files under `from` into `to` (directories 0755, files 0644), leaving
/// out `__pycache__` and build output (`target`).
fn copy_tree(from: &Path, to: &Path) {
    copy_files(from, to, &["__pycache__", "target"]);
}

/// Copy the files under `from` into `to`, but for entries named in `skip`.
fn copy_files(from: &Path, to: &Path, skip: &[&str]) {
    for entry in std::fs::read_dir(from).expect("fixture directory") {
        let entry = entry.expect("fixture entry");
        if skip.iter().any(|s| entry.file_name() == *s) {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            std::fs::create_dir(&target).expect("create fixture subdirectory");
            copy_files(&entry.path(), &target, skip);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// A temporary directory the workers' unprivileged user may enter and read (0755):
/// for plugin and cache directories.
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .expect("tempdir")
}

/// The policy the tests run under (`fixtures/policy/test.toml`): every plugin at
/// standard with 64 MiB, deadlines capped at 60 s, 63 MiB output, 64 pids, one CPU.
pub fn test_policy() -> corral::Policy {
    corral::Policy::load(&fixture("policy/test.toml")).expect("the test policy is valid")
}

/// Supervisor options for tests: the freshly built workers, a private cache and the
/// test policy.
pub fn options(cache: &Path) -> corral::Options {
    let mut o = corral::Options::new();
    o.worker_dir = built().bin_dir.clone();
    o.cache_dir = Some(cache.to_owned());
    o.policy = std::sync::Arc::new(test_policy());
    // Stores beside the cache, never in the machine's /var/lib/corral.
    o.state_dir = cache.join("state");
    o
}

/// Whether `pid` is gone (or a zombie waiting to be reaped by someone else).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// Wait up to `timeout` for `pid` to be gone.
/// Every descendant of `pid` (children, theirs, ...), as this process's PID
/// namespace numbers them, from `/proc/<pid>/task/<tid>/children`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// The pids of `pid` in each PID namespace it is in, outermost first (`NSpid`).
pub fn ns_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub fn wait_gone(pid: u32, timeout: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if process_gone(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    process_gone(pid)
}

/// The group directory of process `pid` (a number or `self`) in the cgroup v1
/// hierarchy of `controller`. Panics where there is none: the suite needs the v1
/// controllers of these hybrid hosts (the v2 path runs in the VM check).
pub fn v1_cgroup(pid: &str, controller: &str) -> PathBuf {
    let table = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup table");
    let rel = table
        .lines()
        .find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, list, path) = (p.next()?, p.next()?, p.next()?);
            list.split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .unwrap_or_else(|| {
            panic!(
                "no {controller} hierarchy: this suite needs cgroup v1 controllers (hybrid host)"
            )
        });
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(rel.trim_start_matches('/'))
}

/// What a worker of `engine` must report at `level`: that level, no restart, the
/// unprivileged user with no capabilities, the level's namespaces, and at `maximum`
/// the engine's own seccomp allow-list. Shared by the per-engine every-level tests.
pub fn assert_confined_at(
    info: &corral_protocol::PluginInfo,
    level: corral_confine::Level,
    engine: &str,
) {
    use corral_confine::Level;
    use corral_protocol::Enforcement;
    assert_eq!(info.level, level.as_str());
    assert_eq!(info.restarts, 0, "{level}: {:?}", info.last_error);
    let report = info.enforcement.as_ref().expect("a running worker reports");
    assert_eq!((report.uid, report.cap_effective), (65534, 0), "{level}");
    // The suite runs as root, so standard has its own IPC namespace too.
    let namespaces = match level {
        Level::Standard => "own ipc",
        Level::High => "own net, ipc, uts",
        Level::Maximum => "own net, ipc, uts, pid, mnt, user",
    };
    assert_eq!(
        report.namespaces,
        Enforcement::Full(namespaces.into()),
        "{level}"
    );
    // Every thread of it is in the plugin's own group (`corral-<supervisor>/<id>-<n>`)
    // in each controller: it joined before it ran anything, and each thread it made
    // since was born there.
    let pid = info.pid.expect("a running worker");
    let threads: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the worker's threads")
        .map(|t| t.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!threads.is_empty());
    for controller in ["memory", "cpu", "pids"] {
        for tid in &threads {
            let group = v1_cgroup(&format!("{pid}/task/{tid}"), controller);
            let mut names = group.iter().rev().map(|c| c.to_string_lossy().into_owned());
            let (leaf, base) = (names.next().unwrap(), names.next().unwrap());
            let numbered = |s: &str, prefix: &str| {
                s.strip_prefix(prefix)
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            };
            assert!(
                numbered(&base, "corral-") && numbered(&leaf, &format!("{}-", info.id)),
                "{level}: thread {tid} of {pid} is in {controller} group {}",
                group.display()
            );
        }
    }
    if level == Level::Maximum {
        // The process serving the plugin (pid 1 of its PID namespace, the child of
        // the one the supervisor started) holds no handle on a mount namespace: the
        // one made as root to stage the view is held by the waiting parent alone.
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .expect("the worker's children");
        let serving: Vec<&str> = children.split_whitespace().collect();
        assert_eq!(serving.len(), 1, "{level}: one serving child: {serving:?}");
        for fd in std::fs::read_dir(format!("/proc/{}/fd", serving[0])).expect("its fds") {
            let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().starts_with("mnt:"),
                "{level}: the serving worker holds {}",
                target.display()
            );
        }
        let allow_list = format!("{engine} allow-list");
        assert!(
            matches!(&report.seccomp, Enforcement::Full(s) if s.starts_with(&allow_list)),
            "{}",
            report.seccomp
        );
    }
}

/// The copy of the plugin in `dir` that a supervisor with cache directory `cache`
/// runs (`corral::versions`): the tree the one reference to a version of it there
/// links to.
pub fn version_copy(cache: &Path, dir: &Path) -> PathBuf {
    let name = format!("{}.", dir.file_name().unwrap().to_string_lossy());
    let mut found = Vec::new();
    for sup in std::fs::read_dir(cache.join("versions")).unwrap() {
        let sup = sup.unwrap().path();
        if !sup.is_dir() {
            continue;
        }
        for v in std::fs::read_dir(&sup).unwrap() {
            let v = v.unwrap();
            if v.file_name().to_string_lossy().starts_with(&name) {
                found.push(v.path());
            }
        }
    }
    assert_eq!(found.len(), 1, "copies of {}: {found:?}", dir.display());
    std::fs::canonicalize(found.remove(0)).expect("a reference to a tree")
}

/// A directory of workers in which `corral-worker-wasm` is the hostile native worker
/// (`corral-worker-hostile`): every Wasm plugin of a supervisor pointed at it runs
/// attacks instead of a module. The workers' user cannot enter it: the supervisor
/// starts workers as root, and they drop to the policy's user themselves.
pub fn hostile_worker_dir() -> tempfile::TempDir {
    let workers = tempfile::tempdir().expect("a temporary directory");
    std::os::unix::fs::symlink(
        built().bin_dir.join("corral-worker-hostile"),
        workers.path().join("corral-worker-wasm"),
    )
    .expect("link the hostile worker");
    workers
}

/// Options for a supervisor of hostile workers (`workers` from
/// [`hostile_worker_dir`]) at `level`: its cache and audit log
/// (`audit.jsonl`) in `cache`, and restarts without backoff, since every kill of an
/// attacker costs one.
pub fn hostile_options(
    cache: &Path,
    workers: &Path,
    level: corral_confine::Level,
) -> corral::Options {
    let mut opts = options(cache);
    opts.worker_dir = workers.to_owned();
    opts.policy = std::sync::Arc::new(test_policy().with_level(level, "test"));
    opts.restart.max_crashes = 1000;
    opts.restart.base_backoff = std::time::Duration::from_millis(1);
    opts.restart.max_backoff = std::time::Duration::from_millis(1);
    opts.audit = corral::AuditSink::File(cache.join("audit.jsonl"));
    opts
}

/// This process's peak resident memory (`VmHWM`), in bytes: a supervisor run in
/// process is measured by it.
pub fn vm_hwm() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a VmHWM line in kB");
    kib << 10
}

/// Latency samples summarised for the benchmarks.
pub mod daemon;
pub mod postgres;
pub mod tls;

pub mod bench {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Set in the echo child of [`raw_socket_rtt`]: the bench binary serves echo.
    const ECHO_ENV: &str = "CORRAL_BENCH_ECHO";

    /// Microseconds, for printing.
    pub fn us(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    /// One line: median, p99 and mean, and the median's ratio to `base`'s.
    pub fn row(name: &str, s: Stats, base: Option<Stats>) {
        let ratio = base.map_or(String::new(), |b| {
            format!("{:>8.2}x", s.p50.as_secs_f64() / b.p50.as_secs_f64())
        });
        println!(
            "  {name:<52} p50 {:>9.1} us   p99 {:>9.1} us   mean {:>9.1} us {ratio}",
            us(s.p50),
            us(s.p99),
            us(s.mean)
        );
    }

    /// Call first in a bench's `main`: in the echo child of [`raw_socket_rtt`],
    /// serve echo on fd 3 and exit.
    pub fn serve_echo_if_asked() {
        if std::env::var_os(ECHO_ENV).is_none() {
            return;
        }
        // SAFETY: the parent placed a socket at fd 3 for this process alone.
        let fd = unsafe { OwnedFd::from_raw_fd(3) };
        let s = UnixStream::from(fd);
        // As a worker reads and writes: a small frame is one `recv` (several
        // pipelined ones too), and the echoes of every frame read at once leave
        // in one `send`.
        let mut rd = std::io::BufReader::with_capacity(64 * 1024, &s);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).is_err() {
                std::process::exit(0);
            }
            let n = u32::from_le_bytes(len) as usize;
            rd.read_exact(&mut buf[..n]).unwrap();
            out.extend_from_slice(&len);
            out.extend_from_slice(&buf[..n]);
            if rd.buffer().is_empty() {
                (&s).write_all(&out).unwrap();
                out.clear();
            }
        }
    }

    /// A socket to an echo child process (this binary, see [`serve_echo_if_asked`]).
    pub fn echo_child() -> (UnixStream, std::process::Child) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let fd = theirs.as_raw_fd();
        // This very binary, even if a build has replaced the file since it started.
        let mut cmd = Command::new("/proc/self/exe");
        cmd.env(ECHO_ENV, "1");
        // SAFETY: dup2 is async-signal-safe; it places the socket at fd 3 in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(theirs);
        (ours, child)
    }

    /// A frame the size of a Corral call frame for an empty function (~20 bytes).
    fn echo_frame() -> Vec<u8> {
        let payload = [7u8; 20];
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        frame
    }

    /// Round trips of a small length-prefixed frame with a second process over a
    /// Unix socket: the floor of any call that crosses processes.
    pub fn raw_socket_rtt(iters: usize) -> Stats {
        let (mut s, mut child) = echo_child();
        let frame = echo_frame();
        let mut back = vec![0u8; frame.len()];
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 {
            let t = Instant::now();
            s.write_all(&frame).unwrap();
            s.read_exact(&mut back).unwrap();
            if i >= iters / 10 {
                samples.push(t.elapsed());
            }
        }
        drop(s);
        child.wait().unwrap();
        stats(samples)
    }

    /// Round trips per second with `window` frames in flight on one echo socket
    /// (a writer thread keeps the window full), for `run`.
    pub fn raw_socket_pipelined(window: usize, run: Duration) -> f64 {
        let (s, mut child) = echo_child();
        let frame = echo_frame();
        let rd = s.try_clone().unwrap();
        let (credit_tx, credit_rx) = std::sync::mpsc::sync_channel::<()>(window);
        for _ in 0..window {
            credit_tx.send(()).unwrap();
        }
        let writer = std::thread::spawn(move || pipelined_writer(s, &frame, &credit_rx));
        let mut rd = std::io::BufReader::with_capacity(64 * 1024, rd);
        let mut back = vec![0u8; echo_frame().len()];
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < run {
            rd.read_exact(&mut back).unwrap();
            n += 1;
            let _ = credit_tx.send(());
        }
        let rate = n as f64 / t.elapsed().as_secs_f64();
        drop(credit_tx);
        let wr = writer.join().unwrap();
        drop(wr);
        // Drain what is still in flight so the child sees EOF and exits.
        let rd = rd.into_inner();
        let _ = rd.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = (&rd).read_to_end(&mut rest);
        child.wait().unwrap();
        rate
    }

    /// The writer of a pipelining client: `frame` once per credit, every credit
    /// there is sent in one write (as a client with many requests ready does).
    /// Returns the stream when the credits end.
    pub fn pipelined_writer(
        mut wr: UnixStream,
        frame: &[u8],
        credits: &std::sync::mpsc::Receiver<()>,
    ) -> UnixStream {
        let mut batch = Vec::new();
        while credits.recv().is_ok() {
            batch.clear();
            batch.extend_from_slice(frame);
            while credits.try_recv().is_ok() {
                batch.extend_from_slice(frame);
            }
            if wr.write_all(&batch).is_err() {
                break;
            }
        }
        wr
    }

    /// fork+exec+wait of `program` with `args`, stdout and stderr discarded; each
    /// run must exit 0.
    pub fn spawn_wait(iters: usize, program: &std::path::Path, args: &[&std::ffi::OsStr]) -> Stats {
        let mut samples = Vec::with_capacity(iters);
        for _ in 0..iters {
            let t = Instant::now();
            let status = Command::new(program)
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            samples.push(t.elapsed());
            assert!(status.success(), "{} {args:?}: {status}", program.display());
        }
        stats(samples)
    }

    /// Pin this process (and what it starts from now on) to CPU 0.
    pub fn pin_to_cpu0() {
        // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it for this process.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
    }

    /// Undo [`pin_to_cpu0`]: every CPU.
    pub fn unpin() {
        // SAFETY: as in `pin_to_cpu0`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for cpu in 0..libc::CPU_SETSIZE as usize {
                libc::CPU_SET(cpu, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }

    #[derive(Debug, Clone, Copy)]
    pub struct Stats {
        pub n: usize,
        pub p50: Duration,
        pub p99: Duration,
        pub mean: Duration,
    }

    /// Median, 99th percentile and mean of `samples` (at least one).
    pub fn stats(mut samples: Vec<Duration>) -> Stats {
        samples.sort();
        let n = samples.len();
        Stats {
            n,
            p50: samples[n / 2],
            p99: samples[(n * 99 / 100).min(n - 1)],
            mean: samples.iter().sum::<Duration>() / n as u32,
        }
    }
}
