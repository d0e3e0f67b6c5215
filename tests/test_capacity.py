"""The capacity experiment: the tax grid at several widths on the engine, and its checks."""

import json

import pytest

from moesaic.cli import main
from moesaic.config import load_config
from moesaic.errors import ConfigError
from moesaic.experiments.capacity import EXPERIMENT, PRESETS, CapacityConfig
from moesaic.experiments.study import load_study


def study(*overrides):
    return load_study(CapacityConfig, PRESETS, None, "smoke", list(overrides))


def test_capacity_smoke_study(tmp_path):
    args = [
        "compete",
        "--experiment",
        "capacity",
        "--preset",
        "smoke",
        "study.widths=[16,32]",
        "--arms",
        "dense",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    root = tmp_path / "capacity-smoke"
    summary = json.loads((root / "summary.json").read_text())
    assert summary["experiment"] == "capacity" and summary["widths"] == [16, 32]
    for width in (16, 32):
        cfg = load_config(root / "runs" / f"dense-joint-d{width}-s0" / "config.yaml")
        assert (cfg.model.dim, cfg.model.heads, cfg.model.ffn.hidden) == (
            width,
            width // 16,
            4 * width,
        )
        run = json.loads((root / "runs" / f"dense-joint-d{width}-s0" / "summary.json").read_text())
        point = next(p for p in summary["curves"]["text/text"]["dense"] if p["width"] == width)
        assert point["params_active"] == run["params_active"]
        assert point["tokens_per_active_param"] == pytest.approx(
            run["data_produced"]["text"] / run["params_active"]
        )
        text = json.loads((root / "runs" / f"dense-text-d{width}-s0" / "summary.json").read_text())
        want = (run["eval"]["text/text"] - text["eval"]["text/text"]) / text["eval"]["text/text"]
        assert point["tax"]["values"] == pytest.approx([100 * want])
    small, big = (summary["curves"]["text/text"]["dense"][i] for i in (0, 1))
    assert small["tokens_per_active_param"] > big["tokens_per_active_param"]
    assert small["knowledge_bits_per_active_param"] is None  # no knowledge base in this world


def test_knowledge_bits_per_parameter(tmp_path):
    from moesaic.data.world.knowledge import bits_per_entity

    args = [
        "compete",
        "--experiment",
        "capacity",
        "--preset",
        "smoke",
        "study.widths=[16]",
        "--arms",
        "dense",
        "--out",
        str(tmp_path),
        "data.knowledge.entities=30",
        "data.knowledge.attributes=2",
        "study.steps=2",
    ]
    assert main(args) == 0
    summary = json.loads((tmp_path / "capacity-smoke" / "summary.json").read_text())
    point = summary["curves"]["text/text"]["dense"][0]
    bits = 30 * bits_per_entity(2)
    assert bits == pytest.approx(30 * (6.643856 + 6.0))  # birth year (100) and home town (64)
    assert point["knowledge_bits_per_active_param"] == pytest.approx(bits / point["params_active"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("study.widths=[]", "study.widths is empty"),
        ("study.widths=[16, 16]", "repeats a width"),
        ("study.widths=[20]", "multiple of study.head_dim=16"),
        ("study.match=bits", "study.match='bits'"),
    ],
)
def test_invalid_capacity_fields(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        study(override)


def test_plan_names_every_width_and_keeps_the_tax_grid(tmp_path):
    specs = EXPERIMENT.plan(study(), tmp_path, print)
    names = {s.name for s in specs}
    assert len(names) == len(specs) == 3 * 2 * 3  # widths × arms × variants, one seed
    assert "moe-joint-d48-s0" in names
    joint = next(s for s in specs if s.name == "moe-joint-d48-s0")
    assert "model.dim=48" in joint.overrides and any("data.parts" in o for o in joint.overrides)
