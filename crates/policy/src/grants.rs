//! `[[grant]]`: which host services a plugin may use. Everything is denied unless a
//! grant allows it; every grant whose `id` globs match a plugin applies to it, and
//! a decision names the grant (file:line:column) that allowed it, or the grants that
//! applied when nothing did.
//!
//! ```toml
//! [[grant]]
//! name = "examples"
//! id = ["hello-*"]                # plugin id globs (absent: every plugin)
//! kv_quota = "1MiB"               # key-value store size (keys + values); absent: no store
//! fetch = [{ url = "http://127.0.0.1:*/", methods = ["GET"] }]
//! fetch_max_response = "1MiB"     # default 4 MiB
//! fetch_timeout = "5s"            # default 10 s (and never past the call's deadline)
//! publish = ["hello.*"]           # topic globs
//! subscribe = ["hello.*"]
//! call = ["hello-wasm", "tools-*:render"]   # plugin id glob, optionally :function glob
//! ```
//!
//! A fetch rule's `url` is `scheme://host[:port][/path-prefix]`: `host` may be a glob
//! (`*.example.com`), `port` a number or `*` (absent: the scheme's default), and the
//! request's path must start with the prefix. `methods` defaults to `["GET"]`.
//!
//! A rule for a name is not a rule for whatever the name resolves to: loopback,
//! private, link-local, unique-local and other special-use addresses are refused
//! unless a rule allowing the request names that address itself (`http://10.0.0.5/`,
//! `http://[fd00::1]:8080/`), never through a name or a glob.

use crate::{IdGlob, Origin, Setting};
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Default largest fetch response body.
pub const DEFAULT_FETCH_MAX_RESPONSE: u64 = 4 << 20;
/// Default fetch time limit.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A glob over topics, plugin ids or function names, with its text.
#[derive(Debug, Clone)]
pub struct NameGlob {
    pub pattern: String,
    pub(crate) matcher: globset::GlobMatcher,
}

/// Why a grant's rule cannot be used; the policy reader puts the file, line and
/// column around it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("invalid glob {pattern:?}: {reason}")]
    Glob { pattern: String, reason: String },
    #[error("fetch url {0:?} must start with http:// or https://")]
    NoScheme(String),
    #[error("fetch url scheme {0:?}: use http or https")]
    Scheme(String),
    #[error("fetch url {0:?} has no host")]
    NoHost(String),
    #[error("fetch url {url:?}: port {port:?} is not a number or *")]
    Port { url: String, port: String },
    #[error("fetch method {0:?} is not an HTTP method")]
    Method(String),
}

impl NameGlob {
    pub fn new(pattern: &str) -> Result<NameGlob, RuleError> {
        globset::Glob::new(pattern)
            .map(|g| NameGlob {
                matcher: g.compile_matcher(),
                pattern: pattern.to_owned(),
            })
            .map_err(|e| RuleError::Glob {
                pattern: pattern.to_owned(),
                reason: e.kind().to_string(),
            })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

/// One allowed kind of HTTP request.
#[derive(Debug, Clone)]
pub struct FetchRule {
    /// The rule as written (`GET http://127.0.0.1:*/`).
    pub text: String,
    pub scheme: String,
    pub host: NameGlob,
    /// `None`: any port.
    pub port: Option<u16>,
    pub path_prefix: String,
    pub methods: Vec<String>,
    /// The address the rule's host names, when it is one (`10.0.0.5`, `[::1]`).
    pub address: Option<IpAddr>,
}

impl FetchRule {
    /// Parse `url` (`scheme://host[:port][/prefix]`) and `methods`.
    pub fn parse(url: &str, methods: &[String]) -> Result<FetchRule, RuleError> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| RuleError::NoScheme(url.to_owned()))?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            other => return Err(RuleError::Scheme(other.to_owned())),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                (&authority[..i], Some(&authority[i + 1..]))
            }
            _ => (authority, None),
        };
        if host.is_empty() {
            return Err(RuleError::NoHost(url.to_owned()));
        }
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| RuleError::Port {
                url: url.to_owned(),
                port: p.to_owned(),
            })?),
        };
        let methods: Vec<String> = if methods.is_empty() {
            vec!["GET".into()]
        } else {
            methods.iter().map(|m| m.to_ascii_uppercase()).collect()
        };
        for m in &methods {
            if !m.bytes().all(|b| b.is_ascii_uppercase()) || m.is_empty() {
                return Err(RuleError::Method(m.clone()));
            }
        }
        // An IPv6 literal's brackets would be a glob character class: an address is
        // matched as written, and remembered for the special-address check.
        let address = canonical(host.trim_start_matches('[').trim_end_matches(']'));
        let host = host.to_ascii_lowercase();
        let host = match address {
            Some(_) => NameGlob::new(&globset::escape(&host))?,
            None => NameGlob::new(&host)?,
        };
        Ok(FetchRule {
            text: format!("{} {url}", methods.join(",")),
            scheme: scheme.to_owned(),
            host,
            address,
            port,
            path_prefix: path.to_owned(),
            methods,
        })
    }

    /// Whether the rule allows `method` on these parts at `address`, named literally
    /// by the rule (the only way a special-use address is allowed).
    pub fn allows_address(
        &self,
        method: &str,
        scheme: &str,
        address: IpAddr,
        port: u16,
        path: &str,
    ) -> bool {
        self.address == Some(address.to_canonical())
            && self.methods.iter().any(|m| m == method)
            && self.scheme == scheme
            && self.port.is_none_or(|p| p == port)
            && path.starts_with(&self.path_prefix)
    }

    /// Whether the rule allows `method` on a URL with these parts.
    pub fn allows(&self, method: &str, scheme: &str, host: &str, port: u16, path: &str) -> bool {
        self.methods.iter().any(|m| m == method)
            && self.scheme == scheme
            && self.host.is_match(&host.to_ascii_lowercase())
            && self.port.is_none_or(|p| p == port)
            && path.starts_with(&self.path_prefix)
    }
}

/// A `[[grant]]` table.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The operator's name for it, or `grant N of FILE`.
    pub name: String,
    pub origin: Origin,
    /// Any of these plugin id globs (empty: every plugin).
    pub id: Vec<IdGlob>,
    pub kv_quota: Option<Setting<u64>>,
    pub fetch: Vec<FetchRule>,
    pub fetch_max_response: Option<Setting<u64>>,
    pub fetch_timeout: Option<Setting<Duration>>,
    pub publish: Vec<NameGlob>,
    pub subscribe: Vec<NameGlob>,
    /// (plugin glob, function glob or `None` for any function).
    pub call: Vec<(NameGlob, Option<NameGlob>)>,
}

impl Grant {
    pub fn applies_to(&self, plugin: &str) -> bool {
        self.id.is_empty() || self.id.iter().any(|g| g.matcher.is_match(plugin))
    }
}

/// Grants are the same when they come from the same place under the same name.
impl PartialEq for Grant {
    fn eq(&self, other: &Grant) -> bool {
        self.name == other.name && self.origin == other.origin
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grant {:?} ({})", self.name, self.origin)
    }
}

/// The services one plugin may use: the grants that apply to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Services {
    pub plugin: String,
    pub grants: Vec<Grant>,
    /// Store size; 0 when no grant gives one.
    pub kv_quota: Setting<u64>,
    pub fetch_max_response: Setting<u64>,
    pub fetch_timeout: Setting<Duration>,
}

/// Which rule decided a host call: `Ok(rule that allows it)` or `Err(rule that
/// refuses it)`; a decision, not a failure (denials are audited with the rule).
pub type Decision = Result<String, String>;

impl Services {
    pub(crate) fn of(plugin: &str, all: &[Grant]) -> Services {
        let grants: Vec<Grant> = all
            .iter()
            .filter(|g| g.applies_to(plugin))
            .cloned()
            .collect();
        let first = |f: &dyn Fn(&Grant) -> Option<Setting<u64>>| grants.iter().find_map(f);
        let kv_quota = first(&|g| g.kv_quota.clone()).unwrap_or(Setting {
            value: 0,
            origin: Origin::Derived("no grant sets kv_quota: no store".into()),
        });
        let fetch_max_response = first(&|g| g.fetch_max_response.clone()).unwrap_or(Setting {
            value: DEFAULT_FETCH_MAX_RESPONSE,
            origin: Origin::BuiltIn,
        });
        let fetch_timeout = grants
            .iter()
            .find_map(|g| g.fetch_timeout.clone())
            .unwrap_or(Setting {
                value: DEFAULT_FETCH_TIMEOUT,
                origin: Origin::BuiltIn,
            });
        Services {
            plugin: plugin.to_owned(),
            grants,
            kv_quota,
            fetch_max_response,
            fetch_timeout,
        }
    }

    /// Why nothing allowed `what`: default deny, and the grants that applied.
    fn denied(&self, what: &str, field: &str) -> String {
        let mut s = format!(
            "default deny: no [[grant]] {field} rule allows {what} for plugin {}",
            self.plugin
        );
        if self.grants.is_empty() {
            s.push_str(" (no grant applies to it)");
        } else {
            let names: Vec<String> = self.grants.iter().map(ToString::to_string).collect();
            s.push_str(&format!(" (grants that apply: {})", names.join(", ")));
        }
        s
    }

    /// May the plugin use its store? (A quota above zero.)
    pub fn check_kv(&self) -> Decision {
        if self.kv_quota.value > 0 {
            Ok(format!(
                "kv_quota {} ({})",
                crate::size(self.kv_quota.value),
                self.kv_quota.origin
            ))
        } else {
            Err(self.denied("a key-value store", "kv_quota"))
        }
    }

    /// The first fetch rule of the grants that `allows`, with its grant.
    fn fetch_rule(&self, allows: impl Fn(&FetchRule) -> bool) -> Option<(&Grant, &FetchRule)> {
        self.grants
            .iter()
            .find_map(|g| g.fetch.iter().find(|r| allows(r)).map(|r| (g, r)))
    }

    /// May the plugin make this request? `url` parts as parsed by the caller.
    pub fn check_fetch(
        &self,
        method: &str,
        scheme: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> Decision {
        if let Some((g, r)) = self.fetch_rule(|r| r.allows(method, scheme, host, port, path)) {
            return Ok(format!("{g}: fetch {}", r.text));
        }
        Err(self.denied(&format!("{method} {scheme}://{host}:{port}{path}"), "fetch"))
    }

    /// May the plugin connect to `address`, a special-use address (`class`:
    /// loopback, private, ...) that `host` resolved to, for this request? Only a
    /// rule allowing the request that names the address itself allows it.
    pub fn check_fetch_address(
        &self,
        method: &str,
        scheme: &str,
        (host, port, path): (&str, u16, &str),
        address: IpAddr,
        class: &str,
    ) -> Decision {
        let names = |r: &FetchRule| r.allows_address(method, scheme, address, port, path);
        if let Some((g, r)) = self.fetch_rule(names) {
            return Ok(format!("{g}: fetch {} (names {address})", r.text));
        }
        let what = if host.trim_start_matches('[').trim_end_matches(']') == address.to_string() {
            format!("{address}, a {class} address,")
        } else {
            format!("{host}, which resolves to {address}, a {class} address,")
        };
        let mut s = format!(
            "special-use address: {what} is refused unless a fetch rule names {address} \
             itself; no [[grant]] does for {method} {scheme}://{host}:{port}{path} for \
             plugin {}",
            self.plugin
        );
        if self.grants.is_empty() {
            s.push_str(" (no grant applies to it)");
        }
        Err(s)
    }

    pub fn check_publish(&self, topic: &str) -> Decision {
        self.check_topic(topic, "publish", |g| &g.publish)
    }

    pub fn check_subscribe(&self, topic: &str) -> Decision {
        self.check_topic(topic, "subscribe", |g| &g.subscribe)
    }

    fn check_topic(
        &self,
        topic: &str,
        field: &str,
        list: impl Fn(&Grant) -> &Vec<NameGlob>,
    ) -> Decision {
        for g in &self.grants {
            if let Some(t) = list(g).iter().find(|t| t.is_match(topic)) {
                return Ok(format!("{g}: {field} {:?}", t.pattern));
            }
        }
        Err(self.denied(&format!("{field} on topic {topic:?}"), field))
    }

    pub fn check_call(&self, plugin: &str, function: &str) -> Decision {
        for g in &self.grants {
            for (p, f) in &g.call {
                if p.is_match(plugin) && f.as_ref().is_none_or(|f| f.is_match(function)) {
                    let rule = match f {
                        Some(f) => format!("{}:{}", p.pattern, f.pattern),
                        None => p.pattern.clone(),
                    };
                    return Ok(format!("{g}: call {rule:?}"));
                }
            }
        }
        Err(self.denied(&format!("calling {plugin}.{function}"), "call"))
    }
}

/// What kind of special-use address `address` is (IANA's special-purpose registries),
/// or `None` for an ordinary public one. IPv4-mapped, IPv4-compatible, NAT64 and
/// 6to4 addresses are judged by the IPv4 address they carry.
pub fn special_use(address: IpAddr) -> Option<&'static str> {
    match address.to_canonical() {
        IpAddr::V4(a) => special_v4(a),
        IpAddr::V6(a) => {
            let s = a.segments();
            let o = a.octets();
            let v4 = |i: usize| std::net::Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
            if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique-local")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[..6] == [0; 6] {
                // ::a.b.c.d, the deprecated IPv4-compatible form.
                special_v4(v4(12)).or(Some("reserved"))
            } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..2] == [0x64, 0xff9b] {
                // NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48).
                special_v4(v4(12)).or((s[1] != 0xff9b || s[2] != 0).then_some("NAT64 local-use"))
            } else if s[0] == 0x2002 {
                special_v4(v4(2))
            } else if s[0] == 0x2001 && s[1] < 0x200 {
                // 2001::/23: IETF protocol assignments (Teredo, ORCHIDv2, benchmarking).
                Some("IETF protocol assignment")
            } else if s[0] == 0x2001 && s[1] == 0xdb8 || s[0] == 0x3fff && s[1] < 0x1000 {
                Some("documentation")
            } else if s[0] == 0x100 && s[1..4] == [0, 0, 0] {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

fn special_v4(a: std::net::Ipv4Addr) -> Option<&'static str> {
    let [b0, b1, b2, _] = a.octets();
    Some(match (b0, b1, b2) {
        (0, _, _) => "unspecified (\"this network\")",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (192, 0, 0) => "IETF protocol assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (192, 88, 99) => "6to4 relay anycast",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        _ => return None,
    })
}

/// `text` as an address, IPv4-mapped IPv6 addresses as IPv4 (the address a
/// connection reaches).
fn canonical(text: &str) -> Option<IpAddr> {
    text.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// One permission a plugin's `plugin.toml` asks for, and what its grants say of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    /// As written: `kv`, `http api.example.com:443`, `publish orders`, ...
    pub what: String,
    /// `Ok(grant that allows it)` or `Err(why not)`.
    pub decision: Decision,
}

impl Services {
    /// What `m` asks for in `[permissions]`, each judged by these grants. Requests
    /// are informational: the grants decide at every host call.
    pub fn judge(&self, m: &corral_manifest::Manifest) -> Vec<Requested> {
        let p = &m.permissions;
        let mut out = Vec::new();
        let mut push = |what: String, decision: Decision| out.push(Requested { what, decision });
        if p.kv {
            push("kv".into(), self.check_kv());
        }
        for h in &p.http {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().ok()),
                None => (h.as_str(), None),
            };
            // Allowed if a grant lets it fetch from the host over https or http.
            let decision = [("https", 443), ("http", 80)]
                .into_iter()
                .map(|(scheme, default)| {
                    self.check_fetch("GET", scheme, host, port.unwrap_or(default), "/")
                })
                .find(Result::is_ok)
                .unwrap_or_else(|| Err(self.denied(&format!("fetch from {h}"), "fetch")));
            push(format!("http {h}"), decision);
        }
        for t in &p.publish {
            push(format!("publish {t}"), self.check_publish(t));
        }
        for s in &p.subscribe {
            let topic = s.split_once('=').map_or(s.as_str(), |(t, _)| t).trim();
            push(format!("subscribe {s}"), self.check_subscribe(topic));
        }
        for c in &p.call {
            let (plugin, function) = c.split_once(':').unwrap_or((c.as_str(), "*"));
            push(format!("call {c}"), self.check_call(plugin, function));
        }
        out
    }
}
