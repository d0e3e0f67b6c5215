"""Several sources in one run (`data.sources`): lane shares within one document, exact resume,
documents keyed by source name, eval sets per source and from the user's OOD text, bad input."""

import json
import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moesaic.batch import DocKind
from moesaic.config import DataConfig, load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer, open_sources
from moesaic.data.documents import SpecialIds
from moesaic.data.eval_sets import MIN_EVAL_RECORDS
from moesaic.data.mixing import Member, SourceSet
from moesaic.data.packing import Stream
from moesaic.data.reading import DataWarning
from moesaic.data.tokenizer import tokenizer_key, training_corpus
from moesaic.data.world.generators import Record
from moesaic.errors import ConfigError, DataError

KINDS = ("text", "caption_image", "image_caption", "image")


# ------------------------------------------------------------------ data made here


def _corpus(path, n, word):
    """n documents, each naming its word and number so it can be recognised when decoded."""
    path.write_text("\n\n".join(f"{word} document {i} of the {word} corpus." for i in range(n)))
    return path


def _photos(root, n, word="picture"):
    root.mkdir()
    lines = []
    for i in range(n):
        Image.new("RGB", (12, 10), (i * 5 % 255, 90, 160)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a {word} number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return {
        "notes": _corpus(root / "notes.txt", 400, "river"),
        "letters": _corpus(root / "letters.txt", 400, "harbour"),
        "photos": _photos(root / "photos", 400),
        "few": _photos(root / "few", 30, "tiny"),
        "ood": _corpus(root / "ood.txt", 50, "station"),
    }


def _sources(*entries):
    return "data.sources=" + json.dumps(list(entries))


def _cfg(*overrides):
    base = ["data.vocab_size=400", "data.seq_len=64", "data.batch_size=2"]
    return load_config("tiny", [*base, *overrides]).data


def _two(files, *extra, weights=(1.0, 3.0)):
    return _cfg(
        _sources(
            {"kind": "text", "name": "notes", "paths": [str(files["notes"])], "weight": weights[0]},
            {
                "kind": "folder",
                "name": "photos",
                "paths": [str(files["photos"])],
                "weight": weights[1],
            },
        ),  # fmt: skip
        *extra,
    )


@pytest.fixture(scope="module")
def tok(files, tmp_path_factory):
    return load_tokenizer(_two(files), tmp_path_factory.mktemp("tok"))


def _equal(a, b):
    pairs = zip(a.tensors().values(), b.tensors().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


# ------------------------------------------------------------------ the scheduler


class FakeTok:
    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4
    special = SpecialIds(0, 1, 2, 3, 4)

    def encode(self, text: str) -> list[int]:
        return [5] * int(text)


class FakeSource:
    """Documents of `lengths[index % len]` text tokens; images of 2×2 patches."""

    def __init__(self, kinds, lengths):
        self.kinds, self.lengths, self.skipped = kinds, lengths, Counter()

    def record(self, kind, index, rng: random.Random):
        image = np.zeros((8, 8, 3), dtype=np.float32)
        return Record(text=str(self.lengths[index % len(self.lengths)]), images=(image,))


@settings(max_examples=30, deadline=None)
@given(
    sources=st.lists(
        st.tuples(
            st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True),
            st.floats(0.05, 5.0),  # weight
            st.lists(st.integers(0, 40), min_size=1, max_size=5),  # text lengths
            st.booleans(),  # own mix
        ),
        min_size=2,
        max_size=4,
    ),
    run_mix=st.dictionaries(st.sampled_from(KINDS), st.floats(0.05, 1.0), min_size=1),
)
def test_every_lane_stays_within_one_document_of_its_share(sources, run_mix):
    """Target share of (source s, kind k) = weight_s × share_s(k), share_s its own mix or the
    run's restricted to its kinds. After every document drawn, no lane is more than one
    document above its share (it is drawn only when at or below it), and so none is more than
    one document per other lane below it (the deviations sum to zero)."""
    cfg = DataConfig(seq_len=64, batch_size=1, image_size=8, patch_size=4)
    members = []
    for i, (kinds, weight, lengths, own) in enumerate(sources):
        mix = {k: 1.0 + j for j, k in enumerate(kinds)} if own else {}
        members.append(Member(f"s{i}", FakeSource(tuple(kinds), lengths), weight, mix))
    want = {}
    for m in members:
        allowed = {k for k, w in run_mix.items() if w > 0 and k in m.source.kinds}
        raw = {k: w for k, w in (m.mix or run_mix).items() if k in allowed}
        if raw:
            want |= {f"{k}@{m.name}": (m.weight, w / sum(raw.values())) for k, w in raw.items()}
    if not want:
        with pytest.raises(ConfigError, match="any of data.sources"):
            Stream(cfg, FakeTok(), SourceSet(members), mix=run_mix)
        return
    total_w = sum({lane.split("@")[1]: w for lane, (w, _) in want.items()}.values())
    target = {lane: w / total_w * share for lane, (w, share) in want.items()}
    stream = Stream(cfg, FakeTok(), SourceSet(members), mix=run_mix)
    assert stream.weights == pytest.approx(target)
    longest, others = 0, len(target) - 1
    for _ in range(150):
        doc = stream._draw()
        longest = max(longest, len(doc))
        total = sum(stream.lane_tokens.values())
        for lane, share in target.items():
            excess = stream.lane_tokens[lane] - total * share
            assert -others * longest - 1e-6 <= excess <= longest + 1e-6


def test_two_real_sources_mix_at_their_weights_and_resume_exactly(files, tok):
    stream = build_stream(_two(files), tok)
    assert set(stream.weights) == {"text@notes", "caption_image@photos", "image_caption@photos",
                                   "image@photos"}  # fmt: skip
    assert stream.weights["text@notes"] == pytest.approx(0.25)  # 1 / (1 + 3)
    for _ in range(6):
        next(stream).validate()
    by_source = stream.produced_by_source
    total = sum(sum(v.values()) for v in by_source.values())
    assert abs(sum(by_source["notes"].values()) - total / 4) <= 64  # within one document
    assert stream.produced == {
        k: sum(v.get(k, 0) for v in by_source.values()) for k in stream.produced
    }
    stream.sources.by_name["photos"].source.skipped["bad_image"] += 2  # as if met while drawing
    state = json.loads(json.dumps(stream.state_dict()))
    assert set(state["source"]["members"]) == {"notes", "photos"}
    expected = [next(stream) for _ in range(3)]
    resumed = build_stream(_two(files), tok)
    resumed.load_state_dict(state)
    for a in expected:
        assert _equal(a, next(resumed))
    assert resumed.sources.skipped_by_source() == {"photos": {"bad_image": 2}}


def test_documents_are_keyed_by_source_name_not_position(files, tok):
    """Lane (s, k)'s document g is a pure function of (seed, split, s, k, g): adding a source
    or reordering them changes no document; renaming a source changes its documents."""
    a = build_stream(_two(files), tok)
    world = {"kind": "world", "name": "world"}
    photos = {"kind": "folder", "name": "photos", "paths": [str(files["photos"])]}
    notes = {"kind": "text", "name": "notes", "paths": [str(files["notes"])]}
    b = build_stream(_cfg(_sources(world, photos, notes)), tok)
    renamed = build_stream(_cfg(_sources({**photos, "name": "pics"}, notes)), tok)
    for lane in ("text@notes", "caption_image@photos"):
        for g in range(4):
            x, y = a.factory(lane, g), b.factory(lane, g)
            assert np.array_equal(x.tokens, y.tokens)
            pairs = zip(x.images, y.images, strict=True)
            assert all(np.array_equal(i.noise, j.noise) for i, j in pairs)
    x, y = a.factory("caption_image@photos", 0), renamed.factory("caption_image@pics", 0)
    assert not np.array_equal(x.images[0].noise, y.images[0].noise)


def test_one_listed_source_is_not_the_bare_data_source(files, tok):
    """`data.source` keeps its documents (no salt); a named source of `data.sources` differs."""
    legacy = build_stream(_cfg("data.source=text", f"data.paths=[{files['notes']}]"), tok)
    listed = build_stream(_cfg(_sources({"kind": "text", "paths": [str(files["notes"])]})), tok)
    assert list(legacy.weights) == ["text"] and list(listed.weights) == ["text@text"]
    a, b = next(legacy), next(listed)
    assert a.tokens.shape == b.tokens.shape
    assert legacy.state_dict()["source"] == {"bad_records": {}, "skipped_draws": {}}


def test_a_text_only_run_uses_only_the_sources_with_text(files, tok):
    text_only = build_stream(_two(files, "data.mix={text: 1}"), tok)
    assert list(text_only.weights) == ["text@notes"]
    parts = build_stream(
        _two(files, 'data.parts=[{"text": 1}, {"caption_image": 0.75, "image": 0.25}]'), tok
    )
    assert [list(p.weights) for p in parts.parts] == [
        ["text@notes"], ["caption_image@photos", "image@photos"]
    ]  # fmt: skip
    assert parts.parts[1].weights["caption_image@photos"] == pytest.approx(0.75)


def test_a_source_with_its_own_mix(files, tok):
    own = {"kind": "folder", "name": "photos", "paths": [str(files["photos"])],
           "mix": {"image": 1}}  # fmt: skip
    notes = {"kind": "text", "name": "notes", "paths": [str(files["notes"])]}
    stream = build_stream(_cfg(_sources(notes, own)), tok)
    assert stream.weights == pytest.approx({"text@notes": 0.5, "image@photos": 0.5})
    bad = {**own, "mix": {"text": 1}}
    with pytest.raises(ConfigError, match="data.sources 'photos' \\(folder\\): its mix gives"):
        build_stream(_cfg(_sources(notes, bad)), tok)


def test_tokenizer_trains_on_every_source_and_its_key_covers_them(files, tmp_path):
    cfg = _two(files)
    corpus = training_corpus(cfg)
    assert any("river document" in t for t in corpus) and any("picture number" in t for t in corpus)
    notes = tmp_path / "notes.txt"
    notes.write_text(files["notes"].read_text())
    moved = _cfg(
        _sources({"kind": "text", "name": "notes", "paths": [str(notes)]},
                 {"kind": "folder", "name": "photos", "paths": [str(files["photos"])]}),
    )  # fmt: skip
    key = tokenizer_key(moved)
    assert [s["source"] for s in key["sources"]] == ["text", "folder"]
    with open(notes, "a") as f:
        f.write("\n\none more document")
    assert tokenizer_key(moved) != key


# ------------------------------------------------------------------ eval sets


def _docs(batch, tok):
    """The text of every document of a batch (bos / eos / image positions dropped)."""
    out = []
    for row in range(batch.tokens.shape[0]):
        for d in batch.doc_id[row].unique().tolist():
            at = (batch.doc_id[row] == d) & (batch.doc_kind[row] != int(DocKind.PAD))
            if at.any():
                out.append(tok.decode(batch.tokens[row][at].tolist()).strip())
    return out


def test_each_source_evaluates_on_its_held_out_split(files, tok):
    notes = {"kind": "text", "name": "notes", "paths": [str(files["notes"])]}
    letters = {"kind": "text", "name": "letters", "paths": [str(files["letters"])]}
    cfg = _cfg(_sources(notes, letters))
    train = {m.name: set(m.source.texts(10_000)) for m in open_sources(cfg, "train").members}
    val = {m.name: set(m.source.texts(10_000)) for m in open_sources(cfg, "val").members}
    for name in ("notes", "letters"):
        assert len(val[name]) == 20 and not val[name] & train[name]
    sets = build_eval_sets(cfg, tok, seed=3, n_batches=2)
    assert {"text", "text@notes", "text@letters"} <= set(sets)
    for name, allowed in (("text@notes", val["notes"]), ("text@letters", val["letters"]),
                          ("text", val["notes"] | val["letters"])):  # fmt: skip
        docs = [d for b in sets[name] for d in _docs(b, tok)]
        assert docs and set(docs) <= allowed, name
    seen = [d for b in sets["text"] for d in _docs(b, tok)]
    assert any("river" in d for d in seen) and any("harbour" in d for d in seen)
    origin = sets.sources["text"]
    assert [o["source"] for o in origin["from"]] == ["notes", "letters"]
    assert all(o["split"] == "val" and o["records"] == 20 for o in origin["from"])
    assert origin["documents"] == sum(len(_docs(b, tok)) for b in sets["text"])


def test_ood_text_is_the_users_when_given(files, tok):
    cfg = _two(files)
    mine = build_eval_sets(cfg, tok, seed=0, n_batches=1, ood_text=[str(files["ood"])])
    docs = _docs(mine["ood_text"][0], tok)
    assert docs and all(d.startswith("station document") for d in docs)
    assert mine.sources["ood_text"]["from"] == [
        {"source": "eval.ood_text", "reader": "text", "paths": [str(files["ood"])],
         "split": "all", "records": 50}
    ]  # fmt: skip
    world = build_eval_sets(cfg, tok, seed=0, n_batches=1)
    assert not any("station" in d for d in _docs(world["ood_text"][0], tok))
    assert world.sources["ood_text"]["from"][0]["source"] == "the world's OOD generator"
    assert world.sources["ood_text"]["from"][0]["records"] is None


def test_ood_text_paths_that_cannot_be_used_stop_with_one_line(files, tok, tmp_path, monkeypatch):
    cfg = _two(files)
    with pytest.raises(DataError, match="eval.ood_text path '.*nope.txt' does not exist") as e:
        build_eval_sets(cfg, tok, seed=0, n_batches=1, ood_text=[str(tmp_path / "nope.txt")])
    assert "\n" not in str(e.value)
    with monkeypatch.context() as m:  # (the tests may run as root, who reads anything)
        m.setattr("moesaic.data.sources.os.access", lambda path, mode: False)
        with pytest.raises(DataError, match="ood.txt' cannot be read; fix its permissions"):
            build_eval_sets(cfg, tok, seed=0, n_batches=1, ood_text=[str(files["ood"])])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="eval.ood_text found no usable records"):
        build_eval_sets(cfg, tok, seed=0, n_batches=1, ood_text=[str(tmp_path / "empty")])
    with pytest.raises(ConfigError, match="eval.ood_text entry '' is not a path"):
        load_config("tiny", ["eval.ood_text=['']"])


def test_a_small_held_out_split_warns_once_per_source(files, tok):
    few = {"kind": "folder", "name": "few", "paths": [str(files["few"])]}
    notes = {"kind": "text", "name": "notes", "paths": [str(files["notes"])]}
    with pytest.warns(DataWarning) as record:
        sets = build_eval_sets(_cfg(_sources(notes, few)), tok, seed=0, n_batches=1)
    messages = [str(w.message) for w in record if issubclass(w.category, DataWarning)]
    assert len(messages) == 1, messages
    assert "eval sets image, image_uncond, caption: only 2 'val' record(s)" in messages[0]
    assert f"fewer than {MIN_EVAL_RECORDS}" in messages[0] and "'few'" in messages[0]
    assert sets.sources["image"]["from"][0]["records"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # 20 val records each: no warning
        build_eval_sets(_two(files), tok, seed=0, n_batches=1)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("sources", "extra", "message"),
    [
        ([{"kind": "txt", "paths": ["a"]}], [], "data.sources\\[0\\].kind='txt' is not one of"),
        ([{"paths": ["a"]}], [], "data.sources\\[0\\].kind is missing"),
        ([{"kind": "text", "paths": ["a"], "weight": 0}], [], "weight=0.0 must be a finite"),
        ([{"kind": "text", "paths": ["a"], "weight": -1}], [], "weight=-1.0 must be a finite"),
        ("[{kind: text, paths: [a], weight: .nan}]", [], "weight=nan must be"),
        ("[{kind: text, paths: [a], weight: .inf}]", [], "weight=inf must be"),
        (
            [{"kind": "text", "paths": ["a"]}, {"kind": "text", "paths": ["b"]}],
            [],
            "data.sources\\[1\\].name='text' repeats",
        ),
        ([{"kind": "text"}], [], "needs input files"),
        ([{"kind": "world", "paths": ["a"]}], [], "reads no files"),
        ([{"kind": "text", "paths": ["a"], "name": "a/b"}], [], "name='a/b' must be"),
        ([{"kind": "text", "paths": ["a"], "mix": {"txt": 1}}], [], "unknown document kind"),
        ([{"kind": "text", "paths": ["a"], "mix": {"text": 0}}], [], "has no positive weight"),
        (
            [{"kind": "folder", "paths": ["a"], "caption_register": "plain"}],
            [],
            "caption_register applies to kind 'world' only",
        ),
        ([{"kind": "world", "follow_symlinks": True}], [], "follow_symlinks=true has no effect"),
        ([{"kind": "text", "paths": ["a"]}], ["data.source=folder"], "are both given"),
        ([{"kind": "text", "paths": ["a"]}], ["data.paths=[b]"], "are both given"),
    ],
)
def test_bad_sources_stop_with_one_line(sources, extra, message):
    text = sources if isinstance(sources, str) else json.dumps(sources)
    with pytest.raises(ConfigError, match=message) as e:
        load_config("tiny", [f"data.sources={text}", *extra])
    assert "\n" not in str(e.value)


def test_all_weights_zero_stops_at_the_first():
    zero = [{"kind": "text", "name": n, "paths": ["a"], "weight": 0} for n in ("a", "b")]
    with pytest.raises(ConfigError, match="data.sources\\[0\\].weight=0.0 must be"):
        load_config("tiny", [f"data.sources={json.dumps(zero)}"])


def test_sources_that_all_drop_out_stop_with_one_line(files, tok):
    """`data.mix` weighs only kinds no source provides: every source drops out."""
    with pytest.raises(ConfigError, match="no positive weight on a kind that any of") as e:
        build_stream(_two(files, "data.mix={vqa: 1}"), tok)
    assert "notes: text; photos: caption_image" in str(e.value)


def test_train_summary_says_where_each_eval_set_came_from(files, tmp_path):
    from moesaic.cli import main
    from tests.train_utils import MICRO

    args = [*MICRO, _sources({"kind": "text", "name": "notes", "paths": [str(files["notes"])]},
                             {"kind": "folder", "name": "photos",
                              "paths": [str(files["photos"])]}),
            f"eval.ood_text=[{files['ood']}]", "train.steps=2", "eval.every=0",
            f"out={tmp_path}", "name=multi"]  # fmt: skip
    assert main(["train", "tiny", *args]) == 0
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    origins = summary["eval_sources"]
    assert origins["text"]["from"][0]["source"] == "notes"
    assert origins["image"]["from"][0] == {"source": "photos", "reader": "folder",
                                           "paths": [str(files["photos"])], "split": "val",
                                           "records": 20}  # fmt: skip
    assert origins["ood_text"]["from"][0]["source"] == "eval.ood_text"
    produced = summary["data_produced_by_source"]
    assert set(produced) == {"notes", "photos"} and set(produced["notes"]) == {"text"}
    assert summary["data_produced"]["text"] == produced["notes"]["text"]
    rc = main(["eval", str(tmp_path / "multi"), "--batches", "1"])
    assert rc == 0
    result = json.loads((tmp_path / "multi" / "eval.json").read_text())
    assert result["eval_sources"]["ood_text"]["from"][0]["records"] == 50
