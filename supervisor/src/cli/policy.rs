//! `corral policy check` and `corral policy explain` (without a daemon).

use super::exit::{self, Failure, Outcome};
use super::output;
use super::{PolicyCommand, policy_from};
use crate::Config;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn policy_command(cmd: PolicyCommand) -> Outcome {
    let configured = |config: Option<&Path>| -> anyhow::Result<Option<Config>> {
        let Some(path) = config else { return Ok(None) };
        Config::load(path)
            .map(Some)
            .map_err(|e| Failure::chain(exit::INVALID, &e).into())
    };
    match cmd {
        PolicyCommand::Check { path, config, json } => {
            let cfg = configured(config.as_deref())?;
            let path = path.or_else(|| cfg.and_then(|c| c.policy_path));
            let policy = match policy_from(path.as_deref(), None) {
                Ok(p) => p,
                Err(e) if json => {
                    output::print_json(&output::policy_errors_json(&e))?;
                    return Ok(exit::INVALID);
                }
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("policy check failed: {} error(s)", e.0.len());
                    return Ok(exit::INVALID);
                }
            };
            if json {
                output::print_json(&output::policy_json(&policy, path.is_none()))?;
                return Ok(exit::OK);
            }
            let mut out = std::io::stdout().lock();
            let files: Vec<String> = policy
                .sources
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            writeln!(
                out,
                "policy OK: {}{}",
                files.join(", "),
                if path.is_none() { " (built in)" } else { "" }
            )?;
            for level in corral_policy::LEVELS {
                let l = policy.level_limits(level);
                let show = |s: &Option<corral_policy::Setting<u64>>| {
                    s.as_ref()
                        .map_or("-".into(), |s| corral_policy::size(s.value))
                };
                writeln!(
                    out,
                    "  level {:<8} memory {}, cpu {}, pids {}, timeout {:?}, max_output {}, user {}",
                    level.as_str(),
                    show(&l.memory),
                    l.cpu.as_ref().map_or(0.0, |c| c.value),
                    l.pids.as_ref().map_or(0, |c| c.value),
                    l.timeout.as_ref().map_or(Duration::ZERO, |c| c.value),
                    show(&l.max_output),
                    l.user
                        .as_ref()
                        .map_or(String::new(), |u| u.value.to_string()),
                )?;
            }
            for r in &policy.routes {
                writeln!(out, "  route {:?} -> {} ({})", r.name, r.level, r.origin)?;
            }
            writeln!(out, "  unmatched plugins -> maximum")?;
            Ok(exit::OK)
        }
        PolicyCommand::Explain {
            plugin,
            policy,
            config,
            level,
            socket: _,
            json,
        } => {
            let cfg = configured(config.as_deref())?;
            let dir = PathBuf::from(&plugin);
            let manifest = if dir.join(corral_manifest::MANIFEST_FILE).is_file() {
                corral_manifest::Manifest::load_dir(&dir)
            } else {
                let found = cfg.as_ref().and_then(|c| {
                    c.plugins.iter().find_map(|d| {
                        corral_manifest::Manifest::load_dir(d)
                            .ok()
                            .filter(|m| m.id == plugin)
                    })
                });
                match found {
                    Some(m) => Ok(m),
                    None => {
                        let why = format!(
                            "{plugin:?} is neither a plugin directory nor the id of a \
                             plugin in {}",
                            config
                                .as_ref()
                                .map_or("a --config file (none given)".into(), |c| c
                                    .display()
                                    .to_string())
                        );
                        return Err(Failure::new(exit::NOT_FOUND, why).into());
                    }
                }
            };
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    return Err(Failure::new(exit::INVALID, format!("{e}")).into());
                }
            };
            let path = policy.or_else(|| cfg.and_then(|c| c.policy_path));
            let policy = match policy_from(path.as_deref(), level) {
                Ok(p) => p,
                Err(e) => {
                    return Err(Failure::new(exit::INVALID, format!("invalid policy:\n{e}")).into());
                }
            };
            let effective = policy.resolve(&manifest, None);
            if json {
                output::print_json(&output::effective_json(&effective))?;
            } else {
                print!("{effective}");
            }
            Ok(exit::OK)
        }
    }
}
