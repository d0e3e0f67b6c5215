"""The fields every study shares, and how a study is loaded: preset → YAML file → overrides.

A study is a base training config (a preset such as `tiny` plus dotted `overrides` applied to
every run), a number of seeds and how many runs train at once. Each experiment subclasses
`StudyConfig` with its own fields and presets (`compete.py`, `capacity.py`, …). A study YAML
file holds those fields and may name a `preset:` whose values it overrides; on the command line
`study.KEY=VALUE` sets a study field and any other `key=value` is a training-config override
appended to `overrides`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from moesaic.config_tree import from_dict, parse_override, read_yaml
from moesaic.errors import ConfigError, did_you_mean

S = TypeVar("S", bound="StudyConfig")


@dataclasses.dataclass
class StudyConfig:
    name: str = "study"
    base: str = "tiny"  # training preset or YAML path every run starts from
    overrides: list[str] = dataclasses.field(default_factory=list)  # for every run
    seeds: int = 1  # seeds first_seed, first_seed+1, ... (train.seed and data.seed)
    first_seed: int = 0
    jobs: int = 1  # runs trained in parallel processes (results do not depend on it)
    description: str = ""

    def validate(self: S) -> S:
        if not self.name or "/" in self.name:
            raise ConfigError(f"study.name='{self.name}' must be a non-empty name without '/'")
        for key in ("seeds", "jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key}={getattr(self, key)} must be >= 1")
        if self.first_seed < 0:
            raise ConfigError(f"study.first_seed={self.first_seed} must be >= 0")
        return self

    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_study(
    cls: type[S],
    presets: Mapping[str, Mapping[str, Any]],
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> S:
    """Preset → study YAML (which may name `preset:`) → dotted overrides → validated config."""
    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"study file '{config}' does not exist")
        file_data = read_yaml(path, "study file")
        preset = preset or file_data.get("preset")
        file_data.pop("preset", None)
        file_data.pop("experiment", None)
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown study preset '{preset}'{did_you_mean(preset, presets)}")
        data = dict(presets[preset])
    data = {**data, **file_data}
    train_overrides = list(data.get("overrides", []))
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "study":
            if len(keys) < 2:
                raise ConfigError(f"override '{text}' names no study field (study.seeds=3)")
            _set(data, keys[1:], value)
        else:
            train_overrides.append(text)
    data["overrides"] = train_overrides
    return from_dict(cls, data, "study").validate()
