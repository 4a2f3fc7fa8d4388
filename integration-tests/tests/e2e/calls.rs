//! Calls that succeed or fail in the plugin's own terms.

use crate::support::{hello, testkit, worker_pid};
use corral_protocol::CallError;
use std::time::Duration;

#[tokio::test]
async fn example_plugin_functions_answer() {
    let (sup, _c) = hello();
    let out = sup.call("hello-wasm", "greet", b"Ada".to_vec(), None).await;
    assert_eq!(out.unwrap(), b"Hello, Ada!");
    let out = sup.call("hello-wasm", "reverse", "añb".into(), None).await;
    assert_eq!(out.unwrap(), "bña".as_bytes());
    let out = sup.call("hello-wasm", "wc", b"a b\nc".to_vec(), None).await;
    assert_eq!(out.unwrap(), br#"{"lines":2,"words":3,"bytes":5}"#);
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn empty_input_and_empty_output() {
    let (sup, _c) = hello();
    assert_eq!(
        sup.call("hello-wasm", "echo", vec![], None).await.unwrap(),
        b""
    );
    assert_eq!(
        sup.call("hello-wasm", "noop", b"x".to_vec(), None)
            .await
            .unwrap(),
        b""
    );
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn large_inputs_round_trip_exactly() {
    // Correctness, not speed: a generous deadline for slow debug builds on busy machines.
    let slow = Some(Duration::from_secs(60));
    let (sup, _c) = hello();
    // 4 MiB of non-repeating bytes through the Rust example...
    let big: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let out = sup
        .call("hello-wasm", "echo", big.clone(), None)
        .await
        .unwrap();
    assert_eq!(out.len(), big.len());
    assert!(out == big, "echoed bytes differ");
    sup.shutdown(Duration::from_secs(1)).await;

    // ...and 32 MiB through the WAT fixture (input frames near the real limit).
    let f = testkit("memory = \"64MiB\"\nmax_output = \"40MiB\"");
    let huge = vec![0xA5u8; 32 << 20];
    let out = f.sup.call(&f.id, "echo", huge.clone(), slow).await.unwrap();
    assert!(out == huge);
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn input_beyond_the_frame_limit_is_bad_input() {
    let f = testkit("");
    let too_big = vec![0u8; corral_protocol::frame::MAX_FRAME as usize + 1];
    match f.sup.call(&f.id, "echo", too_big, None).await {
        Err(CallError::BadInput { reason }) => {
            assert!(reason.contains("exceeds the limit"), "{reason}")
        }
        other => panic!("expected bad input, got {other:?}"),
    }
    // The worker is unaffected.
    assert_eq!(f.sup.call(&f.id, "ok", vec![], None).await.unwrap(), b"ok");
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn plugin_errors_are_typed() {
    let (sup, _c) = hello();
    match sup.call("hello-wasm", "greet", b"  ".to_vec(), None).await {
        Err(CallError::Plugin { message }) => assert_eq!(message, "give a name to greet"),
        other => panic!("expected plugin error, got {other:?}"),
    }
    let f = testkit("");
    match f.sup.call(&f.id, "fail", vec![], None).await {
        Err(CallError::Plugin { message }) => assert_eq!(message, "boom requested"),
        other => panic!("expected plugin error, got {other:?}"),
    }
    sup.shutdown(Duration::from_secs(1)).await;
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unknown_plugin_and_function() {
    let (sup, _c) = hello();
    match sup.call("nope", "greet", vec![], None).await {
        Err(CallError::UnknownPlugin { plugin }) => assert_eq!(plugin, "nope"),
        other => panic!("expected unknown plugin, got {other:?}"),
    }
    match sup.call("hello-wasm", "gret", vec![], None).await {
        Err(e @ CallError::UnknownFunction { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("\"gret\""), "{msg}");
            assert!(
                msg.contains(
                    "announce, echo, fetch, greet, news, noop, now, on_news, reverse, visit, wc"
                ),
                "{msg}"
            );
        }
        other => panic!("expected unknown function, got {other:?}"),
    }
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn host_call_round_trip_reaches_the_supervisor() {
    let (sup, _c) = hello();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let out = sup.call("hello-wasm", "now", vec![], None).await.unwrap();
    let now: i64 = String::from_utf8(out).unwrap().parse().unwrap();
    assert!(
        now >= before && now - before < 10_000,
        "now={now} before={before}"
    );
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn one_worker_serves_many_calls_in_order() {
    let f = testkit("");
    let pid = {
        f.sup.call(&f.id, "count", vec![], None).await.unwrap();
        worker_pid(&f.sup, &f.id).await
    };
    for expected in 2..=50u32 {
        let out = f.sup.call(&f.id, "count", vec![], None).await.unwrap();
        assert_eq!(out, expected.to_le_bytes());
    }
    assert_eq!(worker_pid(&f.sup, &f.id).await, pid);
    f.sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn concurrent_callers_all_get_their_own_answers() {
    let (sup, _c) = hello();
    let sup = std::sync::Arc::new(sup);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let sup = sup.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("caller{i}");
            let out = sup
                .call("hello-wasm", "greet", name.clone().into_bytes(), None)
                .await;
            assert_eq!(out.unwrap(), format!("Hello, {name}!").into_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    sup.shutdown(Duration::from_secs(1)).await;
}
