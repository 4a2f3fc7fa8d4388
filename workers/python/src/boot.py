"""The Corral Python worker's driver: loads the plugin module and names its exports.

Runs inside the worker's interpreter (not a plugin module; not importable by plugins).
"""

import importlib
import os
import sys

HOOKS = ("init", "shutdown")

# Where `corral plugin vendor` installs a plugin's packages (on sys.path after the
# plugin directory).
VENDORED = "site-packages"


def module_name(entry):
    """The dotted module name of `entry`, a relative .py path inside the plugin."""
    if os.path.isabs(entry) or not entry.endswith(".py"):
        raise ValueError(
            f"entry {entry!r} must be a relative path to a .py file inside the plugin"
        )
    parts = entry[: -len(".py")].split("/")
    for part in parts:
        if not part.isidentifier():
            raise ValueError(
                f"entry {entry!r}: {part!r} is not a Python module name "
                "(letters, digits and _; no '..')"
            )
    return ".".join(parts)


def load(plugin_dir, entry):
    """Import the plugin; return (module, sorted export names, init or None)."""
    name = module_name(entry)
    vendored = os.path.join(plugin_dir, VENDORED)
    if os.path.isdir(vendored) and vendored not in sys.path:
        sys.path.insert(0, vendored)
    if plugin_dir not in sys.path:
        sys.path.insert(0, plugin_dir)
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    public = getattr(module, "__all__", None)
    names = public if public is not None else [n for n in vars(module) if not n.startswith("_")]
    exports = []
    for n in names:
        value = getattr(module, n, None)
        if n in HOOKS or not callable(value) or isinstance(value, type):
            continue
        # Without __all__: functions defined in the plugin, not ones it imported.
        if public is None and getattr(value, "__module__", None) != module.__name__:
            continue
        exports.append(n)
    exports.sort()
    init = getattr(module, "init", None)
    return module, exports, init if callable(init) else None


def unload(plugin_dir):
    """Forget the plugin's own modules (to import them afresh).

    Vendored packages (in site-packages) and compiled extension modules stay, with
    the packages that hold them: a C extension cannot be initialised twice in one
    process (numpy refuses), so they are imported once per worker.
    """
    prefix = os.path.join(plugin_dir, "")
    vendored = os.path.join(plugin_dir, VENDORED, "")
    kept = set()
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(prefix) and (path.startswith(vendored) or path.endswith(".so")):
            parts = name.split(".")
            kept.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(prefix) and name not in kept and not path.startswith(vendored):
            del sys.modules[name]


def rebase_stdlib(old, new, dynload_old, dynload_new):
    """In a worker forked from a template: read the standard library at `new`
    from now on (the template imported it from `old`, which this worker's user may
    not reach): the search path, and the packages already imported, whose
    submodules are found through their own `__path__`."""
    def moved(p):
        for a, b in ((dynload_old, dynload_new), (old, new)):
            if p == a or p.startswith(a + "/"):
                return b + p[len(a):]
        return p

    sys.path[:] = [new, dynload_new]
    sys.path_importer_cache.clear()
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = [moved(p) for p in path]
    importlib.invalidate_caches()
