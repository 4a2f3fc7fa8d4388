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

/// `corral` with `args`, ended (and the test failed) if it has not finished within
/// 30 s: what these files are made to do is block a reader forever.
fn corral_within(args: &[&str]) -> Output {
    let child = Command::new(built().corral())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(std::time::Duration::from_secs(30)) {
        Ok(o) => o,
        Err(_) => {
            // SAFETY: kill(2) of the child this test started, by pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("corral {args:?} blocked");
        }
    }
}

/// `o` failed naming `fifo` as a FIFO, not a file it read.
fn refused(o: &Output, fifo: &Path) {
    assert!(!o.status.success(), "{}", out(o));
    assert!(
        out(o).contains(&format!("{}: not a regular file (a FIFO)", fifo.display())),
        "{}",
        out(o)
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Files that are not what they seem: a key that is a FIFO or far too large, a FIFO
/// in a plugin being signed or verified, a signature that is a FIFO. Each is refused
/// at once with the file named; nothing blocks and nothing is silently cut.
#[test]
fn keys_and_plugin_files_that_are_not_regular_or_too_large_are_refused_at_once() {
    let keys = open_tempdir();
    let (key, public) = keygen(keys.path(), "acme");
    let plugin = fixture_plugin("js-kit", "odd-kit", "js", "main.js", "");
    let dir = plugin.path();
    let sign = |key: &Path| {
        corral_within(&[
            "plugin",
            "sign",
            dir.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--publisher",
            "acme",
        ])
    };

    let fifo_key = keys.path().join("fifo.key");
    mkfifo(&fifo_key);
    let o = sign(&fifo_key);
    assert!(!o.status.success());
    assert!(
        out(&o).contains(&format!(
            "cannot read the key {}: not a regular file (a FIFO)",
            fifo_key.display()
        )),
        "{}",
        out(&o)
    );
    // A key followed by 5000 more bytes used to be cut at 4 KiB and read as a key.
    let big_key = keys.path().join("big.key");
    let mut text = std::fs::read_to_string(&key).unwrap();
    text.push_str(&"0".repeat(5000));
    std::fs::write(&big_key, &text).unwrap();
    let o = sign(&big_key);
    assert!(!o.status.success());
    assert!(
        out(&o).contains(&format!(
            "cannot read the key {}: {} bytes, over the 4 KiB it may have",
            big_key.display(),
            text.len()
        )),
        "{}",
        out(&o)
    );
    assert!(!dir.join("plugin.sig").exists(), "nothing was signed");

    // A FIFO among the plugin's files: signing names it.
    let pipe = dir.join("pipe");
    mkfifo(&pipe);
    refused(&sign(&key), &pipe);
    // Signed without it, then one appears: verifying names it too.
    std::fs::remove_file(&pipe).unwrap();
    assert!(sign(&key).status.success());
    mkfifo(&pipe);
    let trust = format!("acme={public}");
    let verify = || corral_within(&["plugin", "verify", dir.to_str().unwrap(), "--trust", &trust]);
    refused(&verify(), &pipe);
    std::fs::remove_file(&pipe).unwrap();
    let ok = verify();
    assert!(ok.status.success(), "{}", out(&ok));

    // The signature itself a FIFO.
    let sig = dir.join("plugin.sig");
    std::fs::remove_file(&sig).unwrap();
    mkfifo(&sig);
    refused(&verify(), &sig);
}
