"""Set up the stand-in host services of `corral` for a test, outside Corral.

    corral.testing.reset(config={"greeting": "Howdy"}, store={"visits/Ada": "1"})
    corral.testing.respond("GET", "https://api.example/", 200, b"{}")
    corral.testing.deny("kv")          # every store call raises HostError("denied")

Everything is cleared by `reset()`; `logs()`, `published()` and `store()` say
what the plugin did.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import corral


@dataclass
class _State:
    store: dict[str, bytes] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    responses: dict[tuple[str, str], tuple[int, Mapping[str, str], bytes]] = field(
        default_factory=dict
    )
    plugins: dict[tuple[str, str], Callable[[bytes], bytes]] = field(
        default_factory=dict
    )
    subscribers: dict[str, int] = field(default_factory=dict)
    published: list[tuple[str, bytes]] = field(default_factory=list)
    logs: list[tuple[str, str]] = field(default_factory=list)
    denied: set[str] = field(default_factory=set)
    now_ms: Optional[int] = None


_state = _State()


def _check(service: str, target: str) -> None:
    if service in _state.denied:
        raise corral.HostError(
            "denied", f"denied by policy: {service} {target} (corral.testing.deny)"
        )


def reset(
    config: Optional[Mapping[str, str]] = None,
    secrets: Optional[Mapping[str, str]] = None,
    store: Optional[Mapping[str, Union[str, bytes]]] = None,
) -> None:
    """Start again: an empty store (or `store`), this config and these secrets,
    no recorded responses, nothing denied."""
    global _state
    _state = _State()
    corral.config = types.MappingProxyType(dict(config or {}))
    _state.secrets = dict(secrets or {})
    for k, v in (store or {}).items():
        _state.store[k] = v.encode() if isinstance(v, str) else bytes(v)


def respond(
    method: str,
    url: str,
    status: int = 200,
    body: Union[str, bytes] = b"",
    headers: Optional[Mapping[str, str]] = None,
) -> None:
    """What `corral.fetch(url, method=method)` answers."""
    payload = body.encode() if isinstance(body, str) else body
    _state.responses[(method.upper(), url)] = (status, dict(headers or {}), payload)


def provide(plugin: str, function: str, handler: Callable[[bytes], bytes]) -> None:
    """What `corral.call(plugin, function, input)` runs."""
    _state.plugins[(plugin, function)] = handler


def subscribers(topic: str, count: int) -> None:
    """How many subscribers `corral.publish(topic, ...)` says it reached."""
    _state.subscribers[topic] = count


def deny(service: str) -> None:
    """Make every call to `service` (kv, fetch, publish, call) raise HostError
    with kind `denied`, as a policy without the grant would."""
    _state.denied.add(service)


def clock(ms: Optional[int]) -> None:
    """What `corral.now_ms()` answers (`None`: the real clock)."""
    _state.now_ms = ms


def logs() -> list[tuple[str, str]]:
    """The (level, message) lines logged so far."""
    return list(_state.logs)


def published() -> list[tuple[str, bytes]]:
    """The (topic, payload) messages published so far."""
    return list(_state.published)


def store() -> dict[str, bytes]:
    """The store's contents now."""
    return dict(_state.store)
