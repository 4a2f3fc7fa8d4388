//! Write Corral WebAssembly plugins as ordinary Rust functions.
//!
//! ```ignore
//! fn greet(input: &[u8]) -> Result<String, String> {
//!     let name = std::str::from_utf8(input).map_err(|e| e.to_string())?;
//!     corral_guest::log::info(&format!("greeting {name}"));
//!     Ok(format!("Hello, {name}!"))
//! }
//!
//! corral_guest::plugin!(functions: [greet]);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip1` as a `cdylib`, and name
//! the `.wasm` as `entry` in `plugin.toml`. [`plugin!`] generates the exports of the
//! Corral Wasm ABI (documented in `corral-worker-wasm`); this crate supplies the host
//! imports (`log`, `now_ms`).
//!
//! A function takes the input bytes and returns `Result<T, E>` where `T` is
//! `Vec<u8>`, `String`, `&str` or `()` and `E` is anything that implements
//! `Display` (it becomes the caller's "plugin returned an error" message).
//!
//! On targets other than `wasm32`, the host imports have native stand-ins (log to
//! stderr, system clock), so plugin functions can be unit-tested with `cargo test`.

/// What a plugin function may return on success.
pub trait IntoOutput {
    fn into_output(self) -> Vec<u8>;
}

impl IntoOutput for Vec<u8> {
    fn into_output(self) -> Vec<u8> {
        self
    }
}
impl IntoOutput for String {
    fn into_output(self) -> Vec<u8> {
        self.into_bytes()
    }
}
impl IntoOutput for &str {
    fn into_output(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl IntoOutput for () {
    fn into_output(self) -> Vec<u8> {
        Vec::new()
    }
}

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "corral")]
    unsafe extern "C" {
        pub fn output(ptr: *const u8, len: usize);
        pub fn error(ptr: *const u8, len: usize);
        pub fn log(level: u32, ptr: *const u8, len: usize);
        pub fn now_ms() -> i64;
        pub fn host_call(name: *const u8, name_len: usize, args: *const u8, args_len: usize)
        -> i32;
        pub fn host_take(ptr: *mut u8);
    }
}

/// Logging through the supervisor, tagged with the plugin's id.
pub mod log {
    fn write(level: u32, msg: &str) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: `msg` is a valid slice for the duration of the call; the host copies it.
        unsafe {
            crate::imports::log(level, msg.as_ptr(), msg.len())
        };
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[corral log {level}] {msg}");
    }
    pub fn error(msg: &str) {
        write(0, msg)
    }
    pub fn warn(msg: &str) {
        write(1, msg)
    }
    pub fn info(msg: &str) {
        write(2, msg)
    }
    pub fn debug(msg: &str) {
        write(3, msg)
    }
}

/// Wall-clock milliseconds since the Unix epoch, as the supervisor sees it.
pub fn now_ms() -> i64 {
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: no arguments; the host returns a plain integer.
        unsafe { imports::now_ms() }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A brokered host call was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError {
    /// `denied`, `invalid`, `quota`, `overloaded`, `cycle`, `call` or `failed`.
    pub kind: String,
    pub message: String,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for HostError {}

/// The raw host-service primitive (`corral.host_call`): an operation name and byte
/// strings in, byte strings out. The typed functions below are built on it.
pub fn host_call(name: &str, args: &[&[u8]]) -> Result<Vec<Vec<u8>>, HostError> {
    let mut encoded = Vec::new();
    for a in args {
        encoded.extend_from_slice(&(a.len() as u32).to_le_bytes());
        encoded.extend_from_slice(a);
    }
    #[cfg(target_arch = "wasm32")]
    {
        // SAFETY: both slices are valid for the call; the host copies them.
        let n = unsafe {
            imports::host_call(name.as_ptr(), name.len(), encoded.as_ptr(), encoded.len())
        };
        let len = if n < 0 { -(n + 1) } else { n } as usize;
        let mut answer = vec![0u8; len];
        // SAFETY: `answer` has exactly the `len` bytes the host has ready.
        unsafe { imports::host_take(answer.as_mut_ptr()) };
        if n < 0 {
            let text = String::from_utf8_lossy(&answer).into_owned();
            let (kind, message) = text.split_once(": ").unwrap_or(("failed", &text));
            return Err(HostError {
                kind: kind.to_owned(),
                message: message.to_owned(),
            });
        }
        let mut items = Vec::new();
        let mut rest = &answer[..];
        while rest.len() >= 4 {
            let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let end = (4 + n).min(rest.len());
            items.push(rest[4..end].to_vec());
            rest = &rest[end..];
        }
        Ok(items)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = encoded;
        Err(HostError {
            kind: "failed".into(),
            message: format!("host service {name} needs the Corral host"),
        })
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The plugin's own key-value store, kept by the supervisor (durable once a write
/// returns; limited by the policy's quota).
pub mod kv {
    use super::{HostError, host_call, text};

    pub fn get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(host_call("kv_get", &[key.as_bytes()])?.into_iter().next())
    }
    pub fn put(key: &str, value: &[u8]) -> Result<(), HostError> {
        host_call("kv_put", &[key.as_bytes(), value]).map(drop)
    }
    /// Whether the key existed.
    pub fn delete(key: &str) -> Result<bool, HostError> {
        Ok(host_call("kv_delete", &[key.as_bytes()])?
            .first()
            .map(|v| &v[..])
            == Some(b"1"))
    }
    pub fn keys(prefix: &str) -> Result<Vec<String>, HostError> {
        Ok(host_call("kv_keys", &[prefix.as_bytes()])?
            .iter()
            .map(|k| text(k))
            .collect())
    }
}

/// A brokered HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub url: String,
    /// `(lower-case name, value)` pairs.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// An HTTP request made by the supervisor, if the plugin's policy allows it.
pub fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, HostError> {
    let head: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let r = host_call(
        "fetch",
        &[
            method.as_bytes(),
            url.as_bytes(),
            head.join("\n").as_bytes(),
            body,
        ],
    )?;
    let [status, url, head, body]: [Vec<u8>; 4] = r.try_into().map_err(|_| HostError {
        kind: "failed".into(),
        message: "malformed fetch answer".into(),
    })?;
    Ok(Response {
        status: text(&status).parse().unwrap_or(0),
        url: text(&url),
        headers: text(&head)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
            .collect(),
        body,
    })
}

/// Queue `payload` for the topic's subscribers; returns how many.
pub fn publish(topic: &str, payload: &[u8]) -> Result<u32, HostError> {
    let r = host_call("publish", &[topic.as_bytes(), payload])?;
    Ok(r.first().map_or(0, |n| text(n).parse().unwrap_or(0)))
}

/// Call another plugin's function through the supervisor.
pub fn call(plugin: &str, function: &str, input: &[u8]) -> Result<Vec<u8>, HostError> {
    Ok(
        host_call("call", &[plugin.as_bytes(), function.as_bytes(), input])?
            .into_iter()
            .next()
            .unwrap_or_default(),
    )
}

/// The operator's configuration value `key` for this plugin.
pub fn config(key: &str) -> Option<String> {
    let flat = host_call("config", &[]).ok()?;
    flat.chunks(2)
        .find(|kv| kv.len() == 2 && kv[0] == key.as_bytes())
        .map(|kv| text(&kv[1]))
}

/// One of the plugin's secrets.
pub fn secret(name: &str) -> Option<String> {
    host_call("secret", &[name.as_bytes()])
        .ok()?
        .into_iter()
        .next()
        .map(|v| text(&v))
}

/// Support for [`plugin!`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    use super::IntoOutput;
    use std::fmt::Display;

    /// `corral_alloc`: hand the host `len` writable bytes. Ownership passes to the
    /// plugin function through [`run`].
    pub fn alloc(len: usize) -> *mut u8 {
        let mut v = Vec::<u8>::with_capacity(len);
        let ptr = v.as_mut_ptr();
        std::mem::forget(v);
        ptr
    }

    /// Run a plugin function on the input at `ptr..ptr+len` and report its result.
    ///
    /// # Safety
    ///
    /// `ptr` must come from [`alloc`] with this `len`, and the host must have written
    /// `len` bytes there.
    pub unsafe fn run<T, E, F>(ptr: *mut u8, len: usize, f: F) -> i32
    where
        T: IntoOutput,
        E: Display,
        F: FnOnce(&[u8]) -> Result<T, E>,
    {
        // SAFETY: per this function's contract, `ptr` came from `alloc(len)` (a Vec of
        // capacity `len` that was forgotten) and `len` bytes are initialised.
        let input = unsafe { Vec::from_raw_parts(ptr, len, len) };
        match f(&input) {
            Ok(out) => {
                set_output(&out.into_output());
                0
            }
            Err(e) => {
                set_error(&e.to_string());
                1
            }
        }
    }

    /// Run the init hook.
    pub fn init<E: Display>(f: impl FnOnce() -> Result<(), E>) -> i32 {
        match f() {
            Ok(()) => 0,
            Err(e) => {
                set_error(&e.to_string());
                1
            }
        }
    }

    fn set_output(bytes: &[u8]) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: valid slice for the duration of the call; the host copies it.
        unsafe {
            crate::imports::output(bytes.as_ptr(), bytes.len())
        };
        #[cfg(not(target_arch = "wasm32"))]
        let _ = bytes;
    }

    fn set_error(msg: &str) {
        #[cfg(target_arch = "wasm32")]
        // SAFETY: valid slice for the duration of the call; the host copies it.
        unsafe {
            crate::imports::error(msg.as_ptr(), msg.len())
        };
        #[cfg(not(target_arch = "wasm32"))]
        let _ = msg;
    }
}

/// Export plugin functions, and optionally its hooks, under the Corral Wasm ABI.
///
/// ```ignore
/// corral_guest::plugin!(functions: [greet, reverse]);
/// corral_guest::plugin!(init: setup, functions: [greet]);
/// corral_guest::plugin!(init: setup, shutdown: flush, functions: [greet]);
/// ```
///
/// `init` (`fn() -> Result<(), E>`, `E: Display`) runs once when a worker loads
/// the plugin; an error fails the load with its message. `shutdown` (`fn()`) runs
/// when the worker stops (the daemon stops, a hot reload or an idle stop retires
/// it), within the plugin's `timeout`.
///
/// Invoke it once per plugin.
#[macro_export]
macro_rules! plugin {
    (init: $init:path, shutdown: $shutdown:path, functions: [$($name:ident),+ $(,)?] $(,)?) => {
        $crate::plugin!(shutdown: $shutdown, functions: [$($name),+]);
        #[unsafe(no_mangle)]
        pub extern "C" fn corral_init() -> i32 {
            $crate::__private::init($init)
        }
    };
    (shutdown: $shutdown:path, functions: [$($name:ident),+ $(,)?] $(,)?) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn corral_shutdown() {
            $shutdown()
        }
        $crate::plugin!(functions: [$($name),+]);
    };
    (init: $init:path, functions: [$($name:ident),+ $(,)?] $(,)?) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn corral_init() -> i32 {
            $crate::__private::init($init)
        }
        $crate::plugin!(functions: [$($name),+]);
    };
    (functions: [$($name:ident),+ $(,)?] $(,)?) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn corral_alloc(len: usize) -> *mut u8 {
            $crate::__private::alloc(len)
        }
        $(
            const _: () = {
                #[unsafe(export_name = concat!("corral_fn_", stringify!($name)))]
                pub extern "C" fn __corral_export(ptr: *mut u8, len: usize) -> i32 {
                    // SAFETY: the host calls this with a pointer from `corral_alloc(len)`
                    // into which it wrote `len` bytes, as the Corral Wasm ABI requires.
                    unsafe { $crate::__private::run(ptr, len, $name) }
                }
            };
        )+
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upper(input: &[u8]) -> Result<String, String> {
        std::str::from_utf8(input)
            .map(str::to_uppercase)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn run_owns_and_frees_the_input_and_maps_results() {
        let data = b"abc";
        let ptr = __private::alloc(data.len());
        // SAFETY: `ptr` has capacity for 3 bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, 3) };
        // SAFETY: ptr from alloc(3), 3 bytes written.
        assert_eq!(unsafe { __private::run(ptr, 3, upper) }, 0);

        let ptr = __private::alloc(1);
        // SAFETY: capacity 1.
        unsafe { *ptr = 0xff };
        // SAFETY: ptr from alloc(1), 1 byte written.
        assert_eq!(unsafe { __private::run(ptr, 1, upper) }, 1);
    }

    #[test]
    fn empty_input_works() {
        let ptr = __private::alloc(0);
        // SAFETY: ptr from alloc(0), nothing to write.
        assert_eq!(unsafe { __private::run(ptr, 0, upper) }, 0);
    }
}
