"""What identifies a run's computation: resolved model sizes, the config fingerprint, and the
settings that may change when a run is resumed.

Shared by the trainer (which writes the fingerprint into every checkpoint), the loaders of
`eval`/`sample`/`analyze` (which check it) and the experiments (which reuse finished runs whose
fingerprint matches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from moesaic.config import Config, load_config
from moesaic.errors import CheckpointError, ConfigError

# Keys that may change when a run is resumed; everything else must match the checkpoint.
RESUMABLE_KEYS = (
    "name",
    "out",
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.device",
    "train.threads",
    "train.compile",
    "data.decode_cache",  # the cache returns what a fresh decode gives, bit for bit
    "eval.every",
    "logging",
    "dist",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resumable(key: str) -> bool:
    """Whether the dotted config key may change when a run is resumed."""
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


_ABSENT = "<absent>"


def config_fingerprint(cfg: Config) -> str:
    """Hash of everything that determines the computation (resumable keys excluded).

    Only settings that differ from `Config()`'s defaults enter the hash, so a version of moesaic
    that adds an option (whose default keeps the old behaviour) still recognises, loads and
    reuses runs written before it. A default key missing from a mapping the config replaced
    (e.g. a `data.mix` without one of the default kinds) counts as a difference.
    """
    defaults = _flatten(Config().to_dict())
    flat = _flatten(cfg.to_dict())
    changed = {k: v for k, v in flat.items() if k not in defaults or defaults[k] != v}
    changed.update({k: _ABSENT for k in defaults if k not in flat})
    kept = {k: v for k, v in changed.items() if not resumable(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def resolve_model_dims(cfg: Config, vocab_size: int) -> Config:
    """Fill model.vocab_size / patch_dim from the tokenizer and data, or check they agree."""
    model = cfg.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=vocab_size)
    elif model.vocab_size < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {vocab_size}; "
            "set model.vocab_size=0 to take it from the tokenizer"
        )
    if model.patch_dim == 0:
        model = dataclasses.replace(model, patch_dim=cfg.data.patch_dim)
    elif model.patch_dim != cfg.data.patch_dim:
        raise ConfigError(
            f"model.patch_dim={model.patch_dim} but data patches have {cfg.data.patch_dim} values "
            "(patch_size² · channels); set model.patch_dim=0"
        )
    return dataclasses.replace(cfg, model=model)


def run_dir_for(cfg: Config) -> Path:
    return Path(cfg.out) / cfg.name


def load_run_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config saved in a run directory, with the overrides allowed on resume."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"'{run_dir}' is not a moesaic run directory (no config.yaml)")
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not resumable(key):
            raise ConfigError(
                f"'{key}' cannot change when resuming (it changes the computation); "
                f"changeable: {', '.join(RESUMABLE_KEYS)}"
            )
    return load_config(path, overrides)
