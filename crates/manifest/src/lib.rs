//! `plugin.toml`: the schema every Corral plugin ships, its validation, and errors
//! that name file, line and column.
//!
//! Principal types: [`Manifest`] (a validated manifest), [`Runtime`], [`Limits`],
//! [`Permissions`], [`Dependency`], and [`ManifestError`].
//!
//! ```
//! let text = r#"
//! id = "hello"
//! version = "1.2.0"
//! runtime = "wasm"
//! entry = "hello.wasm"
//! [limits]
//! memory = "32MiB"
//! timeout = "2s"
//! "#;
//! let m = corral_manifest::Manifest::parse(text, "plugin.toml".as_ref()).unwrap();
//! assert_eq!(m.id, "hello");
//! assert_eq!(m.limits.memory_bytes, 32 * 1024 * 1024);
//! ```
//!
//! Unknown keys are errors (a misspelt `timout` must not silently mean "default").

mod units;

pub use units::{ValueError, parse_duration, parse_size};

use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The file name a plugin directory must contain.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// The smallest memory limit a plugin may ask for.
pub const MIN_MEMORY: u64 = 1 << 20;

/// Default memory limit for a plugin that names none: 64 MiB.
pub const DEFAULT_MEMORY: u64 = 64 * 1024 * 1024;
/// Default per-call deadline: 5 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default cap on one call's output: 16 MiB.
pub const DEFAULT_MAX_OUTPUT: u64 = 16 * 1024 * 1024;

/// A validated plugin manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub id: String,
    pub version: semver::Version,
    pub runtime: Runtime,
    /// Entry file relative to the plugin directory; never absolute, never `..`.
    pub entry: PathBuf,
    pub description: String,
    /// Free-form labels operators can route on in policy files.
    pub tags: Vec<String>,
    pub permissions: Permissions,
    pub limits: Limits,
    /// Dependencies on other plugins, by id.
    pub dependencies: BTreeMap<String, Dependency>,
    /// The manifest file this was read from, and where each `[limits]` value was set
    /// (for `corral policy explain`).
    pub origin: ManifestOrigin,
}

/// Where a manifest and its limit values came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestOrigin {
    pub path: PathBuf,
    /// (line, column) of `limits.memory`, `limits.timeout` and `limits.max_output`.
    pub memory: Option<(usize, usize)>,
    pub timeout: Option<(usize, usize)>,
    pub max_output: Option<(usize, usize)>,
    pub instances: Option<(usize, usize)>,
}

/// The runtime a plugin is written for: the one type every crate uses.
pub use corral_protocol::Runtime;

/// What a plugin asks to be allowed. Policy decides what it gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Hosts (`host` or `host:port`) the plugin wants to fetch from.
    pub http: Vec<String>,
    /// Whether it wants a key-value store.
    pub kv: bool,
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Plugin ids it wants to call.
    pub call: Vec<String>,
}

/// Limits the plugin asks for. Policy may lower them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub timeout: Duration,
    pub max_output_bytes: u64,
    /// Worker processes serving the plugin's calls in parallel (capped by the
    /// level's `instances`).
    pub instances: u32,
}

/// Most instances a plugin may ask for.
pub const MAX_INSTANCES: u32 = 64;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: DEFAULT_MEMORY,
            timeout: DEFAULT_TIMEOUT,
            max_output_bytes: DEFAULT_MAX_OUTPUT,
            instances: 1,
        }
    }
}

/// A dependency on another plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub version: semver::VersionReq,
    pub optional: bool,
}

/// The largest `plugin.toml` read (real ones are well under 4 KiB).
pub const MAX_MANIFEST: u64 = 64 << 10;

/// Why a manifest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: corral_files::ReadError,
    },
    /// The file is not valid TOML, has an unknown key, or a value is invalid.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    id: Spanned<String>,
    version: Spanned<String>,
    runtime: Runtime,
    entry: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    permissions: RawPermissions,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    dependencies: BTreeMap<Spanned<String>, RawDependency>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    #[serde(default)]
    http: Vec<String>,
    #[serde(default)]
    kv: bool,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    call: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    max_output: Option<Spanned<String>>,
    instances: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    version: Spanned<String>,
    #[serde(default)]
    optional: bool,
}

impl Manifest {
    /// Read and validate `<dir>/plugin.toml`: a regular file of at most
    /// [`MAX_MANIFEST`] bytes (a plugin directory is its author's: a FIFO there must
    /// not stall the supervisor, nor a huge file grow it).
    pub fn load_dir(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = corral_files::read_regular_string(&path, MAX_MANIFEST).map_err(|source| {
            ManifestError::Read {
                path: path.clone(),
                source,
            }
        })?;
        Manifest::parse(&text, &path)
    }

    /// Validate manifest `text`; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        let err = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ManifestError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawManifest =
            toml::from_str(text).map_err(|e| err(e.span(), e.message().to_owned()))?;
        let at = |s: &Spanned<String>, m: String| err(Some(s.span()), m);

        validate_id(raw.id.get_ref()).map_err(|m| at(&raw.id, m.to_string()))?;
        let version = semver::Version::parse(raw.version.get_ref()).map_err(|e| {
            at(
                &raw.version,
                format!(
                    "invalid version {:?}: {e} (expected semver such as \"1.0.0\")",
                    raw.version.get_ref()
                ),
            )
        })?;
        let entry =
            validate_entry(raw.entry.get_ref()).map_err(|m| at(&raw.entry, m.to_string()))?;

        let mut tags = Vec::new();
        for t in &raw.tags {
            validate_tag(t.get_ref()).map_err(|m| at(t, m.to_string()))?;
            tags.push(t.get_ref().clone());
        }
        let pos = |s: &Option<Spanned<String>>| s.as_ref().map(|s| line_col(text, s.span().start));
        let origin = ManifestOrigin {
            path: path.to_owned(),
            memory: pos(&raw.limits.memory),
            timeout: pos(&raw.limits.timeout),
            max_output: pos(&raw.limits.max_output),
            instances: raw
                .limits
                .instances
                .as_ref()
                .map(|s| line_col(text, s.span().start)),
        };
        let mut limits = Limits::default();
        if let Some(m) = &raw.limits.memory {
            limits.memory_bytes = parse_size(m.get_ref()).map_err(|e| at(m, e.to_string()))?;
            if limits.memory_bytes < MIN_MEMORY {
                return Err(at(
                    m,
                    format!(
                        "memory must be at least 1 MiB (got {} bytes): no engine starts in less",
                        limits.memory_bytes
                    ),
                ));
            }
        }
        if let Some(t) = &raw.limits.timeout {
            limits.timeout = parse_duration(t.get_ref()).map_err(|e| at(t, e.to_string()))?;
            if limits.timeout.is_zero() {
                return Err(at(t, "timeout must be greater than zero".into()));
            }
        }
        if let Some(o) = &raw.limits.max_output {
            limits.max_output_bytes = parse_size(o.get_ref()).map_err(|e| at(o, e.to_string()))?;
            if limits.max_output_bytes == 0 {
                return Err(at(o, "max_output must be at least 1 byte".into()));
            }
        }
        if let Some(n) = &raw.limits.instances {
            limits.instances = u32::try_from(*n.get_ref())
                .ok()
                .filter(|n| (1..=MAX_INSTANCES).contains(n))
                .ok_or_else(|| {
                    err(
                        Some(n.span()),
                        format!(
                            "instances must be between 1 and {MAX_INSTANCES}, not {}",
                            n.get_ref()
                        ),
                    )
                })?;
        }

        let mut dependencies = BTreeMap::new();
        for (name, dep) in raw.dependencies {
            validate_id(name.get_ref()).map_err(|m| at(&name, m.to_string()))?;
            let req = semver::VersionReq::parse(dep.version.get_ref()).map_err(|e| {
                at(
                    &dep.version,
                    format!(
                        "invalid version requirement {:?}: {e} (expected e.g. \"^1.2\")",
                        dep.version.get_ref()
                    ),
                )
            })?;
            dependencies.insert(
                name.into_inner(),
                Dependency {
                    version: req,
                    optional: dep.optional,
                },
            );
        }

        let p = raw.permissions;
        Ok(Manifest {
            id: raw.id.into_inner(),
            version,
            runtime: raw.runtime,
            entry,
            description: raw.description,
            tags,
            permissions: Permissions {
                http: p.http,
                kv: p.kv,
                publish: p.publish,
                subscribe: p.subscribe,
                call: p.call,
            },
            limits,
            dependencies,
            origin,
        })
    }
}

/// Names made of `a-z 0-9 . _ -`, 1 to `max` characters.
fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
}

/// Plugin ids: 1-64 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_id(id: &str) -> Result<(), ValueError> {
    if is_name(id, 64) && id.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ValueError::Id(id.to_owned()))
    }
}

/// Tags: 1-32 characters of `a-z 0-9 . _ -`.
pub fn validate_tag(tag: &str) -> Result<(), ValueError> {
    if is_name(tag, 32) {
        Ok(())
    } else {
        Err(ValueError::Tag(tag.to_owned()))
    }
}

fn validate_entry(entry: &str) -> Result<PathBuf, ValueError> {
    let p = Path::new(entry);
    let inside = !entry.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(p.to_owned())
    } else {
        Err(ValueError::Entry(entry.to_owned()))
    }
}

/// 1-based line and column (in characters) of byte offset `pos` in `text`, for
/// errors about TOML files (manifests, daemon and policy configuration).
/// Line and column of many byte offsets in one text, each in O(log lines + the
/// column): a policy with tens of thousands of values names the position of each
/// without rescanning the text from the start every time (quadratic).
#[derive(Debug, Clone)]
pub struct LineIndex {
    /// Byte offset where each line starts.
    starts: Vec<usize>,
}

impl LineIndex {
    pub fn new(text: &str) -> LineIndex {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// [`line_col`] of `pos` in `text` (the text this index was made from).
    pub fn line_col(&self, text: &str, pos: usize) -> (usize, usize) {
        let mut pos = pos.min(text.len());
        while !text.is_char_boundary(pos) {
            pos -= 1;
        }
        let line = self.starts.partition_point(|&s| s <= pos);
        let start = self.starts[line - 1];
        (line, text[start..pos].chars().count() + 1)
    }
}

pub fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text[..pos];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..pos].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"id = "hello"
version = "0.1.0"
runtime = "wasm"
entry = "target/hello.wasm"
description = "Says hello"

[permissions]
http = ["api.example.com:443"]
kv = true

[limits]
memory = "16MiB"
timeout = "250ms"
max_output = "1MiB"

[dependencies]
other = { version = "^1.2" }
extra = { version = ">=0.3, <0.5", optional = true }
"#;

    fn invalid(text: &str) -> (usize, usize, String) {
        match Manifest::parse(text, Path::new("dir/plugin.toml")) {
            Err(ManifestError::Invalid {
                line,
                column,
                message,
                path,
            }) => {
                assert_eq!(path, Path::new("dir/plugin.toml"));
                (line, column, message)
            }
            other => panic!("expected an invalid-manifest error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(GOOD, Path::new("plugin.toml")).unwrap();
        assert_eq!(m.id, "hello");
        assert_eq!(m.version, semver::Version::new(0, 1, 0));
        assert_eq!(m.runtime, Runtime::Wasm);
        assert_eq!(m.entry, Path::new("target/hello.wasm"));
        assert_eq!(m.limits.memory_bytes, 16 << 20);
        assert_eq!(m.limits.timeout, Duration::from_millis(250));
        assert_eq!(m.limits.max_output_bytes, 1 << 20);
        assert_eq!(m.permissions.http, ["api.example.com:443"]);
        assert!(m.permissions.kv);
        assert!(!m.dependencies["other"].optional);
        assert!(m.dependencies["extra"].optional);
        assert!(
            m.dependencies["extra"]
                .version
                .matches(&semver::Version::new(0, 4, 1))
        );
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let text = GOOD.replace("timeout = ", "timout = ");
        let (line, col, msg) = invalid(&text);
        assert_eq!((line, col), (13, 1));
        assert!(msg.contains("unknown field `timout`"), "{msg}");
        assert!(msg.contains("timeout"), "valid choices listed: {msg}");
    }

    #[test]
    fn bad_runtime_lists_valid_choices() {
        let (line, col, msg) = invalid(&GOOD.replace("\"wasm\"", "\"ruby\""));
        assert_eq!((line, col), (3, 11));
        assert!(
            msg.contains("`wasm`, `js`, `python`") || msg.contains("`wasm`, `js` or `python`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_point_at_the_value() {
        let (line, col, msg) = invalid(&GOOD.replace("\"0.1.0\"", "\"one\""));
        assert_eq!((line, col), (2, 11));
        assert!(msg.contains("semver"), "{msg}");

        let (line, _, msg) = invalid(&GOOD.replace("\"16MiB\"", "\"lots\""));
        assert_eq!(line, 12);
        assert!(msg.contains("MiB"), "{msg}");

        let (line, _, msg) = invalid(&GOOD.replace("\"250ms\"", "\"soon\""));
        assert_eq!(line, 13);
        assert!(msg.contains("duration"), "{msg}");

        let (line, _, msg) = invalid(&GOOD.replace("\"^1.2\"", "\"one-ish\""));
        assert_eq!(line, 17);
        assert!(msg.contains("requirement"), "{msg}");

        let (_, _, msg) = invalid(&GOOD.replace("\"250ms\"", "\"0s\""));
        assert!(msg.contains("greater than zero"), "{msg}");

        // Limits of nothing: named with their place.
        for zero in ["\"0\"", "\"0B\"", "\"1KiB\""] {
            let (line, col, msg) = invalid(&GOOD.replace("\"16MiB\"", zero));
            assert_eq!((line, col), (12, 10), "{zero}");
            assert!(msg.starts_with("memory must be at least 1 MiB"), "{msg}");
        }
        // Instances: 1 to 64, named with their place.
        let with = |n: &str| {
            GOOD.replace(
                "max_output = \"1MiB\"",
                &format!("max_output = \"1MiB\"\ninstances = {n}"),
            )
        };
        let m = Manifest::parse(&with("3"), Path::new("dir/plugin.toml")).unwrap();
        assert_eq!(
            (m.limits.instances, m.origin.instances),
            (3, Some((15, 13)))
        );
        let m = Manifest::parse(GOOD, Path::new("dir/plugin.toml")).unwrap();
        assert_eq!((m.limits.instances, m.origin.instances), (1, None));
        for bad in ["0", "65", "-1"] {
            let (line, col, msg) = invalid(&with(bad));
            assert_eq!((line, col), (15, 13), "{bad}");
            assert_eq!(
                msg,
                format!("instances must be between 1 and 64, not {bad}")
            );
        }
        let (line, col, msg) = invalid(&GOOD.replace("\"1MiB\"", "\"0\""));
        assert_eq!(
            (line, col, msg.as_str()),
            (14, 14, "max_output must be at least 1 byte")
        );
    }

    #[test]
    fn entry_must_stay_inside_the_plugin() {
        for bad in ["../x.wasm", "/etc/passwd", "a/../../b", "./x.wasm", ""] {
            let text = GOOD.replace("target/hello.wasm", bad);
            let (line, col, msg) = invalid(&text);
            assert_eq!((line, col), (4, 9), "{bad}");
            assert!(msg.contains("inside the plugin directory"), "{msg}");
        }
    }

    #[test]
    fn ids_are_restricted() {
        for bad in ["", "Hello", "-x", "a/b", "a b", &"x".repeat(65)] {
            let text = GOOD.replace("\"hello\"", &format!("{bad:?}"));
            let (line, _, msg) = invalid(&text);
            assert_eq!(line, 1, "{bad}");
            assert!(msg.contains("invalid plugin id"), "{msg}");
        }
    }

    #[test]
    fn missing_required_key_and_syntax_errors() {
        let (_, _, msg) = invalid(&GOOD.replace("entry = \"target/hello.wasm\"\n", ""));
        assert!(msg.contains("missing field `entry`"), "{msg}");
        let (line, _, _) = invalid("id = \"x\"\nversion = \n");
        assert_eq!(line, 2);
    }

    #[test]
    fn the_line_index_agrees_with_line_col_everywhere() {
        let text = "a = 1\nbé = \"ü\"\n\n[t]\nx = 2";
        let index = LineIndex::new(text);
        for pos in 0..=text.len() + 3 {
            if text.is_char_boundary(pos.min(text.len())) {
                assert_eq!(index.line_col(text, pos), line_col(text, pos), "{pos}");
            }
        }
        assert_eq!(index.line_col(text, 0), (1, 1));
        assert_eq!(index.line_col(text, text.len()), (5, 6));
    }

    #[test]
    fn load_dir_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        match Manifest::load_dir(dir.path()) {
            Err(ManifestError::Read { path, source }) => {
                assert!(path.ends_with("plugin.toml"));
                assert!(source.is_not_found(), "{source}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A plugin's author controls its directory: a manifest that is a FIFO, a device
    /// or too large is an error that says so, at once.
    #[test]
    fn only_a_small_regular_manifest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let e = Manifest::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.ends_with("plugin.toml: not a regular file (a device)"),
            "{e}"
        );
        std::fs::remove_file(&path).unwrap();
        let mut big = GOOD.to_owned();
        big.push_str(&"#".repeat(MAX_MANIFEST as usize));
        std::fs::write(&path, big).unwrap();
        let e = Manifest::load_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("bytes, over the 64 KiB it may have"), "{e}");
    }
}
