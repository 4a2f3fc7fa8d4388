//! The `corral` command line. `main` parses [`Cli`] and calls [`run`], which hands
//! each command to its file (one per command or group) and maps what it ends with
//! to an exit code in one place ([`exit::report`]).

mod client;
pub use corral_client::exit;
mod new;
pub mod one_line;
pub(crate) mod output;
mod plugin;
mod policy;
mod run;
mod test;

use crate::Config;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Corral runs untrusted WebAssembly, JavaScript and Python plugins in confined
/// worker processes.
#[derive(Debug, Parser)]
#[command(name = "corral", bin_name = "corral", version, about)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `corral=debug`.
    #[arg(long, global = true, env = "CORRAL_LOG", default_value = "warn")]
    pub log: String,
    /// Log lines as text, or as JSON objects one per line (default: the
    /// configuration's `log_format` for `serve`, else text).
    #[arg(long, global = true, env = "CORRAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one function of the plugin in a directory, without a daemon.
    Run(run::RunArgs),
    /// Write a new, working plugin to start from: two functions, the init and
    /// shutdown hooks, a use of the store, a README and test cases.
    New(new::NewArgs),
    /// Run a plugin's test cases (DIR/tests/*.toml) through a real supervisor,
    /// confined at its level, and check what its manifest asks for.
    Test(test::TestArgs),
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
    Call(corral_client::CallArgs),
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
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        #[arg(long, env = "CORRAL_SOCKET")]
        socket: Option<PathBuf>,
    },
    /// Check policy files and explain what they decide for a plugin.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Plugin files: keys and signatures, archives and installs, vendored dependencies.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Print a shell completion script, e.g. `corral completions bash >
    /// /usr/share/bash-completion/completions/corral`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page corral(1), or with `--out DIR` write one page per
    /// command into DIR (corral.1, corral-serve.1, ...).
    Man {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Make an ed25519 key pair for signing plugins: the secret key is written to
    /// OUT (mode 0600, never overwritten), the public key printed for operators'
    /// `[publishers]`.
    Keygen {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a plugin directory as PUBLISHER: writes `plugin.sig`, which covers every
    /// file in it.
    Sign {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
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
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        dir: PathBuf,
        #[arg(long = "trust", value_name = "NAME=KEY")]
        trust: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a plugin archive (.tar.gz) of a plugin directory and print its SHA-256
    /// (for an index's `sha256`).
    Pack {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Install a plugin's dependencies into its directory with its ecosystem's tool
    /// and record them in DIR/vendor.lock: Python, `requirements.txt` by pip into
    /// `site-packages/` (binary wheels for the Python worker's CPython only); JavaScript,
    /// `package.json` by npm into `node_modules/` (production dependencies, no
    /// links). Packages whose install runs scripts (a source build, an npm install
    /// script) are refused unless `--allow-scripts`. A failure changes nothing.
    Vendor {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        dir: PathBuf,
        /// Allow packages whose installation runs their scripts.
        #[arg(long)]
        allow_scripts: bool,
        /// Run pip with this CPython instead of the Python worker's (its version
        /// must be the worker's for the wheels to load).
        #[arg(long)]
        python: Option<PathBuf>,
        /// The npm program.
        #[arg(long, default_value = "npm")]
        npm: PathBuf,
        /// Where the worker executables are (to ask the Python worker which CPython
        /// it embeds); default: beside this program.
        #[arg(long, env = "CORRAL_WORKER_DIR")]
        worker_dir: Option<PathBuf>,
    },
    /// Write DIR/index.toml for the plugin archives in DIR (*.tar.gz, *.tgz): id,
    /// version, archive and SHA-256 of each, read with the checks of an install.
    /// Entries of an existing index at a URL or in a subdirectory are kept.
    Index {
        dir: PathBuf,
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
    },
    /// Install a plugin into the plugins directory from an archive (a path or an
    /// http(s) URL) or, with `--index`, by id (`ID` or `ID@REQ`, a semver
    /// requirement). Checks the checksum, the archive, the manifest and the
    /// signature; a failed install leaves nothing behind. A running daemon watching
    /// the directory loads it (or hot-reloads the version it replaces).
    Install {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
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
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        id: String,
        #[command(flatten)]
        place: PlaceArgs,
    },
    /// List the plugins in the plugins directory with their signature status.
    List {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
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
            Some(c) => Some(Config::load(c).map_err(|e| corral_protocol::error_chain(&e))?),
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
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
        path: Option<PathBuf>,
        /// Daemon configuration whose `policy` to check.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a plugin's effective policy and the file and line that set each value.
    Explain {
        /// Print JSON instead of text (docs/json.md).
        #[arg(long)]
        json: bool,
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

fn parse_level(s: &str) -> Result<corral_confine::Level, corral_confine::UnknownLevel> {
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

static LOG_FORMAT: std::sync::OnceLock<crate::config::LogFormat> = std::sync::OnceLock::new();

/// The format log lines are written in (text until [`init_logging`] says).
pub(crate) fn log_format() -> crate::config::LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// A line the daemon always prints to standard error (where it serves, that it
/// stops), whatever the log filter: as text, or as a JSON log line.
pub(crate) fn announce(message: &str) {
    match log_format() {
        crate::config::LogFormat::Text => eprintln!("corral: {message}"),
        crate::config::LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": "INFO",
                "message": message,
                "target": "corral",
            })
        ),
    }
}

/// Send log lines to standard error as `cli` says: its `--log` filter, in its
/// `--log-format` (for `serve` without one, the configuration's `log_format`).
pub fn init_logging(cli: &Cli) {
    let format = cli
        .log_format
        .or_else(|| match &cli.command {
            // Read again by `serve`, which reports what is wrong with it.
            Command::Serve { config, .. } => Config::load(config).ok().and_then(|c| c.log_format),
            _ => None,
        })
        .unwrap_or_default();
    let _ = LOG_FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::new(&cli.log);
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(one_line::OneLine(std::io::stderr));
    match format {
        crate::config::LogFormat::Text => fmt.init(),
        // Fields (`plugin`, `pid`, ...) beside `message` at the top level: what a
        // log collector indexes without a nested path.
        crate::config::LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// Run the parsed command; returns the process exit code (errors are printed).
pub fn run(cli: Cli) -> anyhow::Result<u8> {
    // A client of the daemon (`call`, `list`, `status`, `stop`) sends one request
    // and waits: one thread does, and starts sooner than a pool.
    let client = matches!(
        cli.command,
        Command::Call(_) | Command::List { .. } | Command::Status { .. } | Command::Stop { .. }
    );
    let rt = if client {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        // Each worker takes a few of the supervisor's descriptors: the soft limit
        // (often 1,024) is lifted to the hard one. A failure leaves the soft limit,
        // and starts past it are refused as the supervisor's, not the plugins'.
        if let Err(e) = crate::raise_open_files_limit() {
            tracing::warn!("cannot raise the open files limit: {e}");
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    }
    .context("failed to start the async runtime")?;
    Ok(exit::report(rt.block_on(dispatch(cli.command))))
}

async fn dispatch(command: Command) -> exit::Outcome {
    exit::set_json(wants_json(&command));
    match command {
        Command::Run(args) => run::run_once(args).await,
        Command::Test(args) => test::run_tests(args).await,
        Command::New(args) => new::new_plugin(args),
        Command::Serve { config, socket } => {
            use crate::daemon::serve::{ServeError, serve};
            match serve(&config, socket).await {
                Ok(()) => Ok(exit::OK),
                Err(ServeError::Invalid(why)) => Err(exit::Failure::invalid(why).into()),
                Err(ServeError::Failed(e)) => Err(e),
            }
        }
        Command::Call(args) => corral_client::call(args),
        Command::List { json, socket } => client::list(json, socket).await,
        Command::Status { json, socket } => client::status(json, socket).await,
        Command::Policy(PolicyCommand::Explain {
            plugin,
            socket: Some(socket),
            json,
            ..
        }) => client::explain(plugin, socket, json).await,
        Command::Policy(cmd) => policy::policy_command(cmd),
        Command::Plugin(cmd) => plugin::plugin_command(cmd).await,
        Command::Stop { socket, json } => client::stop(socket, json).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "corral", &mut std::io::stdout().lock());
            Ok(exit::OK)
        }
        Command::Man { out } => man(out.as_deref()),
    }
}

/// Whether `command` was given `--json`: its errors are then JSON on standard
/// output too.
fn wants_json(command: &Command) -> bool {
    match command {
        Command::Run(args) => args.json(),
        Command::Test(args) => args.json,
        Command::New(args) => args.json,
        Command::Call(args) => args.out.json,
        Command::Status { json, .. } | Command::List { json, .. } | Command::Stop { json, .. } => {
            *json
        }
        Command::Policy(
            PolicyCommand::Check { json, .. } | PolicyCommand::Explain { json, .. },
        ) => *json,
        Command::Plugin(p) => match p {
            PluginCommand::Keygen { json, .. }
            | PluginCommand::Sign { json, .. }
            | PluginCommand::Verify { json, .. }
            | PluginCommand::Pack { json, .. }
            | PluginCommand::Vendor { json, .. }
            | PluginCommand::Index { json, .. }
            | PluginCommand::Install { json, .. }
            | PluginCommand::Remove { json, .. }
            | PluginCommand::List { json, .. } => *json,
        },
        Command::Serve { .. } | Command::Completions { .. } | Command::Man { .. } => false,
    }
}

/// `corral man`: the manual pages, made from the same definitions as `--help`.
fn man(out: Option<&Path>) -> exit::Outcome {
    let cmd = <Cli as clap::CommandFactory>::command();
    match out {
        None => clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout().lock())
            .context("cannot write the manual page")?,
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
        }
    }
    Ok(exit::OK)
}
