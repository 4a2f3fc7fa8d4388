//! Plugin dependencies (`[dependencies]` in plugin.toml): start order, and plugins
//! that are not started because a dependency is missing, incompatible, in a cycle or
//! cannot start, with `corral status`'s reason.

use corral::Supervisor;
use corral_integration_tests::{fixture_plugin, open_tempdir, options};
use corral_protocol::CallError;
use std::io::Write;
use tempfile::TempDir;

/// The JS kit as `id` at `version`, depending on `deps` (TOML lines).
fn plugin(id: &str, version: &str, deps: &str) -> TempDir {
    let dir = fixture_plugin("js-kit", id, "js", "main.js", "");
    let manifest = dir.path().join("plugin.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut text = text.replace("version = \"1.0.0\"", &format!("version = \"{version}\""));
    text.push_str(&format!("\n[dependencies]\n{deps}\n"));
    std::fs::File::create(&manifest)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    dir
}

/// Why `id` did not start.
async fn why(sup: &Supervisor, id: &str) -> String {
    match sup.call(id, "ok", vec![], None).await {
        Err(CallError::StartFailed { reason, .. }) => reason,
        other => panic!("{id}: {other:?}"),
    }
}

#[tokio::test]
async fn dependencies_start_first_and_blocked_plugins_say_why() {
    let dirs = [
        plugin(
            "app",
            "1.0.0",
            "lib = { version = \"^1.2\" }\nextra = { version = \"1\", optional = true }",
        ),
        plugin("lib", "1.4.0", ""),
        plugin("old-app", "1.0.0", "lib = { version = \"^2\" }"),
        plugin("lonely", "1.0.0", "gone = { version = \"^3\" }"),
        plugin("x", "1.0.0", "y = { version = \"1\" }"),
        plugin("y", "1.0.0", "x = { version = \"1\" }"),
        plugin("on-x", "1.0.0", "x = { version = \"1\" }"),
        plugin("on-broken", "1.0.0", "broken = { version = \"1\" }"),
        plugin("broken", "1.0.0", ""),
    ];
    // `broken` cannot load: its entry throws at the top level.
    std::fs::write(
        dirs[8].path().join("main.js"),
        "throw new Error('no luck');\n",
    )
    .unwrap();
    let cache = open_tempdir();
    let mut sup = Supervisor::new(options(cache.path()));
    for d in &dirs {
        sup.add_plugin_dir(d.path()).unwrap();
    }
    let r = sup.dependencies();
    let pos = |id: &str| r.order.iter().position(|p| p == id).unwrap();
    assert!(pos("lib") < pos("app"), "{:?}", r.order);

    // Calling app starts lib first.
    assert_eq!(sup.call("app", "ok", vec![], None).await.unwrap(), b"ok");
    let list = sup.list().await;
    let info = |id: &str| list.iter().find(|p| p.id == id).unwrap().clone();
    assert_eq!(info("lib").state, "running");

    assert_eq!(
        why(&sup, "old-app").await,
        "not started: dependency lib is version 1.4.0, which does not satisfy ^2"
    );
    assert_eq!(
        why(&sup, "lonely").await,
        "not started: dependency gone (^3) is not installed"
    );
    assert_eq!(
        why(&sup, "x").await,
        "not started: dependency cycle: x -> y -> x"
    );
    assert_eq!(
        why(&sup, "y").await,
        "not started: dependency cycle: x -> y -> x"
    );
    assert_eq!(
        why(&sup, "on-x").await,
        "not started: dependency x cannot start: dependency cycle: x -> y -> x"
    );
    let broken = why(&sup, "on-broken").await;
    assert!(
        broken.starts_with(
            "not started: dependency broken cannot start: plugin broken could not be started:"
        ) && broken.contains("no luck"),
        "{broken}"
    );
    // Status says why, for each.
    let list = sup.list().await;
    for (id, state) in [
        ("old-app", "blocked"),
        ("lonely", "blocked"),
        ("x", "blocked"),
        ("on-x", "blocked"),
    ] {
        let p = list.iter().find(|p| p.id == id).unwrap();
        assert_eq!(p.state, state, "{id}");
        assert!(
            p.last_error
                .as_deref()
                .unwrap_or("")
                .starts_with("not started: dependency"),
            "{id}: {:?}",
            p.last_error
        );
    }
    sup.shutdown(std::time::Duration::from_secs(2)).await;
}
