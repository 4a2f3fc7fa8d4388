//! Plugins on their language's packages: PyPI wheels with compiled extensions and
//! npm packages in CommonJS, vendored by `corral plugin vendor` from the real
//! registries, run at every isolation level; CommonJS semantics; and what the
//! vendor command refuses.

use crate::support::text;
use corral::Supervisor;
use corral_confine::Level;
use corral_integration_tests::{
    assert_confined_at, built, fixture_plugin, open_tempdir, options, test_policy, vendored_fixture,
};
use corral_protocol::CallError;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;

const LEVELS: [Level; 3] = [Level::Standard, Level::High, Level::Maximum];

/// A supervisor at `level` (the test policy's limits: 64 MiB) with the plugins in
/// `dirs`.
fn supervisor(level: Level, dirs: &[&Path]) -> (Supervisor, TempDir) {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = Arc::new(test_policy().with_level(level, "test"));
    opts.kill_grace = Duration::from_secs(5);
    let mut sup = Supervisor::new(opts);
    for d in dirs {
        sup.add_plugin_dir(d).unwrap();
    }
    (sup, cache)
}

async fn call(sup: &Supervisor, id: &str, f: &str, input: &[u8]) -> Result<Vec<u8>, CallError> {
    sup.call(id, f, input.to_vec(), None).await
}

async fn text_of(sup: &Supervisor, id: &str, f: &str, input: &str) -> String {
    match call(sup, id, f, input.as_bytes()).await {
        Ok(out) => String::from_utf8(out).unwrap(),
        Err(e) => panic!("{id}.{f}({input:?}): {e:?}"),
    }
}

async fn info(sup: &Supervisor, id: &str) -> corral_protocol::PluginInfo {
    sup.list()
        .await
        .into_iter()
        .find(|p| p.id == id)
        .expect("the plugin is listed")
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The paths in `status`'s `reads` lines that the plugin's dependencies made
/// readable (not the engine's own files).
fn dependency_reads(info: &corral_protocol::PluginInfo) -> Vec<PathBuf> {
    info.reads
        .iter()
        .filter(|l| l.contains("(needed by "))
        .map(|l| PathBuf::from(l.split(" (").next().unwrap()))
        .collect()
}

#[tokio::test]
async fn numpy_and_msgpack_c_extensions_run_confined_at_every_level() {
    let dir = vendored_fixture("py-packages", "python", "plugin.py");
    let id = "py-packages";
    let mut granted: Option<Vec<(PathBuf, String)>> = None;
    for level in LEVELS {
        let (sup, _cache) = supervisor(level, &[&dir]);
        // Known answers, computed by numpy's C and OpenBLAS code.
        assert_eq!(
            text_of(&sup, id, "solve", "").await,
            "2.000000 3.000000 5.000000 5050",
            "{level}"
        );
        let packed = call(&sup, id, "pack", b"").await.unwrap();
        assert_eq!(
            packed, b"\x82\xa1n\x93\x01\x02\x03\xa1s\xa2\xc3\xa9",
            "{level}"
        );
        assert_eq!(
            String::from_utf8(call(&sup, id, "unpack", &packed).await.unwrap()).unwrap(),
            "{'n': [1, 2, 3], 's': 'é'}",
            "{level}"
        );
        assert_eq!(
            text_of(&sup, id, "which_msgpack", "").await,
            "msgpack._cmsgpack",
            "{level}: msgpack's C extension, not its pure-Python fallback"
        );

        let status = info(&sup, id).await;
        assert_confined_at(&status, level, "python");
        // Exactly the libraries, by name, never a directory; the ones named in the
        // issue among them, each saying which extension needs it.
        let reads = dependency_reads(&status);
        for path in &reads {
            let meta = std::fs::metadata(path).unwrap();
            assert!(
                meta.is_file(),
                "{level}: {} is granted and not a file",
                path.display()
            );
        }
        let line = |lib: &str, by: &str| {
            status
                .reads
                .iter()
                .any(|l| l.contains(&format!("/{lib} (needed by site-packages/{by}")))
        };
        assert!(
            line("libpthread.so.0", "msgpack/_cmsgpack"),
            "{level}: {:#?}",
            status.reads
        );
        assert!(
            line("libstdc++.so.6", "numpy/"),
            "{level}: {:#?}",
            status.reads
        );
        assert!(
            status
                .reads
                .iter()
                .any(|l| l.starts_with("/etc/ld.so.cache (")),
            "{level}: {:#?}",
            status.reads
        );
        assert!(
            status
                .reads
                .iter()
                .any(|l| l.ends_with("(the python engine)")),
            "{level}: the engine's own files are listed too: {:#?}",
            status.reads
        );
        let sums: Vec<(PathBuf, String)> = reads.iter().map(|p| (p.clone(), sha256(p))).collect();
        match &granted {
            None => granted = Some(sums),
            Some(g) => assert_eq!(g, &sums, "{level}: the same libraries, unchanged"),
        }

        // Memory and deadlines as for pure Python: numpy's 800 MB array meets the
        // plugin's 64 MiB limit in the worker (its malloc is counted), not the
        // cgroup; a loop of numpy calls is interrupted at the deadline.
        let pid = status.pid.unwrap();
        assert_eq!(
            call(&sup, id, "big", b"100000000").await,
            Err(CallError::MemoryLimit {
                limit_bytes: 64 << 20
            }),
            "{level}"
        );
        assert_eq!(
            sup.call(id, "spin", vec![], Some(Duration::from_millis(300)))
                .await,
            Err(CallError::Timeout { deadline_ms: 300 }),
            "{level}"
        );
        // The same worker, with a fresh instance (numpy stays imported: a C
        // extension is initialised once per process).
        assert_eq!(
            text_of(&sup, id, "solve", "").await,
            "2.000000 3.000000 5.000000 5050",
            "{level}"
        );
        let after = info(&sup, id).await;
        assert_eq!((after.pid, after.restarts), (Some(pid), 0), "{level}");
        sup.shutdown(Duration::from_secs(1)).await;
    }
    // Showing the libraries in the maximum view left the host's files as they were.
    for (path, sum) in granted.unwrap() {
        assert_eq!(sha256(&path), sum, "{}", path.display());
    }
}

/// Compile C `source` into a shared object at `out` with gcc.
fn gcc(source: &str, out: &Path, extra: &[&str]) {
    let dir = out.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let c = out.with_extension("c");
    std::fs::write(&c, source).unwrap();
    let status = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(out)
        .arg(&c)
        .args(extra)
        .status()
        .expect("gcc (the suite needs it to build test extensions)");
    assert!(status.success(), "gcc failed");
    std::fs::remove_file(c).unwrap();
}

/// A shared object needing `libcorralgone.so.1`, which no longer exists.
fn extension_needing_a_missing_library(out: &Path) {
    let scratch = tempfile::tempdir().unwrap();
    let lib = scratch.path().join("libcorralgone.so.1");
    gcc(
        "int gone(void) { return 1; }\n",
        &lib,
        &["-Wl,-soname,libcorralgone.so.1"],
    );
    gcc(
        "int gone(void);\nint fast(void) { return gone(); }\n",
        out,
        &[
            &format!("-L{}", scratch.path().display()),
            "-l:libcorralgone.so.1",
        ],
    );
}

#[tokio::test]
async fn an_extension_needing_a_missing_library_fails_its_start_naming_both() {
    let plugin = fixture_plugin("py-kit", "native", "python", "plugin.py", "");
    let ext = "pkg/_fast.cpython-311-x86_64-linux-gnu.so";
    extension_needing_a_missing_library(&plugin.path().join(ext));
    let (sup, _cache) = supervisor(Level::Standard, &[plugin.path()]);
    match call(&sup, "native", "greet", b"ada").await {
        Err(CallError::StartFailed { reason, .. }) => {
            assert!(
                reason.contains(&format!("the extension {ext} needs libcorralgone.so.1")),
                "{reason}"
            );
            assert!(reason.contains("/etc/ld.so.cache"), "{reason}");
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    let status = info(&sup, "native").await;
    assert!(
        status
            .reads
            .iter()
            .any(|l| l.contains("libcorralgone.so.1")),
        "{:?}",
        status.reads
    );
    sup.shutdown(Duration::from_secs(1)).await;

    // A shared object for another machine is named with the machine.
    let plugin = fixture_plugin("py-kit", "arm", "python", "plugin.py", "");
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    header[4] = 2; // 64-bit
    header[5] = 1; // little-endian
    header[6] = 1;
    header[16] = 3; // ET_DYN
    header[18] = 183; // EM_AARCH64
    header[20] = 1;
    header[52] = 64;
    std::fs::create_dir_all(plugin.path().join("pkg")).unwrap();
    std::fs::write(plugin.path().join("pkg/_arm.so"), header).unwrap();
    let (sup, _cache) = supervisor(Level::Standard, &[plugin.path()]);
    match call(&sup, "arm", "greet", b"ada").await {
        Err(CallError::StartFailed { reason, .. }) => assert!(
            reason.contains("pkg/_arm.so is not a shared library this worker can load: built for machine 183 (aarch64)"),
            "{reason}"
        ),
        other => panic!("expected a start failure, got {other:?}"),
    }
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn lodash_and_packages_with_commonjs_dependencies_run_at_every_level() {
    let dir = vendored_fixture("js-packages", "js", "main.js");
    let id = "js-packages";
    // What was vendored, and from where.
    let lock = std::fs::read_to_string(dir.join("vendor.lock")).unwrap();
    for name in [
        "lodash",
        "is-odd",
        "is-number",
        "semver",
        "lru-cache",
        "yallist",
    ] {
        assert!(lock.contains(&format!("name = \"{name}\"")), "{lock}");
    }
    assert!(lock.contains("hash = \"sha512-"), "{lock}");
    for level in LEVELS {
        let (sup, _cache) = supervisor(level, &[&dir]);
        assert_eq!(
            text_of(&sup, id, "chunk", "[1,2,3,4,5]").await,
            "[[1,2],[3,4],[5]]",
            "{level}"
        );
        assert_eq!(text_of(&sup, id, "odd", "7").await, "true", "{level}");
        assert_eq!(text_of(&sup, id, "odd", "10").await, "false", "{level}");
        assert_eq!(
            text_of(&sup, id, "satisfies", "1.2.3 ^1.0.0").await,
            "true 1.3.0",
            "{level}"
        );
        assert_eq!(
            text_of(&sup, id, "satisfies", "2.0.0 ~1.2").await,
            "false 2.1.0",
            "{level}"
        );
        let refused = text_of(&sup, id, "builtin", "").await;
        assert!(
            refused.starts_with(
                "require(\"fs\") in lib/uses-fs.cjs: \"fs\" is a Node.js built-in module"
            ),
            "{level}: {refused}"
        );
        assert_confined_at(&info(&sup, id).await, level, "js");
        sup.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn commonjs_modules_behave_as_in_node_inside_the_plugin() {
    let plugin = fixture_plugin("js-cjs", "cjs", "js", "main.js", "");
    std::os::unix::fs::symlink("/etc/hostname", plugin.path().join("lib/link-out.js")).unwrap();
    let entry = fixture_plugin("js-cjs-entry", "cjs-entry", "js", "main.cjs", "");
    for level in [Level::Standard, Level::Maximum] {
        let (sup, _cache) = supervisor(level, &[plugin.path(), entry.path()]);
        let t = |f: &'static str, input: &'static str| {
            let sup = &sup;
            async move { text_of(sup, "cjs", f, input).await }
        };
        // Module state is per module, shared by every importer.
        assert_eq!(t("count", "").await, "1");
        assert_eq!(t("count", "").await, "2");
        assert_eq!(t("json", "").await, "fixture 3");
        // `exports` conditions: import gets the ES module, which imports the
        // CommonJS file by path.
        assert_eq!(t("local_pkg", "").await, "module commonjs");
        assert_eq!(t("cycle", "").await, "a sees b; b saw a-early");
        assert_eq!(t("esm_only", "").await, "42");
        assert_eq!(t("nested", "").await, "with-dep uses inner 2.0.0");
        assert_eq!(
            t("probe", "filename").await,
            "lib/probes.cjs lib lib/probes.cjs"
        );
        assert_eq!(
            t("probe", "resolve").await,
            "node_modules/local-pkg/cjs/index.js"
        );
        assert_eq!(t("probe", "same_instance").await, "true");
        assert_eq!(t("probe", "json").await, "1,2,3");
        assert_eq!(t("probe", "index").await, "inner");
        assert_eq!(t("probe", "global_is_global").await, "true");
        for (probe, expected) in [
            ("escape", "leaves the plugin directory"),
            ("absolute", "absolute paths and URLs are not allowed"),
            ("builtin", "\"child_process\" is a Node.js built-in module"),
            ("node_prefix", "\"events\" is a Node.js built-in module"),
            ("missing", "there is no node_modules/left-pad in the plugin"),
            ("esm", "require() of ES module lib/esm.mjs"),
            (
                "not_exported",
                "package \"local-pkg\" does not export \"./secret.js\"",
            ),
            ("symlink", "lib/link-out.js is outside the plugin directory"),
        ] {
            let got = t("probe", probe).await;
            assert!(
                got.starts_with("Error: ") && got.contains(expected),
                "{level}: {probe}: {got}"
            );
        }
        // A CommonJS entry: module.exports' functions are the plugin's.
        assert_eq!(
            text_of(&sup, "cjs-entry", "greet", "ada").await,
            "Hello, ADA!"
        );
        assert_eq!(text_of(&sup, "cjs-entry", "count", "").await, "1");
        assert_eq!(
            info(&sup, "cjs-entry").await.exports,
            vec!["count".to_owned(), "greet".to_owned()]
        );
        sup.shutdown(Duration::from_secs(1)).await;
    }
}

// ---- corral plugin vendor ----

fn vendor(dir: &Path, extra: &[&str]) -> Output {
    Command::new(built().corral())
        .args(["plugin", "vendor"])
        .arg(dir)
        .args(extra)
        .env("CORRAL_WORKER_DIR", &built().bin_dir)
        .output()
        .expect("run corral plugin vendor")
}

fn py_plugin_with(requirements: &str) -> TempDir {
    let dir = fixture_plugin("py-kit", "vend", "python", "plugin.py", "");
    std::fs::write(dir.path().join("requirements.txt"), requirements).unwrap();
    dir
}

/// A source distribution whose `setup.py` writes `marker` when it runs.
fn evil_sdist(dir: &Path, marker: &Path) -> PathBuf {
    let script = format!(
        "import pathlib\npathlib.Path({:?}).write_text('ran')\n\
         from setuptools import setup\nsetup(name='evil', version='1.0', py_modules=[])\n",
        marker.display().to_string()
    );
    let out = dir.join("evil-1.0.tar.gz");
    let py = format!(
        "import io, tarfile\n\
         t = tarfile.open({out:?}, 'w:gz')\n\
         for name, text in [('evil-1.0/setup.py', {script:?}),\n\
                            ('evil-1.0/PKG-INFO', 'Metadata-Version: 2.1\\nName: evil\\nVersion: 1.0\\n')]:\n\
         \x20   data = text.encode()\n\
         \x20   info = tarfile.TarInfo(name); info.size = len(data)\n\
         \x20   t.addfile(info, io.BytesIO(data))\n\
         t.close()\n",
        out = out.display().to_string()
    );
    let status = Command::new("python3").args(["-c", &py]).status().unwrap();
    assert!(status.success());
    out
}

/// A wheel holding `files` (path, bytes), made by hand as pip accepts it, with
/// `requires` (`Requires-Dist:` lines) in its metadata.
fn wheel(dir: &Path, name: &str, files: &[(&str, Vec<u8>)], requires: &str) -> PathBuf {
    let out = dir.join(format!("{name}-1.0-py3-none-any.whl"));
    let listing = dir.join("wheel-files");
    std::fs::create_dir_all(&listing).unwrap();
    let mut args = Vec::new();
    for (i, (path, bytes)) in files.iter().enumerate() {
        let f = listing.join(i.to_string());
        std::fs::write(&f, bytes).unwrap();
        args.push(format!("({path:?}, {:?})", f.display().to_string()));
    }
    let py = format!(
        "import base64, hashlib, zipfile\n\
         files = [{entries}]\n\
         meta = {{'{name}-1.0.dist-info/METADATA': b'Metadata-Version: 2.1\\nName: {name}\\nVersion: 1.0\\n' + {requires:?}.encode(),\n\
         \x20       '{name}-1.0.dist-info/WHEEL': b'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n'}}\n\
         record = []\n\
         with zipfile.ZipFile({out:?}, 'w') as z:\n\
         \x20   for path, src in files:\n\
         \x20       data = open(src, 'rb').read()\n\
         \x20       meta[path] = data\n\
         \x20   for path, data in meta.items():\n\
         \x20       z.writestr(path, data)\n\
         \x20       h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()\n\
         \x20       record.append(f'{{path}},sha256={{h}},{{len(data)}}')\n\
         \x20   record.append('{name}-1.0.dist-info/RECORD,,')\n\
         \x20   z.writestr('{name}-1.0.dist-info/RECORD', '\\n'.join(record) + '\\n')\n",
        entries = args.join(", "),
        out = out.display().to_string(),
        requires = requires
    );
    let status = Command::new("python3").args(["-c", &py]).status().unwrap();
    assert!(status.success());
    out
}

#[test]
fn vendoring_python_refuses_what_would_run_build_scripts_and_changes_nothing() {
    let scratch = open_tempdir();
    let marker = scratch.path().join("MARKER");
    let sdist = evil_sdist(scratch.path(), &marker);
    for requirements in [
        format!("{}\n", sdist.display()),
        format!("evil @ file://{}\n", sdist.display()),
        "--no-binary=:all:\nmsgpack\n".to_owned(),
    ] {
        let plugin = py_plugin_with(&requirements);
        std::fs::create_dir(plugin.path().join("site-packages")).unwrap();
        std::fs::write(plugin.path().join("site-packages/kept.txt"), "mine").unwrap();
        let out = vendor(plugin.path(), &[]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "{requirements}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains("requirements.txt line 1"), "{err}");
        assert!(
            err.contains("other than a wheel") || err.contains("pip options are not accepted"),
            "{err}"
        );
        assert!(!marker.exists(), "{requirements}: setup.py ran");
        assert_eq!(
            std::fs::read_to_string(plugin.path().join("site-packages/kept.txt")).unwrap(),
            "mine"
        );
        assert!(!plugin.path().join("vendor.lock").exists());
    }
    // A wheel on disk whose dependency is that source distribution: pip would
    // build it whatever --only-binary says.
    let sneaky = wheel(
        scratch.path(),
        "sneaky",
        &[("sneaky/__init__.py", b"".to_vec())],
        &format!("Requires-Dist: evil @ file://{}\n", sdist.display()),
    );
    let plugin = py_plugin_with(&format!("{}\n", sneaky.display()));
    let out = vendor(plugin.path(), &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("a wheel depends on a direct reference to something other than a wheel")
            && err.contains("sneaky-1.0-py3-none-any.whl: evil @ file://"),
        "{err}"
    );
    assert!(
        !marker.exists(),
        "setup.py ran through a wheel's dependency"
    );
    assert!(!plugin.path().join("site-packages").exists());

    // From the index: a package that has only a source distribution.
    let plugin = py_plugin_with("docopt==0.6.2\n");
    let out = vendor(plugin.path(), &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("docopt==0.6.2 has no binary wheel for CPython 3.11"),
        "{err}"
    );
    assert!(!plugin.path().join("site-packages").exists());

    // With --allow-scripts the sdist is built (its script runs) and recorded so.
    let plugin = py_plugin_with(&format!("{}\n", sdist.display()));
    let out = vendor(plugin.path(), &["--allow-scripts"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists(), "allowed, setup.py ran");
    let lock = std::fs::read_to_string(plugin.path().join("vendor.lock")).unwrap();
    assert!(lock.contains("name = \"evil\""), "{lock}");
    assert!(lock.contains("install_scripts = true"), "{lock}");
}

#[test]
fn vendoring_python_refuses_a_package_whose_extension_needs_a_missing_library() {
    let scratch = open_tempdir();
    let so = scratch.path().join("_fast.so");
    extension_needing_a_missing_library(&so);
    let whl = wheel(
        scratch.path(),
        "needsgone",
        &[
            ("needsgone/__init__.py", b"".to_vec()),
            (
                "needsgone/_fast.cpython-311-x86_64-linux-gnu.so",
                std::fs::read(&so).unwrap(),
            ),
        ],
        "",
    );
    let plugin = py_plugin_with(&format!("{}\n", whl.display()));
    let out = vendor(plugin.path(), &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains(
            "the extension needsgone/_fast.cpython-311-x86_64-linux-gnu.so needs libcorralgone.so.1"
        ),
        "{err}"
    );
    assert!(!plugin.path().join("site-packages").exists());
    assert!(!plugin.path().join("vendor.lock").exists());
    // The staging directory is gone too.
    let left: Vec<_> = std::fs::read_dir(plugin.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".corral-vendor"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn vendoring_npm_packages_refuses_install_scripts_and_restores_what_was_there() {
    let scratch = open_tempdir();
    let marker = scratch.path().join("MARKER");
    // A package whose postinstall script writes the marker, packed by npm.
    let evil = scratch.path().join("evil");
    std::fs::create_dir(&evil).unwrap();
    std::fs::write(
        evil.join("package.json"),
        format!(
            r#"{{"name": "evil", "version": "1.0.0", "main": "index.js",
                "scripts": {{"postinstall": "node -e \"require('fs').writeFileSync('{}', 'ran')\""}}}}"#,
            marker.display()
        ),
    )
    .unwrap();
    std::fs::write(evil.join("index.js"), "module.exports = 'evil';\n").unwrap();
    let packed = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(scratch.path())
        .current_dir(&evil)
        .output()
        .expect("npm (the suite needs it)");
    assert!(
        packed.status.success(),
        "{}{}",
        text(&packed.stdout),
        text(&packed.stderr)
    );
    let tarball = scratch.path().join("evil-1.0.0.tgz");
    assert!(tarball.is_file());

    let plugin = fixture_plugin("js-kit", "vend-js", "js", "main.js", "");
    std::fs::write(
        plugin.path().join("package.json"),
        format!(
            r#"{{"name": "vend-js", "private": true,
                "dependencies": {{"evil": "file:{}", "is-number": "6.0.0"}}}}"#,
            tarball.display()
        ),
    )
    .unwrap();
    std::fs::create_dir(plugin.path().join("node_modules")).unwrap();
    std::fs::write(plugin.path().join("node_modules/kept.txt"), "mine").unwrap();
    // A plugin's own .npmrc could choose what npm runs (`git=`, `script-shell=`).
    std::fs::write(plugin.path().join(".npmrc"), "script-shell=./evil.sh\n").unwrap();
    let out = vendor(plugin.path(), &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("a plugin's .npmrc is not used"), "{err}");
    std::fs::remove_file(plugin.path().join(".npmrc")).unwrap();
    let out = vendor(plugin.path(), &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(
        err.contains("installing these packages runs their scripts: evil 1.0.0"),
        "{err}"
    );
    assert!(!marker.exists(), "the install script ran");
    assert_eq!(
        std::fs::read_to_string(plugin.path().join("node_modules/kept.txt")).unwrap(),
        "mine"
    );
    assert!(!plugin.path().join("package-lock.json").exists());
    assert!(!plugin.path().join("vendor.lock").exists());

    let out = vendor(plugin.path(), &["--allow-scripts"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists(), "allowed, the install script ran");
    let lock = std::fs::read_to_string(plugin.path().join("vendor.lock")).unwrap();
    assert!(
        lock.contains("name = \"evil\"\nversion = \"1.0.0\""),
        "{lock}"
    );
    assert!(lock.contains("install_scripts = true"), "{lock}");
    assert!(
        plugin
            .path()
            .join("node_modules/is-number/index.js")
            .is_file()
    );
}

#[test]
fn vendored_files_are_packed_and_signed_with_the_plugin() {
    let vendored = vendored_fixture("js-packages", "js", "main.js");
    let work = open_tempdir();
    let plugin = work.path().join("plugin");
    let status = Command::new("cp")
        .arg("-r")
        .arg(&vendored)
        .arg(&plugin)
        .status()
        .unwrap();
    assert!(status.success());
    let corral = |args: &[&str]| {
        Command::new(built().corral())
            .args(args)
            .output()
            .expect("run corral")
    };
    let key = work.path().join("key");
    let out = corral(&["plugin", "keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: ").map(str::to_owned))
        .unwrap();
    let out = corral(&[
        "plugin",
        "sign",
        plugin.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--publisher",
        "tests",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = corral(&[
        "plugin",
        "verify",
        plugin.to_str().unwrap(),
        "--trust",
        &format!("tests={public}"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let archive = work.path().join("plugin.tar.gz");
    let out = corral(&[
        "plugin",
        "pack",
        plugin.to_str().unwrap(),
        "--out",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let listing = text(&listing.stdout);
    for file in [
        "js-packages/vendor.lock",
        "js-packages/node_modules/lodash/lodash.js",
        "js-packages/node_modules/semver/node_modules/lru-cache/index.js",
        "js-packages/plugin.sig",
    ] {
        // lru-cache may be hoisted: either place is the vendored copy.
        let hoisted = file.replace("semver/node_modules/", "");
        assert!(
            listing.lines().any(|l| l == file || l == hoisted),
            "{file} not in the archive:\n{listing}"
        );
    }
}
