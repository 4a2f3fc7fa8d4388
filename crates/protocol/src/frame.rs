//! Length-prefixed bincode frames with a hard size limit.
//!
//! A reader checks the 4-byte length against its limit *before* allocating, so a
//! hostile peer can make it allocate at most `max` bytes; bincode decoding is bounded
//! by the same limit, so a length field inside the payload cannot claim more.
//! Any error leaves the stream at an unknown position: callers close the connection.

use crate::{Hello, MAGIC, PROTOCOL_VERSION};
use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use serde::{Serialize, de::DeserializeOwned};
use std::io::{self, Read, Write};

/// Largest frame payload either side accepts: 64 MiB.
pub const MAX_FRAME: u32 = 64 * 1024 * 1024;

/// Length of the handshake preamble (`MAGIC` + `u16` version).
pub const PREAMBLE_LEN: usize = 6;

type Config = Configuration<LittleEndian, Varint, Limit<{ MAX_FRAME as usize }>>;

fn config() -> Config {
    bincode::config::standard().with_limit::<{ MAX_FRAME as usize }>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection cleanly between frames.
    #[error("connection closed")]
    Closed,
    #[error("i/o error on the connection")]
    Io(#[source] io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("a {kind} frame of {len} bytes exceeds its limit of {max} bytes")]
    KindTooLarge {
        kind: &'static str,
        len: u64,
        max: u32,
    },
    #[error("a frame of unknown kind (first byte {0})")]
    UnknownKind(u8),
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
    #[error("frame has {0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("handshake does not start with the Corral magic bytes")]
    BadMagic,
    #[error("protocol version mismatch: peer speaks {theirs}, we speak {ours}")]
    VersionMismatch { ours: u16, theirs: u16 },
}

/// Check a received length prefix against `max` before anything is allocated.
pub fn check_len(len: u32, max: u32) -> Result<usize, FrameError> {
    if len > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    Ok(len as usize)
}

/// Encode `msg` as a complete frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut buf, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    seal(buf)
}

/// Fill in the length prefix of a buffer whose first 4 bytes are reserved for it.
fn seal(mut buf: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let len = buf.len() - 4;
    if len > MAX_FRAME as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Decode one message from a complete frame payload. The whole payload must be
/// consumed.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| FrameError::Decode(decode_error(e)))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// A decoding error in words (bincode's own `Display` is its `Debug`).
fn decode_error(e: bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as E;
    match e {
        E::OtherString(s) => s,
        E::UnexpectedEnd { additional } => {
            format!("the message ends {additional} bytes early")
        }
        E::LimitExceeded => "a length inside the message is past the frame limit".into(),
        E::Utf8 { .. } => "a string that is not UTF-8".into(),
        other => format!("{other:?}"),
    }
}

/// Encode the handshake frame: preamble, then `hello`.
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, FrameError> {
    encode_hello_with_version(hello, PROTOCOL_VERSION)
}

/// Encode a handshake claiming `version` (tests use this to play an old worker).
pub fn encode_hello_with_version(hello: &Hello, version: u16) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&version.to_le_bytes());
    bincode::serde::encode_into_std_write(hello, &mut buf, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    seal(buf)
}

/// Decode a handshake payload, checking magic and version first.
pub fn decode_hello(payload: &[u8]) -> Result<Hello, FrameError> {
    if payload.len() < PREAMBLE_LEN || payload[..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let theirs = u16::from_le_bytes([payload[4], payload[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(FrameError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    decode(&payload[PREAMBLE_LEN..])
}

/// Read one frame payload from a blocking reader.
pub fn read_payload(r: &mut impl Read, max: u32) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    let got = read_full(r, &mut len)?;
    if got == 0 {
        return Err(FrameError::Closed);
    }
    if got < 4 {
        return Err(FrameError::Truncated { expected: 4, got });
    }
    let len = check_len(u32::from_le_bytes(len), max)?;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload)?;
    if got < len {
        return Err(FrameError::Truncated { expected: len, got });
    }
    Ok(payload)
}

/// Read and decode one message from a blocking reader.
pub fn read_msg<T: DeserializeOwned>(r: &mut impl Read, max: u32) -> Result<T, FrameError> {
    decode(&read_payload(r, max)?)
}

/// Encode and write one message to a blocking writer, then flush.
pub fn write_msg<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Read until `buf` is full or EOF; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(got)
}

/// Read a frame's 4-byte length prefix: `Closed` if the peer closed cleanly
/// before it.
#[cfg(feature = "tokio")]
async fn read_len_async(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<u32, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]).await {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated { expected: 4, got }),
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(u32::from_le_bytes(len))
}

/// Fill `buf` from its byte `got` on; the end of the stream first is a truncated
/// frame.
#[cfg(feature = "tokio")]
async fn fill_async(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
    mut got: usize,
) -> Result<(), FrameError> {
    use tokio::io::AsyncReadExt;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    expected: buf.len(),
                    got,
                });
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Read one frame payload from an async reader, bounded by `max` (checked before
/// anything is allocated).
#[cfg(feature = "tokio")]
pub async fn read_payload_async(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    max: u32,
) -> Result<Vec<u8>, FrameError> {
    let len = check_len(read_len_async(r).await?, max)?;
    let mut payload = vec![0u8; len];
    fill_async(r, &mut payload, 0).await?;
    Ok(payload)
}

/// Read one frame payload from an async reader whose limit depends on its kind:
/// `limit` maps the payload's first byte to the kind's name and largest size (or
/// `None`: no such kind), and a frame past it is refused before the rest of it is
/// read or anything for it allocated. Every limit is at most [`MAX_FRAME`].
#[cfg(feature = "tokio")]
pub async fn read_payload_async_limited(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: impl FnOnce(u8) -> Option<(&'static str, u32)>,
) -> Result<Vec<u8>, FrameError> {
    let len = check_len(read_len_async(r).await?, MAX_FRAME)?;
    if len == 0 {
        return Err(FrameError::Decode("an empty frame".into()));
    }
    // The first byte of the payload: the message's kind.
    let mut tag = [0u8; 1];
    fill_async(r, &mut tag, 0).await.map_err(|e| match e {
        FrameError::Truncated { .. } => FrameError::Truncated {
            expected: len,
            got: 0,
        },
        e => e,
    })?;
    let (kind, max) = limit(tag[0]).ok_or(FrameError::UnknownKind(tag[0]))?;
    if len > max as usize {
        return Err(FrameError::KindTooLarge {
            kind,
            len: len as u64,
            max,
        });
    }
    let mut payload = vec![0u8; len];
    payload[0] = tag[0];
    fill_async(r, &mut payload, 1).await?;
    Ok(payload)
}

/// Read and decode one message from an async reader, bounded by `max`.
#[cfg(feature = "tokio")]
pub async fn read_msg_async<T: DeserializeOwned>(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    max: u32,
) -> Result<T, FrameError> {
    decode(&read_payload_async(r, max).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            runtime: Runtime::Wasm,
            engine_version: "wasmtime 48.0.8".into(),
            pid: 42,
            enforcement: EnforcementReport::unconfined("test"),
            runtime_files: vec!["/usr/lib/python3.11".into()],
        }
    }

    /// Sequences a worker sends are refused from their length past their bound:
    /// an empty pair of strings is two bytes on the wire and 48 in memory.
    #[test]
    fn sequences_past_their_bound_are_refused_before_they_are_read() {
        let fetch = |n: usize| FromWorker::HostCall {
            id: 1,
            call: 2,
            op: HostOp::Fetch(FetchRequest {
                method: "GET".into(),
                url: "https://example.com/".into(),
                headers: vec![(String::new(), String::new()); n],
                body: Vec::new(),
            }),
        };
        let loaded = |n: usize| FromWorker::Loaded {
            exports: vec![String::new(); n],
        };
        for (ok, too_many) in [
            (fetch(MAX_FETCH_HEADERS), fetch(MAX_FETCH_HEADERS + 1)),
            (loaded(MAX_EXPORTS), loaded(MAX_EXPORTS + 1)),
        ] {
            let f = encode(&ok).unwrap();
            assert_eq!(decode::<FromWorker>(&f[4..]).unwrap(), ok);
            let f = encode(&too_many).unwrap();
            let e = decode::<FromWorker>(&f[4..]).unwrap_err().to_string();
            assert!(e.contains("at most"), "{e}");
        }
        // A frame whose header count claims millions of pairs (what a 5 MiB host
        // call of empty pairs would hold): refused from the count.
        // No headers ends in their count (0) and the body's length (0).
        let none = encode(&fetch(0)).unwrap()[4..].to_vec();
        assert!(none.ends_with(&[0, 0]));
        let mut crafted = none[..none.len() - 2].to_vec();
        crafted.push(0xfc); // bincode's varint: a u32 follows
        crafted.extend_from_slice(&2_621_440u32.to_le_bytes());
        crafted.extend(std::iter::repeat_n(0u8, 64));
        let e = decode::<FromWorker>(&crafted).unwrap_err().to_string();
        assert!(e.contains("at most 256"), "{e}");
    }

    #[test]
    fn a_frames_first_byte_names_its_kind() {
        let msgs = [
            FromWorker::Loaded { exports: vec![] },
            FromWorker::LoadFailed { error: "x".into() },
            FromWorker::CallResult {
                id: 300,
                result: Ok(vec![1; 300]),
            },
            FromWorker::HostCall {
                id: 1,
                call: 2,
                op: HostOp::Now,
            },
            FromWorker::Log {
                level: LogLevel::Warn,
                message: "m".into(),
            },
            FromWorker::Stats(WorkerStats::default()),
        ];
        for (m, kind) in msgs.iter().zip(FromWorkerKind::ALL) {
            assert_eq!(m.kind(), kind);
            let f = encode(m).unwrap();
            assert_eq!(FromWorkerKind::from_tag(f[4]), Some(kind), "{m:?}");
        }
        assert_eq!(FromWorkerKind::from_tag(6), None);
        assert_eq!(FromWorkerKind::from_tag(255), None);
    }

    #[test]
    fn round_trips_every_direction() {
        let msgs = vec![
            ToWorker::Call {
                id: 7,
                function: "greet".into(),
                input: vec![],
                deadline_ms: 10,
                start_by_us: 12_345,
            },
            ToWorker::HostResult {
                id: 1,
                result: Err(HostError::Denied {
                    rule: "policies/x.toml:3".into(),
                }),
            },
            ToWorker::Shutdown { grace_ms: 5 },
        ];
        for m in msgs {
            let buf = encode(&m).unwrap();
            let back: ToWorker = read_msg(&mut buf.as_slice(), MAX_FRAME).unwrap();
            assert_eq!(back, m);
        }
        let m = FromWorker::CallResult {
            id: 3,
            result: Err(CallError::WorkerCrashed(ExitReason::Signal {
                signo: 9,
                name: "SIGKILL".into(),
            })),
        };
        let buf = encode(&m).unwrap();
        assert_eq!(
            read_msg::<FromWorker>(&mut buf.as_slice(), MAX_FRAME).unwrap(),
            m
        );
    }

    #[test]
    fn handshake_checks_magic_and_version() {
        let buf = encode_hello(&hello()).unwrap();
        let payload = read_payload(&mut buf.as_slice(), MAX_FRAME).unwrap();
        assert_eq!(decode_hello(&payload).unwrap(), hello());

        let old = encode_hello_with_version(&hello(), PROTOCOL_VERSION + 1).unwrap();
        let payload = read_payload(&mut old.as_slice(), MAX_FRAME).unwrap();
        match decode_hello(&payload) {
            Err(FrameError::VersionMismatch { ours, theirs }) => {
                assert_eq!((ours, theirs), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
            }
            other => panic!("expected version mismatch, got {other:?}"),
        }
        assert!(matches!(
            decode_hello(b"HTTP/1.1 200"),
            Err(FrameError::BadMagic)
        ));
        assert!(matches!(decode_hello(b"CR"), Err(FrameError::BadMagic)));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        // Claims 4 GiB - 1: must fail on the prefix alone.
        let buf = u32::MAX.to_le_bytes();
        match read_payload(&mut buf.as_slice(), MAX_FRAME) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(max, MAX_FRAME);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_frames_are_typed() {
        let buf = encode(&ToWorker::Stats).unwrap();
        assert!(matches!(
            read_payload(&mut &buf[..2], MAX_FRAME),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
        let mut long = 100u32.to_le_bytes().to_vec();
        long.extend_from_slice(&[0; 10]);
        assert!(matches!(
            read_payload(&mut long.as_slice(), MAX_FRAME),
            Err(FrameError::Truncated {
                expected: 100,
                got: 10
            })
        ));
        assert!(matches!(
            read_payload(&mut &b""[..], MAX_FRAME),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn inner_length_cannot_exceed_the_frame_limit() {
        // A Call whose input claims 2^62 bytes: varint 0xFF marker + u64.
        let mut payload = vec![1u8]; // variant Call
        payload.push(7); // id
        payload.push(1); // function len
        payload.push(b'f');
        payload.push(0xFD); // u64 varint marker
        payload.extend_from_slice(&(1u64 << 62).to_le_bytes());
        match decode::<ToWorker>(&payload) {
            Err(FrameError::Decode(_)) => {}
            other => panic!("expected decode error, got {other:?}"),
        }
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut buf = encode(&ToWorker::Stats).unwrap();
        buf.push(0);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_msg::<ToWorker>(&mut buf.as_slice(), MAX_FRAME),
            Err(FrameError::TrailingBytes(1))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes never panic the reader and never yield more than one frame's
        /// worth of allocation.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_msg::<ToWorker>(&mut bytes.as_slice(), 1024);
            let _ = read_msg::<FromWorker>(&mut bytes.as_slice(), 1024);
            let _ = decode::<ControlRequest>(&bytes);
            let _ = decode_hello(&bytes);
        }

        /// Flipping bytes of a valid frame gives a message or a typed error.
        #[test]
        fn mutated_frames_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..64),
            pos in any::<prop::sample::Index>(),
            val in any::<u8>(),
        ) {
            let msg = FromWorker::CallResult { id: 9, result: Ok(input) };
            let mut buf = encode(&msg).unwrap();
            let i = pos.index(buf.len());
            buf[i] = val;
            let _ = read_msg::<FromWorker>(&mut buf.as_slice(), MAX_FRAME);
        }

        #[test]
        fn any_call_round_trips(
            id in any::<u64>(),
            function in ".{0,40}",
            input in proptest::collection::vec(any::<u8>(), 0..4096),
            deadline_ms in any::<u64>(),
            start_by_us in any::<u64>(),
        ) {
            let msg = ToWorker::Call { id, function, input, deadline_ms, start_by_us };
            let buf = encode(&msg).unwrap();
            prop_assert_eq!(read_msg::<ToWorker>(&mut buf.as_slice(), MAX_FRAME).unwrap(), msg);
        }
    }
}
