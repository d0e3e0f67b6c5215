"""Fuzzing the config loader: random YAML bytes, random YAML trees over the real keys, random
dotted overrides. Nothing but `MoesaicError` may escape, and a config that loads is valid and
survives a save → load round trip."""

from __future__ import annotations

import dataclasses
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from moesaic.config import Config, load_config, save_config
from moesaic.errors import ConfigError, MoesaicError
from tests.fuzz_utils import FAST, SLOW


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


KEYS = _keys(Config)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["tiny", "moe", "1e-3", "~"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".extra"),
    st.sampled_from(["data.mix.text", "data.mix.bogus", "base", "model", "data"]),
    st.text(max_size=15),
)


def _load(path_or_name, overrides=()) -> None:
    """Load; a config that loads must validate and round-trip through YAML unchanged."""
    try:
        cfg = load_config(path_or_name, list(overrides))
    except MoesaicError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    cfg.validate()
    with tempfile.TemporaryDirectory() as tmp:
        save_config(cfg, Path(tmp) / "again.yaml")
        assert load_config(Path(tmp) / "again.yaml") == cfg


def _yaml_file(data: bytes) -> Path:
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "c.yaml"
    path.write_bytes(data)
    return path


def yaml_bytes_property(data: bytes) -> None:
    _load(_yaml_file(data))


def yaml_tree_property(tree: dict, base: str | None) -> None:
    nested: dict = {} if base is None else {"base": base}
    for key, value in tree.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            node = nxt if isinstance(nxt, dict) else {}
        node[parts[-1]] = value
    _load(_yaml_file(yaml.safe_dump(nested, allow_unicode=True).encode()))


def overrides_property(pairs: list) -> None:
    texts = [f"{k}={v}" if isinstance(v, str) else f"{k}={yaml.safe_dump(v).strip()}"
             for k, v in pairs]  # fmt: skip
    _load("tiny", texts)


raw_yaml = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b"a: &x [*x]", b"\xff\xfe\x00", b"data: {mix: {text: .nan}}",
                     b"base: base", b"- 1\n- 2", b"train: {lr: .inf}"]),
)  # fmt: skip
trees = st.dictionaries(keys, values, max_size=6)
bases = st.one_of(st.none(), st.sampled_from(["tiny", "c.yaml", "nope", "../../etc/passwd"]))
override_pairs = st.lists(st.tuples(keys, st.one_of(values, st.text(max_size=20))), max_size=5)


@FAST
@given(raw_yaml)
def test_fuzz_yaml_bytes(data):
    yaml_bytes_property(data)


@FAST
@given(trees, bases)
def test_fuzz_yaml_trees(tree, base):
    yaml_tree_property(tree, base)


@FAST
@given(override_pairs)
def test_fuzz_overrides(pairs):
    overrides_property(pairs)


@pytest.mark.slow
@SLOW
@given(raw_yaml, trees, bases, override_pairs)
def test_fuzz_config_long(data, tree, base, pairs):
    yaml_bytes_property(data)
    yaml_tree_property(tree, base)
    overrides_property(pairs)


def test_deep_nesting_and_control_characters_are_one_line_config_errors():
    """Found by the fuzz tests: YAML nested past the recursion limit, non-UTF-8 files, and
    control characters of a value inside the message."""
    deep = _yaml_file(b"[" * 1200)
    with pytest.raises(ConfigError, match="nests lists or mappings too deeply"):
        load_config(deep)
    with pytest.raises(ConfigError, match="must be a number"):
        load_config("tiny", ["train.lr=" + "[" * 1200])  # kept as text, then type-checked
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml_file(b"\x80"))
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ['model.ffn.kind="a\\nb\\x1b"'])
    assert str(e.value) == "model.ffn.kind='a\\nb\\x1b' is not one of dense, modality, moe"
