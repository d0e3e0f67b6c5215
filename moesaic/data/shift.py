"""Caption shift (design.md §5): how far caption text is from general text.

Jensen–Shannon divergence (base 2, so in [0, 1]) between the token unigram distributions, and
between the bigram distributions (pairs of consecutive tokens inside one document), of a set
of captions and a set of general-text documents. 0 = same distribution, 1 = disjoint support.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence

from moesaic.config import DataConfig


def js_divergence(p: Counter, q: Counter) -> float:
    """JS divergence (bits) between two count tables, each normalised to a distribution."""
    np_, nq = sum(p.values()), sum(q.values())
    if np_ == 0 or nq == 0:
        return float("nan")
    js = 0.0
    for key in p.keys() | q.keys():
        a, b = p.get(key, 0) / np_, q.get(key, 0) / nq
        m = 0.5 * (a + b)
        if a > 0:
            js += 0.5 * a * math.log2(a / m)
        if b > 0:
            js += 0.5 * b * math.log2(b / m)
    return min(max(js, 0.0), 1.0)


def _counts(docs: Iterable[Sequence[int]]) -> tuple[Counter, Counter]:
    uni, bi = Counter(), Counter()
    for d in docs:
        uni.update(d)
        bi.update(zip(d[:-1], d[1:], strict=False))
    return uni, bi


def caption_shift(
    caption_tokens: Iterable[Sequence[int]], text_tokens: Iterable[Sequence[int]]
) -> dict[str, float]:
    """{"unigram_js", "bigram_js"} between caption and general-text token lists."""
    cu, cb = _counts(caption_tokens)
    tu, tb = _counts(text_tokens)
    return {"unigram_js": js_divergence(cu, tu), "bigram_js": js_divergence(cb, tb)}


def measure_caption_shift(
    cfg: DataConfig, tok, n_docs: int = 500, seed: int = 0, register: str | None = None
) -> dict[str, float]:
    """Caption shift of the world's captions in `register` (default: the config's) against
    the world's general text, from `n_docs` documents of each (training split). With real
    sources: the captions of the image sources against the documents of the text sources
    (the first `n_docs` of each, training split; NaN when either is missing)."""
    if not cfg.world_only:
        caps, docs = _source_texts(cfg, n_docs)
        return caption_shift(map(tok.encode, caps), map(tok.encode, docs))
    from moesaic.data.world import captions, scenes, text

    rng = random.Random(f"caption-shift:{seed}")
    reg = register or cfg.caption_register
    caps = [
        tok.encode(captions.caption(scenes.sample_scene(rng, "train"), reg, rng))
        for _ in range(n_docs)
    ]
    docs = [tok.encode(text.general_document(rng)) for _ in range(n_docs)]
    return caption_shift(caps, docs)


def _source_texts(cfg: DataConfig, n: int) -> tuple[list[str], list[str]]:
    """(captions, general-text documents) of a run's sources, up to `n` of each."""
    from moesaic.data.mixing import open_sources
    from moesaic.data.reading import DataWarning
    from moesaic.data.world import captions, scenes, text

    caps: list[str] = []
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # already reported by the training run
        for m in open_sources(cfg, "train").members:
            if m.reader == "world":
                rng = random.Random(f"caption-shift:{m.name}")
                reg = m.source.register
                caps += [captions.caption(scenes.sample_scene(rng, "train"), reg, rng)
                         for _ in range(n)]  # fmt: skip
                docs += [text.general_document(rng) for _ in range(n)]
            elif "text" in m.source.kinds and "image_caption" not in m.source.kinds:
                docs += m.source.texts(n)
            else:
                caps += m.source.texts(n)
    return caps[:n], docs[:n]
