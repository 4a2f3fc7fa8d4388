//! `corral plugin`: keys and signatures, archives and indexes, installs.

use super::exit::{self, Failure, Outcome};
use super::output::print_json;
use super::{PluginCommand, parse_trust};
use crate::Config;
use crate::plugins::{install, signing, vendor};
use anyhow::Context;

/// The largest key file read (a key is 64 hex digits and a newline).
const MAX_KEY_FILE: u64 = 4 << 10;

pub(super) async fn plugin_command(cmd: PluginCommand) -> Outcome {
    let fail = |e: &dyn std::fmt::Display| -> Outcome { Err(Failure::invalid(e).into()) };
    match cmd {
        PluginCommand::Keygen { out, json } => {
            let (secret, public) = signing::keygen()?;
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return fail(&format!(
                        "{} already exists; a key is never overwritten",
                        out.display()
                    ));
                }
                Err(e) => return fail(&format!("cannot create {}: {e}", out.display())),
            };
            writeln!(f, "{secret}")?;
            if json {
                print_json(&serde_json::json!({
                    "ok": true, "secret_key_file": out.display().to_string(), "public_key": public,
                }))?;
            } else {
                println!("secret key: {} (keep it private)", out.display());
                println!("public key: {public}");
            }
            Ok(exit::OK)
        }
        PluginCommand::Sign {
            dir,
            key,
            publisher,
            json,
        } => {
            // A key file is 64 hex digits: a larger one, a FIFO or a device is not
            // a key, and says so rather than being cut or waited on.
            let secret = corral_files::read_regular_string(&key, MAX_KEY_FILE)
                .with_context(|| format!("cannot read the key {}", key.display()))?;
            match signing::sign(&dir, &publisher, &secret) {
                Ok(n) => {
                    let public = signing::public_of(&secret)?;
                    if json {
                        print_json(&serde_json::json!({
                            "ok": true, "dir": dir.display().to_string(), "files": n,
                            "publisher": publisher, "public_key": public,
                        }))?;
                    } else {
                        println!(
                            "signed {n} files of {} as {publisher} (public key {public})",
                            dir.display(),
                        );
                    }
                    Ok(exit::OK)
                }
                Err(e) => fail(&e),
            }
        }
        PluginCommand::Verify {
            dir,
            trust,
            config,
            json,
        } => {
            let mut trusted = std::collections::BTreeMap::new();
            if let Some(c) = &config {
                match Config::load(c) {
                    Ok(c) => trusted.extend(c.options.publishers),
                    Err(e) => return fail(&corral_protocol::error_chain(&e)),
                }
            }
            match parse_trust(&trust) {
                Ok(t) => trusted.extend(t),
                Err(e) => return fail(&e),
            }
            match signing::verify(&dir, &trusted) {
                Ok(Some(publisher)) => {
                    if json {
                        print_json(&serde_json::json!({
                            "ok": true, "dir": dir.display().to_string(), "publisher": publisher,
                        }))?;
                    } else {
                        println!("verified: signed by {publisher}: {}", dir.display());
                    }
                    Ok(exit::OK)
                }
                Ok(None) => fail(&format!(
                    "unsigned: no {} in {}",
                    signing::SIG_FILE,
                    dir.display()
                )),
                Err(e) => fail(&e),
            }
        }
        PluginCommand::Pack { dir, out, json } => match install::pack(&dir, &out) {
            Ok(sum) => {
                if json {
                    print_json(&serde_json::json!({
                        "ok": true, "archive": out.display().to_string(), "sha256": sum,
                    }))?;
                } else {
                    println!("{}  sha256 {sum}", out.display());
                }
                Ok(exit::OK)
            }
            Err(e) => fail(&corral_protocol::error_chain(&e)),
        },
        PluginCommand::Vendor {
            dir,
            allow_scripts,
            python,
            npm,
            worker_dir,
            json,
        } => {
            let opts = vendor::VendorOptions {
                allow_scripts,
                python,
                npm,
                worker_dir: worker_dir.unwrap_or_else(|| crate::Options::new().worker_dir),
            };
            let done = match tokio::task::spawn_blocking(move || {
                vendor::vendor(&dir, &opts).map(|v| (v, dir))
            })
            .await?
            {
                Ok(v) => v,
                Err(e) => return fail(&corral_protocol::error_chain(&e)),
            };
            let (v, dir) = done;
            if json {
                print_json(&serde_json::json!({
                    "ok": true,
                    "into": dir.join(&v.lock.into).display().to_string(),
                    "tool": v.lock.tool.to_string(),
                    "packages": v.lock.packages.iter().map(|p| serde_json::json!({
                        "name": p.name, "version": p.version, "hash": p.hash,
                        "install_scripts": p.install_scripts,
                    })).collect::<Vec<_>>(),
                    "libraries": v.libraries.iter().map(|l| serde_json::json!({
                        "path": l.path.display().to_string(), "needed_by": l.needed_by,
                    })).collect::<Vec<_>>(),
                    "warnings": v.warnings,
                    "lock": dir.join(vendor::LOCK_FILE).display().to_string(),
                }))?;
                return Ok(exit::OK);
            }
            println!(
                "vendored {} packages into {} with {}:",
                v.lock.packages.len(),
                dir.join(&v.lock.into).display(),
                v.lock.tool
            );
            for p in &v.lock.packages {
                println!(
                    "  {} {}{}{}",
                    p.name,
                    p.version,
                    p.hash
                        .as_ref()
                        .map(|h| format!("  {h}"))
                        .unwrap_or_default(),
                    if p.install_scripts {
                        "  (ran its install scripts)"
                    } else {
                        ""
                    }
                );
            }
            if !v.libraries.is_empty() {
                println!(
                    "their compiled extensions need {} system libraries, which the worker \
                     will be allowed to read:",
                    v.libraries.len()
                );
                for l in &v.libraries {
                    println!("  {} (needed by {})", l.path.display(), l.needed_by);
                }
            }
            for w in &v.warnings {
                println!("warning: {w}");
            }
            println!("wrote {}", dir.join(vendor::LOCK_FILE).display());
            Ok(exit::OK)
        }
        PluginCommand::Index { dir, json } => match install::index(&dir) {
            Ok(done) if json => {
                let entry = |e: &install::IndexEntry| {
                    serde_json::json!({
                        "id": e.id, "version": e.version.to_string(), "archive": e.archive,
                        "sha256": e.sha256,
                    })
                };
                print_json(&serde_json::json!({
                    "ok": true,
                    "index": dir.join(install::INDEX_FILE).display().to_string(),
                    "entries": done.entries.iter().map(entry).collect::<Vec<_>>(),
                    "kept": done.kept.iter().map(entry).collect::<Vec<_>>(),
                    "dropped": done.dropped.iter().map(entry).collect::<Vec<_>>(),
                }))?;
                Ok(exit::OK)
            }
            Ok(done) => {
                for e in &done.entries {
                    println!("{} {}  {}  sha256 {}", e.id, e.version, e.archive, e.sha256);
                }
                for e in &done.kept {
                    println!(
                        "{} {}  {}  (kept from the previous index)",
                        e.id, e.version, e.archive
                    );
                }
                for e in &done.dropped {
                    println!(
                        "{} {}  {}  DROPPED: the archive is gone",
                        e.id, e.version, e.archive
                    );
                }
                println!(
                    "wrote {} ({} entries)",
                    dir.join(install::INDEX_FILE).display(),
                    done.entries.len() + done.kept.len()
                );
                Ok(exit::OK)
            }
            Err(e) => fail(&corral_protocol::error_chain(&e)),
        },
        PluginCommand::Install {
            source,
            index,
            sha256,
            allow_unsigned,
            place,
            json,
        } => {
            let (dir, publishers) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            let source = match index {
                Some(index) => {
                    let (id, req) = source.split_once('@').unwrap_or((&source, "*"));
                    match semver::VersionReq::parse(req) {
                        Ok(req) => install::Source::Index {
                            index,
                            id: id.to_owned(),
                            req,
                        },
                        Err(e) => return fail(&format!("{source}: bad version requirement: {e}")),
                    }
                }
                None => install::Source::Archive(source),
            };
            let checks = install::Checks {
                publishers,
                allow_unsigned,
                sha256,
            };
            match install::install(&source, &dir, &checks).await {
                Ok(i) if json => {
                    print_json(&serde_json::json!({
                        "ok": true, "id": i.id, "version": i.version.to_string(),
                        "publisher": i.publisher, "dir": i.dir.display().to_string(),
                        "replaced": i.replaced.as_ref().map(|v| v.to_string()),
                    }))?;
                    Ok(exit::OK)
                }
                Ok(i) => {
                    println!(
                        "installed {} {} ({}) in {}{}",
                        i.id,
                        i.version,
                        i.publisher
                            .as_ref()
                            .map_or("unsigned".to_owned(), |p| format!("signed by {p}")),
                        i.dir.display(),
                        i.replaced
                            .as_ref()
                            .map_or(String::new(), |v| format!(", replacing {v}")),
                    );
                    Ok(exit::OK)
                }
                Err(e) => fail(&format!(
                    "{}; nothing was installed",
                    corral_protocol::error_chain(&e)
                )),
            }
        }
        PluginCommand::Remove { id, place, json } => {
            let (dir, _) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match install::remove(&dir, &id) {
                Ok(version) => {
                    if json {
                        print_json(&serde_json::json!({
                            "ok": true, "id": id, "version": version.to_string(),
                            "plugins_dir": dir.display().to_string(),
                        }))?;
                    } else {
                        println!("removed {id} {version} from {}", dir.display());
                    }
                    Ok(exit::OK)
                }
                Err(e @ install::InstallError::NotInstalled { .. }) => {
                    Err(Failure::new(exit::NOT_FOUND, e).into())
                }
                Err(e) => fail(&corral_protocol::error_chain(&e)),
            }
        }
        PluginCommand::List { place, json } => {
            let (dir, publishers) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match install::list(&dir, &publishers) {
                Ok(list) if json => {
                    let v: Vec<serde_json::Value> = list
                        .iter()
                        .map(|l| match &l.plugin {
                            Ok((id, version, runtime)) => serde_json::json!({
                                "dir": l.dir.display().to_string(), "valid": true,
                                "id": id, "version": version.to_string(),
                                "runtime": runtime.to_string(),
                                "signature": l.signature.to_string(),
                            }),
                            Err(e) => serde_json::json!({
                                "dir": l.dir.display().to_string(), "valid": false,
                                "error": e.to_string(),
                            }),
                        })
                        .collect();
                    print_json(&serde_json::Value::Array(v))?;
                    Ok(exit::OK)
                }
                Ok(list) => {
                    for l in list {
                        match &l.plugin {
                            Ok((id, version, runtime)) => {
                                println!("{id:<20} {version:<10} {runtime:<7} {}", l.signature)
                            }
                            Err(e) => println!("{}: INVALID: {e}", l.dir.display()),
                        }
                    }
                    Ok(exit::OK)
                }
                Err(e) => fail(&corral_protocol::error_chain(&e)),
            }
        }
    }
}
