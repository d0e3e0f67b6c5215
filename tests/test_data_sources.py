"""Real-data readers on tiny files made here, the resize rule, and bad-input handling."""

import codecs
import importlib.util
import io
import json
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from moesaic.config import load_config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer, make_source
from moesaic.data.reading import data_warnings_as_lines
from moesaic.data.sources import CHARS_PER_TOKEN, DataWarning, sample_key, to_array
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
    assert train and val and not {str(r[0]) for r in train} & {str(r[0]) for r in val}


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
    assert any("caption, number" in r[1] for r in src.items)


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
        for i in range(9994, 10000):  # captions without an image
            info = tarfile.TarInfo(f"{i}.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    cfg = _cfg("webdataset", [str(shard)], "data.mix={image: 1}")
    tok = load_tokenizer(cfg, tmp_path / "cache")
    stream = build_stream(cfg, tok)
    train = list(stream.source.samples())  # which samples are train depends on the path
    bad = [key for _, key, members in train if ".png" not in members]
    assert bad  # 6 of 30 samples without an image, 4 held out: some are in train
    with pytest.warns(DataWarning, match="no image"):  # counted when the sample is drawn
        while stream.counters["image"] < 2 * len(train):  # two epochs
            b = next(stream)
            b.validate()
    assert b.image_mask.any()
    assert stream.skipped == {"missing_file": len(bad)}
    assert set(stream.skipped_draws) == {"missing_file"}
    assert stream.skipped_draws["missing_file"] >= 2 * len(bad)  # drawn every epoch


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


# ------------------------------------------------------------------ reading outside the data


def _canary(tmp_path):
    """A file outside every source directory; its content must never be read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(7))
    (outside / "secret.txt").write_text("CANARY the secret text\n")
    return outside


def test_folder_records_stay_inside_their_directory(tmp_path):
    outside = _canary(tmp_path)
    root = _folder(tmp_path)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "alias.png").symlink_to(root / "0.png")  # a symlink that stays inside is fine
    (root / "sub").mkdir()
    hostile = ["../outside/secret.png", str(outside / "secret.png"), "link.png",
               "sub/../../outside/secret.png"]  # fmt: skip
    with open(root / "captions.jsonl", "a") as f:
        for name in [*hostile, "alias.png", "sub/../1.png"]:
            f.write(json.dumps({"file": name, "caption": f"about {name}"}) + "\n")
    cfg = _cfg("folder", [str(root)])
    with pytest.warns(DataWarning, match="outside"):
        src = make_source(cfg, "train")
    assert src.skipped == {"outside_root": 4}
    every = [r for split in ("train", "val", "test") for r in make_source(cfg, split).items]
    assert len(every) == N + 2
    assert all(p.resolve().is_relative_to(root.resolve()) for p, _, _ in every)
    # data.follow_symlinks lets the symlink out, never a name with '..' or an absolute name.
    with pytest.warns(DataWarning):
        follow = [
            r
            for split in ("train", "val", "test")
            for r in make_source(
                _cfg("folder", [str(root)], "data.follow_symlinks=true"), split
            ).items  # fmt: skip
        ]
    assert len(follow) == N + 3
    assert any(p.resolve() == outside / "secret.png" for p, _, _ in follow)


def test_a_file_swapped_for_an_outside_symlink_is_not_read(tmp_path):
    outside = _canary(tmp_path)
    root = _folder(tmp_path)
    cfg = _cfg("folder", [str(root)], "data.mix={image: 1}")
    src = make_source(cfg, "train")
    path = src.items[0][0]
    path.unlink()
    path.symlink_to(outside / "secret.png")
    with pytest.warns(DataWarning, match="no longer inside"):
        assert src.record("image", int(np.argsort(src._perm(0))[0]), None) is None
    assert src.skipped == {"outside_root": 1}


def test_text_directory_skips_symlinks_that_leave_it(tmp_path):
    outside = _canary(tmp_path)
    root = tmp_path / "texts"
    (root / "deep").mkdir(parents=True)
    for i in range(N):
        (root / "deep" / f"{i}.txt").write_text(f"document number {i} of the corpus\n")
    (root / "passwd.txt").symlink_to(outside / "secret.txt")
    (root / "out").symlink_to(outside)  # a directory out
    (root / "deep" / "loop").symlink_to(root)  # a cycle inside: walked once
    (root / "same.txt").symlink_to(root / "deep" / "0.txt")  # inside: read once
    cfg = _cfg("text", [str(root)], "data.mix={text: 1}")
    with pytest.warns(DataWarning, match="symlink out"):
        src = make_source(cfg, "train")
    assert src.skipped == {"outside_root": 2}
    texts = [t for split in ("train", "val", "test") for t in make_source(cfg, split).texts()]
    assert len(texts) == N and not any("CANARY" in t for t in texts)
    followed = make_source(_cfg("text", [str(root)], "data.follow_symlinks=true"), "train")
    assert followed.skipped == {}
    every = [t for s in ("train", "val", "test") for t in make_source(followed.cfg, s).texts()]
    assert sum("CANARY" in t for t in every) == 1  # secret.txt through the directory link once


def test_webdataset_directory_skips_shards_outside(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _shard(root / "a.tar", range(N))
    (tmp_path / "elsewhere.tar").write_bytes((root / "a.tar").read_bytes())
    (root / "b.tar").symlink_to(tmp_path / "elsewhere.tar")
    with pytest.warns(DataWarning, match="symlink out"):
        src = make_source(_cfg("webdataset", [str(root)]), "train")
    assert src.skipped == {"outside_root": 1}
    assert {shard.name for shard in src.shards} == {"a.tar"}


def test_follow_symlinks_option(tmp_path):
    assert load_config("tiny").data.follow_symlinks is False
    with pytest.raises(ConfigError, match="follow_symlinks=true has no effect"):
        load_config("tiny", ["data.follow_symlinks=true"])
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config("tiny", ["data.source=text", "data.paths=[x]", "data.follow_symlinks=3"])


# ------------------------------------------------------------------ encodings and keys


def _shard(path, indices, prefix=""):
    with tarfile.open(path, "w") as tar:
        for i in indices:
            for name, blob in ((f"{i:04d}.png", _png(i)), (f"{i:04d}.txt", b"shard image %d" % i)):
                info = tarfile.TarInfo(prefix + name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path


PARAS = [f"Paragraph {i} über item {i}.\nSecond line." for i in range(N)]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_text_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    f = tmp_path / "a.txt"
    data = "\r\n\r\n".join(PARAS).encode(encoding)
    if encoding == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data
    f.write_bytes(data)
    cfg = _cfg("text", [str(f)])
    texts = sorted(t for s in ("train", "val", "test") for t in make_source(cfg, s).texts())
    assert texts == sorted(p.replace("\n", " ") for p in PARAS)


def test_undecodable_text_files_are_skipped_whole_and_counted_once(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(PARAS))
    no_bom = tmp_path / "no_bom.txt"
    no_bom.write_bytes("\n\n".join(PARAS).encode("utf-16-le"))  # NULs between letters
    broken = tmp_path / "broken.jsonl"  # a BOM, then an odd number of bytes
    broken.write_bytes(codecs.BOM_UTF16_LE + json.dumps({"text": "fine"}).encode("utf-16-le")
                       + b"\n\x00x")  # fmt: skip
    cfg = _cfg("text", [str(good), str(no_bom), str(broken)])
    with pytest.warns(DataWarning, match="NUL"):
        src = make_source(cfg, "train")
    assert src.skipped == {"bad_encoding": 2}
    every = [t for s in ("train", "val", "test") for t in make_source(cfg, s).texts()]
    assert len(every) == N and not any("\x00" in t for t in every)


def test_long_lines_are_read_in_bounded_pieces(tmp_path, monkeypatch):
    from moesaic.data import reading

    monkeypatch.setattr(reading, "BLOCK", 7)  # lines, CRLF and UTF-8 cut across blocks
    f = tmp_path / "long.txt"
    text = "é" * 10_000 + "\r\n" + "short\r\rafter\n"
    f.write_bytes(text.encode())
    lines = list(reading.read_lines(f, max_chars=100))
    assert [(ln.number, ln.text, ln.length) for ln in lines] == [
        (1, "é" * 100, 10_000), (2, "short", 5), (3, "", 0), (4, "after", 5)
    ]  # fmt: skip
    cfg = _cfg("text", [str(f)])  # data.seq_len=64: a document keeps 64 × 32 characters
    docs = make_source(cfg, "train").texts()  # two records: all in train
    assert sorted(map(len, docs)) == [5, 64 * CHARS_PER_TOKEN]


def test_webdataset_keys_follow_the_webdataset_rule(tmp_path):
    assert sample_key("./0001.png") == ("0001", "png")
    assert sample_key("./a.b/c.d.PNG") == ("a.b/c", "d.png")
    assert sample_key("dir/x.txt") == ("dir/x", "txt")
    assert sample_key("./.hidden") is None and sample_key("noext") is None
    src_dir = tmp_path / "made_with_tar_C"
    src_dir.mkdir()
    for i in range(N):
        (src_dir / f"{i:04d}.png").write_bytes(_png(i))
        (src_dir / f"{i:04d}.txt").write_text(f"shard image {i}")
    shard = tmp_path / "x.tar"
    with tarfile.open(shard, "w") as tar:  # what `tar -cf x.tar -C dir .` writes
        tar.add(src_dir, arcname=".")
    cfg = _cfg("webdataset", [str(shard)])
    every = [r for s in ("train", "val", "test") for r in make_source(cfg, s).samples()]
    assert len(every) == N
    assert all(m[".png"].name.startswith("./") for _, _, m in every)
    captions = [c for s in ("train", "val", "test") for c in make_source(cfg, s).texts()]
    assert len(captions) == N and all(c.startswith("shard image") for c in captions)


# ------------------------------------------------------------------ measured and noisy


def _half_corrupt(tmp_path, n_bad=3):
    root = tmp_path / "c"
    root.mkdir()
    lines = []
    for i in range(N):
        (root / f"{i}.png").write_bytes(_png(i)[:40] if i < n_bad else _png(i))
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"picture {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    return root


def test_a_bad_record_is_counted_once_however_often_it_is_drawn(tmp_path):
    root = _half_corrupt(tmp_path)
    cfg = _cfg("folder", [str(root)], "data.mix={image: 1}")
    tok = load_tokenizer(cfg, tmp_path / "cache")
    stream = build_stream(cfg, tok)
    bad_in_train = sum(p.name in ("0.png", "1.png", "2.png") for p, _, _ in stream.source.items)
    assert bad_in_train > 0
    with pytest.warns(DataWarning, match="bad image"):
        for _ in range(12):  # several epochs of the train split
            next(stream)
    assert stream.skipped == {"bad_image": bad_in_train}
    assert stream.skipped_draws["bad_image"] > bad_in_train
    # Resumed: the same records are known bad, not counted again.
    resumed = build_stream(cfg, tok)
    resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        for _ in range(12):
            next(resumed)
    assert resumed.skipped == {"bad_image": bad_in_train}
    assert resumed.skipped_draws["bad_image"] > stream.skipped_draws["bad_image"]


def test_skipped_records_print_one_clean_line_each(tmp_path, capsys):
    cfg = _cfg("folder", [str(_folder(tmp_path, bad=True))])
    others = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: others.append(str(message))
        with data_warnings_as_lines():
            make_source(cfg, "train")
            warnings.warn("another warning", UserWarning, stacklevel=1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(ln.startswith("warning: ") for ln in err)
    assert all("captions.jsonl:" in ln and "skipped" in ln for ln in err)
    assert not any("sources.py" in ln or "warnings.warn" in ln for ln in err)
    assert others == ["another warning"]  # other warnings go where they went before


def test_control_characters_in_names_are_escaped(tmp_path):
    root = _folder(tmp_path)
    with open(root / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "evil\x1b[2J\nname.png", "caption": "x"}) + "\n")
    with pytest.warns(DataWarning) as record:
        make_source(_cfg("folder", [str(root)]), "train")
    (msg,) = [str(w.message) for w in record]
    assert "\x1b" not in msg and "\n" not in msg and "\\x1b[2J\\nname.png" in msg


def test_train_command_prints_skips_as_one_line_each(tmp_path, capsys):
    from moesaic.cli import main
    from tests.train_utils import MICRO

    root = _folder(tmp_path)
    with open(root / "captions.jsonl", "a") as f:  # problems met while listing the folder
        f.write('{"file": "missing.png", "caption": "gone"}\n{not json\n')
    args = [*MICRO, "data.source=folder", f"data.paths=[{root}]", "train.steps=1",
            "eval.every=0", f"out={tmp_path / 'runs'}", "name=skips"]  # fmt: skip
    rc = main(["train", "tiny", *args])
    err = capsys.readouterr().err
    assert rc == 0, err
    warned = [ln for ln in err.splitlines() if "skipped (" in ln]
    assert len(warned) == 2 and all(ln.startswith("warning: ") for ln in warned)
    assert not any("sources.py" in ln or "DataWarning" in ln for ln in warned)


def test_hf_file_references_stay_inside_the_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    outside = _canary(tmp_path)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(i), "path": None} for i in range(N)],
         "caption": [f"hf picture {i}" for i in range(N)]},
        features=features,
    )  # fmt: skip
    ds.save_to_disk(str(tmp_path / "hf"))
    src = make_source(_cfg("hf", [str(tmp_path / "hf")]), "train")
    # A cell that refers to a file instead of holding bytes (save_to_disk embeds files, so
    # the stored column is replaced here).
    src.ds = [{"image": {"bytes": None, "path": str(outside / "secret.png")}}] * N
    with pytest.warns(DataWarning, match="outside root"):
        assert src.record("image", 0, None) is None
    assert src.skipped == {"outside_root": 1}


def test_a_split_of_only_bad_records_is_a_clear_error(tmp_path):
    root = _half_corrupt(tmp_path, n_bad=N)
    cfg = _cfg("folder", [str(root)], "data.mix={image: 1}")
    tok = load_tokenizer(cfg, tmp_path / "cache")
    stream = build_stream(cfg, tok)
    with pytest.warns(DataWarning), pytest.raises(DataError, match=r"every one of the \d+ 'train'"):
        next(stream)
    assert stream.skipped_draws["bad_image"] == len(stream.source.items)
