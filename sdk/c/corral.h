/*
 * corral.h: the Corral native plugin ABI, version 1, for C and anything that
 * speaks the C ABI. A native plugin (runtime = "native" in plugin.toml) is an ELF
 * shared library for the worker's machine; it runs in a worker confined like every
 * other (uid drop, no_new_privs, Landlock, seccomp, namespaces, a cgroup), which is
 * the only wall around it. Rust plugins get all of this from corral-guest's
 * plugin! macro; this header is the same contract spelled out.
 *
 * Build:  cc -shared -fPIC -O2 -o plugin.so plugin.c
 * Link only against what the worker already has (libc, libm, libgcc_s) or ship the
 * library in the plugin's directory; other system libraries it needs are found by
 * the supervisor and made readable to the worker.
 *
 * The library exports:
 *
 *   int32_t corral_set_host(const struct corral_host *host);
 *       Called first, before corral_init and before any function. Keep the
 *       pointer (the table outlives the library). Return 0, or non-zero to refuse
 *       a table whose abi is not CORRAL_HOST_ABI.
 *   uint8_t *corral_alloc(size_t len);
 *       Return len writable bytes; the worker copies a call's input there and
 *       hands them to the function, which owns them from then on.
 *   int32_t corral_fn_<name>(uint8_t *input, size_t len);
 *       The function <name>. Set the result with host->output (the last call
 *       wins; none means an empty result) and return CORRAL_OK, or set a message
 *       with host->error and return CORRAL_ERROR ("plugin returned an error"), or
 *       return CORRAL_NO_MEMORY when an allocation failed (the caller sees the
 *       plugin's memory limit).
 *   int32_t corral_init(void);        optional; non-zero fails the load
 *   void corral_shutdown(void);       optional; at stop, hot reload, idle stop
 *
 * Limits: the worker holds the library's private memory (RLIMIT_DATA) at the
 * plugin's `memory` limit, so malloc returns NULL past it; a call past its deadline
 * is ended by the supervisor killing the worker (the next call gets a fresh one);
 * a result over `max_output` is refused; a crash ends only this worker.
 */
#ifndef CORRAL_H
#define CORRAL_H

#include <stddef.h>
#include <stdint.h>

#define CORRAL_HOST_ABI 1

#define CORRAL_OK 0
#define CORRAL_ERROR 1
#define CORRAL_NO_MEMORY 2

enum corral_level {
    CORRAL_LOG_ERROR = 0,
    CORRAL_LOG_WARN = 1,
    CORRAL_LOG_INFO = 2,
    CORRAL_LOG_DEBUG = 3,
    CORRAL_LOG_TRACE = 4,
};

struct corral_host {
    /* CORRAL_HOST_ABI of the worker. */
    uint32_t abi;
    /* The call's result bytes, copied at once. */
    void (*output)(const uint8_t *ptr, size_t len);
    /* The call's error message (UTF-8), copied at once. */
    void (*error)(const uint8_t *ptr, size_t len);
    /* A log line (UTF-8) at a corral_level, tagged with the plugin's id. */
    void (*log)(uint32_t level, const uint8_t *ptr, size_t len);
    /* Wall-clock milliseconds since the Unix epoch, from the supervisor. */
    int64_t (*now_ms)(void);
    /*
     * A brokered host service (kv_get, kv_put, kv_delete, kv_keys, fetch, publish,
     * call, config, secret: the table in docs/plugins/README.md). name is UTF-8;
     * args is a byte-string list (each item a uint32 little-endian length and its
     * bytes). Returns n >= 0: success, an answer list of n bytes is ready; n < 0: a
     * failure, a UTF-8 "kind: message" of -n-1 bytes is ready. Either way, copy it
     * out with host_take into a buffer of exactly that size.
     */
    int32_t (*host_call)(const uint8_t *name, size_t name_len, const uint8_t *args,
                         size_t args_len);
    void (*host_take)(uint8_t *ptr);
};

#endif /* CORRAL_H */
