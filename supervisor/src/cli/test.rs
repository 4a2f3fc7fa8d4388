//! `corral test <dir>`: a plugin's own test cases, run through a real supervisor
//! (the plugin's worker confined at its routed level, under its limits), and the
//! checks of what authors get wrong.
//!
//! Test cases live in `<dir>/tests/*.toml`, one supervisor (and one empty store)
//! per file, the files in name order and the cases in file order:
//!
//! ```toml
//! # What the plugin is given for every case of this file (optional).
//! [config]
//! greeting = "Hello"
//! [secrets]
//! token = "test-token"
//! # The plugin's store before the first case (optional; text values).
//! [store]
//! "visits/Ada" = "1"
//!
//! [[case]]
//! name = "greets by name"       # optional: default "FUNCTION #N"
//! function = "greet"
//! input = "Ada"                 # or input_hex = "00ff"; default empty
//! expect = "Hello, Ada!"        # or expect_hex, or expect_error (below)
//! timeout = "500ms"             # optional
//!
//! [[case]]
//! function = "greet"
//! input = " "
//! expect_error = "plugin_error" # the error's kind, as in `--json`
//! expect_message = "give a name" # optional: a part of the error's message
//! ```
//!
//! The checks: every function a case calls and every handler of the manifest's
//! `subscribe` is exported; no limit in `plugin.toml` is above what the level
//! allows (the policy would lower it); every permission asked for is granted by
//! the policy in use. A case or a check that fails makes the exit code
//! [`exit::TESTS_FAILED`].

use super::exit::{self, Failure, Outcome};
use super::output::print_json;
use super::{parse_level, policy_from};
use crate::{Options, PluginConfig, Supervisor};
use clap::Args;
use corral_client::parse_timeout;
use corral_protocol::{CallError, Secret};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The arguments of `corral test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The plugin directory (holding plugin.toml and tests/).
    dir: PathBuf,
    /// Policy files routing the plugin (default: `CORRAL_POLICY`, else the shipped
    /// policy).
    #[arg(long, env = "CORRAL_POLICY")]
    policy: Option<PathBuf>,
    /// Run at this level whatever the policy routes.
    #[arg(long, value_parser = parse_level)]
    level: Option<corral_confine::Level>,
    /// Only the cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Directory of the worker binaries (default: beside `corral`).
    #[arg(long, env = "CORRAL_WORKER_DIR")]
    worker_dir: Option<PathBuf>,
    /// Print JSON instead of text (docs/json.md).
    #[arg(long)]
    pub(super) json: bool,
}

/// The largest test file read.
const MAX_TEST_FILE: u64 = 4 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    config: BTreeMap<String, toml::Value>,
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    #[serde(default)]
    store: BTreeMap<String, String>,
    #[serde(default, rename = "case")]
    cases: Vec<Spanned<Case>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: Option<String>,
    function: String,
    input: Option<String>,
    input_hex: Option<String>,
    expect: Option<String>,
    expect_hex: Option<String>,
    expect_error: Option<String>,
    expect_message: Option<String>,
    timeout: Option<String>,
}

/// One case, ready to run.
struct Ready {
    name: String,
    function: String,
    input: Vec<u8>,
    expect: Expect,
    timeout: Option<Duration>,
}

enum Expect {
    Output(Vec<u8>),
    Error {
        kind: String,
        message: Option<String>,
    },
}

/// A test file, read and checked.
struct File {
    name: String,
    settings: PluginConfig,
    store: BTreeMap<String, String>,
    cases: Vec<Ready>,
}

/// What one case did.
struct Outcome1 {
    file: String,
    name: String,
    function: String,
    passed: bool,
    took: Duration,
    /// Why it failed.
    why: Option<String>,
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not hex (two digits a byte)"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// Read `path`: every error names the file, line and column.
fn read_file(path: &Path) -> Result<File, String> {
    let text = corral_files::read_regular_string(path, MAX_TEST_FILE)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let at = |span: Option<std::ops::Range<usize>>, message: &str| {
        let (line, column) = corral_manifest::line_col(&text, span.map_or(0, |s| s.start));
        format!("{}:{line}:{column}: {message}", path.display())
    };
    let raw: CaseFile = toml::from_str(&text).map_err(|e| at(e.span(), e.message()))?;
    let mut settings = PluginConfig::default();
    for (k, v) in raw.config {
        let v = match v {
            toml::Value::String(s) => s,
            other => other.to_string(),
        };
        settings.config.insert(k, v);
    }
    for (k, v) in raw.secrets {
        settings.secrets.insert(k, Secret(v));
    }
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut cases = Vec::new();
    for (n, c) in raw.cases.into_iter().enumerate() {
        let span = c.span();
        let c = c.into_inner();
        let bad = |m: &str| at(Some(span.clone()), m);
        let input = match (c.input, c.input_hex) {
            (Some(_), Some(_)) => return Err(bad("give input or input_hex, not both")),
            (Some(s), None) => s.into_bytes(),
            (None, Some(h)) => hex(&h).map_err(|e| bad(&format!("input_hex: {e}")))?,
            (None, None) => Vec::new(),
        };
        if c.expect_message.is_some() && c.expect_error.is_none() {
            return Err(bad("expect_message goes with expect_error"));
        }
        let expect = match (c.expect, c.expect_hex, c.expect_error) {
            (Some(s), None, None) => Expect::Output(s.into_bytes()),
            (None, Some(h), None) => {
                Expect::Output(hex(&h).map_err(|e| bad(&format!("expect_hex: {e}")))?)
            }
            (None, None, Some(kind)) => {
                if !CallError::KINDS.contains(&kind.as_str()) {
                    return Err(bad(&format!(
                        "expect_error: {kind:?} is no error kind; one of {}",
                        CallError::KINDS.join(", ")
                    )));
                }
                Expect::Error {
                    kind,
                    message: c.expect_message,
                }
            }
            (None, None, None) => {
                return Err(bad(
                    "a case needs what it expects: expect, expect_hex or expect_error",
                ));
            }
            _ => return Err(bad("give one of expect, expect_hex and expect_error")),
        };
        let timeout = match c.timeout {
            Some(t) => Some(parse_timeout(&t).map_err(|e| bad(&format!("timeout: {e}")))?),
            None => None,
        };
        cases.push(Ready {
            name: c
                .name
                .unwrap_or_else(|| format!("{} #{}", c.function, n + 1)),
            function: c.function,
            input,
            expect,
            timeout,
        });
    }
    Ok(File {
        name,
        settings,
        store: raw.store,
        cases,
    })
}

/// The test files of `dir`, in name order.
fn test_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let tests = dir.join("tests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&tests)
        .map_err(|e| format!("no test cases: cannot read {}: {e}", tests.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no test cases: no *.toml in {}", tests.display()));
    }
    Ok(files)
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => format!("{s:?}"),
        Err(_) => format!(
            "0x{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn judge(expect: &Expect, got: &Result<Vec<u8>, CallError>) -> Option<String> {
    match (expect, got) {
        (Expect::Output(want), Ok(out)) if out == want => None,
        (Expect::Output(want), Ok(out)) => {
            Some(format!("expected {}, got {}", show(want), show(out)))
        }
        (Expect::Output(want), Err(e)) => Some(format!(
            "expected {}, got an error ({}): {e}",
            show(want),
            e.kind()
        )),
        (Expect::Error { kind, .. }, Ok(out)) => {
            Some(format!("expected an error ({kind}), got {}", show(out)))
        }
        (Expect::Error { kind, message }, Err(e)) => {
            if e.kind() != kind {
                return Some(format!(
                    "expected an error ({kind}), got ({}): {e}",
                    e.kind()
                ));
            }
            match message {
                Some(m) if !e.to_string().contains(m.as_str()) => {
                    Some(format!("expected an error saying {m:?}, got: {e}"))
                }
                _ => None,
            }
        }
    }
}

pub(super) async fn run_tests(args: TestArgs) -> Outcome {
    let policy = policy_from(args.policy.as_deref(), args.level)
        .map_err(|e| Failure::new(exit::INVALID, format!("invalid policy:\n{e}")))?;
    let manifest = corral_manifest::Manifest::load_dir(&args.dir)
        .map_err(|e| Failure::new(exit::INVALID, e))?;
    let mut files = Vec::new();
    for path in test_files(&args.dir).map_err(|e| Failure::new(exit::INVALID, e))? {
        files.push(read_file(&path).map_err(|e| Failure::new(exit::INVALID, e))?);
    }
    if let Some(f) = &args.filter {
        for file in &mut files {
            file.cases.retain(|c| c.name.contains(f.as_str()));
        }
    }
    let effective = policy.resolve(&manifest, None);
    let policy = Arc::new(policy);
    let scratch = tempfile::tempdir().map_err(|e| {
        Failure::new(
            exit::FAILURE,
            format!("cannot make a scratch directory: {e}"),
        )
    })?;
    let mut outcomes = Vec::new();
    let mut exports: Option<Vec<String>> = None;
    for (i, file) in files.iter().enumerate() {
        let mut options = Options::new();
        options.zygotes = Vec::new();
        options.policy = Arc::clone(&policy);
        options.state_dir = scratch.path().join(format!("state-{i}"));
        // A denial is the failing case's error, with its rule: not a line apart.
        options.audit = crate::AuditSink::Off;
        if let Some(d) = &args.worker_dir {
            options.worker_dir = d.clone();
        }
        options
            .plugin_config
            .insert(manifest.id.clone(), file.settings.clone());
        if !file.store.is_empty() {
            let store =
                crate::broker::store::redb::RedbStore::open(&options.state_dir.join("kv.redb"))
                    .map_err(|e| Failure::new(exit::FAILURE, e))?;
            for (k, v) in &file.store {
                store
                    .put(&manifest.id, k, v.as_bytes(), u64::MAX)
                    .map_err(|e| {
                        Failure::new(exit::INVALID, format!("{}: store {k:?}: {e}", file.name))
                    })?;
            }
        }
        let mut sup = Supervisor::new(options);
        let id = sup
            .add_plugin_dir(&args.dir)
            .map_err(|e| Failure::chain(exit::INVALID, &e))?;
        for case in &file.cases {
            let started = Instant::now();
            let got = sup
                .call(&id, &case.function, case.input.clone(), case.timeout)
                .await;
            let took = started.elapsed();
            let why = judge(&case.expect, &got);
            outcomes.push(Outcome1 {
                file: file.name.clone(),
                name: case.name.clone(),
                function: case.function.clone(),
                passed: why.is_none(),
                took,
                why,
            });
            if exports.is_none() {
                exports = sup
                    .list()
                    .await
                    .into_iter()
                    .find(|p| p.id == id && p.pid.is_some())
                    .map(|p| p.exports);
            }
        }
        sup.shutdown(Duration::from_secs(2)).await;
    }
    let checks = checks(&manifest, &effective, &files, exports.as_deref());
    let passed = outcomes.iter().filter(|o| o.passed).count();
    let failed = outcomes.len() - passed;
    let problems = checks.iter().filter(|c| c.1.is_some()).count();
    if args.json {
        print_json(&serde_json::json!({
            "plugin": manifest.id,
            "version": manifest.version.to_string(),
            "runtime": manifest.runtime.as_str(),
            "level": effective.level.value.as_str(),
            "cases": outcomes.iter().map(|o| serde_json::json!({
                "file": o.file, "name": o.name, "function": o.function,
                "passed": o.passed, "ms": o.took.as_secs_f64() * 1e3, "why": o.why,
            })).collect::<Vec<_>>(),
            "checks": checks.iter().map(|(what, problem)| serde_json::json!({
                "check": what, "passed": problem.is_none(), "why": problem,
            })).collect::<Vec<_>>(),
            "passed": passed, "failed": failed, "problems": problems,
        }))?;
    } else {
        println!(
            "corral test {} ({} {}, {}, level {})",
            args.dir.display(),
            manifest.id,
            manifest.version,
            manifest.runtime.as_str(),
            effective.level.value
        );
        for o in &outcomes {
            match &o.why {
                None => println!(
                    "  ok    {}: {}  ({:.1} ms)",
                    o.file,
                    o.name,
                    o.took.as_secs_f64() * 1e3
                ),
                Some(why) => println!("  FAIL  {}: {}: {why}", o.file, o.name),
            }
        }
        for (what, problem) in &checks {
            match problem {
                None => println!("  ok    check: {what}"),
                Some(why) => println!("  FAIL  check: {what}: {why}"),
            }
        }
        println!("{passed} passed, {failed} failed, {problems} problem(s) found by the checks");
    }
    Ok(if failed == 0 && problems == 0 {
        exit::OK
    } else {
        exit::TESTS_FAILED
    })
}

/// Each check: what it looks at, and the problem it found (`None`: none).
fn checks(
    manifest: &corral_manifest::Manifest,
    effective: &corral_policy::Effective,
    files: &[File],
    exports: Option<&[String]>,
) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut called: Vec<&str> = files
        .iter()
        .flat_map(|f| f.cases.iter().map(|c| c.function.as_str()))
        .chain(
            manifest
                .permissions
                .subscribe
                .iter()
                .filter_map(|s| s.split_once('=').map(|(_, f)| f)),
        )
        .collect();
    called.sort();
    called.dedup();
    match exports {
        Some(exports) => {
            let missing: Vec<&str> = called
                .iter()
                .copied()
                .filter(|f| !exports.iter().any(|e| e == f))
                .collect();
            out.push((
                "the functions the cases and subscriptions name are exported".to_owned(),
                (!missing.is_empty()).then(|| {
                    format!(
                        "not exported: {} (it exports: {})",
                        missing.join(", "),
                        exports.join(", ")
                    )
                }),
            ));
        }
        None => out.push((
            "the functions the cases and subscriptions name are exported".to_owned(),
            Some("no worker started to say what it exports (see the failed cases)".into()),
        )),
    }
    out.push((
        format!(
            "the limits in plugin.toml are within level {}",
            effective.level.value
        ),
        (!effective.clamped.is_empty()).then(|| effective.clamped.join("; ")),
    ));
    let refused: Vec<String> = effective
        .requested
        .iter()
        .filter_map(|r| {
            r.decision
                .as_ref()
                .err()
                .map(|why| format!("{}: {why}", r.what))
        })
        .collect();
    out.push((
        "the permissions asked for are granted by the policy".to_owned(),
        (!refused.is_empty()).then(|| refused.join("; ")),
    ));
    out
}
