use super::*;
use corral_manifest::Manifest;

fn files(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
    list.iter()
        .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
        .collect()
}

fn errors(list: &[(&str, &str)]) -> Vec<String> {
    Policy::parse(&files(list))
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn manifest(extra: &str) -> Manifest {
    let text = format!(
        "id = \"billing-api\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n{extra}"
    );
    Manifest::parse(&text, Path::new("/plugins/billing/plugin.toml")).unwrap()
}

#[test]
fn the_shipped_policy_is_valid_and_routes_the_examples_to_standard() {
    let p = Policy::built_in();
    let m = Manifest::parse(
        include_str!("../../../examples/hello-wasm/plugin.toml"),
        Path::new("examples/hello-wasm/plugin.toml"),
    )
    .unwrap();
    let e = p.resolve(&m, None);
    assert_eq!(e.level.value, Level::Standard);
    assert_eq!(e.route.as_deref(), Some("shipped examples"));
    assert!(
        e.level
            .origin
            .to_string()
            .starts_with("policies/routes.toml:"),
        "{}",
        e.level.origin
    );
    // plugin.toml asks for 32 MiB, below the level's 256 MiB: its request wins.
    assert_eq!(e.memory.value, 32 << 20);
    assert!(
        matches!(e.memory.origin, Origin::Manifest { line: 12, .. }),
        "{:?}",
        e.memory.origin
    );
    assert_eq!(e.worker_memory.value, (64 << 20) + (256 << 20));
}

#[test]
fn unmatched_plugins_get_maximum_with_its_limits() {
    let p = Policy::built_in();
    let e = p.resolve(&manifest(""), None);
    assert_eq!(e.level.value, Level::Maximum);
    assert_eq!(e.level.origin, Origin::Unmatched);
    assert_eq!(e.route, None);
    assert_eq!(e.cpu.value, 0.5);
    assert_eq!(e.pids.value, 16);
    assert_eq!(e.tmpfs.value, 16 << 20);
    assert!(e.to_string().contains("no route matched"), "{e}");
}

#[test]
fn routing_by_id_runtime_tags_and_publisher_with_overrides() {
    let p = Policy::parse(&files(&[(
        "p.toml",
        r#"
[level.high]
memory = "100MiB"

[[route]]
name = "signed by acme"
publisher = "acme"
level = "standard"

[[route]]
name = "billing js"
id = ["billing-*", "ledger"]
runtime = "js"
tags = ["internal", "pci"]
level = "high"
limits = { memory = "48MiB", cpu = "0.25", timeout = "2s" }

[[route]]
name = "unsigned python"
runtime = ["python"]
signed = false
level = "maximum"
"#,
    )]))
    .unwrap();
    // Tags must all be present.
    let e = p.resolve(&manifest("tags = [\"internal\"]\n"), None);
    assert_eq!(e.level.value, Level::Maximum);
    assert_eq!(e.level.origin, Origin::Unmatched);

    let e = p.resolve(&manifest("tags = [\"pci\", \"internal\", \"x\"]\n"), None);
    assert_eq!(e.route.as_deref(), Some("billing js"));
    assert_eq!(e.level.value, Level::High);
    assert_eq!(e.memory.value, 48 << 20);
    assert_eq!(
        e.memory.origin.to_string(),
        "p.toml:16:21",
        "the override's own line and column"
    );
    assert_eq!(e.cpu.value, 0.25);
    assert_eq!(e.timeout.value, Duration::from_secs(2));
    // Not overridden: the level's value (high's pids is a built-in default).
    assert_eq!(e.pids.value, 32);
    assert_eq!(e.pids.origin, Origin::BuiltIn);

    // A verified publisher matches the first route.
    let e = p.resolve(&manifest(""), Some("acme"));
    assert_eq!(e.route.as_deref(), Some("signed by acme"));
    assert_eq!(e.level.value, Level::Standard);

    // The plugin asks for less than the policy allows: its own request, with its line.
    let e = p.resolve(
        &manifest(
            "tags = [\"pci\", \"internal\"]\n[limits]\ntimeout = \"500ms\"\nmemory = \"1GiB\"\n",
        ),
        None,
    );
    assert_eq!(e.timeout.value, Duration::from_millis(500));
    assert_eq!(
        e.timeout.origin.to_string(),
        "/plugins/billing/plugin.toml:7:11 (the plugin's request)"
    );
    assert_eq!(
        e.memory.value,
        48 << 20,
        "asking for more than the policy allows is capped"
    );
    assert_eq!(
        e.clamped,
        ["plugin.toml asks for memory 1 GiB, policy allows 48 MiB"]
    );
}

#[test]
fn a_level_override_from_the_command_line_comes_first() {
    let p = Policy::built_in().with_level(Level::High, "--level on the command line");
    let e = p.resolve(&manifest(""), None);
    assert_eq!(e.level.value, Level::High);
    assert_eq!(e.level.origin.to_string(), "--level on the command line");
    assert_eq!(e.max_output.value, 8 << 20);
    assert_eq!(
        e.max_output.origin.to_string(),
        "policies/levels.toml:45:14"
    );
}

#[test]
fn errors_name_file_line_column_and_the_valid_choices() {
    let e = errors(&[("a.toml", "[level.hihg]\nmemory = \"1MiB\"\n")]);
    assert_eq!(
        e,
        ["a.toml:1:8: unknown level `hihg`; expected one of: standard, high, maximum"]
    );

    let e = errors(&[("a.toml", "[level.standard]\nmemroy = \"1MiB\"\n")]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(
            "a.toml:2:1: unknown field `memroy`, expected one of `memory`, `worker_memory`, `cpu`"
        ),
        "{}",
        e[0]
    );

    let e = errors(&[(
        "r.toml",
        "[[route]]\nruntime = [\"rust\"]\nlevel = \"standard\"\n",
    )]);
    assert_eq!(
        e,
        ["r.toml:2:11: unknown runtime `rust`; expected one of: wasm, js, python"]
    );

    let e = errors(&[("r.toml", "[[route]]\nid = \"x\"\n")]);
    assert!(
        e[0].starts_with("r.toml:1:1: missing field `level`"),
        "{}",
        e[0]
    );

    let e = errors(&[(
        "u.toml",
        "[level.high]\nmemory = \"lots\"\ncpu = 0\npids = 2\ntimeout = \"0s\"\nuser = \"root\"\n",
    )]);
    assert_eq!(e.len(), 5, "every problem of the table is reported: {e:#?}");
    assert!(
        e[0].starts_with("u.toml:2:10: invalid size \"lots\""),
        "{}",
        e[0]
    );
    assert_eq!(
        e[1],
        "u.toml:3:7: cpu must be more than 0 and at most 1024 CPUs, not 0"
    );
    assert!(
        e[2].starts_with("u.toml:4:8: pids must be between 4 and 65536"),
        "{}",
        e[2]
    );
    assert_eq!(e[3], "u.toml:5:11: timeout must be greater than zero");
    assert!(
        e[4].starts_with("u.toml:6:8: user must not be root"),
        "{}",
        e[4]
    );

    let e = errors(&[("g.toml", "[[route]]\nid = \"a[\"\nlevel = \"high\"\n")]);
    assert!(
        e[0].starts_with("g.toml:2:6: invalid id glob \"a[\""),
        "{}",
        e[0]
    );

    let e = errors(&[("s.toml", "[level.standard]\nmemory = 5\n")]);
    assert!(
        e[0].starts_with("s.toml:2:10: invalid type: integer `5`, expected a string"),
        "{}",
        e[0]
    );

    let e = errors(&[(
        "w.toml",
        "[level.standard]\nmemory = \"512MiB\"\nworker_memory = \"256MiB\"\n",
    )]);
    assert!(
        e[0].starts_with("w.toml:3:17: worker_memory (256 MiB) is below memory (512 MiB)"),
        "{}",
        e[0]
    );

    let e = errors(&[(
        "t.toml",
        "[[route]]\nlevel = \"high\"\ntags = [\"Bad Tag\"]\n",
    )]);
    assert!(
        e[0].starts_with("t.toml:3:8: invalid tag \"Bad Tag\""),
        "{}",
        e[0]
    );
}

#[test]
fn every_file_is_checked_and_a_value_set_twice_names_both_places() {
    let e = errors(&[
        ("10-a.toml", "[level.high]\npids = 20\n"),
        ("20-b.toml", "[level.high]\npids = 30\n"),
        ("30-c.toml", "not toml at all ="),
    ]);
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_eq!(
        e[0],
        "20-b.toml:2:8: `pids` of level high is already set at 10-a.toml:2:8"
    );
    assert!(e[1].starts_with("30-c.toml:1:"), "{}", e[1]);
}

#[test]
fn load_reads_a_directory_in_name_order_and_reports_io_problems() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[route]]\nname = \"second\"\nlevel = \"high\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[[route]]\nname = \"first\"\nid = \"billing-*\"\nlevel = \"standard\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
    let p = Policy::load(dir.path()).unwrap();
    assert_eq!(p.routes.len(), 2);
    assert_eq!(p.routes[0].name, "first");
    assert_eq!(p.resolve(&manifest(""), None).level.value, Level::Standard);

    let missing = dir.path().join("nope");
    let e = Policy::load(&missing).unwrap_err();
    assert!(e.to_string().contains("cannot read"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = Policy::load(empty.path()).unwrap_err();
    assert!(e.to_string().contains("no policy files"), "{e}");
}

#[test]
fn cpu_accepts_numbers_and_strings() {
    assert_eq!(parse_cpu(&toml::Value::Float(0.5)).unwrap(), 0.5);
    assert_eq!(parse_cpu(&toml::Value::Integer(2)).unwrap(), 2.0);
    assert_eq!(
        parse_cpu(&toml::Value::String("0.25".into())).unwrap(),
        0.25
    );
    assert!(
        parse_cpu(&toml::Value::String("lots".into()))
            .unwrap_err()
            .contains("expected a number")
    );
}

#[test]
fn grants_allow_what_they_name_and_a_denial_names_the_grants_that_applied() {
    let p = Policy::parse(&files(&[(
        "grants.toml",
        r#"
[[grant]]
name = "billing"
id = "billing-*"
kv_quota = "1MiB"
fetch = [
  { url = "https://api.example.com/v1/", methods = ["get", "POST"] },
  { url = "http://*.internal:*/" },
]
fetch_timeout = "2s"
publish = ["invoices.*"]
subscribe = ["orders"]
call = ["tax-*:compute", "audit"]

[[grant]]
id = "other"
kv_quota = "5MiB"
"#,
    )]))
    .unwrap();
    let s = p.resolve(&manifest(""), None).services;
    assert_eq!(s.kv_quota.value, 1 << 20);
    assert_eq!(s.kv_quota.origin.to_string(), "grants.toml:5:12");
    assert_eq!(s.fetch_timeout.value, Duration::from_secs(2));
    assert!(s.check_kv().unwrap().starts_with("kv_quota 1 MiB"));
    let ok = s.check_fetch("POST", "https", "api.example.com", 443, "/v1/charges");
    assert_eq!(
        ok.unwrap(),
        "grant \"billing\" (grants.toml:2:1): fetch GET,POST https://api.example.com/v1/"
    );
    assert!(
        s.check_fetch("GET", "http", "db.internal", 5432, "/x")
            .is_ok()
    );
    // Wrong port (default 443), scheme, path, method, host.
    for (m, scheme, host, port, path) in [
        ("GET", "https", "api.example.com", 8443, "/v1/"),
        ("GET", "http", "api.example.com", 443, "/v1/"),
        ("GET", "https", "api.example.com", 443, "/v2/"),
        ("DELETE", "https", "api.example.com", 443, "/v1/"),
        ("GET", "https", "evil.com", 443, "/v1/"),
        ("GET", "http", "internal", 80, "/"),
    ] {
        let why = s.check_fetch(m, scheme, host, port, path).unwrap_err();
        assert_eq!(
            why,
            format!(
                "default deny: no [[grant]] fetch rule allows {m} {scheme}://{host}:{port}{path} \
                 for plugin billing-api (grants that apply: grant \"billing\" (grants.toml:2:1))"
            )
        );
    }
    assert!(s.check_publish("invoices.paid").is_ok());
    assert!(s.check_publish("orders").is_err());
    assert!(s.check_subscribe("orders").is_ok());
    assert!(s.check_subscribe("invoices.paid").is_err());
    assert!(s.check_call("tax-eu", "compute").is_ok());
    assert!(s.check_call("tax-eu", "refund").is_err());
    assert!(s.check_call("audit", "anything").is_ok());
    // A plugin no grant names gets nothing.
    let other = p.resolve(
        &Manifest::parse(
            "id = \"lonely\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"m.js\"\n",
            Path::new("p.toml"),
        )
        .unwrap(),
        None,
    );
    assert_eq!(other.services.kv_quota.value, 0);
    assert_eq!(
        other.services.check_kv().unwrap_err(),
        "default deny: no [[grant]] kv_quota rule allows a key-value store for plugin lonely \
         (no grant applies to it)"
    );
}

#[test]
fn budgets_are_policy_values_per_level_and_route_with_their_origin() {
    let p = Policy::parse(&files(&[
        (
            "levels.toml",
            "[level.standard]\ninit_timeout = \"2s\"\nlog_rate = \"16KiB\"\naudit_rate = 10\nhost_calls = 2\n",
        ),
        (
            "routes.toml",
            "[[route]]\nname = \"chatty\"\nid = \"billing-*\"\nlevel = \"standard\"\nlimits = { log_rate = \"1MiB\" }\n",
        ),
    ]))
    .unwrap();
    let e = p.resolve(&manifest(""), None);
    assert_eq!(e.init_timeout.value, Duration::from_secs(2));
    assert_eq!(e.init_timeout.origin.to_string(), "levels.toml:2:16");
    assert_eq!(e.log_rate.value, 1 << 20);
    assert_eq!(e.log_rate.origin.to_string(), "routes.toml:5:23");
    assert_eq!((e.audit_rate.value, e.host_calls.value), (10, 2));
    let shown = e.to_string();
    for row in [
        "  init_timeout   2s           levels.toml:2:16",
        "  log_rate       1 MiB/s      routes.toml:5:23",
        "  audit_rate     10/s         levels.toml:4:14",
        "  host_calls     2            levels.toml:5:14",
    ] {
        assert!(shown.contains(row), "{row}:\n{shown}");
    }
    // Unset: built in, and the load's deadline is the plugin's timeout.
    let d = Policy::built_in().resolve(&manifest("[limits]\ntimeout = \"3s\"\n"), None);
    assert_eq!(d.init_timeout.value, Duration::from_secs(3));
    assert_eq!(
        d.init_timeout.origin.to_string(),
        "derived: the plugin's timeout"
    );
    assert_eq!(
        (d.log_rate.value, d.audit_rate.value, d.host_calls.value),
        (64 << 10, 50, 4)
    );
    let e = errors(&[(
        "levels.toml",
        "[level.high]\ninit_timeout = \"0s\"\nlog_rate = \"10B\"\naudit_rate = 0\nhost_calls = 65\n",
    )]);
    assert_eq!(
        e,
        [
            "levels.toml:2:16: init_timeout must be greater than zero",
            "levels.toml:3:12: log_rate must be at least 1 KiB",
            "levels.toml:4:14: audit_rate must be between 1 and 10000, not 0",
            "levels.toml:5:14: host_calls must be between 1 and 64, not 65",
        ],
        "{e:#?}"
    );
}

#[test]
fn limits_of_nothing_are_named_errors() {
    let e = errors(&[(
        "levels.toml",
        "[level.standard]\nmemory = \"0\"\nmax_output = \"0B\"\n\n[level.high]\nmemory = \"512KiB\"\ntimeout = \"0s\"\n",
    )]);
    assert_eq!(
        e,
        [
            "levels.toml:2:10: memory must be at least 1 MiB",
            "levels.toml:3:14: max_output must be at least 1 B",
            "levels.toml:6:10: memory must be at least 1 MiB",
            "levels.toml:7:11: timeout must be greater than zero",
        ],
        "{e:#?}"
    );
}

#[test]
fn special_use_addresses_are_classified_whatever_their_spelling() {
    let class = |a: &str| special_use(a.parse().unwrap());
    for (a, want) in [
        ("127.0.0.1", Some("loopback")),
        ("127.255.0.9", Some("loopback")),
        ("10.1.2.3", Some("private")),
        ("172.16.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("192.168.1.1", Some("private")),
        ("169.254.169.254", Some("link-local")),
        ("100.64.0.1", Some("shared (carrier-grade NAT)")),
        ("0.0.0.0", Some("unspecified (\"this network\")")),
        ("224.0.0.1", Some("multicast")),
        ("255.255.255.255", Some("reserved")),
        ("::1", Some("loopback")),
        ("::", Some("unspecified")),
        ("fe80::1", Some("link-local")),
        ("fd00::1", Some("unique-local")),
        ("fc12::1", Some("unique-local")),
        ("ff02::1", Some("multicast")),
        // The IPv4 address inside an IPv6 one decides.
        ("::ffff:127.0.0.1", Some("loopback")),
        ("::ffff:169.254.169.254", Some("link-local")),
        ("::10.0.0.1", Some("private")),
        ("64:ff9b::a9fe:a9fe", Some("link-local")),
        ("2002:7f00:1::", Some("loopback")),
        ("2001:db8::1", Some("documentation")),
        // Ordinary public addresses.
        ("93.184.215.14", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
        ("2002:808:808::", None),
    ] {
        assert_eq!(class(a), want, "{a}");
    }
}

#[test]
fn a_special_use_address_is_allowed_only_by_a_rule_that_names_it() {
    let p = Policy::parse(&files(&[(
        "grants.toml",
        r#"
[[grant]]
name = "net"
fetch = [
  { url = "http://*:*/" },
  { url = "http://10.0.0.5:8080/api/", methods = ["POST"] },
  { url = "http://[fd00::1]/" },
]
"#,
    )]))
    .unwrap();
    let s = p.resolve(&manifest(""), None).services;
    let addr = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
    // The glob allows the name, but not the address behind it.
    assert!(s.check_fetch("GET", "http", "db.corp", 80, "/").is_ok());
    assert_eq!(
        s.check_fetch_address(
            "GET",
            "http",
            ("db.corp", 80, "/"),
            addr("10.0.0.5"),
            "private"
        )
        .unwrap_err(),
        "special-use address: db.corp, which resolves to 10.0.0.5, a private address, is \
         refused unless a fetch rule names 10.0.0.5 itself; no [[grant]] does for GET \
         http://db.corp:80/ for plugin billing-api"
    );
    // The rule naming it allows it, for what else it allows (method, port, path).
    let ok = s.check_fetch_address(
        "POST",
        "http",
        ("db.corp", 8080, "/api/x"),
        addr("10.0.0.5"),
        "private",
    );
    assert_eq!(
        ok.unwrap(),
        "grant \"net\" (grants.toml:2:1): fetch POST http://10.0.0.5:8080/api/ (names 10.0.0.5)"
    );
    for (m, port, path) in [
        ("GET", 8080, "/api/x"),
        ("POST", 80, "/api/x"),
        ("POST", 8080, "/"),
    ] {
        assert!(
            s.check_fetch_address(
                m,
                "http",
                ("10.0.0.5", port, path),
                addr("10.0.0.5"),
                "private"
            )
            .unwrap_err()
            .starts_with("special-use address: 10.0.0.5, a private address, is refused"),
            "{m} {port} {path}"
        );
    }
    // IPv4-mapped is the same address; an IPv6 literal rule matches its own host.
    assert!(
        s.check_fetch_address(
            "POST",
            "http",
            ("[::ffff:10.0.0.5]", 8080, "/api/"),
            addr("::ffff:10.0.0.5"),
            "private"
        )
        .is_ok()
    );
    assert!(s.check_fetch("GET", "http", "[fd00::1]", 80, "/").is_ok());
    assert!(
        s.check_fetch_address(
            "GET",
            "http",
            ("[fd00::1]", 80, "/"),
            addr("fd00::1"),
            "unique-local"
        )
        .is_ok()
    );
    assert!(
        s.check_fetch_address(
            "GET",
            "http",
            ("[fd00::2]", 80, "/"),
            addr("fd00::2"),
            "unique-local"
        )
        .is_err()
    );
}

#[test]
fn grant_errors_name_file_line_and_column() {
    let e = errors(&[(
        "g.toml",
        r#"
[[grant]]
fetch = [{ url = "ftp://x/" }, { url = "http://x:99999/" }, { url = "http://x/", methods = ["G T"] }]
publish = ["a[", "ok"]
kv_quota = "lots"
fetch_timeout = "soon"
colour = "red"
"#,
    )]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("g.toml:7:1: unknown field `colour`"),
        "{e:?}"
    );
    let e = errors(&[(
        "g.toml",
        r#"
[[grant]]
fetch = [{ url = "ftp://x/" }, { url = "http://x:99999/" }, { url = "http://x/", methods = ["G T"] }]
publish = ["a["]
kv_quota = "lots"
fetch_timeout = "soon"
"#,
    )]);
    assert_eq!(e.len(), 6, "{e:#?}");
    assert!(e.iter().any(|m| m.starts_with("g.toml:5:12: ")), "{e:#?}");
    assert!(
        e.iter()
            .any(|m| m.starts_with("g.toml:6:17: invalid duration")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|m| m == "g.toml:3:10: fetch url scheme \"ftp\": use http or https"),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("port \"99999\" is not a number or *")),
        "{e:#?}"
    );
    assert!(
        e.iter().any(|m| m.contains("fetch method \"G T\"")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("g.toml:4:12: invalid glob \"a[\"")),
        "{e:#?}"
    );
}

#[test]
fn requested_permissions_are_shown_with_what_the_grants_say() {
    let p = Policy::parse(&files(&[(
        "grants.toml",
        r#"
[[grant]]
name = "billing"
id = "billing-*"
kv_quota = "1MiB"
fetch = [{ url = "https://api.example.com/" }]
publish = ["invoices.*"]
call = ["tax-*:compute"]
"#,
    )]))
    .unwrap();
    let m = manifest(
        r#"
[permissions]
kv = true
http = ["api.example.com:443", "evil.example:8080"]
publish = ["invoices.paid", "orders"]
subscribe = ["news=on_news"]
call = ["tax-eu:compute", "ledger"]
"#,
    );
    let e = p.resolve(&m, None);
    let lines = e.requested_lines();
    let granted: Vec<(&str, bool)> = e
        .requested
        .iter()
        .map(|r| (r.what.as_str(), r.decision.is_ok()))
        .collect();
    assert_eq!(
        granted,
        [
            ("kv", true),
            ("http api.example.com:443", true),
            ("http evil.example:8080", false),
            ("publish invoices.paid", true),
            ("publish orders", false),
            ("subscribe news=on_news", false),
            ("call tax-eu:compute", true),
            ("call ledger", false),
        ]
    );
    assert_eq!(
        lines[1],
        "http api.example.com:443: granted by grant \"billing\" (grants.toml:2:1): fetch GET \
         https://api.example.com/"
    );
    assert!(
        lines[2].starts_with(
            "http evil.example:8080: not granted: default deny: no [[grant]] fetch rule allows \
             fetch from evil.example:8080 for plugin billing-api"
        ),
        "{}",
        lines[2]
    );
    let shown = e.to_string();
    assert!(
        shown.contains("  requested      kv: granted by kv_quota 1 MiB"),
        "{shown}"
    );
    assert!(
        shown.contains("  requested      call ledger: not granted"),
        "{shown}"
    );
    // A plugin that asks for nothing shows no request.
    assert!(p.resolve(&manifest(""), None).requested.is_empty());
}

#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A FIFO nobody writes to: refused at once, never waited on.
    let e = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("fifo.toml") && e.contains("not a regular file (a FIFO)"),
        "{e}"
    );
    std::fs::remove_file(&fifo).unwrap();

    std::fs::create_dir(dir.path().join("dir.toml")).unwrap();
    let e = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not a regular file (a directory)"), "{e}");
    std::fs::remove_dir(dir.path().join("dir.toml")).unwrap();

    let big = dir.path().join("big.toml");
    let mut text = "# padding\n".repeat((MAX_POLICY_FILE as usize / 10) + 1);
    text.push_str("[[route]]\nlevel = \"high\"\n");
    std::fs::write(&big, &text).unwrap();
    let e = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{} bytes, over the 1 MiB it may have", text.len())),
        "{e}"
    );
    std::fs::remove_file(&big).unwrap();

    std::fs::write(dir.path().join("latin1.toml"), b"# caf\xe9\n").unwrap();
    let e = Policy::load(dir.path()).unwrap_err().to_string();
    assert!(e.contains("not UTF-8 (invalid byte at offset 5)"), "{e}");
}

#[test]
fn max_output_must_fit_in_a_frame() {
    let e = Policy::parse(&[(
        PathBuf::from("big.toml"),
        "[level.standard]\nmax_output = \"64MiB\"\n".to_owned(),
    )])
    .unwrap_err()
    .to_string();
    let want = format!(
        "big.toml:2:14: max_output must be at most {} (a result travels in one frame of 64 MiB)",
        size(MAX_OUTPUT_LIMIT)
    );
    assert!(e.starts_with(&want), "{e}");
    Policy::parse(&[(
        PathBuf::from("ok.toml"),
        "[level.standard]\nmax_output = \"32MiB\"\n".to_owned(),
    )])
    .unwrap();
}

#[test]
fn route_names_are_unique_across_files() {
    let e = Policy::parse(&[
        (
            PathBuf::from("a.toml"),
            "[[route]]\nname = \"billing\"\nlevel = \"high\"\n".to_owned(),
        ),
        (
            PathBuf::from("b.toml"),
            "[[route]]\nname = \"other\"\nlevel = \"high\"\n\n[[route]]\nname = \"billing\"\nlevel = \"maximum\"\n"
                .to_owned(),
        ),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(
        e.trim_end(),
        "b.toml:6:8: route name `billing` is already used by the route at a.toml:3:9"
    );
}

/// Positions are looked up, not rescanned from the start for every value: a policy
/// of thousands of routes, near the size cap, parses with every origin right (the
/// quadratic scan took minutes on such a file).
#[test]
fn a_large_policy_names_every_position() {
    let n = 10_000;
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\nid = [\"p{i}\"]\nlevel = \"high\"\nlimits = {{ pids = {} }}\n\n",
            10 + i % 50
        ));
    }
    assert!(text.len() as u64 <= MAX_POLICY_FILE, "{}", text.len());
    let p = Policy::parse(&[(PathBuf::from("big.toml"), text)]).unwrap();
    let last = n - 1;
    let m = Manifest::parse(
        &format!("id = \"p{last}\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"main.js\"\n"),
        Path::new("plugin.toml"),
    )
    .unwrap();
    let e = p.resolve(&m, None);
    assert_eq!(e.pids.value, 10 + last as u64 % 50);
    assert_eq!(
        e.pids.origin.to_string(),
        format!("big.toml:{}:19", 6 * last + 5)
    );
}

#[test]
fn instances_are_the_plugins_request_capped_by_its_level_and_one_by_default() {
    let p = Policy::parse(&files(&[
        ("levels.toml", "[level.standard]\ninstances = 3\n"),
        (
            "routes.toml",
            "[[route]]\nname = \"solo\"\nid = \"billing-*\"\nlevel = \"standard\"\n",
        ),
    ]))
    .unwrap();
    let d = p.resolve(&manifest(""), None);
    assert_eq!(d.instances.value, 1);
    assert_eq!(
        d.instances.origin.to_string(),
        "derived: the default: one worker"
    );
    let two = p.resolve(&manifest("[limits]\ninstances = 2\n"), None);
    assert_eq!(two.instances.value, 2);
    assert_eq!(
        two.instances.origin.to_string(),
        "/plugins/billing/plugin.toml:6:13 (the plugin's request)"
    );
    assert!(two.clamped.is_empty(), "{:?}", two.clamped);
    let many = p.resolve(&manifest("[limits]\ninstances = 8\n"), None);
    assert_eq!(many.instances.value, 3);
    assert_eq!(many.instances.origin.to_string(), "levels.toml:2:13");
    assert_eq!(
        many.clamped,
        ["plugin.toml asks for instances 8, policy allows 3"]
    );
    assert!(
        many.to_string()
            .contains("  instances      3            levels.toml:2:13"),
        "{many}"
    );
    // Built in: 4 at standard, 2 at high, 1 at maximum.
    let b = Policy::built_in().resolve(&manifest("[limits]\ninstances = 64\n"), None);
    assert_eq!(b.instances.value, 1, "unrouted: maximum");
    let e = errors(&[("levels.toml", "[level.high]\ninstances = 0\n")]);
    assert_eq!(
        e,
        ["levels.toml:2:13: instances must be between 1 and 64, not 0"]
    );
}
