"""Real-data readers on tiny files made here, the resize rule, and bad-input handling."""

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from moesaic.config import load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer, make_source
from moesaic.data.sources import DataWarning, to_array
from moesaic.errors import ConfigError, DataError

N = 24


def _cfg(source, paths, *extra):
    base = ["data.vocab_size=300", "data.seq_len=64", "data.batch_size=2"]
    return load_config("tiny", [*base, f"data.source={source}", f"data.paths={paths}", *extra]).data


def _png(i, size=(20, 12), mode="RGB"):
    img = Image.new(mode, size, color=(i * 10 % 255, 80, 200) if mode == "RGB" else i * 10)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _folder(tmp_path, bad=False):
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(N):
        (root / f"{i}.png").write_bytes(_png(i, mode="L" if i % 5 == 0 else "RGB"))
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"a picture number {i}"}))
    if bad:
        (root / "broken.png").write_bytes(_png(1)[:30])  # truncated
        lines += [
            json.dumps({"file": "broken.png", "caption": "broken"}),
            json.dumps({"file": "missing.png", "caption": "gone"}),
            json.dumps({"file": "0.png", "caption": "   "}),
            "{not json",
        ]
    data = "\n".join(lines).encode() + (b"\n\xff\xfe bad bytes\n" if bad else b"\n")
    (root / "captions.jsonl").write_bytes(data)
    return root


def test_resize_rule():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # left strip is cropped away
    x = to_array(wide, 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert np.allclose(x[..., 0], 1.0) and np.allclose(x[..., 2], -1.0)
    grey = to_array(Image.new("L", (4, 4), 255), 16)  # upscaled, converted to RGB
    assert grey.shape == (16, 16, 3) and np.allclose(grey, 1.0)


def test_folder_source_trains_and_evaluates(tmp_path):
    cfg = _cfg("folder", [str(_folder(tmp_path))])
    tok = load_tokenizer(cfg, tmp_path / "cache")
    stream = build_stream(cfg, tok)
    for _ in range(3):
        b = next(stream)
        b.validate()
    assert b.image_mask.any() and stream.skipped == {}
    sets = build_eval_sets(cfg, tok, seed=0, n_batches=1)
    assert set(sets) == {"ood_text", "image", "image_uncond", "caption"}  # no general text here
    for s in sets.values():
        s[0].validate()
    train = make_source(cfg, "train").items
    val = make_source(cfg, "val").items
    assert train and val and not {str(p) for p, _ in train} & {str(p) for p, _ in val}


def test_folder_csv(tmp_path):
    root = tmp_path / "csv"
    root.mkdir()
    rows = ["file,caption"]
    for i in range(N):
        (root / f"{i}.png").write_bytes(_png(i))
        rows.append(f'{i}.png,"caption, number {i}"')
    rows.append("only-one-field")
    (root / "captions.csv").write_text("\n".join(rows))
    cfg = _cfg("folder", [str(root)])
    with pytest.warns(DataWarning, match="captions.csv:26"):
        src = make_source(cfg, "train")
    assert src.skipped == {"malformed_line": 1}
    assert any("caption, number" in cap for _, cap in src.items)


def test_bad_records_are_skipped_and_counted(tmp_path):
    cfg = _cfg("folder", [str(_folder(tmp_path, bad=True))], "data.mix={image_caption: 1}")
    with pytest.warns(DataWarning):
        tok = load_tokenizer(cfg, tmp_path / "cache")
        stream = build_stream(cfg, tok)
        for _ in range(30):  # enough draws to meet the truncated image in train or not
            next(stream).validate()
    skipped = stream.skipped
    assert skipped["missing_file"] == 1 and skipped["empty_caption"] == 1
    assert skipped["malformed_line"] == 1 and skipped["bad_encoding"] == 1
    state = stream.state_dict()
    assert state["skipped"] == skipped
    strict = _cfg("folder", cfg.paths, "data.strict=true")
    with pytest.raises(DataError, match=r"captions.jsonl:\d+: skipped"):
        build_stream(strict, tok)


def test_corrupt_image_is_skipped_mid_stream(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    lines = []
    for i in range(N):
        data = _png(i) if i % 2 else b"\x89PNG not really"
        (root / f"{i}.png").write_bytes(data)
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"picture {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    cfg = _cfg("folder", [str(root)], "data.mix={image: 1}")
    tok = load_tokenizer(_cfg("folder", [str(root)]), tmp_path / "cache")
    with pytest.warns(DataWarning, match="bad image"):
        stream = build_stream(cfg, tok)
        next(stream).validate()
    assert stream.skipped["bad_image"] > 0
    # Which records land in the train split depends on their keys (paths): draw until one of
    # the corrupt half is met.
    strict = build_stream(
        _cfg("folder", [str(root)], "data.mix={image: 1}", "data.strict=true"), tok
    )
    with pytest.raises(DataError, match="bad image"):
        for _ in range(50):
            next(strict)


def test_zero_usable_records_is_a_clear_error(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "captions.jsonl").write_text('{"file": "x.png", "caption": "nothing"}\n')
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no usable records"):
        make_source(_cfg("folder", [str(root)]), "train")
    with pytest.raises(ConfigError, match="needs input files"):
        load_config("tiny", ["data.source=folder"])


def test_text_source(tmp_path):
    txt = tmp_path / "a.txt"
    paras = [f"Paragraph {i} says something about item {i}.\nIt has two lines." for i in range(N)]
    txt.write_bytes("\n\n".join(paras).encode() + b"\n\n\xff\xfe broken\n")
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join([json.dumps({"text": f"json doc {i}"}) for i in range(N)] + ["[1,"]))
    cfg = _cfg("text", [str(txt), str(jl)], "data.mix={text: 1}")
    with pytest.warns(DataWarning, match=r"a.txt:\d+"):
        tok = load_tokenizer(cfg, tmp_path / "cache")
        stream = build_stream(cfg, tok)
    b = next(stream)
    b.validate()
    assert not b.image_mask.any()
    assert stream.skipped == {"bad_encoding": 1, "malformed_line": 1}
    assert "two lines" in tok.decode(b.tokens.flatten().tolist()) or "json doc" in tok.decode(
        b.tokens.flatten().tolist()
    )
    sets = build_eval_sets(cfg, tok, seed=0, n_batches=1)
    assert set(sets) == {"text", "ood_text"}


def test_tar_shards(tmp_path):
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(N):
            for name, data in ((f"{i:04d}.png", _png(i)), (f"{i:04d}.txt", f"shard image {i}")):
                blob = data if isinstance(data, bytes) else data.encode()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        info = tarfile.TarInfo("9999.txt")  # caption without an image
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    cfg = _cfg("webdataset", [str(shard)])
    with pytest.warns(DataWarning, match="no image"):
        tok = load_tokenizer(cfg, tmp_path / "cache")
        stream = build_stream(cfg, tok)
    b = next(stream)
    b.validate()
    assert b.image_mask.any()


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn missing")
def test_digits(tmp_path):
    cfg = _cfg("digits", [])
    tok = load_tokenizer(cfg, tmp_path / "cache")
    b = next(build_stream(cfg, tok))
    b.validate()
    assert b.image_mask.any()


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="datasets missing")
def test_hf_dataset_on_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.open(io.BytesIO(_png(i))) for i in range(N)],
            "caption": [f"hf picture {i}" for i in range(N)],
        }  # fmt: skip
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = _cfg("hf", [str(tmp_path / "hf")])
    tok = load_tokenizer(cfg, tmp_path / "cache")
    b = next(build_stream(cfg, tok))
    b.validate()
    assert b.image_mask.any()
