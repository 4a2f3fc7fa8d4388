//! The file format: raw TOML shapes with spans, and their validation.

use crate::grants::{FetchRule, Grant, NameGlob};
use crate::{IdGlob, LEVELS, Limits, Origin, PolicyError, Route, RunAs, Setting, level_index};
use corral_confine::Level;
use corral_manifest::{LineIndex, Runtime, parse_duration, parse_size};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    level: BTreeMap<Spanned<String>, RawLimits>,
    #[serde(default)]
    route: Vec<RawRoute>,
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    name: Option<String>,
    id: Option<Spanned<toml::Value>>,
    kv_quota: Option<Spanned<String>>,
    #[serde(default)]
    fetch: Vec<Spanned<RawFetch>>,
    fetch_max_response: Option<Spanned<String>>,
    fetch_timeout: Option<Spanned<String>>,
    #[serde(default)]
    publish: Vec<Spanned<String>>,
    #[serde(default)]
    subscribe: Vec<Spanned<String>>,
    #[serde(default)]
    call: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFetch {
    url: String,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    memory: Option<Spanned<String>>,
    worker_memory: Option<Spanned<String>>,
    cpu: Option<Spanned<toml::Value>>,
    pids: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
    max_output: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    tmpfs: Option<Spanned<String>>,
    init_timeout: Option<Spanned<String>>,
    log_rate: Option<Spanned<String>>,
    audit_rate: Option<Spanned<i64>>,
    host_calls: Option<Spanned<i64>>,
    instances: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<Spanned<String>>,
    id: Option<Spanned<toml::Value>>,
    runtime: Option<Spanned<toml::Value>>,
    publisher: Option<Spanned<toml::Value>>,
    signed: Option<bool>,
    tags: Option<Spanned<toml::Value>>,
    level: Spanned<String>,
    #[serde(default)]
    limits: RawLimits,
}

/// Reports problems at positions of one file.
struct File<'a> {
    path: &'a Path,
    text: &'a str,
    /// Positions are named for every value: looked up, not rescanned.
    lines: LineIndex,
}

impl File<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl ToString) -> PolicyError {
        let (line, column) = self.lines.line_col(self.text, span.map_or(0, |s| s.start));
        PolicyError {
            path: self.path.to_owned(),
            line,
            column,
            message: message.to_string(),
        }
    }

    fn origin(&self, span: Range<usize>) -> Origin {
        let (line, column) = self.lines.line_col(self.text, span.start);
        Origin::File {
            path: self.path.to_owned(),
            line,
            column,
        }
    }

    fn setting<T>(&self, value: T, span: Range<usize>) -> Setting<T> {
        Setting {
            value,
            origin: self.origin(span),
        }
    }
}

/// Parse one file into `levels` and `routes`, pushing every problem to `errors`.
pub(crate) fn parse_file(
    path: &Path,
    text: &str,
    levels: &mut [Limits; 3],
    routes: &mut Vec<Route>,
    grants: &mut Vec<Grant>,
    errors: &mut Vec<PolicyError>,
) {
    let file = File {
        path,
        text,
        lines: LineIndex::new(text),
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            errors.push(file.error(e.span(), e.message().trim_end().to_owned()));
            return;
        }
    };
    for (name, raw_limits) in &raw.level {
        let level = match parse_level(name.get_ref()) {
            Ok(l) => l,
            Err(m) => {
                errors.push(file.error(Some(name.span()), m));
                continue;
            }
        };
        let Some(limits) = limits(&file, raw_limits, errors) else {
            continue;
        };
        merge(
            &file,
            level,
            &mut levels[level_index(level)],
            limits,
            errors,
        );
    }
    // Routes by name so far (earlier files' too), found without a scan per route.
    let mut named: std::collections::HashMap<String, usize> = routes
        .iter()
        .enumerate()
        .map(|(i, r)| (r.name.clone(), i))
        .collect();
    for (i, r) in raw.route.iter().enumerate() {
        if let Some(route) = route(&file, i + 1, r, errors) {
            // A route's name is what explanations and the audit log cite: one
            // name, one route.
            if let Some(name) = &r.name
                && let Some(first) = named.get(name.get_ref()).map(|&i| &routes[i])
            {
                errors.push(file.error(
                    Some(name.span()),
                    format!(
                        "route name `{}` is already used by the route at {}",
                        name.get_ref(),
                        first.origin
                    ),
                ));
                continue;
            }
            named.entry(route.name.clone()).or_insert(routes.len());
            routes.push(route);
        }
    }
    for (i, g) in raw.grant.iter().enumerate() {
        if let Some(g) = grant(&file, i + 1, g, errors) {
            grants.push(g);
        }
    }
}

fn parse_level(s: &str) -> Result<Level, String> {
    s.parse().map_err(|_| {
        format!(
            "unknown level `{s}`; expected one of: {}",
            LEVELS.map(|l| l.as_str()).join(", ")
        )
    })
}

/// Put `new`'s values into `into`, refusing values already set by an earlier file.
fn merge(
    file: &File<'_>,
    level: Level,
    into: &mut Limits,
    new: Limits,
    errors: &mut Vec<PolicyError>,
) {
    fn one<T>(
        file: &File<'_>,
        level: Level,
        key: &str,
        into: &mut Option<Setting<T>>,
        new: Option<Setting<T>>,
        errors: &mut Vec<PolicyError>,
    ) {
        let Some(new) = new else { return };
        match into {
            Some(old) => {
                let Origin::File { line, column, .. } = &new.origin else {
                    return;
                };
                errors.push(PolicyError {
                    path: file.path.to_owned(),
                    line: *line,
                    column: *column,
                    message: format!("`{key}` of level {level} is already set at {}", old.origin),
                });
            }
            None => *into = Some(new),
        }
    }
    one(file, level, "memory", &mut into.memory, new.memory, errors);
    one(
        file,
        level,
        "worker_memory",
        &mut into.worker_memory,
        new.worker_memory,
        errors,
    );
    one(file, level, "cpu", &mut into.cpu, new.cpu, errors);
    one(file, level, "pids", &mut into.pids, new.pids, errors);
    one(
        file,
        level,
        "timeout",
        &mut into.timeout,
        new.timeout,
        errors,
    );
    one(
        file,
        level,
        "max_output",
        &mut into.max_output,
        new.max_output,
        errors,
    );
    one(file, level, "user", &mut into.user, new.user, errors);
    one(file, level, "tmpfs", &mut into.tmpfs, new.tmpfs, errors);
    one(
        file,
        level,
        "init_timeout",
        &mut into.init_timeout,
        new.init_timeout,
        errors,
    );
    one(
        file,
        level,
        "log_rate",
        &mut into.log_rate,
        new.log_rate,
        errors,
    );
    one(
        file,
        level,
        "audit_rate",
        &mut into.audit_rate,
        new.audit_rate,
        errors,
    );
    one(
        file,
        level,
        "host_calls",
        &mut into.host_calls,
        new.host_calls,
        errors,
    );
    one(
        file,
        level,
        "instances",
        &mut into.instances,
        new.instances,
        errors,
    );
}

/// Validate a limits table; `None` if anything in it is wrong (reported).
fn limits(file: &File<'_>, raw: &RawLimits, errors: &mut Vec<PolicyError>) -> Option<Limits> {
    let before = errors.len();
    let mut size = |s: &Option<Spanned<String>>, min: u64, what: &str| {
        let s = s.as_ref()?;
        let max = if what == "max_output" {
            crate::MAX_OUTPUT_LIMIT
        } else {
            u64::MAX
        };
        match parse_size(s.get_ref()) {
            Ok(v) if (min..=max).contains(&v) => Some(file.setting(v, s.span())),
            Ok(v) if v > max => {
                errors.push(file.error(
                    Some(s.span()),
                    format!(
                        "{what} must be at most {} (a result travels in one frame of {})",
                        crate::size(max),
                        crate::size(u64::from(corral_protocol::frame::MAX_FRAME))
                    ),
                ));
                None
            }
            Ok(_) => {
                errors.push(file.error(
                    Some(s.span()),
                    format!("{what} must be at least {}", crate::size(min)),
                ));
                None
            }
            Err(m) => {
                errors.push(file.error(Some(s.span()), m));
                None
            }
        }
    };
    let memory = size(&raw.memory, 1 << 20, "memory");
    let worker_memory = size(&raw.worker_memory, 32 << 20, "worker_memory");
    let max_output = size(&raw.max_output, 1, "max_output");
    let tmpfs = size(&raw.tmpfs, 64 << 10, "tmpfs");
    let log_rate = size(&raw.log_rate, 1 << 10, "log_rate");
    if let (Some(m), Some(w)) = (&memory, &worker_memory)
        && w.value < m.value
    {
        errors.push(file.error(
            raw.worker_memory.as_ref().map(|s| s.span()),
            format!(
                "worker_memory ({}) is below memory ({}): the worker holds the engine's \
                 memory plus the runtime",
                crate::size(w.value),
                crate::size(m.value)
            ),
        ));
    }
    let cpu = raw.cpu.as_ref().and_then(|c| match parse_cpu(c.get_ref()) {
        Ok(v) => Some(file.setting(v, c.span())),
        Err(m) => {
            errors.push(file.error(Some(c.span()), m));
            None
        }
    });
    let pids = raw.pids.as_ref().and_then(|p| match *p.get_ref() {
        n @ 4..=65536 => Some(file.setting(n as u64, p.span())),
        n => {
            errors.push(file.error(
                Some(p.span()),
                format!(
                    "pids must be between 4 and 65536 (the worker itself needs a few \
                     threads), not {n}"
                ),
            ));
            None
        }
    });
    let mut duration = |v: &Option<Spanned<String>>, what: &str| {
        let v = v.as_ref()?;
        match parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(file.setting(d, v.span())),
            Ok(_) => {
                let m = format!("{what} must be greater than zero");
                errors.push(file.error(Some(v.span()), m));
                None
            }
            Err(m) => {
                errors.push(file.error(Some(v.span()), m));
                None
            }
        }
    };
    let timeout = duration(&raw.timeout, "timeout");
    let init_timeout = duration(&raw.init_timeout, "init_timeout");
    let mut count = |v: &Option<Spanned<i64>>, range: std::ops::RangeInclusive<i64>, what: &str| {
        let v = v.as_ref()?;
        if range.contains(v.get_ref()) {
            Some(file.setting(*v.get_ref() as u64, v.span()))
        } else {
            errors.push(file.error(
                Some(v.span()),
                format!(
                    "{what} must be between {} and {}, not {}",
                    range.start(),
                    range.end(),
                    v.get_ref()
                ),
            ));
            None
        }
    };
    let audit_rate = count(&raw.audit_rate, 1..=10_000, "audit_rate");
    let host_calls = count(&raw.host_calls, 1..=64, "host_calls");
    let instances = count(
        &raw.instances,
        1..=i64::from(corral_manifest::MAX_INSTANCES),
        "instances",
    );
    let user = raw
        .user
        .as_ref()
        .and_then(|u| match parse_user(u.get_ref()) {
            Ok(v) => Some(file.setting(v, u.span())),
            Err(m) => {
                errors.push(file.error(Some(u.span()), m));
                None
            }
        });
    (errors.len() == before).then_some(Limits {
        memory,
        worker_memory,
        cpu,
        pids,
        timeout,
        max_output,
        user,
        tmpfs,
        init_timeout,
        log_rate,
        audit_rate,
        host_calls,
        instances,
    })
}

/// CPUs as a number (`0.5`, `2`) or a string (`"0.5"`).
pub fn parse_cpu(v: &toml::Value) -> Result<f64, String> {
    let n = match v {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 0.0 && n <= 1024.0 && n.is_finite() => Ok(n),
        Some(n) => Err(format!(
            "cpu must be more than 0 and at most 1024 CPUs, not {n}"
        )),
        None => Err(format!(
            "invalid cpu {v}: expected a number of CPUs such as 1, 0.5 or \"0.25\""
        )),
    }
}

fn parse_user(s: &str) -> Result<RunAs, String> {
    let refuse_root = || {
        Err(
            "user must not be root: workers run unprivileged (use e.g. \"nobody\" or \
             \"65534:65534\")"
                .to_owned(),
        )
    };
    if let Some((u, g)) = s.split_once(':') {
        let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>()) else {
            return Err(format!(
                "invalid user {s:?}: expected a user name or numeric \"uid:gid\""
            ));
        };
        if uid == 0 || gid == 0 {
            return refuse_root();
        }
        return Ok(RunAs::Ids { uid, gid });
    }
    let name_ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !s.starts_with('-');
    if !name_ok {
        return Err(format!(
            "invalid user {s:?}: expected a user name or numeric \"uid:gid\""
        ));
    }
    if s == "root" || s == "0" {
        return refuse_root();
    }
    Ok(RunAs::Name(s.to_owned()))
}

/// Strings from a string or an array of strings.
fn strings(
    file: &File<'_>,
    v: &Spanned<toml::Value>,
    what: &str,
) -> Result<Vec<String>, PolicyError> {
    let bad = || {
        file.error(
            Some(v.span()),
            format!("{what} must be a string or an array of strings"),
        )
    };
    match v.get_ref() {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

fn route(file: &File<'_>, n: usize, r: &RawRoute, errors: &mut Vec<PolicyError>) -> Option<Route> {
    let before = errors.len();
    let mut list = |v: &Option<Spanned<toml::Value>>, what: &str| match v {
        None => Vec::new(),
        Some(v) => strings(file, v, what).unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        }),
    };
    let ids = list(&r.id, "id");
    let runtimes = list(&r.runtime, "runtime");
    let publisher = list(&r.publisher, "publisher");
    let tags = list(&r.tags, "tags");
    let id = id_globs(file, ids, &r.id, errors);
    let mut runtime = Vec::new();
    for name in runtimes {
        match Runtime::from_name(&name) {
            Some(r) => runtime.push(r),
            None => errors.push(file.error(
                r.runtime.as_ref().map(|v| v.span()),
                format!("unknown runtime `{name}`; expected one of: wasm, js, python"),
            )),
        }
    }
    for t in &tags {
        if let Err(m) = corral_manifest::validate_tag(t) {
            errors.push(file.error(r.tags.as_ref().map(|v| v.span()), m));
        }
    }
    let level = match parse_level(r.level.get_ref()) {
        Ok(l) => Some(l),
        Err(m) => {
            errors.push(file.error(Some(r.level.span()), m));
            None
        }
    };
    let limits = limits(file, &r.limits, errors);
    if errors.len() != before {
        return None;
    }
    Some(Route {
        name: r
            .name
            .as_ref()
            .map(|n| n.get_ref().clone())
            .unwrap_or_else(|| format!("route {n} of {}", file.path.display())),
        origin: file.origin(r.level.span()),
        id,
        runtime,
        publisher,
        signed: r.signed,
        tags,
        level: level?,
        limits: limits?,
    })
}

fn id_globs(
    file: &File<'_>,
    ids: Vec<String>,
    at: &Option<Spanned<toml::Value>>,
    errors: &mut Vec<PolicyError>,
) -> Vec<IdGlob> {
    let mut id = Vec::new();
    for pattern in ids {
        match globset::GlobBuilder::new(&pattern)
            .literal_separator(true)
            .build()
        {
            Ok(g) => id.push(IdGlob {
                matcher: g.compile_matcher(),
                pattern,
            }),
            Err(e) => errors.push(file.error(
                at.as_ref().map(|v| v.span()),
                format!("invalid id glob {pattern:?}: {}", e.kind()),
            )),
        }
    }
    id
}

fn grant(
    file: &File<'_>,
    n: usize,
    g: &Spanned<RawGrant>,
    errors: &mut Vec<PolicyError>,
) -> Option<Grant> {
    let before = errors.len();
    let span = g.span();
    let g = g.get_ref();
    let ids = match &g.id {
        None => Vec::new(),
        Some(v) => strings(file, v, "id").unwrap_or_else(|e| {
            errors.push(e);
            Vec::new()
        }),
    };
    let id = id_globs(file, ids, &g.id, errors);
    let mut size = |s: &Option<Spanned<String>>| {
        let s = s.as_ref()?;
        match parse_size(s.get_ref()) {
            Ok(v) => Some(file.setting(v, s.span())),
            Err(m) => {
                errors.push(file.error(Some(s.span()), m));
                None
            }
        }
    };
    let kv_quota = size(&g.kv_quota);
    let fetch_max_response = size(&g.fetch_max_response);
    let fetch_timeout = g
        .fetch_timeout
        .as_ref()
        .and_then(|t| match parse_duration(t.get_ref()) {
            Ok(d) => Some(file.setting(d, t.span())),
            Err(m) => {
                errors.push(file.error(Some(t.span()), m));
                None
            }
        });
    let mut fetch = Vec::new();
    for f in &g.fetch {
        match FetchRule::parse(&f.get_ref().url, &f.get_ref().methods) {
            Ok(r) => fetch.push(r),
            Err(m) => errors.push(file.error(Some(f.span()), m)),
        }
    }
    let mut globs = |list: &[Spanned<String>]| {
        let mut out = Vec::new();
        for t in list {
            match NameGlob::new(t.get_ref()) {
                Ok(g) => out.push(g),
                Err(m) => errors.push(file.error(Some(t.span()), m)),
            }
        }
        out
    };
    let publish = globs(&g.publish);
    let subscribe = globs(&g.subscribe);
    let mut call = Vec::new();
    for c in &g.call {
        let (p, f) = match c.get_ref().split_once(':') {
            Some((p, f)) => (p, Some(f)),
            None => (c.get_ref().as_str(), None),
        };
        match (NameGlob::new(p), f.map(NameGlob::new).transpose()) {
            (Ok(p), Ok(f)) => call.push((p, f)),
            (Err(m), _) | (_, Err(m)) => errors.push(file.error(Some(c.span()), m)),
        }
    }
    if errors.len() != before {
        return None;
    }
    Some(Grant {
        name: g
            .name
            .clone()
            .unwrap_or_else(|| format!("grant {n} of {}", file.path.display())),
        origin: file.origin(span),
        id,
        kv_quota,
        fetch,
        fetch_max_response,
        fetch_timeout,
        publish,
        subscribe,
        call,
    })
}
