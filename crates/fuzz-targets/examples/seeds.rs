//! Write the seed inputs of every fuzz target: `cargo run -p corral-fuzz-targets
//! --example seeds -- fuzz/corpus`. Valid inputs of each kind, for the fuzzer to
//! mutate from (a coverage-guided fuzzer finds bincode or TOML structure slowly
//! from nothing).

use corral_protocol::*;
use std::path::Path;

fn frame<T: serde::Serialize>(m: &T) -> Vec<u8> {
    frame::encode(m).unwrap()
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: seeds <corpus dir>");
    let out = Path::new(&out);
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };

    let from_worker = [
        FromWorker::Loaded {
            exports: vec!["greet".into(), "wc".into()],
        },
        FromWorker::LoadFailed {
            error: "no such export".into(),
        },
        FromWorker::CallResult {
            id: 7,
            result: Ok(b"Hello, Ada!".to_vec()),
        },
        FromWorker::CallResult {
            id: 8,
            result: Err(CallError::Timeout { deadline_ms: 100 }),
        },
        FromWorker::HostCall {
            id: 1,
            call: 7,
            op: HostOp::KvPut {
                key: "k".into(),
                value: b"v".to_vec(),
            },
        },
        FromWorker::HostCall {
            id: 2,
            call: 7,
            op: HostOp::Fetch(FetchRequest {
                method: "GET".into(),
                url: "http://127.0.0.1/".into(),
                headers: vec![("accept".into(), "*/*".into())],
                body: vec![],
            }),
        },
        FromWorker::Log {
            level: LogLevel::Info,
            message: "hello".into(),
        },
        FromWorker::Stats(WorkerStats::default()),
    ];
    let to_worker = [
        ToWorker::Call {
            id: 7,
            function: "greet".into(),
            input: b"Ada".to_vec(),
            deadline_ms: 1000,
            start_by_us: 0,
        },
        ToWorker::HostResult {
            id: 1,
            result: Ok(HostReply::Unit),
        },
        ToWorker::Stats,
        ToWorker::Shutdown { grace_ms: 500 },
    ];
    let mut stream = Vec::new();
    for (i, m) in from_worker.iter().enumerate() {
        let f = frame(m);
        write("frames", &format!("from-{i}"), &f[4..]);
        stream.extend_from_slice(&f);
    }
    for (i, m) in to_worker.iter().enumerate() {
        let f = frame(m);
        write("frames", &format!("to-{i}"), &f[4..]);
        stream.extend_from_slice(&f);
    }
    write("frames", "stream", &stream);

    let hello = Hello {
        runtime: Runtime::Python,
        engine_version: "CPython 3.11.7".into(),
        pid: 42,
        enforcement: EnforcementReport::unconfined("seed"),
        runtime_files: vec!["/usr/lib/python3.11".into()],
    };
    write(
        "handshake",
        "hello",
        &frame::encode_hello(&hello).unwrap()[4..],
    );
    write(
        "handshake",
        "old-version",
        &frame::encode_hello_with_version(&hello, 1).unwrap()[4..],
    );
    write("handshake", "bad-magic", b"XXXX\x04\x00");

    let requests = [
        ControlRequest::Call {
            plugin: "hello-js".into(),
            function: "greet".into(),
            input: b"Ada".to_vec(),
            timeout_ms: Some(500),
        },
        ControlRequest::List,
        ControlRequest::Shutdown,
        ControlRequest::Policy,
        ControlRequest::Explain {
            plugin: "hello-wasm".into(),
            json: true,
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        write("control", &format!("request-{i}"), &frame(r));
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for ex in ["hello-wasm", "hello-js", "hello-python"] {
        let text = std::fs::read(root.join("examples").join(ex).join("plugin.toml")).unwrap();
        write("manifest", ex, &text);
    }
    write(
        "manifest",
        "limits",
        b"id = \"x\"\nversion = \"1.0.0\"\nruntime = \"js\"\nentry = \"m.js\"\n[limits]\nmemory = \"16MiB\"\ntimeout = \"1s\"\nmax_output = \"1KiB\"\n[dependencies]\ny = { version = \"^1\" }\n",
    );

    let mut policy = Vec::new();
    for f in ["levels.toml", "routes.toml", "grants.toml"] {
        let text = std::fs::read(root.join("policies").join(f)).unwrap();
        write("policy", f, &text);
        if !policy.is_empty() {
            policy.push(0);
        }
        policy.extend_from_slice(&text);
    }
    write("policy", "all", &policy);

    // A plugin archive: gzipped (first byte even) and plain tar (odd).
    let mut tar = tar::Builder::new(Vec::new());
    for (path, body) in [
        ("plugin.toml", &b"id = \"x\"\n"[..]),
        ("src/main.js", b"export function f() {}"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, path, body).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let gz = gz.finish().unwrap();
    write("archive", "gz", &[&[0u8][..], &gz].concat());
    write("archive", "tar", &[&[1u8][..], &tar].concat());
    // A symbolic link entry (refused).
    let mut links = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    links.append_link(&mut h, "escape", "/etc").unwrap();
    write(
        "archive",
        "symlink",
        &[&[1u8][..], &links.into_inner().unwrap()].concat(),
    );

    write(
        "index",
        "two",
        b"[[plugin]]\nid = \"hello-js\"\nversion = \"1.0.0\"\narchive = \"hello-js-1.0.0.tar.gz\"\nsha256 = \"00\"\n\n[[plugin]]\nid = \"hello-js\"\nversion = \"1.1.0\"\narchive = \"https://example.com/a.tar.gz\"\nsha256 = \"ff\"\n",
    );
    write("index", "empty", b"");
    write(
        "index",
        "unknown-key",
        b"[[plugin]]\nid = \"x\"\nextra = 1\n",
    );
}
