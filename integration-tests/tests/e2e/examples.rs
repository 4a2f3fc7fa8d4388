//! The shipped examples, one per runtime, do the same job with the same answers
//! (the native one is the Wasm one's source compiled for the machine);
//! the JavaScript one runs a library vendored from npm, unmodified.

use corral::Supervisor;
use corral_integration_tests::{built, example_plugin, open_tempdir, options};
use corral_protocol::CallError;
use std::time::Duration;

const IDS: [&str; 4] = ["hello-wasm", "hello-js", "hello-python", "hello-native"];

/// A supervisor with the four examples under the shipped policy (compiled in: the
/// examples run at standard by its route, with its grant); keep the dirs alive.
fn examples() -> (Supervisor, [tempfile::TempDir; 3]) {
    let js = example_plugin("hello-js");
    let py = example_plugin("hello-python");
    let cache = open_tempdir();
    let mut opts = options(cache.path());
    opts.policy = std::sync::Arc::new(corral::Policy::built_in());
    let mut sup = Supervisor::new(opts);
    sup.add_plugin_dir(&built().hello_wasm).unwrap();
    sup.add_plugin_dir(js.path()).unwrap();
    sup.add_plugin_dir(py.path()).unwrap();
    sup.add_plugin_dir(&built().hello_native).unwrap();
    (sup, [js, py, cache])
}

#[tokio::test]
async fn the_four_examples_give_the_same_answers() {
    let (sup, _dirs) = examples();
    let ids = IDS;
    let inputs: [(&str, &[u8]); 7] = [
        ("greet", b"  Ada  "),
        ("reverse", "héllo, wörld".as_bytes()),
        ("wc", b"one two\nthree\r\nfour  five six\n"),
        ("wc", b""),
        ("echo", &[0, 1, 2, 255, 254]),
        ("noop", b"ignored"),
        ("echo", b""),
    ];
    for (f, input) in inputs {
        let mut answers = Vec::new();
        for id in ids {
            answers.push(sup.call(id, f, input.to_vec(), None).await);
        }
        assert!(answers[0].is_ok(), "{f}: {:?}", answers[0]);
        assert_eq!(answers[0], answers[1], "{f}: wasm vs js");
        assert_eq!(answers[0], answers[2], "{f}: wasm vs python");
        assert_eq!(answers[0], answers[3], "{f}: wasm vs native");
    }
    assert_eq!(
        sup.call("hello-python", "greet", b"Ada".to_vec(), None)
            .await
            .unwrap(),
        b"Hello, Ada!"
    );
    for id in ids {
        match sup.call(id, "greet", b"  ".to_vec(), None).await {
            Err(CallError::Plugin { message }) => {
                assert!(message.contains("give a name to greet"), "{id}: {message}")
            }
            other => panic!("{id}: {other:?}"),
        }
        let now: i64 = String::from_utf8(sup.call(id, "now", vec![], None).await.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert!(now > 1_700_000_000_000, "{id}: {now}");
    }

    let html = sup
        .call(
            "hello-js",
            "render",
            b"# Title\n\nSome *emphasis*, `code` and a [link](https://example.com).\n\n| a | b |\n|---|---|\n| 1 | 2 |\n".to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(html).unwrap(),
        "<h1>Title</h1>\n<p>Some <em>emphasis</em>, <code>code</code> and a \
         <a href=\"https://example.com\">link</a>.</p>\n<table>\n<thead>\n<tr>\n<th>a</th>\n\
         <th>b</th>\n</tr>\n</thead>\n<tbody><tr>\n<td>1</td>\n<td>2</td>\n</tr>\n</tbody></table>\n"
    );
    let top = sup
        .call(
            "hello-python",
            "top",
            b"The cat and the dog and the bird".to_vec(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(top).unwrap(),
        r#"[["the", 3], ["and", 2], ["cat", 1], ["dog", 1], ["bird", 1]]"#
    );
    for p in sup.list().await {
        assert_eq!(p.level, "standard", "{}: the shipped route", p.id);
        assert_eq!(p.restarts, 0, "{}", p.id);
    }
    sup.shutdown(Duration::from_secs(1)).await;
}

/// The examples use the store, a brokered fetch and a topic, under the shipped
/// policy's grant (policies/grants.toml), with the same answers in every runtime.
#[tokio::test(flavor = "multi_thread")]
async fn the_examples_use_the_store_fetch_and_a_topic() {
    let port = crate::services::http_server();
    let (sup, _dirs) = examples();
    let ids = IDS;
    let text = |r: Result<Vec<u8>, CallError>| String::from_utf8(r.unwrap()).unwrap();
    for id in ids {
        assert_eq!(
            text(sup.call(id, "visit", b"Ada".to_vec(), None).await),
            "Welcome, Ada (visit 1)"
        );
        assert_eq!(
            text(sup.call(id, "visit", b"Ada".to_vec(), None).await),
            "Welcome, Ada (visit 2)"
        );
        let url = format!("http://127.0.0.1:{port}/allowed/hello");
        assert_eq!(
            text(sup.call(id, "fetch", url.into_bytes(), None).await),
            "200, 5 bytes",
            "{id}"
        );
        // Outside the grant: another host.
        let err = sup
            .call(
                id,
                "fetch",
                format!("http://localhost:{port}/").into_bytes(),
                None,
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("denied by policy: default deny: no [[grant]] fetch rule allows GET http://localhost"), "{id}: {err}");
    }
    // One announcement reaches all four subscribers.
    assert_eq!(
        text(
            sup.call("hello-js", "announce", b"tea at five".to_vec(), None)
                .await
        ),
        "queued for 4 subscribers"
    );
    for id in ids {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = text(sup.call(id, "news", vec![], None).await);
            if got == "tea at five" {
                break;
            }
            assert!(std::time::Instant::now() < until, "{id}: {got:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    sup.shutdown(Duration::from_secs(2)).await;
}
