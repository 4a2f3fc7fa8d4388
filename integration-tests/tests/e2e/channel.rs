//! The supervisor-worker channel cannot be dialled, inherited or impersonated, and the
//! control socket is private.

use crate::support::{hello, worker_pid};
use corral::Supervisor;
use corral::control::{ControlClient, ControlServer};
use corral_integration_tests::built;
use corral_protocol::{ControlRequest, ControlResponse, frame};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn fd_links(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let fd: u32 = e.file_name().to_str().unwrap().parse().unwrap();
        if let Ok(target) = std::fs::read_link(e.path()) {
            out.push((fd, target.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn worker_holds_only_stdio_and_its_socket() {
    let (sup, cache) = hello();
    sup.call("hello-wasm", "noop", vec![], None).await.unwrap();
    let pid = worker_pid(&sup, "hello-wasm").await;
    let links = fd_links(pid);
    let fds: Vec<u32> = links.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(fds[..4], [0, 1, 2, 3], "worker fds: {links:?}");
    assert_eq!(links[0].1, "/dev/null", "stdin");
    assert!(
        links[1].1.starts_with("pipe:") && links[2].1.starts_with("pipe:"),
        "{links:?}"
    );
    assert!(
        socket_inode(&links[3].1).is_some(),
        "fd 3 is the socket: {links:?}"
    );
    // Anything else is what wasmtime opened after exec: the precompiled module it
    // maps (read-only, in the store of compiled modules) and its memory image.
    // Nothing inherited from the supervisor, and no second handle on the socket.
    let store = cache.path().join("wasm");
    for (fd, target) in &links[4..] {
        if target.starts_with(store.to_str().unwrap()) {
            assert!(target.ends_with(".cwasm"), "fd {fd} -> {target}");
            let flags = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
            let flags = flags
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            assert_eq!(
                flags & 0o3,
                0,
                "fd {fd} -> {target} is open for reading only"
            );
            continue;
        }
        assert!(
            target.starts_with("/memfd:wasm-memory-image"),
            "fd {fd} -> {target}"
        );
    }
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn worker_socket_has_no_address_and_no_other_holder() {
    let (sup, _c) = hello();
    sup.call("hello-wasm", "noop", vec![], None).await.unwrap();
    let pid = worker_pid(&sup, "hello-wasm").await;
    let link = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    let inode = socket_inode(&link.to_string_lossy()).expect("socket");

    // Unnamed: /proc/net/unix lists it without a path (nothing to connect to).
    let table = std::fs::read_to_string("/proc/net/unix").unwrap();
    let row = table
        .lines()
        .find(|l| l.split_whitespace().nth(6) == Some(&inode.to_string()))
        .unwrap_or_else(|| panic!("inode {inode} in /proc/net/unix"));
    assert_eq!(
        row.split_whitespace().count(),
        7,
        "socket has a path: {row}"
    );

    // No process other than the worker holds its end.
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(other) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if other == pid {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                assert_ne!(
                    socket_inode(&t.to_string_lossy()),
                    Some(inode),
                    "pid {other} holds it"
                );
            }
        }
    }
    sup.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn worker_environment_is_cleared() {
    assert!(
        std::env::var_os("PATH").is_some(),
        "the test process has an environment"
    );
    // Started by exec, and forked from a zygote template (whose environment block,
    // what /proc shows, is the template's: the same allow-list and the variable
    // that made it a template; the worker's own variables replace it in memory).
    for (zygotes, marker) in [
        (Vec::new(), "CORRAL_WORKER_FD"),
        (vec![corral_protocol::Runtime::Wasm], "CORRAL_ZYGOTE"),
    ] {
        let cache = corral_integration_tests::open_tempdir();
        let mut opts = corral_integration_tests::options(cache.path());
        opts.zygotes = zygotes;
        let mut sup = Supervisor::new(opts);
        sup.add_plugin_dir(&built().hello_wasm).unwrap();
        sup.call("hello-wasm", "noop", vec![], None).await.unwrap();
        let pid = worker_pid(&sup, "hello-wasm").await;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let keys: Vec<String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split('=')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert!(keys.contains(&marker.to_owned()), "{keys:?}");
        for k in &keys {
            assert!(
                [
                    "CORRAL_WORKER_FD",
                    "CORRAL_CONFINE",
                    "RUST_BACKTRACE",
                    "CORRAL_WORKER_LOG",
                    "CORRAL_ZYGOTE",
                ]
                .contains(&k.as_str()),
                "unexpected variable {k} in the worker's environment"
            );
        }
        // Own process group: a terminal's ^C goes to the supervisor, which stops
        // workers.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let pgrp: u32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(pgrp, pid);
        sup.shutdown(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn control_socket_is_private_and_refuses_a_worker_impostor() {
    let (sup, _c) = hello();
    let sup = Arc::new(sup);
    let dir = corral_integration_tests::open_tempdir();
    let path = dir.path().join("run/control.sock");
    let server = ControlServer::bind(&path).await.unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);
    let stop = Arc::new(tokio::sync::Notify::new());
    let serving = tokio::spawn(server.serve(sup.clone(), stop.clone()));

    // A second daemon cannot take the socket over.
    let err = ControlServer::bind(&path).await.unwrap_err();
    assert!(err.to_string().contains("already listening"), "{err}");

    // Someone dials the control socket and speaks as a worker would.
    let p = path.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let hello = corral_protocol::Hello {
            runtime: corral_protocol::Runtime::Wasm,
            engine_version: "impostor".into(),
            pid: 1,
            enforcement: corral_protocol::EnforcementReport::unconfined("x"),
            runtime_files: Vec::new(),
        };
        s.write_all(&frame::encode_hello(&hello).unwrap()).unwrap();
        let answer: ControlResponse = frame::read_msg(&mut s, frame::MAX_FRAME).unwrap();
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest).map(|n| n == 0).unwrap_or(true);
        (answer, closed)
    })
    .await
    .unwrap();
    match answer {
        (ControlResponse::Rejected(why), true) => assert!(why.contains("malformed"), "{why}"),
        other => panic!("impostor was not rejected and disconnected: {other:?}"),
    }

    // The daemon still serves real clients.
    let mut client = ControlClient::connect(&path).await.unwrap();
    let resp = client
        .request(&ControlRequest::Call {
            plugin: "hello-wasm".into(),
            function: "greet".into(),
            input: b"Bo".to_vec(),
            timeout_ms: None,
        })
        .await
        .unwrap();
    assert_eq!(resp, ControlResponse::Called(Ok(b"Hello, Bo!".to_vec())));

    stop.notify_one();
    serving.await.unwrap();
    sup.shutdown(Duration::from_secs(1)).await;
}

/// A control server serving `sup` on a socket in a temporary directory.
struct Served {
    sup: Arc<Supervisor>,
    path: std::path::PathBuf,
    stop: Arc<tokio::sync::Notify>,
    serving: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(sup: Supervisor) -> Served {
        let sup = Arc::new(sup);
        let dir = corral_integration_tests::open_tempdir();
        let path = dir.path().join("control.sock");
        let server = ControlServer::bind(&path).await.unwrap();
        let stop = Arc::new(tokio::sync::Notify::new());
        let serving = tokio::spawn(server.serve(Arc::clone(&sup), Arc::clone(&stop)));
        Served {
            sup,
            path,
            stop,
            serving,
            _dir: dir,
        }
    }

    /// Stop serving, then stop the supervisor's workers.
    async fn end(self) {
        self.stop.notify_one();
        self.serving.await.unwrap();
        self.sup.shutdown(Duration::from_secs(1)).await;
    }
}

/// A client may send requests without waiting for answers: the daemon serves them
/// concurrently (the worker takes them behind one another once it has shown its
/// calls are fast) and answers every one, in the order they came; a frame that is
/// not a request is answered after them, with why, and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_connection_answers_pipelined_requests_in_order() {
    let (sup, _c) = hello();
    let served = Served::start(sup).await;
    let (sup, path) = (Arc::clone(&served.sup), served.path.clone());
    let p = path.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let mut burst = Vec::new();
        for i in 0..300 {
            let req = match i {
                100 => ControlRequest::List,
                150 => ControlRequest::Call {
                    plugin: "nobody".into(),
                    function: "greet".into(),
                    input: Vec::new(),
                    timeout_ms: None,
                },
                _ => ControlRequest::Call {
                    plugin: "hello-wasm".into(),
                    function: "greet".into(),
                    input: format!("n{i}").into_bytes(),
                    timeout_ms: None,
                },
            };
            burst.extend(frame::encode(&req).unwrap());
        }
        // Then a frame that is not a request (an empty one).
        burst.extend(0u32.to_le_bytes());
        // Written by one thread while this one reads: the daemon reads ahead of
        // its answers, up to its bound, never deadlocking on a full socket.
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&burst).unwrap());
        let answers: Vec<ControlResponse> = (0..301)
            .map(|_| frame::read_msg(&mut s, frame::MAX_FRAME).unwrap())
            .collect();
        writer.join().unwrap();
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest).map(|n| n == 0).unwrap_or(true);
        (answers, closed)
    })
    .await
    .unwrap();
    let (answers, closed) = answers;
    for (i, a) in answers.iter().enumerate() {
        match (i, a) {
            (100, ControlResponse::Plugins(list)) => assert_eq!(list[0].id, "hello-wasm"),
            (150, ControlResponse::Called(Err(e))) => {
                assert_eq!(e.to_string(), "unknown plugin \"nobody\"")
            }
            (300, ControlResponse::Rejected(why)) => {
                assert!(why.starts_with("malformed message"), "{why}")
            }
            (i, ControlResponse::Called(Ok(out))) if i < 300 => {
                assert_eq!(out, format!("Hello, n{i}!").as_bytes(), "answer {i}")
            }
            other => panic!("answer {i}: {other:?}"),
        }
    }
    assert!(closed, "the connection is closed after the rejection");
    // Every call ran in the plugin's one worker, which is still serving.
    let list = sup.list().await;
    assert_eq!((list[0].restarts, list[0].instances.len()), (0, 1));
    drop(sup);
    served.end().await;
}

/// Requests pipelined on one connection run concurrently: a call sent behind one
/// that is still running (another plugin's, asleep until its 5 s deadline) is
/// dispatched meanwhile, and its answer leaves after the first's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_call_runs_while_the_one_before_it_on_its_connection_still_runs() {
    let cache = corral_integration_tests::open_tempdir();
    let mut sup = Supervisor::new(corral_integration_tests::options(cache.path()));
    sup.add_plugin_dir(&built().hello_wasm).unwrap();
    let sleeper = corral_integration_tests::py_plugin("sleeper", "timeout = \"10s\"");
    sup.add_plugin_dir(sleeper.path()).unwrap();
    let served = Served::start(sup).await;
    let (sup, path) = (Arc::clone(&served.sup), served.path.clone());
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut burst = Vec::new();
    for (plugin, function, timeout_ms) in [
        ("sleeper", "sleepy", Some(5000)),
        ("hello-wasm", "greet", None),
    ] {
        let req = ControlRequest::Call {
            plugin: plugin.into(),
            function: function.into(),
            input: b"Bo".to_vec(),
            timeout_ms,
        };
        burst.extend(frame::encode(&req).unwrap());
    }
    s.write_all(&burst).unwrap();
    // The second call reaches its plugin (counted as it is routed) ...
    let calls = |list: &[corral_protocol::PluginInfo], id: &str| {
        list.iter().find(|p| p.id == id).unwrap().calls
    };
    let t = std::time::Instant::now();
    while calls(&sup.list().await, "hello-wasm") == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the second call never ran"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... while the first still sleeps: nothing was answered yet (answers leave in
    // order, and the first is answered only at its deadline).
    assert_eq!(calls(&sup.list().await, "sleeper"), 1);
    s.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let early = s.read(&mut byte).map_err(|e| e.kind());
    assert_eq!(
        early,
        Err(std::io::ErrorKind::WouldBlock),
        "an answer came before the first call's deadline"
    );
    s.set_nonblocking(false).unwrap();
    let first: ControlResponse = frame::read_msg(&mut s, frame::MAX_FRAME).unwrap();
    let second: ControlResponse = frame::read_msg(&mut s, frame::MAX_FRAME).unwrap();
    assert_eq!(
        first,
        ControlResponse::Called(Err(corral_protocol::CallError::Timeout {
            deadline_ms: 5000
        }))
    );
    assert_eq!(second, ControlResponse::Called(Ok(b"Hello, Bo!".to_vec())));
    drop((s, sup));
    served.end().await;
}

#[tokio::test]
async fn control_socket_dir_writable_by_others_is_refused() {
    let dir = corral_integration_tests::open_tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = ControlServer::bind(&shared.join("control.sock"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("writable by other users"), "{err}");
}
