//! The daemon's configuration file (`corral serve --config F`).
//!
//! ```toml
//! # Plugin directories, relative to this file.
//! plugins = ["hello-wasm"]
//! # Optional: control socket, module cache, worker binaries.
//! socket = "/run/corral/control.sock"
//! cache_dir = "/var/cache/corral"
//! worker_dir = "/usr/libexec/corral"
//! # Policy files (a directory of *.toml or one file) that route plugins to isolation
//! # levels; reloaded live. Default: the shipped policy, compiled in.
//! policy = "/etc/corral/policies"
//!
//! [restart]
//! max_crashes = 5
//! window = "60s"
//! ```
//!
//! Unknown keys are errors; errors name the file, line and column.

use crate::supervisor::{Options, RestartPolicy};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::path::{Path, PathBuf};

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
struct RawConfig {
    plugins: Vec<String>,
    socket: Option<String>,
    cache_dir: Option<String>,
    worker_dir: Option<String>,
    policy: Option<String>,
    #[serde(default)]
    restart: RawRestart,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    max_crashes: Option<u32>,
    window: Option<Spanned<String>>,
}

/// A loaded daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute plugin directories.
    pub plugins: Vec<PathBuf>,
    pub socket: Option<PathBuf>,
    /// Where the policy was read from (`None`: the built-in policy); watched for edits.
    pub policy_path: Option<PathBuf>,
    pub options: Options,
}

impl Config {
    /// Load the configured policy into `self.options` (a separate step so that
    /// `corral policy check` can report the policy's own errors).
    pub fn load_policy(&mut self) -> Result<(), corral_policy::PolicyErrors> {
        if let Some(p) = &self.policy_path {
            self.options.policy = std::sync::Arc::new(corral_policy::Policy::load(p)?);
        }
        Ok(())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = corral_manifest::line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| invalid(e.span(), e.message().to_owned()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| base.join(p);
        let mut options = Options::new();
        if let Some(d) = &raw.cache_dir {
            options.cache_dir = Some(resolve(d));
        }
        if let Some(d) = &raw.worker_dir {
            options.worker_dir = resolve(d);
        }
        let mut restart = RestartPolicy::default();
        if let Some(n) = raw.restart.max_crashes {
            restart.max_crashes = n.max(1);
        }
        if let Some(w) = &raw.restart.window {
            restart.window = corral_manifest::parse_duration(w.get_ref())
                .map_err(|m| invalid(Some(w.span()), m))?;
        }
        options.restart = restart;
        Ok(Config {
            plugins: raw.plugins.iter().map(|p| resolve(p)).collect(),
            socket: raw.socket.as_deref().map(resolve),
            policy_path: raw.policy.as_deref().map(resolve),
            options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_the_config_file() {
        let c = Config::parse(
            "plugins = [\"a\", \"/abs/b\"]\nsocket = \"s.sock\"\n[restart]\nwindow = \"2s\"\n",
            Path::new("/etc/corral/corral.toml"),
        )
        .unwrap();
        assert_eq!(
            c.plugins,
            [PathBuf::from("/etc/corral/a"), PathBuf::from("/abs/b")]
        );
        assert_eq!(c.socket.unwrap(), Path::new("/etc/corral/s.sock"));
        assert_eq!(c.options.restart.window, std::time::Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_line_and_column() {
        let e = Config::parse("plugins = []\nsockt = \"x\"\n", Path::new("c.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("c.toml:2:1: unknown field `sockt`"),
            "{msg}"
        );
        let e = Config::parse(
            "plugins = []\n[restart]\nwindow = \"soon\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("c.toml:3:10: invalid duration"),
            "{e}"
        );
    }
}
