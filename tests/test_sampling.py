import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import torch

from moesaic.cli import main
from moesaic.data.packing import DocFactory, DocOptions
from moesaic.data.world import render, sample_scene
from moesaic.data.world.generators import WorldSource
from moesaic.data.world.parser import parse_scenes
from moesaic.data.world.scenes import patchify
from moesaic.errors import ConfigError
from moesaic.evaluate.decoding import TextSampling, pick_tokens
from moesaic.evaluate.sampling import ImageSampling, Sampler, time_grid
from tests.sampling_utils import FlowOracle, micro_run, micro_run_dir

PROMPTS = ["small red circle top left; black background", "a large blue bar in the centre"]


@pytest.fixture(scope="module")
def run():
    return micro_run()


@pytest.fixture(scope="module")
def sampler(run):
    return Sampler.from_run(run)


# ---------------------------------------------------------------------------- images


def test_time_grid_runs_from_noise_to_clean():
    for shift in (1.0, 3.0):
        grid = time_grid(7, shift)
        assert grid[0] == 0.0 and grid[-1] == 1.0 and len(grid) == 8
        assert all(a < b for a, b in itertools.pairwise(grid))
    assert time_grid(4, 1.0) == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert time_grid(4, 3.0)[1] < 0.25  # shifted toward noise: more steps at small t


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_euler_with_an_exact_flow_reaches_the_target(run, prediction, cfg_scale):
    """A model that knows the exact flow toward a rendered scene must generate that scene:
    checks the x_t the model sees, the per-step t, the x0 → velocity conversion and the grid."""
    data = run.cfg.data
    rng = random.Random(3)
    scenes = [sample_scene(rng, "test") for _ in range(3)]
    target = np.stack([patchify(render(s, data.image_size), data.patch_size) for s in scenes])
    oracle = FlowOracle(torch.from_numpy(target), prediction)
    sampler = Sampler(oracle, run.tokenizer, data)
    images = sampler.images(["x", "yy", "zzz"], ImageSampling(steps=6, cfg_scale=cfg_scale))
    assert oracle.calls == 6
    np.testing.assert_allclose(images, np.stack([render(s, data.image_size) for s in scenes]),
                               atol=1e-4)  # fmt: skip
    assert [p.scene for p in parse_scenes(images)] == scenes


def test_image_sampling_is_deterministic_given_a_seed(sampler):
    opts = ImageSampling(steps=3, seed=5)
    a = sampler.images(PROMPTS, opts)
    b = sampler.images(PROMPTS, opts)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.float32
    assert np.array_equal(a, b)
    assert np.abs(a).max() <= 1.0
    c = sampler.images(PROMPTS, ImageSampling(steps=3, seed=6))
    assert not np.allclose(a, c)
    # A prompt's noise does not depend on how prompts are batched.
    one = sampler.images(PROMPTS, ImageSampling(steps=3, seed=5, batch_size=1))
    np.testing.assert_allclose(a, one, atol=1e-5)


def test_guidance_scale_zero_and_one(sampler):
    kw = {"steps": 3, "seed": 1}
    conditional = sampler.images(PROMPTS, ImageSampling(cfg_scale=None, **kw))
    unconditional = sampler.images(["", ""], ImageSampling(cfg_scale=None, **kw))
    np.testing.assert_allclose(
        sampler.images(PROMPTS, ImageSampling(cfg_scale=1.0, **kw)), conditional, atol=1e-5
    )
    np.testing.assert_allclose(
        sampler.images(PROMPTS, ImageSampling(cfg_scale=0.0, **kw)), unconditional, atol=1e-5
    )
    guided = sampler.images(PROMPTS, ImageSampling(cfg_scale=3.0, **kw))
    assert not np.allclose(guided, conditional, atol=1e-6)
    assert not np.allclose(conditional, unconditional, atol=1e-6)


def test_layout_is_the_packers(run, sampler):
    """Prompted and unconditional documents are laid out as the packer lays out caption →
    image documents with and without caption dropout."""
    data = run.cfg.data
    source = WorldSource("val", data.caption_register, data.image_size)
    for dropout in (0.0, 1.0):
        factory = DocFactory(
            data, run.tokenizer, source, "val", 0, DocOptions(caption_dropout=dropout)
        )
        doc = factory("caption_image", 7)
        boi = int(np.flatnonzero(doc.tokens == run.tokenizer.boi_id)[0])
        ours = sampler._image_doc(doc.tokens[1:boi].tolist(), data.patches_per_image)
        assert np.array_equal(ours.tokens, doc.tokens)
        assert ours.images[0].start == doc.images[0].start
        assert (boi == 1) == (dropout == 1.0)


def test_bad_sampling_options_are_config_errors(sampler):
    with pytest.raises(ConfigError, match="steps"):
        sampler.images(PROMPTS, ImageSampling(steps=0))
    with pytest.raises(ConfigError, match="cfg"):
        sampler.images(PROMPTS, ImageSampling(cfg_scale=-1))
    with pytest.raises(ConfigError, match="top-p"):
        sampler.captions(np.zeros((1, 16, 16, 3)), TextSampling(top_p=0))
    with pytest.raises(ConfigError, match="do not fit"):
        sampler.captions(np.zeros((1, 8, 8, 3)))


# ---------------------------------------------------------------------------- text


def test_pick_tokens_greedy_and_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    gen = torch.Generator().manual_seed(0)
    assert pick_tokens(logits, TextSampling(), gen).tolist() == [0, 2]
    assert pick_tokens(logits, TextSampling(temperature=1.0, top_p=1e-6), gen).tolist() == [0, 2]
    draws = torch.stack([pick_tokens(logits, TextSampling(temperature=1.0, top_p=0.6), gen)
                         for _ in range(300)])  # fmt: skip
    assert set(draws[:, 0].tolist()) == {0, 1}  # 0.2 lies outside the 0.6 nucleus
    assert set(draws[:, 1].tolist()) == {2}
    a = [pick_tokens(logits, TextSampling(temperature=1.0), torch.Generator().manual_seed(4))
         for _ in range(2)]  # fmt: skip
    assert torch.equal(a[0], a[1])


def _images(run, n):
    rng = random.Random(0)
    return np.stack([render(sample_scene(rng, "val"), run.cfg.data.image_size) for _ in range(n)])


def test_padding_does_not_leak_into_batched_decoding(run, sampler):
    """Questions of different lengths are right-aligned in one batch; every row decodes as
    it would alone."""
    images = _images(run, 3)
    questions = [
        "What colour is the ring?",
        "Is there a red square?",
        "How many triangles are there?",
    ]
    opts = TextSampling(max_new_tokens=6, use_cache=False)
    together = sampler.answers(images, questions, opts)
    alone = [sampler.answers(images[i : i + 1], questions[i : i + 1], opts)[0] for i in range(3)]
    assert together == alone


def test_text_sampling_is_deterministic_given_a_seed(run, sampler):
    images = _images(run, 2)
    opts = TextSampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3, use_cache=False)
    assert sampler.captions(images, opts) == sampler.captions(images, opts)


def test_cached_and_uncached_greedy_decoding_are_identical(run, sampler):
    images = _images(run, 3)
    kw = {"max_new_tokens": 12}
    cached = sampler.captions(images, TextSampling(use_cache=True, **kw))
    assert cached == sampler.captions(images, TextSampling(use_cache=False, **kw))
    q = ["What colour is the ring?", "Where is the red cross?", "How many objects are there?"]
    assert sampler.answers(images, q, TextSampling(use_cache=True, **kw)) == sampler.answers(
        images, q, TextSampling(use_cache=False, **kw)
    )


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return micro_run_dir(tmp_path_factory.mktemp("runs"))


def test_sample_cli_draws_captions_and_answers(run_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    assert main(["sample", str(run_dir), "--prompt", "a red circle", "--out", str(out),
                 "--steps", "2", "--scale", "4"]) == 0  # fmt: skip
    with Image.open(out) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--image", str(out), "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip("\n").count("\n") == 0
    args = ["--image", str(out), "--question", "How many objects are there?", "--max-tokens", "3"]
    assert main(["sample", str(run_dir), *args, "--temperature", "1", "--top-p", "0.9"]) == 0


def test_read_image_inverts_the_viewing_upscale(tmp_path):
    from moesaic.commands.sample import read_image, write_image

    image = render(sample_scene(random.Random(1), "val"), 16)
    write_image(image, tmp_path / "x.png", 8)
    back = read_image(tmp_path / "x.png", 16)
    assert np.abs(back - image).max() <= 1 / 127.5  # 8-bit rounding only


def test_sample_cli_errors_are_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "not.png").write_text("hello")
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    for name in ("config.yaml", "tokenizer.json"):
        (no_ckpt / name).write_bytes((run_dir / name).read_bytes())
    cases = [
        ([str(run_dir), "--image", str(tmp_path / "missing.png")], "does not exist"),
        ([str(run_dir), "--image", str(tmp_path / "not.png")], "is not an image"),
        ([str(no_ckpt), "--prompt", "a red circle"], "no usable checkpoint"),
        ([str(tmp_path), "--prompt", "a red circle"], "not a moesaic run directory"),
        ([str(run_dir)], "exactly one of --prompt"),
        ([str(run_dir), "--prompt", "x", "--question", "why?"], "--question needs --image"),
        ([str(run_dir), "--prompt", "x", "--steps", "0"], "--steps=0"),
    ]
    for args, fragment in cases:
        assert main(["sample", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    ("suffix", "fmt", "magic"),
    [(".png", "PNG", b"\x89PNG"), (".jpg", "JPEG", b"\xff\xd8"), (".JPEG", "JPEG", b"\xff\xd8"),
     (".webp", "WEBP", b"RIFF"), (".bmp", "BMP", b"BM"), (".tif", "TIFF", b"II")],
)  # fmt: skip
def test_out_is_written_in_the_format_its_suffix_names(tmp_path, suffix, fmt, magic):
    from PIL import Image

    from moesaic.commands.sample import write_image

    image = render(sample_scene(random.Random(1), "val"), 16)
    out = tmp_path / "deeper" / f"s{suffix}"
    write_image(image, out, 2)
    assert out.read_bytes().startswith(magic)
    with Image.open(out) as im:
        assert im.format == fmt and im.size == (32, 32)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_sample_refuses_bad_outputs_and_inputs_in_one_line(run_dir, tmp_path, capsys):
    from tests.image_files import bomb_png

    (tmp_path / "adir.png").mkdir()
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    cases = [
        (["--prompt", "x", "--out", str(tmp_path / "s.xyz")], "has no image suffix"),
        (["--prompt", "x", "--out", str(tmp_path / "noext")], "has no image suffix"),
        (["--prompt", "x", "--out", str(tmp_path / "adir.png")], "is a directory"),
        (["--image", str(tmp_path / "bomb.png")], "downscale it first"),
        (["--image", str(tmp_path)], "is not a file"),
    ]
    for args, fragment in cases:
        assert main(["sample", str(run_dir), *args, "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.png", "bomb.png"]


def test_sample_warns_when_the_run_never_saw_images(run_dir, tmp_path, capsys):
    from moesaic.data.sources import saw_images

    text_only = micro_run_dir(tmp_path / "t", "data.mix={text: 1}")
    out = tmp_path / "s.png"
    args = ["--prompt", "x", "--out", str(out), "--steps", "1", "--scale", "1"]
    assert main(["sample", str(text_only), *args]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "never saw images" in err
    assert main(["sample", str(run_dir), *args]) == 0
    assert capsys.readouterr().err == ""
    cfg = run_dir_config(run_dir)
    assert saw_images(cfg) and not saw_images(dataclasses.replace(cfg, source="text"))
    assert not saw_images(dataclasses.replace(cfg, mix={"text": 1.0, "image": 0.0}))
    assert saw_images(dataclasses.replace(cfg, source="folder", mix={"image": 0.5}))


def run_dir_config(run_dir):
    from moesaic.config import load_config

    return load_config(run_dir / "config.yaml").data


def test_kv_cache_chunks_equal_one_forward(run, sampler):
    """Running packed rows (images, several documents, padding) in chunks against a KV cache
    gives the logits and image outputs of one full forward pass."""
    from moesaic.data import build_stream
    from moesaic.model.transformer import KVCache

    mix = {"caption_image": 1.0, "image_caption": 1.0, "vqa": 1.0, "text": 0.2}
    batch = next(build_stream(dataclasses.replace(run.cfg.data, mix=mix), run.tokenizer, "val"))
    assert batch.image_mask.any() and (batch.doc_id.amax(1) > 0).all()
    img = batch.image_id
    # Chunk boundaries at every position where no image block is cut (bidirectional blocks
    # are run whole), in chunks of varying sizes.
    cuts = [c for c in range(1, 64) if not ((img[:, c - 1] == img[:, c]) & (img[:, c] >= 0)).any()]
    bounds = [0, *cuts[::5], 64]
    assert len(bounds) > 5 and any(hi - lo == 1 for lo, hi in itertools.pairwise(bounds))
    full = run.model(batch)
    cache, logits, image = KVCache(), [], []
    for lo, hi in itertools.pairwise(bounds):
        out = run.model(batch.map(lambda x, lo=lo, hi=hi: x[:, lo:hi]), cache=cache)
        logits.append(out.logits)
        image.append(out.image_pred)
    assert len(cache) == 64
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(image, 1), full.image_pred, atol=1e-5, rtol=1e-5)


def test_bench_sample_writes_its_figures(tmp_path, capsys):
    from tests.train_utils import MICRO

    out = tmp_path / "bench.json"
    args = ["--images", "2", "--captions", "2", "--tokens", "4", "--steps", "2", "--repeats", "1"]
    assert main(["bench", "sample", "tiny", *MICRO, *args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images_per_s"] > 0 and result["decoding"]["4"]["cached_over_uncached"] > 0
    assert "captions, cached" in capsys.readouterr().out
