"""Fingerprints of the built-in world's default output, to pin it bit for bit.

Only the world and the packer are fingerprinted: text is encoded with `ByteTokenizer` (one id
per UTF-8 byte), not with a trained BPE, so the fingerprints do not depend on the version of
the `tokenizers` library. Uses only long-standing public APIs.
"""

import hashlib
import random

import numpy as np

from moesaic.config import load_config
from moesaic.data import build_eval_sets, build_stream
from moesaic.data.documents import SpecialIds
from moesaic.data.tokenizer import world_corpus
from moesaic.data.world import scenes
from moesaic.data.world.parser import parse_scenes


class ByteTokenizer:
    """Ids 0..4 special, then one id per UTF-8 byte."""

    pad_id, bos_id, eos_id, boi_id, eoi_id = range(5)
    special = SpecialIds(0, 1, 2, 3, 4)
    vocab_size = 261

    def encode(self, text: str) -> list[int]:
        return [b + 5 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 5 for i in ids if i >= 5).decode()


def digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def batch_digest(batches) -> str:
    return digest(
        t.contiguous().numpy().tobytes() for b in batches for _, t in sorted(b.tensors().items())
    )


def world_fingerprints(overrides=()) -> dict[str, str]:
    """Digests of: the first three train batches of the tiny preset's default mix, one batch
    of each eval set, the tokenizer corpus, 100 rendered scenes of each split, and the scene
    parser's output on noisy and random images."""
    cfg = load_config("tiny", ["data.seq_len=128", "data.batch_size=4", *overrides]).data
    tok = ByteTokenizer()
    stream = build_stream(cfg, tok)
    out = {"stream": batch_digest([next(stream) for _ in range(3)])}
    for name, batches in build_eval_sets(cfg, tok, 1234, 1).items():
        out[f"eval/{name}"] = batch_digest(batches)
    out["corpus"] = digest(world_corpus(0))
    rng = random.Random(7)
    renders = [
        scenes.render(scenes.sample_scene(rng, split), size).astype(np.float32).tobytes()
        for split in ("train", "val", "test")
        for size in (16, 32)
        for _ in range(50)
    ]
    out["scenes"] = digest(renders)
    # the parser on noisy and junk images (its best guesses, not only clean renders)
    clean = np.stack([scenes.render(scenes.sample_scene(rng, "train"), 16) for _ in range(100)])
    gen = np.random.default_rng(0)
    noisy = clean + gen.normal(0, 0.3, clean.shape).astype(np.float32)
    junk = gen.uniform(-1, 1, clean.shape)
    parsed = parse_scenes(np.concatenate([noisy, junk]))
    # (confidences rounded: float64 matmuls may differ in the last bits between BLAS builds)
    out["parser"] = digest((p.scene, round(p.confidence, 4)) for p in parsed)
    return out


if __name__ == "__main__":
    for key, value in world_fingerprints().items():
        print(f'    "{key}": "{value}",')
