"""{{id}}: a Corral plugin in Python.

Every top-level function takes the input bytes and returns str or bytes; an
exception is the call's error. `corral` is the host API: corral.text,
corral.log, corral.config, corral.secret, corral.kv, corral.fetch,
corral.publish, corral.call.
"""

import corral

greeting = "Hello"


def init() -> None:
    """Runs once when a worker loads the plugin, before any call."""
    global greeting
    greeting = corral.config.get("greeting", "Hello")
    corral.log("info", f"ready to say {greeting}")


def greet(data: bytes) -> str:
    """`greet "Ada"` -> `Hello, Ada!`"""
    name = corral.text(data).strip()
    if not name:
        raise ValueError("give a name to greet")
    return f"{greeting}, {name}!"


def visit(data: bytes) -> str:
    """Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`."""
    name = corral.text(data).strip() or "stranger"
    n = int(corral.kv.get_text(f"visits/{name}") or "0") + 1
    corral.kv.put(f"visits/{name}", str(n))
    return f"Welcome, {name} (visit {n})"


def shutdown() -> None:
    """Runs when the worker stops, within the plugin's timeout."""
    corral.log("info", "stopping")
