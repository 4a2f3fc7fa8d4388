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

/// Export plugin functions (and optionally an init hook) under the Corral Wasm ABI.
///
/// ```ignore
/// corral_guest::plugin!(functions: [greet, reverse]);
/// corral_guest::plugin!(init: setup, functions: [greet]);
/// ```
///
/// Invoke it once per plugin.
#[macro_export]
macro_rules! plugin {
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
