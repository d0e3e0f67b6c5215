"""Reading untrusted data files: staying inside the source directory, text in bounded pieces,
and how a skipped record is shown.

Containment. A record (a line of `captions.jsonl`, a file found under a `text` directory, a
shard found under a `webdataset` directory) may only name files inside its source directory:
the path is normalised (`..` folded) and then resolved (symlinks followed), and both must lie
under the resolved directory. Absolute names, `..` escapes and symlinks that leave the
directory are skipped and counted as `outside_root`. `data.follow_symlinks: true` keeps the
lexical check (no absolute names, no `..` escapes) but lets symlinks point anywhere. Paths
named in `data.paths` themselves are the user's choice and are followed. Hard links are
ordinary files and cannot be told apart.

Text. Files are decoded by their byte-order mark (UTF-8, UTF-16 LE/BE, UTF-32 LE/BE) and as
UTF-8 without one. Lines end at "\\n", "\\r\\n" or "\\r". A UTF-8 line with invalid bytes is
one bad record (`bad_encoding`); a UTF-16/32 file that does not decode, or any file holding a
NUL character (the sign of UTF-16/32 without a byte-order mark, or of a binary file), is bad
as a whole: it yields nothing and is counted once. Files are read in blocks of `BLOCK` bytes,
and a line keeps at most `max_chars` characters (its full length is reported), so a file with
one 50 MB line never needs 50 MB of text at once.

Warnings. A skipped record raises a `DataWarning` (filterable like any warning); inside
`data_warnings_as_lines()` — the `moesaic` command runs in it — it prints as one line
`warning: MESSAGE` on stderr, without Python's file and source line.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

BLOCK = 1 << 16  # bytes read at a time
BOMS = (  # UTF-32 LE before UTF-16 LE: its mark starts with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_BREAK = re.compile(r"\r\n|\r|\n")
_ESCAPED = re.compile("[\udc80-\udcff]")  # invalid UTF-8 bytes under surrogateescape
_UNUSABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, and surrogates no encoding can hold


class DataWarning(UserWarning):
    """A bad record was skipped."""


class BadEncoding(ValueError):
    """A whole text file that cannot be decoded (module doc: text)."""


@dataclasses.dataclass(frozen=True)
class Line:
    number: int  # 1-based
    text: str | None  # the first `max_chars` characters; None: invalid bytes in the line
    length: int  # characters in the whole line


# ------------------------------------------------------------------------------ containment


def contained(root: Path, name: str | Path, follow_symlinks: bool) -> Path | None:
    """`root / name`, normalised, when it stays inside `root` (a resolved directory), else None."""
    try:
        path = Path(os.path.normpath(root / name))
        if not path.is_relative_to(root):
            return None
        if not follow_symlinks and not path.resolve().is_relative_to(root):
            return None
        return path
    except (OSError, ValueError, RuntimeError):  # NUL bytes, over-long names, symlink loops
        return None


def still_inside(path: Path, root: Path, follow_symlinks: bool) -> bool:
    """Whether a path found inside `root` still resolves there (checked again when read)."""
    return follow_symlinks or contained(root, path, False) is not None


def walk_files(
    top: Path, suffixes: tuple[str, ...], follow_symlinks: bool
) -> tuple[list[Path], list[Path]]:
    """(files with one of `suffixes` under `top`, symlinks skipped for leaving it), both sorted.

    Paths start with `top` as given (record keys, and so splits, do not depend on where the
    directory lives). A directory reached twice (through symlinks) is walked once, so cycles
    end; a file reached twice is listed once.
    """
    root = top.resolve()
    files: dict[Path, Path] = {}
    outside: list[Path] = []
    seen = {root}
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        for e in entries:
            p = Path(e.path)
            try:
                real = p.resolve()
                if e.is_symlink() and not follow_symlinks and not real.is_relative_to(root):
                    if real.is_dir() or p.suffix in suffixes:
                        outside.append(p)
                    continue
                if real.is_dir():
                    if real not in seen:
                        seen.add(real)
                        stack.append(p)
                elif p.suffix in suffixes and real.is_file():
                    files.setdefault(real, p)
            except (OSError, RuntimeError):
                continue
    return sorted(files.values()), sorted(outside)


# ------------------------------------------------------------------------------ text


def sniff_bom(head: bytes) -> tuple[str, int]:
    """(encoding, length of its byte-order mark) of data starting with `head`."""
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def decode_text(data: bytes) -> str:
    """A whole small text (a caption file): decoded by its byte-order mark, else UTF-8."""
    encoding, skip = sniff_bom(data[:4])
    try:
        text = data[skip:].decode(encoding)
    except UnicodeDecodeError:
        raise BadEncoding(f"not valid {encoding}") from None
    return checked_text(text)


def checked_text(text: str) -> str:
    """`text` unchanged, or `BadEncoding` if it holds a NUL or an unpaired surrogate (JSON
    escapes such as \\u0000 or \\ud800 make them; no tokenizer can take the latter)."""
    if _UNUSABLE.search(text):
        raise BadEncoding("holds NUL characters or unpaired surrogates")
    return text


def read_lines(path: Path, max_chars: int) -> Iterator[Line]:
    """The lines of a text file, each cut to `max_chars` characters (module doc: text).

    Raises `BadEncoding` when the file is bad as a whole — possibly after some lines were
    yielded, so callers keep a file's records until it is read to the end.
    """
    with open(path, "rb") as f:
        encoding, skip = sniff_bom(f.read(4))
        f.seek(skip)
        utf8 = encoding == "utf-8"
        decoder = codecs.getincrementaldecoder(encoding)("surrogateescape" if utf8 else "strict")
        line = _LineBuffer(max_chars)
        after_cr = False  # the last block ended in "\r": a "\n" next belongs to it
        while True:
            block = f.read(BLOCK)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError:
                raise BadEncoding(f"not valid {encoding}") from None
            if "\x00" in text:
                raise BadEncoding(
                    "holds NUL characters (UTF-16/32 without a byte-order mark, or binary)"
                )
            if text:  # (a block can end inside a character and decode to nothing)
                pos = 1 if after_cr and text.startswith("\n") else 0
                for m in _BREAK.finditer(text, pos):
                    line.add(text[pos : m.start()])
                    yield line.take()
                    pos = m.end()
                line.add(text[pos:])
                after_cr = text.endswith("\r")
            if not block:
                if line.length:
                    yield line.take()
                return


class _LineBuffer:
    """The current line: its first `max_chars` characters, its length, and whether it is valid."""

    def __init__(self, max_chars: int):
        self.max_chars, self.number = max_chars, 0
        self._reset()

    def _reset(self) -> None:
        self.parts: list[str] = []
        self.kept = self.length = 0
        self.bad = False

    def add(self, piece: str) -> None:
        if not piece:
            return
        self.length += len(piece)
        self.bad = self.bad or _ESCAPED.search(piece) is not None
        if self.kept < self.max_chars:
            piece = piece[: self.max_chars - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)

    def take(self) -> Line:
        self.number += 1
        out = Line(self.number, None if self.bad else "".join(self.parts), self.length)
        self._reset()
        return out


# ------------------------------------------------------------------------------ warnings


def printable(text: str, limit: int = 300) -> str:
    """`text` with control characters escaped and cut to `limit`: names from data files reach
    the terminal only as one harmless line."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out + ("…" if len(text) > limit else "")


@contextlib.contextmanager
def data_warnings_as_lines() -> Iterator[None]:
    """Within: `DataWarning`s print as `warning: MESSAGE` on stderr; other warnings as before."""
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, DataWarning):
                print(f"warning: {message}", file=file or sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield
