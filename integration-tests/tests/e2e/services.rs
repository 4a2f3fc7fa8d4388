//! The brokered host services (store, fetch, config and secrets, publish/subscribe,
//! plugin calls, health checks, the audit log), each in all four runtimes through
//! the service kits (`fixtures/svc-kit.wat`, `js-svc`, `py-svc`, and the C
//! `native-kit`), with every denial
//! path and its audit line. Grants: `fixtures/policy/test.toml` gives plugins named
//! `svc-*` a 64 KiB store, GET/POST under `http://127.0.0.1:*/allowed/`, the `news`
//! topics and calls to each other's `host`; other plugins get nothing.

use corral::{AuditSink, Options, PluginConfig, Supervisor};
use corral_integration_tests::daemon::Served;
use corral_integration_tests::{fixture_plugin, native_plugin, open_tempdir, options, wat_plugin};
use corral_protocol::{CallError, Secret};
use corral_worker::services::{decode_list, encode_list};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const RUNTIMES: [&str; 4] = ["wasm", "js", "python", "native"];

/// A service kit plugin `id` in `runtime`, subscribed to `subscribe`.
pub fn kit(runtime: &str, id: &str, subscribe: &[&str]) -> TempDir {
    let dir = match runtime {
        "wasm" => wat_plugin(id, "svc-kit.wat", ""),
        "js" => fixture_plugin("js-svc", id, "js", "main.js", ""),
        "python" => fixture_plugin("py-svc", id, "python", "plugin.py", ""),
        "native" => native_plugin("native-kit", id, ""),
        other => panic!("no kit for {other}"),
    };
    let subs: Vec<String> = subscribe.iter().map(|s| format!("{s:?}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("plugin.toml"))
        .unwrap();
    writeln!(f, "\n[permissions]\nsubscribe = [{}]", subs.join(", ")).unwrap();
    dir
}

/// A supervisor with the given kits, its audit log in a file.
pub struct Env {
    pub sup: Supervisor,
    pub audit: PathBuf,
    _dirs: Vec<TempDir>,
    _cache: TempDir,
}

pub fn env(plugins: &[(&str, &str, &[&str])], tweak: impl FnOnce(&mut Options)) -> Env {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    let audit = cache.path().join("audit.jsonl");
    opts.audit = AuditSink::File(audit.clone());
    tweak(&mut opts);
    let mut sup = Supervisor::new(opts);
    let mut dirs = Vec::new();
    for (runtime, id, subs) in plugins {
        let d = kit(runtime, id, subs);
        sup.add_plugin_dir(d.path()).unwrap();
        dirs.push(d);
    }
    Env {
        sup,
        audit,
        _dirs: dirs,
        _cache: cache,
    }
}

/// Call the kit's `host` with [operation, args...]; the answer list or the error.
pub async fn host(sup: &Supervisor, id: &str, items: &[&[u8]]) -> Result<Vec<Vec<u8>>, String> {
    let input = encode_list(&items.iter().map(|i| i.to_vec()).collect::<Vec<_>>());
    match sup.call(id, "host", input, None).await {
        Ok(out) => Ok(decode_list(&out).expect("the kit answers a list")),
        Err(e) => Err(e.to_string()),
    }
}

fn text(items: &[Vec<u8>]) -> Vec<String> {
    items
        .iter()
        .map(|i| String::from_utf8_lossy(i).into_owned())
        .collect()
}

/// The audit log's lines as JSON.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect()
}

/// The one audit line for `plugin` and `operation` (and `target`), checked for the
/// fields every line has.
pub fn audit_line(path: &Path, plugin: &str, operation: &str, target: &str) -> serde_json::Value {
    let all = audit_lines(path);
    let found: Vec<&serde_json::Value> = all
        .iter()
        .filter(|l| l["plugin"] == plugin && l["operation"] == operation && l["target"] == target)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "audit lines for {plugin} {operation} {target}: {all:#?}"
    );
    let line = found[0].clone();
    assert!(
        line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    assert!(
        line["rule"].as_str().is_some_and(|r| !r.is_empty()),
        "{line}"
    );
    println!("audit: {line}");
    line
}

// ---------------------------------------------------------------- the test server

/// An HTTP/1.1 server on 127.0.0.1 for the fetch tests (one thread per connection):
/// `/allowed/hello` (200, header x-test), `/allowed/echo` (the request body back),
/// `/allowed/bounce` (302 to /allowed/hello), `/allowed/redirect` (302 to
/// /forbidden/x), `/allowed/to-local` (302 to `localhost`), `/allowed/big` (100 KiB), `/allowed/slow` (answers after 3 s),
/// `/forbidden/x`.
pub fn http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_one(s, port));
        }
    });
    port
}

fn serve_one(mut s: TcpStream, port: u16) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let Ok(n) = s.read(&mut chunk) else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let (method, path) = (first[0].to_owned(), first.get(1).copied().unwrap_or("/"));
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let Ok(n) = s.read(&mut chunk) else { return };
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let (status, extra, payload): (&str, String, Vec<u8>) = match path {
        "/allowed/hello" => ("200 OK", "x-test: yes\r\n".into(), b"hello".to_vec()),
        "/allowed/echo" => (
            "200 OK",
            String::new(),
            [method.as_bytes(), b" ", &body].concat(),
        ),
        "/allowed/bounce" => ("302 Found", "location: /allowed/hello\r\n".into(), vec![]),
        "/allowed/redirect" => (
            "302 Found",
            format!("location: http://127.0.0.1:{port}/forbidden/x\r\n"),
            vec![],
        ),
        "/allowed/to-local" => (
            "302 Found",
            format!("location: http://localhost:{port}/allowed/hello\r\n"),
            vec![],
        ),
        "/allowed/big" => ("200 OK", String::new(), vec![b'x'; 100 << 10]),
        "/allowed/slow" => {
            std::thread::sleep(Duration::from_secs(3));
            ("200 OK", String::new(), b"late".to_vec())
        }
        "/forbidden/x" => ("200 OK", String::new(), b"should never be fetched".to_vec()),
        _ => ("404 Not Found", String::new(), vec![]),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
        payload.len()
    );
    let _ = s.write_all(&payload);
}

// ---------------------------------------------------------------- store

#[tokio::test(flavor = "multi_thread")]
async fn store_round_trips_keeps_quota_and_plugins_apart_in_every_runtime() {
    store_contract(&corral::StoreBackend::Redb).await;
}

/// The same contract on the PostgreSQL backend (a private server on 127.0.0.1),
/// and the rows it leaves are the plugins' own, with their usage counted.
#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_store_keeps_the_same_contract_in_every_runtime() {
    let pg = corral_integration_tests::postgres::Postgres::start();
    pg.create_database("contract");
    store_contract(&pg.store("contract")).await;
    for rt in RUNTIMES {
        let a = format!("svc-{rt}");
        assert_eq!(
            pg.psql(
                "contract",
                &format!(
                    "SELECT convert_from(key, 'UTF8') FROM corral_kv WHERE plugin = '{a}' \
                     ORDER BY key"
                )
            ),
            "big\ngreeting",
            "{rt}"
        );
        // The usage row is the bytes of the rows, as the quota counted them.
        assert_eq!(
            pg.psql(
                "contract",
                &format!(
                    "SELECT u.bytes = (SELECT sum(octet_length(key) + octet_length(value)) \
                     FROM corral_kv WHERE plugin = u.plugin) FROM corral_kv_usage u \
                     WHERE u.plugin = '{a}'"
                )
            ),
            "t"
        );
    }
}

/// Keys, values, quota, namespaces, deletes and denials, through the kits of every
/// runtime, on `backend`.
async fn store_contract(backend: &corral::StoreBackend) {
    for rt in RUNTIMES {
        let a = format!("svc-{rt}");
        let b = format!("svc-{rt}-other");
        let mute = format!("mute-{rt}");
        let e = env(&[(rt, &a, &[]), (rt, &b, &[]), (rt, &mute, &[])], |o| {
            o.store = backend.clone()
        });
        let s = &e.sup;
        assert_eq!(
            host(s, &a, &[b"kv_put", b"greeting", b"hello"]).await,
            Ok(vec![])
        );
        assert_eq!(
            host(s, &a, &[b"kv_put", b"greeting/2", &[0, 255]]).await,
            Ok(vec![])
        );
        assert_eq!(
            host(s, &a, &[b"kv_get", b"greeting"]).await,
            Ok(vec![b"hello".to_vec()]),
            "{rt}"
        );
        assert_eq!(
            text(&host(s, &a, &[b"kv_keys", b"greet"]).await.unwrap()),
            ["greeting", "greeting/2"]
        );
        assert_eq!(
            host(s, &a, &[b"kv_get", b"greeting/2"]).await,
            Ok(vec![vec![0, 255]])
        );
        assert_eq!(host(s, &a, &[b"kv_get", b"missing"]).await, Ok(vec![]));
        // Another plugin with the same key names sees its own (empty) store.
        assert_eq!(
            host(s, &b, &[b"kv_get", b"greeting"]).await,
            Ok(vec![]),
            "{rt}"
        );
        assert_eq!(host(s, &b, &[b"kv_keys", b""]).await, Ok(vec![]));
        // Delete answers whether the key existed.
        assert_eq!(
            host(s, &a, &[b"kv_delete", b"greeting/2"]).await,
            Ok(vec![b"1".to_vec()])
        );
        assert_eq!(
            host(s, &a, &[b"kv_delete", b"greeting/2"]).await,
            Ok(vec![b"0".to_vec()])
        );
        // Keys list in byte order (no collation), whatever their script.
        for k in ["o/\u{e9}", "o/z", "o/Z"] {
            assert_eq!(
                host(s, &a, &[b"kv_put", k.as_bytes(), b"1"]).await,
                Ok(vec![])
            );
        }
        assert_eq!(
            text(&host(s, &a, &[b"kv_keys", b"o/"]).await.unwrap()),
            ["o/Z", "o/z", "o/\u{e9}"],
            "{rt}"
        );
        for k in ["o/\u{e9}", "o/z", "o/Z"] {
            assert_eq!(
                host(s, &a, &[b"kv_delete", k.as_bytes()]).await,
                Ok(vec![b"1".to_vec()])
            );
        }
        // Quota: 64 KiB of keys and values; a write past it changes nothing.
        let big = vec![7u8; 60 << 10];
        assert_eq!(host(s, &a, &[b"kv_put", b"big", &big]).await, Ok(vec![]));
        let err = host(s, &a, &[b"kv_put", b"big2", &big]).await.unwrap_err();
        assert!(
            err.contains("quota: store quota exceeded: 61456 of 65536 bytes used, this write needs 61444 more"),
            "{rt}: {err}"
        );
        assert_eq!(host(s, &a, &[b"kv_get", b"big2"]).await, Ok(vec![]));
        // Bad keys are refused with the reason.
        let err = host(s, &a, &[b"kv_put", b"", b"x"]).await.unwrap_err();
        assert!(
            err.contains("invalid: invalid request: the key is empty"),
            "{rt}: {err}"
        );
        // No grant, no store: denied, naming the rule, audited.
        let err = host(s, &mute, &[b"kv_get", b"greeting"]).await.unwrap_err();
        assert!(
            err.contains(&format!(
                "denied: denied by policy: default deny: no [[grant]] kv_quota rule allows a \
                 key-value store for plugin {mute} (no grant applies to it)"
            )),
            "{rt}: {err}"
        );
        let line = audit_line(&e.audit, &mute, "kv.get", "greeting");
        assert_eq!(line["decision"], "denied");
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

/// Grants are resolved once per policy and cached; a policy edit that takes the
/// store away applies to the very next host call of the same worker, and giving
/// it back restores what was stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_edit_applies_to_the_next_host_call_of_a_running_worker_in_every_runtime() {
    let file = corral_integration_tests::fixture("policy/test.toml");
    let granted = std::fs::read_to_string(&file).unwrap();
    let revoked = granted.replace(
        "id = [\"svc-*\"]\nkv_quota = \"64KiB\"\n",
        "id = [\"svc-*\"]\n",
    );
    assert_ne!(granted, revoked);
    let policy = |text: &str| corral::Policy::parse(&[(file.clone(), text.to_owned())]).unwrap();
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let e = env(&[(rt, &id, &[])], |_| {});
        let s = &e.sup;
        assert_eq!(host(s, &id, &[b"kv_put", b"k", b"v"]).await, Ok(vec![]));
        assert_eq!(
            host(s, &id, &[b"kv_get", b"k"]).await,
            Ok(vec![b"v".to_vec()])
        );
        let pid = s.list().await[0].pid;
        s.set_policy(policy(&revoked)).await;
        let err = host(s, &id, &[b"kv_get", b"k"]).await.unwrap_err();
        assert!(
            err.contains("no [[grant]] kv_quota rule allows a key-value store"),
            "{rt}: {err}"
        );
        assert_eq!(
            audit_line(&e.audit, &id, "kv.get", "k")["decision"],
            "denied"
        );
        s.set_policy(policy(&granted)).await;
        assert_eq!(
            host(s, &id, &[b"kv_get", b"k"]).await,
            Ok(vec![b"v".to_vec()]),
            "{rt}"
        );
        assert_eq!(
            s.list().await[0].pid,
            pid,
            "{rt}: the same worker throughout"
        );
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

/// The store lives in the state directory: a new supervisor (a restart, or a new
/// version of the plugin) reads what the last one wrote.
#[tokio::test(flavor = "multi_thread")]
async fn store_survives_a_new_supervisor_and_a_new_plugin_version() {
    let cache = open_tempdir();
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        {
            let mut opts = options(cache.path());
            opts.audit = AuditSink::Off;
            let mut sup = Supervisor::new(opts);
            let d = kit(rt, &id, &[]);
            sup.add_plugin_dir(d.path()).unwrap();
            host(&sup, &id, &[b"kv_put", b"kept", rt.as_bytes()])
                .await
                .unwrap();
            sup.shutdown(Duration::from_secs(2)).await;
        }
        let mut opts = options(cache.path());
        opts.audit = AuditSink::Off;
        let mut sup = Supervisor::new(opts);
        let d = kit(rt, &id, &[]);
        let manifest = d.path().join("plugin.toml");
        let m = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(
            &manifest,
            m.replace("version = \"1.0.0\"", "version = \"2.0.0\""),
        )
        .unwrap();
        sup.add_plugin_dir(d.path()).unwrap();
        assert_eq!(
            host(&sup, &id, &[b"kv_get", b"kept"]).await,
            Ok(vec![rt.as_bytes().to_vec()]),
            "{rt}"
        );
        sup.shutdown(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------- fetch

#[tokio::test(flavor = "multi_thread")]
async fn fetch_is_brokered_within_the_grants_in_every_runtime() {
    let port = http_server();
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let mute = format!("mute-{rt}");
        let e = env(&[(rt, &id, &[]), (rt, &mute, &[])], |_| {});
        let s = &e.sup;
        let idr: &str = &id;
        let get = |path: &str| {
            let u = url(path);
            async move { host(s, idr, &[b"fetch", b"GET", u.as_bytes(), b"", b""]).await }
        };
        // Allowed: status, final URL, a header (Wasm sees all header lines), the body.
        let r = text(&get("/allowed/hello").await.unwrap());
        assert_eq!(r[..2], ["200".to_owned(), url("/allowed/hello")], "{rt}");
        assert!(r[2] == "yes" || r[2].contains("x-test: yes"), "{rt}: {r:?}");
        assert_eq!(r[3], "hello", "{rt}");
        let r = host(
            s,
            &id,
            &[
                b"fetch",
                b"POST",
                url("/allowed/echo").as_bytes(),
                b"",
                b"ping",
            ],
        )
        .await;
        assert_eq!(text(&r.unwrap())[3], "POST ping", "{rt}");
        // A redirect inside the grants is followed and re-checked.
        let r = text(&get("/allowed/bounce").await.unwrap());
        assert_eq!(r[..2], ["200".to_owned(), url("/allowed/hello")], "{rt}");
        // A redirect out of them is refused, naming the hop and the rule.
        let err = get("/allowed/redirect").await.unwrap_err();
        assert!(
            err.contains(&format!(
                "denied: denied by policy: redirect to {}: default deny: no [[grant]] fetch \
                 rule allows GET http://127.0.0.1:{port}/forbidden/x for plugin {id} (grants \
                 that apply: grant \"services tests\"",
                url("/forbidden/x")
            )),
            "{rt}: {err}"
        );
        // Path, method and host outside the grants.
        let err = get("/forbidden/x").await.unwrap_err();
        assert!(
            err.contains(
                "denied: denied by policy: default deny: no [[grant]] fetch rule allows GET"
            ),
            "{rt}: {err}"
        );
        let err = host(
            s,
            &id,
            &[
                b"fetch",
                b"DELETE",
                url("/allowed/hello").as_bytes(),
                b"",
                b"",
            ],
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("allows DELETE http://127.0.0.1"),
            "{rt}: {err}"
        );
        let other_host = format!("http://localhost:{port}/allowed/hello");
        let err = host(s, &id, &[b"fetch", b"GET", other_host.as_bytes(), b"", b""])
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!("allows GET http://localhost:{port}/allowed/hello")),
            "{rt}: {err}"
        );
        // Size and time limits of the grant.
        let err = get("/allowed/big").await.unwrap_err();
        assert!(
            err.contains("failed: host call failed: GET")
                && err.contains("exceeds the limit of 65536 bytes"),
            "{rt}: {err}"
        );
        let t = Instant::now();
        let err = get("/allowed/slow").await.unwrap_err();
        assert!(err.contains("no complete answer within 1s"), "{rt}: {err}");
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "{rt}: {:?}",
            t.elapsed()
        );
        // Not a URL, not a scheme we speak.
        let err = host(s, &id, &[b"fetch", b"GET", b"file:///etc/passwd", b"", b""])
            .await
            .unwrap_err();
        assert!(
            err.contains("invalid: invalid request: URL scheme \"file\""),
            "{rt}: {err}"
        );
        // A plugin without grants.
        let err = host(
            s,
            &mute,
            &[b"fetch", b"GET", url("/allowed/hello").as_bytes(), b"", b""],
        )
        .await
        .unwrap_err();
        assert!(
            err.contains(&format!("for plugin {mute} (no grant applies to it)")),
            "{rt}: {err}"
        );
        audit_line(
            &e.audit,
            &id,
            "fetch",
            &format!("GET {}", url("/allowed/redirect")),
        );
        audit_line(
            &e.audit,
            &id,
            "fetch",
            &format!("DELETE {}", url("/allowed/hello")),
        );
        audit_line(
            &e.audit,
            &mute,
            "fetch",
            &format!("GET {}", url("/allowed/hello")),
        );
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

/// A grant for a name or a glob is not a grant for the loopback, private or
/// link-local address behind it: only a rule naming the address reaches it, however
/// the address is spelled or reached (a name, a mapped IPv6 or decimal form, a
/// redirect), and every refusal is audited with the address and its class.
#[tokio::test(flavor = "multi_thread")]
async fn special_use_addresses_need_a_rule_that_names_them() {
    let port = http_server();
    let e = env(&[("wasm", "addr-wasm", &[])], |_| {});
    let s = &e.sup;
    let get = |url: String| async move {
        host(
            s,
            "addr-wasm",
            &[b"fetch", b"GET", url.as_bytes(), b"", b""],
        )
        .await
    };
    let refused = |host: &str, via: &str, path: &str| {
        format!(
            "denied: denied by policy: special-use address: {via}127.0.0.1, a loopback \
             address, is refused unless a fetch rule names 127.0.0.1 itself; no [[grant]] \
             does for GET http://{host}:{port}{path} for plugin addr-wasm"
        )
    };
    // The glob "*" allows these names, and the address behind each is loopback.
    for (host, via) in [
        ("localhost", "localhost, which resolves to "),
        ("127.0.0.1", ""),
        // The URL parser's canonical forms of 127.0.0.1 written otherwise.
        ("[::ffff:127.0.0.1]", "[::ffff:7f00:1], which resolves to "),
    ] {
        let err = get(format!("http://{host}:{port}/allowed/hello"))
            .await
            .unwrap_err();
        assert!(
            err.contains(&refused(
                if host.starts_with('[') {
                    "[::ffff:7f00:1]"
                } else {
                    host
                },
                via,
                "/allowed/hello"
            )),
            "{host}: {err}"
        );
    }
    let err = get(format!("http://2130706433:{port}/allowed/hello"))
        .await
        .unwrap_err();
    assert!(
        err.contains(&refused("127.0.0.1", "", "/allowed/hello")),
        "{err}"
    );
    // The rule naming 127.0.0.1 reaches it, by address or by a name.
    let echo = host(
        s,
        "addr-wasm",
        &[
            b"fetch",
            b"POST",
            format!("http://127.0.0.1:{port}/allowed/echo").as_bytes(),
            b"",
            b"x",
        ],
    )
    .await;
    assert!(
        echo.unwrap_err()
            .contains("no [[grant]] fetch rule allows POST"),
        "the rule names GET only"
    );
    for h in ["127.0.0.1", "localhost"] {
        let r = text(
            &get(format!("http://{h}:{port}/allowed/echo"))
                .await
                .unwrap(),
        );
        assert_eq!(r[0], "200", "{h}: {r:?}");
        assert_eq!(r[3], "GET ", "{h}: {r:?}");
    }
    // A redirect from a named address to a name behind which it hides is refused.
    let err = get(format!("http://127.0.0.1:{port}/allowed/to-local"))
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!(
            "denied: denied by policy: redirect to http://localhost:{port}/allowed/hello: {}",
            refused(
                "localhost",
                "localhost, which resolves to ",
                "/allowed/hello"
            )
            .trim_start_matches("denied: denied by policy: ")
        )),
        "{err}"
    );
    // A name that does not resolve is a failure, not a denial.
    let err = get("http://no-such-host.invalid/allowed/".into())
        .await
        .unwrap_err();
    assert!(
        err.contains("failed: host call failed:")
            && err.contains("cannot resolve no-such-host.invalid"),
        "{err}"
    );
    for target in [
        format!("GET http://localhost:{port}/allowed/hello"),
        format!("GET http://127.0.0.1:{port}/allowed/hello"),
        format!("GET http://127.0.0.1:{port}/allowed/to-local"),
    ] {
        let line = audit_line(&e.audit, "addr-wasm", "fetch", &target);
        assert_eq!(line["decision"], "denied", "{line}");
        assert!(
            line["rule"]
                .as_str()
                .is_some_and(|r| r.contains("special-use address") && r.contains("loopback")),
            "{line}"
        );
    }
    e.sup.shutdown(Duration::from_secs(2)).await;
}

// ---------------------------------------------------------------- config and secrets

#[tokio::test(flavor = "multi_thread")]
async fn config_and_secrets_reach_the_plugin_in_every_runtime() {
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let e = env(&[(rt, &id, &[])], |o| {
            let mut pc = PluginConfig::default();
            pc.config.insert("greeting".into(), "Hej".into());
            pc.config.insert("limit".into(), "3".into());
            pc.secrets
                .insert("token".into(), Secret("tok-8f3a9c".into()));
            o.plugin_config.insert(id.clone(), pc);
        });
        let s = &e.sup;
        let mut cfg = text(&host(s, &id, &[b"config"]).await.unwrap());
        // Pairs; order per runtime's map.
        let mut pairs: Vec<(String, String)> = Vec::new();
        while cfg.len() >= 2 {
            let v = cfg.pop().unwrap();
            let k = cfg.pop().unwrap();
            pairs.push((k, v));
        }
        pairs.sort();
        assert_eq!(
            pairs,
            [
                ("greeting".into(), "Hej".into()),
                ("limit".into(), "3".into())
            ],
            "{rt}"
        );
        assert_eq!(
            text(&host(s, &id, &[b"secret", b"token"]).await.unwrap()),
            ["tok-8f3a9c"]
        );
        assert_eq!(
            host(s, &id, &[b"secret", b"nope"]).await,
            Ok(vec![]),
            "{rt}"
        );
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------- messaging

#[tokio::test(flavor = "multi_thread")]
async fn publish_reaches_allowed_subscribers_in_order_in_every_runtime() {
    for rt in RUNTIMES {
        let publisher = format!("svc-{rt}");
        let e = env(
            &[
                (rt, &publisher, &[]),
                ("wasm", "svc-sub-wasm", &["news"]),
                ("js", "svc-sub-js", &["news"]),
                ("python", "svc-sub-python", &["news"]),
                (rt, "mute-sub", &["news"]),
            ],
            |_| {},
        );
        let s = &e.sup;
        for i in 0..3 {
            let payload = format!("{rt} message {i}");
            let r = host(s, &publisher, &[b"publish", b"news", payload.as_bytes()]).await;
            assert_eq!(
                text(&r.unwrap()),
                ["3"],
                "{rt}: three subscribers are allowed"
            );
        }
        // Nobody subscribes to news.sport: allowed, delivered to none.
        let r = host(s, &publisher, &[b"publish", b"news.sport", b"x"]).await;
        assert_eq!(text(&r.unwrap()), ["0"]);
        // Topics outside the grants.
        let err = host(s, &publisher, &[b"publish", b"payroll", b"x"])
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!(
                "denied: denied by policy: default deny: no [[grant]] publish rule allows \
                 publish on topic \"payroll\" for plugin {publisher}"
            )),
            "{rt}: {err}"
        );
        let err = host(s, &publisher, &[b"publish", b"two words", b"x"])
            .await
            .unwrap_err();
        assert!(
            err.contains("invalid: invalid request: topic"),
            "{rt}: {err}"
        );
        // Each allowed subscriber got the three messages, in order.
        for sub in ["svc-sub-wasm", "svc-sub-js", "svc-sub-python"] {
            let want: Vec<String> = (0..3).map(|i| format!("{rt} message {i}")).collect();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let keys = text(&host(s, sub, &[b"kv_keys", b"inbox/"]).await.unwrap());
                if keys.len() >= 3 {
                    let mut got = Vec::new();
                    for k in &keys {
                        got.extend(text(
                            &host(s, sub, &[b"kv_get", k.as_bytes()]).await.unwrap(),
                        ));
                    }
                    assert_eq!(got, want, "{rt} -> {sub}");
                    break;
                }
                assert!(Instant::now() < deadline, "{rt} -> {sub}: only {keys:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The subscriber without a subscribe grant was skipped, visibly: one audit
        // line per message it did not get.
        let skipped: Vec<_> = audit_lines(&e.audit)
            .into_iter()
            .filter(|l| l["plugin"] == "mute-sub" && l["operation"] == "subscribe")
            .collect();
        assert_eq!(skipped.len(), 3, "{rt}: {skipped:#?}");
        let rule = skipped[0]["rule"].as_str().unwrap();
        assert!(
            rule.starts_with("default deny: no [[grant]] subscribe rule allows subscribe on topic \"news\" for plugin mute-sub"),
            "{rule}"
        );
        println!("audit: {}", skipped[0]);
        audit_line(&e.audit, &publisher, "publish", "payroll");
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_subscriber_queue_refuses_publishes_and_loses_nothing_in_every_runtime() {
    for rt in RUNTIMES {
        let publisher = format!("svc-{rt}");
        let e = env(
            &[(rt, &publisher, &[]), ("python", "svc-sub", &["news"])],
            |o| o.max_queue = 2,
        );
        let s = &e.sup;
        let mut accepted = Vec::new();
        let mut overloaded = None;
        // The subscriber's worker takes milliseconds to start: the first message
        // waits for it, two more fill the queue, the next is refused.
        for i in 0..20 {
            let payload = format!("m{i:02}");
            match host(s, &publisher, &[b"publish", b"news", payload.as_bytes()]).await {
                Ok(_) => accepted.push(payload),
                Err(err) => {
                    overloaded = Some(err);
                    break;
                }
            }
        }
        let err = overloaded.unwrap_or_else(|| panic!("{rt}: 20 publishes into a queue of 2"));
        assert!(
            err.contains(
                "overloaded: subscriber svc-sub has 2 messages queued; nothing was published"
            ),
            "{rt}: {err}"
        );
        // Every accepted message arrives, in order.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let keys = text(&host(s, "svc-sub", &[b"kv_keys", b"inbox/"]).await.unwrap());
            if keys.len() >= accepted.len() {
                let mut got = Vec::new();
                for k in &keys {
                    got.extend(text(
                        &host(s, "svc-sub", &[b"kv_get", k.as_bytes()])
                            .await
                            .unwrap(),
                    ));
                }
                assert_eq!(got, accepted, "{rt}");
                break;
            }
            assert!(Instant::now() < deadline, "{rt}: {keys:?} of {accepted:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_calls_are_granted_bounded_and_cycles_refused_in_every_runtime() {
    for rt in RUNTIMES {
        let a = format!("svc-{rt}");
        let e = env(
            &[
                (rt, &a, &[]),
                ("js", "svc-peer", &[]),
                ("js", "mute-peer", &[]),
            ],
            |_| {},
        );
        let s = &e.sup;
        let now = encode_list(&[b"now".to_vec()]);
        // A -> peer.host(now)
        let r = host(s, &a, &[b"call", b"svc-peer", b"host", &now])
            .await
            .unwrap();
        let inner = text(&decode_list(&r[0]).unwrap());
        assert!(
            inner[0].parse::<u64>().unwrap() > 1_700_000_000_000,
            "{rt}: {inner:?}"
        );
        // Denied: a plugin outside the grant, and a function outside it.
        let err = host(s, &a, &[b"call", b"mute-peer", b"host", &now])
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!(
                "denied: denied by policy: default deny: no [[grant]] call rule allows calling \
                 mute-peer.host for plugin {a}"
            )),
            "{rt}: {err}"
        );
        let err = host(s, &a, &[b"call", b"svc-peer", b"on_message", b""])
            .await
            .unwrap_err();
        assert!(
            err.contains("allows calling svc-peer.on_message"),
            "{rt}: {err}"
        );
        // A -> peer -> A: the cycle is answered, not waited on.
        let back = encode_list(&[
            b"call".to_vec(),
            a.as_bytes().to_vec(),
            b"host".to_vec(),
            now.clone(),
        ]);
        let t = Instant::now();
        let err = host(s, &a, &[b"call", b"svc-peer", b"host", &back])
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!("call cycle: {a} -> svc-peer -> {a}")),
            "{rt}: {err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{rt}: {:?}",
            t.elapsed()
        );
        // A calling itself is the shortest cycle.
        let err = host(s, &a, &[b"call", a.as_bytes(), b"host", &now])
            .await
            .unwrap_err();
        assert!(
            err.contains(&format!("call cycle: {a} -> {a}")),
            "{rt}: {err}"
        );
        // Unknown plugins are named.
        let err = host(s, &a, &[b"call", b"svc-nobody", b"host", &now])
            .await
            .unwrap_err();
        assert!(
            err.contains("svc-nobody.host failed: unknown plugin \"svc-nobody\""),
            "{rt}: {err}"
        );
        audit_line(&e.audit, &a, "call", "mute-peer.host");
        audit_line(&e.audit, &a, "call", "svc-peer.on_message");
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_with_a_full_queue_answers_overloaded() {
    let port = http_server();
    let slow = format!("http://127.0.0.1:{port}/allowed/slow");
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let e = env(&[(rt, &id, &[])], |o| o.max_queue = 1);
        let s = &e.sup;
        // Start the worker first, so the slow call below is the only one queued.
        host(s, &id, &[b"now"]).await.unwrap();
        let args: [&[u8]; 5] = [b"fetch", b"GET", slow.as_bytes(), b"", b""];
        let busy = host(s, &id, &args);
        let second = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.call(&id, "host", encode_list(&[b"now".to_vec()]), None)
                .await
        };
        let (busy, second) = tokio::join!(busy, second);
        assert!(
            busy.unwrap_err().contains("no complete answer within 1s"),
            "{rt}"
        );
        match second {
            Err(CallError::Overloaded {
                plugin,
                reason: corral_protocol::Overload::Queue { queued: 1 },
            }) => assert_eq!(plugin, id),
            other => panic!("{rt}: {other:?}"),
        }
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------- health

#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_plugin_is_restarted_visibly_in_every_runtime() {
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let e = env(&[(rt, &id, &[])], |o| {
            // A check's deadline is its interval: long enough that a healthy
            // worker on a slow, shared machine answers in time.
            o.health_interval = Duration::from_secs(1)
        });
        let s = &e.sup;
        host(s, &id, &[b"now"]).await.unwrap();
        let first = s.list().await[0].pid.unwrap();
        // Healthy for a while (two checks): same worker.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let info = &s.list().await[0];
        assert_eq!((info.pid, info.restarts), (Some(first), 0), "{rt}");
        // Sick: the next check fails, the worker is replaced, status says why.
        host(s, &id, &[b"kv_put", b"sick", b"1"]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let info = loop {
            let info = s.list().await.remove(0);
            if info.restarts >= 1 && info.pid.is_some_and(|p| p != first) {
                break info;
            }
            assert!(Instant::now() < deadline, "{rt}: {info:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let why = info.last_error.unwrap_or_default();
        assert!(
            why.starts_with("unhealthy: health check failed: plugin returned an error:")
                && why.contains("told to be sick"),
            "{rt}: {why}"
        );
        host(s, &id, &[b"kv_delete", b"sick"]).await.unwrap();
        let lines: Vec<_> = audit_lines(&e.audit)
            .into_iter()
            .filter(|l| l["operation"] == "health")
            .collect();
        assert!(!lines.is_empty(), "{rt}");
        assert_eq!(lines[0]["decision"], "restarted");
        assert_eq!(lines[0]["plugin"], id.as_str());
        println!("audit: {}", lines[0]);
        e.sup.shutdown(Duration::from_secs(2)).await;
    }
}

// ---------------------------------------------------------------- the daemon

/// `corral serve` with the three kits, a state directory, an audit file and a
/// secret for each kit; its stderr goes to `stderr.log`.
struct Daemon(Served);

const TOKEN: &str = "tok-5e6b2d91";

impl std::ops::Deref for Daemon {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let mut config = String::from(
            "plugins = [\"wasm\", \"js\", \"python\", \"native\"]\nsocket = \"run/control.sock\"\n\
             cache_dir = \"cache\"\nstate_dir = \"state\"\naudit = \"audit.jsonl\"\n",
        );
        config.push_str(&format!(
            "policy = {:?}\n",
            corral_integration_tests::fixture("policy/test.toml")
        ));
        for rt in RUNTIMES {
            config.push_str(&format!(
                "[plugin.svc-{rt}.config]\ngreeting = \"Hej\"\n[plugin.svc-{rt}.secrets]\ntoken = {TOKEN:?}\n"
            ));
        }
        Daemon(Served::start(dir, &config))
    }
}

/// A write the plugin saw acknowledged is on disk: SIGKILL the supervisor right
/// after, start a new one, and read it back (every runtime). Secrets reach the
/// plugin but never the daemon's log or `corral status`/`list`.
#[test]
fn acknowledged_writes_survive_sigkill_and_secrets_stay_out_of_logs_and_status() {
    let dir = open_tempdir();
    for rt in RUNTIMES {
        let plugin = dir.path().join(rt);
        std::fs::create_dir(&plugin).unwrap();
        let kit = kit(rt, &format!("svc-{rt}"), &[]);
        for entry in std::fs::read_dir(kit.path()).unwrap() {
            let entry = entry.unwrap();
            let to = plugin.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir(&to).unwrap();
                for f in std::fs::read_dir(entry.path()).unwrap() {
                    let f = f.unwrap();
                    std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
                }
            } else {
                std::fs::copy(entry.path(), to).unwrap();
            }
        }
    }
    let mut d = Daemon::start(dir.path());
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        for i in 0..20 {
            let key = format!("k{i:02}");
            let value = format!("{rt}-{i}");
            assert_eq!(
                d.host(&id, &[b"kv_put", key.as_bytes(), value.as_bytes()]),
                Ok(vec![])
            );
        }
    }
    // The last write was acknowledged; kill at once.
    d.0.kill();
    let d = Daemon::start(dir.path());
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        let keys = text(&d.host(&id, &[b"kv_keys", b"k"]).unwrap());
        assert_eq!(keys.len(), 20, "{rt}: {keys:?}");
        assert_eq!(
            text(&d.host(&id, &[b"kv_get", b"k19"]).unwrap()),
            [format!("{rt}-19")],
            "{rt}"
        );
        // The secret reaches the plugin.
        assert_eq!(text(&d.host(&id, &[b"secret", b"token"]).unwrap()), [TOKEN]);
    }
    // JS and Python kits log the secret and fail with it in the message.
    for rt in ["js", "python"] {
        let out = d.cli(&["call", &format!("svc-{rt}"), "log_secret"]);
        assert!(!out.status.success(), "{rt}");
    }
    let list = d.cli(&["list", "--json"]);
    let status = d.cli(&["status"]);
    for (what, out) in [("list", &list.stdout), ("status", &status.stdout)] {
        let out = String::from_utf8_lossy(out);
        assert!(!out.contains(TOKEN), "{what} shows the secret:\n{out}");
        assert!(out.contains("svc-js"), "{what}:\n{out}");
    }
    drop(d);
    let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!log.contains(TOKEN), "the daemon logged the secret:\n{log}");
    assert!(log.contains("the token is [secret token]"), "{log}");
}

/// Security events end in the audit log too: a seccomp kill (with the syscall), an
/// OOM kill (with the limit) and a deadline kill, each one line.
#[tokio::test(flavor = "multi_thread")]
async fn seccomp_oom_and_deadline_kills_are_audited() {
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    let audit = cache.path().join("audit.jsonl");
    opts.audit = AuditSink::File(audit.clone());
    let mut sup = Supervisor::new(opts);
    let hostile = fixture_plugin("py-hostile", "attacker", "python", "plugin.py", "");
    // The plugin's own deadline (5 s) covers its load on a slow machine; the call
    // asks for 300 ms.
    let stubborn = corral_integration_tests::py_plugin("stubborn", "");
    sup.add_plugin_dir(hostile.path()).unwrap();
    sup.add_plugin_dir(stubborn.path()).unwrap();
    let r = sup.call("attacker", "ctypes_ptrace", vec![], None).await;
    assert!(matches!(r, Err(CallError::WorkerCrashed(_))), "{r:?}");
    let limit = sup.explain("attacker").unwrap().worker_memory.value;
    let mib = ((limit >> 20) * 2).to_string();
    let r = sup
        .call("attacker", "ctypes_mmap", mib.into_bytes(), None)
        .await;
    assert!(matches!(r, Err(CallError::WorkerCrashed(_))), "{r:?}");
    let r = sup
        .call(
            "stubborn",
            "stubborn",
            vec![],
            Some(Duration::from_millis(300)),
        )
        .await;
    assert_eq!(r, Err(CallError::Timeout { deadline_ms: 300 }));
    // The connection task writes the line as it reaps the worker.
    let deadline = Instant::now() + Duration::from_secs(5);
    while audit_lines(&audit).len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = audit_line(&audit, "attacker", "seccomp", "ptrace");
    assert_eq!(line["decision"], "killed");
    assert_eq!(
        line["rule"],
        "seccomp filter of level standard (seccomp/standard*.json)"
    );
    let line = audit_line(&audit, "attacker", "oom", "");
    assert_eq!(line["decision"], "killed");
    assert_eq!(
        line["rule"],
        format!("cgroup memory limit {}", corral_policy_size(limit))
    );
    let line = audit_line(&audit, "stubborn", "deadline", "");
    assert_eq!(line["decision"], "killed");
    sup.shutdown(Duration::from_secs(2)).await;
}

fn corral_policy_size(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}
