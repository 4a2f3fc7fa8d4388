//! More than one node: daemons on this machine (separate state directories,
//! sockets and caches) sharing one PostgreSQL server (`corral_integration_tests::
//! postgres`, a private cluster on 127.0.0.1) as their store.

use crate::services::{RUNTIMES, host, kit};
use corral::{AuditSink, Supervisor};
use corral_integration_tests::daemon::Served;
use corral_integration_tests::postgres::{PASSWORD, Postgres};
use corral_integration_tests::{open_tempdir, options};
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// `corral serve` in `dir` with `plugins`, its store the database `db` of `pg`
/// (the password from a file); its stderr goes to `stderr.log`.
struct Node(Served);

impl std::ops::Deref for Node {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Served {
        &mut self.0
    }
}

impl Node {
    fn start(dir: &Path, plugins: &[&Path], pg: &Postgres, db: &str) -> Node {
        std::fs::write(dir.join("pg.pass"), format!("{PASSWORD}\n")).unwrap();
        let listed: Vec<String> = plugins.iter().map(|p| format!("{p:?}")).collect();
        let config = format!(
            "plugins = [{}]\nsocket = \"run/control.sock\"\ncache_dir = \"cache\"\n\
             state_dir = \"state\"\naudit = \"audit.jsonl\"\npolicy = {:?}\n\
             store = {{ postgres = {:?}, password = {{ file = \"pg.pass\" }} }}\n",
            listed.join(", "),
            corral_integration_tests::fixture("policy/test.toml"),
            pg.url(db),
        );
        Node(Served::start(dir, &config))
    }

    /// `corral call <id> host` with [operation, args...]; the answers as text, or stderr.
    fn host(&self, id: &str, items: &[&[u8]]) -> Result<Vec<String>, String> {
        self.0.host(id, items).map(|list| {
            list.iter()
                .map(|i| String::from_utf8_lossy(i).into_owned())
                .collect()
        })
    }
}

/// Two daemons, one database: what one writes the other reads, in every runtime;
/// a node SIGKILLed right after its writes were acknowledged loses none of them;
/// the database's password is in neither node's log nor its `status`.
#[test]
fn two_daemons_on_one_postgres_share_the_store_and_lose_no_acknowledged_write() {
    let pg = Postgres::start();
    pg.create_database("fleet");
    let kits: Vec<TempDir> = RUNTIMES
        .iter()
        .map(|rt| kit(rt, &format!("svc-{rt}"), &[]))
        .collect();
    let paths: Vec<&Path> = kits.iter().map(|k| k.path()).collect();
    let (dir_a, dir_b) = (open_tempdir(), open_tempdir());
    let mut a = Node::start(dir_a.path(), &paths, &pg, "fleet");
    let b = Node::start(dir_b.path(), &paths, &pg, "fleet");
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        for i in 0..20 {
            let (key, value) = (format!("k{i:02}"), format!("{rt}-a-{i}"));
            assert_eq!(
                a.host(&id, &[b"kv_put", key.as_bytes(), value.as_bytes()]),
                Ok(vec![]),
                "{rt}"
            );
        }
        assert_eq!(b.host(&id, &[b"kv_keys", b"k"]).unwrap().len(), 20, "{rt}");
        assert_eq!(
            b.host(&id, &[b"kv_get", b"k07"]),
            Ok(vec![format!("{rt}-a-7")])
        );
        assert_eq!(b.host(&id, &[b"kv_put", b"from-b", b"hi"]), Ok(vec![]));
        assert_eq!(a.host(&id, &[b"kv_get", b"from-b"]), Ok(vec!["hi".into()]));
        // A delete on one node is seen by the other.
        assert_eq!(a.host(&id, &[b"kv_delete", b"k00"]), Ok(vec!["1".into()]));
        assert_eq!(b.host(&id, &[b"kv_get", b"k00"]), Ok(vec![]));
    }
    // Acknowledged on A, then A is killed at once: B reads every write.
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        assert_eq!(a.host(&id, &[b"kv_put", b"last", b"acked"]), Ok(vec![]));
    }
    a.kill();
    for rt in RUNTIMES {
        let id = format!("svc-{rt}");
        assert_eq!(
            b.host(&id, &[b"kv_get", b"last"]),
            Ok(vec!["acked".into()]),
            "{rt}"
        );
    }
    // A again, from its own state directory: the shared data is there.
    let a = Node::start(dir_a.path(), &paths, &pg, "fleet");
    assert_eq!(
        a.host("svc-js", &[b"kv_keys", b""]).unwrap(),
        [
            "from-b", "k01", "k02", "k03", "k04", "k05", "k06", "k07", "k08", "k09", "k10", "k11",
            "k12", "k13", "k14", "k15", "k16", "k17", "k18", "k19", "last"
        ]
    );
    // The rows are per plugin: one namespace per plugin id.
    assert_eq!(
        pg.psql("fleet", "SELECT count(DISTINCT plugin) FROM corral_kv"),
        RUNTIMES.len().to_string()
    );
    for node in [&a, &b] {
        let status = node.cli(&["status"]);
        let status = String::from_utf8_lossy(&status.stdout);
        assert!(status.contains("svc-js"), "{status}");
        assert!(
            !status.contains(PASSWORD),
            "status shows the password:\n{status}"
        );
    }
    drop((a, b));
    for dir in [&dir_a, &dir_b] {
        let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
        assert!(
            !log.contains(PASSWORD),
            "a node logged the password:\n{log}"
        );
    }
}

/// A supervisor on the database `db` of `pg` with the kit `svc-js`.
fn node(pg: &Postgres, db: &str, cache: &Path, kit: &Path) -> Supervisor {
    let mut opts = options(cache);
    opts.audit = AuditSink::Off;
    opts.store = pg.store(db);
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(kit).unwrap();
    sup
}

/// Writers of one plugin on two nodes at once cannot share out more than its
/// quota between them: every write that was acknowledged is there, every refusal
/// wrote nothing, and the usage the quota counts is exactly the rows' bytes.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_quota_holds_across_nodes_writing_at_once() {
    let pg = Postgres::start();
    pg.create_database("quota");
    let kit_dir = kit("js", "svc-js", &[]);
    let (cache_a, cache_b) = (open_tempdir(), open_tempdir());
    let a = node(&pg, "quota", cache_a.path(), kit_dir.path());
    let b = node(&pg, "quota", cache_b.path(), kit_dir.path());
    // 2 x 48 writes of 1 KiB + 4 bytes of key against a 64 KiB quota: at most 63 fit.
    let value = vec![b'v'; 1024];
    let write = |sup: Supervisor, node: &'static str, i: usize| {
        let value = value.clone();
        async move {
            let key = format!("{node}{i:02}");
            (
                key.clone(),
                host(&sup, "svc-js", &[b"kv_put", key.as_bytes(), &value]).await,
            )
        }
    };
    let mut tasks = Vec::new();
    for i in 0..48 {
        tasks.push(tokio::spawn(write(a.clone(), "a-", i)));
        tasks.push(tokio::spawn(write(b.clone(), "b-", i)));
    }
    let mut written = Vec::new();
    for t in tasks {
        let (key, result) = t.await.unwrap();
        match result {
            Ok(_) => written.push(key),
            Err(e) => assert!(e.contains("quota: store quota exceeded"), "{key}: {e}"),
        }
    }
    written.sort();
    assert_eq!(written.len(), (64 << 10) / 1028, "{written:?}");
    let stored = pg.psql(
        "quota",
        "SELECT string_agg(convert_from(key, 'UTF8'), ',' ORDER BY key) FROM corral_kv",
    );
    assert_eq!(stored, written.join(","));
    assert_eq!(
        pg.psql(
            "quota",
            "SELECT u.bytes = (SELECT sum(octet_length(key) + octet_length(value)) FROM corral_kv) \
             FROM corral_kv_usage u WHERE plugin = 'svc-js'"
        ),
        "t"
    );
    // A delete on one node makes room for a write on the other.
    assert_eq!(
        host(&a, "svc-js", &[b"kv_delete", written[0].as_bytes()]).await,
        Ok(vec![b"1".to_vec()])
    );
    assert_eq!(
        host(&b, "svc-js", &[b"kv_put", b"b-late", &value]).await,
        Ok(vec![])
    );
    a.shutdown(Duration::from_secs(2)).await;
    b.shutdown(Duration::from_secs(2)).await;
}

/// A publisher cannot fill the shared database with messages for the other nodes
/// (kept five minutes whether anyone subscribes or not): past its budget (64 MiB
/// at once, each message costing 256 bytes more) a publish is refused, saying so,
/// and writes nothing; the database holds exactly the messages that were
/// answered; another publisher still publishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_cannot_fill_the_shared_database_with_messages() {
    let pg = Postgres::start();
    pg.create_database("flood");
    let kit_dir = kit("js", "svc-js", &[]);
    let other = kit("python", "svc-python", &[]);
    let cache = open_tempdir();
    let mut sup = node(&pg, "flood", cache.path(), kit_dir.path());
    sup.add_plugin_dir(other.path()).unwrap();
    let big = vec![b'm'; 1 << 20];
    let mut published = 0;
    let started = Instant::now();
    // 63 fit at once; the budget refills at 64 MiB per 300 s meanwhile.
    let most = |published: usize| {
        let refilled = started.elapsed().as_secs_f64() * f64::from(64 << 20) / 300.0;
        assert!(
            published <= 63 + (refilled / f64::from((1 << 20) + 256)).ceil() as usize,
            "{published} published in {:?}: past the budget",
            started.elapsed()
        );
    };
    let refusal = loop {
        match host(&sup, "svc-js", &[b"publish", b"news", &big]).await {
            Ok(answer) => {
                assert_eq!(answer, [b"0".to_vec()], "nobody subscribes here");
                published += 1;
            }
            Err(e) => break e,
        }
        most(published);
    };
    assert!(published >= 63, "{published}: {refusal}");
    assert!(
        refusal.contains(
            "overloaded: svc-js's messages to the other nodes have used its 64.0 MiB for five \
             minutes ("
        ) && refusal.contains("bytes left; another 1.0 MiB would pass it); nothing was published"),
        "{refusal}"
    );
    let rows = |who: &str| {
        pg.psql(
            "flood",
            &format!(
                "SELECT count(*) || ' ' || coalesce(sum(octet_length(payload)), 0) \
                 FROM corral_messages WHERE publisher = '{who}'"
            ),
        )
    };
    assert_eq!(rows("svc-js"), format!("{published} {}", published << 20));
    assert_eq!(
        host(&sup, "svc-python", &[b"publish", b"news", b"still"]).await,
        Ok(vec![b"0".to_vec()])
    );
    assert_eq!(rows("svc-python"), "1 5");
    sup.shutdown(Duration::from_secs(2)).await;
}

/// A database that goes away fails the store's host calls and every publish with
/// the reason (which server, what happened), within the store's timeout and
/// without the password; a refused publish reaches nobody, not even this node's
/// subscribers; the plugin keeps answering everything else; and when the
/// database is back, so are the store and topics.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_goes_away_fails_store_calls_and_publishes_with_the_reason_until_it_is_back()
 {
    let mut pg = Postgres::start();
    pg.create_database("gone");
    let kit_dir = kit("python", "svc-python", &[]);
    let sub_dir = kit("js", "svc-sub", &["news"]);
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.audit = AuditSink::Off;
    opts.store = pg.store("gone");
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(kit_dir.path()).unwrap();
    sup.add_plugin_dir(sub_dir.path()).unwrap();
    let p = "svc-python";
    assert_eq!(host(&sup, p, &[b"kv_put", b"k", b"v"]).await, Ok(vec![]));
    let port = pg.port;
    pg.stop();
    let reason = format!("store connection to PostgreSQL corral@127.0.0.1:{port}/gone");
    for op in [
        &[&b"kv_get"[..], b"k"][..],
        &[b"kv_put", b"k", b"w"],
        &[b"publish", b"news", b"lost"],
    ] {
        let started = Instant::now();
        let err = host(&sup, p, op).await.unwrap_err();
        assert!(err.contains(&reason), "{err}");
        assert!(!err.contains(PASSWORD), "{err}");
        assert!(
            started.elapsed() < corral_timeout(),
            "answered after {:?}",
            started.elapsed()
        );
    }
    // Everything else still works.
    assert!(host(&sup, p, &[b"now"]).await.is_ok());
    pg.restart();
    let until = Instant::now() + Duration::from_secs(20);
    while host(&sup, p, &[b"kv_get", b"k"]).await != Ok(vec![b"v".to_vec()]) {
        assert!(Instant::now() < until, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refused publish was delivered to nobody; a new one is.
    assert_eq!(
        host(&sup, "svc-sub", &[b"kv_keys", b"inbox/"]).await,
        Ok(vec![])
    );
    assert_eq!(
        host(&sup, p, &[b"publish", b"news", b"back"]).await,
        Ok(vec![b"1".to_vec()])
    );
    let until = Instant::now() + Duration::from_secs(20);
    while host(&sup, "svc-sub", &[b"kv_get", b"inbox/0000"]).await != Ok(vec![b"back".to_vec()]) {
        assert!(
            Instant::now() < until,
            "the publish after the database came back was lost"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sup.shutdown(Duration::from_secs(2)).await;
}

/// The store's own bound on one operation, plus room for the call around it.
fn corral_timeout() -> Duration {
    Duration::from_secs(12)
}

/// The inbox a kit's `on_message` fills (`inbox/0000`, ...), read through `node`,
/// once it holds `n` messages (within 20 s).
fn inbox(node: &Node, id: &str, n: usize) -> Vec<String> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = node.host(id, &[b"kv_keys", b"inbox/"]).unwrap();
        if keys.len() >= n {
            return keys
                .iter()
                .flat_map(|k| node.host(id, &[b"kv_get", k.as_bytes()]).unwrap())
                .collect();
        }
        assert!(
            Instant::now() < until,
            "{id}: only {keys:?}; the node's log:\n{}",
            std::fs::read_to_string(node.dir.join("stderr.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A message published on one node reaches the subscribers on the others, in
/// publish order, once each (the publisher's own node delivers it once, not again
/// through the database), within the subscribers' grants; the publish answers
/// how many subscribers this node has.
#[test]
fn a_publish_on_one_node_reaches_the_subscribers_on_every_node_in_order() {
    let pg = Postgres::start();
    pg.create_database("topics");
    let publisher = kit("js", "svc-js", &[]);
    let sub_a = kit("python", "svc-sub-a", &["news"]);
    // A kit that numbers its inbox from the store (the Wasm kit counts per
    // instance, and node b restarts below).
    let sub_b = kit("js", "svc-sub-b", &["news"]);
    let mute_b = kit("wasm", "mute-sub-b", &["news"]);
    let (dir_a, dir_b) = (open_tempdir(), open_tempdir());
    let a = Node::start(
        dir_a.path(),
        &[publisher.path(), sub_a.path()],
        &pg,
        "topics",
    );
    let b = Node::start(dir_b.path(), &[sub_b.path(), mute_b.path()], &pg, "topics");
    // B listens once its log says so.
    let until = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(dir_b.path().join("stderr.log"))
        .unwrap()
        .contains("topics: listening to the other nodes")
    {
        assert!(Instant::now() < until, "node b never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let want: Vec<String> = (0..10).map(|i| format!("message {i}")).collect();
    for m in &want {
        assert_eq!(
            a.host("svc-js", &[b"publish", b"news", m.as_bytes()]),
            Ok(vec!["1".into()]),
            "one subscriber on node a"
        );
    }
    assert_eq!(inbox(&b, "svc-sub-b", 10), want, "node b, in order");
    assert_eq!(inbox(&a, "svc-sub-a", 10), want, "node a");
    // Once each: nothing more arrives.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        a.host("svc-sub-a", &[b"kv_keys", b"inbox/"]).unwrap().len(),
        10
    );
    assert_eq!(
        b.host("svc-sub-b", &[b"kv_keys", b"inbox/"]).unwrap().len(),
        10
    );
    // B's subscriber without the grant got nothing, audited on B.
    let audit = std::fs::read_to_string(dir_b.path().join("audit.jsonl")).unwrap();
    let skipped = audit
        .lines()
        .filter(|l| {
            l.contains("\"plugin\":\"mute-sub-b\"") && l.contains("\"operation\":\"subscribe\"")
        })
        .count();
    assert_eq!(skipped, 10, "{audit}");
    // The other way round too.
    let back = kit("js", "svc-pub-b", &[]);
    drop(b);
    let b = Node::start(dir_b.path(), &[sub_b.path(), back.path()], &pg, "topics");
    let until = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(dir_b.path().join("stderr.log"))
        .unwrap()
        .matches("topics: listening to the other nodes")
        .count()
        < 2
    {
        assert!(Instant::now() < until, "node b never listened again");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        b.host("svc-pub-b", &[b"publish", b"news", b"from b"]),
        Ok(vec!["1".into()])
    );
    assert_eq!(inbox(&a, "svc-sub-a", 11).last().unwrap(), "from b");
    assert_eq!(inbox(&b, "svc-sub-b", 11).last().unwrap(), "from b");
}
