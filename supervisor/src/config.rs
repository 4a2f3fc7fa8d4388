//! The daemon's configuration file (`corral serve --config F`).
//!
//! ```toml
//! # Plugin directories, relative to this file.
//! plugins = ["hello-wasm"]
//! # And/or a directory of plugins (one subdirectory each; `corral plugin install`
//! # puts them there). Both are watched: plugins are added, reloaded and removed as
//! # their files change, without losing calls.
//! plugins_dir = "/var/lib/corral/plugins"
//! # Set to false to load plugins at start only.
//! watch = true
//! # Optional: control socket, module cache, worker binaries.
//! socket = "/run/corral/control.sock"
//! cache_dir = "/var/cache/corral"
//! worker_dir = "/usr/libexec/corral"
//! # Policy files (a directory of *.toml or one file) that route plugins to isolation
//! # levels; reloaded live. Default: the shipped policy, compiled in.
//! policy = "/etc/corral/policies"
//!
//! # Where the plugins' key-value stores live (default /var/lib/corral for root).
//! state_dir = "/var/lib/corral"
//! # The stores' backend: "redb" (default: kv.redb in state_dir, this machine only)
//! # or a PostgreSQL database every node that names it shares (the password from
//! # a file or the environment, as secrets below; ca_file: the CAs for TLS, default
//! # the web's roots).
//! store = { postgres = "postgres://corral@db.internal:5432/corral?sslmode=require", password = { file = "/run/secrets/pg" } }
//! # Audit log: a file (JSON lines, appended), "stderr" (default) or "off".
//! audit = "/var/log/corral/audit.jsonl"
//! # Calls queued per plugin (and messages per subscriber) before "overloaded".
//! max_queue = 64
//! # How often plugins that export `health` are checked.
//! health_interval = "30s"
//! # Optional: stop a worker that has had no call for this long (the next call
//! # starts one again), and cap the worker processes alive at once (a start past
//! # the cap stops the least recently used idle worker, else answers "overloaded").
//! idle_timeout = "5m"
//! max_workers = 2000
//! # Prometheus metrics over HTTP at this address (off by default; loopback
//! # unless a scraper elsewhere needs it: the endpoint has no authentication).
//! metrics = "127.0.0.1:9464"
//! # Log lines as `text` (default) or `json` (one object per line); `--log-format`
//! # overrides it.
//! log_format = "json"
//! # Runtimes whose workers are forked from a zygote template, the engine set up
//! # once (default ["wasm", "js", "python"]; [] starts every worker by exec).
//! zygotes = ["wasm", "js", "python"]
//!
//! [restart]
//! max_crashes = 5
//! window = "60s"
//!
//! # Trusted plugin publishers: name = ed25519 public key (`corral plugin keygen`).
//! [publishers]
//! acme = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
//!
//! # Handed to the plugin at load (corral.config / corral.secret).
//! [plugin.hello-js.config]
//! greeting = "Hello"
//! [plugin.hello-js.secrets]
//! api_token = { env = "HELLO_TOKEN" }    # or { file = "token.txt" }, or "literal"
//! ```
//!
//! Unknown keys are errors; errors name the file, line and column.
//!
//! `corral serve` reads the file again on SIGHUP: see
//! [`crate::supervisor`]'s `reconfigure` for what applies live.

use crate::{Options, PluginConfig, RestartPolicy};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest configuration file read.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// The largest secret file read (a token or a password, not a database).
pub const MAX_SECRET_FILE: u64 = 64 << 10;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: corral_files::ReadError,
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
    #[serde(default)]
    plugins: Vec<String>,
    plugins_dir: Option<String>,
    watch: Option<bool>,
    socket: Option<String>,
    cache_dir: Option<String>,
    worker_dir: Option<String>,
    policy: Option<String>,
    state_dir: Option<String>,
    store: Option<Spanned<toml::Value>>,
    audit: Option<String>,
    max_queue: Option<Spanned<usize>>,
    health_interval: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_workers: Option<Spanned<usize>>,
    zygotes: Option<Vec<corral_protocol::Runtime>>,
    metrics: Option<Spanned<String>>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    plugin: BTreeMap<String, RawPluginConfig>,
    #[serde(default)]
    publishers: BTreeMap<String, Spanned<String>>,
    remote: Option<Spanned<RawRemote>>,
}

/// `[remote]`: the remote call API.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    listen: Spanned<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    client_ca: Option<String>,
    max_body: Option<Spanned<String>>,
    max_concurrent: Option<usize>,
    #[serde(default)]
    caller: Vec<Spanned<RawCaller>>,
}

/// `[[remote.caller]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    token: Option<RawSecret>,
    client: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    status: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPluginConfig {
    #[serde(default)]
    config: BTreeMap<String, Spanned<toml::Value>>,
    #[serde(default)]
    secrets: BTreeMap<String, Spanned<RawSecret>>,
}

/// A secret: given in line, or read from the supervisor's environment or a file.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSecret {
    Value(String),
    Env { env: String },
    File { file: String },
}

/// `store = { postgres = "...", password = ..., ca_file = "..." }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    postgres: String,
    password: Option<RawSecret>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    max_crashes: Option<u32>,
    window: Option<Spanned<String>>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and
    /// the event's fields (`plugin` among them) at the top level.
    Json,
}

/// A loaded daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute plugin directories.
    pub plugins: Vec<PathBuf>,
    /// A directory of plugin directories (discovered at start and watched).
    pub plugins_dir: Option<PathBuf>,
    /// Whether plugins (and the policy) are watched and reloaded live.
    pub watch: bool,
    pub socket: Option<PathBuf>,
    /// Where the policy was read from (`None`: the built-in policy); watched for edits.
    pub policy_path: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`None`: not served).
    pub metrics: Option<std::net::SocketAddr>,
    /// The remote call API (`None`: not served).
    pub remote: Option<crate::daemon::remote::RemoteConfig>,
    pub log_format: Option<LogFormat>,
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
        let text = corral_files::read_regular_string(path, MAX_CONFIG_FILE).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
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
        // Against the file's directory made absolute (`corral.toml` alone: the
        // current one): the daemon hands these paths to workers and checks their
        // parents, so none is left relative.
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let base = file.parent().unwrap_or(Path::new("/"));
        let resolve = |p: &str| base.join(p);
        let read_secret = |secret: &RawSecret, what: &str| -> Result<String, String> {
            match secret {
                RawSecret::Value(s) => Ok(s.clone()),
                RawSecret::Env { env } => std::env::var(env)
                    .map_err(|_| format!("{what}: the environment variable {env} is not set")),
                RawSecret::File { file } => {
                    let path = resolve(file);
                    corral_files::read_regular_string(&path, MAX_SECRET_FILE)
                        .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                        .map_err(|e| format!("{what}: cannot read {}: {e}", path.display()))
                }
            }
        };
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
                .map_err(|m| invalid(Some(w.span()), m.to_string()))?;
        }
        options.restart = restart;
        if let Some(d) = &raw.state_dir {
            options.state_dir = resolve(d);
        }
        if let Some(st) = &raw.store {
            let choices = "store is \"redb\" or { postgres = \"postgres://user@host/db\" } \
                           (with optional password and ca_file)";
            options.store = match st.get_ref() {
                toml::Value::String(name) if name == "redb" => crate::StoreBackend::Redb,
                toml::Value::Table(_) => {
                    let p = RawPostgres::deserialize(st.get_ref().clone())
                        .map_err(|e| invalid(Some(st.span()), format!("store: {e}")))?;
                    let password = match &p.password {
                        Some(secret) => Some(corral_protocol::Secret(
                            read_secret(secret, "store.password")
                                .map_err(|m| invalid(Some(st.span()), m))?,
                        )),
                        None => None,
                    };
                    let pg = crate::PostgresStore {
                        url: p.postgres,
                        password,
                        ca_file: p.ca_file.as_deref().map(resolve),
                    };
                    pg.validate()
                        .map_err(|m| invalid(Some(st.span()), format!("store.postgres: {m}")))?;
                    crate::StoreBackend::Postgres(pg)
                }
                _ => return Err(invalid(Some(st.span()), choices.into())),
            };
        }
        if let Some(a) = &raw.audit {
            options.audit = match crate::AuditSink::parse(a) {
                crate::AuditSink::File(p) => crate::AuditSink::File(resolve(&p.to_string_lossy())),
                other => other,
            };
        }
        if let Some(q) = &raw.max_queue {
            if *q.get_ref() == 0 {
                return Err(invalid(
                    Some(q.span()),
                    "max_queue must be at least 1".into(),
                ));
            }
            options.max_queue = *q.get_ref();
        }
        if let Some(h) = &raw.health_interval {
            options.health_interval = corral_manifest::parse_duration(h.get_ref())
                .map_err(|m| invalid(Some(h.span()), m.to_string()))?;
        }
        if let Some(t) = &raw.idle_timeout {
            let d = corral_manifest::parse_duration(t.get_ref())
                .map_err(|m| invalid(Some(t.span()), m.to_string()))?;
            if d.is_zero() {
                return Err(invalid(
                    Some(t.span()),
                    "idle_timeout must be more than zero (leave it out to keep idle workers)"
                        .into(),
                ));
            }
            options.idle_timeout = Some(d);
        }
        if let Some(m) = &raw.max_workers {
            if *m.get_ref() == 0 {
                return Err(invalid(
                    Some(m.span()),
                    "max_workers must be at least 1 (leave it out for no cap)".into(),
                ));
            }
            options.max_workers = Some(*m.get_ref());
        }
        let metrics = match &raw.metrics {
            Some(m) => Some(m.get_ref().parse::<std::net::SocketAddr>().map_err(|e| {
                invalid(
                    Some(m.span()),
                    format!("metrics: {e}: an address and port such as \"127.0.0.1:9464\""),
                )
            })?),
            None => None,
        };
        let remote = match &raw.remote {
            Some(r) => Some(remote_config(r, &resolve, &read_secret, &invalid)?),
            None => None,
        };
        if let Some(z) = &raw.zygotes {
            options.zygotes = z.clone();
        }
        for (name, key) in &raw.publishers {
            let k = key.get_ref().trim();
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    Some(key.span()),
                    format!(
                        "publishers.{name}: an ed25519 public key is 64 hex digits \
                         (`corral plugin keygen` prints it)"
                    ),
                ));
            }
            options
                .publishers
                .insert(name.clone(), k.to_ascii_lowercase());
        }
        for (id, c) in &raw.plugin {
            let mut pc = PluginConfig::default();
            for (k, v) in &c.config {
                let text = match v.get_ref() {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                        v.get_ref().to_string()
                    }
                    _ => {
                        return Err(invalid(
                            Some(v.span()),
                            format!("plugin.{id}.config.{k}: a string, number or boolean"),
                        ));
                    }
                };
                pc.config.insert(k.clone(), text);
            }
            for (k, v) in &c.secrets {
                let value = read_secret(v.get_ref(), &format!("plugin.{id}.secrets.{k}"))
                    .map_err(|m| invalid(Some(v.span()), m))?;
                pc.secrets.insert(k.clone(), corral_protocol::Secret(value));
            }
            options.plugin_config.insert(id.clone(), pc);
        }
        Ok(Config {
            plugins: raw.plugins.iter().map(|p| resolve(p)).collect(),
            plugins_dir: raw.plugins_dir.as_deref().map(resolve),
            watch: raw.watch.unwrap_or(true),
            socket: raw.socket.as_deref().map(resolve),
            policy_path: raw.policy.as_deref().map(resolve),
            metrics,
            remote,
            log_format: raw.log_format,
            options,
        })
    }
}

/// `[remote]`, read and checked (the certificates are read when the listener binds).
fn remote_config(
    raw: &Spanned<RawRemote>,
    resolve: &dyn Fn(&str) -> PathBuf,
    read_secret: &dyn Fn(&RawSecret, &str) -> Result<String, String>,
    invalid: &dyn Fn(Option<std::ops::Range<usize>>, String) -> ConfigError,
) -> Result<crate::daemon::remote::RemoteConfig, ConfigError> {
    use crate::daemon::remote::{
        Caller, DEFAULT_MAX_BODY, DEFAULT_MAX_CONCURRENT, RemoteConfig, TlsFiles,
    };
    let r = raw.get_ref();
    let listen = r
        .listen
        .get_ref()
        .parse::<std::net::SocketAddr>()
        .map_err(|e| {
            invalid(
                Some(r.listen.span()),
                format!("remote.listen: {e}: an address and port such as \"0.0.0.0:8443\""),
            )
        })?;
    let tls = match (&r.tls_cert, &r.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: resolve(cert),
            key: resolve(key),
        }),
        (None, None) => None,
        _ => {
            return Err(invalid(
                Some(raw.span()),
                "remote: tls_cert and tls_key go together".into(),
            ));
        }
    };
    let max_body = match &r.max_body {
        Some(m) => corral_manifest::parse_size(m.get_ref())
            .map_err(|e| invalid(Some(m.span()), format!("remote.max_body: {e}")))?,
        None => DEFAULT_MAX_BODY,
    };
    let mut callers = Vec::with_capacity(r.caller.len());
    for c in &r.caller {
        let (span, c) = (c.span(), c.get_ref());
        let token = match &c.token {
            Some(t) => Some(corral_protocol::Secret(
                read_secret(t, &format!("remote.caller {:?}: token", c.name))
                    .map_err(|m| invalid(Some(span.clone()), m))?,
            )),
            None => None,
        };
        callers.push(Caller {
            name: c.name.clone(),
            token,
            client: c.client.clone(),
            allow: c.allow.clone(),
            status: c.status,
        });
    }
    let config = RemoteConfig {
        listen,
        tls,
        client_ca: r.client_ca.as_deref().map(resolve),
        max_body,
        max_concurrent: r.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT),
        callers,
    };
    config
        .validate()
        .map_err(|m| invalid(Some(raw.span()), format!("remote: {m}")))?;
    Ok(config)
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
        // A file named alone is in the current directory: so are its paths, and each
        // has a directory to make or bind in.
        let c = Config::parse("socket = \"s.sock\"\n", Path::new("corral.toml")).unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(c.socket.unwrap(), here.join("s.sock"));
    }

    #[test]
    fn plugin_config_and_secrets_load_and_never_show_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "s3cr3t-file\n").unwrap();
        let c = Config::parse(
            "plugins = []\naudit = \"audit.jsonl\"\nmax_queue = 3\n\
             [plugin.p.config]\ngreeting = \"hi\"\nn = 3\n\
             [plugin.p.secrets]\na = \"s3cr3t-inline\"\nb = { file = \"tok\" }\n",
            &dir.path().join("corral.toml"),
        )
        .unwrap();
        let pc = &c.options.plugin_config["p"];
        assert_eq!(pc.config["greeting"], "hi");
        assert_eq!(pc.config["n"], "3");
        assert_eq!(pc.secrets["a"].0, "s3cr3t-inline");
        assert_eq!(pc.secrets["b"].0, "s3cr3t-file");
        assert_eq!(c.options.max_queue, 3);
        assert_eq!(
            c.options.audit,
            crate::AuditSink::File(dir.path().join("audit.jsonl"))
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        let e = Config::parse(
            "plugins = []\n[plugin.p.secrets]\nt = { env = \"CORRAL_TEST_UNSET_VAR\" }\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("CORRAL_TEST_UNSET_VAR is not set"),
            "{e}"
        );
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

    #[test]
    fn the_store_is_redb_or_postgres_with_its_password_never_shown_and_a_bad_one_is_refused_at_its_place()
     {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corral.toml");
        let parse = |text: &str| Config::parse(text, &file);
        assert_eq!(parse("").unwrap().options.store, crate::StoreBackend::Redb);
        assert_eq!(
            parse("store = \"redb\"").unwrap().options.store,
            crate::StoreBackend::Redb
        );
        std::fs::write(dir.path().join("pg.pass"), "s3cret-pw\n").unwrap();
        let c = parse(
            "store = { postgres = \"postgres://corral@db.internal:6432/fleet?sslmode=require\", \
             password = { file = \"pg.pass\" }, ca_file = \"ca.pem\" }",
        )
        .unwrap();
        let crate::StoreBackend::Postgres(pg) = &c.options.store else {
            panic!("{:?}", c.options.store)
        };
        assert_eq!(
            pg.password.as_ref().map(|p| p.0.as_str()),
            Some("s3cret-pw")
        );
        assert_eq!(
            pg.ca_file.as_deref(),
            Some(dir.path().join("ca.pem").as_path())
        );
        let shown = format!("{:?}", c.options);
        assert!(
            shown.contains("PostgreSQL corral@db.internal:6432/fleet"),
            "{shown}"
        );
        assert!(!shown.contains("s3cret"), "{shown}");
        // A password inside the URL is not shown either.
        let c = parse("store = { postgres = \"postgres://corral:inline-pw@db/fleet\" }").unwrap();
        assert!(!format!("{:?}", c.options).contains("inline-pw"));
        for (text, error) in [
            (
                "store = \"sqlite\"",
                "corral.toml:1:9: store is \"redb\" or { postgres",
            ),
            (
                "store = 5",
                "corral.toml:1:9: store is \"redb\" or { postgres",
            ),
            (
                "store = { postgres = \"postgres://db/x\" }",
                "corral.toml:1:9: store.postgres: the connection string names no user",
            ),
            (
                "store = { postgres = \"postgres://u@db/x?sslmode=sometimes\" }",
                "corral.toml:1:9: store.postgres: the connection string:",
            ),
            (
                "store = { postgres = \"postgres://u@db/x\", pasword = \"x\" }",
                "corral.toml:1:9: store: unknown field `pasword`",
            ),
            (
                "store = { postgres = \"postgres://u@db/x\", password = { env = \"CORRAL_NO_SUCH_VAR\" } }",
                "corral.toml:1:9: store.password: the environment variable CORRAL_NO_SUCH_VAR is not set",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.ends_with(error) || e.contains(error), "{text}: {e}");
            assert!(e.starts_with(&file.display().to_string()), "{e}");
        }
    }

    #[test]
    fn idle_timeout_and_max_workers_load_and_zero_is_refused_with_its_place() {
        let parse = |text: &str| Config::parse(text, Path::new("c.toml"));
        let c = parse("plugins = []\nidle_timeout = \"90s\"\nmax_workers = 3000\n").unwrap();
        let o = (c.options.idle_timeout, c.options.max_workers);
        assert_eq!(o, (Some(std::time::Duration::from_secs(90)), Some(3000)));
        let c = parse("plugins = []\n").unwrap();
        let o = (c.options.idle_timeout, c.options.max_workers);
        assert_eq!(o, (None, None));
        for (text, error) in [
            (
                "max_workers = 0",
                "c.toml:2:15: max_workers must be at least 1",
            ),
            (
                "idle_timeout = \"0s\"",
                "c.toml:2:16: idle_timeout must be more than zero",
            ),
            ("idle_timeout = \"later\"", "c.toml:2:16: invalid duration"),
        ] {
            let e = parse(&format!("plugins = []\n{text}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(error), "{text}: {e}");
        }
    }

    #[test]
    fn zygotes_name_runtimes_default_to_every_engine_and_a_wrong_name_is_refused_with_its_place() {
        use corral_protocol::Runtime;
        let parse = |text: &str| Config::parse(text, Path::new("c.toml"));
        let c = parse("plugins = []\n").unwrap();
        assert_eq!(
            c.options.zygotes,
            [Runtime::Wasm, Runtime::Js, Runtime::Python]
        );
        let c = parse("plugins = []\nzygotes = [\"python\", \"js\"]\n").unwrap();
        assert_eq!(c.options.zygotes, [Runtime::Python, Runtime::Js]);
        let c = parse("plugins = []\nzygotes = []\n").unwrap();
        assert!(c.options.zygotes.is_empty());
        let e = parse("plugins = []\nzygotes = [\"ruby\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml:2:"), "{e}");
        assert!(e.contains("unknown variant `ruby`"), "{e}");
    }

    #[test]
    fn remote_loads_its_callers_with_tokens_from_files_and_refuses_unsafe_settings_with_their_place()
     {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ops.token"), "0123456789abcdef-ops\n").unwrap();
        let path = dir.path().join("c.toml");
        let parse = |text: &str| Config::parse(text, &path);
        let c = parse(
            "[remote]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"s.pem\"\ntls_key = \"s.key\"\n\
             client_ca = \"ca.pem\"\nmax_body = \"2MiB\"\nmax_concurrent = 4\n\
             [[remote.caller]]\nname = \"ops\"\ntoken = { file = \"ops.token\" }\n\
             allow = [\"pricing\", \"orders:submit\"]\nstatus = true\n\
             [[remote.caller]]\nname = \"billing\"\nclient = \"billing.internal\"\n",
        )
        .unwrap();
        let r = c.remote.as_ref().unwrap();
        assert_eq!(r.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(r.tls.as_ref().unwrap().key, dir.path().join("s.key"));
        assert_eq!(
            r.client_ca.as_deref(),
            Some(dir.path().join("ca.pem").as_path())
        );
        assert_eq!((r.max_body, r.max_concurrent), (2 << 20, 4));
        assert_eq!(
            r.callers[0].token.as_ref().unwrap().0,
            "0123456789abcdef-ops"
        );
        assert!(r.callers[0].status && !r.callers[1].status);
        assert_eq!(r.callers[1].client.as_deref(), Some("billing.internal"));
        assert!(
            !format!("{c:?}").contains("0123456789abcdef-ops"),
            "a token in Debug"
        );
        assert!(parse("plugins = []\n").unwrap().remote.is_none());
        for (text, expected) in [
            (
                "[remote]\nlisten = \"0.0.0.0:8443\"\n",
                "remote: listen = \"0.0.0.0:8443\" without tls_cert and tls_key",
            ),
            (
                "[remote]\nlisten = \"8443\"\n",
                "c.toml:2:10: remote.listen: invalid socket address",
            ),
            (
                "[remote]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"s.pem\"\n",
                "remote: tls_cert and tls_key go together",
            ),
            (
                "[remote]\nlisten = \"127.0.0.1:1\"\nmax_body = \"lots\"\n",
                "c.toml:3:12: remote.max_body:",
            ),
            (
                "[remote]\nlisten = \"127.0.0.1:1\"\n[[remote.caller]]\nname = \"x\"\ntoken = { env = \"CORRAL_NO_SUCH_VAR\" }\n",
                "the environment variable CORRAL_NO_SUCH_VAR is not set",
            ),
            (
                "[remote]\nlisten = \"127.0.0.1:1\"\n[[remote.caller]]\nname = \"Ops Team\"\ntoken = \"0123456789abcdef0\"\n",
                "caller name \"Ops Team\"",
            ),
            (
                "[remote]\nlisten = \"127.0.0.1:1\"\n[[remote.caller]]\nname = \"x\"\ntokn = \"0123456789abcdef0\"\n",
                "unknown field `tokn`",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn metrics_and_log_format_load_and_a_bad_address_is_refused_with_its_place() {
        let parse = |text: &str| Config::parse(text, Path::new("c.toml"));
        let c = parse("metrics = \"127.0.0.1:9464\"\nlog_format = \"json\"\n").unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        let c = parse("plugins = []\n").unwrap();
        assert_eq!((c.metrics, c.log_format), (None, None));
        let e = parse("plugins = []\nmetrics = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("c.toml:2:11: metrics: invalid socket address"),
            "{e}"
        );
        let e = parse("log_format = \"xml\"\n").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:1:14: unknown variant `xml`"), "{e}");
    }
}
