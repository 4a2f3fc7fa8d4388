//! Plugin signatures: `corral plugin keygen | sign | verify`, every tampering case
//! refused with the file named, and routing on the verified publisher.

use corral::Supervisor;
use corral_integration_tests::{built, fixture_plugin, open_tempdir, options};
use std::path::Path;
use std::process::{Command, Output};

fn corral(args: &[&str]) -> Output {
    Command::new(built().corral()).args(args).output().unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A key pair from `corral plugin keygen`: (secret key file, public key hex).
fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let o = corral(&["plugin", "keygen", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    let public = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .expect("keygen prints the public key")
        .trim()
        .to_owned();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret key is private");
    // Never overwritten.
    let again = corral(&["plugin", "keygen", "--out", key.to_str().unwrap()]);
    assert!(!again.status.success());
    assert!(out(&again).contains("already exists"), "{}", out(&again));
    (key, public)
}

fn verify(dir: &Path, trust: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "plugin".to_owned(),
        "verify".to_owned(),
        dir.to_string_lossy().into_owned(),
    ];
    for (name, key) in trust {
        args.push("--trust".into());
        args.push(format!("{name}={key}"));
    }
    Command::new(built().corral()).args(&args).output().unwrap()
}

#[test]
fn sign_verify_and_every_tampering_is_refused_with_the_file_named() {
    let keys = open_tempdir();
    let (acme_key, acme) = keygen(keys.path(), "acme");
    let (_other_key, other) = keygen(keys.path(), "other");
    let plugin = fixture_plugin("js-kit", "signed-kit", "js", "main.js", "");
    let dir = plugin.path();
    let o = corral(&[
        "plugin",
        "sign",
        dir.to_str().unwrap(),
        "--key",
        acme_key.to_str().unwrap(),
        "--publisher",
        "acme",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("signed 3 files"), "{}", out(&o));
    let ok = verify(dir, &[("acme", &acme)]);
    assert!(ok.status.success(), "{}", out(&ok));
    assert!(
        out(&ok).contains("verified: signed by acme"),
        "{}",
        out(&ok)
    );

    // Not trusted, or trusted under another key.
    let o = verify(dir, &[]);
    assert!(!o.status.success());
    assert!(
        out(&o).contains("publisher \"acme\" is not trusted"),
        "{}",
        out(&o)
    );
    let o = verify(dir, &[("acme", &other)]);
    assert!(
        out(&o).contains(&format!(
            "signed with key {acme} but the trusted key of publisher \"acme\" is {other}"
        )),
        "{}",
        out(&o)
    );

    // Each tampering, undone after.
    let main = dir.join("main.js");
    let original = std::fs::read(&main).unwrap();
    let sig = std::fs::read_to_string(dir.join("plugin.sig")).unwrap();
    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Step, Step, &str)> = vec![
        (
            "a changed file",
            Box::new(|| {
                std::fs::write(
                    dir.join("main.js"),
                    b"export function ok() { return 'pwned' }",
                )
                .unwrap()
            }),
            Box::new(|| std::fs::write(dir.join("main.js"), &original).unwrap()),
            "tampered: main.js: changed since signing",
        ),
        (
            "an added file",
            Box::new(|| std::fs::write(dir.join("lib/extra.js"), b"1").unwrap()),
            Box::new(|| std::fs::remove_file(dir.join("lib/extra.js")).unwrap()),
            "tampered: lib/extra.js: added after signing",
        ),
        (
            "a removed file",
            Box::new(|| std::fs::rename(dir.join("main.js"), dir.join("../main.js.bak")).unwrap()),
            Box::new(|| std::fs::rename(dir.join("../main.js.bak"), dir.join("main.js")).unwrap()),
            "tampered: main.js: signed but missing",
        ),
        (
            "an edited file list",
            Box::new(|| {
                let s = std::fs::read_to_string(dir.join("plugin.sig")).unwrap();
                let line = s
                    .lines()
                    .find(|l| l.starts_with("\"main.js\""))
                    .unwrap()
                    .to_owned();
                std::fs::write(dir.join("plugin.sig"), s.replace(&line, "\"main.js\" = \"0000000000000000000000000000000000000000000000000000000000000000\"")).unwrap()
            }),
            Box::new(|| std::fs::write(dir.join("plugin.sig"), &sig).unwrap()),
            "tampered: plugin.sig: the signature does not match its file list",
        ),
        (
            "a link",
            Box::new(|| std::os::unix::fs::symlink("/etc/passwd", dir.join("lib/link")).unwrap()),
            Box::new(|| std::fs::remove_file(dir.join("lib/link")).unwrap()),
            "lib/link: a symbolic link; signed plugins may not contain links",
        ),
    ];
    for (what, tamper, undo, want) in &cases {
        tamper();
        let o = verify(dir, &[("acme", &acme)]);
        assert!(!o.status.success(), "{what}");
        assert!(out(&o).contains(want), "{what}: {}", out(&o));
        println!("{what}: {}", out(&o).trim());
        undo();
        assert!(
            verify(dir, &[("acme", &acme)]).status.success(),
            "{what} undone"
        );
    }
}

#[tokio::test]
async fn the_supervisor_routes_on_the_verified_publisher_and_refuses_tampering() {
    let keys = open_tempdir();
    let (acme_key, acme) = keygen(keys.path(), "acme");
    let signed = fixture_plugin("js-kit", "signed-kit", "js", "main.js", "");
    let unsigned = fixture_plugin("js-kit", "unsigned-kit", "js", "main.js", "");
    let o = corral(&[
        "plugin",
        "sign",
        signed.path().to_str().unwrap(),
        "--key",
        acme_key.to_str().unwrap(),
        "--publisher",
        "acme",
    ]);
    assert!(o.status.success(), "{}", out(&o));
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = std::sync::Arc::new(
        corral::Policy::parse(&[(
            "routes.toml".into(),
            "[[route]]\nname = \"acme\"\npublisher = \"acme\"\nlevel = \"high\"\n\
             [[route]]\nname = \"unsigned\"\nsigned = false\nlevel = \"maximum\"\n"
                .into(),
        )])
        .unwrap(),
    );
    opts.publishers.insert("acme".into(), acme.clone());
    let mut sup = Supervisor::new(opts.clone());
    sup.add_plugin_dir(signed.path()).unwrap();
    sup.add_plugin_dir(unsigned.path()).unwrap();
    assert_eq!(
        sup.explain("signed-kit").unwrap().level.value.as_str(),
        "high"
    );
    assert_eq!(
        sup.explain("unsigned-kit").unwrap().level.value.as_str(),
        "maximum"
    );
    assert_eq!(
        sup.call("signed-kit", "ok", vec![], None).await.unwrap(),
        b"ok"
    );
    // Tampered since: a new supervisor refuses to add it.
    sup.shutdown(std::time::Duration::from_secs(2)).await;
    std::fs::write(
        signed.path().join("main.js"),
        b"export function ok() { return 'pwned' }",
    )
    .unwrap();
    let mut sup = Supervisor::new(opts);
    let err = sup.add_plugin_dir(signed.path()).unwrap_err().to_string();
    assert!(
        err.contains("tampered: main.js: changed since signing"),
        "{err}"
    );
}
