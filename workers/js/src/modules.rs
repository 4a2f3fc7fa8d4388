//! Module resolution confined to the plugin directory.
//!
//! Module names are logical paths relative to the plugin root (`main.js`,
//! `lib/util.js`). Only relative specifiers resolve, and never above the root; the
//! loader also refuses a file whose real path (after symlinks) leaves the root.

use rquickjs::loader::{ImportAttributes, Loader, Resolver};
use rquickjs::{Ctx, Error, Module, Result};
use std::path::PathBuf;

/// `entry` as a logical module name: a relative path without `..` or empty parts.
pub fn logical_name(entry: &str) -> Option<String> {
    let parts: Vec<&str> = entry
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    (!entry.starts_with('/') && !parts.is_empty() && !parts.contains(&".."))
        .then(|| parts.join("/"))
}

/// Resolve `name` imported by module `base`; `Err` with the reason.
pub fn resolve(base: &str, name: &str) -> std::result::Result<String, String> {
    if !(name.starts_with("./") || name.starts_with("../")) {
        return Err(format!(
            "only relative imports of files in the plugin directory are allowed \
             (\"./file.js\"); {name:?} is not one"
        ));
    }
    let mut parts: Vec<&str> = base.split('/').collect();
    parts.pop(); // the importing file itself
    for seg in name.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{name:?} leaves the plugin directory"));
                }
            }
            s => parts.push(s),
        }
    }
    if parts.is_empty() {
        return Err(format!("{name:?} names no file"));
    }
    Ok(parts.join("/"))
}

#[derive(Debug)]
pub struct PluginResolver;

impl Resolver for PluginResolver {
    fn resolve<'js>(
        &mut self,
        _ctx: &Ctx<'js>,
        base: &str,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<String> {
        resolve(base, name).map_err(|why| Error::new_resolving_message(base, name, why))
    }
}

#[derive(Debug)]
pub struct PluginLoader {
    /// The plugin directory, canonical.
    root: PathBuf,
}

impl PluginLoader {
    pub fn new(root: PathBuf) -> PluginLoader {
        PluginLoader { root }
    }
}

impl Loader for PluginLoader {
    fn load<'js>(
        &mut self,
        ctx: &Ctx<'js>,
        name: &str,
        _attributes: Option<ImportAttributes<'js>>,
    ) -> Result<Module<'js>> {
        let path = self
            .root
            .join(name)
            .canonicalize()
            .map_err(|e| Error::new_loading_message(name, e.to_string()))?;
        if !path.starts_with(&self.root) {
            return Err(Error::new_loading_message(
                name,
                "the file is outside the plugin directory (a symlink?)",
            ));
        }
        let source =
            std::fs::read(&path).map_err(|e| Error::new_loading_message(name, e.to_string()))?;
        Module::declare(ctx.clone(), name, source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relative_imports_inside_the_plugin_resolve() {
        assert_eq!(resolve("main.js", "./lib/util.js").unwrap(), "lib/util.js");
        assert_eq!(
            resolve("lib/util.js", "../vendor/x.js").unwrap(),
            "vendor/x.js"
        );
        assert_eq!(resolve("lib/a/b.js", "./../c.js").unwrap(), "lib/c.js");
        assert!(
            resolve("main.js", "../secret.js")
                .unwrap_err()
                .contains("leaves the plugin")
        );
        assert!(
            resolve("lib/x.js", "../../etc/passwd")
                .unwrap_err()
                .contains("leaves")
        );
        assert!(
            resolve("main.js", "fs")
                .unwrap_err()
                .contains("only relative imports")
        );
        assert!(
            resolve("main.js", "/etc/passwd")
                .unwrap_err()
                .contains("only relative")
        );
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
