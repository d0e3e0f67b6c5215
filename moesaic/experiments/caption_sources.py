"""Real data for the caption-shift study: a text source as T's general text, one image–caption
source per caption register, and bare images from one of them.

Study fields (empty by default: then the study runs on the built-in world and its registers):

    text_source      a `data.sources` entry ({kind, paths, ...}) giving T's general text:
                     kind `text`, or `hf` with a text column; named `name`, else "text"
    caption_sources  {REGISTER: {kind, paths, ...}}: one image–caption source per register
                     (folder, webdataset, hf with an image column, digits); the keys are the
                     registers (`study.registers` is taken from them) and the sources' names
    image_source     the caption source whose bare images T+I trains on ("" = the first)

Each run's `data.sources` holds the text source, with its own mix {text: 1}, and — for every
condition but T — the condition's source (the register's; T+I: the image source), with its own
mix {KIND: 1}. With `data.parts = [{text: 1}, {KIND: 1}]` part 0 then draws only the text
source and part 1 only that source's KIND documents (`moesaic.data.mixing`: a source whose own
mix gives a part's kinds no weight drops out of that part). The text source has the same name
and settings in every run and a document's seed holds its source's name, not its position, so
part 0 of every batch is T's batch bit for bit.

Tokenizer. T is the reference of every register, so every run of a study uses one tokenizer:
`data.tokenizer` when the study's overrides set one, else one trained once on the union of the
text source's and every caption source's training text (`moesaic.data.tokenizer`, cached under
`$MOESAIC_CACHE/tokenizers/`); every run gets its path as `data.tokenizer`.

Caption shift. Captions of a register's source (training split, the first `shift_docs` in the
reader's fixed order) against the text source's held-out text (its `val` split, the first
`shift_docs` documents), both encoded with the study's tokenizer: the same for every seed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

from moesaic.config import SOURCE_NAME_CHARS, Config, SourceConfig
from moesaic.errors import ConfigError, DataError, did_you_mean

TEXT_NAME = "text"  # the text source's name when the study gives none
TEXT_READERS = ("text", "hf")
CAPTION_READERS = ("folder", "webdataset", "hf", "digits")
STUDY_SET = {"mix": {}, "weight": 1.0}  # SourceConfig fields the study sets itself


def uses_real_data(study: Any) -> bool:
    """Whether the study names real sources (else it runs on the built-in world)."""
    return text_source_given(study) or bool(study.caption_sources)


def text_source_given(study: Any) -> bool:
    return study.text_source != SourceConfig()


def _checked(path: str, src: SourceConfig, readers: tuple[str, ...], gives: str) -> None:
    for key, default in STUDY_SET.items():
        if getattr(src, key) != default:
            raise ConfigError(
                f"{path}.{key} is set by the study for every run (part 0 draws only the text "
                "source, part 1 only the condition's source); remove it"
            )
    if src.kind == "world":
        raise ConfigError(
            f"{path}.kind='world': the built-in world is the study's default data (leave "
            "study.text_source and study.caption_sources empty to use it); a real-data study "
            f"takes real sources only ({', '.join(readers)})"
        )
    if src.kind and src.kind not in readers:
        raise ConfigError(
            f"{path}.kind='{src.kind}' gives no {gives}; use one of {', '.join(readers)}"
        )


def real_registers(study: Any) -> list[str]:
    """Check the real-data study fields; return the registers (the caption sources' names).

    `study.registers` may select and order caption sources; a list of the world's registers
    (a preset's or the default) is replaced by every caption source, in the order given."""
    from moesaic.config import CAPTION_REGISTERS

    if not text_source_given(study):
        raise ConfigError(
            "study.caption_sources is given but study.text_source is missing; set "
            "study.text_source={kind: text, paths: [CORPUS]} (the general text of T)"
        )
    if not study.caption_sources:
        raise ConfigError(
            "study.text_source is given but study.caption_sources is empty; give one "
            "image–caption source per register, e.g. {coco: {kind: folder, paths: [DIR]}}"
        )
    _checked("study.text_source", study.text_source, TEXT_READERS, "general text")
    text_name = study.text_source.name or TEXT_NAME
    dataclasses.replace(study.text_source, name=text_name).validate("study.text_source")
    for name, src in study.caption_sources.items():
        path = f"study.caption_sources.{name}"
        if not name or not set(name) <= SOURCE_NAME_CHARS:
            raise ConfigError(
                f"study.caption_sources has the register '{name}'; name registers with "
                "letters, digits, '_', '.' or '-' (they name runs and sources)"
            )
        if src.name:
            raise ConfigError(f"{path}.name is the register '{name}' itself; remove it")
        if name == text_name:
            raise ConfigError(
                f"study.caption_sources names the register '{name}', the text source's name; "
                "rename the register or set study.text_source.name"
            )
        _checked(path, src, CAPTION_READERS, "captions")
        dataclasses.replace(src, name=name).validate(path)
    names = list(study.caption_sources)
    if study.image_source and study.image_source not in names:
        raise ConfigError(
            f"study.image_source='{study.image_source}' is not one of study.caption_sources "
            f"({', '.join(names)}){did_you_mean(study.image_source, names, listing=False)}"
        )
    registers = list(study.registers)
    if registers and set(registers) <= set(names):
        return registers
    if set(registers) <= set(CAPTION_REGISTERS):
        return names
    bad = next(r for r in registers if r not in names)
    raise ConfigError(
        f"study.registers has '{bad}', which is not one of study.caption_sources "
        f"({', '.join(names)}); list caption sources or drop study.registers"
    )


def text_source(study: Any) -> SourceConfig:
    """The text source as it enters every run: named, drawing only text."""
    src = study.text_source
    return dataclasses.replace(src, name=src.name or TEXT_NAME, mix={"text": 1.0})


def caption_source(study: Any, name: str, kind: str) -> SourceConfig:
    """Caption source `name` as it enters a run whose second part draws `kind` from it."""
    return dataclasses.replace(study.caption_sources[name], name=name, mix={kind: 1.0})


def image_source_name(study: Any) -> str:
    return study.image_source or next(iter(study.caption_sources))


def _member(base: Config, src: SourceConfig) -> Any:
    from moesaic.data.mixing import member_config

    return member_config(base.data, src)


def _open(base: Config, src: SourceConfig, split: str, where: str) -> Any:
    """The reader of one study source for `split`; bad data stops with one line naming it."""
    from moesaic.data import make_source
    from moesaic.data.reading import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # counted again by the runs themselves
        try:
            return make_source(_member(base, src), split, label=f"{where} ({src.kind})")
        except DataError as e:
            raise ConfigError(f"{e}; fix {where}.paths") from None


def check_sources(study: Any, base: Config) -> None:
    """Open every source once: the text source must give text, each caption source captions."""
    text = _open(base, text_source(study), "train", "study.text_source")
    if "text" not in text.kinds:
        raise ConfigError(
            f"study.text_source ({study.text_source.kind}) gives no general text (it holds "
            "images); use a text corpus, or an hf dataset with a text column and no images"
        )
    for name in study.caption_sources:
        where = f"study.caption_sources.{name}"
        src = _open(base, caption_source(study, name, "caption"), "train", where)
        if "caption" not in src.kinds or not src.texts(1):
            raise ConfigError(
                f"{where} ({study.caption_sources[name].kind}) gives no captions; point it at "
                "images with captions (captions.jsonl / .csv, shards with .txt, an hf dataset "
                "with image and caption columns)"
            )


def study_tokenizer(study: Any, base: Config) -> str:
    """The path of the one tokenizer every run of the study uses (module doc)."""
    from moesaic.data.tokenizer import cached_tokenizer_path, load_tokenizer
    from moesaic.files import cache_dir

    if base.data.tokenizer:
        return base.data.tokenizer
    sources = [text_source(study)]
    sources += [caption_source(study, n, "caption") for n in study.caption_sources]
    union = dataclasses.replace(base.data, sources=sources, tokenizer="")
    load_tokenizer(union, cache_dir())
    return str(cached_tokenizer_path(union, cache_dir()).absolute())


def run_data_overrides(study: Any, base: Config, kind: str | None, source: str | None) -> list:
    """`data.sources` and `data.tokenizer` of one run: the text source, plus `source` drawing
    only `kind` (None for T)."""
    sources = [text_source(study)]
    if kind is not None and source is not None:
        sources.append(caption_source(study, source, kind))
    entries = json.dumps([dataclasses.asdict(s) for s in sources])
    return [f"data.sources={entries}", f"data.tokenizer={json.dumps(study_tokenizer(study, base))}"]


def source_texts(study: Any, base: Config, register: str | None, split: str, n: int) -> list:
    """Up to `n` texts of the text source (`register` None) or captions of a register's."""
    if register is None:
        return _open(base, text_source(study), split, "study.text_source").texts(n)
    src = caption_source(study, register, "caption")
    return _open(base, src, split, f"study.caption_sources.{register}").texts(n)


def real_js_shift(study: Any, base: Config, tok: Any, n_docs: int) -> dict:
    """{register: {unigram_js, bigram_js}}: each register's training captions against the
    text source's held-out text (module doc)."""
    from moesaic.data.shift import caption_shift

    docs = [tok.encode(t) for t in source_texts(study, base, None, "val", n_docs)]
    out = {}
    for register in study.registers:
        caps = [tok.encode(t) for t in source_texts(study, base, register, "train", n_docs)]
        out[register] = caption_shift(caps, docs)
    return out
