//! `corral-worker-python`: the worker process for Python plugins (CPython). Started
//! by the supervisor only (`--interpreter` prints the CPython it embeds, for
//! `corral plugin vendor`); see `corral_worker` for the protocol and exit codes.
//!
//! The program defines the C library's `malloc` family itself, so that every C
//! allocation in the process (CPython's, and a compiled extension's: numpy's
//! arrays, OpenBLAS's buffers, C++'s `new`) counts against the plugin's memory
//! limit and is refused past it, as a Python object is: the extension sees
//! `NULL`/`ENOMEM` and raises `MemoryError`. A symbol of the executable comes first
//! in every lookup, so the shared libraries the interpreter loads call these. The
//! worker's own Rust code allocates through glibc directly, uncounted.

use corral_worker_python::malloc as m;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;
use std::process::ExitCode;

/// The worker's Rust allocations: glibc's, not counted.
struct Uncounted;

// SAFETY: forwards to glibc's allocator with the layout's size and alignment.
unsafe impl GlobalAlloc for Uncounted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as GlobalAlloc::alloc.
        unsafe { m::uncounted_alloc(layout.align(), layout.size()).cast() }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: as GlobalAlloc::alloc_zeroed.
            return unsafe { m::uncounted_zeroed(layout.size()).cast() };
        }
        // SAFETY: as GlobalAlloc::alloc.
        let p: *mut u8 = unsafe { m::uncounted_alloc(layout.align(), layout.size()).cast() };
        if !p.is_null() {
            // SAFETY: `p` holds `layout.size()` bytes.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { m::uncounted_free(ptr.cast()) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= 16 {
            // SAFETY: `ptr` came from this allocator with alignment <= 16.
            return unsafe { m::uncounted_realloc(ptr.cast(), new_size).cast() };
        }
        // SAFETY: a fresh block, the old contents copied, the old block freed.
        unsafe {
            let new = m::uncounted_alloc(layout.align(), new_size).cast::<u8>();
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                m::uncounted_free(ptr.cast());
            }
            new
        }
    }
}

#[global_allocator]
static ALLOCATOR: Uncounted = Uncounted;

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: as malloc(3).
    unsafe { m::c_malloc(size) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(nelem: usize, elsize: usize) -> *mut c_void {
    // SAFETY: as calloc(3).
    unsafe { m::c_calloc(nelem, elsize) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: as realloc(3).
    unsafe { m::c_realloc(ptr, size) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(
    ptr: *mut c_void,
    nelem: usize,
    elsize: usize,
) -> *mut c_void {
    match nelem.checked_mul(elsize) {
        // SAFETY: as realloc(3).
        Some(size) => unsafe { m::c_realloc(ptr, size) },
        None => {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    // SAFETY: as free(3).
    unsafe { m::c_free(ptr) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: as memalign(3).
    unsafe { m::c_memalign(align, size) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: as aligned_alloc(3).
    unsafe { m::c_memalign(align, size) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    // SAFETY: as valloc(3).
    unsafe { m::c_memalign(page_size(), size) }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = page_size();
    match size.div_ceil(page).max(1).checked_mul(page) {
        // SAFETY: as pvalloc(3).
        Some(rounded) => unsafe { m::c_memalign(page, rounded) },
        None => {
            // SAFETY: errno is this thread's.
            unsafe { *libc::__errno_location() = libc::ENOMEM };
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// The C library's contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    // SAFETY: as memalign(3).
    let p = unsafe { m::c_memalign(align, size) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: `out` is the caller's pointer to fill.
    unsafe { *out = p };
    0
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

fn main() -> ExitCode {
    // Asked by `corral plugin vendor`: which interpreter this worker embeds.
    if std::env::args().nth(1).as_deref() == Some("--interpreter") {
        println!("{}", corral_worker_python::PYTHON_EXECUTABLE);
        println!("{}", corral_worker_python::PYTHON_VERSION);
        return ExitCode::SUCCESS;
    }
    m::set_malloc_interposed();
    corral_worker::run(corral_worker_python::PythonEngine::new())
}
