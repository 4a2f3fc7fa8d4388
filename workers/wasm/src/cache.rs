//! Precompiled modules on disk, keyed by the module's bytes, the wasmtime version and
//! the engine's compilation settings.
//!
//! Compiled artefacts are native code that wasmtime loads without re-checking, so
//! the cache directory must be writable only by the supervisor's user (it creates it
//! 0700) and entries are written atomically (temporary file, then rename). A corrupt
//! or incompatible entry is detected by wasmtime's header check and recompiled.

use sha2::{Digest, Sha256};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use wasmtime::{Engine, Module};

/// What happened when a module was loaded through the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded a precompiled module.
    Hit,
    /// Compiled and stored the result.
    Compiled,
    /// Compiled, but the result could not be stored.
    WriteFailed(String),
}

/// A directory of precompiled modules.
#[derive(Debug)]
pub struct ModuleCache<'e> {
    dir: PathBuf,
    engine: &'e Engine,
}

impl<'e> ModuleCache<'e> {
    pub fn new(dir: PathBuf, engine: &'e Engine) -> Self {
        ModuleCache { dir, engine }
    }

    /// The cache file for `bytes` under this engine.
    pub fn path_for(&self, bytes: &[u8]) -> PathBuf {
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut engine_hash);
        let mut h = Sha256::new();
        h.update(bytes);
        h.update(crate::WASMTIME_VERSION.as_bytes());
        h.update(engine_hash.finish().to_le_bytes());
        let digest = h.finalize();
        let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{name}.cwasm"))
    }

    /// Load the precompiled module for `bytes`, or compile it and store the result.
    pub fn load_or_compile(&self, bytes: &[u8]) -> wasmtime::Result<(Module, CacheOutcome)> {
        let path = self.path_for(bytes);
        if path.exists() {
            // SAFETY: the file was written by `store` below into a directory only the
            // supervisor's user can write, from a module compiled by this same engine
            // configuration (the key covers version and settings); wasmtime still checks
            // its header and rejects artefacts from another version or configuration.
            match unsafe { Module::deserialize_file(self.engine, &path) } {
                Ok(m) => return Ok((m, CacheOutcome::Hit)),
                Err(_) => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let module = Module::new(self.engine, bytes)?;
        let outcome = match self.store(&module, &path) {
            Ok(()) => CacheOutcome::Compiled,
            Err(e) => CacheOutcome::WriteFailed(format!("{}: {e}", path.display())),
        };
        Ok((module, outcome))
    }

    fn store(&self, module: &Module, path: &PathBuf) -> std::io::Result<()> {
        let data = module.serialize().map_err(std::io::Error::other)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (memory (export "memory") 1)
        (func (export "corral_alloc") (param i32) (result i32) i32.const 16))"#;

    #[test]
    fn second_load_is_a_hit_and_keys_differ_by_module() {
        let engine = Engine::new(&crate::engine_config()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().join("c"), &engine);
        let (_, first) = cache.load_or_compile(WAT.as_bytes()).unwrap();
        assert_eq!(first, CacheOutcome::Compiled);
        let (_, second) = cache.load_or_compile(WAT.as_bytes()).unwrap();
        assert_eq!(second, CacheOutcome::Hit);
        let other = WAT.replace("16", "32");
        assert_ne!(
            cache.path_for(WAT.as_bytes()),
            cache.path_for(other.as_bytes())
        );
    }

    #[test]
    fn corrupt_entry_is_recompiled() {
        let engine = Engine::new(&crate::engine_config()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = ModuleCache::new(dir.path().to_owned(), &engine);
        cache.load_or_compile(WAT.as_bytes()).unwrap();
        fs::write(cache.path_for(WAT.as_bytes()), b"not a module").unwrap();
        let (_, outcome) = cache.load_or_compile(WAT.as_bytes()).unwrap();
        assert_eq!(outcome, CacheOutcome::Compiled);
    }

    #[test]
    fn key_depends_on_engine_settings() {
        let a = Engine::new(&crate::engine_config()).unwrap();
        let mut other = crate::engine_config();
        other.epoch_interruption(false);
        let b = Engine::new(&other).unwrap();
        let dir = PathBuf::from("/nonexistent");
        assert_ne!(
            ModuleCache::new(dir.clone(), &a).path_for(WAT.as_bytes()),
            ModuleCache::new(dir, &b).path_for(WAT.as_bytes())
        );
    }
}
