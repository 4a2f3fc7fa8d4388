//! The `corral` command line. `main` parses [`Cli`] and calls [`run`].

use crate::control::{ControlClient, ControlServer, default_socket_path};
use crate::{Config, Options, Supervisor};
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use corral_protocol::{CallError, ControlRequest, ControlResponse, PluginInfo};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Documented exit codes of `corral`.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Any other failure (I/O, internal error).
    pub const FAILURE: u8 = 1;
    /// Command-line usage error (from clap).
    pub const USAGE: u8 = 2;
    /// The plugin function ran and returned an error of its own.
    pub const PLUGIN_ERROR: u8 = 3;
    /// The call was stopped: trap, deadline, memory limit or output limit.
    pub const CALL_STOPPED: u8 = 4;
    /// The worker crashed, could not start, or the plugin is marked failed.
    pub const WORKER_FAILED: u8 = 5;
    /// Unknown plugin or function.
    pub const NOT_FOUND: u8 = 6;
    /// Invalid input, manifest or configuration.
    pub const INVALID: u8 = 7;
    /// The daemon could not be reached.
    pub const UNREACHABLE: u8 = 8;
    /// The plugin is overloaded or the supervisor is shutting down; retry later.
    pub const UNAVAILABLE: u8 = 9;
}

/// Map a call error to its exit code.
pub fn exit_code_for(e: &CallError) -> u8 {
    match e {
        CallError::Plugin { .. } => exit::PLUGIN_ERROR,
        CallError::Trap { .. }
        | CallError::Timeout { .. }
        | CallError::MemoryLimit { .. }
        | CallError::OutputTooLarge { .. } => exit::CALL_STOPPED,
        CallError::WorkerCrashed(_)
        | CallError::PluginFailed { .. }
        | CallError::StartFailed { .. } => exit::WORKER_FAILED,
        CallError::UnknownPlugin { .. } | CallError::UnknownFunction { .. } => exit::NOT_FOUND,
        CallError::BadInput { .. } => exit::INVALID,
        CallError::Overloaded { .. } | CallError::ShuttingDown => exit::UNAVAILABLE,
    }
}

/// Short machine-readable name of a call error (the `kind` in `--json` output).
pub fn error_kind(e: &CallError) -> &'static str {
    match e {
        CallError::Plugin { .. } => "plugin_error",
        CallError::Trap { .. } => "trap",
        CallError::Timeout { .. } => "timeout",
        CallError::MemoryLimit { .. } => "memory_limit",
        CallError::OutputTooLarge { .. } => "output_too_large",
        CallError::WorkerCrashed(_) => "worker_crashed",
        CallError::PluginFailed { .. } => "plugin_failed",
        CallError::StartFailed { .. } => "start_failed",
        CallError::UnknownPlugin { .. } => "unknown_plugin",
        CallError::UnknownFunction { .. } => "unknown_function",
        CallError::BadInput { .. } => "bad_input",
        CallError::Overloaded { .. } => "overloaded",
        CallError::ShuttingDown => "shutting_down",
    }
}

/// Corral runs untrusted WebAssembly, JavaScript and Python plugins in confined
/// worker processes.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `corral=debug`.
    #[arg(long, global = true, env = "CORRAL_LOG", default_value = "warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one function of the plugin in a directory, without a daemon.
    Run {
        /// Directory holding plugin.toml.
        plugin_dir: PathBuf,
        function: String,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        out: OutputArgs,
        /// Directory of the worker binaries (default: beside `corral`).
        #[arg(long, env = "CORRAL_WORKER_DIR")]
        worker_dir: Option<PathBuf>,
        /// Module cache directory (default: ~/.cache/corral).
        #[arg(long, env = "CORRAL_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
        /// Policy files (directory or file) routing the plugin to its level. Default:
        /// the shipped policy, compiled in.
        #[arg(long, env = "CORRAL_POLICY")]
        policy: Option<PathBuf>,
        /// Run at this level whatever the policy routes (the level's limits still
        /// come from the policy).
        #[arg(long, value_parser = parse_level)]
        level: Option<corral_confine::Level>,
    },
    /// Run the daemon: load the configured plugins and serve the control socket.
    Serve {
        /// Daemon configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Control socket (overrides the configuration).
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Call a function of a plugin in the running daemon.
    Call {
        plugin: String,
        function: String,
        #[command(flatten)]
        input: InputArgs,
        #[command(flatten)]
        out: OutputArgs,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Show each plugin's state and what its worker really enforces.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// List the daemon's plugins and their state.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Ask the daemon to shut down gracefully.
    Stop {
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Check policy files and explain what they decide for a plugin.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Sign plugins and verify their signatures.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Make an ed25519 key pair for signing plugins: the secret key is written to
    /// OUT (mode 0600, never overwritten), the public key printed for operators'
    /// `[publishers]`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a plugin directory as PUBLISHER: writes `plugin.sig`, which covers every
    /// file in it.
    Sign {
        dir: PathBuf,
        /// The secret key file from `corral plugin keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        publisher: String,
    },
    /// Verify a plugin directory's signature against trusted publisher keys
    /// (`--trust NAME=KEY`, and the `[publishers]` of `--config`). Unsigned and
    /// tampered plugins fail (exit code 7), naming the file.
    Verify {
        dir: PathBuf,
        #[arg(long = "trust", value_name = "NAME=KEY")]
        trust: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a plugin archive (.tar.gz) of a plugin directory and print its SHA-256
    /// (for an index's `sha256`).
    Pack {
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write DIR/index.toml for the plugin archives in DIR (*.tar.gz, *.tgz): id,
    /// version, archive and SHA-256 of each, read with the checks of an install.
    /// Entries of an existing index at a URL or in a subdirectory are kept.
    Index { dir: PathBuf },
    /// Install a plugin into the plugins directory from an archive (a path or an
    /// http(s) URL) or, with `--index`, by id (`ID` or `ID@REQ`, a semver
    /// requirement). Checks the checksum, the archive, the manifest and the
    /// signature; a failed install leaves nothing behind. A running daemon watching
    /// the directory loads it (or hot-reloads the version it replaces).
    Install {
        /// An archive, or with --index a plugin id (`hello-js`, `hello-js@^0.2`).
        source: String,
        /// An index: a directory holding index.toml, an index.toml, or a URL.
        #[arg(long)]
        index: Option<String>,
        /// The archive's expected SHA-256 (a bare archive; an index gives its own).
        #[arg(long)]
        sha256: Option<String>,
        /// Install a plugin that has no plugin.sig.
        #[arg(long)]
        allow_unsigned: bool,
        #[command(flatten)]
        place: PlaceArgs,
    },
    /// Remove an installed plugin from the plugins directory (a running daemon drains
    /// its calls and unloads it).
    Remove {
        id: String,
        #[command(flatten)]
        place: PlaceArgs,
    },
    /// List the plugins in the plugins directory with their signature status.
    List {
        #[command(flatten)]
        place: PlaceArgs,
    },
}

/// Which plugins directory, and whom to trust.
#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// The plugins directory (default: `plugins_dir` of --config).
    #[arg(long, env = "CORRAL_PLUGINS_DIR")]
    plugins_dir: Option<PathBuf>,
    /// The daemon configuration: its `plugins_dir` and `[publishers]`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Trust a publisher key in addition to the configuration's.
    #[arg(long = "trust", value_name = "NAME=KEY")]
    trust: Vec<String>,
}

impl PlaceArgs {
    /// The plugins directory and the trusted publishers.
    fn resolve(&self) -> Result<(PathBuf, std::collections::BTreeMap<String, String>), String> {
        let config = match &self.config {
            Some(c) => Some(Config::load(c).map_err(|e| crate::supervisor::error_chain(&e))?),
            None => None,
        };
        let dir = self
            .plugins_dir
            .clone()
            .or_else(|| config.as_ref().and_then(|c| c.plugins_dir.clone()))
            .ok_or("no plugins directory: pass --plugins-dir, or --config with plugins_dir")?;
        let mut trusted = config.map(|c| c.options.publishers).unwrap_or_default();
        trusted.extend(parse_trust(&self.trust)?);
        Ok((dir, trusted))
    }
}

/// `--trust NAME=KEY` arguments.
fn parse_trust(args: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    args.iter()
        .map(|t| {
            t.split_once('=')
                .map(|(n, k)| (n.to_owned(), k.trim().to_ascii_lowercase()))
                .ok_or_else(|| format!("--trust {t:?}: expected NAME=KEY"))
        })
        .collect()
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files: every error with file, line, column and the valid
    /// choices. PATH is a policy directory or file; default: the one `--config` names,
    /// else the built-in policy.
    Check {
        path: Option<PathBuf>,
        /// Daemon configuration whose `policy` to check.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a plugin's effective policy and the file and line that set each value.
    Explain {
        /// A plugin directory, or the id of a plugin in `--config`.
        plugin: String,
        /// Policy directory or file (default: the one `--config` names, else built-in).
        #[arg(long, env = "CORRAL_POLICY")]
        policy: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// As `corral run --level`: route the plugin to this level.
        #[arg(long, value_parser = parse_level)]
        level: Option<corral_confine::Level>,
        /// Ask the running daemon at this control socket instead: the policy it has
        /// in force for one of its plugins (by id).
        #[arg(long, conflicts_with_all = ["policy", "config", "level"])]
        socket: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct InputArgs {
    /// Input as a string.
    #[arg(long)]
    input: Option<String>,
    /// Read the input from a file (`-` for standard input).
    #[arg(long)]
    input_file: Option<PathBuf>,
}

impl InputArgs {
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        match (&self.input, &self.input_file) {
            (Some(s), _) => Ok(s.clone().into_bytes()),
            (None, Some(p)) if p == Path::new("-") => {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                    .context("failed to read standard input")?;
                Ok(buf)
            }
            (None, Some(p)) => {
                std::fs::read(p).with_context(|| format!("failed to read {}", p.display()))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print a JSON object (`{"ok":true,"output":...}` or `{"ok":false,"error":...}`).
    #[arg(long)]
    json: bool,
    /// Per-call deadline, e.g. `500ms` or `10s` (default: the plugin's own).
    #[arg(long, value_parser = parse_timeout)]
    timeout: Option<Duration>,
}

fn parse_level(s: &str) -> Result<corral_confine::Level, String> {
    s.parse()
}

/// The policy named by `path` (else the built-in one), with a `--level` override.
fn policy_from(
    path: Option<&Path>,
    level: Option<corral_confine::Level>,
) -> Result<corral_policy::Policy, corral_policy::PolicyErrors> {
    let policy = match path {
        Some(p) => corral_policy::Policy::load(p)?,
        None => corral_policy::Policy::built_in(),
    };
    Ok(match level {
        Some(l) => policy.with_level(l, "--level on the command line"),
        None => policy,
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    corral_manifest::parse_duration(s)
}

/// Run the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                plugin_dir,
                function,
                input,
                out,
                worker_dir,
                cache_dir,
                policy,
                level,
            } => {
                let mut options = Options::new();
                match policy_from(policy.as_deref(), level) {
                    Ok(p) => options.policy = Arc::new(p),
                    Err(e) => {
                        eprintln!("error: invalid policy:\n{e}");
                        return Ok(exit::INVALID);
                    }
                }
                if let Some(d) = worker_dir {
                    options.worker_dir = d;
                }
                if let Some(d) = cache_dir {
                    options.cache_dir = Some(d);
                }
                let mut sup = Supervisor::new(options);
                let id = match sup.add_plugin_dir(&plugin_dir) {
                    Ok(id) => id,
                    Err(e) => {
                        eprintln!("error: {}", crate::supervisor::error_chain(&e));
                        return Ok(exit::INVALID);
                    }
                };
                let bytes = input.read()?;
                let result = sup.call(&id, &function, bytes, out.timeout).await;
                sup.shutdown(Duration::from_secs(2)).await;
                print_result(result, out.json)
            }
            Command::Serve { config, socket } => serve(&config, socket).await,
            Command::Call {
                plugin,
                function,
                input,
                out,
                socket,
            } => {
                let bytes = input.read()?;
                let req = ControlRequest::Call {
                    plugin,
                    function,
                    input: bytes,
                    timeout_ms: out.timeout.map(|t| t.as_millis() as u64),
                };
                match request(socket, &req).await? {
                    Err(code) => Ok(code),
                    Ok(ControlResponse::Called(result)) => print_result(result, out.json),
                    Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
                }
            }
            Command::List { json, socket } => match request(socket, &ControlRequest::List).await? {
                Err(code) => Ok(code),
                Ok(ControlResponse::Plugins(plugins)) => {
                    print_plugins(&plugins, json)?;
                    Ok(exit::OK)
                }
                Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
            },
            Command::Status { json, socket } => {
                let policy = match request(socket.clone(), &ControlRequest::Policy).await? {
                    Err(code) => return Ok(code),
                    Ok(ControlResponse::Policy(p)) => p,
                    Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
                };
                match request(socket, &ControlRequest::List).await? {
                    Err(code) => Ok(code),
                    Ok(ControlResponse::Plugins(plugins)) if json => {
                        print_plugins(&plugins, true)?;
                        Ok(exit::OK)
                    }
                    Ok(ControlResponse::Plugins(plugins)) => {
                        print_status(&policy, &plugins)?;
                        Ok(exit::OK)
                    }
                    Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
                }
            }
            Command::Policy(PolicyCommand::Explain {
                plugin,
                socket: Some(socket),
                ..
            }) => match request(Some(socket), &ControlRequest::Explain { plugin }).await? {
                Err(code) => Ok(code),
                Ok(ControlResponse::Explained(Ok(text))) => {
                    print!("{text}");
                    Ok(exit::OK)
                }
                Ok(ControlResponse::Explained(Err(why))) => {
                    eprintln!("error: {why}");
                    Ok(exit::NOT_FOUND)
                }
                Ok(other) => bail!("unexpected answer from the daemon: {other:?}"),
            },
            Command::Policy(cmd) => policy_command(cmd),
            Command::Plugin(cmd) => plugin_command(cmd).await,
            Command::Stop { socket } => match request(socket, &ControlRequest::Shutdown).await? {
                Err(code) => Ok(code),
                Ok(_) => Ok(exit::OK),
            },
        }
    })
}

async fn plugin_command(cmd: PluginCommand) -> anyhow::Result<u8> {
    use crate::signing;
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        Ok(exit::INVALID)
    };
    match cmd {
        PluginCommand::Keygen { out } => {
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
            println!("secret key: {} (keep it private)", out.display());
            println!("public key: {public}");
            Ok(exit::OK)
        }
        PluginCommand::Sign {
            dir,
            key,
            publisher,
        } => {
            let secret = std::fs::read_to_string(&key)
                .with_context(|| format!("cannot read the key {}", key.display()))?;
            match signing::sign(&dir, &publisher, &secret) {
                Ok(n) => {
                    println!(
                        "signed {n} files of {} as {publisher} (public key {})",
                        dir.display(),
                        signing::public_of(&secret)?
                    );
                    Ok(exit::OK)
                }
                Err(e) => fail(&e),
            }
        }
        PluginCommand::Verify { dir, trust, config } => {
            let mut trusted = std::collections::BTreeMap::new();
            if let Some(c) = &config {
                match Config::load(c) {
                    Ok(c) => trusted.extend(c.options.publishers),
                    Err(e) => return fail(&crate::supervisor::error_chain(&e)),
                }
            }
            match parse_trust(&trust) {
                Ok(t) => trusted.extend(t),
                Err(e) => return fail(&e),
            }
            match signing::verify(&dir, &trusted) {
                Ok(Some(publisher)) => {
                    println!("verified: signed by {publisher}: {}", dir.display());
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
        PluginCommand::Pack { dir, out } => match crate::install::pack(&dir, &out) {
            Ok(sum) => {
                println!("{}  sha256 {sum}", out.display());
                Ok(exit::OK)
            }
            Err(e) => fail(&crate::supervisor::error_chain(&e)),
        },
        PluginCommand::Index { dir } => match crate::install::index(&dir) {
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
                    dir.join(crate::install::INDEX_FILE).display(),
                    done.entries.len() + done.kept.len()
                );
                Ok(exit::OK)
            }
            Err(e) => fail(&crate::supervisor::error_chain(&e)),
        },
        PluginCommand::Install {
            source,
            index,
            sha256,
            allow_unsigned,
            place,
        } => {
            let (dir, publishers) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            let source = match index {
                Some(index) => {
                    let (id, req) = source.split_once('@').unwrap_or((&source, "*"));
                    match semver::VersionReq::parse(req) {
                        Ok(req) => crate::install::Source::Index {
                            index,
                            id: id.to_owned(),
                            req,
                        },
                        Err(e) => return fail(&format!("{source}: bad version requirement: {e}")),
                    }
                }
                None => crate::install::Source::Archive(source),
            };
            let checks = crate::install::Checks {
                publishers,
                allow_unsigned,
                sha256,
            };
            match crate::install::install(&source, &dir, &checks).await {
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
                    crate::supervisor::error_chain(&e)
                )),
            }
        }
        PluginCommand::Remove { id, place } => {
            let (dir, _) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match crate::install::remove(&dir, &id) {
                Ok(version) => {
                    println!("removed {id} {version} from {}", dir.display());
                    Ok(exit::OK)
                }
                Err(e @ crate::install::InstallError::NotInstalled { .. }) => {
                    eprintln!("error: {e}");
                    Ok(exit::NOT_FOUND)
                }
                Err(e) => fail(&crate::supervisor::error_chain(&e)),
            }
        }
        PluginCommand::List { place } => {
            let (dir, publishers) = match place.resolve() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match crate::install::list(&dir, &publishers) {
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
                Err(e) => fail(&crate::supervisor::error_chain(&e)),
            }
        }
    }
}

fn policy_command(cmd: PolicyCommand) -> anyhow::Result<u8> {
    let configured = |config: Option<&Path>| -> Result<Option<Config>, u8> {
        let Some(path) = config else { return Ok(None) };
        Config::load(path).map(Some).map_err(|e| {
            eprintln!("error: {}", crate::supervisor::error_chain(&e));
            exit::INVALID
        })
    };
    match cmd {
        PolicyCommand::Check { path, config } => {
            let cfg = match configured(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let path = path.or_else(|| cfg.and_then(|c| c.policy_path));
            let policy = match policy_from(path.as_deref(), None) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("policy check failed: {} error(s)", e.0.len());
                    return Ok(exit::INVALID);
                }
            };
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
        } => {
            let cfg = match configured(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
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
                        eprintln!(
                            "error: {plugin:?} is neither a plugin directory nor the id of a \
                             plugin in {}",
                            config
                                .as_ref()
                                .map_or("a --config file (none given)".into(), |c| c
                                    .display()
                                    .to_string())
                        );
                        return Ok(exit::NOT_FOUND);
                    }
                }
            };
            let manifest = match manifest {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(exit::INVALID);
                }
            };
            let path = policy.or_else(|| cfg.and_then(|c| c.policy_path));
            let policy = match policy_from(path.as_deref(), level) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: invalid policy:\n{e}");
                    return Ok(exit::INVALID);
                }
            };
            print!("{}", policy.resolve(&manifest, None));
            Ok(exit::OK)
        }
    }
}

async fn serve(config_path: &Path, socket: Option<PathBuf>) -> anyhow::Result<u8> {
    let mut config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", crate::supervisor::error_chain(&e));
            return Ok(exit::INVALID);
        }
    };
    if let Err(e) = config.load_policy() {
        eprintln!("error: invalid policy:\n{e}");
        return Ok(exit::INVALID);
    }
    let mut sup = Supervisor::new(config.options.clone());
    for dir in &config.plugins {
        match sup.add_plugin_dir(dir) {
            Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin added"),
            Err(e) => {
                eprintln!("error: {}", crate::supervisor::error_chain(&e));
                return Ok(exit::INVALID);
            }
        }
    }
    let sources = crate::reload::PluginSources {
        dirs: config.plugins.clone(),
        plugins_dir: config.plugins_dir.clone(),
    };
    if let Some(d) = &config.plugins_dir {
        std::fs::create_dir_all(d)
            .with_context(|| format!("cannot create the plugins directory {}", d.display()))?;
        // A broken plugin in the directory is reported and skipped; the others run.
        let found = crate::lifecycle::discover(d)
            .with_context(|| format!("cannot read the plugins directory {}", d.display()))?;
        for dir in found {
            match sup.add_plugin_dir(&dir) {
                Ok(id) => tracing::info!(plugin = %id, dir = %dir.display(), "plugin found"),
                Err(e) => {
                    sup.record_rejection(&dir, crate::supervisor::error_chain(&e))
                        .await
                }
            }
        }
    }
    let socket = socket
        .or(config.socket.clone())
        .unwrap_or_else(default_socket_path);
    let server = ControlServer::bind(&socket)
        .await
        .with_context(|| format!("failed to serve {}", socket.display()))?;
    let sup = Arc::new(sup);
    let _plugins_watcher = if config.watch {
        Some(
            crate::reload::watch_plugins(sources, Arc::clone(&sup))
                .context("cannot watch the plugin directories")?,
        )
    } else {
        None
    };
    let _watcher = match config.policy_path.as_ref().filter(|_| config.watch) {
        Some(p) => Some(
            crate::reload::watch_policy(p, Arc::clone(&sup))
                .with_context(|| format!("cannot watch the policy {}", p.display()))?,
        ),
        None => None,
    };
    let stop = Arc::new(Notify::new());
    let signals = Arc::clone(&stop);
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        signals.notify_one();
    });
    eprintln!(
        "corral: serving {} plugin(s) on {}",
        sup.list().await.len(),
        server.path().display()
    );
    server.serve(Arc::clone(&sup), stop).await;
    eprintln!("corral: shutting down");
    sup.shutdown(Duration::from_secs(5)).await;
    Ok(exit::OK)
}

/// Send one request to the daemon; `Err(code)` when it cannot be reached.
async fn request(
    socket: Option<PathBuf>,
    req: &ControlRequest,
) -> anyhow::Result<Result<ControlResponse, u8>> {
    let path = socket.unwrap_or_else(default_socket_path);
    let mut client = match ControlClient::connect(&path).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", crate::supervisor::error_chain(&e));
            return Ok(Err(exit::UNREACHABLE));
        }
    };
    match client
        .request(req)
        .await
        .context("the daemon did not answer")?
    {
        ControlResponse::Rejected(why) => bail!("the daemon rejected the request: {why}"),
        resp => Ok(Ok(resp)),
    }
}

fn print_result(result: Result<Vec<u8>, CallError>, json: bool) -> anyhow::Result<u8> {
    let mut stdout = std::io::stdout().lock();
    match (result, json) {
        (Ok(out), false) => {
            stdout.write_all(&out)?;
            // Exact bytes into pipes and files; a final newline only for a terminal.
            use std::io::IsTerminal;
            if stdout.is_terminal() && !out.ends_with(b"\n") && !out.is_empty() {
                stdout.write_all(b"\n")?;
            }
            Ok(exit::OK)
        }
        (Ok(out), true) => {
            let v = match String::from_utf8(out) {
                Ok(s) => serde_json::json!({ "ok": true, "output": s }),
                Err(e) => serde_json::json!({ "ok": true, "output_hex": hex(e.as_bytes()) }),
            };
            writeln!(stdout, "{v}")?;
            Ok(exit::OK)
        }
        (Err(e), false) => {
            eprintln!("error: {e}");
            Ok(exit_code_for(&e))
        }
        (Err(e), true) => {
            let v = serde_json::json!({
                "ok": false,
                "error": { "kind": error_kind(&e), "message": e.to_string() },
            });
            writeln!(stdout, "{v}")?;
            Ok(exit_code_for(&e))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn print_plugins(plugins: &[PluginInfo], json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let v: Vec<_> = plugins
            .iter()
            .map(|p| {
                serde_json::json!({
                    "id": p.id, "version": p.version, "runtime": p.runtime.as_str(),
                    "dir": p.dir, "level": p.level, "state": p.state, "pid": p.pid,
                    "restarts": p.restarts, "calls": p.calls, "last_error": p.last_error,
                    "exports": p.exports, "policy": p.policy,
                    "resources": p.resources.as_ref().map(resources_json),
                    "enforcement": p.enforcement.as_ref().map(enforcement_json),
                })
            })
            .collect();
        writeln!(stdout, "{}", serde_json::Value::Array(v))?;
        return Ok(());
    }
    writeln!(
        stdout,
        "{:<20} {:<9} {:<7} {:<8} {:<8} {:>7} {:>8} {:>6}  LAST ERROR",
        "PLUGIN", "VERSION", "RUNTIME", "LEVEL", "STATE", "PID", "RESTARTS", "CALLS"
    )?;
    for p in plugins {
        writeln!(
            stdout,
            "{:<20} {:<9} {:<7} {:<8} {:<8} {:>7} {:>8} {:>6}  {}",
            p.id,
            p.version,
            p.runtime.as_str(),
            p.level,
            p.state,
            p.pid.map_or("-".to_owned(), |p| p.to_string()),
            p.restarts,
            p.calls,
            p.last_error.as_deref().unwrap_or("-"),
        )?;
    }
    Ok(())
}

fn resources_line(r: &corral_protocol::ResourceStats) -> String {
    let mib = |b: Option<u64>| b.map_or("?".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let mut s = format!(
        "memory {} (peak {}, limit {}), cpu {}, pids {}/{}",
        mib(r.memory_current),
        mib(r.memory_peak),
        mib(r.memory_limit),
        r.cpu_usage_usec
            .map_or("?".into(), |u| format!("{:.3}s", u as f64 / 1e6)),
        r.pids_current.map_or("?".into(), |p| p.to_string()),
        r.pids_max.map_or("-".into(), |p| p.to_string()),
    );
    if let (Some(n), Some(t)) = (r.cpu_throttled_periods, r.cpu_throttled_usec) {
        s.push_str(&format!(", throttled {n} times ({:.3}s)", t as f64 / 1e6));
    }
    if r.oom_kills > 0 {
        s.push_str(&format!(", OOM kills {}", r.oom_kills));
    }
    s
}

fn resources_json(r: &corral_protocol::ResourceStats) -> serde_json::Value {
    serde_json::json!({
        "memory_current": r.memory_current, "memory_peak": r.memory_peak,
        "memory_limit": r.memory_limit, "cpu_usage_usec": r.cpu_usage_usec,
        "cpu_throttled_periods": r.cpu_throttled_periods,
        "cpu_throttled_usec": r.cpu_throttled_usec, "pids_current": r.pids_current,
        "pids_max": r.pids_max, "oom_kills": r.oom_kills,
    })
}

fn enforcement_json(r: &corral_protocol::EnforcementReport) -> serde_json::Value {
    use corral_protocol::Enforcement;
    let one = |e: &Enforcement| match e {
        Enforcement::Full(s) => serde_json::json!({"status": "full", "detail": s}),
        Enforcement::Partial(s) => serde_json::json!({"status": "partial", "detail": s}),
        Enforcement::None(s) => serde_json::json!({"status": "none", "detail": s}),
    };
    serde_json::json!({
        "cgroup": one(&r.cgroup), "landlock": one(&r.landlock), "seccomp": one(&r.seccomp),
        "namespaces": one(&r.namespaces), "no_new_privs": r.no_new_privs,
        "uid": r.uid, "gid": r.gid, "cap_effective": r.cap_effective,
        "cap_bounding": r.cap_bounding,
    })
}

fn print_status(
    policy: &corral_protocol::PolicyStatus,
    plugins: &[PluginInfo],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "policy: {}", policy.sources.join(", "))?;
    if let Some(e) = &policy.reload_error {
        writeln!(
            out,
            "policy reload REJECTED (the last good policy stays in force):"
        )?;
        for line in e.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for e in &policy.plugin_errors {
        writeln!(
            out,
            "plugin REJECTED (a running version keeps serving; fix the files to retry):"
        )?;
        for line in e.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    for p in plugins {
        writeln!(
            out,
            "{} {} ({}) {}{}, level {}, restarts {}, calls {}",
            p.id,
            p.version,
            p.runtime.as_str(),
            p.state,
            p.pid.map_or(String::new(), |pid| format!(" as pid {pid}")),
            p.level,
            p.restarts,
            p.calls,
        )?;
        writeln!(out, "  policy      {}", p.policy)?;
        match &p.enforcement {
            Some(r) => {
                writeln!(out, "  landlock    {}", r.landlock)?;
                writeln!(out, "  seccomp     {}", r.seccomp)?;
                writeln!(out, "  namespaces  {}", r.namespaces)?;
                writeln!(out, "  cgroup      {}", r.cgroup)?;
                let caps = |c: u64| {
                    if c == 0 {
                        "none".to_owned()
                    } else {
                        format!("{c:#x}")
                    }
                };
                writeln!(
                    out,
                    "  process     no_new_privs {}, uid {}, gid {}, capabilities {} (bounding set {})",
                    if r.no_new_privs { "on" } else { "off" },
                    r.uid,
                    r.gid,
                    caps(r.cap_effective),
                    caps(r.cap_bounding),
                )?;
            }
            None => writeln!(
                out,
                "  (no worker running: enforcement is reported at start)"
            )?,
        }
        if let Some(r) = &p.resources {
            writeln!(out, "  resources   {}", resources_line(r))?;
        }
        if let Some(e) = &p.last_error {
            writeln!(out, "  last error  {e}")?;
        }
    }
    Ok(())
}
