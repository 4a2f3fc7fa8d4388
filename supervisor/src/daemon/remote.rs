//! The remote call API: calls and read-only status over HTTPS (`[remote]` in
//! `corral.toml`, off by default), for callers on other machines. The request and
//! response format is docs/remote.md.
//!
//! - **TLS** (rustls) with the operator's certificate and key; plain HTTP only on a
//!   loopback address (behind a proxy on the same machine that terminates TLS).
//! - **Who**: a bearer token (`Authorization: Bearer ...`, compared in constant time
//!   on SHA-256 digests) or, with `client_ca`, a client certificate that chains to
//!   it and names the caller's `client` DNS name. Nothing else is anonymous but
//!   `GET /healthz`.
//! - **What**: each caller's `allow` list of `plugin:function` globs (deny by
//!   default), and `status = true` for `GET /v1/status`. Every refusal (no or a
//!   wrong credential, a plugin or function not allowed) is audited as
//!   `remote.call` / `remote.status` with the rule.
//! - **How much**: request bodies of at most `max_body` (refused by their announced
//!   length, or as soon as they run past it; never more than `max_body` held), at most
//!   `max_concurrent` calls in flight per caller (`429` past it), at most
//!   [`MAX_CONNECTIONS`] connections, TLS handshakes within [`HANDSHAKE_TIMEOUT`],
//!   request heads of [`MAX_HEAD`] within [`HEAD_TIMEOUT`], bodies within
//!   [`BODY_TIMEOUT`].
//!
//! The call itself is [`Supervisor::call`], with the same error kinds as the
//! control socket.

use crate::Supervisor;
use base64::Engine as _;
use corral_protocol::{CallError, Secret};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 256;
/// The largest request head read.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request head may take to arrive.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The default and the largest `max_body`.
pub const DEFAULT_MAX_BODY: u64 = 1 << 20;
pub const MAX_MAX_BODY: u64 = 64 << 20;
/// The default `max_concurrent` per caller.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// The largest certificate or key file read.
const MAX_PEM: u64 = 1 << 20;

/// `[remote]` of `corral.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    pub listen: SocketAddr,
    /// The server's certificate chain and key (PEM); `None` only on loopback.
    pub tls: Option<TlsFiles>,
    /// PEM CAs whose client certificates identify callers by `client`.
    pub client_ca: Option<PathBuf>,
    pub max_body: u64,
    pub max_concurrent: usize,
    pub callers: Vec<Caller>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[remote.caller]]`: one identity and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub token: Option<Secret>,
    /// A DNS name its client certificate must be valid for.
    pub client: Option<String>,
    /// `plugin:function` globs (`plugin` alone: every function).
    pub allow: Vec<String>,
    /// Whether it may read `GET /v1/status`.
    pub status: bool,
}

impl RemoteConfig {
    /// What the configuration file cannot say by its shape: a loopback address for
    /// plain HTTP, callers with a credential, `client` only with `client_ca`, valid
    /// globs, distinct names and tokens.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "listen = \"{}\" without tls_cert and tls_key: plain HTTP is served only on \
                 a loopback address (tokens would cross the network in the clear)",
                self.listen
            ));
        }
        if self.max_body == 0 || self.max_body > MAX_MAX_BODY {
            return Err(format!(
                "max_body must be between 1 byte and {}",
                corral_policy::size(MAX_MAX_BODY)
            ));
        }
        if self.max_concurrent == 0 {
            return Err("max_concurrent must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        let mut tokens = std::collections::BTreeSet::new();
        for c in &self.callers {
            if corral_manifest::validate_id(&c.name).is_err() {
                return Err(format!(
                    "caller name {:?}: 1-64 characters of a-z 0-9 . _ -, starting with a letter \
                     or digit",
                    c.name
                ));
            }
            if !names.insert(c.name.as_str()) {
                return Err(format!("caller {:?} is listed twice", c.name));
            }
            match (&c.token, &c.client) {
                (None, None) => {
                    return Err(format!(
                        "caller {:?} has neither a token nor a client certificate name",
                        c.name
                    ));
                }
                (_, Some(_)) if self.client_ca.is_none() => {
                    return Err(format!(
                        "caller {:?} names a client certificate, but [remote] has no client_ca",
                        c.name
                    ));
                }
                _ => {}
            }
            if let Some(t) = &c.token {
                if t.0.len() < 16 {
                    return Err(format!(
                        "caller {:?}: a token of at least 16 characters (`openssl rand -hex 32`)",
                        c.name
                    ));
                }
                if !tokens.insert(t.0.as_str()) {
                    return Err(format!("caller {:?} shares its token with another", c.name));
                }
            }
            if let Some(n) = &c.client {
                rustls::pki_types::ServerName::try_from(n.as_str())
                    .map_err(|e| format!("caller {:?}: client {n:?}: {e}", c.name))?;
            }
            Allow::new(&c.allow).map_err(|e| format!("caller {:?}: {e}", c.name))?;
        }
        Ok(())
    }
}

/// A caller's `allow` globs, compiled.
#[derive(Debug)]
struct Allow(Vec<(globset::GlobMatcher, globset::GlobMatcher)>);

impl Allow {
    fn new(rules: &[String]) -> Result<Allow, String> {
        let glob = |g: &str| {
            globset::Glob::new(g)
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("allow {g:?}: {e}"))
        };
        rules
            .iter()
            .map(|r| {
                let (p, f) = r.split_once(':').unwrap_or((r, "*"));
                if p.is_empty() || f.is_empty() {
                    return Err(format!(
                        "allow {r:?}: plugin:function, either may be a glob"
                    ));
                }
                Ok((glob(p)?, glob(f)?))
            })
            .collect::<Result<_, _>>()
            .map(Allow)
    }

    fn allows(&self, plugin: &str, function: &str) -> bool {
        self.0
            .iter()
            .any(|(p, f)| p.is_match(plugin) && f.is_match(function))
    }
}

/// A caller, ready to check.
#[derive(Debug)]
struct Identity {
    name: String,
    token: Option<[u8; 32]>,
    client: Option<rustls::pki_types::ServerName<'static>>,
    allow: Allow,
    rules: String,
    status: bool,
    in_flight: Arc<tokio::sync::Semaphore>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Equal in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a connection is served with: swapped whole when SIGHUP reloads `[remote]`
/// (new tokens, callers and certificates apply to the next connection).
struct State {
    tls: Option<tokio_rustls::TlsAcceptor>,
    callers: Vec<Identity>,
    max_body: u64,
    max_concurrent: usize,
}

impl State {
    /// Read the certificates and compile the callers of `config`; a caller kept
    /// under the same name and limit keeps its calls in flight.
    fn load(config: &RemoteConfig, old: Option<&State>) -> Result<State, String> {
        config.validate()?;
        let tls = match &config.tls {
            Some(files) => Some(server_tls(files, config.client_ca.as_deref())?),
            None => None,
        };
        let callers = config
            .callers
            .iter()
            .map(|c| {
                let in_flight = old
                    .filter(|o| o.max_concurrent == config.max_concurrent)
                    .and_then(|o| o.callers.iter().find(|k| k.name == c.name))
                    .map(|k| Arc::clone(&k.in_flight))
                    .unwrap_or_else(|| {
                        Arc::new(tokio::sync::Semaphore::new(config.max_concurrent))
                    });
                Ok(Identity {
                    name: c.name.clone(),
                    token: c.token.as_ref().map(|t| digest(t.0.as_bytes())),
                    client: match &c.client {
                        Some(n) => Some(
                            rustls::pki_types::ServerName::try_from(n.clone())
                                .map_err(|e| format!("client {n:?}: {e}"))?,
                        ),
                        None => None,
                    },
                    allow: Allow::new(&c.allow)?,
                    rules: if c.allow.is_empty() {
                        "nothing".into()
                    } else {
                        c.allow.join(", ")
                    },
                    status: c.status,
                    in_flight,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(State {
            tls,
            callers,
            max_body: config.max_body,
            max_concurrent: config.max_concurrent,
        })
    }
}

type Slot = Arc<std::sync::RwLock<Arc<State>>>;

fn current(slot: &Slot) -> Arc<State> {
    Arc::clone(&slot.read().unwrap_or_else(|e| e.into_inner()))
}

/// The listener, bound, with its TLS configuration loaded.
pub struct RemoteServer {
    listener: TcpListener,
    state: Slot,
}

impl std::fmt::Debug for RemoteServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteServer")
            .field("listener", &self.listener)
            .field("tls", &self.tls())
            .finish_non_exhaustive()
    }
}

/// Applies a reloaded `[remote]` to a running [`RemoteServer`].
#[derive(Clone)]
pub struct RemoteReloader {
    listen: SocketAddr,
    state: Slot,
}

impl std::fmt::Debug for RemoteReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReloader")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

impl RemoteReloader {
    /// Serve the next connections with `config`'s callers, limits and
    /// certificates (read again: a renewed certificate applies); or say why not,
    /// keeping what is in force. A new `listen` waits for a restart.
    pub fn apply(&self, config: &RemoteConfig) -> Result<Vec<String>, String> {
        let old = current(&self.state);
        let new = State::load(config, Some(&old))?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        Ok(if config.listen != self.listen {
            vec!["remote.listen changed: it takes effect when the daemon restarts".into()]
        } else {
            Vec::new()
        })
    }
}

fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    corral_files::read_regular(path, MAX_PEM).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn certificates(
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = read_pem(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn server_tls(
    files: &TlsFiles,
    client_ca: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let chain = certificates(&files.cert, "tls_cert")?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(&files.key, "tls_key")?)
        .map_err(|e| format!("tls_key {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca, "client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            }
            // A certificate is checked when one is offered; a caller with a token
            // needs none.
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("tls_cert and tls_key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

impl RemoteServer {
    /// Load the certificates and bind `config.listen`.
    pub async fn bind(config: &RemoteConfig) -> Result<RemoteServer, String> {
        let state = State::load(config, None)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        Ok(RemoteServer {
            listener,
            state: Arc::new(std::sync::RwLock::new(Arc::new(state))),
        })
    }

    /// The address it listens on (the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether it serves TLS.
    pub fn tls(&self) -> bool {
        current(&self.state).tls.is_some()
    }

    /// What applies a reloaded configuration to it while it serves.
    pub fn reloader(&self, listen: SocketAddr) -> RemoteReloader {
        RemoteReloader {
            listen,
            state: Arc::clone(&self.state),
        }
    }

    /// Serve callers of `sup` until the task is dropped.
    pub async fn serve(self, sup: Arc<Supervisor>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: wait rather than spin.
                    tracing::warn!("remote: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                drop(stream); // Full: closed at once rather than queued.
                continue;
            };
            let _ = stream.set_nodelay(true);
            let api = Arc::new(Api {
                sup: Arc::clone(&sup),
                state: current(&self.state),
            });
            tokio::spawn(async move {
                let _slot = slot;
                match api.state.tls.clone() {
                    Some(acceptor) => {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, "remote: TLS handshake failed: {e}");
                                    return;
                                }
                                Err(_) => return,
                            };
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| c.clone().into_owned());
                        serve_connection(stream, api, peer, cert).await;
                    }
                    None => serve_connection(stream, api, peer, None).await,
                }
            });
        }
    }
}

async fn serve_connection<S>(
    stream: S,
    api: Arc<Api>,
    peer: SocketAddr,
    cert: Option<rustls::pki_types::CertificateDer<'static>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let cert = Arc::new(cert);
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let (api, cert) = (Arc::clone(&api), Arc::clone(&cert));
        async move {
            Ok::<_, std::convert::Infallible>(api.answer(req, peer, cert.as_ref().as_ref()).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .serve_connection(io, service)
        .await;
}

/// One connection's view: the supervisor and the configuration it was accepted
/// under.
struct Api {
    sup: Arc<Supervisor>,
    state: Arc<State>,
}

/// The body of every error answer.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    kind: &'a str,
    message: String,
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, kind: &str, message: String) -> Response<Full<Bytes>> {
    json_response(
        status,
        &ErrorBody {
            error: ErrorFields { kind, message },
        },
    )
}

/// The HTTP status of a call's error: the kind is in the body.
pub fn status_of(e: &CallError) -> StatusCode {
    match e {
        CallError::UnknownPlugin { .. } | CallError::UnknownFunction { .. } => {
            StatusCode::NOT_FOUND
        }
        CallError::BadInput { .. } => StatusCode::BAD_REQUEST,
        CallError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
        CallError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        CallError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        CallError::Plugin { .. }
        | CallError::Trap { .. }
        | CallError::MemoryLimit { .. }
        | CallError::OutputTooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        CallError::WorkerCrashed(_)
        | CallError::PluginFailed { .. }
        | CallError::StartFailed { .. } => StatusCode::BAD_GATEWAY,
    }
}

/// `{"input": base64}` or `{"text": "..."}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonCall {
    input: Option<String>,
    text: Option<String>,
}

#[derive(Serialize)]
struct JsonAnswer {
    /// The result, base64.
    output: String,
    /// The result as text when it is UTF-8.
    text: Option<String>,
}

impl Api {
    async fn answer(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        cert: Option<&rustls::pki_types::CertificateDer<'static>>,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        if path == "/healthz" {
            return match *req.method() {
                Method::GET | Method::HEAD => {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    r
                }
                _ => error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "bad_request",
                    "GET /healthz".into(),
                ),
            };
        }
        let (operation, target) = if path == "/v1/status" {
            ("remote.status", String::new())
        } else if let Some(rest) = path.strip_prefix("/v1/call/") {
            ("remote.call", rest.to_owned())
        } else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no {path}: POST /v1/call/<plugin>/<function>, GET /v1/status, GET /healthz"
                ),
            );
        };
        let Some(caller) = self.identify(&req, cert) else {
            let rule = "no valid bearer token or client certificate";
            self.sup.audit_remote_denial(
                None,
                operation,
                &target,
                &format!("{rule} (from {})", peer.ip()),
            );
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                format!("{rule} (Authorization: Bearer <token>)"),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"corral\""),
            );
            return r;
        };
        if operation == "remote.status" {
            if req.method() != Method::GET {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "bad_request",
                    "GET /v1/status".into(),
                );
            }
            if !caller.status {
                let rule = format!(
                    "caller {} may not read the status (status = false)",
                    caller.name
                );
                self.sup
                    .audit_remote_denial(Some(&caller.name), operation, &target, &rule);
                return error(StatusCode::FORBIDDEN, "denied", rule);
            }
            let plugins = self.sup.list().await;
            return json_response(StatusCode::OK, &crate::cli::output::plugins_json(&plugins));
        }
        let Some((plugin, function)) = target
            .split_once('/')
            .filter(|(p, f)| !p.is_empty() && !f.is_empty() && !f.contains('/'))
        else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no {path}: POST /v1/call/<plugin>/<function>"),
            );
        };
        if req.method() != Method::POST {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "bad_request",
                format!("POST {path}"),
            );
        }
        if !caller.allow.allows(plugin, function) {
            let rule = format!("caller {} may call: {}", caller.name, caller.rules);
            self.sup.audit_remote_denial(
                Some(&caller.name),
                operation,
                &format!("{plugin}:{function}"),
                &rule,
            );
            return error(
                StatusCode::FORBIDDEN,
                "denied",
                format!("{plugin}:{function} is not allowed; {rule}"),
            );
        }
        let Ok(_in_flight) = Arc::clone(&caller.in_flight).try_acquire_owned() else {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "caller {} has {} calls in flight (max_concurrent); retry later",
                    caller.name, self.state.max_concurrent
                ),
            );
        };
        let timeout = match query(&req, "timeout_ms") {
            None => None,
            Some(t) => match t.parse::<u64>() {
                Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_input",
                        format!("timeout_ms={t}: a number of milliseconds above 0"),
                    );
                }
            },
        };
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = match self.body(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let input = if json {
            match parse_json_call(&body) {
                Ok(i) => i,
                Err(m) => return error(StatusCode::BAD_REQUEST, "bad_input", m),
            }
        } else {
            body.to_vec()
        };
        match self.sup.call(plugin, function, input, timeout).await {
            Ok(output) if json => json_response(
                StatusCode::OK,
                &JsonAnswer {
                    output: base64::engine::general_purpose::STANDARD.encode(&output),
                    text: String::from_utf8(output).ok(),
                },
            ),
            Ok(output) => {
                let mut r = Response::new(Full::new(Bytes::from(output)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/octet-stream"),
                );
                r
            }
            Err(e) => error(status_of(&e), e.kind(), e.to_string()),
        }
    }

    /// The caller a certificate (checked by TLS against `client_ca`) or a bearer
    /// token names.
    fn identify(
        &self,
        req: &Request<Incoming>,
        cert: Option<&rustls::pki_types::CertificateDer<'static>>,
    ) -> Option<&Identity> {
        if let Some(cert) = cert
            && let Ok(end) = webpki::EndEntityCert::try_from(cert)
            && let Some(c) = self.state.callers.iter().find(|c| {
                c.client
                    .as_ref()
                    .is_some_and(|n| end.verify_is_valid_for_subject_name(n).is_ok())
            })
        {
            return Some(c);
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .trim();
        let d = digest(token.as_bytes());
        // Every caller is compared, so the time does not say which one matched.
        let mut found = None;
        for c in self.state.callers.iter() {
            if c.token.as_ref().is_some_and(|t| same(t, &d)) {
                found = Some(c);
            }
        }
        found
    }

    /// The request body: refused by its announced length, or as soon as it runs
    /// past `max_body`; never more than `max_body` bytes held.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
        let max = self.state.max_body;
        let too_large = |what: String| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what}; at most {} (max_body)", corral_policy::size(max)),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut body = req.into_body();
        if let Some(n) = declared
            && n > max
        {
            discard(&mut body).await;
            return Err(too_large(format!("a body of {n} bytes")));
        }
        let mut held = Vec::with_capacity(declared.unwrap_or(0) as usize);
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("the body: {e}"))?;
                if let Ok(data) = frame.into_data() {
                    if (held.len() + data.len()) as u64 > max {
                        return Ok(false);
                    }
                    held.extend_from_slice(&data);
                }
            }
            Ok::<_, String>(true)
        };
        match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Ok(Ok(true)) => Ok(Bytes::from(held)),
            Ok(Ok(false)) => {
                discard(&mut body).await;
                Err(too_large("a longer body".into()))
            }
            Ok(Err(m)) => Err(error(StatusCode::BAD_REQUEST, "bad_input", m)),
            Err(_) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "bad_input",
                format!("the body did not arrive within {}s", BODY_TIMEOUT.as_secs()),
            )),
        }
    }
}

/// Bytes of a refused body read and thrown away (for at most [`DISCARD_TIME`]),
/// so that a client still sending it reads the answer instead of a reset
/// connection; past that the connection is closed.
const DISCARD: u64 = 4 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(2);

async fn discard(body: &mut Incoming) {
    let drain = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                seen += d.len() as u64;
                if seen > DISCARD {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn parse_json_call(body: &[u8]) -> Result<Vec<u8>, String> {
    let call: JsonCall = serde_json::from_slice(body).map_err(|e| {
        format!("the JSON body: {e} (expected {{\"input\": base64}} or {{\"text\": \"...\"}})")
    })?;
    match (call.input, call.text) {
        (Some(b64), None) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("input: not base64: {e}")),
        (None, Some(text)) => Ok(text.into_bytes()),
        (None, None) => Ok(Vec::new()),
        (Some(_), Some(_)) => Err("give input (base64) or text, not both".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(callers: Vec<Caller>) -> RemoteConfig {
        RemoteConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            client_ca: None,
            max_body: DEFAULT_MAX_BODY,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            callers,
        }
    }

    fn caller(name: &str, token: &str, allow: &[&str]) -> Caller {
        Caller {
            name: name.into(),
            token: Some(Secret(token.into())),
            client: None,
            allow: allow.iter().map(|s| s.to_string()).collect(),
            status: false,
        }
    }

    #[test]
    fn allow_lists_are_plugin_function_globs_and_deny_by_default() {
        let a = Allow::new(&[
            "pricing".into(),
            "orders:submit".into(),
            "hello-*:gr*".into(),
        ])
        .unwrap();
        assert!(a.allows("pricing", "anything"));
        assert!(a.allows("orders", "submit"));
        assert!(!a.allows("orders", "cancel"));
        assert!(a.allows("hello-js", "greet"));
        assert!(!a.allows("hello-js", "reverse"));
        assert!(!Allow::new(&[]).unwrap().allows("pricing", "x"));
        assert!(Allow::new(&[":x".into()]).is_err());
    }

    #[test]
    fn the_configuration_is_checked_before_anything_listens() {
        let long = "0123456789abcdef0123";
        assert!(config(vec![caller("a", long, &["p"])]).validate().is_ok());
        let mut c = config(vec![caller("a", long, &[])]);
        c.listen = "0.0.0.0:8443".parse().unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .contains("plain HTTP is served only on a loopback")
        );
        for (callers, error) in [
            (vec![caller("a", "short", &[])], "at least 16 characters"),
            (
                vec![
                    caller("a", long, &[]),
                    caller("a", "another-long-token", &[]),
                ],
                "listed twice",
            ),
            (
                vec![caller("a", long, &[]), caller("b", long, &[])],
                "shares its token",
            ),
            (vec![caller("a", long, &["["])], "allow \"[\""),
        ] {
            let e = config(callers).validate().unwrap_err();
            assert!(e.contains(error), "{e}");
        }
        let mut c = config(vec![Caller {
            token: None,
            client: Some("billing.internal".into()),
            ..caller("a", long, &[])
        }]);
        assert!(c.validate().unwrap_err().contains("no client_ca"));
        c.client_ca = Some("ca.pem".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn tokens_compare_by_digest_in_constant_time() {
        let a = digest(b"token-one-0123456789");
        assert!(same(&a, &digest(b"token-one-0123456789")));
        assert!(!same(&a, &digest(b"token-one-012345678")));
    }
}
