import pytest

from moesaic.config import Config, load_config
from moesaic.config_tree import parse_override
from moesaic.errors import ConfigError


def test_loading_no_file_gives_exactly_the_dataclass_defaults():
    assert load_config() == Config().validate()
    assert load_config(None, ["train.lr=0.5"]) != Config()


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["model.ffn.kind=moe", "model.ffn.experts=16", "train.lr=1e-3"])
    assert cfg.model.ffn.kind == "moe"
    assert cfg.model.ffn.experts == 16
    assert cfg.train.lr == pytest.approx(1e-3)
    assert isinstance(cfg.train.lr, float)


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_dict_override_edits_one_entry():
    default_mix = Config().data.mix
    cfg = load_config(None, ["data.mix.text=0.9"])
    assert cfg.data.mix["text"] == 0.9
    assert {k: v for k, v in cfg.data.mix.items() if k != "text"} == {
        k: v for k, v in default_mix.items() if k != "text"
    }


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.ffn.expert=3", "did you mean 'model.ffn.experts'"),
        ("modle.dim=64", "did you mean 'model'"),
        ("model.ffn.kind=mo", "did you mean 'moe'"),
        ("train.lr=fast", "must be a number"),
        ("train.steps=1.5", "must be an integer"),
        ("model.qk_norm=3", "true or false"),
        ("data.mix.txt=1", "did you mean 'text'"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.ffn.kind=moe", "model.ffn.top_k=9"], "top_k=9"),
        (["model.ffn.kind=moe", "model.ffn.granularity=3"], "not divisible"),
        (["model.ffn.kind=moe", "model.ffn.shared=global"], "no routed expert"),
        (["model.ffn.kind=moe", "model.ffn.groups=modality", "model.ffn.experts=7"], "even"),
        (["model.dim=130", "model.heads=4"], "not divisible"),
        (["data.image_size=18"], "not divisible"),
        (["data.mix={text: 0, image: 0}"], "no positive weight"),
    ],
)
def test_invalid_combinations(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_yaml_base_inheritance_and_errors(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  dim: 64\n  heads: 2\ntrain:\n  steps: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(child)
    assert (cfg.model.dim, cfg.model.heads, cfg.train.steps) == (64, 2, 9)

    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no preset"):
        load_config("no-such-preset")


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["model.ffn.kind=moe", "data.mix.image=0.3"])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=") == (["a"], "")


def test_every_preset_loads():
    from moesaic.config import preset_names

    names = preset_names()
    assert {"tiny", "small", "tiny-moe", "tiny-modality", "tiny-dense"} <= set(names)
    for name in names:
        assert load_config(name).name == name


def test_dispatch_choices():
    for backend in ("auto", "grouped_mm", "split"):
        cfg = load_config(None, ["model.ffn.kind=moe", f"model.ffn.dispatch={backend}"])
        assert cfg.model.ffn.dispatch == backend
    with pytest.raises(ConfigError, match="dispatch='bmm' is not one of"):
        load_config(None, ["model.ffn.kind=moe", "model.ffn.dispatch=bmm"])
