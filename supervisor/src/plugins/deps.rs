//! Plugin dependencies: `[dependencies]` in `plugin.toml` (`other = { version =
//! "^1.2", optional = true }`) resolved over the plugins the supervisor has.
//!
//! A required dependency must be present with a version its requirement accepts; an
//! optional one may be absent, but if present it must match too (a plugin that
//! asked for `^1` should not meet version 2). A plugin is blocked when a dependency
//! is missing, incompatible, blocked itself, or part of a cycle; the reason names
//! the chain. The start order puts every plugin after its dependencies.

use corral_manifest::Manifest;
use std::collections::BTreeMap;

/// Why a plugin cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Blocked {
    #[error("dependency {dep} ({req}) is not installed")]
    Missing { dep: String, req: String },
    #[error("dependency {dep} is version {found}, which does not satisfy {req}")]
    Incompatible {
        dep: String,
        req: String,
        found: String,
    },
    #[error("dependency cycle: {chain}")]
    Cycle { chain: String },
    #[error("dependency {dep} cannot start: {why}")]
    Through { dep: String, why: Box<Blocked> },
}

/// The resolution: each plugin's place in the start order, or why it is blocked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Plugins that can start, each after its dependencies.
    pub order: Vec<String>,
    pub blocked: BTreeMap<String, Blocked>,
}

/// Resolve the dependencies of `plugins` (by id).
pub fn resolve(plugins: &BTreeMap<String, &Manifest>) -> Resolution {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        id: &str,
        plugins: &BTreeMap<String, &Manifest>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut Resolution,
    ) {
        if marks.get(id) == Some(&Mark::Done) {
            return;
        }
        let m = plugins[id];
        marks.insert(id.to_owned(), Mark::Visiting);
        stack.push(id.to_owned());
        let mut blocked = None;
        for (dep, d) in &m.dependencies {
            let req = d.version.to_string();
            let Some(dm) = plugins.get(dep) else {
                if !d.optional {
                    blocked.get_or_insert(Blocked::Missing {
                        dep: dep.clone(),
                        req,
                    });
                }
                continue;
            };
            if !d.version.matches(&dm.version) {
                blocked.get_or_insert(Blocked::Incompatible {
                    dep: dep.clone(),
                    req,
                    found: dm.version.to_string(),
                });
                continue;
            }
            match marks.get(dep.as_str()) {
                Some(Mark::Visiting) => {
                    let from = stack.iter().position(|s| s == dep).unwrap_or(0);
                    let mut chain: Vec<&str> = stack[from..].iter().map(String::as_str).collect();
                    chain.push(dep);
                    blocked.get_or_insert(Blocked::Cycle {
                        chain: chain.join(" -> "),
                    });
                    continue;
                }
                Some(Mark::Done) => {}
                None => visit(dep, plugins, marks, stack, out),
            }
            if let Some(why) = out.blocked.get(dep.as_str()) {
                let why = match why {
                    // Every plugin of a cycle reports the cycle itself.
                    c @ Blocked::Cycle { chain } if chain.split(" -> ").any(|p| p == id) => {
                        c.clone()
                    }
                    why => Blocked::Through {
                        dep: dep.clone(),
                        why: Box::new(why.clone()),
                    },
                };
                blocked.get_or_insert(why);
            }
        }
        stack.pop();
        marks.insert(id.to_owned(), Mark::Done);
        match blocked {
            Some(b) => {
                out.blocked.insert(id.to_owned(), b);
            }
            None => out.order.push(id.to_owned()),
        }
    }
    let mut out = Resolution::default();
    let mut marks = BTreeMap::new();
    for id in plugins.keys() {
        visit(id, plugins, &mut marks, &mut Vec::new(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn m(id: &str, version: &str, deps: &str) -> Manifest {
        Manifest::parse(
            &format!(
                "id = \"{id}\"\nversion = \"{version}\"\nruntime = \"js\"\nentry = \"m.js\"\n\
                 [dependencies]\n{deps}"
            ),
            Path::new("plugin.toml"),
        )
        .unwrap()
    }

    fn run(ms: &[Manifest]) -> Resolution {
        resolve(&ms.iter().map(|m| (m.id.clone(), m)).collect())
    }

    #[test]
    fn order_puts_dependencies_first_and_optional_may_be_absent() {
        let r = run(&[
            m(
                "app",
                "1.0.0",
                "db = { version = \"^2.1\" }\ncache = { version = \"^1\", optional = true }",
            ),
            m("db", "2.3.0", "log = { version = \"1\" }"),
            m("log", "1.4.2", ""),
        ]);
        assert_eq!(r.order, ["log", "db", "app"]);
        assert!(r.blocked.is_empty());
    }

    #[test]
    fn missing_incompatible_cycles_and_blocked_dependencies_are_named() {
        let r = run(&[
            m("a", "1.0.0", "b = { version = \"1\" }"),
            m("b", "1.0.0", "a = { version = \"1\" }"),
            m("c", "1.0.0", "a = { version = \"1\" }"),
            m("d", "1.0.0", "gone = { version = \"^3\" }"),
            m("e", "1.0.0", "f = { version = \"^2\" }"),
            m("f", "1.9.0", ""),
            m("g", "1.0.0", "f = { version = \"^2\", optional = true }"),
        ]);
        assert_eq!(r.order, ["f"]);
        assert_eq!(r.blocked["a"].to_string(), "dependency cycle: a -> b -> a");
        assert_eq!(r.blocked["b"].to_string(), "dependency cycle: a -> b -> a");
        assert_eq!(
            r.blocked["c"].to_string(),
            "dependency a cannot start: dependency cycle: a -> b -> a"
        );
        assert_eq!(
            r.blocked["d"].to_string(),
            "dependency gone (^3) is not installed"
        );
        assert_eq!(
            r.blocked["e"].to_string(),
            "dependency f is version 1.9.0, which does not satisfy ^2"
        );
        assert_eq!(
            r.blocked["g"].to_string(),
            "dependency f is version 1.9.0, which does not satisfy ^2"
        );
    }
}
