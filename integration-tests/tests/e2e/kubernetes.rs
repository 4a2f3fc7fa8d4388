//! `dist/kubernetes` and `dist/container` (docs/fleet.md) checked from outside:
//! the manifests against the Kubernetes schemas with a real validator
//! (`kubernetes-validate` from PyPI, which .ci/run installs), and the image's
//! layout (`dist/container/install.sh`) serving the ConfigMap's own configuration,
//! under exactly the capabilities the Deployment grants, against a PostgreSQL
//! server over TLS, reached through the remote API as the Service would reach it.

use corral_integration_tests::daemon::Served;
use corral_integration_tests::postgres::{PASSWORD, Postgres};
use corral_integration_tests::tls::Ca;
use corral_integration_tests::{built, native_plugin, open_tempdir, repo_root};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn manifests() -> PathBuf {
    repo_root().join("dist/kubernetes")
}

/// A program on PATH, or a panic that says who installs it.
fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|f| f.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: .ci/run installs it (PyPI kubernetes-validate)")
        })
}

/// The YAML documents of `path` as JSON, read by the validator's own Python
/// (its venv has PyYAML, which the validator reads manifests with).
fn yaml(path: &Path) -> Vec<Value> {
    let validator = std::fs::read_to_string(on_path("kubernetes-validate")).unwrap();
    let python = validator
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .expect("kubernetes-validate starts with its interpreter's #! line")
        .trim()
        .to_owned();
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(version: Option<&str>, files: &[PathBuf]) -> Output {
    let mut c = Command::new(on_path("kubernetes-validate"));
    c.arg("--strict");
    if let Some(v) = version {
        c.args(["-k", v]);
    }
    c.args(files).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The one document of `kind` in the manifests.
fn resource(kind: &str, name: &str) -> Value {
    let mut found = Vec::new();
    for f in manifest_files() {
        found.extend(
            yaml(&f)
                .into_iter()
                .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name),
        );
    }
    assert_eq!(found.len(), 1, "{kind}/{name}");
    found.remove(0)
}

/// Every manifest but the kustomization.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    files
}

/// The manifests are valid Kubernetes objects, strictly (no unknown field), for
/// the oldest release they need (1.30: `appArmorProfile`) and the newest the
/// validator knows; the kustomization lists every one of them; and the validator
/// does refuse a manifest with a misspelt field.
#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let files = manifest_files();
    for version in [Some("1.30.0"), None] {
        let out = validate(version, &files);
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(out.status.success(), "{version:?}: {all}");
        assert!(
            !all.contains("ERROR") && !all.contains("WARN"),
            "{version:?}: {all}"
        );
        assert_eq!(all.matches(" passed for resource ").count(), 11, "{all}");
    }
    let kustomization = &yaml(&manifests().join("kustomization.yaml"))[0];
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, names);

    let dir = open_tempdir();
    let bad = dir.path().join("deployment.yaml");
    let deployment = std::fs::read_to_string(manifests().join("deployment.yaml")).unwrap();
    std::fs::write(
        &bad,
        deployment.replace("readOnlyRootFilesystem", "readOnlyRootFilesytem"),
    )
    .unwrap();
    let out = validate(Some("1.30.0"), &[bad]);
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).contains("'readOnlyRootFilesytem' was unexpected"),
        "{}",
        text(&out.stdout)
    );

    // What a schema cannot say: the pod's privileges are the documented ones,
    // and the probes, ports and mounts meet the configuration.
    let pod = &resource("Deployment", "corral")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["SETUID", "SETGID", "SETPCAP", "KILL", "SYS_ADMIN"])
    );
    assert!(
        sc.get("allowPrivilegeEscalation").is_none(),
        "the API refuses false with SYS_ADMIN"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "remote", "{probe}");
        assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    let config = resource("ConfigMap", "corral-config")["data"]["corral.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let ports: Vec<(String, i64)> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [("remote".to_owned(), 8443), ("metrics".to_owned(), 9464)]
    );
    assert!(
        config.contains("listen = \"0.0.0.0:8443\"")
            && config.contains("metrics = \"0.0.0.0:9464\"")
    );
    let mounts: Vec<String> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .collect();
    for secret in [
        "/run/secrets/corral/tokens/",
        "/run/secrets/corral/tls/",
        "/run/secrets/corral/postgres/",
    ] {
        assert!(config.contains(secret), "{secret}");
        assert!(
            mounts.contains(&secret.trim_end_matches('/').to_owned()),
            "{secret}"
        );
    }
    assert_eq!(
        c["args"],
        serde_json::json!(["serve", "--config", "/etc/corral/config/corral.toml"])
    );
}

/// `setpriv` arguments that give a root process exactly the Deployment's
/// capabilities (as the container runtime would: bounding set, so root's
/// permitted and effective sets after exec), plus `extra`.
fn with_capabilities(extra: &[&str], without: Option<&str>) -> Vec<String> {
    let pod = &resource("Deployment", "corral")["spec"]["template"]["spec"];
    let mut caps: Vec<String> = pod["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_ascii_lowercase())
        .filter(|c| Some(c.as_str()) != without)
        .collect();
    caps.extend(extra.iter().map(|c| c.to_string()));
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect();
    vec![
        "--bounding-set".into(),
        format!("-all{set}"),
        "--inh-caps".into(),
        "-all".into(),
        "--".into(),
    ]
}

/// What this host needs beyond the pod's capabilities: its cgroup v1 directories
/// are not writable by their owner (`dr-xr-xr-x root`), so root needs
/// CAP_DAC_OVERRIDE to make groups in them. A pod's own cgroup v2 directory is
/// owner-writable, and the Deployment does not grant it.
fn host_extra() -> Vec<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/sys/fs/cgroup/memory")
        .or_else(|_| std::fs::metadata("/sys/fs/cgroup"))
        .map(|m| m.permissions().mode())
        .unwrap_or(0o755);
    if mode & 0o200 == 0 {
        println!("this host's cgroup directories are not owner-writable: adding dac_override");
        vec!["dac_override"]
    } else {
        Vec::new()
    }
}

/// The image's files laid out under `root` by dist/container/install.sh.
fn install(root: &Path) {
    let out = Command::new("sh")
        .arg(repo_root().join("dist/container/install.sh"))
        .arg(&built().bin_dir)
        .arg(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {}", text(&out.stderr));
}

/// `text` with the pod's paths under `root` and the cluster's addresses replaced
/// by this machine's (the database on `pg_port`, the listeners on free ports).
fn localise(text: &str, root: &Path, pg_port: u16) -> String {
    let mut t = text
        .replace("postgres.corral.svc:5432", &format!("127.0.0.1:{pg_port}"))
        .replace("\"0.0.0.0:8443\"", "\"127.0.0.1:0\"")
        .replace("\"0.0.0.0:9464\"", "\"127.0.0.1:0\"");
    for prefix in [
        "/usr/share/corral",
        "/usr/libexec/corral",
        "/etc/corral",
        "/run/secrets/corral",
        "/run/corral",
        "/var/cache/corral",
        "/var/lib/corral",
    ] {
        t = t.replace(
            &format!("\"{prefix}"),
            &format!("\"{}{prefix}", root.display()),
        );
    }
    t
}

fn write(path: &Path, contents: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

/// The image's files and the ConfigMap's configuration and policy, unchanged but
/// for paths and addresses, under the Deployment's capabilities: the daemon
/// serves the examples over the remote API with the Secret's tokens and TLS
/// certificate, keeps the store in PostgreSQL over TLS checked against the
/// Secret's CA, and answers the probes' /healthz. Each level runs with exactly
/// these capabilities, and without any one of them the start is refused with
/// the capability named; a worker past its deadline is ended (CAP_KILL).
#[test]
fn the_image_serves_the_configmaps_configuration_with_the_deployments_capabilities() {
    let ca = Ca::new("corral fleet test CA");
    let (cert, key) = ca.issue(&["127.0.0.1"]);
    let pg = Postgres::start_tls(&cert, &key);
    pg.create_database("corral");
    let root = open_tempdir();
    let r = root.path();
    install(r);

    let config = resource("ConfigMap", "corral-config");
    write(
        &r.join("etc/corral/config/corral.toml"),
        &localise(config["data"]["corral.toml"].as_str().unwrap(), r, pg.port),
    );
    for (name, policy) in resource("ConfigMap", "corral-policies")["data"]
        .as_object()
        .unwrap()
    {
        write(
            &r.join("etc/corral/policies").join(name),
            policy.as_str().unwrap(),
        );
    }
    let billing = "billing-6f1e0c9a2d7b4e38a5c1";
    let ops = "ops-93d2b7e4c0a15f6e8b27";
    write(&r.join("run/secrets/corral/tokens/billing"), billing);
    write(&r.join("run/secrets/corral/tokens/ops"), ops);
    write(&r.join("run/secrets/corral/tls/tls.crt"), &cert);
    write(&r.join("run/secrets/corral/tls/tls.key"), &key);
    write(&r.join("run/secrets/corral/postgres/password"), PASSWORD);
    write(&r.join("run/secrets/corral/postgres/ca.crt"), &ca.pem());
    for d in ["run/corral", "var/cache/corral", "var/lib/corral"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let lib = r.join("usr/libexec/corral");
    let extra = host_extra();

    // The entrypoint never remounts a hierarchy outside a cgroup namespace.
    let out = Command::new(lib.join("entrypoint.sh"))
        .arg("--version")
        .env("CORRAL_DELEGATE_CGROUP", "1")
        .output()
        .unwrap();
    if std::fs::read_to_string("/proc/self/cgroup").unwrap() != "0::/\n" {
        assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("needs cgroup v2 and a cgroup namespace"));
    }

    let mut serve = Command::new("setpriv");
    serve
        .args(with_capabilities(&extra, None))
        .arg(lib.join("entrypoint.sh"))
        .args(["serve", "--log", "info", "--config"])
        .arg(r.join("etc/corral/config/corral.toml"));
    let daemon = Served::launch(r, serve, &r.join("run/corral/control.sock"));
    let url = daemon.remote_url();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let health = client.get(format!("{url}/healthz")).send().await.unwrap();
        assert_eq!(health.status(), 200);
        let call = |plugin: &str, function: &str, token: &str, input: &str| {
            let req = client
                .post(format!("{url}/v1/call/{plugin}/{function}"))
                .bearer_auth(token)
                .body(input.to_owned());
            async move {
                let a = req.send().await.unwrap();
                (a.status().as_u16(), a.text().await.unwrap())
            }
        };
        assert_eq!(
            call("hello-python", "top", billing, "b a b").await,
            (200, "[[\"b\", 2], [\"a\", 1]]".into())
        );
        assert_eq!(
            call("hello-python", "visit", billing, "Ada").await,
            (200, "Welcome, Ada (visit 1)".into())
        );
        assert_eq!(
            call("hello-python", "visit", billing, "Ada").await,
            (200, "Welcome, Ada (visit 2)".into())
        );
        let (status, body) = call("hello-js", "greet", billing, "Ada").await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = call("hello-wasm", "greet", billing, "Ada").await;
        assert_eq!(status, 403, "{body}");
        let (status, body) = call("hello-js", "greet", ops, "Ada").await;
        assert_eq!(status, 403, "ops may call nothing: {body}");
        let status = client
            .get(format!("{url}/v1/status"))
            .bearer_auth(ops)
            .send()
            .await
            .unwrap();
        assert_eq!(status.status(), 200);
        let plugins: Value = status.json().await.unwrap();
        let ids: Vec<&str> = plugins
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            ["hello-js", "hello-native", "hello-python", "hello-wasm"]
        );
    });
    // The store is the database, over TLS; nothing in the pod's state directory.
    assert_eq!(
        pg.psql(
            "corral",
            "SELECT encode(value, 'escape') FROM corral_kv WHERE plugin = 'hello-python'"
        ),
        "2"
    );
    let connections = |ssl: &str| {
        pg.psql(
            "corral",
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE s.ssl = {ssl} AND a.datname = 'corral' AND a.application_name <> 'psql'"
            ),
        )
        .parse::<u32>()
        .unwrap()
    };
    assert!(connections("true") >= 1, "the daemon's connections use TLS");
    assert_eq!(
        connections("false"),
        0,
        "no plain connection from the daemon"
    );
    assert!(!r.join("var/lib/corral/kv.redb").exists());
    let log = daemon.stderr();
    for secret in [billing, ops, PASSWORD] {
        assert!(!log.contains(secret), "a secret in the log");
    }
    drop(daemon);

    // Every level with the Deployment's capabilities; each one taken away refuses
    // the start and names it.
    let corral = lib.join("corral");
    let policy = r.join("etc/corral/policies");
    let run = |caps: Vec<String>, level: &str, plugin: &Path, function: &str| {
        Command::new("setpriv")
            .args(caps)
            .arg(&corral)
            .arg("run")
            .arg("--policy")
            .arg(&policy)
            .args(["--level", level])
            .arg(plugin)
            .arg(function)
            .args(["--input", "a b a"])
            .env("CORRAL_CACHE_DIR", r.join("var/cache/corral"))
            .output()
            .unwrap()
    };
    let python = r.join("usr/share/corral/plugins/hello-python");
    for level in ["standard", "high", "maximum"] {
        let out = run(with_capabilities(&extra, None), level, &python, "top");
        assert!(out.status.success(), "{level}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "[[\"a\", 2], [\"b\", 1]]", "{level}");
    }
    for (cap, level, message) in [
        ("setuid", "standard", "this supervisor lacks CAP_SETUID"),
        ("setgid", "standard", "this supervisor lacks CAP_SETGID"),
        ("setpcap", "standard", "this supervisor lacks CAP_SETPCAP"),
        ("kill", "standard", "this supervisor lacks CAP_KILL"),
        (
            "sys_admin",
            "high",
            "level high requires its own network, IPC and UTS namespaces, which take CAP_SYS_ADMIN",
        ),
    ] {
        let out = run(with_capabilities(&extra, Some(cap)), level, &python, "top");
        assert!(!out.status.success(), "without {cap}");
        assert!(
            text(&out.stderr).contains(message),
            "without {cap}: {}",
            text(&out.stderr)
        );
    }
    // Without SYS_ADMIN, standard still runs (no IPC namespace of its own).
    let out = run(
        with_capabilities(&extra, Some("sys_admin")),
        "standard",
        &python,
        "top",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // CAP_KILL at work: a native endless loop is ended at its deadline, and no
    // process of it is left.
    let spin = native_plugin("native-kit", "spin-kit", "timeout = \"1s\"");
    let out = run(
        with_capabilities(&extra, None),
        "standard",
        spin.path(),
        "spin",
    );
    assert!(
        text(&out.stderr).contains("exceeded its deadline"),
        "{}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    let killed = stderr
        .lines()
        .find(|l| l.contains("killing it"))
        .and_then(|l| l.rsplit("pid").next())
        .map(|rest| {
            rest.chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|pid| pid.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no kill logged: {stderr}"));
    assert!(
        corral_integration_tests::wait_gone(killed, Duration::from_secs(5)),
        "worker {killed} left running"
    );
}
