"""The documentation stays true to the code: the README's example runs, links resolve, the
commands and config keys the docs name exist, and the README stays short."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import re
import shlex
import typing
from pathlib import Path

import pytest
import torch

from moesaic.cli import build_parser
from moesaic.config import MIX_KEYS, Config
from moesaic.experiments.engine import EXPERIMENTS, get_experiment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
README_MAX_LINES = 200

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def code_blocks(text: str, lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def prose(text: str) -> str:
    """The text outside fenced blocks and inline code (where links are links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", path.read_text()), re.M)
    return {slug(h) for h in headings}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_python_example_runs():
    """The README's one Python block builds a model and runs one forward/backward pass."""
    (block,) = code_blocks(README.read_text(), "python")
    torch.manual_seed(0)
    namespace: dict = {}
    out_text = io.StringIO()
    with contextlib.redirect_stdout(out_text):
        exec(compile(block, "README.md", "exec"), namespace)
    out, model = namespace["out"], namespace["model"]
    assert out.logits.shape[:2] == (2, namespace["cfg"].data.seq_len)
    assert out.text_count > 0 and out.image_count > 0
    for name in ("text_loss", "image_loss", "aux_loss"):
        assert torch.isfinite(getattr(out, name)) and getattr(out, name) > 0, name
    expert_grads = [
        p.grad for n, p in model.named_parameters() if "experts" in n and p.grad is not None
    ]
    assert expert_grads and all(g.abs().sum() > 0 for g in expert_grads)
    assert out_text.getvalue().startswith("text ")


def test_docs_python_blocks_parse():
    for page in PAGES:
        for block in code_blocks(page.read_text(), "python"):
            ast.parse(block, filename=str(page))


def test_relative_links_resolve():
    """Every relative link points to an existing file, and its anchor to one of its headings."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(README.read_text())
    }
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert DOCS and not missing, f"README.md does not link {missing}"


# ------------------------------------------------------------------ commands and config keys


def _commands(text: str) -> list[list[str]]:
    """`moesaic ...` command lines of the bash blocks (also after `-m moesaic` in torchrun)."""
    out = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if "[" in line and "]" in line and "=[" not in line:
                continue  # a usage line with optional parts, not a command
            words = shlex.split(line, comments=True) if line else []
            for i, word in enumerate(words):
                if word == "moesaic" and (i == 0 or words[i - 1] == "-m"):
                    out.append(words[i + 1 :])
                    break
    return out


def test_documented_commands_parse():
    """Every `moesaic` command line in the docs is accepted by the CLI's parser."""
    parser = build_parser()
    commands = [(p.name, c) for p in PAGES for c in _commands(p.read_text())]
    assert len(commands) > 20
    for page, argv in commands:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"{page}: moesaic {' '.join(argv)}: {err.getvalue().strip()}")


CONFIG_KEY = re.compile(r"^(model|data|train|eval|logging|dist|study)\.[a-z_*][a-z0-9_.*]*")
FILE_SUFFIXES = (".json", ".jsonl", ".yaml", ".safetensors", ".md", ".py", ".html", ".png")


def _field_type(cls: type, name: str):
    if not dataclasses.is_dataclass(cls):
        return None
    if name not in {f.name for f in dataclasses.fields(cls)}:
        return None
    return typing.get_type_hints(cls)[name]


def config_key_exists(key: str) -> bool:
    """A dotted training-config key, or a `study.` key of any experiment's study config."""
    parts = key.split(".")
    if parts[0] == "study":
        classes = [get_experiment(name).config_class for name in EXPERIMENTS]
        return any(_key_in(cls, parts[1:]) for cls in classes)
    return _key_in(Config, parts)


def _key_in(node: typing.Any, parts: list[str]) -> bool:
    for i, part in enumerate(parts):
        if part == "*":
            return dataclasses.is_dataclass(node)
        if typing.get_origin(node) is dict:
            # mapping fields: data.mix keys are document kinds, others (study.lr) arm names
            return i == len(parts) - 1 and (parts[i - 1] != "mix" or part in MIX_KEYS)
        node = _field_type(node, part)
        if node is None:
            return False
    return True


def documented_config_keys() -> list[tuple[str, str]]:
    """Dotted config keys in inline code and in the overrides of documented commands."""
    out = []
    for page in PAGES:
        text = page.read_text()
        spans = [s.strip("`") for s in INLINE_CODE.findall(FENCE.sub("", text))]
        spans += [" ".join(argv) for argv in _commands(text)]
        for span in spans:
            for word in span.split():
                key = re.split(r"[=:]", word, maxsplit=1)[0]
                match = CONFIG_KEY.match(key)
                if not match or key.endswith(FILE_SUFFIXES) or key[match.end() :].startswith("("):
                    continue  # not a key: a file name, or a method call on a `model` object
                out.append((page.name, match.group(0).rstrip(".")))
    return out


def test_config_keys_named_in_docs_exist():
    keys = documented_config_keys()
    assert len(keys) > 50
    unknown = sorted({f"{page}: {key}" for page, key in keys if not config_key_exists(key)})
    assert not unknown, "\n".join(unknown)


@pytest.mark.parametrize(
    ("key", "exists"),
    [
        ("model.ffn.experts", True),
        ("model.ffn.expert", False),
        ("data.mix.text", True),
        ("data.mix.txt", False),
        ("logging.*", True),
        ("study.lr.moe", True),
        ("study.steps", True),
        ("study.text_steps", False),
        ("train.warmup_steps", False),
    ],
)
def test_config_key_check(key, exists):
    assert config_key_exists(key) is exists
