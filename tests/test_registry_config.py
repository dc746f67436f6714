"""Registry and typed configs: build from dict/YAML, good errors, round trips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import attnzoo
from attnzoo.config import ConfigError, dump_config, load_config
from attnzoo.registry import get, unregister


@pytest.fixture
def toy():
    @attnzoo.register("selector", "toy_selector")
    @dataclass
    class Toy:
        plan_kind: ClassVar[str] = "block"
        threshold: float = 0.9
        stride: int = 8
        per_kv_head: bool = False
        heads: tuple[int, ...] = ()
        mode: str | None = None

        def __post_init__(self):
            if not 0 < self.threshold <= 1:
                raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")

        def __call__(self, q, k, ctx=None):  # pragma: no cover (only built, never run)
            raise NotImplementedError

    yield Toy
    unregister("selector", "toy_selector")


def test_create_from_dict_yaml_and_name(toy):
    s = attnzoo.create("selector", {"name": "toy_selector", "threshold": 1, "heads": [1, 2]})
    assert isinstance(s, toy) and s.threshold == 1.0 and isinstance(s.threshold, float)
    assert s.heads == (1, 2)
    assert attnzoo.create("selector", "toy_selector").stride == 8
    cfg = load_config("name: toy_selector\nstride: 16\n")
    assert attnzoo.create("selector", cfg).stride == 16
    assert attnzoo.create("selector", s) is s
    assert "toy_selector" in attnzoo.available("selector")


def test_round_trip_through_yaml(toy, tmp_path):
    s = attnzoo.create("selector", {"name": "toy_selector", "threshold": 0.5, "mode": "x"})
    text = dump_config(attnzoo.to_config(s))
    path = tmp_path / "sel.yaml"
    path.write_text(text)
    again = attnzoo.create("selector", load_config(str(path)))
    assert again == s


@pytest.mark.parametrize("spec,exc,match", [
    ({"name": "toy_selectr"}, ConfigError, r"unknown selector 'toy_selectr' \(did you mean 'toy_selector'\?\)"),
    ({"name": "toy_selector", "thresold": 0.5}, ConfigError, r"thresold: unknown key .*did you mean 'threshold'"),
    ({"name": "toy_selector", "stride": 2.5}, ConfigError, "stride: expected an integer"),
    ({"name": "toy_selector", "stride": True}, ConfigError, "stride: expected an integer"),
    ({"name": "toy_selector", "per_kv_head": "yes"}, ConfigError, "per_kv_head: expected true/false"),
    ({"name": "toy_selector", "heads": [1, "a"]}, ConfigError, r"heads\[1\]: expected an integer"),
    ({"name": "toy_selector", "threshold": 1.5}, ValueError, "threshold must lie in"),
    ({"threshold": 0.5}, ConfigError, "missing 'name'"),
    (42, ConfigError, "expected a name or a mapping"),
])
def test_create_errors(toy, spec, exc, match):
    with pytest.raises(exc, match=match):
        attnzoo.create("selector", spec)


def test_nested_path_in_errors(toy):
    with pytest.raises(ConfigError, match=r"^layers\.15-28\.selector\.thresold: unknown key"):
        attnzoo.create("selector", {"name": "toy_selector", "thresold": 1}, path="layers.15-28.selector")


def test_register_requires_dataclass_and_known_kind():
    with pytest.raises(ValueError, match="unknown component kind 'selectr'"):
        attnzoo.register("selectr", "x")
    with pytest.raises(TypeError, match="needs a dataclass"):
        attnzoo.register("selector", "plain")(type("Plain", (), {}))


def test_incomplete_components_are_rejected_at_registration():
    """Each kind's declared contract (attnzoo.contracts): the error names every missing attribute."""
    @dataclass
    class NoKind:
        def __call__(self, q, k, ctx=None):
            return None

    with pytest.raises(TypeError, match=r"missing 'plan_kind'"):
        attnzoo.register("selector", "no_kind")(NoKind)

    @dataclass
    class WrongKind:
        plan_kind: ClassVar[str] = "blocks"

    both = r"missing '__call__'.*'plan_kind' must be one of \['block', 'token', 'dense'\]"
    with pytest.raises(TypeError, match=both):
        attnzoo.register("selector", "wrong_kind")(WrongKind)

    @dataclass
    class Router:
        def __call__(self, q, k, ctx, labels):
            return None

    with pytest.raises(TypeError, match=r"missing 'needs_pre_rope_keys' \(a bool\); missing 'check_labels'"):
        attnzoo.register("router", "half_router")(Router)

    @dataclass
    class Op:
        plan_kinds = ("block", "mask")

        def __call__(self, q, k, v, plan, **kw):
            return None

    with pytest.raises(TypeError, match=r"'plan_kinds' must be a non-empty tuple"):
        attnzoo.register("op", "bad_op")(Op)
    for kind, name in (("selector", "no_kind"), ("selector", "wrong_kind"), ("router", "half_router"),
                       ("op", "bad_op")):
        assert name not in attnzoo.available(kind)


def test_optional_declarations_get_their_defaults(toy):
    assert toy.decode == "dense"  # written at registration: the stack reads it directly
    assert get("selector", "streaming").decode == "plan"
    assert get("router", "elastic").check_num_layers is None
    assert callable(get("router", "table").check_num_layers)


def test_ops_are_registered_components():
    assert {"dense", "block_sparse", "token_sparse"} <= set(attnzoo.available("op"))
    op = attnzoo.create("op", {"name": "dense", "backend": "sdpa"})
    assert get("op", "dense") is type(op)
    with pytest.raises(ConfigError, match="expected str or null"):
        attnzoo.create("op", {"name": "dense", "backend": 3})


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config("- a\n- b\n")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("preset:does-not-exist")
    with pytest.raises(TypeError):
        load_config(3)
    p = tmp_path / "c.json"
    p.write_text('{"name": "dense"}')
    assert load_config(str(p)) == {"name": "dense"}


def test_optional_selector_capabilities_are_declared_with_defaults():
    """A selector that declares neither a fixed block size nor a range rule gets None for both at
    registration, and the stack reads them directly: such a selector runs per branch, not in a
    mixed launch (a wrongly typed declaration is rejected)."""
    from attnzoo.stack import head_mode

    @dataclass
    class Minimal:
        plan_kind: ClassVar[str] = "block"

        def __call__(self, q, k, ctx=None):
            return None

    try:
        attnzoo.register("selector", "minimal_caps")(Minimal)
        assert Minimal.block_size is None and Minimal.ranges is None and Minimal.decode == "dense"
        node = attnzoo.build({"default": {"selector": {"name": "minimal_caps"}, "op": "block_sparse"}}).default
        assert head_mode(node) is None
        stream = attnzoo.build({"default": {"selector": {"name": "streaming", "sink": 16, "local": 32,
                                                         "block_size": 16}, "op": "block_sparse"}}).default
        assert head_mode(stream).kind == "streaming"
    finally:
        attnzoo.registry.unregister("selector", "minimal_caps")

    @dataclass
    class BadSize:
        plan_kind: ClassVar[str] = "block"
        block_size: ClassVar[str] = "64"

        def __call__(self, q, k, ctx=None):
            return None

    with pytest.raises(TypeError, match=r"'block_size' must be an int or None"):
        attnzoo.register("selector", "bad_size")(BadSize)
