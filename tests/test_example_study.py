"""The worked example end to end: `moesaic data example DIR`, the modality-tax study on the
user's text corpus (text side) and image–caption folder (image side), a run on the WebDataset
copy of the pictures, and `bench data`'s real-image row."""

import json

import pytest

from moesaic.cli import main
from moesaic.data.eval_sets import MIN_EVAL_RECORDS
from tests.train_utils import MICRO


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("example") / "ex"
    assert main(["data", "example", str(root)]) == 0
    return root


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_example_refuses_a_directory_in_use(example, capsys):
    assert main(["data", "example", str(example)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: '{example}' exists and is not an empty directory; give a new one"]


def test_the_study_runs_on_the_users_text_and_images(example, tmp_path):
    out = tmp_path / "runs"
    rc = main(["compete", str(example / "study.yaml"), "study.analyze=false", "--out", str(out),
               "--arms", "dense"])  # fmt: skip
    assert rc == 0
    runs = out / "compete-example" / "runs"
    text, image, joint = (_summary(runs / f"dense-{v}-s0") for v in ("text", "image", "joint"))
    assert text["data_produced_by_source"].keys() == {"notes"}
    assert image["data_produced_by_source"].keys() == {"photos"}
    assert set(image["data_produced_by_source"]["photos"]) == {"caption_image", "image"}
    for name in ("notes", "photos"):  # the joint run draws exactly the unimodal runs' data
        want = {**text["data_produced_by_source"], **image["data_produced_by_source"]}[name]
        assert joint["data_produced_by_source"][name] == want
    origins = joint["eval_sources"]
    assert origins["text"]["from"][0]["source"] == "notes"
    assert origins["image"]["from"][0]["source"] == "photos"
    assert origins["ood_text"]["from"][0]["source"] == "eval.ood_text"
    for name in ("text", "image", "caption"):
        assert origins[name]["from"][0]["records"] >= MIN_EVAL_RECORDS
    study = _summary(out / "compete-example")
    assert study["fairness"]["equal_tokens"] is True
    metrics = study["arms"]["dense"]["metrics"]
    assert {"text/text", "ood_text/text", "image/image"} <= set(metrics)
    shift = study["data"]["caption_shift"]  # the example's captions against its corpus
    assert 0 < shift["unigram_js"] <= 1


def test_a_run_on_the_webdataset_copy(example, tmp_path):
    args = [*MICRO, "train.steps=2", "eval.every=0", f"out={tmp_path}", "name=shards"]
    assert main(["train", str(example / "train-shards.yaml"), *args]) == 0
    summary = _summary(tmp_path / "shards")
    produced = summary["data_produced_by_source"]
    assert set(produced) == {"notes", "photos"} and produced["photos"]["caption_image"] > 0
    image = summary["eval_sources"]["image"]["from"][0]
    assert image["reader"] == "webdataset" and image["paths"][0].endswith("{000..003}.tar")


def test_bench_data_real_image_row(tmp_path):
    path = tmp_path / "bench.json"
    rc = main(["bench", "data", "tiny", "data.seq_len=64", "--seconds", "0.05", "--photos", "2",
               "--photo-size", "1600x1200", "--train-steps", "1", "--json", str(path)])  # fmt: skip
    assert rc == 0
    real = json.loads(path.read_text())["real_images"]
    assert real["cache_hits"]["uncached"] == 0 and real["cache_hits"]["cached"] > 0
    train = real["training_tokens_per_s"]
    for name, rate in real["tokens_per_s"].items():
        assert real["ratio_to_training"][name] == pytest.approx(rate / train)
    assert real["photo_size"] == [1600, 1200]
