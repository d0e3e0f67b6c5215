"""The caption-shift study on real data: the readers' `caption` documents, what each
condition's parts draw, the one tokenizer, the shift of real captions, bad study fields, and a
smoke-sized study on `moesaic data example` files end to end."""

import dataclasses
import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from moesaic.batch import DocKind, Modality
from moesaic.cli import main
from moesaic.config import load_config
from moesaic.data import Stream, build_stream, load_tokenizer, open_sources
from moesaic.data.example import write_example
from moesaic.data.packing import DocFactory, DocOptions
from moesaic.data.reading import DataWarning
from moesaic.data.record_source import split_positions
from moesaic.data.shift import caption_shift
from moesaic.data.tokenizer import cached_tokenizer_path
from moesaic.errors import ConfigError
from moesaic.experiments import caption_sources as real
from moesaic.experiments.caption_shift import EXPERIMENT
from moesaic.experiments.caption_study import (
    PRESETS,
    CaptionShiftConfig,
    condition_overrides,
    seed_shift,
)
from moesaic.experiments.engine import base_config, tokenizer_for
from moesaic.experiments.study import load_study
from moesaic.files import cache_dir

MICRO = ["data.seq_len=64", "data.batch_size=4", "data.vocab_size=512"]
CONDITIONS = ["image", "caption", "image_caption", "caption_image"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    paths = dict(write_example(tmp_path_factory.mktemp("example") / "x"))
    if importlib.util.find_spec("datasets") is not None:  # the pictures saved with save_to_disk
        import datasets
        from PIL import Image

        rows = [json.loads(line) for line in (paths["photos"] / "captions.jsonl").open()]
        images = [Image.open(paths["photos"] / r["file"]) for r in rows]
        ds = datasets.Dataset.from_dict({"image": images, "caption": [r["caption"] for r in rows]})
        paths["hf"] = paths["photos"].parent / "hf"
        ds.save_to_disk(str(paths["hf"]))
    return paths


def _needs(reader):
    if reader == "hf" and importlib.util.find_spec("datasets") is None:
        pytest.skip("datasets missing")


def _fields(example, **extra):
    """Study fields: the example's corpus as T, its folder and its shards as two registers."""
    return {
        "text_source": {"kind": "text", "name": "notes", "paths": [str(example["corpus"])]},
        "caption_sources": {
            "photos": {"kind": "folder", "paths": [str(example["photos"])]},
            "shards": {"kind": "webdataset", "paths": [str(example["shards"])]},
        },
        **extra,
    }


def _study(example, *overrides, **extra):
    fields = [f"study.{k}={json.dumps(v)}" for k, v in _fields(example, **extra).items()]
    return load_study(CaptionShiftConfig, PRESETS, None, "smoke", [*fields, *overrides])


def _stream(st, condition, register=None, seed=0):
    cfg = base_config(st, condition_overrides(st, condition, register, seed))
    return cfg, build_stream(cfg.data, tokenizer_for(cfg))


# ----------------------------------------------------------------------- caption documents


@pytest.mark.parametrize("reader", ["folder", "webdataset", "hf"])
def test_reader_caption_documents_are_the_records_captions_alone(example, reader):
    _needs(reader)
    path = example[{"folder": "photos", "webdataset": "shards", "hf": "hf"}[reader]]
    cfg = load_config("tiny", [*MICRO, f"data.source={reader}", f"data.paths=[{path}]"]).data
    tok = load_tokenizer(cfg, cache_dir())
    source = open_sources(cfg, "train")
    assert "caption" in source.kinds
    factory = DocFactory(cfg, tok, source, "train", 0, DocOptions())
    ids = tok.special
    for g in range(12):
        cap, pair = factory("caption", g), factory("image_caption", g)
        assert cap.images == [] and cap.tokens[0] == ids.bos and cap.tokens[-1] == ids.eos
        words = cap.tokens[1:-1].tolist()
        eoi = pair.tokens.tolist().index(ids.eoi)
        assert words and words == pair.tokens[eoi + 1 : -1].tolist()  # the same record's caption
        record = source.members[0].source.record("caption", g, None)
        assert words == tok.encode(record.text)
        # the loss mask is exactly the caption tokens (and eos, as in every text document)
        assert cap.targets[:-1].tolist() == [*words, ids.eos] and cap.targets[-1] == -1
    batch = next(Stream(cfg, tok, source, "train", mix={"caption": 1.0}))
    assert not bool((batch.modality == Modality.IMAGE).any()) and not batch.image_loss.any()
    assert bool((batch.image_id == -1).all())
    for b in range(batch.tokens.shape[0]):  # each document: bos caption eos, all but eos targets
        for d in batch.doc_id[b][batch.doc_kind[b] != DocKind.PAD].unique().tolist():
            pos = (batch.doc_id[b] == d).nonzero().flatten()
            toks, tgts = batch.tokens[b, pos], batch.targets[b, pos]
            assert int(batch.doc_kind[b, pos[0]]) == DocKind.TEXT
            assert tgts[:-1].tolist() == toks[1:].tolist() and tgts[-1] == -1


def test_bad_captions_and_images_are_skipped_and_counted_for_caption_documents(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    good = _png()
    lines = []
    for i in range(30):
        broken = i % 3 == 0
        (root / f"{i}.png").write_bytes(good[:40] if broken else good)
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"picture number {i}"}))
    lines.append(json.dumps({"file": "1.png", "caption": "  "}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config("tiny", [*MICRO, "data.source=folder", f"data.paths=[{root}]"]).data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        tok = load_tokenizer(cfg, cache_dir())
        stream = Stream(cfg, tok, open_sources(cfg, "train"), "train", mix={"caption": 1.0})
        for _ in range(12):  # every train record drawn at least once
            next(stream)
    keys = [str(root / f"{i}.png") for i in range(30)]
    broken_train = [i for i in split_positions(keys, "train") if i % 3 == 0]
    assert stream.skipped == {"empty_caption": 1, "bad_image": len(broken_train)}


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------- runs and their data


def test_registers_are_the_caption_sources(example, tmp_path):
    st = _study(example)
    assert st.registers == ["photos", "shards"]  # the smoke preset's world registers replaced
    assert _study(example, "study.registers=[shards]").registers == ["shards"]
    specs = EXPERIMENT.plan(st, tmp_path, print)
    names = {s.name for s in specs}
    assert {"dense-text-s0", "dense-image-s0", "moe-caption-shards-s0"} <= names


def test_an_hf_dataset_is_a_register(example, tmp_path):
    _needs("hf")
    sources = _fields(example)["caption_sources"]
    sources["hub"] = {"kind": "hf", "paths": [str(example["hf"])]}
    st = _study(example, "study.registers=[hub]", caption_sources=sources)
    assert st.registers == ["hub"]
    assert "moe-caption-hub-s0" in {s.name for s in EXPERIMENT.plan(st, tmp_path, print)}
    for condition in ("caption", "caption_image"):
        cfg, joint = _stream(st, condition, "hub")
        a, b = next(_stream(st, "text")[1]), next(joint)
        B = cfg.data.batch_size
        assert b.shape[0] == 2 * B and torch.equal(b.tokens[:B], a.tokens)  # part 0: T's batch
        assert joint.parts[1].produced_by_source.keys() == {"hub"}
        assert set(joint.parts[1].produced_by_source["hub"]) == {condition}
    assert 0 < seed_shift(st, 0)["hub"]["unigram_js"] < 1


@pytest.mark.parametrize("condition", CONDITIONS)
def test_part_zero_of_every_condition_is_the_reference_runs_batch(example, condition):
    st = _study(example)
    ref_cfg, ref = _stream(st, "text")
    cfg, joint = _stream(st, condition, "shards")
    assert cfg.data.tokenizer == ref_cfg.data.tokenizer != ""  # one tokenizer for the study
    B = cfg.data.batch_size
    for _ in range(3):
        a, b = next(ref), next(joint)
        assert b.shape[0] == 2 * B
        for name, x in a.tensors().items():
            assert torch.equal(getattr(b, name)[:B], x), name
    assert joint.produced["text"] == ref.produced["text"]
    source = "photos" if condition == "image" else "shards"  # T+I: the first caption source
    assert joint.parts[1].produced_by_source.keys() == {source}
    assert set(joint.parts[1].produced_by_source[source]) == {condition}
    assert ref.produced_by_source.keys() == {"notes"}


def test_one_tokenizer_trained_on_the_text_and_every_register_or_the_given_one(example, tmp_path):
    st = _study(example)
    paths = {
        base_config(st, condition_overrides(st, cond, "shards", seed)).data.tokenizer
        for cond in ("text", *CONDITIONS)
        for seed in (0, 1)
    }
    assert len(paths) == 1
    sources = [real.text_source(st)]
    sources += [real.caption_source(st, r, "caption") for r in ("photos", "shards")]
    union = dataclasses.replace(base_config(st).data, sources=sources)
    assert paths == {str(cached_tokenizer_path(union, cache_dir()).absolute())}
    given = tmp_path / "given.json"
    given.write_text(Path(paths.pop()).read_text())
    st = _study(example, f"data.tokenizer={given}")
    for cond in ("text", "caption"):
        cfg = base_config(st, condition_overrides(st, cond, "photos", 0))
        assert cfg.data.tokenizer == str(given)


def test_real_caption_shift_is_register_captions_against_held_out_text(example):
    st = _study(example, "study.shift_docs=100000")  # every record of both splits
    tok = tokenizer_for(base_config(st, condition_overrides(st, "text", None, 0)))
    got = seed_shift(st, 0)
    notes = example["corpus"]
    docs = notes.read_text().strip().split("\n\n")
    val = split_positions([f"{notes}:{2 * i + 1}" for i in range(len(docs))], "val")
    rows = [json.loads(line) for line in (example["photos"] / "captions.jsonl").open()]
    train = split_positions([str(example["photos"] / r["file"]) for r in rows], "train")
    want = caption_shift(
        [tok.encode(rows[i]["caption"]) for i in train], [tok.encode(docs[i]) for i in val]
    )
    assert got["photos"] == pytest.approx(want)
    assert 0 < got["shards"]["unigram_js"] < 1 and seed_shift(st, 1) == got


# ----------------------------------------------------------------------- bad settings


FOLDER = {"kind": "folder", "paths": ["x"]}
BAD_FIELDS = [
    ({"text_source": {}}, "study.text_source is missing"),
    ({"caption_sources": {}}, "study.caption_sources is empty"),
    ({"text_source": FOLDER}, "study.text_source.kind='folder' gives no general text"),
    (
        {"caption_sources": {"alt": {"kind": "text", "paths": ["x"]}}},
        "study.caption_sources.alt.kind='text' gives no captions",
    ),
    ({"caption_sources": {"alt": {"kind": "world"}}}, "study.caption_sources.alt.kind='world'"),
    (
        {"caption_sources": {"alt": {**FOLDER, "mix": {"caption": 1}}}},
        "study.caption_sources.alt.mix is set by the study",
    ),
    ({"caption_sources": {"notes": FOLDER}}, "the register 'notes', the text source's name"),
    ({"image_source": "photoz"}, "study.image_source='photoz' is not one of study.caption_sources"),
]


def _write_study(tmp_path, fields, overrides=()):
    data = {"preset": "smoke", "name": "real", **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return ["compete", "--experiment", "caption-shift", str(path), *overrides]


def _one_line_error(args, tmp_path, capsys, fragment):
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("change, fragment", BAD_FIELDS)
def test_bad_study_fields_stop_with_one_line(example, tmp_path, capsys, change, fragment):
    fields = {**_fields(example), **change}
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_study(CaptionShiftConfig, PRESETS, None, "smoke", [
            f"study.{k}={json.dumps(v)}" for k, v in fields.items()
        ])  # fmt: skip
    _one_line_error(_write_study(tmp_path, fields), tmp_path, capsys, fragment)


def _empty_caption(d):
    (d / "captions.jsonl").write_text('{"file": "a.png", "caption": ""}\n')


@pytest.mark.parametrize(
    "kind, make, fragment",
    [
        ("folder", lambda d: None, "has neither captions.jsonl nor captions.csv; fix"),
        ("folder", _empty_caption, "study.caption_sources.bad (folder) found no usable records"),
        ("webdataset", lambda d: None, "study.caption_sources.bad (webdataset) found no shards"),
    ],
)
def test_a_register_source_without_captions_stops_the_plan(
    example, tmp_path, capsys, kind, make, fragment
):
    bad = tmp_path / "bad"
    bad.mkdir()
    make(bad)
    fields = _fields(example)
    fields["caption_sources"]["bad"] = {"kind": kind, "paths": [str(bad)]}
    _one_line_error(_write_study(tmp_path, fields), tmp_path, capsys, fragment)


def test_the_base_config_may_not_choose_the_data(example, tmp_path, capsys):
    fields = _fields(example)
    for over, given in (
        (["data.source=folder", f"data.paths=[{example['photos']}]"], "data.source='folder':"),
        ([f"data.sources=[{{kind: text, paths: [{example['corpus']}]}}]"], "data.sources:"),
    ):
        args = _write_study(tmp_path, fields, over)
        _one_line_error(args, tmp_path, capsys, f"{given} a caption-shift study sets each run's")


# ----------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    fields = _fields(example, arms=["dense"])
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump({"preset": "smoke", "name": "real-smoke", **fields}))
    args = ["compete", "--experiment", "caption-shift", str(path), "--seeds", "2"]
    assert main([*args, "--out", str(out)]) == 0
    return out / "real-smoke"


def _run(smoke, name):
    return json.loads((smoke / "runs" / name / "summary.json").read_text())


def test_real_smoke_study_is_fair_and_complete(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["registers"] == ["photos", "shards"]
    names = list(summary["runs"])
    assert len(names) == 2 * (2 + 3 * 2)  # seeds x (T, T+I, three conditions per register)
    fair = summary["fairness"]
    assert fair["equal_steps"] is True and fair["equal_text_tokens"] is True
    for name in names:
        seed = name.split("-")[-1]
        ref, run = _run(smoke, f"dense-text-{seed}"), _run(smoke, name)
        assert run["step"] == ref["step"] == 6
        assert run["data_produced"]["text"] == ref["data_produced"]["text"] > 0
        assert run["data_produced_by_source"]["notes"] == ref["data_produced_by_source"]["notes"]
    c = _run(smoke, "dense-caption-shards-s1")["data_produced_by_source"]
    assert set(c) == {"notes", "shards"} and set(c["shards"]) == {"caption"}
    i = _run(smoke, "dense-image-s0")["data_produced_by_source"]
    assert set(i) == {"notes", "photos"} and set(i["photos"]) == {"image"}
    toks = {load_config(smoke / "runs" / n / "config.yaml").data.tokenizer for n in names}
    assert len(toks) == 1
    for r in ("photos", "shards"):
        shift = summary["shift"][r]
        assert 0 < shift["unigram_js"]["mean"] < 1 and 0 < shift["bigram_js"]["mean"] <= 1
        dist = shift["embedding"]["dense"]["values"]
        assert len(dist) == 2 and all(0 <= v <= 2 for v in dist)
    cached = json.loads((smoke / "runs" / "dense-text-s0" / "caption_distance.json").read_text())
    assert cached["sources"]["photos"]["kind"] == "folder"
    assert cached["sources"]["shards"]["mix"] == {"caption": 1.0}


def _documents(batches):
    """Token ids of every document of the batches, without bos and eos."""
    for batch in batches:
        for b in range(batch.tokens.shape[0]):
            for d in batch.doc_id[b][batch.doc_kind[b] != DocKind.PAD].unique().tolist():
                pos = (batch.doc_id[b] == d).nonzero().flatten()
                yield batch.tokens[b, pos][1:-1].tolist()


def test_embedding_distance_is_measured_on_the_registers_captions(smoke, example, monkeypatch):
    from moesaic.experiments import caption_study as cs

    seen = []

    def spy(model, batches, bos_id, device):
        seen.append(batches)
        return mean_hidden(model, batches, bos_id, device)

    mean_hidden = cs._mean_hidden
    monkeypatch.setattr(cs, "_mean_hidden", spy)
    run = smoke / "runs" / "dense-text-s1"
    st = _study(example)
    sources = {"photos": real.caption_source(st, "photos", "caption")}
    got = cs.embedding_distance(run, ["photos"], st.distance_batches, sources)
    cached = json.loads((run / "caption_distance.json").read_text())
    assert got["photos"] == cached["distance"]["photos"]  # what the summary reports
    tok = tokenizer_for(load_config(run / "config.yaml"))
    rows = (example["photos"] / "captions.jsonl").read_text().splitlines()
    captions = {tuple(tok.encode(json.loads(line)["caption"])) for line in rows}
    notes = [tok.encode(p) for p in example["corpus"].read_text().strip().split("\n\n")]
    text_docs, caption_docs = (list(_documents(b)) for b in seen)
    assert caption_docs and all(tuple(d) in captions for d in caption_docs)
    assert text_docs and all(any(n[: len(d)] == d for n in notes) for d in text_docs)
