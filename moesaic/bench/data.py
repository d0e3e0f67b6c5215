"""`moesaic bench data`: tokens per second of the data stream (generate + tokenize + pack).

Measured on one core (torch and tokenizers limited to one thread) for the configured mix and
for each document kind alone; the video kinds also with the other `data.video.context` (clean
context documents hold 2..T frames of a T-frame clip, diffusion-forcing ones all T). The
reference, measured in the same process, is the cost of only copying already-made documents
into Batches (`pack_rows`): the ratio says how much of the stream's time goes into making
documents. The target is 10× the tiny preset's CPU training
throughput (≈ 100k tokens/s), so data never bottlenecks training.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from moesaic.config import MIX_KEYS, VIDEO_KINDS, load_config
from moesaic.data import build_stream, load_tokenizer
from moesaic.data.packing import pack_rows

TARGET_TOKENS_PER_S = 100_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="tiny", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")


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
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0
