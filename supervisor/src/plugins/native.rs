//! The shared libraries a Python plugin's compiled extensions need.
//!
//! A wheel's extension module (`numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so`)
//! links against libraries it bundles (`numpy.libs/`, found through its `RUNPATH`
//! of `$ORIGIN/...`) and against system ones (`libm.so.6`, `libstdc++.so.6`,
//! `libz.so.1`). Confined, the worker reads only its plugin's files and the
//! interpreter's own, so each system library must be granted by name: not its
//! directory, which holds every library of the machine.
//!
//! [`Linker::libraries`] walks every `*.so` file of a plugin (and everything in a
//! wheel's `*.libs/` directories), reads each one's `DT_NEEDED`, `DT_RPATH` and
//! `DT_RUNPATH`, and resolves the needed names as glibc's loader does for a
//! `dlopen` from the worker: a library the worker has already loaded (by its
//! soname: libc, libm, libpython...) is not searched again; otherwise the
//! object's `RPATH` (when it has no `RUNPATH`), its `RUNPATH`, `/etc/ld.so.cache`,
//! then the default directories. It follows what it finds to its own needs. What
//! it finds outside the plugin is the list to grant; a name it cannot find is an
//! error naming the extension and the library, before any worker starts.
//!
//! The files are the plugin's, so untrusted: each is parsed with `object`, read
//! lazily (headers and the dynamic section only, however large the file), and
//! the walk is bounded.

use object::read::elf::FileHeader;
use object::{Endianness, FileKind, ReadCache, ReadRef, elf};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The loader's cache of library locations.
pub const LD_SO_CACHE: &str = "/etc/ld.so.cache";

/// Where glibc's loader looks last (Debian's multiarch directories first).
#[cfg(target_arch = "x86_64")]
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
#[cfg(target_arch = "aarch64")]
const DEFAULT_DIRS: &[&str] = &[
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[cfg(target_arch = "x86_64")]
const MACHINE: (u16, &str) = (elf::EM_X86_64, "x86_64");
#[cfg(target_arch = "aarch64")]
const MACHINE: (u16, &str) = (elf::EM_AARCH64, "aarch64");

/// `ld.so.cache` entry flags for this machine's 64-bit glibc libraries.
#[cfg(target_arch = "x86_64")]
const CACHE_FLAGS: i32 = 0x0303; // FLAG_ELF_LIBC6 | FLAG_X8664_LIB64
#[cfg(target_arch = "aarch64")]
const CACHE_FLAGS: i32 = 0x0a03; // FLAG_ELF_LIBC6 | FLAG_AARCH64_LIB64

/// Largest `ld.so.cache` read.
const MAX_LD_CACHE: u64 = 64 << 20;

/// Most shared objects one plugin may hold (numpy holds about 60).
const MAX_OBJECTS: usize = 4096;
/// Most entries of one object's dynamic section that are read.
const MAX_NEEDED: usize = 256;

/// A system library a plugin's extensions need, to be granted read-only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Library {
    /// Where the loader will open it (not canonicalized: the `maximum` view shows
    /// it at this path).
    pub path: PathBuf,
    /// The file in the plugin (relative) whose needs brought it in.
    pub needed_by: String,
}

/// Why a plugin's native code cannot run in the worker.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error(
        "the extension {extension} needs {library}{via}, which is not found (searched {searched}); \
         install the system package that provides it, or vendor a wheel that bundles it"
    , via = via.as_ref().map(|v| format!(" (through {v})")).unwrap_or_default()
    , searched = searched.join(", "))]
    Missing {
        /// The plugin's own file (relative path).
        extension: String,
        library: String,
        /// The library that needs it, when not the extension itself.
        via: Option<String>,
        searched: Vec<String>,
    },
    #[error("{file} is not a shared library this worker can load: {why}")]
    NotLoadable { file: String, why: String },
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the plugin holds more than {MAX_OBJECTS} shared objects")]
    TooMany,
}

/// What one shared object asks of the loader.
#[derive(Debug, Default)]
struct Dynamic {
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
    soname: Option<String>,
}

/// Read the dynamic section of `path`: `Err` with the reason if it is not an ELF
/// shared object for this machine.
fn read_dynamic(path: &Path) -> Result<Result<Dynamic, String>, std::io::Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(Err("not a regular file".into()));
    }
    let data = ReadCache::new(file);
    Ok(parse_dynamic(&data))
}

fn parse_dynamic<'a, R: ReadRef<'a>>(data: R) -> Result<Dynamic, String> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => {
            return Err(format!("a 32-bit ELF; the worker is 64-bit {}", MACHINE.1));
        }
        Ok(other) => return Err(format!("not an ELF file ({other:?})")),
        Err(_) => return Err("not an ELF file".into()),
    }
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(|e| e.to_string())?;
    let endian = header.endian().map_err(|e| e.to_string())?;
    let machine = header.e_machine(endian);
    if machine != MACHINE.0 {
        return Err(format!(
            "built for machine {machine} ({}), the worker runs on {}",
            machine_name(machine),
            MACHINE.1
        ));
    }
    if header.e_type(endian) != elf::ET_DYN {
        return Err("not a shared object (ELF type is not ET_DYN)".into());
    }
    dynamic_section(header, endian, data)
}

/// The entries of an object's dynamic section that the loader acts on.
fn dynamic_section<'a, R: ReadRef<'a>>(
    header: &elf::FileHeader64<Endianness>,
    endian: Endianness,
    data: R,
) -> Result<Dynamic, String> {
    let sections = header.sections(endian, data).map_err(|e| e.to_string())?;
    let table = sections
        .dynamic_table(endian, data)
        .map_err(|e| e.to_string())?;
    let mut out = Dynamic::default();
    for d in table.iter().take(MAX_NEEDED) {
        let text = || -> Result<String, String> {
            let bytes = table.string(d).map_err(|e| e.to_string())?;
            if bytes.len() > MAX_DIRS * (MAX_DIR + 1) {
                return Err(format!("a dynamic string of {} bytes", bytes.len()));
            }
            Ok(String::from_utf8_lossy(bytes).into_owned())
        };
        match d.tag {
            elf::DT_NEEDED => out.needed.push(bounded_name(text()?)?),
            elf::DT_RPATH => push_dirs(&mut out.rpath, &text()?)?,
            elf::DT_RUNPATH => push_dirs(&mut out.runpath, &text()?)?,
            elf::DT_SONAME => out.soname = Some(bounded_name(text()?)?),
            _ => {}
        }
    }
    Ok(out)
}

/// Longest library name taken (a file name is at most 255 bytes).
const MAX_NAME: usize = 255;
/// Longest search directory, and most of them per object.
const MAX_DIR: usize = 4096;
const MAX_DIRS: usize = 32;

fn bounded_name(name: String) -> Result<String, String> {
    if name.len() > MAX_NAME {
        return Err(format!("a needed library name of {} bytes", name.len()));
    }
    Ok(name)
}

fn push_dirs(dirs: &mut Vec<String>, text: &str) -> Result<(), String> {
    for dir in text.split(':') {
        if dir.len() > MAX_DIR || dirs.len() >= MAX_DIRS {
            return Err(format!(
                "its library search path is longer than {MAX_DIRS} directories of {MAX_DIR} bytes"
            ));
        }
        dirs.push(dir.to_owned());
    }
    Ok(())
}

fn machine_name(m: u16) -> &'static str {
    match m {
        elf::EM_X86_64 => "x86_64",
        elf::EM_AARCH64 => "aarch64",
        elf::EM_386 => "i386",
        elf::EM_ARM => "arm",
        elf::EM_PPC64 => "ppc64",
        elf::EM_S390 => "s390",
        elf::EM_RISCV => "riscv",
        _ => "another machine",
    }
}

/// Parse glibc's `ld.so.cache` (format `glibc-ld.so.cache1.1`, alone or after the
/// old `ld.so-1.7.0` table): each library name for this machine and where it is.
/// The first entry for a name wins, as in the loader; entries for a hardware
/// capability subdirectory are left out (the loader falls back to the plain one).
pub fn parse_ld_cache(data: &[u8]) -> HashMap<String, PathBuf> {
    const OLD: &[u8] = b"ld.so-1.7.0";
    const NEW: &[u8] = b"glibc-ld.so.cache1.1";
    const HEADER: usize = 48;
    const ENTRY: usize = 24;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?))
    };
    let mut start = 0usize;
    if data.starts_with(OLD) {
        let Some(n) = u32_at(12) else {
            return HashMap::new();
        };
        let end = 16 + n as usize * 12;
        start = end.div_ceil(8) * 8;
    }
    let mut out = HashMap::new();
    if data.get(start..start + NEW.len()) != Some(NEW) {
        return out;
    }
    let Some(nlibs) = u32_at(start + 20) else {
        return out;
    };
    let text = |offset: u32| -> Option<&str> {
        // Offsets count from the start of the new-format table.
        let from = start.checked_add(offset as usize)?;
        let rest = data.get(from..)?;
        let len = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..len]).ok()
    };
    for i in 0..nlibs as usize {
        let at = start + HEADER + i * ENTRY;
        let Some(entry) = data.get(at..at + ENTRY) else {
            break;
        };
        let flags = i32::from_ne_bytes(entry[0..4].try_into().expect("4 bytes"));
        let key = u32::from_ne_bytes(entry[4..8].try_into().expect("4 bytes"));
        let value = u32::from_ne_bytes(entry[8..12].try_into().expect("4 bytes"));
        let hwcap = u64::from_ne_bytes(entry[16..24].try_into().expect("8 bytes"));
        if flags != CACHE_FLAGS || hwcap != 0 {
            continue;
        }
        if let (Some(k), Some(v)) = (text(key), text(value)) {
            out.entry(k.to_owned()).or_insert_with(|| PathBuf::from(v));
        }
    }
    out
}

/// Resolves needed libraries as glibc's loader would for the worker.
#[derive(Debug, Default)]
pub struct Linker {
    /// `ld.so.cache`: name to path.
    cache: HashMap<String, PathBuf>,
    /// Names (sonames and file names) of what the worker has loaded before any
    /// plugin code: a `dlopen` finds these without opening a file.
    loaded: HashSet<String>,
    /// Whether `ld.so.cache` was read (and so must be readable to the worker).
    has_cache: bool,
}

impl Linker {
    /// The machine's loader, for a worker that runs `worker` (its libraries count
    /// as loaded; without it, every library is searched for).
    pub fn system(worker: Option<&Path>) -> Linker {
        // Root's file, but read within a bound all the same (a glibc cache of
        // every library of a large machine is well under a mebibyte).
        let data =
            corral_files::read_regular(Path::new(LD_SO_CACHE), MAX_LD_CACHE).unwrap_or_default();
        let mut linker = Linker {
            cache: parse_ld_cache(&data),
            loaded: HashSet::new(),
            has_cache: false,
        };
        linker.has_cache = !linker.cache.is_empty();
        if let Some(worker) = worker {
            linker.loaded = linker.closure_of(worker);
        }
        linker
    }

    /// Whether the worker must also read `ld.so.cache`.
    pub fn uses_cache(&self) -> bool {
        self.has_cache
    }

    /// The names of `program` and everything it loads, transitively (best effort:
    /// what cannot be read or found is left out).
    fn closure_of(&self, program: &Path) -> HashSet<String> {
        let mut names = HashSet::new();
        let mut queue = VecDeque::from([program.to_owned()]);
        let mut seen = HashSet::new();
        while let Some(path) = queue.pop_front() {
            if !seen.insert(path.clone()) || seen.len() > MAX_OBJECTS {
                continue;
            }
            let Ok(Ok(dynamic)) = read_dynamic_any(&path) else {
                continue;
            };
            if let Some(s) = &dynamic.soname {
                names.insert(s.clone());
            }
            for name in &dynamic.needed {
                names.insert(name.clone());
                if let Ok(found) = self.search(name, &path, &dynamic, None) {
                    queue.push_back(found);
                }
            }
        }
        names
    }

    /// Where the loader finds `name` needed by `object` (whose dynamic section is
    /// `dynamic`): `Err` with the places searched. For an object of the plugin
    /// (`plugin` is its root), the places the object itself names (its `RPATH`,
    /// `RUNPATH`, a needed path with a slash) count only inside the plugin: a
    /// plugin's file must not choose which host files become readable
    /// (`RUNPATH=/root/private` would otherwise show an ELF file from a directory
    /// the worker's user cannot enter). Outside it, the system's places.
    fn search(
        &self,
        name: &str,
        object: &Path,
        dynamic: &Dynamic,
        plugin: Option<&Path>,
    ) -> Result<PathBuf, Vec<String>> {
        // Inside the plugin by its text first (no syscall on a path the plugin
        // chose outside it: an automounter, a FIFO), then by its real path.
        let allowed = |candidate: &Path| match plugin {
            None => true,
            Some(root) => {
                candidate.starts_with(root)
                    && candidate
                        .canonicalize()
                        .is_ok_and(|real| real.starts_with(root))
            }
        };
        if name.contains('/') {
            let p = if Path::new(name).is_absolute() {
                PathBuf::from(name)
            } else {
                object.parent().unwrap_or(Path::new("/")).join(name)
            };
            return if allowed(&p) && loadable(&p) {
                Ok(p)
            } else {
                Err(vec![format!("{name} (a path: only a file of the plugin)")])
            };
        }
        let origin = object.parent().unwrap_or(Path::new("/"));
        let mut searched = Vec::new();
        let rpath = if dynamic.runpath.is_empty() {
            &dynamic.rpath[..]
        } else {
            &[]
        };
        for dir in rpath.iter().chain(&dynamic.runpath) {
            let Some(dir) = expand(dir, origin) else {
                continue;
            };
            let candidate = dir.join(name);
            if plugin.is_some_and(|root| !dir.starts_with(root)) {
                searched.push(format!(
                    "{} (outside the plugin: not searched)",
                    dir.display()
                ));
                continue;
            }
            if allowed(&candidate) && loadable(&candidate) {
                return Ok(candidate);
            }
            searched.push(dir.display().to_string());
        }
        if let Some(p) = self.cache.get(name)
            && loadable(p)
        {
            return Ok(p.clone());
        }
        searched.push(LD_SO_CACHE.to_owned());
        for dir in DEFAULT_DIRS {
            let candidate = Path::new(dir).join(name);
            if loadable(&candidate) {
                return Ok(candidate);
            }
        }
        searched.push(DEFAULT_DIRS.join(", "));
        Err(searched)
    }

    /// The system libraries that the shared objects in `plugin_dir` need, each
    /// once, sorted by path.
    pub fn libraries(&self, plugin_dir: &Path) -> Result<Vec<Library>, NativeError> {
        let root = plugin_dir
            .canonicalize()
            .map_err(|source| NativeError::Read {
                file: plugin_dir.display().to_string(),
                source,
            })?;
        let roots = shared_objects(&root)?;
        let relative = |p: &Path| -> String {
            p.strip_prefix(&root)
                .map(|r| r.display().to_string())
                .unwrap_or_else(|_| p.display().to_string())
        };
        let mut granted: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut seen: HashSet<PathBuf> = HashSet::new();
        for extension in roots {
            let ext_name = relative(&extension);
            // (object, the library of the chain that needed it, if not the extension)
            let mut queue = VecDeque::from([(extension.clone(), None::<String>)]);
            while let Some((path, via)) = queue.pop_front() {
                if !seen.insert(path.clone()) {
                    continue;
                }
                if seen.len() > MAX_OBJECTS {
                    return Err(NativeError::TooMany);
                }
                let inside = path.starts_with(&root);
                let dynamic = match (read_dynamic(&path), inside) {
                    (Ok(Ok(d)), _) => d,
                    // A system library the loader takes by name but that does not
                    // parse here: granted as found, not followed.
                    (_, false) => continue,
                    (Ok(Err(why)), true) => {
                        return Err(NativeError::NotLoadable {
                            file: relative(&path),
                            why,
                        });
                    }
                    (Err(source), true) => {
                        return Err(NativeError::Read {
                            file: relative(&path),
                            source,
                        });
                    }
                };
                for name in &dynamic.needed {
                    if self.loaded.contains(name) {
                        continue;
                    }
                    let plugin = inside.then_some(root.as_path());
                    let found = self
                        .search(name, &path, &dynamic, plugin)
                        .map_err(|searched| NativeError::Missing {
                            extension: ext_name.clone(),
                            library: name.clone(),
                            via: via.clone(),
                            searched,
                        })?;
                    // Inside the plugin: by its real path (`$ORIGIN/../x.libs`), so
                    // that it is read once and named plainly.
                    let found = match found.canonicalize() {
                        Ok(real) if real.starts_with(&root) => real,
                        // Outside: the path the loader opens, with `..` resolved in
                        // its directory (one mount point per file in the view).
                        _ => match (found.parent().map(Path::canonicalize), found.file_name()) {
                            (Some(Ok(dir)), Some(file))
                                if found
                                    .components()
                                    .any(|c| c == std::path::Component::ParentDir) =>
                            {
                                dir.join(file)
                            }
                            _ => found,
                        },
                    };
                    let next_via = if found.starts_with(&root) {
                        Some(relative(&found))
                    } else {
                        granted
                            .entry(found.clone())
                            .or_insert_with(|| ext_name.clone());
                        Some(found.display().to_string())
                    };
                    queue.push_back((found, next_via));
                }
            }
        }
        Ok(granted
            .into_iter()
            .map(|(path, needed_by)| Library { path, needed_by })
            .collect())
    }
}

/// The dynamic section of any ELF object (the worker binary is `ET_DYN` when
/// position-independent, `ET_EXEC` otherwise).
fn read_dynamic_any(path: &Path) -> Result<Result<Dynamic, String>, std::io::Error> {
    let file = File::open(path)?;
    let data = ReadCache::new(file);
    let data = &data;
    let header = match elf::FileHeader64::<Endianness>::parse(data) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let Ok(endian) = header.endian() else {
        return Ok(Err("bad endianness".into()));
    };
    Ok(dynamic_section(header, endian, data))
}

/// A search directory with `$ORIGIN` expanded; `None` for one the loader would
/// not use here (another dynamic string token, or a relative directory).
fn expand(dir: &str, origin: &Path) -> Option<PathBuf> {
    let origin = origin.to_string_lossy();
    let dir = dir
        .replace("${ORIGIN}", &origin)
        .replace("$ORIGIN", &origin);
    (dir.starts_with('/') && !dir.contains('$')).then(|| PathBuf::from(dir))
}

/// Whether the loader would take `path`: a regular file (after symlinks) that is
/// a 64-bit ELF for this machine.
fn loadable(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    // Never waited on: a FIFO or a device is not a library.
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return false;
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut ident = [0u8; 20];
    use std::io::Read;
    let mut f = file;
    if f.read_exact(&mut ident).is_err() {
        return false;
    }
    ident[..4] == *b"\x7fELF"
        && ident[4] == elf::ELFCLASS64
        && u16::from_le_bytes([ident[18], ident[19]]) == MACHINE.0
}

/// Every shared object in the plugin: files named `*.so` or `*.so.N`, and every
/// file in a `*.libs` directory (a wheel's bundled libraries). Symlinks are not
/// followed (the version's copy holds none).
fn shared_objects(root: &Path) -> Result<Vec<PathBuf>, NativeError> {
    let mut out = Vec::new();
    let mut dirs = vec![(root.to_owned(), false)];
    while let Some((dir, in_libs)) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| NativeError::Read {
            file: dir.display().to_string(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| NativeError::Read {
                file: dir.display().to_string(),
                source,
            })?;
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                dirs.push((path, name.ends_with(".libs")));
            } else if kind.is_file() && (in_libs || is_shared_name(&name)) {
                out.push(path);
                if out.len() > MAX_OBJECTS {
                    return Err(NativeError::TooMany);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// `x.so`, `libx.so.1`, `libx.so.1.2.3`.
fn is_shared_name(name: &str) -> bool {
    if name.ends_with(".so") {
        return true;
    }
    match name.split_once(".so.") {
        Some((_, version)) => version.split('.').all(|p| p.parse::<u32>().is_ok()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_shared_objects() {
        assert!(is_shared_name("_cmsgpack.cpython-311-x86_64-linux-gnu.so"));
        assert!(is_shared_name("libgfortran-040039e1.so.5.0.0"));
        assert!(!is_shared_name("notes.so.txt"));
        assert!(!is_shared_name("plugin.py"));
    }

    #[test]
    fn the_machines_cache_agrees_with_ldconfig() {
        let data = std::fs::read(LD_SO_CACHE).expect("this machine has an ld.so.cache");
        let cache = parse_ld_cache(&data);
        let out = std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .expect("ldconfig runs");
        let text = String::from_utf8_lossy(&out.stdout);
        // `libm.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libm.so.6`
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("libm.so.6 ") && !l.contains("hwcap"))
            .expect("ldconfig lists libm.so.6");
        let path = line.rsplit("=> ").next().unwrap().trim();
        assert_eq!(cache.get("libm.so.6"), Some(&PathBuf::from(path)));
        assert!(cache.len() > 10, "{} entries", cache.len());
    }

    #[test]
    fn a_cache_cut_short_or_of_another_format_is_empty_not_a_crash() {
        let data = std::fs::read(LD_SO_CACHE).unwrap();
        for len in [0, 10, 20, 47, 48, 60, 200] {
            let _ = parse_ld_cache(&data[..len.min(data.len())]);
        }
        assert!(parse_ld_cache(b"not a cache at all").is_empty());
    }

    /// Build a shared object from C `source` with gcc.
    fn gcc(source: &str, out: &Path, extra: &[&str]) {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let c = out.with_extension("c");
        std::fs::write(&c, source).unwrap();
        let status = std::process::Command::new("gcc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(out)
            .arg(&c)
            .args(extra)
            .status()
            .expect("gcc runs");
        assert!(status.success());
        std::fs::remove_file(c).unwrap();
    }

    #[test]
    fn a_plugins_own_search_paths_reach_only_its_own_files() {
        let host = tempfile::tempdir().unwrap();
        let private = host.path().join("private");
        gcc(
            "int secret(void) { return 7; }\n",
            &private.join("libsecret.so"),
            &[],
        );
        let plugin = tempfile::tempdir().unwrap();
        let root = plugin.path();
        // Bundled beside it through $ORIGIN: found inside, nothing granted.
        gcc(
            "int b(void) { return 1; }\n",
            &root.join("pkg.libs/libbundled.so"),
            &[],
        );
        gcc(
            "#include <stdlib.h>\nint b(void);\nint f(void) { return b() + (getenv(\"X\") != 0); }\n",
            &root.join("pkg/_ok.so"),
            &[
                &format!("-L{}", root.join("pkg.libs").display()),
                "-lbundled",
                "-Wl,-rpath,$ORIGIN/../pkg.libs",
            ],
        );
        let linker = Linker::system(None);
        let libs = linker.libraries(root).unwrap();
        assert!(libs.iter().all(|l| !l.path.starts_with(root)), "{libs:?}");
        assert!(
            libs.iter().any(|l| l.path.ends_with("libc.so.6")),
            "{libs:?}"
        );

        // An absolute RUNPATH naming a host directory is not searched.
        gcc(
            "int secret(void);\nint g(void) { return secret(); }\n",
            &root.join("pkg/_evil.so"),
            &[
                &format!("-L{}", private.display()),
                "-lsecret",
                &format!("-Wl,-rpath,{}", private.display()),
            ],
        );
        let e = linker.libraries(root).unwrap_err().to_string();
        assert!(
            e.contains("the extension pkg/_evil.so needs libsecret.so"),
            "{e}"
        );
        assert!(e.contains("(outside the plugin: not searched)"), "{e}");
    }

    #[test]
    fn origin_is_expanded_and_other_tokens_are_not_searched() {
        let o = Path::new("/p/numpy/_core");
        assert_eq!(
            expand("$ORIGIN/../../numpy.libs", o),
            Some(PathBuf::from("/p/numpy/_core/../../numpy.libs"))
        );
        assert_eq!(
            expand("${ORIGIN}", o),
            Some(PathBuf::from("/p/numpy/_core"))
        );
        assert_eq!(expand("$PLATFORM/lib", o), None);
        assert_eq!(expand("relative/dir", o), None);
    }
}
