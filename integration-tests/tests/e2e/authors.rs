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

/// The examples' cases pass in all three runtimes under the shipped policy, each
/// file with its own store seeded from the file.
#[test]
fn the_examples_pass_their_own_cases_in_every_runtime() {
    // The Wasm example as built for the tests, with the example's cases.
    let wasm = plugin_copy(&built().hello_wasm, "hello-wasm");
    let cases = repo_root().join("examples/hello-wasm/tests");
    std::fs::create_dir(wasm.path().join("tests")).unwrap();
    for f in ["basics.toml", "store.toml"] {
        std::fs::copy(cases.join(f), wasm.path().join("tests").join(f)).unwrap();
    }
    let examples = [
        wasm.path().to_owned(),
        repo_root().join("examples/hello-js"),
        repo_root().join("examples/hello-python"),
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
/// it refuses a directory that is not empty, an id that cannot be one, and the
/// native runtime, which has no worker yet.
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
    for runtime in ["js", "python", "wasm"] {
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
        if runtime == "wasm" {
            assert!(readme.contains("cargo build --release --target wasm32-wasip1"));
            let out = Command::new("cargo")
                .args(["build", "--release", "--target", "wasm32-wasip1", "--quiet"])
                .current_dir(&dir)
                .env_remove("CARGO_TARGET_DIR")
                .output()
                .unwrap();
            assert!(out.status.success(), "cargo build: {}", text(&out.stderr));
            let module =
                std::fs::read(dir.join("target/wasm32-wasip1/release/my_wasm.wasm")).unwrap();
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
    let out = corral(&[
        "new",
        place.path().join("n").to_str().unwrap(),
        "--runtime",
        "native",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert!(
        text(&out.stderr).contains("native plugins are not supported"),
        "{}",
        text(&out.stderr)
    );
}
