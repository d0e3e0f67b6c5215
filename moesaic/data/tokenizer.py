"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), trained on world text or loaded.

Special tokens (added to every tokenizer, ids fixed at 0..4 for trained ones):

    <|pad|>  padding and the token id at image positions
    <|bos|>  begins every document;  <|eos|> ends every document
    <|boi|>  begins an image block;  <|eoi|> ends it

`load_tokenizer(cfg, cache_dir)`:
- `data.tokenizer` set: load that `tokenizer.json`. Special tokens it lacks are added to it
  (ids appended after its vocabulary), so any byte-level or other HF tokenizer works; a file
  that is missing or not a tokenizer raises `DataError`.
- otherwise: train on a fixed corpus of the configured source's training split — for the world:
  general text, captions in every register and visual questions, so every caption register and
  mix shares one tokenizer and their text losses are comparable. With the knowledge base on
  (`data.knowledge.entities > 0`) the corpus also holds `KNOWLEDGE_DOCS` biographies of random
  people (not those of the base) in training phrasing with every attribute, so one tokenizer
  serves every size of base and number of attributes (losses stay comparable across them),
  names split into syllable tokens rather than one token per person, and a world without
  knowledge keeps its tokenizer unchanged. The result is cached at
  `cache_dir/tokenizers/<hash>/tokenizer.json` (written atomically), the hash covering
  everything that determines it (corpus version, source, paths, seed, vocab size).
- with `data.sources`: train on the union of every source's training text, in the order the
  sources are listed (the world's corpus once, however many world sources there are); the
  cache key lists every source's reader and paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moesaic.config import DataConfig
from moesaic.data.documents import SpecialIds
from moesaic.errors import DataError

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|boi|>", "<|eoi|>")
CORPUS_VERSION = "world-v1"
TRAIN_DOCS = 4000  # general-text documents in the world training corpus
KNOWLEDGE_CORPUS_VERSION = "knowledge-v1"
KNOWLEDGE_DOCS = 1000  # biographies added to the world corpus when the knowledge base is on


class Tokenizer:
    """A thin wrapper over an HF tokenizer that knows the special ids."""

    def __init__(self, hf: HFTokenizer):
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.hf = hf
        self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id = (
            hf.token_to_id(t) for t in SPECIAL_TOKENS
        )
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.added_special = missing

    @property
    def special(self) -> SpecialIds:
        return SpecialIds(self.pad_id, self.bos_id, self.eos_id, self.boi_id, self.eoi_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temp file + rename)."""
        atomic_write(Path(path), self.hf.to_str())

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer='{path}' does not exist; give a tokenizer.json path")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions on bad files
            raise DataError(
                f"data.tokenizer='{path}' is not a Hugging Face tokenizer.json ({e})"
            ) from None
        return cls(hf)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with the special tokens at ids 0..4 (deterministic)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer=trainer)
    return Tokenizer(hf)


def world_corpus(seed: int, knowledge: bool = False) -> Iterator[str]:
    """The fixed world training corpus: general text, captions of every register, questions;
    then, with `knowledge`, biographies of random people (see the module doc)."""
    from moesaic.data.world import captions, scenes, text
    from moesaic.data.world import knowledge as kb

    rng = random.Random(f"tokenizer-corpus:{seed}")
    for i in range(TRAIN_DOCS):
        yield text.general_document(rng)
        scene = scenes.sample_scene(rng, "train")
        yield captions.caption(scene, tuple(captions.REGISTERS)[i % 3], rng)
        if i % 4 == 0:
            q, a = captions.question_answer(scene, rng)
            yield f"{q} {a}"
    if knowledge:
        rng = random.Random(f"tokenizer-corpus-knowledge:{seed}")
        for _ in range(KNOWLEDGE_DOCS):
            person = kb.random_entity(rng)
            yield "".join(t for t, _ in kb.biography(person, len(kb.ATTRIBUTES), rng, "train"))


def _source_key(cfg: DataConfig) -> dict:
    """The part of the key one source (`data.source`, `data.paths`) contributes."""
    key: dict = {"source": cfg.source}
    if cfg.source == "world" and cfg.knowledge.entities:
        key["knowledge"] = KNOWLEDGE_CORPUS_VERSION
    if cfg.source != "world":
        stats = []
        for p in cfg.paths:
            st = Path(p).stat() if Path(p).exists() else None
            stats.append(
                [str(Path(p).resolve()), st.st_size if st else -1, st.st_mtime_ns if st else -1]
            )
        key["paths"] = stats
    return key


def _members(cfg: DataConfig) -> list[DataConfig]:
    from moesaic.data.mixing import member_config

    return [member_config(cfg, s) for s in cfg.source_list()]


def tokenizer_key(cfg: DataConfig) -> dict:
    """What determines a trained tokenizer (hashed into its cache directory)."""
    key = {"corpus": CORPUS_VERSION, "seed": cfg.seed, "vocab_size": cfg.vocab_size}
    if cfg.sources:
        return key | {"sources": [_source_key(m) for m in _members(cfg)]}
    return key | _source_key(cfg)


def training_corpus(cfg: DataConfig) -> list[str]:
    """The tokenizer's training text: the source's, or the union of every source's."""
    if cfg.sources:
        corpus: list[str] = []
        world_done = False
        for member in _members(cfg):
            if member.source == "world":
                if world_done:
                    continue
                world_done = True
            corpus += training_corpus(member)
        return corpus
    if cfg.source == "world":
        return list(world_corpus(cfg.seed, knowledge=cfg.knowledge.entities > 0))
    from moesaic.data.sources import source_corpus

    return source_corpus(cfg)


def cached_tokenizer_path(cfg: DataConfig, cache_dir: str | Path) -> Path:
    """Where `load_tokenizer` keeps the tokenizer it trains for `cfg` (`data.tokenizer` unset)."""
    key = tokenizer_key(cfg)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "tokenizers" / digest / "tokenizer.json"


def load_tokenizer(cfg: DataConfig, cache_dir: str | Path) -> Tokenizer:
    """Load `data.tokenizer`, or train one on the source's text (cached; see module doc)."""
    if cfg.tokenizer:
        return Tokenizer.from_file(cfg.tokenizer)
    key = tokenizer_key(cfg)
    path = cached_tokenizer_path(cfg, cache_dir)
    if path.is_file():
        try:
            return Tokenizer(HFTokenizer.from_file(str(path)))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    tok = train_tokenizer(training_corpus(cfg), cfg.vocab_size)
    tok.save(path)
    atomic_write(path.parent / "key.json", json.dumps(key, indent=1))
    return tok
