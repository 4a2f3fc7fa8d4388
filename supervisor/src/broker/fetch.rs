//! The HTTP fetch broker: the supervisor makes requests for plugins, only where the
//! plugin's grants allow (method, scheme, host, port, path prefix), re-checking every
//! redirect, with a response size limit and a time limit that never outlasts the
//! plugin's call.
//!
//! A grant for a name is not a grant for whatever the name resolves to. Every hop's
//! host is resolved here, each address is judged (a loopback, private, link-local,
//! unique-local or other special-use address only where a rule names it, see
//! [`corral_policy::special_use`]), and the connection is pinned to the addresses
//! judged: the HTTP client resolves nothing itself, so a second DNS answer (a
//! rebinding) never reaches it. Each hop gets its own client with no pooled
//! connections, so no connection made for one plugin or address is reused for
//! another.
//!
//! A name lookup (`getaddrinfo`, on tokio's blocking pool) cannot be cancelled: a
//! fetch that gives up at its deadline leaves its lookup running until the
//! resolver answers, seconds later with a slow one. So the lookups running are
//! bounded where they run, not by the calls that asked: at most
//! [`LOOKUPS_PER_PLUGIN`] for one plugin and [`LOOKUPS`] in all, each place given
//! back when its lookup ends. A plugin asking for names that never resolve, as
//! fast as its deadlines let it, holds its own few threads, not the pool that
//! every plugin's store writes and lookups share.

use super::places::Places;
use super::quoted;
use corral_policy::{Services, special_use};
use corral_protocol::{FetchRequest, FetchResponse, HostError};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Semaphore;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Name lookups of one plugin running at once (its fetches past that wait).
pub const LOOKUPS_PER_PLUGIN: usize = 4;
/// Name lookups running at once in all (a quarter of tokio's blocking pool).
pub const LOOKUPS: usize = 128;

/// What resolves a name: `getaddrinfo`, or a test's stand-in.
type Resolve = Arc<dyn Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>> + Send + Sync>;

/// The broker's HTTP requests (no automatic redirects, no proxies from the
/// environment, no pooled connections, every address pinned).
#[derive(Clone)]
pub struct Fetcher {
    resolve: Resolve,
    /// Places for the lookups running, in all and per plugin.
    all: Arc<Semaphore>,
    plugins: Arc<Places>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("lookups free", &self.all.available_permits())
            .finish_non_exhaustive()
    }
}

impl Default for Fetcher {
    fn default() -> Fetcher {
        Fetcher::new()
    }
}

impl Fetcher {
    pub fn new() -> Fetcher {
        Fetcher::resolving_with(Arc::new(|name, port| {
            (name, port).to_socket_addrs().map(Iterator::collect)
        }))
    }

    fn resolving_with(resolve: Resolve) -> Fetcher {
        Fetcher {
            resolve,
            all: Arc::new(Semaphore::new(LOOKUPS)),
            plugins: Arc::new(Places::new(LOOKUPS_PER_PLUGIN)),
        }
    }

    /// `name`'s addresses, looked up on the blocking pool once `plugin` has a
    /// place for it (waited for until `until`); the places are held by the lookup
    /// itself, so a lookup outliving its fetch still counts.
    async fn lookup(
        &self,
        plugin: &str,
        name: &str,
        port: u16,
        until: Instant,
    ) -> Result<Vec<IpAddr>, HostError> {
        let waited = |whose: String| {
            HostError::Failed(format!(
                "cannot resolve {name}: {whose} still running (a lookup ends when the \
                 resolver answers, not with the fetch that asked)"
            ))
        };
        let until = tokio::time::Instant::from_std(until);
        let own = tokio::time::timeout_at(until, self.plugins.take(plugin))
            .await
            .map_err(|_| waited(format!("{plugin}'s {LOOKUPS_PER_PLUGIN} name lookups")))?;
        let shared = tokio::time::timeout_at(until, Arc::clone(&self.all).acquire_owned())
            .await
            .map_err(|_| waited(format!("the supervisor's {LOOKUPS} name lookups")))?
            .map_err(|_| HostError::Failed("name lookups closed".into()))?;
        let resolve = Arc::clone(&self.resolve);
        let owned = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let _places = (own, shared);
            resolve(&owned, port)
        })
        .await
        .map_err(|e| HostError::Failed(format!("name lookup: {e}")))?
        .map(|addrs| addrs.into_iter().map(|a| a.ip()).collect())
        .map_err(|e| HostError::Failed(format!("cannot resolve {name}: {e}")))
    }

    /// A client that connects `url`'s host to `addrs` only.
    fn client(url: &url::Url, addrs: &[SocketAddr]) -> Result<reqwest::Client, HostError> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .user_agent(concat!("corral/", env!("CARGO_PKG_VERSION")));
        if let Some(url::Host::Domain(name)) = url.host() {
            b = b.resolve_to_addrs(name, addrs);
        }
        b.build()
            .map_err(|e| HostError::Failed(format!("HTTP client: {}", chain(&e))))
    }

    /// Resolve `url`'s host and judge every address: the ones this request may
    /// connect to, or a denial naming the first special-use address refused when
    /// none is left.
    async fn admit(
        &self,
        (plugin, services): (&str, &Services),
        method: &str,
        url: &url::Url,
        until: Instant,
    ) -> Result<Vec<SocketAddr>, HostError> {
        let port = url.port_or_known_default().unwrap_or(0);
        let host = url.host_str().unwrap_or_default();
        let found: Vec<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(a)) => vec![IpAddr::V4(a)],
            Some(url::Host::Ipv6(a)) => vec![IpAddr::V6(a)],
            Some(url::Host::Domain(name)) => {
                self.lookup(plugin, name, port, until)
                    .await
                    .map_err(|e| match e {
                        HostError::Failed(why) => HostError::Failed(format!("{url}: {why}")),
                        e => e,
                    })?
            }
            None => return Err(HostError::Invalid(format!("{url} has no host"))),
        };
        let mut refused = None;
        let mut admitted = Vec::new();
        for a in found {
            let a = a.to_canonical();
            if admitted.iter().any(|s: &SocketAddr| s.ip() == a) {
                continue;
            }
            match special_use(a) {
                None => admitted.push(SocketAddr::new(a, port)),
                Some(class) => match services.check_fetch_address(
                    method,
                    url.scheme(),
                    (host, port, url.path()),
                    a,
                    class,
                ) {
                    Ok(_) => admitted.push(SocketAddr::new(a, port)),
                    Err(rule) => {
                        refused.get_or_insert(rule);
                    }
                },
            }
        }
        match (admitted.is_empty(), refused) {
            (false, _) => Ok(admitted),
            (true, Some(rule)) => Err(HostError::Denied { rule }),
            (true, None) => Err(HostError::Failed(format!(
                "{url}: {host} resolves to no address"
            ))),
        }
    }

    /// Check `url` for `method` against the grants; the allowing rule or a denial.
    fn check(services: &Services, method: &str, url: &url::Url) -> Result<String, HostError> {
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(0);
        services
            .check_fetch(method, url.scheme(), host, port, url.path())
            .map_err(|rule| HostError::Denied { rule })
    }

    /// Perform `req` for `plugin`, whose grants are `services`, finishing by
    /// `deadline` at the latest.
    pub async fn fetch(
        &self,
        plugin: &str,
        services: &Services,
        req: FetchRequest,
        deadline: Instant,
    ) -> Result<FetchResponse, HostError> {
        let mut method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| {
                HostError::Invalid(format!("{} is not an HTTP method", quoted(&req.method)))
            })?;
        let mut url = url::Url::parse(&req.url)
            .map_err(|e| HostError::Invalid(format!("bad URL {}: {e}", quoted(&req.url))))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HostError::Invalid(format!(
                "URL scheme {}: only http and https",
                quoted(url.scheme())
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(HostError::Invalid(
                "credentials in the URL are not accepted; send a header".into(),
            ));
        }
        let limit = services.fetch_max_response.value;
        let timeout = services
            .fetch_timeout
            .value
            .min(deadline.saturating_duration_since(Instant::now()));
        let until = Instant::now() + timeout;
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| HostError::Invalid(format!("bad header name {}", quoted(k))))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| HostError::Invalid(format!("bad value for header {}", quoted(k))))?;
            headers.append(name, value);
        }
        let mut body = req.body;
        let work = async {
            let mut hops = 0;
            loop {
                let hop = |e| match e {
                    HostError::Denied { rule } if hops > 0 => HostError::Denied {
                        rule: format!("redirect to {url}: {rule}"),
                    },
                    e => e,
                };
                Self::check(services, method.as_str(), &url).map_err(hop)?;
                let addrs = self
                    .admit((plugin, services), method.as_str(), &url, until)
                    .await
                    .map_err(hop)?;
                let mut r = Self::client(&url, &addrs)?
                    .request(method.clone(), url.clone())
                    .headers(headers.clone());
                if !body.is_empty() {
                    r = r.body(body.clone());
                }
                let mut resp = r
                    .send()
                    .await
                    .map_err(|e| HostError::Failed(format!("{method} {url}: {}", chain(&e))))?;
                let status = resp.status();
                if status.is_redirection()
                    && let Some(loc) = resp.headers().get(reqwest::header::LOCATION)
                {
                    hops += 1;
                    if hops > MAX_REDIRECTS {
                        return Err(HostError::Failed(format!(
                            "{method} {}: more than {MAX_REDIRECTS} redirects",
                            req.url
                        )));
                    }
                    let loc = loc.to_str().map_err(|_| {
                        HostError::Failed(format!("{url}: redirect location is not text"))
                    })?;
                    url = url.join(loc).map_err(|e| {
                        HostError::Failed(format!("{url}: bad redirect location {loc:?}: {e}"))
                    })?;
                    if status == reqwest::StatusCode::SEE_OTHER
                        || (matches!(status.as_u16(), 301 | 302) && method == reqwest::Method::POST)
                    {
                        method = reqwest::Method::GET;
                        body.clear();
                    }
                    continue;
                }
                if resp.content_length().is_some_and(|n| n > limit) {
                    return Err(HostError::Failed(format!(
                        "{method} {url}: response of {} bytes exceeds the limit of {limit} \
                         bytes ({})",
                        resp.content_length().unwrap_or(0),
                        services.fetch_max_response.origin
                    )));
                }
                let mut out = Vec::new();
                while let Some(chunk) = resp
                    .chunk()
                    .await
                    .map_err(|e| HostError::Failed(format!("{method} {url}: {}", chain(&e))))?
                {
                    if (out.len() + chunk.len()) as u64 > limit {
                        return Err(HostError::Failed(format!(
                            "{method} {url}: response exceeds the limit of {limit} bytes ({})",
                            services.fetch_max_response.origin
                        )));
                    }
                    out.extend_from_slice(&chunk);
                }
                return Ok(FetchResponse {
                    status: status.as_u16(),
                    url: url.to_string(),
                    headers: resp
                        .headers()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                    body: out,
                });
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(HostError::Failed(format!(
                "{} {}: no complete answer within {timeout:?} (fetch_timeout {:?} from {}, \
                 or the rest of the call's deadline)",
                req.method, req.url, services.fetch_timeout.value, services.fetch_timeout.origin
            ))),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn grants() -> Services {
        let policy = corral_policy::Policy::parse(&[(
            "grants.toml".into(),
            "[[grant]]\nid = \"*\"\nfetch = [{ url = \"http://*.test/\" }]\n".into(),
        )])
        .unwrap();
        let m = corral_manifest::Manifest::parse(
            "id = \"x\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n",
            "plugin.toml".as_ref(),
        )
        .unwrap();
        policy.resolve(&m, None).services
    }

    fn get(url: &str) -> FetchRequest {
        FetchRequest {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A plugin whose fetches give up while their name lookups hang (a resolver
    /// that never answers) holds at most its own few lookups: the ones it asks
    /// for past them wait for a place and fail saying why, never reaching the
    /// resolver; another plugin's lookup goes on at once; and the places come
    /// back when the lookups end, not when the fetches did.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugins_hanging_name_lookups_hold_its_own_places_not_the_pool() {
        let running = Arc::new(AtomicUsize::new(0));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let resolve: Resolve = {
            let running = Arc::clone(&running);
            Arc::new(move |name, port| {
                if name == "hang.test" {
                    running.fetch_add(1, Ordering::SeqCst);
                    let _ = released.lock().unwrap().recv();
                    running.fetch_sub(1, Ordering::SeqCst);
                }
                Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
            })
        };
        let fetcher = Fetcher::resolving_with(resolve);
        let services = grants();
        let soon = || Instant::now() + Duration::from_millis(150);
        // Ten fetches, four at a time as a worker's host calls would come.
        for _ in 0..10 {
            let tries =
                (0..4).map(|_| fetcher.fetch("a", &services, get("http://hang.test/"), soon()));
            for r in futures_util::future::join_all(tries).await {
                let Err(HostError::Failed(why)) = r else {
                    panic!("{r:?}")
                };
                assert!(
                    why.contains("no complete answer within")
                        || why.ends_with(
                            "cannot resolve hang.test: a's 4 name lookups still running (a \
                             lookup ends when the resolver answers, not with the fetch that asked)"
                        ),
                    "{why}"
                );
            }
            assert_eq!(running.load(Ordering::SeqCst), LOOKUPS_PER_PLUGIN);
        }
        // Another plugin's lookup is not held back: it resolves, and its address
        // is judged (loopback, which no rule names).
        let r = fetcher
            .fetch("b", &services, get("http://fast.test/"), soon())
            .await;
        let Err(HostError::Denied { rule }) = r else {
            panic!("{r:?}")
        };
        assert!(rule.contains("127.0.0.1"), "{rule}");
        assert_eq!(
            fetcher.all.available_permits(),
            LOOKUPS - LOOKUPS_PER_PLUGIN
        );
        // The lookups end: their places come back.
        for _ in 0..LOOKUPS_PER_PLUGIN {
            release.send(()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fetcher.all.available_permits() < LOOKUPS {
            assert!(Instant::now() < deadline, "the places did not come back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(running.load(Ordering::SeqCst), 0);
        let r = fetcher
            .fetch("a", &services, get("http://fast.test/"), soon())
            .await;
        assert!(matches!(r, Err(HostError::Denied { .. })), "{r:?}");
    }
}
