//! The remote call API (`[remote]`, docs/remote.md) from a caller's side: a real
//! `corral serve` with TLS on 127.0.0.1, certificates made in the test (a server
//! CA, a client CA and a CA nobody trusts), and reqwest as the client.

use crate::services::audit_line;
use base64::Engine as _;
use corral_integration_tests::daemon::Served;
use corral_integration_tests::tls::Ca;
use corral_integration_tests::{fixture_plugin, open_tempdir};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const OPS_TOKEN: &str = "ops-3f9c1a7e55d04b2a9e61";
const ROTATED_TOKEN: &str = "ops-rotated-8d2e44c1b7a09f36";
const READER_TOKEN: &str = "reader-0b7d93e2a4c15f68";
const WRONG_TOKEN: &str = "ops-3f9c1a7e55d04b2a9e62";

/// A daemon with one JavaScript plugin `rjs` callers may reach and one, `vault`,
/// nobody may; TLS with a server certificate for 127.0.0.1, client certificates
/// from `clients`; callers: `ops` (a token file; rjs's echo, spin and fail, and
/// the status), `billing` (a client certificate; every function of rjs) and
/// `reader` (a token; nothing).
struct Remote {
    daemon: Served,
    url: String,
    server_ca: Ca,
    clients: Ca,
    _plugins: Vec<tempfile::TempDir>,
}

impl Remote {
    fn start(dir: &Path) -> Remote {
        let rjs = fixture_plugin("js-kit", "rjs", "js", "main.js", "timeout = \"10s\"");
        let vault = fixture_plugin("js-kit", "vault", "js", "main.js", "");
        let server_ca = Ca::new("corral test server CA");
        let clients = Ca::new("corral test client CA");
        let (cert, key) = server_ca.issue(&["127.0.0.1"]);
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        std::fs::write(dir.join("clients.pem"), clients.pem()).unwrap();
        std::fs::write(dir.join("ops.token"), format!("{OPS_TOKEN}\n")).unwrap();
        let config = format!(
            "plugins = [{:?}, {:?}]\nsocket = \"run/control.sock\"\ncache_dir = \"cache\"\n\
             state_dir = \"state\"\naudit = \"audit.jsonl\"\npolicy = {:?}\n\n\
             [remote]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"server.pem\"\n\
             tls_key = \"server.key\"\nclient_ca = \"clients.pem\"\nmax_body = \"64KiB\"\n\
             max_concurrent = 1\n\n\
             [[remote.caller]]\nname = \"ops\"\ntoken = {{ file = \"ops.token\" }}\n\
             allow = [\"rjs:echo\", \"rjs:spin\", \"rjs:fail\"]\nstatus = true\n\n\
             [[remote.caller]]\nname = \"billing\"\nclient = \"billing.internal\"\n\
             allow = [\"rjs:*\"]\n\n\
             [[remote.caller]]\nname = \"reader\"\ntoken = {READER_TOKEN:?}\n",
            rjs.path(),
            vault.path(),
            corral_integration_tests::fixture("policy/test.toml"),
        );
        let daemon = Served::start(dir, &config);
        let url = daemon.remote_url();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        Remote {
            daemon,
            url,
            server_ca,
            clients,
            _plugins: vec![rjs, vault],
        }
    }

    /// A client that trusts only the test's server CA, with `identity` (cert and
    /// key PEM) as its client certificate.
    fn client(&self, identity: Option<&(String, String)>) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.server_ca.pem().as_bytes()).unwrap(),
            )
            .timeout(Duration::from_secs(20));
        if let Some((cert, key)) = identity {
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        b.build().unwrap()
    }

    fn audit(&self) -> std::path::PathBuf {
        self.daemon.dir.join("audit.jsonl")
    }
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, String, Vec<u8>) {
    let mut r = client.post(url).body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let a = r.send().await.unwrap();
    let status = a.status();
    let kind = a
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, a.bytes().await.unwrap().to_vec())
}

/// The `error` object of an error answer, checked for its shape.
fn error_of(status: StatusCode, kind: &str, body: &[u8]) -> (String, String) {
    assert_eq!(
        kind,
        "application/json",
        "{status}: {}",
        String::from_utf8_lossy(body)
    );
    let v: Value = serde_json::from_slice(body).unwrap();
    (
        v["error"]["kind"].as_str().unwrap().to_owned(),
        v["error"]["message"].as_str().unwrap().to_owned(),
    )
}

/// Tokens and client certificates, allow-lists, the two body formats, the error
/// kinds, the body and concurrency limits, the status and the health endpoint,
/// and a token rotated by SIGHUP: each with its exact answer, each refusal in the
/// audit log with its rule.
#[test]
fn the_remote_api_serves_only_the_callers_and_calls_it_allows() {
    let dir = open_tempdir();
    let remote = Remote::start(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = remote.client(None);
        let url = |p: &str| format!("{}{p}", remote.url);

        // Health needs no credential; nothing else does without one.
        let h = c.get(url("/healthz")).send().await.unwrap();
        assert_eq!(h.status(), StatusCode::OK);
        assert_eq!(h.text().await.unwrap(), "ok\n");

        // A valid token, raw bytes in and out.
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/echo"), Some(OPS_TOKEN), "hello").await;
        assert_eq!(
            (s, kind.as_str(), body.as_slice()),
            (StatusCode::OK, "application/octet-stream", &b"hello"[..])
        );

        // JSON: text, or base64 for bytes that are not UTF-8.
        let j = c
            .post(url("/v1/call/rjs/echo"))
            .bearer_auth(OPS_TOKEN)
            .json(&json!({"text": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(j.status(), StatusCode::OK);
        assert_eq!(
            j.json::<Value>().await.unwrap(),
            json!({"output": "aGk=", "text": "hi"})
        );
        let raw = [0xff_u8, 0, 0x80];
        let j = c
            .post(url("/v1/call/rjs/echo"))
            .bearer_auth(OPS_TOKEN)
            .json(&json!({"input": base64::engine::general_purpose::STANDARD.encode(raw)}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            j.json::<Value>().await.unwrap(),
            json!({"output": "/wCA", "text": null})
        );
        let (s, kind, body) = call(
            &c,
            &url("/v1/call/rjs/echo"),
            Some(OPS_TOKEN),
            reqwest::Body::from(r#"{"input": "***"}"#),
        )
        .await;
        assert_eq!(
            s,
            StatusCode::OK,
            "raw bytes are not parsed without the JSON content type"
        );
        assert_eq!(body, br#"{"input": "***"}"#, "{kind}");
        let bad = c
            .post(url("/v1/call/rjs/echo"))
            .bearer_auth(OPS_TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"input": "***"}"#)
            .send()
            .await
            .unwrap();
        let s = bad.status();
        let (kind, message) = error_of(s, "application/json", &bad.bytes().await.unwrap());
        assert_eq!(
            (s, kind.as_str()),
            (StatusCode::BAD_REQUEST, "bad_input"),
            "{message}"
        );
        assert!(message.contains("input: not base64"), "{message}");

        // A wrong token and no token: 401, audited under @remote with the peer.
        for token in [Some(WRONG_TOKEN), None] {
            let (s, kind, body) = call(&c, &url("/v1/call/rjs/echo"), token, "x").await;
            let (k, m) = error_of(s, &kind, &body);
            assert_eq!(
                (s, k.as_str()),
                (StatusCode::UNAUTHORIZED, "unauthenticated"),
                "{m}"
            );
        }
        let denied: Vec<Value> = crate::services::audit_lines(&remote.audit())
            .into_iter()
            .filter(|l| l["plugin"] == "@remote")
            .collect();
        assert_eq!(denied.len(), 2, "{denied:#?}");
        for l in &denied {
            assert_eq!(
                (&l["operation"], &l["target"], &l["decision"]),
                (&json!("remote.call"), &json!("rjs/echo"), &json!("denied"))
            );
            assert_eq!(
                l["rule"],
                "no valid bearer token or client certificate (from 127.0.0.1)"
            );
        }
        let log = std::fs::read_to_string(remote.audit()).unwrap() + &remote.daemon.stderr();
        assert!(
            !log.contains(WRONG_TOKEN) && !log.contains(OPS_TOKEN),
            "a token in the logs"
        );

        // A plugin and a function the caller is not allowed: 403, audited under
        // the caller with its rule; the plugin's worker never hears of it.
        let (s, kind, body) = call(&c, &url("/v1/call/vault/echo"), Some(OPS_TOKEN), "x").await;
        let (k, m) = error_of(s, &kind, &body);
        assert_eq!((s, k.as_str()), (StatusCode::FORBIDDEN, "denied"), "{m}");
        let line = audit_line(&remote.audit(), "@remote/ops", "remote.call", "vault:echo");
        assert_eq!(line["decision"], "denied");
        assert_eq!(
            line["rule"],
            "caller ops may call: rjs:echo, rjs:spin, rjs:fail"
        );
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/count"), Some(OPS_TOKEN), "").await;
        assert_eq!(error_of(s, &kind, &body).0, "denied");
        audit_line(&remote.audit(), "@remote/ops", "remote.call", "rjs:count");
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/echo"), Some(READER_TOKEN), "x").await;
        assert_eq!(
            (s, error_of(s, &kind, &body).0.as_str()),
            (StatusCode::FORBIDDEN, "denied")
        );
        assert_eq!(
            audit_line(&remote.audit(), "@remote/reader", "remote.call", "rjs:echo")["rule"],
            "caller reader may call: nothing"
        );
        let list = remote.daemon.cli(&["list", "--json"]);
        let plugins: Value = serde_json::from_slice(&list.stdout).unwrap();
        let vault = plugins
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["id"] == "vault")
            .unwrap();
        assert_eq!(
            vault["calls"], 0,
            "a denied call reached no worker: {vault}"
        );

        // The control socket's error kinds, with their HTTP statuses.
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/fail"), Some(OPS_TOKEN), "").await;
        let (k, m) = error_of(s, &kind, &body);
        assert_eq!(
            (s, k.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "plugin_error")
        );
        assert!(m.contains("boom requested"), "{m}");
        let billing = remote.client(Some(&remote.clients.issue(&["billing.internal"])));
        let (s, kind, body) = call(&billing, &url("/v1/call/rjs/no_such"), None, "").await;
        assert_eq!(
            (s, error_of(s, &kind, &body).0.as_str()),
            (StatusCode::NOT_FOUND, "unknown_function")
        );

        // Bodies: up to max_body (64 KiB) served; past it 413, whether the length
        // is announced or the body is streamed without one.
        let limit = 64 * 1024;
        let (s, _, body) = call(
            &c,
            &url("/v1/call/rjs/echo"),
            Some(OPS_TOKEN),
            vec![b'a'; limit],
        )
        .await;
        assert_eq!((s, body.len()), (StatusCode::OK, limit));
        let (s, kind, body) = call(
            &c,
            &url("/v1/call/rjs/echo"),
            Some(OPS_TOKEN),
            vec![b'a'; limit + 1],
        )
        .await;
        let (k, m) = error_of(s, &kind, &body);
        assert_eq!(
            (s, k.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        );
        assert!(m.contains("65537 bytes") && m.contains("max_body"), "{m}");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..80).map(|_| Ok(vec![b'b'; 1024])).collect();
        let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/echo"), Some(OPS_TOKEN), streamed).await;
        assert_eq!(
            (s, error_of(s, &kind, &body).0.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        );

        // A client certificate names its caller: billing may call any function of
        // rjs, and may not read the status.
        let (s, _, body) = call(&billing, &url("/v1/call/rjs/greet"), None, "Ada").await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let st = billing.get(url("/v1/status")).send().await.unwrap();
        assert_eq!(st.status(), StatusCode::FORBIDDEN);
        audit_line(&remote.audit(), "@remote/billing", "remote.status", "");
        // A certificate for a name no caller has authenticates nobody; one from a
        // CA nobody trusts does not get through the handshake.
        let stranger = remote.client(Some(&remote.clients.issue(&["stranger.internal"])));
        let (s, _, _) = call(&stranger, &url("/v1/call/rjs/greet"), None, "x").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let rogue = remote.client(Some(&Ca::new("rogue").issue(&["billing.internal"])));
        let e = rogue
            .post(url("/v1/call/rjs/greet"))
            .send()
            .await
            .unwrap_err();
        assert!(e.is_connect() || e.is_request(), "{e:?}");
        // Plain HTTP to the TLS port gets no answer.
        let plain = reqwest::Client::new()
            .get(remote.url.replace("https://", "http://") + "/healthz")
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);

        // The status, read-only, for ops.
        let st = c
            .get(url("/v1/status"))
            .bearer_auth(OPS_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(st.status(), StatusCode::OK);
        let st: Value = st.json().await.unwrap();
        let ids: Vec<&str> = st
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["rjs", "vault"]);
        let post = c
            .post(url("/v1/status"))
            .bearer_auth(OPS_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);

        // max_concurrent = 1: while ops's spin runs, ops's next call is 429 (and
        // billing, another caller, is still served); the spin ends as a timeout.
        // The spin is the one call in flight (no other call of ops runs now);
        // once the worker has it, ops's next call is refused at once.
        let spin = {
            let (c, u) = (c.clone(), url("/v1/call/rjs/spin?timeout_ms=4000"));
            tokio::spawn(async move { call(&c, &u, Some(OPS_TOKEN), "").await })
        };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let busy = remote.daemon.cli(&["list", "--json"]);
            let plugins: Value = serde_json::from_slice(&busy.stdout).unwrap();
            let rjs = plugins
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == "rjs")
                .unwrap();
            if rjs["instances"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["busy"] == true)
            {
                break;
            }
            assert!(!spin.is_finished(), "the spin ended before it ran");
            assert!(Instant::now() < until, "the spin never ran: {rjs}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (s, kind, body) = call(&c, &url("/v1/call/rjs/echo"), Some(OPS_TOKEN), "x").await;
        let (k, m) = error_of(s, &kind, &body);
        assert_eq!(
            (s, k.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            "{m}"
        );
        assert!(
            m.contains("caller ops has 1 calls in flight (max_concurrent)"),
            "{m}"
        );
        let (s, _, _) = call(&billing, &url("/v1/call/rjs/ok"), None, "").await;
        assert_eq!(
            s,
            StatusCode::OK,
            "another caller is not held by ops's limit"
        );
        let (s, kind, body) = spin.await.unwrap();
        assert_eq!(
            (s, error_of(s, &kind, &body).0.as_str()),
            (StatusCode::GATEWAY_TIMEOUT, "timeout")
        );
        let (s, _, _) = call(&c, &url("/v1/call/rjs/echo"), Some(OPS_TOKEN), "x").await;
        assert_eq!(s, StatusCode::OK, "the slot is given back");

        // Wrong paths and methods.
        let g = c
            .get(url("/v1/call/rjs/echo"))
            .bearer_auth(OPS_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(g.status(), StatusCode::METHOD_NOT_ALLOWED);
        let n = c
            .post(url("/v2/anything"))
            .bearer_auth(OPS_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(n.status(), StatusCode::NOT_FOUND);

        // A token rotated in its file applies at SIGHUP; the old one stops working.
        std::fs::write(remote.daemon.dir.join("ops.token"), ROTATED_TOKEN).unwrap();
        let before = remote
            .daemon
            .stderr()
            .matches("configuration reloaded")
            .count();
        // SAFETY: kill(2) on the pid of the daemon this test started and has not reaped.
        unsafe { libc::kill(remote.daemon.child.id() as i32, libc::SIGHUP) };
        let until = Instant::now() + Duration::from_secs(10);
        while remote
            .daemon
            .stderr()
            .matches("configuration reloaded")
            .count()
            == before
        {
            assert!(
                Instant::now() < until,
                "no reload:\n{}",
                remote.daemon.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            remote
                .daemon
                .stderr()
                .contains("remote: 3 caller(s) and the certificates read again")
        );
        let c = remote.client(None);
        let (s, _, _) = call(&c, &url("/v1/call/rjs/echo"), Some(OPS_TOKEN), "x").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _, body) = call(&c, &url("/v1/call/rjs/echo"), Some(ROTATED_TOKEN), "x").await;
        assert_eq!((s, body.as_slice()), (StatusCode::OK, &b"x"[..]));
    });
}

/// A `[remote]` the daemon cannot serve is refused before anything listens, with
/// the reason: plain HTTP on a non-loopback address, a key that is not there.
#[test]
fn a_remote_listener_that_cannot_be_served_safely_stops_the_daemon_from_starting() {
    for (remote, expected) in [
        (
            "listen = \"0.0.0.0:0\"\n",
            "without tls_cert and tls_key: plain HTTP is served only on a loopback address",
        ),
        (
            "listen = \"127.0.0.1:0\"\ntls_cert = \"none.pem\"\ntls_key = \"none.key\"\n",
            "tls_cert",
        ),
    ] {
        let dir = open_tempdir();
        std::fs::write(
            dir.path().join("corral.toml"),
            format!("plugins = []\nsocket = \"run/control.sock\"\n[remote]\n{remote}"),
        )
        .unwrap();
        let out = std::process::Command::new(corral_integration_tests::built().corral())
            .args(["serve", "--config"])
            .arg(dir.path().join("corral.toml"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!dir.path().join("run/control.sock").exists());
    }
}
