//! Starting the embedded interpreter in an isolated configuration, and counting the
//! memory it allocates so the plugin's limit can be enforced.

use corral_worker::SetupError;
use pyo3::ffi;
use std::ffi::c_void;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// Bytes the interpreter holds through the raw domain (or, with `malloc`
/// interposed, all C allocations) and pymalloc arenas (may start below zero:
/// blocks allocated before the hooks are freed through them).
static USED: AtomicI64 = AtomicI64::new(0);
/// Allocation fails once `USED` would pass this (`i64::MAX`: no limit).
static CEILING: AtomicI64 = AtomicI64::new(i64::MAX);
/// An allocation was refused since the flag was last cleared.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// The allocators wrapped by the hooks.
struct Originals {
    raw: ffi::PyMemAllocatorEx,
    arena: ffi::PyObjectArenaAllocator,
}
// SAFETY: the structs hold function pointers and CPython's (unused, null) contexts;
// they are written once before the hooks are installed and only read after.
unsafe impl Send for Originals {}
// SAFETY: as above: read-only after initialisation.
unsafe impl Sync for Originals {}

static ORIGINALS: OnceLock<Originals> = OnceLock::new();

fn originals() -> &'static Originals {
    ORIGINALS
        .get()
        .expect("allocator hooks installed before use")
}

/// Whether `more` bytes fit under the ceiling now.
fn fits(more: usize) -> bool {
    let ceiling = CEILING.load(Ordering::Relaxed);
    if ceiling == i64::MAX {
        return true;
    }
    let fits = USED
        .load(Ordering::Relaxed)
        .saturating_add(i64::try_from(more).unwrap_or(i64::MAX))
        <= ceiling;
    if !fits {
        REFUSED.store(true, Ordering::Relaxed);
    }
    fits
}

fn usable(p: *mut c_void) -> i64 {
    if p.is_null() {
        return 0;
    }
    // SAFETY: `p` came from glibc malloc (CPython's raw domain allocator).
    unsafe { libc::malloc_usable_size(p) as i64 }
}

extern "C" fn raw_malloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if !fits(size) {
        return std::ptr::null_mut();
    }
    let o = &originals().raw;
    let p = (o.malloc.expect("raw malloc"))(o.ctx, size);
    USED.fetch_add(usable(p), Ordering::Relaxed);
    p
}

extern "C" fn raw_calloc(_ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    if !fits(nelem.saturating_mul(elsize)) {
        return std::ptr::null_mut();
    }
    let o = &originals().raw;
    let p = (o.calloc.expect("raw calloc"))(o.ctx, nelem, elsize);
    USED.fetch_add(usable(p), Ordering::Relaxed);
    p
}

extern "C" fn raw_realloc(_ctx: *mut c_void, ptr: *mut c_void, size: usize) -> *mut c_void {
    let before = usable(ptr);
    if size as i64 > before && !fits(size - before as usize) {
        // The old block stays valid, as realloc promises on failure.
        return std::ptr::null_mut();
    }
    let o = &originals().raw;
    let p = (o.realloc.expect("raw realloc"))(o.ctx, ptr, size);
    if !p.is_null() {
        USED.fetch_add(usable(p) - before, Ordering::Relaxed);
    }
    p
}

extern "C" fn raw_free(_ctx: *mut c_void, ptr: *mut c_void) {
    USED.fetch_sub(usable(ptr), Ordering::Relaxed);
    let o = &originals().raw;
    (o.free.expect("raw free"))(o.ctx, ptr)
}

extern "C" fn arena_alloc(_ctx: *mut c_void, size: usize) -> *mut c_void {
    if !fits(size) {
        return std::ptr::null_mut();
    }
    let o = &originals().arena;
    let p = (o.alloc.expect("arena alloc"))(o.ctx, size);
    if !p.is_null() {
        USED.fetch_add(size as i64, Ordering::Relaxed);
    }
    p
}

extern "C" fn arena_free(_ctx: *mut c_void, ptr: *mut c_void, size: usize) {
    USED.fetch_sub(size as i64, Ordering::Relaxed);
    let o = &originals().arena;
    (o.free.expect("arena free"))(o.ctx, ptr, size)
}

/// Set by the worker program when it interposes the C library's `malloc` family
/// ([`c_malloc`] and the rest): then every C allocation is counted there (the raw
/// domain included, which ends in `malloc`), and only pymalloc's arenas, which
/// are mapped directly, are hooked here.
static INTERPOSED: AtomicBool = AtomicBool::new(false);

/// Say that the program interposes `malloc` through this module's functions.
pub fn set_malloc_interposed() {
    INTERPOSED.store(true, Ordering::Relaxed);
}

// glibc's own entry points, which the interposed ones forward to.
unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(nelem: usize, elsize: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

fn refuse() -> *mut c_void {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = libc::ENOMEM };
    std::ptr::null_mut()
}

/// `malloc` for the whole process, counted against the plugin's limit: what a
/// compiled extension allocates (numpy's arrays, C++'s `new`) is the plugin's too.
///
/// # Safety
/// As `malloc(3)`.
pub unsafe fn c_malloc(size: usize) -> *mut c_void {
    if !reserve(size) {
        return refuse();
    }
    // SAFETY: forwarding to glibc.
    let p = unsafe { __libc_malloc(size) };
    settle(size, p)
}

/// Count `size` bytes before allocating them, so that threads allocating at once
/// cannot each pass the check and together overshoot; `false` (and nothing
/// counted) if they do not fit.
fn reserve(size: usize) -> bool {
    if size == 0 {
        return true;
    }
    let ceiling = CEILING.load(Ordering::Relaxed);
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let before = USED.fetch_add(size, Ordering::Relaxed);
    if ceiling != i64::MAX && before.saturating_add(size) > ceiling {
        USED.fetch_sub(size, Ordering::Relaxed);
        REFUSED.store(true, Ordering::Relaxed);
        return false;
    }
    true
}

/// Replace a reservation of `size` by the block's real size (nothing if the
/// allocation failed).
fn settle(size: usize, p: *mut c_void) -> *mut c_void {
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    USED.fetch_add(usable(p) - size, Ordering::Relaxed);
    p
}

/// # Safety
/// As `calloc(3)`.
pub unsafe fn c_calloc(nelem: usize, elsize: usize) -> *mut c_void {
    let size = nelem.saturating_mul(elsize);
    if !reserve(size) {
        return refuse();
    }
    // SAFETY: forwarding to glibc.
    let p = unsafe { __libc_calloc(nelem, elsize) };
    settle(size, p)
}

/// # Safety
/// As `realloc(3)`.
pub unsafe fn c_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    let before = usable(ptr);
    let growth = usize::try_from(i64::try_from(size).unwrap_or(i64::MAX) - before).unwrap_or(0);
    if !reserve(growth) {
        // The old block stays valid, as realloc promises on failure.
        return refuse();
    }
    // SAFETY: forwarding to glibc.
    let p = unsafe { __libc_realloc(ptr, size) };
    let growth = i64::try_from(growth).unwrap_or(i64::MAX);
    if !p.is_null() {
        USED.fetch_add(usable(p) - before - growth, Ordering::Relaxed);
    } else if size == 0 {
        // glibc freed the block.
        USED.fetch_sub(before + growth, Ordering::Relaxed);
    } else {
        USED.fetch_sub(growth, Ordering::Relaxed);
    }
    p
}

/// # Safety
/// As `free(3)`.
pub unsafe fn c_free(ptr: *mut c_void) {
    USED.fetch_sub(usable(ptr), Ordering::Relaxed);
    // SAFETY: forwarding to glibc.
    unsafe { __libc_free(ptr) }
}

/// `memalign`, `aligned_alloc`, `valloc` and `posix_memalign`'s allocation.
///
/// # Safety
/// As `memalign(3)`.
pub unsafe fn c_memalign(align: usize, size: usize) -> *mut c_void {
    let reserved = size.saturating_add(align);
    if !reserve(reserved) {
        return refuse();
    }
    // SAFETY: forwarding to glibc.
    let p = unsafe { __libc_memalign(align, size) };
    settle(reserved, p)
}

/// Uncounted allocation, for the worker's own Rust code (its global allocator):
/// frames and buffers the supervisor sends are not the plugin's memory.
///
/// # Safety
/// As `memalign(3)`.
pub unsafe fn uncounted_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarding to glibc.
    unsafe {
        if align <= 16 {
            __libc_malloc(size)
        } else {
            __libc_memalign(align, size)
        }
    }
}

/// # Safety
/// As `free(3)`, for a block from [`uncounted_alloc`] or [`uncounted_realloc`].
pub unsafe fn uncounted_free(ptr: *mut c_void) {
    // SAFETY: forwarding to glibc.
    unsafe { __libc_free(ptr) }
}

/// # Safety
/// As `realloc(3)`, for a block from [`uncounted_alloc`] with alignment <= 16.
pub unsafe fn uncounted_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: forwarding to glibc.
    unsafe { __libc_realloc(ptr, size) }
}

/// # Safety
/// As `calloc(3)`.
pub unsafe fn uncounted_zeroed(size: usize) -> *mut c_void {
    // SAFETY: forwarding to glibc.
    unsafe { __libc_calloc(1, size) }
}

/// Wrap pymalloc's arena allocator (and, unless `malloc` itself is counted, the raw
/// allocator) with the counting hooks. Every Python object lives in an arena or
/// (above 512 bytes) a raw block.
fn install_hooks() {
    // SAFETY: the Get calls fill plain structs; the Set calls install functions
    // that forward to those originals, which stay valid for the process's life.
    unsafe {
        let mut raw: ffi::PyMemAllocatorEx = std::mem::zeroed();
        ffi::PyMem_GetAllocator(ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW, &mut raw);
        let mut arena: ffi::PyObjectArenaAllocator = std::mem::zeroed();
        ffi::PyObject_GetArenaAllocator(&mut arena);
        if ORIGINALS.set(Originals { raw, arena }).is_err() {
            return;
        }
        let mut hooks = ffi::PyMemAllocatorEx {
            ctx: std::ptr::null_mut(),
            malloc: Some(raw_malloc),
            calloc: Some(raw_calloc),
            realloc: Some(raw_realloc),
            free: Some(raw_free),
        };
        if !INTERPOSED.load(Ordering::Relaxed) {
            ffi::PyMem_SetAllocator(ffi::PyMemAllocatorDomain::PYMEM_DOMAIN_RAW, &mut hooks);
        }
        let mut arena_hooks = ffi::PyObjectArenaAllocator {
            ctx: std::ptr::null_mut(),
            alloc: Some(arena_alloc),
            free: Some(arena_free),
        };
        ffi::PyObject_SetArenaAllocator(&mut arena_hooks);
    }
}

/// Let the plugin hold `limit` bytes more than the interpreter holds now.
pub fn limit_from_now(limit: u64) {
    let now = USED.load(Ordering::Relaxed);
    CEILING.store(
        now.saturating_add(i64::try_from(limit).unwrap_or(i64::MAX)),
        Ordering::Relaxed,
    );
}

/// Bytes held now beyond the level set by [`limit_from_now`].
pub fn plugin_bytes(limit: u64) -> u64 {
    let ceiling = CEILING.load(Ordering::Relaxed);
    if ceiling == i64::MAX {
        return USED.load(Ordering::Relaxed).max(0) as u64;
    }
    let base = ceiling - i64::try_from(limit).unwrap_or(i64::MAX);
    (USED.load(Ordering::Relaxed) - base).max(0) as u64
}

/// Clear the "an allocation was refused" flag; returns its previous value.
pub fn take_refused() -> bool {
    REFUSED.swap(false, Ordering::Relaxed)
}

/// A NUL-terminated wide string.
fn wide(s: &str) -> Vec<libc::wchar_t> {
    s.chars()
        .map(|c| c as libc::wchar_t)
        .chain(std::iter::once(0))
        .collect()
}

fn check(status: ffi::PyStatus, what: &str) -> Result<(), SetupError> {
    // SAFETY: PyStatus_Exception only reads the struct.
    if unsafe { ffi::PyStatus_Exception(status) } == 0 {
        return Ok(());
    }
    let msg = if status.err_msg.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: CPython's status messages are static NUL-terminated strings.
        unsafe { std::ffi::CStr::from_ptr(status.err_msg) }
            .to_string_lossy()
            .into_owned()
    };
    Err(SetupError::Engine {
        engine: "CPython",
        message: format!("{what}: {msg}"),
    })
}

/// Set a string field of `cfg`.
///
/// # Safety
/// `cfg` points at an initialised configuration and `field` into it.
unsafe fn set_string(
    cfg: *mut ffi::PyConfig,
    field: *mut *mut libc::wchar_t,
    value: &str,
) -> Result<(), SetupError> {
    let w = wide(value);
    // SAFETY: per the function's contract; CPython copies the string.
    check(
        unsafe { ffi::PyConfig_SetString(cfg, field, w.as_ptr()) },
        "configuring Python",
    )
}

/// Where the interpreter finds its standard library.
#[derive(Debug, Clone)]
pub struct Paths {
    pub prefix: String,
    pub stdlib: String,
    pub dynload: String,
}

/// Start CPython isolated: no `site`, no user site, no `PYTHON*` variables, no
/// signal handlers of its own, UTF-8 mode, `sys.path` = the standard library (the
/// plugin directory is put first at load). Returns with the GIL released.
pub fn initialize(paths: &Paths) -> Result<(), SetupError> {
    // SAFETY: the pre-configuration, allocator hooks, inittab and configuration are
    // set up in the order CPython documents, once, on the main thread, before the
    // interpreter exists; every wide string outlives the call that copies it.
    unsafe {
        let mut pre: ffi::PyPreConfig = std::mem::zeroed();
        ffi::PyPreConfig_InitIsolatedConfig(&mut pre);
        pre.utf8_mode = 1;
        check(ffi::Py_PreInitialize(&pre), "pre-initialising Python")?;
        install_hooks();
        pyo3::append_to_inittab!(corral_module);

        let mut config: ffi::PyConfig = std::mem::zeroed();
        ffi::PyConfig_InitIsolatedConfig(&mut config);
        config.site_import = 0;
        config.user_site_directory = 0;
        config.write_bytecode = 0;
        config.install_signal_handlers = 0;
        config.pathconfig_warnings = 0;
        config.parse_argv = 0;
        config.safe_path = 1;
        let cfg: *mut ffi::PyConfig = &mut config;
        let result = (|| {
            set_string(cfg, &raw mut (*cfg).program_name, "corral-worker-python")?;
            set_string(cfg, &raw mut (*cfg).home, &paths.prefix)?;
            for dir in [&paths.stdlib, &paths.dynload] {
                let w = wide(dir);
                check(
                    ffi::PyWideStringList_Append(&raw mut (*cfg).module_search_paths, w.as_ptr()),
                    "module search path",
                )?;
            }
            (*cfg).module_search_paths_set = 1;
            check(ffi::Py_InitializeFromConfig(cfg), "initialising Python")
        })();
        ffi::PyConfig_Clear(&mut config);
        result?;
        ffi::PyEval_SaveThread();
    }
    Ok(())
}

use crate::api::corral_module;
