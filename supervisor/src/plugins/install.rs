//! Installing plugins into a plugins directory, and removing them
//! (`corral plugin pack | install | remove | list`).
//!
//! # Archives
//!
//! A plugin archive is a gzipped tar of a plugin directory: its files under one top
//! directory (what `corral plugin pack` makes) or at the root. Only regular files and
//! directories may be in it: links, devices, absolute paths and `..` are refused, as
//! are archives over [`MAX_ARCHIVE`] bytes, or over [`MAX_UNPACKED`] bytes or
//! [`MAX_ENTRIES`] entries unpacked.
//!
//! # Indexes
//!
//! An index is an `index.toml` in a directory or at an `http(s)://` address:
//!
//! ```toml
//! [[plugin]]
//! id = "hello-js"
//! version = "0.2.0"
//! archive = "hello-js-0.2.0.tar.gz"   # relative to the index, or a URL
//! sha256 = "<64 hex digits>"
//! ```
//!
//! `corral plugin install ID[@REQ] --index I` takes the highest version satisfying the
//! semver requirement `REQ` (default: any). `corral plugin index DIR` writes the
//! `index.toml` of a directory of archives (see [`index`]).
//!
//! # What an install checks, in order
//!
//! 1. The archive's SHA-256 against the index's (or `--sha256` for a bare archive).
//! 2. Every entry's type and path, and the size limits, while unpacking into a hidden
//!    staging directory inside the plugins directory (the daemon's discovery skips
//!    hidden names).
//! 3. The manifest (and, from an index, that its id and version are the entry's).
//! 4. The signature (`plugin.sig`) against the trusted publishers. An unsigned plugin
//!    is refused unless the operator allows it; a tampered one always is.
//!
//! Only then is the staging directory renamed to `<plugins dir>/<id>`, or exchanged
//! with the installed version in one `renameat2(RENAME_EXCHANGE)`, so a watching
//! daemon sees one complete change and hot-reloads it. Any failure removes the
//! staging directory: a failed install leaves nothing behind.

use crate::plugins::signing;
use corral_manifest::Manifest;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// Largest archive downloaded or read (bytes).
pub const MAX_ARCHIVE: u64 = 256 * 1024 * 1024;
/// Largest total size of an archive's files.
pub const MAX_UNPACKED: u64 = 1024 * 1024 * 1024;
/// Most entries in an archive.
pub const MAX_ENTRIES: usize = 10_000;
/// The index file's name in an index directory or under an index URL.
pub const INDEX_FILE: &str = "index.toml";

/// Why an install, removal or pack failed. Every message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what}: {why}")]
    Fetch { what: String, why: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: checksum mismatch: expected sha256 {expected}, got {actual}")]
    Checksum {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: {why}")]
    Archive { what: String, why: String },
    #[error("index {index}: {why}")]
    Index { index: String, why: String },
    #[error("the plugin in {what}: {why}")]
    Plugin { what: String, why: String },
    #[error(
        "{what}: unsigned (no plugin.sig); refusing it (pass --allow-unsigned to install \
         it anyway; policy routes can confine unsigned plugins)"
    )]
    Unsigned { what: String },
    #[error("{what}: signature refused")]
    Signature {
        what: String,
        #[source]
        source: signing::SignError,
    },
    #[error("no plugin {id:?} is installed in {}", dir.display())]
    NotInstalled { id: String, dir: PathBuf },
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> InstallError {
    move |source| InstallError::Io {
        what: what.to_string(),
        source,
    }
}

/// Where to install from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An archive: a file path or an `http(s)://` URL.
    Archive(String),
    /// The highest version of `id` in `index` satisfying `req`.
    Index {
        index: String,
        id: String,
        req: semver::VersionReq,
    },
}

/// How to check what is installed.
#[derive(Debug, Clone, Default)]
pub struct Checks {
    /// Trusted publishers (name -> ed25519 public key hex).
    pub publishers: BTreeMap<String, String>,
    /// Install plugins without `plugin.sig`.
    pub allow_unsigned: bool,
    /// The archive's expected SHA-256 (hex), for a bare archive.
    pub sha256: Option<String>,
}

/// A completed install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub id: String,
    pub version: String,
    /// The verified publisher; `None`: unsigned (allowed by the operator).
    pub publisher: Option<String>,
    pub dir: PathBuf,
    /// The version it replaced, if one was installed.
    pub replaced: Option<String>,
    pub sha256: String,
}

/// One plugin in a plugins directory, as `corral plugin list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub dir: PathBuf,
    /// `id version runtime`, or why the manifest is invalid.
    pub plugin: Result<(String, String, String), String>,
    /// `signed by NAME`, `unsigned`, or why the signature is refused.
    pub signature: String,
}

#[derive(Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct RawIndex {
    #[serde(default)]
    plugin: Vec<IndexEntry>,
}

/// One archive in an index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub id: String,
    pub version: semver::Version,
    pub archive: String,
    pub sha256: String,
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Read `location` (a path or an http(s) URL), at most [`MAX_ARCHIVE`] bytes.
async fn fetch(location: &str) -> Result<Vec<u8>, InstallError> {
    let fail = |why: String| InstallError::Fetch {
        what: location.to_owned(),
        why,
    };
    if !is_url(location) {
        return corral_files::read_regular(Path::new(location), MAX_ARCHIVE)
            .map_err(|e| fail(e.to_string()));
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut resp = client
        .get(location)
        .send()
        .await
        .map_err(|e| fail(corral_protocol::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| fail(corral_protocol::error_chain(&e)))?
    {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_ARCHIVE {
            return Err(fail(format!("over the {MAX_ARCHIVE}-byte limit")));
        }
    }
    Ok(body)
}

/// The index at `index` (a directory, an `index.toml`, or a URL of either) and the
/// base its archive names are relative to.
async fn read_index(index: &str) -> Result<(Vec<IndexEntry>, String), InstallError> {
    let file = if is_url(index) {
        if index.ends_with(".toml") {
            index.to_owned()
        } else {
            format!("{}/{INDEX_FILE}", index.trim_end_matches('/'))
        }
    } else if Path::new(index).is_dir() {
        Path::new(index).join(INDEX_FILE).display().to_string()
    } else {
        index.to_owned()
    };
    let text = String::from_utf8(fetch(&file).await?).map_err(|_| InstallError::Index {
        index: file.clone(),
        why: "not UTF-8".into(),
    })?;
    let entries = parse_index(&text, &file)?;
    let base = match file.rfind('/') {
        Some(i) => file[..i].to_owned(),
        None => ".".to_owned(),
    };
    Ok((entries, base))
}

/// The entries of an `index.toml` whose text is `text` (`index` names it in errors).
pub fn parse_index(text: &str, index: &str) -> Result<Vec<IndexEntry>, InstallError> {
    let raw: RawIndex = toml::from_str(text).map_err(|e| {
        let (line, column) = corral_manifest::line_col(text, e.span().map_or(0, |s| s.start));
        InstallError::Index {
            index: index.to_owned(),
            why: format!("{line}:{column}: {}", e.message()),
        }
    })?;
    Ok(raw.plugin)
}

/// Pick the highest version of `id` satisfying `req`.
fn choose<'a>(
    entries: &'a [IndexEntry],
    index: &str,
    id: &str,
    req: &semver::VersionReq,
) -> Result<&'a IndexEntry, InstallError> {
    let versions: Vec<&IndexEntry> = entries.iter().filter(|e| e.id == id).collect();
    versions
        .iter()
        .filter(|e| req.matches(&e.version))
        .max_by(|a, b| a.version.cmp(&b.version))
        .copied()
        .ok_or_else(|| InstallError::Index {
            index: index.to_owned(),
            why: if versions.is_empty() {
                format!("no plugin {id:?} in it")
            } else {
                format!(
                    "no version of {id} satisfies {req}; it has {}",
                    versions
                        .iter()
                        .map(|e| e.version.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        })
}

/// Install `source` into `plugins_dir`; see the module documentation.
pub async fn install(
    source: &Source,
    plugins_dir: &Path,
    checks: &Checks,
) -> Result<Installed, InstallError> {
    let (location, expected, entry) = match source {
        Source::Archive(a) => (a.clone(), checks.sha256.clone(), None),
        Source::Index { index, id, req } => {
            let (entries, base) = read_index(index).await?;
            let e = choose(&entries, index, id, req)?.clone();
            let location = if is_url(&e.archive) || Path::new(&e.archive).is_absolute() {
                e.archive.clone()
            } else {
                format!("{base}/{}", e.archive)
            };
            (location, Some(e.sha256.clone()), Some(e))
        }
    };
    let bytes = fetch(&location).await?;
    let actual = signing::hex(&Sha256::digest(&bytes));
    if let Some(want) = expected {
        let want = want.trim().to_ascii_lowercase();
        if want != actual {
            return Err(InstallError::Checksum {
                what: location,
                expected: want,
                actual,
            });
        }
    }
    std::fs::create_dir_all(plugins_dir).map_err(io(plugins_dir.display()))?;
    let staging = Staging::new(plugins_dir)?;
    unpack(&bytes, &staging.path, &location)?;
    let root = plugin_root(&staging.path).ok_or_else(|| InstallError::Archive {
        what: location.clone(),
        why: "no plugin.toml at its root or in its one top directory".into(),
    })?;
    let manifest = Manifest::load_dir(&root).map_err(|e| InstallError::Plugin {
        what: location.clone(),
        why: corral_protocol::error_chain(&e),
    })?;
    if let Some(e) = &entry
        && (e.id != manifest.id || e.version != manifest.version)
    {
        return Err(InstallError::Plugin {
            what: location,
            why: format!(
                "the index lists {} {} but the archive holds {} {}",
                e.id, e.version, manifest.id, manifest.version
            ),
        });
    }
    let publisher = match signing::verify(&root, &checks.publishers) {
        Ok(Some(p)) => Some(p),
        Ok(None) if checks.allow_unsigned => None,
        Ok(None) => return Err(InstallError::Unsigned { what: location }),
        Err(source) => {
            return Err(InstallError::Signature {
                what: location,
                source,
            });
        }
    };
    let target = plugins_dir.join(&manifest.id);
    let replaced = if target.exists() {
        let old = Manifest::load_dir(&target)
            .map(|m| m.version.to_string())
            .unwrap_or_else(|_| "an unreadable version".into());
        exchange(&root, &target)?;
        Some(old)
    } else {
        std::fs::rename(&root, &target).map_err(io(target.display()))?;
        None
    };
    drop(staging); // removes what it holds: the old version, or nothing
    Ok(Installed {
        id: manifest.id,
        version: manifest.version.to_string(),
        publisher,
        dir: target,
        replaced,
        sha256: actual,
    })
}

/// Remove the plugin `id` from `plugins_dir` (a watching daemon drains and unloads
/// it). Returns its version.
pub fn remove(plugins_dir: &Path, id: &str) -> Result<String, InstallError> {
    let not_installed = || InstallError::NotInstalled {
        id: id.to_owned(),
        dir: plugins_dir.to_owned(),
    };
    corral_manifest::validate_id(id).map_err(|_| not_installed())?;
    let dir = plugins_dir.join(id);
    let manifest = Manifest::load_dir(&dir).map_err(|_| not_installed())?;
    if manifest.id != id {
        return Err(not_installed());
    }
    // Out of sight in one rename, then deleted.
    let staging = Staging::new(plugins_dir)?;
    let gone = staging.path.join(id);
    std::fs::rename(&dir, &gone).map_err(io(dir.display()))?;
    drop(staging);
    Ok(manifest.version.to_string())
}

/// Every plugin in `plugins_dir`, with its signature checked against `publishers`.
pub fn list(
    plugins_dir: &Path,
    publishers: &BTreeMap<String, String>,
) -> Result<Vec<Listed>, InstallError> {
    let dirs = crate::plugins::files::discover(plugins_dir).map_err(io(plugins_dir.display()))?;
    Ok(dirs
        .into_iter()
        .map(|dir| {
            let plugin = Manifest::load_dir(&dir)
                .map(|m| {
                    (
                        m.id.clone(),
                        m.version.to_string(),
                        format!("{:?}", m.runtime).to_lowercase(),
                    )
                })
                .map_err(|e| corral_protocol::error_chain(&e));
            let signature = match signing::verify(&dir, publishers) {
                Ok(Some(p)) => format!("signed by {p}"),
                Ok(None) => "unsigned".into(),
                Err(e) => format!("REFUSED: {e}"),
            };
            Listed {
                dir,
                plugin,
                signature,
            }
        })
        .collect())
}

/// Write a plugin archive of `dir` to `out` (files under `<id>/`, in path order, with
/// fixed times and modes: the same files make the same archive). Returns its SHA-256.
pub fn pack(dir: &Path, out: &Path) -> Result<String, InstallError> {
    let manifest = Manifest::load_dir(dir).map_err(|e| InstallError::Plugin {
        what: dir.display().to_string(),
        why: corral_protocol::error_chain(&e),
    })?;
    let mut files = Vec::new();
    collect(dir, dir, &mut files)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (rel, path) in &files {
        let data = std::fs::read(path).map_err(io(path.display()))?;
        let exec = std::fs::metadata(path)
            .map_err(io(path.display()))?
            .permissions()
            .mode()
            & 0o111
            != 0;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(if exec { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, format!("{}/{rel}", manifest.id), data.as_slice())
            .map_err(io(out.display()))?;
    }
    let bytes = tar
        .into_inner()
        .and_then(|gz| gz.finish())
        .map_err(io(out.display()))?;
    let tmp = out.with_extension("partial");
    std::fs::write(&tmp, &bytes).map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, out).map_err(io(out.display()))?;
    Ok(signing::hex(&Sha256::digest(&bytes)))
}

/// The files under `dir` (relative `/` paths), refusing links as signing does.
fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), InstallError> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(io(dir.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let kind = e.file_type().map_err(io(path.display()))?;
        if kind.is_symlink() {
            return Err(InstallError::Archive {
                what: dir.display().to_string(),
                why: format!("{rel}: a symbolic link; plugin archives may not contain links"),
            });
        }
        if kind.is_dir() {
            if e.file_name() != "__pycache__" {
                collect(root, &path, out)?;
            }
        } else if kind.is_file() {
            out.push((rel, path));
        }
    }
    Ok(())
}

/// Unpack the gzipped tar `bytes` into `into`, refusing anything but plain files and
/// directories inside it, and archives over the limits.
/// Unpack a plugin archive (gzipped tar of files and directories only, every path
/// inside `into`, bounded in entries and bytes) into `into`; `what` names it.
pub fn unpack(bytes: &[u8], into: &Path, what: &str) -> Result<(), InstallError> {
    let bad = |why: String| InstallError::Archive {
        what: what.to_owned(),
        why,
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a gzipped tar archive: {e}")))?;
    let (mut total, mut count) = (0u64, 0usize);
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a gzipped tar archive: {e}")))?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(bad(format!("more than {MAX_ENTRIES} entries")));
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("an entry's name: {e}")))?
            .into_owned();
        let shown = path.display().to_string();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad(format!(
                "{shown}: an absolute path or `..`; entries must stay inside the plugin"
            )));
        }
        let dest = into.join(&path);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&dest).map_err(io(&shown))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
                    .map_err(io(&shown))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total += entry.size();
                if total > MAX_UNPACKED {
                    return Err(bad(format!("over {MAX_UNPACKED} bytes unpacked")));
                }
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent).map_err(io(&shown))?;
                }
                let exec = entry.header().mode().unwrap_or(0o644) & 0o111 != 0;
                let mut data = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut data).map_err(io(&shown))?;
                std::fs::write(&dest, &data).map_err(io(&shown))?;
                std::fs::set_permissions(
                    &dest,
                    std::fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
                )
                .map_err(io(&shown))?;
            }
            // PAX and GNU long-name headers are read by the tar crate itself.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(bad(format!(
                    "{shown}: a {} entry; plugin archives hold only files and directories",
                    match other {
                        tar::EntryType::Symlink => "symbolic link",
                        tar::EntryType::Link => "hard link",
                        tar::EntryType::Char | tar::EntryType::Block => "device",
                        tar::EntryType::Fifo => "FIFO",
                        _ => "special",
                    }
                )));
            }
        }
    }
    Ok(())
}

/// What `corral plugin index` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Indexed {
    /// The entries written, in id and version order.
    pub entries: Vec<IndexEntry>,
    /// Entries of the previous index kept as they were: archives at a URL, or in a
    /// subdirectory (not read again).
    pub kept: Vec<IndexEntry>,
    /// Entries of the previous index dropped because their archive is gone.
    pub dropped: Vec<IndexEntry>,
}

/// Write `dir/index.toml` for the plugin archives (`*.tar.gz`, `*.tgz`) in `dir`:
/// each archive is read with the checks of an install (checksum taken, unpacked
/// within the limits, manifest read) and listed with its id, version and SHA-256.
/// Entries of an existing index whose archive is a URL or in a subdirectory are
/// kept; entries whose archive is gone are dropped, and said so. Nothing is written
/// if an archive is bad or two archives hold the same id and version.
pub fn index(dir: &Path) -> Result<Indexed, InstallError> {
    let file = dir.join(INDEX_FILE);
    let shown = file.display().to_string();
    let bad = |why: String| InstallError::Index {
        index: shown.clone(),
        why,
    };
    let previous: Vec<IndexEntry> = match corral_files::read_regular_string(&file, MAX_ARCHIVE) {
        Ok(text) => {
            toml::from_str::<RawIndex>(&text)
                .map_err(|e| {
                    let (line, column) =
                        corral_manifest::line_col(&text, e.span().map_or(0, |s| s.start));
                    bad(format!(
                        "{line}:{column}: {}; fix or remove it first",
                        e.message()
                    ))
                })?
                .plugin
        }
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(bad(format!("cannot read: {e}"))),
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar.gz") || n.ends_with(".tgz"))
        .collect();
    names.sort();
    let mut out = Indexed::default();
    for name in &names {
        let path = dir.join(name);
        let what = path.display().to_string();
        let bytes =
            corral_files::read_regular(&path, MAX_ARCHIVE).map_err(|e| InstallError::Archive {
                what: what.clone(),
                why: e.to_string(),
            })?;
        let unpacked = tempfile::tempdir().map_err(io("a temporary directory"))?;
        unpack(&bytes, unpacked.path(), &what)?;
        let root = plugin_root(unpacked.path()).ok_or_else(|| InstallError::Archive {
            what: what.clone(),
            why: "no plugin.toml at its root or in its one top directory".into(),
        })?;
        let manifest = Manifest::load_dir(&root).map_err(|e| InstallError::Plugin {
            what: what.clone(),
            why: corral_protocol::error_chain(&e).replace(&root.display().to_string(), name),
        })?;
        out.entries.push(IndexEntry {
            id: manifest.id.clone(),
            version: manifest.version.clone(),
            archive: name.clone(),
            sha256: signing::hex(&Sha256::digest(&bytes)),
        });
    }
    for e in previous {
        if out.entries.iter().any(|n| n.archive == e.archive) {
            continue;
        }
        // `dir.join` keeps an absolute path as it is.
        if is_url(&e.archive) || dir.join(&e.archive).is_file() {
            out.kept.push(e);
        } else {
            out.dropped.push(e);
        }
    }
    let mut all: Vec<IndexEntry> = out.entries.iter().chain(&out.kept).cloned().collect();
    all.sort_by(|a, b| (&a.id, &a.version).cmp(&(&b.id, &b.version)));
    for pair in all.windows(2) {
        if pair[0].id == pair[1].id && pair[0].version == pair[1].version {
            return Err(bad(format!(
                "{} and {} both hold {} {}; keep one",
                pair[0].archive, pair[1].archive, pair[0].id, pair[0].version
            )));
        }
    }
    if all.is_empty() {
        return Err(bad(format!(
            "no plugin archives (*.tar.gz, *.tgz) in {}; make them with `corral plugin pack`",
            dir.display()
        )));
    }
    let body = toml::to_string(&RawIndex { plugin: all })
        .map_err(|e| bad(format!("cannot write it: {e}")))?;
    let text = format!(
        "# Written by `corral plugin index`: one entry per plugin archive, for\n\
         # `corral plugin install ID[@REQ] --index {}`.\n\n{body}",
        dir.display()
    );
    let tmp = dir.join(format!(".{INDEX_FILE}.partial"));
    std::fs::write(&tmp, text).map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, &file).map_err(io(&shown))?;
    Ok(out)
}

/// Where the plugin is in an unpacked archive: its root or its one top directory.
fn plugin_root(dir: &Path) -> Option<PathBuf> {
    if dir.join(corral_manifest::MANIFEST_FILE).is_file() {
        return Some(dir.to_owned());
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match entries.as_slice() {
        [only] if only.join(corral_manifest::MANIFEST_FILE).is_file() => Some(only.clone()),
        _ => None,
    }
}

/// Swap two directories in one step (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> Result<(), InstallError> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
    let (Some(ca), Some(cb)) = (c(a), c(b)) else {
        return Err(InstallError::Io {
            what: b.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    };
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io(b.display())(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A hidden directory in the plugins directory, removed with everything in it when
/// dropped.
struct Staging {
    path: PathBuf,
}

impl Staging {
    fn new(plugins_dir: &Path) -> Result<Staging, InstallError> {
        let dir = tempfile::Builder::new()
            .prefix(".staging-")
            .permissions(std::fs::Permissions::from_mode(0o755))
            .tempdir_in(plugins_dir)
            .map_err(io(plugins_dir.display()))?;
        Ok(Staging { path: dir.keep() })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_gz(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let raw = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        gz.finish().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    }

    #[test]
    fn unpack_refuses_escapes_links_and_devices() {
        let d = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_gz(|b| {
                    // `append_data` refuses `..` itself; write the name raw.
                    let mut h = tar::Header::new_old();
                    h.as_old_mut().name[..11].copy_from_slice(b"../evil.txt");
                    h.set_size(1);
                    h.set_mode(0o644);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_cksum();
                    b.append(&h, &b"x"[..]).unwrap();
                }),
                "../evil.txt: an absolute path or `..`",
            ),
            (
                tar_gz(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, "p/link", "/etc/passwd").unwrap();
                }),
                "p/link: a symbolic link entry",
            ),
            (
                tar_gz(|b| {
                    let mut h = tar::Header::new_gnu();
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Char);
                    b.append_data(&mut h, "p/dev", &[][..]).unwrap();
                }),
                "p/dev: a device entry",
            ),
            (b"not gzip".to_vec(), "not a gzipped tar archive"),
        ];
        for (bytes, want) in cases {
            let into = d.path().join("x");
            let _ = std::fs::remove_dir_all(&into);
            std::fs::create_dir(&into).unwrap();
            let e = unpack(&bytes, &into, "a.tar.gz").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(!d.path().join("evil.txt").exists());
        let ok = tar_gz(|b| file(b, "p/plugin.toml", b"id = 1"));
        let into = d.path().join("ok");
        std::fs::create_dir(&into).unwrap();
        unpack(&ok, &into, "ok").unwrap();
        assert_eq!(plugin_root(&into), Some(into.join("p")));
    }
}
