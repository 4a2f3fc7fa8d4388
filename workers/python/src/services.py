"""The typed host services over the native `_host` primitive. Executed in the
`corral` module's namespace when the interpreter starts (where `bytes` and `json`
are corral's own helpers: the built-in types come from `builtins`)."""

import builtins as _builtins


class HostError(Exception):
    """A host call was refused or failed; `kind` is one of denied, invalid, quota,
    overloaded, cycle, call, failed."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def _b(value, what):
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (_builtins.bytes, bytearray, memoryview)):
        return _builtins.bytes(value)
    if value is None:
        return b""
    raise TypeError(f"{what}: expected str or bytes, got {type(value).__name__}")


class _Store:
    """The plugin's own key-value store, kept by the supervisor."""

    def get(self, key):
        r = _host("kv_get", key)
        return r[0] if r else None

    def get_text(self, key):
        v = self.get(key)
        return None if v is None else v.decode()

    def put(self, key, value):
        _host("kv_put", key, _b(value, "corral.kv.put"))

    def delete(self, key):
        return _host("kv_delete", key)[0] == b"1"

    def keys(self, prefix=""):
        return [k.decode() for k in _host("kv_keys", prefix)]


kv = _Store()


class Response:
    """A brokered fetch's answer."""

    def __init__(self, status, url, headers, body):
        self.status = status
        self.url = url
        self.headers = headers
        self.body = body

    def text(self):
        return self.body.decode()

    def json(self):
        return json(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.url} {len(self.body)} bytes>"


def fetch(url, method="GET", headers=None, body=b""):
    """An HTTP request made by the supervisor, if the plugin's policy allows it."""
    head = "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())
    status, final, raw, payload = _host(
        "fetch", method, url, head, _b(body, "corral.fetch body")
    )
    hs = {}
    for line in raw.decode().split("\n"):
        k, sep, v = line.partition(":")
        if sep:
            hs[k.strip().lower()] = v.strip()
    return Response(int(status), final.decode(), hs, payload)


def publish(topic, payload):
    """Queue `payload` for the topic's subscribers; returns how many."""
    return int(_host("publish", topic, _b(payload, "corral.publish"))[0])


def call(plugin, function, input=b""):
    """Call another plugin's function through the supervisor; returns its output."""
    return _host("call", plugin, function, _b(input, "corral.call input"))[0]


def secret(name):
    """One of the plugin's secrets, or None."""
    r = _host("secret", name)
    return r[0].decode() if r else None


def __getattr__(name):
    if name == "config":
        import types

        flat = _host("config")
        return types.MappingProxyType(
            {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat) - 1, 2)}
        )
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
