//! Module resolution confined to the plugin directory: ES modules and CommonJS,
//! shared by the QuickJS and V8 engines.
//!
//! Module names are logical paths relative to the plugin root (`main.js`,
//! `node_modules/lodash/lodash.js`). A specifier resolves as Node resolves it, but
//! only ever to a file inside the plugin (never above the root, never through a
//! symlink that leaves it):
//!
//! - relative (`./lib/util.js`, `../x`): the file, else with `.js` or `.json`
//!   added, else the directory's `package.json` `main` or `index.js`/`index.json`;
//! - bare (`lodash`, `@scope/pkg/sub`): `node_modules/<name>` in the importing
//!   file's directory or one above it, then the package's `exports` (conditions
//!   `import` or `require`, then `default`; not `node`, whose targets expect
//!   Node's built-ins), else its `main`, else `index.js`;
//! - `node:x`, or a Node built-in's name that no vendored package provides: refused,
//!   naming the module; absolute paths and URLs: refused.
//!
//! A file's format, as in Node: `.mjs` is an ES module, `.cjs` CommonJS, `.json`
//! JSON; a `.js` file follows the nearest `package.json`'s `"type"`. Without one,
//! a `.js` file in `node_modules/` is CommonJS (unless it only parses as an ES
//! module, as Node's syntax detection does) and the plugin's own `.js` files are
//! ES modules (the plugin contract).

use std::path::PathBuf;

/// Node's built-in modules (`require('module').builtinModules` of Node 20).
pub const NODE_BUILTINS: &[&str] = &[
    "assert",
    "assert/strict",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "dns/promises",
    "domain",
    "events",
    "fs",
    "fs/promises",
    "http",
    "http2",
    "https",
    "inspector",
    "inspector/promises",
    "module",
    "net",
    "os",
    "path",
    "path/posix",
    "path/win32",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "readline/promises",
    "repl",
    "stream",
    "stream/consumers",
    "stream/promises",
    "stream/web",
    "string_decoder",
    "sys",
    "timers",
    "timers/promises",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "util/types",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

/// How a module is asked for: the `exports` condition it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Import,
    Require,
}

impl Mode {
    fn condition(self) -> &'static str {
        match self {
            Mode::Import => "import",
            Mode::Require => "require",
        }
    }
}

/// A module file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    EsModule,
    CommonJs,
    Json,
    /// A `.js` file in `node_modules` that no `"type"` decides: CommonJS, unless it
    /// parses only as an ES module.
    CommonJsUnlessModuleSyntax,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::EsModule => "module",
            Format::CommonJs => "commonjs",
            Format::Json => "json",
            Format::CommonJsUnlessModuleSyntax => "detect",
        }
    }
}

/// `entry` as a logical module name: a relative path without `..` or empty parts.
pub fn logical_name(entry: &str) -> Option<String> {
    let parts: Vec<&str> = entry
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    (!entry.starts_with('/') && !parts.is_empty() && !parts.contains(&".."))
        .then(|| parts.join("/"))
}

/// The directory part of a logical name (`""` for the root).
fn dir_of(logical: &str) -> &str {
    logical.rsplit_once('/').map_or("", |(d, _)| d)
}

/// `rel` (a `/`-separated relative path) from logical directory `dir`.
fn join(dir: &str, rel: &str, spec: &str) -> Result<String, String> {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for seg in rel.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{spec:?} leaves the plugin directory"));
                }
            }
            s => parts.push(s),
        }
    }
    Ok(parts.join("/"))
}

/// The error for a Node built-in.
fn builtin_refused(name: &str) -> String {
    format!(
        "{name:?} is a Node.js built-in module, which Corral plugins do not have (no file \
         system, network, processes or timers but the corral API); a plugin may vendor a \
         package of that name (an npm polyfill such as \"events\" or \"buffer\") into its \
         node_modules"
    )
}

/// Whether `text` has ES module syntax: a line starting with an `import` or
/// `export` statement (not `import(`, a dynamic import CommonJS may use). For an
/// engine that cannot try the parse (QuickJS tries it); comments and strings can
/// fool it, which only matters for files no `"type"` or extension decides.
pub fn has_module_syntax(text: &str) -> bool {
    text.lines().any(|line| {
        let l = line.trim_start();
        (l.starts_with("import ") || l.starts_with("import{") || l.starts_with("import\""))
            || l.starts_with("export ")
            || l.starts_with("export{")
    })
}

/// Largest `package.json` read (a bigger one is as if absent).
const MAX_PACKAGE_JSON: u64 = 1 << 20;
/// Largest module file read.
const MAX_MODULE: u64 = 64 << 20;

/// The bytes of `path`, refused past `max` (the plugin's files are its author's:
/// the worker's own memory, which the engine's limit does not count, is not theirs
/// to fill).
fn read_at_most(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "larger than the {} MiB a module may be",
            max >> 20
        )));
    }
    Ok(out)
}

/// The plugin's files, as modules see them.
#[derive(Debug, Clone)]
pub struct PluginFiles {
    /// Canonical.
    root: PathBuf,
}

impl PluginFiles {
    /// `root` must be canonical.
    pub fn new(root: PathBuf) -> PluginFiles {
        PluginFiles { root }
    }

    /// The host path of `logical` if it is a file inside the plugin (after
    /// symlinks).
    fn file(&self, logical: &str) -> Option<PathBuf> {
        if logical.is_empty() {
            return None;
        }
        let real = self.root.join(logical).canonicalize().ok()?;
        (real.starts_with(&self.root) && real.is_file()).then_some(real)
    }

    fn is_dir(&self, logical: &str) -> bool {
        self.root
            .join(logical)
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&self.root) && real.is_dir())
    }

    /// A `package.json`, if there is one and it parses.
    fn package_json(&self, dir: &str) -> Option<serde_json::Value> {
        let path = self.file(&join(dir, "package.json", "package.json").ok()?)?;
        let bytes = read_at_most(&path, MAX_PACKAGE_JSON).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The bytes of module `logical`, refused outside the plugin.
    pub fn read(&self, logical: &str) -> Result<Vec<u8>, String> {
        let name =
            logical_name(logical).ok_or_else(|| format!("{logical:?} is not a module name"))?;
        let path = self.file(&name).ok_or_else(|| {
            if self.root.join(&name).exists() {
                format!("{name}: outside the plugin directory (a symlink?) or not a file")
            } else {
                format!("{name}: no such file in the plugin")
            }
        })?;
        read_at_most(&path, MAX_MODULE).map_err(|e| format!("{name}: {e}"))
    }

    /// Resolve `spec`, imported or required by module `base`, to a logical name.
    pub fn resolve(&self, base: &str, spec: &str, mode: Mode) -> Result<String, String> {
        if let Some(name) = spec.strip_prefix("node:") {
            return Err(builtin_refused(name));
        }
        if spec.starts_with('/') || spec.contains("://") || spec.starts_with("file:") {
            return Err(format!(
                "{spec:?}: absolute paths and URLs are not allowed; import files of the \
                 plugin by relative path (\"./lib/util.js\") and packages by name"
            ));
        }
        let dir = dir_of(base);
        if spec == "." || spec == ".." || spec.starts_with("./") || spec.starts_with("../") {
            let target = join(dir, spec, spec)?;
            return self
                .file_or_directory(&target, mode)?
                .ok_or_else(|| format!("cannot find {spec:?} from {base} (no file {target}, {target}.js, {target}.json or {target}/index.js in the plugin)"));
        }
        self.package(base, spec, mode)
    }

    /// `target` as a file, with `.js`/`.json` added, or as a directory.
    fn file_or_directory(&self, target: &str, mode: Mode) -> Result<Option<String>, String> {
        if let Some(found) = self.as_file(target)? {
            return Ok(Some(found));
        }
        if !self.is_dir(target) {
            return Ok(None);
        }
        if let Some(main) = self
            .package_json(target)
            .and_then(|p| p.get("main").and_then(|m| m.as_str().map(str::to_owned)))
        {
            let main = join(target, &main, &main)?;
            if let Some(found) = self.as_file(&main)? {
                return Ok(Some(found));
            }
            if let Some(found) = self.index(&main)? {
                return Ok(Some(found));
            }
        }
        let _ = mode;
        self.index(target)
    }

    fn as_file(&self, target: &str) -> Result<Option<String>, String> {
        let path = self.root.join(target);
        let is_link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        let inside = path
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&self.root));
        if is_link && !inside {
            return Err(format!(
                "{target} is outside the plugin directory (a symlink out of it)"
            ));
        }
        for candidate in [
            target.to_owned(),
            format!("{target}.js"),
            format!("{target}.json"),
        ] {
            if self.file(&candidate).is_some() {
                return Ok(Some(candidate));
            }
        }
        if target.ends_with(".node") || self.file(&format!("{target}.node")).is_some() {
            return Err(format!(
                "{target}: a native Node.js addon (.node), which a JavaScript plugin cannot load"
            ));
        }
        Ok(None)
    }

    fn index(&self, dir: &str) -> Result<Option<String>, String> {
        for candidate in ["index.js", "index.json"] {
            let c = join(dir, candidate, candidate)?;
            if self.file(&c).is_some() {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// A bare specifier: a package in a `node_modules` directory at or above `base`.
    fn package(&self, base: &str, spec: &str, mode: Mode) -> Result<String, String> {
        let mut parts = spec.splitn(3, '/');
        let first = parts.next().unwrap_or_default();
        let (name, subpath) = if first.starts_with('@') {
            let second = parts.next().unwrap_or_default();
            let rest: Vec<&str> = parts.collect();
            (format!("{first}/{second}"), rest.join("/"))
        } else {
            let rest: Vec<&str> = spec.splitn(2, '/').skip(1).collect();
            (first.to_owned(), rest.join("/"))
        };
        let valid = !name.is_empty()
            && !name.ends_with('/')
            && name
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != ".." && !p.contains('\\'));
        if !valid {
            return Err(format!("{spec:?} is not a valid package name"));
        }
        let mut dir = dir_of(base).to_owned();
        loop {
            let is_modules_dir = dir == "node_modules" || dir.ends_with("/node_modules");
            if !is_modules_dir {
                let pkg = join(&dir, &format!("node_modules/{name}"), spec)?;
                if self.is_dir(&pkg) {
                    return self.in_package(&pkg, &name, &subpath, mode);
                }
            }
            if dir.is_empty() {
                break;
            }
            dir = dir_of(&dir).to_owned();
        }
        if NODE_BUILTINS.contains(&spec) || NODE_BUILTINS.contains(&name.as_str()) {
            return Err(builtin_refused(spec));
        }
        Err(format!(
            "cannot find package {name:?} imported by {base}: there is no node_modules/{name} \
             in the plugin (add it to package.json and run `corral plugin vendor`)"
        ))
    }

    /// `subpath` (`""` for the package itself) of the package in `pkg`.
    fn in_package(
        &self,
        pkg: &str,
        name: &str,
        subpath: &str,
        mode: Mode,
    ) -> Result<String, String> {
        let manifest = self.package_json(pkg);
        if let Some(exports) = manifest.as_ref().and_then(|m| m.get("exports")) {
            let key = if subpath.is_empty() {
                ".".to_owned()
            } else {
                format!("./{subpath}")
            };
            let target = exports_target(exports, &key, mode).ok_or_else(|| {
                format!(
                    "package {name:?} does not export {key:?} for {} (see \"exports\" in its \
                     package.json)",
                    mode.condition()
                )
            })?;
            let logical = join(pkg, &target, &target)?;
            if !logical.starts_with(pkg) {
                return Err(format!("package {name:?} exports a file outside itself"));
            }
            return match self.file(&logical) {
                Some(_) => Ok(logical),
                None => Err(format!(
                    "package {name:?} exports {key:?} as {target:?}, which is not in the plugin"
                )),
            };
        }
        let target = if subpath.is_empty() {
            pkg.to_owned()
        } else {
            join(pkg, subpath, subpath)?
        };
        self.file_or_directory(&target, mode)?.ok_or_else(|| {
            format!(
                "package {name:?} has no {:?} (looked for {target}, its main and index.js)",
                if subpath.is_empty() {
                    "main file"
                } else {
                    subpath
                }
            )
        })
    }

    /// The format of module `logical`.
    pub fn format(&self, logical: &str) -> Format {
        if logical.ends_with(".mjs") {
            return Format::EsModule;
        }
        if logical.ends_with(".cjs") {
            return Format::CommonJs;
        }
        if logical.ends_with(".json") {
            return Format::Json;
        }
        let in_node_modules =
            logical.starts_with("node_modules/") || logical.contains("/node_modules/");
        let undecided = if in_node_modules {
            Format::CommonJsUnlessModuleSyntax
        } else {
            Format::EsModule
        };
        let mut dir = dir_of(logical).to_owned();
        loop {
            if let Some(manifest) = self.package_json(&dir) {
                return match manifest.get("type").and_then(|t| t.as_str()) {
                    Some("module") => Format::EsModule,
                    Some("commonjs") => Format::CommonJs,
                    _ => undecided,
                };
            }
            if dir.is_empty() || dir.ends_with("node_modules") {
                return undecided;
            }
            dir = dir_of(&dir).to_owned();
        }
    }
}

/// The target of `key` (`.` or `./sub`) in a package's `exports`, for `mode`.
fn exports_target(exports: &serde_json::Value, key: &str, mode: Mode) -> Option<String> {
    use serde_json::Value;
    let subpaths = match exports {
        Value::Object(map) if map.keys().any(|k| k.starts_with('.')) => map,
        // Sugar: the whole value is the target of ".".
        other => {
            return (key == ".")
                .then(|| condition_target(other, "", mode))
                .flatten();
        }
    };
    if let Some(target) = subpaths.get(key) {
        return condition_target(target, "", mode);
    }
    // Patterns (`./features/*`, `./lib/*.js`): the longest prefix wins.
    let mut best: Option<(&str, &str, &Value)> = None;
    for (pattern, target) in subpaths {
        let Some((prefix, suffix)) = pattern.split_once('*') else {
            continue;
        };
        if key.len() >= prefix.len() + suffix.len()
            && key.starts_with(prefix)
            && key.ends_with(suffix)
            && best.is_none_or(|(p, _, _)| prefix.len() > p.len())
        {
            best = Some((prefix, suffix, target));
        }
    }
    let (prefix, suffix, target) = best?;
    let matched = &key[prefix.len()..key.len() - suffix.len()];
    condition_target(target, matched, mode)
}

/// A target (a string, a list of fallbacks or conditions), with `*` replaced.
fn condition_target(target: &serde_json::Value, matched: &str, mode: Mode) -> Option<String> {
    use serde_json::Value;
    match target {
        Value::String(s) => s
            .starts_with("./")
            .then(|| s.replace('*', matched))
            .filter(|s| !s.split('/').any(|p| p == ".." || p == "node_modules")),
        Value::Array(list) => list.iter().find_map(|t| condition_target(t, matched, mode)),
        // The conditions this worker matches, in priority order; a valid `exports`
        // puts `default` last, so this is the order Node's would pick.
        Value::Object(map) => [mode.condition(), "default"]
            .iter()
            .find_map(|c| map.get(*c).and_then(|t| condition_target(t, matched, mode))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(files: &[(&str, &str)]) -> (tempfile::TempDir, PluginFiles) {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let root = dir.path().canonicalize().unwrap();
        (dir, PluginFiles::new(root))
    }

    #[test]
    fn relative_specifiers_resolve_inside_the_plugin_only() {
        let (_d, f) = plugin(&[
            ("main.js", ""),
            ("lib/util.js", ""),
            ("vendor/x.js", ""),
            ("lib/c.json", "{}"),
            ("lib/dir/index.js", ""),
        ]);
        let r = |base, spec| f.resolve(base, spec, Mode::Import);
        assert_eq!(r("main.js", "./lib/util.js").unwrap(), "lib/util.js");
        assert_eq!(r("lib/util.js", "../vendor/x.js").unwrap(), "vendor/x.js");
        assert_eq!(r("lib/util.js", "./c").unwrap(), "lib/c.json");
        assert_eq!(r("main.js", "./lib/util").unwrap(), "lib/util.js");
        assert_eq!(r("main.js", "./lib/dir").unwrap(), "lib/dir/index.js");
        assert!(
            r("main.js", "../secret.js")
                .unwrap_err()
                .contains("leaves the plugin")
        );
        assert!(
            r("lib/x.js", "../../etc/passwd")
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            r("main.js", "/etc/passwd")
                .unwrap_err()
                .contains("absolute paths")
        );
        assert!(
            r("main.js", "file:///etc/passwd")
                .unwrap_err()
                .contains("URLs")
        );
        assert!(
            r("main.js", "./missing.js")
                .unwrap_err()
                .contains("cannot find")
        );
    }

    #[test]
    fn builtins_are_refused_by_name_unless_a_package_provides_one() {
        let (_d, f) = plugin(&[("main.js", "")]);
        let e = f.resolve("main.js", "fs", Mode::Require).unwrap_err();
        assert!(e.contains("\"fs\" is a Node.js built-in"), "{e}");
        let e = f
            .resolve("main.js", "node:events", Mode::Import)
            .unwrap_err();
        assert!(e.contains("\"events\" is a Node.js built-in"), "{e}");
        let e = f
            .resolve("main.js", "fs/promises", Mode::Require)
            .unwrap_err();
        assert!(e.contains("built-in"), "{e}");
        let (_d, f) = plugin(&[
            ("main.js", ""),
            (
                "node_modules/events/package.json",
                r#"{"main": "events.js"}"#,
            ),
            ("node_modules/events/events.js", ""),
        ]);
        assert_eq!(
            f.resolve("main.js", "events", Mode::Require).unwrap(),
            "node_modules/events/events.js"
        );
        assert!(f.resolve("main.js", "node:events", Mode::Require).is_err());
    }

    #[test]
    fn packages_resolve_by_main_exports_and_nearest_node_modules() {
        let (_d, f) = plugin(&[
            ("main.js", ""),
            ("node_modules/a/package.json", r#"{"main": "./lib/a"}"#),
            ("node_modules/a/lib/a.js", ""),
            ("node_modules/a/node_modules/b/index.js", ""),
            ("node_modules/b/index.js", ""),
            (
                "node_modules/c/package.json",
                r#"{"exports": {".": {"import": "./esm/c.mjs", "require": "./cjs/c.js"},
                    "./feature/*": "./src/features/*.js", "./package.json": "./package.json"}}"#,
            ),
            ("node_modules/c/esm/c.mjs", ""),
            ("node_modules/c/cjs/c.js", ""),
            ("node_modules/c/src/features/x.js", ""),
            ("node_modules/c/private.js", ""),
            (
                "node_modules/@s/p/package.json",
                r#"{"exports": "./main.js"}"#,
            ),
            ("node_modules/@s/p/main.js", ""),
        ]);
        let r = |base, spec, mode| f.resolve(base, spec, mode);
        assert_eq!(
            r("main.js", "a", Mode::Require).unwrap(),
            "node_modules/a/lib/a.js"
        );
        // A package's own dependency first, then the plugin's.
        assert_eq!(
            r("node_modules/a/lib/a.js", "b", Mode::Require).unwrap(),
            "node_modules/a/node_modules/b/index.js"
        );
        assert_eq!(
            r("main.js", "b", Mode::Require).unwrap(),
            "node_modules/b/index.js"
        );
        assert_eq!(
            r("main.js", "c", Mode::Import).unwrap(),
            "node_modules/c/esm/c.mjs"
        );
        assert_eq!(
            r("main.js", "c", Mode::Require).unwrap(),
            "node_modules/c/cjs/c.js"
        );
        assert_eq!(
            r("main.js", "c/feature/x", Mode::Require).unwrap(),
            "node_modules/c/src/features/x.js"
        );
        let e = r("main.js", "c/private.js", Mode::Require).unwrap_err();
        assert!(e.contains("does not export \"./private.js\""), "{e}");
        assert_eq!(
            r("main.js", "@s/p", Mode::Import).unwrap(),
            "node_modules/@s/p/main.js"
        );
        let e = r("main.js", "nothere", Mode::Import).unwrap_err();
        assert!(e.contains("no node_modules/nothere"), "{e}");
        assert!(r("main.js", "../x", Mode::Import).is_err());
    }

    #[test]
    fn a_symlink_out_of_the_plugin_is_not_followed() {
        let (d, f) = plugin(&[("main.js", "")]);
        std::fs::create_dir_all(d.path().join("node_modules")).unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("node_modules/etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("passwd.js")).unwrap();
        assert!(f.resolve("main.js", "etc/passwd", Mode::Require).is_err());
        assert!(f.resolve("main.js", "./passwd.js", Mode::Require).is_err());
        assert!(
            f.read("passwd.js")
                .unwrap_err()
                .contains("outside the plugin")
        );
        assert!(f.read("../etc/passwd").is_err());
    }

    #[test]
    fn formats_follow_extensions_then_the_nearest_package_type() {
        let (_d, f) = plugin(&[
            ("main.js", ""),
            ("package.json", r#"{"dependencies": {}}"#),
            ("lib/x.cjs", ""),
            ("node_modules/l/package.json", r#"{"main": "l.js"}"#),
            ("node_modules/l/l.js", ""),
            ("node_modules/m/package.json", r#"{"type": "module"}"#),
            ("node_modules/m/m.js", ""),
            ("node_modules/n/n.js", ""),
            ("own/package.json", r#"{"type": "commonjs"}"#),
            ("own/helper.js", ""),
        ]);
        assert_eq!(f.format("main.js"), Format::EsModule);
        assert_eq!(f.format("lib/x.cjs"), Format::CommonJs);
        assert_eq!(
            f.format("node_modules/l/l.js"),
            Format::CommonJsUnlessModuleSyntax
        );
        assert_eq!(f.format("node_modules/m/m.js"), Format::EsModule);
        assert_eq!(
            f.format("node_modules/n/n.js"),
            Format::CommonJsUnlessModuleSyntax
        );
        assert_eq!(f.format("own/helper.js"), Format::CommonJs);
        assert_eq!(f.format("node_modules/l/package.json"), Format::Json);
    }

    #[test]
    fn module_syntax_is_told_from_commonjs() {
        assert!(has_module_syntax("// x\nexport default 42;\n"));
        assert!(has_module_syntax("import x from \"y\";"));
        assert!(!has_module_syntax(
            "const a = require('a');\nmodule.exports = a;"
        ));
        assert!(!has_module_syntax("import('x').then(f);"));
    }

    #[test]
    fn entries_are_logical_names() {
        assert_eq!(
            logical_name("./src/main.js").as_deref(),
            Some("src/main.js")
        );
        assert_eq!(logical_name("main.js").as_deref(), Some("main.js"));
        assert_eq!(logical_name("../main.js"), None);
        assert_eq!(logical_name("/main.js"), None);
    }
}
