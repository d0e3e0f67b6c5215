"""The config fingerprint: what identifies a run's computation."""

from __future__ import annotations

import dataclasses

from moesaic.config import Config, load_config
from moesaic.runconfig import config_fingerprint


def test_fingerprint_changes_with_the_computation_not_with_resumable_keys():
    cfg = load_config("tiny")
    fp = config_fingerprint(cfg)
    assert config_fingerprint(load_config("tiny", ["train.lr=0.5"])) != fp
    assert config_fingerprint(load_config("tiny", ["train.steps=7", "eval.every=3"])) == fp


def test_a_run_written_before_an_option_existed_keeps_its_fingerprint(monkeypatch):
    """Adding an option whose default keeps the old behaviour must not orphan older runs."""
    import moesaic.runconfig as rc

    cfg = load_config("tiny")
    assert cfg.train.lr == Config().train.lr  # the "new" option is at its default
    now = config_fingerprint(cfg)
    flatten = rc._flatten

    def without_lr(d, prefix=""):  # the same configs, as a version without train.lr saw them
        return {k: v for k, v in flatten(d, prefix).items() if k != "train.lr"}

    monkeypatch.setattr(rc, "_flatten", without_lr)
    assert config_fingerprint(cfg) == now


def test_a_default_key_missing_from_a_replaced_mapping_is_a_difference():
    cfg = load_config("tiny")
    mix = dict(Config().data.mix)
    assert len(mix) > 1
    first = next(iter(mix))
    fewer = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix={first: mix[first]}))
    same = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix=mix))
    assert config_fingerprint(fewer) != config_fingerprint(same)
