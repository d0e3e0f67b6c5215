"""`moesaic bench data`: tokens per second of the data stream (generate + tokenize + pack).

Measured on one core (torch and tokenizers limited to one thread) for the configured mix and
for each document kind alone; the video kinds also with the other `data.video.context` (clean
context documents hold 2..T frames of a T-frame clip, diffusion-forcing ones all T). The
reference, measured in the same process, is the cost of only copying already-made documents
into Batches (`pack_rows`): the ratio says how much of the stream's time goes into making
documents. The target is 10× the tiny preset's CPU training
throughput (≈ 100k tokens/s), so data never bottlenecks training.

Real images (`--photos N`, 0 to skip): N JPEG photos of `--photo-size` (4000×3000) are made
with Pillow in a temporary directory and read as an image–caption folder (`caption_image`
0.75, `image` 0.25, one row per batch) — decoded, oriented, converted and resized on every
draw (`data.decode_cache=false`), and through the decode cache once it holds every photo (in
a temporary cache directory). Both rates are set against the training step's consumption:
tokens/s of the `tiny` preset's real training step (`Trainer.train_step`, world data, one
thread), measured in this process for `--train-steps` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moesaic.config import MIX_KEYS, VIDEO_KINDS, load_config
from moesaic.data import build_stream, load_tokenizer
from moesaic.data.packing import pack_rows
from moesaic.errors import ConfigError

TARGET_TOKENS_PER_S = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="tiny", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--photos", type=int, default=6, help="real JPEG photos made (0: no row)")
    p.add_argument("--photo-size", default="4000x3000", help="WIDTHxHEIGHT of the photos")
    p.add_argument("--train-steps", type=int, default=5, help="tiny training steps timed")


def _rate(fn, seconds: float, tokens_per_call: int) -> float:
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * tokens_per_call / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    data = cfg.data
    with tempfile.TemporaryDirectory() as cache:
        tok = load_tokenizer(data, cache)
    per_batch = data.batch_size * data.seq_len
    rows = []
    stream = build_stream(data, tok)
    mixed = _rate(lambda: next(stream), args.seconds, per_batch)
    held = [[stream._row() for _ in range(data.batch_size)] for _ in range(16)]
    it = iter(range(1 << 62))
    ref = _rate(lambda: pack_rows(held[next(it) % 16], data, tok.pad_id), args.seconds, per_batch)
    rows.append(("mix " + ",".join(f"{k}={v:g}" for k, v in data.mix.items()), mixed))
    other = "noised" if data.video.context == "clean" else "clean"
    kinds = [(k, []) for k in MIX_KEYS]
    kinds += [(f"{k} (context={other})", [f"data.video.context={other}"]) for k in VIDEO_KINDS]
    for name, extra in kinds:
        kind = name.split()[0]
        over = [*args.overrides, f"data.mix={{{kind}: 1}}", *extra]
        s = build_stream(load_config(args.config, over).data, tok)
        rows.append((name, _rate(lambda s=s: next(s), args.seconds / 2, per_batch)))
    print(f"data stream, one core: batch {data.batch_size} × seq_len {data.seq_len}, "
          f"image {data.image_size}px / patch {data.patch_size}")  # fmt: skip
    print(f"{'stream':<60} {'tokens/s':>12} {'/ pack-only':>12} {'/ target':>9}")
    for name, rate in rows:
        print(f"{name:<60} {rate:>12,.0f} {rate / ref:>12.3f} {rate / TARGET_TOKENS_PER_S:>9.2f}")
    print(f"{'reference: pack_rows of ready documents':<60} {ref:>12,.0f} {1.0:>12.3f}")
    result = {
        "config": args.config,
        "batch_size": data.batch_size,
        "seq_len": data.seq_len,
        "tokens_per_s": mixed,
        "pack_only_tokens_per_s": ref,
        "ratio_to_pack_only": mixed / ref,
        "ratio_to_target": mixed / TARGET_TOKENS_PER_S,
        "per_kind_tokens_per_s": {name: rate for name, rate in rows[1:]},
    }
    if args.photos > 0:
        result["real_images"] = real_image_rows(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------- real images


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise ConfigError(f"--photo-size={text!r} must look like WIDTHxHEIGHT, e.g. 4000x3000")
    return w, h


def make_photos(root: Path, n: int, width: int, height: int) -> Path:
    """`n` JPEG photos (smooth random colour fields, quality 90) and their captions.jsonl."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        img.save(root / f"photo{i}.jpg", quality=90)
        lines.append(json.dumps({"file": f"photo{i}.jpg", "caption": f"a photograph number {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _train_rate(steps: int, cache: Path) -> float:
    """Tokens/s of the tiny preset's training step (world data) in this process."""
    from moesaic.train.loop import Trainer

    over = [f"out={cache / 'runs'}", "train.checkpoint_every=0", "eval.every=0",
            "logging.progress=none", "train.threads=1", "train.device=cpu"]  # fmt: skip
    trainer = Trainer(load_config("tiny", over))
    try:
        trainer.train_step()  # warm-up
        tokens, t0 = trainer.tokens_seen, time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return (trainer.tokens_seen - tokens) / (time.perf_counter() - t0)
    finally:
        trainer.close()


def real_image_rows(args: argparse.Namespace) -> dict:
    """Uncached and cached stream rates on generated photos, against tiny training (doc)."""
    width, height = _size(args.photo_size)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", args.photos, width, height)
        over = [*args.overrides, "data.source=folder", f"data.paths=[{photos}]",
                "data.mix={caption_image: 0.75, image: 0.25}", "data.batch_size=1"]  # fmt: skip
        previous = os.environ.get("MOESAIC_CACHE")
        os.environ["MOESAIC_CACHE"] = str(Path(tmp) / "cache")
        try:
            data = load_config(args.config, over).data
            tok = load_tokenizer(data, Path(tmp) / "cache")
            per_batch = data.batch_size * data.seq_len
            rates, hits = {}, {}
            for name, cached in (("uncached", False), ("cached", True)):
                cfg = dataclasses.replace(data, decode_cache=cached)
                stream = build_stream(cfg, tok)
                if cached:  # fill the cache: every train photo drawn at least once
                    while stream.source.decode_cache.misses < len(stream.source.items):
                        next(stream)
                rates[name] = _rate(lambda s=stream: next(s), args.seconds, per_batch)
                cache = stream.source.decode_cache
                hits[name] = cache.hits if cache is not None else 0
            train = _train_rate(args.train_steps, Path(tmp))
        finally:
            if previous is None:
                os.environ.pop("MOESAIC_CACHE", None)
            else:
                os.environ["MOESAIC_CACHE"] = previous
    print(f"\nreal images: {args.photos} JPEG photos {width}×{height} → {data.image_size}px, "
          f"caption_image 0.75 + image 0.25, 1 row × {data.seq_len}")  # fmt: skip
    print(f"{'stream':<60} {'tokens/s':>12} {'/ training':>12}")
    steps = {"uncached": "decode + resize + pack", "cached": "cache read + pack"}
    for name, rate in rates.items():
        label = f"folder of photos, {name} ({steps[name]})"
        print(f"{label:<60} {rate:>12,.0f} {rate / train:>12.3f}")
    print(f"{'reference: tiny training step, measured here (world data)':<60} {train:>12,.0f}")
    return {
        "photos": args.photos,
        "photo_size": [width, height],
        "tokens_per_s": rates,
        "cache_hits": hits,
        "training_tokens_per_s": train,
        "training_source": "tiny preset, Trainer.train_step in this process, 1 thread",
        "ratio_to_training": {name: rate / train for name, rate in rates.items()},
        "cached_over_uncached": rates["cached"] / rates["uncached"],
    }
