"""The plugin's functions under pytest, outside Corral, with the stand-in host API
of Corral's `sdk/python` (`pip install <corral>/sdk/python`, then `pytest`).
`corral test` runs the cases in tests/ through a real, confined worker."""

import corral
import corral.testing

import plugin


def setup_function() -> None:
    corral.testing.reset()
    plugin.init()


def test_greets_by_name() -> None:
    assert plugin.greet(b"Ada") == "Hello, Ada!"


def test_the_greeting_comes_from_the_config() -> None:
    corral.testing.reset(config={"greeting": "Howdy"})
    plugin.init()
    assert plugin.greet(b"Ada") == "Howdy, Ada!"


def test_visits_are_counted_in_the_store() -> None:
    corral.testing.reset(store={"visits/Ada": "1"})
    assert plugin.visit(b"Ada") == "Welcome, Ada (visit 2)"
    assert corral.testing.store()["visits/Ada"] == b"2"


def test_a_store_the_policy_denies_is_an_error() -> None:
    corral.testing.deny("kv")
    try:
        plugin.visit(b"Ada")
    except corral.HostError as e:
        assert e.kind == "denied"
    else:
        raise AssertionError("the store was not denied")
