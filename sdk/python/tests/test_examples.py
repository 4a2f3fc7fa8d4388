"""The stand-in host API runs the Python example's functions and the plugin that
`corral new --runtime python` writes with the answers Corral gives: every case of
their tests/*.toml (which `corral test` runs through a real worker), here under
pytest, outside Corral."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import tomllib
from types import ModuleType
from typing import Any

import pytest

import corral
import corral.testing

ROOT = pathlib.Path(__file__).resolve().parents[3]
PLUGINS = {
    "hello-python": (ROOT / "examples/hello-python/plugin.py", ROOT / "examples/hello-python/tests"),
    "new-python": (
        ROOT / "supervisor/templates/python/plugin.py",
        ROOT / "supervisor/templates/common/tests",
    ),
}


def load(path: pathlib.Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def as_bytes(out: Any) -> bytes:
    if out is None:
        return b""
    if isinstance(out, str):
        return out.encode()
    return bytes(out)


FILES = [
    (plugin, f)
    for plugin, (_, tests) in PLUGINS.items()
    for f in sorted(tests.glob("*.toml"))
]


@pytest.mark.parametrize("plugin,file", FILES, ids=[f"{p}/{f.name}" for p, f in FILES])
def test_every_case_of_the_file_gives_corrals_answer(plugin: str, file: pathlib.Path) -> None:
    source, _ = PLUGINS[plugin]
    data = tomllib.loads(file.read_text())
    corral.testing.reset(
        config={k: str(v) for k, v in data.get("config", {}).items()},
        secrets=data.get("secrets", {}),
        store=data.get("store", {}),
    )
    module = load(source, f"plugin_{plugin.replace('-', '_')}")
    if hasattr(module, "init"):
        module.init()
    for case in data["case"]:
        fn = getattr(module, case["function"])
        given = (
            bytes.fromhex(case["input_hex"])
            if "input_hex" in case
            else case.get("input", "").encode()
        )
        if "expect_error" in case:
            assert case["expect_error"] == "plugin_error", case
            with pytest.raises(Exception) as raised:
                fn(given)
            assert case.get("expect_message", "") in str(raised.value), case
        else:
            want = (
                bytes.fromhex(case["expect_hex"])
                if "expect_hex" in case
                else case["expect"].encode()
            )
            assert as_bytes(fn(given)) == want, case
