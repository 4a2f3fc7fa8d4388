//! Precompiled module graphs: the bytecode of every module a plugin's entry
//! imports statically, made once by a compile helper and loaded by every worker of
//! the same files, which then parse none of them.
//!
//! The helper (`Code::CompileOnly`) declares the entry as the serving worker would
//! and has QuickJS resolve its imports (`JS_ResolveModule`): each module of the
//! graph goes through a [`crate::PluginLoader::recording`], which declares it from
//! its source exactly as the serving worker's loader does and keeps its bytecode. Nothing is evaluated: no
//! module's top-level code runs, no `init`. The bundle is written to the file the
//! supervisor gave it; the supervisor stores it under a digest of the plugin's
//! files and entry.
//!
//! A serving worker given `Code::Precompiled(path)` reads the bundle once per
//! instance and takes each module's bytecode as it is first loaded; what was not
//! asked for (and everything, once the module graph is loaded) is dropped. A module
//! the bundle does not hold (a dynamic `import()`, a `require`d CommonJS file) is
//! parsed from its source as before.
//!
//! Bundle format: `corral-qjs 1\n`, then for each module its name and its
//! bytecode, each as a little-endian `u32` length and the bytes.

use crate::loader::es_source;
use crate::modules::PluginFiles;
use rquickjs::{Ctx, Error, Module, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

const MAGIC: &[u8] = b"corral-qjs 1\n";

/// Modules' bytecode in the order they were declared, as a helper records them.
pub type Recorded = Rc<RefCell<Vec<(String, Vec<u8>)>>>;

/// Modules' bytecode by logical name, each taken at most once.
pub type Modules = Rc<RefCell<HashMap<String, Vec<u8>>>>;

/// Encode `modules` as a bundle.
pub fn encode(modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let total: usize = modules.iter().map(|(n, c)| n.len() + c.len() + 8).sum();
    let mut out = Vec::with_capacity(MAGIC.len() + total);
    out.extend_from_slice(MAGIC);
    for (name, code) in modules {
        for part in [name.as_bytes(), code] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// The bundle in the file at `path`, read only if it holds at most `max` bytes.
pub fn read(
    path: &std::path::Path,
    max: u64,
) -> std::result::Result<HashMap<String, Vec<u8>>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let bytes = corral_files::read_at_most(file, max, size).map_err(|e| e.to_string())?;
    decode(&bytes)
}

/// Decode a bundle; an error says what is wrong with it.
pub fn decode(bytes: &[u8]) -> std::result::Result<HashMap<String, Vec<u8>>, String> {
    let mut rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a bundle of QuickJS bytecode (no header)")?;
    let mut modules = HashMap::new();
    while !rest.is_empty() {
        let name = part(&mut rest, "module name")?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| "a module name is not UTF-8")?;
        let code = part(&mut rest, "module's bytecode")?.to_vec();
        if modules.insert(name.clone(), code).is_some() {
            return Err(format!("module {name} is in it twice"));
        }
    }
    Ok(modules)
}

/// The next length-prefixed part of `rest` (a `what`), `rest` moved past it.
fn part<'a>(rest: &mut &'a [u8], what: &str) -> std::result::Result<&'a [u8], String> {
    let (len, after) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| format!("cut short before a {what}"))?;
    let len = u32::from_le_bytes(*len) as usize;
    if after.len() < len {
        return Err(format!("cut short in a {what}"));
    }
    let (this, after) = after.split_at(len);
    *rest = after;
    Ok(this)
}

/// Declare module `name` from `files`: from its bytecode in `modules` if there
/// (taken out: a module is loaded once per runtime), else from its source.
pub fn declare<'js>(
    ctx: &Ctx<'js>,
    files: &PluginFiles,
    modules: Option<&Modules>,
    name: &str,
) -> Result<Module<'js>> {
    if let Some(code) = modules.and_then(|m| m.borrow_mut().remove(name)) {
        // SAFETY: the bytecode was written by this engine build (the supervisor
        // keeps a store per worker binary) from exactly these files, by a compile
        // helper that only parsed them; it is in a file only the supervisor can
        // write. QuickJS still checks its version tag.
        return unsafe { Module::load(ctx.clone(), &code) };
    }
    let source =
        es_source(ctx, files, name).map_err(|why| Error::new_loading_message(name, why))?;
    Module::declare(ctx.clone(), name, source)
}

/// Declare the module `name` (the entry) from `source` and resolve its static
/// imports without evaluating anything: each imported module goes through the
/// runtime's loader. The entry's own bytecode is returned; a failure leaves its
/// exception pending in `ctx`.
pub fn compile_entry(ctx: &Ctx<'_>, name: &str, source: Vec<u8>) -> Result<Vec<u8>> {
    use rquickjs::qjs;
    let name_c = std::ffi::CString::new(name)?;
    let source_len = source.len();
    let mut source = source;
    // JS_Eval reads the source as a NUL-terminated buffer.
    source.push(0);
    let raw = ctx.as_raw().as_ptr();
    // SAFETY: `source` is NUL-terminated and `source_len` long before the NUL;
    // `name_c` is a C string; both outlive the call. COMPILE_ONLY parses the
    // module and runs nothing.
    let module = unsafe {
        qjs::JS_Eval(
            raw,
            source.as_ptr().cast(),
            source_len as _,
            name_c.as_ptr(),
            (qjs::JS_EVAL_TYPE_MODULE | qjs::JS_EVAL_FLAG_STRICT | qjs::JS_EVAL_FLAG_COMPILE_ONLY)
                as i32,
        )
    };
    // SAFETY: `module` is the value JS_Eval returned in this context: a module
    // the context owns (a module value is never freed by its holder).
    unsafe {
        if qjs::JS_IsException(module) {
            return Err(Error::Exception);
        }
        let code = write(ctx, module)?;
        if qjs::JS_ResolveModule(raw, module) < 0 {
            return Err(Error::Exception);
        }
        Ok(code)
    }
}

/// The bytecode of the module `module`.
///
/// # Safety
/// `module` must be a live module value of `ctx`.
unsafe fn write(ctx: &Ctx<'_>, module: rquickjs::qjs::JSValue) -> Result<Vec<u8>> {
    use rquickjs::qjs;
    let raw = ctx.as_raw().as_ptr();
    let mut len = 0;
    // SAFETY: the caller's; JS_WriteObject returns a buffer of `len` bytes that
    // this context's allocator owns, freed below.
    unsafe {
        let buf = qjs::JS_WriteObject(raw, &mut len, module, qjs::JS_WRITE_OBJ_BYTECODE as i32);
        if buf.is_null() {
            return Err(Error::Exception);
        }
        let code = std::slice::from_raw_parts(buf, len as usize).to_vec();
        qjs::js_free(raw, buf.cast());
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_decodes_to_what_was_encoded_and_a_bad_one_says_why() {
        let modules = vec![
            ("lib/a.js".to_owned(), Vec::new()),
            ("main.js".to_owned(), vec![1, 2, 3]),
        ];
        let bytes = encode(&modules);
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back["main.js"], [1, 2, 3]);
        assert_eq!(back["lib/a.js"], Vec::<u8>::new());
        assert_eq!(decode(MAGIC).unwrap().len(), 0);
        assert!(decode(b"garbage").unwrap_err().contains("no header"));
        let cut = &bytes[..bytes.len() - 1];
        assert!(
            decode(cut)
                .unwrap_err()
                .contains("cut short in a module's bytecode")
        );
        let mut twice = bytes.clone();
        twice.extend_from_slice(&bytes[MAGIC.len()..]);
        assert!(
            decode(&twice)
                .unwrap_err()
                .contains("lib/a.js is in it twice")
        );
        // A file past the limit is refused before anything of it is decoded.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.qjsc");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path, bytes.len() as u64).unwrap().len(), 2);
        let e = read(&path, bytes.len() as u64 - 1).unwrap_err();
        assert!(e.contains(&(bytes.len() - 1).to_string()), "{e}");
        let mut stray = bytes.clone();
        stray.extend_from_slice(&[1, 0]);
        assert!(
            decode(&stray)
                .unwrap_err()
                .contains("cut short before a module name")
        );
    }
}
