//! Corral policy files: the numbers behind each isolation level, and the routing rules
//! that decide which level (plus overrides) a plugin runs at.
//!
//! Principal types: [`Policy`] (one or more TOML files, validated), [`Subject`] (what
//! routing may look at in a plugin), [`Effective`] (the resolved limits of one plugin,
//! each with the [`Origin`] that set it) and [`PolicyError`].
//!
//! ```toml
//! # Per-level limits. Anything not set keeps its built-in default.
//! [level.standard]
//! memory = "256MiB"    # most memory a plugin's engine may use (plugin.toml may ask less)
//! cpu = 1.0            # CPUs the worker may use ("0.5" = half of one)
//! pids = 64            # processes + threads
//! timeout = "30s"      # longest call deadline
//!
//! # Routing: the first route whose conditions all hold decides the level.
//! [[route]]
//! name = "our own plugins"
//! id = ["billing-*", "search"]     # globs over plugin ids
//! runtime = ["wasm", "js"]
//! tags = ["internal"]              # every listed tag must be in plugin.toml
//! level = "standard"
//! limits = { memory = "512MiB" }   # overrides of that level's limits
//! ```
//!
//! A plugin that no route matches runs at `maximum`. Unknown keys are errors; every
//! error names file, line and column and the valid choices.

mod grants;
mod raw;

/// The largest policy file read: far beyond any real one, and small enough that a
/// file that never ends (or a huge one dropped in by mistake) costs nothing.
pub const MAX_POLICY_FILE: u64 = 1 << 20;

/// The largest `max_output` a policy may set: a result must fit in one frame with
/// its envelope.
pub const MAX_OUTPUT_LIMIT: u64 = corral_protocol::frame::MAX_FRAME as u64 - (64 << 10);

/// Read one policy file: a regular file (a FIFO named `*.toml` would stall every
/// reload), never blocked on, of at most [`MAX_POLICY_FILE`] bytes.
fn read_policy_file(path: &Path) -> Result<String, String> {
    corral_files::read_regular_string(path, MAX_POLICY_FILE)
        .map_err(|e| format!("cannot read: {e}"))
}

pub use grants::{FetchRule, Grant, NameGlob, Requested, RuleError, Services, special_use};

use corral_confine::Level;
use corral_manifest::{Manifest, Runtime};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use raw::parse_cpu;

/// The policy shipped in `policies/`, compiled in: used when the operator names none.
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "policies/levels.toml",
        include_str!("../../../policies/levels.toml"),
    ),
    (
        "policies/grants.toml",
        include_str!("../../../policies/grants.toml"),
    ),
    (
        "policies/routes.toml",
        include_str!("../../../policies/routes.toml"),
    ),
];

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", path.display())]
pub struct PolicyError {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with a set of policy files (at least one entry).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Corral's built-in default for the level.
    BuiltIn,
    /// A policy file.
    File {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// The plugin's own `plugin.toml` asked for less than the policy allows.
    Manifest {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    /// Computed from other values (explained in the text).
    Derived(String),
    /// Set on the command line or by the embedding program.
    Override(String),
    /// The default route: no route matched.
    Unmatched,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltIn => write!(f, "built-in default"),
            Origin::File { path, line, column } => {
                write!(f, "{}:{line}:{column}", path.display())
            }
            Origin::Manifest { path, line, column } => {
                write!(
                    f,
                    "{}:{line}:{column} (the plugin's request)",
                    path.display()
                )
            }
            Origin::Derived(how) => write!(f, "derived: {how}"),
            Origin::Override(by) => write!(f, "{by}"),
            Origin::Unmatched => write!(f, "no route matched: unmatched plugins get maximum"),
        }
    }
}

/// A value and where it was set.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub origin: Origin,
}

impl<T> Setting<T> {
    fn built_in(value: T) -> Setting<T> {
        Setting {
            value,
            origin: Origin::BuiltIn,
        }
    }
}

/// The uid/gid a worker runs as when the supervisor is root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// A user name from the password database; its primary group.
    Name(String),
    /// Numeric ids.
    Ids { uid: u32, gid: u32 },
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunAs::Name(n) => write!(f, "{n}"),
            RunAs::Ids { uid, gid } => write!(f, "{uid}:{gid}"),
        }
    }
}

/// The limits of one level (or of one route's overrides, where every value is
/// optional).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits {
    /// Cap on the engine's memory (a plugin may ask for less).
    pub memory: Option<Setting<u64>>,
    /// The worker's cgroup memory limit. Unset: 2 × engine memory + 256 MiB.
    pub worker_memory: Option<Setting<u64>>,
    /// CPUs (cgroup quota).
    pub cpu: Option<Setting<f64>>,
    /// Processes and threads (cgroup pids limit).
    pub pids: Option<Setting<u64>>,
    /// Cap on a call's deadline.
    pub timeout: Option<Setting<Duration>>,
    /// Cap on one call's output.
    pub max_output: Option<Setting<u64>>,
    /// Who the worker runs as when the supervisor is root.
    pub user: Option<Setting<RunAs>>,
    /// Size of the writable tmpfs (level maximum).
    pub tmpfs: Option<Setting<u64>>,
    /// Deadline of the load and `init`. Unset: the plugin's timeout.
    pub init_timeout: Option<Setting<Duration>>,
    /// Bytes per second of each output stream (stdout, stderr, log) the supervisor
    /// passes on, after a burst of four seconds' worth.
    pub log_rate: Option<Setting<u64>>,
    /// Audit events per second written for the plugin, after a burst of four
    /// seconds' worth.
    pub audit_rate: Option<Setting<u64>>,
    /// Host calls one worker may have in flight.
    pub host_calls: Option<Setting<u64>>,
    /// Most worker processes one plugin may run (a plugin asks for its number
    /// in `[limits] instances`, default 1).
    pub instances: Option<Setting<u64>>,
}

impl Limits {
    /// `self` with every value `over` sets replaced.
    fn overlay(&self, over: &Limits) -> Limits {
        fn pick<T: Clone>(a: &Option<Setting<T>>, b: &Option<Setting<T>>) -> Option<Setting<T>> {
            b.clone().or_else(|| a.clone())
        }
        Limits {
            memory: pick(&self.memory, &over.memory),
            worker_memory: pick(&self.worker_memory, &over.worker_memory),
            cpu: pick(&self.cpu, &over.cpu),
            pids: pick(&self.pids, &over.pids),
            timeout: pick(&self.timeout, &over.timeout),
            max_output: pick(&self.max_output, &over.max_output),
            user: pick(&self.user, &over.user),
            tmpfs: pick(&self.tmpfs, &over.tmpfs),
            init_timeout: pick(&self.init_timeout, &over.init_timeout),
            log_rate: pick(&self.log_rate, &over.log_rate),
            audit_rate: pick(&self.audit_rate, &over.audit_rate),
            host_calls: pick(&self.host_calls, &over.host_calls),
            instances: pick(&self.instances, &over.instances),
        }
    }
}

/// Built-in limits of `level`; policy files override them.
pub fn built_in_limits(level: Level) -> Limits {
    const MIB: u64 = 1 << 20;
    let (memory, cpu, pids, timeout, max_output, instances) = match level {
        Level::Standard => (256 * MIB, 1.0, 64, 30, 16 * MIB, 4),
        Level::High => (128 * MIB, 1.0, 32, 10, 8 * MIB, 2),
        Level::Maximum => (64 * MIB, 0.5, 16, 5, 4 * MIB, 1),
    };
    Limits {
        memory: Some(Setting::built_in(memory)),
        worker_memory: None,
        cpu: Some(Setting::built_in(cpu)),
        pids: Some(Setting::built_in(pids)),
        timeout: Some(Setting::built_in(Duration::from_secs(timeout))),
        max_output: Some(Setting::built_in(max_output)),
        user: Some(Setting::built_in(RunAs::Name("nobody".into()))),
        tmpfs: Some(Setting::built_in(16 * MIB)),
        init_timeout: None,
        log_rate: Some(Setting::built_in(64 << 10)),
        audit_rate: Some(Setting::built_in(50)),
        host_calls: Some(Setting::built_in(4)),
        instances: Some(Setting::built_in(instances)),
    }
}

/// A condition on plugin ids: one glob.
#[derive(Debug, Clone)]
pub struct IdGlob {
    pub pattern: String,
    matcher: globset::GlobMatcher,
}

/// One routing rule.
#[derive(Debug, Clone)]
pub struct Route {
    /// The operator's name for it, or `route N of FILE`.
    pub name: String,
    /// Where the rule's `level` is set.
    pub origin: Origin,
    /// Any of these globs (empty: any id).
    pub id: Vec<IdGlob>,
    /// Any of these runtimes (empty: any).
    pub runtime: Vec<Runtime>,
    /// Any of these verified publishers (empty: any).
    pub publisher: Vec<String>,
    /// Whether the plugin's signature verified (unset: either).
    pub signed: Option<bool>,
    /// All of these tags.
    pub tags: Vec<String>,
    pub level: Level,
    pub limits: Limits,
}

/// What routing looks at in a plugin.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub id: &'a str,
    pub runtime: Runtime,
    /// The publisher whose key verified the plugin's signature; `None` if unsigned.
    pub publisher: Option<&'a str>,
    pub tags: &'a [String],
}

impl<'a> Subject<'a> {
    /// The subject of a manifest (publisher from signature verification, if any).
    pub fn of(m: &'a Manifest, publisher: Option<&'a str>) -> Subject<'a> {
        Subject {
            id: &m.id,
            runtime: m.runtime,
            publisher,
            tags: &m.tags,
        }
    }
}

impl Route {
    /// Whether every condition of the route holds for `s`.
    pub fn matches(&self, s: &Subject<'_>) -> bool {
        (self.id.is_empty() || self.id.iter().any(|g| g.matcher.is_match(s.id)))
            && (self.runtime.is_empty() || self.runtime.contains(&s.runtime))
            && (self.publisher.is_empty()
                || s.publisher
                    .is_some_and(|p| self.publisher.iter().any(|q| q == p)))
            && self.signed.is_none_or(|want| want == s.publisher.is_some())
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

/// A validated policy: level limits and routes, from one or more files.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The files it was read from, in the order read.
    pub sources: Vec<PathBuf>,
    levels: [Limits; 3],
    pub routes: Vec<Route>,
    /// `[[grant]]`s: the host services plugins may use.
    pub grants: Vec<Grant>,
}

fn level_index(l: Level) -> usize {
    match l {
        Level::Standard => 0,
        Level::High => 1,
        Level::Maximum => 2,
    }
}

/// The levels in order of strictness.
pub const LEVELS: [Level; 3] = [Level::Standard, Level::High, Level::Maximum];

impl Policy {
    /// The shipped policy (compiled in).
    pub fn built_in() -> Policy {
        let files: Vec<(PathBuf, String)> = BUILT_IN
            .iter()
            .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
            .collect();
        // The shipped files are checked by this crate's tests.
        Policy::parse(&files).unwrap_or_else(|e| panic!("the built-in policy is invalid:\n{e}"))
    }

    /// Read a policy file, or every `*.toml` file of a directory in name order.
    /// Each must be a regular file of at most [`MAX_POLICY_FILE`] bytes of UTF-8.
    pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
        let one = |message: String| {
            PolicyErrors(vec![PolicyError {
                path: path.to_owned(),
                line: 0,
                column: 0,
                message,
            }])
        };
        let meta = std::fs::metadata(path).map_err(|e| one(format!("cannot read: {e}")))?;
        let mut names = Vec::new();
        if meta.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| one(format!("cannot list: {e}")))?;
            for entry in entries {
                let entry = entry.map_err(|e| one(format!("cannot list: {e}")))?;
                let p = entry.path();
                if p.extension().is_some_and(|x| x == "toml") {
                    names.push(p);
                }
            }
            names.sort();
            if names.is_empty() {
                return Err(one("no policy files (*.toml) in this directory".to_owned()));
            }
        } else {
            names.push(path.to_owned());
        }
        let mut files = Vec::new();
        for p in names {
            let text = read_policy_file(&p).map_err(|message| {
                PolicyErrors(vec![PolicyError {
                    path: p.clone(),
                    line: 0,
                    column: 0,
                    message,
                }])
            })?;
            files.push((p, text));
        }
        Policy::parse(&files)
    }

    /// Validate policy files given as (path, text); every file's problems are reported.
    pub fn parse(files: &[(PathBuf, String)]) -> Result<Policy, PolicyErrors> {
        let mut levels: [Limits; 3] = Default::default();
        let mut routes = Vec::new();
        let mut grants = Vec::new();
        let mut errors = Vec::new();
        for (path, text) in files {
            raw::parse_file(
                path,
                text,
                &mut levels,
                &mut routes,
                &mut grants,
                &mut errors,
            );
        }
        if !errors.is_empty() {
            // In the order of the files and of the places in each, as a reader goes.
            let order: HashMap<&Path, usize> = files
                .iter()
                .enumerate()
                .map(|(i, (p, _))| (p.as_path(), i))
                .collect();
            errors.sort_by_key(|e| (order.get(e.path.as_path()).copied(), e.line, e.column));
            return Err(PolicyErrors(errors));
        }
        Ok(Policy {
            sources: files.iter().map(|(p, _)| p.clone()).collect(),
            levels: LEVELS.map(|l| built_in_limits(l).overlay(&levels[level_index(l)])),
            routes,
            grants,
        })
    }

    /// This policy with every plugin routed to `level` (the command line's `--level`).
    pub fn with_level(mut self, level: Level, by: &str) -> Policy {
        self.routes.insert(
            0,
            Route {
                name: by.to_owned(),
                origin: Origin::Override(by.to_owned()),
                id: Vec::new(),
                runtime: Vec::new(),
                publisher: Vec::new(),
                signed: None,
                tags: Vec::new(),
                level,
                limits: Limits::default(),
            },
        );
        self
    }

    /// The limits of `level` before any route's overrides.
    pub fn level_limits(&self, level: Level) -> &Limits {
        &self.levels[level_index(level)]
    }

    /// The route that decides `s`'s level, if any.
    pub fn route_for(&self, s: &Subject<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(s))
    }

    /// The effective policy of the plugin described by `m`.
    pub fn resolve(&self, m: &Manifest, publisher: Option<&str>) -> Effective {
        let subject = Subject::of(m, publisher);
        let route = self.route_for(&subject);
        let (level, limits) = match route {
            Some(r) => (
                Setting {
                    value: r.level,
                    origin: r.origin.clone(),
                },
                self.level_limits(r.level).overlay(&r.limits),
            ),
            None => (
                Setting {
                    value: Level::Maximum,
                    origin: Origin::Unmatched,
                },
                self.level_limits(Level::Maximum).clone(),
            ),
        };
        // Every level has every value but worker_memory (built_in_limits).
        let get = |o: &Option<Setting<u64>>| o.clone().expect("complete level limits");
        let at = |pos: Option<(usize, usize)>| {
            pos.map(|(line, column)| Origin::Manifest {
                path: m.origin.path.clone(),
                line,
                column,
            })
        };
        let cap_u64 = |cap: Setting<u64>, asked: u64, pos| match at(pos) {
            Some(origin) if asked < cap.value => Setting {
                value: asked,
                origin,
            },
            _ => cap,
        };
        let memory = cap_u64(get(&limits.memory), m.limits.memory_bytes, m.origin.memory);
        let max_output = cap_u64(
            get(&limits.max_output),
            m.limits.max_output_bytes,
            m.origin.max_output,
        );
        // One worker unless plugin.toml asks for more, up to the level's value.
        let instances = match at(m.origin.instances) {
            Some(origin) if u64::from(m.limits.instances) <= get(&limits.instances).value => {
                Setting {
                    value: u64::from(m.limits.instances),
                    origin,
                }
            }
            Some(_) => get(&limits.instances),
            None => Setting {
                value: 1,
                origin: Origin::Derived("the default: one worker".into()),
            },
        };
        let timeout_cap = limits.timeout.clone().expect("complete level limits");
        let timeout = match at(m.origin.timeout) {
            Some(origin) if m.limits.timeout < timeout_cap.value => Setting {
                value: m.limits.timeout,
                origin,
            },
            _ => timeout_cap.clone(),
        };
        let worker_memory = limits.worker_memory.clone().unwrap_or_else(|| Setting {
            value: memory.value.saturating_mul(2).saturating_add(256 << 20),
            origin: Origin::Derived("2 × memory + 256 MiB for the runtime".into()),
        });
        let mut clamped = Vec::new();
        if m.limits.memory_bytes > memory.value && m.origin.memory.is_some() {
            clamped.push(format!(
                "plugin.toml asks for memory {}, policy allows {}",
                size(m.limits.memory_bytes),
                size(memory.value)
            ));
        }
        if m.limits.timeout > timeout.value && m.origin.timeout.is_some() {
            clamped.push(format!(
                "plugin.toml asks for timeout {:?}, policy allows {:?}",
                m.limits.timeout, timeout.value
            ));
        }
        if u64::from(m.limits.instances) > instances.value && m.origin.instances.is_some() {
            clamped.push(format!(
                "plugin.toml asks for instances {}, policy allows {}",
                m.limits.instances, instances.value
            ));
        }
        if m.limits.max_output_bytes > max_output.value && m.origin.max_output.is_some() {
            clamped.push(format!(
                "plugin.toml asks for max_output {}, policy allows {}",
                size(m.limits.max_output_bytes),
                size(max_output.value)
            ));
        }
        Effective {
            plugin: m.id.clone(),
            route: route.map(|r| r.name.clone()),
            level,
            memory,
            worker_memory,
            cpu: limits.cpu.clone().expect("complete level limits"),
            pids: get(&limits.pids),
            timeout_cap: timeout_cap.value,
            max_output,
            user: limits.user.clone().expect("complete level limits"),
            tmpfs: get(&limits.tmpfs),
            init_timeout: limits.init_timeout.clone().unwrap_or_else(|| Setting {
                value: timeout.value,
                origin: Origin::Derived("the plugin's timeout".into()),
            }),
            log_rate: get(&limits.log_rate),
            audit_rate: get(&limits.audit_rate),
            host_calls: get(&limits.host_calls),
            instances,
            timeout,
            clamped,
            requested: Vec::new(),
            services: Services::of(&m.id, &self.grants),
        }
        .with_requests(m)
    }
}

/// The resolved policy of one plugin: every value with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub plugin: String,
    /// The route that matched (`None`: unmatched, so maximum).
    pub route: Option<String>,
    pub level: Setting<Level>,
    pub memory: Setting<u64>,
    pub worker_memory: Setting<u64>,
    pub cpu: Setting<f64>,
    pub pids: Setting<u64>,
    /// A call's default deadline.
    pub timeout: Setting<Duration>,
    /// The longest deadline a caller may ask for (the policy's value).
    pub timeout_cap: Duration,
    pub max_output: Setting<u64>,
    pub user: Setting<RunAs>,
    pub tmpfs: Setting<u64>,
    /// Deadline of the load and `init`.
    pub init_timeout: Setting<Duration>,
    /// Bytes per second per output stream passed on (burst: 4 s worth).
    pub log_rate: Setting<u64>,
    /// Audit events per second (burst: 4 s worth).
    pub audit_rate: Setting<u64>,
    /// Host calls in flight per worker.
    pub host_calls: Setting<u64>,
    /// Worker processes serving the plugin's calls (its request, capped by the
    /// level's `instances`).
    pub instances: Setting<u64>,
    /// Requests in plugin.toml that the policy lowered.
    pub clamped: Vec<String>,
    /// The host services it may use.
    pub services: Services,
    /// What its `[permissions]` ask for, each judged by its grants.
    pub requested: Vec<grants::Requested>,
}

impl Effective {
    fn with_requests(mut self, m: &Manifest) -> Effective {
        self.requested = self.services.judge(m);
        self
    }

    /// The requested permissions, one line each: `http x: granted by ...` or
    /// `kv: not granted: ...`.
    pub fn requested_lines(&self) -> Vec<String> {
        self.requested
            .iter()
            .map(|r| match &r.decision {
                Ok(by) => format!("{}: granted by {by}", r.what),
                Err(why) => format!("{}: not granted: {why}", r.what),
            })
            .collect()
    }

    /// One line: the level, where it came from, and the resolved limits.
    pub fn summary(&self) -> String {
        format!(
            "{} by {}: memory {}, worker_memory {}, cpu {}, pids {}, timeout {:?}, \
             max_output {}, user {}",
            self.level.value,
            match &self.route {
                Some(r) => format!("route {r:?} ({})", self.level.origin),
                None => self.level.origin.to_string(),
            },
            size(self.memory.value),
            size(self.worker_memory.value),
            self.cpu.value,
            self.pids.value,
            self.timeout.value,
            size(self.max_output.value),
            self.user.value
        )
    }
}

/// `268435456` -> `256 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes;
    let mut i = 0;
    while i < 3 && v >= 1024 && v.is_multiple_of(1024) {
        v /= 1024;
        i += 1;
    }
    format!("{v} {}", UNITS[i])
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plugin {}", self.plugin)?;
        match &self.route {
            Some(r) => writeln!(f, "  route          {r}")?,
            None => writeln!(f, "  route          (none matched)")?,
        }
        let mut row = |k: &str, v: String, o: &Origin| writeln!(f, "  {k:<14} {v:<12} {o}");
        row("level", self.level.value.to_string(), &self.level.origin)?;
        row("memory", size(self.memory.value), &self.memory.origin)?;
        row(
            "worker_memory",
            size(self.worker_memory.value),
            &self.worker_memory.origin,
        )?;
        row("cpu", format!("{}", self.cpu.value), &self.cpu.origin)?;
        row("pids", self.pids.value.to_string(), &self.pids.origin)?;
        row(
            "timeout",
            format!("{:?}", self.timeout.value),
            &self.timeout.origin,
        )?;
        row(
            "max_output",
            size(self.max_output.value),
            &self.max_output.origin,
        )?;
        row("user", self.user.value.to_string(), &self.user.origin)?;
        if self.level.value == Level::Maximum {
            row("tmpfs", size(self.tmpfs.value), &self.tmpfs.origin)?;
        }
        row(
            "init_timeout",
            format!("{:?}", self.init_timeout.value),
            &self.init_timeout.origin,
        )?;
        row(
            "log_rate",
            format!("{}/s", size(self.log_rate.value)),
            &self.log_rate.origin,
        )?;
        row(
            "audit_rate",
            format!("{}/s", self.audit_rate.value),
            &self.audit_rate.origin,
        )?;
        row(
            "host_calls",
            self.host_calls.value.to_string(),
            &self.host_calls.origin,
        )?;
        row(
            "instances",
            self.instances.value.to_string(),
            &self.instances.origin,
        )?;
        let sv = &self.services;
        row("kv_quota", size(sv.kv_quota.value), &sv.kv_quota.origin)?;
        row(
            "fetch_max",
            size(sv.fetch_max_response.value),
            &sv.fetch_max_response.origin,
        )?;
        row(
            "fetch_timeout",
            format!("{:?}", sv.fetch_timeout.value),
            &sv.fetch_timeout.origin,
        )?;
        if sv.grants.is_empty() {
            writeln!(f, "  grants         none: every host service is denied")?;
        }
        for g in &sv.grants {
            writeln!(f, "  {g}")?;
            for r in &g.fetch {
                writeln!(f, "    fetch        {}", r.text)?;
            }
            let names = |v: &[grants::NameGlob]| {
                v.iter()
                    .map(|g| g.pattern.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for (what, list) in [("publish", &g.publish), ("subscribe", &g.subscribe)] {
                if !list.is_empty() {
                    writeln!(f, "    {what:<12} {}", names(list))?;
                }
            }
            if !g.call.is_empty() {
                let calls: Vec<String> = g
                    .call
                    .iter()
                    .map(|(p, fun)| match fun {
                        Some(fun) => format!("{}:{}", p.pattern, fun.pattern),
                        None => p.pattern.clone(),
                    })
                    .collect();
                writeln!(f, "    call         {}", calls.join(", "))?;
            }
        }
        for r in self.requested_lines() {
            writeln!(f, "  requested      {r}")?;
        }
        for c in &self.clamped {
            writeln!(f, "  note: {c}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
