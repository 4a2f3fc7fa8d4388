//! The wire protocol between the Corral supervisor and its workers, and between
//! `corral` clients and a running daemon.
//!
//! Principal types:
//!
//! - [`ToWorker`] and [`FromWorker`]: one message enum per direction on a worker's
//!   socket. Calls and host calls carry request ids so they can interleave.
//! - [`Hello`]: the worker's first frame, carrying the protocol version, worker kind,
//!   engine version and the [`EnforcementReport`] of what confinement is in force.
//! - [`CallError`]: every way a call can end other than with a result. No call is
//!   ever left hanging: each ends in `Ok(bytes)` or one of these.
//! - [`ControlRequest`] and [`ControlResponse`]: the daemon's control socket.
//! - [`frame`]: length-prefixed bincode frames with a hard size limit, for blocking
//!   (`std::io`) use, and async use with the `tokio` feature.
//!
//! # Framing
//!
//! Every frame is a 4-byte little-endian payload length followed by the payload. The
//! first frame on a worker socket is the handshake: a fixed 6-byte preamble
//! (`b"CRRL"` and a `u16` little-endian protocol version) followed by the bincode
//! encoding of [`Hello`]. The preamble never changes, so a reader of any version can
//! tell a version mismatch apart from garbage before it decodes a single enum.
//!
//! ```
//! use corral_protocol::{frame, ToWorker};
//!
//! let msg = ToWorker::Shutdown { grace_ms: 100 };
//! let mut buf = Vec::new();
//! frame::write_msg(&mut buf, &msg).unwrap();
//! let back: ToWorker = frame::read_msg(&mut buf.as_slice(), frame::MAX_FRAME).unwrap();
//! assert_eq!(back, msg);
//! ```
//!
//! # Compatibility
//!
//! Bincode is not self-describing: adding a variant or a field changes the encoding.
//! Any such change bumps [`PROTOCOL_VERSION`]; the supervisor refuses a worker whose
//! handshake names another version (workers ship with the supervisor, so this is a
//! deployment error, reported as such, never a silent misparse).

mod bounded;
pub mod frame;
mod messages;
mod payload;
pub mod template;

pub use bounded::{MAX_EXPORTS, MAX_FETCH_HEADERS};
pub use frame::FrameError;
pub use messages::*;

/// Version of the messages in this crate. Bumped on any change to their encoding.
pub const PROTOCOL_VERSION: u16 = 12;

/// Magic bytes that open every handshake frame.
pub const MAGIC: [u8; 4] = *b"CRRL";

/// File descriptor number on which a worker finds its end of the supervisor socket.
pub const WORKER_SOCKET_FD: i32 = 3;

/// File descriptor on which a compile helper ([`Code::CompileOnly`]) finds the file
/// it writes the compiled module into: made by the supervisor, owned by it, and the
/// only thing the helper can write.
pub const ARTIFACT_FD: i32 = 4;

/// The largest bundle of QuickJS bytecode: a compile helper's `RLIMIT_FSIZE`, the
/// most the supervisor stores, and the most a worker reads (a module graph past it
/// is parsed by its workers).
pub const MAX_BYTECODE_BYTES: u64 = 256 << 20;

/// An error and its sources on one line (`a: b: c`), for the error strings that
/// cross the wire (`LoadFailed`, `StartFailed`) and for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Environment variable naming the fd of the worker socket (always
/// [`WORKER_SOCKET_FD`]; present so a worker started by hand fails clearly).
pub const WORKER_SOCKET_ENV: &str = "CORRAL_WORKER_FD";

/// Now, in microseconds of `CLOCK_MONOTONIC`: the clock the supervisor and its
/// workers share (no worker gets a time namespace), for
/// [`ToWorker::Call`]'s `start_by_us`.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC exists
    // on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}
