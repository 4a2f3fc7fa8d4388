//! The bodies of Corral's fuzz targets: every input a process or file that someone
//! else controls can hand the supervisor. `fuzz/` runs each under libFuzzer
//! (`cargo fuzz run <target>`); `tests/corpus.rs` replays the corpus kept in
//! `fuzz/corpus/<target>/` as an ordinary test, so whatever fuzzing found stays fixed.
//!
//! A target panics only when an invariant breaks: a decoded message that does not
//! survive encoding again, an error pointing outside its file, a file written
//! outside the directory an archive was unpacked into. Anything else (errors,
//! refusals) is the expected answer to hostile input.

use corral_protocol::{ControlRequest, ControlResponse, FromWorker, ToWorker, frame};
use std::path::{Path, PathBuf};

/// One fuzz target: it takes any bytes.
pub type Target = fn(&[u8]);

/// Every target, by the name of its corpus directory.
pub const TARGETS: [(&str, Target); 7] = [
    ("frames", frames),
    ("handshake", handshake),
    ("control", control),
    ("manifest", manifest),
    ("policy", policy),
    ("archive", archive),
    ("index", index),
];

/// Decode `payload` as `T`; if it decodes, it must encode to a frame that decodes
/// to the same message.
fn round_trip<T>(payload: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    if let Ok(msg) = frame::decode::<T>(payload) {
        let again = frame::encode(&msg).expect("a decoded message encodes");
        assert_eq!(
            frame::decode::<T>(&again[4..]).expect("an encoded message decodes"),
            msg
        );
    }
}

/// A byte stream from a worker (or to one): frames read one after another, as the
/// supervisor reads them, each within its limit; and each frame's payload decoded
/// as either direction's message.
pub fn frames(data: &[u8]) {
    let mut stream = data;
    while let Ok(payload) = frame::read_payload(&mut stream, frame::MAX_FRAME) {
        round_trip::<FromWorker>(&payload);
        round_trip::<ToWorker>(&payload);
    }
    round_trip::<FromWorker>(data);
    round_trip::<ToWorker>(data);
}

/// A worker's first frame: preamble and `Hello`.
pub fn handshake(data: &[u8]) {
    if let Ok(hello) = frame::decode_hello(data) {
        let again = frame::encode_hello(&hello).expect("a decoded hello encodes");
        assert_eq!(frame::decode_hello(&again[4..]).unwrap(), hello);
    }
}

/// A request on the daemon's control socket (and a response, for the client).
pub fn control(data: &[u8]) {
    let mut stream = data;
    while let Ok(payload) = frame::read_payload(&mut stream, frame::MAX_FRAME) {
        round_trip::<ControlRequest>(&payload);
    }
    round_trip::<ControlRequest>(data);
    round_trip::<ControlResponse>(data);
}

/// The number of lines of `text`, as an editor counts them (a last line without a
/// newline counts; one position past the end is allowed).
fn lines(text: &str) -> usize {
    text.split('\n').count()
}

/// A `plugin.toml`: parsed, or an error whose line is inside the file.
pub fn manifest(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(corral_manifest::ManifestError::Invalid { line, column, .. }) =
        corral_manifest::Manifest::parse(text, Path::new("plugin.toml"))
    {
        assert!(line >= 1 && line <= lines(text), "line {line}");
        assert!(column >= 1, "column {column}");
    }
}

/// A policy directory: the input split at NUL bytes into up to four files, parsed
/// together; every error names one of them and a line inside it.
pub fn policy(data: &[u8]) {
    let files: Vec<(PathBuf, String)> = data
        .split(|&b| b == 0)
        .take(4)
        .enumerate()
        .map(|(i, part)| {
            (
                PathBuf::from(format!("policy/{i}.toml")),
                String::from_utf8_lossy(part).into_owned(),
            )
        })
        .collect();
    if let Err(errors) = corral_policy::Policy::parse(&files) {
        assert!(!errors.0.is_empty());
        for e in &errors.0 {
            let (_, text) = files.iter().find(|(p, _)| *p == e.path).unwrap_or_else(|| {
                panic!("an error names {}, not a policy file", e.path.display())
            });
            assert!(e.line <= lines(text), "{e}");
        }
    }
}

/// An install archive: the input as a gzipped tar (first byte even) or as a tar
/// that is gzipped here (odd: so the fuzzer explores tar headers, not deflate),
/// unpacked into a fresh directory. Nothing may appear outside it, and nothing
/// inside it may be anything but a file or a directory.
pub fn archive(data: &[u8]) {
    use std::io::Write;
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let bytes = if first % 2 == 0 {
        rest.to_vec()
    } else {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(rest).expect("in memory");
        gz.finish().expect("in memory")
    };
    let root = tempfile::tempdir().expect("a temporary directory");
    let into = root.path().join("plugin");
    std::fs::create_dir(&into).expect("the unpack directory");
    let _ = corral::fuzzing::unpack(&bytes, &into, "fuzz.tar.gz");
    let outside: Vec<_> = std::fs::read_dir(root.path())
        .expect("the temporary directory")
        .map(|e| e.expect("an entry").file_name())
        .collect();
    assert_eq!(outside, ["plugin"], "written outside the plugin directory");
    check_tree(&into);
}

fn check_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("an unpacked directory") {
        let e = e.expect("an entry");
        let kind = e.file_type().expect("a file type");
        assert!(
            kind.is_file() || kind.is_dir(),
            "{:?} is {kind:?}",
            e.path()
        );
        if kind.is_dir() {
            check_tree(&e.path());
        }
    }
}

/// An `index.toml` of an install source: parsed, or an error whose line is inside
/// the file.
pub fn index(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match corral::fuzzing::parse_index(text, "index.toml") {
        Ok(_) => {}
        Err(corral::fuzzing::InstallError::Index { why, .. }) => {
            let line: usize = why
                .split(':')
                .next()
                .and_then(|l| l.parse().ok())
                .unwrap_or_else(|| panic!("an index error without its line: {why}"));
            assert!(line >= 1 && line <= lines(text), "{why}");
        }
        Err(other) => panic!("not an index error: {other}"),
    }
}
