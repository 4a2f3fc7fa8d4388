//! `corral plugin vendor`: a plugin's dependencies, installed into its directory
//! by its ecosystem's own tool, and recorded.
//!
//! - **Python**: `requirements.txt`, installed by pip into `site-packages/` (on the
//!   worker's `sys.path` after the plugin directory) with the worker's own CPython,
//!   so that binary wheels match its version and platform. Only wheels: a source
//!   distribution runs its build scripts (`setup.py`) when installed. pip's
//!   `--only-binary=:all:` refuses those found in an index but not a direct
//!   reference (a path or URL of an sdist, pypa/pip#12807), and option lines in
//!   the file would override the command line, so both are refused here first.
//! - **JavaScript**: `package.json`, installed by npm into `node_modules/`:
//!   production dependencies only, no links (pack and signing refuse them). The
//!   lock is resolved first without running anything; a package that has install
//!   scripts is refused by name.
//!
//! `--allow-scripts` allows both. Nothing is changed until the install succeeded:
//! the tool installs into a staging directory (Python) or the previous
//! `node_modules` and lock are kept aside and put back (JavaScript). What was
//! installed, with versions and hashes, goes to `vendor.lock`, which the plugin
//! keeps (pack and signing include it with the vendored files).

use crate::plugins::native::{Library, Linker, NativeError};
use corral_manifest::{Manifest, Runtime};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The record of what was vendored.
pub const LOCK_FILE: &str = "vendor.lock";
/// Where Python packages go (the Python worker puts it on `sys.path`).
pub const PYTHON_DIR: &str = "site-packages";
/// Where npm packages go.
pub const JS_DIR: &str = "node_modules";

/// Largest `requirements.txt` or `package.json` read.
const MAX_SPEC_FILE: u64 = 1 << 20;
/// Largest report or lock a tool writes that is read back.
const MAX_TOOL_FILE: u64 = 64 << 20;
/// Lines of a failed tool's output shown.
const OUTPUT_LINES: usize = 30;

#[derive(Debug, Clone)]
pub struct VendorOptions {
    /// Install packages whose installation runs scripts.
    pub allow_scripts: bool,
    /// The CPython to run pip with; the Python worker's by default.
    pub python: Option<PathBuf>,
    /// Where the workers are (the Python worker is asked for its interpreter).
    pub worker_dir: PathBuf,
    /// The npm program.
    pub npm: PathBuf,
}

/// `vendor.lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub runtime: Runtime,
    /// The tool and its version (`pip 23.2.1`, `npm 11.19.1`).
    pub tool: String,
    /// The directory, inside the plugin, the packages are in.
    pub into: String,
    #[serde(default, rename = "package")]
    pub packages: Vec<Locked>,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Locked {
    pub name: String,
    pub version: String,
    /// Where it came from (a wheel's or tarball's URL, a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `sha256:<hex>` (pip) or npm's `integrity` (`sha512-<base64>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Whether installing it ran (or, refused, would run) its scripts.
    #[serde(default)]
    pub install_scripts: bool,
}

/// What a vendor run did.
#[derive(Debug)]
pub struct Vendored {
    pub lock: Lock,
    /// The system libraries the packages' compiled extensions need (Python).
    pub libraries: Vec<Library>,
    /// Things the author should know (an npm package with a native addon).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum VendorError {
    #[error(transparent)]
    Manifest(#[from] corral_manifest::ManifestError),
    #[error(
        "a {0} plugin has no dependencies to vendor (a Wasm module or a native library links \
         its own at build time)"
    )]
    Nothing(Runtime),
    #[error("cannot read {}: {why}", file.display())]
    Spec { file: PathBuf, why: String },
    #[error("requirements.txt line {line}: {why}\n  {text}")]
    Requirement {
        line: usize,
        text: String,
        why: String,
    },
    #[error(
        "a wheel depends on a direct reference to something other than a wheel, which pip \
         builds by running its scripts: {}; pass --allow-scripts to allow that. Nothing was \
         changed.",
        dependencies.join("; ")
    )]
    WheelNeedsSource { dependencies: Vec<String> },
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); nothing was changed:\n{output}")]
    Tool {
        what: String,
        status: String,
        output: String,
    },
    #[error(
        "{package} has no binary wheel for CPython {python} on this platform; installing it from \
         source runs its build scripts (setup.py), so it is refused: pin a version that has a \
         wheel, or pass --allow-scripts to build it. Nothing was changed. pip said:\n{output}"
    )]
    NoWheel {
        package: String,
        python: String,
        output: String,
    },
    #[error(
        "refusing to install, because installing these packages runs their scripts: {}; \
         pass --allow-scripts to allow them. Nothing was changed.",
        packages.join(", ")
    )]
    Scripts { packages: Vec<String> },
    #[error("the vendored packages cannot run in the Python worker; nothing was changed: {0}")]
    Native(#[from] NativeError),
    #[error("{}: a symbolic link, which plugin archives and signatures refuse; nothing was changed", path.display())]
    Link { path: PathBuf },
    #[error("cannot read what {tool} reported: {why}")]
    Report { tool: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> VendorError {
    let what = what.to_string();
    move |source| VendorError::Io { what, source }
}

/// Vendor the dependencies of the plugin in `dir`.
pub fn vendor(dir: &Path, opts: &VendorOptions) -> Result<Vendored, VendorError> {
    let manifest = Manifest::load_dir(dir)?;
    match manifest.runtime {
        Runtime::Python => vendor_python(dir, opts),
        Runtime::Js => vendor_js(dir, opts),
        runtime @ (Runtime::Wasm | Runtime::Native) => Err(VendorError::Nothing(runtime)),
    }
}

// ---- Python ----

/// What [`check_requirements`] accepted.
#[derive(Debug, Default)]
pub struct Requirements {
    pub count: usize,
    /// Direct references to wheels (paths or URLs), whose own dependencies are
    /// checked too ([`check_wheel_dependencies`]).
    pub wheels: Vec<String>,
}

/// Refuse what would make pip run a package's build scripts or ignore the
/// command line: option lines (`-r`, `--no-binary`, `--index-url`...) and direct
/// references to anything but a wheel. `--hash` after a requirement is kept.
pub fn check_requirements(text: &str, allow_scripts: bool) -> Result<Requirements, VendorError> {
    let mut out = Requirements::default();
    for (i, line) in text.split('\n').enumerate() {
        let fail = |why: &str| VendorError::Requirement {
            line: i + 1,
            text: line.trim().chars().filter(|c| !c.is_control()).collect(),
            why: why.to_owned(),
        };
        // pip splits lines as Python's splitlines does: where it would and this
        // would not, the two would read different requirements.
        if line.contains([
            '\r', '\x0b', '\x0c', '\x1c', '\x1d', '\x1e', '\u{85}', '\u{2028}', '\u{2029}',
        ]) {
            return Err(fail(
                "an unusual line break (pip would split the line there)",
            ));
        }
        if line.contains("${") {
            return Err(fail("environment variables (${...}) are not accepted"));
        }
        // A comment starts at `#` at the start or after whitespace.
        let body = match line
            .char_indices()
            .find(|&(at, c)| c == '#' && (at == 0 || line[..at].ends_with(char::is_whitespace)))
        {
            Some((at, _)) => &line[..at],
            None => line,
        };
        let body = body.trim();
        if body.is_empty() {
            continue;
        }
        if body.ends_with('\\') {
            return Err(fail(
                "line continuations are not accepted: put each requirement on one line",
            ));
        }
        if body.starts_with('-') {
            return Err(fail(
                "pip options are not accepted in requirements.txt (corral plugin vendor \
                 chooses them, and one here would override its refusal to build from source)",
            ));
        }
        let mut tokens = body.split_whitespace();
        let requirement = tokens.next().unwrap_or_default();
        let rest: Vec<&str> = tokens.collect();
        // `name @ url`, with or without spaces around `@`.
        let (direct, options) = if rest.first() == Some(&"@") {
            (rest.get(1).copied(), &rest[rest.len().min(2)..])
        } else if let Some((_, url)) = requirement.split_once('@') {
            (Some(url), &rest[..])
        } else if looks_like_path(requirement) {
            (Some(requirement), &rest[..])
        } else {
            let name_end = requirement
                .find(|c: char| "[<>=!~;(".contains(c))
                .unwrap_or(requirement.len());
            let name = &requirement[..name_end];
            let valid = name.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !valid {
                return Err(fail("not a package name, a wheel or a direct reference"));
            }
            (None, &rest[..])
        };
        if let Some(option) = options
            .iter()
            .find(|o| !o.starts_with("--hash=") && o.starts_with('-'))
        {
            return Err(fail(&format!(
                "the option {option} is not accepted (only --hash=... after a requirement)"
            )));
        }
        if let Some(target) = direct {
            let path = target.split(['#', '?']).next().unwrap_or(target);
            let remote = path.contains("://") && !path.starts_with("file:");
            if !allow_scripts && !path.ends_with(".whl") {
                return Err(fail(
                    "a direct reference to something other than a wheel (.whl): pip builds it \
                     by running its scripts; pass --allow-scripts to allow that",
                ));
            }
            if !allow_scripts && remote {
                return Err(fail(
                    "a wheel by URL: its own dependencies cannot be checked before pip reads \
                     them (one may be a source build); download it into the plugin and name \
                     the file, or pass --allow-scripts",
                ));
            }
            out.wheels.push(target.to_owned());
        }
        out.count += 1;
    }
    Ok(out)
}

/// Whether pip would take `requirement` for a path or an archive rather than a
/// package name.
fn looks_like_path(requirement: &str) -> bool {
    const ARCHIVES: &[&str] = &[
        ".whl",
        ".zip",
        ".tar",
        ".tar.gz",
        ".tgz",
        ".tar.bz2",
        ".tbz",
        ".tar.xz",
        ".txz",
        ".tar.lz",
        ".tlz",
        ".tar.lzma",
    ];
    requirement.starts_with(['.', '/', '~'])
        || requirement.contains(['/', '\\', ':'])
        || ARCHIVES
            .iter()
            .any(|a| requirement.to_ascii_lowercase().ends_with(a))
}

/// Reads the `Requires-Dist` of local wheels (and of local wheels they name) and
/// prints each dependency given as a direct reference to something other than a
/// wheel. A package on an index cannot have one (PyPI refuses them); a wheel on
/// disk can, and pip would build it however `--only-binary` is set.
const WHEEL_DEPENDENCIES: &str = r##"
import os, sys, urllib.parse, zipfile
todo, seen, bad = list(sys.argv[1:]), set(), []
while todo:
    ref = todo.pop()
    if ref.startswith("file:"):
        path = urllib.parse.unquote(urllib.parse.urlparse(ref).path)
    elif "://" in ref:
        continue
    else:
        path = ref
    path = os.path.abspath(path.split("#")[0])
    if path in seen or not os.path.isfile(path):
        continue
    seen.add(path)
    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile):
        continue
    with z:
        for name in z.namelist():
            if name.count("/") != 1 or not name.endswith(".dist-info/METADATA"):
                continue
            for line in z.read(name).decode("utf-8", "replace").splitlines():
                if not line.lower().startswith("requires-dist:") or " @ " not in line:
                    continue
                url = line.split(" @ ", 1)[1].split(";")[0].strip()
                if url.split("#")[0].split("?")[0].endswith(".whl"):
                    todo.append(url)
                else:
                    bad.append(os.path.basename(path) + ": " + line.split(":", 1)[1].strip())
print("\n".join(bad))
"##;

/// Refuse local wheels whose dependencies are direct references to source
/// distributions (checked with `python`, from the plugin directory `dir`).
pub fn check_wheel_dependencies(
    python: &Path,
    dir: &Path,
    wheels: &[String],
) -> Result<(), VendorError> {
    if wheels.is_empty() {
        return Ok(());
    }
    let out = run_quiet(
        Command::new(python)
            .args(["-I", "-S", "-c", WHEEL_DEPENDENCIES])
            .args(wheels)
            .current_dir(dir),
        "reading the wheels' dependencies",
    )?;
    let bad: Vec<String> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(VendorError::WheelNeedsSource { dependencies: bad })
    }
}

/// The interpreter the Python worker embeds, and its version.
fn worker_interpreter(worker_dir: &Path) -> Result<(PathBuf, String), VendorError> {
    let worker = worker_dir.join("corral-worker-python");
    let out = bounded_output(Command::new(&worker).arg("--interpreter")).map_err(|source| {
        VendorError::Spawn {
            tool: format!("{} (to ask which CPython it embeds)", worker.display()),
            source,
        }
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (out.status.success(), lines.next(), lines.next()) {
        (true, Some(exe), Some(version)) => Ok((PathBuf::from(exe), version.to_owned())),
        _ => Err(VendorError::Tool {
            what: format!("{} --interpreter", worker.display()),
            status: out.status.to_string(),
            output: tail(&String::from_utf8_lossy(&out.stderr)),
        }),
    }
}

/// The version a CPython reports (`3.11.7`).
fn python_version(python: &Path) -> Result<String, VendorError> {
    let out = run_quiet(
        Command::new(python).args(["-I", "-c", "import sys; print(sys.version.split()[0])"]),
        &python.display().to_string(),
    )?;
    Ok(out.trim().to_owned())
}

fn vendor_python(dir: &Path, opts: &VendorOptions) -> Result<Vendored, VendorError> {
    let reqs = dir.join("requirements.txt");
    let text =
        corral_files::read_regular_string(&reqs, MAX_SPEC_FILE).map_err(|e| VendorError::Spec {
            file: reqs.clone(),
            why: format!("{e} (a Python plugin lists its packages there, one per line)"),
        })?;
    let requirements = check_requirements(&text, opts.allow_scripts)?;
    let (python, version) = match &opts.python {
        Some(p) => (p.clone(), python_version(p)?),
        None => worker_interpreter(&opts.worker_dir)?,
    };
    if !opts.allow_scripts {
        check_wheel_dependencies(&python, dir, &requirements.wheels)?;
    }
    let pip_version = run_quiet(
        Command::new(&python).args(["-I", "-m", "pip", "--version"]),
        "pip --version",
    )?;
    let tool = pip_version
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    let staging = staging_dir(dir)?;
    let target = staging.path().join(PYTHON_DIR);
    let report = staging.path().join("report.json");
    let mut cmd = Command::new(&python);
    // -I: the current directory (the plugin's, for its relative paths) is not on
    // sys.path, so none of the plugin's files can stand in for pip or the standard
    // library.
    cmd.args(["-I", "-m", "pip", "install", "--target"])
        .arg(&target)
        .args([
            "--no-compile",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            "--report",
        ])
        .arg(&report)
        .arg("-r")
        .arg(&reqs)
        // Relative paths in requirements.txt are the plugin's.
        .current_dir(dir);
    if !opts.allow_scripts {
        cmd.arg("--only-binary=:all:");
    }
    if let Err(e) = run_quiet(&mut cmd, "pip install") {
        if let VendorError::Tool { output, .. } = &e {
            let marker = "No matching distribution found for ";
            if let Some(line) = output.lines().find(|l| l.contains(marker)) {
                let package = line[line.find(marker).unwrap_or(0) + marker.len()..]
                    .trim()
                    .to_owned();
                if !opts.allow_scripts {
                    return Err(VendorError::NoWheel {
                        package,
                        python: version,
                        output: output.clone(),
                    });
                }
            }
        }
        return Err(e);
    }
    let packages = pip_report(&report)?;
    // Console scripts point at this machine's interpreter: of no use in a plugin.
    let bin = target.join("bin");
    if bin.is_dir() {
        std::fs::remove_dir_all(&bin).map_err(io(bin.display()))?;
    }
    refuse_links(&target)?;
    let linker = Linker::system(Some(&opts.worker_dir.join("corral-worker-python")));
    let libraries = linker.libraries(&target)?;
    let lock = Lock {
        runtime: Runtime::Python,
        tool: format!("{tool} (CPython {version})"),
        into: PYTHON_DIR.to_owned(),
        packages,
    };
    // The lock is written before the swap, so that nothing can fail between the
    // new packages going in and their record.
    let lock_tmp = prepare_lock(staging.path(), &lock)?;
    swap_in(staging.path(), &target, &dir.join(PYTHON_DIR))?;
    commit_lock(dir, &lock_tmp)?;
    Ok(Vendored {
        lock,
        libraries,
        warnings: Vec::new(),
    })
}

/// A JSON file a tool wrote (its report or lock).
fn tool_json(path: &Path, tool: &str) -> Result<serde_json::Value, VendorError> {
    let bad = |why: String| VendorError::Report {
        tool: tool.into(),
        why,
    };
    let text =
        corral_files::read_regular_string(path, MAX_TOOL_FILE).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
}

/// The packages of pip's `--report`.
fn pip_report(report: &Path) -> Result<Vec<Locked>, VendorError> {
    let bad = |why: String| VendorError::Report {
        tool: "pip".into(),
        why,
    };
    let v = tool_json(report, "pip")?;
    let items = v["install"]
        .as_array()
        .ok_or_else(|| bad("no \"install\" list".into()))?;
    let mut out: Vec<Locked> = items
        .iter()
        .map(|item| {
            let url = item["download_info"]["url"].as_str().map(str::to_owned);
            let hash = item["download_info"]["archive_info"]["hashes"]["sha256"]
                .as_str()
                .map(|h| format!("sha256:{h}"));
            let wheel = url
                .as_deref()
                .is_some_and(|u| u.split(['#', '?']).next().unwrap_or(u).ends_with(".whl"));
            Locked {
                name: item["metadata"]["name"].as_str().unwrap_or("?").to_owned(),
                version: item["metadata"]["version"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                source: url,
                hash,
                install_scripts: !wheel,
            }
        })
        .collect();
    out.sort_by_key(|p| p.name.to_lowercase());
    Ok(out)
}

// ---- JavaScript ----

/// npm's options for every step: production dependencies, no links, the lock
/// recording where each package came from.
const NPM_COMMON: &[&str] = &[
    "--omit=dev",
    "--no-audit",
    "--no-fund",
    "--no-bin-links",
    "--install-links",
    "--omit-lockfile-registry-resolved=false",
    "--update-notifier=false",
];

fn vendor_js(dir: &Path, opts: &VendorOptions) -> Result<Vendored, VendorError> {
    let manifest_file = dir.join("package.json");
    let text = corral_files::read_regular_string(&manifest_file, MAX_SPEC_FILE).map_err(|e| {
        VendorError::Spec {
            file: manifest_file.clone(),
            why: format!("{e} (a JavaScript plugin lists its packages in its \"dependencies\")"),
        }
    })?;
    serde_json::from_str::<serde_json::Value>(&text).map_err(|e| VendorError::Spec {
        file: manifest_file.clone(),
        why: e.to_string(),
    })?;
    let npm = &opts.npm;
    let version = run_quiet(Command::new(npm).arg("--version"), "npm --version")?;
    let tool = format!("npm {}", version.trim());

    // npm obeys a project's .npmrc (`git=`, `script-shell=`, `registry=`: a plugin
    // file could choose what runs), and prefers a shrinkwrap to the lock checked here.
    for refused in [".npmrc", "npm-shrinkwrap.json"] {
        if std::fs::symlink_metadata(dir.join(refused)).is_ok() {
            return Err(VendorError::Spec {
                file: dir.join(refused),
                why: format!(
                    "a plugin's {refused} is not used by corral plugin vendor (it would change \
                     what npm installs or runs); remove it (your own ~/.npmrc still applies)"
                ),
            });
        }
    }
    // What is there now is kept aside until the new install is complete.
    let aside = staging_dir(dir)?;
    let modules = dir.join(JS_DIR);
    let lock_file = dir.join("package-lock.json");
    let old_modules = aside.path().join(JS_DIR);
    let old_lock = match std::fs::read(&lock_file) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        // Unreadable is not absent: it would be deleted on the way back.
        Err(e) => return Err(io(lock_file.display())(e)),
    };
    if std::fs::symlink_metadata(&modules).is_ok() {
        std::fs::rename(&modules, &old_modules).map_err(io(modules.display()))?;
    }
    let restore = || {
        if std::fs::symlink_metadata(&modules).is_ok() {
            let _ = std::fs::remove_dir_all(&modules);
        }
        if std::fs::symlink_metadata(&old_modules).is_ok() {
            let _ = std::fs::rename(&old_modules, &modules);
        }
        match &old_lock {
            Some(bytes) => {
                let _ = std::fs::write(&lock_file, bytes);
            }
            None => {
                let _ = std::fs::remove_file(&lock_file);
            }
        }
    };
    let result = (|| -> Result<(Vec<Locked>, Vec<String>), VendorError> {
        // 1. Resolve the lock; nothing is installed or run.
        run_quiet(
            Command::new(npm)
                .args(["install", "--package-lock-only", "--ignore-scripts"])
                .args(NPM_COMMON)
                .current_dir(dir),
            "npm install --package-lock-only",
        )?;
        let packages = npm_lock(&lock_file)?;
        let scripted: Vec<String> = packages
            .iter()
            .filter(|p| p.install_scripts)
            .map(|p| format!("{} {}", p.name, p.version))
            .collect();
        if !scripted.is_empty() && !opts.allow_scripts {
            return Err(VendorError::Scripts { packages: scripted });
        }
        // 2. Install exactly that lock.
        let mut ci = Command::new(npm);
        ci.arg("ci").args(NPM_COMMON).current_dir(dir);
        if !opts.allow_scripts {
            ci.arg("--ignore-scripts");
        }
        run_quiet(&mut ci, "npm ci")?;
        if modules.is_dir() {
            refuse_links(&modules)?;
        }
        let warnings = native_addons(&modules)
            .into_iter()
            .map(|p| {
                format!(
                    "{}: a native Node.js addon, which a JavaScript plugin cannot load (the \
                     package must work without it)",
                    p.strip_prefix(dir).unwrap_or(&p).display()
                )
            })
            .collect();
        Ok((packages, warnings))
    })();
    let (packages, warnings) = match result {
        Ok(r) => r,
        Err(e) => {
            restore();
            return Err(e);
        }
    };
    let lock = Lock {
        runtime: Runtime::Js,
        tool,
        into: JS_DIR.to_owned(),
        packages,
    };
    if let Err(e) = write_lock(dir, aside.path(), &lock) {
        restore();
        return Err(e);
    }
    Ok(Vendored {
        lock,
        libraries: Vec::new(),
        warnings,
    })
}

/// The installed (not dev) packages of an npm `package-lock.json` (version 2 or 3).
fn npm_lock(path: &Path) -> Result<Vec<Locked>, VendorError> {
    let bad = |why: String| VendorError::Report {
        tool: "npm".into(),
        why,
    };
    let v = tool_json(path, "npm")?;
    let packages = v["packages"].as_object().ok_or_else(|| {
        bad("no \"packages\" in package-lock.json (lockfileVersion 2 or 3)".into())
    })?;
    let mut out = Vec::new();
    for (key, p) in packages {
        if key.is_empty() || p["dev"].as_bool() == Some(true) {
            continue;
        }
        let name = p["name"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| key.rsplit("node_modules/").next().unwrap_or(key).to_owned());
        out.push(Locked {
            name: if key.matches("node_modules/").count() > 1 {
                // A nested copy: say where (`a/node_modules/b`).
                key.trim_start_matches("node_modules/").to_owned()
            } else {
                name
            },
            version: p["version"].as_str().unwrap_or("?").to_owned(),
            source: p["resolved"].as_str().map(str::to_owned),
            hash: p["integrity"].as_str().map(str::to_owned),
            install_scripts: p["hasInstallScript"].as_bool() == Some(true),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// `.node` files under `dir`.
fn native_addons(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            if kind.is_dir() {
                dirs.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".node") {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

// ---- shared ----

/// A hidden staging directory in the plugin directory `dir` (the same filesystem,
/// so that what it holds can be renamed into place; hidden, so that no fingerprint,
/// signature or watcher counts it), removed when dropped.
fn staging_dir(dir: &Path) -> Result<tempfile::TempDir, VendorError> {
    tempfile::Builder::new()
        .prefix(".corral-vendor-")
        .tempdir_in(dir)
        .map_err(io(format!(
            "cannot make a staging directory in {}",
            dir.display()
        )))
}

/// Refuse a symbolic link anywhere under `dir`.
fn refuse_links(dir: &Path) -> Result<(), VendorError> {
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(io(d.display()))? {
            let e = e.map_err(io(d.display()))?;
            let kind = e.file_type().map_err(io(e.path().display()))?;
            if kind.is_symlink() {
                return Err(VendorError::Link { path: e.path() });
            }
            if kind.is_dir() {
                dirs.push(e.path());
            }
        }
    }
    Ok(())
}

/// Put `new` at `dest`, the previous `dest` (if any) moved into `staging` first
/// and put back if the move fails.
fn swap_in(staging: &Path, new: &Path, dest: &Path) -> Result<(), VendorError> {
    let previous = staging.join("previous");
    let had = std::fs::symlink_metadata(dest).is_ok();
    if had {
        std::fs::rename(dest, &previous).map_err(io(dest.display()))?;
    }
    if let Err(e) = std::fs::rename(new, dest) {
        if had {
            let _ = std::fs::rename(&previous, dest);
        }
        return Err(io(dest.display())(e));
    }
    Ok(())
}

/// Write `vendor.lock` in `dir` (through a file in `staging`, renamed).
fn write_lock(dir: &Path, staging: &Path, lock: &Lock) -> Result<(), VendorError> {
    let tmp = prepare_lock(staging, lock)?;
    commit_lock(dir, &tmp)
}

/// `vendor.lock`'s text in a file in `staging`.
fn prepare_lock(staging: &Path, lock: &Lock) -> Result<PathBuf, VendorError> {
    let mut text = String::from(
        "# What `corral plugin vendor` installed into this plugin, with versions and hashes.\n\
         # Keep it with the plugin; running the command again rewrites it.\n",
    );
    text.push_str(&toml::to_string(lock).map_err(|e| VendorError::Io {
        what: LOCK_FILE.into(),
        source: std::io::Error::other(e),
    })?);
    let tmp = staging.join(LOCK_FILE);
    std::fs::write(&tmp, text).map_err(io(tmp.display()))?;
    Ok(tmp)
}

/// Move the prepared lock into place.
fn commit_lock(dir: &Path, tmp: &Path) -> Result<(), VendorError> {
    std::fs::rename(tmp, dir.join(LOCK_FILE)).map_err(io(dir.join(LOCK_FILE).display()))
}

/// Run `cmd` with its output captured: its stdout, or its failure with the tail of
/// what it printed.
fn run_quiet(cmd: &mut Command, what: &str) -> Result<String, VendorError> {
    let out = bounded_output(cmd).map_err(|source| VendorError::Spawn {
        tool: format!("{what} ({})", cmd.get_program().to_string_lossy()),
        source,
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut all = String::from_utf8_lossy(&out.stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(&out.stderr));
    Err(VendorError::Tool {
        what: what.to_owned(),
        status: out.status.to_string(),
        output: tail(&all),
    })
}

/// Most bytes kept of what a tool prints on each stream: the last ones (its
/// error is at the end); the rest is read and dropped, so that a tool (or a
/// package's build script under `--allow-scripts`) printing without end costs
/// this process no more.
const MAX_TOOL_OUTPUT: usize = 1 << 20;

/// Run `cmd` (no standard input) and keep the last [`MAX_TOOL_OUTPUT`] bytes of
/// each of its streams.
fn bounded_output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    fn keep_tail(mut from: impl std::io::Read) -> Vec<u8> {
        let mut kept = std::collections::VecDeque::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    kept.extend(&chunk[..n]);
                    let over = kept.len().saturating_sub(MAX_TOOL_OUTPUT);
                    kept.drain(..over);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kept.into()
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err = std::thread::spawn(move || keep_tail(stderr));
    let stdout = keep_tail(stdout);
    let stderr = err.join().unwrap_or_default();
    let status = child.wait()?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// The last [`OUTPUT_LINES`] lines of `text`, indented.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(OUTPUT_LINES);
    lines[from..]
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_printing_without_end_is_kept_to_its_last_mebibyte() {
        // 64 MiB on stdout and 8 MiB on stderr, the last line of each marked.
        let out = bounded_output(Command::new("sh").args([
            "-c",
            "head -c 67108864 /dev/zero; echo OUT-END; head -c 8388608 /dev/zero >&2; echo ERR-END >&2; exit 3",
        ]))
        .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout.len(), MAX_TOOL_OUTPUT);
        assert_eq!(out.stderr.len(), MAX_TOOL_OUTPUT);
        assert!(out.stdout.ends_with(b"OUT-END\n"));
        assert!(out.stderr.ends_with(b"ERR-END\n"));
        let e = run_quiet(
            Command::new("sh").args(["-c", "yes x | head -c 33554432; echo boom >&2; exit 1"]),
            "flood",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with("  boom"),
            "{}",
            &e[e.len().saturating_sub(200)..]
        );
        assert!(
            e.lines().count() <= OUTPUT_LINES + 2,
            "{} lines",
            e.lines().count()
        );
    }

    #[test]
    fn requirements_that_would_build_from_source_or_override_options_are_refused() {
        assert_eq!(
            check_requirements(
                "# pinned\nnumpy==2.4.6\nmsgpack>=1 ; python_version >= '3.8'\n\n",
                false
            )
            .unwrap()
            .count,
            2
        );
        assert_eq!(
            check_requirements(
                "msgpack==1.2.4 --hash=sha256:abc\n./dist/x-1.0-py3-none-any.whl\n",
                false
            )
            .unwrap()
            .wheels,
            vec!["./dist/x-1.0-py3-none-any.whl".to_owned()]
        );
        for (text, why) in [
            ("--no-binary=:all:\nnumpy", "pip options"),
            ("-r other.txt", "pip options"),
            ("-e ./src", "pip options"),
            ("evil @ file:///tmp/evil-1.0.tar.gz", "other than a wheel"),
            ("evil@https://example.org/evil.zip", "other than a wheel"),
            ("./evil-1.0.tar.gz", "other than a wheel"),
            ("numpy --index-url https://example.org", "not accepted"),
            ("# c \\\n--no-binary=:all:", "pip options"),
            ("# c\r--no-binary=:all:", "unusual line break"),
            ("msgpack \\", "continuations"),
            (".", "other than a wheel"),
            ("evil-1.0.tgz", "other than a wheel"),
            ("${PWD}/evil", "environment variables"),
            ("a @ https://h/a-1-py3-none-any.whl", "a wheel by URL"),
        ] {
            let e = check_requirements(text, false).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("requirements.txt line "), "{text}: {e}");
        }
        assert!(check_requirements("./evil-1.0.tar.gz", true).is_ok());
        assert!(check_requirements("--no-binary=:all:", true).is_err());
    }
}
