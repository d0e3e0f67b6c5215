"""Data: the built-in world, real-data readers, the tokenizer and the packer (design.md §2, §6).

tok = load_tokenizer(cfg.data, cache_dir)
stream = build_stream(cfg.data, tok, split="train", rank=0, world_size=1)
batch = next(stream)                 # Batch [data.batch_size, data.seq_len]
sets = build_eval_sets(cfg.data, tok, seed, n_batches)
caption_shift(caption_token_lists, text_token_lists)  # JS divergences (design.md §5)
"""

from __future__ import annotations

from moesaic.config import DataConfig
from moesaic.data.eval_sets import build_eval_sets
from moesaic.data.mixing import SourceSet, open_sources
from moesaic.data.packing import DocOptions, Source, Stream
from moesaic.data.shift import caption_shift, measure_caption_shift
from moesaic.data.stacked import StackedStream
from moesaic.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from moesaic.data.world.generators import WorldSource


def make_source(
    cfg: DataConfig, split: str = "train", rank: int = 0, world_size: int = 1, label: str = ""
) -> Source:
    """The record source `data.source` names, for one split (`rank` of `world_size`: which
    WebDataset shards this process streams)."""
    if cfg.source == "world":
        return WorldSource.from_config(cfg, split)
    from moesaic.data.sources import open_source

    return open_source(cfg, split, rank=rank, world_size=world_size, label=label)


def build_stream(
    cfg: DataConfig, tok: Tokenizer, split: str = "train", rank: int = 0, world_size: int = 1
) -> Stream | StackedStream:
    """The training stream of rank `rank` of `world_size` (disjoint documents per rank); with
    `data.parts`, one stream per part whose batches are stacked (`stacked.py`); with
    `data.sources`, every source mixed by its weight (`mixing.py`)."""
    if cfg.parts:
        return StackedStream(
            [Stream(cfg, tok, open_sources(cfg, split, rank, world_size), split, rank,
                    world_size, mix=part)
             for part in cfg.parts]
        )  # fmt: skip
    return Stream(cfg, tok, open_sources(cfg, split, rank, world_size), split, rank, world_size)


__all__ = [
    "SPECIAL_TOKENS",
    "DocOptions",
    "StackedStream",
    "SourceSet",
    "Stream",
    "Tokenizer",
    "build_eval_sets",
    "build_stream",
    "caption_shift",
    "load_tokenizer",
    "make_source",
    "measure_caption_shift",
    "open_sources",
]
