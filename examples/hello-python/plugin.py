"""The example Corral plugin for Python: the same functions as hello-wasm, plus
`top` (the most frequent words), on the standard library alone."""

import collections
import json
import re

import corral


def greet(data: bytes) -> str:
    """`greet "Ada"` -> `Hello, Ada!`"""
    name = corral.text(data).strip()
    if not name:
        raise ValueError("give a name to greet")
    corral.log("info", f"greeting {name}")
    return f"Hello, {name}!"


def reverse(data: bytes) -> str:
    """Reverse the characters (code points) of a UTF-8 string."""
    return corral.text(data)[::-1]


def wc(data: bytes) -> str:
    """Count words, lines and bytes, as JSON."""
    text = corral.text(data)
    lines = 0 if text == "" else len(re.split(r"\r?\n", re.sub(r"\r?\n$", "", text)))
    return json.dumps(
        {"lines": lines, "words": len(text.split()), "bytes": len(data)},
        separators=(",", ":"),
    )


def echo(data: bytes) -> bytes:
    """Return the input unchanged."""
    return data


def noop(data: bytes) -> None:
    """Do nothing (for measuring call overhead)."""


def now(data: bytes) -> str:
    """The supervisor's clock, through a host call."""
    return str(corral.now_ms())


def top(data: bytes) -> bytes:
    """The five most frequent words, with their counts, as JSON."""
    words = re.findall(r"\w+", corral.text(data).lower())
    return corral.json_bytes(collections.Counter(words).most_common(5))


# Host services, brokered by the supervisor under policies/grants.toml.


def visit(data: bytes) -> str:
    """Count visits per name in the plugin's own store: `Welcome, Ada (visit 2)`."""
    name = corral.text(data).strip() or "stranger"
    n = int(corral.kv.get_text(f"visits/{name}") or "0") + 1
    corral.kv.put(f"visits/{name}", str(n))
    return f"Welcome, {name} (visit {n})"


def fetch(data: bytes) -> str:
    """GET a URL through the supervisor: `200, 1234 bytes`."""
    r = corral.fetch(corral.text(data).strip())
    return f"{r.status}, {len(r.body)} bytes"


def announce(data: bytes) -> str:
    """Publish on `hello.news`: every example subscribed receives it in `on_news`."""
    return f"queued for {corral.publish('hello.news', data)} subscribers"


def on_news(data: bytes) -> None:
    """Subscriber of `hello.news`: keep the latest message."""
    corral.kv.put("news/latest", data)


def news(data: bytes) -> bytes:
    """The latest message on `hello.news`, or nothing."""
    return corral.kv.get("news/latest") or b""
