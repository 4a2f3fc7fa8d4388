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

use corral_policy::{Services, special_use};
use corral_protocol::{FetchRequest, FetchResponse, HostError};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 5;

/// The broker's HTTP requests (no automatic redirects, no proxies from the
/// environment, no pooled connections, every address pinned).
#[derive(Debug, Clone, Default)]
pub struct Fetcher {}

impl Fetcher {
    pub fn new() -> Fetcher {
        Fetcher {}
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
        services: &Services,
        method: &str,
        url: &url::Url,
    ) -> Result<Vec<SocketAddr>, HostError> {
        let port = url.port_or_known_default().unwrap_or(0);
        let host = url.host_str().unwrap_or_default();
        let found: Vec<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(a)) => vec![IpAddr::V4(a)],
            Some(url::Host::Ipv6(a)) => vec![IpAddr::V6(a)],
            Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| HostError::Failed(format!("{url}: cannot resolve {name}: {e}")))?
                .map(|a| a.ip())
                .collect(),
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

    /// Perform `req` for the plugin whose grants are `services`, finishing by
    /// `deadline` at the latest.
    pub async fn fetch(
        &self,
        services: &Services,
        req: FetchRequest,
        deadline: Instant,
    ) -> Result<FetchResponse, HostError> {
        let mut method = reqwest::Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| HostError::Invalid(format!("{:?} is not an HTTP method", req.method)))?;
        let mut url = url::Url::parse(&req.url)
            .map_err(|e| HostError::Invalid(format!("bad URL {:?}: {e}", req.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HostError::Invalid(format!(
                "URL scheme {:?}: only http and https",
                url.scheme()
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
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| HostError::Invalid(format!("bad header name {k:?}")))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| HostError::Invalid(format!("bad value for header {k}")))?;
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
                let addrs = Self::admit(services, method.as_str(), &url)
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
