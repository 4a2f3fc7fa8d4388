//! What plugin authors run: `corral test` over the examples' own cases in every
//! runtime (a real supervisor, the worker confined at the routed level), its
//! failures, its checks and its errors.

use crate::support::text;
use corral_integration_tests::{built, plugin_copy, repo_root};
use std::path::Path;
use std::process::{Command, Output};

fn corral_test(dir: &Path, extra: &[&str]) -> Output {
    Command::new(built().corral())
        .arg("test")
        .arg(dir)
        .args(extra)
        .env_remove("CORRAL_POLICY")
        .output()
        .unwrap()
}

/// The examples' cases pass in all four runtimes under the shipped policy, each
/// file with its own store seeded from the file.
#[test]
fn the_examples_pass_their_own_cases_in_every_runtime() {
    // The Wasm and native examples as built for the tests, with their cases.
    let compiled = |staged: &Path, id: &str| {
        let copy = plugin_copy(staged, id);
        let cases = repo_root().join("examples").join(id).join("tests");
        std::fs::create_dir(copy.path().join("tests")).unwrap();
        for f in ["basics.toml", "store.toml"] {
            std::fs::copy(cases.join(f), copy.path().join("tests").join(f)).unwrap();
        }
        copy
    };
    let wasm = compiled(&built().hello_wasm, "hello-wasm");
    let native = compiled(&built().hello_native, "hello-native");
    let examples = [
        wasm.path().to_owned(),
        repo_root().join("examples/hello-js"),
        repo_root().join("examples/hello-python"),
        native.path().to_owned(),
    ];
    for dir in &examples {
        let out = corral_test(dir, &[]);
        let said = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{said}{}", text(&out.stderr));
        assert!(said.contains(", level standard)"), "{said}");
        assert!(
            said.contains("  ok    store.toml: counts a second visit"),
            "{said}"
        );
        assert!(
            said.ends_with("8 passed, 0 failed, 0 problem(s) found by the checks\n"),
            "{said}"
        );
        let out = corral_test(dir, &["--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (&v["passed"], &v["failed"], &v["problems"]),
            (&8.into(), &0.into(), &0.into()),
            "{v}"
        );
        assert_eq!(v["cases"].as_array().unwrap().len(), 8);
        assert!(
            v["cases"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["passed"] == true)
        );
    }
}

/// A wrong expectation, a function the plugin does not export, a limit above the
/// level and a permission the policy does not grant are each named, and the exit
/// code says the tests failed; a malformed case file names its place.
#[test]
fn failures_and_what_authors_get_wrong_are_named() {
    let plugin = plugin_copy(&repo_root().join("examples/hello-js"), "hello-js");
    let dir = plugin.path();
    let manifest = dir.join("plugin.toml");
    let text_of = std::fs::read_to_string(&manifest).unwrap();
    // Ask for more memory than the level allows, and for a topic no grant gives.
    let text_of = text_of
        .replace("memory = \"32MiB\"", "memory = \"4GiB\"")
        .replace(
            "subscribe = [\"hello.news=on_news\"]",
            "subscribe = [\"hello.news=on_news\"]\npublish = [\"secret.plans\"]",
        );
    std::fs::write(&manifest, text_of).unwrap();
    std::fs::write(
        dir.join("tests/wrong.toml"),
        "[[case]]\nname = \"wrong greeting\"\nfunction = \"greet\"\ninput = \"Ada\"\nexpect = \"Hi, Ada!\"\n\n\
         [[case]]\nname = \"missing function\"\nfunction = \"shout\"\nexpect = \"ADA\"\n",
    )
    .unwrap();
    let out = corral_test(dir, &[]);
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(10), "{said}{}", text(&out.stderr));
    assert!(
        said.contains(
            "  FAIL  wrong.toml: wrong greeting: expected \"Hi, Ada!\", got \"Hello, Ada!\""
        ),
        "{said}"
    );
    assert!(
        said.contains("  FAIL  wrong.toml: missing function: expected \"ADA\", got an error (unknown_function)"),
        "{said}"
    );
    assert!(
        said.contains("  FAIL  check: the functions the cases and subscriptions name are exported: not exported: shout"),
        "{said}"
    );
    assert!(
        said.contains("  FAIL  check: the limits in plugin.toml are within level standard: "),
        "{said}"
    );
    assert!(said.contains("memory"), "{said}");
    assert!(
        said.contains("  FAIL  check: the permissions asked for are granted by the policy: publish secret.plans"),
        "{said}"
    );
    assert!(
        said.ends_with("8 passed, 2 failed, 3 problem(s) found by the checks\n"),
        "{said}"
    );
    // --filter runs only the cases whose name has it.
    let out = corral_test(dir, &["--filter", "visit", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((&v["passed"], &v["failed"]), (&1.into(), &0.into()), "{v}");
    assert_eq!(v["cases"][0]["name"], "counts a second visit");
    assert_eq!(v["problems"], 2, "{v}");

    // A malformed file: its place, nothing run.
    std::fs::write(
        dir.join("tests/wrong.toml"),
        "[[case]]\nfunction = \"greet\"\nexpect_eror = \"timeout\"\n",
    )
    .unwrap();
    let out = corral_test(dir, &[]);
    assert_eq!(out.status.code(), Some(7));
    let err = text(&out.stderr);
    let file = dir.join("tests/wrong.toml");
    assert!(
        err.starts_with(&format!(
            "error: {}:3:1: unknown field `expect_eror`",
            file.display()
        )),
        "{err}"
    );
    std::fs::write(
        dir.join("tests/wrong.toml"),
        "[[case]]\nfunction = \"greet\"\nexpect_error = \"oops\"\n",
    )
    .unwrap();
    let err = text(&corral_test(dir, &[]).stderr);
    assert!(
        err.contains("expect_error: \"oops\" is no error kind; one of plugin_error, trap"),
        "{err}"
    );
    std::fs::remove_file(dir.join("tests/wrong.toml")).unwrap();
    std::fs::remove_dir_all(dir.join("tests")).unwrap();
    let out = corral_test(dir, &["--json"]);
    assert_eq!(out.status.code(), Some(7));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("no test cases"),
        "{v}"
    );
}

/// `corral new` writes a plugin in each runtime that builds with the command its
/// README gives and passes `corral test` at once (with its development policy);
/// it refuses a directory that is not empty and an id that cannot be one.
#[test]
fn corral_new_writes_plugins_that_pass_corral_test_in_every_runtime() {
    let place = corral_integration_tests::open_tempdir();
    let corral = |args: &[&str]| {
        Command::new(built().corral())
            .args(args)
            .env_remove("CORRAL_POLICY")
            .output()
            .unwrap()
    };
    for runtime in ["js", "python", "wasm", "native"] {
        let dir = place.path().join(format!("my-{runtime}"));
        let d = dir.to_str().unwrap();
        let out = corral(&["new", d, "--runtime", runtime, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["id"], format!("my-{runtime}"));
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(
            readme.contains("corral test . --policy dev-policy.toml"),
            "{readme}"
        );
        let rust = match runtime {
            "wasm" => Some((
                &["--target", "wasm32-wasip1"][..],
                "target/wasm32-wasip1/release/my_wasm.wasm",
            )),
            "native" => Some((&[][..], "target/release/libmy_native.so")),
            _ => None,
        };
        if let Some((target, built)) = rust {
            let command = ["cargo build --release", &target.join(" ")].join(" ");
            assert!(readme.contains(command.trim_end()), "{runtime}: {readme}");
            let out = Command::new("cargo")
                .args(["build", "--release", "--quiet"])
                .args(target)
                .current_dir(&dir)
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .output()
                .unwrap();
            assert!(out.status.success(), "cargo build: {}", text(&out.stderr));
            let module = std::fs::read(dir.join(built)).unwrap();
            for export in [
                "corral_init",
                "corral_shutdown",
                "corral_fn_greet",
                "corral_fn_visit",
            ] {
                assert!(
                    module.windows(export.len()).any(|w| w == export.as_bytes()),
                    "the module exports {export}"
                );
            }
        }
        // Workers run as nobody: what the test wrote must be readable to it.
        let out = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(place.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let policy = dir.join("dev-policy.toml");
        let out = corral(&["test", d, "--policy", policy.to_str().unwrap()]);
        let said = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{runtime}: {said}{}",
            text(&out.stderr)
        );
        assert!(
            said.ends_with("5 passed, 0 failed, 0 problem(s) found by the checks\n"),
            "{runtime}: {said}"
        );
        // Under the shipped policy instead: the store is not granted, and it says so.
        let out = corral(&["test", d]);
        assert_eq!(out.status.code(), Some(10), "{runtime}");
        assert!(
            text(&out.stdout).contains(
                "FAIL  check: the permissions asked for are granted by the policy: kv: default deny"
            ),
            "{}",
            text(&out.stdout)
        );
    }
    let taken = place.path().join("my-js");
    let out = corral(&["new", taken.to_str().unwrap(), "--runtime", "js"]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stderr).contains("is not empty"),
        "{}",
        text(&out.stderr)
    );
    let out = corral(&[
        "new",
        place.path().join("Bad Name").to_str().unwrap(),
        "--runtime",
        "js",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stderr).contains("cannot be a plugin id"),
        "{}",
        text(&out.stderr)
    );
}

/// A tool the suite runs from `PATH` (.ci/run installs it: TypeScript from npm,
/// mypy and pytest from PyPI).
fn tool(name: &str, args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(name);
    // No __pycache__ or .mypy_cache beside the plugins the other tests copy.
    c.args(args)
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap_or_else(|e| {
        panic!("{name} ({e}): .ci/run installs it (npm typescript; PyPI mypy, pytest)")
    })
}

/// The typed host APIs: `tsc --noEmit` checks the JavaScript example and what
/// `corral new` writes against `corral.d.ts` (and finds a misspelt host call);
/// `mypy --strict` checks the Python package, the example and a new plugin; the
/// stand-in runs the example's and the template's cases under pytest with
/// Corral's answers, and a new plugin's own pytest file passes.
#[test]
fn typed_host_apis_check_with_tsc_and_mypy_and_the_stand_in_passes_pytest() {
    let root = repo_root();
    let sdk = root.join("sdk/python");
    let out = tool("tsc", &["--noEmit", "-p", "examples/hello-js"], &root, &[]);
    assert!(
        out.status.success(),
        "tsc: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let place = corral_integration_tests::open_tempdir();
    let js = place.path().join("new-js");
    let py = place.path().join("new-py");
    for (dir, runtime) in [(&js, "js"), (&py, "python")] {
        let out = Command::new(built().corral())
            .args(["new", dir.to_str().unwrap(), "--runtime", runtime])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    }
    let out = tool("tsc", &["--noEmit"], &js, &[]);
    assert!(
        out.status.success(),
        "tsc: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let main = js.join("main.js");
    let good = std::fs::read_to_string(&main).unwrap();
    std::fs::write(&main, good.replace("corral.kv.put(", "corral.kv.set(")).unwrap();
    let out = tool("tsc", &["--noEmit"], &js, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("Property 'set' does not exist on type 'Store'"),
        "{}",
        text(&out.stdout)
    );

    for target in [
        sdk.join("corral"),
        root.join("examples/hello-python/plugin.py"),
        py.join("plugin.py"),
        py.join("test_plugin.py"),
    ] {
        let out = tool(
            "mypy",
            &[
                "--strict",
                "--no-incremental",
                "--cache-dir=/dev/null",
                target.to_str().unwrap(),
            ],
            place.path(),
            &[("MYPYPATH", &sdk)],
        );
        assert!(
            out.status.success(),
            "mypy --strict {}: {}{}",
            target.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let out = tool(
        "pytest",
        &["-q", "-p", "no:cacheprovider", "tests"],
        &sdk,
        &[("PYTHONPATH", &sdk)],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "pytest: {said}{}", text(&out.stderr));
    assert!(said.contains("5 passed"), "{said}");
    let out = tool(
        "pytest",
        &["-q", "-p", "no:cacheprovider", "test_plugin.py"],
        &py,
        &[("PYTHONPATH", &sdk)],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "pytest: {said}{}", text(&out.stderr));
    assert!(said.contains("4 passed"), "{said}");
}

/// The typed APIs name what the workers really give a plugin: the `corral`
/// global of the JavaScript worker and the `corral` module of the Python worker,
/// read by plugins running in Corral, against `corral.d.ts` and the package.
#[test]
fn the_typed_apis_name_what_the_workers_provide() {
    let root = repo_root();
    let place = corral_integration_tests::open_tempdir();
    let js = place.path().join("names-js");
    std::fs::create_dir(&js).unwrap();
    std::fs::write(
        js.join("main.js"),
        "export function names() { return Object.keys(corral).sort().join(\" \"); }\n",
    )
    .unwrap();
    std::fs::write(
        js.join("plugin.toml"),
        "id = \"names-js\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
    )
    .unwrap();
    let py = place.path().join("names-py");
    std::fs::create_dir(&py).unwrap();
    std::fs::write(
        py.join("plugin.py"),
        "import corral\n\ndef names(data):\n    return \" \".join(sorted(n for n in dir(corral) + [\"config\"] if not n.startswith(\"_\")))\n",
    )
    .unwrap();
    std::fs::write(
        py.join("plugin.toml"),
        "id = \"names-py\"\nversion = \"1.0.0\"\nruntime = \"python\"\nentry = \"plugin.py\"\n",
    )
    .unwrap();
    let _ = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(place.path())
        .output();
    let run = |dir: &Path| {
        let out = Command::new(built().corral())
            .arg("run")
            .arg(dir)
            .arg("names")
            .env_remove("CORRAL_POLICY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let mut v: Vec<String> = text(&out.stdout).split(' ').map(str::to_owned).collect();
        v.sort();
        v.dedup();
        v
    };
    // What corral.d.ts declares in the namespace: functions, consts and classes.
    let dts = std::fs::read_to_string(root.join("sdk/js/corral.d.ts")).unwrap();
    let mut declared: Vec<String> = dts
        .lines()
        .map(str::trim)
        .filter_map(|l| {
            let rest = l
                .strip_prefix("function ")
                .or_else(|| l.strip_prefix("const "))
                .or_else(|| l.strip_prefix("class "))?;
            Some(
                rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                    .next()?
                    .to_owned(),
            )
        })
        .collect();
    declared.sort();
    declared.dedup();
    assert_eq!(
        run(&js),
        declared,
        "the JavaScript worker's corral against corral.d.ts"
    );
    // The package's __all__.
    let init = std::fs::read_to_string(root.join("sdk/python/corral/__init__.py")).unwrap();
    let all = init
        .split("__all__ = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    let mut exported: Vec<String> = all
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    exported.sort();
    let provided: Vec<String> = run(&py)
        .into_iter()
        .filter(|n| !matches!(n.as_str(), "annotations" | "builtins"))
        .collect();
    assert_eq!(
        provided, exported,
        "the Python worker's corral against the package"
    );
}
