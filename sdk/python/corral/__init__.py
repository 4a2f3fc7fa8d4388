"""Corral's host API for Python plugins, typed, with a pure-Python stand-in.

Inside Corral the worker provides the real `corral` module (the supervisor
performs every host call under the operator's policy); this package has the same
names and types, so type checkers (`mypy --strict`) know the API and `pytest`
can run a plugin's functions outside Corral. Outside Corral the host services are
local: a store in a dict, the config and secrets you set, fetch answered from
responses you record, publish and call recorded or routed to what you register.
Set them up with `corral.testing` (and `corral.testing.reset()` between tests).

    import corral, corral.testing, plugin
    corral.testing.reset(config={"greeting": "Howdy"})
    assert plugin.greet(b"Ada") == "Howdy, Ada!"
"""

from __future__ import annotations

import json as _json
import time as _time
import types as _types
from typing import Any, Mapping, Optional, Union

__all__ = [
    "DeadlineExceeded",
    "HostError",
    "Response",
    "bytes",
    "call",
    "config",
    "fetch",
    "json",
    "json_bytes",
    "kv",
    "log",
    "now_ms",
    "publish",
    "secret",
    "text",
]

import builtins as _builtins

#: What host functions accept as a payload: text is sent as UTF-8.
Payload = Union[str, _builtins.bytes, bytearray, memoryview, None]

_LEVELS = ("error", "warn", "info", "debug", "trace")


class HostError(Exception):
    """A host call was refused or failed; `kind` is one of denied, invalid, quota,
    overloaded, cycle, call, failed."""

    kind: str

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DeadlineExceeded(Exception):
    """Raised in the plugin when its call runs past its deadline (Corral's worker
    raises it; the stand-in never does). A plugin should let it through: the call
    has failed as a timeout either way."""


def _b(value: Payload, what: str) -> _builtins.bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (_builtins.bytes, bytearray, memoryview)):
        return _builtins.bytes(value)
    if value is None:
        return b""
    raise TypeError(f"{what}: expected str or bytes, got {type(value).__name__}")


def text(data: Union[_builtins.bytes, bytearray]) -> str:
    """The input bytes as text (UTF-8); anything else is a ValueError."""
    if not isinstance(data, (_builtins.bytes, bytearray)):
        raise TypeError(
            f"corral.text: expected bytes or bytearray, got {type(data).__name__}"
        )
    try:
        return _builtins.bytes(data).decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"corral.text: not UTF-8: {e}") from None


def bytes(value: str) -> _builtins.bytes:  # noqa: A001 - the host API's name
    """Text as UTF-8 bytes."""
    return value.encode()


def json(data: Union[_builtins.bytes, bytearray]) -> Any:
    """The input bytes parsed as JSON."""
    return _json.loads(text(data))


def json_bytes(value: Any, indent: Optional[int] = None) -> _builtins.bytes:
    """`value` as JSON, UTF-8."""
    return _json.dumps(value, indent=indent, ensure_ascii=False).encode()


def log(level: str, message: object) -> None:
    """A log line in the supervisor's log, with the plugin's id (secrets redacted)."""
    if level not in _LEVELS:
        raise ValueError(
            f"corral.log: unknown level {level!r} (error, warn, info, debug, trace)"
        )
    testing._state.logs.append((level, str(message)))


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch, from the supervisor."""
    if testing._state.now_ms is not None:
        return testing._state.now_ms
    return int(_time.time() * 1000)


class _Store:
    """The plugin's own key-value store, kept by the supervisor."""

    def get(self, key: str) -> Optional[_builtins.bytes]:
        testing._check("kv", key)
        return testing._state.store.get(key)

    def get_text(self, key: str) -> Optional[str]:
        v = self.get(key)
        return None if v is None else v.decode()

    def put(self, key: str, value: Payload) -> None:
        testing._check("kv", key)
        testing._state.store[key] = _b(value, "corral.kv.put")

    def delete(self, key: str) -> bool:
        testing._check("kv", key)
        return testing._state.store.pop(key, None) is not None

    def keys(self, prefix: str = "") -> list[str]:
        testing._check("kv", prefix)
        return sorted(k for k in testing._state.store if k.startswith(prefix))


kv = _Store()


class Response:
    """A brokered fetch's answer."""

    status: int
    url: str
    headers: Mapping[str, str]
    body: _builtins.bytes

    def __init__(
        self, status: int, url: str, headers: Mapping[str, str], body: _builtins.bytes
    ) -> None:
        self.status = status
        self.url = url
        self.headers = headers
        self.body = body

    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.url} {len(self.body)} bytes>"


def fetch(
    url: str,
    method: str = "GET",
    headers: Optional[Mapping[str, str]] = None,
    body: Payload = b"",
) -> Response:
    """An HTTP request made by the supervisor, if the plugin's policy allows it."""
    testing._check("fetch", url)
    _b(body, "corral.fetch body")
    answer = testing._state.responses.get((method.upper(), url))
    if answer is None:
        raise HostError(
            "failed",
            f"no response recorded for {method.upper()} {url} "
            "(corral.testing.respond)",
        )
    status, headers_out, payload = answer
    return Response(status, url, dict(headers_out), payload)


def publish(topic: str, payload: Payload) -> int:
    """Queue `payload` for the topic's subscribers; returns how many."""
    testing._check("publish", topic)
    testing._state.published.append((topic, _b(payload, "corral.publish")))
    return testing._state.subscribers.get(topic, 0)


def call(plugin: str, function: str, input: Payload = b"") -> _builtins.bytes:
    """Call another plugin's function through the supervisor; returns its output."""
    testing._check("call", f"{plugin}.{function}")
    handler = testing._state.plugins.get((plugin, function))
    if handler is None:
        raise HostError(
            "call",
            f"{plugin}.{function}: no such plugin function (corral.testing.provide)",
        )
    return handler(_b(input, "corral.call input"))


def secret(name: str) -> Optional[str]:
    """One of the plugin's secrets, or None."""
    return testing._state.secrets.get(name)


#: The operator's configuration for the plugin (read-only).
config: Mapping[str, str] = _types.MappingProxyType({})

from . import testing  # noqa: E402  (the stand-in's state, set up by tests)
